// The qcow2 image header and its extensions ("Header" and "Header
// extensions" in the spec), decoded from bytes and validated against the
// size of the file. Pure: no I/O.

#ifndef QCOW2FUSE_FORMAT_HEADER_H_
#define QCOW2FUSE_FORMAT_HEADER_H_

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace qcow2fuse {

struct FeatureName {
  uint8_t type;  // spec::kFeatureType*
  uint8_t bit;
  std::string name;
};

// "Bitmaps extension". Present only when the autoclear bitmaps bit says the
// extension can be trusted.
struct BitmapsExtension {
  uint32_t nb_bitmaps;
  uint64_t bitmap_directory_size;
  uint64_t bitmap_directory_offset;
};

// "Full disk encryption header pointer".
struct FdeExtension {
  uint64_t offset;
  uint64_t length;
};

struct Header {
  // Fixed fields, named as in the spec. Version 3 fields are 0 in a v2 image
  // except refcount_order (4) and header_length (72), which v2 implies.
  uint32_t version = 0;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 0;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 0;
  uint32_t header_length = 0;
  uint8_t compression_type = 0;  // 0 when header_length does not cover it

  // From the header extensions and the backing file name.
  std::string backing_file;    // empty: no backing file
  std::string backing_format;  // empty: not recorded
  std::string data_file;       // external data file name, if recorded
  std::vector<FeatureName> feature_names;
  std::optional<BitmapsExtension> bitmaps;
  std::optional<FdeExtension> full_disk_encryption;
  std::vector<uint32_t> unknown_extensions;  // types skipped, for diagnostics

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  bool has_extended_l2() const;
  bool has_data_file() const;
  bool has_data_file_raw() const;
  uint32_t l2_entry_size() const;
  // Entries in one L2 table (one cluster).
  uint64_t l2_entries() const { return cluster_size() / l2_entry_size(); }
  uint32_t refcount_bits() const { return 1u << refcount_order; }

  // "bit 5 (my_feature)" style description of a feature bit, using the
  // image's feature name table where it names the bit.
  std::string DescribeFeature(uint8_t type, uint8_t bit) const;
};

// How many bytes from the start of an image DecodeHeader() may look at: the
// first cluster of the largest cluster size. Callers read
// min(kHeaderReadSize, file size) bytes.
inline constexpr uint64_t kHeaderReadSize = uint64_t{1} << 21;

// Decodes the header from `bytes` (the start of the image file, at least the
// first cluster or the whole file if it is shorter) and checks every field
// against the spec's rules and `file_size`: offsets aligned and inside the
// file, sizes within QEMU's limits, L1 large enough for the virtual size,
// no unknown incompatible feature. Errors name the field and its value.
absl::StatusOr<Header> DecodeHeader(std::span<const uint8_t> bytes, uint64_t file_size);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FORMAT_HEADER_H_
