#include "format/bitmap.h"

#include "absl/strings/str_format.h"
#include "base/endian.h"
#include "format/spec.h"

namespace qcow2fuse {

absl::StatusOr<std::vector<BitmapDirectoryEntry>> DecodeBitmapDirectory(std::span<const uint8_t> directory,
                                                                       uint32_t count) {
  std::vector<BitmapDirectoryEntry> entries;
  uint64_t pos = 0;
  for (uint32_t i = 0; i < count; ++i) {
    if (pos > directory.size() || directory.size() - pos < spec::kBitmapDirEntryFixedSize) {
      return absl::DataLossError(
          absl::StrFormat("bitmap directory entry %u (at byte %u) runs past the directory", i, pos));
    }
    const uint8_t* p = directory.data() + pos;
    BitmapDirectoryEntry entry;
    entry.bitmap_table_offset = LoadBE64(p + spec::kBitmapDirOffTableOffset);
    entry.bitmap_table_size = LoadBE32(p + spec::kBitmapDirOffTableSize);
    entry.flags = LoadBE32(p + spec::kBitmapDirOffFlags);
    entry.type = p[spec::kBitmapDirOffType];
    entry.granularity_bits = p[spec::kBitmapDirOffGranularityBits];
    entry.position = pos;
    const uint32_t name_size = LoadBE16(p + spec::kBitmapDirOffNameSize);
    const uint32_t extra_size = LoadBE32(p + spec::kBitmapDirOffExtraDataSize);
    entry.extra_data_size = extra_size;
    const uint64_t length = uint64_t{spec::kBitmapDirEntryFixedSize} + extra_size + name_size;
    if (length > directory.size() - pos) {
      return absl::DataLossError(absl::StrFormat(
          "bitmap directory entry %u (%u bytes at byte %u) runs past the directory", i, length, pos));
    }
    const uint8_t* name = p + spec::kBitmapDirEntryFixedSize + extra_size;
    entry.name.assign(name, name + name_size);
    entries.push_back(std::move(entry));
    pos += (length + spec::kBitmapDirEntryAlignment - 1) / spec::kBitmapDirEntryAlignment *
           spec::kBitmapDirEntryAlignment;
  }
  return entries;
}

}  // namespace qcow2fuse
