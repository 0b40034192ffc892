// Persistent dirty bitmaps through a real read-write mount: dd, an
// unaligned write and a punched hole on the view, then unmount; QEMU must
// then find each enabled bitmap consistent (`qemu-img info`: no in-use),
// the image clean (`qemu-img check`), and exactly the granules written plus
// those set before dirty (qemu-nbd -B, nbdinfo --map=qemu:dirty-bitmap:).
// While mounted the recorded bitmaps are in use; a daemon killed with
// SIGKILL leaves them in use, never claiming to be consistent.

#include <signal.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/status_testing.h"

namespace qcow2fuse::test::cli {
namespace {

using qemu_io_cmd::W;

constexpr uint64_t kDisk = 64 * kMiB;

// Granules of one bitmap: what it must hold.
struct Expected {
  std::string name;
  uint64_t granularity;
  std::vector<bool> bits;

  void Add(uint64_t offset, uint64_t length) {
    for (uint64_t g = offset / granularity; g <= (offset + length - 1) / granularity; ++g) bits.at(g) = true;
  }
  std::string Ranges() const {
    std::vector<std::string> out;
    for (uint64_t g = 0; g < bits.size();) {
      if (!bits[g]) {
        ++g;
        continue;
      }
      const uint64_t first = g;
      while (g < bits.size() && bits[g]) ++g;
      out.push_back(absl::StrCat("[", first * granularity, ", ", std::min(kDisk, g * granularity), ")"));
    }
    return absl::StrJoin(out, " ");
  }
};

std::string Show(const std::vector<ByteRange>& ranges) {
  std::vector<std::string> out;
  for (const ByteRange& r : ranges) out.push_back(absl::StrCat("[", r.offset, ", ", r.end(), ")"));
  return absl::StrJoin(out, " ");
}

BitmapInfo Info(const std::string& image, const std::string& name, bool force_share = false) {
  absl::StatusOr<std::vector<BitmapInfo>> bitmaps = ImageBitmaps(image, force_share);
  EXPECT_OK(bitmaps);
  if (bitmaps.ok()) {
    for (const BitmapInfo& b : *bitmaps) {
      if (b.name == name) return b;
    }
  }
  ADD_FAILURE() << "no bitmap " << name;
  return {};
}

class BitmapMountTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    image_ = Path("disk.qcow2");
    ASSERT_OK(CreateImage(image_, "qcow2", kDisk));
    ASSERT_OK(QemuImg({"bitmap", "--add", image_, "on"}));
    ASSERT_OK(QemuImg({"bitmap", "--add", "-g", "4096", image_, "fine"}));
    ASSERT_OK(QemuImg({"bitmap", "--add", "-g", "65536", image_, "off"}));
    // QEMU records these in all three; then "off" is disabled.
    ASSERT_OK(QemuIo(image_, "qcow2", {W(0x11, 0, 8192), W(0x12, 40 * kMiB + 100, 70000)}));
    ASSERT_OK(QemuImg({"bitmap", "--disable", image_, "off"}));
    for (auto [name, g] : {std::pair{"on", 65536ull}, {"fine", 4096ull}, {"off", 65536ull}}) {
      Expected e{name, g, std::vector<bool>(kDisk / g, false)};
      ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> before, DirtyExtents(image_, name));
      for (const ByteRange& r : before) e.Add(r.offset, r.length);
      expected_.push_back(e);
    }
  }

  std::string image_;
  std::vector<Expected> expected_;  // on, fine, off
};

TEST_F(BitmapMountTest, WritesThroughAMountAreInTheBitmapsAfterUnmount) {
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(WritableView(image_, Path("view.raw"))));
    // dd of whole blocks, an unaligned write, a punched hole.
    ASSERT_OK(RunChecked({"dd", "if=/dev/urandom", "of=" + view->path(), "bs=64k", "seek=10", "count=5",
                          "conv=notrunc,fsync", "status=none"}));
    ASSERT_OK(RunChecked({"dd", "if=/dev/urandom", "of=" + view->path(), "bs=1M", "seek=20", "count=2",
                          "conv=notrunc", "status=none"}));
    ASSERT_OK(WriteFileAt(view->path(), 30 * kMiB - 10, std::string(20, '\x5a')));
    ASSERT_OK(RunChecked({"fallocate", "--punch-hole", "--offset", absl::StrCat(50 * kMiB), "--length",
                          absl::StrCat(300 * kKiB), view->path()}));
    EXPECT_TRUE(Info(image_, "on", /*force_share=*/true).in_use) << "recorded bitmaps are in use while mounted";
    EXPECT_FALSE(Info(image_, "off", /*force_share=*/true).in_use) << "a disabled one is not";
    ASSERT_OK(view->Unmount());
    ASSERT_TRUE(view->exit_status().has_value());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  }
  for (Expected* e : {&expected_[0], &expected_[1]}) {  // "off" records nothing
    e->Add(10 * 65536, 5 * 65536);
    e->Add(20 * kMiB, 2 * kMiB);
    e->Add(30 * kMiB - 10, 20);
    e->Add(50 * kMiB, 300 * kKiB);
  }
  EXPECT_OK(CheckImage(image_));  // no corruption, no leak
  for (const Expected& e : expected_) {
    SCOPED_TRACE(e.name);
    const BitmapInfo info = Info(image_, e.name);
    EXPECT_FALSE(info.in_use);
    EXPECT_EQ(info.enabled, e.name != "off");
    ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> dirty, DirtyExtents(image_, e.name));
    EXPECT_EQ(Show(dirty), e.Ranges());
  }
}

TEST_F(BitmapMountTest, AKilledDaemonLeavesTheBitmapsInUse) {
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(WritableView(image_, Path("view.raw"))));
    ASSERT_OK(RunChecked({"dd", "if=/dev/urandom", "of=" + view->path(), "bs=64k", "seek=3", "count=2",
                          "conv=notrunc,fsync", "status=none"}));
    ASSERT_OK(view->StopWithSignal(SIGKILL));
    (void)view->Unmount();  // the dead mount still has to come down
  }
  EXPECT_OK(CheckImage(image_, /*allow_leaks=*/true));
  EXPECT_TRUE(Info(image_, "on").in_use);
  EXPECT_TRUE(Info(image_, "fine").in_use);
  const BitmapInfo off = Info(image_, "off");
  EXPECT_FALSE(off.in_use) << "a disabled bitmap is never marked";
  ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> dirty, DirtyExtents(image_, "off"));
  EXPECT_EQ(Show(dirty), expected_[2].Ranges());
}

// A resize with a bitmap left in use (a writer crashed before) fails with
// EOPNOTSUPP, as qemu-img resize refuses it; the log says why, and its
// line at mount names every bitmap and what became of it.
TEST_F(BitmapMountTest, ResizeWithABitmapLeftInUseIsRefused) {
  // Mark "on" in use, as a crashed writer leaves it.
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(WritableView(image_, Path("view.raw"))));
    ASSERT_OK(WriteFileAt(view->path(), 0, "x"));
    ASSERT_OK(view->StopWithSignal(SIGKILL));
    (void)view->Unmount();
  }
  ASSERT_TRUE(Info(image_, "on").in_use);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(WritableView(image_, Path("view.raw"))));
  ASSERT_OK_AND_ASSIGN(CommandResult grow, RunCommand({"truncate", "-s", absl::StrCat(2 * kDisk), view->path()}));
  EXPECT_FALSE(grow.ok());
  EXPECT_NE(grow.stderr_text.find("Operation not supported"), std::string::npos) << grow.stderr_text;
  ASSERT_OK(view->Unmount());
  EXPECT_NE(view->ReadLog().find("'on' is inconsistent"), std::string::npos) << view->ReadLog();
  // The mount's log line said so from the start.
  EXPECT_NE(view->ReadLog().find("'on' left in use: it was in use already"), std::string::npos) << view->ReadLog();
  EXPECT_NE(view->ReadLog().find("'fine' left in use"), std::string::npos) << view->ReadLog();
  EXPECT_NE(view->ReadLog().find("'off' disabled"), std::string::npos) << view->ReadLog();
  ASSERT_OK_AND_ASSIGN(uint64_t size, VirtualSize(image_));
  EXPECT_EQ(size, kDisk);
  EXPECT_OK(CheckImage(image_, /*allow_leaks=*/true));
}

}  // namespace
}  // namespace qcow2fuse::test::cli
