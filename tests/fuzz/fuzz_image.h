// What the image fuzz targets share: the input format that carries an image
// file (and its external data file) as sparse chunks, an in-memory sparse
// file to open it from, and the layer opening that the real chain opener
// does, minus every name the image records.
//
// Why sparse: a qcow2 image of 2 MiB clusters is 8 MiB of mostly zeros, and
// a hostile image may claim a 1 TiB file. As chunks, either is a few
// hundred bytes of input, which the fuzzer can mutate at speed, and the
// file the engine sees can be as large as a real sparse file can be.
//
// Input format ("packed image"), every integer big-endian, missing bytes
// read as zero:
//
//   packed  := file_size:u64 data_file_size:u64 chunk_count:u16 chunk* tail
//   chunk   := where:u64 length:u32 byte[length]
//
// `where` is the chunk's offset in the image file, or, with bit 63 set, in
// the external data file. Sizes are capped at kMaxFileSize; chunk bytes
// past a file's size are dropped. A chunk cut short by the end of the input
// keeps what is there. What follows the last chunk is the tail, which a
// target may read (write_fuzzer.cc decodes operations from it).
//
// An input that starts with the qcow2 magic is taken as a plain image file
// instead (no data file, empty tail), so a crafted image can be replayed as
// it is.

#ifndef QCOW2FUSE_TESTS_FUZZ_FUZZ_IMAGE_H_
#define QCOW2FUSE_TESTS_FUZZ_FUZZ_IMAGE_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "data/qcow2_layer.h"
#include "format/header.h"
#include "io/block_file.h"
#include "qcow2fuse/image.h"

namespace qcow2fuse::fuzz {

// ext4's largest file (16 TiB): a write past it fails with EFBIG, as it
// would on the host most users have.
inline constexpr uint64_t kMaxFileSize = uint64_t{1} << 44;
// Bytes a sparse file may hold in pages before a write fails with ENOSPC:
// the engine's own allocations are what the fuzzer is after, not ours.
inline constexpr uint64_t kMaxStoredBytes = uint64_t{256} << 20;

// Prints the message and aborts: an invariant the engine promises is
// broken, and libFuzzer saves the input.
[[noreturn]] void Fail(const std::string& message);
#define FUZZ_CHECK(cond, message)                                                      \
  do {                                                                                  \
    if (!(cond)) ::qcow2fuse::fuzz::Fail(std::string(__FILE__ ":") +                   \
                                         std::to_string(__LINE__) + ": " #cond ": " +   \
                                         (message));                                    \
  } while (0)

// QCOW2FUSE_FUZZ_VERBOSE: at 1, targets print what they do with an input
// (open errors, each request and its status), to see why an input fails
// or whether a seed reaches the checks at all; at 2, every write, discard
// and truncate of a file too.
int Verbose();
#define FUZZ_LOG_AT(level, ...)                                            \
  do {                                                                     \
    if (::qcow2fuse::fuzz::Verbose() >= (level)) {                         \
      std::fprintf(stderr, "%s\n", absl::StrFormat(__VA_ARGS__).c_str()); \
    }                                                                      \
  } while (0)
#define FUZZ_LOG(...) FUZZ_LOG_AT(1, __VA_ARGS__)

// The contents of a sparse file, in 4 KiB pages; pages never written read
// as zeros. Thread-safe (the inflate pool reads from several threads).
class SparseStore {
 public:
  explicit SparseStore(uint64_t size) : size_(size) {}

  uint64_t size() const;
  void Read(uint64_t offset, std::span<uint8_t> out) const;
  absl::Status Write(uint64_t offset, std::span<const uint8_t> data);
  absl::Status Discard(uint64_t offset, uint64_t length);
  absl::Status Truncate(uint64_t size);
  // A copy that later changes to either do not affect the other.
  std::shared_ptr<SparseStore> Clone() const;

 private:
  static constexpr uint64_t kPageBits = 12;
  static constexpr uint64_t kPageSize = uint64_t{1} << kPageBits;
  uint8_t* PageLocked(uint64_t index);  // creates it, or null past kMaxStoredBytes

  mutable std::mutex mu_;
  uint64_t size_;
  std::map<uint64_t, std::unique_ptr<uint8_t[]>> pages_;
};

// A BlockFile over a store; several files may share one store. Read-only
// unless `writable`.
std::unique_ptr<BlockFile> NewSparseFile(std::string name, std::shared_ptr<SparseStore> store,
                                         bool writable);

struct PackedImage {
  std::shared_ptr<SparseStore> image;
  std::shared_ptr<SparseStore> data_file;
  std::span<const uint8_t> tail;
};

// Decodes any bytes as a packed image (see the top of this file).
PackedImage Unpack(std::span<const uint8_t> input);

// Packs `image` and `data_file` (either may be empty) into the input format,
// as chunks of their non-zero 512-byte blocks, then appends `tail`. Empty
// if they need more chunks than the format can count.
std::vector<uint8_t> Pack(std::span<const uint8_t> image, std::span<const uint8_t> data_file,
                          std::span<const uint8_t> tail);

// The header of the image in `store`, decoded as the chain opener does.
absl::StatusOr<Header> ReadHeader(const SparseStore& store);

// Opens the image as the top of a chain with no backing file, the way the
// chain opener does for a real file: encrypted images are refused, and
// images marked corrupt are refused for writing. The external data file,
// if the header asks for one, is `data_file`, never the file the image
// names. `options` gets its own memory budget when it has none, as
// Image::Open gives it.
absl::StatusOr<std::unique_ptr<Qcow2Layer>> OpenLayer(const std::shared_ptr<SparseStore>& image,
                                                      const std::shared_ptr<SparseStore>& data_file,
                                                      bool writable, ImageOptions options = {});

// Starts the st_blocks count as Image::Open does when it would run inline
// (the chain's L2 tables within sync_count_limit); a larger count would
// run on a thread of its own, which a fuzz target does not start.
void CountIfSmall(Qcow2Layer& layer, const ImageOptions& options = {});

// Reads big-endian integers from the front of a span, zeros once it runs out.
class Reader {
 public:
  explicit Reader(std::span<const uint8_t> bytes) : bytes_(bytes) {}
  uint64_t Take(int width);  // 1..8 bytes
  std::span<const uint8_t> TakeBytes(uint64_t length);
  std::span<const uint8_t> rest() const { return bytes_; }
  bool empty() const { return bytes_.empty(); }

 private:
  std::span<const uint8_t> bytes_;
};

}  // namespace qcow2fuse::fuzz

#endif  // QCOW2FUSE_TESTS_FUZZ_FUZZ_IMAGE_H_
