#include "format/snapshot.h"

#include "absl/strings/str_format.h"
#include "base/endian.h"
#include "format/spec.h"

namespace qcow2fuse {

SnapshotTable DecodeSnapshotEntries(std::span<const uint8_t> table, uint32_t count) {
  SnapshotTable result;
  uint64_t pos = 0;
  for (uint32_t i = 0; i < count; ++i) {
    pos = (pos + spec::kSnapshotEntryAlignment - 1) / spec::kSnapshotEntryAlignment * spec::kSnapshotEntryAlignment;
    if (pos > table.size() || table.size() - pos < spec::kSnapshotFixedSize) {
      result.error = absl::DataLossError(absl::StrFormat(
          "snapshot table entry %u (at byte %u of the table) runs past the end of the table", i, pos));
      break;
    }
    const uint8_t* p = table.data() + pos;
    SnapshotEntry entry;
    entry.l1_table_offset = LoadBE64(p + spec::kSnapOffL1TableOffset);
    entry.l1_size = LoadBE32(p + spec::kSnapOffL1Size);
    const uint32_t id_size = LoadBE16(p + spec::kSnapOffIdStrSize);
    const uint32_t name_size = LoadBE16(p + spec::kSnapOffNameSize);
    const uint32_t extra_size = LoadBE32(p + spec::kSnapOffExtraDataSize);
    if (extra_size > spec::kMaxSnapshotExtraData) {
      result.error = absl::DataLossError(absl::StrFormat(
          "snapshot table entry %u (at byte %u of the table) has %u bytes of extra data, more than "
          "the limit of %u",
          i, pos, extra_size, spec::kMaxSnapshotExtraData));
      break;
    }
    const uint64_t length = uint64_t{spec::kSnapshotFixedSize} + extra_size + id_size + name_size;
    if (length > table.size() - pos) {
      result.error = absl::DataLossError(absl::StrFormat(
          "snapshot table entry %u (%u bytes at byte %u of the table) runs past the end of the table",
          i, length, pos));
      break;
    }
    if (extra_size >= spec::kSnapExtraDiskSizeEnd) {
      entry.has_disk_size = true;
      entry.disk_size = LoadBE64(p + spec::kSnapshotFixedSize + spec::kSnapExtraOffDiskSize);
    }
    const uint8_t* id = p + spec::kSnapshotFixedSize + extra_size;
    entry.id.assign(id, id + id_size);
    entry.name.assign(id + id_size, id + id_size + name_size);
    result.entries.push_back(std::move(entry));
    pos += length;
  }
  result.bytes = pos;
  return result;
}

absl::StatusOr<SnapshotTable> DecodeSnapshotTable(std::span<const uint8_t> table, uint32_t count) {
  SnapshotTable result = DecodeSnapshotEntries(table, count);
  if (!result.error.ok()) return result.error;
  return result;
}

}  // namespace qcow2fuse
