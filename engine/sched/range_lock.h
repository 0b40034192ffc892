// RangeLock: a coroutine lock over ranges of guest clusters.
//
// Every request that changes L2 entries (an allocating or copy-on-write
// write, a discard, a write-zeroes, a preallocation) holds its clusters
// exclusively from its first lookup to its last store, so that no other
// request sees or changes those entries halfway. Without it, a discard
// could free a cluster while an allocating write into it is in flight, and
// the write would then link the freed cluster back (QEMU carried that race
// from 2011 to 2026), or two partial writes into one unallocated cluster
// would each allocate a copy and one would be lost.
//
// Requests over disjoint ranges never wait for each other. A request waits
// for every earlier holder and waiter it overlaps, in arrival order, so a
// stream of small requests cannot starve a large one. A waiting coroutine
// suspends; it is resumed by the Unlock() that frees its range, on the
// unlocking thread.

#ifndef QCOW2FUSE_SCHED_RANGE_LOCK_H_
#define QCOW2FUSE_SCHED_RANGE_LOCK_H_

#include <coroutine>
#include <cstdint>
#include <list>
#include <mutex>

namespace qcow2fuse {

class RangeLock {
 public:
  // A held range; releases it when destroyed.
  class Guard {
   public:
    Guard() = default;
    Guard(Guard&& other) noexcept;
    Guard& operator=(Guard&& other) noexcept;
    ~Guard() { Release(); }
    void Release();

   private:
    friend class RangeLock;
    Guard(RangeLock* lock, void* holder) : lock_(lock), holder_(holder) {}
    RangeLock* lock_ = nullptr;
    void* holder_ = nullptr;
  };

  RangeLock() = default;
  RangeLock(const RangeLock&) = delete;
  RangeLock& operator=(const RangeLock&) = delete;

  // `co_await lock.Lock(first, last)` holds clusters first..last
  // (inclusive) until the returned Guard goes.
  auto Lock(uint64_t first, uint64_t last) {
    struct Awaiter {
      RangeLock* lock;
      Request* request;
      bool await_ready() { return lock->TryAcquire(request); }
      bool await_suspend(std::coroutine_handle<> h) { return lock->Park(request, h); }
      Guard await_resume() { return Guard(lock, request); }
    };
    return Awaiter{this, NewRequest(first, last)};
  }

  // Requests that hold a range or wait for one; for tests.
  size_t held() const;
  size_t waiting() const;

 private:
  struct Request {
    uint64_t first, last;
    bool granted = false;
    std::coroutine_handle<> waiter;
  };

  Request* NewRequest(uint64_t first, uint64_t last);
  bool TryAcquire(Request* request);
  // Returns false if the request was granted meanwhile (do not suspend).
  bool Park(Request* request, std::coroutine_handle<> h);
  void Unlock(Request* request);
  // Whether `request` overlaps a request before it in requests_.
  bool BlockedLocked(const Request& request) const;

  mutable std::mutex mu_;
  // Holders and waiters in arrival order.
  std::list<Request> requests_;
};

// AsyncMutex: a coroutine mutex, FIFO. `co_await mu.Lock()` returns a
// guard; a coroutine that must wait suspends instead of blocking its thread,
// so a holder may await I/O without stalling other requests.
class AsyncMutex {
 public:
  auto Lock() { return lock_.Lock(0, 0); }

 private:
  RangeLock lock_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_SCHED_RANGE_LOCK_H_
