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
// How far by default depends on who reads through the view's page cache.
//
// Loop devices do before Linux 6.15, or with -o uncached_loops=off
// (opener.h). A guest file system's reads then wait on the view's
// readahead, and the deeper it is the fewer they wait: there the default
// is as far as the kernel reads ahead of a raw file on the disk that holds
// the image. On a disk that reads ahead 8 MiB, reading every file of a
// 1 GiB ext4 tree through such a loop device sent 30,000 READs with 1 MiB
// against 12,000 with 8 MiB, and took an eighth longer.
//
// Otherwise programs (cp, dd, sha256sum) read through it, and 1 MiB is
// enough: the daemon's reads of the image file are read ahead by the host
// as far as its disk allows, so the disk keeps streaming, and the view's
// window only has to cover round trips to the daemon. A deeper one costs,
// since each page it reads ahead is copied into a fresh page of the view's
// cache, also the zeros past the end of a data run that `cp
// --sparse=always` never asks for: on a disk that reads ahead 8 MiB, cp of
// a 64 GiB view holding 800 runs of 256 KiB filled 529 MB of the view's
// cache with 8 MiB against 319 MB with 1 MiB, and took 527 to 1,503 ms
// against 285 to 432 ms (5 alternating runs each); cold sequential reads
// of zstd-compressed and plain images were no slower with 1 MiB.

#ifndef QCOW2FUSE_FUSE_READAHEAD_H_
#define QCOW2FUSE_FUSE_READAHEAD_H_

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcow2fuse {

// -o readahead=SIZE: the default where no loop device reads through the
// view's page cache, the least it is elsewhere, and the largest value
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
// `fds`. Where loop devices read the view through its page cache
// (`loops_read_cached`): the largest DeviceReadahead of their devices,
// rounded down to 4 KiB, at least kMinDefaultReadahead, at most
// kMaxReadahead. Elsewhere kMinDefaultReadahead.
uint64_t DefaultReadahead(const std::vector<int>& fds, bool loops_read_cached);

// Sets the readahead of the view mounted at `mountpoint` (canonical, see
// CanonicalMountPath) to `bytes`, a multiple of 4 KiB. Call it after the
// mount and before the kernel's INIT is answered: INIT keeps the smaller of
// this and its max_readahead, which must therefore be at least `bytes`.
// Fails with the errno of the sysfs write (EACCES for a user other than
// root); the view works either way.
absl::Status SetMountReadahead(const std::string& mountpoint, uint64_t bytes);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_READAHEAD_H_
