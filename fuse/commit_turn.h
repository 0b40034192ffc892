// CommitTurn: which of two threads commits the reply in a ring entry.
//
// A ring thread hands the request in its entry to libfuse. The reply may
// be made on that thread before libfuse returns, or later on another thread
// (a request that waited for a lock, or a compressed read finished by the
// inflate threads). Whichever of the two comes second commits the reply:
//  - the ring thread, when the reply was there by the time it returned;
//  - otherwise the thread that made the reply, which then holds the bytes
//    in its caches.
// Exactly one of Returned() and Replied() answers true for each request.

#ifndef QCOW2FUSE_FUSE_COMMIT_TURN_H_
#define QCOW2FUSE_FUSE_COMMIT_TURN_H_

#include <atomic>

namespace qcow2fuse {

class CommitTurn {
 public:
  // A new request is in the entry; neither has happened yet.
  void Reset() { state_.store(kNeither, std::memory_order_relaxed); }

  // The ring thread is back from libfuse. True: the reply is there, and the
  // ring thread commits it.
  bool Returned() {
    int neither = kNeither;
    return !state_.compare_exchange_strong(neither, kReturned, std::memory_order_acq_rel);
  }

  // The reply is in the entry. True: the ring thread has returned already,
  // and the caller commits.
  bool Replied() { return state_.exchange(kReplied, std::memory_order_acq_rel) == kReturned; }

  // Called by the ring thread when the committed entry comes back with its
  // next request: what the replying thread wrote into the entry before
  // Replied() is seen. (The kernel orders the two, out of sight of the
  // language's memory model and of ThreadSanitizer.)
  void SeeReply() const { (void)state_.load(std::memory_order_acquire); }

 private:
  static constexpr int kNeither = 0;
  static constexpr int kReplied = 1;
  static constexpr int kReturned = 2;
  std::atomic<int> state_{kNeither};
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_COMMIT_TURN_H_
