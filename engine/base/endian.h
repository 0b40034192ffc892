// The one place on-disk integers are read and written: qcow2's fields are
// big-endian; those of the MBR and GPT partition tables, and the 64-bit
// words of a persistent bitmap's data, little-endian.

#ifndef QCOW2FUSE_BASE_ENDIAN_H_
#define QCOW2FUSE_BASE_ENDIAN_H_

#include <endian.h>

#include <cstdint>
#include <cstring>

namespace qcow2fuse {

inline uint8_t LoadBE8(const uint8_t* p) { return p[0]; }
inline uint16_t LoadBE16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return be16toh(v);
}
inline uint32_t LoadBE32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return be32toh(v);
}
inline uint64_t LoadBE64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return be64toh(v);
}

inline void StoreBE8(uint8_t* p, uint8_t v) { p[0] = v; }
inline void StoreBE16(uint8_t* p, uint16_t v) {
  v = htobe16(v);
  std::memcpy(p, &v, sizeof v);
}
inline void StoreBE32(uint8_t* p, uint32_t v) {
  v = htobe32(v);
  std::memcpy(p, &v, sizeof v);
}
inline void StoreBE64(uint8_t* p, uint64_t v) {
  v = htobe64(v);
  std::memcpy(p, &v, sizeof v);
}

inline uint16_t LoadLE16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return le16toh(v);
}
inline uint32_t LoadLE32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return le32toh(v);
}
inline uint64_t LoadLE64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return le64toh(v);
}

inline void StoreLE16(uint8_t* p, uint16_t v) {
  v = htole16(v);
  std::memcpy(p, &v, sizeof v);
}
inline void StoreLE32(uint8_t* p, uint32_t v) {
  v = htole32(v);
  std::memcpy(p, &v, sizeof v);
}
inline void StoreLE64(uint8_t* p, uint64_t v) {
  v = htole64(v);
  std::memcpy(p, &v, sizeof v);
}

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_BASE_ENDIAN_H_
