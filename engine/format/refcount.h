// Refcount block entries ("Host cluster management" in the spec):
// refcount_bits = 1 << refcount_order, from 1 to 64 bits. Entries narrower
// than a byte are packed least significant bits first; wider ones are
// big-endian.

#ifndef QCOW2FUSE_FORMAT_REFCOUNT_H_
#define QCOW2FUSE_FORMAT_REFCOUNT_H_

#include <cstdint>
#include <span>

namespace qcow2fuse {

// Number of entries in a refcount block of one cluster.
inline uint64_t RefcountBlockEntries(uint32_t cluster_bits, uint32_t refcount_order) {
  return (uint64_t{8} << cluster_bits) >> refcount_order;
}

// Largest refcount an entry can hold.
inline uint64_t MaxRefcount(uint32_t refcount_order) {
  const uint32_t bits = 1u << refcount_order;
  return bits == 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
}

// Reads entry `index` of `block`. The caller keeps index below
// RefcountBlockEntries().
uint64_t GetRefcount(std::span<const uint8_t> block, uint64_t index, uint32_t refcount_order);

// Writes entry `index`; `value` must not exceed MaxRefcount().
void SetRefcount(std::span<uint8_t> block, uint64_t index, uint32_t refcount_order, uint64_t value);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FORMAT_REFCOUNT_H_
