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
#include "base/budget.h"
#include "gated_file.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "qcow2_builder.h"
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse::test {
namespace {

constexpr uint32_t kSlice = 4096;
constexpr size_t kTables = 16;  // the capacity of the eviction tests

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
  const Bytes& contents() const { return contents_; }
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
  // Never less than the one table in use, and never more than asked for.
  EXPECT_EQ(TableCache(&file, kSlice, 0).capacity(), 1u);
  EXPECT_EQ(TableCache(&file, kSlice, kSlice - 1).capacity(), 1u);
  EXPECT_EQ(TableCache(&file, kSlice, kSlice).capacity(), 1u);
  EXPECT_EQ(TableCache(&file, kSlice, 2 * kSlice).capacity(), 2u);
  // 1 MiB of 2 MiB refcount blocks: one block, not sixteen (32 MiB).
  EXPECT_EQ(TableCache(&file, 2 << 20, 1 << 20).capacity(), 1u);
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
  TableCache cache(&file, kSlice, kTables * kSlice);
  for (uint64_t i = 0; i < 40; ++i) MustGet(cache, i * kSlice);
  EXPECT_EQ(cache.stats().cached, kTables);
  EXPECT_EQ(file.reads(), 40);
}

// Fill the cache with slices 0..15, touch slice 0, add slice 16: slice 1,
// now the least recently used, goes; slice 0 stays.
TEST(TableCacheTest, EvictsLeastRecentlyUsed) {
  const Bytes contents = Pattern(20 * kSlice, 6);
  CountingFile file(contents);
  TableCache cache(&file, kSlice, kTables * kSlice);
  for (uint64_t i = 0; i < kTables; ++i) MustGet(cache, i * kSlice);
  MustGet(cache, 0);
  MustGet(cache, kTables * kSlice);
  ASSERT_EQ(file.reads(), 17);

  MustGet(cache, 0);
  EXPECT_EQ(file.reads(), 17) << "slice 0 was used recently and should have stayed";
  MustGet(cache, 2 * kSlice);
  EXPECT_EQ(file.reads(), 17) << "slice 2 should not have been evicted yet";
  MustGet(cache, kSlice);
  EXPECT_EQ(file.reads(), 18) << "slice 1 was the least recently used and should have gone";
  EXPECT_EQ(cache.stats().cached, kTables);
}

TEST(TableCacheTest, HeldSliceOutlivesEviction) {
  const Bytes contents = Pattern(20 * kSlice, 7);
  CountingFile file(contents);
  TableCache cache(&file, kSlice, kTables * kSlice);
  std::shared_ptr<const Table> held = MustGet(cache, 0);
  for (uint64_t i = 1; i <= kTables; ++i) MustGet(cache, i * kSlice);
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

// A table larger than the capacity: the cache keeps only the one in use.
TEST(TableCacheTest, TablesLargerThanTheCapacityKeepOne) {
  constexpr uint32_t kBlock = 2 << 20;  // a refcount block of 2 MiB clusters
  CountingFile file(Pattern(3 * kBlock, 10));
  auto budget = std::make_shared<MemoryBudget>(uint64_t{1} << 30);
  TableCache cache(&file, kBlock, 1 << 20, budget.get(), "the refcount cache of counting.img");
  for (uint64_t i = 0; i < 3; ++i) MustGet(cache, i * kBlock);
  EXPECT_EQ(cache.stats().cached, 1u);
  EXPECT_EQ(budget->used(), kBlock);
}

// Every table the cache holds is charged, and given back when it goes.
TEST(TableCacheTest, ChargesTheTablesItHolds) {
  CountingFile file(Pattern(40 * kSlice, 11));
  auto budget = std::make_shared<MemoryBudget>(uint64_t{1} << 30);
  {
    TableCache cache(&file, kSlice, kTables * kSlice, budget.get(), "the L2 cache of counting.img");
    MustGet(cache, 0);
    EXPECT_EQ(budget->used(), kSlice);
    for (uint64_t i = 0; i < 40; ++i) MustGet(cache, i * kSlice);
    EXPECT_EQ(budget->used(), kTables * kSlice);
    cache.Forget(39 * kSlice);
    EXPECT_EQ(budget->used(), (kTables - 1) * kSlice);
    file.FailNextReads(1);
    EXPECT_FALSE(SyncWait(cache.Get(39 * kSlice)).ok());
    EXPECT_EQ(budget->used(), (kTables - 1) * kSlice) << "a failed read keeps no charge";
  }
  EXPECT_EQ(budget->used(), 0u);
}

// When the budget is spent elsewhere, the cache gives up its own clean
// tables rather than failing.
TEST(TableCacheTest, ShrinksWhenTheBudgetIsSpent) {
  CountingFile file(Pattern(40 * kSlice, 12));
  auto budget = std::make_shared<MemoryBudget>(4 * kSlice);
  TableCache cache(&file, kSlice, kTables * kSlice, budget.get(), "the L2 cache of counting.img");
  // Another structure holds all but one slice's worth.
  ASSERT_OK(budget->Take(3 * kSlice, "another table"));
  for (uint64_t i = 0; i < 10; ++i) {
    std::shared_ptr<const Table> slice = MustGet(cache, i * kSlice);
    ASSERT_NE(slice, nullptr);
    EXPECT_EQ(*slice, SliceOf(file.contents(), i * kSlice));
  }
  EXPECT_EQ(cache.stats().cached, 1u);
  EXPECT_EQ(budget->used(), 4 * kSlice);
  // It lets go: the cache grows again, up to what the budget holds.
  budget->Give(3 * kSlice);
  for (uint64_t i = 10; i < 20; ++i) MustGet(cache, i * kSlice);
  EXPECT_EQ(cache.stats().cached, 4u);
  EXPECT_EQ(budget->used(), 4 * kSlice);
}

// Dirty tables cannot be dropped: past the budget a miss fails with the
// budget's error, and works again once they are written back.
TEST(TableCacheTest, DirtyTablesOverTheBudgetFailTheNextMiss) {
  std::unique_ptr<BlockFile> file = NewMemFile("mem.img", Pattern(8 * kSlice, 13));
  auto budget = std::make_shared<MemoryBudget>(2 * kSlice);
  TableCache cache(file.get(), kSlice, kTables * kSlice, budget.get(), "the L2 cache of mem.img");
  ASSERT_OK(SyncWait(cache.Modify(0, [](Table& t) { t[0] = 1; })));
  ASSERT_OK(SyncWait(cache.Modify(kSlice, [](Table& t) { t[0] = 2; })));
  absl::StatusOr<std::shared_ptr<const Table>> miss = SyncWait(cache.Get(2 * kSlice));
  ASSERT_FALSE(miss.ok());
  EXPECT_EQ(miss.status().code(), absl::StatusCode::kResourceExhausted) << miss.status();
  EXPECT_NE(miss.status().message().find("the L2 cache of mem.img"), std::string::npos) << miss.status();
  EXPECT_EQ(budget->used(), 2 * kSlice);

  ASSERT_OK(SyncWait(cache.WriteBack()));
  ASSERT_OK(SyncWait(cache.Get(2 * kSlice)).status());
  EXPECT_EQ(budget->used(), 2 * kSlice);
}

// A table handed over by its maker exists already: it is counted even past
// the limit, so the next miss evicts or fails instead.
TEST(TableCacheTest, InstalledTablesAreCountedPastTheLimit) {
  std::unique_ptr<BlockFile> file = NewMemFile("mem.img", Pattern(8 * kSlice, 14));
  auto budget = std::make_shared<MemoryBudget>(kSlice);
  {
    TableCache cache(file.get(), kSlice, kTables * kSlice, budget.get(), "the refcount cache of mem.img");
    cache.Install(0, Table(kSlice, 1));
    cache.Install(kSlice, Table(kSlice, 2));
    cache.Install(kSlice, Table(kSlice, 3));  // replaces: still two tables
    EXPECT_EQ(budget->used(), 2 * kSlice);
    EXPECT_FALSE(SyncWait(cache.Get(4 * kSlice)).ok());
  }
  EXPECT_EQ(budget->used(), 0u);
}


// Prefetch as a request a test can start and see finish (gated_file.h).
Task<absl::Status> PrefetchThen(TableCache& cache, uint64_t offset, uint32_t count) {
  co_await cache.Prefetch(offset, count);
  co_return absl::OkStatus();
}

TEST(TableCacheTest, PrefetchReadsTheTablesOfAWalkInOneRead) {
  const Bytes contents = Pattern(8 * kSlice, 15);
  CountingFile file(contents);
  TableCache cache(&file, kSlice, kTables * kSlice);
  SyncWait(cache.Prefetch(kSlice, 4));
  EXPECT_EQ(file.reads(), 1);
  for (uint64_t i = 1; i <= 4; ++i) {
    std::shared_ptr<const Table> slice = MustGet(cache, i * kSlice);
    ASSERT_NE(slice, nullptr);
    EXPECT_EQ(*slice, SliceOf(contents, i * kSlice)) << "slice " << i;
  }
  EXPECT_EQ(file.reads(), 1) << "a prefetched slice was read again";
  const TableCache::Stats stats = cache.stats();
  EXPECT_EQ(stats.prefetched, 4u);
  EXPECT_EQ(stats.prefetch_reads, 1u);
  EXPECT_EQ(stats.misses, 0u);
  EXPECT_EQ(stats.hits, 4u);
  MustGet(cache, 5 * kSlice);
  EXPECT_EQ(file.reads(), 2) << "a slice past the prefetched ones was cached";
}

// The walk reads what it lacks from where it stands: nothing when that
// table is cached, and no further than the next table that is.
TEST(TableCacheTest, PrefetchReadsOnlyUpToACachedTable) {
  CountingFile file(Pattern(8 * kSlice, 16));
  TableCache cache(&file, kSlice, kTables * kSlice);
  MustGet(cache, 0);
  MustGet(cache, 3 * kSlice);
  ASSERT_EQ(file.reads(), 2);
  SyncWait(cache.Prefetch(0, 8));
  EXPECT_EQ(file.reads(), 2) << "the first table was cached: nothing is read";
  SyncWait(cache.Prefetch(kSlice, 7));
  EXPECT_EQ(file.reads(), 3);
  EXPECT_EQ(cache.stats().prefetched, 2u) << "slices 1 and 2 only";
  MustGet(cache, 2 * kSlice);
  EXPECT_EQ(file.reads(), 3);
  MustGet(cache, 4 * kSlice);
  EXPECT_EQ(file.reads(), 4) << "read past the cached slice 3";
}

// The tables a walk needs next must not evict one another: at most half
// the cache is read ahead.
TEST(TableCacheTest, PrefetchFillsAtMostHalfTheCache) {
  CountingFile file(Pattern(2 * kTables * kSlice, 17));
  TableCache cache(&file, kSlice, kTables * kSlice);
  SyncWait(cache.Prefetch(0, 2 * kTables));
  EXPECT_EQ(cache.stats().prefetched, kTables / 2);
  EXPECT_EQ(cache.stats().cached, kTables / 2);
}

// Only advice: a failed read caches nothing and keeps no charge, and Get
// then reads (and reports) for itself.
TEST(TableCacheTest, PrefetchThatFailsLeavesTheTablesToGet) {
  const Bytes contents = Pattern(8 * kSlice, 18);
  CountingFile file(contents);
  auto budget = std::make_shared<MemoryBudget>(uint64_t{1} << 30);
  TableCache cache(&file, kSlice, kTables * kSlice, budget.get(), "the L2 cache of counting.img");
  file.FailNextReads(1);
  SyncWait(cache.Prefetch(0, 4));
  EXPECT_EQ(cache.stats().cached, 0u);
  EXPECT_EQ(budget->used(), 0u);
  std::shared_ptr<const Table> slice = MustGet(cache, 2 * kSlice);
  ASSERT_NE(slice, nullptr);
  EXPECT_EQ(*slice, SliceOf(contents, 2 * kSlice));
  EXPECT_EQ(budget->used(), kSlice);
}

// A budget with room for fewer tables than asked: those it has room for.
TEST(TableCacheTest, PrefetchStopsWhereTheBudgetEnds) {
  std::unique_ptr<BlockFile> file = NewMemFile("mem.img", Pattern(8 * kSlice, 19));
  auto budget = std::make_shared<MemoryBudget>(3 * kSlice);
  TableCache cache(file.get(), kSlice, kTables * kSlice, budget.get(), "the L2 cache of mem.img");
  ASSERT_OK(SyncWait(cache.Modify(0, [](Table& t) { t[0] = 1; })));  // dirty: it cannot make room
  SyncWait(cache.Prefetch(kSlice, 6));
  EXPECT_EQ(cache.stats().prefetched, 2u);
  EXPECT_EQ(budget->used(), 3 * kSlice);
}

// A prefetch is slow; meanwhile a table it reads is changed, written back
// and evicted. The prefetch must not install that table as the file held
// it before the change (see Get), but it may install the others.
TEST(TableCacheTest, StalePrefetchedTableIsNotInstalled) {
  constexpr size_t kCapacity = 8;
  auto gated = std::make_unique<GatedFile>(NewMemFile("mem.img", Pattern(16 * kSlice, 20)));
  GatedFile& file = *gated;
  TableCache cache(&file, kSlice, kCapacity * kSlice);
  file.HoldNextReadResult([](uint64_t, size_t n) { return n == 4 * kSlice; });
  Started prefetch(PrefetchThen(cache, 0, 4));
  ASSERT_TRUE(file.holding_read()) << "the prefetch did not reach its read";

  ASSERT_OK(SyncWait(cache.Modify(2 * kSlice, [](Table& t) { t[0] = 0xee; })));
  ASSERT_OK(SyncWait(cache.WriteBack()));
  for (uint64_t i = 8; i < 8 + kCapacity; ++i) MustGet(cache, i * kSlice);  // evicts slice 2

  file.ReleaseRead();
  ASSERT_TRUE(prefetch.done());
  EXPECT_EQ(cache.stats().prefetched, 3u) << "slices 0, 1 and 3, not the changed one";
  std::shared_ptr<const Table> slice = MustGet(cache, 2 * kSlice);
  ASSERT_NE(slice, nullptr);
  EXPECT_EQ((*slice)[0], 0xee) << "an old L2 slice was installed";
}

}  // namespace
}  // namespace qcow2fuse::test
