#include "sched/range_lock.h"

#include <utility>
#include <vector>

namespace qcow2fuse {

RangeLock::Guard::Guard(Guard&& other) noexcept
    : lock_(std::exchange(other.lock_, nullptr)), holder_(std::exchange(other.holder_, nullptr)) {}

RangeLock::Guard& RangeLock::Guard::operator=(Guard&& other) noexcept {
  if (this != &other) {
    Release();
    lock_ = std::exchange(other.lock_, nullptr);
    holder_ = std::exchange(other.holder_, nullptr);
  }
  return *this;
}

void RangeLock::Guard::Release() {
  if (lock_ != nullptr) std::exchange(lock_, nullptr)->Unlock(static_cast<Request*>(holder_));
}

RangeLock::Request* RangeLock::NewRequest(uint64_t first, uint64_t last) {
  std::lock_guard lock(mu_);
  requests_.push_back(Request{.first = first, .last = last, .granted = false, .waiter = nullptr});
  return &requests_.back();
}

bool RangeLock::BlockedLocked(const Request& request) const {
  for (const Request& r : requests_) {
    if (&r == &request) return false;
    if (r.first <= request.last && request.first <= r.last) return true;
  }
  return false;
}

bool RangeLock::TryAcquire(Request* request) {
  std::lock_guard lock(mu_);
  if (!request->granted && !BlockedLocked(*request)) request->granted = true;
  return request->granted;
}

bool RangeLock::Park(Request* request, std::coroutine_handle<> h) {
  std::lock_guard lock(mu_);
  if (request->granted) return false;  // an Unlock got there first
  request->waiter = h;
  return true;
}

void RangeLock::Unlock(Request* request) {
  std::vector<std::coroutine_handle<>> wake;
  {
    std::lock_guard lock(mu_);
    for (auto it = requests_.begin(); it != requests_.end(); ++it) {
      if (&*it == request) {
        requests_.erase(it);
        break;
      }
    }
    for (Request& r : requests_) {
      if (r.granted || BlockedLocked(r)) continue;
      r.granted = true;
      if (r.waiter) wake.push_back(r.waiter);
    }
  }
  for (std::coroutine_handle<> h : wake) h.resume();
}

size_t RangeLock::held() const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  for (const Request& r : requests_) n += r.granted;
  return n;
}

size_t RangeLock::waiting() const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  for (const Request& r : requests_) n += !r.granted;
  return n;
}

}  // namespace qcow2fuse
