// The FUSE low-level operations of a mount. Its files and directories are
// a ViewTable (view_table.h): the root alone, the raw view of the image, or
// a directory of disk, partition and snapshot files. Every callback finds
// its View by inode and works on the view's byte window of an Image.
//
// Each callback copies what it needs from its arguments (libfuse frees
// them when the callback returns) and starts a coroutine on the calling
// thread, a libfuse worker or a ring thread (uring_channel.h), with
// Scheduler::Start; the coroutine replies. The
// callback returns when the coroutine is done or waits for a lock; a
// write's callback waits for the write, whose bytes stay in libfuse's
// buffer. No qcow2 logic lives here.
//
// Durability: fsync flushes the image, and so does the close of every
// descriptor opened for writing (FLUSH, which close() waits for); read-only
// opens set noflush, so their close costs no round trip. An open with
// O_TRUNC truncates the disk to 0 under the shrink rule.

#ifndef QCOW2FUSE_FUSE_OPS_H_
#define QCOW2FUSE_FUSE_OPS_H_

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <sys/stat.h>

#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "qcow2fuse/image.h"
#include "qcow2fuse/scheduler.h"
#include "invalidator.h"
#include "loop_direct_io.h"
#include "prefill.h"
#include "sync_ahead.h"
#include "readahead.h"
#include "view_table.h"
#include "worker_gate.h"

namespace qcow2fuse {

struct MountState {
  // The disk served; every writable view is a window onto it.
  Image* disk = nullptr;
  ViewTable* views = nullptr;
  // Drops the kernel's cached pages of files that overlap a change (set
  // before the loop starts, in directory mode).
  Invalidator* invalidator = nullptr;
  Scheduler* scheduler = nullptr;
  // Parks workers that return from READ and WRITE while enough others take
  // requests (worker_gate.h); null when requests come over io_uring.
  WorkerGate* gate = nullptr;
  // The image file's descriptor, for statfs and timestamps. Never a path:
  // the image may lie under a mount this very process serves.
  int image_fd = -1;
  // Every file of the image's chain (Image::FileDescriptors: the image, its
  // external data file, the backing files). A view's bytes live in all of
  // them, so its mtime and ctime are the newest of theirs: an overwrite
  // that goes to a data file alone changes no time of the image file.
  std::vector<int> chain_fds;
  struct stat mountpoint_stat {};  // owner and permissions of the view
  // -o parallel_direct_writes: writes of one file through a descriptor in
  // direct-I/O mode run in parallel (the kernel serialises them
  // otherwise); the scheduler orders those that overlap.
  bool parallel_direct_writes = true;
  // -o uncached_writes: every descriptor opened for writing is put in
  // direct-I/O mode, not only O_DIRECT ones (see Open).
  bool uncached_writes = true;
  // -o uncached_loops: so is every descriptor opened by a program that
  // attaches loop devices (opener.h), read-only ones too.
  bool uncached_loops = false;
  // Set at INIT: each option (uncached_writes gives writers_uncached, and
  // so on), and a kernel whose direct-I/O mode stays coherent with
  // buffered opens of the same file (and for loops_uncached, whose loop
  // driver reads a whole request at a time).
  std::atomic<bool> direct_writes_in_parallel{false};
  std::atomic<bool> writers_uncached{false};
  std::atomic<bool> loops_uncached{false};
  // The kernel's loop driver goes through its file a page at a time
  // (before Linux 6.15, opener.h), so a loop device's descriptor keeps the
  // page cache and its readahead even when opened for writing.
  bool loops_by_page = false;
  // -o splice_reads: large reads of data clusters are answered by splicing
  // from the image file (spliced_reply.h) rather than from a buffer.
  bool splice_reads = true;
  // Set at INIT: the option, and a kernel and libfuse that can splice.
  std::atomic<bool> spliced_reads{false};
  // The max_read mount option given to libfuse, which INIT must repeat
  // (MaxReadRequest); 0 for none.
  unsigned max_read = 0;
  // The readahead set on the mount (-o readahead, or the default), which
  // INIT's max_readahead must not lower.
  uint64_t readahead = 0;
  // Raises the mount's readahead while loop devices read the view through
  // its page cache (readahead.h); null where -o readahead fixed it, where
  // the daemon cannot set it, or where it would not be deeper.
  LoopReadahead* loop_readahead = nullptr;
  // Stores the run of data a SEEK_HOLE starts in, and the next one, in the
  // page cache of a view that cannot change (prefill.h); null under
  // -o prefill_runs=off, over io_uring, or with a single thread.
  Prefill* prefill = nullptr;
  // Told of every write answered, has the host sync the image's data ahead
  // of the next flush (sync_ahead.h); null on a read-only mount or under
  // -o sync_ahead=0.
  SyncAhead* sync_ahead = nullptr;
  // How far ahead of a sequential reader of a view the host is to read
  // the image (-o image_readahead, sequential_reads.h); 0: not at all.
  uint64_t image_readahead = 0;
  // Switches loop devices over the views to direct I/O (loop_direct_io.h);
  // null under -o loop_direct_io=off, for a daemon that is not root, or
  // where the mount's device number is unknown.
  LoopDirectIo* loop_direct_io = nullptr;
  // Called once, when the kernel's INIT has been answered: the mount is live.
  std::function<void()> on_ready;
};

// The operations table; the session's userdata must be a MountState*.
const fuse_lowlevel_ops& Operations();

// The largest READ to ask of the kernel (the max_read mount option), or 0
// to leave it at the kernel's 1 MiB. Where this process cannot splice a
// 1 MiB reply whole (MaxSplicedReply() in spliced_reply.h: a pipe size
// limit and no CAP_SYS_RESOURCE, as for any user but root), 1 MiB replies
// would be copied through a buffer: then READs are capped at the largest
// power of two that splices, so that readahead's requests are spliced too.
// `splice_reads`: whether replies may be spliced at all (-o splice_reads,
// and requests that come over /dev/fuse rather than io_uring).
unsigned MaxReadRequest(bool splice_reads);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_OPS_H_
