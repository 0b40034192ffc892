#include "meta/zero_ranges.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace qcow2fuse {

void ZeroRanges::Add(uint64_t begin, uint64_t end) {
  if (begin >= end) return;
  std::lock_guard lock(mu_);
  if (runs_.empty()) {
    runs_.emplace(begin, end);
    return;
  }
  // Absorb every run that overlaps or touches [begin, end).
  auto it = runs_.upper_bound(begin);
  if (it != runs_.begin() && std::prev(it)->second >= begin) --it;
  while (it != runs_.end() && it->first <= end) {
    begin = std::min(begin, it->first);
    end = std::max(end, it->second);
    it = runs_.erase(it);
  }
  if (runs_.size() >= kMaxRanges) return;
  runs_.emplace(begin, end);
}

void ZeroRanges::Remove(uint64_t begin, uint64_t end) {
  if (begin >= end) return;
  std::lock_guard lock(mu_);
  if (runs_.empty()) return;
  auto it = runs_.upper_bound(begin);
  if (it != runs_.begin() && std::prev(it)->second > begin) --it;
  // The parts of cut runs outside [begin, end) go back in afterwards: an
  // insertion invalidates btree iterators.
  std::vector<std::pair<uint64_t, uint64_t>> kept;
  while (it != runs_.end() && it->first < end) {
    if (it->first < begin) kept.emplace_back(it->first, begin);
    if (it->second > end) kept.emplace_back(end, it->second);
    it = runs_.erase(it);
  }
  for (const auto& [b, e] : kept) runs_.emplace(b, e);
}

uint64_t ZeroRanges::ZeroRunAt(uint64_t offset) const {
  std::lock_guard lock(mu_);
  if (runs_.empty()) return 0;
  auto it = runs_.upper_bound(offset);
  if (it == runs_.begin()) return 0;
  --it;
  return it->second > offset ? it->second - offset : 0;
}

size_t ZeroRanges::runs() const {
  std::lock_guard lock(mu_);
  return runs_.size();
}

}  // namespace qcow2fuse
