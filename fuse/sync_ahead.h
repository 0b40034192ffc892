// Syncing written data ahead of the flush that needs it (-o sync_ahead).
//
// An fsync or close of the view, or a periodic flush, waits until the image
// file's data is on stable storage, and the disk's part of that grows with
// what was written since the last sync: on a virtual disk with a write-back
// cache, fsync after writing 1 GiB took 0.7-1.0 s however fast the writes
// had gone. Nothing makes that data durable in between (the host's own
// writeback only moves it to the disk's cache), so a writer pays it all
// at the end. A SyncAhead thread has the host sync the data file
// (Image::SyncData) each time `threshold` bytes have been written since the
// last such sync began, while the writer goes on: the final fsync then has
// only the tail left. It holds no lock of the engine's, so requests are not
// held up by it; the metadata still waits for the flush.
//
// One sync runs at a time. Bytes written while one runs start the count for
// the next, which begins as soon as the running one ends if they reach the
// threshold by then. After a failed sync it stops for good: the failure is
// latched in the image's file (io/latched_file.h), every later flush reports
// it, and syncing again would only fail again.

#ifndef QCOW2FUSE_FUSE_SYNC_AHEAD_H_
#define QCOW2FUSE_FUSE_SYNC_AHEAD_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

#include "absl/status/status.h"

namespace qcow2fuse {

class SyncAhead {
 public:
  // Calls `sync` on a thread of its own as described above; `on_failure`
  // gets the first failure, on that thread.
  SyncAhead(uint64_t threshold, std::function<absl::Status()> sync,
            std::function<void(const absl::Status&)> on_failure);
  // Stop()s.
  ~SyncAhead();

  SyncAhead(const SyncAhead &) = delete;
  SyncAhead &operator=(const SyncAhead &) = delete;

  // `bytes` more were written. Called by every write once it is answered,
  // from any thread: an atomic addition, and a wake-up when the count
  // reaches the threshold.
  void Wrote(uint64_t bytes);

  // Waits for a sync in progress and ends the thread; later Wrote calls
  // only count. For the stop of the mount, before its requests drain.
  void Stop();

  // Syncs that have begun.
  uint64_t syncs() const { return syncs_.load(std::memory_order_relaxed); }

 private:
  void Loop();

  const uint64_t threshold_;
  const std::function<absl::Status()> sync_;
  const std::function<void(const absl::Status&)> on_failure_;
  // Bytes written since the last sync began.
  std::atomic<uint64_t> unsynced_{0};
  std::atomic<uint64_t> syncs_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool due_ = false;    // under mu_: the count reached the threshold
  bool stop_ = false;   // under mu_
  std::thread thread_;  // last: starts once the rest is set
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_SYNC_AHEAD_H_
