// Answers a READ with bytes of a host file without copying them through
// the daemon's memory. splice(2) moves references to the host page cache
// pages that hold them into a pipe, libfuse splices the pipe on to
// /dev/fuse (FUSE_CAP_SPLICE_WRITE), and the kernel copies the bytes once,
// into the reader's pages. A read through a buffer costs one more copy: the
// pread into the buffer. A store into a view's page cache (prefill.h) is
// sent the same way.
//
// Each thread has its own pipe, made at its first spliced reply and kept.
// A pipe holds at most /proc/sys/fs/pipe-max-size bytes (1 MiB) unless its
// owner may exceed that (CAP_SYS_RESOURCE), and libfuse's own pipe needs a
// few pages more than the reply: without that right, 1 MiB replies are
// better sent from a buffer than through libfuse's fallback (a malloc and
// a read per reply), so MaxSplicedReply() stays below them, and the mount
// asks the kernel for READs no larger than what splices (MaxReadRequest in
// ops.h).

#ifndef QCOW2FUSE_FUSE_SPLICED_REPLY_H_
#define QCOW2FUSE_FUSE_SPLICED_REPLY_H_

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"

namespace qcow2fuse {

// The largest reply this process can splice whole, found once by sizing a
// pipe; 0 when pipes cannot be sized at all.
size_t MaxSplicedReply();

// Sends `length` bytes of `fd` from `file_offset` as the reply to `req`
// (0 < length <= MaxSplicedReply()), and returns true once it has. The
// bytes are read from `fd` before this returns. Returns false, having sent
// nothing, when this thread has no pipe to splice through or the pipe took
// less than it should: answer from a buffer then. An error reading `fd`
// (EIO, or a file that ends early) is returned, naming the host offset,
// and `req` is left unanswered.
absl::StatusOr<bool> ReplySpliced(fuse_req_t req, int fd, uint64_t file_offset, size_t length);

// What became of a StoreSpliced.
enum class SplicedStore {
  kStored,      // the kernel put the bytes in the file's page cache
  kRefused,     // the kernel refused them, or `fd` could not be read
  kNotSpliced,  // nothing sent: this thread has no pipe for them; store from a buffer
};

// Stores `length` bytes of `fd` from `file_offset` in the page cache of
// file `ino` of `session` at `offset` (FUSE_NOTIFY_STORE, see prefill.h)
// the way ReplySpliced sends a reply: the kernel copies the bytes straight
// from the host page cache into the file's pages. 0 < length <=
// MaxSplicedReply(). Waits for the locks of the pages it fills, which
// READs in flight hold until they are answered: never call it from a
// thread that such a READ may need.
SplicedStore StoreSpliced(fuse_session* session, fuse_ino_t ino, uint64_t offset, int fd, uint64_t file_offset,
                          size_t length);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_SPLICED_REPLY_H_
