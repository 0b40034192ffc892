// Bounded write-back (-o flush_interval=S).
//
// The engine keeps metadata changes in write-back caches until a flush; the
// view flushes at fsync, at every close of a writable descriptor and at
// unmount. A view that stays open (a loop device keeps it open for hours,
// a VM's disk for weeks) would otherwise hold acknowledged writes in memory
// indefinitely, and a crash of the daemon or the host would lose them.
//
// A PeriodicFlusher thread flushes every S/2 seconds: a write acknowledged
// just after one flush began is not covered by it, so it waits for the next
// one, which starts at most S/2 later and has the other S/2 to finish.
// A flush that finds nothing changed since the last one costs no I/O, so
// frequent ticks on an idle view are free.

#ifndef QCOW2FUSE_FUSE_PERIODIC_FLUSH_H_
#define QCOW2FUSE_FUSE_PERIODIC_FLUSH_H_

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"

namespace qcow2fuse {

class PeriodicFlusher {
 public:
  // Calls `flush` every `interval` / 2 until destroyed. A failure is logged
  // with its reason once, not at every tick, until a flush succeeds again
  // or fails differently. `what` names the image in log lines.
  PeriodicFlusher(std::chrono::seconds interval, std::function<absl::Status()> flush, std::string what);
  // Wakes the thread at once (a flush in progress is finished) and joins it.
  ~PeriodicFlusher();

  PeriodicFlusher(const PeriodicFlusher&) = delete;
  PeriodicFlusher& operator=(const PeriodicFlusher&) = delete;

 private:
  void Loop();
  // Logs what changed since the last tick's outcome.
  void Report(const absl::Status& status);

  const std::chrono::milliseconds period_;
  const std::function<absl::Status()> flush_;
  const std::string what_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;              // under mu_
  std::string last_error_;         // only the thread uses it; empty: last flush OK
  std::thread thread_;             // last: starts once the rest is set
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_PERIODIC_FLUSH_H_
