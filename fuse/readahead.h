// How far the kernel reads ahead of a reader of the view.
//
// The kernel reads ahead of a FUSE file only as far as the mount's
// backing_dev_info allows, and that starts at its default of 128 KiB: the
// max_readahead a daemon asks for at INIT can only lower it. A sequential
// reader's requests then reach the daemon as 128 KiB each, eight round
// trips per MiB, where a raw file on a disk reads ahead megabytes at once.
// Root may raise it, as `blockdev --setra` does for a disk, through
// /sys/class/bdi/MAJOR:MINOR/read_ahead_kb of the mount's device number,
// at any time: a file takes the mount's value when it is opened.
//
// How far by default depends on who reads through the view's page cache.
//
// Programs (cp, dd, sha256sum) do, and for them 1 MiB is enough: the
// daemon's reads of the image file are read ahead by the host as far as
// its disk allows, so the disk keeps streaming, and the view's window only
// has to cover round trips to the daemon. A deeper one costs, since each
// page it reads ahead is copied into a fresh page of the view's cache,
// also the zeros past the end of a data run that `cp --sparse=always`
// never asks for: on a disk that reads ahead 8 MiB, cp of a 64 GiB view
// holding 800 runs of 256 KiB filled 529 MB of the view's cache with
// 8 MiB against 319 MB with 1 MiB, and took 527 to 1,503 ms against 285
// to 432 ms (5 alternating runs each); cold sequential reads of
// zstd-compressed and plain images were no slower with 1 MiB.
//
// A loop device reading through the view's cache (opener.h; one the
// daemon leaves buffered, -o loop_direct_io=off, see loop_direct_io.h) is
// another reader: a guest file system's reads wait on the view's readahead, and
// the deeper it is the fewer they wait. For it the view reads ahead as far
// as the kernel reads ahead of a raw file on the disk that holds the
// image, so that they wait as seldom as they would there: on a disk that
// reads ahead 8 MiB, reading every file of a 1 GiB ext4 tree through a
// read-only loop device took 7.41 s with 8 MiB against 7.99 s with 1 MiB
// (medians of 6 alternating runs; the raw file: 6.81 s). The view raises
// the mount's readahead when such a descriptor is opened, before it
// answers the OPEN, and lowers it when the last one is released
// (LoopReadahead); files opened in between keep the deeper window.

#ifndef QCOW2FUSE_FUSE_READAHEAD_H_
#define QCOW2FUSE_FUSE_READAHEAD_H_

#include <sys/types.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "mount_table.h"

namespace qcow2fuse {

// -o readahead=SIZE: the default, the least a loop device's descriptor
// gets, and the largest value accepted.
inline constexpr uint64_t kMinDefaultReadahead = uint64_t{1} << 20;
inline constexpr uint64_t kMaxReadahead = uint64_t{16} << 20;

// How far the kernel reads ahead of a file on device `dev` (a stat's
// st_dev), in bytes: the read_ahead_kb of the device's bdi, or of the
// disk of a partition. NotFound for a device sysfs shows no readahead for
// (tmpfs, or btrfs, whose bdi is named by the file system). `sysfs` is
// where sysfs is mounted; tests pass a tree of their own.
absl::StatusOr<uint64_t> DeviceReadahead(dev_t dev, const std::string& sysfs = "/sys");

// How far the kernel reads ahead of a file on the disks that hold an
// image whose host files are open as `fds`: the largest DeviceReadahead of
// their devices, rounded down to 4 KiB, at least kMinDefaultReadahead, at
// most kMaxReadahead. The view reads ahead this far while a loop device
// reads it through its page cache, and the host reads the image this far
// ahead of a sequential reader (-o image_readahead's default).
uint64_t ImageDiskReadahead(const std::vector<int>& fds);

// The sysfs file that holds the readahead (in KiB) of the view's `mount`
// (FindViewMount).
std::string MountReadaheadKnob(const MountEntry& mount);

// Sets the readahead that `knob` (MountReadaheadKnob) holds to `bytes`, a
// multiple of 4 KiB. At mounting, call it before the kernel's INIT is
// answered: INIT keeps the smaller of this and its max_readahead, which
// must therefore be at least `bytes`. Fails with the errno of the sysfs
// write (EACCES for a user other than root); the view works either way.
absl::Status SetReadahead(const std::string& knob, uint64_t bytes);

// The mount's readahead while loop devices read the view through its page
// cache: `raised` from the first such descriptor's open to the last one's
// release, `usual` otherwise. Thread-safe.
class LoopReadahead {
 public:
  LoopReadahead(std::string knob, uint64_t usual, uint64_t raised)
      : knob_(std::move(knob)), usual_(usual), raised_(raised) {}

  // Before answering the open of such a descriptor: the kernel gives the
  // file the mount's readahead after the answer. Counted only if it
  // succeeds.
  absl::Status Opened();
  // At the release of one that Opened() counted.
  absl::Status Released();

  uint64_t raised() const { return raised_; }

 private:
  const std::string knob_;
  const uint64_t usual_;
  const uint64_t raised_;
  std::mutex mu_;
  int open_ = 0;  // guarded by mu_
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_READAHEAD_H_
