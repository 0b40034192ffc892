// Prefill: puts a run of a view's data into the kernel's page cache of the
// view before its reader asks for it (FUSE_NOTIFY_STORE).
//
// A program that copies only the data of a sparse file (cp --sparse) asks
// SEEK_HOLE where the run of data it stands on ends, reads the run, and
// asks SEEK_DATA where the next one starts. Each of these is a
// round trip to the daemon, and so is each READ of the run: the kernel
// reads a lone read at a new place as it is (cp's 128 KiB) and reads ahead
// only from the second one on, so a run of 256 KiB costs two READs on top
// of the two seeks. Through a view whose bytes cannot change, a SEEK_HOLE
// that starts in data has the daemon store the start of that run (up to
// 1 MiB) in the view's page cache before it answers, and after answering,
// the next run, while the reader is busy with this one: the reads that
// follow find their pages cached, and the disk under the image reads the
// next run while the reader writes out this one.
//
// One run ahead is one read in flight, and a disk that answers a read in
// milliseconds then sets the pace of the copy. So once the next run is
// stored, the host is also advised to read the runs after it
// (Image::WillNeed): up to kAheadBytes of data or kAheadRuns runs past the
// reader, topped up a few extents at a time as the reader moves on, so
// that the disk always has reads to do. Advice costs the host nothing it
// would not read anyway, and the walk that finds the runs reads the L2
// tables the reader's own seeks need next.
//
// Only where no byte of the view can change while it is mounted (a
// read-only mount, a snapshot): a store writes over the pages it finds,
// and the page a write fills stays locked only until the write is
// answered, so a store racing a write could put older bytes over the
// write's after it returned.
//
// A store waits for the lock of each page it fills, and a page being read
// stays locked until its READ is answered: the thread that stores waits
// for another worker to answer that READ. So stores run only where another
// worker can take it (at least two threads, requests over /dev/fuse rather
// than a ring thread's queue), one at a time, so that at most one worker
// waits like that, and only from a libfuse worker: a READ of compressed
// data needs the image's inflating threads, so the worker that stores
// waits for its own read of the run rather than going on there. The store
// is announced as a call that may sleep, which puts a parked worker back
// to work (worker_gate.h).
//
// One per mount; thread-safe.

#ifndef QCOW2FUSE_FUSE_PREFILL_H_
#define QCOW2FUSE_FUSE_PREFILL_H_

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>

#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"
#include "view_table.h"

namespace qcow2fuse {

class Prefill {
 public:
  // The most stored per run: the kernel's largest request.
  static constexpr uint64_t kMaxRunBytes = uint64_t{1} << 20;
  // How far ahead of its reader the host is advised to read: a few of the
  // host's largest requests, or this many runs where the runs are small.
  static constexpr uint64_t kAheadBytes = uint64_t{8} << 20;
  static constexpr int kAheadRuns = 64;

  // `splice`: whether stores may be spliced from the image file
  // (spliced_reply.h); read at each store, since INIT decides it.
  Prefill(fuse_session* session, const std::atomic<bool>& splice) : session_(session), splice_(splice) {}
  Prefill(const Prefill&) = delete;
  Prefill& operator=(const Prefill&) = delete;

  // A SEEK_HOLE of file `ino` from `offset`, inside data, found the hole at
  // `hole`: stores [offset, hole) of `view`, at most kMaxRunBytes of it,
  // unless that was the last range stored or another store is under way.
  // Only advice: a failure leaves the reads to the daemon, as without it.
  Task<void> Run(fuse_ino_t ino, View& view, Image& image, uint64_t offset, uint64_t hole);
  // After that SEEK_HOLE was answered: the same for the next run of data
  // at or after `hole`, the one the reader will ask for next; then advises
  // the host to read the runs after that one.
  Task<void> Next(fuse_ino_t ino, View& view, Image& image, uint64_t hole);

  // Runs stored so far, and their bytes, and how many of those runs were
  // spliced; runs the host was advised to read ahead: for the log at exit.
  uint64_t runs() const { return runs_.load(std::memory_order_relaxed); }
  uint64_t bytes() const { return bytes_.load(std::memory_order_relaxed); }
  uint64_t spliced_runs() const { return spliced_runs_.load(std::memory_order_relaxed); }
  uint64_t advised_runs() const { return advised_runs_.load(std::memory_order_relaxed); }

 private:
  // Claims [start, end) of `ino` for a store: false when a store is under
  // way or this range was the last one stored.
  bool Claim(fuse_ino_t ino, uint64_t start, uint64_t end);
  // The claimed store is over; `stored`: the kernel took the bytes.
  void Release(bool stored);
  // Advises the host to read the runs after [run_start, run_end) of `ino`,
  // the run Next found, until kAheadBytes or kAheadRuns lie advised past it.
  // `seq` orders the calls as their Nexts began.
  Task<void> AdviseAhead(fuse_ino_t ino, View& view, Image& image, uint64_t seq, uint64_t run_start,
                         uint64_t run_end);

  fuse_session* const session_;
  const std::atomic<bool>& splice_;
  std::mutex mu_;
  bool busy_ = false;  // under mu_: a store is under way
  // Under mu_: the range of the store under way, or of the last one.
  fuse_ino_t ino_ = 0;
  uint64_t start_ = 0;
  uint64_t end_ = 0;
  // The bytes of a store under way that is not spliced; only its owner
  // touches it. Made at the first such store and kept: one store runs at a
  // time.
  std::unique_ptr<uint8_t[]> buffer_;
  // Under mu_: the advice ahead of one reader. `seq` numbers the Next that
  // advised last (an older one, late, is not followed), `reader` is the end
  // of the run it found, `until` where the advice stopped, and `advised`
  // the runs advised past the reader, in order. One walk at a time.
  struct Range {
    uint64_t start;
    uint64_t length;
  };
  struct Ahead {
    fuse_ino_t ino = 0;
    uint64_t seq = 0;
    uint64_t reader = 0;
    uint64_t until = 0;
    std::deque<Range> advised;
    bool walking = false;
  };
  Ahead ahead_;
  std::atomic<uint64_t> runs_{0};
  std::atomic<uint64_t> bytes_{0};
  std::atomic<uint64_t> spliced_runs_{0};
  std::atomic<uint64_t> advised_runs_{0};
  std::atomic<uint64_t> next_seq_{0};
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_PREFILL_H_
