#include "format/header.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/endian.h"
#include "format/spec.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {

bool Header::has_extended_l2() const {
  return (incompatible_features & spec::kIncompatExtendedL2) != 0;
}
bool Header::has_data_file() const { return (incompatible_features & spec::kIncompatDataFile) != 0; }
bool Header::has_data_file_raw() const {
  return has_data_file() && (autoclear_features & spec::kAutoclearDataFileRaw) != 0;
}
uint32_t Header::l2_entry_size() const {
  return has_extended_l2() ? spec::kExtendedL2EntrySize : spec::kL2EntrySize;
}

std::string Header::DescribeFeature(uint8_t type, uint8_t bit) const {
  for (const FeatureName& f : feature_names) {
    if (f.type == type && f.bit == bit) return absl::StrFormat("bit %d (%s)", bit, f.name);
  }
  return absl::StrFormat("bit %d", bit);
}

namespace {

absl::Status Corrupt(const std::string& what) {
  return absl::DataLossError(absl::StrCat("invalid qcow2 header: ", what));
}

bool IsAligned(uint64_t value, uint64_t alignment) { return (value & (alignment - 1)) == 0; }

// True if [offset, offset + length) lies inside a file of `file_size` bytes.
bool InFile(uint64_t offset, uint64_t length, uint64_t file_size) {
  return offset <= file_size && length <= file_size - offset;
}

// A string payload: not NUL-terminated, but tolerate a writer that added one.
std::string ExtensionString(std::span<const uint8_t> data) {
  auto end = std::find(data.begin(), data.end(), 0);
  return std::string(data.begin(), end);
}

absl::Status DecodeFixedFields(std::span<const uint8_t> b, uint64_t file_size, Header& h) {
  if (b.size() < spec::kV2HeaderLength || file_size < spec::kV2HeaderLength) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "not a qcow2 image: %u bytes is too short for a header", std::min<uint64_t>(b.size(), file_size)));
  }
  const uint8_t* p = b.data();
  if (LoadBE32(p + spec::kOffMagic) != spec::kMagic) {
    return absl::InvalidArgumentError("not a qcow2 image (bad magic)");
  }
  h.version = LoadBE32(p + spec::kOffVersion);
  if (h.version != spec::kVersion2 && h.version != spec::kVersion3) {
    return absl::UnimplementedError(absl::StrFormat("unsupported qcow2 version %u", h.version));
  }
  h.backing_file_offset = LoadBE64(p + spec::kOffBackingFileOffset);
  h.backing_file_size = LoadBE32(p + spec::kOffBackingFileSize);
  h.cluster_bits = LoadBE32(p + spec::kOffClusterBits);
  h.size = LoadBE64(p + spec::kOffSize);
  h.crypt_method = LoadBE32(p + spec::kOffCryptMethod);
  h.l1_size = LoadBE32(p + spec::kOffL1Size);
  h.l1_table_offset = LoadBE64(p + spec::kOffL1TableOffset);
  h.refcount_table_offset = LoadBE64(p + spec::kOffRefcountTableOffset);
  h.refcount_table_clusters = LoadBE32(p + spec::kOffRefcountTableClusters);
  h.nb_snapshots = LoadBE32(p + spec::kOffNbSnapshots);
  h.snapshots_offset = LoadBE64(p + spec::kOffSnapshotsOffset);

  if (h.version == spec::kVersion2) {
    h.refcount_order = spec::kV2RefcountOrder;
    h.header_length = spec::kV2HeaderLength;
    return absl::OkStatus();
  }
  if (b.size() < spec::kV3MinHeaderLength || file_size < spec::kV3MinHeaderLength) {
    return Corrupt("file too short for a version 3 header");
  }
  h.incompatible_features = LoadBE64(p + spec::kOffIncompatibleFeatures);
  h.compatible_features = LoadBE64(p + spec::kOffCompatibleFeatures);
  h.autoclear_features = LoadBE64(p + spec::kOffAutoclearFeatures);
  h.refcount_order = LoadBE32(p + spec::kOffRefcountOrder);
  h.header_length = LoadBE32(p + spec::kOffHeaderLength);
  if (h.header_length < spec::kV3MinHeaderLength) {
    return Corrupt(absl::StrFormat("header_length %u is below the minimum of %u", h.header_length,
                                   spec::kV3MinHeaderLength));
  }
  if (h.header_length > b.size() || h.header_length > file_size) {
    return Corrupt(absl::StrFormat("header_length %u runs past the end of the file", h.header_length));
  }
  // A field is present only if header_length covers it.
  if (h.header_length > spec::kOffCompressionType) {
    h.compression_type = LoadBE8(p + spec::kOffCompressionType);
  }
  return absl::OkStatus();
}

absl::Status ValidateClusterBits(const Header& h) {
  if (h.cluster_bits < spec::kMinClusterBits || h.cluster_bits > spec::kMaxClusterBits) {
    return Corrupt(absl::StrFormat("cluster_bits %u is outside %u..%u", h.cluster_bits,
                                   spec::kMinClusterBits, spec::kMaxClusterBits));
  }
  return absl::OkStatus();
}

// Everything else that depends on the cluster size. Runs after the feature
// check, so that an image with an unknown feature is refused for that.
absl::Status ValidateGeometry(const Header& h, uint64_t file_size) {
  const uint64_t cluster_size = h.cluster_size();
  if (h.version == spec::kVersion3) {
    if (h.header_length > cluster_size) {
      return Corrupt(absl::StrFormat("header_length %u is larger than a cluster", h.header_length));
    }
    if (h.header_length > spec::kV3MinHeaderLength &&
        !IsAligned(h.header_length, spec::kHeaderLengthAlignment)) {
      return Corrupt(absl::StrFormat("header_length %u is not a multiple of 8", h.header_length));
    }
  }
  if (h.refcount_order > spec::kMaxRefcountOrder) {
    return Corrupt(absl::StrFormat("refcount_order %u is larger than %u", h.refcount_order,
                                   spec::kMaxRefcountOrder));
  }
  if (h.has_extended_l2() && h.cluster_bits < spec::kMinExtendedL2ClusterBits) {
    return Corrupt(absl::StrFormat("extended L2 entries need clusters of at least %u bytes, not %u",
                                   1u << spec::kMinExtendedL2ClusterBits, cluster_size));
  }

  // L1 table: large enough for the virtual size, within QEMU's limit, in the file.
  if (uint64_t{h.l1_size} * spec::kL2EntrySize > spec::kMaxL1Bytes) {
    return Corrupt(absl::StrFormat("L1 table of %u entries is larger than %u bytes", h.l1_size,
                                   spec::kMaxL1Bytes));
  }
  const uint64_t bytes_per_l1_entry = cluster_size * h.l2_entries();
  const uint64_t l1_needed = h.size / bytes_per_l1_entry + (h.size % bytes_per_l1_entry != 0);
  if (h.l1_size < l1_needed) {
    return Corrupt(absl::StrFormat("L1 table of %u entries is too small for a virtual size of %u "
                                   "bytes (needs %u)",
                                   h.l1_size, h.size, l1_needed));
  }
  if (h.l1_size > 0) {
    if (!IsAligned(h.l1_table_offset, cluster_size) || h.l1_table_offset == 0) {
      return Corrupt(absl::StrFormat("L1 table offset %#x is not cluster aligned", h.l1_table_offset));
    }
    if (!InFile(h.l1_table_offset, uint64_t{h.l1_size} * spec::kL2EntrySize, file_size)) {
      return Corrupt(absl::StrFormat("L1 table at %#x (%u entries) runs past the end of the file "
                                     "(%u bytes)",
                                     h.l1_table_offset, h.l1_size, file_size));
    }
  }

  // Refcount table: only bounds matter to a reader.
  const uint64_t refcount_table_bytes = uint64_t{h.refcount_table_clusters} * cluster_size;
  if (refcount_table_bytes > spec::kMaxRefcountTableBytes) {
    return Corrupt(absl::StrFormat("refcount table of %u clusters is larger than %u bytes",
                                   h.refcount_table_clusters, spec::kMaxRefcountTableBytes));
  }
  if (!IsAligned(h.refcount_table_offset, cluster_size)) {
    return Corrupt(absl::StrFormat("refcount table offset %#x is not cluster aligned",
                                   h.refcount_table_offset));
  }
  if (!InFile(h.refcount_table_offset, refcount_table_bytes, file_size)) {
    return Corrupt(absl::StrFormat("refcount table at %#x runs past the end of the file",
                                   h.refcount_table_offset));
  }

  // Snapshot table.
  if (h.nb_snapshots > spec::kMaxSnapshots) {
    return Corrupt(absl::StrFormat("%u snapshots is more than %u", h.nb_snapshots, spec::kMaxSnapshots));
  }
  if (h.nb_snapshots > 0 &&
      (!IsAligned(h.snapshots_offset, cluster_size) || h.snapshots_offset >= file_size)) {
    return Corrupt(absl::StrFormat("snapshot table offset %#x is invalid", h.snapshots_offset));
  }
  return absl::OkStatus();
}

absl::Status ValidateFeatures(const Header& h) {
  if (h.crypt_method > spec::kCryptLuks) {
    return Corrupt(absl::StrFormat("unknown crypt_method %u", h.crypt_method));
  }
  const uint64_t unknown = h.incompatible_features & ~spec::kIncompatKnown;
  if (unknown != 0) {
    std::vector<std::string> names;
    for (int bit = 0; bit < 64; ++bit) {
      if (unknown & (uint64_t{1} << bit)) {
        names.push_back(h.DescribeFeature(spec::kFeatureTypeIncompatible, bit));
      }
    }
    return absl::UnimplementedError(absl::StrFormat("image uses unsupported incompatible feature %s",
                                                    absl::StrJoin(names, ", ")));
  }
  // Spec, "autoclear_features" bit 1: raw external data only means something
  // with an external data file; QEMU refuses the image without one.
  if ((h.autoclear_features & spec::kAutoclearDataFileRaw) && !h.has_data_file()) {
    return Corrupt("the raw external data bit (autoclear bit 1) is set, but the image has no "
                   "external data file (incompatible bit 2)");
  }
  const bool type_bit = (h.incompatible_features & spec::kIncompatCompressionType) != 0;
  if (h.compression_type != spec::kCompressionDeflate &&
      h.compression_type != spec::kCompressionZstd) {
    return absl::UnimplementedError(
        absl::StrFormat("unknown compression type %u", h.compression_type));
  }
  if (type_bit != (h.compression_type != spec::kCompressionDeflate)) {
    return Corrupt(absl::StrFormat(
        "compression type %u does not agree with the compression type feature bit (%s)",
        h.compression_type, type_bit ? "set" : "clear"));
  }
  return absl::OkStatus();
}

absl::Status DecodeExtension(uint32_t type, std::span<const uint8_t> data, uint64_t file_size,
                             Header& h) {
  switch (type) {
    case spec::kExtBackingFormat:
      h.backing_format = ExtensionString(data);
      break;
    case spec::kExtExternalDataFile:
      h.data_file = ExtensionString(data);
      break;
    case spec::kExtFeatureNameTable:
      for (size_t i = 0; i + spec::kFeatureNameEntrySize <= data.size();
           i += spec::kFeatureNameEntrySize) {
        h.feature_names.push_back(
            {data[i], data[i + 1], ExtensionString(data.subspan(i + 2, spec::kFeatureNameSize))});
      }
      break;
    case spec::kExtBitmaps: {
      // Trusted only while the autoclear bit says a bitmap-aware writer
      // last touched the image.
      if ((h.autoclear_features & spec::kAutoclearBitmaps) == 0) break;
      if (data.size() < spec::kBitmapsExtSize) return Corrupt("bitmaps extension is too short");
      BitmapsExtension e{LoadBE32(data.data()), LoadBE64(data.data() + 8), LoadBE64(data.data() + 16)};
      if (e.nb_bitmaps == 0 || e.nb_bitmaps > spec::kMaxBitmaps) {
        return Corrupt(absl::StrFormat("bitmaps extension lists %u bitmaps", e.nb_bitmaps));
      }
      // The file may be sparse: its size says nothing about what a
      // directory that big would cost in memory.
      if (e.bitmap_directory_size > spec::kMaxBitmapDirectoryBytes) {
        return Corrupt(absl::StrFormat("bitmap directory of %u bytes is larger than the limit of %u",
                                       e.bitmap_directory_size, spec::kMaxBitmapDirectoryBytes));
      }
      if (!InFile(e.bitmap_directory_offset, e.bitmap_directory_size, file_size)) {
        return Corrupt(absl::StrFormat("bitmap directory at %#x (%u bytes) runs past the end of the file",
                                       e.bitmap_directory_offset, e.bitmap_directory_size));
      }
      h.bitmaps = e;
      break;
    }
    case spec::kExtFullDiskEncryption: {
      if (data.size() < spec::kFdeExtSize) return Corrupt("encryption header pointer is too short");
      h.full_disk_encryption = FdeExtension{LoadBE64(data.data()), LoadBE64(data.data() + 8)};
      break;
    }
    default:
      // "Unknown header extensions ... can be safely ignored."
      h.unknown_extensions.push_back(type);
      break;
  }
  return absl::OkStatus();
}

// Walks the extension area: from the end of the header up to the backing
// file name, or to the end of the first cluster.
absl::Status DecodeExtensions(std::span<const uint8_t> b, uint64_t file_size, Header& h) {
  uint64_t end = std::min<uint64_t>(h.cluster_size(), b.size());
  if (h.backing_file_offset != 0) end = std::min(end, h.backing_file_offset);
  uint64_t pos = h.header_length;
  while (pos + spec::kExtHeaderSize <= end) {
    const uint32_t type = LoadBE32(b.data() + pos);
    const uint32_t length = LoadBE32(b.data() + pos + 4);
    pos += spec::kExtHeaderSize;
    if (type == spec::kExtEnd) return absl::OkStatus();
    if (length > end - pos) {
      return Corrupt(absl::StrFormat("header extension %#x at offset %u (%u bytes) runs past the "
                                     "extension area",
                                     type, pos - spec::kExtHeaderSize, length));
    }
    RETURN_IF_ERROR(DecodeExtension(type, b.subspan(pos, length), file_size, h));
    const uint64_t padded = (uint64_t{length} + spec::kExtAlignment - 1) & ~uint64_t{spec::kExtAlignment - 1};
    pos += std::min<uint64_t>(padded, end - pos);
  }
  return absl::OkStatus();
}

absl::Status DecodeBackingFileName(std::span<const uint8_t> b, Header& h) {
  if (h.backing_file_offset == 0) return absl::OkStatus();
  if (h.backing_file_size == 0 || h.backing_file_size > spec::kMaxBackingFileNameSize) {
    return Corrupt(absl::StrFormat("backing file name length %u is not in 1..%u", h.backing_file_size,
                                   spec::kMaxBackingFileNameSize));
  }
  const uint64_t limit = std::min<uint64_t>(h.cluster_size(), b.size());
  if (h.backing_file_offset < h.header_length || h.backing_file_offset > limit ||
      h.backing_file_size > limit - h.backing_file_offset) {
    return Corrupt(absl::StrFormat("backing file name at offset %u (%u bytes) is outside the first "
                                   "cluster",
                                   h.backing_file_offset, h.backing_file_size));
  }
  h.backing_file = std::string(b.begin() + h.backing_file_offset,
                               b.begin() + h.backing_file_offset + h.backing_file_size);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Header> DecodeHeader(std::span<const uint8_t> bytes, uint64_t file_size) {
  Header h;
  RETURN_IF_ERROR(DecodeFixedFields(bytes, file_size, h));
  RETURN_IF_ERROR(ValidateClusterBits(h));
  RETURN_IF_ERROR(DecodeExtensions(bytes, file_size, h));
  RETURN_IF_ERROR(ValidateFeatures(h));
  RETURN_IF_ERROR(ValidateGeometry(h, file_size));
  RETURN_IF_ERROR(DecodeBackingFileName(bytes, h));
  return h;
}

}  // namespace qcow2fuse
