// Hand-built qcow2 bytes for the unit tests: a big-endian writer, the fixed
// header fields, header extensions, and a small image builder that lays out
// an L1 table, L2 tables and data clusters in memory.
//
// Header-only, so the unit test target needs no extra source file.
//
//   Qcow2Builder b({.cluster_bits = 12, .size = 8 << 20});
//   b.AddData(0, Pattern(4096, 1));
//   b.SetL2Entry(4096, kOflagZero);
//   auto layer = OpenQcow2(b.bytes());

#ifndef QCOW2FUSE_TESTS_UNIT_QCOW2_BUILDER_H_
#define QCOW2FUSE_TESTS_UNIT_QCOW2_BUILDER_H_

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "support/file_util.h"
#include "support/status_testing.h"  // ASSERT_OK, ASSERT_OK_AND_ASSIGN
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "data/codec.h"
#include "data/layer.h"
#include "data/qcow2_layer.h"
#include "format/header.h"
#include "io/block_file.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse::test {

using Bytes = std::vector<uint8_t>;

// Reads the whole file at `path` into `out`, reusing its storage: a
// checker that reads a disk of a hundred MiB at every crash state would
// otherwise spend its time faulting in fresh pages for each copy.
inline absl::Status ReadBytesInto(const std::string& path, Bytes& out) {
  absl::StatusOr<ScopedFd> fd = OpenReadOnly(path);
  if (!fd.ok()) return fd.status();
  absl::StatusOr<uint64_t> size = FileSize(fd->get());
  if (!size.ok()) return size.status();
  out.resize(*size);
  absl::StatusOr<size_t> n = ReadFully(fd->get(), 0, reinterpret_cast<char*>(out.data()), out.size());
  if (!n.ok()) return n.status();
  if (*n != out.size()) return absl::DataLossError(path + " shrank while it was read");
  return absl::OkStatus();
}

// The whole file at `path`, as bytes.
inline absl::StatusOr<Bytes> ReadBytes(const std::string& path) {
  Bytes bytes;
  absl::Status s = ReadBytesInto(path, bytes);
  if (!s.ok()) return s;
  return bytes;
}

// Replaces the file at `path` with `bytes`.
inline absl::Status WriteBytes(const std::string& path, const Bytes& bytes) {
  unlink(path.c_str());
  return WriteFileAt(path, 0, absl::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

// --- The spec's numbers -------------------------------------------------

// Written out again from qemu's docs/interop/qcow2.txt rather than taken
// from format/spec.h, so that a wrong constant there cannot hide behind the
// same constant here.
inline constexpr uint32_t kMagic = 0x514649fb;

inline constexpr uint32_t kOffIncompatibleFeatures = 72;
inline constexpr uint32_t kOffRefcountOrder = 96;

inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompressionType = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;

inline constexpr uint32_t kCryptLuks = 2;
inline constexpr uint8_t kCompressionZstd = 1;

inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureNameTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtFullDiskEncryption = 0x0537be77;
inline constexpr uint32_t kExtExternalDataFile = 0x44415441;

inline constexpr uint8_t kFeatureTypeIncompatible = 0;
inline constexpr uint8_t kFeatureTypeCompatible = 1;
inline constexpr uint8_t kFeatureTypeAutoclear = 2;

inline constexpr uint64_t kOflagCopied = 1ull << 63;
inline constexpr uint64_t kOflagCompressed = 1ull << 62;
inline constexpr uint64_t kOflagZero = 1ull << 0;
inline constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;  // bits 9-55 of L1 and L2 entries
inline constexpr uint64_t kAllSubclustersAllocated = 0xffffffffull;

// --- Big-endian stores that grow the buffer as needed ---------------------

inline void PutBytes(Bytes& b, uint64_t offset, std::span<const uint8_t> data) {
  if (b.size() < offset + data.size()) b.resize(offset + data.size());
  std::copy(data.begin(), data.end(), b.begin() + offset);
}

inline void PutString(Bytes& b, uint64_t offset, std::string_view s) {
  PutBytes(b, offset, std::span(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
}

inline void PutBE(Bytes& b, uint64_t offset, uint64_t value, int width) {
  uint8_t raw[8];
  for (int i = 0; i < width; ++i) raw[i] = static_cast<uint8_t>(value >> (8 * (width - 1 - i)));
  PutBytes(b, offset, std::span(raw, width));
}
// The big-endian field of `width` bytes at `offset`; bytes past the end
// read as zero.
inline uint64_t GetBE(const Bytes& b, uint64_t offset, int width) {
  uint64_t v = 0;
  for (int i = 0; i < width; ++i) v = (v << 8) | (offset + i < b.size() ? b[offset + i] : 0);
  return v;
}
inline void PutBE8(Bytes& b, uint64_t offset, uint8_t v) { PutBE(b, offset, v, 1); }
inline void PutBE16(Bytes& b, uint64_t offset, uint16_t v) { PutBE(b, offset, v, 2); }
inline void PutBE32(Bytes& b, uint64_t offset, uint32_t v) { PutBE(b, offset, v, 4); }
inline void PutBE64(Bytes& b, uint64_t offset, uint64_t v) { PutBE(b, offset, v, 8); }

// Deterministic, cluster-distinct contents: no two seeds share a run of bytes.
inline Bytes Pattern(size_t n, uint32_t seed) {
  Bytes b(n);
  uint32_t x = seed * 2654435761u + 12345;
  for (size_t i = 0; i < n; ++i) {
    x = x * 1103515245u + 12345;
    b[i] = static_cast<uint8_t>(x >> 16);
  }
  return b;
}

// --- The fixed header -----------------------------------------------------

// The fields of "Header", spelled as in the spec. The defaults describe a
// valid v3 image with 64 KiB clusters and a 1 MiB disk: header in cluster 0,
// refcount table in cluster 1, L1 table in cluster 2; see FileSizeFor().
struct HeaderFields {
  uint32_t magic = kMagic;
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 1 << 20;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 1;
  uint64_t l1_table_offset = 2 << 16;
  uint64_t refcount_table_offset = 1 << 16;
  uint32_t refcount_table_clusters = 1;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = 112;
  uint8_t compression_type = 0;
};

// L1 entries needed for `size` bytes with standard or extended L2 entries.
inline uint32_t L1EntriesFor(uint64_t size, uint32_t cluster_bits, bool extended_l2 = false) {
  const uint64_t l2_entries = (uint64_t{1} << cluster_bits) / (extended_l2 ? 16 : 8);
  const uint64_t per_l1 = (uint64_t{1} << cluster_bits) * l2_entries;
  return static_cast<uint32_t>((size + per_l1 - 1) / per_l1);
}

// Valid fields for `cluster_bits`, laid out as the defaults are.
inline HeaderFields ValidFields(uint32_t cluster_bits = 16) {
  HeaderFields f;
  f.cluster_bits = cluster_bits;
  f.refcount_table_offset = uint64_t{1} << cluster_bits;
  f.l1_table_offset = uint64_t{2} << cluster_bits;
  f.l1_size = L1EntriesFor(f.size, cluster_bits);
  return f;
}

// A file size that holds the header, refcount table and L1 table of `f`.
inline uint64_t FileSizeFor(const HeaderFields& f) {
  const uint64_t cluster = uint64_t{1} << f.cluster_bits;
  const uint64_t l1_bytes = (uint64_t{f.l1_size} * 8 + cluster - 1) / cluster * cluster;
  return std::max(f.l1_table_offset + l1_bytes,
                  f.refcount_table_offset + uint64_t{f.refcount_table_clusters} * cluster);
}

// Writes `f` at the start of `b`: the 72 bytes of a v2 header, or the 104
// bytes of a v3 header plus compression_type when header_length covers it.
inline void PutHeader(Bytes& b, const HeaderFields& f) {
  PutBE32(b, 0, f.magic);
  PutBE32(b, 4, f.version);
  PutBE64(b, 8, f.backing_file_offset);
  PutBE32(b, 16, f.backing_file_size);
  PutBE32(b, 20, f.cluster_bits);
  PutBE64(b, 24, f.size);
  PutBE32(b, 32, f.crypt_method);
  PutBE32(b, 36, f.l1_size);
  PutBE64(b, 40, f.l1_table_offset);
  PutBE64(b, 48, f.refcount_table_offset);
  PutBE32(b, 56, f.refcount_table_clusters);
  PutBE32(b, 60, f.nb_snapshots);
  PutBE64(b, 64, f.snapshots_offset);
  if (f.version == 2) return;
  PutBE64(b, 72, f.incompatible_features);
  PutBE64(b, 80, f.compatible_features);
  PutBE64(b, 88, f.autoclear_features);
  PutBE32(b, 96, f.refcount_order);
  PutBE32(b, 100, f.header_length);
  if (f.header_length > 104) PutBE8(b, 104, f.compression_type);
}

// Writes header extensions one after another from `start`, each padded to
// 8 bytes as the spec requires.
class ExtensionWriter {
 public:
  ExtensionWriter(Bytes& b, uint64_t start) : b_(b), pos_(start) {}

  void Add(uint32_t type, std::span<const uint8_t> data) {
    PutBE32(b_, pos_, type);
    PutBE32(b_, pos_ + 4, static_cast<uint32_t>(data.size()));
    PutBytes(b_, pos_ + 8, data);
    pos_ += 8 + (data.size() + 7) / 8 * 8;
    if (b_.size() < pos_) b_.resize(pos_);
  }
  void AddString(uint32_t type, std::string_view s) {
    Add(type, std::span(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
  }
  // An extension header claiming `length` bytes, with no payload written.
  void AddHeaderOnly(uint32_t type, uint32_t length) {
    PutBE32(b_, pos_, type);
    PutBE32(b_, pos_ + 4, length);
    pos_ += 8;
  }
  void End() {
    PutBE64(b_, pos_, 0);
    pos_ += 8;
  }
  uint64_t pos() const { return pos_; }

 private:
  Bytes& b_;
  uint64_t pos_;
};

// One 48-byte entry of the feature name table.
inline Bytes FeatureNameEntry(uint8_t type, uint8_t bit, std::string_view name) {
  Bytes e(48, 0);
  e[0] = type;
  e[1] = bit;
  std::copy(name.begin(), name.end(), e.begin() + 2);
  return e;
}

// --- A whole image --------------------------------------------------------

// Lays out a qcow2 v3 image: header in cluster 0, an all-zero refcount table
// in cluster 1 (the read path never looks at it), the L1 table from
// cluster 2, and L2 tables and data clusters appended as they are added.
class Qcow2Builder {
 public:
  struct Options {
    uint32_t cluster_bits = 16;
    uint64_t size = 64 << 20;
    bool extended_l2 = false;
    CompressionType compression = CompressionType::kDeflate;
  };

  explicit Qcow2Builder(Options options) : options_(options) {
    fields_ = ValidFields(options.cluster_bits);
    fields_.size = options.size;
    fields_.l1_size = L1EntriesFor(options.size, options.cluster_bits, options.extended_l2);
    if (options.extended_l2) fields_.incompatible_features |= kIncompatExtendedL2;
    if (options.compression == CompressionType::kZstd) {
      fields_.incompatible_features |= kIncompatCompressionType;
      fields_.compression_type = kCompressionZstd;
    }
    PutHeader(bytes_, fields_);
    ExtensionWriter(bytes_, fields_.header_length).End();
    bytes_.resize(FileSizeFor(fields_));
  }

  uint64_t cluster_size() const { return uint64_t{1} << options_.cluster_bits; }
  uint32_t entry_size() const { return options_.extended_l2 ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / entry_size(); }
  const HeaderFields& fields() const { return fields_; }
  Bytes& bytes() { return bytes_; }

  // Appends a zeroed cluster to the file and returns its host offset.
  uint64_t AllocateCluster() {
    const uint64_t offset = (bytes_.size() + cluster_size() - 1) / cluster_size() * cluster_size();
    bytes_.resize(offset + cluster_size());
    return offset;
  }

  void Write(uint64_t offset, std::span<const uint8_t> data) { PutBytes(bytes_, offset, data); }

  void SetL1Entry(uint64_t index, uint64_t value) {
    PutBE64(bytes_, fields_.l1_table_offset + index * 8, value);
  }

  // Host offset of the L2 table that maps `guest_offset`, allocated (and
  // linked from the L1 table with COPIED set) on first use.
  uint64_t L2TableFor(uint64_t guest_offset) {
    const uint64_t index = guest_offset / (cluster_size() * l2_entries());
    const uint64_t entry_offset = fields_.l1_table_offset + index * 8;
    uint64_t l2 = 0;
    for (int i = 0; i < 8; ++i) l2 = (l2 << 8) | bytes_[entry_offset + i];
    l2 &= kOffsetMask;
    if (l2 == 0) {
      l2 = AllocateCluster();
      SetL1Entry(index, l2 | kOflagCopied);
    }
    return l2;
  }

  // Host offset of the L2 entry for `guest_offset`.
  uint64_t L2EntryOffset(uint64_t guest_offset) {
    const uint64_t index = (guest_offset / cluster_size()) % l2_entries();
    return L2TableFor(guest_offset) + index * entry_size();
  }

  // Writes the raw entry for the guest cluster holding `guest_offset`.
  void SetL2Entry(uint64_t guest_offset, uint64_t descriptor, uint64_t bitmap = 0) {
    const uint64_t at = L2EntryOffset(guest_offset);
    PutBE64(bytes_, at, descriptor);
    if (options_.extended_l2) PutBE64(bytes_, at + 8, bitmap);
  }

  // Allocates a host cluster holding `data` (zero padded to a cluster) and
  // maps the guest cluster at `guest_offset` to it: COPIED with standard
  // entries, every subcluster allocated with extended ones. Returns the host
  // offset; data clusters added one after another in one L2 table are
  // contiguous.
  uint64_t AddData(uint64_t guest_offset, std::span<const uint8_t> data) {
    L2TableFor(guest_offset);  // first, so that consecutive data clusters are contiguous
    const uint64_t host = AllocateCluster();
    Write(host, data);
    SetL2Entry(guest_offset, host | kOflagCopied, kAllSubclustersAllocated);
    return host;
  }

  // The descriptor of a compressed cluster of `size` bytes at `host_offset`:
  // bits 0..x-1 the offset, bits x..61 the number of 512-byte sectors after
  // the first that the data touches, x = 62 - (cluster_bits - 8).
  uint64_t CompressedDescriptor(uint64_t host_offset, uint64_t size) const {
    const uint32_t x = 62 - (options_.cluster_bits - 8);
    const uint64_t additional_sectors = (host_offset + size - 1) / 512 - host_offset / 512;
    return kOflagCompressed | (additional_sectors << x) | host_offset;
  }

  // Compresses `cluster` (one cluster of guest data), stores it at
  // `host_offset` (any byte offset) and maps `guest_offset` to it. Returns
  // the compressed size.
  uint64_t AddCompressed(uint64_t guest_offset, std::span<const uint8_t> cluster,
                         uint64_t host_offset) {
    absl::StatusOr<Bytes> compressed = CompressCluster(options_.compression, cluster);
    if (!compressed.ok()) std::abort();
    Write(host_offset, *compressed);
    SetL2Entry(guest_offset, CompressedDescriptor(host_offset, compressed->size()));
    return compressed->size();
  }

 private:
  const Options options_;
  HeaderFields fields_;
  Bytes bytes_;
};

// Decodes the header of `image` and opens it as a Qcow2Layer over an
// in-memory file named "test.qcow2".
inline absl::StatusOr<std::unique_ptr<Qcow2Layer>> OpenQcow2(Bytes image,
                                                             std::unique_ptr<Layer> backing = nullptr) {
  absl::StatusOr<Header> header = DecodeHeader(image, image.size());
  if (!header.ok()) return header.status();
  return SyncWait(Qcow2Layer::Open(NewMemFile("test.qcow2", std::move(image)), std::move(*header),
                                   nullptr, std::move(backing), ImageOptions{}));
}

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_UNIT_QCOW2_BUILDER_H_
