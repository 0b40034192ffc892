// BlockFile: the engine's view of a host file (image, backing file, external
// data file). Operations are Tasks so that an implementation may complete
// them asynchronously; today's PosixFile completes them inline.
//
// Reads past the end of the file produce zeros, as for a sparse file that
// was never written there: QEMU may leave the last cluster of an image
// short, and a data file may be shorter than the disk it backs.

#ifndef QCOW2FUSE_IO_BLOCK_FILE_H_
#define QCOW2FUSE_IO_BLOCK_FILE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

class BlockFile {
 public:
  virtual ~BlockFile() = default;

  // Fills `out` from `offset`; bytes past the end of the file read as zero.
  virtual Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) = 0;

  // Size of the file in bytes, as of open (the engine is read-only for now).
  virtual uint64_t size() const = 0;

  // The next offset >= `offset` where the file has data (SEEK_DATA), or
  // size() when there is none. Files that cannot tell report all data.
  virtual absl::StatusOr<uint64_t> NextData(uint64_t offset) { return offset; }
  // The next offset >= `offset` where the file has a hole (SEEK_HOLE).
  virtual absl::StatusOr<uint64_t> NextHole(uint64_t /*offset*/) { return size(); }

  // The file's path, for messages.
  virtual const std::string& name() const = 0;
};

// Opens `path` read-only with the POSIX file API.
absl::StatusOr<std::unique_ptr<BlockFile>> OpenPosixFile(const std::string& path);

// A file held in memory, for tests.
std::unique_ptr<BlockFile> NewMemFile(std::string name, std::vector<uint8_t> contents);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_IO_BLOCK_FILE_H_
