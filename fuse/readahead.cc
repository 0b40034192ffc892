#include "readahead.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <optional>

#include "absl/strings/str_format.h"
#include "mount_table.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {

absl::Status SetMountReadahead(const std::string& mountpoint, uint64_t bytes) {
  // The device number from the mount table: a stat() of the mount point
  // would be a request to this very daemon, which does not serve yet.
  absl::StatusOr<std::optional<MountEntry>> mount = FindMount(mountpoint);
  if (!mount.ok()) return mount.status();
  if (!mount->has_value() || (*mount)->fs_type != kViewFsType) {
    return absl::NotFoundError(absl::StrFormat("%s is not a qcow2fuse mount", mountpoint));
  }
  const std::string knob =
      absl::StrFormat("/sys/class/bdi/%u:%u/read_ahead_kb", (*mount)->dev_major, (*mount)->dev_minor);
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

}  // namespace qcow2fuse
