#include "format/header.h"

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"
#include "qcow2_builder.h"

namespace qcow2fuse::test {
namespace {

// Bytes handed to DecodeHeader: the start of the image, as a caller that
// reads min(kHeaderReadSize, file size) would see it.
constexpr size_t kReadSize = 4096;

Bytes HeaderBytes(const HeaderFields& f) {
  Bytes b;
  PutHeader(b, f);
  b.resize(kReadSize);
  return b;
}

absl::StatusOr<Header> Decode(const Bytes& b, const HeaderFields& f) {
  return DecodeHeader(b, FileSizeFor(f));
}

absl::StatusOr<Header> Decode(const HeaderFields& f) { return Decode(HeaderBytes(f), f); }

// Passes if `result` failed with `code` and a message containing `text`.
::testing::AssertionResult Fails(const absl::StatusOr<Header>& result, absl::StatusCode code,
                                 absl::string_view text) {
  if (result.ok()) return ::testing::AssertionFailure() << "decoded, expected an error";
  const std::string message(result.status().message());
  if (result.status().code() != code || !absl::StrContains(message, text)) {
    return ::testing::AssertionFailure()
           << "got " << result.status() << "; want code " << absl::StatusCodeToString(code)
           << " and a message containing \"" << text << "\"";
  }
  return ::testing::AssertionSuccess();
}

constexpr absl::StatusCode kDataLoss = absl::StatusCode::kDataLoss;
constexpr absl::StatusCode kUnimplemented = absl::StatusCode::kUnimplemented;
constexpr absl::StatusCode kInvalidArgument = absl::StatusCode::kInvalidArgument;

// --- Fixed fields ---------------------------------------------------------

TEST(HeaderTest, V3FieldsDecoded) {
  HeaderFields f = ValidFields();
  f.size = (3ull << 30) + 512;
  f.l1_size = 7;
  f.refcount_table_clusters = 2;
  f.l1_table_offset = 3 << 16;
  f.nb_snapshots = 2;
  f.snapshots_offset = 5 << 16;
  f.incompatible_features = kIncompatDirty;
  f.compatible_features = kCompatLazyRefcounts;
  f.autoclear_features = 1ull << 5;
  f.refcount_order = 3;
  f.crypt_method = kCryptLuks;
  const uint64_t file_size = 6 << 16;
  ASSERT_OK_AND_ASSIGN(Header h, DecodeHeader(HeaderBytes(f), file_size));
  EXPECT_EQ(h.version, 3u);
  EXPECT_EQ(h.cluster_bits, 16u);
  EXPECT_EQ(h.cluster_size(), 65536u);
  EXPECT_EQ(h.size, (3ull << 30) + 512);
  EXPECT_EQ(h.crypt_method, kCryptLuks);
  EXPECT_EQ(h.l1_size, 7u);
  EXPECT_EQ(h.l1_table_offset, 3u << 16);
  EXPECT_EQ(h.refcount_table_offset, 1u << 16);
  EXPECT_EQ(h.refcount_table_clusters, 2u);
  EXPECT_EQ(h.nb_snapshots, 2u);
  EXPECT_EQ(h.snapshots_offset, 5u << 16);
  EXPECT_EQ(h.incompatible_features, kIncompatDirty);
  EXPECT_EQ(h.compatible_features, kCompatLazyRefcounts);
  EXPECT_EQ(h.autoclear_features, 1ull << 5);
  EXPECT_EQ(h.refcount_order, 3u);
  EXPECT_EQ(h.refcount_bits(), 8u);
  EXPECT_EQ(h.header_length, 112u);
  EXPECT_EQ(h.compression_type, 0);
  EXPECT_EQ(h.l2_entries(), 8192u);
  EXPECT_TRUE(h.backing_file.empty());
  EXPECT_TRUE(h.unknown_extensions.empty());
}

// v2 has no fields past byte 72: what follows is the extension area.
TEST(HeaderTest, V2HeaderIs72Bytes) {
  HeaderFields f = ValidFields();
  f.version = 2;
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 72).AddString(kExtBackingFormat, "qcow2");
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.version, 2u);
  EXPECT_EQ(h.header_length, 72u);
  EXPECT_EQ(h.incompatible_features, 0u);
  EXPECT_EQ(h.compression_type, 0);
  EXPECT_EQ(h.backing_format, "qcow2");
}

TEST(HeaderTest, V2ImpliesRefcountOrder4) {
  HeaderFields f = ValidFields();
  f.version = 2;
  Bytes b = HeaderBytes(f);
  // Where a v3 header keeps refcount_order; behind the end marker here.
  PutBE32(b, kOffRefcountOrder, 6);
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.refcount_order, 4u);
  EXPECT_EQ(h.refcount_bits(), 16u);
}

// With header_length 104, byte 104 starts the extensions, not compression_type.
TEST(HeaderTest, HeaderLength104HasNoCompressionType) {
  HeaderFields f = ValidFields();
  f.header_length = 104;
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 104).AddString(kExtBackingFormat, "raw");
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.header_length, 104u);
  EXPECT_EQ(h.compression_type, 0);
  EXPECT_EQ(h.backing_format, "raw");
}

TEST(HeaderTest, HeaderLength112HasCompressionType) {
  HeaderFields f = ValidFields();
  f.incompatible_features = kIncompatCompressionType;
  f.compression_type = kCompressionZstd;
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).AddString(kExtBackingFormat, "raw");
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.header_length, 112u);
  EXPECT_EQ(h.compression_type, kCompressionZstd);
  EXPECT_EQ(h.backing_format, "raw");
}

// A newer writer's fields beyond compression_type are skipped, not parsed
// as extensions.
TEST(HeaderTest, LongerHeaderLengthSkipsUnknownFields) {
  HeaderFields f = ValidFields();
  f.header_length = 120;
  Bytes b = HeaderBytes(f);
  PutBE64(b, 112, 0xe2792aca00000003ull);
  ExtensionWriter(b, 120).AddString(kExtBackingFormat, "raw");
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.header_length, 120u);
  EXPECT_EQ(h.backing_format, "raw");
}

TEST(HeaderTest, HeaderLengthNotMultipleOf8Rejected) {
  HeaderFields f = ValidFields();
  f.header_length = 108;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "header_length 108"));
}

TEST(HeaderTest, HeaderLengthBelow104Rejected) {
  HeaderFields f = ValidFields();
  f.header_length = 100;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "header_length 100"));
}

TEST(HeaderTest, HeaderLengthLargerThanClusterRejected) {
  HeaderFields f = ValidFields(9);
  f.header_length = 520;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "header_length 520"));
}

TEST(HeaderTest, HeaderLengthPastEndOfFileRejected) {
  HeaderFields f = ValidFields();
  Bytes b = HeaderBytes(f);
  b.resize(108);
  EXPECT_TRUE(Fails(DecodeHeader(b, 108), kDataLoss, "header_length 112"));
}

TEST(HeaderTest, BadMagic) {
  HeaderFields f = ValidFields();
  f.magic = 0x514649fa;
  EXPECT_TRUE(Fails(Decode(f), kInvalidArgument, "magic"));
}

TEST(HeaderTest, Version1Rejected) {
  HeaderFields f = ValidFields();
  f.version = 1;
  EXPECT_TRUE(Fails(Decode(f), kUnimplemented, "version 1"));
}

TEST(HeaderTest, Version4Rejected) {
  HeaderFields f = ValidFields();
  f.version = 4;
  EXPECT_TRUE(Fails(Decode(f), kUnimplemented, "version 4"));
}

TEST(HeaderTest, TruncatedFileRejected) {
  Bytes b = HeaderBytes(ValidFields());
  b.resize(40);
  EXPECT_TRUE(Fails(DecodeHeader(b, b.size()), kInvalidArgument, "too short"));
}

TEST(HeaderTest, EmptyFileRejected) {
  EXPECT_TRUE(Fails(DecodeHeader({}, 0), kInvalidArgument, "too short"));
}

// Long enough for the v2 fields, too short for the v3 ones.
TEST(HeaderTest, TruncatedV3HeaderRejected) {
  Bytes b = HeaderBytes(ValidFields());
  b.resize(80);
  EXPECT_TRUE(Fails(DecodeHeader(b, b.size()), kDataLoss, "too short"));
}

TEST(HeaderTest, ClusterBits8Rejected) {
  HeaderFields f = ValidFields(9);
  f.cluster_bits = 8;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "cluster_bits 8"));
}

TEST(HeaderTest, ClusterBits22Rejected) {
  HeaderFields f = ValidFields(21);
  f.cluster_bits = 22;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "cluster_bits 22"));
}

TEST(HeaderTest, ClusterBits9Accepted) {
  HeaderFields f = ValidFields(9);
  ASSERT_OK_AND_ASSIGN(Header h, Decode(f));
  EXPECT_EQ(h.cluster_size(), 512u);
  EXPECT_EQ(h.l2_entries(), 64u);
}

TEST(HeaderTest, ClusterBits21Accepted) {
  HeaderFields f = ValidFields(21);
  ASSERT_OK_AND_ASSIGN(Header h, Decode(f));
  EXPECT_EQ(h.cluster_size(), 2u << 20);
  EXPECT_EQ(h.l2_entries(), 262144u);
}

TEST(HeaderTest, RefcountOrder7Rejected) {
  HeaderFields f = ValidFields();
  f.refcount_order = 7;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "refcount_order 7"));
}

TEST(HeaderTest, RefcountOrders0To6Accepted) {
  for (uint32_t order = 0; order <= 6; ++order) {
    SCOPED_TRACE(order);
    HeaderFields f = ValidFields();
    f.refcount_order = order;
    ASSERT_OK_AND_ASSIGN(Header h, Decode(f));
    EXPECT_EQ(h.refcount_order, order);
    EXPECT_EQ(h.refcount_bits(), 1u << order);
  }
}

TEST(HeaderTest, UnknownCryptMethodRejected) {
  HeaderFields f = ValidFields();
  f.crypt_method = 3;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "crypt_method 3"));
}

// --- L1, refcount and snapshot tables -------------------------------------

// One L1 entry maps 64 KiB * 8192 = 512 MiB.
TEST(HeaderTest, L1ExactlyLargeEnoughAccepted) {
  HeaderFields f = ValidFields();
  f.size = 512ull << 20;
  f.l1_size = 1;
  EXPECT_TRUE(Decode(f).ok());
}

TEST(HeaderTest, L1TooSmallForVirtualSizeRejected) {
  HeaderFields f = ValidFields();
  f.size = (512ull << 20) + 1;
  f.l1_size = 1;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "L1 table of 1 entries is too small"));
}

// Extended entries are 16 bytes, so an L2 table maps half as much.
TEST(HeaderTest, ExtendedL2NeedsTwiceTheL1Entries) {
  HeaderFields f = ValidFields();
  f.size = 512ull << 20;
  f.l1_size = 1;
  f.incompatible_features = kIncompatExtendedL2;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "needs 2"));
  f.l1_size = 2;
  EXPECT_TRUE(Decode(f).ok());
}

TEST(HeaderTest, AbsurdVirtualSizeRejected) {
  for (uint64_t size : {1ull << 63, ~0ull}) {
    SCOPED_TRACE(size);
    HeaderFields f = ValidFields();
    f.size = size;
    f.l1_size = 1;
    EXPECT_TRUE(Fails(Decode(f), kDataLoss, "too small"));
  }
}

TEST(HeaderTest, ZeroSizeWithoutL1Accepted) {
  HeaderFields f = ValidFields();
  f.size = 0;
  f.l1_size = 0;
  f.l1_table_offset = 0;
  ASSERT_OK_AND_ASSIGN(Header h, DecodeHeader(HeaderBytes(f), 2 << 16));
  EXPECT_EQ(h.size, 0u);
  EXPECT_EQ(h.l1_size, 0u);
}

TEST(HeaderTest, L1Of32MiBAccepted) {
  HeaderFields f = ValidFields();
  f.l1_size = 4 << 20;
  EXPECT_TRUE(DecodeHeader(HeaderBytes(f), f.l1_table_offset + (32 << 20)).ok());
}

TEST(HeaderTest, L1Over32MiBRejected) {
  HeaderFields f = ValidFields();
  f.l1_size = (4 << 20) + 1;
  EXPECT_TRUE(Fails(DecodeHeader(HeaderBytes(f), 1ull << 40), kDataLoss, "L1 table of 4194305 entries"));
}

TEST(HeaderTest, L1TablePastEndOfFileRejected) {
  HeaderFields f = ValidFields();
  f.l1_size = 2;
  EXPECT_TRUE(Fails(DecodeHeader(HeaderBytes(f), f.l1_table_offset + 8), kDataLoss,
                    "L1 table at 0x20000 (2 entries) runs past the end of the file"));
}

TEST(HeaderTest, UnalignedL1TableOffsetRejected) {
  HeaderFields f = ValidFields();
  f.l1_table_offset += 512;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "L1 table offset 0x20200"));
}

TEST(HeaderTest, L1TableAtOffsetZeroRejected) {
  HeaderFields f = ValidFields();
  f.l1_table_offset = 0;
  EXPECT_TRUE(Fails(DecodeHeader(HeaderBytes(f), 3 << 16), kDataLoss, "L1 table offset 0"));
}

TEST(HeaderTest, UnalignedRefcountTableOffsetRejected) {
  HeaderFields f = ValidFields();
  f.refcount_table_offset += 4096;
  EXPECT_TRUE(Fails(DecodeHeader(HeaderBytes(f), 4 << 16), kDataLoss,
                    "refcount table offset 0x11000"));
}

TEST(HeaderTest, RefcountTablePastEndOfFileRejected) {
  HeaderFields f = ValidFields();
  f.refcount_table_clusters = 3;
  EXPECT_TRUE(Fails(DecodeHeader(HeaderBytes(f), 3 << 16), kDataLoss,
                    "refcount table at 0x10000 runs past the end of the file"));
}

TEST(HeaderTest, RefcountTableOver8MiBRejected) {
  HeaderFields f = ValidFields();
  f.refcount_table_clusters = 129;
  EXPECT_TRUE(Fails(DecodeHeader(HeaderBytes(f), 1ull << 30), kDataLoss,
                    "refcount table of 129 clusters"));
}

TEST(HeaderTest, TooManySnapshotsRejected) {
  HeaderFields f = ValidFields();
  f.nb_snapshots = 65537;
  f.snapshots_offset = 3 << 16;
  EXPECT_TRUE(Fails(DecodeHeader(HeaderBytes(f), 4 << 16), kDataLoss, "65537 snapshots"));
}

TEST(HeaderTest, UnalignedSnapshotTableRejected) {
  HeaderFields f = ValidFields();
  f.nb_snapshots = 1;
  f.snapshots_offset = (3 << 16) + 8;
  EXPECT_TRUE(Fails(DecodeHeader(HeaderBytes(f), 4 << 16), kDataLoss,
                    "snapshot table offset 0x30008"));
}

// --- Feature bits ---------------------------------------------------------

TEST(HeaderTest, UnknownIncompatibleBitRejected) {
  HeaderFields f = ValidFields();
  f.incompatible_features = 1ull << 5;
  absl::StatusOr<Header> h = Decode(f);
  EXPECT_TRUE(Fails(h, kUnimplemented, "incompatible feature bit 5"));
  EXPECT_FALSE(absl::StrContains(std::string(h.status().message()), "("));
}

TEST(HeaderTest, UnknownIncompatibleBit63Rejected) {
  HeaderFields f = ValidFields();
  f.incompatible_features = 1ull << 63;
  EXPECT_TRUE(Fails(Decode(f), kUnimplemented, "bit 63"));
}

TEST(HeaderTest, UnknownIncompatibleBitNamedFromFeatureTable) {
  HeaderFields f = ValidFields();
  f.incompatible_features = 1ull << 5;
  Bytes b = HeaderBytes(f);
  Bytes table = FeatureNameEntry(kFeatureTypeCompatible, 5, "not_this_one");
  Bytes entry = FeatureNameEntry(kFeatureTypeIncompatible, 5, "my_feature");
  table.insert(table.end(), entry.begin(), entry.end());
  ExtensionWriter(b, 112).Add(kExtFeatureNameTable, table);
  absl::StatusOr<Header> h = Decode(b, f);
  EXPECT_TRUE(Fails(h, kUnimplemented, "bit 5 (my_feature)"));
  EXPECT_FALSE(absl::StrContains(std::string(h.status().message()), "not_this_one"));
}

// A reader may ignore dirty (refcounts only) and corrupt (no writes).
TEST(HeaderTest, DirtyAndCorruptBitsAccepted) {
  HeaderFields f = ValidFields();
  f.incompatible_features = kIncompatDirty | kIncompatCorrupt;
  EXPECT_TRUE(Decode(f).ok());
}

// Autoclear bit 1 only means data-file-raw with the external data file bit,
// which is incompatible bit 2 (the spec's text says bit 1).
TEST(HeaderTest, DataFileRawNeedsIncompatibleBit2) {
  HeaderFields f = ValidFields();
  f.autoclear_features = kAutoclearDataFileRaw;
  f.incompatible_features = kIncompatCorrupt;
  // Without the data file bit the image is refused, as QEMU refuses it
  // ("data-file-raw requires a data file").
  absl::StatusOr<Header> no_data_file = Decode(f);
  EXPECT_TRUE(absl::IsDataLoss(no_data_file.status())) << no_data_file.status();
  EXPECT_TRUE(absl::StrContains(no_data_file.status().message(), "no external data file"))
      << no_data_file.status();

  f.incompatible_features = kIncompatDataFile;
  ASSERT_OK_AND_ASSIGN(Header data_file, Decode(f));
  EXPECT_TRUE(data_file.has_data_file());
  EXPECT_TRUE(data_file.has_data_file_raw());
}

TEST(HeaderTest, ZstdWithBit3Accepted) {
  HeaderFields f = ValidFields();
  f.incompatible_features = kIncompatCompressionType;
  f.compression_type = kCompressionZstd;
  ASSERT_OK_AND_ASSIGN(Header h, Decode(f));
  EXPECT_EQ(h.compression_type, kCompressionZstd);
}

TEST(HeaderTest, ZstdWithoutBit3Rejected) {
  HeaderFields f = ValidFields();
  f.compression_type = kCompressionZstd;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "compression type 1"));
}

TEST(HeaderTest, Bit3WithDeflateRejected) {
  HeaderFields f = ValidFields();
  f.incompatible_features = kIncompatCompressionType;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "compression type 0"));
}

TEST(HeaderTest, UnknownCompressionTypeRejected) {
  HeaderFields f = ValidFields();
  f.incompatible_features = kIncompatCompressionType;
  f.compression_type = 2;
  EXPECT_TRUE(Fails(Decode(f), kUnimplemented, "compression type 2"));
}

TEST(HeaderTest, ExtendedL2With8KiBClustersRejected) {
  HeaderFields f = ValidFields(13);
  f.incompatible_features = kIncompatExtendedL2;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "extended L2"));
}

TEST(HeaderTest, ExtendedL2With16KiBClustersAccepted) {
  HeaderFields f = ValidFields(14);
  f.incompatible_features = kIncompatExtendedL2;
  ASSERT_OK_AND_ASSIGN(Header h, Decode(f));
  EXPECT_TRUE(h.has_extended_l2());
  EXPECT_EQ(h.l2_entry_size(), 16u);
  EXPECT_EQ(h.l2_entries(), 1024u);
}

// --- Header extensions ----------------------------------------------------

TEST(HeaderTest, BackingFormatExtension) {
  HeaderFields f = ValidFields();
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).AddString(kExtBackingFormat, "qcow2");
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.backing_format, "qcow2");
  EXPECT_TRUE(h.unknown_extensions.empty());
}

TEST(HeaderTest, ExternalDataFileExtension) {
  HeaderFields f = ValidFields();
  f.incompatible_features = kIncompatDataFile;
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).AddString(kExtExternalDataFile, "disk.img");
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.data_file, "disk.img");
  EXPECT_TRUE(h.has_data_file());
}

// "data.raw" fills its 8 bytes exactly: no NUL and no padding before the
// next extension's type.
TEST(HeaderTest, ExtensionStringsAreNotNulTerminated) {
  HeaderFields f = ValidFields();
  Bytes b = HeaderBytes(f);
  ExtensionWriter w(b, 112);
  w.AddString(kExtExternalDataFile, "data.raw");
  w.AddString(kExtBackingFormat, "qcow2");
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.data_file, "data.raw");
  EXPECT_EQ(h.backing_format, "qcow2");
}

TEST(HeaderTest, ExtensionsArePaddedTo8Bytes) {
  HeaderFields f = ValidFields();
  Bytes b = HeaderBytes(f);
  ExtensionWriter w(b, 112);
  w.AddString(kExtBackingFormat, "qcow2");  // 5 bytes + 3 padding
  w.AddString(kExtExternalDataFile, "d");   // 1 byte + 7 padding
  w.Add(kExtFullDiskEncryption, Bytes(16, 0x11));
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.backing_format, "qcow2");
  EXPECT_EQ(h.data_file, "d");
  ASSERT_TRUE(h.full_disk_encryption.has_value());
  EXPECT_EQ(h.full_disk_encryption->offset, 0x1111111111111111ull);
}

TEST(HeaderTest, FeatureNameTable) {
  HeaderFields f = ValidFields();
  Bytes b = HeaderBytes(f);
  const std::string long_name(46, 'n');  // fills the field: no NUL
  Bytes table = FeatureNameEntry(kFeatureTypeIncompatible, 0, "dirty bit");
  for (const Bytes& e : {FeatureNameEntry(kFeatureTypeCompatible, 0, "lazy refcounts"),
                         FeatureNameEntry(kFeatureTypeAutoclear, 1, long_name)}) {
    table.insert(table.end(), e.begin(), e.end());
  }
  ExtensionWriter(b, 112).Add(kExtFeatureNameTable, table);
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  ASSERT_EQ(h.feature_names.size(), 3u);
  EXPECT_EQ(h.feature_names[0].type, kFeatureTypeIncompatible);
  EXPECT_EQ(h.feature_names[0].bit, 0);
  EXPECT_EQ(h.feature_names[0].name, "dirty bit");
  EXPECT_EQ(h.feature_names[1].type, kFeatureTypeCompatible);
  EXPECT_EQ(h.feature_names[1].name, "lazy refcounts");
  EXPECT_EQ(h.feature_names[2].type, kFeatureTypeAutoclear);
  EXPECT_EQ(h.feature_names[2].bit, 1);
  EXPECT_EQ(h.feature_names[2].name, long_name);
  EXPECT_EQ(h.DescribeFeature(kFeatureTypeCompatible, 0), "bit 0 (lazy refcounts)");
  EXPECT_EQ(h.DescribeFeature(kFeatureTypeCompatible, 1), "bit 1");
}

Bytes BitmapsPayload(uint32_t nb_bitmaps, uint64_t directory_size, uint64_t directory_offset) {
  Bytes p;
  PutBE32(p, 0, nb_bitmaps);
  PutBE32(p, 4, 0);
  PutBE64(p, 8, directory_size);
  PutBE64(p, 16, directory_offset);
  return p;
}

TEST(HeaderTest, BitmapsExtensionTrustedWithAutoclearBit) {
  HeaderFields f = ValidFields();
  f.autoclear_features = kAutoclearBitmaps;
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).Add(kExtBitmaps, BitmapsPayload(2, 64, 2 << 16));
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  ASSERT_TRUE(h.bitmaps.has_value());
  EXPECT_EQ(h.bitmaps->nb_bitmaps, 2u);
  EXPECT_EQ(h.bitmaps->bitmap_directory_size, 64u);
  EXPECT_EQ(h.bitmaps->bitmap_directory_offset, 2u << 16);
}

// Without the autoclear bit a bitmap-unaware writer may have changed the
// disk since, so even a broken extension is just ignored.
TEST(HeaderTest, BitmapsExtensionIgnoredWithoutAutoclearBit) {
  HeaderFields f = ValidFields();
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).Add(kExtBitmaps, BitmapsPayload(2, 64, 1ull << 40));
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_FALSE(h.bitmaps.has_value());
}

TEST(HeaderTest, BitmapDirectoryPastEndOfFileRejected) {
  HeaderFields f = ValidFields();
  f.autoclear_features = kAutoclearBitmaps;
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).Add(kExtBitmaps, BitmapsPayload(1, 64, 3 << 16));
  EXPECT_TRUE(Fails(Decode(b, f), kDataLoss, "bitmap directory at 0x30000"));
}

// offset + size wraps around 2^64; the bounds check must not.
TEST(HeaderTest, BitmapDirectoryBoundsOverflowRejected) {
  HeaderFields f = ValidFields();
  f.autoclear_features = kAutoclearBitmaps;
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).Add(kExtBitmaps, BitmapsPayload(1, ~0ull - 0x100, 0x200));
  EXPECT_TRUE(Fails(Decode(b, f), kDataLoss, "bitmap directory"));
}

TEST(HeaderTest, BitmapsExtensionWithNoBitmapsRejected) {
  HeaderFields f = ValidFields();
  f.autoclear_features = kAutoclearBitmaps;
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).Add(kExtBitmaps, BitmapsPayload(0, 64, 2 << 16));
  EXPECT_TRUE(Fails(Decode(b, f), kDataLoss, "0 bitmaps"));
}

TEST(HeaderTest, FullDiskEncryptionPointer) {
  HeaderFields f = ValidFields();
  f.crypt_method = kCryptLuks;
  Bytes b = HeaderBytes(f);
  Bytes payload;
  PutBE64(payload, 0, 3 << 16);
  PutBE64(payload, 8, 0x1234);
  ExtensionWriter(b, 112).Add(kExtFullDiskEncryption, payload);
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  ASSERT_TRUE(h.full_disk_encryption.has_value());
  EXPECT_EQ(h.full_disk_encryption->offset, 3u << 16);
  EXPECT_EQ(h.full_disk_encryption->length, 0x1234u);
}

TEST(HeaderTest, UnknownExtensionSkipped) {
  HeaderFields f = ValidFields();
  Bytes b = HeaderBytes(f);
  ExtensionWriter w(b, 112);
  w.Add(0x12345678, Bytes(13, 0xee));
  w.AddString(kExtBackingFormat, "raw");
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.unknown_extensions, std::vector<uint32_t>{0x12345678});
  EXPECT_EQ(h.backing_format, "raw");
}

TEST(HeaderTest, ExtensionLengthPastClusterRejected) {
  HeaderFields f = ValidFields(12);
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).AddHeaderOnly(kExtBackingFormat, 4096);
  EXPECT_TRUE(Fails(Decode(b, f), kDataLoss, "header extension 0xe2792aca at offset 112"));
}

// The backing file name ends the extension area.
TEST(HeaderTest, ExtensionOverlappingBackingFileNameRejected) {
  HeaderFields f = ValidFields();
  f.backing_file_offset = 128;
  f.backing_file_size = 4;
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).AddString(kExtBackingFormat, std::string(24, 'f'));
  PutString(b, 128, "base");
  EXPECT_TRUE(Fails(Decode(b, f), kDataLoss, "runs past the extension area"));
}

TEST(HeaderTest, EndMarkerStopsParsing) {
  HeaderFields f = ValidFields();
  Bytes b = HeaderBytes(f);
  ExtensionWriter w(b, 112);
  w.AddString(kExtBackingFormat, "raw");
  w.End();
  w.AddString(kExtExternalDataFile, "ignored");
  w.Add(0x12345678, Bytes(8, 1));
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.backing_format, "raw");
  EXPECT_TRUE(h.data_file.empty());
  EXPECT_TRUE(h.unknown_extensions.empty());
}

// --- Backing file name ----------------------------------------------------

TEST(HeaderTest, BackingFileNameReadFromOffset) {
  HeaderFields f = ValidFields();
  f.backing_file_offset = 512;
  f.backing_file_size = 14;
  Bytes b = HeaderBytes(f);
  ExtensionWriter(b, 112).AddString(kExtBackingFormat, "qcow2");
  // No NUL after the name: the size alone ends it.
  PutString(b, 512, "dir/base.qcow2XXXXXXXX");
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.backing_file, "dir/base.qcow2");
  EXPECT_EQ(h.backing_format, "qcow2");
}

TEST(HeaderTest, BackingFileName1023BytesAccepted) {
  HeaderFields f = ValidFields();
  f.backing_file_offset = 512;
  f.backing_file_size = 1023;
  Bytes b = HeaderBytes(f);
  PutString(b, 512, std::string(1023, 'b'));
  ASSERT_OK_AND_ASSIGN(Header h, Decode(b, f));
  EXPECT_EQ(h.backing_file, std::string(1023, 'b'));
}

TEST(HeaderTest, BackingFileNameOver1023BytesRejected) {
  HeaderFields f = ValidFields();
  f.backing_file_offset = 512;
  f.backing_file_size = 1024;
  Bytes b = HeaderBytes(f);
  PutString(b, 512, std::string(1024, 'b'));
  EXPECT_TRUE(Fails(Decode(b, f), kDataLoss, "backing file name length 1024"));
}

TEST(HeaderTest, BackingFileNameOutsideFirstClusterRejected) {
  HeaderFields f = ValidFields(12);
  f.backing_file_offset = 4090;
  f.backing_file_size = 10;
  Bytes b = HeaderBytes(f);
  b.resize(8192);
  PutString(b, 4090, "base.qcow2");
  EXPECT_TRUE(Fails(Decode(b, f), kDataLoss, "outside the first cluster"));
}

TEST(HeaderTest, BackingFileNameInsideHeaderRejected) {
  HeaderFields f = ValidFields();
  f.backing_file_offset = 40;
  f.backing_file_size = 8;
  EXPECT_TRUE(Fails(Decode(f), kDataLoss, "backing file name at offset 40"));
}

}  // namespace
}  // namespace qcow2fuse::test
