#include "format/l2_entry.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "format/spec.h"
#include "gtest/gtest.h"
#include "qcow2_builder.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kCopied = 1ull << 63;
constexpr uint64_t kCompressed = 1ull << 62;
constexpr uint64_t kZero = 1;
constexpr uint64_t kHost = 0x50000;  // cluster aligned for 64 KiB clusters

const L2Format kStandard{.extended_l2 = false, .external_data_file = false, .cluster_bits = 16};
const L2Format kExtended{.extended_l2 = true, .external_data_file = false, .cluster_bits = 16};
const L2Format kDataFile{.extended_l2 = false, .external_data_file = true, .cluster_bits = 16};

SubclusterType Standard(uint64_t descriptor) {
  return GetSubclusterType(L2Entry{descriptor, 0}, 0, kStandard);
}

SubclusterType Extended(uint64_t descriptor, uint64_t bitmap, uint32_t index) {
  return GetSubclusterType(L2Entry{descriptor, bitmap}, index, kExtended);
}

uint64_t AllocBit(uint32_t x) { return 1ull << x; }
uint64_t ZeroBit(uint32_t x) { return 1ull << (32 + x); }

// --- Decoding -------------------------------------------------------------

TEST(L2EntryTest, DecodeStandardEntryIgnoresFollowingBytes) {
  Bytes b;
  PutBE64(b, 0, 0x8000000000050000ull);
  PutBE64(b, 8, 0xffffffffffffffffull);
  L2Entry e = DecodeL2Entry(b.data(), kStandard);
  EXPECT_EQ(e.descriptor, 0x8000000000050000ull);
  EXPECT_EQ(e.bitmap, 0u);
}

TEST(L2EntryTest, DecodeExtendedEntryIsBigEndian) {
  Bytes b = {0x80, 0, 0, 0, 0, 0x05, 0, 0, 0x00, 0x00, 0x00, 0x01, 0x80, 0x00, 0x00, 0x02};
  L2Entry e = DecodeL2Entry(b.data(), kExtended);
  EXPECT_EQ(e.descriptor, 0x8000000000050000ull);
  EXPECT_EQ(e.bitmap, 0x0000000180000002ull);
}

TEST(L2EntryTest, FormatGeometry) {
  EXPECT_EQ(kStandard.entry_size(), 8u);
  EXPECT_EQ(kStandard.subclusters_per_cluster(), 1u);
  EXPECT_EQ(kStandard.subcluster_bits(), 16u);
  EXPECT_EQ(kExtended.entry_size(), 16u);
  EXPECT_EQ(kExtended.subclusters_per_cluster(), 32u);
  EXPECT_EQ(kExtended.subcluster_bits(), 11u);  // 2 KiB subclusters
}

// --- Standard entries -----------------------------------------------------

TEST(L2EntryTest, StandardUnallocated) {
  EXPECT_EQ(Standard(0), SubclusterType::kUnallocatedPlain);
}

TEST(L2EntryTest, StandardNormal) {
  EXPECT_EQ(Standard(kHost), SubclusterType::kNormal);
  EXPECT_EQ(L2EntryHostOffset(L2Entry{kHost | kCopied, 0}), kHost);
}

TEST(L2EntryTest, StandardZeroPlain) {
  EXPECT_EQ(Standard(kZero), SubclusterType::kZeroPlain);
}

// The offset of a zero cluster is preallocation only; it still reads zeros.
TEST(L2EntryTest, StandardZeroAlloc) {
  EXPECT_EQ(Standard(kHost | kZero), SubclusterType::kZeroAlloc);
  EXPECT_EQ(Standard(kCopied | kHost | kZero), SubclusterType::kZeroAlloc);
  EXPECT_EQ(L2EntryHostOffset(L2Entry{kCopied | kHost | kZero, 0}), kHost);
}

// Bit 0 of a compressed descriptor is an offset bit, not the zero flag.
TEST(L2EntryTest, CompressedBit0IsOffsetNotZeroFlag) {
  const uint64_t descriptor = kCompressed | 0x50001;
  EXPECT_EQ(Standard(descriptor), SubclusterType::kCompressed);
  EXPECT_EQ(DecodeCompressedDescriptor(descriptor, 16).host_offset, 0x50001u);
}

TEST(L2EntryTest, CompressedWithOffsetZero) {
  EXPECT_EQ(Standard(kCompressed), SubclusterType::kCompressed);
}

TEST(L2EntryTest, CopiedBitDoesNotChangeType) {
  EXPECT_EQ(Standard(kCopied), SubclusterType::kUnallocatedPlain);
  EXPECT_EQ(Standard(kCopied | kHost), SubclusterType::kNormal);
  EXPECT_EQ(Standard(kCopied | kZero), SubclusterType::kZeroPlain);
}

TEST(L2EntryTest, HostOffsetIgnoresFlagsAndReservedBits) {
  const L2Entry e{kCopied | 0x3f00000000000000ull | 0x00ffffffffffffffull, 0};
  EXPECT_EQ(L2EntryHostOffset(e), 0x00fffffffffffe00ull);
}

// Host offset 0 is the header in an image file, but a valid data offset
// in an external data file, where COPIED marks allocated clusters.
TEST(L2EntryTest, ExternalDataFileOffsetZeroWithCopiedIsNormal) {
  EXPECT_EQ(GetSubclusterType(L2Entry{kCopied, 0}, 0, kDataFile), SubclusterType::kNormal);
  EXPECT_EQ(L2EntryHostOffset(L2Entry{kCopied, 0}), 0u);
}

TEST(L2EntryTest, ExternalDataFileOffsetZeroWithoutCopiedIsUnallocated) {
  EXPECT_EQ(GetSubclusterType(L2Entry{0, 0}, 0, kDataFile), SubclusterType::kUnallocatedPlain);
}

TEST(L2EntryTest, ExternalDataFileZeroFlagWithCopiedIsZeroAlloc) {
  EXPECT_EQ(GetSubclusterType(L2Entry{kCopied | kZero, 0}, 0, kDataFile), SubclusterType::kZeroAlloc);
}

// --- Extended L2 entries --------------------------------------------------

TEST(L2EntryTest, ExtendedAllocatedSubclusterIsNormal) {
  EXPECT_EQ(Extended(kCopied | kHost, AllocBit(7), 7), SubclusterType::kNormal);
}

TEST(L2EntryTest, ExtendedZeroSubclusterWithHostIsZeroAlloc) {
  EXPECT_EQ(Extended(kCopied | kHost, ZeroBit(7), 7), SubclusterType::kZeroAlloc);
}

TEST(L2EntryTest, ExtendedUnmarkedSubclusterWithHostIsUnallocatedAlloc) {
  EXPECT_EQ(Extended(kCopied | kHost, AllocBit(6) | ZeroBit(8), 7), SubclusterType::kUnallocatedAlloc);
}

TEST(L2EntryTest, ExtendedZeroSubclusterWithoutHostIsZeroPlain) {
  EXPECT_EQ(Extended(0, ZeroBit(31), 31), SubclusterType::kZeroPlain);
}

TEST(L2EntryTest, ExtendedUnmarkedSubclusterWithoutHostIsUnallocatedPlain) {
  EXPECT_EQ(Extended(0, 0, 0), SubclusterType::kUnallocatedPlain);
}

TEST(L2EntryTest, ExtendedAllocAndZeroIsInvalid) {
  EXPECT_EQ(Extended(kCopied | kHost, AllocBit(3) | ZeroBit(3), 3), SubclusterType::kInvalid);
}

TEST(L2EntryTest, ExtendedAllocWithoutHostIsInvalid) {
  EXPECT_EQ(Extended(0, AllocBit(0), 0), SubclusterType::kInvalid);
}

// Bit x is subcluster x and bit x+32 its zero flag, not the other way round
// (an early patch revision ordered the bitmap differently).
TEST(L2EntryTest, ExtendedBitmapBitsPickTheirSubcluster) {
  const uint64_t bitmap = AllocBit(0) | ZeroBit(1) | AllocBit(31) | ZeroBit(30);
  EXPECT_EQ(Extended(kHost, bitmap, 0), SubclusterType::kNormal);
  EXPECT_EQ(Extended(kHost, bitmap, 1), SubclusterType::kZeroAlloc);
  EXPECT_EQ(Extended(kHost, bitmap, 2), SubclusterType::kUnallocatedAlloc);
  EXPECT_EQ(Extended(kHost, bitmap, 30), SubclusterType::kZeroAlloc);
  EXPECT_EQ(Extended(kHost, bitmap, 31), SubclusterType::kNormal);
}

// With extended entries bit 0 is reserved; zeroes come from the bitmap.
TEST(L2EntryTest, ExtendedIgnoresStandardZeroFlag) {
  EXPECT_EQ(Extended(kHost | kZero, AllocBit(0), 0), SubclusterType::kNormal);
  EXPECT_EQ(Extended(kZero, 0, 0), SubclusterType::kUnallocatedPlain);
}

TEST(L2EntryTest, ExtendedCompressedIgnoresBitmap) {
  const uint64_t descriptor = kCompressed | 0x50000;
  EXPECT_EQ(Extended(descriptor, AllocBit(0) | ZeroBit(0), 0), SubclusterType::kCompressed);
  EXPECT_EQ(Extended(descriptor, ZeroBit(5), 5), SubclusterType::kCompressed);
}

// --- Reserved bits --------------------------------------------------------

TEST(L2EntryTest, ReservedBitsOfStandardEntry) {
  EXPECT_EQ(L2EntryReservedBits(L2Entry{kCopied | kHost | kZero, 0}, kStandard), 0u);
  EXPECT_EQ(L2EntryReservedBits(L2Entry{kHost | 0x1fe, 0}, kStandard), 0x1feu);
  EXPECT_EQ(L2EntryReservedBits(L2Entry{kHost | (1ull << 56) | (1ull << 61), 0}, kStandard),
            (1ull << 56) | (1ull << 61));
}

TEST(L2EntryTest, ReservedBitsIncludeBit0WithExtendedL2) {
  EXPECT_EQ(L2EntryReservedBits(L2Entry{kHost | kZero, 0}, kExtended), 1u);
  EXPECT_EQ(L2EntryReservedBits(L2Entry{kHost | kZero, 0}, kStandard), 0u);
}

// Every bit below 62 is descriptor in a compressed entry.
TEST(L2EntryTest, CompressedEntryHasNoReservedBits) {
  EXPECT_EQ(L2EntryReservedBits(L2Entry{kCompressed | 0x3fffffffffffffffull, 0}, kStandard), 0u);
}

// --- L1 entries -----------------------------------------------------------

TEST(L2EntryTest, L1EntryMasksCopiedAndReservedBits) {
  EXPECT_EQ(L1EntryL2Offset(0), 0u);
  EXPECT_EQ(L1EntryL2Offset(kCopied | 0x30000), 0x30000u);
  EXPECT_EQ(L1EntryL2Offset(0x7f00000000030000ull | 0x1ff), 0x30000u);
  EXPECT_EQ(L1EntryL2Offset(~0ull), 0x00fffffffffffe00ull);
}

// --- Compressed descriptors: x = 62 - (cluster_bits - 8) ------------------

// 512-byte clusters: x = 61, one sector-count bit (61).
TEST(L2EntryTest, CompressedDescriptorClusterBits9) {
  EXPECT_EQ(spec::CompressedOffsetBits(9), 61u);
  CompressedDescriptor d = DecodeCompressedDescriptor(kCompressed | (1ull << 61) | 0x1234, 9);
  EXPECT_EQ(d.host_offset, 0x1234u);
  EXPECT_EQ(d.max_size, 2u * 512 - 0x34);
  d = DecodeCompressedDescriptor(kCompressed | 0x1234, 9);
  EXPECT_EQ(d.host_offset, 0x1234u);
  EXPECT_EQ(d.max_size, 512u - 0x34);
}

// 64 KiB clusters: x = 54, sector count in bits 54..61.
TEST(L2EntryTest, CompressedDescriptorClusterBits16) {
  EXPECT_EQ(spec::CompressedOffsetBits(16), 54u);
  CompressedDescriptor d = DecodeCompressedDescriptor(kCompressed | (3ull << 54) | 0x12345, 16);
  EXPECT_EQ(d.host_offset, 0x12345u);
  EXPECT_EQ(d.max_size, 4u * 512 - 0x145);
}

// 2 MiB clusters: x = 49, sector count in bits 49..61.
TEST(L2EntryTest, CompressedDescriptorClusterBits21) {
  EXPECT_EQ(spec::CompressedOffsetBits(21), 49u);
  const uint64_t offset = (1ull << 49) - 1;  // the largest offset
  CompressedDescriptor d = DecodeCompressedDescriptor(kCompressed | (4095ull << 49) | offset, 21);
  EXPECT_EQ(d.host_offset, offset);
  EXPECT_EQ(d.max_size, 4096u * 512 - 511);
}

TEST(L2EntryTest, CompressedDescriptorSectorAlignedOffset) {
  CompressedDescriptor d = DecodeCompressedDescriptor(kCompressed | (2ull << 54) | 0x30000, 16);
  EXPECT_EQ(d.host_offset, 0x30000u);
  EXPECT_EQ(d.max_size, 3u * 512);
}

// The sector count stops at bit 61: bits 62 and 63 are not part of it.
TEST(L2EntryTest, CompressedDescriptorSectorCountExcludesFlags) {
  for (uint32_t bits : {9u, 16u, 21u}) {
    SCOPED_TRACE(bits);
    const uint32_t x = 62 - (bits - 8);
    const uint64_t max_sectors = (1ull << (62 - x)) - 1;
    CompressedDescriptor d = DecodeCompressedDescriptor(kCopied | kCompressed | (max_sectors << x), bits);
    EXPECT_EQ(d.host_offset, 0u);
    EXPECT_EQ(d.max_size, (max_sectors + 1) * 512);
  }
}

// The zero entries before the first that is not, within the count: any
// nonzero byte of an entry ends the run, the extended bitmap's included.
TEST(L2EntryTest, CountZeroL2Entries) {
  for (const bool extended : {false, true}) {
    SCOPED_TRACE(extended ? "extended" : "standard");
    L2Format format;
    format.extended_l2 = extended;
    const uint32_t size = format.entry_size();
    std::vector<uint8_t> table(64 * size, 0);
    EXPECT_EQ(CountZeroL2Entries(table.data(), 64, format), 64u);
    EXPECT_EQ(CountZeroL2Entries(table.data(), 10, format), 10u);
    EXPECT_EQ(CountZeroL2Entries(table.data(), 0, format), 0u);
    for (const uint32_t byte : {0u, 7u, size - 1}) {
      SCOPED_TRACE(byte);
      std::fill(table.begin(), table.end(), 0);
      table[37 * size + byte] = 1;
      EXPECT_EQ(CountZeroL2Entries(table.data(), 64, format), 37u);
      EXPECT_EQ(CountZeroL2Entries(table.data(), 37, format), 37u);
      EXPECT_EQ(CountZeroL2Entries(table.data() + 37 * size, 27, format), 0u);
      EXPECT_EQ(CountZeroL2Entries(table.data() + 38 * size, 26, format), 26u);
    }
  }
}

}  // namespace
}  // namespace qcow2fuse::test
