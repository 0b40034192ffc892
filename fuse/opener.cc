#include "opener.h"

#include <fcntl.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <array>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

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
      "losetup",     "mount",           "udisksctl",      "gnome-disk-imag", "kpartx",         "cryptsetup",
      "veritysetup", "systemd-dissect", "systemd-nspawn", "systemd-portabl", "systemd-sysext",
  };
  for (std::string_view program : kPrograms) {
    if (name == program) return true;
  }
  return false;
}

bool LoopDoesWholeRequests(std::string_view release) {
  // The loop driver's buffered path was rewritten on bvec iterators in
  // Linux 6.15 (before: vfs_iter_read of one segment, a page, at a time).
  // (This abseil's string_view is not std::string_view.)
  std::vector<absl::string_view> parts =
      absl::StrSplit(absl::string_view(release.data(), release.size()), absl::MaxSplits('.', 2));
  int major = 0;
  int minor = 0;
  if (parts.size() < 2 || !absl::SimpleAtoi(parts[0], &major)) return false;
  // The minor may run straight into a suffix ("15-rc1", "15+").
  const absl::string_view digits = parts[1].substr(0, parts[1].find_first_not_of("0123456789"));
  if (!absl::SimpleAtoi(digits, &minor)) return false;
  return major > 6 || (major == 6 && minor >= 15);
}

std::string KernelRelease() {
  struct utsname u;
  if (uname(&u) != 0) return "";
  return u.release;
}

}  // namespace qcow2fuse
