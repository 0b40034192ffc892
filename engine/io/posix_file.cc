#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"
#include "io/block_file.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

class PosixFile final : public BlockFile {
 public:
  PosixFile(std::string name, int fd, uint64_t size) : name_(std::move(name)), fd_(fd), size_(size) {}
  ~PosixFile() override { close(fd_); }

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override {
    co_return ReadSync(offset, out);
  }

  uint64_t size() const override { return size_; }
  const std::string& name() const override { return name_; }

  absl::StatusOr<uint64_t> NextData(uint64_t offset) override { return Seek(offset, SEEK_DATA); }
  absl::StatusOr<uint64_t> NextHole(uint64_t offset) override { return Seek(offset, SEEK_HOLE); }

 private:
  absl::Status ReadSync(uint64_t offset, std::span<uint8_t> out) {
    size_t done = 0;
    while (done < out.size()) {
      ssize_t n = pread(fd_, out.data() + done, out.size() - done, offset + done);
      if (n < 0) {
        if (errno == EINTR) continue;
        return ErrnoStatus(errno, absl::StrFormat("read %s at offset %u, %u bytes", name_,
                                                  offset + done, out.size() - done));
      }
      if (n == 0) {  // end of file: the rest reads as zeros
        std::memset(out.data() + done, 0, out.size() - done);
        break;
      }
      done += n;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<uint64_t> Seek(uint64_t offset, int whence) {
    if (offset >= size_) return size_;
    off_t r = lseek(fd_, offset, whence);
    if (r < 0) {
      if (errno == ENXIO) return size_;
      // Filesystems without hole support: everything is data.
      if (errno == EINVAL || errno == EOPNOTSUPP) return whence == SEEK_DATA ? offset : size_;
      return ErrnoStatus(errno, absl::StrFormat("lseek %s at offset %u", name_, offset));
    }
    return std::min<uint64_t>(r, size_);
  }

  const std::string name_;
  const int fd_;
  const uint64_t size_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<BlockFile>> OpenPosixFile(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, absl::StrFormat("open %s", path));
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
  return std::make_unique<PosixFile>(path, fd, size);
}

}  // namespace qcow2fuse
