#include "format/l2_entry.h"

#include <cstring>

#include "base/endian.h"
#include "format/spec.h"

namespace qcow2fuse {

uint64_t L1EntryL2Offset(uint64_t l1_entry) { return l1_entry & spec::kL1OffsetMask; }

uint32_t L2Format::entry_size() const {
  return extended_l2 ? spec::kExtendedL2EntrySize : spec::kL2EntrySize;
}
uint32_t L2Format::subclusters_per_cluster() const {
  return extended_l2 ? spec::kSubclustersPerCluster : 1;
}
uint32_t L2Format::subcluster_bits() const {
  return extended_l2 ? cluster_bits - spec::kSubclustersPerClusterBits : cluster_bits;
}

L2Entry DecodeL2Entry(const uint8_t* p, const L2Format& format) {
  L2Entry e;
  e.descriptor = LoadBE64(p);
  if (format.extended_l2) e.bitmap = LoadBE64(p + spec::kL2EntrySize);
  return e;
}

void EncodeL2Entry(const L2Entry& entry, uint8_t* p, const L2Format& format) {
  StoreBE64(p, entry.descriptor);
  if (format.extended_l2) StoreBE64(p + spec::kL2EntrySize, entry.bitmap);
}

uint64_t CountZeroL2Entries(const uint8_t* p, uint64_t count, const L2Format& format) {
  // Whole words, compared in memory order: a zero entry is zero in any byte
  // order, so there is nothing to decode.
  const uint64_t words_per_entry = format.entry_size() / sizeof(uint64_t);
  const uint64_t words = count * words_per_entry;
  uint64_t i = 0;
  for (; i < words; ++i) {
    uint64_t word;
    std::memcpy(&word, p + i * sizeof word, sizeof word);
    if (word != 0) break;
  }
  return i / words_per_entry;
}

uint64_t L2EntryHostOffset(const L2Entry& entry) { return entry.descriptor & spec::kL2OffsetMask; }

uint64_t L2EntryReservedBits(const L2Entry& entry, const L2Format& format) {
  if (entry.descriptor & spec::kOflagCompressed) return 0;
  uint64_t reserved = spec::kL2StandardReservedMask;
  // With extended L2 entries bit 0 is reserved too: zeroes are in the bitmap.
  if (format.extended_l2) reserved |= spec::kOflagZero;
  return entry.descriptor & reserved;
}

const char* SubclusterTypeName(SubclusterType type) {
  switch (type) {
    case SubclusterType::kUnallocatedPlain: return "unallocated";
    case SubclusterType::kUnallocatedAlloc: return "unallocated (host cluster allocated)";
    case SubclusterType::kZeroPlain: return "zero";
    case SubclusterType::kZeroAlloc: return "zero (host cluster allocated)";
    case SubclusterType::kNormal: return "data";
    case SubclusterType::kCompressed: return "compressed";
    case SubclusterType::kInvalid: return "invalid";
  }
  return "?";
}

SubclusterType GetSubclusterType(const L2Entry& entry, uint32_t index, const L2Format& format) {
  if (entry.descriptor & spec::kOflagCompressed) return SubclusterType::kCompressed;

  bool has_host_cluster = L2EntryHostOffset(entry) != 0;
  // External data files map guest cluster 0 to host offset 0; all their
  // clusters have refcount 1, so COPIED marks an allocated one.
  if (!has_host_cluster && format.external_data_file && (entry.descriptor & spec::kOflagCopied)) {
    has_host_cluster = true;
  }

  if (!format.extended_l2) {
    if (entry.descriptor & spec::kOflagZero) {
      return has_host_cluster ? SubclusterType::kZeroAlloc : SubclusterType::kZeroPlain;
    }
    return has_host_cluster ? SubclusterType::kNormal : SubclusterType::kUnallocatedPlain;
  }

  const bool allocated = (entry.bitmap >> index) & 1;
  const bool zero = (entry.bitmap >> (spec::kSubclusterZeroShift + index)) & 1;
  if (allocated && zero) return SubclusterType::kInvalid;
  if (has_host_cluster) {
    if (allocated) return SubclusterType::kNormal;
    return zero ? SubclusterType::kZeroAlloc : SubclusterType::kUnallocatedAlloc;
  }
  if (allocated) return SubclusterType::kInvalid;  // data with nowhere to be
  return zero ? SubclusterType::kZeroPlain : SubclusterType::kUnallocatedPlain;
}

CompressedDescriptor DecodeCompressedDescriptor(uint64_t descriptor, uint32_t cluster_bits) {
  const uint32_t offset_bits = spec::CompressedOffsetBits(cluster_bits);
  const uint64_t offset_mask = (uint64_t{1} << offset_bits) - 1;
  // Bits offset_bits..61 hold the number of additional 512-byte sectors.
  const uint64_t sector_mask = (uint64_t{1} << (spec::kCompressedDescriptorBits - offset_bits)) - 1;
  CompressedDescriptor d;
  d.host_offset = descriptor & offset_mask;
  const uint64_t additional_sectors = (descriptor >> offset_bits) & sector_mask;
  d.max_size = (additional_sectors + 1) * spec::kCompressedSectorSize -
               (d.host_offset & (spec::kCompressedSectorSize - 1));
  return d;
}

}  // namespace qcow2fuse
