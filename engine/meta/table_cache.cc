#include "meta/table_cache.h"

#include <algorithm>

#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {
// 4 KiB slices match the page size, and QEMU's own default since 3.1.
constexpr uint64_t kDefaultSliceSize = 4096;
}  // namespace

uint32_t L2SliceSize(uint64_t cluster_size) {
  return static_cast<uint32_t>(std::min(cluster_size, kDefaultSliceSize));
}

TableCache::TableCache(BlockFile* file, uint32_t table_size, uint64_t capacity_bytes,
                       MemoryBudget* budget, std::string what)
    : file_(file),
      table_size_(table_size),
      capacity_(std::max<uint64_t>(1, capacity_bytes / table_size)),
      budget_(budget),
      what_(std::move(what)) {}

TableCache::~TableCache() {
  if (budget_ != nullptr) budget_->Give(uint64_t{charged_} * table_size_);
}

Task<absl::StatusOr<std::shared_ptr<const Table>>> TableCache::Get(uint64_t offset) {
  for (;;) {
    uint64_t version;
    {
      std::lock_guard lock(mu_);
      if (auto it = LookupLocked(offset); it != lru_.end()) co_return it->table;
      CO_RETURN_IF_ERROR(ChargeLocked());
      Fill& fill = fills_[offset];
      ++fill.readers;
      version = fill.version;
    }
    auto table = std::make_shared<Table>(table_size_);
    absl::Status status = co_await file_->Read(offset, *table);
    std::lock_guard lock(mu_);
    auto fill = fills_.find(offset);
    const bool stale = fill->second.version != version;
    if (--fill->second.readers == 0) fills_.erase(fill);
    if (!status.ok()) {
      UnchargeLocked();
      co_return status;
    }
    // The table changed while we read it (and may since have been written
    // back and evicted): what we read may predate the change. Installing
    // it would bring an old table back, and the next change would write
    // the old entries back to disk. Read again.
    if (stale) {
      UnchargeLocked();
      continue;
    }
    co_return InsertLocked(offset, std::move(table))->table;
  }
}

Task<void> TableCache::Prefetch(uint64_t offset, uint32_t count) {
  // Claims the run of tables to read as Get claims its one: charged, and
  // registered as a fill so that a change meanwhile marks it stale.
  std::vector<uint64_t> versions;
  {
    std::lock_guard lock(mu_);
    // At most half the cache: the walk's next tables must not evict each
    // other before it gets to them.
    count = static_cast<uint32_t>(std::min<size_t>(count, std::max<size_t>(1, capacity_ / 2)));
    while (versions.size() < count) {
      const uint64_t at = offset + versions.size() * uint64_t{table_size_};
      if (index_.contains(at) || fills_.contains(at)) break;
      if (!ChargeLocked().ok()) break;
      Fill& fill = fills_[at];
      ++fill.readers;
      versions.push_back(fill.version);
    }
  }
  if (versions.empty()) co_return;
  Table bytes(versions.size() * table_size_);
  const absl::Status status = co_await file_->Read(offset, bytes);
  std::lock_guard lock(mu_);
  if (status.ok()) ++stats_.prefetch_reads;
  // Last first, so that the table the walk needs next is the most recently
  // used (an insert may evict the coldest).
  for (size_t i = versions.size(); i-- > 0;) {
    const uint64_t at = offset + i * uint64_t{table_size_};
    auto fill = fills_.find(at);
    const bool stale = fill->second.version != versions[i];
    if (--fill->second.readers == 0) fills_.erase(fill);
    if (!status.ok() || stale) {  // see Get: a stale table is not installed
      UnchargeLocked();
      continue;
    }
    if (index_.contains(at)) {  // a Get read it meanwhile
      UnchargeLocked();
      continue;
    }
    auto first = bytes.begin() + i * table_size_;
    InsertLocked(at, std::make_shared<Table>(first, first + table_size_));
    ++stats_.prefetched;
  }
}

void TableCache::ChangedLocked(uint64_t offset) {
  if (auto fill = fills_.find(offset); fill != fills_.end()) ++fill->second.version;
}

Task<absl::Status> TableCache::Modify(uint64_t offset, absl::FunctionRef<void(Table&)> change) {
  absl::StatusOr<std::shared_ptr<const Table>> loaded = co_await Get(offset);
  if (!loaded.ok()) co_return loaded.status();
  std::shared_ptr<const Table> held = std::move(*loaded);
  std::lock_guard lock(mu_);
  auto it = LookupLocked(offset);
  if (it == lru_.end()) {
    // Evicted since Get(): it comes back.
    CO_RETURN_IF_ERROR(ChargeLocked());
    it = InsertLocked(offset, std::make_shared<Table>(*held));
  }
  held.reset();  // our own reference must not force a copy
  if (it->table.use_count() > 1) it->table = std::make_shared<Table>(*it->table);
  change(*it->table);
  ChangedLocked(offset);
  if (!it->dirty) {
    it->dirty = true;
    ++dirty_count_;
    ++stats_.dirtied;
  }
  co_return absl::OkStatus();
}

Task<absl::StatusOr<Table*>> TableCache::GetMutable(uint64_t offset) {
  Table* table = nullptr;
  CO_RETURN_IF_ERROR(co_await Modify(offset, [&](Table& t) { table = &t; }));
  co_return table;
}

void TableCache::Install(uint64_t offset, Table table) {
  std::lock_guard lock(mu_);
  ChangedLocked(offset);
  if (auto it = index_.find(offset); it != index_.end()) EraseLocked(it->second);
  if (budget_ != nullptr) budget_->TakeExisting(table_size_);
  ++charged_;
  auto it = InsertLocked(offset, std::make_shared<Table>(std::move(table)));
  it->dirty = true;
  ++dirty_count_;
  ++stats_.dirtied;
}

void TableCache::Forget(uint64_t offset) {
  std::lock_guard lock(mu_);
  ChangedLocked(offset);
  auto it = index_.find(offset);
  if (it == index_.end()) return;
  EraseLocked(it->second);
}

Task<absl::Status> TableCache::WriteBack() {
  // Snapshot what is dirty, write it outside the lock, then mark clean the
  // entries that still hold the very table written.
  std::vector<std::pair<uint64_t, std::shared_ptr<Table>>> dirty;
  {
    std::lock_guard lock(mu_);
    for (const Entry& e : lru_) {
      if (e.dirty) dirty.emplace_back(e.offset, e.table);
    }
  }
  std::sort(dirty.begin(), dirty.end());
  for (const auto& [offset, table] : dirty) {
    CO_RETURN_IF_ERROR(co_await file_->Write(offset, *table));
  }
  std::lock_guard lock(mu_);
  for (const auto& [offset, table] : dirty) {
    auto it = index_.find(offset);
    if (it != index_.end() && it->second->dirty && it->second->table == table) {
      it->second->dirty = false;
      --dirty_count_;
    }
    ++stats_.writes;
  }
  EvictLocked();
  co_return absl::OkStatus();
}

bool TableCache::has_dirty() const {
  std::lock_guard lock(mu_);
  return dirty_count_ > 0;
}

TableCache::Stats TableCache::stats() const {
  std::lock_guard lock(mu_);
  Stats s = stats_;
  s.cached = lru_.size();
  s.dirty = dirty_count_;
  return s;
}

TableCache::Lru::iterator TableCache::LookupLocked(uint64_t offset) {
  auto it = index_.find(offset);
  if (it == index_.end()) {
    ++stats_.misses;
    return lru_.end();
  }
  ++stats_.hits;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second;
}

TableCache::Lru::iterator TableCache::InsertLocked(uint64_t offset, std::shared_ptr<Table> table) {
  // Another reader may have loaded it while we read.
  if (auto it = index_.find(offset); it != index_.end()) {
    UnchargeLocked();
    return it->second;
  }
  lru_.push_front({offset, std::move(table)});
  index_[offset] = lru_.begin();
  EvictLocked();
  SizeChangedLocked();
  return lru_.begin();
}

void TableCache::EvictLocked() {
  // Drop clean tables from the cold end; dirty ones wait for WriteBack().
  // The most recent entry stays: its caller is about to use it.
  auto it = lru_.end();
  while (lru_.size() > capacity_ && it != lru_.begin()) {
    --it;
    if (it == lru_.begin()) break;
    if (it->dirty) continue;
    it = EraseLocked(it);
  }
}

TableCache::Lru::iterator TableCache::EraseLocked(Lru::iterator it) {
  index_.erase(it->offset);
  if (it->dirty) --dirty_count_;
  UnchargeLocked();
  Lru::iterator next = lru_.erase(it);
  SizeChangedLocked();
  return next;
}

absl::Status TableCache::ChargeLocked() {
  if (budget_ == nullptr) {
    ++charged_;
    return absl::OkStatus();
  }
  for (;;) {
    absl::Status taken = budget_->Take(table_size_, what_);
    if (taken.ok()) {
      ++charged_;
      return absl::OkStatus();
    }
    // The chain's other structures (or other caches) have the budget:
    // this cache shrinks rather than fail while it can.
    auto victim = std::find_if(lru_.rbegin(), lru_.rend(), [](const Entry& e) { return !e.dirty; });
    if (victim == lru_.rend()) return taken;
    EraseLocked(std::next(victim).base());
  }
}

void TableCache::UnchargeLocked() {
  if (budget_ != nullptr) budget_->Give(table_size_);
  --charged_;
}

}  // namespace qcow2fuse
