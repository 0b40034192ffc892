// Scheduler: the per-mount executor that runs engine coroutines.
//
// Front ends hand each request to Spawn() as a Task and return at once; the
// task then runs on one of the scheduler's threads and replies to its caller
// itself. File I/O is synchronous, so a task holds its thread while it
// waits for the disk: the number of threads is the number of requests that
// reach the disk at once. A task that waits for a lock suspends instead and
// frees its thread; whoever releases the lock resumes it.

#ifndef QCOW2FUSE_SCHEDULER_H_
#define QCOW2FUSE_SCHEDULER_H_

#include <condition_variable>
#include <coroutine>
#include <cstddef>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "qcow2fuse/task.h"

namespace qcow2fuse {

class Scheduler {
 public:
  explicit Scheduler(int threads = 1);
  // Waits for every spawned task to finish, then stops the threads.
  ~Scheduler();

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Runs `task` detached on a scheduler thread. Safe from any thread.
  void Spawn(Task<void> task);

  // Blocks until every task spawned so far (and any they spawned) is done.
  void Drain();

  // `co_await scheduler.Schedule()` moves the awaiting coroutine onto a
  // scheduler thread.
  auto Schedule() {
    struct Awaiter {
      Scheduler* scheduler;
      bool await_ready() const noexcept { return false; }
      void await_suspend(std::coroutine_handle<> h) { scheduler->Post(h); }
      void await_resume() const noexcept {}
    };
    return Awaiter{this};
  }

 private:
  void Post(std::coroutine_handle<> h);
  void RunThread();
  static internal::DetachedCoroutine RunSpawned(Scheduler* self, Task<void> task);

  std::mutex mu_;
  std::condition_variable work_cv_;   // signalled when queue_ gains work or stop_
  std::condition_variable idle_cv_;   // signalled when in_flight_ drops to zero
  std::deque<std::coroutine_handle<>> queue_;
  size_t in_flight_ = 0;  // spawned tasks not yet finished
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_SCHEDULER_H_
