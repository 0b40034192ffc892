// qemu-img and qemu-io as the reference implementation.
//
// Tests build images with the tools that define the format in practice,
// and compare qcow2fuse's view against what qemu itself reads:
//
//   ASSERT_OK(CreateImage(img, "qcow2", 16 * kMiB, {"cluster_size=4096"}));
//   ASSERT_OK(QemuIo(img, "qcow2", {"write -P 0xab 1000 3000",
//                                   "write -z 65536 64k"}));
//   ASSERT_OK(ConvertToRaw(img, raw));
//   ASSERT_OK_AND_ASSIGN(std::vector<MapExtent> map, MapImage(img));
//
// Every function fails with the full command line and qemu's stderr.

#ifndef QCOW2FUSE_TESTS_SUPPORT_QEMU_H_
#define QCOW2FUSE_TESTS_SUPPORT_QEMU_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "support/file_util.h"  // ByteRange

namespace qcow2fuse::test {

inline constexpr uint64_t kKiB = 1024;
inline constexpr uint64_t kMiB = 1024 * kKiB;

// One element of `qemu-img map --output=json`.
struct MapExtent {
  uint64_t start = 0;
  uint64_t length = 0;
  int depth = 0;         // 0: the image itself, 1: its backing file, ...
  bool present = false;  // Allocated somewhere in the chain.
  bool zero = false;     // Reads as zeros.
  bool data = false;     // Has data (may still read as zeros).
  std::optional<uint64_t> offset;  // Host offset, when qemu reports one.

  uint64_t end() const { return start + length; }
};

// `qemu-img create -f FORMAT [-o OPTIONS] PATH SIZE`. `options` are
// key=value strings, e.g. {"cluster_size=512", "backing_file=base.raw",
// "backing_fmt=raw"}; they are joined into one -o argument.
absl::Status CreateImage(const std::string& path, absl::string_view format,
                         uint64_t size,
                         const std::vector<std::string>& options = {});

// `qemu-io -f FORMAT -c CMD1 -c CMD2 ... PATH`, all commands in one run.
// qemu-io exits non-zero when a command fails; that is an error here.
absl::Status QemuIo(const std::string& path, absl::string_view format,
                    const std::vector<std::string>& commands);

// `qemu-img ARGS...`, returning stdout. For anything without a dedicated
// helper: snapshot, bitmap, resize, ...
absl::StatusOr<std::string> QemuImg(const std::vector<std::string>& args);

// `qemu-img create -f qcow2 --object SECRET -o OPTIONS PATH SIZE` of a
// LUKS-encrypted image: `secret` is a --object secret definition and
// `options` the -o argument. QEMU times its key derivation with the
// thread's CPU clock and gives up when a round measures 0 ms ("Unable to
// get accurate CPU usage"), which a coarse clock on a busy machine makes
// happen now and then: that failure alone is retried, for up to 20 s.
absl::Status CreateLuksImage(const std::string& path, const std::string& secret, const std::string& options,
                             const std::string& size);

// `qemu-img convert -f SRC_FORMAT -O DST_FORMAT EXTRA... SRC DST`, e.g.
// extra = {"-c", "-o", "compression_type=zstd"}.
absl::Status ConvertImage(const std::string& src, absl::string_view src_format,
                          const std::string& dst, absl::string_view dst_format,
                          const std::vector<std::string>& extra = {});

// The reference contents: `qemu-img convert -O raw` of a qcow2 image.
absl::Status ConvertToRaw(const std::string& qcow2, const std::string& raw);

// `qemu-img check -f qcow2 EXTRA... PATH`. Exit code 0 is success; leaked
// clusters (exit code 3) are accepted too when `allow_leaks`, since they
// are harmless for readers and some recipes legitimately leave them.
absl::Status CheckImage(const std::string& path, bool allow_leaks = false,
                        const std::vector<std::string>& extra = {});

// What `qemu-img check --output=json` counted. The exit code says the same
// in brief: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
struct QemuCheckReport {
  int exit_code = 0;
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;
  std::string output;  // qemu-img's stdout and stderr, for failure messages.
};

// `qemu-img check --output=json -f qcow2 PATH`, or with `target` in place of
// "-f qcow2 PATH" (e.g. --image-opts ...). An error if qemu-img could not
// check at all (exit code above 3, a signal) or printed a count it cannot
// read; a count it leaves out is 0, as qemu leaves out the zero ones.
absl::StatusOr<QemuCheckReport> QemuCheck(
    const std::string& path, const std::vector<std::string>& target = {});

// The virtual disk size from `qemu-img info --output=json`.
absl::StatusOr<uint64_t> VirtualSize(const std::string& path,
                                     absl::string_view format = "qcow2");

// `qemu-img map --output=json -f qcow2 PATH`, parsed.
absl::StatusOr<std::vector<MapExtent>> MapImage(const std::string& path);

// Parses the JSON array qemu-img map prints. A small regex parser for this
// one flat shape; anything it does not understand is an error, not a skip.
absl::StatusOr<std::vector<MapExtent>> ParseMapJson(absl::string_view json);

// One persistent dirty bitmap, as `qemu-img info --output=json` lists it.
struct BitmapInfo {
  std::string name;
  uint64_t granularity = 0;
  bool in_use = false;     // the "in-use" flag: not to be trusted
  bool enabled = false;    // the "auto" flag
};

// The persistent bitmaps of a qcow2 image (none: an empty list);
// `force_share` (-U) reads an image that a writer holds open.
absl::StatusOr<std::vector<BitmapInfo>> ImageBitmaps(const std::string& path, bool force_share = false);

// The ranges of the disk that bitmap `name` of the qcow2 image at `path`
// marks dirty, as QEMU reads them: qemu-nbd exports the image read-only
// with the bitmap (-B) on a unix socket in a temporary directory, and
// `nbdinfo --map=qemu:dirty-bitmap:NAME` reads its extents. Adjacent
// dirty runs are merged. qemu-nbd is always reaped, even on failure.
absl::StatusOr<std::vector<ByteRange>> DirtyExtents(const std::string& path,
                                                    const std::string& name);

// qemu-io command lines, for QemuIo(): a pattern write, a zero write
// (optionally unmapping), a discard, a compressed write.
namespace qemu_io_cmd {
std::string W(int pattern, uint64_t offset, uint64_t length);
std::string Zero(uint64_t offset, uint64_t length, bool unmap = false);
std::string Discard(uint64_t offset, uint64_t length);
std::string Compressed(int pattern, uint64_t offset, uint64_t length);
}  // namespace qemu_io_cmd

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_SUPPORT_QEMU_H_
