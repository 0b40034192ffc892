// Every magic number, bit and mask of the qcow2 format, named as the
// specification (qemu's docs/interop/qcow2.txt) names them. The section each
// group comes from is given in its comment. Nothing else in the engine
// writes a raw bit position or mask of the on-disk format.

#ifndef QCOW2FUSE_FORMAT_SPEC_H_
#define QCOW2FUSE_FORMAT_SPEC_H_

#include <cstdint>

namespace qcow2fuse::spec {

// --- "Header" -------------------------------------------------------------
inline constexpr uint32_t kMagic = 0x514649fb;  // 'Q' 'F' 'I' 0xfb
inline constexpr uint32_t kVersion2 = 2;
inline constexpr uint32_t kVersion3 = 3;

// Byte offsets of the header fields.
inline constexpr uint32_t kOffMagic = 0;
inline constexpr uint32_t kOffVersion = 4;
inline constexpr uint32_t kOffBackingFileOffset = 8;
inline constexpr uint32_t kOffBackingFileSize = 16;
inline constexpr uint32_t kOffClusterBits = 20;
inline constexpr uint32_t kOffSize = 24;
inline constexpr uint32_t kOffCryptMethod = 32;
inline constexpr uint32_t kOffL1Size = 36;
inline constexpr uint32_t kOffL1TableOffset = 40;
inline constexpr uint32_t kOffRefcountTableOffset = 48;
inline constexpr uint32_t kOffRefcountTableClusters = 56;
inline constexpr uint32_t kOffNbSnapshots = 60;
inline constexpr uint32_t kOffSnapshotsOffset = 64;
// Version 3 only.
inline constexpr uint32_t kOffIncompatibleFeatures = 72;
inline constexpr uint32_t kOffCompatibleFeatures = 80;
inline constexpr uint32_t kOffAutoclearFeatures = 88;
inline constexpr uint32_t kOffRefcountOrder = 96;
inline constexpr uint32_t kOffHeaderLength = 100;
// Additional fields: present only when header_length covers them.
inline constexpr uint32_t kOffCompressionType = 104;

inline constexpr uint32_t kV2HeaderLength = 72;
inline constexpr uint32_t kV3MinHeaderLength = 104;
// header_length "must be a multiple of 8" since the compression type field.
inline constexpr uint32_t kHeaderLengthAlignment = 8;

inline constexpr uint32_t kMinClusterBits = 9;
// QEMU's limit: 2 MiB clusters. Larger clusters are not created by QEMU and
// would make every table a multi-megabyte read.
inline constexpr uint32_t kMaxClusterBits = 21;

inline constexpr uint32_t kCryptNone = 0;
inline constexpr uint32_t kCryptAes = 1;
inline constexpr uint32_t kCryptLuks = 2;

// Incompatible feature bits.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompressionType = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatKnown = kIncompatDirty | kIncompatCorrupt | kIncompatDataFile |
                                           kIncompatCompressionType | kIncompatExtendedL2;

// Compatible feature bits.
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;

// Autoclear feature bits.
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
// The spec's text for this bit says "incompatible feature bit 1"; the
// external data file is incompatible bit 2 (kIncompatDataFile).
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;

// v2 images have 16-bit refcounts; v3 stores refcount_order (0..6).
inline constexpr uint32_t kV2RefcountOrder = 4;
inline constexpr uint32_t kMaxRefcountOrder = 6;

// Compression type byte.
inline constexpr uint8_t kCompressionDeflate = 0;
inline constexpr uint8_t kCompressionZstd = 1;

// The backing file name is at most 1023 bytes.
inline constexpr uint32_t kMaxBackingFileNameSize = 1023;

// --- "Header extensions" --------------------------------------------------
inline constexpr uint32_t kExtEnd = 0x00000000;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureNameTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtFullDiskEncryption = 0x0537be77;
inline constexpr uint32_t kExtExternalDataFile = 0x44415441;
inline constexpr uint32_t kExtHeaderSize = 8;  // type (4) + length (4)
inline constexpr uint32_t kExtAlignment = 8;   // data padded to 8 bytes

// "Feature name table": 48-byte entries.
inline constexpr uint32_t kFeatureNameEntrySize = 48;
inline constexpr uint32_t kFeatureNameSize = 46;
inline constexpr uint8_t kFeatureTypeIncompatible = 0;
inline constexpr uint8_t kFeatureTypeCompatible = 1;
inline constexpr uint8_t kFeatureTypeAutoclear = 2;

// "Bitmaps extension": nb_bitmaps (4), reserved (4), directory size (8),
// directory offset (8).
inline constexpr uint32_t kBitmapsExtSize = 24;
inline constexpr uint32_t kMaxBitmaps = 65535;

// "Bitmap directory" entries: a 24-byte fixed part, then extra data and
// the name, padded to 8 bytes.
inline constexpr uint32_t kBitmapDirEntryFixedSize = 24;
inline constexpr uint32_t kBitmapDirOffTableOffset = 0;
inline constexpr uint32_t kBitmapDirOffTableSize = 8;
inline constexpr uint32_t kBitmapDirOffFlags = 12;
inline constexpr uint32_t kBitmapDirOffType = 16;
inline constexpr uint32_t kBitmapDirOffGranularityBits = 17;
inline constexpr uint32_t kBitmapDirOffNameSize = 18;
inline constexpr uint32_t kBitmapDirOffExtraDataSize = 20;
inline constexpr uint32_t kBitmapDirEntryAlignment = 8;
inline constexpr uint32_t kBitmapFlagInUse = 1u << 0;
inline constexpr uint32_t kBitmapFlagAuto = 1u << 1;
inline constexpr uint32_t kBitmapFlagExtraDataCompatible = 1u << 2;
inline constexpr uint32_t kBitmapReservedFlags = ~uint32_t{0x7};  // bits 3-31
inline constexpr uint8_t kBitmapTypeDirtyTracking = 1;
// "Bitmap table": 8-byte entries.
inline constexpr uint32_t kBitmapTableEntrySize = 8;
inline constexpr uint64_t kBitmapTableOffsetMask = 0x00fffffffffffe00ull;    // bits 9-55
inline constexpr uint64_t kBitmapTableReservedMask = 0xff000000000001feull;  // bits 1-8, 56-63
inline constexpr uint64_t kBitmapTableAllOnes = 1ull << 0;                   // only with offset 0
// QEMU's limits: QCOW2_MAX_BITMAP_DIRECTORY_SIZE (1 KiB per bitmap),
// BME_MAX_TABLE_SIZE (entries of one bitmap table), BME_MAX_PHYS_SIZE
// (bytes of one bitmap), BME_MIN/MAX_GRANULARITY_BITS, BME_MAX_NAME_SIZE.
inline constexpr uint64_t kMaxBitmapDirectoryBytes = uint64_t{1024} * kMaxBitmaps;
inline constexpr uint64_t kMaxBitmapTableEntries = 0x8000000;
inline constexpr uint64_t kMaxBitmapPhysBytes = 0x20000000;
inline constexpr uint32_t kMinBitmapGranularityBits = 9;
inline constexpr uint32_t kMaxBitmapGranularityBits = 31;
inline constexpr uint32_t kMaxBitmapNameSize = 1023;

// "Full disk encryption header pointer": offset (8), length (8).
inline constexpr uint32_t kFdeExtSize = 16;

// --- "Cluster mapping" ----------------------------------------------------
// L1 table entry.
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;  // bits 9-55
inline constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;  // bits 0-8, 56-62
// L2 (and L1) entry, standard cluster descriptor.
inline constexpr uint64_t kOflagCopied = 1ull << 63;
inline constexpr uint64_t kOflagCompressed = 1ull << 62;
inline constexpr uint64_t kOflagZero = 1ull << 0;                   // v3, standard L2 only
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;    // bits 9-55
inline constexpr uint64_t kL2StandardReservedMask = 0x3f000000000001feull;  // bits 1-8, 56-61

inline constexpr uint32_t kL2EntrySize = 8;
// QEMU's limit on the L1 table, 32 MiB; it bounds the memory an image can
// make us allocate for it.
inline constexpr uint64_t kMaxL1Bytes = 32ull << 20;

// --- "Extended L2 Entries" ------------------------------------------------
inline constexpr uint32_t kExtendedL2EntrySize = 16;
inline constexpr uint32_t kSubclustersPerCluster = 32;
inline constexpr uint32_t kSubclustersPerClusterBits = 5;  // log2(32)
inline constexpr uint32_t kMinExtendedL2ClusterBits = 14;
inline constexpr uint64_t kSubclusterAllocMask = 0x00000000ffffffffull;  // bits 0-31
inline constexpr uint32_t kSubclusterZeroShift = 32;                     // bits 32-63

// --- "Compressed Clusters Descriptor" -------------------------------------
inline constexpr uint32_t kCompressedSectorSize = 512;
// The descriptor occupies bits 0..61; bit 62 is kOflagCompressed.
inline constexpr uint32_t kCompressedDescriptorBits = 62;
// x = 62 - (cluster_bits - 8): bits 0..x-1 host offset, x..61 sector count.
inline constexpr uint32_t CompressedOffsetBits(uint32_t cluster_bits) {
  return kCompressedDescriptorBits - (cluster_bits - 8);
}

// --- "Host cluster management" --------------------------------------------
inline constexpr uint64_t kRefcountTableOffsetMask = 0xfffffffffffffe00ull;  // bits 9-63
inline constexpr uint64_t kRefcountTableReservedMask = 0x00000000000001ffull;  // bits 0-8
inline constexpr uint32_t kRefcountTableEntrySize = 8;
// QEMU's limit on the refcount table, 8 MiB.
inline constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;

// --- "Snapshots" ----------------------------------------------------------
// QEMU's limit on the number of internal snapshots.
inline constexpr uint32_t kMaxSnapshots = 65536;
// A snapshot table entry: a 40-byte fixed part, extra data, the ID string
// and the name, padded to 8 bytes.
inline constexpr uint32_t kSnapshotFixedSize = 40;
inline constexpr uint32_t kSnapOffL1TableOffset = 0;
inline constexpr uint32_t kSnapOffL1Size = 8;
inline constexpr uint32_t kSnapOffIdStrSize = 12;
inline constexpr uint32_t kSnapOffNameSize = 14;
inline constexpr uint32_t kSnapOffExtraDataSize = 36;
inline constexpr uint32_t kSnapshotEntryAlignment = 8;
// In the extra data: the snapshot's virtual disk size (bytes 8-15), which
// version 3 requires and older entries may lack.
inline constexpr uint32_t kSnapExtraOffDiskSize = 8;
inline constexpr uint32_t kSnapExtraDiskSizeEnd = 16;
// QEMU's limits: QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE.
inline constexpr uint32_t kMaxSnapshotExtraData = 1024;
inline constexpr uint64_t kMaxSnapshotTableBytes = uint64_t{1024} * kMaxSnapshots;

}  // namespace qcow2fuse::spec

#endif  // QCOW2FUSE_FORMAT_SPEC_H_
