// WorkerGate: keeps only a few of libfuse's workers taking requests from
// /dev/fuse while requests are answered from memory, and puts the others
// back to work when the disk is in the way.
//
// Each request the kernel queues wakes a worker that sleeps in read() of
// /dev/fuse. With many workers, a worker that has answered a request finds
// the queue empty (another was woken for the next one) and sleeps again:
// two context switches per request besides the reader's own. With as many
// workers at work as CPUs, a worker that answers finds the next request
// waiting and takes it without sleeping, and cached 4 KiB reads run 15-20%
// faster. But a worker that waits for the disk then leaves requests
// unreceived, so the workers stay many (-o threads) and only park here:
//
// - A worker returning from a READ or WRITE (Leave) parks while `active`
//   others are at work (neither parked nor in a call that may sleep), no
//   worker is in such a call, and its own request made none.
// - A call that may sleep (qcow2fuse/blocking.h: a read the page cache
//   cannot answer at once, a write, a sync, a wait for another request's
//   lock) first wakes a parked worker if fewer than `active` would be left
//   at work.
// - A parked worker goes back to libfuse by itself after `max_park`, so an
//   idle daemon has no timer left and a stop never waits longer for it
//   (libfuse ends its workers only once each has returned from its
//   callback); a call that sleeps without saying so can hold up the
//   requests behind it no longer either.
//
// Only threads that have called Leave take part: the threads of FUSE's
// io_uring channel and other threads' calls are not counted.

#ifndef QCOW2FUSE_FUSE_WORKER_GATE_H_
#define QCOW2FUSE_FUSE_WORKER_GATE_H_

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "qcow2fuse/blocking.h"

namespace qcow2fuse {

class WorkerGate final : public BlockingObserver {
 public:
  static constexpr std::chrono::milliseconds kMaxPark{50};

  // `active`: how many workers to keep at work (at least 1; UsableCpus()).
  explicit WorkerGate(int active, std::chrono::milliseconds max_park = kMaxPark);

  // At the end of a callback on one of libfuse's workers: parks the worker
  // as above, then lets it go back to libfuse.
  void Leave();

  // BlockingObserver.
  void WillBlock() override;
  void DoneBlocking() override;

  // The CPUs this process may run on (its affinity mask): the default
  // `active`.
  static int UsableCpus();

  int active() const { return active_; }
  // Workers parked now, and how many times one has parked in all.
  int parked();
  long parks();

 private:
  const int active_;
  const std::chrono::milliseconds max_park_;
  std::mutex mu_;
  std::condition_variable parked_cv_;
  int workers_ = 0;  // threads that have called Leave
  int parked_ = 0;   // ... parked now, not counting those woken
  int blocked_ = 0;  // ... in a call that may sleep
  int wakes_ = 0;    // wake-ups sent and not yet taken
  long parks_ = 0;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_WORKER_GATE_H_
