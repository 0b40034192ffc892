// meta/check: the engine's consistency checker, against `qemu-img check`.
//
// Images are made by qemu-img and qemu-io in every shape the checker must
// understand (cluster sizes, refcount widths, extended L2, compression,
// snapshots, bitmaps, external data files, preallocation, backing files);
// on each, both checkers must find nothing. Then bytes are patched to
// damage them, and both must report the same numbers of corruptions and
// leaks. Last, hand-built hostile images must be checked without crashing
// and without work or memory beyond the size of the file.

#include "meta/check.h"

#include <errno.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/budget.h"
#include "format/header.h"
#include "format/refcount.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "meta/repair.h"
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

// Sanitizers map shadow memory that a limit on the process's data would
// refuse: the tests that run under one skip it there.
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer) || __has_feature(thread_sanitizer)
#define QCOW2FUSE_CHECK_TEST_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define QCOW2FUSE_CHECK_TEST_SANITIZED 1
#endif

namespace qcow2fuse::test {
namespace {

// Written out from the spec rather than taken from format/spec.h, so that a
// wrong constant there cannot hide behind the same constant here.
constexpr uint64_t kCopied = 1ull << 63;
constexpr uint64_t kCompressed = 1ull << 62;
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;  // L1, L2, refcount table
constexpr uint64_t kKiB_ = 1024;

// --- Reading and patching an image file --------------------------------------

uint64_t GetBE64(const std::string& bytes, uint64_t offset) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(bytes[offset + i]);
  return v;
}

std::string BE64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 7; i >= 0; --i, v >>= 8) s[i] = static_cast<char>(v & 0xff);
  return s;
}

// A qcow2 file on disk, its header decoded, for locating and patching
// metadata. Re-reads the file on every access: tests patch it in between.
class ImageFile {
 public:
  static absl::StatusOr<ImageFile> Open(const std::string& path) {
    ASSIGN_OR_RETURN(std::string bytes, ReadFile(path));
    std::span<const uint8_t> view(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
    ASSIGN_OR_RETURN(Header header, DecodeHeader(view, bytes.size()));
    return ImageFile(path, std::move(header));
  }

  const Header& header() const { return header_; }
  uint64_t cluster_size() const { return header_.cluster_size(); }

  absl::StatusOr<uint64_t> FileSize() const {
    ASSIGN_OR_RETURN(ScopedFd fd, OpenReadOnly(path_));
    return test::FileSize(fd.get());
  }
  absl::StatusOr<uint64_t> Read64(uint64_t offset) const {
    ASSIGN_OR_RETURN(std::string bytes, ReadAt(offset, 8));
    return GetBE64(bytes, 0);
  }
  absl::Status Write64(uint64_t offset, uint64_t value) const {
    return WriteFileAt(path_, offset, BE64(value));
  }

  // File offset of the L1 entry for `guest`.
  uint64_t L1EntryPos(uint64_t guest) const {
    return header_.l1_table_offset + 8 * (guest / (cluster_size() * header_.l2_entries()));
  }
  // File offset of the L2 entry (its descriptor) for `guest`.
  absl::StatusOr<uint64_t> L2EntryPos(uint64_t guest) const {
    ASSIGN_OR_RETURN(uint64_t l1_entry, Read64(L1EntryPos(guest)));
    const uint64_t l2 = l1_entry & kOffsetMask;
    if (l2 == 0) return absl::NotFoundError(absl::StrCat("no L2 table for guest ", guest));
    return l2 + header_.l2_entry_size() * ((guest / cluster_size()) % header_.l2_entries());
  }
  // Host offset of the (standard) cluster that holds `guest`.
  absl::StatusOr<uint64_t> HostOffset(uint64_t guest) const {
    ASSIGN_OR_RETURN(uint64_t pos, L2EntryPos(guest));
    ASSIGN_OR_RETURN(uint64_t entry, Read64(pos));
    if (entry & kCompressed) return absl::FailedPreconditionError("compressed");
    if ((entry & kOffsetMask) == 0) return absl::NotFoundError("unallocated");
    return entry & kOffsetMask;
  }

  absl::StatusOr<uint64_t> Refcount(uint64_t cluster) const {
    ASSIGN_OR_RETURN(Block b, LoadBlock(cluster));
    return GetRefcount(b.bytes, b.index, header_.refcount_order);
  }
  absl::Status SetRefcountOf(uint64_t cluster, uint64_t value) const {
    ASSIGN_OR_RETURN(Block b, LoadBlock(cluster));
    SetRefcount(b.bytes, b.index, header_.refcount_order, value);
    return WriteFileAt(path_, b.offset,
                       std::string(reinterpret_cast<const char*>(b.bytes.data()), b.bytes.size()));
  }

  // The stored refcounts of clusters [0, n), from one read of the file.
  absl::StatusOr<std::vector<uint64_t>> Refcounts(uint64_t n) const {
    ASSIGN_OR_RETURN(std::string bytes, ReadFile(path_));
    const uint64_t entries = RefcountBlockEntries(header_.cluster_bits, header_.refcount_order);
    std::vector<uint64_t> out(n, 0);
    for (uint64_t c = 0; c < n; ++c) {
      const uint64_t table_pos = header_.refcount_table_offset + 8 * (c / entries);
      if (table_pos + 8 > bytes.size()) continue;
      const uint64_t block = GetBE64(bytes, table_pos) & ~uint64_t{0x1ff};
      if (block == 0 || block + cluster_size() > bytes.size()) continue;
      std::span<const uint8_t> view(reinterpret_cast<const uint8_t*>(bytes.data()) + block,
                                    cluster_size());
      out[c] = GetRefcount(view, c % entries, header_.refcount_order);
    }
    return out;
  }

  // Clusters of the refcount table and of the refcount blocks it names.
  absl::StatusOr<std::set<uint64_t>> RefcountMetadataClusters() const {
    ASSIGN_OR_RETURN(std::string bytes, ReadFile(path_));
    std::set<uint64_t> out;
    const uint64_t first = header_.refcount_table_offset / cluster_size();
    for (uint64_t i = 0; i < header_.refcount_table_clusters; ++i) out.insert(first + i);
    const uint64_t entries = uint64_t{header_.refcount_table_clusters} * cluster_size() / 8;
    for (uint64_t i = 0; i < entries; ++i) {
      const uint64_t block =
          GetBE64(bytes, header_.refcount_table_offset + 8 * i) & ~uint64_t{0x1ff};
      if (block != 0) out.insert(block / cluster_size());
    }
    return out;
  }

 private:
  struct Block {
    uint64_t offset;
    uint64_t index;
    std::vector<uint8_t> bytes;
  };
  ImageFile(std::string path, Header header) : path_(std::move(path)), header_(std::move(header)) {}

  absl::StatusOr<Block> LoadBlock(uint64_t cluster) const {
    const uint64_t entries = RefcountBlockEntries(header_.cluster_bits, header_.refcount_order);
    ASSIGN_OR_RETURN(uint64_t table_entry,
                     Read64(header_.refcount_table_offset + 8 * (cluster / entries)));
    const uint64_t offset = table_entry & ~uint64_t{0x1ff};
    if (offset == 0) return absl::NotFoundError("no refcount block for the cluster");
    ASSIGN_OR_RETURN(std::string bytes, ReadAt(offset, cluster_size()));
    return Block{offset, cluster % entries, std::vector<uint8_t>(bytes.begin(), bytes.end())};
  }

  // `length` bytes at `offset`: only those, since some tests' images are
  // large and a helper may be called for each of many entries.
  absl::StatusOr<std::string> ReadAt(uint64_t offset, size_t length) const {
    ASSIGN_OR_RETURN(ScopedFd fd, OpenReadOnly(path_));
    std::string bytes(length, '\0');
    ASSIGN_OR_RETURN(size_t n, ReadFully(fd.get(), offset, bytes.data(), length));
    if (n != length) return absl::OutOfRangeError("read past the end");
    return bytes;
  }

  std::string path_;
  Header header_;
};

// --- The two checkers ----------------------------------------------------------

absl::StatusOr<CheckResult> OurCheck(const std::string& path, const std::string& data_file = "",
                                     CheckOptions options = {}) {
  ASSIGN_OR_RETURN(std::unique_ptr<BlockFile> file, OpenPosixFile(path));
  std::vector<uint8_t> head(std::min<uint64_t>(kHeaderReadSize, file->size()));
  RETURN_IF_ERROR(SyncWait(file->Read(0, head)));
  ASSIGN_OR_RETURN(Header header, DecodeHeader(head, file->size()));
  std::unique_ptr<BlockFile> data;
  if (!data_file.empty()) {
    ASSIGN_OR_RETURN(data, OpenPosixFile(data_file));
  }
  return SyncWait(CheckImage(*file, header, data.get(), options));
}

// Our check again in passes of one refcount block's clusters each (see
// meta/check.h): it must count exactly what one pass counts.
void ExpectSameInPasses(const std::string& path, const std::string& data_file,
                        const CheckResult& one_pass) {
  CheckOptions options;
  options.window_clusters = 1;
  absl::StatusOr<CheckResult> passes = OurCheck(path, data_file, options);
  ASSERT_OK(passes);
  const std::string context = absl::StrCat("\nin passes:\n  ", absl::StrJoin(passes->messages, "\n  "),
                                           "\nin one pass:\n  ", absl::StrJoin(one_pass.messages, "\n  "));
  EXPECT_EQ(passes->corruptions, one_pass.corruptions) << context;
  EXPECT_EQ(passes->leaks, one_pass.leaks) << context;
  EXPECT_EQ(passes->warnings, one_pass.warnings) << context;
}

// Runs both checkers on `path`; they must agree with each other and with
// the expected counts, and ours must count the same in passes. Returns
// ours (from one pass).
CheckResult ExpectCounts(const std::string& path, uint64_t corruptions, uint64_t leaks,
                         const std::string& data_file = "",
                         const std::vector<std::string>& qemu_target = {}) {
  absl::StatusOr<CheckResult> ours = OurCheck(path, data_file);
  EXPECT_OK(ours);
  if (ours.ok()) ExpectSameInPasses(path, data_file, *ours);
  absl::StatusOr<QemuCheckReport> qemu = QemuCheck(path, qemu_target);
  EXPECT_OK(qemu);
  if (!ours.ok() || !qemu.ok()) return {};
  const std::string context =
      absl::StrCat("\nour messages:\n  ", absl::StrJoin(ours->messages, "\n  "),
                   "\nqemu-img check:\n", qemu->output);
  EXPECT_EQ(qemu->check_errors, 0u) << context;
  EXPECT_EQ(ours->corruptions, qemu->corruptions) << "corruptions differ from qemu" << context;
  EXPECT_EQ(ours->leaks, qemu->leaks) << "leaks differ from qemu" << context;
  EXPECT_EQ(ours->corruptions, corruptions) << context;
  EXPECT_EQ(ours->leaks, leaks) << context;
  EXPECT_EQ(ours->warnings, 0u) << context;
  return *std::move(ours);
}

uint64_t ClusterCount(const std::string& path, uint64_t cluster_size) {
  absl::StatusOr<std::string> bytes = ReadFile(path);
  EXPECT_OK(bytes);
  return bytes.ok() ? (bytes->size() + cluster_size - 1) / cluster_size : 0;
}

// A clean image: no problem at all, in either checker, and one expected
// refcount per cluster of the file.
CheckResult ExpectClean(const std::string& path, const std::string& data_file = "",
                        const std::vector<std::string>& qemu_target = {}) {
  CheckResult r = ExpectCounts(path, 0, 0, data_file, qemu_target);
  EXPECT_TRUE(r.messages.empty()) << absl::StrJoin(r.messages, "\n");
  EXPECT_TRUE(r.clean());
  if (r.cluster_bits != 0) {
    EXPECT_EQ(r.expected_refcounts.size(), ClusterCount(path, uint64_t{1} << r.cluster_bits));
  }
  return r;
}

// --- Clean images made by qemu -------------------------------------------------

TEST(CheckTest, Clean64KClusters) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 64 * kMiB));
  ASSERT_OK(QemuIo(img, "qcow2",
                   {"write -P 1 0 1M", "write -P 2 5M 64k", "write -P 3 40M 100k",
                    "write -z 8M 128k", "discard 512k 64k", "write -P 4 63M 1M"}));
  ExpectClean(img);
}

TEST(CheckTest, Clean4KClustersRefcountBits1) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 32 * kMiB, {"cluster_size=4096", "refcount_bits=1"}));
  ASSERT_OK(
      QemuIo(img, "qcow2",
             {"write -P 1 0 300k", "write -P 2 9M 64k", "discard 100k 8k", "write -P 3 31M 1M"}));
  ExpectClean(img);
}

TEST(CheckTest, Clean512ByteClustersRefcountBits64) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  // 64 refcounts per block and 64 table entries per cluster: several
  // refcount blocks and a refcount table of more than one cluster.
  ASSERT_OK(CreateImage(img, "qcow2", 8 * kMiB, {"cluster_size=512", "refcount_bits=64"}));
  ASSERT_OK(QemuIo(img, "qcow2",
                   {"write -P 1 0 3M", "write -P 2 5M 7k", "discard 1M 4k", "write -P 3 7M 1M"}));
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  EXPECT_GT(f.header().refcount_table_clusters, 1u);
  ExpectClean(img);
}

TEST(CheckTest, CleanOtherRefcountWidths) {
  for (const char* bits : {"2", "4", "8", "32"}) {
    SCOPED_TRACE(absl::StrCat("refcount_bits=", bits));
    ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
    const std::string img = dir.Join("a.qcow2");
    ASSERT_OK(CreateImage(img, "qcow2", 16 * kMiB,
                          {"cluster_size=4096", absl::StrCat("refcount_bits=", bits)}));
    ASSERT_OK(QemuIo(img, "qcow2", {"write -P 1 0 200k", "write -P 2 15M 64k"}));
    ExpectClean(img);
  }
}

TEST(CheckTest, CleanExtendedL2) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 16 * kMiB, {"extended_l2=on"}));
  ASSERT_OK(QemuIo(img, "qcow2",
                   {"write -P 1 0 2k", "write -P 2 10k 4k", "write -z 64k 2k", "write -P 3 1M 256k",
                    "write -z 1M 6k", "discard 1100k 64k"}));
  ExpectClean(img);
}

TEST(CheckTest, CleanCompressedDeflateAndZstd) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string raw = dir.Join("src.raw");
  ASSERT_OK(CreateImage(raw, "raw", 8 * kMiB));
  ASSERT_OK(QemuIo(raw, "raw",
                   {"write -P 0x11 0 2M", "write -P 0x22 3M 100k", "write -P 0x33 8000k 1k"}));
  struct Variant {
    const char* name;
    std::vector<std::string> extra;
  };
  for (const Variant& v :
       {Variant{"deflate-64k", {"-c"}},
        Variant{"zstd-4k", {"-c", "-o", "compression_type=zstd,cluster_size=4096"}},
        Variant{"deflate-512", {"-c", "-o", "cluster_size=512"}}}) {
    SCOPED_TRACE(v.name);
    const std::string img = dir.Join(absl::StrCat(v.name, ".qcow2"));
    ASSERT_OK(ConvertImage(raw, "raw", img, "qcow2", v.extra));
    ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
    ASSERT_OK_AND_ASSIGN(uint64_t l2_pos, f.L2EntryPos(0));
    ASSERT_OK_AND_ASSIGN(uint64_t entry, f.Read64(l2_pos));
    EXPECT_TRUE(entry & kCompressed) << std::hex << entry;
    CheckResult r = ExpectClean(img);
    // Several compressed clusters share host clusters.
    bool shared = false;
    for (uint32_t refs : r.expected_refcounts) shared |= refs > 1;
    EXPECT_TRUE(shared);
    // Overwriting compressed clusters drops their references.
    ASSERT_OK(QemuIo(img, "qcow2", {"write -P 5 0 64k", "write -z 3M 64k"}));
    ExpectClean(img);
  }
}

TEST(CheckTest, CleanInternalSnapshotsWithWritesAfter) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  for (const char* compat : {"1.1", "0.10"}) {
    SCOPED_TRACE(absl::StrCat("compat=", compat));
    const std::string img = dir.Join(absl::StrCat("snap-", compat, ".qcow2"));
    ASSERT_OK(CreateImage(img, "qcow2", 16 * kMiB, {absl::StrCat("compat=", compat)}));
    ASSERT_OK(QemuIo(img, "qcow2", {"write -P 1 0 1M", "write -P 2 4M 64k"}));
    ASSERT_OK(QemuImg({"snapshot", "-c", "first", img}));
    ASSERT_OK(QemuIo(img, "qcow2", {"write -P 3 0 64k", "write -P 4 2M 64k"}));
    ASSERT_OK(QemuImg({"snapshot", "-c", "second snapshot with a longer name", img}));
    ASSERT_OK(QemuIo(img, "qcow2", {"write -P 5 64k 64k", "write -P 6 10M 64k"}));

    ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
    EXPECT_EQ(f.header().nb_snapshots, 2u);
    CheckResult r = ExpectClean(img);
    // One L2 table maps the whole disk, and every write after a snapshot
    // copied it: the active table, the first snapshot's and the second's
    // are three tables. Guest cluster 2, written before both snapshots and
    // never again, is in all three: refcount 3, no COPIED flag.
    ASSERT_OK_AND_ASSIGN(uint64_t host2, f.HostOffset(2 * 64 * kKiB_));
    EXPECT_EQ(r.expected_refcounts[host2 / f.cluster_size()], 3u);
    ASSERT_OK_AND_ASSIGN(uint64_t stored2, f.Refcount(host2 / f.cluster_size()));
    EXPECT_EQ(stored2, 3u);
    ASSERT_OK_AND_ASSIGN(uint64_t entry2, f.Read64(*f.L2EntryPos(2 * 64 * kKiB_)));
    EXPECT_EQ(entry2 & kCopied, 0u);
    ASSERT_OK_AND_ASSIGN(uint64_t l1_entry, f.Read64(f.L1EntryPos(0)));
    EXPECT_NE(l1_entry & kCopied, 0u);  // the active L2 table is its own
    // Guest cluster 1 was rewritten after the second snapshot: only the
    // active table references the new data cluster.
    ASSERT_OK_AND_ASSIGN(uint64_t host1, f.HostOffset(64 * kKiB_));
    EXPECT_EQ(r.expected_refcounts[host1 / f.cluster_size()], 1u);
    ASSERT_OK_AND_ASSIGN(uint64_t entry1, f.Read64(*f.L2EntryPos(64 * kKiB_)));
    EXPECT_NE(entry1 & kCopied, 0u);
  }
}

TEST(CheckTest, CleanSharedDataClustersAfterSnapshot) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  // 512-byte clusters: L2 tables map 32 KiB each, so the writes after the
  // snapshot copy only some L2 tables and the rest stay shared. Data
  // clusters in copied L2 tables are then referenced twice.
  ASSERT_OK(CreateImage(img, "qcow2", 1 * kMiB, {"cluster_size=512"}));
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 1 0 64k"}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "s1", img}));
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 2 0 512"}));
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  CheckResult r = ExpectClean(img);
  // Guest cluster 1 is in a copied L2 table (guest cluster 0 was written):
  // its data cluster is shared with the snapshot, refcount 2, no COPIED.
  ASSERT_OK_AND_ASSIGN(uint64_t pos, f.L2EntryPos(512));
  ASSERT_OK_AND_ASSIGN(uint64_t entry, f.Read64(pos));
  const uint64_t host = entry & kOffsetMask;
  EXPECT_EQ(entry & kCopied, 0u);
  EXPECT_EQ(r.expected_refcounts[host / 512], 2u);
  ASSERT_OK_AND_ASSIGN(uint64_t stored, f.Refcount(host / 512));
  EXPECT_EQ(stored, 2u);
}

// Reads the first bitmap table of the image and returns how many of its
// entries point to data clusters.
absl::StatusOr<int> DirtyBitmapClusters(const ImageFile& f, int bitmap) {
  if (!f.header().bitmaps) return absl::NotFoundError("no bitmaps extension");
  uint64_t pos = f.header().bitmaps->bitmap_directory_offset;
  for (int i = 0;; ++i) {
    ASSIGN_OR_RETURN(uint64_t table_offset, f.Read64(pos));
    ASSIGN_OR_RETURN(uint64_t word, f.Read64(pos + 8));    // table size, flags
    ASSIGN_OR_RETURN(uint64_t word2, f.Read64(pos + 16));  // type, gran, name size, extra size
    const uint32_t table_size = word >> 32;
    const uint32_t name_size = (word2 >> 32) & 0xffff;
    const uint32_t extra_size = word2 & 0xffffffff;
    if (i == bitmap) {
      int dirty = 0;
      for (uint32_t j = 0; j < table_size; ++j) {
        ASSIGN_OR_RETURN(uint64_t e, f.Read64(table_offset + 8 * j));
        dirty += (e & kOffsetMask) != 0;
      }
      return dirty;
    }
    pos += (24 + extra_size + name_size + 7) / 8 * 8;
  }
}

TEST(CheckTest, CleanPersistentBitmaps) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 64 * kMiB, {"cluster_size=4096"}));
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 1 0 1M"}));
  ASSERT_OK(QemuImg({"bitmap", "--add", img, "b0"}));
  ASSERT_OK(QemuImg({"bitmap", "--add", "-g", "512", img, "fine"}));
  ExpectClean(img);  // just added: tables without data clusters

  // qemu-io loads the persistent bitmaps, and writes dirty them; they are
  // stored back on close.
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 2 0 64k", "write -P 3 40M 1M", "write -P 4 63M 4k"}));
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  ASSERT_TRUE(f.header().bitmaps.has_value());
  EXPECT_EQ(f.header().bitmaps->nb_bitmaps, 2u);
  ASSERT_OK_AND_ASSIGN(int dirty0, DirtyBitmapClusters(f, 0));
  ASSERT_OK_AND_ASSIGN(int dirty1, DirtyBitmapClusters(f, 1));
  EXPECT_GE(dirty0, 1);
  EXPECT_GE(dirty1, 2);
  ExpectClean(img);
}

TEST(CheckTest, CleanExternalDataFile) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  for (const char* raw : {"off", "on"}) {
    SCOPED_TRACE(absl::StrCat("data_file_raw=", raw));
    const std::string img = dir.Join(absl::StrCat("ext-", raw, ".qcow2"));
    const std::string data = dir.Join(absl::StrCat("ext-", raw, ".data"));
    ASSERT_OK(CreateImage(img, "qcow2", 16 * kMiB,
                          {absl::StrCat("data_file=", data), absl::StrCat("data_file_raw=", raw)}));
    ASSERT_OK(
        QemuIo(img, "qcow2",
               {"write -P 1 0 64k", "write -P 2 1M 200k", "write -z 3M 64k", "write -P 3 15M 1M"}));
    CheckResult r = ExpectClean(img, data);
    // Data clusters live in the data file: only metadata is counted.
    uint64_t referenced = 0;
    for (uint32_t refs : r.expected_refcounts) referenced += refs != 0;
    EXPECT_LT(referenced, 10u);
    // Without the data file at hand the check is the same.
    ASSERT_OK_AND_ASSIGN(CheckResult without, OurCheck(img));
    EXPECT_TRUE(without.clean()) << absl::StrJoin(without.messages, "\n");
    EXPECT_EQ(without.warnings, 0u);
  }
}

TEST(CheckTest, ExternalDataFileTooShortIsAWarning) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  const std::string data = dir.Join("a.data");
  ASSERT_OK(CreateImage(img, "qcow2", 16 * kMiB, {absl::StrCat("data_file=", data)}));
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 1 0 64k", "write -P 2 8M 64k"}));
  ASSERT_OK(RunChecked({"truncate", "-s", "1M", data}));
  ASSERT_OK_AND_ASSIGN(CheckResult r, OurCheck(img, data));
  EXPECT_TRUE(r.clean());
  EXPECT_EQ(r.warnings, 1u);
  ASSERT_EQ(r.messages.size(), 1u);
  EXPECT_TRUE(absl::StrContains(r.messages[0], "past the end of the external data file"))
      << r.messages[0];
}

TEST(CheckTest, CleanPreallocationMetadata) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 32 * kMiB, {"preallocation=metadata"}));
  // Zero writes on preallocated clusters keep the allocation (zero flag
  // with a host offset).
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 1 1M 64k", "write -z 0 128k", "write -z 4M 64k"}));
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  ASSERT_OK_AND_ASSIGN(uint64_t entry, f.Read64(*f.L2EntryPos(0)));
  EXPECT_EQ(entry & 1, 1u);
  EXPECT_NE(entry & kOffsetMask, 0u);
  ExpectClean(img);
}

TEST(CheckTest, CleanLuksEncrypted) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("luks.qcow2");
  const std::string secret = "secret,id=sec0,data=hunter2";
  const std::vector<std::string> open = {
      "--object", secret, "--image-opts",
      absl::StrCat("driver=qcow2,file.filename=", img, ",encrypt.key-secret=sec0")};
  ASSERT_OK(CreateLuksImage(
      img, secret, "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4096", "16M"));
  std::vector<std::string> io = {"qemu-io"};
  io.insert(io.end(), open.begin(), open.end());
  io.insert(io.end(), {"-c", "write -P 1 0 100k", "-c", "write -P 2 8M 4k"});
  ASSERT_OK(RunChecked(io));
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  ASSERT_TRUE(f.header().full_disk_encryption.has_value());
  const FdeExtension fde = *f.header().full_disk_encryption;
  CheckResult r = ExpectClean(img, "", open);
  // The LUKS header (key slots included) spans many clusters, each
  // referenced once.
  ASSERT_GT(fde.length, 4096u);
  for (uint64_t c = fde.offset / 4096; c < (fde.offset + fde.length) / 4096; ++c) {
    EXPECT_EQ(r.expected_refcounts[c], 1u) << "cluster " << c;
  }
  // Damage: a LUKS header cluster with refcount 0.
  ASSERT_OK(f.SetRefcountOf(fde.offset / 4096 + 1, 0));
  ExpectCounts(img, 1, 0, "", open);
}

TEST(CheckTest, CleanBackingFileOverlay) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string base = dir.Join("base.qcow2");
  const std::string top = dir.Join("top.qcow2");
  ASSERT_OK(CreateImage(base, "qcow2", 16 * kMiB));
  ASSERT_OK(QemuIo(base, "qcow2", {"write -P 1 0 4M"}));
  ASSERT_OK(CreateImage(top, "qcow2", 16 * kMiB,
                        {"backing_file=base.qcow2", "backing_fmt=qcow2", "cluster_size=4096"}));
  ASSERT_OK(QemuIo(top, "qcow2", {"write -P 2 100k 10k", "discard 1M 64k", "write -z 2M 8k"}));
  ExpectClean(top);
  ExpectClean(base);
}

// --- Damaged images ------------------------------------------------------------

struct Geometry {
  const char* name;
  std::vector<std::string> options;
  bool extended_l2 = false;
};

void PrintTo(const Geometry& g, std::ostream* out) { *out << g.name; }

std::vector<Geometry> Geometries() {
  return {{"64k-rc16", {}},
          {"4k-rc1", {"cluster_size=4096", "refcount_bits=1"}},
          {"512-rc64", {"cluster_size=512", "refcount_bits=64"}},
          {"64k-extl2", {"extended_l2=on"}, true}};
}

// An image with guest clusters 0, 1 and 3 allocated and cluster 2's host
// cluster freed by a discard (refcount 0, inside the file). Returns the
// freed host cluster's offset.
absl::StatusOr<uint64_t> MakeDamageBase(const std::string& img, const Geometry& g,
                                        uint64_t* cluster_size) {
  RETURN_IF_ERROR(CreateImage(img, "qcow2", 4 * kMiB, g.options));
  ASSIGN_OR_RETURN(ImageFile f0, ImageFile::Open(img));
  const uint64_t cs = f0.cluster_size();
  *cluster_size = cs;
  RETURN_IF_ERROR(
      QemuIo(img, "qcow2",
             {absl::StrCat("write -P 1 0 ", 3 * cs), absl::StrCat("write -P 2 ", 3 * cs, " ", cs),
              absl::StrCat("write -P 3 ", 3 * kMiB, " ", cs)}));
  ASSIGN_OR_RETURN(ImageFile f, ImageFile::Open(img));
  ASSIGN_OR_RETURN(uint64_t freed, f.HostOffset(2 * cs));
  // Nothing is written after the discard, which would reuse the cluster.
  RETURN_IF_ERROR(QemuIo(img, "qcow2", {absl::StrCat("discard ", 2 * cs, " ", cs)}));
  ASSIGN_OR_RETURN(uint64_t refcount, f.Refcount(freed / cs));
  if (refcount != 0) return absl::InternalError("discard did not free the cluster");
  return freed;
}

class DamageTest : public ::testing::TestWithParam<Geometry> {
 protected:
  void SetUp() override {
    ASSERT_OK_AND_ASSIGN(dir_, TempDir::Create("check"));
    img_ = dir_->Join("a.qcow2");
    ASSERT_OK_AND_ASSIGN(freed_, MakeDamageBase(img_, GetParam(), &cs_));
    ExpectClean(img_);
    ASSERT_OK_AND_ASSIGN(file_, ImageFile::Open(img_));
  }
  std::optional<TempDir> dir_;
  std::string img_;
  uint64_t cs_ = 0;
  uint64_t freed_ = 0;
  std::optional<ImageFile> file_;
};

TEST_P(DamageTest, DecrementedRefcountIsACorruption) {
  ASSERT_OK_AND_ASSIGN(uint64_t host, file_->HostOffset(0));
  ASSERT_OK(file_->SetRefcountOf(host / cs_, 0));
  // refcount 0 < 1 reference, and the entry's COPIED flag no longer matches.
  CheckResult r = ExpectCounts(img_, 2, 0);
  EXPECT_EQ(r.expected_refcounts[host / cs_], 1u);
}

TEST_P(DamageTest, IncrementedRefcountOfUnusedClusterIsALeak) {
  ASSERT_OK(file_->SetRefcountOf(freed_ / cs_, 1));
  CheckResult r = ExpectCounts(img_, 0, 1);
  EXPECT_EQ(r.expected_refcounts[freed_ / cs_], 0u);
  ASSERT_EQ(r.messages.size(), 1u);
  EXPECT_TRUE(absl::StrContains(r.messages[0], "leaked")) << r.messages[0];
}

TEST_P(DamageTest, ClearedCopiedFlagInL2IsACorruption) {
  ASSERT_OK_AND_ASSIGN(uint64_t pos, file_->L2EntryPos(cs_));
  ASSERT_OK_AND_ASSIGN(uint64_t entry, file_->Read64(pos));
  ASSERT_OK(file_->Write64(pos, entry & ~kCopied));
  CheckResult r = ExpectCounts(img_, 1, 0);
  ASSERT_EQ(r.messages.size(), 1u);
  EXPECT_TRUE(absl::StrContains(r.messages[0], "COPIED")) << r.messages[0];
}

TEST_P(DamageTest, ClearedCopiedFlagInL1IsACorruption) {
  ASSERT_OK_AND_ASSIGN(uint64_t entry, file_->Read64(file_->L1EntryPos(0)));
  ASSERT_OK(file_->Write64(file_->L1EntryPos(0), entry & ~kCopied));
  ExpectCounts(img_, 1, 0);
}

TEST_P(DamageTest, TwoL2EntriesSharingOneClusterIsACorruption) {
  ASSERT_OK_AND_ASSIGN(uint64_t pos0, file_->L2EntryPos(0));
  ASSERT_OK_AND_ASSIGN(uint64_t pos1, file_->L2EntryPos(cs_));
  ASSERT_OK_AND_ASSIGN(uint64_t entry0, file_->Read64(pos0));
  ASSERT_OK(file_->Write64(pos1, entry0));
  if (GetParam().extended_l2) {
    ASSERT_OK_AND_ASSIGN(uint64_t bitmap0, file_->Read64(pos0 + 8));
    ASSERT_OK(file_->Write64(pos1 + 8, bitmap0));
  }
  // Refcount 1 < 2 references; guest cluster 1's old data cluster leaks.
  CheckResult r = ExpectCounts(img_, 1, 1);
  EXPECT_EQ(r.expected_refcounts[(entry0 & kOffsetMask) / cs_], 2u);
}

TEST_P(DamageTest, L2EntryPastTheEndOfTheFileIsACorruption) {
  ASSERT_OK_AND_ASSIGN(uint64_t pos, file_->L2EntryPos(0));
  ASSERT_OK_AND_ASSIGN(uint64_t entry, file_->Read64(pos));
  ASSERT_OK_AND_ASSIGN(uint64_t size, file_->FileSize());
  const uint64_t far = (size / cs_ + 1000) * cs_;
  ASSERT_OK(file_->Write64(pos, (entry & ~kOffsetMask) | far));
  // Past the end; COPIED set on a cluster with refcount 0; the old data
  // cluster leaks.
  CheckResult r = ExpectCounts(img_, 2, 1);
  bool named = false;
  for (const std::string& m : r.messages) named |= absl::StrContains(m, "past the end of the file");
  EXPECT_TRUE(named) << absl::StrJoin(r.messages, "\n");
}

TEST_P(DamageTest, L1EntryPointingAtTheRefcountTableIsACorruption) {
  // The refcount table read as an L2 table: metadata overlapping metadata.
  ASSERT_OK_AND_ASSIGN(uint64_t entry, file_->Read64(file_->L1EntryPos(0)));
  ASSERT_OK(file_->Write64(file_->L1EntryPos(0),
                           (entry & ~kOffsetMask) | file_->header().refcount_table_offset));
  CheckResult r = OurCheck(img_).value();
  EXPECT_GT(r.corruptions, 0u);
  ASSERT_OK_AND_ASSIGN(QemuCheckReport q, QemuCheck(img_));
  EXPECT_EQ(r.corruptions, q.corruptions) << absl::StrJoin(r.messages, "\n") << "\n" << q.output;
  EXPECT_EQ(r.leaks, q.leaks) << absl::StrJoin(r.messages, "\n") << "\n" << q.output;
}

TEST_P(DamageTest, RefcountTableEntryPastTheEndIsACorruption) {
  // The last refcount table entry describes clusters far past the file.
  const Header& h = file_->header();
  const uint64_t last = h.refcount_table_offset + uint64_t{h.refcount_table_clusters} * cs_ - 8;
  ASSERT_OK_AND_ASSIGN(uint64_t old, file_->Read64(last));
  ASSERT_EQ(old, 0u);
  ASSERT_OK_AND_ASSIGN(uint64_t size, file_->FileSize());
  ASSERT_OK(file_->Write64(last, (size / cs_ + 7) * cs_));
  ExpectCounts(img_, 1, 0);
}

INSTANTIATE_TEST_SUITE_P(Geometries, DamageTest, ::testing::ValuesIn(Geometries()),
                         [](const ::testing::TestParamInfo<Geometry>& info) {
                           std::string name = info.param.name;
                           for (char& c : name) {
                             if (c == '-') c = '_';
                           }
                           return name;
                         });

TEST(CheckTest, LeakedClusterPastTheData) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 16 * kMiB));
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 1 0 256k"}));
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  ASSERT_OK_AND_ASSIGN(uint64_t size, f.FileSize());
  const uint64_t cs = f.cluster_size();
  const uint64_t end = (size + cs - 1) / cs * cs;
  // One more cluster at the end of the file, refcount 1, used by nothing.
  ASSERT_OK(WriteFileAt(img, end, std::string(cs, '\0')));
  ASSERT_OK(f.SetRefcountOf(end / cs, 1));
  CheckResult r = ExpectCounts(img, 0, 1);
  EXPECT_EQ(r.expected_refcounts.size(), end / cs + 1);
  EXPECT_EQ(r.expected_refcounts.back(), 0u);
}

TEST(CheckTest, DirtyImageWithLazyRefcountsMatchesQemuRepair) {
  // With lazy refcounts, qemu-io killed after its writes leaves the dirty
  // bit set and the refcounts of the new clusters unwritten: the case the
  // checker's expected refcounts exist for (rebuilding refcounts).
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("dirty.qcow2");
  const std::string fixed_img = dir.Join("fixed.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 16 * kMiB, {"lazy_refcounts=on", "cluster_size=4096"}));
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 1 0 256k"}));
  ASSERT_OK_AND_ASSIGN(CommandResult killed,
                       RunCommand({"qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 300k", "-c",
                                   "write -P 3 9M 64k", "-c", "sigraise 9", img}));
  ASSERT_TRUE(killed.status.signaled()) << killed.status.ToString();
  ASSERT_OK_AND_ASSIGN(ImageFile dirty, ImageFile::Open(img));
  ASSERT_NE(dirty.header().incompatible_features & 1, 0u);  // dirty bit

  ASSERT_OK_AND_ASSIGN(CheckResult r, OurCheck(img));
  ASSERT_OK_AND_ASSIGN(QemuCheckReport q, QemuCheck(img));
  EXPECT_GT(r.corruptions, 0u);
  EXPECT_EQ(r.corruptions, q.corruptions) << absl::StrJoin(r.messages, "\n") << "\n" << q.output;
  EXPECT_EQ(r.leaks, q.leaks) << absl::StrJoin(r.messages, "\n") << "\n" << q.output;

  // QEMU's repair must arrive at the refcounts we expect, except for the
  // refcount structures themselves, which it rebuilds elsewhere.
  ASSERT_OK(RunChecked({"cp", img, fixed_img}));
  ASSERT_OK(QemuImg({"check", "-r", "all", fixed_img}));
  ExpectClean(fixed_img);
  ASSERT_OK_AND_ASSIGN(ImageFile fixed, ImageFile::Open(fixed_img));
  ASSERT_OK_AND_ASSIGN(std::set<uint64_t> skip, dirty.RefcountMetadataClusters());
  ASSERT_OK_AND_ASSIGN(std::set<uint64_t> skip2, fixed.RefcountMetadataClusters());
  skip.insert(skip2.begin(), skip2.end());
  ASSERT_OK_AND_ASSIGN(std::vector<uint64_t> stored, fixed.Refcounts(r.expected_refcounts.size()));
  int compared = 0;
  for (uint64_t c = 0; c < r.expected_refcounts.size(); ++c) {
    if (skip.count(c)) continue;
    EXPECT_EQ(r.expected_refcounts[c], stored[c]) << "cluster " << c;
    ++compared;
  }
  EXPECT_GT(compared, 100);
}

// --- Passes and the refcount rebuild within a memory budget ------------------

// qemu-io killed after `writes` with lazy refcounts on: the dirty bit is
// set and the refcounts of the new clusters were never written.
absl::Status MakeDirtyImage(const std::string& img, uint64_t size,
                            std::vector<std::string> create_options,
                            const std::vector<std::string>& writes) {
  create_options.push_back("lazy_refcounts=on");
  RETURN_IF_ERROR(CreateImage(img, "qcow2", size, create_options));
  std::vector<std::string> argv = {"qemu-io", "-f", "qcow2"};
  for (const std::string& w : writes) {
    argv.push_back("-c");
    argv.push_back(w);
  }
  for (const char* arg : {"-c", "sigraise 9"}) argv.push_back(arg);
  argv.push_back(img);
  ASSIGN_OR_RETURN(CommandResult killed, RunCommand(argv));
  if (!killed.status.signaled()) {
    return absl::InternalError(absl::StrCat("qemu-io was not killed: ", killed.status.ToString()));
  }
  return absl::OkStatus();
}

// Big-endian fields read with pread: ImageFile reads the whole file, and
// some files here are 1 TiB (sparse).
absl::StatusOr<uint64_t> ReadBE(const std::string& path, uint64_t offset, int size) {
  ASSIGN_OR_RETURN(ScopedFd fd, OpenReadOnly(path));
  uint8_t b[8] = {};
  if (pread(fd.get(), b, size, static_cast<off_t>(offset)) != size) {
    return absl::DataLossError(absl::StrCat("short read at ", offset, " of ", path));
  }
  uint64_t v = 0;
  for (int i = 0; i < size; ++i) v = (v << 8) | b[i];
  return v;
}

// The engine's rebuild (as a read-write open of a dirty image runs it).
absl::Status RebuildWithEngine(const std::string& path, MemoryBudget* budget,
                               uint64_t window_clusters = 0) {
  ASSIGN_OR_RETURN(std::unique_ptr<BlockFile> file, OpenPosixFile(path, /*writable=*/true));
  std::vector<uint8_t> head(std::min<uint64_t>(kHeaderReadSize, file->size()));
  RETURN_IF_ERROR(SyncWait(file->Read(0, head)));
  ASSIGN_OR_RETURN(Header header, DecodeHeader(head, file->size()));
  return SyncWait(RebuildRefcounts(*file, header, nullptr, budget, window_clusters));
}

// A check in passes counts what one pass counts, also for the problems of
// one cluster (refcounts below the references, leaks, COPIED flags) and for
// leaks past the last reference, which no pass walks to.
TEST(CheckTest, PassesCountWhatOnePassCounts) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("dirty.qcow2");
  // 64 refcounts per block: a pass is 32 KiB of the file.
  ASSERT_OK(MakeDirtyImage(img, 16 * kMiB, {"cluster_size=512", "refcount_bits=64"},
                           {"write -P 1 0 300k", "write -P 2 5M 200k", "write -P 4 8M 4M", "write -P 3 15M 64k"}));
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  ASSERT_OK_AND_ASSIGN(uint64_t size, f.FileSize());
  // Leaked clusters past everything referenced, as far as the last
  // refcount block reaches.
  ASSERT_OK(WriteFileAt(img, size + 100 * 512, std::string(512, '\0')));
  int leaked = 0;
  for (uint64_t c = (size + 511) / 512; c < (size + 511) / 512 + 64 && f.SetRefcountOf(c, 2).ok(); c += 3) {
    ++leaked;
  }
  ASSERT_GT(leaked, 0);
  // Problems that do not depend on the pass: counted once, not per pass.
  ASSERT_OK_AND_ASSIGN(uint64_t reserved_at, f.L2EntryPos(0));
  ASSERT_OK_AND_ASSIGN(uint64_t reserved_entry, f.Read64(reserved_at));
  ASSERT_OK(f.Write64(reserved_at, reserved_entry | (1u << 3)));  // bits 1-8 are reserved
  ASSERT_OK_AND_ASSIGN(uint64_t far_at, f.L2EntryPos(5 * kMiB));
  ASSERT_OK(f.Write64(far_at, kCopied | (uint64_t{1} << 40)));  // a cluster 1 TiB past the end
  ASSERT_OK_AND_ASSIGN(CheckResult one, OurCheck(img));
  ASSERT_OK_AND_ASSIGN(QemuCheckReport q, QemuCheck(img));
  EXPECT_GT(one.corruptions, 0u);
  EXPECT_GE(one.leaks, static_cast<uint64_t>(leaked));
  EXPECT_EQ(one.corruptions, q.corruptions) << absl::StrJoin(one.messages, "\n") << "\n" << q.output;
  EXPECT_EQ(one.leaks, q.leaks) << absl::StrJoin(one.messages, "\n") << "\n" << q.output;
  for (uint64_t window : {1, 64, 200, 1000}) {
    SCOPED_TRACE(absl::StrCat("window of ", window, " clusters"));
    CheckOptions options;
    options.window_clusters = window;
    ASSERT_OK_AND_ASSIGN(CheckResult passes, OurCheck(img, "", options));
    EXPECT_EQ(passes.corruptions, one.corruptions) << absl::StrJoin(passes.messages, "\n");
    EXPECT_EQ(passes.leaks, one.leaks) << absl::StrJoin(passes.messages, "\n");
    EXPECT_TRUE(passes.expected_refcounts.empty());
  }
  // A budget that holds the counts (5 bytes a cluster, kCheckBytesPerCluster)
  // of half the file, with room beside them: passes, the same result.
  ASSERT_OK_AND_ASSIGN(uint64_t file_size, f.FileSize());
  const uint64_t file_clusters = file_size / 512;
  MemoryBudget budget(file_clusters * 5);
  CheckOptions options;
  options.budget = &budget;
  ASSERT_OK_AND_ASSIGN(CheckResult budgeted, OurCheck(img, "", options));
  EXPECT_EQ(budgeted.corruptions, one.corruptions);
  EXPECT_EQ(budgeted.leaks, one.leaks);
  EXPECT_EQ(budget.used(), 0u);
  // It did count in passes (one pass would need the whole budget for its
  // counts alone): only a check of one pass keeps its counts.
  EXPECT_TRUE(budgeted.expected_refcounts.empty());
}

// The rebuild counts in passes when the budget cannot hold all counts at
// once, and the result is exactly what qemu-img check wants: in passes of
// one refcount block's clusters (the smallest), and in the passes a small
// budget leads to.
TEST(CheckTest, RebuildInPassesIsExact) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  struct Case {
    const char* name;
    std::vector<std::string> create;
    uint64_t window_clusters;  // 0: from the budget
  };
  for (const Case& c : {Case{"512-byte clusters, passes of 256", {"cluster_size=512"}, 1},
                        Case{"4k clusters, 64-bit refcounts, passes of 512",
                             {"cluster_size=4096", "refcount_bits=64"}, 1},
                        Case{"512-byte clusters, passes from the budget", {"cluster_size=512"}, 0}}) {
    SCOPED_TRACE(c.name);
    const std::string img = dir.Join(absl::StrCat(c.window_clusters, c.create.size(), c.create[0], ".qcow2"));
    ASSERT_OK(MakeDirtyImage(img, 16 * kMiB, c.create,
                             {"write -P 1 0 1M", "write -P 2 6M 1M", "write -P 3 12M 1M"}));
    ASSERT_FALSE(CheckImage(img, /*allow_leaks=*/true).ok()) << "the image is not damaged";
    ASSERT_OK_AND_ASSIGN(std::string bytes, ReadFile(img));
    const uint64_t clusters = bytes.size() / 512;
    // From the budget: room to count about a third of the clusters per
    // pass, and for the list of L2 tables (one per 64 data clusters).
    MemoryBudget budget(c.window_clusters > 0 ? 64 * kMiB : clusters * 3 + clusters + 32 * kKiB_);
    ASSERT_OK(RebuildWithEngine(img, &budget, c.window_clusters));
    EXPECT_EQ(budget.used(), 0u);
    EXPECT_OK(CheckImage(img));
    EXPECT_OK(QemuIo(img, "qcow2", {"read -P 1 0 1M", "read -P 2 6M 1M", "read -P 3 12M 1M",
                                    "read -P 0 1M 5M"}));
    ASSERT_OK_AND_ASSIGN(uint64_t features, ReadBE(img, 72, 8));
    EXPECT_EQ(features & 1, 0u) << "still dirty";
  }
}

// A budget too small for even one pass refuses the rebuild with the
// budget's one line, and leaves the image as it was.
TEST(CheckTest, RebuildBeyondTheBudgetIsRefusedAndChangesNothing) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("dirty.qcow2");
  ASSERT_OK(MakeDirtyImage(img, 16 * kMiB, {"cluster_size=512"}, {"write -P 1 0 1M"}));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(img));
  MemoryBudget budget(2 * kKiB_);
  absl::Status refused = RebuildWithEngine(img, &budget);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_FALSE(absl::StrContains(refused.message(), "\n")) << refused;
  EXPECT_TRUE(absl::StrContains(refused.message(), "max_metadata_memory")) << refused;
  EXPECT_EQ(budget.used(), 0u);
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(img));
  EXPECT_TRUE(before == after) << "a refused rebuild changed the image";
}

#ifndef QCOW2FUSE_CHECK_TEST_SANITIZED
// Runs `body` in a child limited to `limit_bytes` of data (heap and private
// mappings) and exits 0 if it returned OK.
[[noreturn]] void RunWithDataLimit(const std::function<absl::Status()>& body, rlim_t limit_bytes) {
  struct rlimit limit;
  limit.rlim_cur = limit_bytes;
  limit.rlim_max = limit_bytes;
  if (setrlimit(RLIMIT_DATA, &limit) != 0) _exit(2);
  absl::Status status = body();
  if (!status.ok()) fprintf(stderr, "%s\n", status.ToString().c_str());
  _exit(status.ok() ? 0 : 1);
}
#endif

// A dirty image in a sparse file of almost 1 TiB with 512-byte clusters
// (2^31 clusters: 12 bytes per cluster was 24 GiB) is rebuilt within a
// 64 MiB budget, its new refcount structures right after its data rather
// than at the end of the file, and without blocks for the empty rest.
TEST(CheckTest, RebuildOfAHugeSparseFileStaysWithinTheBudget) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("dirty.qcow2");
  ASSERT_OK(MakeDirtyImage(img, 64 * kMiB, {"cluster_size=512"},
                           {"write -P 1 0 1M", "write -P 2 40M 512k"}));
  struct stat st;
  ASSERT_EQ(stat(img.c_str(), &st), 0) << strerror(errno);
  const uint64_t small_size = st.st_size;
  constexpr uint64_t kHuge = (uint64_t{1} << 40) - kMiB;
  ASSERT_EQ(truncate(img.c_str(), kHuge), 0) << strerror(errno);

  const auto start = std::chrono::steady_clock::now();
  const auto rebuild = [&img]() -> absl::Status {
    MemoryBudget budget(64 * kMiB);
    return RebuildWithEngine(img, &budget);
  };
#ifdef QCOW2FUSE_CHECK_TEST_SANITIZED
  ASSERT_OK(rebuild());
#else
  // In a child limited to 1 GiB of data, so that a rebuild that allocates
  // per cluster of the file fails the test instead of the machine. Forked
  // ("fast"), not re-run from the start: it must rebuild this very file.
  GTEST_FLAG_SET(death_test_style, "fast");
  EXPECT_EXIT(RunWithDataLimit(rebuild, uint64_t{1} << 30), ::testing::ExitedWithCode(0), "");
#endif
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(60));

  // The new table and blocks lie right after the old end of the data; past
  // them the file holds nothing anything refers to. Cut it there and let
  // qemu-img check every refcount (it would need 4 GiB for the huge file).
  ASSERT_OK_AND_ASSIGN(uint64_t table, ReadBE(img, 48, 8));
  ASSERT_OK_AND_ASSIGN(uint64_t table_clusters, ReadBE(img, 56, 4));
  EXPECT_LT(table, small_size + kMiB) << "the new refcount table went to the end of the file";
  uint64_t end = table + table_clusters * 512;
  for (uint64_t i = 0; i < table_clusters * 512 / 8; ++i) {
    ASSERT_OK_AND_ASSIGN(uint64_t block, ReadBE(img, table + 8 * i, 8));
    if (block != 0) end = std::max(end, block + 512);
  }
  EXPECT_LT(end, small_size + kMiB);
  ASSERT_EQ(truncate(img.c_str(), end), 0) << strerror(errno);
  EXPECT_OK(CheckImage(img));
  EXPECT_OK(QemuIo(img, "qcow2", {"read -P 1 0 1M", "read -P 2 40M 512k", "read -P 0 1M 39M"}));
}

TEST(CheckTest, DamagedSnapshotSharing) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 1 * kMiB, {"cluster_size=512"}));
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 1 0 64k"}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "s1", img}));
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 2 0 512"}));
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  ASSERT_OK_AND_ASSIGN(uint64_t pos, f.L2EntryPos(512));
  ASSERT_OK_AND_ASSIGN(uint64_t entry, f.Read64(pos));
  const uint64_t host = entry & kOffsetMask;

  // COPIED on a cluster with refcount 2.
  ASSERT_OK(f.Write64(pos, entry | kCopied));
  ExpectCounts(img, 1, 0);
  ASSERT_OK(f.Write64(pos, entry));
  ExpectClean(img);

  // Refcount 2 -> 1 on a shared cluster: below its references, and now the
  // missing COPIED flag is wrong too.
  ASSERT_OK(f.SetRefcountOf(host / 512, 1));
  ExpectCounts(img, 2, 0);
  // Refcount 3: one too many.
  ASSERT_OK(f.SetRefcountOf(host / 512, 3));
  ExpectCounts(img, 0, 1);
}

TEST(CheckTest, DamagedCompressedCluster) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string raw = dir.Join("src.raw");
  const std::string img = dir.Join("a.qcow2");
  ASSERT_OK(CreateImage(raw, "raw", 4 * kMiB));
  ASSERT_OK(QemuIo(raw, "raw", {"write -P 0x11 0 1M"}));
  ASSERT_OK(ConvertImage(raw, "raw", img, "qcow2", {"-c"}));
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  ASSERT_OK_AND_ASSIGN(uint64_t pos, f.L2EntryPos(0));
  ASSERT_OK_AND_ASSIGN(uint64_t entry, f.Read64(pos));
  ASSERT_TRUE(entry & kCompressed);
  // 64 KiB clusters: x = 62 - 8 = 54 offset bits.
  const uint64_t host_cluster = (entry & ((1ull << 54) - 1)) / f.cluster_size();
  ASSERT_OK_AND_ASSIGN(uint64_t refcount, f.Refcount(host_cluster));
  ASSERT_GE(refcount, 1u);
  ASSERT_OK(f.SetRefcountOf(host_cluster, refcount - 1));
  ExpectCounts(img, 1, 0);
  ASSERT_OK(f.SetRefcountOf(host_cluster, refcount));
  // COPIED must never be set on a compressed cluster.
  ASSERT_OK(f.Write64(pos, entry | kCopied));
  ExpectCounts(img, 1, 0);
}

TEST(CheckTest, DamagedBitmapRefcount) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 64 * kMiB, {"cluster_size=4096"}));
  ASSERT_OK(QemuImg({"bitmap", "--add", "-g", "512", img, "fine"}));
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 2 0 64k", "write -P 3 40M 1M"}));
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  ASSERT_TRUE(f.header().bitmaps.has_value());
  const uint64_t dir_cluster = f.header().bitmaps->bitmap_directory_offset / f.cluster_size();
  ASSERT_OK(f.SetRefcountOf(dir_cluster, 0));
  ExpectCounts(img, 1, 0);
  ASSERT_OK(f.SetRefcountOf(dir_cluster, 1));
  ExpectClean(img);
  // A bitmap data cluster.
  ASSERT_OK_AND_ASSIGN(uint64_t table, f.Read64(f.header().bitmaps->bitmap_directory_offset));
  uint64_t data = 0;
  for (uint64_t j = 0; data == 0; ++j) {
    ASSERT_LT(j, f.cluster_size() / 8);
    ASSERT_OK_AND_ASSIGN(uint64_t e, f.Read64(table + 8 * j));
    data = e & kOffsetMask;
  }
  ASSERT_OK(f.SetRefcountOf(data / f.cluster_size(), 0));
  ExpectCounts(img, 1, 0);
}

TEST(CheckTest, MessagesAreCapped) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("check"));
  const std::string img = dir.Join("a.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 16 * kMiB, {"cluster_size=4096"}));
  ASSERT_OK(QemuIo(img, "qcow2", {"write -P 1 0 1M"}));  // 256 data clusters
  ASSERT_OK_AND_ASSIGN(ImageFile f, ImageFile::Open(img));
  for (uint64_t g = 0; g < 256; ++g) {
    ASSERT_OK_AND_ASSIGN(uint64_t pos, f.L2EntryPos(g * 4096));
    ASSERT_OK_AND_ASSIGN(uint64_t entry, f.Read64(pos));
    ASSERT_OK(f.Write64(pos, entry & ~kCopied));
  }
  ASSERT_OK_AND_ASSIGN(CheckResult r, OurCheck(img, "", CheckOptions{.max_messages = 10}));
  EXPECT_EQ(r.corruptions, 256u);
  ASSERT_EQ(r.messages.size(), 11u);
  EXPECT_EQ(r.messages.back(), "... and 246 more problems not listed");
  ExpectCounts(img, 256, 0);
}

// --- Hostile images --------------------------------------------------------------

using Bytes = std::vector<uint8_t>;

void Put(Bytes& b, uint64_t offset, uint64_t value, int size) {
  if (b.size() < offset + size) b.resize(offset + size);
  for (int i = size - 1; i >= 0; --i, value >>= 8) b[offset + i] = value & 0xff;
}

// A valid header (DecodeHeader accepts it) over metadata built to hurt:
// 512-byte clusters; an L1 table of 65536 entries whose entries point at
// the L1 table itself, at an L2 table that points at itself, at offsets
// near 2^56, and 65000 times at the same L2 table; 65536 snapshots that all
// name the same L1 table with the maximum size; a refcount table pointing
// at itself and past the end; bitmaps whose tables are the L1 table.
Bytes HostileImage() {
  constexpr uint64_t cs = 512;
  constexpr uint64_t kReftable = 1 * cs, kRefblock = 2 * cs, kL2 = 3 * cs, kL1 = 4 * cs;
  constexpr uint64_t kL1Entries = 65536;
  constexpr uint64_t kBitmapDir = kL1 + kL1Entries * 8;
  constexpr uint64_t kSnapshots = kBitmapDir + cs;
  constexpr uint64_t kNbSnapshots = 65536;
  constexpr uint64_t kSnapshotEntry = 48;  // 40 + id (1) + name (1), padded
  const uint64_t file_size = kSnapshots + kNbSnapshots * kSnapshotEntry;
  Bytes b(file_size, 0);
  // Header, version 3.
  Put(b, 0, 0x514649fb, 4);
  Put(b, 4, 3, 4);
  Put(b, 20, 9, 4);           // cluster_bits
  Put(b, 24, 1ull << 30, 8);  // 1 GiB: needs 32768 L1 entries
  Put(b, 36, kL1Entries, 4);  // l1_size
  Put(b, 40, kL1, 8);
  Put(b, 48, kReftable, 8);
  Put(b, 56, 1, 4);  // refcount_table_clusters
  Put(b, 60, kNbSnapshots, 4);
  Put(b, 64, kSnapshots, 8);
  Put(b, 88, 1, 8);     // autoclear: bitmaps
  Put(b, 96, 4, 4);     // refcount_order
  Put(b, 100, 112, 4);  // header_length
  // Bitmaps extension.
  Put(b, 112, 0x23852875, 4);
  Put(b, 116, 24, 4);
  Put(b, 120, 2, 4);       // nb_bitmaps
  Put(b, 128, 2 * 32, 8);  // directory size
  Put(b, 136, kBitmapDir, 8);
  Put(b, 144, 0, 8);  // end of extensions

  // Refcount table: a real block, itself, far past the end, reserved bits.
  Put(b, kReftable + 0, kRefblock, 8);
  Put(b, kReftable + 8, kReftable, 8);
  Put(b, kReftable + 16, 0x00fffffffffffe00ull, 8);
  Put(b, kReftable + 24, kRefblock | 0x1ff, 8);
  for (uint64_t i = 0; i < cs; i += 2) Put(b, kRefblock + i, 0xffff, 2);

  // L2 table: itself, far away, a compressed cluster with the largest
  // size far away, the header, a compressed cluster at the end of the file,
  // and the refcount table.
  Put(b, kL2 + 0, kCopied | kL2, 8);
  Put(b, kL2 + 8, kCopied | 0x00fffffffffffe00ull, 8);
  Put(b, kL2 + 16, kCompressed | ((1ull << 62) - 1), 8);
  Put(b, kL2 + 24, kCopied, 8);
  Put(b, kL2 + 32, kCompressed | (file_size - 100), 8);
  for (uint64_t i = 5; i < cs / 8; ++i) Put(b, kL2 + 8 * i, kReftable, 8);

  // L1 table.
  Put(b, kL1 + 0, kCopied | kL1, 8);
  Put(b, kL1 + 8, kCopied | kL2, 8);
  Put(b, kL1 + 16, 0x00fffffffffffe00ull, 8);
  Put(b, kL1 + 24, ~0ull, 8);
  Put(b, kL1 + 32, kCopied, 8);
  for (uint64_t i = 5; i < kL1Entries; ++i) Put(b, kL1 + 8 * i, kL2, 8);

  // Bitmap directory: two bitmaps whose tables are the L1 table.
  for (int i = 0; i < 2; ++i) {
    const uint64_t e = kBitmapDir + 32 * i;
    Put(b, e + 0, kL1, 8);
    Put(b, e + 8, 4096, 4);  // table entries
    Put(b, e + 12, 0, 4);    // flags
    b[e + 16] = 1;           // type
    b[e + 17] = 9;           // granularity_bits
    Put(b, e + 18, 1, 2);    // name size
    Put(b, e + 20, 0, 4);    // extra data size
    b[e + 24] = 'a' + i;
  }

  // Snapshots: all name the active L1 table, with the largest size QEMU
  // allows (32 MiB of entries, far past the end of the file). The first
  // is unaligned, the second too large.
  for (uint64_t i = 0; i < kNbSnapshots; ++i) {
    const uint64_t e = kSnapshots + kSnapshotEntry * i;
    Put(b, e + 0, i == 0 ? kL1 + 8 : kL1, 8);
    Put(b, e + 8, i == 1 ? 0xffffffffu : 4u << 20, 4);
    Put(b, e + 12, 1, 2);  // id size
    Put(b, e + 14, 1, 2);  // name size
    Put(b, e + 36, 0, 4);  // extra data size
    b[e + 40] = '0' + i % 10;
    b[e + 41] = 'x';
  }
  return b;
}

absl::StatusOr<CheckResult> CheckBytes(Bytes bytes) {
  std::unique_ptr<BlockFile> file = NewMemFile("hostile.qcow2", std::move(bytes));
  std::vector<uint8_t> head(std::min<uint64_t>(kHeaderReadSize, file->size()));
  RETURN_IF_ERROR(SyncWait(file->Read(0, head)));
  ASSIGN_OR_RETURN(Header header, DecodeHeader(head, file->size()));
  return SyncWait(CheckImage(*file, header, nullptr));
}


#ifndef QCOW2FUSE_CHECK_TEST_SANITIZED
// Runs the check under a limit on the process's data (heap and private
// mappings) and exits 0 if it completed and found the damage. Sanitizers
// map shadow memory that such a limit would refuse.
[[noreturn]] void CheckWithDataLimit(const Bytes& bytes, rlim_t limit_bytes) {
  struct rlimit limit;
  limit.rlim_cur = limit_bytes;
  limit.rlim_max = limit_bytes;
  if (setrlimit(RLIMIT_DATA, &limit) != 0) _exit(2);
  absl::StatusOr<CheckResult> result = CheckBytes(bytes);
  _exit(result.ok() && result->corruptions > 0 ? 0 : 1);
}
#endif

TEST(CheckTest, HostileImageIsCheckedInBoundedTimeAndMemory) {
  const Bytes bytes = HostileImage();
  const auto start = std::chrono::steady_clock::now();
  ASSERT_OK_AND_ASSIGN(CheckResult r, CheckBytes(bytes));
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_LT(elapsed, std::chrono::seconds(20));
  EXPECT_GT(r.corruptions, 65536u);  // one per snapshot L1 table at least
  EXPECT_EQ(r.expected_refcounts.size(), bytes.size() / 512);
  EXPECT_EQ(r.messages.size(), CheckOptions{}.max_messages + 1);
  // The L2 table every L1 entry names saturates rather than wraps.
  EXPECT_EQ(r.expected_refcounts[3], std::numeric_limits<uint32_t>::max());

#ifndef QCOW2FUSE_CHECK_TEST_SANITIZED
  // Again in a child limited to 256 MiB of data: the L1 tables alone claim
  // 65537 x 32 MiB.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(CheckWithDataLimit(bytes, 256u << 20), ::testing::ExitedWithCode(0), "");
#endif
}

TEST(CheckTest, HandBuiltHeaderWithInsaneFieldsDoesNotAllocate) {
  // A header DecodeHeader would refuse, given directly: the checker must
  // still bound everything by the 4 KiB file.
  Bytes bytes(4096, 0);
  Put(bytes, 0, 0x514649fb, 4);
  std::unique_ptr<BlockFile> file = NewMemFile("tiny.qcow2", bytes);
  Header h;
  h.version = 3;
  h.cluster_bits = 9;
  h.size = 1ull << 50;
  h.l1_size = 0xffffffffu;
  h.l1_table_offset = 0x00fffffffffffe00ull;
  h.refcount_table_offset = 1ull << 62;
  h.refcount_table_clusters = 0xffffffffu;
  h.nb_snapshots = 0xffffffffu;
  h.snapshots_offset = 1ull << 40;
  h.refcount_order = 6;
  h.header_length = 112;
  h.bitmaps = BitmapsExtension{65535, 1ull << 40, 1ull << 40};
  h.full_disk_encryption = FdeExtension{1ull << 60, 1ull << 60};
  ASSERT_OK_AND_ASSIGN(CheckResult r, SyncWait(CheckImage(*file, h, nullptr)));
  EXPECT_GT(r.corruptions, 0u);
  EXPECT_EQ(r.expected_refcounts.size(), 8u);

  // Snapshots inside the file, with lengths that run off its end.
  h = Header();
  h.version = 3;
  h.cluster_bits = 9;
  h.refcount_order = 4;
  h.nb_snapshots = 3;
  h.snapshots_offset = 1024;
  Put(bytes, 1024 + 8, 100, 4);      // l1_size
  Put(bytes, 1024 + 12, 0xffff, 2);  // id size: past the end
  file = NewMemFile("tiny.qcow2", bytes);
  ASSERT_OK_AND_ASSIGN(r, SyncWait(CheckImage(*file, h, nullptr)));
  EXPECT_GT(r.corruptions, 0u);

  Put(bytes, 1024 + 12, 0, 2);
  Put(bytes, 1024 + 36, 0xffffffffu, 4);  // extra data size
  file = NewMemFile("tiny.qcow2", bytes);
  ASSERT_OK_AND_ASSIGN(r, SyncWait(CheckImage(*file, h, nullptr)));
  EXPECT_GT(r.corruptions, 0u);

  // Geometry the checker cannot work with is an error, not a crash.
  h.cluster_bits = 40;
  EXPECT_EQ(SyncWait(CheckImage(*file, h, nullptr)).status().code(),
            absl::StatusCode::kInvalidArgument);
  h.cluster_bits = 9;
  h.refcount_order = 7;
  EXPECT_EQ(SyncWait(CheckImage(*file, h, nullptr)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CheckTest, LoopsInMetadataEnd) {
  // 4 KiB clusters: the L1 entry points at the L1 table, the L2 table's
  // entries at the L2 table and at the L1 table, the refcount table at
  // itself. Nothing is followed twice, so this ends.
  constexpr uint64_t cs = 4096;
  Bytes b(6 * cs, 0);
  Put(b, 0, 0x514649fb, 4);
  Put(b, 4, 3, 4);
  Put(b, 20, 12, 4);
  Put(b, 24, 1ull << 20, 8);
  Put(b, 36, 1, 4);
  Put(b, 40, 3 * cs, 8);  // L1
  Put(b, 48, 1 * cs, 8);  // refcount table
  Put(b, 56, 1, 4);
  Put(b, 96, 4, 4);
  Put(b, 100, 104, 4);
  Put(b, 1 * cs, 1 * cs, 8);                // refcount table -> itself as a block
  Put(b, 3 * cs, kCopied | 3 * cs, 8);      // L1[0] -> the L1 table
  Put(b, 3 * cs + 8, kCopied | 4 * cs, 8);  // L1[1] -> L2 (not in l1_size: ignored)
  ASSERT_OK_AND_ASSIGN(CheckResult r, CheckBytes(b));
  EXPECT_GT(r.corruptions, 0u);
  // The L1 table is referenced as L1 and as L2 (twice), the data cluster
  // entry L1[0] read as an L2 entry points at it again.
  EXPECT_EQ(r.expected_refcounts[3], 3u);
  EXPECT_EQ(r.expected_refcounts[1], 2u);  // refcount table and "block"
}

}  // namespace
}  // namespace qcow2fuse::test
