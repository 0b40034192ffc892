// lseek SEEK_DATA/SEEK_HOLE of a read-only view against `qemu-img map`.
//
// SeekMapTest: for each recipe (an image made with qemu-img/qemu-io: sparse
// writes, zero clusters, discards, compressed clusters, extended L2 with
// subcluster-sized writes, zeros and discards, backing chains where an
// overlay zero cluster hides backing data and unallocated overlay clusters
// show it, an overlay larger than its backing file, 4 KiB clusters over
// many L2 tables), the view is mounted read-only and walked with
// SEEK_DATA/SEEK_HOLE; its data regions (adjacent ones merged) must be
// EXACTLY the extents `qemu-img map --output=json` reports with
// "data": true (adjacent ones merged). lseek from offsets at and around
// every boundary must agree with that, every hole must read as zeros, and
// st_blocks * 512 must equal the data bytes.
//
// SeekLargeTest:
//   - an empty 1 TiB image: SEEK_DATA at 0 is ENXIO, SEEK_HOLE at 0 is 0
//     (the time each takes is printed; no timing assertion);
//   - a 1 TiB image with 1 MiB of data near the end: SEEK_DATA from 0
//     finds exactly its start, SEEK_HOLE from there exactly its end;
//   - a fully allocated 64 GiB image (preallocation=metadata): opening it
//     reads each L2 table in one read, SEEK_DATA at 0 then reads one more
//     slice, SEEK_HOLE 16 slices per read (as the daemon's exit log counts
//     them);
//   - `cp --sparse=always` of the view of a 64 GiB image holding 200 MiB
//     (50 chunks of 4 MiB, seeded offsets) gives a copy identical to
//     `qemu-img convert -O raw` and as sparse (the times of both printed).
//
// Offsets of the scattered chunks are seeded; the seed is printed and
// QCOW2FUSE_TEST_SEED=N replays it.

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <functional>
#include <iostream>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

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

constexpr uint64_t kGiB = 1024 * kMiB;
constexpr uint64_t kTiB = 1024 * kGiB;

// --- qemu-io command spelling. ---

using qemu_io_cmd::Compressed;
using qemu_io_cmd::Discard;
using qemu_io_cmd::W;
using qemu_io_cmd::Zero;

std::string Backing(const std::string& base) {
  return "backing_file=" + base;
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                       start)
      .count();
}

absl::StatusOr<std::unique_ptr<MountedView>> MountReadOnly(
    const std::string& image, const std::string& mountpoint) {
  MountOptions options;
  options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  options.image = image;
  options.mountpoint = mountpoint;
  options.read_only = true;
  return MountedView::Start(options);
}

// Sorted ranges with the touching ones joined.
std::vector<ByteRange> Merge(std::vector<ByteRange> ranges) {
  std::sort(ranges.begin(), ranges.end(),
            [](const ByteRange& a, const ByteRange& b) {
              return a.offset < b.offset;
            });
  std::vector<ByteRange> merged;
  for (const ByteRange& r : ranges) {
    if (r.length == 0) continue;
    if (!merged.empty() && merged.back().end() >= r.offset) {
      merged.back().length =
          std::max(merged.back().end(), r.end()) - merged.back().offset;
    } else {
      merged.push_back(r);
    }
  }
  return merged;
}

// The extents `qemu-img map` says hold data ("data": true), merged.
absl::StatusOr<std::vector<ByteRange>> QemuDataExtents(
    const std::string& image) {
  absl::StatusOr<std::vector<MapExtent>> map = MapImage(image);
  if (!map.ok()) return map.status();
  std::vector<ByteRange> data;
  for (const MapExtent& extent : *map) {
    if (extent.data) data.push_back({extent.start, extent.length});
  }
  return Merge(std::move(data));
}

std::string Describe(const std::vector<ByteRange>& ranges) {
  std::string text;
  const size_t shown = std::min<size_t>(ranges.size(), 40);
  for (size_t i = 0; i < shown; ++i) {
    absl::StrAppendFormat(&text, "  [0x%x, 0x%x) %d bytes\n", ranges[i].offset,
                          ranges[i].end(), ranges[i].length);
  }
  if (shown < ranges.size()) {
    absl::StrAppend(&text, "  ... ", ranges.size() - shown, " more\n");
  }
  return text;
}

// Where `want` and `got` first differ, for the failure message.
std::string FirstDifference(const std::vector<ByteRange>& want,
                            const std::vector<ByteRange>& got) {
  for (size_t i = 0; i < std::max(want.size(), got.size()); ++i) {
    if (i >= want.size()) {
      return absl::StrCat("extra view region #", i, " ",
                          absl::StrFormat("[0x%x, 0x%x)", got[i].offset,
                                          got[i].end()));
    }
    if (i >= got.size()) {
      return absl::StrCat("missing region #", i, " ",
                          absl::StrFormat("[0x%x, 0x%x)", want[i].offset,
                                          want[i].end()));
    }
    if (!(want[i] == got[i])) {
      return absl::StrFormat(
          "region #%d: qemu-img map [0x%x, 0x%x), view [0x%x, 0x%x)", i,
          want[i].offset, want[i].end(), got[i].offset, got[i].end());
    }
  }
  return "none";
}

// What lseek(at, whence) must answer when `data` (sorted, merged) are the
// data regions of a file of `size` bytes: -1 means ENXIO.
off_t Expected(const std::vector<ByteRange>& data, uint64_t size, uint64_t at,
               int whence) {
  if (at >= size) return -1;
  auto it = std::find_if(data.begin(), data.end(),
                         [&](const ByteRange& r) { return r.end() > at; });
  const bool inside = it != data.end() && it->offset <= at;
  if (whence == SEEK_DATA) {
    return it == data.end() ? -1 : static_cast<off_t>(std::max(at, it->offset));
  }
  return static_cast<off_t>(inside ? it->end() : at);
}

// lseek from offsets at, just inside and just outside every boundary of
// `data`, and from the middle of every region and hole.
void ExpectProbesAgree(int fd, const std::vector<ByteRange>& data,
                       uint64_t size) {
  std::set<uint64_t> probes = {0, size - 1};
  uint64_t previous_end = 0;
  for (const ByteRange& r : data) {
    for (uint64_t at : {r.offset, r.offset + 1, r.offset + r.length / 2,
                        r.end() - 1, r.end()}) {
      probes.insert(at);
    }
    if (r.offset > 0) probes.insert(r.offset - 1);
    if (r.offset > previous_end) {
      probes.insert(previous_end + (r.offset - previous_end) / 2);
    }
    previous_end = r.end();
    if (probes.size() > 2000) break;
  }
  int failures = 0;
  for (uint64_t at : probes) {
    if (at >= size) continue;
    for (int whence : {SEEK_DATA, SEEK_HOLE}) {
      errno = 0;
      const off_t got = lseek(fd, at, whence);
      const int err = errno;
      const off_t want = Expected(data, size, at, whence);
      const bool ok = want < 0 ? (got < 0 && err == ENXIO) : got == want;
      if (!ok && ++failures <= 10) {
        ADD_FAILURE() << "lseek(" << at
                      << absl::StrFormat(" (0x%x), ", at)
                      << (whence == SEEK_DATA ? "SEEK_DATA" : "SEEK_HOLE")
                      << ") gave " << got
                      << (got < 0 ? absl::StrCat(" (", strerror(err), ")")
                                  : absl::StrFormat(" (0x%x)", got))
                      << ", expected "
                      << (want < 0 ? std::string("ENXIO")
                                   : absl::StrFormat("%d (0x%x)", want, want));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Recipes.

struct SeekRecipe {
  std::string name;
  // Makes the image in `dir` and returns its path.
  std::function<absl::StatusOr<std::string>(const TempDir& dir)> build;
};

void PrintTo(const SeekRecipe& recipe, std::ostream* out) {
  *out << recipe.name;
}

// A single image of `size` bytes with `options`, then `commands`.
SeekRecipe Single(std::string name, uint64_t size,
                  std::vector<std::string> options,
                  std::vector<std::string> commands) {
  return {std::move(name),
          [=](const TempDir& dir) -> absl::StatusOr<std::string> {
            const std::string image = dir.Join("disk.qcow2");
            absl::Status s = CreateImage(image, "qcow2", size, options);
            if (s.ok() && !commands.empty()) s = QemuIo(image, "qcow2", commands);
            if (!s.ok()) return s;
            return image;
          }};
}

std::vector<SeekRecipe> AllSeekRecipes() {
  std::vector<SeekRecipe> recipes;
  recipes.push_back(Single(
      "sparse_writes", 64 * kMiB, {"cluster_size=65536"},
      {W(0x11, 1000, 10),                       // a few bytes: one cluster
       W(0x12, 64 * kKiB - 100, 200),           // across a cluster boundary
       W(0x13, 3 * kMiB, 64 * kKiB),            // one whole cluster
       W(0x14, 3 * kMiB + 128 * kKiB, 64 * kKiB),  // and one after a gap
       W(0x15, 10 * kMiB + 12345, 3 * kMiB),    // unaligned, many clusters
       W(0x16, 64 * kMiB - 512, 512)}));        // the very last sector
  recipes.push_back(Single(
      "zero_clusters", 64 * kMiB, {"cluster_size=65536"},
      {W(0x21, 0, 4 * kMiB),
       Zero(kMiB, 128 * kKiB),                  // zero clusters, keep host
       Zero(2 * kMiB, 64 * kKiB, true),         // zero, may unmap
       Zero(3 * kMiB + 1000, 64 * kKiB),        // unaligned: partly data
       Zero(20 * kMiB, 8 * kMiB),               // zero where nothing was
       W(0x22, 40 * kMiB, kMiB), Zero(40 * kMiB + 256 * kKiB, 256 * kKiB)}));
  recipes.push_back(Single(
      "discards", 64 * kMiB, {"cluster_size=65536"},
      {W(0x31, 0, 8 * kMiB), Discard(64 * kKiB, 64 * kKiB),
       Discard(kMiB, kMiB), Discard(4 * kMiB + 10, 200 * kKiB),
       W(0x32, 30 * kMiB, 2 * kMiB), Discard(30 * kMiB, 2 * kMiB),
       W(0x33, 50 * kMiB, 64 * kKiB)}));
  recipes.push_back(Single(
      "compressed", 64 * kMiB, {"cluster_size=65536"},
      {Compressed(0x41, 0, 256 * kKiB), Compressed(0x42, 5 * kMiB, 64 * kKiB),
       W(0x43, 5 * kMiB + 64 * kKiB, 64 * kKiB),
       Compressed(0x44, 60 * kMiB, kMiB), Zero(60 * kMiB + 128 * kKiB, 64 * kKiB)}));
  // 4 KiB clusters: an L2 table covers 2 MiB, so runs cross many of them.
  recipes.push_back(Single(
      "cluster_4k_l2_boundaries", 64 * kMiB, {"cluster_size=4096"},
      {W(0x51, 2 * kMiB - 8 * kKiB, 16 * kKiB),
       W(0x52, 10 * kMiB - 4 * kKiB, 6 * kMiB + 8 * kKiB),
       Zero(12 * kMiB - 4 * kKiB, 8 * kKiB),   // a hole across an L2 boundary
       Discard(14 * kMiB, 2 * kMiB),           // a whole L2 table's worth
       W(0x53, 63 * kMiB, 1000)}));
  // Extended L2, 64 KiB clusters: 2 KiB subclusters. Boundaries must be at
  // subcluster granularity.
  recipes.push_back(Single(
      "extended_l2_subclusters", 64 * kMiB,
      {"extended_l2=on", "cluster_size=65536"},
      {W(0x61, 0, 4 * kKiB),                     // subclusters 0-1
       W(0x62, 16 * kKiB, 4 * kKiB),             // 8-9 of the same cluster
       W(0x63, 62 * kKiB, 4 * kKiB),             // across a cluster boundary
       W(0x64, kMiB + 6 * kKiB, 4 * kKiB),       // 3-4
       W(0x65, kMiB + 40 * kKiB + 100, 1000),    // inside subcluster 20
       W(0x66, 2 * kMiB, 64 * kKiB),             // a whole cluster...
       Zero(2 * kMiB + 8 * kKiB, 4 * kKiB),      // ...with zero subclusters
       Discard(2 * kMiB + 32 * kKiB, 8 * kKiB),  // ...and discarded ones
       Zero(5 * kMiB + 2 * kKiB, 2 * kKiB),      // a zero subcluster alone
       W(0x67, 8 * kMiB + 60 * kKiB, 8 * kKiB)}));
  // A backing chain: base <- overlay. Overlay zero clusters hide backing
  // data; unallocated overlay clusters show it.
  recipes.push_back({"backing_chain", [](const TempDir& dir)
                                          -> absl::StatusOr<std::string> {
    const std::string base = dir.Join("base.qcow2");
    const std::string image = dir.Join("disk.qcow2");
    absl::Status s = CreateImage(base, "qcow2", 64 * kMiB);
    if (s.ok()) {
      s = QemuIo(base, "qcow2",
                 {W(0xb1, 0, 4 * kMiB), W(0xb2, 10 * kMiB, 2 * kMiB),
                  Compressed(0xb3, 20 * kMiB, 256 * kKiB),
                  W(0xb4, 40 * kMiB + 100, 1000)});
    }
    if (s.ok()) {
      s = CreateImage(image, "qcow2", 64 * kMiB,
                      {Backing(base), "backing_fmt=qcow2"});
    }
    if (s.ok()) {
      s = QemuIo(image, "qcow2",
                 {Zero(kMiB, 128 * kKiB),            // hides base data
                  Zero(10 * kMiB + 64 * kKiB, 64 * kKiB, true),
                  Discard(11 * kMiB, 64 * kKiB),     // zero over backing
                  Zero(20 * kMiB + 64 * kKiB, 64 * kKiB),  // over compressed
                  W(0xc1, 2 * kMiB + 100, 10),       // COW of a base cluster
                  W(0xc2, 30 * kMiB, 64 * kKiB),     // data of its own
                  Zero(40 * kMiB, 64 * kKiB)});      // hides the base's bytes
    }
    if (!s.ok()) return s;
    return image;
  }});
  // base <- mid <- top: a zero cluster in the middle layer hides the base
  // through an unallocated top; the top is larger than the base.
  recipes.push_back({"backing_three_levels", [](const TempDir& dir)
                                                 -> absl::StatusOr<std::string> {
    const std::string base = dir.Join("base.qcow2");
    const std::string mid = dir.Join("mid.qcow2");
    const std::string image = dir.Join("disk.qcow2");
    absl::Status s = CreateImage(base, "qcow2", 16 * kMiB,
                                 {"cluster_size=32768"});
    if (s.ok()) {
      s = QemuIo(base, "qcow2",
                 {W(0xd1, 0, 8 * kMiB), W(0xd2, 16 * kMiB - 64 * kKiB,
                                          64 * kKiB)});
    }
    if (s.ok()) {
      s = CreateImage(mid, "qcow2", 32 * kMiB,
                      {Backing(base), "backing_fmt=qcow2"});
    }
    if (s.ok()) {
      s = QemuIo(mid, "qcow2",
                 {Zero(2 * kMiB, 512 * kKiB), W(0xe1, 20 * kMiB, 64 * kKiB),
                  Zero(7 * kMiB, 64 * kKiB)});
    }
    if (s.ok()) {
      s = CreateImage(image, "qcow2", 48 * kMiB,
                      {Backing(mid), "backing_fmt=qcow2", "cluster_size=4096"});
    }
    if (s.ok()) {
      s = QemuIo(image, "qcow2",
                 {W(0xf1, 2 * kMiB + 128 * kKiB, 4 * kKiB),  // inside mid's zeros
                  Zero(4 * kMiB, 4 * kKiB),                  // hides base
                  W(0xf2, 40 * kMiB, 8 * kKiB)});            // past the base
    }
    if (!s.ok()) return s;
    return image;
  }});
  // Extended L2 overlay over a backing file: unallocated subclusters show
  // the backing data, zero subclusters hide it, at 2 KiB granularity.
  recipes.push_back({"extended_l2_over_backing", [](const TempDir& dir)
                                                     -> absl::StatusOr<std::string> {
    const std::string base = dir.Join("base.qcow2");
    const std::string image = dir.Join("disk.qcow2");
    absl::Status s = CreateImage(base, "qcow2", 32 * kMiB);
    if (s.ok()) {
      s = QemuIo(base, "qcow2",
                 {W(0xa1, 0, 2 * kMiB), W(0xa2, 8 * kMiB + 2 * kKiB, 2 * kKiB)});
    }
    if (s.ok()) {
      s = CreateImage(image, "qcow2", 32 * kMiB,
                      {Backing(base), "backing_fmt=qcow2", "extended_l2=on",
                       "cluster_size=65536"});
    }
    if (s.ok()) {
      s = QemuIo(image, "qcow2",
                 {Zero(4 * kKiB, 4 * kKiB), Zero(70 * kKiB, 2 * kKiB),
                  W(0xa3, 512 * kKiB + 6 * kKiB, 4 * kKiB),
                  Discard(kMiB + 32 * kKiB, 8 * kKiB),
                  W(0xa4, 4 * kMiB + 10 * kKiB, 4 * kKiB),
                  W(0xa5, 8 * kMiB + 8 * kKiB, 2 * kKiB)});
    }
    if (!s.ok()) return s;
    return image;
  }});
  return recipes;
}

class SeekMapTest : public ::testing::TestWithParam<SeekRecipe> {};

TEST_P(SeekMapTest, DataRegionsMatchQemuImgMap) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("seek-" + GetParam().name));
  ASSERT_OK_AND_ASSIGN(const std::string image, GetParam().build(dir));
  ASSERT_OK(CheckImage(image));
  ASSERT_OK_AND_ASSIGN(const std::vector<ByteRange> want,
                       QemuDataExtents(image));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                       MountReadOnly(image, dir.Join("view.raw")));
  {
    ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(view->path()));
    ASSERT_OK_AND_ASSIGN(const uint64_t size, FileSize(fd.get()));
    ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> regions, DataRegions(fd.get()));
    const std::vector<ByteRange> got = Merge(regions);
    EXPECT_EQ(got, want) << "SEEK_DATA/SEEK_HOLE regions of the view differ "
                            "from qemu-img map's \"data\": true extents; "
                            "first difference: "
                         << FirstDifference(want, got)
                         << "\nqemu-img map:\n" << Describe(want)
                         << "view:\n" << Describe(got);
    ExpectProbesAgree(fd.get(), want, size);
    for (const ByteRange& hole : Complement(got, size)) {
      EXPECT_OK(CheckZeros(fd.get(), hole)) << "hole " << hole;
    }
    uint64_t data_bytes = 0;
    for (const ByteRange& r : want) data_bytes += r.length;
    struct stat st;
    ASSERT_EQ(fstat(fd.get(), &st), 0);
    EXPECT_EQ(static_cast<uint64_t>(st.st_blocks) * 512, data_bytes)
        << "st_blocks against the data qemu-img map reports";
    std::cout << GetParam().name << ": " << want.size() << " data extents, "
              << data_bytes << " bytes\n";
  }
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
}

INSTANTIATE_TEST_SUITE_P(Recipes, SeekMapTest,
                         ::testing::ValuesIn(AllSeekRecipes()),
                         [](const ::testing::TestParamInfo<SeekRecipe>& info) {
                           return info.param.name;
                         });

// ---------------------------------------------------------------------------
// Large, mostly empty disks.

TEST(SeekLargeTest, EmptyTebibyteImageHasNoData) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("seek-1t-empty"));
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kTiB));
  auto started = std::chrono::steady_clock::now();
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                       MountReadOnly(image, dir.Join("view.raw")));
  const double mount_seconds = SecondsSince(started);
  {
    ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(view->path()));
    ASSERT_OK_AND_ASSIGN(const uint64_t size, FileSize(fd.get()));
    ASSERT_EQ(size, kTiB);

    started = std::chrono::steady_clock::now();
    errno = 0;
    const off_t data = lseek(fd.get(), 0, SEEK_DATA);
    const int data_err = errno;
    const double data_seconds = SecondsSince(started);
    EXPECT_EQ(data, -1) << "SEEK_DATA at 0 of an empty disk";
    EXPECT_EQ(data_err, ENXIO) << strerror(data_err);

    started = std::chrono::steady_clock::now();
    const off_t hole = lseek(fd.get(), 0, SEEK_HOLE);
    const double hole_seconds = SecondsSince(started);
    EXPECT_EQ(hole, 0) << "SEEK_HOLE at 0 of an empty disk: " << strerror(errno);

    started = std::chrono::steady_clock::now();
    struct stat st;
    ASSERT_EQ(fstat(fd.get(), &st), 0);
    const double stat_seconds = SecondsSince(started);
    EXPECT_EQ(st.st_blocks, 0);
    std::cout << absl::StrFormat(
        "1 TiB empty image: mount %.3f s, SEEK_DATA(0) %.6f s, SEEK_HOLE(0) "
        "%.6f s, fstat %.6f s\n",
        mount_seconds, data_seconds, hole_seconds, stat_seconds);
  }
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
}

TEST(SeekLargeTest, TebibyteImageFindsDataNearTheEnd) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("seek-1t-tail"));
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kTiB));
  const uint64_t start = kTiB - 5 * kMiB + 64 * kKiB;  // cluster-aligned
  ASSERT_OK(QemuIo(image, "qcow2", {W(0x77, start, kMiB)}));
  ASSERT_OK_AND_ASSIGN(const std::vector<ByteRange> want,
                       QemuDataExtents(image));
  ASSERT_EQ(want, (std::vector<ByteRange>{{start, kMiB}}));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                       MountReadOnly(image, dir.Join("view.raw")));
  {
    ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(view->path()));
    auto started = std::chrono::steady_clock::now();
    const off_t data = lseek(fd.get(), 0, SEEK_DATA);
    const double data_seconds = SecondsSince(started);
    EXPECT_EQ(data, static_cast<off_t>(start))
        << "SEEK_DATA from 0: " << strerror(errno);
    started = std::chrono::steady_clock::now();
    const off_t hole = lseek(fd.get(), start, SEEK_HOLE);
    const double hole_seconds = SecondsSince(started);
    EXPECT_EQ(hole, static_cast<off_t>(start + kMiB))
        << "SEEK_HOLE from the data: " << strerror(errno);
    EXPECT_EQ(lseek(fd.get(), 0, SEEK_HOLE), 0);
    errno = 0;
    EXPECT_EQ(lseek(fd.get(), start + kMiB, SEEK_DATA), -1);
    EXPECT_EQ(errno, ENXIO) << strerror(errno);
    ExpectProbesAgree(fd.get(), want, kTiB);
    // The data reads back.
    std::vector<uint8_t> buf(kMiB);
    ASSERT_EQ(pread(fd.get(), buf.data(), buf.size(), start),
              static_cast<ssize_t>(kMiB));
    EXPECT_TRUE(std::all_of(buf.begin(), buf.end(),
                            [](uint8_t b) { return b == 0x77; }));
    std::cout << absl::StrFormat(
        "1 TiB image, 1 MiB at 0x%x: SEEK_DATA(0) %.6f s, SEEK_HOLE %.6f s\n",
        start, data_seconds, hole_seconds);
  }
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
}

// What the daemon says at exit of the L2 tables it read: slices, and reads
// of the image file for them; {-1, -1} if it says nothing.
std::pair<int64_t, int64_t> L2SlicesRead(const std::string& log) {
  static const std::string kSays = "L2 table slices read: ";
  const size_t at = log.rfind(kSays);
  if (at == std::string::npos) return {-1, -1};
  long long slices = -1, reads = -1;
  if (sscanf(log.c_str() + at + kSays.size(), "%lld, in %lld reads", &slices, &reads) != 2) return {-1, -1};
  return {slices, reads};
}

// A fully allocated disk is one run of data from 0 to its end. Opening it
// counts its data (for st_blocks), a walk of all 2048 L2 slices that reads
// each 64 KiB L2 table in one read rather than sixteen. SEEK_DATA at 0
// then answers from the first slice alone, not from a walk to the end of
// the run; SEEK_HOLE walks the run, its reads again 16 slices each.
TEST(SeekLargeTest, SeekDataInALongRunLooksOnlyAtItsStart) {
  constexpr uint64_t kSize = 64 * kGiB;  // 128 L2 tables of 16 slices
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("seek-allocated"));
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kSize, {"preallocation=metadata"}));
  ASSERT_OK_AND_ASSIGN(const std::vector<ByteRange> want, QemuDataExtents(image));
  ASSERT_EQ(want, (std::vector<ByteRange>{{0, kSize}})) << "QEMU does not see one run of data";
  // Mounts, opens the view and calls lseek(0, whence) unless `whence` is
  // -1, unmounts: what the daemon read of the L2 tables.
  auto slices_read = [&](int whence) -> std::pair<int64_t, int64_t> {
    absl::StatusOr<std::unique_ptr<MountedView>> view = MountReadOnly(image, dir.Join("view.raw"));
    EXPECT_OK(view.status());
    if (!view.ok()) return {-1, -1};
    {
      absl::StatusOr<ScopedFd> fd = OpenReadOnly((*view)->path());
      EXPECT_OK(fd.status());
      if (fd.ok() && whence != -1) {
        EXPECT_EQ(lseek(fd->get(), 0, whence), static_cast<off_t>(whence == SEEK_DATA ? 0 : kSize))
            << strerror(errno);
      }
    }
    EXPECT_OK((*view)->Unmount());
    EXPECT_TRUE((*view)->exit_status()->success()) << (*view)->ReadLog();
    const std::pair<int64_t, int64_t> read = L2SlicesRead((*view)->ReadLog());
    std::cout << "lseek " << (whence == SEEK_DATA ? "SEEK_DATA" : whence == SEEK_HOLE ? "SEEK_HOLE" : "none")
              << ": L2 slices read " << read.first << " in " << read.second << " reads\n";
    return read;
  };
  const auto [opened, opened_reads] = slices_read(-1);
  EXPECT_EQ(opened, 2048);
  EXPECT_EQ(opened_reads, 128);
  const auto [data, data_reads] = slices_read(SEEK_DATA);
  EXPECT_LE(data - opened, 1) << "SEEK_DATA walked the run";
  EXPECT_LE(data_reads - opened_reads, 1);
  const auto [hole, hole_reads] = slices_read(SEEK_HOLE);
  EXPECT_GE(hole - opened, 1024) << "the walk found the slices cached: the test shows nothing";
  EXPECT_LE(hole_reads - opened_reads, (hole - opened + 15) / 16) << "the walk read slices one at a time";
}

// Both files, of the same size, hold the same bytes: compares the union of
// their data regions (on the host file system) and relies on both reading
// zeros elsewhere, which a hole does. Reads only what is stored.
absl::Status CompareSparseFiles(const std::string& a, const std::string& b) {
  absl::StatusOr<ScopedFd> fa = OpenReadOnly(a);
  if (!fa.ok()) return fa.status();
  absl::StatusOr<ScopedFd> fb = OpenReadOnly(b);
  if (!fb.ok()) return fb.status();
  absl::StatusOr<uint64_t> size_a = FileSize(fa->get());
  absl::StatusOr<uint64_t> size_b = FileSize(fb->get());
  if (!size_a.ok()) return size_a.status();
  if (!size_b.ok()) return size_b.status();
  if (*size_a != *size_b) {
    return absl::FailedPreconditionError(
        absl::StrCat(a, " has ", *size_a, " bytes, ", b, " ", *size_b));
  }
  absl::StatusOr<std::vector<ByteRange>> ra = DataRegions(fa->get());
  if (!ra.ok()) return ra.status();
  absl::StatusOr<std::vector<ByteRange>> rb = DataRegions(fb->get());
  if (!rb.ok()) return rb.status();
  std::vector<ByteRange> all = *ra;
  all.insert(all.end(), rb->begin(), rb->end());
  constexpr size_t kChunk = 1 << 20;
  std::vector<uint8_t> x(kChunk), y(kChunk);
  for (const ByteRange& r : Merge(all)) {
    for (uint64_t at = r.offset; at < r.end(); at += kChunk) {
      const size_t n = std::min<uint64_t>(kChunk, r.end() - at);
      if (pread(fa->get(), x.data(), n, at) != static_cast<ssize_t>(n) ||
          pread(fb->get(), y.data(), n, at) != static_cast<ssize_t>(n)) {
        return absl::InternalError(absl::StrCat("short read at ", at));
      }
      if (memcmp(x.data(), y.data(), n) != 0) {
        size_t i = 0;
        while (x[i] == y[i]) ++i;
        return absl::FailedPreconditionError(absl::StrFormat(
            "%s and %s differ at offset %d (0x%x): 0x%02x vs 0x%02x", a, b,
            at + i, at + i, x[i], y[i]));
      }
    }
  }
  return absl::OkStatus();
}

TEST(SeekLargeTest, SparseCopyOfLargeImageIsIdenticalAndSparse) {
  std::mt19937_64 rng(TestSeed() ^ 0xc0c0c0c0ull);
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("seek-cp-64g"));
  const std::string image = dir.Join("disk.qcow2");
  constexpr uint64_t kSize = 64 * kGiB;
  constexpr uint64_t kChunk = 4 * kMiB;
  constexpr int kChunks = 50;
  ASSERT_OK(CreateImage(image, "qcow2", kSize));
  // 50 chunks of 4 MiB, one in each 1/50 of the disk at a seeded,
  // 64 KiB-aligned offset inside it, half of them also off by 512 bytes
  // (so they start and end mid-cluster).
  std::vector<std::string> writes;
  const uint64_t slot = kSize / kChunks / (64 * kKiB) * (64 * kKiB);
  for (int i = 0; i < kChunks; ++i) {
    uint64_t offset =
        i * slot + std::uniform_int_distribution<uint64_t>(
                       0, (slot - 2 * kChunk) / (64 * kKiB))(rng) *
                       64 * kKiB;
    if (i % 2 == 1) offset += 512;
    writes.push_back(W(0x10 + i, offset, kChunk));
  }
  ASSERT_OK(QemuIo(image, "qcow2", writes));

  const std::string reference = dir.Join("reference.raw");
  auto started = std::chrono::steady_clock::now();
  ASSERT_OK(ConvertToRaw(image, reference));
  const double convert_seconds = SecondsSince(started);

  const std::string copy = dir.Join("copy.raw");
  double cp_seconds = 0;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                       MountReadOnly(image, dir.Join("view.raw")));
  {
    started = std::chrono::steady_clock::now();
    ASSERT_OK(RunChecked({"cp", "--sparse=always", view->path(), copy}));
    cp_seconds = SecondsSince(started);
  }
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();

  EXPECT_OK(CompareSparseFiles(copy, reference));
  struct stat st;
  ASSERT_EQ(stat(copy.c_str(), &st), 0);
  const uint64_t used = static_cast<uint64_t>(st.st_blocks) * 512;
  const uint64_t written = kChunks * kChunk;
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kSize);
  EXPECT_GE(used, written) << "the copy lost data";
  EXPECT_LE(used, written + written / 4)
      << "the copy is not sparse: " << used << " bytes on disk for "
      << written << " bytes of data";
  std::cout << absl::StrFormat(
      "64 GiB image, %d MiB of data: cp --sparse=always of the view %.2f s, "
      "qemu-img convert -O raw %.2f s; the copy uses %d MiB\n",
      written / kMiB, cp_seconds, convert_seconds, used / kMiB);
}

}  // namespace
}  // namespace qcow2fuse::test
