// Builds test images step by step with qemu-img and qemu-io.
//
// A recipe is a plain list of steps:
//
//   ImageBuilder b(dir.path(), seed);
//   b.Create("disk.qcow2", 16 * kMiB, {"cluster_size=4096"});
//   b.Io("disk.qcow2", b.ScatteredWrites(30, 16 * kMiB, 20000));
//   b.Io("disk.qcow2", {"write -z 65536 4096", "discard 1M 64k"});
//   ASSERT_OK(b.status());
//
// The first failing step is remembered and every later step is skipped, so
// recipes need no error handling of their own and the failure reported is
// the one that matters. File names are relative to the builder's
// directory; qcow2 backing-file names stay relative too, as users write
// them, so the engine's path resolution is exercised.
//
// Randomness (offsets, lengths, patterns, payloads) comes from one seeded
// generator, so a failing run is reproduced by its seed.

#ifndef QCOW2FUSE_TESTS_INTEGRATION_IMAGE_BUILDER_H_
#define QCOW2FUSE_TESTS_INTEGRATION_IMAGE_BUILDER_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace qcow2fuse::test {

class ImageBuilder {
 public:
  ImageBuilder(std::string dir, uint64_t seed);

  ImageBuilder(const ImageBuilder&) = delete;
  ImageBuilder& operator=(const ImageBuilder&) = delete;

  // The first error met, or OK.
  const absl::Status& status() const { return status_; }

  // Absolute path of `name` inside the directory.
  std::string Path(absl::string_view name) const;

  // qemu-img create; `options` as for CreateImage() in support/qemu.h.
  void Create(absl::string_view name, uint64_t size,
              const std::vector<std::string>& options = {},
              absl::string_view format = "qcow2");

  // One qemu-io run with all `commands`.
  void Io(absl::string_view name, const std::vector<std::string>& commands,
          absl::string_view format = "qcow2");

  // qemu-img with `args` as given (use Path() for file arguments).
  void QemuImg(const std::vector<std::string>& args);

  // qemu-img convert from `src` to `dst` with `extra` options.
  void Convert(absl::string_view src, absl::string_view src_format,
               absl::string_view dst, absl::string_view dst_format,
               const std::vector<std::string>& extra = {});

  // Writes `data` at `offset` of a plain file (a raw image, say).
  void WriteRaw(absl::string_view name, uint64_t offset,
                absl::string_view data);

  // Sets the qcow2 "dirty" incompatible-feature bit (bit 0 of the
  // big-endian 64-bit field at header offset 72), which is what a crash
  // with lazy refcounts leaves behind.
  void SetDirtyBit(absl::string_view name);

  // qemu-img check must accept the image (leaks allowed if `allow_leaks`).
  void Check(absl::string_view name, bool allow_leaks = false);

  // --- Random content, from the seeded generator. ---

  uint64_t Uniform(uint64_t low, uint64_t high);  // In [low, high].
  std::string RandomBytes(size_t length);
  // A non-zero pattern byte for qemu-io -P, as "0x5c".
  std::string RandomPattern();

  // `count` qemu-io writes of 1..max_length bytes at random byte offsets
  // in [0, limit), mixing `write -P` (one repeated byte) with `write -s`
  // (bytes from random source files, which qemu-io repeats; their lengths
  // are odd, so the data never repeats at a power-of-two period and a read
  // from the wrong offset inside a cluster shows).
  std::vector<std::string> ScatteredWrites(int count, uint64_t limit,
                                           uint64_t max_length);

  // `write -s SOURCE offset length` with one of the random source files;
  // with `compressed`, `write -c -s ...`.
  std::string RandomWrite(uint64_t offset, uint64_t length,
                          bool compressed = false);

 private:
  void Record(absl::Status status);
  // Creates the `write -s` source files on first use; returns one of them
  // (chosen at random).
  const std::string& SourceFile();

  const std::string dir_;
  std::mt19937_64 rng_;
  std::vector<std::string> source_files_;
  absl::Status status_;
};

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_INTEGRATION_IMAGE_BUILDER_H_
