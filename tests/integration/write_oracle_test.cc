// Randomized write oracle: a read-write qcow2fuse view against a raw twin.
//
// For every recipe (an image shape made with qemu-img/qemu-io, see
// AllRecipes()), the image is converted to a raw "twin" with identical
// contents, the image is mounted read-write, and one seeded sequence of a
// few hundred operations is applied to BOTH the view and the twin with
// pwrite/ftruncate/fallocate/fsync:
//
//   - writes: unaligned, sub-cluster (bytes to KiB), whole clusters, up to
//     ~3 clusters, straddling cluster / subcluster / L2-table (and L2
//     slice) boundaries, overwrites of earlier writes, all-zero and
//     partly-zero buffers, and all-zero writes over the ranges fallocate
//     uses (below);
//   - writes at and across the end of the view: ENOSPC, or a short write
//     that stops exactly at the end (the twin gets the same prefix);
//   - fallocate PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE with and without
//     KEEP_SIZE (without it, a range past the end grows the view to the
//     next multiple of 512 bytes: the twin is then truncated to the size
//     the view reports), and mode 0 / KEEP_SIZE preallocation (contents
//     unchanged; mode 0 past the end grows the view the same way). Ranges
//     are unaligned, inside one cluster, subcluster-aligned, whole
//     clusters, a few clusters unaligned, across L2 table / slice
//     boundaries, over what the image held before (data, zero clusters,
//     compressed clusters, backing-file data: from `qemu-img map`), over
//     earlier writes, occasionally several MiB or the whole disk, and
//     now and then across the end of the view;
//   - fsync now and then;
//   - close: at operation 110 of every 300 the descriptor the oracle writes
//     through is closed (the kernel sends FUSE FLUSH, which makes every
//     acknowledged write durable) and opened again;
//   - interval flush: where the view is mounted with -o flush_interval=1,
//     at operation 185 of every 300 the oracle sleeps 1.5 s, so the
//     periodic flush (every 0.5 s) must have made everything durable;
//   - truncates: grows by a random number of sectors, shrinks down to a
//     point above every byte that ever held data, and shrinks that must
//     FAIL because data lies beyond (the twin is then left alone, and the
//     view must keep its size and bytes).
//
// Every kCompareEvery operations the whole view is compared with the twin,
// and lseek SEEK_DATA/SEEK_HOLE of the view is checked against the twin's
// contents: the walk must follow the lseek contract (data regions inside
// the file, SEEK_DATA past the last data and at EOF gives ENXIO, SEEK_HOLE
// finds a hole at or before EOF, random probes agree with the walk), every
// hole must read as zeros in the twin, and st_blocks * 512 must cover the
// data regions exactly (the engine counts data extents).
// At the end: compare, unmount (daemon exit status 0), `qemu-img check`
// (JSON: no corruptions, no leaks), `qemu-img compare IMAGE TWIN`,
// recipe-specific checks (backing files untouched, internal snapshot
// contents unchanged, persistent bitmaps stored consistent with every
// change of the run recorded), then remount and
// compare again, unmount, and check again.
//
// After each close and each interval flush the image is judged on disk while
// it stays mounted (qemu-img -U: the daemon holds its locks): `qemu-img
// check -U` must find no corruption and no leak, the header must hold the
// view's size, and `qemu-img compare -U` must find the twin's contents. No
// leak either: a flush drops the refcount of every cluster given up before
// it, except one that a request still running, begun before the cluster
// was given up, may be reading (engine/sched/read_tracker.h; such a cluster
// is freed by a later flush, and until then the image on disk leaks it, but
// is never corrupt). The oracle runs one operation at a time and has
// nothing in flight when it closes or sleeps, so nothing is held back.
// After an interval flush the view is still open, so a copy of the image
// file is judged: a qemu-img started while the view is open would itself
// make the image durable (see CopyOfImage). Four instances are mounted
// with flush_interval=1 (refcount_bits_64_4k, internal_snapshot, overlay_64k,
// and through internal_snapshot internal_snapshot_dz_unmap: periodic flushes
// then also run between the operations), one with flush_interval=0
// (cluster_64k: only fsync and close flush there), the rest with the
// default.
//
// After every PUNCH_HOLE / ZERO_RANGE (and, under detect_zeroes, every
// all-zero write small enough to reach the daemon as one request), the
// whole clusters (subclusters) inside the range must be holes for
// SEEK_DATA, on images that have zero clusters (version 3).
//
// Three recipes run again with the mount option detect_zeroes=on and three
// with detect_zeroes=unmap (instances DetectZeroesOn/..._dz_on and
// DetectZeroesUnmap/..._dz_unmap): 150 operations, more of them all-zero
// writes, which then become zero clusters. Four run again, 150 operations
// each, with uncached_writes=off (CachedWrites/..._cached_writes), so that
// the writes go through the view's page cache rather than straight to the
// daemon as by default.
//
// Three recipes write through an overlay made at mount time over a base
// with data (enum Overlay): -o overlay=DIR/overlay.qcow2 (overlay_64k,
// overlay_4k_chain) and -o volatile (overlay_volatile_over_extended_l2).
// The oracle runs against the view as for any recipe; what is judged on
// disk (after each close and interval flush, and at the end) is the
// overlay, and the base (with its own backing file, if any) must keep its
// sha256. A named overlay is also checked with `qemu-img info` (the base
// as backing file, format qcow2, the base's cluster size) and is what the
// remount at the end opens, plainly. A volatile overlay has no name: while
// mounted it is judged through the daemon's descriptor of it
// (/proc/PID/fd/N), last after the final close; after unmounting nothing
// can be judged but the daemon's TMPDIR (a directory of the test), which
// must be empty, and the base; there is no remount.
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

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
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
#include <future>
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
absl::StatusOr<std::unique_ptr<MountedView>> StartView(
    const std::string& image, const std::string& mountpoint,
    bool read_only = false, const std::vector<std::string>& extra = {}) {
  MountOptions options;
  options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  options.image = image;
  options.mountpoint = mountpoint;
  options.read_only = read_only;
  options.extra_options = extra;
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

// ---------------------------------------------------------------------------
// Recipes.

struct Built {
  std::string image;
  // Files that must not change at all (backing files).
  std::vector<std::string> untouchable;
  // An internal snapshot whose contents must survive our writes.
  std::string snapshot;
  // An enabled persistent bitmap: after the run it must be consistent
  // (not in use) and hold every granule the run changed.
  std::string bitmap;
};

// How the view is mounted: IMAGE itself, or an overlay made at mount time
// over it (-o overlay=NEW, -o volatile), where the writes go instead.
enum class Overlay {
  kNone,
  // -o overlay=DIR/overlay.qcow2: the overlay is the image judged on disk
  // (while mounted and after), IMAGE is untouchable, and the remount at
  // the end mounts the overlay itself.
  kNamed,
  // -o volatile, with TMPDIR a directory of the test: the overlay has no
  // name, so it is judged while mounted through the daemon's descriptor of
  // it (/proc/PID/fd/N) and not at all once unmounted; then TMPDIR must be
  // empty and IMAGE unchanged.
  kVolatile,
};

struct Recipe {
  std::string name;
  uint64_t cluster = 64 * kKiB;  // Of the top image.
  bool extended_l2 = false;
  // Version 3: the image has zero clusters (version 2 writes zeros as
  // data instead), so zeroed whole clusters must become holes.
  bool zero_flag = true;
  // Extra -o mount options, e.g. {"detect_zeroes=unmap"}.
  std::vector<std::string> mount_options;
  // Operations per run (QCOW2FUSE_TEST_OPS overrides it).
  int ops = kDefaultOps;
  // With an overlay, `build` makes IMAGE (the base, with data), and
  // `cluster` is its cluster size, which the overlay takes.
  Overlay overlay = Overlay::kNone;
  // Makes the image in `dir` (a TempDir path) and describes it in `out`.
  std::function<absl::Status(const std::string& dir, Built& out)> build;
};

void PrintTo(const Recipe& recipe, std::ostream* out) { *out << recipe.name; }

using qemu_io_cmd::Compressed;
using qemu_io_cmd::Discard;
using qemu_io_cmd::W;
using qemu_io_cmd::Zero;

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
  // No periodic flush: a close alone must make the writes durable.
  recipes.back().mount_options.push_back("flush_interval=0");
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
  // Periodic flushes every 0.5 s while refcount blocks keep being added.
  recipes.back().mount_options.push_back("flush_interval=1");
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
    r.zero_flag = false;
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
    // Periodic flushes every 0.5 s while copy-on-write frees shared
    // clusters and tables.
    r.mount_options.push_back("flush_interval=1");
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
  {
    // The view is a new overlay over a base with data, zero clusters (kept
    // and unmapped), discarded and compressed clusters (one of them partly
    // rewritten), judged on disk every 0.5 s of periodic flushing too.
    Recipe r;
    r.name = "overlay_64k";
    r.cluster = 64 * kKiB;
    r.overlay = Overlay::kNamed;
    r.mount_options.push_back("flush_interval=1");
    r.build = [](const std::string& dir, Built& out) {
      out.image = dir + "/base.qcow2";
      absl::Status s = CreateImage(out.image, "qcow2", 32 * kMiB);
      if (s.ok()) {
        s = QemuIo(
            out.image, "qcow2",
            {W(0x71, 0, 300 * kKiB), W(0x72, 2 * kMiB - 700, 200 * kKiB),
             Zero(128 * kKiB, 64 * kKiB),                 // zero, kept
             Zero(2 * kMiB + 64 * kKiB, 64 * kKiB, true),  // zero, unmapped
             Discard(256 * kKiB, 64 * kKiB),
             Compressed(0x73, 5 * kMiB, 512 * kKiB),
             W(0x74, 5 * kMiB + 192 * kKiB + 77, 3000),  // into compressed data
             W(0x75, 9 * kMiB, 3 * kMiB), Zero(10 * kMiB, kMiB),
             Compressed(0x76, 32 * kMiB - 128 * kKiB, 128 * kKiB)});
      }
      return s;
    };
    recipes.push_back(r);
  }
  {
    // 4 KiB clusters, which the overlay must take (an L2 table of it then
    // maps only 2 MiB), over a base that has a raw backing file of its own
    // (named relative to the base).
    Recipe r;
    r.name = "overlay_4k_chain";
    r.cluster = 4 * kKiB;
    r.overlay = Overlay::kNamed;
    r.build = [](const std::string& dir, Built& out) {
      const std::string lower = dir + "/lower.raw";
      out.image = dir + "/base.qcow2";
      absl::Status s = CreateImage(lower, "raw", 24 * kMiB);
      if (s.ok()) {
        s = QemuIo(lower, "raw",
                   {W(0x81, 0, kMiB), W(0x82, 6 * kMiB + 100, 300 * kKiB),
                    W(0x83, 20 * kMiB, 2 * kMiB)});
      }
      if (s.ok()) {
        s = CreateImage(out.image, "qcow2", 24 * kMiB,
                        {"cluster_size=4096", "backing_file=lower.raw",
                         "backing_fmt=raw"});
      }
      if (s.ok()) {
        s = QemuIo(out.image, "qcow2",
                   {W(0x84, 512 * kKiB, 100 * kKiB), Zero(4 * kKiB, 8 * kKiB),
                    Discard(700 * kKiB, 16 * kKiB),
                    Compressed(0x85, 4 * kMiB, 64 * kKiB),
                    W(0x86, 4 * kMiB + 8 * kKiB + 5, 10),
                    Zero(6 * kMiB, 256 * kKiB),
                    W(0x87, 12 * kMiB + 3, 3 * kMiB)});
      }
      out.untouchable = {lower};
      return s;
    };
    recipes.push_back(r);
  }
  {
    // A volatile overlay over a base with extended L2 entries (partly
    // allocated clusters, zero subclusters) and compressed clusters. The
    // overlay takes the cluster size, not extended L2.
    Recipe r;
    r.name = "overlay_volatile_over_extended_l2";
    r.cluster = 64 * kKiB;
    r.overlay = Overlay::kVolatile;
    r.build = [](const std::string& dir, Built& out) {
      out.image = dir + "/base.qcow2";
      absl::Status s = CreateImage(out.image, "qcow2", 32 * kMiB,
                                   {"extended_l2=on", "cluster_size=65536"});
      if (s.ok()) {
        s = QemuIo(out.image, "qcow2",
                   {W(0x91, 0, 5 * kKiB), W(0x92, 70000, 9000),
                    Zero(256 * kKiB + 4 * kKiB, 6 * kKiB),
                    W(0x93, kMiB, 192 * kKiB),
                    Zero(kMiB + 64 * kKiB + 2 * kKiB, 2 * kKiB),
                    Compressed(0x94, 3 * kMiB, 128 * kKiB),
                    W(0x95, 8 * kMiB + 6 * kKiB, 2 * kKiB),
                    W(0x96, 30 * kMiB, kMiB)});
      }
      return s;
    };
    recipes.push_back(r);
  }
  return recipes;
}

// The recipes named in `names`, mounted with the extra -o `option`, 150
// operations each (to keep the suite's time in bounds). The name gets
// `suffix`, so the seed (and the temp dir) differ from the plain run's.
std::vector<Recipe> RecipesWithOption(const std::string& option, const std::string& suffix,
                                      const std::vector<std::string>& names) {
  std::vector<Recipe> picked;
  for (const Recipe& recipe : AllRecipes()) {
    if (std::find(names.begin(), names.end(), recipe.name) == names.end()) {
      continue;
    }
    Recipe r = recipe;
    r.name = absl::StrCat(recipe.name, suffix);
    r.mount_options.push_back(option);
    r.ops = 150;
    picked.push_back(std::move(r));
  }
  return picked;
}

// -o detect_zeroes=`mode`, with more all-zero writes among the operations
// (see Oracle::Step).
std::vector<Recipe> DetectZeroesRecipes(const std::string& mode,
                                        const std::vector<std::string>& names) {
  return RecipesWithOption("detect_zeroes=" + mode, "_dz_" + mode, names);
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

enum class OpKind {
  kWrite,
  kWriteAtEnd,
  kFsync,
  kGrow,
  kShrink,
  kShrinkFail,
  kPunchHole,  // fallocate PUNCH_HOLE|KEEP_SIZE
  kZeroRange,  // fallocate ZERO_RANGE, with or without KEEP_SIZE
  kPrealloc,   // fallocate mode 0 or KEEP_SIZE
  kClose,      // close the view's descriptor (FUSE FLUSH) and open it again
  kIntervalFlush,  // sleep until the periodic flush must have run
};

// The fallocate mode, spelled out.
std::string FallocateModeName(int mode) {
  std::vector<std::string> parts;
  if (mode & FALLOC_FL_PUNCH_HOLE) parts.push_back("PUNCH_HOLE");
  if (mode & FALLOC_FL_ZERO_RANGE) parts.push_back("ZERO_RANGE");
  if (mode & FALLOC_FL_KEEP_SIZE) parts.push_back("KEEP_SIZE");
  return parts.empty() ? "0" : absl::StrJoin(parts, "|");
}

struct Op {
  int index = 0;
  OpKind kind = OpKind::kWrite;
  uint64_t offset = 0;  // Writes, fallocate.
  uint64_t length = 0;  // Writes: bytes asked for; fallocate: length.
  std::string fill;     // Writes: "random", "zeros", "mixed"; fallocate:
                        // what the range was picked as.
  int mode = 0;         // fallocate mode.
  uint64_t size_before = 0;
  uint64_t new_size = 0;  // Truncates; fallocate: the size afterwards.
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
      case OpKind::kPunchHole:
      case OpKind::kZeroRange:
      case OpKind::kPrealloc:
        return (at >= offset && at < offset + length) ||
               (at >= size_before && at < new_size);
      case OpKind::kFsync:
      case OpKind::kClose:
      case OpKind::kIntervalFlush:
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
      case OpKind::kClose:
        text = "close and reopen";
        break;
      case OpKind::kIntervalFlush:
        text = "sleep for the periodic flush";
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
      case OpKind::kPunchHole:
      case OpKind::kZeroRange:
      case OpKind::kPrealloc:
        text = absl::StrFormat(
            "fallocate(%s) off=%d (0x%x) len=%d end=0x%x [%s] size %d -> %d",
            FallocateModeName(mode), offset, offset, length, offset + length,
            fill, size_before, new_size);
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

// The disk size in the header of the qcow2 image at `path` (bytes 24-31,
// big-endian), as it is on disk now.
absl::StatusOr<uint64_t> HeaderSize(const std::string& path) {
  ScopedFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return absl::NotFoundError("open " + path);
  uint8_t field[8];
  if (!PreadFully(fd.get(), field, sizeof field, 24)) {
    return absl::InternalError("reading the header of " + path);
  }
  uint64_t size = 0;
  for (uint8_t byte : field) size = size << 8 | byte;
  return size;
}

// The image on disk while the view stays mounted (qemu-img -U, since the
// daemon holds the image's locks): what is wrong with it, or "" if nothing.
// `qemu-img check -U` must find no corruption, check error or leak, the
// header must hold the view's size, and `qemu-img compare -U` must find the
// twin's bytes. (Check and compare run side by side.)
std::string ProblemsOnDisk(const std::string& image, const std::string& twin,
                           uint64_t size) {
  std::future<absl::StatusOr<QemuCheckReport>> checked =
      std::async(std::launch::async, [&] {
        return QemuCheck(image, {"-U", "-f", "qcow2", image});
      });
  absl::StatusOr<CommandResult> compare = RunCommand(
      {"qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", image, twin});
  absl::StatusOr<QemuCheckReport> check = checked.get();
  if (!check.ok()) return check.status().ToString();
  if (check->exit_code != 0 || check->corruptions != 0 || check->leaks != 0 ||
      check->check_errors != 0) {
    return absl::StrCat("qemu-img check -U: exit code ", check->exit_code,
                        ", corruptions=", check->corruptions,
                        " leaks=", check->leaks,
                        " check-errors=", check->check_errors, "\n",
                        check->output);
  }
  absl::StatusOr<uint64_t> on_disk = HeaderSize(image);
  if (!on_disk.ok()) return on_disk.status().ToString();
  if (*on_disk != size) {
    return absl::StrCat("the header says the disk has ", *on_disk,
                        " bytes, the view has ", size);
  }
  if (!compare.ok()) return compare.status().ToString();
  if (!compare->ok()) {
    return absl::StrCat("qemu-img compare -U ", image, " ", twin, ": ",
                        compare->status.ToString(), "\n", compare->stdout_text,
                        compare->stderr_text);
  }
  return "";
}

// A copy of the image file as it is on disk now, made in this process: a
// process started while the view is open gets a copy of the view's
// descriptor, and closing that copy (at exec, O_CLOEXEC, or at exit) sends
// FUSE FLUSH, which flushes the image. So a qemu-img started before the
// copy exists would itself make the writes durable, and could not tell
// whether the periodic flush did. The copy goes to `copy`: next to the
// image, so that a relative backing file name still resolves.
absl::StatusOr<std::string> CopyOfImage(const std::string& image,
                                        const std::string& copy) {
  absl::StatusOr<std::string> bytes = ReadFile(image);
  if (!bytes.ok()) return bytes.status();
  ScopedFd fd(open(copy.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) return absl::InternalError("create " + copy);
  if (PwriteFully(fd.get(), reinterpret_cast<const uint8_t*>(bytes->data()),
                  bytes->size(), 0) != static_cast<int64_t>(bytes->size())) {
    return absl::InternalError("write " + copy);
  }
  return copy;
}

// What the close and interval-flush steps need besides the descriptors:
// the image and the twin (for qemu-img -U), and the view's path and the
// descriptor a close replaces.
struct OnDisk {
  // The image file the view writes to, by a name qemu-img can open (for a
  // volatile overlay, /proc/PID/fd/N of the daemon).
  std::string image;
  // Where a copy of it goes (CopyOfImage).
  std::string copy;
  std::string twin;
  std::string view_path;
  ScopedFd* view = nullptr;  // null: no close steps
  int flush_interval = -1;   // -o flush_interval; -1: the default
};

// The -o flush_interval=S among mount options, or -1.
int FlushInterval(const std::vector<std::string>& mount_options) {
  int seconds = -1;
  for (const std::string& o : mount_options) {
    if (absl::StartsWith(o, "flush_interval=")) {
      if (!absl::SimpleAtoi(o.substr(15), &seconds)) seconds = -1;
    }
  }
  return seconds;
}

class Oracle {
 public:
  // `preexisting`: what the image held before (data, zero clusters,
  // compressed or backing-file data), for fallocate ranges over it.
  Oracle(const Recipe& recipe, uint64_t seed, int view_fd, int twin_fd,
         uint64_t size, uint64_t data_end,
         std::vector<ByteRange> preexisting = {}, OnDisk on_disk = {})
      : rng_(seed),
        probe_rng_(seed ^ 0x5eec5eec5eec5eecull),
        view_fd_(view_fd),
        twin_fd_(twin_fd),
        cluster_(recipe.cluster),
        subcluster_(recipe.extended_l2 ? recipe.cluster / 32 : recipe.cluster),
        zero_flag_(recipe.zero_flag),
        detect_zeroes_(std::any_of(
            recipe.mount_options.begin(), recipe.mount_options.end(),
            [](const std::string& o) {
              return absl::StartsWith(o, "detect_zeroes=") &&
                     o != "detect_zeroes=off";
            })),
        size_(size),
        max_size_(size + size / 2),
        data_end_(data_end),
        preexisting_(std::move(preexisting)),
        on_disk_(std::move(on_disk)) {
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
  int punches() const { return punches_; }
  int zero_ranges() const { return zero_ranges_; }  // without KEEP_SIZE
  int zero_ranges_kept() const { return zero_ranges_kept_; }
  int preallocs() const { return preallocs_; }
  int seek_checks() const { return seek_checks_; }
  int closes() const { return closes_; }
  int interval_flushes() const { return interval_flushes_; }
  uint64_t last_data_bytes() const { return last_data_bytes_; }
  size_t last_data_regions() const { return last_data_regions_; }

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
    if (index % 300 == 110 && on_disk_.view != nullptr) {
      return CloseAndReopen(index);
    }
    if (index % 300 == 185 && on_disk_.flush_interval == 1) {
      return SleepForIntervalFlush(index);
    }
    const int r = Uniform(0, 99);
    if (r < 3) return Fsync(index);
    if (r < 5) return Grow(index);
    if (r < 7) return Shrink(index);
    if (r < 8) return ShrinkMustFail(index);
    if (r < 10) return WriteAtEnd(index);
    if (r < 18) return PunchHole(index);
    if (r < 27) return ZeroRange(index);
    if (r < 31) return Prealloc(index);
    // Under detect_zeroes all-zero writes are what is being tested.
    if (r < (detect_zeroes_ ? 50 : 37)) return ZeroWrite(index);
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
      const std::string touching = Touching(at);
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

  // Checks lseek SEEK_DATA/SEEK_HOLE of the view: the lseek contract, the
  // twin's contents (every hole reads as zeros there; Compare() has just
  // shown the view equals the twin) and st_blocks.
  void CheckSeek(const std::string& when) {
    std::vector<ByteRange> data;
    uint64_t pos = 0;
    bool after_data = false;  // `pos` is where SEEK_HOLE found a hole.
    while (pos < size_) {
      errno = 0;
      const off_t d = lseek(view_fd_, pos, SEEK_DATA);
      const int err = errno;
      if (d < 0) {
        ASSERT_EQ(err, ENXIO)
            << when << ": lseek(" << pos << ", SEEK_DATA): " << strerror(err)
            << "\n" << Tail();
        ASSERT_NO_FATAL_FAILURE(ExpectTwinZeros({pos, size_ - pos}, when,
                                                "the hole after the last data"));
        break;
      }
      ASSERT_GE(static_cast<uint64_t>(d), pos)
          << when << ": SEEK_DATA from " << pos << " went back\n" << Tail();
      ASSERT_LT(static_cast<uint64_t>(d), size_)
          << when << ": SEEK_DATA from " << pos << " gave " << d
          << ", at or past the end (" << size_ << ")\n" << Tail();
      if (after_data) {
        ASSERT_GT(static_cast<uint64_t>(d), pos)
            << when << ": SEEK_HOLE reported a hole at " << pos
            << ", but SEEK_DATA from there says data\n" << Tail();
      }
      if (static_cast<uint64_t>(d) > pos) {
        const off_t hole = lseek(view_fd_, pos, SEEK_HOLE);
        ASSERT_EQ(hole, static_cast<off_t>(pos))
            << when << ": SEEK_DATA from " << pos << " skipped to " << d
            << ", but SEEK_HOLE from " << pos << " says " << hole
            << (hole < 0 ? absl::StrCat(" (", strerror(errno), ")") : "")
            << "\n" << Tail();
        ASSERT_NO_FATAL_FAILURE(ExpectTwinZeros(
            {pos, static_cast<uint64_t>(d) - pos}, when, "a hole"));
      }
      errno = 0;
      const off_t h = lseek(view_fd_, d, SEEK_HOLE);
      ASSERT_GT(h, d) << when << ": SEEK_HOLE from data at " << d << " gave "
                      << h << " (" << strerror(errno) << ")\n" << Tail();
      ASSERT_LE(static_cast<uint64_t>(h), size_)
          << when << ": SEEK_HOLE from " << d << " gave " << h
          << ", past the end (" << size_ << ")\n" << Tail();
      data.push_back({static_cast<uint64_t>(d), static_cast<uint64_t>(h - d)});
      pos = h;
      after_data = true;
    }
    // At the end of the file both find nothing (a regular file's ENXIO).
    for (int whence : {SEEK_DATA, SEEK_HOLE}) {
      errno = 0;
      const off_t at_end = lseek(view_fd_, size_, whence);
      const int err = errno;
      EXPECT_TRUE(at_end < 0 && err == ENXIO)
          << when << ": lseek(" << size_ << " (EOF), "
          << (whence == SEEK_DATA ? "SEEK_DATA" : "SEEK_HOLE")
          << ") gave " << at_end << " (" << strerror(err) << "), not ENXIO";
    }
    // Random probes must agree with the walk.
    for (int i = 0; i < 16; ++i) {
      const uint64_t at =
          std::uniform_int_distribution<uint64_t>(0, size_ - 1)(probe_rng_);
      auto it = std::find_if(data.begin(), data.end(), [&](const ByteRange& r) {
        return r.end() > at;
      });
      const bool inside = it != data.end() && it->offset <= at;
      const off_t want_data =
          it == data.end() ? -1 : static_cast<off_t>(std::max(at, it->offset));
      const off_t want_hole = static_cast<off_t>(inside ? it->end() : at);
      errno = 0;
      const off_t got_data = lseek(view_fd_, at, SEEK_DATA);
      const int data_err = errno;
      EXPECT_EQ(got_data, want_data)
          << when << ": lseek(" << at << ", SEEK_DATA) disagrees with the walk"
          << (got_data < 0 ? absl::StrCat(" (", strerror(data_err), ")") : "");
      if (got_data < 0) {
        EXPECT_EQ(data_err, ENXIO) << strerror(data_err);
      }
      const off_t got_hole = lseek(view_fd_, at, SEEK_HOLE);
      EXPECT_EQ(got_hole, want_hole)
          << when << ": lseek(" << at << ", SEEK_HOLE) disagrees with the walk";
    }
    uint64_t data_bytes = 0;
    for (const ByteRange& r : data) data_bytes += r.length;
    // The engine's st_blocks counts the data extents (AT_STATX_FORCE_SYNC:
    // the daemon's answer, not attributes the kernel cached).
    struct statx stx = {};
    ASSERT_EQ(statx(view_fd_, "", AT_EMPTY_PATH | AT_STATX_FORCE_SYNC,
                    STATX_BLOCKS | STATX_SIZE, &stx),
              0)
        << strerror(errno);
    ASSERT_EQ(stx.stx_size, size_) << when;
    EXPECT_GE(stx.stx_blocks * 512, data_bytes)
        << when << ": st_blocks " << stx.stx_blocks << " (* 512 = "
        << stx.stx_blocks * 512 << ") is below the " << data_bytes
        << " bytes of data SEEK_DATA/SEEK_HOLE report in " << data.size()
        << " regions\n" << Tail();
    EXPECT_LE(stx.stx_blocks * 512, RoundUp(data_bytes, 512))
        << when << ": st_blocks " << stx.stx_blocks << " (* 512 = "
        << stx.stx_blocks * 512 << ") is above the " << data_bytes
        << " bytes of data SEEK_DATA/SEEK_HOLE report in " << data.size()
        << " regions\n" << Tail();
    ++seek_checks_;
    last_data_bytes_ = data_bytes;
    last_data_regions_ = data.size();
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

  // The latest operations that covered `at`, newest first.
  std::string Touching(uint64_t at) const {
    std::string touching;
    int found = 0;
    for (auto it = log_.rbegin(); it != log_.rend() && found < 10; ++it) {
      if (it->Touches(at)) {
        absl::StrAppend(&touching, "  ", it->Describe(), "\n");
        ++found;
      }
    }
    return touching;
  }

  // `range` (which lseek reported as a hole of the view) must read as
  // zeros in the twin: otherwise the hole hides data. Only what the twin
  // stores is read: the twin's own holes (its host file system's
  // SEEK_DATA/SEEK_HOLE) read as zeros anyway.
  void ExpectTwinZeros(const ByteRange& range, const std::string& when,
                       const std::string& what) {
    for (uint64_t pos = range.offset; pos < range.end();) {
      errno = 0;
      const off_t data = lseek(twin_fd_, pos, SEEK_DATA);
      if (data < 0) {
        ASSERT_EQ(errno, ENXIO) << "lseek of the twin: " << strerror(errno);
        return;
      }
      if (static_cast<uint64_t>(data) >= range.end()) return;
      const off_t hole = lseek(twin_fd_, data, SEEK_HOLE);
      ASSERT_GT(hole, data) << "lseek of the twin: " << strerror(errno);
      const uint64_t end = std::min<uint64_t>(hole, range.end());
      ASSERT_NO_FATAL_FAILURE(
          ExpectTwinBytesZero(range, data, end, when, what));
      pos = end;
    }
  }

  void ExpectTwinBytesZero(const ByteRange& range, uint64_t from, uint64_t to,
                           const std::string& when, const std::string& what) {
    constexpr size_t kChunk = 1 << 20;
    std::vector<uint8_t> buf(kChunk);
    for (uint64_t offset = from; offset < to;) {
      const size_t n = std::min<uint64_t>(kChunk, to - offset);
      ASSERT_TRUE(PreadFully(twin_fd_, buf.data(), n, offset))
          << "reading the twin at " << offset;
      const auto nonzero = std::find_if(buf.begin(), buf.begin() + n,
                                        [](uint8_t b) { return b != 0; });
      if (nonzero != buf.begin() + n) {
        const uint64_t at = offset + (nonzero - buf.begin());
        uint8_t view_byte = 0;
        const bool read = PreadFully(view_fd_, &view_byte, 1, at);
        const std::string touching = Touching(at);
        FAIL() << when << ": lseek reports " << range << " of the view as "
               << what << ", but the twin holds 0x"
               << absl::StrFormat("%02x", *nonzero) << " at " << at
               << absl::StrFormat(" (0x%x; cluster %d, +%d)", at,
                                  at / cluster_, at % cluster_)
               << "; the view reads "
               << (read ? absl::StrFormat("0x%02x", view_byte)
                        : std::string("(error)"))
               << " there\nlatest operations covering that offset (newest "
                  "first):\n"
               << (touching.empty() ? "  (none: preexisting data)\n"
                                    : touching)
               << Tail();
      }
      offset += n;
    }
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

  // A range for fallocate or an all-zero write, inside the view; `what`
  // says how it was picked.
  ByteRange PickRange(std::string& what) {
    const uint64_t limit = std::min<uint64_t>(8 * kMiB, size_);
    uint64_t offset = 0, length = 0;
    const int r = Uniform(0, 99);
    if (r < 14) {
      what = "unaligned";
      length = PickLength();
      offset = PickOffset(length);
    } else if (r < 26) {
      what = "inside one cluster";
      const uint64_t base = RoundDown(Uniform(0, size_ - 1), cluster_);
      const uint64_t a = Uniform(0, cluster_ - 1);
      offset = base + a;
      length = Uniform(1, cluster_ - a);
    } else if (r < 38) {
      // Whole subclusters (extended L2), else whole sectors or 4 KiB.
      const uint64_t unit = subcluster_ < cluster_
                                ? subcluster_
                                : (Uniform(0, 1) == 0 ? 512 : 4 * kKiB);
      what = absl::StrCat(unit, "-aligned");
      length = unit * Uniform(1, std::max<uint64_t>(1, 2 * cluster_ / unit + 2));
      offset = Uniform(0, 1) == 0 ? Uniform(0, size_ - 1)
                                  : NearBoundary(cluster_, length);
      offset = RoundDown(offset, unit);
    } else if (r < 52) {
      what = "whole clusters";
      offset = RoundDown(Uniform(0, size_ - 1), cluster_);
      length = cluster_ * Uniform(1, std::clamp<uint64_t>(8 * kMiB / cluster_,
                                                         1, 16));
    } else if (r < 62) {
      what = "clusters, unaligned";
      length = Uniform(cluster_, std::min<uint64_t>(4 * cluster_, limit));
      offset = NearBoundary(cluster_, length);
    } else if (r < 72) {
      what = "across an L2 table/slice boundary";
      const uint64_t span = spans_[Uniform(0, spans_.size() - 1)];
      length = Uniform(1, std::min<uint64_t>(4 * cluster_, limit));
      const bool aligned = Uniform(0, 1) == 0;
      if (aligned) length = RoundUp(length, cluster_);
      offset = NearBoundary(span, length);
      if (aligned) offset = RoundDown(offset, cluster_);
    } else if (r < 84 && !preexisting_.empty()) {
      what = "over what the image held";
      const ByteRange& e = preexisting_[Uniform(0, preexisting_.size() - 1)];
      offset = e.offset + Uniform(0, e.length - 1);
      length = Uniform(1, std::min<uint64_t>(
                              2 * std::max<uint64_t>(e.length, cluster_), limit));
      if (Uniform(0, 1) == 0) {
        offset = RoundDown(offset, cluster_);
        length = RoundUp(length, cluster_);
      }
    } else if (r < 94 && !recent_.empty()) {
      what = "over an earlier write";
      const ByteRange& w = recent_[Uniform(0, recent_.size() - 1)];
      switch (Uniform(0, 2)) {
        case 0:  // Exactly.
          offset = w.offset;
          length = w.length;
          break;
        case 1:  // Part of it.
          offset = w.offset + Uniform(0, w.length - 1);
          length = Uniform(1, w.end() - offset);
          break;
        default:  // All of it and some around.
          offset = w.offset - std::min(w.offset, Uniform(0, cluster_));
          length = w.end() - offset + Uniform(0, cluster_);
          break;
      }
    } else if (r < 99) {
      what = "large";
      length = Uniform(cluster_, std::max(limit, cluster_));
      offset = Uniform(0, size_ - 1);
      if (Uniform(0, 1) == 0) {
        offset = RoundDown(offset, cluster_);
        length = RoundUp(length, cluster_);
      }
    } else {
      what = "whole disk";
      offset = 0;
      length = size_;
    }
    offset = std::min(offset, size_ - 1);
    length = std::clamp<uint64_t>(length, 1, size_ - offset);
    return {offset, length};
  }

  // A range that reaches past the end of the view: across it, or starting
  // at or past it. With `grows` the view will grow to cover it, so it ends
  // within max_size_; false when there is no room for that.
  bool PickPastEnd(Op& op, bool grows) {
    const uint64_t cap = std::min(
        grows ? RoundDown(max_size_, 512) : UINT64_MAX,
        size_ + std::min<uint64_t>(4 * cluster_, 8 * kMiB));
    if (cap <= size_) return false;
    const uint64_t end = Uniform(size_ + 1, cap);
    if (Uniform(0, 2) == 0) {
      op.offset = Uniform(size_, end - 1);
      op.fill = "at/past the end";
    } else {
      op.offset = Uniform(size_ - std::min(size_, 2 * cluster_), size_ - 1);
      op.fill = "across the end";
    }
    op.length = end - op.offset;
    return true;
  }

  // fallocate(op.mode) of the view and the twin. Without KEEP_SIZE the view
  // may grow, to the next multiple of 512 bytes: the twin follows.
  void ApplyFallocate(Op& op) {
    op.size_before = size_;
    op.new_size = size_;
    op.result = fallocate(view_fd_, op.mode, op.offset, op.length);
    op.error = errno;
    if (op.result != 0) {
      Record(op);
      FAIL() << "fallocate of the view: " << op.Describe() << "\n" << Tail();
    }
    struct stat st;
    ASSERT_EQ(fstat(view_fd_, &st), 0) << strerror(errno);
    const uint64_t view_size = st.st_size;
    const bool keep = op.mode & FALLOC_FL_KEEP_SIZE;
    const uint64_t expected =
        keep ? size_ : std::max(size_, RoundUp(op.offset + op.length, 512));
    op.new_size = view_size;
    Record(op);
    ASSERT_EQ(view_size, expected)
        << "the view's size after fallocate: " << op.Describe() << "\n"
        << Tail();
    // The twin: the same call (its file system's fallocate), then its size
    // made the view's.
    if (fallocate(twin_fd_, op.mode, op.offset, op.length) != 0) {
      // A host file system without this mode: do what it means.
      ASSERT_EQ(errno, EOPNOTSUPP)
          << "fallocate of the twin: " << strerror(errno) << " for "
          << op.Describe();
      if (view_size != size_) {
        ASSERT_EQ(ftruncate(twin_fd_, view_size), 0) << strerror(errno);
      }
      if (op.mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
        const uint64_t end = std::min(op.offset + op.length, view_size);
        if (op.offset < end) {
          const std::vector<uint8_t> zeros(end - op.offset, 0);
          ASSERT_EQ(PwriteFully(twin_fd_, zeros.data(), zeros.size(),
                                op.offset),
                    static_cast<int64_t>(zeros.size()))
              << strerror(errno);
        }
      }
    }
    struct stat twin_st;
    ASSERT_EQ(fstat(twin_fd_, &twin_st), 0) << strerror(errno);
    if (static_cast<uint64_t>(twin_st.st_size) != view_size) {
      ASSERT_EQ(ftruncate(twin_fd_, view_size), 0) << strerror(errno);
    }
    size_ = view_size;
    if (op.mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
      ASSERT_NO_FATAL_FAILURE(ExpectZeroedUnitsAreHoles(op));
    }
    if (op.offset < size_) {
      recent_.push_back(
          ByteRange{op.offset, std::min(op.length, size_ - op.offset)});
      if (recent_.size() > 64) recent_.pop_front();
    }
  }

  // After `op` zeroed its range (PUNCH_HOLE, ZERO_RANGE, or an all-zero
  // write under detect_zeroes), every whole cluster inside it (whole
  // subcluster with extended L2; up to the end of the disk if the range
  // reaches it) must be a hole: a zero cluster, not data. Only where the
  // image has zero clusters (version 3). (A partial compressed cluster of
  // an extended-L2 image would keep its zeros as data; no recipe has one.)
  void ExpectZeroedUnitsAreHoles(const Op& op) {
    if (!zero_flag_ || op.offset >= size_) return;
    const uint64_t end = op.offset + op.length;
    const uint64_t first = RoundUp(op.offset, subcluster_);
    const uint64_t last = end >= size_ ? size_ : RoundDown(end, subcluster_);
    if (first >= last) return;
    errno = 0;
    const off_t data = lseek(view_fd_, first, SEEK_DATA);
    const int err = errno;
    if (data < 0 && err == ENXIO) return;
    ASSERT_GE(data, 0) << "lseek(" << first << ", SEEK_DATA): " << strerror(err);
    ASSERT_GE(static_cast<uint64_t>(data), last)
        << "after " << op.Describe() << ": "
        << absl::StrFormat("[0x%x, 0x%x)", first, last)
        << " was zeroed whole (units of " << subcluster_
        << " bytes), yet SEEK_DATA from its start finds data at " << data
        << absl::StrFormat(" (0x%x)", data)
        << ": zeroed clusters must become zero clusters (holes)\n"
        << Tail();
  }

  void PunchHole(int index) {
    Op op;
    op.index = index;
    op.kind = OpKind::kPunchHole;
    op.mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    if (Uniform(0, 99) >= 5 || !PickPastEnd(op, /*grows=*/false)) {
      const ByteRange range = PickRange(op.fill);
      op.offset = range.offset;
      op.length = range.length;
    }
    ApplyFallocate(op);
    ++punches_;
  }

  void ZeroRange(int index) {
    Op op;
    op.index = index;
    op.kind = OpKind::kZeroRange;
    const int v = Uniform(0, 99);
    const bool keep = v < 55;
    op.mode = FALLOC_FL_ZERO_RANGE | (keep ? FALLOC_FL_KEEP_SIZE : 0);
    const bool past_end = keep ? v < 3 : v >= 78;
    if (!past_end || !PickPastEnd(op, /*grows=*/!keep)) {
      const ByteRange range = PickRange(op.fill);
      op.offset = range.offset;
      op.length = range.length;
    }
    ApplyFallocate(op);
    ++(keep ? zero_ranges_kept_ : zero_ranges_);
  }

  void Prealloc(int index) {
    Op op;
    op.index = index;
    op.kind = OpKind::kPrealloc;
    const int v = Uniform(0, 99);
    op.mode = v < 25 ? FALLOC_FL_KEEP_SIZE : 0;
    if (v < 90 || !PickPastEnd(op, /*grows=*/true)) {
      const ByteRange range = PickRange(op.fill);
      op.offset = range.offset;
      op.length = range.length;
    }
    ApplyFallocate(op);
    ++preallocs_;
  }

  // An all-zero write over a range picked as for fallocate (aligned
  // ranges are what detect_zeroes turns into zero clusters).
  void ZeroWrite(int index) {
    Op op;
    op.index = index;
    op.size_before = size_;
    std::string what;
    const ByteRange range = PickRange(what);
    op.offset = range.offset;
    op.length = range.length;
    op.fill = "zeros, " + what;
    const std::vector<uint8_t> zeros(op.length, 0);
    Apply(op, zeros, op.length);
    // detect_zeroes turns an all-zero write request into zero clusters.
    // The kernel splits larger writes into several requests (each zeroing
    // only its own whole clusters), so only writes that surely arrive as
    // one request (<= 64 KiB: at most 17 pages) are checked.
    if (detect_zeroes_ && op.length <= 64 * kKiB &&
        !::testing::Test::HasFatalFailure()) {
      ASSERT_NO_FATAL_FAILURE(ExpectZeroedUnitsAreHoles(op));
    }
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

  // Closes the view's descriptor: the kernel sends FUSE FLUSH and close()
  // returns once it is answered, so every write acknowledged before is
  // durable. The image on disk must then be clean and equal the twin. Then
  // the view is opened again.
  void CloseAndReopen(int index) {
    Op op;
    op.index = index;
    op.kind = OpKind::kClose;
    op.size_before = size_;
    op.result = close(on_disk_.view->release());
    op.error = errno;
    view_fd_ = -1;
    Record(op);
    ++closes_;
    ASSERT_EQ(op.result, 0) << "closing the view (FUSE FLUSH): "
                            << strerror(op.error) << "\n" << Tail();
    const std::string problems =
        ProblemsOnDisk(on_disk_.image, on_disk_.twin, size_);
    *on_disk_.view =
        ScopedFd(open(on_disk_.view_path.c_str(), O_RDWR | O_CLOEXEC));
    view_fd_ = on_disk_.view->get();
    ASSERT_GE(view_fd_, 0) << "reopening the view: " << strerror(errno);
    ASSERT_TRUE(problems.empty())
        << "after closing the view (operation #" << index
        << "), the image on disk: " << problems << "\n" << Tail();
  }

  // With -o flush_interval=1 the daemon flushes every 0.5 s, so 1.5 s after
  // the last acknowledged change (the promise is 1 s) it is on disk, and
  // with nothing in flight the frees are done too: clean, and equal to the
  // twin. The view stays open; what is judged is a copy of the image file
  // taken then (see CopyOfImage: a qemu-img started now would flush).
  void SleepForIntervalFlush(int index) {
    Op op;
    op.index = index;
    op.kind = OpKind::kIntervalFlush;
    op.size_before = size_;
    Record(op);
    ++interval_flushes_;
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    ASSERT_OK_AND_ASSIGN(const std::string copy,
                         CopyOfImage(on_disk_.image, on_disk_.copy));
    const std::string problems = ProblemsOnDisk(copy, on_disk_.twin, size_);
    ASSERT_TRUE(problems.empty())
        << "1.5 s after the last change, with flush_interval=1, the image on "
           "disk (operation #"
        << index << "): " << problems << "\n" << Tail();
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
  // For CheckSeek's probes: checks never change the operations.
  std::mt19937_64 probe_rng_;
  int view_fd_;  // a close replaces it
  const int twin_fd_;
  const uint64_t cluster_;
  const uint64_t subcluster_;
  const bool zero_flag_;
  const bool detect_zeroes_;
  std::vector<uint64_t> spans_;
  uint64_t size_;
  const uint64_t max_size_;
  // Every byte at or past this offset has never held data (rounded up to
  // whole clusters): shrinking down to it loses nothing.
  uint64_t data_end_;
  const std::vector<ByteRange> preexisting_;
  const OnDisk on_disk_;
  std::deque<ByteRange> recent_;
  std::vector<Op> log_;
  int grows_ = 0;
  int shrinks_ = 0;
  int failed_shrinks_ = 0;
  int last_shrink_errno_ = 0;
  uint64_t bytes_written_ = 0;
  int punches_ = 0;
  int zero_ranges_ = 0;
  int zero_ranges_kept_ = 0;
  int preallocs_ = 0;
  int seek_checks_ = 0;
  uint64_t last_data_bytes_ = 0;
  size_t last_data_regions_ = 0;
  int closes_ = 0;
  int interval_flushes_ = 0;
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

// Granules of a persistent bitmap, resized as QEMU resizes them (new
// granules clean, those past a shrunken end gone).
class GranuleSet {
 public:
  GranuleSet(uint64_t size, uint64_t granularity) : granularity_(granularity) { Resize(size); }
  void Resize(uint64_t size) { bits_.resize((size + granularity_ - 1) / granularity_, false); }
  void Add(uint64_t offset, uint64_t length) {
    for (uint64_t g = offset / granularity_; length > 0 && g <= (offset + length - 1) / granularity_ &&
                                             g < bits_.size(); ++g) {
      bits_[g] = true;
    }
  }
  bool Has(uint64_t g) const { return g < bits_.size() && bits_[g]; }
  uint64_t size() const { return bits_.size(); }

 private:
  uint64_t granularity_;
  std::vector<bool> bits_;
};

// The persistent bitmap `name` must be stored consistent (not in use) and
// hold what it held before the run (`before`) and every granule a write,
// punched hole or zeroed range of `log` changed, with the resizes of the
// run applied; nothing else (a preallocation may mark its range).
void ExpectBitmapRecordedTheRun(const std::string& image, const std::string& name,
                                const std::vector<ByteRange>& before, uint64_t size_before,
                                const std::vector<Op>& log) {
  ASSERT_OK_AND_ASSIGN(std::vector<BitmapInfo> bitmaps, ImageBitmaps(image));
  auto it = std::find_if(bitmaps.begin(), bitmaps.end(), [&](const BitmapInfo& b) { return b.name == name; });
  ASSERT_NE(it, bitmaps.end()) << "bitmap " << name << " is gone";
  EXPECT_FALSE(it->in_use) << "bitmap " << name << " is still in use after the unmount";
  EXPECT_TRUE(it->enabled) << "bitmap " << name << " lost its auto flag";
  const uint64_t g = it->granularity;
  GranuleSet least(size_before, g), most(size_before, g);
  for (const ByteRange& r : before) {
    least.Add(r.offset, r.length);
    most.Add(r.offset, r.length);
  }
  for (const Op& op : log) {
    if (op.result < 0) continue;
    switch (op.kind) {
      case OpKind::kWrite:
      case OpKind::kWriteAtEnd:
        least.Add(op.offset, op.result);
        most.Add(op.offset, op.result);
        break;
      case OpKind::kGrow:
      case OpKind::kShrink:
        least.Resize(op.new_size);
        most.Resize(op.new_size);
        break;
      case OpKind::kPunchHole:
      case OpKind::kZeroRange:
      case OpKind::kPrealloc: {
        least.Resize(op.new_size);
        most.Resize(op.new_size);
        const uint64_t end = std::min(op.offset + op.length, op.new_size);
        if (op.offset >= end) break;
        if (op.kind != OpKind::kPrealloc) least.Add(op.offset, end - op.offset);
        most.Add(op.offset, end - op.offset);
        break;
      }
      default:
        break;
    }
  }
  ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> dirty, DirtyExtents(image, name));
  GranuleSet got(0, g);
  got.Resize(least.size() * g);
  for (const ByteRange& r : dirty) got.Add(r.offset, r.length);
  int reported = 0;
  for (uint64_t i = 0; i < least.size() && reported < 10; ++i) {
    if (least.Has(i) && !got.Has(i)) {
      ADD_FAILURE() << "bitmap " << name << " misses granule " << i << " (bytes " << i * g << "+), which the run changed";
      ++reported;
    } else if (got.Has(i) && !most.Has(i)) {
      ADD_FAILURE() << "bitmap " << name << " marks granule " << i << " (bytes " << i * g << "+), which nothing changed";
      ++reported;
    }
  }
}

// TMPDIR set to `dir` (when not empty) for the length of a scope, so that
// a daemon started meanwhile makes its volatile overlay there; then put
// back as it was.
class ScopedTmpdir {
 public:
  explicit ScopedTmpdir(const std::string& dir) : set_(!dir.empty()) {
    if (!set_) return;
    if (const char* old = getenv("TMPDIR")) old_ = old;
    setenv("TMPDIR", dir.c_str(), 1);
  }
  ScopedTmpdir(const ScopedTmpdir&) = delete;
  ScopedTmpdir& operator=(const ScopedTmpdir&) = delete;
  ~ScopedTmpdir() {
    if (!set_) return;
    if (old_.has_value()) {
      setenv("TMPDIR", old_->c_str(), 1);
    } else {
      unsetenv("TMPDIR");
    }
  }

 private:
  const bool set_;
  std::optional<std::string> old_;
};

// A volatile overlay has no name, but the daemon holds it open: its
// descriptor in /proc (a link to "TMPDIR/#INODE (deleted)") opens the same
// file, so qemu-img can judge the overlay while the view is mounted. The
// overlay's backing file is named by its absolute path, so it resolves
// from there too. Returns /proc/PID/fd/N for the first descriptor of
// daemon `pid` that leads into `tmpdir`.
absl::StatusOr<std::string> VolatileOverlayPath(pid_t pid,
                                                const std::string& tmpdir) {
  const std::string fds = absl::StrCat("/proc/", pid, "/fd");
  DIR* d = opendir(fds.c_str());
  if (d == nullptr) {
    return absl::InternalError(absl::StrCat("opendir ", fds, ": ",
                                            strerror(errno)));
  }
  std::string found;
  while (dirent* e = readdir(d)) {
    const std::string link = fds + "/" + e->d_name;
    char target[4096];
    const ssize_t n = readlink(link.c_str(), target, sizeof target - 1);
    if (n <= 0) continue;
    if (absl::StartsWith(absl::string_view(target, n), tmpdir + "/")) {
      found = link;
      break;
    }
  }
  closedir(d);
  if (found.empty()) {
    return absl::NotFoundError(absl::StrCat(
        "no descriptor of the daemon (pid ", pid, ") leads into ", tmpdir,
        ": where is its volatile overlay?"));
  }
  return found;
}

// `qemu-img info` of an overlay made by -o overlay=: its backing file is
// `base`, by the path the mount was given, format qcow2, and it has the
// base's cluster size.
void ExpectOverlayOf(const std::string& overlay, const std::string& base,
                     uint64_t cluster) {
  ASSERT_OK_AND_ASSIGN(const std::string info,
                       QemuImg({"info", "--output=json", overlay}));
  EXPECT_TRUE(absl::StrContains(
      info, absl::StrCat("\"backing-filename\": \"", base, "\"")))
      << "the overlay does not name " << base << " as its backing file\n"
      << info;
  EXPECT_TRUE(absl::StrContains(info, "\"backing-filename-format\": \"qcow2\""))
      << "the overlay does not record its backing file as qcow2\n" << info;
  EXPECT_TRUE(
      absl::StrContains(info, absl::StrCat("\"cluster-size\": ", cluster, ",")))
      << "the overlay does not have the base's cluster size (" << cluster
      << ")\n" << info;
}

class WriteOracleTest : public ::testing::TestWithParam<Recipe> {};

TEST_P(WriteOracleTest, ViewMatchesRawTwin) {
  const Recipe& recipe = GetParam();
  const auto started = std::chrono::steady_clock::now();
  const uint64_t base_seed = TestSeed();
  const uint64_t seed = base_seed ^ Fnv1a(recipe.name);
  const int ops =
      static_cast<int>(EnvNumber("QCOW2FUSE_TEST_OPS", recipe.ops));
  std::cout << "recipe " << recipe.name << ": rng seed " << seed
            << ", QCOW2FUSE_TEST_OPS=" << ops << "\n";
  RecordProperty("ops", ops);

  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("oracle-" + recipe.name));
  Built built;
  ASSERT_OK(recipe.build(dir.path(), built));
  const std::string twin = dir.Join("twin.raw");
  ASSERT_OK(ConvertToRaw(built.image, twin));
  ASSERT_OK(CheckImage(built.image));  // Sanity: qemu made it clean.

  // The image the view writes to (`image`, judged on disk), and the mount
  // options of the first mount, which opens built.image. With an overlay,
  // built.image is only its backing file: untouchable.
  std::string image = built.image;
  std::vector<std::string> first_mount_options = recipe.mount_options;
  std::string tmpdir;  // TMPDIR of the daemon (volatile: holds the overlay)
  switch (recipe.overlay) {
    case Overlay::kNone:
      break;
    case Overlay::kNamed:
      image = dir.Join("overlay.qcow2");
      first_mount_options.push_back("overlay=" + image);
      built.untouchable.push_back(built.image);
      break;
    case Overlay::kVolatile:
      tmpdir = dir.Join("tmp");
      ASSERT_EQ(mkdir(tmpdir.c_str(), 0755), 0) << strerror(errno);
      first_mount_options.push_back("volatile");
      built.untouchable.push_back(built.image);
      image.clear();  // Known once the daemon holds it.
      break;
  }

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
  // An overlay has the size of its base, and shows what the base holds.
  ASSERT_OK_AND_ASSIGN(const uint64_t size, VirtualSize(built.image));
  ASSERT_OK_AND_ASSIGN(const uint64_t data_end,
                       DataEnd(built.image, recipe.cluster));
  // What the image holds before we write (data, zero clusters, compressed
  // clusters, backing-file data): fallocate ranges are aimed at it too.
  std::vector<ByteRange> preexisting;
  {
    ASSERT_OK_AND_ASSIGN(std::vector<MapExtent> map, MapImage(built.image));
    for (const MapExtent& extent : map) {
      if (extent.present && extent.length > 0) {
        preexisting.push_back({extent.start, extent.length});
      }
    }
  }

  // What the persistent bitmap held before the run, as QEMU reads it.
  std::vector<ByteRange> bitmap_before;
  if (!built.bitmap.empty()) {
    ASSERT_OK_AND_ASSIGN(bitmap_before, DirtyExtents(built.image, built.bitmap));
  }
  std::vector<Op> run_log;

  const std::string view_path = dir.Join("view.raw");
  uint64_t final_size = 0;
  std::string op_tail;  // For failures of the checks after unmounting.
  {
    std::unique_ptr<MountedView> view;
    {
      ScopedTmpdir daemon_tmpdir(tmpdir);
      ASSERT_OK_AND_ASSIGN(
          view, StartView(built.image, view_path, false, first_mount_options));
    }
    if (recipe.overlay == Overlay::kVolatile) {
      ASSERT_OK_AND_ASSIGN(image, VolatileOverlayPath(view->pid(), tmpdir));
      const std::vector<std::string> names = DirectoryNames(tmpdir);
      EXPECT_TRUE(names.empty())
          << "the volatile overlay has a name: " << tmpdir << "/" << names[0];
    }
    // Where CopyOfImage puts its copy: next to the image, if it has a place.
    const std::string copy = recipe.overlay == Overlay::kVolatile
                                 ? dir.Join("overlay.as-on-disk.qcow2")
                                 : image + ".as-on-disk.qcow2";
    {
      ScopedFd view_fd(open(view_path.c_str(), O_RDWR | O_CLOEXEC));
      ASSERT_GE(view_fd.get(), 0) << "open " << view_path << ": "
                                  << strerror(errno);
      ScopedFd twin_fd(open(twin.c_str(), O_RDWR | O_CLOEXEC));
      ASSERT_GE(twin_fd.get(), 0) << strerror(errno);

      Oracle oracle(recipe, seed, view_fd.get(), twin_fd.get(), size,
                    data_end, preexisting,
                    OnDisk{image, copy, twin, view_path, &view_fd,
                           FlushInterval(recipe.mount_options)});
      oracle.Compare("before any write");
      ASSERT_FALSE(HasFatalFailure());
      oracle.CheckSeek("before any write");
      ASSERT_FALSE(HasFatalFailure());
      for (int i = 0; i < ops; ++i) {
        oracle.Step(i);
        ASSERT_FALSE(HasFatalFailure()) << "seed " << base_seed;
        if ((i + 1) % kCompareEvery == 0) {
          oracle.Compare(absl::StrCat("after operation #", i));
          ASSERT_FALSE(HasFatalFailure()) << "seed " << base_seed;
          oracle.CheckSeek(absl::StrCat("after operation #", i));
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
      oracle.CheckSeek("after all operations");
      ASSERT_FALSE(HasFatalFailure()) << "seed " << base_seed;
      final_size = oracle.size();
      op_tail = oracle.Tail(kOpLogTailAtEnd);
      run_log = oracle.log();
      int writes = 0, zero_writes = 0, at_end = 0, fsyncs = 0;
      for (const Op& op : oracle.log()) {
        writes += op.kind == OpKind::kWrite;
        zero_writes += op.kind == OpKind::kWrite &&
                       absl::StartsWith(op.fill, "zeros");
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
                << "; " << oracle.punches() << " punched holes, "
                << oracle.zero_ranges_kept() << "+" << oracle.zero_ranges()
                << " zero ranges (KEEP_SIZE+not), " << oracle.preallocs()
                << " preallocations; " << oracle.seek_checks()
                << " SEEK_DATA/SEEK_HOLE walks (last: "
                << oracle.last_data_bytes() << " bytes of data in "
                << oracle.last_data_regions() << " regions); "
                << oracle.closes() << " closes, " << oracle.interval_flushes()
                << " interval flushes"
                << "; size " << size << " -> " << final_size
                << (first_mount_options.empty()
                        ? ""
                        : absl::StrCat("; -o ",
                                       absl::StrJoin(first_mount_options, ",")))
                << "\n";
    }  // Close both descriptors before unmounting.
    if (recipe.overlay == Overlay::kVolatile) {
      // The last look at a volatile overlay: closing the view (FUSE FLUSH)
      // made it durable, and it goes away with the daemon.
      const std::string problems = ProblemsOnDisk(image, twin, final_size);
      EXPECT_TRUE(problems.empty())
          << "after the last close, the volatile overlay: " << problems;
    }
    ASSERT_OK(view->Unmount());
    ASSERT_TRUE(view->exit_status().has_value());
    EXPECT_TRUE(view->exit_status()->success())
        << view->exit_status()->ToString() << "\n" << view->ReadLog();
  }

  if (recipe.overlay != Overlay::kVolatile) {
    ExpectCleanCheck(image, "after the writes");
    ASSERT_OK_AND_ASSIGN(const uint64_t qemu_size, VirtualSize(image));
    EXPECT_EQ(qemu_size, final_size) << "qemu-img info disagrees on the size";
    if (qemu_size == final_size) ExpectQemuCompareIdentical(image, twin);
  }
  for (size_t i = 0; i < built.untouchable.size(); ++i) {
    ASSERT_OK_AND_ASSIGN(std::string digest, Sha256File(built.untouchable[i]));
    EXPECT_EQ(digest, untouched_digests[i])
        << built.untouchable[i]
        << " (a backing file, or the base of the overlay) was modified";
  }
  if (recipe.overlay == Overlay::kNamed) {
    ExpectOverlayOf(image, built.image, recipe.cluster);
  }
  if (recipe.overlay == Overlay::kVolatile) {
    const std::vector<std::string> names = DirectoryNames(tmpdir);
    EXPECT_TRUE(names.empty())
        << "the volatile overlay left " << tmpdir << "/" << names[0];
  }
  if (!built.snapshot.empty()) {
    // Reverting a copy to the snapshot (which also restores the disk size
    // the snapshot recorded) must give back exactly what it held.
    const std::string copy = dir.Join("reverted.qcow2");
    const std::string after = dir.Join("snapshot_after.raw");
    std::error_code error;
    fs::copy_file(image, copy, error);
    ASSERT_FALSE(error) << error.message();
    ASSERT_OK(QemuImg({"snapshot", "-a", built.snapshot, copy}));
    ASSERT_OK(ConvertToRaw(copy, after));
    EXPECT_OK(CompareFiles(after, snapshot_raw))
        << "internal snapshot " << built.snapshot << " changed";
    ExpectCleanCheck(copy, "after reverting a copy to the snapshot");
  }
  if (!built.bitmap.empty()) {
    ExpectBitmapRecordedTheRun(image, built.bitmap, bitmap_before, size, run_log);
  }

  // Everything must still be there after a fresh open (of the overlay
  // itself: a plain mount, its backing file the base). A volatile overlay
  // is gone: there is nothing to open again.
  if (recipe.overlay != Overlay::kVolatile) {
    ASSERT_OK_AND_ASSIGN(
        std::unique_ptr<MountedView> view,
        StartView(image, view_path, false, recipe.mount_options));
    EXPECT_OK(CompareFiles(view_path, twin)) << "after remounting";
    ASSERT_OK(view->Unmount());
    ASSERT_TRUE(view->exit_status().has_value());
    EXPECT_TRUE(view->exit_status()->success())
        << view->exit_status()->ToString() << "\n" << view->ReadLog();
    ExpectCleanCheck(image, "after remounting");
  }
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

// detect_zeroes=on: all-zero writes become zero clusters (zero
// subclusters with extended L2; over backing data they must hide it; over
// compressed clusters and zero clusters that keep their host cluster).
INSTANTIATE_TEST_SUITE_P(
    DetectZeroesOn, WriteOracleTest,
    ::testing::ValuesIn(DetectZeroesRecipes(
        "on", {"extended_l2_64k", "backing_qcow2_shorter",
               "preexisting_qemu_io"})),
    [](const ::testing::TestParamInfo<Recipe>& info) {
      return info.param.name;
    });

// detect_zeroes=unmap: and their host clusters are freed (clusters shared
// with an internal snapshot, over compressed backing data, and version 2,
// which has no zero flag: unallocated where nothing lies beneath, written
// zeros elsewhere).
INSTANTIATE_TEST_SUITE_P(
    DetectZeroesUnmap, WriteOracleTest,
    ::testing::ValuesIn(DetectZeroesRecipes(
        "unmap", {"backing_zlib_compressed", "internal_snapshot",
                  "compat_v2"})),
    [](const ::testing::TestParamInfo<Recipe>& info) {
      return info.param.name;
    });

// uncached_writes=off: the writes go through the view's page cache, as
// they did before descriptors opened for writing bypassed it (the default
// runs above).
INSTANTIATE_TEST_SUITE_P(
    CachedWrites, WriteOracleTest,
    ::testing::ValuesIn(RecipesWithOption(
        "uncached_writes=off", "_cached_writes",
        {"cluster_4k", "extended_l2_64k", "backing_qcow2_shorter",
         "internal_snapshot"})),
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
