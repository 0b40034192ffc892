// Invalidator: tells the kernel to drop what it cached of ranges of files,
// from a thread of its own.
//
// In directory mode disk.raw and a partition file show the same bytes, and
// the kernel caches each file's pages apart; after a change through one,
// the other's cached pages are stale. fuse_lowlevel_notify_inval_inode
// fixes that, but it waits for the locks of those pages, and a page stays
// locked until the request that fills or writes it is answered. Called by
// a worker before replying, two writers (one per file) each hold the page
// the other's worker waits for; called by a worker at all, enough of them
// waiting on pages whose READs no free worker can serve stops the mount.
// So the workers only queue the ranges here, after replying, and this
// thread sends them: the other file sees the change a moment after the
// write returns, not before.

#ifndef QCOW2FUSE_FUSE_INVALIDATOR_H_
#define QCOW2FUSE_FUSE_INVALIDATOR_H_

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>

namespace qcow2fuse {

class Invalidator {
 public:
  explicit Invalidator(fuse_session* session);
  // Sends what is queued, then stops the thread.
  ~Invalidator();
  Invalidator(const Invalidator&) = delete;
  Invalidator& operator=(const Invalidator&) = delete;

  // Queues [offset, offset + length) of inode `ino`; a range next to or
  // over the last one queued for the same inode is merged into it.
  void Post(fuse_ino_t ino, uint64_t offset, uint64_t length);

 private:
  struct Range {
    fuse_ino_t ino;
    uint64_t offset;
    uint64_t end;
  };
  void Loop();

  fuse_session* const session_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Range> queue_;  // under mu_
  bool stopping_ = false;    // under mu_
  std::thread thread_;       // last: starts once the rest is set
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_INVALIDATOR_H_
