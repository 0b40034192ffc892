// IsAllZero: whether a buffer holds only zero bytes. Used where zeros need
// not be written: detect_zeroes, and the copy-on-write of a new cluster.

#ifndef QCOW2FUSE_BASE_ALL_ZERO_H_
#define QCOW2FUSE_BASE_ALL_ZERO_H_

#include <cstdint>
#include <cstring>
#include <span>

namespace qcow2fuse {

inline bool IsAllZero(std::span<const uint8_t> data) {
  // Compares the buffer with itself shifted by one byte: memcmp's speed
  // without a zero buffer to compare against.
  return data.empty() || (data[0] == 0 && std::memcmp(data.data(), data.data() + 1, data.size() - 1) == 0);
}

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_BASE_ALL_ZERO_H_
