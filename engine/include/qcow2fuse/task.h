// Task<T>: the coroutine type of every asynchronous engine operation.
//
// A Task is lazy: calling a coroutine that returns Task<T> creates its frame
// and runs nothing. Work starts when the Task is awaited (`co_await task`),
// and the awaiting coroutine continues, on whatever thread finished the
// task, when it co_returns. Tasks are move-only and awaited at most once; a
// Task destroyed unawaited simply frees its frame.
//
// Most tasks finish without ever suspending (the data was cached, the I/O
// completed inline). The awaiter then continues on its own stack frame
// instead of being resumed from inside the finished task, so a loop that
// awaits a million such tasks uses no more stack than one; this holds at
// every optimisation level, unlike symmetric transfer, which relies on the
// compiler turning resume() into a tail call. Which side continues is
// settled by one atomic flag that the task's end and the awaiter both set:
// whoever comes second goes on.
//
// Top-level code starts tasks with SyncWait() (blocks the calling thread
// until the task is done) or the Scheduler (Start, Run, Spawn).
//
// The engine never throws; an exception escaping a coroutine terminates.

#ifndef QCOW2FUSE_TASK_H_
#define QCOW2FUSE_TASK_H_

#include <atomic>
#include <condition_variable>
#include <coroutine>
#include <exception>
#include <mutex>
#include <optional>
#include <utility>

namespace qcow2fuse {

template <typename T>
class Task;

namespace internal {

// At the end of a task: resumes the awaiter if it has already suspended;
// otherwise the awaiter is still in Task::await_suspend and goes on itself.
struct FinalAwaiter {
  bool await_ready() const noexcept { return false; }
  template <typename Promise>
  std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> h) noexcept {
    auto& promise = h.promise();
    if (promise.second_.exchange(true, std::memory_order_acq_rel) && promise.continuation) {
      return promise.continuation;
    }
    return std::noop_coroutine();
  }
  void await_resume() const noexcept {}
};

struct PromiseBase {
  std::coroutine_handle<> continuation;
  std::atomic<bool> second_{false};  // set by the first of: task end, awaiter suspended
  std::suspend_always initial_suspend() const noexcept { return {}; }
  FinalAwaiter final_suspend() const noexcept { return {}; }
  void unhandled_exception() const noexcept { std::terminate(); }
};

// Starts the task `h` on behalf of `awaiting`. Returns whether `awaiting`
// must suspend (the task is still running and will resume it).
template <typename Promise>
bool StartAndMaybeSuspend(std::coroutine_handle<Promise> h, std::coroutine_handle<> awaiting) {
  h.promise().continuation = awaiting;
  h.resume();
  return !h.promise().second_.exchange(true, std::memory_order_acq_rel);
}

}  // namespace internal

template <typename T>
class [[nodiscard]] Task {
 public:
  struct promise_type : internal::PromiseBase {
    std::optional<T> value;
    Task get_return_object() noexcept {
      return Task(std::coroutine_handle<promise_type>::from_promise(*this));
    }
    template <typename U>
    void return_value(U&& v) {
      value.emplace(std::forward<U>(v));
    }
  };

  Task(Task&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Task& operator=(Task&& other) noexcept {
    if (this != &other) {
      if (handle_) handle_.destroy();
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  ~Task() {
    if (handle_) handle_.destroy();
  }

  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> awaiting) noexcept {
    return internal::StartAndMaybeSuspend(handle_, awaiting);
  }
  T await_resume() { return std::move(*handle_.promise().value); }

 private:
  explicit Task(std::coroutine_handle<promise_type> h) : handle_(h) {}
  std::coroutine_handle<promise_type> handle_;
};

template <>
class [[nodiscard]] Task<void> {
 public:
  struct promise_type : internal::PromiseBase {
    Task get_return_object() noexcept {
      return Task(std::coroutine_handle<promise_type>::from_promise(*this));
    }
    void return_void() const noexcept {}
  };

  Task(Task&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Task& operator=(Task&& other) noexcept {
    if (this != &other) {
      if (handle_) handle_.destroy();
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  ~Task() {
    if (handle_) handle_.destroy();
  }

  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> awaiting) noexcept {
    return internal::StartAndMaybeSuspend(handle_, awaiting);
  }
  void await_resume() const noexcept {}

 private:
  explicit Task(std::coroutine_handle<promise_type> h) : handle_(h) {}
  std::coroutine_handle<promise_type> handle_;
};

namespace internal {

// A coroutine that starts suspended and frees itself when it finishes. It is
// the root frame of every task started by SyncWait() or a Scheduler.
struct DetachedCoroutine {
  struct promise_type {
    DetachedCoroutine get_return_object() noexcept {
      return {std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    std::suspend_never final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    void unhandled_exception() const noexcept { std::terminate(); }
  };
  std::coroutine_handle<promise_type> handle;
};

// A one-shot event for a thread to wait on.
class Event {
 public:
  void Set() {
    std::lock_guard lock(mu_);
    set_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return set_; });
  }
  bool IsSet() {
    std::lock_guard lock(mu_);
    return set_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

template <typename T>
DetachedCoroutine RunAndSignal(Task<T> task, std::optional<T>* result, Event* done) {
  result->emplace(co_await std::move(task));
  done->Set();
}

inline DetachedCoroutine RunAndSignal(Task<void> task, Event* done) {
  co_await std::move(task);
  done->Set();
}

}  // namespace internal

// Runs `task` to completion, starting it on the calling thread, and returns
// its result. The calling thread blocks while the task waits on something
// another thread will finish; it must therefore not be the thread that is
// supposed to finish it.
template <typename T>
T SyncWait(Task<T> task) {
  std::optional<T> result;
  internal::Event done;
  internal::RunAndSignal(std::move(task), &result, &done).handle.resume();
  done.Wait();
  return std::move(*result);
}

inline void SyncWait(Task<void> task) {
  internal::Event done;
  internal::RunAndSignal(std::move(task), &done).handle.resume();
  done.Wait();
}

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_TASK_H_
