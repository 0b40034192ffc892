// Calls that may sleep. A thread about to make a call that can sleep for a
// while (a read the page cache cannot answer, a write, a sync, a wait for
// another request's lock) announces it, so that whoever runs the thread
// can put another thread to work meanwhile: the FUSE front end keeps only
// a few of its workers reading requests and wakes one more when a worker
// is about to sleep (fuse/worker_gate.h). The engine only announces; with
// no observer installed, an announcement costs one atomic load.

#ifndef QCOW2FUSE_BLOCKING_H_
#define QCOW2FUSE_BLOCKING_H_

namespace qcow2fuse {

class BlockingObserver {
 public:
  // The calling thread is about to make a call that may sleep.
  virtual void WillBlock() = 0;
  // ... and has made it. Paired with WillBlock on the same thread.
  virtual void DoneBlocking() = 0;

 protected:
  ~BlockingObserver() = default;
};

// Installs `observer` for every thread of the process (null: none). The
// observer must outlive every call that may still announce to it.
void SetBlockingObserver(BlockingObserver* observer);

// Announces a call that may sleep for the lifetime of the object.
class ScopedBlockingCall {
 public:
  ScopedBlockingCall();
  ~ScopedBlockingCall();
  ScopedBlockingCall(const ScopedBlockingCall&) = delete;
  ScopedBlockingCall& operator=(const ScopedBlockingCall&) = delete;

  // Whether an observer listens: a caller that can tell beforehand whether
  // a call will sleep (a read with RWF_NOWAIT) only bothers when one does.
  static bool Observed();

 private:
  BlockingObserver* observer_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_BLOCKING_H_
