#include "invalidator.h"

#include <algorithm>

namespace qcow2fuse {

Invalidator::Invalidator(fuse_session* session) : session_(session), thread_([this] { Loop(); }) {}

Invalidator::~Invalidator() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_one();
  thread_.join();
}

void Invalidator::Post(fuse_ino_t ino, uint64_t offset, uint64_t length) {
  const uint64_t end = offset + length;
  {
    std::lock_guard lock(mu_);
    if (!queue_.empty()) {
      Range& last = queue_.back();
      if (last.ino == ino && offset <= last.end && end >= last.offset) {
        last.offset = std::min(last.offset, offset);
        last.end = std::max(last.end, end);
        return;
      }
    }
    queue_.push_back({ino, offset, end});
  }
  cv_.notify_one();
}

void Invalidator::Loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and nothing left
    const Range range = queue_.front();
    queue_.pop_front();
    lock.unlock();
    // ENOENT (the kernel holds no inode of that number) and the like only
    // mean there is nothing cached to drop.
    (void)fuse_lowlevel_notify_inval_inode(session_, range.ino, static_cast<off_t>(range.offset),
                                           static_cast<off_t>(range.end - range.offset));
    lock.lock();
  }
}

}  // namespace qcow2fuse
