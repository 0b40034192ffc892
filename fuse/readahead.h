// How far the kernel reads ahead of a reader of the view.
//
// The kernel reads ahead of a FUSE file only as far as the mount's
// backing_dev_info allows, and that starts at its default of 128 KiB: the
// max_readahead a daemon asks for at INIT can only lower it. A sequential
// reader's requests then reach the daemon as 128 KiB each, eight round
// trips per MiB, where a raw file on a disk reads ahead megabytes at once.
// Root may raise it, as `blockdev --setra` does for a disk, through
// /sys/class/bdi/MAJOR:MINOR/read_ahead_kb of the mount's device number.

#ifndef QCOW2FUSE_FUSE_READAHEAD_H_
#define QCOW2FUSE_FUSE_READAHEAD_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace qcow2fuse {

// -o readahead=SIZE: the default, and the largest value accepted.
inline constexpr uint64_t kDefaultReadahead = uint64_t{1} << 20;
inline constexpr uint64_t kMaxReadahead = uint64_t{16} << 20;

// Sets the readahead of the view mounted at `mountpoint` (canonical, see
// CanonicalMountPath) to `bytes`, a multiple of 4 KiB. Call it after the
// mount and before the kernel's INIT is answered: INIT keeps the smaller of
// this and its max_readahead, which must therefore be at least `bytes`.
// Fails with the errno of the sysfs write (EACCES for a user other than
// root); the view works either way.
absl::Status SetMountReadahead(const std::string& mountpoint, uint64_t bytes);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_READAHEAD_H_
