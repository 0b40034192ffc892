#include "qcow2fuse/scheduler.h"

#include "qcow2fuse/blocking.h"

namespace qcow2fuse {
namespace {
thread_local bool own_thread = false;
}  // namespace

bool Scheduler::OnOwnThread() { return own_thread; }

Scheduler::Scheduler(int threads) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { RunThread(); });
}

Scheduler::~Scheduler() {
  Drain();
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void Scheduler::Spawn(Task<void> task) {
  TaskBegun();
  Post(RunSpawned(this, std::move(task)).handle);
}

void Scheduler::Start(Task<void> task) {
  TaskBegun();
  RunSpawned(this, std::move(task)).handle.resume();
}

void Scheduler::Run(Task<void> task) {
  TaskBegun();
  internal::Event done;
  RunAndSignal(this, std::move(task), &done).handle.resume();
  if (done.IsSet()) return;
  // The task waits for another request (a lock): this thread sleeps.
  ScopedBlockingCall blocking;
  done.Wait();
}

size_t Scheduler::in_flight() const {
  std::lock_guard lock(mu_);
  return in_flight_;
}

void Scheduler::Drain() {
  std::unique_lock lock(mu_);
  idle_cv_.wait(lock, [this] { return in_flight_ == 0; });
}

void Scheduler::Post(std::coroutine_handle<> h) {
  {
    std::lock_guard lock(mu_);
    queue_.push_back(h);
  }
  work_cv_.notify_one();
}

internal::DetachedCoroutine Scheduler::RunSpawned(Scheduler* self, Task<void> task) {
  co_await std::move(task);
  self->TaskDone();
}

internal::DetachedCoroutine Scheduler::RunAndSignal(Scheduler* self, Task<void> task,
                                                    internal::Event* done) {
  co_await std::move(task);
  self->TaskDone();
  done->Set();
}

void Scheduler::TaskBegun() {
  std::lock_guard lock(mu_);
  ++in_flight_;
}

void Scheduler::TaskDone() {
  std::lock_guard lock(mu_);
  if (--in_flight_ == 0) idle_cv_.notify_all();
}

void Scheduler::RunThread() {
  own_thread = true;
  for (;;) {
    std::coroutine_handle<> h;
    {
      std::unique_lock lock(mu_);
      work_cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      h = queue_.front();
      queue_.pop_front();
    }
    h.resume();
  }
}

}  // namespace qcow2fuse
