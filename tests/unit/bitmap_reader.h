// The persistent bitmaps of a qcow2 image, decoded from its bytes for
// tests (the crash states, hostile entries), straight from the spec's
// "Bitmaps" section and independently of the engine: the header
// extension, the directory, each bitmap's table and data.
//
//   ASSERT_OK_AND_ASSIGN(std::vector<DecodedBitmap> bitmaps, DecodeBitmaps(bytes));
//   EXPECT_FALSE(bitmaps[0].in_use());
//   EXPECT_TRUE(bitmaps[0].Dirty(4096));

#ifndef QCOW2FUSE_TESTS_UNIT_BITMAP_READER_H_
#define QCOW2FUSE_TESTS_UNIT_BITMAP_READER_H_

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "qcow2_builder.h"  // Bytes, GetBE, kExtBitmaps, kAutoclearBitmaps

namespace qcow2fuse::test {

struct DecodedBitmap {
  std::string name;
  uint64_t entry_offset = 0;  // of the directory entry, in the file
  uint64_t entry_bytes = 0;   // its length, padding included
  uint64_t table_offset = 0;
  uint32_t table_size = 0;
  uint32_t flags = 0;
  uint8_t type = 0;
  uint8_t granularity_bits = 0;
  uint32_t extra_data_size = 0;
  std::vector<uint64_t> table;  // empty unless the data could be read
  // One per granule of the disk; empty unless the table is sound and fits.
  std::vector<bool> bits;

  bool in_use() const { return flags & 1; }
  bool enabled() const { return flags & 2; }
  uint64_t granularity() const { return uint64_t{1} << granularity_bits; }
  bool Dirty(uint64_t byte) const { return bits.at(byte >> granularity_bits); }
};

// Every bitmap the image's bitmaps extension lists (none without the
// extension or its autoclear bit). The bits are decoded for each bitmap
// whose table is well formed and as large as the disk needs.
inline absl::StatusOr<std::vector<DecodedBitmap>> DecodeBitmaps(const Bytes& image) {
  std::vector<DecodedBitmap> out;
  if (image.size() < 104) return absl::InvalidArgumentError("too short for a qcow2 header");
  const uint64_t cluster = uint64_t{1} << GetBE(image, 20, 4);
  const uint64_t disk = GetBE(image, 24, 8) / 512 * 512;
  if ((GetBE(image, 88, 8) & kAutoclearBitmaps) == 0) return out;
  const uint64_t version = GetBE(image, 4, 4);
  uint64_t pos = version >= 3 ? GetBE(image, 100, 4) : 72;
  uint64_t dir_offset = 0, dir_size = 0, count = 0;
  while (pos + 8 <= image.size() && pos < cluster) {
    const uint64_t type = GetBE(image, pos, 4), length = GetBE(image, pos + 4, 4);
    if (type == 0) break;
    if (type == kExtBitmaps) {
      count = GetBE(image, pos + 8, 4);
      dir_size = GetBE(image, pos + 16, 8);
      dir_offset = GetBE(image, pos + 24, 8);
    }
    pos += 8 + (length + 7) / 8 * 8;
  }
  if (dir_size == 0) return out;
  if (dir_offset + dir_size > image.size()) return absl::InvalidArgumentError("bitmap directory past the end");
  uint64_t at = dir_offset;
  for (uint64_t i = 0; i < count; ++i) {
    if (at + 24 > dir_offset + dir_size) return absl::InvalidArgumentError("bitmap directory cut short");
    DecodedBitmap b;
    b.entry_offset = at;
    b.table_offset = GetBE(image, at, 8);
    b.table_size = static_cast<uint32_t>(GetBE(image, at + 8, 4));
    b.flags = static_cast<uint32_t>(GetBE(image, at + 12, 4));
    b.type = static_cast<uint8_t>(GetBE(image, at + 16, 1));
    b.granularity_bits = static_cast<uint8_t>(GetBE(image, at + 17, 1));
    const uint64_t name_size = GetBE(image, at + 18, 2);
    b.extra_data_size = static_cast<uint32_t>(GetBE(image, at + 20, 4));
    const uint64_t name_at = at + 24 + b.extra_data_size;
    if (name_at + name_size > image.size()) return absl::InvalidArgumentError("bitmap name past the end");
    b.name.assign(image.begin() + name_at, image.begin() + name_at + name_size);
    b.entry_bytes = (24 + b.extra_data_size + name_size + 7) / 8 * 8;
    at += b.entry_bytes;

    const bool sane_granularity = b.granularity_bits >= 9 && b.granularity_bits <= 31;
    const uint64_t granules = sane_granularity ? (disk + b.granularity() - 1) / b.granularity() : 0;
    const uint64_t data_bytes = (granules + 7) / 8;
    const uint64_t needed = (data_bytes + cluster - 1) / cluster;
    if (sane_granularity && b.table_size >= needed && b.table_offset % cluster == 0 &&
        b.table_offset + uint64_t{b.table_size} * 8 <= image.size()) {
      bool sound = true;
      for (uint32_t k = 0; k < b.table_size; ++k) {
        const uint64_t e = GetBE(image, b.table_offset + k * 8, 8);
        const uint64_t host = e & 0x00fffffffffffe00ull;
        if ((e & 0xff000000000001feull) != 0 || (host != 0 && (e & 1)) || host % cluster != 0) sound = false;
        b.table.push_back(e);
      }
      if (sound) {
        b.bits.assign(granules, false);
        for (uint64_t g = 0; g < granules; ++g) {
          const uint64_t byte = g / 8;
          const uint64_t e = b.table[byte / cluster];
          const uint64_t host = e & 0x00fffffffffffe00ull;
          if (host == 0) {
            b.bits[g] = (e & 1) != 0;
          } else {
            const uint64_t where = host + byte % cluster;
            // Past the end of the file reads as zeros.
            b.bits[g] = where < image.size() && ((image[where] >> (g % 8)) & 1);
          }
        }
      }
    }
    out.push_back(std::move(b));
  }
  return out;
}

// The bitmap named `name`, or an error.
inline absl::StatusOr<DecodedBitmap> FindBitmap(const std::vector<DecodedBitmap>& bitmaps, const std::string& name) {
  for (const DecodedBitmap& b : bitmaps) {
    if (b.name == name) return b;
  }
  return absl::NotFoundError(absl::StrCat("no bitmap named ", name));
}

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_UNIT_BITMAP_READER_H_
