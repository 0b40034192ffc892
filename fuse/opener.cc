#include "opener.h"

#include <sys/utsname.h>

#include <fstream>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace qcow2fuse {

std::string ProcessName(pid_t pid, const std::string& proc) {
  if (pid <= 0) return "";
  // One line; a file that cannot be opened or read leaves it empty.
  std::ifstream in(absl::StrFormat("%s/%d/comm", proc, pid));
  std::string name;
  std::getline(in, name);
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
