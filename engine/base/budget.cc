#include "base/budget.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"

namespace qcow2fuse {

MemoryBudget::MemoryBudget(uint64_t limit_bytes) : limit_(limit_bytes) {}

absl::Status MemoryBudget::Take(uint64_t bytes, std::string_view what) {
  uint64_t used = used_.load(std::memory_order_relaxed);
  for (;;) {
    if (bytes > limit_ || used > limit_ - bytes) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s needs %s, more than the metadata memory budget has left (%s of %s); "
          "allow more with -o max_metadata_memory=SIZE",
          what, FormatSize(bytes), FormatSize(limit_ - std::min(used, limit_)), FormatSize(limit_)));
    }
    if (used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed)) {
      NotePeak(used + bytes);
      return absl::OkStatus();
    }
  }
}

void MemoryBudget::TakeExisting(uint64_t bytes) {
  NotePeak(used_.fetch_add(bytes, std::memory_order_relaxed) + bytes);
}

void MemoryBudget::NotePeak(uint64_t used) {
  uint64_t peak = peak_.load(std::memory_order_relaxed);
  while (used > peak && !peak_.compare_exchange_weak(peak, used, std::memory_order_relaxed)) {
  }
}

void MemoryBudget::Give(uint64_t bytes) { used_.fetch_sub(bytes, std::memory_order_relaxed); }

uint64_t MemoryBudget::available() const {
  const uint64_t used = used_.load(std::memory_order_relaxed);
  return used >= limit_ ? 0 : limit_ - used;
}

BudgetCharge::BudgetCharge(BudgetCharge&& other) noexcept
    : budget_(std::exchange(other.budget_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

BudgetCharge& BudgetCharge::operator=(BudgetCharge&& other) noexcept {
  if (this != &other) {
    Reset();
    budget_ = std::exchange(other.budget_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

absl::Status BudgetCharge::Take(MemoryBudget* budget, uint64_t bytes, std::string_view what) {
  if (budget == nullptr) return absl::OkStatus();
  if (absl::Status st = budget->Take(bytes, what); !st.ok()) return st;
  budget_ = budget;
  bytes_ += bytes;
  return absl::OkStatus();
}

void BudgetCharge::TakeExisting(MemoryBudget* budget, uint64_t bytes) {
  if (budget == nullptr) return;
  budget->TakeExisting(bytes);
  budget_ = budget;
  bytes_ += bytes;
}

void BudgetCharge::Reset() {
  if (budget_ != nullptr && bytes_ > 0) budget_->Give(bytes_);
  bytes_ = 0;
}

std::string FormatSize(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return absl::StrFormat("%u bytes", bytes);
  int unit = 0;
  uint64_t scale = 1024;
  while (unit + 1 < 6 && bytes / scale >= 1024) {
    scale *= 1024;
    ++unit;
  }
  if (bytes % scale == 0) return absl::StrFormat("%u %s", bytes / scale, kUnits[unit]);
  return absl::StrFormat("%.1f %s", static_cast<double>(bytes) / static_cast<double>(scale), kUnits[unit]);
}

}  // namespace qcow2fuse
