#include "support/file_util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "support/command.h"

namespace qcow2fuse::test {
namespace {

constexpr size_t kChunk = 1 << 20;

absl::Status ErrnoError(absl::string_view what, int error_number) {
  return absl::InternalError(absl::StrCat(what, ": ", strerror(error_number)));
}

std::string HexBytes(const char* data, size_t length) {
  std::string hex;
  for (size_t i = 0; i < length; ++i) {
    absl::StrAppendFormat(&hex, "%s%02x", i == 0 ? "" : " ",
                          static_cast<unsigned char>(data[i]));
  }
  return hex;
}

}  // namespace

absl::StatusOr<size_t> ReadFully(int fd, uint64_t offset, char* buffer,
                                 size_t length) {
  size_t done = 0;
  while (done < length) {
    ssize_t n = pread(fd, buffer + done, length - done, offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      return ErrnoError(absl::StrCat("pread at offset ", offset + done), errno);
    }
    if (n == 0) break;
    done += n;
  }
  return done;
}

std::ostream& operator<<(std::ostream& out, const ByteRange& range) {
  return out << "[" << range.offset << ", " << range.end() << ")";
}

void AlignedFree::operator()(uint8_t* p) const { std::free(p); }

AlignedBuffer AllocAligned(size_t size) {
  void* p = nullptr;
  if (posix_memalign(&p, 4096, size) != 0) std::abort();
  return AlignedBuffer(static_cast<uint8_t*>(p));
}

ScopedFd& ScopedFd::operator=(ScopedFd&& other) noexcept {
  if (this != &other) {
    Reset();
    fd_ = other.release();
  }
  return *this;
}

int ScopedFd::release() {
  int fd = fd_;
  fd_ = -1;
  return fd;
}

void ScopedFd::Reset() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

absl::StatusOr<ScopedFd> OpenReadOnly(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(absl::StrCat("open ", path), errno);
  return ScopedFd(fd);
}

absl::StatusOr<uint64_t> FileSize(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) return ErrnoError("fstat", errno);
  return static_cast<uint64_t>(st.st_size);
}

bool TellsWhetherAReadWouldSleep(int fd) {
  uint8_t byte;
  iovec one{&byte, 1};
  return preadv2(fd, &one, 1, 0, RWF_NOWAIT) >= 0 || errno != EOPNOTSUPP;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  absl::StatusOr<ScopedFd> fd = OpenReadOnly(path);
  if (!fd.ok()) return fd.status();
  std::string contents;
  std::string buffer(kChunk, '\0');
  for (;;) {
    absl::StatusOr<size_t> n =
        ReadFully(fd->get(), contents.size(), buffer.data(), buffer.size());
    if (!n.ok()) return n.status();
    contents.append(buffer.data(), *n);
    if (*n < buffer.size()) return contents;
  }
}

absl::Status WriteFileAt(const std::string& path, uint64_t offset,
                         absl::string_view data) {
  ScopedFd fd(open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
  if (fd.get() < 0) return ErrnoError(absl::StrCat("open ", path), errno);
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n =
        pwrite(fd.get(), data.data() + done, data.size() - done, offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return ErrnoError(absl::StrCat("pwrite ", path), errno);
    done += n;
  }
  return absl::OkStatus();
}

absl::Status CompareFiles(const std::string& actual,
                          const std::string& expected) {
  absl::StatusOr<ScopedFd> a = OpenReadOnly(actual);
  if (!a.ok()) return a.status();
  absl::StatusOr<ScopedFd> b = OpenReadOnly(expected);
  if (!b.ok()) return b.status();
  absl::StatusOr<uint64_t> a_size = FileSize(a->get());
  absl::StatusOr<uint64_t> b_size = FileSize(b->get());
  if (!a_size.ok()) return a_size.status();
  if (!b_size.ok()) return b_size.status();

  std::string a_buf(kChunk, '\0'), b_buf(kChunk, '\0');
  const uint64_t common = std::min(*a_size, *b_size);
  for (uint64_t offset = 0; offset < common; offset += kChunk) {
    size_t want = std::min<uint64_t>(kChunk, common - offset);
    absl::StatusOr<size_t> a_n =
        ReadFully(a->get(), offset, a_buf.data(), want);
    if (!a_n.ok()) return a_n.status();
    absl::StatusOr<size_t> b_n =
        ReadFully(b->get(), offset, b_buf.data(), want);
    if (!b_n.ok()) return b_n.status();
    if (*a_n != want || *b_n != want) {
      return absl::DataLossError(absl::StrCat(
          "short read at offset ", offset, ": ", actual, " gave ", *a_n, ", ",
          expected, " gave ", *b_n, " of ", want, " bytes"));
    }
    if (memcmp(a_buf.data(), b_buf.data(), want) == 0) continue;
    size_t i = 0;
    while (a_buf[i] == b_buf[i]) ++i;
    size_t shown = std::min<size_t>(16, want - i);
    return absl::DataLossError(absl::StrFormat(
        "%s differs from %s at offset %d (0x%x):\n  actual:   %s\n"
        "  expected: %s",
        actual, expected, offset + i, offset + i,
        HexBytes(a_buf.data() + i, shown), HexBytes(b_buf.data() + i, shown)));
  }
  if (*a_size != *b_size) {
    return absl::DataLossError(absl::StrCat(
        actual, " has size ", *a_size, " but ", expected, " has size ", *b_size,
        " (contents agree up to ", common, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Sha256File(const std::string& path) {
  absl::StatusOr<std::string> out = RunChecked({"sha256sum", "--", path});
  if (!out.ok()) return out.status();
  size_t space = out->find(' ');
  if (space != 64) {
    return absl::InternalError(
        absl::StrCat("unexpected sha256sum output: ", *out));
  }
  return out->substr(0, space);
}

absl::StatusOr<std::vector<ByteRange>> DataRegions(int fd) {
  absl::StatusOr<uint64_t> size = FileSize(fd);
  if (!size.ok()) return size.status();
  std::vector<ByteRange> regions;
  uint64_t offset = 0;
  while (offset < *size) {
    off_t data = lseek(fd, offset, SEEK_DATA);
    if (data < 0 && errno == ENXIO) break;  // Only a hole is left.
    if (data < 0) {
      return ErrnoError(absl::StrCat("lseek(", offset, ", SEEK_DATA)"), errno);
    }
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) {
      return ErrnoError(absl::StrCat("lseek(", data, ", SEEK_HOLE)"), errno);
    }
    if (static_cast<uint64_t>(data) < offset || hole <= data ||
        static_cast<uint64_t>(hole) > *size) {
      return absl::InternalError(absl::StrCat(
          "lseek contract broken: SEEK_DATA from ", offset, " gave ", data,
          ", SEEK_HOLE from there gave ", hole, ", file size ", *size));
    }
    regions.push_back(
        {static_cast<uint64_t>(data), static_cast<uint64_t>(hole - data)});
    offset = hole;
  }
  return regions;
}

std::vector<ByteRange> Complement(const std::vector<ByteRange>& regions,
                                  uint64_t size) {
  std::vector<ByteRange> gaps;
  uint64_t offset = 0;
  for (const ByteRange& region : regions) {
    if (region.offset > offset)
      gaps.push_back({offset, region.offset - offset});
    offset = std::max(offset, region.end());
  }
  if (offset < size) gaps.push_back({offset, size - offset});
  return gaps;
}

absl::Status CheckZeros(int fd, const ByteRange& range) {
  std::string buffer(kChunk, '\0');
  for (uint64_t offset = range.offset; offset < range.end(); offset += kChunk) {
    size_t want = std::min<uint64_t>(kChunk, range.end() - offset);
    absl::StatusOr<size_t> n = ReadFully(fd, offset, buffer.data(), want);
    if (!n.ok()) return n.status();
    if (*n != want) {
      return absl::DataLossError(absl::StrCat("short read at offset ", offset,
                                              ": ", *n, " of ", want));
    }
    auto nonzero = std::find_if(buffer.begin(), buffer.begin() + want,
                                [](char c) { return c != 0; });
    if (nonzero != buffer.begin() + want) {
      uint64_t at = offset + (nonzero - buffer.begin());
      return absl::DataLossError(absl::StrFormat(
          "byte at offset %d (0x%x) in %s is 0x%02x, not zero", at, at,
          absl::StrCat("[", range.offset, ", ", range.end(), ")"),
          static_cast<unsigned char>(*nonzero)));
    }
  }
  return absl::OkStatus();
}

std::vector<std::string> DirectoryNames(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    closedir(d);
  }
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace qcow2fuse::test
