#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

#include "absl/strings/str_format.h"
#include "io/block_file.h"
#include "qcow2fuse/blocking.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// The largest offset a file may reach: off_t is signed.
constexpr uint64_t kMaxOffset = std::numeric_limits<off_t>::max();

class PosixFile final : public BlockFile {
 public:
  PosixFile(std::string name, int fd, uint64_t size, bool writable)
      : name_(std::move(name)), fd_(fd), writable_(writable), size_(size) {}
  ~PosixFile() override { close(fd_); }

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override {
    co_return ReadSync(offset, out);
  }
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override {
    co_return WriteSync(offset, data);
  }
  Task<absl::Status> Flush() override { co_return FlushSync(); }
  Task<absl::Status> Discard(uint64_t offset, uint64_t length) override {
    co_return DiscardSync(offset, length);
  }
  Task<absl::Status> Truncate(uint64_t size) override { co_return TruncateSync(size); }
  Task<absl::Status> Allocate(uint64_t offset, uint64_t length) override {
    absl::StatusOr<bool> reserved = ReserveSync(offset, length);
    if (!reserved.ok()) co_return reserved.status();
    // A file system that cannot reserve space: grow the file the one way
    // every file can (see BlockFile::Allocate).
    if (!*reserved) co_return co_await BlockFile::Allocate(offset, length);
    co_return absl::OkStatus();
  }

  uint64_t size() const override { return size_.load(); }
  bool writable() const override { return writable_; }
  int fd() const override { return fd_; }
  const std::string& name() const override { return name_; }

  void WillNeed(uint64_t offset, uint64_t length) override {
    // Starts the host's readahead of the range and returns; only advice.
    (void)posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_WILLNEED);
  }

  absl::StatusOr<uint64_t> NextData(uint64_t offset) override { return Seek(offset, SEEK_DATA); }
  absl::StatusOr<uint64_t> NextHole(uint64_t offset) override { return Seek(offset, SEEK_HOLE); }

 private:
  // What an error message says the failed call was. Built only when one
  // failed: writes are the hot path, and a message costs an allocation.
  std::string What(const char* verb, uint64_t offset, uint64_t length) const {
    return absl::StrFormat("%s %s at offset %u, %u bytes", verb, name_, offset, length);
  }

  absl::Status ReadSync(uint64_t offset, std::span<uint8_t> out) {
    size_t done = 0;
    // When someone listens for calls that sleep, the page cache is asked
    // first (RWF_NOWAIT): a read it answers whole is not announced.
    if (ScopedBlockingCall::Observed() && nowait_reads_.load(std::memory_order_relaxed)) {
      while (done < out.size()) {
        iovec iov{out.data() + done, out.size() - done};
        ssize_t n = preadv2(fd_, &iov, 1, offset + done, RWF_NOWAIT);
        if (n > 0) {
          done += n;
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        // Not cached (EAGAIN), at the end of the file (0), or a file that
        // cannot tell (EOPNOTSUPP: never asked again): the plain read below
        // decides.
        if (n < 0 && errno == EOPNOTSUPP) nowait_reads_.store(false, std::memory_order_relaxed);
        break;
      }
      if (done == out.size()) return absl::OkStatus();
    }
    ScopedBlockingCall blocking;
    while (done < out.size()) {
      ssize_t n = pread(fd_, out.data() + done, out.size() - done, offset + done);
      if (n < 0) {
        if (errno == EINTR) continue;
        return ErrnoStatus(errno, What("read", offset + done, out.size() - done));
      }
      if (n == 0) {  // end of file: the rest reads as zeros
        std::memset(out.data() + done, 0, out.size() - done);
        break;
      }
      done += n;
    }
    return absl::OkStatus();
  }

  absl::Status WriteSync(uint64_t offset, std::span<const uint8_t> data) {
    if (!writable_) return RefuseReadOnly(What("write", offset, data.size()));
    // Checked here because the kernel would see a negative off_t and say
    // EINVAL, which hides that the offset is simply too large.
    if (offset > kMaxOffset || data.size() > kMaxOffset - offset) {
      return ErrnoStatus(EFBIG, What("write", offset, data.size()));
    }
    size_t done = 0;
    absl::Status status;
    ScopedBlockingCall blocking;
    while (done < data.size()) {
      ssize_t n = pwrite(fd_, data.data() + done, data.size() - done, offset + done);
      if (n < 0) {
        if (errno == EINTR) continue;
        status = ErrnoStatus(errno, What("write", offset + done, data.size() - done));
        break;
      }
      if (n == 0) {  // pwrite makes no progress only on a broken device
        status = ErrnoStatus(EIO, What("write", offset + done, data.size() - done));
        break;
      }
      done += n;
    }
    // Even a failed write may have extended the file by the part it wrote.
    if (done > 0) GrowSizeTo(offset + done);
    return status;
  }

  absl::Status FlushSync() {
    if (!writable_) return absl::OkStatus();  // nothing was written through this fd
    // Not retried on EINTR alone: any other error means the kernel may have
    // dropped the dirty pages, so the data is in doubt and the caller must
    // know (see BlockFile::Flush).
    ScopedBlockingCall blocking;
    while (fdatasync(fd_) != 0) {
      if (errno != EINTR) return ErrnoStatus(errno, absl::StrFormat("flush %s", name_));
    }
    return absl::OkStatus();
  }

  absl::Status DiscardSync(uint64_t offset, uint64_t length) {
    if (!writable_) return RefuseReadOnly(What("discard", offset, length));
    // KEEP_SIZE ignores the part past the end anyway; clamping also keeps
    // "discard to the end" (length UINT64_MAX) within off_t.
    const uint64_t size = size_.load();
    if (offset >= size) return absl::OkStatus();
    length = std::min(length, size - offset);
    if (length == 0) return absl::OkStatus();  // fallocate says EINVAL for 0
    ScopedBlockingCall blocking;
    while (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0) {
      if (errno == EINTR) continue;
      // A filesystem that cannot punch holes keeps the old bytes, which the
      // contract allows: discarding is advice.
      if (errno == EOPNOTSUPP || errno == ENOSYS) return absl::OkStatus();
      return ErrnoStatus(errno, What("discard", offset, length));
    }
    return absl::OkStatus();
  }

  // fallocate(2) mode 0 over the range. False if the file system cannot
  // reserve space.
  absl::StatusOr<bool> ReserveSync(uint64_t offset, uint64_t length) {
    if (!writable_) return RefuseReadOnly(What("allocate", offset, length));
    if (length == 0) return true;
    if (offset + length > kMaxOffset) return ErrnoStatus(EFBIG, What("allocate", offset, length));
    ScopedBlockingCall blocking;
    while (fallocate(fd_, 0, offset, length) != 0) {
      if (errno == EINTR) continue;
      if (errno == EOPNOTSUPP || errno == ENOSYS) return false;
      return ErrnoStatus(errno, What("allocate", offset, length));
    }
    GrowSizeTo(offset + length);
    return true;
  }

  absl::Status TruncateSync(uint64_t size) {
    const std::string what = absl::StrFormat("truncate %s to %u bytes", name_, size);
    if (!writable_) return RefuseReadOnly(what);
    if (size > kMaxOffset) return ErrnoStatus(EFBIG, what);
    ScopedBlockingCall blocking;
    while (ftruncate(fd_, size) != 0) {
      if (errno != EINTR) return ErrnoStatus(errno, what);
    }
    size_.store(size);
    return absl::OkStatus();
  }

  // Raises size_ to `end` unless a concurrent write already took it further.
  void GrowSizeTo(uint64_t end) {
    uint64_t current = size_.load();
    while (end > current && !size_.compare_exchange_weak(current, end)) {
    }
  }

  absl::StatusOr<uint64_t> Seek(uint64_t offset, int whence) {
    const uint64_t size = size_.load();
    if (offset >= size) return size;
    off_t r = lseek(fd_, offset, whence);
    if (r < 0) {
      if (errno == ENXIO) return size;
      // Filesystems without hole support: everything is data.
      if (errno == EINVAL || errno == EOPNOTSUPP) return whence == SEEK_DATA ? offset : size;
      return ErrnoStatus(errno, absl::StrFormat("lseek %s at offset %u", name_, offset));
    }
    return std::min<uint64_t>(r, size);
  }

  const std::string name_;
  const int fd_;
  const bool writable_;
  // Whether preadv2 takes RWF_NOWAIT for this file.
  std::atomic<bool> nowait_reads_{true};
  // Read by any thread (the FUSE front end asks for the size while writes
  // run); grows with writes past the end, set by Truncate.
  std::atomic<uint64_t> size_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<BlockFile>> AdoptWritablePosixFile(int fd, std::string name) {
  struct stat st;
  absl::Status status;
  if (fstat(fd, &st) != 0) {
    status = ErrnoStatus(errno, absl::StrFormat("stat %s", name));
  } else if (!S_ISREG(st.st_mode)) {
    status = absl::InvalidArgumentError(name + " is not a regular file");
  }
  if (!status.ok()) {
    close(fd);
    return status;
  }
  return std::unique_ptr<BlockFile>(new PosixFile(std::move(name), fd, st.st_size, /*writable=*/true));
}

absl::StatusOr<std::unique_ptr<BlockFile>> OpenPosixFile(const std::string& path,
                                                         bool writable) {
  int fd = open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) {
    // "for writing" only where the mode is the reason: a missing file is
    // missing whatever the mode.
    const int error = errno;
    const bool mode_matters = writable && (error == EACCES || error == EPERM || error == EROFS || error == ETXTBSY);
    return ErrnoStatus(error, absl::StrFormat("cannot open %s%s", path, mode_matters ? " for writing" : ""));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    absl::Status status = ErrnoStatus(errno, absl::StrFormat("stat %s", path));
    close(fd);
    return status;
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrFormat("%s is not a regular file or block device", path));
  }
  uint64_t size = st.st_size;
  if (S_ISBLK(st.st_mode)) {
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < 0) {
      absl::Status status = ErrnoStatus(errno, absl::StrFormat("size of %s", path));
      close(fd);
      return status;
    }
    size = end;
  }
  return std::make_unique<PosixFile>(path, fd, size, writable);
}

}  // namespace qcow2fuse
