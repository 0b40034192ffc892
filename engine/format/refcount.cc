#include "format/refcount.h"

#include "base/endian.h"

namespace qcow2fuse {

uint64_t GetRefcount(std::span<const uint8_t> block, uint64_t index, uint32_t refcount_order) {
  const uint32_t bits = 1u << refcount_order;
  const uint8_t* p = block.data();
  switch (bits) {
    case 1:
    case 2:
    case 4: {
      const uint64_t bit_pos = index * bits;
      return (p[bit_pos / 8] >> (bit_pos % 8)) & ((1u << bits) - 1);
    }
    case 8: return p[index];
    case 16: return LoadBE16(p + index * 2);
    case 32: return LoadBE32(p + index * 4);
    default: return LoadBE64(p + index * 8);
  }
}

void SetRefcount(std::span<uint8_t> block, uint64_t index, uint32_t refcount_order, uint64_t value) {
  const uint32_t bits = 1u << refcount_order;
  uint8_t* p = block.data();
  switch (bits) {
    case 1:
    case 2:
    case 4: {
      const uint64_t bit_pos = index * bits;
      const uint8_t mask = ((1u << bits) - 1) << (bit_pos % 8);
      uint8_t& byte = p[bit_pos / 8];
      byte = (byte & ~mask) | ((value << (bit_pos % 8)) & mask);
      break;
    }
    case 8: p[index] = static_cast<uint8_t>(value); break;
    case 16: StoreBE16(p + index * 2, static_cast<uint16_t>(value)); break;
    case 32: StoreBE32(p + index * 4, static_cast<uint32_t>(value)); break;
    default: StoreBE64(p + index * 8, value); break;
  }
}

}  // namespace qcow2fuse
