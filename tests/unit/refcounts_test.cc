// Refcounts (meta/refcounts.h) on hand-built images in memory, for every
// refcount width (refcount_order 0..6): loading and reading refcounts,
// first-fit allocation, increments and decrements and their limits, the
// freed ranges, and growth: a new refcount block that describes itself, one
// that is counted in another block, and a new refcount table.
//
// After each scenario the refcounts are written back and the image bytes are
// decoded here, independently of format/refcount.cc, and compared cluster
// by cluster with a model of what the test did. Where the image is small
// enough it is also written to a temp file for `qemu-img check`: the
// clusters the test allocates are never referenced by any L2 table, so QEMU
// must report exactly those as leaked, and nothing as corrupt.

#include "meta/refcounts.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "format/header.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "qcow2_builder.h"
#include "qcow2fuse/task.h"
#include "support/command.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

// Header fields not named in qcow2_builder.h (offsets from the spec).
constexpr uint64_t kHdrClusterBits = 20;
constexpr uint64_t kHdrRefcountTableOffset = 48;
constexpr uint64_t kHdrRefcountTableClusters = 56;
constexpr uint64_t kHdrL1Size = 36;
constexpr uint64_t kHdrL1TableOffset = 40;

constexpr uint64_t kCacheBytes = 1 << 20;

// --- Refcount entries as the spec describes them --------------------------
// ("Host cluster management": entries narrower than a byte are packed
// starting at the least significant bit; wider ones are big-endian.)
// Written here again so that the engine's codec is not checked against
// itself.

uint64_t SpecMax(uint32_t order) {
  const uint32_t bits = 1u << order;
  return bits == 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
}

uint64_t SpecGet(const uint8_t* block, uint64_t index, uint32_t order) {
  const uint32_t bits = 1u << order;
  if (bits < 8) {
    const uint64_t bit = index * bits;
    return (block[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
  }
  const uint32_t bytes = bits / 8;
  uint64_t v = 0;
  for (uint32_t i = 0; i < bytes; ++i) v = (v << 8) | block[index * bytes + i];
  return v;
}

void SpecSet(uint8_t* block, uint64_t index, uint32_t order, uint64_t value) {
  const uint32_t bits = 1u << order;
  if (bits < 8) {
    const uint64_t bit = index * bits;
    const uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << (bit % 8));
    block[bit / 8] = static_cast<uint8_t>((block[bit / 8] & ~mask) | ((value << (bit % 8)) & mask));
    return;
  }
  const uint32_t bytes = bits / 8;
  for (uint32_t i = 0; i < bytes; ++i) {
    block[index * bytes + i] = static_cast<uint8_t>(value >> (8 * (bytes - 1 - i)));
  }
}

// --- Hand-built images -----------------------------------------------------

// A v3 image of `size` bytes: header in cluster 0, a one-cluster refcount
// table in cluster 1, the L1 table in cluster 2 (all entries 0) and refcount
// block 0 in cluster 3. Clusters 0-3 have refcount 1; every other cluster 0.
struct TestImage {
  uint32_t cluster_bits = 9;
  uint32_t order = 4;
  Bytes bytes;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint64_t block_entries() const { return (uint64_t{8} << cluster_bits) >> order; }
  uint64_t block0() const { return 3 * cluster_size(); }

  // Sets the refcount of a cluster that refcount block 0 describes.
  void Set(uint64_t cluster, uint64_t value) {
    ASSERT_LT(cluster, block_entries());
    SpecSet(bytes.data() + block0(), cluster, order, value);
  }
};

TestImage MakeImage(uint32_t cluster_bits, uint32_t order, uint64_t size = 1 << 20) {
  TestImage t;
  t.cluster_bits = cluster_bits;
  t.order = order;
  Qcow2Builder b({.cluster_bits = cluster_bits, .size = size});
  PutBE32(b.bytes(), kOffRefcountOrder, order);
  const uint64_t block = b.AllocateCluster();
  EXPECT_EQ(block, 3 * b.cluster_size()) << "the L1 table should fit in one cluster";
  PutBE64(b.bytes(), b.cluster_size(), block);  // refcount table entry 0
  t.bytes = std::move(b.bytes());
  for (uint64_t c = 0; c < 4; ++c) t.Set(c, 1);
  return t;
}

// A Refcounts over a memory copy of the image, loaded.
struct Opened {
  std::unique_ptr<BlockFile> file;
  std::unique_ptr<Refcounts> refcounts;
};

absl::StatusOr<Opened> Open(const Bytes& bytes) {
  absl::StatusOr<Header> header = DecodeHeader(bytes, bytes.size());
  if (!header.ok()) return header.status();
  Opened o;
  o.file = NewMemFile("refcounts.qcow2", bytes);
  o.refcounts = std::make_unique<Refcounts>(o.file.get(), *header, kCacheBytes);
  absl::Status loaded = SyncWait(o.refcounts->Load());
  if (!loaded.ok()) return loaded;
  return o;
}

// --- Decoding the refcount structures from the image bytes ------------------

struct DiskRefcounts {
  uint32_t cluster_bits = 0;
  uint32_t order = 0;
  uint64_t table_offset = 0;
  uint32_t table_clusters = 0;
  std::vector<uint64_t> table;  // refcount block offsets, 0 = none
  const Bytes* bytes = nullptr;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint64_t block_entries() const { return (uint64_t{8} << cluster_bits) >> order; }

  uint64_t Get(uint64_t cluster) const {
    const uint64_t b = cluster / block_entries();
    if (b >= table.size() || table[b] == 0) return 0;
    if (table[b] + cluster_size() > bytes->size()) return 0;  // reported elsewhere
    return SpecGet(bytes->data() + table[b], cluster % block_entries(), order);
  }
};

DiskRefcounts DecodeDisk(const Bytes& bytes) {
  DiskRefcounts d;
  d.bytes = &bytes;
  d.cluster_bits = static_cast<uint32_t>(GetBE(bytes, kHdrClusterBits, 4));
  d.order = static_cast<uint32_t>(GetBE(bytes, kOffRefcountOrder, 4));
  d.table_offset = GetBE(bytes, kHdrRefcountTableOffset, 8);
  d.table_clusters = static_cast<uint32_t>(GetBE(bytes, kHdrRefcountTableClusters, 4));
  const uint64_t entries = d.table_clusters * d.cluster_size() / 8;
  for (uint64_t i = 0; i < entries; ++i) {
    d.table.push_back(GetBE(bytes, d.table_offset + i * 8, 8) & ~uint64_t{0x1ff});
  }
  return d;
}

// The clusters the image's own metadata occupies, each referenced once:
// header, L1 table, refcount table, refcount blocks.
std::set<uint64_t> MetadataClusters(const Bytes& bytes, const DiskRefcounts& d) {
  std::set<uint64_t> m = {0};
  const uint64_t cs = d.cluster_size();
  const uint64_t l1_bytes = GetBE(bytes, kHdrL1Size, 4) * 8;
  const uint64_t l1 = GetBE(bytes, kHdrL1TableOffset, 8);
  for (uint64_t o = l1; o < l1 + std::max<uint64_t>(l1_bytes, 1); o += cs) m.insert(o / cs);
  for (uint64_t i = 0; i < d.table_clusters; ++i) m.insert(d.table_offset / cs + i);
  for (uint64_t block : d.table) {
    if (block != 0) m.insert(block / cs);
  }
  return m;
}

// Checks the structure of the on-disk refcount metadata, and that every
// cluster below `clusters` (and every cluster of the file) has the refcount
// `data[c]` (the clusters the test allocated or set itself; missing = 0)
// plus one if it holds metadata.
void ExpectDiskState(const Bytes& bytes, const std::vector<uint64_t>& data, uint64_t clusters = 0) {
  const DiskRefcounts d = DecodeDisk(bytes);
  const uint64_t cs = d.cluster_size();
  ASSERT_EQ(d.table_offset % cs, 0u) << "refcount table offset " << d.table_offset;
  ASSERT_LE(d.table_offset + d.table_clusters * cs, bytes.size()) << "refcount table past the end";
  std::set<uint64_t> seen;
  for (size_t i = 0; i < d.table.size(); ++i) {
    const uint64_t block = d.table[i];
    if (block == 0) continue;
    EXPECT_EQ(block % cs, 0u) << "refcount table entry " << i << " = " << block;
    EXPECT_LE(block + cs, bytes.size()) << "refcount table entry " << i << " points past the end";
    EXPECT_TRUE(seen.insert(block).second) << "two table entries point to block " << block;
    EXPECT_EQ(GetBE(bytes, d.table_offset + i * 8, 8) & 0x1ff, 0u) << "reserved bits in entry " << i;
  }
  const std::set<uint64_t> meta = MetadataClusters(bytes, d);
  const uint64_t file_clusters = (bytes.size() + cs - 1) / cs;
  const uint64_t end = std::max({clusters, file_clusters, static_cast<uint64_t>(data.size())});
  int failures = 0;
  for (uint64_t c = 0; c < end && failures < 10; ++c) {
    const uint64_t want = (c < data.size() ? data[c] : 0) + (meta.count(c) ? 1 : 0);
    const uint64_t got = d.Get(c);
    if (got != want) {
      ADD_FAILURE() << "on-disk refcount of cluster " << c << " (offset " << c * cs << ") is " << got
                    << ", want " << want << (meta.count(c) ? " (metadata)" : "");
      ++failures;
    }
  }
}

// --- qemu-img check ----------------------------------------------------------

// Writes `bytes` to `path` as a sparse file of at least `size` bytes.
absl::Status WriteSparse(const std::string& path, const Bytes& bytes, uint64_t size) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError("cannot create " + path);
  constexpr uint64_t kChunk = 4096;
  absl::Status status;
  for (uint64_t o = 0; o < bytes.size() && status.ok(); o += kChunk) {
    const uint64_t n = std::min<uint64_t>(kChunk, bytes.size() - o);
    if (std::all_of(bytes.begin() + o, bytes.begin() + o + n, [](uint8_t x) { return x == 0; })) continue;
    if (pwrite(fd, bytes.data() + o, n, o) != static_cast<ssize_t>(n)) status = absl::InternalError("pwrite");
  }
  if (status.ok() && ftruncate(fd, std::max<uint64_t>(size, bytes.size())) != 0) {
    status = absl::InternalError("ftruncate");
  }
  close(fd);
  return status;
}

// Runs `qemu-img check` on `bytes`, extended to cover the clusters the test
// allocated (as if data had been written to them), and expects no
// corruption and exactly `want_leaks` leaked clusters: allocated clusters
// that no L2 table references.
void ExpectQemuCheck(const Bytes& bytes, uint64_t file_size, uint64_t want_leaks) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("refcounts"));
  const std::string path = dir.Join("image.qcow2");
  ASSERT_OK(WriteSparse(path, bytes, file_size));
  ASSERT_OK_AND_ASSIGN(QemuCheckReport c, QemuCheck(path));
  EXPECT_EQ(c.corruptions, 0u) << c.output;
  EXPECT_EQ(c.check_errors, 0u) << c.output;
  EXPECT_EQ(c.leaks, want_leaks) << c.output;
  EXPECT_EQ(c.exit_code, want_leaks ? 3 : 0) << c.output;
}

// Leaked clusters QEMU will count: test-allocated clusters inside the file.
uint64_t CountLeaks(const std::vector<uint64_t>& data, uint64_t file_size, uint64_t cluster_size) {
  uint64_t n = 0;
  for (uint64_t c = 0; c < data.size() && c * cluster_size < file_size; ++c) n += data[c] != 0;
  return n;
}

// Writes the refcounts back and returns the file's bytes.
Bytes WriteBackAndRead(Opened& o) {
  EXPECT_OK(SyncWait(o.refcounts->WriteBack()));
  EXPECT_OK(SyncWait(o.file->Flush()));
  EXPECT_FALSE(o.refcounts->has_dirty());
  absl::StatusOr<Bytes> bytes = MemFileContents(*o.file);
  EXPECT_OK(bytes);
  return bytes.ok() ? *bytes : Bytes{};
}

void Grow(std::vector<uint64_t>& v, uint64_t n) {
  if (v.size() < n) v.resize(n, 0);
}

constexpr uint32_t kOrders[] = {0, 1, 2, 3, 4, 5, 6};

// --- Load and Get -------------------------------------------------------------

TEST(RefcountsTest, LoadAndGetEveryWidth) {
  for (uint32_t cluster_bits : {9u, 16u}) {
    for (uint32_t order : kOrders) {
      SCOPED_TRACE(absl::StrCat("cluster_bits ", cluster_bits, ", refcount_order ", order));
      TestImage t = MakeImage(cluster_bits, order);
      const uint64_t max = SpecMax(order);
      const uint64_t last = t.block_entries() - 1;
      t.Set(5, max);
      t.Set(6, max >> 1);
      t.Set(7, std::min<uint64_t>(2, max));
      t.Set(last, 1);
      ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
      const std::map<uint64_t, uint64_t> want = {
          {0, 1}, {1, 1}, {2, 1}, {3, 1}, {4, 0}, {5, max}, {6, max >> 1},
          {7, std::min<uint64_t>(2, max)}, {8, 0}, {last, 1},
          {last + 1, 0},                     // no refcount block for the next range
          {64 * t.block_entries() * 4, 0}};  // past the refcount table
      for (const auto& [cluster, value] : want) {
        ASSERT_OK_AND_ASSIGN(uint64_t got, SyncWait(o.refcounts->Get(cluster)));
        EXPECT_EQ(got, value) << "cluster " << cluster;
      }
      EXPECT_EQ(o.refcounts->table_offset(), t.cluster_size());
      EXPECT_EQ(o.refcounts->table_clusters(), 1u);
      EXPECT_FALSE(o.refcounts->has_dirty());
    }
  }
}

TEST(RefcountsTest, LoadRejectsBadTableEntries) {
  TestImage t = MakeImage(16, 4);
  Bytes unaligned = t.bytes;
  PutBE64(unaligned, t.cluster_size() + 8, 2 * t.cluster_size() + 4096);  // in the file, unaligned
  {
    absl::StatusOr<Opened> r = Open(unaligned);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  }
  Bytes past_end = t.bytes;
  PutBE64(past_end, t.cluster_size() + 8, 1 << 20);
  absl::StatusOr<Opened> r = Open(past_end);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
}

// --- Allocate -------------------------------------------------------------------

TEST(RefcountsTest, AllocateTakesTheFirstFreeRun) {
  for (uint32_t order : kOrders) {
    SCOPED_TRACE(absl::StrCat("refcount_order ", order));
    TestImage t = MakeImage(9, order);
    // Used: 0-3 (metadata), 5, 7, 8. Free: 4, 6, 9...
    t.Set(5, 1);
    t.Set(7, 1);
    t.Set(8, SpecMax(order));
    ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
    Refcounts& rc = *o.refcounts;
    const uint64_t cs = t.cluster_size();
    ASSERT_OK_AND_ASSIGN(uint64_t a, SyncWait(rc.Allocate(1)));
    EXPECT_EQ(a, 4 * cs);
    ASSERT_OK_AND_ASSIGN(uint64_t b, SyncWait(rc.Allocate(2)));
    EXPECT_EQ(b, 9 * cs) << "cluster 6 alone is too short for 2";
    ASSERT_OK_AND_ASSIGN(uint64_t c, SyncWait(rc.Allocate(1)));
    EXPECT_EQ(c, 6 * cs) << "the hole at 6 is still the first fit for 1";
    ASSERT_OK_AND_ASSIGN(uint64_t d, SyncWait(rc.Allocate(3)));
    EXPECT_EQ(d, 11 * cs);
    for (uint64_t cluster : {4, 6, 9, 10, 11, 12, 13}) {
      ASSERT_OK_AND_ASSIGN(uint64_t r, SyncWait(rc.Get(cluster)));
      EXPECT_EQ(r, 1u) << "cluster " << cluster;
    }
    ASSERT_OK_AND_ASSIGN(uint64_t r8, SyncWait(rc.Get(8)));
    EXPECT_EQ(r8, SpecMax(order)) << "a used cluster must be left alone";
    EXPECT_TRUE(rc.has_dirty());

    const Bytes bytes = WriteBackAndRead(o);
    std::vector<uint64_t> data(14, 0);
    for (uint64_t cluster : {4, 5, 6, 7, 9, 10, 11, 12, 13}) data[cluster] = 1;
    data[8] = SpecMax(order);
    ExpectDiskState(bytes, data);
    const uint64_t file_size = 14 * cs;
    ExpectQemuCheck(bytes, file_size, CountLeaks(data, file_size, cs));
  }
}

// Random allocations and frees against a model: every run Allocate returns
// is the first run of free clusters in the model, and was free.
TEST(RefcountsTest, AllocateNeverReturnsUsedClusters) {
  std::mt19937_64 rng(20240611);
  for (uint32_t order : kOrders) {
    SCOPED_TRACE(absl::StrCat("refcount_order ", order));
    TestImage t = MakeImage(9, order);
    std::vector<uint64_t> model(4, 1);  // clusters 0-3: metadata
    // Some clusters used from the start, scattered.
    for (uint64_t c : {6, 9, 10, 17, 30, 31, 33}) {
      t.Set(c, 1);
      Grow(model, c + 1);
      model[c] = 1;
    }
    ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
    Refcounts& rc = *o.refcounts;
    const uint64_t cs = t.cluster_size();
    std::vector<uint64_t> allocated;
    std::set<uint64_t> metadata = {0, 1, 2, 3};
    for (int step = 0; step < 300; ++step) {
      if (!allocated.empty() && rng() % 3 == 0) {
        const size_t i = rng() % allocated.size();
        const uint64_t c = allocated[i];
        allocated.erase(allocated.begin() + i);
        ASSERT_OK(SyncWait(rc.Update(c * cs, 1, -1)));
        model[c] = 0;
        continue;
      }
      const uint64_t count = 1 + rng() % 5;
      // Refcount blocks the engine created meanwhile are in use too; that
      // they are exactly the blocks is checked on disk at the end.
      for (uint64_t c = 0; c < std::max<uint64_t>(model.size(), rc.end_cluster()); ++c) {
        if (c < model.size() && model[c] != 0) continue;
        ASSERT_OK_AND_ASSIGN(uint64_t r, SyncWait(rc.Get(c)));
        if (r == 0) continue;
        Grow(model, c + 1);
        model[c] = r;
        metadata.insert(c);
      }
      uint64_t want = 0;
      for (uint64_t run = 0; run < count; ++want) {
        Grow(model, want + 1);
        run = model[want] == 0 ? run + 1 : 0;
      }
      want -= count;
      ASSERT_OK_AND_ASSIGN(uint64_t got, SyncWait(rc.Allocate(count)));
      ASSERT_EQ(got % cs, 0u);
      ASSERT_EQ(got / cs, want) << "step " << step << ": Allocate(" << count << ")";
      for (uint64_t c = want; c < want + count; ++c) {
        ASSERT_EQ(model[c], 0u) << "cluster " << c << " was in use";
        model[c] = 1;
        allocated.push_back(c);
      }
    }
    // The model also serves as the expectation for the disk.
    std::vector<uint64_t> data = model;
    for (uint64_t c : metadata) data[c] = 0;  // counted by ExpectDiskState, if metadata
    const Bytes bytes = WriteBackAndRead(o);
    ExpectDiskState(bytes, data);
    const uint64_t file_size = std::max<uint64_t>(bytes.size(), data.size() * cs);
    ExpectQemuCheck(bytes, file_size, CountLeaks(data, file_size, cs));
  }
}

// A file that counts the reads that reach it.
class CountingFile final : public BlockFile {
 public:
  explicit CountingFile(std::unique_ptr<BlockFile> inner) : inner_(std::move(inner)) {}
  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override {
    ++reads;
    return inner_->Read(offset, out);
  }
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override {
    return inner_->Write(offset, data);
  }
  Task<absl::Status> Flush() override { return inner_->Flush(); }
  uint64_t size() const override { return inner_->size(); }
  bool writable() const override { return true; }
  const std::string& name() const override { return inner_->name(); }
  uint64_t reads = 0;

 private:
  std::unique_ptr<BlockFile> inner_;
};

// First fit must not cost a scan of every used cluster: the hint ("no free
// cluster below this index") has to move past the clusters in use. With a
// cache of 16 refcount blocks and 40 blocks in use, a scan from the start
// reads the evicted blocks again.
TEST(RefcountsTest, AllocateDoesNotRescanUsedClusters) {
  TestImage t = MakeImage(9, 6);  // 64 clusters per block
  absl::StatusOr<Header> header = DecodeHeader(t.bytes, t.bytes.size());
  ASSERT_OK(header);
  auto counting = std::make_unique<CountingFile>(NewMemFile("counting.qcow2", t.bytes));
  CountingFile* file = counting.get();
  Refcounts rc(counting.get(), *header, /*cache_bytes=*/0);
  ASSERT_OK(SyncWait(rc.Load()));
  for (int i = 0; i < 40; ++i) {
    ASSERT_OK(SyncWait(rc.Allocate(64)).status());
    ASSERT_OK(SyncWait(rc.WriteBack()));  // clean blocks: evictable
  }
  const uint64_t before = file->reads;
  ASSERT_OK_AND_ASSIGN(uint64_t a, SyncWait(rc.Allocate(1)));
  EXPECT_GE(a / 512, 40u * 64);
  EXPECT_LE(file->reads - before, 2u)
      << "Allocate(1) read " << file->reads - before
      << " refcount blocks: it scanned the used clusters from the start again";
}

// 20 refcount blocks on disk, each with its own values, and a cache of 16
// blocks (the minimum). With 16 blocks dirty, reading a 17th block must
// still give that block's refcounts (dirty blocks cannot be evicted, so
// the cache has to grow past its capacity rather than drop the new one).
TEST(RefcountsTest, ReadsTheRightBlockWhileTheCacheIsFullOfDirtyBlocks) {
  TestImage t = MakeImage(9, 6);  // 64 clusters per block
  const uint64_t e = t.block_entries(), cs = t.cluster_size();
  // Blocks 1..19 at clusters 4..22 (inside range 0); block i gives
  // cluster i*64 + 5 the refcount i + 1.
  for (uint64_t i = 1; i < 20; ++i) {
    const uint64_t block = 3 + i;
    t.bytes.resize((block + 1) * cs, 0);
    PutBE64(t.bytes, cs + i * 8, block * cs);
    t.Set(block, 1);
    SpecSet(t.bytes.data() + block * cs, 5, 6, i + 1);
  }
  t.Set(5, 1);  // block 0's own test value: cluster 5 -> 1
  absl::StatusOr<Header> header = DecodeHeader(t.bytes, t.bytes.size());
  ASSERT_OK(header);
  auto file = NewMemFile("dirty.qcow2", t.bytes);
  Refcounts rc(file.get(), *header, /*cache_bytes=*/0);
  ASSERT_OK(SyncWait(rc.Load()));
  // Dirty blocks 2..17 (16 of them): a refcount change in each.
  for (uint64_t i = 2; i < 18; ++i) ASSERT_OK(SyncWait(rc.Update((i * e + 7) * cs, 1, +1)));
  for (uint64_t i : {18, 19, 1, 0}) {
    ASSERT_OK_AND_ASSIGN(uint64_t r, SyncWait(rc.Get(i * e + 5)));
    EXPECT_EQ(r, i + 1) << "cluster " << i * e + 5 << " (block " << i
                        << "): Get returned a refcount from another block";
  }
}

// --- Update ------------------------------------------------------------------

TEST(RefcountsTest, UpdateIncrementsAndDecrements) {
  for (uint32_t order : kOrders) {
    SCOPED_TRACE(absl::StrCat("refcount_order ", order));
    TestImage t = MakeImage(9, order);
    ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
    Refcounts& rc = *o.refcounts;
    const uint64_t cs = t.cluster_size();
    const uint64_t max = SpecMax(order);

    ASSERT_OK(SyncWait(rc.Update(10 * cs, 3, +1)));  // 10, 11, 12 -> 1
    if (max >= 2) {
      ASSERT_OK(SyncWait(rc.Update(11 * cs, 1, +1)));  // 11 -> 2
    }
    ASSERT_OK(SyncWait(rc.Update(12 * cs, 1, -1)));  // 12 -> 0
    std::vector<uint64_t> want(13, 0);
    want[10] = 1;
    want[11] = max >= 2 ? 2 : 1;
    for (uint64_t c = 9; c <= 13; ++c) {
      ASSERT_OK_AND_ASSIGN(uint64_t got, SyncWait(rc.Get(c)));
      EXPECT_EQ(got, c < want.size() ? want[c] : 0) << "cluster " << c;
    }
    const Bytes bytes = WriteBackAndRead(o);
    ExpectDiskState(bytes, want);
    ExpectQemuCheck(bytes, 13 * cs, CountLeaks(want, 13 * cs, cs));
  }
}

TEST(RefcountsTest, UpdateBelowZeroIsDataLoss) {
  for (uint32_t order : kOrders) {
    SCOPED_TRACE(absl::StrCat("refcount_order ", order));
    TestImage t = MakeImage(9, order);
    t.Set(7, 1);
    ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
    Refcounts& rc = *o.refcounts;
    absl::Status s = SyncWait(rc.Update(9 * 512, 1, -1));
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    ASSERT_OK(SyncWait(rc.Update(7 * 512, 1, -1)));
    s = SyncWait(rc.Update(7 * 512, 1, -1));
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    ASSERT_OK_AND_ASSIGN(uint64_t got, SyncWait(rc.Get(7)));
    EXPECT_EQ(got, 0u) << "a refused decrement changes nothing";
    // In a range without a refcount block everything is 0 as well.
    s = SyncWait(rc.Update(t.block_entries() * 3 * 512, 1, -1));
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  }
}

TEST(RefcountsTest, UpdatePastTheWidthIsOutOfRange) {
  for (uint32_t order : kOrders) {
    SCOPED_TRACE(absl::StrCat("refcount_order ", order));
    TestImage t = MakeImage(9, order);
    const uint64_t max = SpecMax(order);
    t.Set(7, max);
    t.Set(8, max - 1);
    ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
    Refcounts& rc = *o.refcounts;
    absl::Status s = SyncWait(rc.Update(7 * 512, 1, +1));
    EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
    ASSERT_OK_AND_ASSIGN(uint64_t got, SyncWait(rc.Get(7)));
    EXPECT_EQ(got, max) << "a refused increment changes nothing";
    // max - 1 can take exactly one more (for refcount_bits = 1: 0 + 1).
    ASSERT_OK(SyncWait(rc.Update(8 * 512, 1, +1)));
    s = SyncWait(rc.Update(8 * 512, 1, +1));
    EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
    if (order == 0) {
      // refcount_bits = 1: 1 + 1 does not fit.
      ASSERT_OK_AND_ASSIGN(uint64_t a, SyncWait(rc.Allocate(1)));
      s = SyncWait(rc.Update(a, 1, +1));
      EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
    }
    if (order < 6) {
      s = SyncWait(rc.Update(9 * 512, 1, static_cast<int64_t>(max) + 1));
      EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
    }
  }
}

// --- TakeFreed ----------------------------------------------------------------

TEST(RefcountsTest, TakeFreedReportsCoalescedRanges) {
  for (uint32_t order : kOrders) {
    SCOPED_TRACE(absl::StrCat("refcount_order ", order));
    TestImage t = MakeImage(9, order);
    for (uint64_t c = 4; c < 12; ++c) t.Set(c, 1);
    if (SpecMax(order) >= 2) t.Set(10, 2);
    ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
    Refcounts& rc = *o.refcounts;
    const uint64_t cs = 512;
    EXPECT_TRUE(rc.TakeFreed().empty());
    ASSERT_OK(SyncWait(rc.Update(4 * cs, 3, -1)));  // 4, 5, 6
    ASSERT_OK(SyncWait(rc.Update(7 * cs, 1, -1)));  // adjacent: joins the range
    ASSERT_OK(SyncWait(rc.Update(9 * cs, 1, -1)));  // a new range
    ASSERT_OK(SyncWait(rc.Update(10 * cs, 1, -1)));  // 2 -> 1 (or 1 -> 0 for 1-bit)
    using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;
    const Ranges want = SpecMax(order) >= 2 ? Ranges{{4 * cs, 4 * cs}, {9 * cs, cs}}
                                            : Ranges{{4 * cs, 4 * cs}, {9 * cs, 2 * cs}};
    EXPECT_EQ(rc.TakeFreed(), want);
    EXPECT_TRUE(rc.TakeFreed().empty()) << "taken ranges are forgotten";
    // Freed clusters are free for the next allocation.
    ASSERT_OK_AND_ASSIGN(uint64_t a, SyncWait(rc.Allocate(4)));
    EXPECT_EQ(a, 4 * cs);
  }
}

// The caller discards what TakeFreed() reports (Qcow2Layer::Flush step 4).
// A range that was handed out again by Allocate() in the meantime holds
// live data or metadata by then, so it must not be reported.
TEST(RefcountsTest, TakeFreedDoesNotReportReallocatedClusters) {
  TestImage t = MakeImage(9, 6);
  for (uint64_t c = 4; c < 8; ++c) t.Set(c, 1);
  ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
  Refcounts& rc = *o.refcounts;
  ASSERT_OK(SyncWait(rc.Update(4 * 512, 4, -1)));
  ASSERT_OK_AND_ASSIGN(uint64_t a, SyncWait(rc.Allocate(2)));
  EXPECT_EQ(a, 4 * 512u);
  for (const auto& [offset, length] : rc.TakeFreed()) {
    for (uint64_t c = offset / 512; c < (offset + length) / 512; ++c) {
      ASSERT_OK_AND_ASSIGN(uint64_t r, SyncWait(rc.Get(c)));
      EXPECT_EQ(r, 0u) << "TakeFreed reports cluster " << c << " as free, but it was allocated again";
    }
  }
}

// --- Growth: refcount blocks ------------------------------------------------------

// Allocating past the range of the only refcount block creates the next
// block at the end of the image, inside its own range: it counts itself.
TEST(RefcountsTest, NewRefcountBlockDescribesItself) {
  for (uint32_t order : kOrders) {
    SCOPED_TRACE(absl::StrCat("refcount_order ", order));
    TestImage t = MakeImage(9, order);
    const uint64_t e = t.block_entries();
    const uint64_t cs = t.cluster_size();
    ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
    Refcounts& rc = *o.refcounts;
    ASSERT_OK_AND_ASSIGN(uint64_t a, SyncWait(rc.Allocate(e)));  // clusters 4 .. e+3
    EXPECT_EQ(a, 4 * cs);
    EXPECT_EQ(rc.end_cluster(), e + 5) << "the data run and the new block";
    ASSERT_OK_AND_ASSIGN(uint64_t self, SyncWait(rc.Get(e + 4)));
    EXPECT_EQ(self, 1u);

    const Bytes bytes = WriteBackAndRead(o);
    const DiskRefcounts d = DecodeDisk(bytes);
    ASSERT_GE(d.table.size(), 2u);
    EXPECT_EQ(d.table[0], 3 * cs);
    EXPECT_EQ(d.table[1], (e + 4) * cs) << "the new block goes to the end of the image";
    EXPECT_EQ(d.table[1] / cs / e, 1u) << "it lies in its own range";
    EXPECT_EQ(d.Get(e + 4), 1u) << "and counts itself";
    std::vector<uint64_t> data(e + 4, 1);
    for (uint64_t c = 0; c < 4; ++c) data[c] = 0;
    ExpectDiskState(bytes, data);
    ExpectQemuCheck(bytes, bytes.size(), CountLeaks(data, bytes.size(), cs));
  }
}

// The run handed out reaches into range 2, so the image ends there: the new
// block for range 1 lands in range 2 and must be counted in block 2, which
// is created for it (and counts itself).
TEST(RefcountsTest, NewRefcountBlockCountedInAnotherBlock) {
  for (uint32_t order : kOrders) {
    SCOPED_TRACE(absl::StrCat("refcount_order ", order));
    TestImage t = MakeImage(9, order);
    const uint64_t e = t.block_entries();
    const uint64_t cs = t.cluster_size();
    ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
    Refcounts& rc = *o.refcounts;
    ASSERT_OK_AND_ASSIGN(uint64_t a, SyncWait(rc.Allocate(2 * e - 4)));  // 4 .. 2e-1
    EXPECT_EQ(a, 4 * cs);
    const Bytes bytes = WriteBackAndRead(o);
    const DiskRefcounts d = DecodeDisk(bytes);
    ASSERT_GE(d.table.size(), 3u);
    const uint64_t block1 = d.table[1] / cs, block2 = d.table[2] / cs;
    EXPECT_EQ(block1, 2 * e);
    EXPECT_EQ(block2, 2 * e + 1);
    EXPECT_EQ(block1 / e, 2u) << "block 1 lies outside its own range";
    EXPECT_EQ(d.Get(block1), 1u) << "block 1 must be counted (in block 2)";
    EXPECT_EQ(d.Get(block2), 1u);
    // Nothing in range 1 is claimed for the block.
    for (uint64_t c = e; c < 2 * e; ++c) {
      if (d.Get(c) != 1u) {
        ADD_FAILURE() << "cluster " << c << " has refcount " << d.Get(c);
        break;
      }
    }
    std::vector<uint64_t> data(2 * e, 1);
    for (uint64_t c = 0; c < 4; ++c) data[c] = 0;
    ExpectDiskState(bytes, data);
    ExpectQemuCheck(bytes, bytes.size(), CountLeaks(data, bytes.size(), cs));
  }
}

// A hole in the refcount table: range 1 has no block, but the image goes on
// in range 2. A cluster allocated in range 1 needs a block for range 1,
// which goes to the end of the image (range 2) and is counted there.
TEST(RefcountsTest, NewRefcountBlockForAHoleInTheTable) {
  for (uint32_t order : kOrders) {
    SCOPED_TRACE(absl::StrCat("refcount_order ", order));
    TestImage t = MakeImage(9, order);
    const uint64_t e = t.block_entries();
    const uint64_t cs = t.cluster_size();
    for (uint64_t c = 4; c < e; ++c) t.Set(c, 1);  // range 0 full
    // Block 2 at cluster 2e, counting itself; the file ends after it.
    const uint64_t block2 = 2 * e * cs;
    t.bytes.resize(block2 + cs, 0);
    PutBE64(t.bytes, cs + 2 * 8, block2);
    SpecSet(t.bytes.data() + block2, 0, order, 1);
    ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
    Refcounts& rc = *o.refcounts;
    ASSERT_OK_AND_ASSIGN(uint64_t a, SyncWait(rc.Allocate(1)));
    EXPECT_EQ(a, e * cs) << "the first cluster of range 1 is the first free one";
    const Bytes bytes = WriteBackAndRead(o);
    const DiskRefcounts d = DecodeDisk(bytes);
    ASSERT_GE(d.table.size(), 3u);
    EXPECT_EQ(d.table[2], block2);
    EXPECT_EQ(d.table[1], (2 * e + 1) * cs) << "the new block goes to the end of the image";
    EXPECT_EQ(d.Get(2 * e + 1), 1u) << "counted in block 2";
    std::vector<uint64_t> data(e + 1, 1);
    for (uint64_t c = 0; c < 4; ++c) data[c] = 0;
    ExpectDiskState(bytes, data);
    ExpectQemuCheck(bytes, bytes.size(), CountLeaks(data, bytes.size(), cs));
  }
}

// --- Growth: the refcount table ----------------------------------------------

// Fills every cluster the one-cluster refcount table can describe (64
// blocks), then allocates one more: a new table and the blocks for its own
// clusters go to the end of the image, the header is switched to it, and
// the old table is freed.
TEST(RefcountsTest, RefcountTableGrowth) {
  for (uint32_t order : kOrders) {
    SCOPED_TRACE(absl::StrCat("refcount_order ", order));
    TestImage t = MakeImage(9, order);
    const uint64_t e = t.block_entries();
    const uint64_t cs = t.cluster_size();
    const uint64_t covered = 64 * e;  // 64 table entries of 8 bytes
    ASSERT_OK_AND_ASSIGN(Opened o, Open(t.bytes));
    Refcounts& rc = *o.refcounts;

    // Allocate in runs of at most one block's worth until only a handful
    // of clusters of the covered range are left, and track them.
    std::vector<uint64_t> data(4, 0);
    auto allocate = [&](uint64_t count) -> uint64_t {
      absl::StatusOr<uint64_t> a = SyncWait(rc.Allocate(count));
      EXPECT_OK(a);
      if (!a.ok()) return 0;
      Grow(data, *a / cs + count);
      for (uint64_t c = *a / cs; c < *a / cs + count; ++c) {
        EXPECT_EQ(data[c], 0u) << "cluster " << c << " handed out twice";
        data[c] = 1;
      }
      return *a / cs;
    };
    while (rc.end_cluster() + e < covered) allocate(e);
    // Halve the rest, so that the last allocation inside the table's range
    // leaves at most one free cluster (a new block may take the end).
    while (rc.end_cluster() + 8 < covered) allocate((covered - rc.end_cluster()) / 2);
    while (rc.end_cluster() < covered) allocate(1);
    ASSERT_EQ(rc.table_offset(), cs) << "no growth yet";
    ASSERT_OK(SyncWait(rc.WriteBack()));
    const uint64_t end_before = rc.end_cluster();
    EXPECT_TRUE(rc.TakeFreed().empty());

    // The one that does not fit.
    const uint64_t last = allocate(1);
    EXPECT_GE(last, covered);
    EXPECT_NE(rc.table_offset(), cs) << "the table must have moved";
    EXPECT_GE(rc.table_offset() / cs, end_before) << "new table at the end of the image";
    EXPECT_GE(rc.table_clusters(), 2u);
    using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;
    EXPECT_EQ(rc.TakeFreed(), (Ranges{{cs, cs}})) << "the old table is freed";
    ASSERT_OK_AND_ASSIGN(uint64_t old_table, SyncWait(rc.Get(1)));
    EXPECT_EQ(old_table, 0u);

    const Bytes bytes = WriteBackAndRead(o);
    const DiskRefcounts d = DecodeDisk(bytes);
    EXPECT_EQ(d.table_offset, rc.table_offset()) << "header refcount_table_offset on disk";
    EXPECT_EQ(d.table_clusters, rc.table_clusters()) << "header refcount_table_clusters on disk";
    EXPECT_GE(d.table.size(), last / e + 1) << "the new table covers the new cluster";
    for (uint64_t b = 0; b <= last / e && b < d.table.size(); ++b) {
      EXPECT_NE(d.table[b], 0u) << "range " << b << " is in use but has no block";
    }
    // The new table and its blocks count themselves.
    for (uint64_t c = d.table_offset / cs; c < d.table_offset / cs + d.table_clusters; ++c) {
      EXPECT_EQ(d.Get(c), 1u) << "new table cluster " << c;
    }
    ExpectDiskState(bytes, data);
    ExpectQemuCheck(bytes, bytes.size(), CountLeaks(data, bytes.size(), cs));

    // And the image loads again with the new table.
    ASSERT_OK_AND_ASSIGN(Opened again, Open(bytes));
    ASSERT_OK_AND_ASSIGN(uint64_t r, SyncWait(again.refcounts->Get(last)));
    EXPECT_EQ(r, 1u);
    EXPECT_EQ(again.refcounts->table_offset(), d.table_offset);

    // The old table's cluster is now the first free one: first fit hands it
    // out next (the growth freed it in the middle of an Allocate).
    ASSERT_OK_AND_ASSIGN(uint64_t reused, SyncWait(rc.Allocate(1)));
    EXPECT_EQ(reused, cs) << "the freed old refcount table cluster is skipped by first fit";
  }
}

}  // namespace
}  // namespace qcow2fuse::test
