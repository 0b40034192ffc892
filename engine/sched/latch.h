// Latch: lets one coroutine wait until `count` others have arrived, e.g.
// a read waiting for the compressed clusters it has inflated in parallel.
//
//   Latch latch(n);
//   for (...) pool.Spawn(Job(..., &latch));   // each ends with Arrive()
//   co_await latch.Wait();
//
// The waiter goes on on the thread of the last arrival (or on its own if
// all arrived before it waited). An arriving job must touch nothing of the
// waiter's after Arrive(): the waiter may have finished by then.

#ifndef QCOW2FUSE_SCHED_LATCH_H_
#define QCOW2FUSE_SCHED_LATCH_H_

#include <atomic>
#include <coroutine>
#include <cstddef>

namespace qcow2fuse {

class Latch {
 public:
  explicit Latch(size_t count) : remaining_(count + 1) {}  // +1: the waiter
  Latch(const Latch&) = delete;
  Latch& operator=(const Latch&) = delete;

  void Arrive() {
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) waiter_.resume();
  }

  // Awaited once.
  auto Wait() {
    struct Awaiter {
      Latch* latch;
      bool await_ready() const noexcept { return false; }
      bool await_suspend(std::coroutine_handle<> h) noexcept {
        latch->waiter_ = h;
        // The waiter's own count goes last: if every job has arrived,
        // nobody will resume it, so it does not suspend.
        return latch->remaining_.fetch_sub(1, std::memory_order_acq_rel) != 1;
      }
      void await_resume() const noexcept {}
    };
    return Awaiter{this};
  }

 private:
  std::atomic<size_t> remaining_;
  std::coroutine_handle<> waiter_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_SCHED_LATCH_H_
