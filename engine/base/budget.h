// MemoryBudget: the memory one open image, with its whole backing chain,
// may spend on structures whose size the image file decides (L1 tables,
// snapshot and bitmap tables, header extensions, metadata caches, the
// structures of a refcount rebuild).
//
// An image is input: a 4 KiB file can claim a 32 GiB bitmap directory or
// a 1 TiB sparse size with 512-byte clusters. Every such allocation takes
// its bytes from the budget before it is made, so a hostile image gets a
// one-line refusal instead of killing the daemon (std::bad_alloc) or the
// host (the OOM killer). The user can raise the limit for a real image
// that needs more (-o max_metadata_memory=SIZE).
//
// Thread-safe: layers of a chain take and give concurrently.

#ifndef QCOW2FUSE_BASE_BUDGET_H_
#define QCOW2FUSE_BASE_BUDGET_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace qcow2fuse {

class MemoryBudget {
 public:
  explicit MemoryBudget(uint64_t limit_bytes);

  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  // Takes `bytes` for `what` (a phrase naming the structure and its file,
  // e.g. "the L1 table of base.qcow2"), or returns ResourceExhaustedError,
  // one line, naming `what`, its size and the budget, and telling the user
  // the option (-o max_metadata_memory=SIZE). Taking nothing always works.
  absl::Status Take(uint64_t bytes, std::string_view what);

  // Counts `bytes` already allocated (a table handed over by its maker),
  // even past the limit: later Take()s then fail until enough is given back.
  void TakeExisting(uint64_t bytes);

  // Gives back bytes taken earlier.
  void Give(uint64_t bytes);

  // The most that one Take() could get now.
  uint64_t available() const;

  uint64_t used() const { return used_.load(std::memory_order_relaxed); }
  uint64_t limit() const { return limit_; }
  // The most ever used at once (for tests and logs).
  uint64_t peak() const { return peak_.load(std::memory_order_relaxed); }

 private:
  void NotePeak(uint64_t used);

  const uint64_t limit_;
  std::atomic<uint64_t> used_{0};
  std::atomic<uint64_t> peak_{0};
};

// Bytes taken from a budget for as long as the object lives (a repair's
// vectors, a table read at open). Movable; gives the bytes back when
// destroyed or reset. A null budget makes it charge nothing.
class BudgetCharge {
 public:
  BudgetCharge() = default;
  ~BudgetCharge() { Reset(); }
  BudgetCharge(BudgetCharge&& other) noexcept;
  BudgetCharge& operator=(BudgetCharge&& other) noexcept;
  BudgetCharge(const BudgetCharge&) = delete;
  BudgetCharge& operator=(const BudgetCharge&) = delete;

  // Takes `bytes` more from `budget` (the budget of earlier takes, if
  // any, must be the same one).
  absl::Status Take(MemoryBudget* budget, uint64_t bytes, std::string_view what);
  // Counts `bytes` already allocated (see MemoryBudget::TakeExisting).
  void TakeExisting(MemoryBudget* budget, uint64_t bytes);
  // Gives everything back.
  void Reset();
  // Lets go of the bytes without giving them back: for structures that
  // live as long as the budget itself (the budget of one open image).
  void Keep() {
    budget_ = nullptr;
    bytes_ = 0;
  }
  uint64_t bytes() const { return bytes_; }

 private:
  MemoryBudget* budget_ = nullptr;
  uint64_t bytes_ = 0;
};

// "32 MiB", "512 KiB", "1000 bytes": sizes in messages, exact when they
// are whole units and rounded to one decimal otherwise.
std::string FormatSize(uint64_t bytes);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_BASE_BUDGET_H_
