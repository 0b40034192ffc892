// SequentialReads: tells a sequential reader of a view from the others, so
// that the daemon can have the host read the image ahead of it
// (-o image_readahead, Image::WillNeed).
//
// Why the host's own readahead is not enough: the kernel reads ahead of a
// sequential reader of the view and sends those reads to the daemon, whose
// workers read the image file with them, several at once and in any order.
// The host's readahead of the image sees reads that jump back and forth and
// keeps fewer reads in flight on the disk than for a reader of a raw file
// there (about half, on a virtio disk with 8 MiB of readahead), and a
// compressed image's reads are smaller than the bytes they inflate to.
//
// A stream is a run of reads each starting near where the reads before it
// ended: within kSlack, since the reads of one readahead batch arrive in any
// order. A read elsewhere starts a new stream. Once kConfirmingReads reads
// have continued it, each read that moves the stream's end returns the part
// of [end, end + window) not handed out yet, in steps of at least a quarter
// of the window so that the host gets few large requests. Reads smaller than
// kMinReadBytes are not looked at: the kernel's readahead sends larger ones,
// and a random reader of small blocks pays nothing here.
//
// One per view; thread-safe.

#ifndef QCOW2FUSE_FUSE_SEQUENTIAL_READS_H_
#define QCOW2FUSE_FUSE_SEQUENTIAL_READS_H_

#include <cstdint>
#include <mutex>

namespace qcow2fuse {

class SequentialReads {
 public:
  static constexpr uint64_t kMinReadBytes = uint64_t{64} << 10;
  static constexpr uint64_t kSlack = uint64_t{4} << 20;
  static constexpr unsigned kConfirmingReads = 2;

  // Bytes of the view to read ahead; none when length is 0.
  struct Range {
    uint64_t offset = 0;
    uint64_t length = 0;
  };

  // A read of [offset, offset + length) of the view, whose size is `size`,
  // was answered. Returns what to read ahead of it, at most `window` bytes
  // past the stream's end and never past `size`; nothing when `window` is 0.
  Range Read(uint64_t offset, uint64_t length, uint64_t size, uint64_t window);

 private:
  std::mutex mu_;
  unsigned reads_ = 0;  // of the stream, counted up to kConfirmingReads + 1
  uint64_t end_ = 0;    // where the stream is expected to go on
  uint64_t ahead_ = 0;  // handed out to be read ahead up to here
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_SEQUENTIAL_READS_H_
