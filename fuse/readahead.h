// How far the kernel reads ahead of a reader of the view.
//
// The kernel reads ahead of a FUSE file only as far as the mount's
// backing_dev_info allows, and that starts at its default of 128 KiB: the
// max_readahead a daemon asks for at INIT can only lower it. A sequential
// reader's requests then reach the daemon as 128 KiB each, eight round
// trips per MiB, where a raw file on a disk reads ahead megabytes at once.
// Root may raise it, as `blockdev --setra` does for a disk, through
// /sys/class/bdi/MAJOR:MINOR/read_ahead_kb of the mount's device number.
//
// How far by default: as far as the kernel reads ahead of a raw file on the
// disk that holds the image. A reader of the view then brings the same
// spans into the view's page cache that it would bring into the page cache
// of a raw file there. A smaller window makes a reader wait on a round
// trip to the daemon for each span it misses, and it misses more often: on
// a disk that reads ahead 8 MiB, reading every file of a 1 GiB ext4 tree
// through a read-only loop device that went through the view's page cache
// (-o uncached_loops=off; opener.h) sent 30,000 READs with 1 MiB against
// 12,000 with 8 MiB, and took an eighth longer.

#ifndef QCOW2FUSE_FUSE_READAHEAD_H_
#define QCOW2FUSE_FUSE_READAHEAD_H_

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcow2fuse {

// -o readahead=SIZE: the least the default is, and the largest value
// accepted.
inline constexpr uint64_t kMinDefaultReadahead = uint64_t{1} << 20;
inline constexpr uint64_t kMaxReadahead = uint64_t{16} << 20;

// How far the kernel reads ahead of a file on device `dev` (a stat's
// st_dev), in bytes: the read_ahead_kb of the device's bdi, or of the
// disk of a partition. NotFound for a device sysfs shows no readahead for
// (tmpfs, or btrfs, whose bdi is named by the file system). `sysfs` is
// where sysfs is mounted; tests pass a tree of their own.
absl::StatusOr<uint64_t> DeviceReadahead(dev_t dev, const std::string& sysfs = "/sys");

// The default of -o readahead for an image whose host files are open as
// `fds`: the largest DeviceReadahead of their devices, rounded down to
// 4 KiB, at least kMinDefaultReadahead, at most kMaxReadahead.
uint64_t DefaultReadahead(const std::vector<int>& fds);

// Sets the readahead of the view mounted at `mountpoint` (canonical, see
// CanonicalMountPath) to `bytes`, a multiple of 4 KiB. Call it after the
// mount and before the kernel's INIT is answered: INIT keeps the smaller of
// this and its max_readahead, which must therefore be at least `bytes`.
// Fails with the errno of the sysfs write (EACCES for a user other than
// root); the view works either way.
absl::Status SetMountReadahead(const std::string& mountpoint, uint64_t bytes);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_READAHEAD_H_
