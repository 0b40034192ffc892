// The qcow2 read path (Qcow2Layer) over small images built byte by byte.

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "data/codec.h"
#include "data/qcow2_layer.h"
#include "data/raw_layer.h"
#include "format/header.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "qcow2_builder.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t k4K = 4096;
constexpr uint64_t k64K = 65536;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kCopied = kOflagCopied;
constexpr uint64_t kZero = kOflagZero;
constexpr uint32_t kSub = 2048;  // subcluster of a 64 KiB extended-L2 cluster

// Compresses well even with deflate's 4 KiB window, and no two 16-byte runs
// in a 4 KiB stretch are equal, so a misplaced partial read shows.
Bytes Compressible(size_t n, uint8_t seed) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>((i / 16) * 13 + seed);
  return b;
}

Bytes Slice(const Bytes& b, uint64_t offset, uint64_t length) {
  return Bytes(b.begin() + offset, b.begin() + offset + length);
}

std::unique_ptr<Layer> RawBacking(Bytes contents) {
  return NewRawLayer(NewMemFile("base.raw", std::move(contents)));
}

// Reads `length` bytes at `offset`, or fails the test.
Bytes Read(Layer& layer, uint64_t offset, uint64_t length) {
  Bytes out(length, 0xaa);
  absl::Status status = SyncWait(layer.Read(offset, out));
  EXPECT_TRUE(status.ok()) << status;
  return out;
}

absl::Status ReadStatus(Layer& layer, uint64_t offset, uint64_t length) {
  Bytes out(length);
  return SyncWait(layer.Read(offset, out));
}

Qcow2Layer::Mapping Map(Qcow2Layer& layer, uint64_t offset, uint64_t max_length) {
  absl::StatusOr<Qcow2Layer::Mapping> m = SyncWait(layer.Map(offset, max_length));
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *m : Qcow2Layer::Mapping{SubclusterType::kInvalid, 0, 0, {}};
}

// BlockStatus() of the run at `offset`, looking as far as the end of the disk.
Extent Status(Layer& layer, uint64_t offset) {
  absl::StatusOr<Extent> e = SyncWait(layer.BlockStatus(offset, layer.size() - offset));
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? *e : Extent{ExtentKind::kData, 0};
}

// Passes if `status` is DataLoss and its message contains every one of `parts`.
::testing::AssertionResult IsDataLoss(const absl::Status& status,
                                      std::initializer_list<std::string> parts) {
  if (status.code() != absl::StatusCode::kDataLoss) {
    return ::testing::AssertionFailure() << "want DataLoss, got " << status;
  }
  const std::string message(status.message());
  for (const std::string& part : parts) {
    if (!absl::StrContains(message, part)) {
      return ::testing::AssertionFailure() << "\"" << message << "\" lacks \"" << part << "\"";
    }
  }
  return ::testing::AssertionSuccess();
}

// --- Plain data, zero and unallocated clusters ----------------------------

TEST(Qcow2LayerTest, OpenDecodesGeometry) {
  Qcow2Builder b({.cluster_bits = 16, .size = 64 * kMiB});
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(layer->size(), 64 * kMiB);
  EXPECT_EQ(layer->cluster_size(), k64K);
  EXPECT_EQ(layer->header().l1_size, 1u);
}

TEST(Qcow2LayerTest, ReadsDataClusters) {
  Qcow2Builder b({.cluster_bits = 16});
  const Bytes first = Pattern(k64K, 1);
  const Bytes third = Pattern(k64K, 3);
  b.AddData(0, first);
  b.AddData(2 * k64K, third);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, 0, k64K), first);
  EXPECT_EQ(Read(*layer, 2 * k64K, k64K), third);
}

TEST(Qcow2LayerTest, ReadsPartOfDataCluster) {
  Qcow2Builder b({.cluster_bits = 16});
  const Bytes data = Pattern(k64K, 1);
  b.AddData(k64K, data);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, k64K + 1000, 3001), Slice(data, 1000, 3001));
  EXPECT_EQ(Read(*layer, 2 * k64K - 1, 1), Slice(data, k64K - 1, 1));
}

TEST(Qcow2LayerTest, Reads4KiBClusters) {
  Qcow2Builder b({.cluster_bits = 12, .size = 8 * kMiB});
  const Bytes a = Pattern(k4K, 1);
  const Bytes c = Pattern(k4K, 2);
  b.AddData(5 * k4K, a);
  b.AddData(6 * k4K, c);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Bytes want = a;
  want.insert(want.end(), c.begin(), c.end());
  EXPECT_EQ(Read(*layer, 5 * k4K, 2 * k4K), want);
}

TEST(Qcow2LayerTest, UnallocatedReadsZerosWithoutBacking) {
  Qcow2Builder b({.cluster_bits = 16});
  b.AddData(0, Pattern(k64K, 1));  // so that an L2 table exists
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, k64K, k64K), Bytes(k64K, 0));
}

// L1 entry 0: the whole L2 table is unallocated.
TEST(Qcow2LayerTest, UnallocatedL2TableReadsZerosWithoutBacking) {
  Qcow2Builder b({.cluster_bits = 12, .size = 8 * kMiB});
  b.AddData(0, Pattern(k4K, 1));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, 4 * kMiB + 100, 3 * k4K), Bytes(3 * k4K, 0));
}

TEST(Qcow2LayerTest, UnallocatedReadsBacking) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  b.AddData(0, Pattern(k64K, 1));
  const Bytes base = Pattern(4 * kMiB, 9);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes(), RawBacking(base)));
  EXPECT_EQ(Read(*layer, 3 * k64K + 17, k64K), Slice(base, 3 * k64K + 17, k64K));
}

TEST(Qcow2LayerTest, UnallocatedL2TableReadsBacking) {
  Qcow2Builder b({.cluster_bits = 12, .size = 8 * kMiB});
  b.AddData(0, Pattern(k4K, 1));
  const Bytes base = Pattern(8 * kMiB, 9);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes(), RawBacking(base)));
  EXPECT_EQ(Read(*layer, 4 * kMiB + 100, 3 * k4K), Slice(base, 4 * kMiB + 100, 3 * k4K));
}

TEST(Qcow2LayerTest, DataClusterHidesBacking) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes data = Pattern(k64K, 1);
  b.AddData(k64K, data);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer,
                       OpenQcow2(b.bytes(), RawBacking(Pattern(4 * kMiB, 9))));
  EXPECT_EQ(Read(*layer, k64K, k64K), data);
}

// A zero cluster reads zeros; it does not fall through to the backing file.
TEST(Qcow2LayerTest, ZeroPlainReadsZerosNotBacking) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  b.SetL2Entry(k64K, kZero);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer,
                       OpenQcow2(b.bytes(), RawBacking(Pattern(4 * kMiB, 9))));
  EXPECT_EQ(Read(*layer, k64K, k64K), Bytes(k64K, 0));
}

// The host cluster of a zero cluster is preallocation only: its bytes are
// not the guest's.
TEST(Qcow2LayerTest, ZeroAllocReadsZerosNotHostData) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const uint64_t host = b.AddData(k64K, Pattern(k64K, 1));
  b.SetL2Entry(k64K, kCopied | host | kZero);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer,
                       OpenQcow2(b.bytes(), RawBacking(Pattern(4 * kMiB, 9))));
  EXPECT_EQ(Read(*layer, k64K, k64K), Bytes(k64K, 0));
}

// Clusters 0..3: data, zero, unallocated (backing), data.
TEST(Qcow2LayerTest, ReadSpansClusterTypes) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes c0 = Pattern(k64K, 1);
  const Bytes c3 = Pattern(k64K, 4);
  const Bytes base = Pattern(4 * kMiB, 9);
  b.AddData(0, c0);
  b.SetL2Entry(k64K, kZero);
  b.AddData(3 * k64K, c3);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes(), RawBacking(base)));
  Bytes want = c0;
  want.resize(2 * k64K, 0);
  want.insert(want.end(), base.begin() + 2 * k64K, base.begin() + 3 * k64K);
  want.insert(want.end(), c3.begin(), c3.end());
  EXPECT_EQ(Read(*layer, 100, 4 * k64K - 200), Slice(want, 100, 4 * k64K - 200));
}

// With 64 KiB clusters a 4 KiB L2 slice maps 512 clusters, 32 MiB.
TEST(Qcow2LayerTest, ReadSpansL2Slices) {
  Qcow2Builder b({.cluster_bits = 16, .size = 64 * kMiB});
  const Bytes before = Pattern(k64K, 1);
  const Bytes after = Pattern(k64K, 2);
  b.AddData(32 * kMiB - k64K, before);
  b.AddData(32 * kMiB, after);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Bytes want = Slice(before, k64K - 300, 300);
  want.insert(want.end(), after.begin(), after.begin() + 500);
  EXPECT_EQ(Read(*layer, 32 * kMiB - 300, 800), want);
}

// With 4 KiB clusters one L2 table (one L1 entry) maps 2 MiB.
TEST(Qcow2LayerTest, ReadSpansL2Tables) {
  Qcow2Builder b({.cluster_bits = 12, .size = 8 * kMiB});
  const Bytes before = Pattern(k4K, 1);
  const Bytes after = Pattern(k4K, 2);
  b.AddData(2 * kMiB - k4K, before);
  b.AddData(2 * kMiB, after);
  ASSERT_NE(b.L2TableFor(2 * kMiB - k4K), b.L2TableFor(2 * kMiB));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Bytes want = before;
  want.insert(want.end(), after.begin(), after.end());
  EXPECT_EQ(Read(*layer, 2 * kMiB - k4K, 2 * k4K), want);
}

// Past the end of a shorter backing file the disk reads as zeros.
TEST(Qcow2LayerTest, BackingShorterThanImage) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes base = Pattern(k64K + 1000, 9);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes(), RawBacking(base)));
  Bytes want = base;
  want.resize(3 * k64K, 0);
  EXPECT_EQ(Read(*layer, 0, 3 * k64K), want);
  EXPECT_EQ(Read(*layer, k64K + 500, 1000), Slice(want, k64K + 500, 1000));
  EXPECT_EQ(Read(*layer, 2 * kMiB, k64K), Bytes(k64K, 0));
}

// QEMU may leave the image's last cluster short; the missing tail reads as zeros.
TEST(Qcow2LayerTest, ShortLastDataClusterReadsZeroTail) {
  Qcow2Builder b({.cluster_bits = 16});
  const Bytes data = Pattern(k64K, 1);
  const uint64_t host = b.AddData(0, data);
  ASSERT_EQ(b.bytes().size(), host + k64K);
  b.bytes().resize(host + 1000);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Bytes want = Slice(data, 0, 1000);
  want.resize(k64K, 0);
  EXPECT_EQ(Read(*layer, 0, k64K), want);
}

// Host offset 0 is a data offset in an external data file (COPIED set).
TEST(Qcow2LayerTest, ExternalDataFileHostOffsetZero) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  PutBE64(b.bytes(), kOffIncompatibleFeatures, kIncompatDataFile);
  b.SetL2Entry(0, kCopied);
  b.SetL2Entry(k64K, kCopied | (8 * k64K));
  const Bytes data = Pattern(16 * k64K, 5);
  ASSERT_OK_AND_ASSIGN(Header header, DecodeHeader(b.bytes(), b.bytes().size()));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer,
                       SyncWait(Qcow2Layer::Open(NewMemFile("test.qcow2", b.bytes()), header,
                                                 NewMemFile("data.raw", data), nullptr,
                                                 ImageOptions{})));
  EXPECT_EQ(Read(*layer, 0, k64K), Slice(data, 0, k64K));
  EXPECT_EQ(Read(*layer, k64K, k64K), Slice(data, 8 * k64K, k64K));
  EXPECT_EQ(Read(*layer, 2 * k64K, k64K), Bytes(k64K, 0));
}

// --- Extended L2 entries --------------------------------------------------

uint64_t AllocBits(uint32_t first, uint32_t count) {
  return ((count == 32 ? ~0ull : (1ull << count) - 1) << first) & 0xffffffffull;
}
uint64_t ZeroBits(uint32_t first, uint32_t count) { return AllocBits(first, count) << 32; }

// Subclusters 0-3 data, 4-7 zero, 8-15 unmarked (backing), 16-31 data.
TEST(Qcow2LayerTest, ExtendedL2SubclusterMix) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB, .extended_l2 = true});
  const Bytes host_data = Pattern(k64K, 1);
  const Bytes base = Pattern(4 * kMiB, 9);
  const uint64_t host = b.AddData(k64K, host_data);
  b.SetL2Entry(k64K, kCopied | host, AllocBits(0, 4) | ZeroBits(4, 4) | AllocBits(16, 16));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes(), RawBacking(base)));
  Bytes want = host_data;
  std::fill(want.begin() + 4 * kSub, want.begin() + 8 * kSub, 0);
  std::copy(base.begin() + k64K + 8 * kSub, base.begin() + k64K + 16 * kSub, want.begin() + 8 * kSub);
  EXPECT_EQ(Read(*layer, k64K, k64K), want);
  EXPECT_EQ(Read(*layer, k64K + 4 * kSub - 10, 20), Slice(want, 4 * kSub - 10, 20));
}

// Without a host cluster, zero subclusters read zeros and unmarked ones
// read the backing file.
TEST(Qcow2LayerTest, ExtendedL2WithoutHostCluster) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB, .extended_l2 = true});
  const Bytes base = Pattern(4 * kMiB, 9);
  b.SetL2Entry(0, 0, ZeroBits(0, 16));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes(), RawBacking(base)));
  Bytes want(16 * kSub, 0);
  want.insert(want.end(), base.begin() + 16 * kSub, base.begin() + k64K);
  EXPECT_EQ(Read(*layer, 0, k64K), want);
}

TEST(Qcow2LayerTest, ExtendedL2MapSplitsAtSubclusterTypes) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB, .extended_l2 = true});
  const uint64_t host = b.AddData(0, Pattern(k64K, 1));
  b.SetL2Entry(0, kCopied | host, AllocBits(0, 4) | ZeroBits(4, 4) | AllocBits(16, 16));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));

  Qcow2Layer::Mapping m = Map(*layer, 100, k64K);
  EXPECT_EQ(m.type, SubclusterType::kNormal);
  EXPECT_EQ(m.length, 4 * kSub - 100);
  EXPECT_EQ(m.host_offset, host + 100);
  m = Map(*layer, 4 * kSub, k64K);
  EXPECT_EQ(m.type, SubclusterType::kZeroAlloc);
  EXPECT_EQ(m.length, 4 * kSub);
  m = Map(*layer, 8 * kSub, k64K);
  EXPECT_EQ(m.type, SubclusterType::kUnallocatedAlloc);
  EXPECT_EQ(m.length, 8 * kSub);
  m = Map(*layer, 16 * kSub, k64K);
  EXPECT_EQ(m.type, SubclusterType::kNormal);
  EXPECT_EQ(m.length, 16 * kSub);
  EXPECT_EQ(m.host_offset, host + 16 * kSub);
}

TEST(Qcow2LayerTest, ExtendedL2FullyAllocatedClustersCoalesce) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB, .extended_l2 = true});
  const uint64_t host = b.AddData(0, Pattern(k64K, 1));
  ASSERT_EQ(b.AddData(k64K, Pattern(k64K, 2)), host + k64K);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Qcow2Layer::Mapping m = Map(*layer, 0, 4 * k64K);
  EXPECT_EQ(m.type, SubclusterType::kNormal);
  EXPECT_EQ(m.length, 2 * k64K);
  EXPECT_EQ(m.host_offset, host);
}

// --- Compressed clusters --------------------------------------------------

TEST(Qcow2LayerTest, ReadsCompressedCluster) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes data = Compressible(k64K, 1);
  const uint64_t host = b.AllocateCluster();
  ASSERT_LT(b.AddCompressed(k64K, data, host), k64K / 4);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, k64K, k64K), data);
}

TEST(Qcow2LayerTest, ReadsPartOfCompressedCluster) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes data = Compressible(k64K, 1);
  b.AddCompressed(k64K, data, b.AllocateCluster());
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, k64K + 5000, 7001), Slice(data, 5000, 7001));
  EXPECT_EQ(Read(*layer, 2 * k64K - 3, 3), Slice(data, k64K - 3, 3));
}

// Compressed clusters start at any byte and share 512-byte sectors, so each
// one's sector range runs into the next one's bytes.
TEST(Qcow2LayerTest, CompressedClustersShareSectors) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes first = Compressible(k64K, 1);
  const Bytes second = Compressible(k64K, 2);
  const Bytes third = Compressible(k64K, 3);
  const uint64_t host = b.AllocateCluster() + 100;
  const uint64_t first_size = b.AddCompressed(0, first, host);
  const uint64_t second_size = b.AddCompressed(k64K, second, host + first_size);
  b.AddCompressed(2 * k64K, third, host + first_size + second_size);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, 2 * k64K, k64K), third);
  EXPECT_EQ(Read(*layer, 0, k64K), first);
  EXPECT_EQ(Read(*layer, k64K, k64K), second);
}

TEST(Qcow2LayerTest, CompressedClusterStraddlesHostClusters) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes data = Compressible(k64K, 1);
  b.AllocateCluster();
  const uint64_t boundary = b.AllocateCluster();
  b.AddCompressed(0, data, boundary - 50);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, 0, k64K), data);
}

// The descriptor's last sector runs past the end of the file.
TEST(Qcow2LayerTest, CompressedClusterAtEndOfFile) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes data = Compressible(k64K, 1);
  b.L2TableFor(0);
  const uint64_t host = b.bytes().size() + 3;
  const uint64_t size = b.AddCompressed(0, data, host);
  ASSERT_EQ(b.bytes().size(), host + size);
  ASSERT_NE(b.bytes().size() % 512, 0u);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, 0, k64K), data);
}

TEST(Qcow2LayerTest, ReadsZstdCompressedCluster) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB, .compression = CompressionType::kZstd});
  const Bytes data = Compressible(k64K, 1);
  b.AddCompressed(k64K, data, b.AllocateCluster() + 7);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(layer->header().compression_type, kCompressionZstd);
  EXPECT_EQ(Read(*layer, k64K, k64K), data);
  EXPECT_EQ(Read(*layer, k64K + 4000, 100), Slice(data, 4000, 100));
}

// x = 62 - (12 - 8) = 58 for 4 KiB clusters.
TEST(Qcow2LayerTest, ReadsCompressed4KiBCluster) {
  Qcow2Builder b({.cluster_bits = 12, .size = 8 * kMiB});
  const Bytes data = Compressible(k4K, 1);
  b.AddCompressed(3 * k4K, data, b.AllocateCluster() + 600);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, 3 * k4K, k4K), data);
}

// x = 49 for 2 MiB clusters: 13 bits of sector count.
TEST(Qcow2LayerTest, ReadsCompressed2MiBCluster) {
  Qcow2Builder b({.cluster_bits = 21, .size = 8 * kMiB});
  // Half random, so that the sector count needs its high bits.
  Bytes data = Pattern(kMiB, 1);
  const Bytes rest = Compressible(kMiB, 2);
  data.insert(data.end(), rest.begin(), rest.end());
  const uint64_t host = b.AllocateCluster() + 512 * 3 + 1;
  const uint64_t size = b.AddCompressed(2 * kMiB, data, host);
  ASSERT_GT(size, kMiB);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*layer, 2 * kMiB, 2 * kMiB), data);
}

TEST(Qcow2LayerTest, ReadSpansDataCompressedAndZeroClusters) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes c0 = Pattern(k64K, 1);
  const Bytes c1 = Compressible(k64K, 2);
  b.AddData(0, c0);
  b.AddCompressed(k64K, c1, b.AllocateCluster() + 10);
  b.SetL2Entry(2 * k64K, kZero);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Bytes want = c0;
  want.insert(want.end(), c1.begin(), c1.end());
  want.resize(3 * k64K, 0);
  EXPECT_EQ(Read(*layer, 1, 3 * k64K - 2), Slice(want, 1, 3 * k64K - 2));
}

// --- Map() ----------------------------------------------------------------

TEST(Qcow2LayerTest, MapCoalescesContiguousHostClusters) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const uint64_t host = b.AddData(0, Pattern(k64K, 1));
  ASSERT_EQ(b.AddData(k64K, Pattern(k64K, 2)), host + k64K);
  ASSERT_EQ(b.AddData(2 * k64K, Pattern(k64K, 3)), host + 2 * k64K);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Qcow2Layer::Mapping m = Map(*layer, 0, 8 * k64K);
  EXPECT_EQ(m.type, SubclusterType::kNormal);
  EXPECT_EQ(m.length, 3 * k64K);
  EXPECT_EQ(m.host_offset, host);
  m = Map(*layer, k64K + 7, 8 * k64K);
  EXPECT_EQ(m.length, 2 * k64K - 7);
  EXPECT_EQ(m.host_offset, host + k64K + 7);
}

// Guest clusters 0 and 1 sit in host clusters h + 64 KiB and h.
TEST(Qcow2LayerTest, MapDoesNotCoalesceNonContiguousHostClusters) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const uint64_t host1 = b.AddData(k64K, Pattern(k64K, 2));
  const uint64_t host0 = b.AddData(0, Pattern(k64K, 1));
  ASSERT_EQ(host0, host1 + k64K);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Qcow2Layer::Mapping m = Map(*layer, 0, 2 * k64K);
  EXPECT_EQ(m.type, SubclusterType::kNormal);
  EXPECT_EQ(m.length, k64K);
  EXPECT_EQ(m.host_offset, host0);
}

TEST(Qcow2LayerTest, MapRespectsMaxLength) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  b.AddData(0, Pattern(k64K, 1));
  b.AddData(k64K, Pattern(k64K, 2));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_EQ(Map(*layer, 10, 100).length, 100u);
  EXPECT_EQ(Map(*layer, k64K - 10, k64K).length, k64K);
}

TEST(Qcow2LayerTest, MapCoalescesZeroClusters) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  for (uint64_t i = 0; i < 3; ++i) b.SetL2Entry(i * k64K, kZero);
  b.AddData(3 * k64K, Pattern(k64K, 1));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Qcow2Layer::Mapping m = Map(*layer, 0, 8 * k64K);
  EXPECT_EQ(m.type, SubclusterType::kZeroPlain);
  EXPECT_EQ(m.length, 3 * k64K);
}

// Zero plain and zero alloc are different types: runs do not mix them.
TEST(Qcow2LayerTest, MapSeparatesZeroPlainFromZeroAlloc) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  b.SetL2Entry(0, kZero);
  const uint64_t host = b.AllocateCluster();
  b.SetL2Entry(k64K, kCopied | host | kZero);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Qcow2Layer::Mapping m = Map(*layer, 0, 8 * k64K);
  EXPECT_EQ(m.type, SubclusterType::kZeroPlain);
  EXPECT_EQ(m.length, k64K);
  m = Map(*layer, k64K, 8 * k64K);
  EXPECT_EQ(m.type, SubclusterType::kZeroAlloc);
}

TEST(Qcow2LayerTest, MapStopsAtL2SliceBoundary) {
  Qcow2Builder b({.cluster_bits = 16, .size = 64 * kMiB});
  const uint64_t host = b.AddData(32 * kMiB - k64K, Pattern(k64K, 1));
  ASSERT_EQ(b.AddData(32 * kMiB, Pattern(k64K, 2)), host + k64K);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Qcow2Layer::Mapping m = Map(*layer, 32 * kMiB - k64K, 4 * k64K);
  EXPECT_EQ(m.type, SubclusterType::kNormal);
  EXPECT_EQ(m.length, k64K);
  m = Map(*layer, 32 * kMiB, 4 * k64K);
  EXPECT_EQ(m.length, k64K);
  EXPECT_EQ(m.host_offset, host + k64K);
}

// An unallocated L2 table is one run up to the end of what its L1 entry maps.
TEST(Qcow2LayerTest, MapUnallocatedL2Table) {
  Qcow2Builder b({.cluster_bits = 12, .size = 8 * kMiB});
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Qcow2Layer::Mapping m = Map(*layer, 4 * kMiB + 100, 4 * kMiB - 100);
  EXPECT_EQ(m.type, SubclusterType::kUnallocatedPlain);
  EXPECT_EQ(m.length, 2 * kMiB - 100);
}

// A compressed cluster is one unit of its own, even next to another.
TEST(Qcow2LayerTest, MapCompressedRunIsOneCluster) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const uint64_t host = b.AllocateCluster() + 100;
  const uint64_t size = b.AddCompressed(0, Compressible(k64K, 1), host);
  b.AddCompressed(k64K, Compressible(k64K, 2), host + size);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Qcow2Layer::Mapping m = Map(*layer, 10, 4 * k64K);
  EXPECT_EQ(m.type, SubclusterType::kCompressed);
  EXPECT_EQ(m.length, k64K - 10);
  EXPECT_EQ(m.compressed.host_offset, host);
  EXPECT_EQ(m.compressed.max_size, (host + size - 1) / 512 * 512 + 512 - host);
  m = Map(*layer, k64K, 4 * k64K);
  EXPECT_EQ(m.type, SubclusterType::kCompressed);
  EXPECT_EQ(m.length, k64K);
  EXPECT_EQ(m.compressed.host_offset, host + size);
}

// --- BlockStatus ----------------------------------------------------------

TEST(Qcow2LayerTest, BlockStatusKinds) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  b.AddData(0, Pattern(k64K, 1));
  b.SetL2Entry(k64K, kZero);
  b.SetL2Entry(2 * k64K, kCopied | b.AllocateCluster() | kZero);
  b.AddCompressed(3 * k64K, Compressible(k64K, 1), b.AllocateCluster());
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Extent e = Status(*layer, 0);
  EXPECT_EQ(e.kind, ExtentKind::kData);
  EXPECT_EQ(e.length, k64K);
  e = Status(*layer, k64K);
  EXPECT_EQ(e.kind, ExtentKind::kZero);
  EXPECT_EQ(e.length, k64K);
  e = Status(*layer, 2 * k64K);
  EXPECT_EQ(e.kind, ExtentKind::kZero);
  EXPECT_EQ(e.length, k64K);
  e = Status(*layer, 3 * k64K);
  EXPECT_EQ(e.kind, ExtentKind::kData);
  EXPECT_EQ(e.length, k64K);
  e = Status(*layer, 4 * k64K);
  EXPECT_EQ(e.kind, ExtentKind::kUnallocated);
  EXPECT_EQ(e.length, 4 * kMiB - 4 * k64K);
}

// Unallocated clusters take their kind from the backing file, up to its end.
TEST(Qcow2LayerTest, BlockStatusResolvedThroughBacking) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  b.SetL2Entry(0, kZero);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer,
                       OpenQcow2(b.bytes(), RawBacking(Pattern(2 * k64K + 512, 9))));
  Extent e = Status(*layer, 0);
  EXPECT_EQ(e.kind, ExtentKind::kZero);
  EXPECT_EQ(e.length, k64K);
  e = Status(*layer, k64K);
  EXPECT_EQ(e.kind, ExtentKind::kData);
  EXPECT_EQ(e.length, k64K + 512);
  e = Status(*layer, 2 * k64K + 512);
  EXPECT_EQ(e.kind, ExtentKind::kUnallocated);
  EXPECT_EQ(e.length, 4 * kMiB - 2 * k64K - 512);
}

TEST(Qcow2LayerTest, BlockStatusExtendedL2Subclusters) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB, .extended_l2 = true});
  const uint64_t host = b.AddData(0, Pattern(k64K, 1));
  b.SetL2Entry(0, kCopied | host, AllocBits(0, 2) | ZeroBits(2, 3));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Extent e = Status(*layer, 0);
  EXPECT_EQ(e.kind, ExtentKind::kData);
  EXPECT_EQ(e.length, 2 * kSub);
  e = Status(*layer, 2 * kSub);
  EXPECT_EQ(e.kind, ExtentKind::kZero);
  EXPECT_EQ(e.length, 3 * kSub);
  e = Status(*layer, 5 * kSub);
  EXPECT_EQ(e.kind, ExtentKind::kUnallocated);
}

// A walk across a long hole, as SEEK_DATA makes, reads the L2 slices it
// crosses together: one read of the file, not one per slice. A request
// within one slice reads only that slice.
TEST(Qcow2LayerTest, WalkAcrossAHoleReadsTheL2SlicesTogether) {
  // 64 KiB clusters: one L2 table of 16 slices of 4 KiB maps 512 MiB.
  Qcow2Builder b({.cluster_bits = 16, .size = 512 * kMiB});
  b.AddData(0, Pattern(k64K, 1));
  b.AddData(500 * kMiB, Pattern(k64K, 2));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  uint64_t pos = k64K;
  for (Extent e = Status(*layer, pos); e.kind != ExtentKind::kData && e.length > 0; e = Status(*layer, pos)) {
    pos += e.length;
  }
  EXPECT_EQ(pos, 500 * kMiB);
  EXPECT_EQ(layer->counters().l2_slice_reads, 16u);
  EXPECT_EQ(layer->counters().l2_reads, 1u);

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> fresh, OpenQcow2(b.bytes()));
  EXPECT_EQ(Read(*fresh, 300 * kMiB, kMiB), Bytes(kMiB, 0));  // slice 9 of 16
  EXPECT_EQ(fresh->counters().l2_slice_reads, 1u);
  // A walk from the next slice reads the rest of the table, once.
  EXPECT_EQ(Status(*fresh, 320 * kMiB).kind, ExtentKind::kUnallocated);
  EXPECT_EQ(Status(*fresh, 352 * kMiB).kind, ExtentKind::kUnallocated);
  EXPECT_EQ(fresh->counters().l2_slice_reads, 7u);
  EXPECT_EQ(fresh->counters().l2_reads, 2u);
}

// --- WillNeed() -----------------------------------------------------------

// A file in memory that notes each WillNeed: the host ranges the layer
// asked to be read ahead.
class AdviceFile final : public BlockFile {
 public:
  using Advised = std::vector<std::pair<uint64_t, uint64_t>>;
  AdviceFile(std::string name, Bytes contents, Advised* advised)
      : inner_(NewMemFile(std::move(name), std::move(contents))), advised_(advised) {}
  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override { return inner_->Read(offset, out); }
  uint64_t size() const override { return inner_->size(); }
  const std::string& name() const override { return inner_->name(); }
  void WillNeed(uint64_t offset, uint64_t length) override { advised_->emplace_back(offset, length); }

 private:
  std::unique_ptr<BlockFile> inner_;
  Advised* advised_;
};

// Data, a compressed cluster, zeros and a backing file's part, each read
// ahead where its bytes are; `max_data` bounds the bytes to read.
TEST(Qcow2LayerTest, WillNeedAdvisesTheHostBytesOfEachRun) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const uint64_t data = b.AddData(0, Pattern(k64K, 1));
  b.AddData(k64K, Pattern(k64K, 2));
  b.AddCompressed(2 * k64K, Compressible(k64K, 3), b.AllocateCluster() + 100);
  b.SetL2Entry(3 * k64K, kZero);
  // 4 and 5: unallocated, the backing file's. 6: data again.
  const uint64_t last = b.AddData(6 * k64K, Pattern(k64K, 6));
  AdviceFile::Advised image_advised, backing_advised;
  Bytes bytes = b.bytes();
  ASSERT_OK_AND_ASSIGN(Header header, DecodeHeader(bytes, bytes.size()));
  auto file = std::make_unique<AdviceFile>("test.qcow2", std::move(bytes), &image_advised);
  auto backing = NewRawLayer(std::make_unique<AdviceFile>("base.raw", Pattern(4 * kMiB, 9), &backing_advised));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer,
                       SyncWait(Qcow2Layer::Open(std::move(file), std::move(header), nullptr, std::move(backing),
                                                 ImageOptions{})));
  const Qcow2Layer::Mapping compressed = Map(*layer, 2 * k64K, k64K);
  ASSERT_EQ(compressed.type, SubclusterType::kCompressed);

  SyncWait(layer->WillNeed(100, 7 * k64K - 100, 4 * kMiB));
  EXPECT_EQ(image_advised, (AdviceFile::Advised{{data + 100, 2 * k64K - 100},
                                                {compressed.compressed.host_offset, compressed.compressed.max_size},
                                                {last, k64K}}));
  EXPECT_EQ(backing_advised, (AdviceFile::Advised{{4 * k64K, 2 * k64K}}));

  // At most 2 clusters' worth: the data run, then the compressed cluster
  // (which counts as the guest bytes it holds) ends it.
  image_advised.clear();
  backing_advised.clear();
  SyncWait(layer->WillNeed(k64K, 6 * k64K, 2 * k64K));
  EXPECT_EQ(image_advised, (AdviceFile::Advised{{data + k64K, k64K},
                                                {compressed.compressed.host_offset, compressed.compressed.max_size}}));
  EXPECT_TRUE(backing_advised.empty());
}

// --- Damaged metadata -----------------------------------------------------

// With 4 KiB clusters each L1 entry has its own 2 MiB, so one damaged L1
// entry leaves the others readable.
TEST(Qcow2LayerTest, L2TablePastEndOfFile) {
  Qcow2Builder b({.cluster_bits = 12, .size = 8 * kMiB});
  const Bytes good = Pattern(k4K, 1);
  b.AddData(2 * kMiB, good);
  b.SetL1Entry(0, kCopied | 0x100000);
  ASSERT_LT(b.bytes().size(), 0x100000u);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, 0, k4K),
                         {"test.qcow2", "L1 entry 0", "L2 table at 0x100000", "past the end of the file"}));
  EXPECT_EQ(Read(*layer, 2 * kMiB, k4K), good);
}

TEST(Qcow2LayerTest, UnalignedL2TableOffset) {
  Qcow2Builder b({.cluster_bits = 12, .size = 8 * kMiB});
  const Bytes good = Pattern(k4K, 1);
  b.AddData(2 * kMiB, good);
  const uint64_t l2 = b.L2TableFor(0) + 512;
  b.SetL1Entry(0, kCopied | l2);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, 0, k4K),
                         {"L1 entry 0", absl::StrFormat("L2 table at %#x", l2), "not cluster aligned"}));
  EXPECT_EQ(Read(*layer, 2 * kMiB, k4K), good);
}

TEST(Qcow2LayerTest, DataClusterPastEndOfFile) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes good = Pattern(k64K, 1);
  b.AddData(0, good);
  b.SetL2Entry(k64K, kCopied | (64 * k64K));
  ASSERT_LT(b.bytes().size(), 64 * k64K);
  const uint64_t l2 = b.L2TableFor(0);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, k64K, 100),
                         {absl::StrFormat("L2 table at %#x, entry 1 (guest offset 0x10000", l2),
                          "past the end of the file"}));
  EXPECT_EQ(Read(*layer, 0, k64K), good);
}

TEST(Qcow2LayerTest, UnalignedDataClusterOffset) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes good = Pattern(k64K, 1);
  const uint64_t host = b.AddData(0, good);
  b.SetL2Entry(2 * k64K, kCopied | (host + 512));
  const uint64_t l2 = b.L2TableFor(0);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, 2 * k64K, 100),
                         {absl::StrFormat("L2 table at %#x, entry 2", l2), "not cluster aligned"}));
  EXPECT_EQ(Read(*layer, 0, k64K), good);
}

// Subcluster 5 of cluster 0 is both allocated and zero. (Whether the rest of
// that cluster stays readable is left open: QEMU refuses the whole cluster.)
TEST(Qcow2LayerTest, InvalidExtendedL2Bitmap) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB, .extended_l2 = true});
  const uint64_t host = b.AddData(0, Pattern(k64K, 1));
  b.SetL2Entry(0, kCopied | host, AllocBits(0, 32) | ZeroBits(5, 1));
  const Bytes good = Pattern(k64K, 2);
  b.AddData(k64K, good);
  const uint64_t l2 = b.L2TableFor(0);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, 5 * kSub, 10),
                         {absl::StrFormat("L2 table at %#x, entry 0", l2), "guest offset 0x2800",
                          "both allocated and zero"}));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, 0, 2 * k64K), {"both allocated and zero"}));
  EXPECT_EQ(Read(*layer, k64K, k64K), good);
}

TEST(Qcow2LayerTest, ExtendedL2AllocatedWithoutHostCluster) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB, .extended_l2 = true});
  const Bytes good = Pattern(k64K, 1);
  b.AddData(0, good);
  b.SetL2Entry(k64K, 0, AllocBits(0, 1));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, k64K, 10), {"entry 1", "without a host cluster"}));
  EXPECT_EQ(Read(*layer, 0, k64K), good);
}

TEST(Qcow2LayerTest, CompressedDataPastEndOfFile) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes good = Pattern(k64K, 1);
  b.AddData(0, good);
  b.SetL2Entry(k64K, b.CompressedDescriptor(64 * k64K + 100, 1000));
  ASSERT_LT(b.bytes().size(), 64 * k64K);
  const uint64_t l2 = b.L2TableFor(0);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, k64K, 10),
                         {absl::StrFormat("L2 table at %#x, entry 1", l2),
                          "compressed data starts past the end of the file"}));
  EXPECT_EQ(Read(*layer, 0, k64K), good);
}

// 0xff bytes are no deflate stream: the first block claims the reserved type.
TEST(Qcow2LayerTest, GarbageCompressedData) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes good = Pattern(k64K, 1);
  b.AddData(0, good);
  const uint64_t host = b.AllocateCluster() + 200;
  b.Write(host, Bytes(2000, 0xff));
  b.SetL2Entry(k64K, b.CompressedDescriptor(host, 2000));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, k64K + 5, 10),
                         {"test.qcow2", absl::StrFormat("compressed cluster at host offset %#x", host)}));
  EXPECT_EQ(Read(*layer, 0, k64K), good);
  // Not cached as a success: the same read fails again.
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, k64K, k64K), {"compressed cluster"}));
}

// A read over several compressed clusters inflates them in parallel; the
// pieces must land in their places, and one bad cluster among them fails
// the read with its own error.
TEST(Qcow2LayerTest, ReadOverManyCompressedClustersInflatesEachIntoPlace) {
  constexpr int kClusters = 16;
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  // Cluster kClusters is plain data (which also places the L2 table), then
  // kClusters + 1 is garbage.
  const Bytes plain = Pattern(k64K, 7);
  b.AddData(kClusters * k64K, plain);
  // Each compresses to under a quarter cluster: four host clusters hold all.
  uint64_t host = b.AllocateCluster();
  for (int i = 1; i < 4; ++i) b.AllocateCluster();
  Bytes want;
  for (int i = 0; i < kClusters; ++i) {
    const Bytes data = Compressible(k64K, static_cast<uint8_t>(i + 1));
    const uint64_t size = b.AddCompressed(i * k64K, data, host);
    ASSERT_LT(size, k64K / 4);
    host += size;
    want.insert(want.end(), data.begin(), data.end());
  }
  want.insert(want.end(), plain.begin(), plain.end());
  const uint64_t garbage = b.AllocateCluster() + 100;
  b.Write(garbage, Bytes(2000, 0xff));
  b.SetL2Entry((kClusters + 1) * k64K, b.CompressedDescriptor(garbage, 2000));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  // Start and end inside clusters, so the first and last are partial.
  EXPECT_EQ(Read(*layer, 100, (kClusters + 1) * k64K - 200),
            Bytes(want.begin() + 100, want.begin() + (kClusters + 1) * k64K - 100));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, 0, (kClusters + 2) * k64K),
                         {absl::StrFormat("compressed cluster at host offset %#x", garbage)}));
}

TEST(Qcow2LayerTest, GarbageZstdCompressedData) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB, .compression = CompressionType::kZstd});
  const uint64_t host = b.AllocateCluster();
  b.Write(host, Pattern(2000, 3));
  b.SetL2Entry(0, b.CompressedDescriptor(host, 2000));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, 0, k64K),
                         {absl::StrFormat("compressed cluster at host offset %#x", host)}));
}

// A read that reaches a damaged cluster fails as a whole; the damage is
// not remembered, and the clusters around it stay readable.
TEST(Qcow2LayerTest, ErrorDoesNotPoisonOtherReads) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const Bytes c0 = Pattern(k64K, 1);
  const Bytes c2 = Pattern(k64K, 3);
  b.AddData(0, c0);
  b.SetL2Entry(k64K, kCopied | (64 * k64K));
  b.AddData(2 * k64K, c2);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, 0, 3 * k64K), {"entry 1"}));
  EXPECT_EQ(Read(*layer, 0, k64K), c0);
  EXPECT_EQ(Read(*layer, 2 * k64K, k64K), c2);
  EXPECT_TRUE(IsDataLoss(ReadStatus(*layer, k64K, k64K), {"entry 1"}));
  EXPECT_EQ(Read(*layer, 0, k64K), c0);
}

// A run of data ends before a damaged entry, so the good part maps.
TEST(Qcow2LayerTest, MapStopsBeforeDamagedEntry) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  const uint64_t host = b.AddData(0, Pattern(k64K, 1));
  b.SetL2Entry(k64K, kCopied | (host + k64K + 512));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  Qcow2Layer::Mapping m = Map(*layer, 0, 4 * k64K);
  EXPECT_EQ(m.type, SubclusterType::kNormal);
  EXPECT_EQ(m.length, k64K);
  absl::StatusOr<Qcow2Layer::Mapping> bad = SyncWait(layer->Map(k64K, k64K));
  EXPECT_TRUE(IsDataLoss(bad.status(), {"entry 1", "not cluster aligned"}));
}

TEST(Qcow2LayerTest, BlockStatusOnDamagedEntry) {
  Qcow2Builder b({.cluster_bits = 16, .size = 4 * kMiB});
  b.SetL2Entry(0, kCopied | (64 * k64K));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Qcow2Layer> layer, OpenQcow2(b.bytes()));
  absl::StatusOr<Extent> e = SyncWait(layer->BlockStatus(0, k64K));
  EXPECT_TRUE(IsDataLoss(e.status(), {"entry 0", "past the end of the file"}));
}

}  // namespace
}  // namespace qcow2fuse::test
