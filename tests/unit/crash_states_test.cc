// Crash states of the parts of the write path beyond plain writes: discard,
// write-zeroes, preallocation, growing the disk over a longer backing file,
// refcount table growth during a discard, and the rebuild of a dirty
// image's refcounts at open.
//
// Each test makes an image with qemu-img and qemu-io, runs requests and
// flushes on it through the engine (CrashRun, crash_harness.h), and judges
// the file at every barrier of the run and a sample of the states a power
// cut could have left between barriers (CrashStates: prefixes and random
// subsets of each segment): `qemu-img check` finds no corruption (leaks
// allowed) and the disk reads as the requests explain, as the flush
// protocol promises: what a completed Flush covered is there, anything else
// is old or new per request. Where a test claims a path (a zero flag, a new refcount table, a
// rebuilt table), the final image is decoded to show the path was taken;
// the final image must also check clean without leaks. With persistent
// dirty bitmaps, every state must also leave each bitmap either marked in
// use or consistent: holding every granule of every request that may have
// reached the disk.
//
// Many states cost one `qemu-img check` and one `qemu-img convert` each, so
// the enumeration is bounded per test (prefixes and random subsets per
// segment), and the ThreadSanitizer run (QCOW2FUSE_TEST_OPS) takes one of
// each. The random subsets are seeded by TestSeed().

#include <algorithm>
#include <cstdint>
#include <iostream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "bitmap_reader.h"
#include "crash_harness.h"
#include "data/qcow2_layer.h"
#include "data/raw_layer.h"
#include "format/header.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "io/recording_file.h"
#include "qcow2_builder.h"  // Bytes, Pattern, GetBE, kOflag*, kIncompat*
#include "qcow2fuse/task.h"
#include "support/command.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kHostMask = 0x00fffffffffffe00ull;

// --- Images -------------------------------------------------------------------------------

// `qemu-io -t unsafe`: QemuIo() with no flush reaching the disk. QEMU
// flushes between its refcount and L2 updates, and with 512-byte clusters
// that makes writing 2 MiB take seconds; the files are read back whole, so
// their durability does not matter.
absl::Status QemuIoUnsafe(const std::string& path, const std::string& format,
                          const std::vector<std::string>& commands) {
  std::vector<std::string> argv = {"qemu-io", "-t", "unsafe", "-f", format};
  for (const std::string& c : commands) {
    argv.push_back("-c");
    argv.push_back(c);
  }
  argv.push_back(path);
  absl::StatusOr<CommandResult> r = RunCommand(argv);
  if (!r.ok()) return r.status();
  if (!r->ok()) return absl::InternalError(absl::StrCat("qemu-io ", path, ": ", r->stderr_text));
  return absl::OkStatus();
}

// A raw backing file of `size` bytes that qemu-io wrote `commands` to.
absl::StatusOr<std::string> MakeRawBacking(const TempDir& dir, uint64_t size,
                                           const std::vector<std::string>& commands) {
  const std::string path = dir.Join("backing.raw");
  absl::Status s = CreateImage(path, "raw", size);
  if (s.ok() && !commands.empty()) s = QemuIoUnsafe(path, "raw", commands);
  if (!s.ok()) return s;
  return path;
}

// A qcow2 image made by qemu-img and qemu-io: its bytes and what its disk
// reads (qemu-img convert).
struct Made {
  std::string path;
  std::string backing;  // a raw backing file, or empty
  Bytes image;
  Bytes guest;
};

// Fills in the bytes and the guest disk of `m` from its file.
absl::StatusOr<Made> Load(const TempDir& dir, Made m) {
  const std::string raw = dir.Join("disk.raw");
  absl::Status s = ConvertToRaw(m.path, raw);
  if (!s.ok()) return s;
  absl::StatusOr<Bytes> image = ReadBytes(m.path);
  if (!image.ok()) return image.status();
  absl::StatusOr<Bytes> guest = ReadBytes(raw);
  if (!guest.ok()) return guest.status();
  m.image = *std::move(image);
  m.guest = *std::move(guest);
  return m;
}

absl::StatusOr<Made> MakeImage(const TempDir& dir, uint64_t size, std::vector<std::string> options,
                               const std::vector<std::string>& commands, const std::string& backing = "") {
  Made m{dir.Join("disk.qcow2"), backing, {}, {}};
  if (!backing.empty()) {
    options.push_back("backing_file=" + backing);
    options.push_back("backing_fmt=raw");
  }
  absl::Status s = CreateImage(m.path, "qcow2", size, options);
  if (s.ok() && !commands.empty()) s = QemuIoUnsafe(m.path, "qcow2", commands);
  if (!s.ok()) return s;
  return Load(dir, std::move(m));
}

// The disk of internal snapshot `name` of the image at `path`.
absl::StatusOr<Bytes> SnapshotDisk(const TempDir& dir, const std::string& path, const std::string& name) {
  const std::string raw = dir.Join("snapshot.raw");
  absl::StatusOr<std::string> out =
      QemuImg({"convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=" + name, path, raw});
  if (!out.ok()) return out.status();
  return ReadBytes(raw);
}

absl::StatusOr<std::unique_ptr<CrashRun>> StartRun(const Made& m,
                                                  const ImageOptions& options = CrashRun::Options()) {
  std::unique_ptr<Layer> backing;
  if (!m.backing.empty()) {
    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(m.backing, false);
    if (!file.ok()) return file.status();
    backing = NewRawLayer(std::move(*file));
  }
  return CrashRun::Start(m.image, std::move(backing), options);
}

// --- Decoding the image bytes -----------------------------------------------------------------

struct Geometry {
  uint32_t cluster_bits;
  bool extended;
  uint64_t size;
  uint32_t l1_size;
  uint64_t l1_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint32_t entry_size() const { return extended ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / entry_size(); }
};

Geometry Geom(const Bytes& b) {
  return {static_cast<uint32_t>(GetBE(b, 20, 4)), (GetBE(b, 72, 8) & kIncompatExtendedL2) != 0, GetBE(b, 24, 8),
          static_cast<uint32_t>(GetBE(b, 36, 4)),  GetBE(b, 40, 8), GetBE(b, 48, 8),
          static_cast<uint32_t>(GetBE(b, 56, 4))};
}

// The L2 entry (descriptor, bitmap) of the guest cluster holding `guest`;
// all zero where no L2 table maps it.
L2Entry L2At(const Bytes& b, uint64_t guest) {
  const Geometry g = Geom(b);
  const uint64_t index = (guest >> g.cluster_bits) / g.l2_entries();
  if (index >= g.l1_size) return {};
  const uint64_t l2 = GetBE(b, g.l1_offset + index * 8, 8) & kHostMask;
  if (l2 == 0) return {};
  const uint64_t at = l2 + ((guest >> g.cluster_bits) % g.l2_entries()) * g.entry_size();
  return {GetBE(b, at, 8), g.extended ? GetBE(b, at + 8, 8) : 0};
}

bool Dirty(const Bytes& b) { return (GetBE(b, 72, 8) & kIncompatDirty) != 0; }

// --- Verdicts ---------------------------------------------------------------------------------

// What the run left (the whole log applied) checks clean, with no leak
// (every request was flushed, and nothing reads), and reads as every
// request made it; the layer reads the same.
void ExpectFinalClean(const TempDir& dir, CrashRun& run, const Bytes& old_guest) {
  Bytes expected = old_guest;
  uint64_t size = run.initial_size();
  for (const CrashResize& r : run.resizes()) size = r.size;
  expected.resize(size, 0);
  for (const CrashRequest& r : run.requests()) std::copy(r.data.begin(), r.data.end(), expected.begin() + r.offset);

  Bytes read(run.layer().size());
  ASSERT_OK(SyncWait(run.layer().Read(0, read)));
  EXPECT_TRUE(read == expected) << "the layer reads differently from the requests it took";

  const std::string path = dir.Join("final.qcow2");
  const std::string raw = dir.Join("final.raw");
  ASSERT_OK(WriteBytes(path, FinalContents(run)));
  ASSERT_OK_AND_ASSIGN(QemuCheckReport c, QemuCheck(path));
  EXPECT_EQ(c.corruptions, 0u) << c.output;
  EXPECT_EQ(c.check_errors, 0u) << c.output;
  EXPECT_EQ(c.leaks, 0u) << "leaked clusters after the last Flush\n" << c.output;
  ASSERT_OK(ConvertToRaw(path, raw));
  ASSERT_OK_AND_ASSIGN(Bytes disk, ReadBytes(raw));
  EXPECT_EQ(disk.size(), expected.size());
  EXPECT_TRUE(disk == expected) << "qemu reads the final image differently from the requests";
}

// Checks the states of `run`, with discards that punch holes, and unless
// `punching_only`, again (fewer states) with discards that leave the old
// bytes: a file system that cannot punch, where a freed cluster keeps its
// data until it is written again.
void CheckStates(const TempDir& dir, const CrashRun& run, const Bytes& old_guest, uint64_t seed, size_t prefixes,
                 size_t subsets, const std::string& label, bool punching_only = false) {
  CrashChecker checker(dir, run, old_guest);
  checker.CheckAll({.seed = seed,
                    .random_subsets = SampleStates(subsets),
                    .max_prefixes = SampleStates(prefixes),
                    .max_states = 0});
  if (!punching_only) {
    checker.CheckAll({.seed = seed + 1,
                      .random_subsets = SampleStates(subsets / 2),
                      .max_prefixes = SampleStates(prefixes / 2),
                      .max_states = 0,
                      .discard_zeroes = false});
  }
  checker.Report(label);
}

// --- Discard -----------------------------------------------------------------------------------

// Discard (PUNCH_HOLE) without a backing file: whole data clusters become
// unallocated and are freed, part of a cluster is zeroed in place, whole
// compressed clusters are freed and part of one is copied out with zeros,
// a cluster discarded in two halves ends unallocated; then writes reuse the
// freed clusters.
TEST(CrashStatesTest, DiscardOfDataAndCompressedClusters) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-discard"));
  ASSERT_OK_AND_ASSIGN(Made m, MakeImage(dir, 2 * kMiB, {"cluster_size=4096"},
                                         {"write -P 0x11 0 256k", "write -c -P 0x22 256k 64k",
                                          "write -P 0x33 512k 64k"}));
  ASSERT_TRUE(L2At(m.image, 256 * kKiB).descriptor & kOflagCompressed);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->Discard(0, 64 * kKiB));
  ASSERT_OK(run->Discard(100 * kKiB + 100, 3000));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Discard(256 * kKiB, 8 * kKiB));
  ASSERT_OK(run->Discard(264 * kKiB + 512, 1000));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Write(1 * kMiB, Pattern(64 * kKiB, 1)));
  ASSERT_OK(run->Write(16 * kKiB + 1000, Pattern(500, 2)));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Discard(512 * kKiB, 2048));
  ASSERT_OK(run->Discard(512 * kKiB + 2048, 2048));
  ASSERT_OK(run->Discard(520 * kKiB + 1000, 10000));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  EXPECT_EQ(L2At(final_bytes, 0).descriptor, 0u) << "a discarded cluster without backing is unallocated";
  EXPECT_EQ(L2At(final_bytes, 256 * kKiB).descriptor, 0u) << "a discarded compressed cluster";
  EXPECT_EQ(L2At(final_bytes, 512 * kKiB).descriptor & kHostMask, 0u) << "a cluster discarded in two halves";
  const uint64_t cow = L2At(final_bytes, 264 * kKiB).descriptor;
  EXPECT_TRUE((cow & kOflagCopied) && !(cow & kOflagCompressed)) << "part of a compressed cluster discarded";
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStates(dir, *run, m.guest, seed, 4, 4, "discard of data and compressed clusters");
}

// Discard over a backing file: clusters the image holds, compressed ones
// and ones it leaves to the backing file all become zero clusters (the
// backing file must not show through again), parts are copied from the
// backing file with zeros; then writes reuse the freed clusters and go into
// zero clusters.
TEST(CrashStatesTest, DiscardOverABackingFile) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-discard-backing"));
  ASSERT_OK_AND_ASSIGN(std::string backing, MakeRawBacking(dir, 2 * kMiB, {"write -P 0x44 0 2M"}));
  ASSERT_OK_AND_ASSIGN(Made m, MakeImage(dir, 2 * kMiB, {"cluster_size=4096"},
                                         {"write -P 0x11 0 128k", "write -c -P 0x22 256k 32k"}, backing));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->Discard(0, 64 * kKiB));
  ASSERT_OK(run->Discard(640 * kKiB, 64 * kKiB));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Discard(700 * kKiB + 300, 5000));
  ASSERT_OK(run->Discard(256 * kKiB, 4 * kKiB));
  ASSERT_OK(run->Discard(260 * kKiB + 100, 200));
  ASSERT_OK(run->Discard(76 * kKiB + 10, 4086));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Write(1 * kMiB, Pattern(32 * kKiB, 3)));
  ASSERT_OK(run->Write(4 * kKiB, Pattern(100, 4)));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  for (uint64_t at : {uint64_t{0}, 640 * kKiB, 256 * kKiB}) {
    const L2Entry e = L2At(final_bytes, at);
    EXPECT_EQ(e.descriptor, kOflagZero) << "guest " << at << ": a discarded cluster over a backing file";
  }
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStates(dir, *run, m.guest, seed, 4, 4, "discard over a backing file");
}

// --- Write-zeroes ------------------------------------------------------------------------------

// Write-zeroes with standard L2 entries over a backing file: data clusters
// become zero clusters keeping their host cluster, or freeing it with
// unmap; unallocated ones and compressed ones become zero clusters; the
// unaligned parts are written with zeros; then writes go into the zero
// clusters (with and without a host cluster).
TEST(CrashStatesTest, WriteZeroesOfWholeClustersAndUnalignedParts) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-zero"));
  ASSERT_OK_AND_ASSIGN(std::string backing, MakeRawBacking(dir, 2 * kMiB, {"write -P 0x44 0 2M"}));
  ASSERT_OK_AND_ASSIGN(Made m, MakeImage(dir, 2 * kMiB, {"cluster_size=4096"},
                                         {"write -P 0x11 0 128k", "write -c -P 0x22 256k 16k"}, backing));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->WriteZeroes(0, 32 * kKiB, false));
  ASSERT_OK(run->WriteZeroes(32 * kKiB, 32 * kKiB, true));
  ASSERT_OK(run->WriteZeroes(512 * kKiB, 32 * kKiB, false));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->WriteZeroes(256 * kKiB, 8 * kKiB, false));
  ASSERT_OK(run->WriteZeroes(264 * kKiB + 100, 1000, true));
  ASSERT_OK(run->WriteZeroes(64 * kKiB + 100, 9000, false));
  ASSERT_OK(run->WriteZeroes(600 * kKiB + 7, 100, false));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Write(4 * kKiB + 10, Pattern(1000, 5)));
  ASSERT_OK(run->Write(40 * kKiB, Pattern(4096, 6)));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  const L2Entry kept = L2At(final_bytes, 8 * kKiB);
  EXPECT_TRUE((kept.descriptor & kOflagZero) && (kept.descriptor & kHostMask) != 0)
      << "write-zeroes keeps the host cluster: " << kept.descriptor;
  EXPECT_EQ(L2At(final_bytes, 48 * kKiB).descriptor, kOflagZero) << "write-zeroes with unmap frees it";
  EXPECT_EQ(L2At(final_bytes, 512 * kKiB).descriptor, kOflagZero) << "over the backing file";
  EXPECT_EQ(L2At(final_bytes, 256 * kKiB).descriptor, kOflagZero) << "a compressed cluster";
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStates(dir, *run, m.guest, seed, 4, 4, "write-zeroes, standard L2 entries");
}

// Write-zeroes with extended L2 entries (32 KiB clusters, 1 KiB
// subclusters) over a backing file: whole subclusters get their zero bit
// (in data clusters, in clusters partly left to the backing file, in
// unallocated ones), unaligned heads and tails are written with zeros,
// whole clusters become zero clusters, two halves make a whole one, part
// of a compressed cluster is copied out, a whole one freed; then writes go
// into zero subclusters.
TEST(CrashStatesTest, WriteZeroesOfSubclusters) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-zero-subclusters"));
  ASSERT_OK_AND_ASSIGN(std::string backing, MakeRawBacking(dir, 2 * kMiB, {"write -P 0x44 0 2M"}));
  ASSERT_OK_AND_ASSIGN(Made m, MakeImage(dir, 2 * kMiB, {"cluster_size=32768", "extended_l2=on"},
                                         {"write -P 0x11 0 128k", "write -P 0x12 200k 3k",
                                          "write -c -P 0x13 384k 64k"},
                                         backing));
  ASSERT_TRUE(L2At(m.image, 384 * kKiB).descriptor & kOflagCompressed);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->WriteZeroes(1 * kKiB, 3 * kKiB, false));
  ASSERT_OK(run->WriteZeroes(384 * kKiB + 1 * kKiB, 2 * kKiB + 10, false));
  ASSERT_OK(run->WriteZeroes(416 * kKiB, 32 * kKiB, true));
  ASSERT_OK(run->WriteZeroes(5 * kKiB + 100, 2 * kKiB, true));
  ASSERT_OK(run->WriteZeroes(300 * kKiB, 4 * kKiB, false));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->WriteZeroes(32 * kKiB, 32 * kKiB, false));
  ASSERT_OK(run->WriteZeroes(64 * kKiB, 32 * kKiB, true));
  ASSERT_OK(run->WriteZeroes(200 * kKiB, 3 * kKiB, true));
  ASSERT_OK(run->WriteZeroes(96 * kKiB, 16 * kKiB, false));
  ASSERT_OK(run->WriteZeroes(112 * kKiB, 16 * kKiB, false));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Write(2 * kKiB + 5, Pattern(100, 7)));
  ASSERT_OK(run->Write(301 * kKiB, Pattern(1024, 8)));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  const uint64_t zero_bits_1_to_3 = uint64_t{0b1110} << 32;
  EXPECT_EQ(L2At(final_bytes, 0).bitmap & zero_bits_1_to_3, uint64_t{0b1010} << 32)
      << "subclusters 1 and 3 keep their zero bits (subcluster 2 was written again)";
  EXPECT_EQ((L2At(final_bytes, 300 * kKiB).bitmap >> 32) & 0xf000, 0xd000u)
      << "zero bits in a cluster left to the backing file (subcluster 13 was written again)";
  const L2Entry copied = L2At(final_bytes, 384 * kKiB);
  EXPECT_TRUE((copied.descriptor & kOflagCopied) && !(copied.descriptor & kOflagCompressed))
      << "part of a compressed cluster zeroed: " << copied.descriptor;
  for (uint64_t at : {64 * kKiB, 416 * kKiB}) {
    const L2Entry whole = L2At(final_bytes, at);
    EXPECT_EQ(whole.descriptor & kHostMask, 0u) << "guest " << at;
    EXPECT_EQ(whole.bitmap, uint64_t{0xffffffff} << 32) << "guest " << at << ": a whole zero cluster";
  }
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStates(dir, *run, m.guest, seed, 4, 4, "write-zeroes of subclusters");
}

// Version 2 images have no zero flag: over a backing file, a discard,
// write-zeroes and the new space of a grow are written as zeros (copied
// clusters), and discarded clusters without a backing file beneath become
// unallocated.
TEST(CrashStatesTest, Version2ImageOverABackingFile) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-v2"));
  ASSERT_OK_AND_ASSIGN(std::string backing, MakeRawBacking(dir, 2 * kMiB, {"write -P 0x44 0 2M"}));
  ASSERT_OK_AND_ASSIGN(Made m, MakeImage(dir, 1 * kMiB + 2 * kKiB, {"cluster_size=4096", "compat=0.10"},
                                         {"write -P 0x11 0 64k", "write -c -P 0x22 128k 16k"}, backing));
  ASSERT_EQ(GetBE(m.image, 4, 4), 2u);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->Discard(0, 16 * kKiB));
  ASSERT_OK(run->WriteZeroes(16 * kKiB + 100, 8 * kKiB, true));
  ASSERT_OK(run->Discard(128 * kKiB, 8 * kKiB));
  ASSERT_OK(run->Discard(300 * kKiB, 8 * kKiB));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Truncate(1536 * kKiB));
  ASSERT_OK(run->Write(1100 * kKiB, Pattern(3000, 18)));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  EXPECT_EQ(Geom(final_bytes).size, 1536 * kKiB);
  EXPECT_EQ(L2At(final_bytes, 300 * kKiB).descriptor & ~kHostMask, kOflagCopied)
      << "zeros written over the backing file";
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStates(dir, *run, m.guest, seed, 3, 3, "version 2 image over a backing file");
}

// Clusters an internal snapshot shares (refcount 2, no COPIED flag):
// write-zeroes keeps the reference as a zero cluster, and a write into it
// must copy, not go in place; discard and write-zeroes with unmap drop
// only the active disk's reference; part of a shared cluster (plain or
// compressed) is copied out with zeros. The snapshot reads as before.
TEST(CrashStatesTest, ZeroAndDiscardOfClustersASnapshotShares) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-zero-snapshot"));
  const std::string path = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(path, "qcow2", 2 * kMiB, {"cluster_size=4096"}));
  ASSERT_OK(QemuIoUnsafe(path, "qcow2", {"write -P 0x11 0 256k", "write -c -P 0x33 512k 32k"}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "old", path}).status());
  ASSERT_OK(QemuIoUnsafe(path, "qcow2", {"write -P 0x22 128k 64k"}));
  ASSERT_OK_AND_ASSIGN(Made m, Load(dir, Made{path, "", {}, {}}));
  ASSERT_OK_AND_ASSIGN(Bytes snapshot, SnapshotDisk(dir, path, "old"));
  ASSERT_EQ(L2At(m.image, 0).descriptor & kOflagCopied, 0u) << "cluster 0 is not shared";
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->WriteZeroes(0, 16 * kKiB, false));
  ASSERT_OK(run->Write(4 * kKiB + 100, Pattern(500, 20)));
  ASSERT_OK(run->Discard(16 * kKiB, 16 * kKiB));
  ASSERT_OK(run->Discard(32 * kKiB + 1000, 2000));
  ASSERT_OK(run->WriteZeroes(48 * kKiB, 16 * kKiB, true));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->WriteZeroes(512 * kKiB + 512, 1000, false));
  ASSERT_OK(run->Discard(520 * kKiB, 8 * kKiB));
  ASSERT_OK(run->Write(64 * kKiB, Pattern(8 * kKiB, 21)));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  const L2Entry kept = L2At(final_bytes, 8 * kKiB);
  EXPECT_TRUE((kept.descriptor & kOflagZero) && !(kept.descriptor & kOflagCopied))
      << "write-zeroes of a shared cluster: " << kept.descriptor;
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  ASSERT_OK_AND_ASSIGN(Bytes now, SnapshotDisk(dir, dir.Join("final.qcow2"), "old"));
  EXPECT_TRUE(now == snapshot) << "the snapshot changed";
  CheckStates(dir, *run, m.guest, seed, 4, 4, "zero and discard of clusters a snapshot shares");
}

// --- Preallocation ------------------------------------------------------------------------------

// Preallocation (fallocate mode 0) over a backing file that ends inside the
// disk: clusters left to the backing file get a copy of it, zero clusters
// and clusters past the backing file get a preallocated zero cluster (the
// first ones reuse clusters a discard freed, which may still hold their old
// bytes); what the disk reads never changes. Then writes go into the
// preallocated clusters (one of them reused) and a discard frees some.
TEST(CrashStatesTest, Preallocation) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-prealloc"));
  ASSERT_OK_AND_ASSIGN(std::string backing, MakeRawBacking(dir, 1 * kMiB, {"write -P 0x44 0 1M"}));
  ASSERT_OK_AND_ASSIGN(Made m, MakeImage(dir, 2 * kMiB, {"cluster_size=4096"},
                                         {"write -P 0x11 0 64k", "write -z 128k 64k"}, backing));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->Discard(32 * kKiB, 32 * kKiB));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Preallocate(0, 128 * kKiB));
  ASSERT_OK(run->Preallocate(1 * kMiB - 8 * kKiB, 24 * kKiB));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Preallocate(128 * kKiB, 64 * kKiB));
  ASSERT_OK(run->Preallocate(1536 * kKiB, 64 * kKiB));
  ASSERT_OK(run->Flush());
  ASSERT_OK_AND_ASSIGN(Bytes preallocated, run->contents());
  const uint64_t host = L2At(preallocated, 1536 * kKiB).descriptor & kHostMask;
  ASSERT_NE(host, 0u);
  ASSERT_OK(run->Write(1536 * kKiB + 100, Pattern(1000, 9)));
  ASSERT_OK(run->Write(130 * kKiB, Pattern(5000, 10)));
  ASSERT_OK(run->Write(44 * kKiB + 100, Pattern(200, 19)));
  ASSERT_OK(run->Discard(1536 * kKiB + 4 * kKiB, 8 * kKiB));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  EXPECT_EQ(L2At(final_bytes, 1536 * kKiB).descriptor, host | kOflagCopied)
      << "the write into a preallocated cluster went elsewhere";
  const L2Entry copied = L2At(final_bytes, 96 * kKiB);
  EXPECT_EQ(copied.descriptor & ~kHostMask, kOflagCopied) << "a copy of the backing file";
  EXPECT_NE(copied.descriptor & kHostMask, 0u);
  for (uint64_t at : {40 * kKiB, 1 * kMiB + 8 * kKiB, 140 * kKiB, 1536 * kKiB + 20 * kKiB}) {
    const L2Entry e = L2At(final_bytes, at);
    EXPECT_EQ(e.descriptor & ~kHostMask, kOflagCopied | kOflagZero)
        << "guest " << at << ": a preallocated zero cluster";
    EXPECT_NE(e.descriptor & kHostMask, 0u) << "guest " << at;
  }
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStates(dir, *run, m.guest, seed, 4, 4, "preallocation");
}

// --- Growing over a longer backing file --------------------------------------------------------

// 512-byte clusters: the 1 MiB disk over a 4 MiB backing file grows to
// 3 MiB (the L1 table grows too, and 2 MiB of clusters over the backing
// file become zero clusters), with a write pending from before the grow and
// one into the new space, then past the backing file's end. Before the grow
// is durable the disk has its old size; once its header write may have
// landed, the new space reads as zeros, never as the backing file.
TEST(CrashStatesTest, GrowOverALongerBackingFile) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-grow"));
  ASSERT_OK_AND_ASSIGN(std::string backing, MakeRawBacking(dir, 4 * kMiB, {"write -P 0x44 0 4M"}));
  ASSERT_OK_AND_ASSIGN(Made m, MakeImage(dir, 1 * kMiB, {"cluster_size=512"}, {"write -P 0x11 0 64k"}, backing));
  const uint32_t l1_before = Geom(m.image).l1_size;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->Write(100 * kKiB, Pattern(1000, 11)));
  ASSERT_OK(run->Truncate(3 * kMiB));
  {
    Bytes grown(2 * kMiB);
    ASSERT_OK(SyncWait(run->layer().Read(1 * kMiB, grown)));
    EXPECT_TRUE(std::all_of(grown.begin(), grown.end(), [](uint8_t b) { return b == 0; }))
        << "the new space reads the backing file";
  }
  ASSERT_OK(run->Write(2 * kMiB + 100, Pattern(3000, 12)));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Truncate(4 * kMiB + 512 * kKiB));
  ASSERT_OK(run->Write(4 * kMiB + 1000, Pattern(100, 13)));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  EXPECT_GT(Geom(final_bytes).l1_size, l1_before) << "the L1 table grew";
  EXPECT_EQ(L2At(final_bytes, 3 * kMiB).descriptor, kOflagZero) << "the new space over the backing file";
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStates(dir, *run, m.guest, seed, 3, 2, "grow over a longer backing file",
              /*punching_only=*/true);
}

// An old size inside a cluster (extended L2 entries, 16 KiB clusters,
// 512-byte subclusters): the rest of the old last cluster is written with
// zeros (copy-on-write of the subclusters the backing file would show).
TEST(CrashStatesTest, GrowFromInsideAClusterOverALongerBackingFile) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-grow-tail"));
  ASSERT_OK_AND_ASSIGN(std::string backing, MakeRawBacking(dir, 2 * kMiB, {"write -P 0x44 0 2M"}));
  ASSERT_OK_AND_ASSIGN(Made m, MakeImage(dir, 1029 * kKiB, {"cluster_size=16384", "extended_l2=on"},
                                         {"write -P 0x11 1M 4k"}, backing));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->Truncate(1536 * kKiB));
  ASSERT_OK(run->Write(1100 * kKiB, Pattern(2000, 14)));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  EXPECT_EQ(Geom(final_bytes).size, 1536 * kKiB);
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStates(dir, *run, m.guest, seed, 6, 6, "grow from inside a cluster", /*punching_only=*/true);
}

// --- Refcount table growth during a discard ---------------------------------------------------

// 512-byte clusters with 64-bit refcounts (a refcount block covers 32 KiB
// of file, the one-cluster table 2 MiB): the image holds 1980 KiB of data
// over a backing file, a few clusters short of what its table covers, and
// one discard over 3 MiB frees 980 KiB of it and needs zero clusters, and
// so new L2 tables, for the rest: the file passes 2 MiB and the refcount
// table grows while the discard runs. A second discard that only frees
// follows.
TEST(CrashStatesTest, RefcountTableGrowthDuringADiscard) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-discard-table"));
  ASSERT_OK_AND_ASSIGN(std::string backing,
                       MakeRawBacking(dir, 4 * kMiB, {"write -P 0x44 0 64k", "write -P 0x45 3M 64k"}));
  ASSERT_OK_AND_ASSIGN(Made m, MakeImage(dir, 4 * kMiB, {"cluster_size=512", "refcount_bits=64"},
                                         {"write -P 0x11 0 1980k"}, backing));
  const uint64_t table_before = Geom(m.image).refcount_table_offset;
  ASSERT_EQ(Geom(m.image).refcount_table_clusters, 1u);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->Discard(1 * kMiB, 3 * kMiB));
  ASSERT_OK(run->Write(3 * kMiB + 100, Pattern(700, 15)));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Discard(0, 64 * kKiB));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  EXPECT_NE(Geom(final_bytes).refcount_table_offset, table_before) << "the refcount table did not grow";
  EXPECT_EQ(L2At(final_bytes, 2560 * kKiB).descriptor, kOflagZero) << "a discarded cluster over the backing file";
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStates(dir, *run, m.guest, seed, 3, 2, "refcount table growth during a discard");
}

// --- Persistent dirty bitmaps -------------------------------------------------------------

// The bitmap rule at a crash state (decoded with bitmap_reader.h, not the
// engine): each bitmap is in use, or consistent. A consistent recorded
// bitmap has a table that fits the state's disk and holds what it held
// before plus every granule that a request which may have reached the
// disk touched, and nothing more; a consistent disabled one holds what it
// held. A request may have reached the disk once anything logged from its
// start on is in the state: its data, or the L2 entry a later flush wrote.
class BitmapRule {
 public:
  BitmapRule(const CrashRun& run, const CrashChecker& checker, std::vector<DecodedBitmap> initial)
      : run_(run), checker_(checker), initial_(std::move(initial)) {}

  // `barrier`, `applied` (unflushed operations applied) and `what` as
  // CrashStates gives them.
  void Check(const Bytes& state, size_t barrier, const std::vector<size_t>& applied, const std::string& what) {
    if (failed_ >= 5) return;
    auto fail = [&](const std::string& why) {
      ++failed_;
      ADD_FAILURE() << "crash state " << what << ": " << why;
    };
    absl::StatusOr<std::vector<DecodedBitmap>> now = DecodeBitmaps(state);
    if (!now.ok()) return fail(absl::StrCat("the bitmaps do not decode: ", now.status().message()));
    if (now->size() != initial_.size()) return fail("the number of bitmaps changed");
    // One past the last log operation the state holds.
    size_t applied_end = barrier == 0 ? 0 : checker_.barrier_index()[barrier - 1] + 1;
    for (size_t index : applied) applied_end = std::max(applied_end, index + 1);
    const uint64_t disk = GetBE(state, 24, 8) / 512 * 512;
    const uint64_t cluster = Geom(state).cluster_size();
    for (size_t i = 0; i < now->size(); ++i) {
      const DecodedBitmap& b = (*now)[i];
      const DecodedBitmap& before = initial_[i];
      if (b.name != before.name) return fail("a bitmap was renamed");
      if (b.in_use()) {
        ++in_use_;
        continue;
      }
      const uint64_t granules = (disk + b.granularity() - 1) / b.granularity();
      const uint64_t entries = ((granules + 7) / 8 + cluster - 1) / cluster;
      if (b.table_size != entries || b.bits.size() != granules) {
        return fail(absl::StrCat("bitmap ", b.name, " claims to be consistent with a table of ", b.table_size,
                                 " entries for a disk of ", disk, " bytes"));
      }
      if (b.flags != (before.flags & ~1u)) return fail(absl::StrCat("bitmap ", b.name, "'s flags changed"));
      std::vector<bool> least(granules, false), most(granules, false);
      for (uint64_t g = 0; g < granules && g < before.bits.size(); ++g) least[g] = most[g] = before.bits[g];
      bool recorded_some = false;
      if (b.enabled()) {
        for (const CrashRequest& r : run_.requests()) {
          const bool may_be_there = r.log_before < applied_end;
          recorded_some |= may_be_there;
          for (uint64_t g = r.offset / b.granularity();
               g <= (r.offset + r.data.size() - 1) / b.granularity() && g < granules; ++g) {
            most[g] = true;
            if (may_be_there) least[g] = true;
          }
        }
      }
      for (uint64_t g = 0; g < granules; ++g) {
        if (least[g] && !b.bits[g]) {
          return fail(absl::StrCat("bitmap ", b.name, " is not in use but misses granule ", g, " (bytes ",
                                   g * b.granularity(), "+), which a request that may be on disk changed"));
        }
        if (b.bits[g] && !most[g]) {
          return fail(absl::StrCat("bitmap ", b.name, " has granule ", g, " set, which no request changed"));
        }
      }
      ++consistent_;
      complete_after_requests_ += recorded_some;
    }
  }

  void Report(const std::string& label) const {
    std::cout << label << ": bitmaps in use " << in_use_ << " times, consistent " << consistent_
              << " times (" << complete_after_requests_ << " of them holding requests)\n";
    EXPECT_EQ(failed_, 0u) << label;
    EXPECT_GT(in_use_, 0u) << label << ": no state with a bitmap in use";
    EXPECT_GT(complete_after_requests_, 0u) << label << ": no state with a stored bitmap holding requests";
  }

 private:
  const CrashRun& run_;
  const CrashChecker& checker_;
  const std::vector<DecodedBitmap> initial_;
  size_t failed_ = 0;
  size_t in_use_ = 0;
  size_t consistent_ = 0;
  size_t complete_after_requests_ = 0;
};

// Every state of `run`: the crash checker's rules and the bitmap rule.
void CheckStatesWithBitmaps(const TempDir& dir, const CrashRun& run, const Made& m, uint64_t seed, size_t prefixes,
                            size_t subsets, const std::string& label) {
  ASSERT_OK_AND_ASSIGN(std::vector<DecodedBitmap> initial, DecodeBitmaps(m.image));
  CrashChecker checker(dir, run, m.guest);
  BitmapRule rule(run, checker, initial);
  CrashStates states(run.initial(), checker.log(),
                     {.seed = seed, .random_subsets = SampleStates(subsets), .max_prefixes = SampleStates(prefixes),
                      .max_states = 0});
  Bytes contents;
  std::string what;
  while (states.Next(&contents, &what)) {
    checker.Check(contents, states.barrier(), what);
    rule.Check(contents, states.barrier(), states.unflushed_applied(), what);
  }
  checker.Report(label);
  rule.Report(label);
}

// Three bitmaps: "a" (4 KiB granules) with bits and a data cluster from
// qemu-io, "fresh" (64 KiB) with no data yet, "off" disabled with bits.
// Writes, a discard and write-zeroes, a flush, a close that stores the
// bitmaps (in place for "a", a new data cluster for "fresh"), then more
// changes that mark them in use again and a second close.
TEST(CrashStatesTest, PersistentBitmapsAreInUseOrCompleteAtEveryState) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-bitmaps"));
  Made m{dir.Join("disk.qcow2"), "", {}, {}};
  ASSERT_OK(CreateImage(m.path, "qcow2", 4 * kMiB, {"cluster_size=4096"}));
  ASSERT_OK(QemuImg({"bitmap", "--add", "-g", "4096", m.path, "a"}).status());
  ASSERT_OK(QemuImg({"bitmap", "--add", "-g", "16384", m.path, "off"}).status());
  ASSERT_OK(QemuIoUnsafe(m.path, "qcow2", {"write -P 0x11 64k 8k", "write -P 0x12 1M 4k"}));
  ASSERT_OK(QemuImg({"bitmap", "--disable", m.path, "off"}).status());
  ASSERT_OK(QemuImg({"bitmap", "--add", "-g", "65536", m.path, "fresh"}).status());
  ASSERT_OK_AND_ASSIGN(m, Load(dir, std::move(m)));
  ASSERT_OK_AND_ASSIGN(std::vector<DecodedBitmap> initial, DecodeBitmaps(m.image));
  ASSERT_OK_AND_ASSIGN(DecodedBitmap fresh, FindBitmap(initial, "fresh"));
  ASSERT_EQ(fresh.table.at(0), 0u) << "a bitmap without data";

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->Write(0, Pattern(4096, 1)));
  ASSERT_OK(run->Write(kMiB + 100, Pattern(5000, 2)));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Discard(2 * kMiB, 64 * kKiB));
  ASSERT_OK(run->WriteZeroes(3 * kMiB, 8 * kKiB, false));
  ASSERT_OK(run->Close());
  ASSERT_OK(run->Write(512 * kKiB, Pattern(100, 3)));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->WriteZeroes(3 * kMiB + 3 * 4096 + 1, 10, true));
  ASSERT_OK(run->Close());

  const Bytes final_bytes = FinalContents(*run);
  ASSERT_OK_AND_ASSIGN(std::vector<DecodedBitmap> final_bitmaps, DecodeBitmaps(final_bytes));
  for (const DecodedBitmap& b : final_bitmaps) EXPECT_FALSE(b.in_use()) << b.name << " after the last close";
  ASSERT_OK_AND_ASSIGN(DecodedBitmap stored, FindBitmap(final_bitmaps, "fresh"));
  EXPECT_NE(stored.table.at(0), 0u) << "\"fresh\" got a data cluster";
  EXPECT_TRUE(stored.Dirty(0) && stored.Dirty(512 * kKiB) && !stored.Dirty(kMiB - 1));
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStatesWithBitmaps(dir, *run, m, seed, 16, 16, "persistent bitmaps");
}

// 512-byte clusters and granules: a table cluster holds 64 entries, each
// for 2 MiB of disk. Growing a 128 MiB disk by 2 MiB needs a second table
// cluster, so the table moves (new table, barrier, its offset, barrier,
// size and flags) at the close.
TEST(CrashStatesTest, PersistentBitmapTableMovesWhenTheDiskGrows) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-bitmap-grow"));
  Made m{dir.Join("disk.qcow2"), "", {}, {}};
  ASSERT_OK(CreateImage(m.path, "qcow2", 128 * kMiB, {"cluster_size=512"}));
  ASSERT_OK(QemuImg({"bitmap", "--add", "-g", "512", m.path, "b"}).status());
  ASSERT_OK(QemuIoUnsafe(m.path, "qcow2", {"write -P 0x11 0 4k", "write -P 0x12 127M 1k"}));
  ASSERT_OK_AND_ASSIGN(m, Load(dir, std::move(m)));
  ASSERT_OK_AND_ASSIGN(std::vector<DecodedBitmap> initial, DecodeBitmaps(m.image));
  ASSERT_EQ(initial.at(0).table_size, 64u);

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m));
  ASSERT_OK(run->Write(100, Pattern(1000, 1)));
  ASSERT_OK(run->Truncate(130 * kMiB));
  ASSERT_OK(run->Write(129 * kMiB, Pattern(512, 2)));
  ASSERT_OK(run->Close());

  const Bytes final_bytes = FinalContents(*run);
  ASSERT_OK_AND_ASSIGN(std::vector<DecodedBitmap> final_bitmaps, DecodeBitmaps(final_bytes));
  EXPECT_EQ(final_bitmaps.at(0).table_size, 65u);
  EXPECT_NE(final_bitmaps.at(0).table_offset, initial.at(0).table_offset) << "the table did not move";
  EXPECT_FALSE(final_bitmaps.at(0).in_use());
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  CheckStatesWithBitmaps(dir, *run, m, seed, 4, 2, "persistent bitmap table moved by a grow");
}

// --- Repair of a dirty image --------------------------------------------------------------------

// What opening `state` writable again makes of it: a dirty image is
// repaired at open (its refcounts rebuilt); a clean one is left alone.
absl::StatusOr<Bytes> Reopened(const Bytes& state, const ImageOptions& options) {
  if (!Dirty(state)) return state;
  absl::StatusOr<Header> header = DecodeHeader(state, state.size());
  if (!header.ok()) return header.status();
  std::unique_ptr<BlockFile> file = NewMemFile("reopened.qcow2", state);
  const BlockFile* raw = file.get();
  absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer =
      SyncWait(Qcow2Layer::Open(std::move(file), std::move(*header), nullptr, nullptr, options));
  if (!layer.ok()) return layer.status();
  absl::StatusOr<Bytes> after = MemFileContents(*raw);
  if (after.ok() && Dirty(*after)) return absl::InternalError("opening the image again left it dirty");
  return after;
}

// How a dirty image is made: `before` is written by a writer that closes
// (then, if `snapshot`, an internal snapshot "old" is taken), `killed` by
// one with lazy refcounts killed before it closed (qemu-io's abort).
struct DirtyRecipe {
  std::vector<std::string> create;
  std::vector<std::string> before;
  bool snapshot = false;
  std::vector<std::string> killed;
  // The layer's max_metadata_memory; 0 for the default.
  uint64_t max_metadata_memory = 0;
};

// The killed writer leaves the image dirty, its refcounts missing what it
// had not written back yet (how much depends on QEMU's timing, so the first
// refcount block is zeroed as well: a dirty image's refcounts may be
// anything). Opening it writable rebuilds them; then writes (one into a
// cluster a snapshot shares, if any), a discard and flushes. Every crash
// state either is still dirty, and opening it again repairs it to a clean
// image that reads the same, or checks clean itself. A snapshot reads as it
// did at the end.
void RunDirtyRepair(const DirtyRecipe& recipe, uint64_t seed, size_t prefixes, size_t subsets,
                    const std::string& label) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("cs-repair"));
  Made m{dir.Join("disk.qcow2"), "", {}, {}};
  std::vector<std::string> create = recipe.create;
  create.push_back("lazy_refcounts=on");
  ASSERT_OK(CreateImage(m.path, "qcow2", 4 * kMiB, create));
  if (!recipe.before.empty()) {
    ASSERT_OK(QemuIoUnsafe(m.path, "qcow2", recipe.before));
  }
  if (recipe.snapshot) {
    ASSERT_OK(QemuImg({"snapshot", "-c", "old", m.path}).status());
  }
  std::vector<std::string> argv = {"qemu-io", "-t", "unsafe", "-f", "qcow2"};
  for (const std::string& w : recipe.killed) {
    argv.push_back("-c");
    argv.push_back(w);
  }
  for (const char* c : {"-c", "abort"}) argv.push_back(c);
  argv.push_back(m.path);
  ASSERT_OK_AND_ASSIGN(CommandResult killed, RunCommand(argv));
  ASSERT_FALSE(killed.ok()) << "qemu-io was meant to abort";
  {
    ASSERT_OK_AND_ASSIGN(Bytes image, ReadBytes(m.path));
    ASSERT_TRUE(Dirty(image)) << "the killed writer left no dirty image";
    const Geometry g = Geom(image);
    const uint64_t block = GetBE(image, g.refcount_table_offset, 8) & kHostMask;
    ASSERT_NE(block, 0u);
    ASSERT_OK(WriteFileAt(m.path, block, std::string(g.cluster_size(), '\0')));
  }
  ASSERT_OK_AND_ASSIGN(m, Load(dir, std::move(m)));
  Bytes snapshot;
  if (recipe.snapshot) {
    ASSERT_OK_AND_ASSIGN(snapshot, SnapshotDisk(dir, m.path, "old"));
  }
  ASSERT_OK_AND_ASSIGN(QemuCheckReport before, QemuCheck(m.path));
  ASSERT_GT(before.corruptions, 0u) << "the dirty image's refcounts are right already: nothing to rebuild\n"
                                    << before.output;

  ImageOptions options = CrashRun::Options();
  if (recipe.max_metadata_memory != 0) options.max_metadata_memory = recipe.max_metadata_memory;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CrashRun> run, StartRun(m, options));
  ASSERT_GT(run->Barriers(), 0u) << "the open did not rebuild anything";
  ASSERT_OK(run->Write(3 * kMiB + 100, Pattern(1500, 16)));
  ASSERT_OK(run->Write(8 * kKiB, Pattern(512, 17)));
  ASSERT_OK(run->Flush());
  ASSERT_OK(run->Discard(16 * kKiB, 8 * kKiB));
  ASSERT_OK(run->Flush());

  const Bytes final_bytes = FinalContents(*run);
  EXPECT_FALSE(Dirty(final_bytes));
  ASSERT_NO_FATAL_FAILURE(ExpectFinalClean(dir, *run, m.guest));
  if (recipe.snapshot) {
    ASSERT_OK_AND_ASSIGN(Bytes now, SnapshotDisk(dir, dir.Join("final.qcow2"), "old"));
    EXPECT_TRUE(now == snapshot) << "the snapshot changed";
  }
  CrashChecker checker(dir, *run, m.guest);
  size_t dirty = 0;
  checker.CheckAll({.seed = seed,
                    .random_subsets = SampleStates(subsets),
                    .max_prefixes = SampleStates(prefixes),
                    .max_states = 0},
                   [&](const Bytes& state) {
                     dirty += Dirty(state);
                     return Reopened(state, options);
                   });
  std::cout << label << ": " << dirty << " states still dirty, repaired by opening them again\n";
  EXPECT_GT(dirty, 0u) << "no crash state during the rebuild";
  checker.Report(label);
}

// 512-byte clusters, 16-bit refcounts: the rebuilt refcounts take several
// blocks of one table cluster.
TEST(CrashStatesTest, RepairOfADirtyImage) {
  RunDirtyRepair({.create = {"cluster_size=512"},
                  .before = {},
                  .snapshot = false,
                  .killed = {"write -P 0x11 0 256k", "flush", "write -P 0x22 512k 64k", "write -P 0x23 1M 100k"}},
                 TestSeed(), 6, 6, "repair of a dirty image");
}

// 512-byte clusters, 64-bit refcounts and 2.2 MiB of data: the rebuilt
// table needs two clusters and about 75 blocks.
TEST(CrashStatesTest, RepairOfADirtyImageWithALargerTable) {
  RunDirtyRepair({.create = {"cluster_size=512", "refcount_bits=64"},
                  .before = {},
                  .snapshot = false,
                  .killed = {"write -P 0x11 0 2200k", "write -P 0x22 3M 64k"}},
                 TestSeed(), 4, 4, "repair of a dirty image, two-cluster table");
}

// The same with a metadata memory budget of 32 KiB, too little to count
// the file's 4740 clusters at once: the rebuild counts the references in
// windows of refcount blocks (two of 3840 clusters, as the budget is
// accounted now).
TEST(CrashStatesTest, RepairOfADirtyImageInWindows) {
  RunDirtyRepair({.create = {"cluster_size=512", "refcount_bits=64"},
                  .before = {},
                  .snapshot = false,
                  .killed = {"write -P 0x11 0 2200k", "write -P 0x22 3M 64k"},
                  .max_metadata_memory = 32 * kKiB},
                 TestSeed(), 4, 4, "repair of a dirty image in windows");
}

// A snapshot shares clusters (refcount 2) and compressed clusters share
// host clusters: the rebuilt refcounts must count every reference, or the
// write into a shared cluster goes in place and changes the snapshot.
TEST(CrashStatesTest, RepairOfADirtyImageWithASnapshotAndCompressedClusters) {
  RunDirtyRepair({.create = {"cluster_size=4096"},
                  .before = {"write -P 0x11 0 256k", "write -c -P 0x33 512k 64k"},
                  .snapshot = true,
                  .killed = {"write -P 0x22 64k 64k", "write -c -P 0x24 2M 32k", "write -P 0x44 1M 64k"}},
                 TestSeed(), 6, 6, "repair of a dirty image with a snapshot");
}

}  // namespace
}  // namespace qcow2fuse::test
