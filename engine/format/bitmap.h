// The bitmap directory ("Bitmaps" in the spec): one entry per persistent
// dirty bitmap, each naming its bitmap table. Decoded from bytes here; the
// caller reads the directory (at most spec::kMaxBitmapDirectoryBytes).

#ifndef QCOW2FUSE_FORMAT_BITMAP_H_
#define QCOW2FUSE_FORMAT_BITMAP_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace qcow2fuse {

struct BitmapDirectoryEntry {
  uint64_t bitmap_table_offset = 0;
  uint32_t bitmap_table_size = 0;  // entries
  uint32_t flags = 0;
  uint8_t type = 0;
  uint8_t granularity_bits = 0;
  uint32_t extra_data_size = 0;
  std::string name;
  // Where the entry starts in the directory, to rewrite its flags.
  uint64_t position = 0;
};

// Decodes `count` entries from `directory`. DataLossError names the entry
// when one runs past the directory.
absl::StatusOr<std::vector<BitmapDirectoryEntry>> DecodeBitmapDirectory(std::span<const uint8_t> directory,
                                                                       uint32_t count);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FORMAT_BITMAP_H_
