// Loop devices and kernel mounts for the length of a scope, for tests that
// put a real file system on a qcow2fuse view:
//
//   ASSERT_OK_AND_ASSIGN(std::unique_ptr<LoopDevice> loop,
//                        LoopDevice::Attach(view->path(), /*read_only=*/true));
//   ASSERT_OK_AND_ASSIGN(
//       std::unique_ptr<KernelMount> mounted,
//       KernelMount::Mount(loop->device(), dir, "ext4", "ro"));
//
// Declare them after the view they sit on, so they are torn down first:
// an attached loop device keeps the view busy. Both need root.

#ifndef QCOW2FUSE_TESTS_SUPPORT_LOOP_DEVICE_H_
#define QCOW2FUSE_TESTS_SUPPORT_LOOP_DEVICE_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcow2fuse::test {

// Why loop devices cannot be used here (not root, no loop driver, none
// free), or empty if they can: for GTEST_SKIP.
std::string LoopUnavailableReason();

// Waits (up to 10 s) until loop device `device` ("/dev/loopN") has let go
// of its file: one marked to detach (`losetup -d` while in use, or
// autoclear after the unmount of `mount -o loop`) lets go at its last
// close. Whether it did.
bool WaitUntilDetached(const std::string& device);

// Loop device `device`'s mode as sysfs shows it (loop/dio): "1" for direct
// I/O, "0" for buffered; empty if it is not attached or cannot be read.
std::string LoopDioFlag(const std::string& device);

// A loop device over a file (`losetup -f`), detached on destruction.
class LoopDevice {
 public:
  // With `direct_io`, the device reads and writes `file` with O_DIRECT
  // (`losetup --direct-io=on`); an error if the kernel kept it buffered.
  static absl::StatusOr<std::unique_ptr<LoopDevice>> Attach(
      const std::string& file, bool read_only, bool direct_io = false);

  LoopDevice(const LoopDevice&) = delete;
  LoopDevice& operator=(const LoopDevice&) = delete;
  // `losetup -d`, then waits (bounded) until the kernel has let go of the
  // file: a device still in use is only marked to detach on its last
  // close, and until then it holds the file (a view cannot be unmounted).
  ~LoopDevice();

  // "/dev/loopN".
  const std::string& device() const { return device_; }

 private:
  explicit LoopDevice(std::string device) : device_(std::move(device)) {}

  const std::string device_;
};

// A kernel mount of a block device, unmounted on destruction: `umount`,
// or `umount -l` if that fails, so a failing test never leaves it behind.
class KernelMount {
 public:
  // `mount -t fs_type -o options device dir`.
  static absl::StatusOr<std::unique_ptr<KernelMount>> Mount(
      const std::string& device, const std::string& dir,
      const std::string& fs_type, const std::string& options);

  KernelMount(const KernelMount&) = delete;
  KernelMount& operator=(const KernelMount&) = delete;
  ~KernelMount();

  // Unmounts now (no lazy fallback), so a test can check that it worked.
  absl::Status Unmount();

 private:
  explicit KernelMount(std::string dir) : dir_(std::move(dir)) {}

  const std::string dir_;
  bool mounted_ = true;
};

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_SUPPORT_LOOP_DEVICE_H_
