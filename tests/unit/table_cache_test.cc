#include "meta/table_cache.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "qcow2_builder.h"
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse::test {
namespace {

constexpr uint32_t kSlice = 4096;
constexpr size_t kMinTables = 16;  // the cache never holds fewer

// An in-memory file that counts reads and can fail the next few.
class CountingFile final : public BlockFile {
 public:
  explicit CountingFile(Bytes contents) : contents_(std::move(contents)) {}

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override {
    ++reads_;
    if (failures_ > 0) {
      --failures_;
      co_return ErrnoStatus(EIO, "reading counting.img");
    }
    std::memset(out.data(), 0, out.size());
    if (offset < contents_.size()) {
      std::memcpy(out.data(), contents_.data() + offset,
                  std::min<uint64_t>(out.size(), contents_.size() - offset));
    }
    co_return absl::OkStatus();
  }
  uint64_t size() const override { return contents_.size(); }
  const std::string& name() const override { return name_; }

  void FailNextReads(int n) { failures_ = n; }
  int reads() const { return reads_; }

 private:
  const std::string name_ = "counting.img";
  const Bytes contents_;
  int reads_ = 0;
  int failures_ = 0;
};

Bytes SliceOf(const Bytes& file, uint64_t offset, size_t size = kSlice) {
  return Bytes(file.begin() + offset, file.begin() + offset + size);
}

std::shared_ptr<const Table> MustGet(TableCache& cache, uint64_t offset) {
  absl::StatusOr<std::shared_ptr<const Table>> slice = SyncWait(cache.Get(offset));
  EXPECT_TRUE(slice.ok()) << slice.status();
  return slice.ok() ? *slice : nullptr;
}

TEST(TableCacheTest, SliceSizeFor) {
  EXPECT_EQ(L2SliceSize(512), 512u);
  EXPECT_EQ(L2SliceSize(2048), 2048u);
  EXPECT_EQ(L2SliceSize(4096), 4096u);
  EXPECT_EQ(L2SliceSize(65536), 4096u);
  EXPECT_EQ(L2SliceSize(2 << 20), 4096u);
}

TEST(TableCacheTest, CapacityInSlices) {
  CountingFile file(Bytes(kSlice, 0));
  EXPECT_EQ(TableCache(&file, kSlice, 32 * kSlice).capacity(), 32u);
  EXPECT_EQ(TableCache(&file, kSlice, 32 * kSlice + kSlice - 1).capacity(), 32u);
  EXPECT_EQ(TableCache(&file, kSlice, 0).capacity(), kMinTables);
  EXPECT_EQ(TableCache(&file, kSlice, kSlice).capacity(), kMinTables);
}

TEST(TableCacheTest, GetReturnsSliceBytes) {
  const Bytes contents = Pattern(16 * kSlice, 1);
  CountingFile file(contents);
  TableCache cache(&file, kSlice, 0);
  std::shared_ptr<const Table> slice = MustGet(cache, 3 * kSlice);
  ASSERT_NE(slice, nullptr);
  EXPECT_EQ(*slice, SliceOf(contents, 3 * kSlice));
}

TEST(TableCacheTest, SmallSlices) {
  const Bytes contents = Pattern(8 * 512, 2);
  CountingFile file(contents);
  TableCache cache(&file, 512, 0);
  std::shared_ptr<const Table> slice = MustGet(cache, 1536);
  ASSERT_NE(slice, nullptr);
  EXPECT_EQ(*slice, SliceOf(contents, 1536, 512));
}

TEST(TableCacheTest, SecondGetIsHit) {
  const Bytes contents = Pattern(4 * kSlice, 3);
  CountingFile file(contents);
  TableCache cache(&file, kSlice, 0);
  std::shared_ptr<const Table> first = MustGet(cache, kSlice);
  std::shared_ptr<const Table> second = MustGet(cache, kSlice);
  EXPECT_EQ(first, second);
  EXPECT_EQ(file.reads(), 1);
  TableCache::Stats stats = cache.stats();
  EXPECT_EQ(stats.hits, 1u);
  EXPECT_EQ(stats.misses, 1u);
  EXPECT_EQ(stats.cached, 1u);
}

TEST(TableCacheTest, DifferentOffsetsAreDifferentSlices) {
  const Bytes contents = Pattern(4 * kSlice, 4);
  CountingFile file(contents);
  TableCache cache(&file, kSlice, 0);
  std::shared_ptr<const Table> a = MustGet(cache, 0);
  std::shared_ptr<const Table> b = MustGet(cache, kSlice);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(*a, SliceOf(contents, 0));
  EXPECT_EQ(*b, SliceOf(contents, kSlice));
  EXPECT_EQ(cache.stats().misses, 2u);
  EXPECT_EQ(cache.stats().hits, 0u);
}

TEST(TableCacheTest, CapacityIsRespected) {
  const Bytes contents = Pattern(40 * kSlice, 5);
  CountingFile file(contents);
  TableCache cache(&file, kSlice, 0);
  for (uint64_t i = 0; i < 40; ++i) MustGet(cache, i * kSlice);
  EXPECT_EQ(cache.stats().cached, kMinTables);
  EXPECT_EQ(file.reads(), 40);
}

// Fill the cache with slices 0..15, touch slice 0, add slice 16: slice 1,
// now the least recently used, goes; slice 0 stays.
TEST(TableCacheTest, EvictsLeastRecentlyUsed) {
  const Bytes contents = Pattern(20 * kSlice, 6);
  CountingFile file(contents);
  TableCache cache(&file, kSlice, 0);
  for (uint64_t i = 0; i < kMinTables; ++i) MustGet(cache, i * kSlice);
  MustGet(cache, 0);
  MustGet(cache, kMinTables * kSlice);
  ASSERT_EQ(file.reads(), 17);

  MustGet(cache, 0);
  EXPECT_EQ(file.reads(), 17) << "slice 0 was used recently and should have stayed";
  MustGet(cache, 2 * kSlice);
  EXPECT_EQ(file.reads(), 17) << "slice 2 should not have been evicted yet";
  MustGet(cache, kSlice);
  EXPECT_EQ(file.reads(), 18) << "slice 1 was the least recently used and should have gone";
  EXPECT_EQ(cache.stats().cached, kMinTables);
}

TEST(TableCacheTest, HeldSliceOutlivesEviction) {
  const Bytes contents = Pattern(20 * kSlice, 7);
  CountingFile file(contents);
  TableCache cache(&file, kSlice, 0);
  std::shared_ptr<const Table> held = MustGet(cache, 0);
  for (uint64_t i = 1; i <= kMinTables; ++i) MustGet(cache, i * kSlice);
  ASSERT_NE(held, nullptr);
  EXPECT_EQ(*held, SliceOf(contents, 0));

  std::shared_ptr<const Table> again = MustGet(cache, 0);
  EXPECT_EQ(file.reads(), 18) << "slice 0 should have been evicted";
  EXPECT_NE(again, held);
  EXPECT_EQ(*again, SliceOf(contents, 0));
  EXPECT_EQ(*held, SliceOf(contents, 0));
}

TEST(TableCacheTest, ReadErrorPropagates) {
  CountingFile file(Pattern(4 * kSlice, 8));
  TableCache cache(&file, kSlice, 0);
  file.FailNextReads(1);
  absl::StatusOr<std::shared_ptr<const Table>> slice = SyncWait(cache.Get(kSlice));
  ASSERT_FALSE(slice.ok());
  EXPECT_EQ(slice.status(), ErrnoStatus(EIO, "reading counting.img"));
  EXPECT_EQ(StatusErrno(slice.status()), EIO);
}

// A failed read leaves nothing behind: the next Get reads again.
TEST(TableCacheTest, ReadErrorIsNotCached) {
  const Bytes contents = Pattern(4 * kSlice, 9);
  CountingFile file(contents);
  TableCache cache(&file, kSlice, 0);
  file.FailNextReads(1);
  EXPECT_FALSE(SyncWait(cache.Get(kSlice)).ok());
  EXPECT_EQ(cache.stats().cached, 0u);

  std::shared_ptr<const Table> slice = MustGet(cache, kSlice);
  ASSERT_NE(slice, nullptr);
  EXPECT_EQ(*slice, SliceOf(contents, kSlice));
  EXPECT_EQ(file.reads(), 2);
  EXPECT_EQ(cache.stats().cached, 1u);
}

}  // namespace
}  // namespace qcow2fuse::test
