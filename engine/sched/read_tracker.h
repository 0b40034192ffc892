// ReadTracker: which requests that may still read host clusters began
// before a given moment, so that a freed host cluster is reused only once
// no reader can still be reading it.
//
// A read maps guest offsets to host offsets (L1, L2) and only then reads
// the host bytes, with no lock between the two: a copy-on-write or a
// discard may meanwhile point the guest cluster elsewhere, a flush may drop
// the old cluster's refcount to zero, and an allocating write may take the
// cluster and fill it with another offset's data, which the read would then
// return. So every request holds a Ticket while it may read host clusters
// or tables, and a host cluster given up at moment M (Now() when its last
// reference was removed from the L2 or L1 table) is freed only once
// M <= Horizon(): requests that began later cannot have seen the old
// mapping. Nothing waits: a free that is not yet safe just stays pending
// until a later flush.
//
// Thread-safe; a Ticket may end on another thread than it began.

#ifndef QCOW2FUSE_SCHED_READ_TRACKER_H_
#define QCOW2FUSE_SCHED_READ_TRACKER_H_

#include <cstdint>
#include <mutex>
#include <utility>

#include "absl/container/btree_set.h"

namespace qcow2fuse {

class ReadTracker {
 public:
  // Held by a request from its first mapping lookup to its last host read.
  class Ticket {
   public:
    Ticket() = default;
    Ticket(Ticket&& other) noexcept
        : tracker_(std::exchange(other.tracker_, nullptr)), id_(other.id_) {}
    Ticket& operator=(Ticket&& other) noexcept {
      if (this != &other) {
        End();
        tracker_ = std::exchange(other.tracker_, nullptr);
        id_ = other.id_;
      }
      return *this;
    }
    ~Ticket() { End(); }

   private:
    friend class ReadTracker;
    Ticket(ReadTracker* tracker, uint64_t id) : tracker_(tracker), id_(id) {}
    void End() {
      if (tracker_ != nullptr) std::exchange(tracker_, nullptr)->Ended(id_);
    }
    ReadTracker* tracker_ = nullptr;
    uint64_t id_ = 0;
  };

  ReadTracker() = default;
  ReadTracker(const ReadTracker&) = delete;
  ReadTracker& operator=(const ReadTracker&) = delete;

  Ticket Begin() {
    std::lock_guard lock(mu_);
    const uint64_t id = next_++;
    active_.insert(id);
    return Ticket(this, id);
  }

  // The current moment: tickets begun from now on are after it.
  uint64_t Now() const {
    std::lock_guard lock(mu_);
    return next_;
  }

  // The latest moment before which every ticket has ended: the oldest
  // ticket still held, or Now() when none is.
  uint64_t Horizon() const {
    std::lock_guard lock(mu_);
    return active_.empty() ? next_ : *active_.begin();
  }

 private:
  void Ended(uint64_t id) {
    std::lock_guard lock(mu_);
    active_.erase(id);
  }

  mutable std::mutex mu_;
  uint64_t next_ = 0;                 // under mu_
  absl::btree_set<uint64_t> active_;  // under mu_: tickets not yet ended
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_SCHED_READ_TRACKER_H_
