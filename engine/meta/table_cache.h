// TableCache: a bounded write-back cache of metadata tables of one image
// file: L2 table slices, or refcount blocks.
//
// An L2 table is one cluster, up to 2 MiB; reading all of it to map one
// cluster would waste I/O and memory, so L2 tables are cached in slices
// (L2SliceSize). Refcount blocks are cached whole.
//
// Reading: Get() returns a shared_ptr to an immutable table; a holder keeps
// the bytes it has even if the entry is evicted or modified meanwhile.
// Writing: GetMutable() makes the cached table private to the cache (copying
// it if a reader still holds it), marks it dirty and returns it for
// modification. Dirty tables are written back only by WriteBack(), which
// the owner calls at the point of its flush protocol where their order is
// right; they are never evicted, so a cache whose entries are all dirty
// grows past its capacity until the owner flushes (over_capacity()).
// Clean tables go least recently used first.
//
// A miss reads the table outside the lock. Should the table change
// meanwhile (Modify, Install, Forget), the bytes read may be older than the
// change, which may already have been written back and evicted; such a
// read is thrown away and done again, so the cache never installs a table
// older than the one it last held.
//
// Thread-safe; the lock is never held across I/O. Tables that readers may
// hold concurrently are changed with Modify(); GetMutable() is for tables
// only their owner reads (refcount blocks, under the owner's lock).

#ifndef QCOW2FUSE_META_TABLE_CACHE_H_
#define QCOW2FUSE_META_TABLE_CACHE_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "base/budget.h"
#include "io/block_file.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

using Table = std::vector<uint8_t>;

// The slice size used for L2 tables of clusters of `cluster_size` bytes.
uint32_t L2SliceSize(uint64_t cluster_size);

class TableCache {
 public:
  // Caches tables of `table_size` bytes of `file`, at most `capacity_bytes`
  // worth of clean tables (and never less than one table). The tables held
  // are charged to `budget` if not null, which must outlive the cache (it
  // gives its bytes back when destroyed); `what` names the cache in its
  // errors, e.g. "the L2 cache of disk.qcow2".
  TableCache(BlockFile* file, uint32_t table_size, uint64_t capacity_bytes,
             MemoryBudget* budget = nullptr, std::string what = "a metadata cache");
  ~TableCache();

  TableCache(const TableCache&) = delete;
  TableCache& operator=(const TableCache&) = delete;

  // The table at host offset `offset` (a multiple of table_size()), read
  // from the file on a miss.
  Task<absl::StatusOr<std::shared_ptr<const Table>>> Get(uint64_t offset);

  // A walk is about to Get the tables at `offset`, `offset + table_size()`,
  // ... (`count` of them) in that order: if the first is not cached, reads
  // it and the uncached ones after it, up to the first that is cached or
  // being read, with one read of the file. A SEEK_DATA across a long hole
  // walks an L2 table slice by slice, and one read of 64 KiB costs the
  // host about what one of 4 KiB does. Only advice: a failed read, or a
  // budget with no room, leaves the tables to Get, which reports errors.
  Task<void> Prefetch(uint64_t offset, uint32_t count);

  // The table at `offset`, for modification; marked dirty. The pointer is
  // valid until the next call into the cache.
  Task<absl::StatusOr<Table*>> GetMutable(uint64_t offset);

  // Applies `change` to the table at `offset` and marks it dirty. The change
  // runs under the cache's lock on a table no reader holds (a held one is
  // copied first), so readers never see a table being changed.
  Task<absl::Status> Modify(uint64_t offset, absl::FunctionRef<void(Table&)> change);

  // Installs `table` (table_size() bytes) as the dirty contents at `offset`
  // without reading the file: for tables the caller has just created. The
  // memory exists already, so it is charged to the budget even past its
  // limit (later misses then evict or fail).
  void Install(uint64_t offset, Table table);

  // Drops the entry at `offset`, dirty or not: its cluster was freed.
  void Forget(uint64_t offset);

  // Writes every dirty table to the file (without flushing it) and marks
  // them clean. Tables are written in offset order.
  Task<absl::Status> WriteBack();

  bool has_dirty() const;
  // Read without the lock: every write asks, and a flush started a
  // request late (or early) is harmless.
  bool over_capacity() const { return over_capacity_.load(std::memory_order_relaxed); }
  uint32_t table_size() const { return table_size_; }
  size_t capacity() const { return capacity_; }

  struct Stats {
    uint64_t hits = 0;
    uint64_t misses = 0;          // Gets that read their table
    uint64_t prefetched = 0;      // tables read by Prefetch
    uint64_t prefetch_reads = 0;  // reads of the file by Prefetch
    uint64_t writes = 0;          // tables written back
    uint64_t dirtied = 0;         // times a clean (or new) table became dirty
    size_t cached = 0;
    size_t dirty = 0;
  };
  Stats stats() const;

 private:
  struct Entry {
    uint64_t offset;
    std::shared_ptr<Table> table;
    bool dirty = false;
  };
  using Lru = std::list<Entry>;  // most recently used first

  Lru::iterator LookupLocked(uint64_t offset);
  // Tells reads in flight of the table at `offset` that it changed.
  void ChangedLocked(uint64_t offset);
  // Inserts a table whose bytes are charged already; if another reader
  // inserted it first, gives the charge back and returns that entry.
  Lru::iterator InsertLocked(uint64_t offset, std::shared_ptr<Table> table);
  void EvictLocked();
  // Takes one table's bytes from the budget, evicting clean tables of this
  // cache (never the most recent) while the budget has no room.
  absl::Status ChargeLocked();
  void UnchargeLocked();
  // Drops an entry; returns the one after it.
  Lru::iterator EraseLocked(Lru::iterator it);
  // After lru_ grew or shrank.
  void SizeChangedLocked() { over_capacity_.store(lru_.size() > capacity_, std::memory_order_relaxed); }

  BlockFile* const file_;
  const uint32_t table_size_;
  const size_t capacity_;  // in tables
  MemoryBudget* const budget_;
  const std::string what_;

  mutable std::mutex mu_;
  Lru lru_;
  absl::flat_hash_map<uint64_t, Lru::iterator> index_;
  // Misses being read from the file, by offset: how many readers, and a
  // version that every change of the table bumps.
  struct Fill {
    int readers = 0;
    uint64_t version = 0;
  };
  absl::flat_hash_map<uint64_t, Fill> fills_;
  size_t dirty_count_ = 0;
  std::atomic<bool> over_capacity_{false};  // lru_.size() > capacity_
  size_t charged_ = 0;  // tables charged to the budget: those in lru_, and misses being read
  Stats stats_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_META_TABLE_CACHE_H_
