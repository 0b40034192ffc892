#include "readahead.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "mount_table.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {

namespace {

// The number in sysfs file `path`; NotFound if there is no such file.
absl::StatusOr<uint64_t> ReadSysfsNumber(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, absl::StrFormat("opening %s", path));
  char text[32];
  const ssize_t got = read(fd, text, sizeof(text) - 1);
  const int error = errno;
  close(fd);
  if (got < 0) return ErrnoStatus(error, absl::StrFormat("reading %s", path));
  uint64_t number = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(absl::string_view(text, static_cast<size_t>(got))), &number)) {
    return absl::DataLossError(absl::StrFormat("%s does not hold a number", path));
  }
  return number;
}

}  // namespace

absl::StatusOr<uint64_t> DeviceReadahead(dev_t dev, const std::string& sysfs) {
  const unsigned dev_major = major(dev);
  const unsigned dev_minor = minor(dev);
  // A whole disk, a device-mapper or md device, and the anonymous device
  // of an NFS or FUSE mount each have a bdi of their own number.
  absl::StatusOr<uint64_t> kb =
      ReadSysfsNumber(absl::StrFormat("%s/class/bdi/%u:%u/read_ahead_kb", sysfs, dev_major, dev_minor));
  if (absl::IsNotFound(kb.status())) {
    // A partition reads ahead as its disk does: the directory above the
    // partition's own is the disk's.
    kb = ReadSysfsNumber(absl::StrFormat("%s/dev/block/%u:%u/../queue/read_ahead_kb", sysfs, dev_major, dev_minor));
  }
  if (!kb.ok()) return kb.status();
  // A kernel's value fits many times over; saturate rather than wrap.
  return *kb > (UINT64_MAX >> 10) ? UINT64_MAX : *kb << 10;
}

uint64_t ImageDiskReadahead(const std::vector<int>& fds) {
  uint64_t bytes = kMinDefaultReadahead;
  for (const int fd : fds) {
    struct stat st;
    if (fstat(fd, &st) != 0) continue;
    if (absl::StatusOr<uint64_t> device = DeviceReadahead(st.st_dev); device.ok()) {
      bytes = std::max(bytes, *device);
    }
  }
  return std::min(bytes, kMaxReadahead) / 4096 * 4096;
}

std::string MountReadaheadKnob(const MountEntry& mount) {
  return absl::StrFormat("/sys/class/bdi/%u:%u/read_ahead_kb", mount.dev_major, mount.dev_minor);
}

absl::Status SetReadahead(const std::string& knob, uint64_t bytes) {
  const int fd = open(knob.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, absl::StrFormat("opening %s", knob));
  const std::string value = absl::StrFormat("%u\n", bytes >> 10);
  const ssize_t written = write(fd, value.data(), value.size());
  const int error = errno;
  close(fd);
  if (written != static_cast<ssize_t>(value.size())) {
    return ErrnoStatus(written < 0 ? error : EIO, absl::StrFormat("writing %s", knob));
  }
  return absl::OkStatus();
}

absl::Status LoopReadahead::Opened() {
  std::lock_guard lock(mu_);
  // Written every time, not only by the first: it costs a sysfs write per
  // loop device attached, and a value changed meanwhile is put back.
  absl::Status set = SetReadahead(knob_, raised_);
  // One that failed is not counted: its descriptor will not call Released().
  if (set.ok()) ++open_;
  return set;
}

absl::Status LoopReadahead::Released() {
  std::lock_guard lock(mu_);
  if (open_ == 0 || --open_ > 0) return absl::OkStatus();
  return SetReadahead(knob_, usual_);
}

}  // namespace qcow2fuse
