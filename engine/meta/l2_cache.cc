#include "meta/l2_cache.h"

#include <algorithm>

namespace qcow2fuse {
namespace {
// 4 KiB slices match the page size, and QEMU's own default since 3.1.
constexpr uint64_t kDefaultSliceSize = 4096;
// Enough slices that one request spanning a few tables never thrashes.
constexpr size_t kMinSlices = 16;
}  // namespace

uint32_t L2Cache::SliceSizeFor(uint64_t cluster_size) {
  return static_cast<uint32_t>(std::min(cluster_size, kDefaultSliceSize));
}

L2Cache::L2Cache(BlockFile* file, uint32_t slice_size, uint64_t capacity_bytes)
    : file_(file),
      slice_size_(slice_size),
      capacity_(std::max<size_t>(kMinSlices, capacity_bytes / slice_size)) {}

Task<absl::StatusOr<std::shared_ptr<const L2Slice>>> L2Cache::Get(uint64_t slice_offset) {
  if (std::shared_ptr<const L2Slice> hit = Lookup(slice_offset)) co_return hit;
  auto slice = std::make_shared<L2Slice>(slice_size_);
  absl::Status status = co_await file_->Read(slice_offset, *slice);
  if (!status.ok()) co_return status;
  Insert(slice_offset, slice);
  co_return std::shared_ptr<const L2Slice>(std::move(slice));
}

std::shared_ptr<const L2Slice> L2Cache::Lookup(uint64_t slice_offset) {
  std::lock_guard lock(mu_);
  auto it = index_.find(slice_offset);
  if (it == index_.end()) {
    ++stats_.misses;
    return nullptr;
  }
  ++stats_.hits;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->slice;
}

void L2Cache::Insert(uint64_t slice_offset, std::shared_ptr<const L2Slice> slice) {
  std::lock_guard lock(mu_);
  if (index_.contains(slice_offset)) return;  // another reader got there first
  lru_.push_front({slice_offset, std::move(slice)});
  index_[slice_offset] = lru_.begin();
  if (lru_.size() > capacity_) {
    index_.erase(lru_.back().offset);
    lru_.pop_back();
  }
}

L2Cache::Stats L2Cache::stats() const {
  std::lock_guard lock(mu_);
  Stats s = stats_;
  s.cached = lru_.size();
  return s;
}

}  // namespace qcow2fuse
