// Image: a qcow2 disk image, with its backing chain, seen as a disk of
// virtual_size() bytes. This is the engine's whole public API; front ends
// (the FUSE binary, tests) use nothing else.
//
// Every operation is a Task. Open it with SyncWait(Image::Open(...)); run
// the rest on a Scheduler. Operations on one Image may run concurrently.
//
// A read-write Image keeps metadata changes in its caches until Flush();
// call Close() (or at least Flush()) before destroying it, or the
// unflushed writes are lost (the image stays consistent: a lost write
// leaks at most a few clusters). Its enabled persistent dirty bitmaps are
// marked in use from the first change on and record every write,
// write-zeroes and discard; Close() stores them consistent again.

#ifndef QCOW2FUSE_IMAGE_H_
#define QCOW2FUSE_IMAGE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

// What to do with a write whose data is all zeros (QEMU's detect-zeroes).
enum class DetectZeroes {
  kOff,    // write it as data
  kOn,     // make zero clusters instead of writing data
  kUnmap,  // make zero clusters and free the host clusters they had
};

class MemoryBudget;

struct ImageOptions {
  // Open for reading only.
  bool read_only = true;
  // Bytes of clean L2 table slices each image of the chain may cache (at
  // least one slice); slices changed since the last flush come on top.
  uint64_t l2_cache_size = uint64_t{4} << 20;
  // Path of the external data file, overriding the name the image records.
  std::string data_file;
  // Path of the top image's backing file, overriding the name its header
  // records (or giving one to an image without); the header is not
  // changed. Opened read-only, as any backing file.
  std::string backing_file;
  // Format of the top image's backing file ("qcow2" or "raw"), overriding
  // the header's backing format; empty: the header's, else probed.
  std::string backing_format;
  // Take none of QEMU's image locks (read-only opens only), as qemu-img -U:
  // the image may then change underneath us.
  bool force_share = false;
  DetectZeroes detect_zeroes = DetectZeroes::kOff;
  // The count behind AllocatedBytes() is made at open while the chain's L2
  // tables come to at most this many bytes; past it (a large image) it is
  // made in the background, so that opening a 1 TiB view stays fast.
  uint64_t sync_count_limit = uint64_t{16} << 20;
  // Bytes the whole chain may spend on structures whose size the image
  // files decide (L1 tables, snapshot and bitmap tables, header
  // extensions, metadata caches, a refcount rebuild): a hostile image is
  // refused instead of exhausting memory.
  uint64_t max_metadata_memory = uint64_t{256} << 20;
  // The budget of max_metadata_memory, shared by every layer of the chain;
  // Image::Open makes it from max_metadata_memory when null.
  std::shared_ptr<MemoryBudget> budget;
};

// Work done by the write path since the image was opened. Tests use these
// to prove that a request that changes nothing writes nothing.
struct ImageCounters {
  uint64_t l2_slices_dirtied = 0;   // L2 slices that went from clean to dirty
  uint64_t l2_slice_reads = 0;      // L2 slices read from the file
  uint64_t l2_reads = 0;            // reads of the file for them: a walk reads several slices at once
  uint64_t metadata_writes = 0;     // writes of L1/L2 tables, refcounts, header fields
  uint64_t data_bytes_written = 0;  // guest data (and explicit zeros) written
};

// What a run of the disk holds, following the backing chain.
enum class ExtentKind {
  kData,         // stored data (possibly compressed) somewhere in the chain
  kZero,         // known to read as zeros (zero clusters, holes of a raw file)
  kUnallocated,  // allocated nowhere in the chain: reads as zeros
};

struct Extent {
  ExtentKind kind;
  uint64_t length;
};

// A new, empty qcow2 image, as `qemu-img create -f qcow2` makes one.
struct NewImageOptions {
  uint64_t size = 0;            // virtual disk size, a positive multiple of 512
  uint64_t cluster_size = 65536;
  std::string backing_file;     // recorded as given; empty: none
  std::string backing_format;   // "qcow2" or "raw"; empty: not recorded
};

// An internal snapshot, as the image's snapshot table lists it.
struct SnapshotInfo {
  uint32_t index = 0;      // position in the snapshot table
  std::string id;          // QEMU's snapshot ID ("1", "2", ...)
  std::string name;        // may be empty; QEMU does not force names to be unique
  uint64_t disk_size = 0;  // the disk's size when the snapshot was taken
};

class Qcow2Layer;

class Image {
 public:
  // Opens the qcow2 image at `path` and its whole backing chain. Errors say
  // which file and which field are wrong.
  static Task<absl::StatusOr<std::unique_ptr<Image>>> Open(std::string path, ImageOptions options);

  // Writes a new, empty qcow2 image (version 3) into `fd`, an empty regular
  // file open for writing, and makes it durable (fdatasync) before
  // returning OK. `name` is for messages.
  static absl::Status Create(int fd, const std::string& name, const NewImageOptions& options);

  ~Image();
  Image(const Image&) = delete;
  Image& operator=(const Image&) = delete;

  // Size of the disk in bytes.
  uint64_t virtual_size() const { return virtual_size_.load(); }
  uint64_t cluster_size() const { return cluster_size_; }
  bool read_only() const { return options_.read_only; }

  // Fills `out` with the disk's bytes from `offset`. The range must lie
  // inside the disk (OutOfRangeError otherwise). A damaged metadata entry
  // met on the way fails this read with DataLossError naming the entry;
  // other reads are unaffected.
  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out);

  // For a caller that passes disk bytes on without looking at them (a
  // spliced FUSE reply): when all of [offset, offset + length) is stored as
  // one run of plain bytes in a host file with a descriptor, calls
  // send(fd, file_offset) and returns true; the host clusters behind the
  // run are not reused for other data until `send` returns, so it must
  // read the bytes before then. Returns false, without calling `send`, for
  // anything else (zeros, compressed or backing runs, a run split in the
  // file): Read those. Errors as Read's.
  Task<absl::StatusOr<bool>> SendStored(uint64_t offset, uint64_t length,
                                        absl::FunctionRef<void(int fd, uint64_t file_offset)> send);

  // The kind of the run starting at `offset` (< virtual_size()) and its
  // length, at most `max_length`. Adjacent runs of one kind are merged.
  Task<absl::StatusOr<Extent>> BlockStatus(uint64_t offset, uint64_t max_length);

  // Advice that the data in [offset, offset + length) will be read soon
  // (a caller found data there with SEEK_DATA): the host bytes behind its
  // first `max_data` bytes of data start coming into the host's page cache
  // in the background. Only advice: a range outside the disk or a damaged
  // entry is ignored here and reported by the read.
  Task<void> WillNeed(uint64_t offset, uint64_t length, uint64_t max_data);

  // Writes `data` at `offset`; the range must lie inside the disk.
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data);

  // Makes every write completed before it durable.
  Task<absl::Status> Flush();

  // Has the host write the guest data written so far to stable storage
  // now (fdatasync of the file that holds it), without holding up other
  // requests, so that the next Flush, which must wait for that, is short.
  // It makes nothing durable by itself: only Flush does, with the
  // metadata. A failure is reported again by every later Flush.
  Task<absl::Status> SyncData();

  // The final flush: waits for the changes in flight, makes every write
  // durable, and stores the persistent dirty bitmaps with their in-use
  // flags cleared, as QEMU does when it closes an image (bitmaps it could
  // not maintain stay in use). A change after it marks them in use again.
  Task<absl::Status> Close();

  // Makes [offset, offset + length) read as zeros and frees the clusters
  // wholly inside it, as fallocate(PUNCH_HOLE) does to a file.
  Task<absl::Status> Discard(uint64_t offset, uint64_t length);

  // Makes the range read as zeros with zero clusters rather than written
  // zeros (fallocate ZERO_RANGE). Host clusters are kept unless `may_unmap`.
  Task<absl::Status> WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap = false);

  // Allocates host clusters for the range without changing what it reads
  // (fallocate mode 0), so later writes there need no allocation.
  Task<absl::Status> Preallocate(uint64_t offset, uint64_t length);

  ImageCounters counters() const;

  // The internal snapshots of the top image, read from its snapshot table
  // now. A table that cannot be decoded is a DataLossError.
  Task<absl::StatusOr<std::vector<SnapshotInfo>>> Snapshots();

  // A read-only Image of the disk as snapshot `snapshot` (from Snapshots())
  // recorded it, as `qemu-img convert -l` reads it: through the snapshot's
  // own L1 table, at snapshot.disk_size. It shares this image's files, L2
  // cache and backing chain, and may be read while this image is written;
  // destroy it before this image. An image with an external data file has
  // no usable snapshots (FailedPreconditionError), as in QEMU.
  Task<absl::StatusOr<std::unique_ptr<Image>>> OpenSnapshot(const SnapshotInfo& snapshot);

  // Grows the disk (the new space reads as zeros) or shrinks it where that
  // loses no data (FailedPreconditionError otherwise). The size must be a
  // multiple of 512 bytes, as QEMU requires.
  Task<absl::Status> Truncate(uint64_t new_size);

  // Whether a shrink to `new_size` would lose data: the error Truncate
  // would refuse it with (naming the first byte that is not zero), or OK.
  // Changes nothing.
  Task<absl::Status> CheckShrink(uint64_t new_size);

  // Bytes of the disk that are kData, for st_blocks; it costs nothing. One
  // walk of every L2 table of the chain makes the count, at open or, where
  // the tables exceed ImageOptions::sync_count_limit, in the background;
  // every write, zeroing, discard and resize then keeps it exact. Until
  // the walk is done this is an estimate: the bytes the image file
  // occupies on its file system (a block device: its size), at most the
  // disk's size.
  Task<absl::StatusOr<uint64_t>> AllocatedBytes();

  // One line per image of the chain, top first, for logs.
  std::string DescribeChain() const;

  // The open descriptors of every host file of the chain: the top image
  // file first, then its data file and the backing files. They stay owned
  // by the image; use them only to fstat/fstatvfs (never through a path,
  // which may lead through a mount served by this very process).
  std::vector<int> FileDescriptors() const;

 private:
  Image(std::unique_ptr<Qcow2Layer> top, ImageOptions options);
  static constexpr uint64_t kSectorSize = 512;
  static uint64_t DiskSize(const Qcow2Layer& top);

  const std::unique_ptr<Qcow2Layer> top_;
  const ImageOptions options_;
  std::atomic<uint64_t> virtual_size_;
  const uint64_t cluster_size_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_IMAGE_H_
