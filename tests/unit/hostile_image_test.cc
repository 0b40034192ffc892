// Hostile images: what a crafted image must not make the engine do. Each
// test takes a valid image made by qemu-img, changes a few bytes the way an
// attacker (or a broken tool) could, and checks that the engine refuses
// with an error naming the entry, instead of overwriting metadata, writing
// past the end of the file, freeing a table, or allocating without bound.
//
//   - Writes: an L2 entry with COPIED pointing at each kind of metadata
//     (L1, another L2 table, refcount table, refcount block,
//     snapshot table, a snapshot's L1 table, bitmap directory) or 4 PiB
//     past the end: the write fails, the image is marked corrupt, the
//     metadata bytes are unchanged, the file does not grow.
//   - Frees: overwriting an entry whose cluster (or compressed range) lies
//     on the L1 table or far past the end fails and frees nothing; the
//     refcounts never create metadata for a decrement.
//   - MetadataMap: ranges and clusters found, overlaps refused.
//   - Open: refcount table entries pointing at the L1 table, at an L2
//     table or twice at one block, and L1 entries naming one L2 table twice
//     are refused with the entry's index; the L1 table must fit the memory
//     budget; a bitmap directory may not claim more than QEMU's limit; an
//     image with l1_size 0 opens over an in-memory file (no memset on a
//     null pointer, which UBSan reports).

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/budget.h"
#include "data/qcow2_layer.h"
#include "format/header.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "meta/metadata_map.h"
#include "meta/refcounts.h"
#include "qcow2_builder.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

using qemu_io_cmd::W;

constexpr uint64_t kHostMask = 0x00fffffffffffe00ull;
constexpr uint64_t kCopied = 1ull << 63;
constexpr uint64_t kCorruptBit = 1ull << 1;

// Where a qemu-made image keeps its metadata.
struct Layout {
  uint64_t cluster_size;
  uint64_t l1;          // L1 table
  uint64_t l2_first;    // L2 table of L1 entry 0
  uint64_t l2_second;   // L2 table of L1 entry 1 (0 if none)
  uint64_t refcount_table;
  uint64_t refcount_block;  // the block of refcount table entry 0
  uint64_t snapshot_table;  // 0 without snapshots
};

Layout LayoutOf(const Bytes& b) {
  Layout l{};
  l.cluster_size = uint64_t{1} << GetBE(b, 20, 4);
  l.l1 = GetBE(b, 40, 8);
  l.l2_first = GetBE(b, l.l1, 8) & kHostMask;
  l.l2_second = GetBE(b, l.l1 + 8, 8) & kHostMask;
  l.refcount_table = GetBE(b, 48, 8);
  l.refcount_block = GetBE(b, l.refcount_table, 8) & kHostMask;
  l.snapshot_table = GetBE(b, 60, 4) > 0 ? GetBE(b, 64, 8) : 0;
  return l;
}

ImageOptions Writable() {
  ImageOptions o;
  o.read_only = false;
  return o;
}

bool MarkedCorrupt(const std::string& path) {
  absl::StatusOr<Bytes> b = ReadBytes(path);
  return b.ok() && (GetBE(*b, 72, 8) & kCorruptBit) != 0;
}

class HostileImageTest : public ::testing::Test {
 protected:
  // A 1 GiB image with 64 KiB clusters and data in two L2 ranges (guest 0
  // and 512 MiB), made by QEMU; extra qemu-img commands may add snapshots
  // or bitmaps.
  void Make(const std::vector<std::string>& create_options = {},
            const std::vector<std::vector<std::string>>& qemu_img = {}) {
    ASSERT_OK(CreateImage(path_, "qcow2", uint64_t{1} << 30, create_options));
    ASSERT_OK(QemuIo(path_, "qcow2", {W(1, 0, 65536), W(2, 65536, 65536), W(3, 512 << 20, 65536)}));
    for (const auto& args : qemu_img) ASSERT_OK(QemuImg(args).status());
    ASSERT_OK_AND_ASSIGN(bytes_, ReadBytes(path_));
    layout_ = LayoutOf(bytes_);
  }
  // Sets the L2 entry of guest cluster `index` (in the first L2 table).
  void SetEntry(uint64_t index, uint64_t value) {
    PutBE64(bytes_, layout_.l2_first + index * 8, value);
    ASSERT_OK(WriteBytes(path_, bytes_));
  }
  // Opens the image read-write, writes a cluster of 0xee at `guest`, and
  // returns what the write said (after a flush, for frees).
  absl::Status WriteCluster(uint64_t guest) {
    absl::StatusOr<std::unique_ptr<Image>> image = SyncWait(Image::Open(path_, Writable()));
    if (!image.ok()) return image.status();
    Bytes data(layout_.cluster_size, 0xee);
    absl::Status s = SyncWait((*image)->Write(guest, data));
    absl::Status flushed = SyncWait((*image)->Flush());
    return s.ok() ? flushed : s;
  }
  // The bytes of [offset, offset + length) now, to compare with before.
  Bytes Now(uint64_t offset, uint64_t length) {
    absl::StatusOr<Bytes> b = ReadBytes(path_);
    EXPECT_OK(b.status());
    if (!b.ok() || b->size() < offset + length) return {};
    return Bytes(b->begin() + offset, b->begin() + offset + length);
  }

  void SetUp() override {
    absl::StatusOr<TempDir> dir = TempDir::Create("hostile");
    ASSERT_OK(dir.status());
    dir_ = std::make_unique<TempDir>(std::move(*dir));
    path_ = dir_->Join("hostile.qcow2");
  }

  std::unique_ptr<TempDir> dir_;
  std::string path_;
  Bytes bytes_;
  Layout layout_{};
};

// An in-place write must not land on any metadata structure.
TEST_F(HostileImageTest, InPlaceWriteOntoMetadataIsRefused) {
  struct Target {
    const char* name;
    std::vector<std::vector<std::string>> qemu_img;
    uint64_t Layout::*where;
    uint64_t offset;  // used when `where` is null
  };
  const std::string& p = path_;
  const std::vector<Target> targets = {
      {"the L1 table", {}, &Layout::l1, 0},
      {"an L2 table", {}, &Layout::l2_second, 0},
      {"the refcount table", {}, &Layout::refcount_table, 0},
      {"a refcount block", {}, &Layout::refcount_block, 0},
      {"the snapshot table", {{"snapshot", "-c", "snap", p}}, &Layout::snapshot_table, 0},
  };
  for (const Target& t : targets) {
    SCOPED_TRACE(t.name);
    Make({}, t.qemu_img);
    const uint64_t target = t.where ? layout_.*(t.where) : t.offset;
    ASSERT_NE(target == 0, t.where != nullptr) << "the layout lacks " << t.name;
    const Bytes before = Now(target, layout_.cluster_size);
    SetEntry(0, target | kCopied);
    absl::Status s = WriteCluster(0);
    EXPECT_TRUE(absl::IsDataLoss(s)) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), t.name)) << s;
    EXPECT_EQ(Now(target, layout_.cluster_size), before) << t.name << " was overwritten";
    EXPECT_TRUE(MarkedCorrupt(path_));
    unlink(path_.c_str());
  }
}

TEST_F(HostileImageTest, InPlaceWriteOntoSnapshotL1AndBitmapStructuresIsRefused) {
  Make({}, {{"snapshot", "-c", "snap", path_}, {"bitmap", "--add", path_, "b0"}});
  ASSERT_OK_AND_ASSIGN(Header h, DecodeHeader(bytes_, bytes_.size()));
  ASSERT_TRUE(h.bitmaps.has_value());
  const uint64_t snapshot_l1 = GetBE(bytes_, layout_.snapshot_table, 8);
  const uint64_t directory = h.bitmaps->bitmap_directory_offset & ~(layout_.cluster_size - 1);
  for (auto [target, name] : {std::pair{snapshot_l1, "a snapshot's L1 table"}, std::pair{directory, "the bitmap directory"}}) {
    SCOPED_TRACE(name);
    const Bytes before = Now(target, layout_.cluster_size);
    ASSERT_OK_AND_ASSIGN(bytes_, ReadBytes(path_));
    PutBE64(bytes_, 72, GetBE(bytes_, 72, 8) & ~kCorruptBit);  // unmark what the previous round marked
    SetEntry(0, target | kCopied);
    absl::Status s = WriteCluster(0);
    EXPECT_TRUE(absl::IsDataLoss(s)) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), name)) << s;
    const Bytes after = Now(target, layout_.cluster_size);
    // The bitmap directory legitimately changes at the first write (its
    // bitmaps are marked in use); what matters is that no 0xee landed.
    EXPECT_EQ(std::count(after.begin(), after.end(), 0xee) > 64, false) << name << " was overwritten";
    if (target == snapshot_l1) {
      EXPECT_EQ(after, before);
    }
  }
}

TEST_F(HostileImageTest, InPlaceWriteFarPastTheEndIsRefused) {
  Make();
  const uint64_t far = uint64_t{1} << 52;  // 4 PiB
  SetEntry(0, far | kCopied);
  const uint64_t size_before = bytes_.size();
  absl::Status s = WriteCluster(0);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "past the end of the image file")) << s;
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(path_));
  EXPECT_EQ(after.size(), size_before);
  EXPECT_TRUE(MarkedCorrupt(path_));
}

// Overwriting an entry gives its old cluster back: a crafted one must not
// free the L1 table (which the flush would then discard) or a cluster far
// past the end (whose refcount block would have to be created).
TEST_F(HostileImageTest, OverwriteDoesNotFreeMetadataOrClustersPastTheEnd) {
  Make();
  const uint64_t l1 = layout_.l1;
  const Bytes l1_before = Now(l1, layout_.cluster_size);
  // A compressed descriptor whose bytes run over the L1 table's cluster.
  Qcow2Builder geometry({.cluster_bits = 16});
  SetEntry(0, geometry.CompressedDescriptor(l1 - 512, 4096));
  absl::Status s = WriteCluster(0);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "the L1 table")) << s;
  EXPECT_EQ(Now(l1, layout_.cluster_size), l1_before);

  unlink(path_.c_str());
  Make();
  SetEntry(0, uint64_t{1} << 50);  // a plain (shared) cluster 1 PiB out
  s = WriteCluster(0);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "past the end of the file")) << s;
}

TEST(HostileRefcountsTest, DecrementWithoutABlockNeverGrowsTheTable) {
  // 512-byte clusters and 64-bit refcounts: one block covers 64 clusters,
  // so a cluster at 2^50 would need a refcount table of terabytes.
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("hostile-refcounts"));
  const std::string path = dir.Join("small.qcow2");
  ASSERT_OK(CreateImage(path, "qcow2", 1 << 20, {"cluster_size=512", "refcount_bits=64"}));
  ASSERT_OK_AND_ASSIGN(Bytes bytes, ReadBytes(path));
  ASSERT_OK_AND_ASSIGN(Header h, DecodeHeader(bytes, bytes.size()));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlockFile> file, OpenPosixFile(path, true));
  Refcounts refcounts(file.get(), h, 1 << 20);
  ASSERT_OK(SyncWait(refcounts.Load()));
  const uint32_t clusters_before = refcounts.table_clusters();
  absl::Status s = SyncWait(refcounts.Update(uint64_t{1} << 50, 1, -1));
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_EQ(refcounts.table_clusters(), clusters_before);
  EXPECT_FALSE(refcounts.has_dirty());
}

// --- Refused at open ---------------------------------------------------------------------

TEST_F(HostileImageTest, RefcountTableEntriesOnMetadataAreRefusedAtOpen) {
  for (auto [name, pick] : std::vector<std::pair<std::string, uint64_t Layout::*>>{
           {"the L1 table", &Layout::l1}, {"an L2 table", &Layout::l2_first}, {"a refcount block", &Layout::refcount_block}}) {
    SCOPED_TRACE(name);
    Make();
    // Refcount table entry 1 is free in a 1 GiB image with 64 KiB clusters.
    PutBE64(bytes_, layout_.refcount_table + 8, layout_.*pick);
    ASSERT_OK(WriteBytes(path_, bytes_));
    absl::StatusOr<std::unique_ptr<Image>> image = SyncWait(Image::Open(path_, Writable()));
    ASSERT_FALSE(image.ok());
    EXPECT_TRUE(absl::IsDataLoss(image.status())) << image.status();
    EXPECT_TRUE(absl::StrContains(image.status().message(), "refcount table entry 1")) << image.status();
    // Reading never writes a refcount block: a read-only open is fine.
    ImageOptions ro;
    EXPECT_OK(SyncWait(Image::Open(path_, ro)).status());
    unlink(path_.c_str());
  }
}

// With no refcount table nothing says which clusters are in use, not even
// the header's: an allocation would hand out cluster 0. QEMU refuses the
// image; a read-write open here does, and a read-only one reads it.
TEST_F(HostileImageTest, NoRefcountTableIsRefusedForWriting) {
  Make();
  PutBE32(bytes_, 56, 0);  // refcount_table_clusters
  ASSERT_OK(WriteBytes(path_, bytes_));
  absl::StatusOr<std::unique_ptr<Image>> image = SyncWait(Image::Open(path_, Writable()));
  ASSERT_FALSE(image.ok());
  EXPECT_TRUE(absl::IsDataLoss(image.status())) << image.status();
  EXPECT_TRUE(absl::StrContains(image.status().message(), "has no refcount table")) << image.status();
  EXPECT_EQ(Now(0, bytes_.size()), bytes_) << "the refused open wrote to the image";
  ImageOptions ro;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> reader, SyncWait(Image::Open(path_, ro)));
  Bytes first(65536);
  ASSERT_OK(SyncWait(reader->Read(0, first)));
  EXPECT_EQ(first, Bytes(65536, 1));
}

TEST_F(HostileImageTest, SnapshotL1TableOnAnL2TableIsRefusedAtOpen) {
  Make({}, {{"snapshot", "-c", "snap", path_}});
  // The snapshot shares the active L2 tables; its own L1 table moved onto
  // one of them would make a later write of that L2 table rewrite it.
  PutBE64(bytes_, layout_.snapshot_table, layout_.l2_first);
  ASSERT_OK(WriteBytes(path_, bytes_));
  absl::StatusOr<std::unique_ptr<Image>> image = SyncWait(Image::Open(path_, Writable()));
  ASSERT_FALSE(image.ok());
  EXPECT_TRUE(absl::IsDataLoss(image.status())) << image.status();
  EXPECT_TRUE(absl::StrContains(image.status().message(), "snapshot")) << image.status();
  EXPECT_TRUE(absl::StrContains(image.status().message(), "an L2 table")) << image.status();
}

TEST_F(HostileImageTest, L1EntriesSharingAnL2TableAreRefused) {
  Make();
  PutBE64(bytes_, layout_.l1 + 8, layout_.l2_first | kCopied);
  ASSERT_OK(WriteBytes(path_, bytes_));
  for (bool read_only : {true, false}) {
    ImageOptions o;
    o.read_only = read_only;
    absl::StatusOr<std::unique_ptr<Image>> image = SyncWait(Image::Open(path_, o));
    ASSERT_FALSE(image.ok());
    EXPECT_TRUE(absl::StrContains(image.status().message(), "L1 entries 0 and 1 both point to the L2 table"))
        << image.status();
  }
}

TEST_F(HostileImageTest, L1TableMustFitTheMemoryBudget) {
  // 512-byte clusters: an 8 GiB disk needs a 256 KiB L1 table (8 bytes per
  // 32 KiB of disk).
  ASSERT_OK(CreateImage(path_, "qcow2", uint64_t{8} << 30, {"cluster_size=512"}));
  ImageOptions o;
  o.max_metadata_memory = 128 << 10;
  absl::StatusOr<std::unique_ptr<Image>> image = SyncWait(Image::Open(path_, o));
  ASSERT_FALSE(image.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(image.status())) << image.status();
  EXPECT_TRUE(absl::StrContains(image.status().message(), "the L1 table of")) << image.status();
  o.max_metadata_memory = 64 << 20;
  EXPECT_OK(SyncWait(Image::Open(path_, o)).status());
}

TEST_F(HostileImageTest, BitmapDirectoryLargerThanTheLimitIsRefused) {
  Make({}, {{"bitmap", "--add", path_, "b0"}});
  ASSERT_OK_AND_ASSIGN(Header h, DecodeHeader(bytes_, bytes_.size()));
  ASSERT_TRUE(h.bitmaps.has_value());
  // Find the bitmaps extension and claim a 32 GiB directory (the file can
  // be made sparse to match; the header check must not trust the size).
  const uint32_t kExtBitmapsMagic = 0x23852875;
  uint64_t pos = GetBE(bytes_, 100, 4);  // header_length
  while (GetBE(bytes_, pos, 4) != kExtBitmapsMagic) pos += 8 + ((GetBE(bytes_, pos + 4, 4) + 7) & ~7ull);
  PutBE64(bytes_, pos + 8 + 8, uint64_t{32} << 30);
  absl::StatusOr<Header> decoded = DecodeHeader(bytes_, uint64_t{64} << 30);
  ASSERT_FALSE(decoded.ok());
  EXPECT_TRUE(absl::StrContains(decoded.status().message(), "bitmap directory")) << decoded.status();
}

// --- MetadataMap ---------------------------------------------------------------------------

TEST(MetadataMapTest, FindsRangesAndClustersAndRefusesOverlaps) {
  MetadataMap map(16);  // 64 KiB clusters
  ASSERT_OK(map.Add(MetadataKind::kHeader, 0, 0x10000));
  ASSERT_OK(map.Add(MetadataKind::kL1Table, 0x30000, 0x18));
  ASSERT_OK(map.Add(MetadataKind::kL2Table, 0x50000, 0x10000));
  ASSERT_OK(map.Add(MetadataKind::kRefcountBlock, 0x60000, 0x10000));
  EXPECT_FALSE(map.Find(0x10000, 0x20000).has_value());  // between header and L1
  EXPECT_FALSE(map.Find(0x30018, 0x1000).has_value());   // just past the L1 table's bytes
  auto hit = map.Find(0x2ffff, 2);
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->kind, MetadataKind::kL1Table);
  hit = map.Find(0x5fff0, 0x20);
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->kind, MetadataKind::kL2Table);
  EXPECT_EQ(hit->offset, 0x50000u);
  hit = map.Find(0x40000, 0x100000);  // spans both clusters
  ASSERT_TRUE(hit.has_value());
  // Overlaps are refused, duplicates too, naming both structures.
  absl::Status s = map.Add(MetadataKind::kRefcountBlock, 0x50000, 0x10000);
  EXPECT_TRUE(absl::IsDataLoss(s));
  EXPECT_TRUE(absl::StrContains(s.message(), "a refcount block at 0x50000")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "an L2 table at 0x50000")) << s;
  EXPECT_FALSE(map.Add(MetadataKind::kSnapshotL1Table, 0x20000, 0x18000).ok());  // onto the L1 table
  // Moving and removing.
  map.Move(MetadataKind::kL1Table, 0x30000, 0x70000, 0x20);
  EXPECT_FALSE(map.Find(0x30000, 0x10).has_value());
  EXPECT_TRUE(map.Find(0x70010, 0x1).has_value());
  map.Remove(MetadataKind::kL2Table, 0x50000);
  EXPECT_FALSE(map.Find(0x50000, 0x10000).has_value());
  // A length that would wrap is treated as reaching the end of the space.
  EXPECT_TRUE(map.Find(0x60000, UINT64_MAX).has_value());
}

TEST(HostileLayerTest, EmptyL1TableOpensOverAMemoryFile) {
  Qcow2Builder b({.cluster_bits = 16, .size = 0});
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(layer->size(), 0u);
}

}  // namespace
}  // namespace qcow2fuse::test
