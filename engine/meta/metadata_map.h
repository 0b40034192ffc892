// MetadataMap: where an image file keeps its metadata (header, L1 tables,
// L2 tables in use, refcount table and blocks, snapshot table, bitmap
// directory and tables, the data clusters of the bitmaps it maintains), so
// that nothing else is ever written there.
//
// An image is input. A crafted L2 entry can point a guest write at the
// refcount table, a crafted refcount block can call the L1 table's cluster
// free and so hand it out again, a crafted refcount table entry can make a
// refcount block of the L1 table. QEMU guards against all of these with
// its overlap checks ("Preventing invalid write on metadata"); this map is
// ours. The writable layer registers every structure at open, refusing
// structures that overlap one another, keeps the map up to date as tables
// move and grow, and asks Find() before every write of guest data, zeros
// or a new table (Qcow2Layer::CheckHostWrite), and before giving a cluster
// back.
//
// Structures of several clusters are kept as ranges; L2 tables, refcount
// blocks and bitmap data clusters, one cluster each and possibly millions
// of them, as a set of cluster offsets. Thread-safe: writes of guest data ask it without the
// metadata lock.

#ifndef QCOW2FUSE_META_METADATA_MAP_H_
#define QCOW2FUSE_META_METADATA_MAP_H_

#include <cstdint>
#include <optional>
#include <shared_mutex>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"

namespace qcow2fuse {

enum class MetadataKind {
  kHeader,
  kL1Table,
  kL2Table,
  kRefcountTable,
  kRefcountBlock,
  kSnapshotTable,
  kSnapshotL1Table,
  kBitmapDirectory,
  kBitmapTable,
  kBitmapData,  // a cluster of a persistent bitmap's data (meta/dirty_bitmaps)
};

// "the refcount table", "an L2 table", ...
const char* MetadataKindName(MetadataKind kind);

class MetadataMap {
 public:
  explicit MetadataMap(uint32_t cluster_bits) : cluster_bits_(cluster_bits) {}

  MetadataMap(const MetadataMap&) = delete;
  MetadataMap& operator=(const MetadataMap&) = delete;

  struct Hit {
    MetadataKind kind;
    uint64_t offset;  // where the structure starts
  };

  // Registers a structure at [offset, offset + length): a range, or, for
  // L2 tables, refcount blocks and bitmap data, one cluster. DataLossError naming both
  // when it overlaps a structure already registered.
  absl::Status Add(MetadataKind kind, uint64_t offset, uint64_t length);
  // Forgets the structure of `kind` registered at `offset` (nothing if
  // another kind is there).
  void Remove(MetadataKind kind, uint64_t offset);
  // Moves a single-range structure (the L1 table, the refcount table) to a
  // new place, unchecked: the caller has checked the new place with Find.
  // Only a structure of `kind` at `old_offset` is forgotten.
  void Move(MetadataKind kind, uint64_t old_offset, uint64_t new_offset, uint64_t new_length);

  // The first structure that [offset, offset + length) touches, if any.
  std::optional<Hit> Find(uint64_t offset, uint64_t length) const;

  // Bytes of memory each registered cluster costs, for the budget.
  static constexpr uint64_t kBytesPerCluster = 32;

 private:
  std::optional<Hit> FindLocked(uint64_t offset, uint64_t length) const;
  static bool IsCluster(MetadataKind kind) {
    return kind == MetadataKind::kL2Table || kind == MetadataKind::kRefcountBlock ||
           kind == MetadataKind::kBitmapData;
  }

  const uint32_t cluster_bits_;
  mutable std::shared_mutex mu_;
  struct Range {
    uint64_t end;
    MetadataKind kind;
  };
  absl::btree_map<uint64_t, Range> ranges_;  // by start; never overlapping
  absl::flat_hash_map<uint64_t, MetadataKind> clusters_;  // by cluster offset
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_META_METADATA_MAP_H_
