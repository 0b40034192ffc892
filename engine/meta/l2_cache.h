// L2Cache: a bounded cache of L2 table slices read from one image file.
//
// An L2 table is one cluster, up to 2 MiB; reading all of it to map one
// cluster would waste I/O and memory, so the cache holds slices (4 KiB, or
// the whole table when clusters are smaller). Slices are shared_ptr: a
// caller keeps the one it holds alive even if it is evicted meanwhile.
// Least recently used slices are dropped first.
//
// Thread-safe; the lock is never held across I/O.

#ifndef QCOW2FUSE_META_L2_CACHE_H_
#define QCOW2FUSE_META_L2_CACHE_H_

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "io/block_file.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

using L2Slice = std::vector<uint8_t>;

class L2Cache {
 public:
  // Slice size used for an image with clusters of `cluster_size` bytes.
  static uint32_t SliceSizeFor(uint64_t cluster_size);

  // Caches slices of `slice_size` bytes of `file`, at most `capacity_bytes`
  // worth (and never fewer than a handful of slices).
  L2Cache(BlockFile* file, uint32_t slice_size, uint64_t capacity_bytes);

  L2Cache(const L2Cache&) = delete;
  L2Cache& operator=(const L2Cache&) = delete;

  // The slice starting at host offset `slice_offset` (a multiple of
  // slice_size()), read from the file on a miss.
  Task<absl::StatusOr<std::shared_ptr<const L2Slice>>> Get(uint64_t slice_offset);

  uint32_t slice_size() const { return slice_size_; }
  size_t capacity() const { return capacity_; }

  struct Stats {
    uint64_t hits = 0;
    uint64_t misses = 0;
    size_t cached = 0;
  };
  Stats stats() const;

 private:
  std::shared_ptr<const L2Slice> Lookup(uint64_t slice_offset);
  void Insert(uint64_t slice_offset, std::shared_ptr<const L2Slice> slice);

  struct Entry {
    uint64_t offset;
    std::shared_ptr<const L2Slice> slice;
  };

  BlockFile* const file_;
  const uint32_t slice_size_;
  const size_t capacity_;  // in slices

  mutable std::mutex mu_;
  std::list<Entry> lru_;  // most recently used first
  absl::flat_hash_map<uint64_t, std::list<Entry>::iterator> index_;
  Stats stats_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_META_L2_CACHE_H_
