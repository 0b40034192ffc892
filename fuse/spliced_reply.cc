#include "spliced_reply.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <fstream>
#include <memory>

#include "absl/strings/str_format.h"
#include "qcow2fuse/blocking.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// FUSE's largest READ: the kernel's request limit of 256 pages.
constexpr size_t kLargestReply = size_t{1} << 20;
// libfuse splices the reply through a pipe of its own that needs the
// reply's header and a few pages more than its data (fuse_send_data_iov).
constexpr size_t kLibfusePipeSlack = 4 * 4096;
// A run that does not start on a page boundary spans one page more than
// its length; the thread's pipe has room for that page.
constexpr size_t kPageSize = 4096;

class Pipe {
 public:
  // A pipe that holds `capacity` bytes, or null.
  static std::unique_ptr<Pipe> Make(size_t capacity) {
    int fds[2];
    // Non-blocking: a full pipe fails the splice rather than hang it.
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return nullptr;
    auto pipe = std::unique_ptr<Pipe>(new Pipe(fds[0], fds[1]));
    const int size = fcntl(fds[0], F_SETPIPE_SZ, static_cast<int>(capacity));
    if (size < 0 || static_cast<size_t>(size) < capacity) return nullptr;
    return pipe;
  }
  ~Pipe() {
    close(read_end_);
    close(write_end_);
  }
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;

  int read_end() const { return read_end_; }
  int write_end() const { return write_end_; }
  bool empty() const {
    int queued = 0;
    return ioctl(read_end_, FIONREAD, &queued) == 0 && queued == 0;
  }

 private:
  Pipe(int read_end, int write_end) : read_end_(read_end), write_end_(write_end) {}
  const int read_end_;
  const int write_end_;
};

size_t PipeMaxSize() {
  std::ifstream in("/proc/sys/fs/pipe-max-size");
  size_t bytes = 0;
  return (in >> bytes) ? bytes : 0;
}

size_t ProbeMaxSplicedReply() {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return 0;
  size_t limit = 0;
  // What one pipe of this process may hold, libfuse's may too.
  if (fcntl(fds[0], F_SETPIPE_SZ, static_cast<int>(kLargestReply + kLibfusePipeSlack)) >= 0) {
    limit = kLargestReply;
  } else if (const int max = fcntl(fds[0], F_SETPIPE_SZ, static_cast<int>(PipeMaxSize())); max >= 0) {
    limit = static_cast<size_t>(max) > kLibfusePipeSlack ? max - kLibfusePipeSlack : 0;
  }
  close(fds[0]);
  close(fds[1]);
  return limit;
}

// This thread's pipe, made at its first spliced reply. Null when none could
// be made (a user out of pipe pages: tried again at the next reply), and
// dropped when a failed reply leaves bytes in it.
thread_local std::unique_ptr<Pipe> thread_pipe;

// Moves `length` bytes of `fd` from `file_offset` into this thread's pipe.
// False, with the pipe empty, when there is no pipe or it took less than it
// should; an error reading `fd` as ReplySpliced says.
absl::StatusOr<bool> FillThreadPipe(int fd, uint64_t file_offset, size_t length) {
  if (thread_pipe == nullptr) thread_pipe = Pipe::Make(MaxSplicedReply() + kPageSize);
  if (thread_pipe == nullptr) return false;
  loff_t in = static_cast<loff_t>(file_offset);
  size_t moved = 0;
  ScopedBlockingCall blocking;  // the bytes may have to come from the disk
  while (moved < length) {
    // No SPLICE_F_MOVE: the pages stay the image file's page cache.
    const ssize_t n = splice(fd, &in, thread_pipe->write_end(), nullptr, length - moved, 0);
    if (n > 0) {
      moved += n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    const int error = errno;
    thread_pipe.reset();  // it holds what was moved already
    if (n == 0) {
      return absl::DataLossError(
          absl::StrFormat("the host file ends at %u, inside the %u bytes at %u the L2 table points to",
                          static_cast<uint64_t>(in), length, file_offset));
    }
    // EAGAIN: the pipe is full, which its size should rule out; a buffer
    // will do.
    if (error == EAGAIN) return false;
    return ErrnoStatus(error, absl::StrFormat("splicing %u bytes at host offset %u", length, file_offset));
  }
  return true;
}

// The thread's pipe, filled by FillThreadPipe, as the data of a reply or
// notification. libfuse splices it on to /dev/fuse (or, where its own pipe
// is too small, reads it into a buffer).
fuse_bufvec ThreadPipeData(size_t length) {
  fuse_bufvec data = FUSE_BUFVEC_INIT(length);
  data.buf[0].flags = FUSE_BUF_IS_FD;
  data.buf[0].fd = thread_pipe->read_end();
  return data;
}

// What the kernel did not take is gone with the pipe: the next reply must
// not start with it.
void DropThreadPipeUnlessEmpty() {
  if (!thread_pipe->empty()) thread_pipe.reset();
}

}  // namespace

size_t MaxSplicedReply() {
  static const size_t limit = ProbeMaxSplicedReply();
  return limit;
}

absl::StatusOr<bool> ReplySpliced(fuse_req_t req, int fd, uint64_t file_offset, size_t length) {
  absl::StatusOr<bool> filled = FillThreadPipe(fd, file_offset, length);
  if (!filled.ok() || !*filled) return filled;
  fuse_bufvec data = ThreadPipeData(length);
  // A reply the kernel refuses (the read was interrupted) is gone either way.
  fuse_reply_data(req, &data, static_cast<fuse_buf_copy_flags>(0));
  DropThreadPipeUnlessEmpty();
  return true;
}

SplicedStore StoreSpliced(fuse_session* session, fuse_ino_t ino, uint64_t offset, int fd, uint64_t file_offset,
                          size_t length) {
  absl::StatusOr<bool> filled = FillThreadPipe(fd, file_offset, length);
  if (!filled.ok()) return SplicedStore::kRefused;  // the reader's own READ reports it
  if (!*filled) return SplicedStore::kNotSpliced;
  fuse_bufvec data = ThreadPipeData(length);
  // Waits for the locks of pages that READs in flight hold.
  ScopedBlockingCall blocking;
  const auto splice = static_cast<fuse_buf_copy_flags>(0);
  const bool stored = fuse_lowlevel_notify_store(session, ino, static_cast<off_t>(offset), &data, splice) == 0;
  DropThreadPipeUnlessEmpty();
  return stored ? SplicedStore::kStored : SplicedStore::kRefused;
}

}  // namespace qcow2fuse
