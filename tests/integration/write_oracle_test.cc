// Randomized write oracle: a read-write qcow2fuse view against a raw twin.
//
// For every recipe (an image shape made with qemu-img/qemu-io, see
// AllRecipes()), the image is converted to a raw "twin" with identical
// contents, the image is mounted read-write, and one seeded sequence of a
// few hundred operations is applied to BOTH the view and the twin with
// pwrite/ftruncate/fsync:
//
//   - writes: unaligned, sub-cluster (bytes to KiB), whole clusters, up to
//     ~3 clusters, straddling cluster / subcluster / L2-table (and L2
//     slice) boundaries, overwrites of earlier writes, all-zero and
//     partly-zero buffers;
//   - writes at and across the end of the view: ENOSPC, or a short write
//     that stops exactly at the end (the twin gets the same prefix);
//   - fsync now and then;
//   - truncates: grows by a random number of sectors, shrinks down to a
//     point above every byte that ever held data, and shrinks that must
//     FAIL because data lies beyond (the twin is then left alone, and the
//     view must keep its size and bytes).
//
// Every kCompareEvery operations the whole view is compared with the twin.
// At the end: compare, unmount (daemon exit status 0), `qemu-img check`
// (JSON: no corruptions, no leaks), `qemu-img compare IMAGE TWIN`,
// recipe-specific checks (backing files untouched, internal snapshot
// contents unchanged, persistent bitmaps marked in-use), then remount and
// compare again, unmount, and check again.
//
// The seed is printed; QCOW2FUSE_TEST_SEED=N replays it (every recipe mixes
// its name into it), and QCOW2FUSE_TEST_OPS=N changes the operation count,
// e.g. to bisect a failure down to its first bad operation. On a mismatch
// the first differing offset, the operations that touched it and the last
// operations applied are printed. QCOW2FUSE_TEST_FINAL_FSYNC=1 adds an
// fsync just before unmounting (to tell the unmount path's problems from
// the others).
//
// The view is mounted read-write by MountedView (tests/support).

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

namespace fs = std::filesystem;

constexpr int kDefaultOps = 300;
constexpr int kCompareEvery = 50;
constexpr size_t kOpLogTail = 25;
constexpr size_t kOpLogTailAtEnd = 60;

// ---------------------------------------------------------------------------
// A read-write (or read-only) mount of the view, for the length of a scope.
//
// Runs `qcow2fuse -f [-o ro] IMAGE MOUNTPOINT` under setpriv --pdeathsig
// TERM (so the daemon goes away if the test process dies), waits until
// MOUNTPOINT is a live fuse mount, and always takes it down again:
// fusermount3 -u and a bounded wait for the child; only if that fails,
// SIGKILL to that pid (and no other) and fusermount3 -uz. The child is
// reaped in every path.

// A view of `image` for the length of a scope (read-write unless asked
// otherwise): MountedView unmounts and reaps the daemon in every path.
absl::StatusOr<std::unique_ptr<MountedView>> StartView(const std::string& image,
                                                       const std::string& mountpoint,
                                                       bool read_only = false) {
  MountOptions options;
  options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  options.image = image;
  options.mountpoint = mountpoint;
  options.read_only = read_only;
  return MountedView::Start(options);
}

// ---------------------------------------------------------------------------
// qemu-img check / compare / info, parsed.

// qemu-img check must find nothing wrong. On a failure the text run is
// shown too, as it lists every bad cluster.
void ExpectCleanCheck(const std::string& image, const std::string& when) {
  ASSERT_OK_AND_ASSIGN(QemuCheckReport report, QemuCheck(image));
  if (report.exit_code == 0 && report.corruptions == 0 && report.leaks == 0 &&
      report.check_errors == 0) {
    return;
  }
  ADD_FAILURE() << "qemu-img check " << when << ": exit code "
                << report.exit_code << ", corruptions=" << report.corruptions
                << " leaks=" << report.leaks
                << " check-errors=" << report.check_errors << "\n"
                << report.output << "\n--- qemu-img check (text) ---\n"
                << CheckImage(image);
}

absl::StatusOr<std::string> ImageInfoJson(const std::string& image) {
  return QemuImg({"info", "-f", "qcow2", "--output=json", image});
}

// ---------------------------------------------------------------------------
// Recipes.

struct Built {
  std::string image;
  // Files that must not change at all (backing files).
  std::vector<std::string> untouchable;
  // An internal snapshot whose contents must survive our writes.
  std::string snapshot;
  // A persistent bitmap: after our writes it must be marked in-use.
  std::string bitmap;
};

struct Recipe {
  std::string name;
  uint64_t cluster = 64 * kKiB;  // Of the top image.
  bool extended_l2 = false;
  // Makes the image in `dir` (a TempDir path) and describes it in `out`.
  std::function<absl::Status(const std::string& dir, Built& out)> build;
};

void PrintTo(const Recipe& recipe, std::ostream* out) { *out << recipe.name; }

std::string W(int pattern, uint64_t offset, uint64_t length) {
  return absl::StrFormat("write -P 0x%02x %d %d", pattern, offset, length);
}
std::string Zero(uint64_t offset, uint64_t length, bool unmap = false) {
  return absl::StrFormat("write -z%s %d %d", unmap ? " -u" : "", offset,
                         length);
}
std::string Discard(uint64_t offset, uint64_t length) {
  return absl::StrFormat("discard %d %d", offset, length);
}
std::string Compressed(int pattern, uint64_t offset, uint64_t length) {
  return absl::StrFormat("write -c -P 0x%02x %d %d", pattern, offset, length);
}

// A fresh image with `options`, nothing written.
Recipe Blank(std::string name, uint64_t size, uint64_t cluster,
             std::vector<std::string> options, bool extended_l2 = false) {
  Recipe r;
  r.name = std::move(name);
  r.cluster = cluster;
  r.extended_l2 = extended_l2;
  r.build = [size, options](const std::string& dir, Built& out) {
    out.image = dir + "/disk.qcow2";
    return CreateImage(out.image, "qcow2", size, options);
  };
  return r;
}

std::vector<Recipe> AllRecipes() {
  std::vector<Recipe> recipes;
  recipes.push_back(Blank("cluster_4k", 32 * kMiB, 4 * kKiB,
                          {"cluster_size=4096"}));
  recipes.push_back(Blank("cluster_64k", 48 * kMiB, 64 * kKiB,
                          {"cluster_size=65536"}));
  recipes.push_back(Blank("cluster_2m", 64 * kMiB, 2 * kMiB,
                          {"cluster_size=2097152"}));
  {
    Recipe r;
    r.name = "extended_l2_64k";
    r.cluster = 64 * kKiB;
    r.extended_l2 = true;
    r.build = [](const std::string& dir, Built& out) {
      out.image = dir + "/disk.qcow2";
      if (absl::Status s = CreateImage(out.image, "qcow2", 48 * kMiB,
                                       {"extended_l2=on", "cluster_size=65536"});
          !s.ok()) {
        return s;
      }
      // Subclusters are 2 KiB: partly allocated clusters, zero subclusters.
      return QemuIo(out.image, "qcow2",
                    {W(0x11, 0, 3 * kKiB), W(0x22, 70000, 5000),
                     Zero(200 * kKiB, 8 * kKiB), W(0x33, kMiB, 64 * kKiB),
                     W(0x44, 5 * kMiB + 6 * kKiB, 2 * kKiB),
                     Zero(5 * kMiB + 10 * kKiB, 4 * kKiB)});
    };
    recipes.push_back(r);
  }
  recipes.push_back(Blank("refcount_bits_1", 32 * kMiB, 64 * kKiB,
                          {"refcount_bits=1"}));
  // 4 KiB clusters with 64-bit refcounts: a refcount block covers only
  // 512 clusters, so writing allocates many of them.
  recipes.push_back(Blank("refcount_bits_64_4k", 32 * kMiB, 4 * kKiB,
                          {"refcount_bits=64", "cluster_size=4096"}));
  {
    Recipe r;
    r.name = "backing_qcow2_shorter";
    r.cluster = 64 * kKiB;
    r.build = [](const std::string& dir, Built& out) {
      const std::string base = dir + "/base.qcow2";
      out.image = dir + "/disk.qcow2";
      // The base ends 20 KiB into an overlay cluster, and has data right
      // up to its end; its clusters (32 KiB) are not the overlay's.
      const uint64_t base_size = 16 * kMiB + 20 * kKiB;
      absl::Status s =
          CreateImage(base, "qcow2", base_size, {"cluster_size=32768"});
      if (s.ok()) {
        s = QemuIo(base, "qcow2",
                   {W(0xb1, 0, 100 * kKiB), W(0xb2, 3 * kMiB + 1000, 200000),
                    W(0xb3, 8 * kMiB - 4 * kKiB, 40 * kKiB),
                    Zero(9 * kMiB, 64 * kKiB),
                    W(0xb4, 12 * kMiB + 512, 2 * kMiB),
                    W(0xb5, base_size - 8 * kKiB, 8 * kKiB)});
      }
      if (s.ok()) {
        s = CreateImage(out.image, "qcow2", 40 * kMiB,
                        {"backing_file=" + base, "backing_fmt=qcow2"});
      }
      if (s.ok()) {
        s = QemuIo(out.image, "qcow2",
                   {W(0xc1, 64 * kKiB, 64 * kKiB), W(0xc2, 20 * kMiB, 4096)});
      }
      out.untouchable = {base};
      return s;
    };
    recipes.push_back(r);
  }
  {
    Recipe r;
    r.name = "backing_zlib_compressed";
    r.cluster = 64 * kKiB;
    r.build = [](const std::string& dir, Built& out) {
      const std::string source = dir + "/source.qcow2";
      const std::string base = dir + "/base_zlib.qcow2";
      out.image = dir + "/disk.qcow2";
      absl::Status s = CreateImage(source, "qcow2", 32 * kMiB);
      std::vector<std::string> writes;
      for (int i = 0; i < 24; ++i) {
        writes.push_back(W(0x60 + i, i * 1300 * kKiB + i * 777, 96 * kKiB + i));
      }
      if (s.ok()) s = QemuIo(source, "qcow2", writes);
      if (s.ok()) {
        s = ConvertImage(source, "qcow2", base, "qcow2",
                         {"-c", "-o", "compression_type=zlib"});
      }
      if (s.ok()) {
        s = CreateImage(out.image, "qcow2", 32 * kMiB,
                        {"backing_file=" + base, "backing_fmt=qcow2"});
      }
      out.untouchable = {base};
      return s;
    };
    recipes.push_back(r);
  }
  {
    Recipe r;
    r.name = "compat_v2";
    r.cluster = 64 * kKiB;
    r.build = [](const std::string& dir, Built& out) {
      out.image = dir + "/disk.qcow2";
      absl::Status s =
          CreateImage(out.image, "qcow2", 32 * kMiB, {"compat=0.10"});
      if (s.ok()) {
        s = QemuIo(out.image, "qcow2",
                   {W(0x21, 0, 10000), W(0x22, 4 * kMiB - 512, 130 * kKiB),
                    Zero(6 * kMiB, 128 * kKiB), W(0x23, 7 * kMiB, 64 * kKiB),
                    Discard(7 * kMiB, 64 * kKiB)});
      }
      return s;
    };
    recipes.push_back(r);
  }
  {
    Recipe r;
    r.name = "preexisting_qemu_io";
    r.cluster = 64 * kKiB;
    r.build = [](const std::string& dir, Built& out) {
      out.image = dir + "/disk.qcow2";
      absl::Status s = CreateImage(out.image, "qcow2", 32 * kMiB);
      if (s.ok()) {
        s = QemuIo(
            out.image, "qcow2",
            {W(0x31, 0, 256 * kKiB), W(0x32, kMiB + 100, 300 * kKiB),
             Zero(64 * kKiB, 64 * kKiB),               // zero cluster, kept
             Zero(kMiB + 128 * kKiB, 64 * kKiB, true),  // zero, unmapped
             Discard(192 * kKiB, 64 * kKiB),
             Compressed(0x33, 4 * kMiB, 256 * kKiB),
             W(0x34, 4 * kMiB + 64 * kKiB + 10, 100),  // into a compressed one
             Zero(6 * kMiB, 2 * kMiB), W(0x35, 6 * kMiB + 700 * kKiB, 5000),
             W(0x36, 10 * kMiB, kMiB), Discard(10 * kMiB + 256 * kKiB, kMiB),
             Compressed(0x37, 31 * kMiB, 64 * kKiB)});
      }
      return s;
    };
    recipes.push_back(r);
  }
  {
    Recipe r;
    r.name = "internal_snapshot";
    r.cluster = 64 * kKiB;
    r.build = [](const std::string& dir, Built& out) {
      out.image = dir + "/disk.qcow2";
      out.snapshot = "s1";
      absl::Status s = CreateImage(out.image, "qcow2", 32 * kMiB);
      if (s.ok()) {
        s = QemuIo(out.image, "qcow2",
                   {W(0x41, 0, 2 * kMiB), W(0x42, 5 * kMiB + 3, 700 * kKiB),
                    W(0x43, 12 * kMiB, 4 * kMiB),
                    Compressed(0x44, 20 * kMiB, 128 * kKiB),
                    Zero(24 * kMiB, 128 * kKiB)});
      }
      if (s.ok()) s = QemuImg({"snapshot", "-c", "s1", out.image}).status();
      // After the snapshot some clusters are shared (refcount 2), some
      // already copied, some new.
      if (s.ok()) {
        s = QemuIo(out.image, "qcow2",
                   {W(0x51, kMiB, 64 * kKiB), W(0x52, 13 * kMiB + 5, 10),
                    W(0x53, 28 * kMiB, 256 * kKiB)});
      }
      return s;
    };
    recipes.push_back(r);
  }
  {
    Recipe r;
    r.name = "persistent_bitmap";
    r.cluster = 64 * kKiB;
    r.build = [](const std::string& dir, Built& out) {
      out.image = dir + "/disk.qcow2";
      out.bitmap = "b0";
      absl::Status s = CreateImage(out.image, "qcow2", 32 * kMiB);
      if (s.ok()) {
        s = QemuIo(out.image, "qcow2", {W(0x61, 0, kMiB)});
      }
      if (s.ok()) {
        s = QemuImg({"bitmap", "--add", out.image, "b0"}).status();
      }
      // qemu-io records these in the (enabled) bitmap.
      if (s.ok()) {
        s = QemuIo(out.image, "qcow2",
                   {W(0x62, 3 * kMiB, 200 * kKiB), W(0x63, 20 * kMiB, 4096)});
      }
      return s;
    };
    recipes.push_back(r);
  }
  return recipes;
}

// ---------------------------------------------------------------------------
// Seeds and environment.

uint64_t EnvNumber(const char* name, uint64_t fallback) {
  const char* text = std::getenv(name);
  uint64_t value = 0;
  if (text == nullptr || !absl::SimpleAtoi(text, &value)) return fallback;
  return value;
}

uint64_t Fnv1a(absl::string_view text) {
  uint64_t hash = 1469598103934665603ull;
  for (char c : text) {
    hash ^= static_cast<uint8_t>(c);
    hash *= 1099511628211ull;
  }
  return hash;
}

// ---------------------------------------------------------------------------
// Operations.

enum class OpKind { kWrite, kWriteAtEnd, kFsync, kGrow, kShrink, kShrinkFail };

struct Op {
  int index = 0;
  OpKind kind = OpKind::kWrite;
  uint64_t offset = 0;  // Writes.
  uint64_t length = 0;  // Writes: bytes asked for.
  std::string fill;     // Writes: "random", "zeros", "mixed".
  uint64_t size_before = 0;
  uint64_t new_size = 0;  // Truncates.
  // Filled in once applied.
  int64_t result = 0;  // pwrite/ftruncate return value.
  int error = 0;       // errno when result < 0.

  bool Touches(uint64_t at) const {
    switch (kind) {
      case OpKind::kWrite:
      case OpKind::kWriteAtEnd:
        return at >= offset && at < offset + length;
      case OpKind::kGrow:
        return at >= size_before && at < new_size;
      case OpKind::kShrink:
      case OpKind::kShrinkFail:
        return at >= new_size;
      case OpKind::kFsync:
        return false;
    }
    return false;
  }

  std::string Describe() const {
    std::string text;
    switch (kind) {
      case OpKind::kWrite:
        text = absl::StrFormat("write      off=%d (0x%x) len=%d end=0x%x %s",
                               offset, offset, length, offset + length, fill);
        break;
      case OpKind::kWriteAtEnd:
        text = absl::StrFormat(
            "write@end  off=%d (0x%x) len=%d size=%d %s", offset, offset,
            length, size_before, fill);
        break;
      case OpKind::kFsync:
        text = "fsync";
        break;
      case OpKind::kGrow:
        text = absl::StrFormat("grow       %d -> %d", size_before, new_size);
        break;
      case OpKind::kShrink:
        text = absl::StrFormat("shrink     %d -> %d", size_before, new_size);
        break;
      case OpKind::kShrinkFail:
        text = absl::StrFormat("shrink(must fail) %d -> %d", size_before,
                               new_size);
        break;
    }
    absl::StrAppend(&text, " => ", result);
    if (result < 0) absl::StrAppend(&text, " (", strerror(error), ")");
    return absl::StrCat("#", index, " ", text);
  }
};

uint64_t RoundUp(uint64_t value, uint64_t unit) {
  return (value + unit - 1) / unit * unit;
}
uint64_t RoundDown(uint64_t value, uint64_t unit) {
  return value / unit * unit;
}

// pwrite until done or an error; returns bytes written, or -1 with errno.
int64_t PwriteFully(int fd, const uint8_t* data, size_t length,
                    uint64_t offset) {
  size_t done = 0;
  while (done < length) {
    ssize_t n = pwrite(fd, data + done, length - done, offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return done > 0 ? static_cast<int64_t>(done) : -1;
    if (n == 0) break;
    done += n;
  }
  return static_cast<int64_t>(done);
}

bool PreadFully(int fd, uint8_t* data, size_t length, uint64_t offset) {
  size_t done = 0;
  while (done < length) {
    ssize_t n = pread(fd, data + done, length - done, offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += n;
  }
  return true;
}

std::string Hex(const uint8_t* data, size_t length) {
  std::string text;
  for (size_t i = 0; i < length; ++i) {
    absl::StrAppendFormat(&text, "%02x ", data[i]);
  }
  return text;
}

class Oracle {
 public:
  Oracle(const Recipe& recipe, uint64_t seed, int view_fd, int twin_fd,
         uint64_t size, uint64_t data_end)
      : rng_(seed),
        view_fd_(view_fd),
        twin_fd_(twin_fd),
        cluster_(recipe.cluster),
        subcluster_(recipe.extended_l2 ? recipe.cluster / 32 : recipe.cluster),
        size_(size),
        max_size_(size + size / 2),
        data_end_(data_end) {
    const uint64_t entry = recipe.extended_l2 ? 16 : 8;
    // Whole L2 tables, and 4 KiB slices of them (a cache may load those).
    spans_ = {cluster_ * (cluster_ / entry), cluster_ * (4096 / entry)};
  }

  uint64_t size() const { return size_; }
  const std::vector<Op>& log() const { return log_; }
  int shrinks() const { return shrinks_; }
  int grows() const { return grows_; }
  int failed_shrinks() const { return failed_shrinks_; }
  int last_shrink_errno() const { return last_shrink_errno_; }
  uint64_t bytes_written() const { return bytes_written_; }

  // Applies operation number `index` (random, or one forced at fixed
  // points of the run). A failure is a gtest failure.
  // The forced operations sit at fixed indices (not fractions of the run),
  // so a run of N operations is a prefix of any longer run with the same
  // seed: QCOW2FUSE_TEST_OPS can bisect a failure to its first bad step.
  void Step(int index) {
    if (index % 300 == 75) return Grow(index);
    if (index % 300 == 150) return ShrinkMustFail(index);
    if (index % 300 == 225) {
      Grow(index);
      if (::testing::Test::HasFatalFailure()) return;
      return Shrink(index);
    }
    const int r = Uniform(0, 99);
    if (r < 3) return Fsync(index);
    if (r < 5) return Grow(index);
    if (r < 7) return Shrink(index);
    if (r < 8) return ShrinkMustFail(index);
    if (r < 10) return WriteAtEnd(index);
    return RandomWrite(index);
  }

  // Compares the whole view with the twin. On a mismatch: the offset, the
  // bytes there, the operations that touched it and the last ones applied.
  void Compare(const std::string& when) {
    struct stat view_st, twin_st;
    ASSERT_EQ(fstat(view_fd_, &view_st), 0) << strerror(errno);
    ASSERT_EQ(fstat(twin_fd_, &twin_st), 0) << strerror(errno);
    ASSERT_EQ(static_cast<uint64_t>(twin_st.st_size), size_) << when;
    ASSERT_EQ(static_cast<uint64_t>(view_st.st_size), size_)
        << when << ": the view has the wrong size\n"
        << Tail();
    // Drop the kernel's cached pages of the view, so the daemon itself
    // answers: what it stored, not what the page cache remembers.
    ASSERT_EQ(posix_fadvise(view_fd_, 0, 0, POSIX_FADV_DONTNEED), 0);
    constexpr size_t kChunk = 1 << 20;
    std::vector<uint8_t> a(kChunk), b(kChunk);
    for (uint64_t offset = 0; offset < size_; offset += kChunk) {
      const size_t n = std::min<uint64_t>(kChunk, size_ - offset);
      ASSERT_TRUE(PreadFully(view_fd_, a.data(), n, offset))
          << when << ": reading the view at " << offset << ": "
          << strerror(errno) << "\n"
          << Tail();
      ASSERT_TRUE(PreadFully(twin_fd_, b.data(), n, offset))
          << "reading the twin at " << offset;
      if (memcmp(a.data(), b.data(), n) == 0) continue;
      size_t i = 0;
      while (a[i] == b[i]) ++i;
      const uint64_t at = offset + i;
      const size_t shown = std::min<size_t>(16, n - i);
      std::string touching;
      int found = 0;
      for (auto it = log_.rbegin(); it != log_.rend() && found < 10; ++it) {
        if (it->Touches(at)) {
          absl::StrAppend(&touching, "  ", it->Describe(), "\n");
          ++found;
        }
      }
      FAIL() << when << ": the view differs from the twin at offset " << at
             << absl::StrFormat(" (0x%x; cluster %d, +%d)", at, at / cluster_,
                                at % cluster_)
             << "\n  view: " << Hex(a.data() + i, shown)
             << "\n  twin: " << Hex(b.data() + i, shown)
             << "\nlatest operations covering that offset (newest first):\n"
             << (touching.empty() ? "  (none: preexisting data)\n" : touching)
             << Tail();
    }
  }

  std::string Tail(size_t count = kOpLogTail) const {
    std::string text = absl::StrCat("last ", std::min(count, log_.size()),
                                    " of ", log_.size(), " operations:\n");
    for (size_t i = log_.size() > count ? log_.size() - count : 0;
         i < log_.size(); ++i) {
      absl::StrAppend(&text, "  ", log_[i].Describe(), "\n");
    }
    return text;
  }

 private:
  uint64_t Uniform(uint64_t lo, uint64_t hi) {  // inclusive
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng_);
  }

  std::vector<uint8_t> Fill(size_t length, std::string& kind) {
    std::vector<uint8_t> data(length, 0);
    const int r = Uniform(0, 99);
    if (r < 12) {
      kind = "zeros";
      return data;
    }
    for (size_t i = 0; i < length; i += 8) {
      uint64_t word = rng_();
      memcpy(data.data() + i, &word, std::min<size_t>(8, length - i));
    }
    if (r < 22 && length > 1) {
      // A zero run inside random data (possibly a whole cluster).
      kind = "mixed";
      const uint64_t start = Uniform(0, length - 1);
      const uint64_t run = Uniform(1, length - start);
      std::fill(data.begin() + start, data.begin() + start + run, 0);
    } else {
      kind = "random";
    }
    return data;
  }

  uint64_t PickLength() {
    const int r = Uniform(0, 99);
    if (r < 30) return Uniform(1, 64);
    if (r < 60) return Uniform(1, std::min<uint64_t>(cluster_, 8 * kKiB));
    if (r < 75) return Uniform(1, 64 * kKiB);
    return Uniform(cluster_, std::min<uint64_t>(3 * cluster_, 6 * kMiB));
  }

  // Somewhere `length` bytes would straddle `unit` boundaries.
  uint64_t NearBoundary(uint64_t unit, uint64_t length) {
    if (unit >= size_) return Uniform(0, size_ - 1);
    const uint64_t boundary = unit * Uniform(1, (size_ - 1) / unit);
    const uint64_t before = Uniform(0, std::min(length, boundary));
    return boundary - before;
  }

  uint64_t PickOffset(uint64_t length) {
    const int r = Uniform(0, 99);
    if (r < 30) return Uniform(0, size_ - 1);
    if (r < 48) return NearBoundary(cluster_, length);
    if (r < 54) return NearBoundary(subcluster_, length);
    if (r < 62) return NearBoundary(spans_[Uniform(0, spans_.size() - 1)],
                                    length);
    if (r < 85 && !recent_.empty()) {
      // Overwrite (part of) an earlier write.
      const ByteRange& w = recent_[Uniform(0, recent_.size() - 1)];
      const uint64_t back = Uniform(0, std::min(w.offset, length / 2));
      return w.offset - back + Uniform(0, w.length);
    }
    return Uniform(0, std::min(size_, 4 * cluster_) - 1);  // hot zone
  }

  void Record(Op op) {
    log_.push_back(std::move(op));
  }

  // Writes `data` at `offset` to the view and the twin; the view must take
  // `expect` bytes (fewer than asked at the end of the view), or fail with
  // ENOSPC when `expect` is 0.
  void Apply(Op& op, const std::vector<uint8_t>& data, uint64_t expect) {
    op.result = PwriteFully(view_fd_, data.data(), data.size(), op.offset);
    op.error = errno;
    if (expect == 0) {
      ASSERT_EQ(op.result, -1)
          << "a write at or past the end of the view must fail: "
          << op.Describe() << "\n" << Tail();
      ASSERT_EQ(op.error, ENOSPC) << op.Describe() << "\n" << Tail();
      Record(op);
      return;
    }
    ASSERT_EQ(op.result, static_cast<int64_t>(expect))
        << "pwrite to the view: " << op.Describe() << "\n" << Tail();
    ASSERT_EQ(PwriteFully(twin_fd_, data.data(), expect, op.offset),
              static_cast<int64_t>(expect))
        << "pwrite to the twin: " << strerror(errno);
    bytes_written_ += expect;
    data_end_ = std::max(data_end_, RoundUp(op.offset + expect, cluster_));
    recent_.push_back(ByteRange{op.offset, expect});
    if (recent_.size() > 64) recent_.pop_front();
    Record(op);
  }

  void RandomWrite(int index) {
    Op op;
    op.index = index;
    op.size_before = size_;
    const int shape = Uniform(0, 99);
    if (shape < 12) {
      // Whole aligned clusters (the path that can skip copy-on-write).
      op.length = cluster_ * Uniform(1, cluster_ >= kMiB ? 2 : 3);
      op.offset = RoundDown(Uniform(0, size_ - 1), cluster_);
    } else {
      op.length = PickLength();
      op.offset = PickOffset(op.length);
    }
    op.offset = std::min(op.offset, size_ - 1);
    op.length = std::min(op.length, size_ - op.offset);
    std::vector<uint8_t> data = Fill(op.length, op.fill);
    Apply(op, data, op.length);
  }

  void WriteAtEnd(int index) {
    Op op;
    op.index = index;
    op.size_before = size_;
    const int r = Uniform(0, 2);
    op.length = Uniform(1, 2 * cluster_ > 128 * kKiB ? 128 * kKiB : 2 * cluster_);
    if (r == 0) {
      op.offset = size_;  // Exactly at the end: nothing fits.
    } else if (r == 1) {
      op.offset = size_ + Uniform(1, 3 * cluster_);  // Past the end.
    } else {
      // Straddling the end: only the part inside may be written.
      op.length = std::max<uint64_t>(op.length, 2);
      op.offset = size_ - Uniform(1, std::min(op.length - 1, size_));
    }
    std::vector<uint8_t> data = Fill(op.length, op.fill);
    op.kind = OpKind::kWriteAtEnd;
    const uint64_t expect = op.offset >= size_ ? 0 : size_ - op.offset;
    Apply(op, data, expect);
  }

  void Fsync(int index) {
    Op op;
    op.index = index;
    op.kind = OpKind::kFsync;
    op.size_before = size_;
    op.result = fsync(view_fd_);
    op.error = errno;
    Record(op);
    ASSERT_EQ(op.result, 0) << "fsync of the view: " << strerror(op.error)
                            << "\n" << Tail();
  }

  void Truncate(Op& op) {
    op.result = ftruncate(view_fd_, op.new_size);
    op.error = errno;
    Record(op);
  }

  void Grow(int index) {
    if (size_ >= max_size_) return RandomWrite(index);
    Op op;
    op.index = index;
    op.kind = OpKind::kGrow;
    op.size_before = size_;
    const uint64_t room = (max_size_ - size_) / 512;
    const uint64_t most = std::max<uint64_t>(1, std::min<uint64_t>(
        room, std::max<uint64_t>(4 * cluster_, 4 * kMiB) / 512));
    op.new_size = size_ + 512 * Uniform(1, most);
    Truncate(op);
    ASSERT_EQ(op.result, 0) << "growing the view: " << op.Describe() << "\n"
                            << Tail();
    ASSERT_EQ(ftruncate(twin_fd_, op.new_size), 0) << strerror(errno);
    size_ = op.new_size;
    ++grows_;
  }

  // Down to a random point (sector multiple) above every byte that ever
  // held data, rounded up to whole clusters; must succeed.
  void Shrink(int index) {
    const uint64_t floor = RoundUp(data_end_, 512);
    if (floor >= size_) return RandomWrite(index);
    Op op;
    op.index = index;
    op.kind = OpKind::kShrink;
    op.size_before = size_;
    op.new_size = floor + 512 * Uniform(0, (size_ - floor - 1) / 512);
    Truncate(op);
    ASSERT_EQ(op.result, 0)
        << "shrinking the view where no data lies beyond "
        << absl::StrFormat("(highest data ends at or below %d)", data_end_)
        << ": " << op.Describe() << "\n" << Tail();
    ASSERT_EQ(ftruncate(twin_fd_, op.new_size), 0) << strerror(errno);
    size_ = op.new_size;
    ++shrinks_;
  }

  // Writes non-zero data somewhere, then asks for a size below it: that
  // must fail and change nothing (the twin is left alone).
  void ShrinkMustFail(int index) {
    Op write;
    write.index = index;
    write.size_before = size_;
    write.offset = Uniform(0, size_ - 1);
    write.length = std::min<uint64_t>(Uniform(1, 4096), size_ - write.offset);
    std::vector<uint8_t> data = Fill(write.length, write.fill);
    data[0] = 0xa5;
    write.fill = "random, first byte a5";
    Apply(write, data, write.length);
    if (::testing::Test::HasFatalFailure()) return;

    Op op;
    op.index = index;
    op.kind = OpKind::kShrinkFail;
    op.size_before = size_;
    op.new_size = RoundDown(write.offset, 512);
    Truncate(op);
    ASSERT_NE(op.result, 0) << "shrinking past data must fail: "
                            << op.Describe() << "\n" << Tail();
    struct stat st;
    ASSERT_EQ(fstat(view_fd_, &st), 0);
    ASSERT_EQ(static_cast<uint64_t>(st.st_size), size_)
        << "a failed shrink changed the size of the view\n" << Tail();
    ++failed_shrinks_;
    last_shrink_errno_ = op.error;
  }

  std::mt19937_64 rng_;
  const int view_fd_;
  const int twin_fd_;
  const uint64_t cluster_;
  const uint64_t subcluster_;
  std::vector<uint64_t> spans_;
  uint64_t size_;
  const uint64_t max_size_;
  // Every byte at or past this offset has never held data (rounded up to
  // whole clusters): shrinking down to it loses nothing.
  uint64_t data_end_;
  std::deque<ByteRange> recent_;
  std::vector<Op> log_;
  int grows_ = 0;
  int shrinks_ = 0;
  int failed_shrinks_ = 0;
  int last_shrink_errno_ = 0;
  uint64_t bytes_written_ = 0;
};

// Where the data of `image` (and its backing chain) ends, per qemu-img
// map, rounded up to whole clusters of the top image.
absl::StatusOr<uint64_t> DataEnd(const std::string& image, uint64_t cluster) {
  absl::StatusOr<std::vector<MapExtent>> map = MapImage(image);
  if (!map.ok()) return map.status();
  uint64_t end = 0;
  for (const MapExtent& extent : *map) {
    if (extent.data || (extent.present && !extent.zero)) {
      end = std::max(end, extent.end());
    }
  }
  return RoundUp(end, cluster);
}

// qemu-img compare of the image with the raw twin (same size).
void ExpectQemuCompareIdentical(const std::string& image,
                                const std::string& twin) {
  absl::StatusOr<CommandResult> result = RunCommand(
      {"qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, twin});
  ASSERT_OK(result);
  EXPECT_TRUE(result->ok()) << "qemu-img compare " << image << " " << twin
                            << ": " << result->status.ToString() << "\n"
                            << result->stdout_text << result->stderr_text;
}

// The persistent bitmap `name` must be gone or flagged in-use: our writes
// did not update it, and a bitmap that claims to be consistent would
// silently miss them.
void ExpectBitmapInUse(const std::string& image, const std::string& name) {
  absl::StatusOr<std::string> info = ImageInfoJson(image);
  ASSERT_OK(info);
  const std::string key = "\"name\": \"" + name + "\"";
  const size_t at = info->find(key);
  if (at == std::string::npos) return;  // Dropped: also safe.
  const size_t open = info->rfind('{', at);
  const size_t close = info->find('}', at);
  ASSERT_NE(open, std::string::npos);
  const std::string object = info->substr(open, close - open + 1);
  EXPECT_TRUE(absl::StrContains(object, "\"in-use\""))
      << "bitmap " << name << " not marked in-use after writes: " << object
      << "\n" << *info;
}

class WriteOracleTest : public ::testing::TestWithParam<Recipe> {};

TEST_P(WriteOracleTest, ViewMatchesRawTwin) {
  const Recipe& recipe = GetParam();
  const auto started = std::chrono::steady_clock::now();
  const uint64_t base_seed = TestSeed();
  const uint64_t seed = base_seed ^ Fnv1a(recipe.name);
  const int ops = static_cast<int>(EnvNumber("QCOW2FUSE_TEST_OPS", kDefaultOps));
  std::cout << "recipe " << recipe.name << ": rng seed " << seed
            << ", QCOW2FUSE_TEST_OPS=" << ops << "\n";
  RecordProperty("ops", ops);

  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("oracle-" + recipe.name));
  Built built;
  ASSERT_OK(recipe.build(dir.path(), built));
  const std::string twin = dir.Join("twin.raw");
  ASSERT_OK(ConvertToRaw(built.image, twin));
  ASSERT_OK(CheckImage(built.image));  // Sanity: qemu made it clean.

  std::vector<std::string> untouched_digests;
  for (const std::string& file : built.untouchable) {
    ASSERT_OK_AND_ASSIGN(std::string digest, Sha256File(file));
    untouched_digests.push_back(digest);
  }
  std::string snapshot_raw;
  if (!built.snapshot.empty()) {
    snapshot_raw = dir.Join("snapshot_before.raw");
    ASSERT_OK(ConvertImage(built.image, "qcow2", snapshot_raw, "raw",
                           {"-l", "snapshot.name=" + built.snapshot}));
  }
  ASSERT_OK_AND_ASSIGN(const uint64_t size, VirtualSize(built.image));
  ASSERT_OK_AND_ASSIGN(const uint64_t data_end,
                       DataEnd(built.image, recipe.cluster));

  const std::string view_path = dir.Join("view.raw");
  uint64_t final_size = 0;
  std::string op_tail;  // For failures of the checks after unmounting.
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                         StartView(built.image, view_path));
    {
      ScopedFd view_fd(open(view_path.c_str(), O_RDWR | O_CLOEXEC));
      ASSERT_GE(view_fd.get(), 0) << "open " << view_path << ": "
                                  << strerror(errno);
      ScopedFd twin_fd(open(twin.c_str(), O_RDWR | O_CLOEXEC));
      ASSERT_GE(twin_fd.get(), 0) << strerror(errno);

      Oracle oracle(recipe, seed, view_fd.get(), twin_fd.get(), size,
                    data_end);
      oracle.Compare("before any write");
      ASSERT_FALSE(HasFatalFailure());
      for (int i = 0; i < ops; ++i) {
        oracle.Step(i);
        ASSERT_FALSE(HasFatalFailure()) << "seed " << base_seed;
        if ((i + 1) % kCompareEvery == 0) {
          oracle.Compare(absl::StrCat("after operation #", i));
          ASSERT_FALSE(HasFatalFailure()) << "seed " << base_seed;
        }
      }
      if (EnvNumber("QCOW2FUSE_TEST_FINAL_FSYNC", 0) != 0) {
        // Diagnostic knob: an fsync right before unmounting, to tell
        // problems of the unmount path from the others.
        ASSERT_EQ(fsync(view_fd.get()), 0) << strerror(errno);
      }
      oracle.Compare("after all operations");
      ASSERT_FALSE(HasFatalFailure()) << "seed " << base_seed;
      final_size = oracle.size();
      op_tail = oracle.Tail(kOpLogTailAtEnd);
      int writes = 0, zero_writes = 0, at_end = 0, fsyncs = 0;
      for (const Op& op : oracle.log()) {
        writes += op.kind == OpKind::kWrite;
        zero_writes += op.kind == OpKind::kWrite && op.fill == "zeros";
        at_end += op.kind == OpKind::kWriteAtEnd;
        fsyncs += op.kind == OpKind::kFsync;
      }
      std::cout << recipe.name << ": " << oracle.log().size()
                << " operations applied (" << writes << " writes, "
                << zero_writes << " of them all zeros, " << at_end
                << " at/over the end, " << fsyncs << " fsyncs), "
                << oracle.bytes_written()
                << " bytes written, " << oracle.grows() << " grows, "
                << oracle.shrinks() << " shrinks, " << oracle.failed_shrinks()
                << " refused shrinks"
                << (oracle.failed_shrinks() > 0
                        ? absl::StrCat(" (",
                                       strerror(oracle.last_shrink_errno()),
                                       ")")
                        : "")
                << "; size " << size << " -> " << final_size
                << "\n";
    }  // Close both descriptors before unmounting.
    ASSERT_OK(view->Unmount());
    ASSERT_TRUE(view->exit_status().has_value());
    EXPECT_TRUE(view->exit_status()->success())
        << view->exit_status()->ToString() << "\n" << view->ReadLog();
  }

  ExpectCleanCheck(built.image, "after the writes");
  ASSERT_OK_AND_ASSIGN(const uint64_t qemu_size, VirtualSize(built.image));
  EXPECT_EQ(qemu_size, final_size) << "qemu-img info disagrees on the size";
  if (qemu_size == final_size) ExpectQemuCompareIdentical(built.image, twin);
  for (size_t i = 0; i < built.untouchable.size(); ++i) {
    ASSERT_OK_AND_ASSIGN(std::string digest, Sha256File(built.untouchable[i]));
    EXPECT_EQ(digest, untouched_digests[i])
        << built.untouchable[i] << " (a backing file) was modified";
  }
  if (!built.snapshot.empty()) {
    // Reverting a copy to the snapshot (which also restores the disk size
    // the snapshot recorded) must give back exactly what it held.
    const std::string copy = dir.Join("reverted.qcow2");
    const std::string after = dir.Join("snapshot_after.raw");
    std::error_code error;
    fs::copy_file(built.image, copy, error);
    ASSERT_FALSE(error) << error.message();
    ASSERT_OK(QemuImg({"snapshot", "-a", built.snapshot, copy}));
    ASSERT_OK(ConvertToRaw(copy, after));
    EXPECT_OK(CompareFiles(after, snapshot_raw))
        << "internal snapshot " << built.snapshot << " changed";
    ExpectCleanCheck(copy, "after reverting a copy to the snapshot");
  }
  if (!built.bitmap.empty()) ExpectBitmapInUse(built.image, built.bitmap);

  // Everything must still be there after a fresh open.
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                         StartView(built.image, view_path));
    EXPECT_OK(CompareFiles(view_path, twin)) << "after remounting";
    ASSERT_OK(view->Unmount());
    ASSERT_TRUE(view->exit_status().has_value());
    EXPECT_TRUE(view->exit_status()->success())
        << view->exit_status()->ToString() << "\n" << view->ReadLog();
  }
  ExpectCleanCheck(built.image, "after remounting");
  if (HasFailure()) {
    std::cout << "seed " << base_seed << ", " << ops << " operations; "
              << op_tail;
  }

  const double seconds = std::chrono::duration<double>(
                             std::chrono::steady_clock::now() - started)
                             .count();
  std::cout << recipe.name << ": " << absl::StrFormat("%.2f", seconds)
            << " s\n";
  RecordProperty("seconds", absl::StrFormat("%.2f", seconds));
}

INSTANTIATE_TEST_SUITE_P(Recipes, WriteOracleTest,
                         ::testing::ValuesIn(AllRecipes()),
                         [](const ::testing::TestParamInfo<Recipe>& info) {
                           return info.param.name;
                         });

// ---------------------------------------------------------------------------
// Fixed, minimal cases: each one the smallest reproduction of a failure the
// randomized oracle found, kept so that it fails deterministically.

// Mounts `image` read-write, runs `body` on an O_RDWR descriptor of the
// view (closed again before unmounting), unmounts, and expects the daemon
// to exit with status 0.
void WithView(const TempDir& dir, const std::string& image,
              const std::function<void(int fd)>& body) {
  const std::string view_path = dir.Join("view.raw");
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                       StartView(image, view_path));
  {
    ScopedFd fd(open(view_path.c_str(), O_RDWR | O_CLOEXEC));
    ASSERT_GE(fd.get(), 0) << strerror(errno);
    body(fd.get());
  }
  ASSERT_OK(view->Unmount());
  ASSERT_TRUE(view->exit_status().has_value());
  EXPECT_TRUE(view->exit_status()->success())
      << view->exit_status()->ToString() << "\n" << view->ReadLog();
}

// A copy-on-write of a cluster shared with an internal snapshot frees a
// reference to the old cluster (and to the old L2 table). Without an
// fsync before unmounting, those refcount decrements must still reach the
// disk: qemu-img check must find no leaks.
TEST(WriteOracleEdgeTest, SnapshotCopyOnWriteThenUnmountLeaksNothing) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("oracle-cow-leak"));
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", 32 * kMiB));
  ASSERT_OK(QemuIo(image, "qcow2", {W(0x43, 12 * kMiB, 4 * kMiB)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "s1", image}));
  const std::string twin = dir.Join("twin.raw");
  ASSERT_OK(ConvertToRaw(image, twin));
  const std::vector<uint8_t> data(1900, 0x11);
  const uint64_t offset = 0xd8a496;  // Inside the shared 4 MiB.
  WithView(dir, image, [&](int fd) {
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), offset), 1900)
        << strerror(errno);
  });
  ASSERT_OK(WriteFileAt(twin, offset,
                        absl::string_view(reinterpret_cast<const char*>(
                                              data.data()),
                                          data.size())));
  ExpectCleanCheck(image, "after one write into a snapshot-shared cluster");
  ExpectQemuCompareIdentical(image, twin);
}

// The same for a compressed cluster: overwriting part of it decrements the
// refcount of the host cluster that holds it.
TEST(WriteOracleEdgeTest, CompressedOverwriteThenUnmountLeaksNothing) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("oracle-zlib-leak"));
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", 32 * kMiB));
  ASSERT_OK(QemuIo(image, "qcow2", {Compressed(0x33, 4 * kMiB, 256 * kKiB)}));
  const std::string twin = dir.Join("twin.raw");
  ASSERT_OK(ConvertToRaw(image, twin));
  const std::string data(100, 'x');
  WithView(dir, image, [&](int fd) {
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), 4 * kMiB + 10), 100)
        << strerror(errno);
  });
  ASSERT_OK(WriteFileAt(twin, 4 * kMiB + 10, data));
  ExpectCleanCheck(image, "after overwriting part of a compressed cluster");
  ExpectQemuCompareIdentical(image, twin);
}

// Growing a view whose size ends inside a cluster, over a backing file,
// must not turn the zeros of that last cluster into data: nothing was ever
// written there, so shrinking below it again loses nothing and must work.
TEST(WriteOracleEdgeTest, ShrinkAfterGrowOverBackingFileSucceeds) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("oracle-regrow"));
  const std::string base = dir.Join("base.qcow2");
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(base, "qcow2", 32 * kMiB));  // Empty.
  ASSERT_OK(CreateImage(image, "qcow2", 32 * kMiB,
                        {"backing_file=" + base, "backing_fmt=qcow2"}));
  WithView(dir, image, [&](int fd) {
    ASSERT_EQ(ftruncate(fd, 31 * kMiB + 512), 0) << strerror(errno);
    ASSERT_EQ(ftruncate(fd, 32 * kMiB), 0) << strerror(errno);
    EXPECT_EQ(ftruncate(fd, 30 * kMiB), 0)
        << "shrinking to 30 MiB: " << strerror(errno)
        << " (no byte of the disk was ever written)";
  });
  ExpectCleanCheck(image, "after shrink, grow, shrink");
}

// qemu keeps disk sizes in whole 512-byte sectors (it rounds a qcow2 size
// down and refuses to resize to anything else). A size the view accepts
// must therefore be one qemu sees too; otherwise the bytes of the last
// partial sector are invisible to qemu (and lost by qemu-img convert).
TEST(WriteOracleEdgeTest, UnalignedTruncateIsRefusedOrSeenByQemu) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("oracle-unaligned"));
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", 16 * kMiB));
  const uint64_t unaligned = 16 * kMiB + 1000;
  bool accepted = false;
  WithView(dir, image, [&](int fd) {
    accepted = ftruncate(fd, unaligned) == 0;
    if (accepted) {
      const char byte = 0x5a;
      ASSERT_EQ(pwrite(fd, &byte, 1, unaligned - 1), 1) << strerror(errno);
    } else {
      EXPECT_EQ(errno, EINVAL) << strerror(errno);
    }
  });
  ExpectCleanCheck(image, "after an unaligned truncate");
  if (accepted) {
    ASSERT_OK_AND_ASSIGN(uint64_t qemu_size, VirtualSize(image));
    EXPECT_EQ(qemu_size, unaligned)
        << "the view accepted a size of " << unaligned
        << " bytes, but qemu sees " << qemu_size << ": the byte written at "
        << unaligned - 1 << " is invisible to qemu";
  }
}

}  // namespace
}  // namespace qcow2fuse::test
