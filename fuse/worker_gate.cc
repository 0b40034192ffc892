#include "worker_gate.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>

namespace qcow2fuse {
namespace {

// The gate this thread has left through, if any: only those threads count.
thread_local WorkerGate* tl_gate = nullptr;
// Calls that may sleep, nested on this thread (only the outermost counts).
thread_local int tl_blocking_depth = 0;
// Whether this worker's current request made such a call.
thread_local bool tl_slept = false;

}  // namespace

int WorkerGate::UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
}

WorkerGate::WorkerGate(int active, std::chrono::milliseconds max_park)
    : active_(std::max(active, 1)), max_park_(max_park) {}

void WorkerGate::Leave() {
  std::unique_lock lock(mu_);
  if (tl_gate != this) {
    tl_gate = this;
    ++workers_;
  }
  const bool slept = tl_slept;
  tl_slept = false;
  const int others_at_work = workers_ - parked_ - blocked_ - 1;
  if (slept || blocked_ > 0 || others_at_work < active_) return;
  ++parked_;
  ++parks_;
  const auto deadline = std::chrono::steady_clock::now() + max_park_;
  while (wakes_ == 0) {
    if (parked_cv_.wait_until(lock, deadline) == std::cv_status::timeout && wakes_ == 0) {
      --parked_;
      return;
    }
  }
  --wakes_;  // the waker took this worker off parked_
}

void WorkerGate::WillBlock() {
  if (tl_gate != this || tl_blocking_depth++ > 0) return;
  tl_slept = true;
  std::lock_guard lock(mu_);
  ++blocked_;
  if (parked_ > 0 && workers_ - parked_ - blocked_ < active_) {
    --parked_;
    ++wakes_;
    parked_cv_.notify_one();
  }
}

void WorkerGate::DoneBlocking() {
  if (tl_gate != this || --tl_blocking_depth > 0) return;
  std::lock_guard lock(mu_);
  --blocked_;
}

int WorkerGate::parked() {
  std::lock_guard lock(mu_);
  return parked_;
}

long WorkerGate::parks() {
  std::lock_guard lock(mu_);
  return parks_;
}

}  // namespace qcow2fuse
