// Refcounts: the refcount table and refcount blocks of one image ("Host
// cluster management" in the spec), and the allocation of host clusters.
//
// Every cluster the image uses (header, tables, data) has a refcount; 0
// means free. Changes go to refcount blocks in a write-back TableCache and
// to the in-memory refcount table; WriteBack() puts them on disk in the
// order that keeps the image consistent: blocks first, then, after a
// barrier, the table entries that point to new blocks.
//
// Growth: a missing refcount block is created at the end of the image; it
// describes itself when its own cluster falls in its range, and is counted
// in another block otherwise. A full refcount table is replaced by a larger
// one at the end of the image, together with the refcount blocks that
// describe the new table and themselves; the header is switched to it only
// once all of that is durable, and the old table is freed after.
//
// Damage: Load() refuses a refcount table entry that points at a block
// outside the file, twice at one block, or at other metadata (through the
// MetadataMap, if given, where it registers the table and its blocks and
// keeps them up to date as they move). Freeing never creates a block or
// grows the table: a decrement of a cluster no block describes finds the
// image inconsistent (DataLossError) instead of allocating metadata, which
// could be unbounded, for a cluster a crafted entry names far past the end.
//
// Callers serialise all calls (one metadata writer at a time).

#ifndef QCOW2FUSE_META_REFCOUNTS_H_
#define QCOW2FUSE_META_REFCOUNTS_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "base/budget.h"
#include "format/header.h"
#include "io/block_file.h"
#include "meta/header_writer.h"
#include "meta/metadata_map.h"
#include "meta/table_cache.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

class Refcounts {
 public:
  // `header` gives the geometry and the table's location; `file` must be
  // writable for anything but Get(). `map`, `budget` (the cache's memory)
  // and `header_writer` (the image's, which its flushes settle), if not
  // null, outlive this; without a header writer it uses one of its own.
  Refcounts(BlockFile* file, const Header& header, uint64_t cache_bytes, MetadataMap* map = nullptr,
            MemoryBudget* budget = nullptr, HeaderWriter* header_writer = nullptr);

  Refcounts(const Refcounts&) = delete;
  Refcounts& operator=(const Refcounts&) = delete;

  // Reads the refcount table. Must precede everything else.
  Task<absl::Status> Load();

  // The refcount of the cluster at `cluster_index`.
  Task<absl::StatusOr<uint64_t>> Get(uint64_t cluster_index);

  // Adds `delta` to the refcount of each of `count` clusters starting at
  // host offset `offset` (cluster aligned). A refcount may not go below 0
  // (DataLossError: the image was inconsistent) or above the maximum of
  // the refcount width (OutOfRangeError).
  Task<absl::Status> Update(uint64_t offset, uint64_t count, int64_t delta);

  // Finds `count` contiguous free clusters, sets their refcounts to 1 and
  // returns the host offset of the first.
  Task<absl::StatusOr<uint64_t>> Allocate(uint64_t count);

  // Writes dirty refcount blocks, then (after a barrier, if needed) dirty
  // refcount table entries. Leaves them un-flushed: the caller's next
  // barrier makes them durable.
  Task<absl::Status> WriteBack();

  // Host ranges (offset, bytes) whose refcount dropped to 0 since the last
  // call and is still 0, for the caller to discard once the drop is
  // durable.
  std::vector<std::pair<uint64_t, uint64_t>> TakeFreed();

  // Whether [offset, offset + length) touches the refcount table or a
  // refcount block.
  bool OverlapsMetadata(uint64_t offset, uint64_t length) const;

  bool has_dirty() const;
  // Refcount blocks and table entries written so far.
  uint64_t metadata_writes() const { return writes_ + blocks_.stats().writes; }
  // More refcount blocks are cached than the cache should hold: flush.
  bool over_capacity() const { return blocks_.over_capacity(); }
  uint64_t table_offset() const { return table_offset_; }
  uint32_t table_clusters() const { return table_clusters_; }
  // One past the highest cluster index in use or handed out.
  uint64_t end_cluster() const { return end_cluster_; }

 private:
  uint64_t entries_per_block() const { return block_entries_; }
  Task<absl::Status> EnsureBlock(uint64_t block_index);
  Task<absl::Status> GrowTable(uint64_t min_entries);
  // The next cluster at the end of the image, for new refcount metadata.
  Task<absl::StatusOr<uint64_t>> TakeEndCluster();

  BlockFile* const file_;
  MetadataMap* const map_;
  std::unique_ptr<HeaderWriter> own_header_writer_;  // when none is given
  HeaderWriter* const header_writer_;
  const uint32_t cluster_bits_;
  const uint32_t refcount_order_;
  const uint64_t block_entries_;
  uint64_t table_offset_;
  uint32_t table_clusters_;
  std::vector<uint64_t> table_;  // refcount block offsets; 0 = none
  absl::flat_hash_set<uint64_t> block_offsets_;  // the nonzero entries of table_
  absl::btree_set<uint64_t> dirty_table_entries_;
  TableCache blocks_;
  uint64_t free_hint_ = 0;   // no free cluster below this index
  uint64_t end_cluster_ = 0;
  absl::btree_set<uint64_t> freed_;  // cluster indices now at refcount 0
  uint64_t writes_ = 0;  // writes other than blocks_ write-backs
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_META_REFCOUNTS_H_
