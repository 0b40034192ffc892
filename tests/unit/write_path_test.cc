// The write path of Qcow2Layer (data/qcow2_write.cc) against QEMU: images
// are made with qemu-img and qemu-io, written through the engine, flushed
// and closed, and then judged by QEMU's own tools: `qemu-img check` must
// find no corruption and no leak, and `qemu-img compare` must find the
// disk equal to a raw file that received the same writes. Where the test
// is about the layout (what is allocated, which L2 bits are set, which
// bytes reach the file) the image bytes are decoded here, and the engine's
// file operations are logged with a RecordingFile.
//
// The CrashStates tests run a sequence of allocating writes, copy-on-write
// over a compressed cluster, L2 table allocation, L1 growth and refcount
// block allocation on a RecordingFile, and check every crash state it
// enumerates with `qemu-img check` (no corruption; leaks allowed) and by
// reading the disk back (everything written before a completed Flush is
// there); the harness is crash_harness.h, and crash_states_test.cc runs it
// over discard, write-zeroes, preallocation, growth and repair.

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <span>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "data/qcow2_layer.h"
#include "data/raw_layer.h"
#include "format/header.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "io/recording_file.h"
#include "crash_harness.h"
#include "qcow2_builder.h"  // Bytes, Pattern, PutBE*
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/loop_device.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kCopied = uint64_t{1} << 63;
constexpr uint64_t kCompressed = uint64_t{1} << 62;
constexpr uint64_t kHostMask = 0x00fffffffffffe00ull;

// --- Files ---------------------------------------------------------------------

absl::Status WriteRaw(const std::string& path, uint64_t offset, const Bytes& data) {
  return WriteFileAt(path, offset,
                     absl::string_view(reinterpret_cast<const char*>(data.data()), data.size()));
}

absl::Status TruncateRaw(const std::string& path, uint64_t size) {
  if (truncate(path.c_str(), size) != 0) return absl::InternalError("truncate " + path);
  return absl::OkStatus();
}

// --- Decoding the image bytes ------------------------------------------------------

struct Geometry {
  uint32_t cluster_bits;
  bool extended;
  uint64_t size;
  uint32_t l1_size;
  uint64_t l1_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t refcount_order;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint32_t entry_size() const { return extended ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / entry_size(); }
};

Geometry Geom(const Bytes& b) {
  Geometry g;
  g.cluster_bits = static_cast<uint32_t>(GetBE(b, 20, 4));
  g.size = GetBE(b, 24, 8);
  g.l1_size = static_cast<uint32_t>(GetBE(b, 36, 4));
  g.l1_offset = GetBE(b, 40, 8);
  g.refcount_table_offset = GetBE(b, 48, 8);
  g.refcount_table_clusters = static_cast<uint32_t>(GetBE(b, 56, 4));
  g.extended = GetBE(b, 72, 8) & kIncompatExtendedL2;
  g.refcount_order = static_cast<uint32_t>(GetBE(b, 96, 4));
  return g;
}

uint64_t L1Entry(const Bytes& b, uint64_t guest_offset) {
  const Geometry g = Geom(b);
  const uint64_t index = (guest_offset >> g.cluster_bits) / g.l2_entries();
  return GetBE(b, g.l1_offset + index * 8, 8);
}

// The L2 entry (descriptor, bitmap) of the guest cluster holding `guest_offset`.
L2Entry L2At(const Bytes& b, uint64_t guest_offset) {
  const Geometry g = Geom(b);
  const uint64_t l2 = L1Entry(b, guest_offset) & kHostMask;
  if (l2 == 0) return {};
  const uint64_t at = l2 + ((guest_offset >> g.cluster_bits) % g.l2_entries()) * g.entry_size();
  return {GetBE(b, at, 8), g.extended ? GetBE(b, at + 8, 8) : 0};
}

// The on-disk refcount of the cluster at host offset `offset`.
uint64_t DiskRefcount(const Bytes& b, uint64_t offset) {
  const Geometry g = Geom(b);
  const uint64_t entries = (uint64_t{8} << g.cluster_bits) >> g.refcount_order;
  const uint64_t cluster = offset >> g.cluster_bits;
  const uint64_t index = cluster / entries;
  if (index >= g.refcount_table_clusters * g.cluster_size() / 8) return 0;
  const uint64_t block = GetBE(b, g.refcount_table_offset + index * 8, 8) & ~uint64_t{0x1ff};
  if (block == 0) return 0;
  const uint32_t bits = 1u << g.refcount_order;
  const uint64_t i = cluster % entries;
  if (bits < 8) return (GetBE(b, block + i * bits / 8, 1) >> (i * bits % 8)) & ((1u << bits) - 1);
  return GetBE(b, block + i * bits / 8, bits / 8);
}

// Clusters of the file with a non-zero refcount.
uint64_t UsedClusters(const Bytes& b) {
  const Geometry g = Geom(b);
  uint64_t n = 0;
  for (uint64_t o = 0; o < b.size() + 64 * g.cluster_size(); o += g.cluster_size()) n += DiskRefcount(b, o) != 0;
  return n;
}

// Host clusters [first, end) that the compressed descriptor's bytes touch.
std::pair<uint64_t, uint64_t> CompressedClusters(uint64_t descriptor, uint32_t cluster_bits) {
  const uint32_t x = 62 - (cluster_bits - 8);
  const uint64_t host = descriptor & ((uint64_t{1} << x) - 1);
  const uint64_t sectors = ((descriptor >> x) & ((uint64_t{1} << (cluster_bits - 8)) - 1)) + 1;
  const uint64_t end = (host & ~uint64_t{511}) + sectors * 512;
  return {host >> cluster_bits, (end + (uint64_t{1} << cluster_bits) - 1) >> cluster_bits};
}

// --- QEMU's verdicts ------------------------------------------------------------------

// `qemu-img check`: no errors and no leaks.
void ExpectQemuClean(const std::string& image) {
  ASSERT_OK_AND_ASSIGN(QemuCheckReport c, QemuCheck(image));
  EXPECT_EQ(c.corruptions, 0u) << c.output;
  EXPECT_EQ(c.check_errors, 0u) << c.output;
  EXPECT_EQ(c.leaks, 0u) << "leaked clusters after Flush and close\n" << c.output;
  EXPECT_EQ(c.exit_code, 0) << c.output;
}

// `qemu-img compare`: the qcow2 disk reads as the raw reference.
void ExpectSameAsRaw(const std::string& image, const std::string& raw) {
  ASSERT_OK_AND_ASSIGN(CommandResult r,
                       RunCommand({"qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw}));
  EXPECT_TRUE(r.ok()) << "qemu-img compare " << image << " " << raw << ": " << r.status.ToString()
                      << "\n" << r.stdout_text << r.stderr_text;
}

void ExpectCleanAndSameAsRaw(const std::string& image, const std::string& raw) {
  ExpectQemuClean(image);
  ExpectSameAsRaw(image, raw);
}

// --- Opening the image with the engine ----------------------------------------------------

ImageOptions Writable(uint64_t l2_cache_size = ImageOptions{}.l2_cache_size) {
  ImageOptions o;
  o.read_only = false;
  o.l2_cache_size = l2_cache_size;
  return o;
}

// Opens `path` writable as a Qcow2Layer over a PosixFile (no image locks,
// so QEMU's tools can look at the file once the layer is gone). With
// `recording`, the file is wrapped in a RecordingFile left there.
absl::StatusOr<std::unique_ptr<Qcow2Layer>> OpenWritable(const std::string& path,
                                                         std::unique_ptr<Layer> backing = nullptr,
                                                         RecordingFile** recording = nullptr,
                                                         const ImageOptions& options = Writable()) {
  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path, true);
  if (!file.ok()) return file.status();
  Bytes head(std::min<uint64_t>(kHeaderReadSize, (*file)->size()));
  absl::Status read = SyncWait((*file)->Read(0, head));
  if (!read.ok()) return read;
  absl::StatusOr<Header> header = DecodeHeader(head, (*file)->size());
  if (!header.ok()) return header.status();
  std::unique_ptr<BlockFile> f = std::move(*file);
  if (recording != nullptr) {
    auto rec = std::make_unique<RecordingFile>(std::move(f));
    *recording = rec.get();
    f = std::move(rec);
  }
  return SyncWait(Qcow2Layer::Open(std::move(f), std::move(*header), nullptr, std::move(backing), options));
}

absl::StatusOr<std::unique_ptr<Layer>> RawBacking(const std::string& path) {
  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path, false);
  if (!file.ok()) return file.status();
  return NewRawLayer(std::move(*file));
}

Bytes ReadLayer(Qcow2Layer& layer, uint64_t offset, uint64_t length) {
  Bytes out(length);
  EXPECT_OK(SyncWait(layer.Read(offset, out)));
  return out;
}

// The writes (and discards) of a log that touch [begin, end) of the file.
std::vector<FileOp> OpsIn(const std::vector<FileOp>& log, uint64_t begin, uint64_t end) {
  std::vector<FileOp> out;
  for (const FileOp& op : log) {
    if (op.kind != FileOp::Kind::kWrite && op.kind != FileOp::Kind::kDiscard) continue;
    if (op.offset < end && op.offset + op.length > begin) out.push_back(op);
  }
  return out;
}

size_t CountWrites(const std::vector<FileOp>& log) {
  return std::count_if(log.begin(), log.end(), [](const FileOp& op) { return op.kind == FileOp::Kind::kWrite; });
}

// A qcow2 image and a raw reference made with the same qemu-io commands.
struct Pair {
  std::string image;
  std::string raw;
};

absl::StatusOr<Pair> MakePair(const TempDir& dir, uint64_t size, const std::vector<std::string>& options,
                              const std::vector<std::string>& qemu_io) {
  Pair p{dir.Join("disk.qcow2"), dir.Join("disk.raw")};
  // A raw file cannot hold compressed data: the same write, uncompressed.
  std::vector<std::string> raw_io;
  for (std::string c : qemu_io) {
    if (c.rfind("write -c ", 0) == 0) c = "write " + c.substr(9);
    raw_io.push_back(c);
  }
  absl::Status s = CreateImage(p.image, "qcow2", size, options);
  if (s.ok()) s = CreateImage(p.raw, "raw", size);
  if (s.ok() && !qemu_io.empty()) s = QemuIo(p.image, "qcow2", qemu_io);
  if (s.ok() && !raw_io.empty()) s = QemuIo(p.raw, "raw", raw_io);
  if (!s.ok()) return s;
  return p;
}

constexpr uint64_t k64K = 64 * kKiB;

// --- Overwrites and allocation ---------------------------------------------------------------

TEST(WritePathTest, InPlaceOverwriteOfCopiedClusterAllocatesNothing) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-inplace"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536"}, {"write -P 0x11 0 128k"}));
  ASSERT_OK_AND_ASSIGN(Bytes before, ReadBytes(p.image));
  const L2Entry entry = L2At(before, k64K);
  ASSERT_TRUE(entry.descriptor & kCopied);
  const uint64_t host = entry.descriptor & kHostMask;
  const Bytes data = Pattern(4096, 1);
  {
    RecordingFile* rec = nullptr;
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image, nullptr, &rec));
    ASSERT_OK(SyncWait(layer->Write(k64K + 1000, data)));
    ASSERT_OK(SyncWait(layer->Flush()));
    const std::vector<FileOp> log = rec->log();
    ASSERT_EQ(CountWrites(log), 1u) << "only the data itself may be written";
    const std::vector<FileOp> ops = OpsIn(log, 0, UINT64_MAX);
    ASSERT_EQ(ops.size(), 1u);
    EXPECT_EQ(ops[0].offset, host + 1000);
    EXPECT_EQ(ops[0].data, data);
  }
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(p.image));
  EXPECT_EQ(after.size(), before.size());
  EXPECT_EQ(UsedClusters(after), UsedClusters(before));
  EXPECT_EQ(L2At(after, k64K).descriptor, entry.descriptor);
  ASSERT_OK(WriteRaw(p.raw, k64K + 1000, data));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

TEST(WritePathTest, WriteToUnallocatedClusterAllocatesOneZeroPaddedCluster) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-alloc"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536"}, {"write -P 0x11 0 64k"}));
  ASSERT_OK_AND_ASSIGN(Bytes before, ReadBytes(p.image));
  ASSERT_EQ(L2At(before, 3 * k64K).descriptor, 0u);
  const Bytes data = Pattern(1000, 2);
  const uint64_t at = 3 * k64K + 5000;
  {
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image));
    ASSERT_OK(SyncWait(layer->Write(at, data)));
    ASSERT_OK(SyncWait(layer->Flush()));
    const Bytes cluster = ReadLayer(*layer, 3 * k64K, k64K);
    EXPECT_TRUE(std::all_of(cluster.begin(), cluster.begin() + 5000, [](uint8_t x) { return x == 0; }))
        << "head of the cluster must read as zeros";
    EXPECT_TRUE(std::equal(data.begin(), data.end(), cluster.begin() + 5000));
    EXPECT_TRUE(std::all_of(cluster.begin() + 6000, cluster.end(), [](uint8_t x) { return x == 0; }))
        << "tail of the cluster must read as zeros";
  }
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(p.image));
  const L2Entry entry = L2At(after, 3 * k64K);
  EXPECT_EQ(entry.descriptor & ~kHostMask, kCopied);
  const uint64_t host = entry.descriptor & kHostMask;
  EXPECT_EQ(host % k64K, 0u);
  EXPECT_EQ(UsedClusters(after), UsedClusters(before) + 1) << "exactly one cluster allocated";
  EXPECT_EQ(DiskRefcount(after, host), 1u);
  // The whole cluster is on disk, zeros included.
  ASSERT_GE(after.size(), host + k64K);
  EXPECT_TRUE(std::all_of(after.begin() + host, after.begin() + host + 5000, [](uint8_t x) { return x == 0; }));
  ASSERT_OK(WriteRaw(p.raw, at, data));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

TEST(WritePathTest, NewClusterPastTheEndOfTheFileGetsOnlyTheGuestBytes) {
  // Past the end of the file every byte already reads as zero, so a small
  // write into a new cluster there writes its own bytes and extends the
  // file over the cluster, instead of writing a cluster of zeros.
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-past-end"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536"}, {}));
  const Bytes data = Pattern(4096, 9);
  const uint64_t at = 5 * k64K + 8192;
  RecordingFile* recording = nullptr;
  {
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image, nullptr, &recording));
    ASSERT_OK(SyncWait(layer->Write(at, data)));
    ASSERT_OK(SyncWait(layer->Flush()));
    const std::vector<FileOp> log = recording->log();
    ASSERT_OK_AND_ASSIGN(Bytes now, ReadBytes(p.image));
    const uint64_t host = L2At(now, at).descriptor & kHostMask;
    ASSERT_NE(host, 0u);
    std::vector<FileOp> in_cluster;
    for (const FileOp& op : log) {
      if (op.offset >= host && op.offset < host + k64K) in_cluster.push_back(op);
    }
    ASSERT_EQ(in_cluster.size(), 2u);
    EXPECT_EQ(in_cluster[0].ToString(), absl::StrCat("allocate [", host, ", +", k64K, ")"));
    EXPECT_EQ(in_cluster[1].ToString(), absl::StrCat("write [", host + 8192, ", +4096)"));
    EXPECT_GE(now.size(), host + k64K) << "the file covers the whole cluster";
    EXPECT_EQ(layer->counters().data_bytes_written, data.size());
  }
  ASSERT_OK(WriteRaw(p.raw, at, data));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

TEST(WritePathTest, WriteToUnallocatedClusterCopiesBackingData) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-backing"));
  const std::string base = dir.Join("base.raw");
  ASSERT_OK(CreateImage(base, "raw", 4 * kMiB));
  ASSERT_OK(QemuIo(base, "raw", {"write -P 0x33 0 4M"}));
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", 4 * kMiB,
                        {"cluster_size=65536", "backing_file=" + base, "backing_fmt=raw"}));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x11 0 64k"}));
  const std::string raw = dir.Join("disk.raw");
  ASSERT_OK(RunChecked({"cp", base, raw}));
  ASSERT_OK(QemuIo(raw, "raw", {"write -P 0x11 0 64k"}));
  ASSERT_OK_AND_ASSIGN(Bytes before, ReadBytes(image));

  const Bytes data = Pattern(1000, 3);
  const uint64_t at = 3 * k64K + 5000;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Layer> backing, RawBacking(base));
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(image, std::move(backing)));
    ASSERT_OK(SyncWait(layer->Write(at, data)));
    ASSERT_OK(SyncWait(layer->Flush()));
    const Bytes cluster = ReadLayer(*layer, 3 * k64K, k64K);
    EXPECT_TRUE(std::all_of(cluster.begin(), cluster.begin() + 5000, [](uint8_t x) { return x == 0x33; }));
    EXPECT_TRUE(std::all_of(cluster.begin() + 6000, cluster.end(), [](uint8_t x) { return x == 0x33; }));
  }
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(image));
  EXPECT_EQ(UsedClusters(after), UsedClusters(before) + 1);
  const uint64_t host = L2At(after, 3 * k64K).descriptor & kHostMask;
  ASSERT_NE(host, 0u);
  EXPECT_TRUE(std::all_of(after.begin() + host, after.begin() + host + 5000, [](uint8_t x) { return x == 0x33; }))
      << "the backing data around the write is copied into the new cluster";
  ASSERT_OK(WriteRaw(raw, at, data));
  ExpectCleanAndSameAsRaw(image, raw);
}

// --- Compressed clusters ------------------------------------------------------------------------

TEST(WritePathTest, PartialWriteOverCompressedClusterCopiesAndFreesIt) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-compressed"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536"},
                                        {"write -P 0x11 0 64k", "write -c -P 0x22 64k 64k"}));
  ASSERT_OK_AND_ASSIGN(Bytes before, ReadBytes(p.image));
  const L2Entry old = L2At(before, k64K);
  ASSERT_TRUE(old.descriptor & kCompressed) << "qemu-io did not compress";
  const auto [first, end] = CompressedClusters(old.descriptor, 16);
  for (uint64_t c = first; c < end; ++c) ASSERT_EQ(DiskRefcount(before, c * k64K), 1u);

  const Bytes data = Pattern(4096, 4);
  const uint64_t at = k64K + 8192;
  {
    RecordingFile* rec = nullptr;
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image, nullptr, &rec));
    ASSERT_OK(SyncWait(layer->Write(at, data)));
    ASSERT_OK(SyncWait(layer->Flush()));
    Bytes want(k64K, 0x22);
    std::copy(data.begin(), data.end(), want.begin() + 8192);
    EXPECT_EQ(ReadLayer(*layer, k64K, k64K), want) << "the rest of the compressed cluster comes along";
    // The compressed bytes' clusters were discarded once free.
    bool discarded = false;
    for (const FileOp& op : rec->log()) {
      if (op.kind == FileOp::Kind::kDiscard && op.offset <= first * k64K && op.offset + op.length >= end * k64K) {
        discarded = true;
      }
    }
    EXPECT_TRUE(discarded) << "no discard of the compressed cluster's host clusters";
  }
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(p.image));
  const L2Entry now = L2At(after, k64K);
  EXPECT_EQ(now.descriptor & kCompressed, 0u);
  EXPECT_TRUE(now.descriptor & kCopied);
  for (uint64_t c = first; c < end; ++c) {
    EXPECT_EQ(DiskRefcount(after, c * k64K), 0u)
        << "host cluster " << c << " of the old compressed data is still counted on disk after Flush";
  }
  ASSERT_OK(WriteRaw(p.raw, at, data));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

// Two compressed clusters whose bytes share a host cluster: overwriting
// one must not free what the other still uses.
TEST(WritePathTest, CompressedClustersSharingAHostClusterStayCounted) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-compressed2"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536"},
                                        {"write -c -P 0x22 0 64k", "write -c -P 0x23 64k 64k"}));
  ASSERT_OK_AND_ASSIGN(Bytes before, ReadBytes(p.image));
  const L2Entry a = L2At(before, 0), b = L2At(before, k64K);
  ASSERT_TRUE((a.descriptor & kCompressed) && (b.descriptor & kCompressed));
  const Bytes data = Pattern(512, 5);
  {
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image));
    ASSERT_OK(SyncWait(layer->Write(100, data)));
    ASSERT_OK(SyncWait(layer->Flush()));
    EXPECT_EQ(ReadLayer(*layer, k64K, k64K), Bytes(k64K, 0x23));
  }
  ASSERT_OK(WriteRaw(p.raw, 100, data));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

// --- Extended L2 entries ------------------------------------------------------------------------

TEST(WritePathTest, ExtendedL2WritesOnlyTheTouchedSubclusters) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-subcluster"));
  // Cluster 0: data. Cluster 3: unallocated, subcluster 2 zero. Cluster 4:
  // data, subcluster 2 zero.
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536", "extended_l2=on"},
                                        {"write -P 0x11 0 64k", "write -z 200704 2k",
                                         "write -P 0x44 256k 64k", "write -z 266240 2k"}));
  constexpr uint64_t kSub = 2048;
  ASSERT_OK_AND_ASSIGN(Bytes initial, ReadBytes(p.image));
  ASSERT_EQ(L2At(initial, 3 * k64K).bitmap, uint64_t{1} << 34) << "qemu-io's zero subcluster";
  const L2Entry c4 = L2At(initial, 4 * k64K);
  ASSERT_EQ(c4.bitmap, (uint64_t{1} << 34) | 0xfffffffbull);

  RecordingFile* rec = nullptr;
  ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image, nullptr, &rec));

  // 1 KiB into subcluster 3 of unallocated cluster 2.
  const Bytes d1 = Pattern(1024, 6);
  const uint64_t at1 = 2 * k64K + 3 * kSub + 512;
  ASSERT_OK(SyncWait(layer->Write(at1, d1)));
  ASSERT_OK(SyncWait(layer->Flush()));
  ASSERT_OK_AND_ASSIGN(Bytes s1, ReadBytes(p.image));
  const L2Entry e1 = L2At(s1, 2 * k64K);
  const uint64_t host = e1.descriptor & kHostMask;
  ASSERT_NE(host, 0u);
  EXPECT_EQ(e1.descriptor, host | kCopied);
  EXPECT_EQ(e1.bitmap, uint64_t{1} << 3) << "exactly the alloc bit of subcluster 3";
  {
    const std::vector<FileOp> ops = OpsIn(rec->log(), host, host + k64K);
    ASSERT_EQ(ops.size(), 1u) << "one write into the new host cluster";
    // The new cluster lies past the end of the file, where the rest of
    // the subcluster already reads as zero: only the guest's bytes go.
    EXPECT_EQ(ops[0].offset, at1 - 2 * k64K + host);
    EXPECT_EQ(ops[0].length, d1.size()) << "only the guest's bytes are written";
  }
  const uint64_t used1 = UsedClusters(s1);

  // 1 KiB into subcluster 10 of the same cluster: same host cluster.
  rec->ClearLog();
  const Bytes d2 = Pattern(1024, 7);
  const uint64_t at2 = 2 * k64K + 10 * kSub + 100;
  ASSERT_OK(SyncWait(layer->Write(at2, d2)));
  ASSERT_OK(SyncWait(layer->Flush()));
  ASSERT_OK_AND_ASSIGN(Bytes s2, ReadBytes(p.image));
  const L2Entry e2 = L2At(s2, 2 * k64K);
  EXPECT_EQ(e2.descriptor, host | kCopied) << "the host cluster is reused";
  EXPECT_EQ(e2.bitmap, (uint64_t{1} << 3) | (uint64_t{1} << 10));
  EXPECT_EQ(UsedClusters(s2), used1) << "nothing allocated";
  {
    const std::vector<FileOp> ops = OpsIn(rec->log(), host, host + k64K);
    ASSERT_EQ(ops.size(), 1u);
    EXPECT_EQ(ops[0].offset, host + 10 * kSub);
    EXPECT_EQ(ops[0].length, kSub);
  }

  // Into the zero subcluster 2 of unallocated cluster 3: its zero bit goes,
  // its alloc bit comes.
  const Bytes d3 = Pattern(1024, 8);
  const uint64_t at3 = 3 * k64K + 2 * kSub + 300;
  ASSERT_OK(SyncWait(layer->Write(at3, d3)));
  // Into the zero subcluster 2 of allocated cluster 4: in place.
  rec->ClearLog();
  const Bytes d4 = Pattern(1024, 9);
  const uint64_t at4 = 4 * k64K + 2 * kSub + 300;
  ASSERT_OK(SyncWait(layer->Write(at4, d4)));
  ASSERT_OK(SyncWait(layer->Flush()));
  ASSERT_OK_AND_ASSIGN(Bytes s3, ReadBytes(p.image));
  const L2Entry e3 = L2At(s3, 3 * k64K);
  EXPECT_NE(e3.descriptor & kHostMask, 0u);
  EXPECT_EQ(e3.bitmap, uint64_t{1} << 2) << "zero bit cleared, alloc bit set";
  const L2Entry e4 = L2At(s3, 4 * k64K);
  EXPECT_EQ(e4.descriptor, c4.descriptor) << "written in place";
  EXPECT_EQ(e4.bitmap, 0xffffffffull);
  {
    const uint64_t h4 = c4.descriptor & kHostMask;
    const std::vector<FileOp> ops = OpsIn(rec->log(), h4, h4 + k64K);
    ASSERT_EQ(ops.size(), 1u);
    EXPECT_EQ(ops[0].offset, h4 + 2 * kSub);
    EXPECT_EQ(ops[0].length, kSub);
  }
  // What the guest sees.
  Bytes want3(k64K, 0);
  std::copy(d3.begin(), d3.end(), want3.begin() + 2 * kSub + 300);
  EXPECT_EQ(ReadLayer(*layer, 3 * k64K, k64K), want3);
  Bytes want4(k64K, 0x44);
  std::fill(want4.begin() + 2 * kSub, want4.begin() + 3 * kSub, 0);
  std::copy(d4.begin(), d4.end(), want4.begin() + 2 * kSub + 300);
  EXPECT_EQ(ReadLayer(*layer, 4 * k64K, k64K), want4);
  layer.reset();

  ASSERT_OK(WriteRaw(p.raw, at1, d1));
  ASSERT_OK(WriteRaw(p.raw, at2, d2));
  ASSERT_OK(WriteRaw(p.raw, at3, d3));
  ASSERT_OK(WriteRaw(p.raw, at4, d4));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

// A compressed cluster has no subcluster bitmap: a partial write must copy
// all of it, like with standard L2 entries.
TEST(WritePathTest, ExtendedL2PartialWriteOverCompressedCluster) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-ext-compressed"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536", "extended_l2=on"},
                                        {"write -c -P 0x22 64k 64k"}));
  ASSERT_OK_AND_ASSIGN(Bytes before, ReadBytes(p.image));
  ASSERT_TRUE(L2At(before, k64K).descriptor & kCompressed);
  const Bytes data = Pattern(1024, 10);
  const uint64_t at = k64K + 8192;
  {
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image));
    ASSERT_OK(SyncWait(layer->Write(at, data)));
    ASSERT_OK(SyncWait(layer->Flush()));
    Bytes want(k64K, 0x22);
    std::copy(data.begin(), data.end(), want.begin() + 8192);
    const Bytes got = ReadLayer(*layer, k64K, k64K);
    EXPECT_EQ(std::count(got.begin(), got.end(), 0x22), std::count(want.begin(), want.end(), 0x22))
        << "bytes of the compressed data around the write that read back";
    EXPECT_TRUE(got == want) << "the cluster does not read back as the compressed data plus the write";
  }
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(p.image));
  const L2Entry e = L2At(after, k64K);
  EXPECT_EQ(e.descriptor & kCompressed, 0u);
  EXPECT_EQ(e.bitmap, 0xffffffffull) << "the whole copied cluster is data";
  ASSERT_OK(WriteRaw(p.raw, at, data));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

// --- Internal snapshots -------------------------------------------------------------------------

TEST(WritePathTest, WriteToClusterSharedWithSnapshotCopiesIt) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-snapshot"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536"}, {"write -P 0x11 0 256k"}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "snap1", p.image}).status());
  const std::string snap_ref = dir.Join("snap-ref.raw");
  ASSERT_OK(RunChecked({"cp", p.raw, snap_ref}));
  ASSERT_OK_AND_ASSIGN(Bytes before, ReadBytes(p.image));
  const L2Entry shared = L2At(before, k64K);
  ASSERT_EQ(shared.descriptor & kCopied, 0u) << "shared with the snapshot";
  ASSERT_EQ(L1Entry(before, 0) & kCopied, 0u) << "L2 table shared with the snapshot";
  const uint64_t old_host = shared.descriptor & kHostMask;
  const uint64_t old_l2 = L1Entry(before, 0) & kHostMask;
  ASSERT_EQ(DiskRefcount(before, old_host), 2u);

  const Bytes data = Pattern(4096, 11);
  const uint64_t at = k64K + 100;
  {
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image));
    ASSERT_OK(SyncWait(layer->Write(at, data)));
    ASSERT_OK(SyncWait(layer->Flush()));
  }
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(p.image));
  const uint64_t l1 = L1Entry(after, 0);
  EXPECT_TRUE(l1 & kCopied);
  EXPECT_NE(l1 & kHostMask, old_l2) << "the shared L2 table is copied";
  const L2Entry now = L2At(after, k64K);
  EXPECT_TRUE(now.descriptor & kCopied);
  EXPECT_NE(now.descriptor & kHostMask, old_host) << "the shared data cluster is copied";
  EXPECT_EQ(DiskRefcount(after, old_host), 1u) << "the snapshot keeps the old cluster";
  EXPECT_EQ(DiskRefcount(after, old_l2), 1u) << "the snapshot keeps the old L2 table";
  // Other clusters are still shared: the copied L2 table points to them too.
  EXPECT_EQ(L2At(after, 0).descriptor, L2At(before, 0).descriptor);
  EXPECT_EQ(DiskRefcount(after, L2At(after, 0).descriptor & kHostMask), 2u);

  ASSERT_OK(WriteRaw(p.raw, at, data));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
  // The snapshot still reads its old data.
  const std::string snap = dir.Join("snap.raw");
  ASSERT_OK(RunChecked({"qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=snap1",
                        p.image, snap}));
  EXPECT_OK(CompareFiles(snap, snap_ref));
  // And reverting to it (on a copy) gives the old disk back.
  const std::string copy = dir.Join("copy.qcow2");
  ASSERT_OK(RunChecked({"cp", p.image, copy}));
  ASSERT_OK(QemuImg({"snapshot", "-a", "snap1", copy}).status());
  ExpectCleanAndSameAsRaw(copy, snap_ref);
}

// --- Resizing ----------------------------------------------------------------------------------

TEST(WritePathTest, TruncateGrowsTheL1TableThenWritesAtTheEnd) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-l1"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 1 * kMiB, {"cluster_size=512"}, {"write -P 0x11 0 64k"}));
  ASSERT_OK_AND_ASSIGN(Bytes before, ReadBytes(p.image));
  const Geometry g0 = Geom(before);
  ASSERT_EQ(g0.l1_size, 32u);  // 1 MiB / (512 * 64)
  const uint64_t new_size = 64 * kMiB;
  const Bytes tail = Pattern(4096, 12);
  const Bytes middle = Pattern(1000, 13);
  {
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image));
    ASSERT_OK(SyncWait(layer->Truncate(new_size)));
    EXPECT_EQ(layer->size(), new_size);
    ASSERT_OK(SyncWait(layer->Write(new_size - 4096, tail)));
    ASSERT_OK(SyncWait(layer->Write(32 * kMiB + 7, middle)));
    ASSERT_OK(SyncWait(layer->Flush()));
    EXPECT_EQ(ReadLayer(*layer, new_size - 4096, 4096), tail);
    EXPECT_EQ(ReadLayer(*layer, 2 * kMiB, 4096), Bytes(4096, 0)) << "grown space reads as zeros";
  }
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(p.image));
  const Geometry g1 = Geom(after);
  EXPECT_EQ(g1.size, new_size);
  EXPECT_GE(g1.l1_size, 2048u) << "64 MiB / 32 KiB per L2 table";
  EXPECT_NE(g1.l1_offset, g0.l1_offset);
  // (The old L1 table's cluster is freed and may be reused since: qemu-img
  // check below says whether it is counted right.)
  ASSERT_OK_AND_ASSIGN(uint64_t qemu_size, VirtualSize(p.image));
  EXPECT_EQ(qemu_size, new_size);
  ASSERT_OK(TruncateRaw(p.raw, new_size));
  ASSERT_OK(WriteRaw(p.raw, new_size - 4096, tail));
  ASSERT_OK(WriteRaw(p.raw, 32 * kMiB + 7, middle));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

TEST(WritePathTest, ShrinkRefusedWhenDataLiesBeyond) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-shrink-no"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536"},
                                        {"write -P 0x11 0 64k", "write -P 0x22 3M 4k"}));
  {
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image));
    for (uint64_t size : {2 * kMiB, 3 * kMiB + 1, 3 * kMiB + 4095}) {
      absl::Status s = SyncWait(layer->Truncate(size));
      EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << size << ": " << s;
      EXPECT_EQ(layer->size(), 4 * kMiB);
    }
    ASSERT_OK(SyncWait(layer->Flush()));
  }
  ASSERT_OK_AND_ASSIGN(uint64_t qemu_size, VirtualSize(p.image));
  EXPECT_EQ(qemu_size, 4 * kMiB);
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

TEST(WritePathTest, ShrinkAllowedWhenNothingLiesBeyond) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-shrink-ok"));
  // Past the new end, neither a zero cluster nor a data cluster whose bytes
  // are all zeros (qemu-io writes them as data) counts as data.
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536"},
                                        {"write -P 0x11 0 64k", "write -z 3M 64k", "write -P 0 3584k 64k"}));
  ASSERT_OK_AND_ASSIGN(std::vector<MapExtent> map, MapImage(p.image));
  ASSERT_TRUE(std::any_of(map.begin(), map.end(), [](const MapExtent& e) {
    return e.data && e.offset.has_value() && e.start <= 3584 * kKiB && e.end() > 3584 * kKiB;
  })) << "qemu-io made no data cluster of zeros";
  const Bytes data = Pattern(4096, 14);
  {
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image));
    ASSERT_OK(SyncWait(layer->Truncate(2 * kMiB)));
    EXPECT_EQ(layer->size(), 2 * kMiB);
    ASSERT_OK(SyncWait(layer->Write(2 * kMiB - 4096, data)));
    ASSERT_OK(SyncWait(layer->Flush()));
  }
  ASSERT_OK_AND_ASSIGN(uint64_t qemu_size, VirtualSize(p.image));
  EXPECT_EQ(qemu_size, 2 * kMiB);
  ASSERT_OK(TruncateRaw(p.raw, 2 * kMiB));
  ASSERT_OK(WriteRaw(p.raw, 2 * kMiB - 4096, data));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

// --- Refcount growth through the write path ----------------------------------------------------------

// 512-byte clusters with 64-bit refcounts: a refcount block describes 64
// clusters and the one-cluster refcount table 4096 clusters (2 MiB of
// file). Writing 3 MiB needs new refcount blocks and then a new refcount
// table; the old table's cluster becomes free while the writes go on.
TEST(WritePathTest, RefcountTableGrowthKeepsEveryWrite) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-reftable"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=512", "refcount_bits=64"}, {}));
  ASSERT_OK_AND_ASSIGN(Bytes before, ReadBytes(p.image));
  const Bytes data = Pattern(3 * kMiB, 15);
  {
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(p.image));
    for (uint64_t o = 0; o < data.size(); o += 64 * kKiB) {
      ASSERT_OK(SyncWait(layer->Write(o, std::span(data).subspan(o, 64 * kKiB))));
    }
    ASSERT_OK(SyncWait(layer->Flush()));
    const Bytes got = ReadLayer(*layer, 0, data.size());
    size_t bad = 0;
    while (bad < got.size() && got[bad] == data[bad]) ++bad;
    EXPECT_EQ(bad, got.size()) << "first wrong byte at guest offset " << bad;
  }
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(p.image));
  EXPECT_NE(Geom(after).refcount_table_offset, Geom(before).refcount_table_offset) << "the table grew";
  ASSERT_OK(WriteRaw(p.raw, 0, data));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

// --- Many dirty L2 slices ------------------------------------------------------------------------

// The child process of ManyDirtyL2SlicesBetweenFlushes: writes 4 KiB into
// 20 different L2 slices with a 16-slice L2 cache and no Flush in between,
// flushes, and checks the result with QEMU. Returns 0 if all is well.
int WriteManySlices(const std::string& image, const std::string& raw) {
  constexpr uint64_t kSliceSpan = 512 * k64K;  // 4 KiB of 8-byte entries
  absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer = OpenWritable(image, nullptr, nullptr, Writable(16 * 4096));
  if (!layer.ok()) {
    fprintf(stderr, "open: %s\n", layer.status().ToString().c_str());
    return 1;
  }
  for (uint32_t i = 0; i < 20; ++i) {
    const Bytes data = Pattern(4096, 100 + i);
    absl::Status s = SyncWait((*layer)->Write(i * kSliceSpan, data));
    if (!s.ok()) {
      fprintf(stderr, "write %u: %s\n", i, s.ToString().c_str());
      return 1;
    }
    if (!WriteRaw(raw, i * kSliceSpan, data).ok()) return 1;
  }
  absl::Status s = SyncWait((*layer)->Flush());
  if (!s.ok()) {
    fprintf(stderr, "flush: %s\n", s.ToString().c_str());
    return 1;
  }
  layer->reset();
  absl::StatusOr<CommandResult> cmp = RunCommand({"qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw});
  if (!cmp.ok() || !cmp->ok()) {
    fprintf(stderr, "qemu-img compare: %s\n", cmp.ok() ? cmp->stdout_text.c_str() : "");
    return 2;
  }
  absl::StatusOr<QemuCheckReport> check = QemuCheck(image);
  if (!check.ok() || check->corruptions || check->leaks || check->check_errors) {
    fprintf(stderr, "qemu-img check: %s\n", check.ok() ? check->output.c_str() : "");
    return 3;
  }
  return 0;
}

// With more dirty L2 slices than the L2 cache holds (dirty slices are
// never evicted), loading one more slice must still give that slice. Run
// in a child process, since the engine may crash.
TEST(WritePathTest, ManyDirtyL2SlicesBetweenFlushes) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-slices"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 1024 * kMiB, {"cluster_size=65536"}, {}));
  EXPECT_EXIT(
      {
        fflush(nullptr);
        _exit(WriteManySlices(p.image, p.raw));
      },
      ::testing::ExitedWithCode(0), "");
}

// --- Through the public API ---------------------------------------------------------------------------

TEST(WritePathTest, PublicImageApiWritesFlushesAndResizes) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-api"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=4096"},
                                        {"write -P 0x11 0 64k", "write -c -P 0x22 64k 64k"}));
  const Bytes a = Pattern(10000, 16), b = Pattern(300, 17);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image,
                         SyncWait(Image::Open(p.image, Writable())));
    ASSERT_OK(SyncWait(image->Write(60000, a)));
    ASSERT_OK(SyncWait(image->Truncate(8 * kMiB)));
    ASSERT_OK(SyncWait(image->Write(8 * kMiB - 300, b)));
    EXPECT_EQ(SyncWait(image->Write(8 * kMiB - 299, b)).code(), absl::StatusCode::kOutOfRange);
    ASSERT_OK(SyncWait(image->Flush()));
  }
  ASSERT_OK(WriteRaw(p.raw, 60000, a));
  ASSERT_OK(TruncateRaw(p.raw, 8 * kMiB));
  ASSERT_OK(WriteRaw(p.raw, 8 * kMiB - 300, b));
  ExpectCleanAndSameAsRaw(p.image, p.raw);
}

// --- Crash consistency ----------------------------------------------------------------------------------

// CrashRun and CrashChecker: crash_harness.h.

TEST(WritePathTest, CrashStatesOfAllocationCowL2L1AndRefcountGrowth) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-crash"));
  const std::string base = dir.Join("base.qcow2");
  // 512-byte clusters: an L2 table maps 32 KiB, the L1 cluster 2 MiB, a
  // 16-bit refcount block 128 KiB of file.
  ASSERT_OK(CreateImage(base, "qcow2", 1 * kMiB, {"cluster_size=512"}));
  ASSERT_OK(QemuIo(base, "qcow2", {"write -P 0x11 0 4k", "write -c -P 0x22 8k 1k"}));
  const std::string base_raw = dir.Join("base.raw");
  ASSERT_OK(ConvertToRaw(base, base_raw));
  ASSERT_OK_AND_ASSIGN(Bytes old_disk, ReadBytes(base_raw));
  ASSERT_OK_AND_ASSIGN(Bytes initial, ReadBytes(base));
  ASSERT_TRUE(L2At(initial, 8192).descriptor & kCompressed);
  const uint64_t refcount_table = Geom(initial).refcount_table_offset;

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, CrashRun::Start(initial));
  // 1. Allocating writes inside the existing L2 table.
  ASSERT_OK(run->Write(16 * kKiB, Pattern(512, 21)));
  ASSERT_OK(run->Write(20 * kKiB + 100, Pattern(700, 22)));
  ASSERT_OK(run->Flush());
  // 2. Copy-on-write over a compressed cluster.
  ASSERT_OK(run->Write(8192 + 50, Pattern(100, 23)));
  ASSERT_OK(run->Flush());
  // 3. New L2 tables.
  ASSERT_OK(run->Write(64 * kKiB + 512, Pattern(512, 24)));
  ASSERT_OK(run->Write(200 * kKiB, Pattern(1500, 25)));
  ASSERT_OK(run->Flush());
  // 4. L1 growth, and a write that needs the new L1 entries.
  ASSERT_OK(run->Truncate(4 * kMiB));
  ASSERT_OK(run->Write(4 * kMiB - 8192, Pattern(4096, 26)));
  ASSERT_OK(run->Flush());
  // 5. New refcount blocks: 160 KiB of data is more than a block covers.
  ASSERT_OK(run->Write(512 * kKiB, Pattern(160 * kKiB, 27)));
  ASSERT_OK(run->Flush());
  // Once more: the frees of the last Flush reach the disk.
  ASSERT_OK(run->Write(300 * kKiB, Pattern(512, 28)));
  ASSERT_OK(run->Flush());

  // The scenario did what it claims.
  const Bytes final_bytes = FinalContents(*run);
  const Geometry g = Geom(final_bytes);
  EXPECT_EQ(g.size, 4 * kMiB);
  EXPECT_GE(g.l1_size, 128u);
  EXPECT_EQ(g.refcount_table_offset, refcount_table);
  EXPECT_NE(GetBE(final_bytes, g.refcount_table_offset + 8, 8), 0u) << "a second refcount block";
  const std::string final_path = dir.Join("final.qcow2");
  ASSERT_OK(WriteBytes(final_path, final_bytes));
  ExpectQemuClean(final_path);

  CrashChecker checker(dir, *run, old_disk);
  checker.CheckAll(
      {.seed = seed, .random_subsets = SampleStates(6), .max_prefixes = SampleStates(8), .max_states = 0});
  // And on a filesystem whose discards leave the old bytes (fewer states).
  checker.CheckAll({.seed = seed + 1, .random_subsets = SampleStates(2), .max_prefixes = SampleStates(4),
                    .max_states = 0, .discard_zeroes = false});
  checker.Report("allocation, copy-on-write, L2, L1 and refcount growth");
}

// The refcount table growth under crashes: 512-byte clusters with 64-bit
// refcounts (the one-cluster table covers 2 MiB of file), 2.5 MiB written
// in 512 KiB steps, with a Flush after each, and right after the step in
// which the table grows a few more allocating writes before that Flush.
TEST(WritePathTest, CrashStatesOfRefcountTableGrowth) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("wp-crash-table"));
  const std::string base = dir.Join("base.qcow2");
  ASSERT_OK(CreateImage(base, "qcow2", 4 * kMiB, {"cluster_size=512", "refcount_bits=64"}));
  ASSERT_OK(QemuIo(base, "qcow2", {"write -P 0x11 0 4k"}));
  const std::string base_raw = dir.Join("base.raw");
  ASSERT_OK(ConvertToRaw(base, base_raw));
  ASSERT_OK_AND_ASSIGN(Bytes old_disk, ReadBytes(base_raw));
  ASSERT_OK_AND_ASSIGN(Bytes initial, ReadBytes(base));

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, CrashRun::Start(initial));
  const uint64_t table0 = Geom(initial).refcount_table_offset;
  bool grown = false;
  for (uint64_t o = 64 * kKiB; o < 64 * kKiB + 2560 * kKiB;) {
    ASSERT_OK(run->Write(o, Pattern(512 * kKiB, static_cast<uint32_t>(o >> 10))));
    o += 512 * kKiB;
    ASSERT_OK_AND_ASSIGN(Bytes now, run->contents());
    if (!grown && Geom(now).refcount_table_offset != table0) {
      // The table grew during this write: allocate some more before the
      // Flush, while the old table's clusters are free but not yet
      // discarded.
      grown = true;
      ASSERT_OK(run->Write(o, Pattern(16 * kKiB, 77)));
      o += 16 * kKiB;
    }
    ASSERT_OK(run->Flush());
  }
  EXPECT_TRUE(grown);
  ASSERT_OK(run->Flush());
  const Bytes final_bytes = FinalContents(*run);
  EXPECT_NE(Geom(final_bytes).refcount_table_offset, Geom(initial).refcount_table_offset) << "the table grew";
  const std::string final_path = dir.Join("final.qcow2");
  ASSERT_OK(WriteBytes(final_path, final_bytes));
  ExpectQemuClean(final_path);

  CrashChecker checker(dir, *run, old_disk);
  checker.CheckAll(
      {.seed = seed, .random_subsets = SampleStates(2), .max_prefixes = SampleStates(4), .max_states = 0});
  checker.Report("refcount table growth");
}

// --- The allocated-bytes count behind st_blocks ----------------------------------------------

// Polls AllocatedBytes() until it says `want` or a generous deadline passes.
uint64_t WaitForCount(Image& image, uint64_t want) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  uint64_t got = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    absl::StatusOr<uint64_t> count = SyncWait(image.AllocatedBytes());
    EXPECT_OK(count.status());
    if (!count.ok()) return 0;
    got = *count;
    if (got == want) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return got;
}

TEST(AllocatedBytesTest, SmallImageIsCountedAtOnce) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("count-sync"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 64 * kMiB, {}, {"write 0 1M", "write 10M 64k"}));
  ASSERT_OK_AND_ASSIGN(auto image, SyncWait(Image::Open(p.image, Writable())));
  ASSERT_OK_AND_ASSIGN(uint64_t count, SyncWait(image->AllocatedBytes()));
  EXPECT_EQ(count, kMiB + k64K);
  ASSERT_OK(SyncWait(image->Write(20 * kMiB, Pattern(4096, 1))));
  ASSERT_OK_AND_ASSIGN(count, SyncWait(image->AllocatedBytes()));
  EXPECT_EQ(count, kMiB + 2 * k64K) << "a change is counted by the next call";
}

TEST(AllocatedBytesTest, LargeImageIsCountedInTheBackground) {
  // sync_count_limit 0 makes this small image count as a large one.
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("count-background"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 64 * kMiB, {}, {"write 0 1M", "write 10M 64k"}));
  ImageOptions options = Writable();
  options.sync_count_limit = 0;
  ASSERT_OK_AND_ASSIGN(auto image, SyncWait(Image::Open(p.image, options)));
  // Before the first count: an estimate, never more than the disk.
  ASSERT_OK_AND_ASSIGN(uint64_t first, SyncWait(image->AllocatedBytes()));
  EXPECT_LE(first, 64 * kMiB);
  EXPECT_EQ(WaitForCount(*image, kMiB + k64K), kMiB + k64K);
  // Once counted, a change is in the count as soon as it is done.
  ASSERT_OK(SyncWait(image->Write(20 * kMiB, Pattern(4096, 1))));
  ASSERT_OK_AND_ASSIGN(uint64_t now, SyncWait(image->AllocatedBytes()));
  EXPECT_EQ(now, kMiB + 2 * k64K);
}

// An image on a block device (an LVM volume, here a loop device): fstat
// gives it no blocks, so the estimate until the count is made is its size,
// never the 0 that tools take for a file without data.
TEST(AllocatedBytesTest, AnImageOnABlockDeviceIsNeverEstimatedEmpty) {
  if (const std::string why = LoopUnavailableReason(); !why.empty()) GTEST_SKIP() << why;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("count-blockdev"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 64 * kMiB, {}, {"write 0 1M", "write 10M 64k"}));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<LoopDevice> loop, LoopDevice::Attach(p.image, /*read_only=*/false));
  struct stat st;
  ASSERT_EQ(stat(loop->device().c_str(), &st), 0) << strerror(errno);
  ASSERT_TRUE(S_ISBLK(st.st_mode));
  ASSERT_EQ(st.st_blocks, 0) << "the block device counts blocks: the test shows nothing";
  ASSERT_OK_AND_ASSIGN(Bytes file, ReadBytes(p.image));
  {
    ASSERT_OK_AND_ASSIGN(auto layer, OpenWritable(loop->device()));
    EXPECT_EQ(layer->HostFileBytes(), file.size());
  }
  ImageOptions options = Writable();
  options.sync_count_limit = 0;  // counted in the background
  ASSERT_OK_AND_ASSIGN(auto image, SyncWait(Image::Open(loop->device(), options)));
  ASSERT_OK_AND_ASSIGN(uint64_t first, SyncWait(image->AllocatedBytes()));
  EXPECT_GT(first, 0u);
  EXPECT_EQ(WaitForCount(*image, kMiB + k64K), kMiB + k64K);
  ASSERT_OK(SyncWait(image->Close()));
}

// Data bytes of the whole disk by a walk of Image::BlockStatus: what the
// count must always equal.
uint64_t WalkDataBytes(Image& image) {
  uint64_t total = 0;
  for (uint64_t offset = 0; offset < image.virtual_size();) {
    absl::StatusOr<Extent> e = SyncWait(image.BlockStatus(offset, image.virtual_size() - offset));
    EXPECT_OK(e.status());
    if (!e.ok()) return 0;
    if (e->kind == ExtentKind::kData) total += e->length;
    offset += e->length;
  }
  return total;
}

// The count is kept by the changes themselves (no walk after open): after
// every one of a random series of writes, zeroings, discards,
// preallocations and resizes, over a backing file, with standard and
// extended L2 entries, it equals a fresh walk of the disk.
TEST(AllocatedBytesTest, EveryChangeKeepsTheCountExact) {
  const uint64_t seed = TestSeed();
  for (const std::string l2 : {"extended_l2=off", "extended_l2=on"}) {
    SCOPED_TRACE(l2);
    std::mt19937_64 rng(seed);
    ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("count-kept"));
    const std::string base = dir.Join("base.qcow2");
    ASSERT_OK(CreateImage(base, "qcow2", 8 * kMiB, {"cluster_size=65536"}));
    ASSERT_OK(QemuIo(base, "qcow2", {"write -P 0x11 0 1M", "write -P 0x12 3M 100k", "write -z 5M 1M"}));
    const std::string image_path = dir.Join("top.qcow2");
    ASSERT_OK(CreateImage(image_path, "qcow2", 12 * kMiB,
                          {"cluster_size=65536", l2, "backing_file=" + base, "backing_fmt=qcow2"}));
    ASSERT_OK(QemuIo(image_path, "qcow2", {"write -c -P 0x21 2M 128k", "write -z 512k 64k"}));
    ASSERT_OK_AND_ASSIGN(auto image, SyncWait(Image::Open(image_path, Writable())));
    for (int step = 0; step < 60; ++step) {
      const uint64_t disk = image->virtual_size();
      const uint64_t offset = rng() % disk / 512 * 512;
      const uint64_t length = std::min<uint64_t>(disk - offset, 512 + rng() % (3 * k64K) / 512 * 512);
      const int op = static_cast<int>(rng() % 7);
      std::string what;
      absl::Status status;
      switch (op) {
        case 0:
        case 1:
          what = "write";
          status = SyncWait(image->Write(offset, Pattern(length, step)));
          break;
        case 2:
          what = "discard";
          status = SyncWait(image->Discard(offset, length));
          break;
        case 3:
          what = "write-zeroes";
          status = SyncWait(image->WriteZeroes(offset, length, /*may_unmap=*/false));
          break;
        case 4:
          what = "write-zeroes unmap";
          status = SyncWait(image->WriteZeroes(offset, length, /*may_unmap=*/true));
          break;
        case 5:
          what = "preallocate";
          status = SyncWait(image->Preallocate(offset, length));
          break;
        default: {
          // Grow by up to 1 MiB, or shrink to 3/4 (refused if data lies beyond).
          const uint64_t size = rng() % 2 ? disk + (rng() % 2048 + 1) * 512 : disk / 4 * 3 / 512 * 512;
          what = "resize to " + std::to_string(size);
          status = SyncWait(image->Truncate(size));
          if (absl::IsFailedPrecondition(status)) status = absl::OkStatus();
          break;
        }
      }
      ASSERT_OK(status) << what << " at " << offset << ", " << length << " bytes";
      ASSERT_OK_AND_ASSIGN(uint64_t counted, SyncWait(image->AllocatedBytes()));
      ASSERT_EQ(counted, WalkDataBytes(*image)) << "after step " << step << ": " << what << " at " << offset
                                                << ", " << length << " bytes";
    }
    // The walk is the engine's own BlockStatus: QEMU's map of the result
    // must count the same data.
    ASSERT_OK_AND_ASSIGN(uint64_t counted, SyncWait(image->AllocatedBytes()));
    ASSERT_OK(SyncWait(image->Close()));
    image.reset();  // and its locks
    ASSERT_OK_AND_ASSIGN(std::vector<MapExtent> map, MapImage(image_path));
    uint64_t qemu_data = 0;
    for (const MapExtent& e : map) {
      if (e.data) qemu_data += e.length;
    }
    EXPECT_EQ(counted, qemu_data);
  }
}

// A background count runs while the image is being written: changes behind
// the walk are counted by the changes, those ahead of it by the walk, and
// none twice.
TEST(AllocatedBytesTest, BackgroundCountWithWritesDuringTheWalk) {
  const uint64_t seed = TestSeed();
  std::mt19937_64 rng(seed);
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("count-during-walk"));
  // 2 GiB with data in every 32 MiB (one per L2 slice): 64 steps of the walk.
  std::vector<std::string> setup;
  for (uint64_t o = 0; o < 2048 * kMiB; o += 32 * kMiB) setup.push_back("write -P 0x31 " + std::to_string(o) + " 64k");
  const std::string path = dir.Join("big.qcow2");
  ASSERT_OK(CreateImage(path, "qcow2", 2048 * kMiB, {"cluster_size=65536"}));
  ASSERT_OK(QemuIo(path, "qcow2", setup));
  ImageOptions options = Writable();
  options.sync_count_limit = 0;
  ASSERT_OK_AND_ASSIGN(auto image, SyncWait(Image::Open(path, options)));
  for (int i = 0; i < 200; ++i) {
    const uint64_t offset = rng() % (2048 * kMiB) / 4096 * 4096;
    if (i % 3 == 0) {
      ASSERT_OK(SyncWait(image->Discard(offset & ~(k64K - 1), k64K)));
    } else {
      ASSERT_OK(SyncWait(image->Write(offset, Pattern(4096, i))));
    }
  }
  const uint64_t want = WalkDataBytes(*image);
  EXPECT_EQ(WaitForCount(*image, want), want);
  ASSERT_OK(SyncWait(image->Flush()));
}

// --- Edges of the write path --------------------------------------------------------------

// Damage in a read-only backing file is that file's: a copy-on-write that
// meets it fails, but the overlay is not marked corrupt and takes other
// writes.
TEST(WritePathTest, BackingFileDamageDoesNotMarkTheOverlayCorrupt) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("backing-damage"));
  const std::string base = dir.Join("base.qcow2");
  ASSERT_OK(CreateImage(base, "qcow2", 4 * kMiB, {"cluster_size=65536"}));
  ASSERT_OK(QemuIo(base, "qcow2", {"write -P 0x11 0 64k"}));
  // Cluster 0's L2 entry now points 1 GiB past the end of the base file.
  ASSERT_OK_AND_ASSIGN(Bytes b, ReadBytes(base));
  const uint64_t entry_at = L1Entry(b, 0) & kHostMask;
  ASSERT_NE(entry_at, 0u);
  Bytes bad(8);
  PutBE64(bad, 0, kCopied | (uint64_t{1} << 30));
  ASSERT_OK(WriteRaw(base, entry_at, bad));
  const std::string top = dir.Join("top.qcow2");
  ASSERT_OK(CreateImage(top, "qcow2", 4 * kMiB, {"cluster_size=65536", "backing_file=" + base, "backing_fmt=qcow2"}));
  {
    ASSERT_OK_AND_ASSIGN(auto image, SyncWait(Image::Open(top, Writable())));
    absl::Status cow = SyncWait(image->Write(4096, Pattern(512, 1)));
    EXPECT_TRUE(absl::IsDataLoss(cow)) << cow;
    EXPECT_TRUE(absl::StrContains(cow.message(), "base.qcow2")) << cow;
    EXPECT_OK(SyncWait(image->Write(kMiB, Pattern(4096, 2)))) << "the overlay refuses writes after damage below it";
    ASSERT_OK(SyncWait(image->Flush()));
  }
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(top));
  EXPECT_EQ(GetBE(after, 72, 8) & 2, 0u) << "the overlay's corrupt bit was set";
  ExpectQemuClean(top);
}

// Autoclear bits (spec: "autoclear_features"): the bitmaps bit without a
// bitmaps extension is cleared at the first write like any bit we do not
// maintain (QEMU would otherwise look for a bitmap directory and refuse to
// write), and the raw external data bit without an external data file
// makes the image unusable, as QEMU says.
TEST(WritePathTest, AutoclearBitsAsTheSpecMeansThem) {
  constexpr uint64_t kAutoclearOffset = 88;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("autoclear"));
  ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536"}, {"write -P 0x11 0 64k"}));
  Bytes bit(8);
  PutBE64(bit, 0, 1);  // bit 0: bitmaps
  ASSERT_OK(WriteRaw(p.image, kAutoclearOffset, bit));
  {
    ASSERT_OK_AND_ASSIGN(auto image, SyncWait(Image::Open(p.image, Writable())));
    ASSERT_OK(SyncWait(image->Write(kMiB, Pattern(4096, 3))));
    ASSERT_OK(SyncWait(image->Flush()));
  }
  ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(p.image));
  EXPECT_EQ(GetBE(after, kAutoclearOffset, 8), 0u) << "the bitmaps bit stayed without bitmaps";
  ExpectQemuClean(p.image);
  EXPECT_OK(QemuIo(p.image, "qcow2", {"write -P 0x22 2M 64k"})) << "QEMU refuses to write the image";

  PutBE64(bit, 0, 2);  // bit 1: raw external data, but no data file
  ASSERT_OK(WriteRaw(p.image, kAutoclearOffset, bit));
  for (bool read_only : {true, false}) {
    ImageOptions options = Writable();
    options.read_only = read_only;
    absl::StatusOr<std::unique_ptr<Image>> refused = SyncWait(Image::Open(p.image, options));
    EXPECT_FALSE(refused.ok());
    EXPECT_TRUE(absl::StrContains(refused.status().message(), "no external data file")) << refused.status();
  }
}

// detect_zeroes: zeros that arrive in pieces none of which covers a cluster
// (a buffered write from an unaligned buffer reaches the view as 4048- and
// 48-byte requests) end as a single aligned zero write would leave them:
// zero clusters, freed with unmap, keeping their host cluster without.
TEST(WritePathTest, ZerosWrittenInPiecesMakeZeroClusters) {
  for (DetectZeroes mode : {DetectZeroes::kUnmap, DetectZeroes::kOn}) {
    SCOPED_TRACE(mode == DetectZeroes::kUnmap ? "unmap" : "on");
    ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-pieces"));
    ASSERT_OK_AND_ASSIGN(Pair p, MakePair(dir, 4 * kMiB, {"cluster_size=65536"},
                                          {"write -P 0x11 0 256k", "write -z 0 128k"}));
    // qemu-io -z made zero clusters; the engine writes data there first.
    ImageOptions options = Writable();
    options.detect_zeroes = mode;
    {
      ASSERT_OK_AND_ASSIGN(auto image, SyncWait(Image::Open(p.image, Writable())));
      ASSERT_OK(SyncWait(image->Write(0, Pattern(2 * k64K, 7))));
      ASSERT_OK(SyncWait(image->Flush()));
    }
    ASSERT_OK_AND_ASSIGN(Bytes with_data, ReadBytes(p.image));
    const uint64_t host0 = L2At(with_data, 0).descriptor & kHostMask;
    ASSERT_NE(host0, 0u);
    {
      ASSERT_OK_AND_ASSIGN(auto image, SyncWait(Image::Open(p.image, options)));
      const Bytes zeros(4048, 0);
      for (uint64_t offset = 0; offset < 2 * k64K;) {
        const uint64_t n = std::min<uint64_t>(offset % 4096 == 0 ? 4048 : 48, 2 * k64K - offset);
        ASSERT_OK(SyncWait(image->Write(offset, std::span<const uint8_t>(zeros).first(n))));
        offset += n;
      }
      ASSERT_OK(SyncWait(image->Flush()));
    }
    ASSERT_OK_AND_ASSIGN(Bytes after, ReadBytes(p.image));
    for (uint64_t cluster : {uint64_t{0}, k64K}) {
      const L2Entry e = L2At(after, cluster);
      EXPECT_TRUE(e.descriptor & 1) << "cluster " << cluster << " is not a zero cluster: " << e.descriptor;
      if (mode == DetectZeroes::kUnmap) {
        EXPECT_EQ(e.descriptor & kHostMask, 0u) << "cluster " << cluster << " kept its host cluster";
      } else {
        EXPECT_NE(e.descriptor & kHostMask, 0u) << "cluster " << cluster << " lost its host cluster";
      }
    }
    if (mode == DetectZeroes::kUnmap) {
      EXPECT_EQ(UsedClusters(after) + 2, UsedClusters(with_data)) << "the two host clusters were not freed";
    }
    ASSERT_OK(QemuIo(p.raw, "raw", {"write -z 0 128k"}));
    ExpectCleanAndSameAsRaw(p.image, p.raw);
  }
}

}  // namespace
}  // namespace qcow2fuse::test
