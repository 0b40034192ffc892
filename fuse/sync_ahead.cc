#include "sync_ahead.h"

namespace qcow2fuse {

SyncAhead::SyncAhead(uint64_t threshold, std::function<absl::Status()> sync,
                     std::function<void(const absl::Status&)> on_failure)
    : threshold_(threshold), sync_(std::move(sync)), on_failure_(std::move(on_failure)), thread_([this] { Loop(); }) {}

SyncAhead::~SyncAhead() { Stop(); }

void SyncAhead::Wrote(uint64_t bytes) {
  const uint64_t before = unsynced_.fetch_add(bytes, std::memory_order_relaxed);
  // Only the write that takes the count across the threshold wakes the
  // thread; the count starts again from zero when a sync begins.
  if (before >= threshold_ || before + bytes < threshold_) return;
  {
    std::lock_guard lock(mu_);
    due_ = true;
  }
  cv_.notify_one();
}

void SyncAhead::Stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void SyncAhead::Loop() {
  std::unique_lock lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return due_ || stop_; });
    if (stop_) return;
    due_ = false;
    lock.unlock();
    // What is written from here on may miss this sync: it counts for the
    // next one.
    unsynced_.store(0, std::memory_order_relaxed);
    syncs_.fetch_add(1, std::memory_order_relaxed);
    const absl::Status status = sync_();
    if (!status.ok()) {
      on_failure_(status);
      return;
    }
    lock.lock();
  }
}

}  // namespace qcow2fuse
