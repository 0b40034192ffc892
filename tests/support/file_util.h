// File helpers for checking a raw view against its reference.
//
//   EXPECT_OK(CompareFiles(view, reference));   // names the first mismatch
//   ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(view));
//   ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> data, DataRegions(fd.get()));
//   for (const ByteRange& hole : Complement(data, size)) {
//     EXPECT_OK(CheckZeros(fd.get(), hole));
//   }
//
// Reads go through pread in bounded chunks, so large views are never held
// in memory whole.

#ifndef QCOW2FUSE_TESTS_SUPPORT_FILE_UTIL_H_
#define QCOW2FUSE_TESTS_SUPPORT_FILE_UTIL_H_

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qcow2fuse::test {

// A half-open byte range [offset, offset + length).
struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;

  uint64_t end() const { return offset + length; }
  bool Contains(const ByteRange& other) const {
    return offset <= other.offset && other.end() <= end();
  }
  friend bool operator==(const ByteRange&, const ByteRange&) = default;
};

std::ostream& operator<<(std::ostream& out, const ByteRange& range);

// Owns a file descriptor and closes it.
class ScopedFd {
 public:
  ScopedFd() = default;
  explicit ScopedFd(int fd) : fd_(fd) {}
  ScopedFd(ScopedFd&& other) noexcept : fd_(other.release()) {}
  ScopedFd& operator=(ScopedFd&& other) noexcept;
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  ~ScopedFd() { Reset(); }

  int get() const { return fd_; }
  int release();
  void Reset();

 private:
  int fd_ = -1;
};

// A page-aligned buffer, as O_DIRECT needs, freed with free().
struct AlignedFree {
  void operator()(uint8_t* p) const;
};
using AlignedBuffer = std::unique_ptr<uint8_t, AlignedFree>;
// `size` bytes, page-aligned and uninitialised; aborts when memory is out.
AlignedBuffer AllocAligned(size_t size);

// open(path, O_RDONLY | O_CLOEXEC).
absl::StatusOr<ScopedFd> OpenReadOnly(const std::string& path);

// The size of an open file (fstat).
absl::StatusOr<uint64_t> FileSize(int fd);

// Reads up to `length` bytes at `offset` of `fd` into `buffer`, retrying
// short reads; returns fewer only at the end of the file.
absl::StatusOr<size_t> ReadFully(int fd, uint64_t offset, char* buffer,
                                 size_t length);

// Whether the file system of the open file `fd` can say that a read would
// have to wait for the disk (preadv2 with RWF_NOWAIT) rather than refuse
// the flag (EOPNOTSUPP). Reads one byte at offset 0.
bool TellsWhetherAReadWouldSleep(int fd);

// The whole contents of `path`.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// Writes `data` at `offset` of `path`, creating it if missing and never
// truncating it: the way to lay down test content and patch headers.
absl::Status WriteFileAt(const std::string& path, uint64_t offset,
                         absl::string_view data);

// OK if both files have the same size and bytes. Otherwise the error names
// the first differing offset and shows 16 bytes of each file from there.
absl::Status CompareFiles(const std::string& actual,
                          const std::string& expected);

// The hex digest printed by the sha256sum command.
absl::StatusOr<std::string> Sha256File(const std::string& path);

// The names in directory `dir`, sorted, without . and .. (none if it
// cannot be read).
std::vector<std::string> DirectoryNames(const std::string& dir);

// Walks `fd` with lseek SEEK_DATA/SEEK_HOLE from offset 0 to its size and
// returns the data regions, in order and non-overlapping. Answers that
// break the lseek contract (going backwards, empty regions) are errors.
absl::StatusOr<std::vector<ByteRange>> DataRegions(int fd);

// The parts of [0, size) not covered by `regions` (sorted, disjoint).
std::vector<ByteRange> Complement(const std::vector<ByteRange>& regions,
                                  uint64_t size);

// OK if `range` of `fd` reads as zeros; otherwise names the first non-zero
// byte. A short read is an error too.
absl::Status CheckZeros(int fd, const ByteRange& range);

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_SUPPORT_FILE_UTIL_H_
