// fstrim end to end: ext4 on a loop device over a read-write view. Files
// are written, then deleted, and `fstrim` sends the freed space down as
// discards (the loop driver turns them into fallocate PUNCH_HOLE on the
// view). The image must shrink by at least what was freed, less one
// cluster at each end of every freed region, and stay consistent:
// e2fsck -fn and qemu-img check clean, and the image equal to a copy of
// the view taken just before unmounting.

#include <sys/stat.h>

#include <cstdint>
#include <iostream>
#include <memory>
#include <string>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/loop_device.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kDisk = uint64_t{512} << 20;
constexpr uint64_t kCluster = 65536;
constexpr int kFiles = 8;
constexpr uint64_t kFileBytes = uint64_t{16} << 20;

// Bytes the file occupies on its file system (st_blocks), as du counts.
uint64_t DiskUsage(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

absl::Status Sh(const std::vector<std::string>& argv) { return RunChecked(argv).status(); }

TEST(FstrimTest, DeletedFilesShrinkTheImage) {
  if (std::string why = LoopUnavailableReason(); !why.empty()) GTEST_SKIP() << why;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("fstrim"));
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDisk, {"cluster_size=64k"}));

  MountOptions options;
  options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  options.image = image;
  options.mountpoint = dir.Join("disk.raw");
  options.read_only = false;
  options.start_timeout = std::chrono::seconds(20);
  options.stop_timeout = std::chrono::seconds(60);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
  ASSERT_OK(Sh({"mkfs.ext4", "-q", "-F", view->path()}));

  const std::string fs_dir = dir.Join("fs");
  ASSERT_OK(Sh({"mkdir", "-p", fs_dir}));
  uint64_t full = 0, trimmed = 0;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<LoopDevice> loop, LoopDevice::Attach(view->path(), false));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<KernelMount> fs,
                         KernelMount::Mount(loop->device(), fs_dir, "ext4", "rw"));
    for (int i = 0; i < kFiles; ++i) {
      ASSERT_OK(Sh({"dd", "if=/dev/urandom", "of=" + fs_dir + "/f" + std::to_string(i), "bs=1M",
                     "count=" + std::to_string(kFileBytes >> 20), "status=none", "conv=fsync"}));
    }
    ASSERT_OK(Sh({"sync"}));
    full = DiskUsage(image);
    for (int i = 0; i < kFiles; ++i) ASSERT_OK(Sh({"rm", fs_dir + "/f" + std::to_string(i)}));
    ASSERT_OK(Sh({"sync"}));
    ASSERT_OK(Sh({"fstrim", "-v", fs_dir}));
    ASSERT_OK(fs->Unmount());
  }
  ASSERT_OK(Sh({"e2fsck", "-fn", view->path()}));
  // The freed clusters go back to the host at the view's next flush.
  ASSERT_OK(Sh({"sync", view->path()}));
  trimmed = DiskUsage(image);
  const std::string copy = dir.Join("copy.raw");
  ASSERT_OK(Sh({"cp", "--sparse=always", view->path(), copy}));
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();

  const uint64_t freed = kFiles * kFileBytes;
  const uint64_t slack = 2 * kCluster * kFiles;
  std::cout << absl::StrFormat("image disk usage: %u MiB with the files, %u MiB after rm + fstrim (freed %u MiB)\n",
                               full >> 20, trimmed >> 20, freed >> 20);
  EXPECT_GE(full, trimmed + freed - slack) << "fstrim did not give the deleted files' space back";
  EXPECT_OK(CheckImage(image));
  ASSERT_OK_AND_ASSIGN(std::string compared, QemuImg({"compare", "-f", "qcow2", "-F", "raw", image, copy}));
  EXPECT_NE(compared.find("identical"), std::string::npos) << compared;
}

}  // namespace
}  // namespace qcow2fuse::test
