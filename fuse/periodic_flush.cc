#include "periodic_flush.h"

#include "absl/strings/str_format.h"
#include "log.h"

namespace qcow2fuse {

PeriodicFlusher::PeriodicFlusher(std::chrono::seconds interval, std::function<absl::Status()> flush,
                                 std::string what)
    : period_(std::chrono::duration_cast<std::chrono::milliseconds>(interval) / 2),
      flush_(std::move(flush)),
      what_(std::move(what)),
      thread_([this] { Loop(); }) {}

PeriodicFlusher::~PeriodicFlusher() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void PeriodicFlusher::Loop() {
  std::unique_lock lock(mu_);
  // A condition variable rather than a sleep: an unmount must not wait out
  // the rest of a period.
  while (!cv_.wait_for(lock, period_, [this] { return stop_; })) {
    lock.unlock();
    const absl::Status status = flush_();
    Report(status);
    lock.lock();
  }
}

void PeriodicFlusher::Report(const absl::Status& status) {
  if (status.ok()) {
    if (!last_error_.empty()) Log(LogLevel::kInfo, absl::StrFormat("periodic flush of %s works again", what_));
    last_error_.clear();
    return;
  }
  const std::string error(status.message());
  if (error == last_error_) return;
  last_error_ = error;
  Log(LogLevel::kError,
      absl::StrFormat("periodic flush of %s failed (writes since the last good flush are not durable; "
                      "retrying every %d ms, logging only a different failure): %s",
                      what_, period_.count(), error));
}

}  // namespace qcow2fuse
