// BlockFile: the engine's view of a host file (image, backing file, external
// data file). Operations are Tasks so that an implementation may complete
// them asynchronously; today's PosixFile completes them inline.
//
// Reads past the end of the file produce zeros, as for a sparse file that
// was never written there: QEMU may leave the last cluster of an image
// short, and a data file may be shorter than the disk it backs.
//
// Writing. A file opened writable accepts Write, Discard and Truncate; one
// opened read-only (the default, and every BlockFile that does not override
// them) refuses them with FailedPreconditionError. Durability is explicit:
// a completed Write is visible to later Reads at once, but survives a crash
// only once a Flush issued after it has completed. Writes that no Flush has
// covered may reach the disk in any order, all, some or none of them; see
// io/recording_file.h for the crash model the tests check the engine against.
//
// Threads. Operations may be issued from several threads at once. The file
// does not order overlapping operations that are in flight together (a
// Write racing a Read, Discard or Truncate of the same bytes gives either
// order); the caller serializes those it cares about. size() may be read
// from any thread at any time.
//
// Errors carry the file name and the offset and length involved, and, for a
// failed system call, the errno (see qcow2fuse/status.h).

#ifndef QCOW2FUSE_IO_BLOCK_FILE_H_
#define QCOW2FUSE_IO_BLOCK_FILE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

class BlockFile {
 public:
  virtual ~BlockFile() = default;

  // Fills `out` from `offset`; bytes past the end of the file read as zero.
  virtual Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) = 0;

  // Size of the file in bytes. It grows with Writes past the end and
  // follows Truncate; safe to call from any thread.
  virtual uint64_t size() const = 0;

  // Whether Write, Discard and Truncate are allowed.
  virtual bool writable() const { return false; }

  // Writes `data` at `offset`, extending the file if it ends past size()
  // (any gap reads as zeros). On success size() >= offset + data.size(),
  // except that an empty write changes nothing. On failure some prefix of
  // `data` may have been written.
  virtual Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) {
    co_return RefuseReadOnly("write " + name() + " at offset " + std::to_string(offset) + ", " +
                             std::to_string(data.size()) + " bytes");
  }

  // Makes every Write, Discard and Truncate that completed before Flush was
  // called durable (fdatasync). Operations still in flight when it is called
  // are not covered. After a failed Flush, whether earlier writes are durable
  // is unknown, and a later successful Flush does not say they are: the
  // kernel may have dropped the pages it failed to write.
  virtual Task<absl::Status> Flush() { co_return absl::OkStatus(); }

  // Tells the file that the contents of [offset, offset + length) are no
  // longer needed. Where the filesystem can, the range is deallocated (a
  // hole is punched) and reads as zeros; where it cannot, the old bytes may
  // stay. Callers must not rely on either: a range that must read as zeros
  // is written with zeros. size() does not change; the part of the range
  // past the end of the file is ignored.
  virtual Task<absl::Status> Discard(uint64_t offset, uint64_t length) {
    co_return RefuseReadOnly("discard " + name() + " at offset " + std::to_string(offset) + ", " +
                             std::to_string(length) + " bytes");
  }

  // Reserves space for [offset, offset + length) so that later writes
  // there need no allocation by the filesystem; the file grows to cover
  // the range and never shrinks. What the range reads is not defined (the
  // caller's metadata says it is zero), except that a part that lay past
  // the end of the file reads as zeros. Files that cannot reserve space
  // just grow, by writing a zero byte at the end of the range: unlike a
  // truncate, that cannot cut off what a concurrent write just appended.
  virtual Task<absl::Status> Allocate(uint64_t offset, uint64_t length) {
    if (length == 0 || offset + length <= size()) co_return absl::OkStatus();
    static constexpr uint8_t kZero[1] = {0};
    co_return co_await Write(offset + length - 1, kZero);
  }

  // Sets the file's size to `size`: bytes past it are dropped, and a grown
  // tail reads as zeros.
  virtual Task<absl::Status> Truncate(uint64_t size) {
    co_return RefuseReadOnly("truncate " + name() + " to " + std::to_string(size) + " bytes");
  }

  // The next offset >= `offset` where the file has data (SEEK_DATA), or
  // size() when there is none. Files that cannot tell report all data.
  virtual absl::StatusOr<uint64_t> NextData(uint64_t offset) { return offset; }
  // The next offset >= `offset` where the file has a hole (SEEK_HOLE).
  virtual absl::StatusOr<uint64_t> NextHole(uint64_t /*offset*/) { return size(); }

  // Advice that `length` bytes from `offset` will be read soon: the file
  // may start reading them in the background. Never fails.
  virtual void WillNeed(uint64_t /*offset*/, uint64_t /*length*/) {}

  // The POSIX file descriptor behind the file, for byte-range locks
  // (fcntl F_OFD_SETLK), or -1 when there is none. It stays owned by the
  // file; do not read, write or close it.
  virtual int fd() const { return -1; }

  // The file's path, for messages.
  virtual const std::string& name() const = 0;

 protected:
  // The error every mutating operation of a read-only file returns;
  // `what` names the operation, e.g. "write f.img at offset 0, 512 bytes".
  absl::Status RefuseReadOnly(const std::string& what) const {
    return absl::FailedPreconditionError(what + ": " + name() + " is open read-only");
  }
};

// Opens `path` (a regular file or a block device) with the POSIX file API,
// read-only unless `writable`.
absl::StatusOr<std::unique_ptr<BlockFile>> OpenPosixFile(const std::string& path,
                                                         bool writable = false);

// A writable BlockFile on `fd`, an open regular file, which it takes over
// (and closes); `name` is for messages.
absl::StatusOr<std::unique_ptr<BlockFile>> AdoptWritablePosixFile(int fd, std::string name);

// A read-only file that reads through `file`, which stays owned elsewhere
// and must outlive it; it never writes, whatever `file` allows.
std::unique_ptr<BlockFile> BorrowReadOnly(BlockFile* file);

// A writable file held in memory, for tests. It behaves like a PosixFile on
// a filesystem that punches holes (Discard zeroes the range) and is safe to
// use from several threads.
std::unique_ptr<BlockFile> NewMemFile(std::string name, std::vector<uint8_t> contents);

// A copy of the current contents of a file made by NewMemFile, for tests to
// compare against. Any other BlockFile gives InvalidArgumentError.
absl::StatusOr<std::vector<uint8_t>> MemFileContents(const BlockFile& file);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_IO_BLOCK_FILE_H_
