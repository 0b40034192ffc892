// Forced interleavings of requests that change the same clusters.
//
// Each test parks one request in the middle of its data write (GatedFile),
// starts a conflicting request, checks that it waits, releases the first,
// and then checks that the image is what one serial order gives and that
// `qemu-img check` finds it consistent. Without the cluster locks of
// Qcow2Layer, the discard in DiscardWaitsForCopyOnWrite would free the
// compressed cluster and the write would free it a second time when it
// links its copy: the refcount would go below zero.

#include <memory>
#include <vector>

#include "data/qcow2_layer.h"
#include "format/header.h"
#include "gated_file.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "meta/zero_ranges.h"
#include "qcow2fuse/task.h"
#include "sched/range_lock.h"
#include "support/command.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kCluster = 65536;
constexpr uint64_t kDisk = 16 * kCluster;

class InterleaveTest : public ::testing::Test {
 protected:
  // Makes the image (`qemu_io` commands applied) and opens it read-write
  // through a GatedFile.
  void Open(const std::vector<std::string>& qemu_io, const std::string& create_options = "") {
    absl::StatusOr<TempDir> dir = TempDir::Create("interleave");
    ASSERT_OK(dir.status());
    dir_ = std::make_unique<TempDir>(std::move(*dir));
    path_ = dir_->Join("a.qcow2");
    std::vector<std::string> create = {"create", "-q", "-f", "qcow2", "-o",
                                       "cluster_size=64k" + create_options, path_, std::to_string(kDisk)};
    ASSERT_OK(QemuImg(create).status());
    if (!qemu_io.empty()) {
      ASSERT_OK(QemuIo(path_, "qcow2", qemu_io));
    }

    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path_, /*writable=*/true);
    ASSERT_OK(file.status());
    std::vector<uint8_t> head(std::min<uint64_t>(kCluster, (*file)->size()));
    ASSERT_OK(SyncWait((*file)->Read(0, head)));
    absl::StatusOr<Header> header = DecodeHeader(head, (*file)->size());
    ASSERT_OK(header.status());
    auto gated = std::make_unique<GatedFile>(std::move(*file));
    gated_ = gated.get();
    ImageOptions options;
    options.read_only = false;
    auto layer = SyncWait(Qcow2Layer::Open(std::move(gated), *header, nullptr, nullptr, options));
    ASSERT_OK(layer.status());
    layer_ = std::move(*layer);
  }

  std::vector<uint8_t> ReadDisk(uint64_t offset, uint64_t length) {
    std::vector<uint8_t> out(length);
    EXPECT_OK(SyncWait(layer_->Read(offset, out)));
    return out;
  }

  // Flushes, closes, and has QEMU judge the image.
  void CloseAndCheck() {
    ASSERT_OK(SyncWait(layer_->Flush()));
    layer_.reset();
    EXPECT_OK(CheckImage(path_));
  }

  static std::span<const uint8_t> Fill(std::vector<uint8_t>& buffer, uint8_t byte, size_t n) {
    buffer.assign(n, byte);
    return buffer;
  }

  std::unique_ptr<TempDir> dir_;
  std::string path_;
  GatedFile* gated_ = nullptr;
  std::unique_ptr<Qcow2Layer> layer_;
};

bool IsClusterWrite(uint64_t, size_t length) { return length == kCluster; }

TEST_F(InterleaveTest, DiscardWaitsForCopyOnWrite) {
  Open({"write -c -P 0x11 0 64k"});
  gated_->HoldNextWrite(IsClusterWrite);
  std::vector<uint8_t> data;
  Started write(layer_->Write(4096, Fill(data, 0x22, 4096)));
  ASSERT_TRUE(gated_->holding()) << "the copy-on-write did not reach its data write";
  Started discard(layer_->Discard(0, kCluster));
  EXPECT_FALSE(discard.done()) << "the discard ran while a write into its cluster was in flight";
  gated_->Release();
  ASSERT_TRUE(write.done());
  ASSERT_TRUE(discard.done());
  EXPECT_OK(write.status());
  EXPECT_OK(discard.status());
  // The serial order write, then discard.
  EXPECT_EQ(ReadDisk(0, kCluster), std::vector<uint8_t>(kCluster, 0));
  CloseAndCheck();
}

TEST_F(InterleaveTest, WriteWaitsForPartialDiscard) {
  Open({"write -c -P 0x11 0 64k"});
  gated_->HoldNextWrite(IsClusterWrite);
  // A discard of part of a compressed cluster copies it with zeros in place.
  Started discard(layer_->Discard(0, 4096));
  ASSERT_TRUE(gated_->holding());
  std::vector<uint8_t> data;
  Started write(layer_->Write(8192, Fill(data, 0x33, 4096)));
  EXPECT_FALSE(write.done());
  gated_->Release();
  ASSERT_TRUE(discard.done());
  ASSERT_TRUE(write.done());
  EXPECT_OK(discard.status());
  EXPECT_OK(write.status());
  std::vector<uint8_t> expect(kCluster, 0x11);
  std::fill(expect.begin(), expect.begin() + 4096, 0);
  std::fill(expect.begin() + 8192, expect.begin() + 12288, 0x33);
  EXPECT_EQ(ReadDisk(0, kCluster), expect);
  CloseAndCheck();
}

TEST_F(InterleaveTest, TwoPartialWritesIntoOneUnallocatedCluster) {
  Open({});
  gated_->HoldNextWrite(IsClusterWrite);
  std::vector<uint8_t> a, b;
  Started first(layer_->Write(0, Fill(a, 0x44, 4096)));
  ASSERT_TRUE(gated_->holding());
  Started second(layer_->Write(32768, Fill(b, 0x55, 4096)));
  EXPECT_FALSE(second.done()) << "both writes would allocate a copy and one would be lost";
  gated_->Release();
  ASSERT_TRUE(first.done() && second.done());
  EXPECT_OK(first.status());
  EXPECT_OK(second.status());
  std::vector<uint8_t> expect(kCluster, 0);
  std::fill(expect.begin(), expect.begin() + 4096, 0x44);
  std::fill(expect.begin() + 32768, expect.begin() + 36864, 0x55);
  EXPECT_EQ(ReadDisk(0, kCluster), expect);
  CloseAndCheck();
}

TEST_F(InterleaveTest, RequestsOnOtherClustersDoNotWait) {
  Open({"write -c -P 0x11 0 64k"});
  gated_->HoldNextWrite(IsClusterWrite);
  std::vector<uint8_t> a, b;
  Started cow(layer_->Write(0, Fill(a, 0x66, 512)));
  ASSERT_TRUE(gated_->holding());
  Started other(layer_->Write(5 * kCluster, Fill(b, 0x77, 512)));
  Started discard(layer_->Discard(8 * kCluster, 2 * kCluster));
  Started read_zero(layer_->WriteZeroes(12 * kCluster, kCluster, /*may_unmap=*/true));
  EXPECT_TRUE(other.done());
  EXPECT_TRUE(discard.done());
  EXPECT_TRUE(read_zero.done());
  // Reads take no lock: the compressed data is still there to read.
  EXPECT_EQ(ReadDisk(kCluster - 512, 512), std::vector<uint8_t>(512, 0x11));
  gated_->Release();
  ASSERT_TRUE(cow.done());
  EXPECT_OK(cow.status());
  EXPECT_EQ(ReadDisk(0, 512), std::vector<uint8_t>(512, 0x66));
  EXPECT_EQ(ReadDisk(5 * kCluster, 512), std::vector<uint8_t>(512, 0x77));
  CloseAndCheck();
}

TEST(RangeLockTest, OverlappingRequestsWaitInArrivalOrder) {
  RangeLock lock;
  std::vector<int> order;
  auto take = [&](uint64_t first, uint64_t last, int id, RangeLock::Guard* keep) -> Task<absl::Status> {
    RangeLock::Guard guard = co_await lock.Lock(first, last);
    order.push_back(id);
    if (keep != nullptr) *keep = std::move(guard);
    co_return absl::OkStatus();
  };
  RangeLock::Guard held;
  Started a(take(0, 9, 1, &held));  // holds 0..9
  Started b(take(5, 5, 2, nullptr));   // waits for a
  Started c(take(20, 30, 3, nullptr)); // disjoint: goes at once
  Started d(take(9, 20, 4, nullptr));  // waits for a (and arrived after b)
  EXPECT_TRUE(a.done());
  EXPECT_FALSE(b.done());
  EXPECT_TRUE(c.done());
  EXPECT_FALSE(d.done());
  EXPECT_EQ(lock.held(), 1u);
  EXPECT_EQ(lock.waiting(), 2u);
  held.Release();
  EXPECT_TRUE(b.done());
  EXPECT_TRUE(d.done());
  EXPECT_EQ(order, (std::vector<int>{1, 3, 2, 4}));
  EXPECT_EQ(lock.held() + lock.waiting(), 0u);
}

TEST(ZeroRangesTest, AddMergesAndRemoveSplits) {
  ZeroRanges z;
  z.Add(0, 100);
  z.Add(100, 200);  // adjacent: one run
  z.Add(300, 400);
  EXPECT_EQ(z.runs(), 2u);
  EXPECT_EQ(z.ZeroRunAt(50), 150u);
  EXPECT_EQ(z.ZeroRunAt(200), 0u);
  EXPECT_TRUE(z.Contains(300, 400));
  EXPECT_FALSE(z.Contains(150, 350));
  z.Remove(120, 130);
  EXPECT_EQ(z.ZeroRunAt(50), 70u);
  EXPECT_EQ(z.ZeroRunAt(130), 70u);
  z.Remove(0, 1000);
  EXPECT_EQ(z.runs(), 0u);
  z.Add(10, 20);
  z.Add(5, 30);  // swallows
  EXPECT_EQ(z.runs(), 1u);
  EXPECT_EQ(z.ZeroRunAt(5), 25u);
}

// A removal that cuts through several runs keeps both cut ends (btree
// insertions invalidate iterators: the ends are put back after the loop).
TEST(ZeroRangesTest, RemoveAcrossSeveralRuns) {
  ZeroRanges z;
  z.Add(0, 10);
  z.Add(20, 30);
  z.Add(40, 50);
  z.Remove(5, 45);
  EXPECT_EQ(z.runs(), 2u);
  EXPECT_EQ(z.ZeroRunAt(0), 5u);
  EXPECT_EQ(z.ZeroRunAt(25), 0u);
  EXPECT_EQ(z.ZeroRunAt(45), 5u);
}

}  // namespace
}  // namespace qcow2fuse::test
