// Interoperability matrix: images made by qemu-img/qemu-io in many shapes,
// each mounted with qcow2fuse and checked against what qemu itself reads.
// A recipe is a name plus a function that builds the image (see
// AllRecipes() for the list); a new image shape is one more entry there.
//
// For every recipe:
//   (a) the view's bytes equal `qemu-img convert -O raw` of the image
//       (first mismatch reported), and so do the sha256sum digests;
//   (b) every SEEK_HOLE region of the view reads as zeros;
//   (c) every range `qemu-img map` reports as data that does not read as
//       zeros ("data": true, "zero": false) lies inside a SEEK_DATA
//       region; ranges that are data but zero (preallocation=metadata,
//       say) may be reported either way, as lseek allows; and st_blocks
//       is not 0 when there is such data;
//   (d) `cp --sparse=always` of the view equals the reference;
//   (e) after `fusermount3 -u` the daemon exits with status 0.
//
// Offsets and patterns are random but seeded; the seed is printed and
// QCOW2FUSE_TEST_SEED=N replays it.

#include <sys/stat.h>

#include <algorithm>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "integration/image_builder.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr char kDisk[] = "disk.qcow2";

// --- qemu-io command spelling, so recipes read as what they do. ---

std::string Write(int pattern, uint64_t offset, uint64_t length) {
  return absl::StrFormat("write -P 0x%02x %d %d", pattern, offset, length);
}

std::string CompressedWrite(int pattern, uint64_t offset, uint64_t length) {
  return absl::StrFormat("write -c -P 0x%02x %d %d", pattern, offset, length);
}

// `write -z`, and with `unmap` `write -z -u` (qemu may then deallocate).
std::string Zero(uint64_t offset, uint64_t length, bool unmap = false) {
  return absl::StrFormat("write -z%s %d %d", unmap ? " -u" : "", offset,
                         length);
}

std::string Discard(uint64_t offset, uint64_t length) {
  return absl::StrFormat("discard %d %d", offset, length);
}

std::string ClusterSize(uint64_t bytes) {
  return absl::StrCat("cluster_size=", bytes);
}

std::string Backing(absl::string_view file, absl::string_view format) {
  return absl::StrCat("backing_file=", file, ",backing_fmt=", format);
}

// Random scattered writes sized for the cluster size: several clusters at
// most, so neighbouring clusters get distinct data.
std::vector<std::string> Scatter(ImageBuilder& b, int count, uint64_t size,
                                 uint64_t cluster) {
  return b.ScatteredWrites(count, size,
                           std::min(size / 8, 3 * cluster + 100000));
}

// --- Recipes. Each builds its image in the builder's directory and
// returns the file name of the image to mount. ---

// Plain image; `size` is deliberately not a multiple of the cluster size
// where possible, so the last cluster is partial.
std::string PlainImage(ImageBuilder& b, uint64_t cluster, uint64_t size) {
  b.Create(kDisk, size, {ClusterSize(cluster)});
  b.Io(kDisk, Scatter(b, 40, size, cluster));
  b.Io(kDisk, {
      // Straddling cluster boundaries by a few bytes.
      Write(0x5a, 5 * cluster - 3, 7),
      Write(0x5b, 9 * cluster - 1, cluster + 2),
      // The very end of the disk.
      Write(0x5c, size - 1000, 1000),
  });
  return kDisk;
}

std::string CompatImage(ImageBuilder& b, absl::string_view compat) {
  const uint64_t size = 16 * kMiB;
  b.Create(kDisk, size, {absl::StrCat("compat=", compat)});
  b.Io(kDisk, Scatter(b, 30, size, 64 * kKiB));
  b.Io(kDisk, {
      Write(0x21, 1 * kMiB, 256 * kKiB),
      Zero(1 * kMiB + 64 * kKiB, 64 * kKiB),
      Zero(1 * kMiB + 128 * kKiB + 100, 5000, /*unmap=*/true),
      Discard(1 * kMiB + 192 * kKiB, 64 * kKiB),
      Zero(4 * kMiB, 128 * kKiB, /*unmap=*/true),  // Never allocated.
  });
  return kDisk;
}

// Extended L2 entries: 32 subclusters per cluster, each allocated or
// zeroed on its own. With `backing`, unallocated subclusters must show
// the backing file's (random) data, which makes a wrong bitmap visible.
std::string ExtendedL2Image(ImageBuilder& b, uint64_t cluster, uint64_t size,
                            bool backing) {
  const uint64_t sub = cluster / 32;
  std::vector<std::string> options = {"extended_l2=on", ClusterSize(cluster)};
  if (backing) {
    b.Create("base.qcow2", size);
    b.Io("base.qcow2", {b.RandomWrite(0, size)});
    options.push_back(Backing("base.qcow2", "qcow2"));
  }
  b.Create(kDisk, size, options);
  auto c = [cluster](int index) { return index * cluster; };
  b.Io(kDisk, {
      // Small writes inside one subcluster.
      Write(0x31, c(1) + 3 * sub + sub / 4, std::min<uint64_t>(kKiB, sub / 2)),
      Write(0x32, c(1) + 10 * sub + 1, std::min<uint64_t>(kKiB, sub / 2)),
      // Writes straddling subcluster boundaries.
      Write(0x33, c(2) + 7 * sub - sub / 3, sub),
      Write(0x34, c(2) + 20 * sub + 11, 3 * sub),
      // A whole cluster, then subcluster-sized holes punched into it.
      b.RandomWrite(c(3), cluster),
      Zero(c(3) + 4 * sub, sub),
      Zero(c(3) + 9 * sub + 100, sub),
      Zero(c(3) + 12 * sub, 2 * sub, /*unmap=*/true),
      Discard(c(3) + 16 * sub, 4 * sub),
      // Zeroed subclusters in a cluster that was never allocated.
      Zero(c(4) + 2 * sub, sub),
      Zero(c(4) + 5 * sub, sub, /*unmap=*/true),
      // A whole cluster written, then discarded.
      Write(0x35, c(5), cluster),
      Discard(c(5), cluster),
      // A partial subcluster, then its subcluster discarded.
      Write(0x36, c(6) + sub + 10, 100),
      Discard(c(6) + sub, sub),
      // From the last subcluster of one cluster into the next cluster.
      Write(0x37, c(7) + 31 * sub + sub / 2, sub),
  });
  b.Io(kDisk, Scatter(b, 20, size, cluster));
  return kDisk;
}

std::string RefcountImage(ImageBuilder& b, int bits) {
  const uint64_t size = 16 * kMiB;
  b.Create(kDisk, size, {absl::StrCat("refcount_bits=", bits)});
  b.Io(kDisk, Scatter(b, 30, size, 64 * kKiB));
  b.Io(kDisk, {Discard(2 * kMiB, 256 * kKiB), Zero(6 * kMiB, 64 * kKiB)});
  return kDisk;
}

// Fills a raw file with a mix of contents, block by block: random
// (incompressible), text (compressible), zeros, byte runs, and partly
// random blocks, at lengths that do not line up with the block.
void MixedRawFile(ImageBuilder& b, absl::string_view name, uint64_t size) {
  constexpr uint64_t kBlock = 64 * kKiB;
  b.Create(name, size, {}, "raw");
  for (uint64_t offset = 0; offset < size; offset += kBlock) {
    const uint64_t length = std::min(kBlock, size - offset);
    switch (b.Uniform(0, 4)) {
      case 0:
        b.WriteRaw(name, offset, b.RandomBytes(length));
        break;
      case 1: {
        std::string text;
        while (text.size() < length) {
          absl::StrAppend(&text, "block ", offset, " line ", b.Uniform(0, 99),
                          " of qcow2fuse interop data\n");
        }
        b.WriteRaw(name, offset, text.substr(0, length));
        break;
      }
      case 2:
        break;  // All zeros.
      case 3:
        b.WriteRaw(name, offset,
                   std::string(length, static_cast<char>(b.Uniform(1, 255))));
        break;
      default:
        b.WriteRaw(name, offset + b.Uniform(0, length / 2),
                   b.RandomBytes(b.Uniform(1, length / 2)));
        break;
    }
  }
}

std::string CompressedConvertImage(ImageBuilder& b,
                                   std::vector<std::string> qcow2_options) {
  // Not a multiple of any cluster size: the last cluster is compressed
  // while partial.
  const uint64_t size = 24 * kMiB + 1536;
  MixedRawFile(b, "mixed.raw", size);
  std::vector<std::string> extra = {"-c"};
  if (!qcow2_options.empty()) {
    extra.push_back("-o");
    extra.push_back(absl::StrJoin(qcow2_options, ","));
  }
  b.Convert("mixed.raw", "raw", kDisk, "qcow2", extra);
  return kDisk;
}

// Compressed clusters written one by one by qemu-io, then partly
// overwritten (copy-on-write through decompression), zeroed, discarded.
std::string CompressedWriteImage(ImageBuilder& b, absl::string_view type) {
  const uint64_t size = 16 * kMiB, cluster = 64 * kKiB;
  b.Create(kDisk, size, {absl::StrCat("compression_type=", type)});
  // qcow2 cannot write a compressed cluster over an allocated one, so
  // each write gets its own slot of three clusters.
  std::vector<std::string> writes;
  for (int i = 0; i < 48; ++i) {
    const uint64_t offset = (3 * i + b.Uniform(0, 1)) * cluster;
    const uint64_t length = b.Uniform(1, 2) * cluster;
    if (i % 3 == 0) {
      // Random data does not compress; qemu stores it uncompressed.
      writes.push_back(b.RandomWrite(offset, length, /*compressed=*/true));
    } else {
      writes.push_back(CompressedWrite(static_cast<int>(b.Uniform(1, 255)),
                                       offset, length));
    }
  }
  b.Io(kDisk, writes);
  b.Io(kDisk, {
      Write(0x41, 3 * cluster + 1000, 3000),
      Write(0x42, 10 * cluster - 500, 1000),
      Zero(15 * cluster, cluster),
      Discard(21 * cluster, cluster),
  });
  return kDisk;
}

// raw base <- qcow2 mid <- qcow2 top, each shorter than the next, with
// lengths chosen so that a cluster of each overlay straddles the end of
// its backing file.
std::string BackingChainImage(ImageBuilder& b) {
  const uint64_t base_size = 8 * kMiB - 1536;
  const uint64_t mid_size = 12 * kMiB - 12 * kKiB;
  const uint64_t top_size = 32 * kMiB;
  b.Create("base.raw", base_size, {}, "raw");
  b.Io("base.raw", {b.RandomWrite(0, 1 * kMiB)}, "raw");
  b.Io("base.raw", Scatter(b, 20, base_size, 64 * kKiB), "raw");
  b.Io("base.raw", {Write(0x51, base_size - 5000, 5000)}, "raw");

  b.Create("mid.qcow2", mid_size,
           {ClusterSize(4 * kKiB), Backing("base.raw", "raw")});
  b.Io("mid.qcow2", Scatter(b, 20, mid_size, 4 * kKiB));
  b.Io("mid.qcow2", {
      Write(0x52, base_size - 100, 3000),  // Across the base's end.
      Write(0x53, mid_size - 2000, 2000),
      Zero(100 * kKiB, 20 * kKiB),
      Discard(300 * kKiB, 16 * kKiB),
  });

  b.Create("top.qcow2", top_size, {Backing("mid.qcow2", "qcow2")});
  b.Io("top.qcow2", Scatter(b, 30, top_size, 64 * kKiB));
  b.Io("top.qcow2", {
      Write(0x54, mid_size - 700, 300),  // Partial cluster across mid's end.
      Zero(192 * kKiB, 64 * kKiB),       // Zeros over backing data.
      Zero(512 * kKiB + 1000, 3000),
      Zero(640 * kKiB, 128 * kKiB, /*unmap=*/true),
      Discard(768 * kKiB, 128 * kKiB),
      Discard(base_size - 64 * kKiB, 128 * kKiB),
      Write(0x55, 20 * kMiB, 5000),
  });
  return "top.qcow2";
}

// The zero and discard operations of every flavour over data, over
// nothing, aligned and not; with `backing`, also over backing data.
std::string ZeroDiscardImage(ImageBuilder& b, bool backing,
                             absl::string_view compat) {
  const uint64_t size = 16 * kMiB, cluster = 64 * kKiB;
  std::vector<std::string> options = {absl::StrCat("compat=", compat)};
  if (backing) {
    b.Create("base.qcow2", size);
    b.Io("base.qcow2", {b.RandomWrite(0, size)});
    options.push_back(Backing("base.qcow2", "qcow2"));
  }
  b.Create(kDisk, size, options);
  b.Io(kDisk, {b.RandomWrite(0, 2 * kMiB), Write(0x61, 6 * kMiB, kMiB)});
  b.Io(kDisk, {
      Zero(0, cluster),
      Zero(2 * cluster, cluster, /*unmap=*/true),
      Zero(4 * cluster + 512, 3 * 512),
      Zero(6 * cluster - 100, 200, /*unmap=*/true),
      Discard(8 * cluster, 2 * cluster),
      Discard(11 * cluster + 4096, 8192),
      Zero(3 * kMiB, 2 * cluster),                  // Over backing/nothing.
      Zero(3 * kMiB + 4 * cluster, cluster, true),  // Over backing/nothing.
      Discard(4 * kMiB, 4 * cluster),
      Discard(6 * kMiB + 3 * cluster, cluster),
  });
  return kDisk;
}

std::string PreallocImage(ImageBuilder& b, absl::string_view mode) {
  const uint64_t size = 16 * kMiB;
  b.Create(kDisk, size, {absl::StrCat("preallocation=", mode)});
  b.Io(kDisk, Scatter(b, 30, size, 64 * kKiB));
  return kDisk;
}

std::string InternalSnapshotImage(ImageBuilder& b) {
  const uint64_t size = 16 * kMiB;
  b.Create(kDisk, size);
  b.Io(kDisk, Scatter(b, 25, size, 64 * kKiB));
  b.QemuImg({"snapshot", "-c", "snap1", b.Path(kDisk)});
  // Writes after the snapshot copy shared clusters (refcount > 1).
  b.Io(kDisk, Scatter(b, 25, size, 64 * kKiB));
  b.Io(kDisk, {Zero(kMiB, 128 * kKiB), Discard(3 * kMiB, 256 * kKiB)});
  b.QemuImg({"snapshot", "-c", "snap2", b.Path(kDisk)});
  b.Io(kDisk, Scatter(b, 10, size, 64 * kKiB));
  return kDisk;
}

std::string DirtyBitmapImage(ImageBuilder& b) {
  const uint64_t size = 16 * kMiB;
  b.Create(kDisk, size);
  b.QemuImg({"bitmap", "--add", b.Path(kDisk), "bm0"});
  b.QemuImg({"bitmap", "--add", "--disable", "-g", "16384", b.Path(kDisk),
             "bm1"});
  b.Io(kDisk, Scatter(b, 30, size, 64 * kKiB));
  return kDisk;
}

// qemu resolves a relative data_file name against its working directory,
// not the image's, so the recipe names the data file by absolute path.
std::string DataFileImage(ImageBuilder& b, bool raw) {
  const uint64_t size = 16 * kMiB;
  std::vector<std::string> options = {
      "compat=1.1", absl::StrCat("data_file=", b.Path("disk.data"))};
  if (raw) options.push_back("data_file_raw=on");
  b.Create(kDisk, size, options);
  b.Io(kDisk, Scatter(b, 30, size, 64 * kKiB));
  b.Io(kDisk, {Zero(2 * kMiB, 256 * kKiB), Discard(5 * kMiB, 256 * kKiB)});
  return kDisk;
}

std::string LazyRefcountsDirtyImage(ImageBuilder& b) {
  const uint64_t size = 16 * kMiB;
  b.Create(kDisk, size, {"compat=1.1", "lazy_refcounts=on"});
  b.Io(kDisk, Scatter(b, 30, size, 64 * kKiB));
  b.Io(kDisk, {Discard(kMiB, 128 * kKiB)});
  b.SetDirtyBit(kDisk);
  b.Check(kDisk, /*allow_leaks=*/true);
  return kDisk;
}

// Snapshots taken, then the first one applied: the active L1 table is the
// snapshot's again and clusters are shared with refcount > 1.
std::string AppliedSnapshotImage(ImageBuilder& b) {
  const uint64_t size = 16 * kMiB;
  b.Create(kDisk, size);
  b.Io(kDisk, Scatter(b, 25, size, 64 * kKiB));
  b.QemuImg({"snapshot", "-c", "snap1", b.Path(kDisk)});
  b.Io(kDisk, Scatter(b, 25, size, 64 * kKiB));
  b.QemuImg({"snapshot", "-c", "snap2", b.Path(kDisk)});
  b.QemuImg({"snapshot", "-a", "snap1", b.Path(kDisk)});
  b.Io(kDisk, Scatter(b, 10, size, 64 * kKiB));
  return kDisk;
}

// Grown after data was written: the L1 table is reallocated and the
// virtual size no longer matches what the image was created with.
std::string ResizedImage(ImageBuilder& b) {
  const uint64_t small = 8 * kMiB, large = 40 * kMiB + 512;
  b.Create(kDisk, small, {ClusterSize(4 * kKiB)});
  b.Io(kDisk, Scatter(b, 20, small, 4 * kKiB));
  b.QemuImg({"resize", "-q", b.Path(kDisk), absl::StrCat(large)});
  b.Io(kDisk, Scatter(b, 20, large, 4 * kKiB));
  b.Io(kDisk, {Write(0x71, small - 100, 200), Write(0x72, large - 512, 512)});
  return kDisk;
}

// Refcount width changed in place by qemu-img amend (refcount tables
// rewritten), to a width no recipe creates directly.
std::string AmendedRefcountImage(ImageBuilder& b) {
  const uint64_t size = 16 * kMiB;
  b.Create(kDisk, size);
  b.Io(kDisk, Scatter(b, 30, size, 64 * kKiB));
  b.QemuImg({"amend", "-o", "refcount_bits=4", b.Path(kDisk)});
  b.Io(kDisk, Scatter(b, 10, size, 64 * kKiB));
  return kDisk;
}

// A compressed qcow2 backing file under an extended-L2 overlay with a
// different cluster size: partial subclusters read through to compressed
// clusters below.
std::string CompressedBackingImage(ImageBuilder& b) {
  const uint64_t size = 16 * kMiB, cluster = 32 * kKiB, sub = cluster / 32;
  MixedRawFile(b, "mixed.raw", size);
  b.Convert("mixed.raw", "raw", "base.qcow2", "qcow2",
            {"-c", "-o", "compression_type=zstd"});
  b.Create(kDisk, size, {"extended_l2=on", ClusterSize(cluster),
                         Backing("base.qcow2", "qcow2")});
  b.Io(kDisk, {
      Write(0x81, 3 * cluster + 5 * sub + 7, sub),
      Zero(4 * cluster + 2 * sub, sub),
      Write(0x82, 9 * cluster - 100, 200),
      Discard(12 * cluster, cluster),
  });
  b.Io(kDisk, Scatter(b, 20, size, cluster));
  return kDisk;
}

struct Recipe {
  std::string name;
  std::function<std::string(ImageBuilder&)> build;
  // Added to -o ro when mounting, e.g. {"l2_cache_size=4K"}.
  std::vector<std::string> mount_options = {};
};

// gtest prints parameters in its output; the name is what identifies one.
void PrintTo(const Recipe& recipe, std::ostream* out) { *out << recipe.name; }

std::vector<Recipe> AllRecipes() {
  using B = ImageBuilder&;
  return {
      {"cluster_512", [](B b) { return PlainImage(b, 512, 8 * kMiB); }},
      // A cache far smaller than the image's L2 tables forces evictions.
      {"cluster_512_tiny_l2_cache",
       [](B b) { return PlainImage(b, 512, 8 * kMiB); },
       {"l2_cache_size=1K"}},
      {"cluster_64k_tiny_l2_cache",
       [](B b) { return PlainImage(b, 64 * kKiB, 32 * kMiB + 2560); },
       {"l2_cache_size=64K"}},
      {"cluster_4k",
       [](B b) { return PlainImage(b, 4 * kKiB, 16 * kMiB + 512); }},
      {"cluster_64k",
       [](B b) { return PlainImage(b, 64 * kKiB, 32 * kMiB + 2560); }},
      {"cluster_2m",
       [](B b) { return PlainImage(b, 2 * kMiB, 64 * kMiB - 4096); }},
      {"compat_0_10", [](B b) { return CompatImage(b, "0.10"); }},
      {"compat_1_1", [](B b) { return CompatImage(b, "1.1"); }},
      {"extended_l2_16k",
       [](B b) { return ExtendedL2Image(b, 16 * kKiB, 16 * kMiB, false); }},
      {"extended_l2_64k",
       [](B b) { return ExtendedL2Image(b, 64 * kKiB, 32 * kMiB, false); }},
      {"extended_l2_2m",
       [](B b) { return ExtendedL2Image(b, 2 * kMiB, 64 * kMiB, false); }},
      {"extended_l2_64k_over_backing",
       [](B b) { return ExtendedL2Image(b, 64 * kKiB, 16 * kMiB, true); }},
      {"refcount_bits_1", [](B b) { return RefcountImage(b, 1); }},
      {"refcount_bits_8", [](B b) { return RefcountImage(b, 8); }},
      {"refcount_bits_16", [](B b) { return RefcountImage(b, 16); }},
      {"refcount_bits_64", [](B b) { return RefcountImage(b, 64); }},
      {"zlib_convert", [](B b) { return CompressedConvertImage(b, {}); }},
      {"zlib_convert_512",
       [](B b) { return CompressedConvertImage(b, {ClusterSize(512)}); }},
      {"zlib_convert_4k",
       [](B b) { return CompressedConvertImage(b, {ClusterSize(4096)}); }},
      {"zstd_convert",
       [](B b) {
         return CompressedConvertImage(b, {"compression_type=zstd"});
       }},
      {"zstd_convert_2m",
       [](B b) {
         return CompressedConvertImage(
             b, {"compression_type=zstd", ClusterSize(2 * kMiB)});
       }},
      {"zlib_write_c", [](B b) { return CompressedWriteImage(b, "zlib"); }},
      {"zstd_write_c", [](B b) { return CompressedWriteImage(b, "zstd"); }},
      {"backing_chain_3_deep", [](B b) { return BackingChainImage(b); }},
      {"zero_discard_standalone",
       [](B b) { return ZeroDiscardImage(b, false, "1.1"); }},
      {"zero_discard_over_backing",
       [](B b) { return ZeroDiscardImage(b, true, "1.1"); }},
      {"zero_discard_over_backing_v2",
       [](B b) { return ZeroDiscardImage(b, true, "0.10"); }},
      {"preallocation_metadata",
       [](B b) { return PreallocImage(b, "metadata"); }},
      {"preallocation_falloc",
       [](B b) { return PreallocImage(b, "falloc"); }},
      {"preallocation_full", [](B b) { return PreallocImage(b, "full"); }},
      {"internal_snapshot", [](B b) { return InternalSnapshotImage(b); }},
      {"internal_snapshot_applied",
       [](B b) { return AppliedSnapshotImage(b); }},
      {"resized_larger", [](B b) { return ResizedImage(b); }},
      {"amended_refcount_bits_4",
       [](B b) { return AmendedRefcountImage(b); }},
      {"compressed_backing_extended_l2_top",
       [](B b) { return CompressedBackingImage(b); }},
      {"persistent_dirty_bitmap", [](B b) { return DirtyBitmapImage(b); }},
      {"external_data_file", [](B b) { return DataFileImage(b, false); }},
      {"external_data_file_raw", [](B b) { return DataFileImage(b, true); }},
      {"lazy_refcounts_dirty",
       [](B b) { return LazyRefcountsDirtyImage(b); }},
  };
}

// Contiguous regions merged: SEEK_HOLE may stop at a boundary where the
// next region is data again, while qemu-img map merges runs freely.
std::vector<ByteRange> Coalesce(const std::vector<ByteRange>& regions) {
  std::vector<ByteRange> merged;
  for (const ByteRange& region : regions) {
    if (!merged.empty() && merged.back().end() == region.offset) {
      merged.back().length += region.length;
    } else {
      merged.push_back(region);
    }
  }
  return merged;
}

class InteropMatrixTest : public ::testing::TestWithParam<Recipe> {
 protected:
  void SetUp() override {
    const uint64_t seed = TestSeed();
    ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create(GetParam().name));
    dir_ = std::make_unique<TempDir>(std::move(dir));
    builder_ = std::make_unique<ImageBuilder>(dir_->path(), seed);
  }

  std::unique_ptr<TempDir> dir_;
  std::unique_ptr<ImageBuilder> builder_;
};

// (a): bytes and digests equal the reference.
void CheckContents(const std::string& view, const std::string& reference) {
  SCOPED_TRACE("(a) view contents vs qemu-img convert -O raw");
  EXPECT_OK(CompareFiles(view, reference));
  absl::StatusOr<std::string> view_sum = Sha256File(view);
  absl::StatusOr<std::string> reference_sum = Sha256File(reference);
  ASSERT_OK(view_sum);
  ASSERT_OK(reference_sum);
  EXPECT_EQ(*view_sum, *reference_sum);
}

// (b) and (c), from one SEEK_DATA/SEEK_HOLE walk of the view.
void CheckSeekRegions(const std::string& view,
                      const std::vector<MapExtent>& map) {
  ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(view));
  ASSERT_OK_AND_ASSIGN(uint64_t size, FileSize(fd.get()));
  ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> data, DataRegions(fd.get()));
  {
    SCOPED_TRACE("(b) SEEK_HOLE regions read as zeros");
    for (const ByteRange& hole : Complement(data, size)) {
      EXPECT_OK(CheckZeros(fd.get(), hole));
    }
  }
  SCOPED_TRACE("(c) qemu-img map data lies inside SEEK_DATA regions");
  const std::vector<ByteRange> merged = Coalesce(data);
  uint64_t mapped_data = 0;
  for (const MapExtent& extent : map) {
    if (!extent.data || extent.zero) continue;
    mapped_data += extent.length;
    const ByteRange want{extent.start, extent.length};
    const bool covered =
        std::any_of(merged.begin(), merged.end(),
                    [&](const ByteRange& r) { return r.Contains(want); });
    EXPECT_TRUE(covered) << "qemu-img map data range " << want
                         << " (depth " << extent.depth
                         << ") is not inside one SEEK_DATA region; "
                         << merged.size() << " data regions";
  }
  // st_blocks counts guest-visible allocated data: never zero when there
  // is some.
  struct stat st;
  ASSERT_EQ(fstat(fd.get(), &st), 0);
  if (mapped_data > 0) {
    EXPECT_GT(st.st_blocks, 0) << "st_blocks is 0 with " << mapped_data
                               << " bytes of mapped data";
  }
}

// (d): a sparse copy reproduces the reference.
void CheckSparseCopy(const std::string& view, const std::string& reference,
                     const std::string& copy) {
  SCOPED_TRACE("(d) cp --sparse=always of the view");
  ASSERT_OK(RunChecked({"cp", "--sparse=always", view, copy}));
  EXPECT_OK(CompareFiles(copy, reference));
}

TEST_P(InteropMatrixTest, ViewMatchesQemu) {
  const std::string name = GetParam().build(*builder_);
  ASSERT_OK(builder_->status());
  const std::string image = builder_->Path(name);
  const std::string reference = dir_->Join("reference.raw");
  ASSERT_OK(ConvertToRaw(image, reference));
  ASSERT_OK_AND_ASSIGN(std::vector<MapExtent> map, MapImage(image));

  MountOptions options;
  options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  options.image = image;
  options.mountpoint = dir_->Join("view.raw");
  options.extra_options = GetParam().mount_options;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                       MountedView::Start(options));

  CheckContents(view->path(), reference);
  CheckSeekRegions(view->path(), map);
  CheckSparseCopy(view->path(), reference, dir_->Join("copy.raw"));

  SCOPED_TRACE("(e) clean exit after fusermount3 -u");
  ASSERT_OK(view->Unmount());
  ASSERT_TRUE(view->exit_status().has_value());
  EXPECT_TRUE(view->exit_status()->success())
      << view->exit_status()->ToString();
}

INSTANTIATE_TEST_SUITE_P(
    Recipes, InteropMatrixTest, ::testing::ValuesIn(AllRecipes()),
    [](const ::testing::TestParamInfo<Recipe>& info) {
      return info.param.name;
    });

}  // namespace
}  // namespace qcow2fuse::test
