// Scheduler: the per-mount executor that runs engine coroutines.
//
// A front end hands each request to the scheduler as a Task, in one of two
// ways:
//  - Start() runs it on the calling thread. The FUSE front end does this
//    from libfuse's worker threads, so a request costs no thread hop; the
//    threads it receives on are the threads that run and wait.
//  - Spawn() queues it for one of the scheduler's own threads and returns
//    at once.
// File I/O is synchronous, so a task holds its thread while it waits for
// the disk: the number of threads is the number of requests that reach the
// disk at once. A task that waits for a lock suspends instead and frees its
// thread; whoever releases the lock resumes it, on the releasing thread.
// Either way the scheduler counts the task until it finishes, which is
// what Drain() waits for.

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
  // `threads` may be 0 when every task is started with Start().
  explicit Scheduler(int threads = 1);
  // Waits for every spawned task to finish, then stops the threads.
  ~Scheduler();

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Runs `task` detached on a scheduler thread. Safe from any thread.
  void Spawn(Task<void> task);

  // Runs `task` detached, starting on the calling thread: returns when it
  // finishes or first suspends. Safe from any thread.
  void Start(Task<void> task);

  // Runs `task` on the calling thread, counted like Start(), and returns
  // when it has finished (the thread sleeps while the task waits).
  void Run(Task<void> task);

  // Tasks started or spawned and not yet finished.
  size_t in_flight() const;

  // Whether the calling thread is one of some Scheduler's own threads (the
  // ones Spawn() runs tasks on), where a coroutine may go on after an
  // await without its caller's say: an image inflates compressed clusters
  // on such threads, and the reader goes on there.
  static bool OnOwnThread();

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
  // Count a task in and out of in_flight_.
  void TaskBegun();
  void TaskDone();
  void RunThread();
  static internal::DetachedCoroutine RunSpawned(Scheduler* self, Task<void> task);
  static internal::DetachedCoroutine RunAndSignal(Scheduler* self, Task<void> task, internal::Event* done);

  mutable std::mutex mu_;
  std::condition_variable work_cv_;   // signalled when queue_ gains work or stop_
  std::condition_variable idle_cv_;   // signalled when in_flight_ drops to zero
  std::deque<std::coroutine_handle<>> queue_;
  size_t in_flight_ = 0;  // spawned tasks not yet finished
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_SCHEDULER_H_
