#include "opener.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>

#include "absl/strings/str_format.h"

namespace qcow2fuse {

std::string ProcessName(pid_t pid, const std::string& proc) {
  if (pid <= 0) return "";
  const std::string path = absl::StrFormat("%s/%d/comm", proc, pid);
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  // comm holds at most TASK_COMM_LEN - 1 = 15 bytes and a newline.
  std::array<char, 64> buffer;
  const ssize_t n = read(fd, buffer.data(), buffer.size());
  close(fd);
  if (n <= 0) return "";
  std::string name(buffer.data(), static_cast<size_t>(n));
  if (name.back() == '\n') name.pop_back();
  return name;
}

bool AttachesLoopDevices(std::string_view name) {
  // comm is cut to 15 bytes: "systemd-portabled" is "systemd-portabl".
  // udisksctl and GNOME Disks open the file themselves and hand udisksd
  // the descriptor; cryptsetup and veritysetup attach a loop device to a
  // file they are given.
  static constexpr std::string_view kPrograms[] = {
      "losetup",         "mount",          "udisksctl",       "udisksd",        "gnome-disk-imag", "kpartx",
      "cryptsetup",      "veritysetup",    "systemd-dissect", "systemd-nspawn", "systemd-portabl", "systemd-sysext",
  };
  for (std::string_view program : kPrograms) {
    if (name == program) return true;
  }
  return false;
}

}  // namespace qcow2fuse
