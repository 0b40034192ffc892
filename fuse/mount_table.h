// The mount table (/proc/self/mountinfo), read without touching the
// mounted file systems themselves.
//
// Both the daemon and `qcow2fuse -u` must learn about a view's mount
// without stat()ing its path: a stat of a FUSE mount is a request to its
// daemon, which hangs if that daemon is hung, and deadlocks if it is the
// calling process itself (it is not serving yet, or is busy unmounting).

#ifndef QCOW2FUSE_FUSE_MOUNT_TABLE_H_
#define QCOW2FUSE_FUSE_MOUNT_TABLE_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace qcow2fuse {

// The file system type the daemon mounts with (subtype=qcow2fuse).
inline constexpr char kViewFsType[] = "fuse.qcow2fuse";

// One line of /proc/self/mountinfo, the fields we use.
struct MountEntry {
  unsigned dev_major = 0;  // the mount's st_dev
  unsigned dev_minor = 0;
  std::string mount_point;  // \ooo escapes decoded
  std::string fs_type;      // "fuse.qcow2fuse", "ext4", ...
  std::string source;       // for a view: the image path (fsname=)
  std::string super_options;

  // The value of `key=` in the super options ("user_id" of a FUSE mount).
  std::optional<std::string> SuperOption(const std::string& key) const;
};

// The mount table as this process sees it, in mount order.
absl::StatusOr<std::vector<MountEntry>> ReadMountTable();

// The topmost mount at `path` (absolute and canonical), if any.
absl::StatusOr<std::optional<MountEntry>> FindMount(const std::string& path);

// The qcow2fuse mount at `path` (absolute and canonical); NotFound if the
// topmost mount there is not one.
absl::StatusOr<MountEntry> FindViewMount(const std::string& path);

// `path` made absolute and canonical the way the kernel names a mount
// point: the parent directory goes through realpath(), the last component
// is kept as is (unless it is a symlink, which is followed). The last
// component is never stat()ed, since it may be a mount point.
absl::StatusOr<std::string> CanonicalMountPath(const std::string& path);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_MOUNT_TABLE_H_
