// The snapshot table ("Snapshots" in the spec): one entry per internal
// snapshot, each naming the snapshot's own L1 table. Decoded from bytes
// here; the caller reads them (at most spec::kMaxSnapshotTableBytes).

#ifndef QCOW2FUSE_FORMAT_SNAPSHOT_H_
#define QCOW2FUSE_FORMAT_SNAPSHOT_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcow2fuse {

struct SnapshotEntry {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;  // entries
  std::string id;
  std::string name;
  // The disk's size when the snapshot was taken (extra data), if
  // has_disk_size: entries older than version 3 may lack it, and then QEMU
  // takes the image's current size. (Not a std::optional: with one here,
  // GCC 12 crashes compiling meta/check.cc under -fsanitize=thread.)
  bool has_disk_size = false;
  uint64_t disk_size = 0;
};

struct SnapshotTable {
  std::vector<SnapshotEntry> entries;
  // Bytes from the table's start to the end of its last entry (QEMU's
  // size of the table: no padding after the last entry).
  uint64_t bytes = 0;
  // DecodeSnapshotEntries: the first entry that could not be decoded
  // (DataLossError naming it and what is wrong); `entries` holds those
  // before it.
  absl::Status error;
};

// Decodes `count` entries from `table`, the bytes at the table's offset
// (fewer than the table needs if the file ends first), up to the first
// that runs past `table` or has extra data beyond QEMU's limit. For the
// checker, which reports that entry and goes on with the others.
SnapshotTable DecodeSnapshotEntries(std::span<const uint8_t> table, uint32_t count);

// The same, but any entry that cannot be decoded fails the whole table.
absl::StatusOr<SnapshotTable> DecodeSnapshotTable(std::span<const uint8_t> table, uint32_t count);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FORMAT_SNAPSHOT_H_
