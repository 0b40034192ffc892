// HeaderWriter: changes fields of the image header so that a failed write
// never leaves a field half-changed.
//
// A header switch (the refcount table's offset and size, the L1 table's,
// the disk size, feature bits) is a write of a few bytes followed by a
// barrier. A host error can land such a write in part: a short write that
// fills the disk after 6 of 12 bytes leaves an offset that is half old and
// half new, pointing nowhere, and the next flush makes it durable. So when
// the write or its barrier fails, the old bytes are written back at once:
// the header then says what the caller's in-memory state still says. If
// even that fails, the old bytes are kept and written again before
// anything else here and at the start of every flush of the image
// (Settle), which fails until they are back.
//
// Callers serialise all calls (the metadata lock).

#ifndef QCOW2FUSE_META_HEADER_WRITER_H_
#define QCOW2FUSE_META_HEADER_WRITER_H_

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "io/block_file.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

class HeaderWriter {
 public:
  // `file` must be writable and outlive this.
  explicit HeaderWriter(BlockFile* file) : file_(file) {}

  HeaderWriter(const HeaderWriter&) = delete;
  HeaderWriter& operator=(const HeaderWriter&) = delete;

  // Writes `now` at `offset` of the header, where `before` is (the same
  // length), then a barrier. On success the new bytes are durable. On
  // failure the header holds `before` again (or will, see Settle) and the
  // caller keeps its old state.
  Task<absl::Status> Switch(uint64_t offset, std::span<const uint8_t> now, std::span<const uint8_t> before);

  // Writes back old bytes that a failed Switch could not restore. Every
  // flush of the image runs this first.
  Task<absl::Status> Settle();

  // Whether old bytes wait to be written back.
  bool unsettled() const { return pending_.has_value(); }

 private:
  struct Restore {
    uint64_t offset;
    std::vector<uint8_t> bytes;
  };

  // Writes `before` back after a failed switch; remembers it if that fails.
  Task<absl::Status> Undo(uint64_t offset, std::span<const uint8_t> before, absl::Status failure);

  BlockFile* const file_;
  std::optional<Restore> pending_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_META_HEADER_WRITER_H_
