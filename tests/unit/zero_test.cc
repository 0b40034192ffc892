// Discard (fallocate PUNCH_HOLE), WriteZeroes (ZERO_RANGE) and Preallocate
// (fallocate mode 0) through the public Image API (data/qcow2_zero.cc),
// judged against QEMU.
//
// ZeroTransitionTest walks every L2 transition of the table at the top of
// qcow2_zero.cc: standard and extended L2 entries, version 3 and version 2
// (compat=0.10) images, with and without a backing file, for whole
// clusters, whole subclusters, unaligned ranges and ranges inside one
// subcluster, from every starting state (data, compressed, zero cluster
// with and without a host cluster, unallocated, metadata-preallocated, and
// for extended L2 a cluster with data, zero and unallocated subclusters).
// Each case builds the image with qemu-img and qemu-io, applies one request
// through Image, flushes and closes it, and then checks
//   (a) the target cluster's L2 entry, decoded from the file's bytes, and
//       that its neighbours' entries did not change;
//   (b) `qemu-img check`: no corruption, no leak;
//   (c) `qemu-img compare` of the whole chain against a raw twin that got
//       the same writes (zeros for discard and zeroing, nothing for
//       preallocation);
//   (d) the host clusters allocated and freed: the refcounts decoded from
//       the file, `qemu-img check`'s allocated-clusters count, and a hole
//       in the file where a freed host cluster was;
// and the guest data bytes the engine wrote (ImageCounters). The expected
// results come from Expect(), the oracle, written from that table.
//
// The other suites (all named Zero*, so `ctest -R Zero` runs them all):
//   ZeroNoOpTest: a request that changes nothing dirties, writes and
//     (after Flush) flushes nothing; the same request twice.
//   ZeroKnownZeroTest: repeating a request on a range known to be zero
//     reads no L2 slice, even after the 64 KiB cache evicted it.
//   ZeroDetectTest: detect_zeroes off, on and unmap.
//   ZeroPreallocateThenWriteTest: a write into a preallocated cluster
//     allocates nothing.
//   ZeroMixedRangeTest, ZeroEndOfDisk*Test, ZeroShortBackingTest,
//   ZeroNoL2TableTest, ZeroBigRangeTest: ranges over many clusters, L2
//     slices and tables (with mid-request flushes), the partial last
//     cluster and subcluster of a disk, a backing file shorter than the
//     disk, L2 tables not allocated yet.
//   ZeroSharedCompressedTest, ZeroCompressedAcrossHostClustersTest,
//   ZeroSnapshotTest: host clusters with more than one reference.
//   ZeroDataFileTest: external data files, raw or not (QEMU's verdicts only).
//   ZeroRandomOpsTest: seeded random sequences against a byte model
//     (prints its seed; QCOW2FUSE_ZERO_SEED replays one).
//   ZeroArgumentsTest: ranges outside the disk, read-only images, length 0.

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <optional>
#include <ostream>
#include <random>
#include <regex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "qcow2_builder.h"  // kOflag*, kOffsetMask, kIncompatExtendedL2, Bytes, Pattern
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kCluster = 64 * kKiB;  // every image here uses 64 KiB clusters
constexpr uint64_t kSub = 2 * kKiB;       // ... so extended L2 subclusters are 2 KiB
constexpr uint64_t kDisk = 4 * kMiB;
constexpr uint64_t kAllAlloc = 0xffffffffull;   // bitmap: every subcluster allocated
constexpr uint64_t kAllZero = kAllAlloc << 32;  // bitmap: every subcluster zero
constexpr uint8_t kBackingByte = 0x5a;

// Bits first..last (inclusive) of a 32-bit subcluster bitmap half.
constexpr uint64_t Subclusters(uint32_t first, uint32_t last) {
  return ((uint64_t{1} << (last + 1)) - 1) & ~((uint64_t{1} << first) - 1);
}

std::string Hex(uint64_t v) { return absl::StrFormat("%#x", v); }

// --- Decoding the image file ------------------------------------------------

uint64_t GetBE(const std::string& b, uint64_t offset, int width) {
  uint64_t v = 0;
  for (int i = 0; i < width; ++i) {
    v = (v << 8) | (offset + i < b.size() ? static_cast<uint8_t>(b[offset + i]) : 0);
  }
  return v;
}

// The header fields the decoding below needs (spec: "Header").
struct Layout {
  uint32_t version;
  uint32_t cluster_bits;
  uint32_t l1_size;
  uint64_t l1_table_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t refcount_order;
  bool extended_l2;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint32_t entry_size() const { return extended_l2 ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / entry_size(); }
};

Layout ParseLayout(const std::string& b) {
  Layout l;
  l.version = static_cast<uint32_t>(GetBE(b, 4, 4));
  l.cluster_bits = static_cast<uint32_t>(GetBE(b, 20, 4));
  l.l1_size = static_cast<uint32_t>(GetBE(b, 36, 4));
  l.l1_table_offset = GetBE(b, 40, 8);
  l.refcount_table_offset = GetBE(b, 48, 8);
  l.refcount_table_clusters = static_cast<uint32_t>(GetBE(b, 56, 4));
  // Version 2 headers end at byte 72 and have 16-bit refcounts.
  l.extended_l2 = l.version >= 3 && (GetBE(b, 72, 8) & kIncompatExtendedL2);
  l.refcount_order = l.version >= 3 ? static_cast<uint32_t>(GetBE(b, 96, 4)) : 4;
  return l;
}

// An L2 entry as stored: the descriptor and, for extended L2, the bitmap.
struct Entry {
  uint64_t descriptor = 0;
  uint64_t bitmap = 0;

  uint64_t host() const { return (descriptor & kOflagCompressed) ? 0 : descriptor & kOffsetMask; }
  bool compressed() const { return descriptor & kOflagCompressed; }
  friend bool operator==(const Entry&, const Entry&) = default;
};

std::ostream& operator<<(std::ostream& out, const Entry& e) {
  return out << absl::StrFormat("{descriptor %#018x, bitmap %#018x}", e.descriptor, e.bitmap);
}

// The L2 entry of the guest cluster holding `guest_offset`, read through
// the header's l1_table_offset and the L1 entry.
Entry EntryAt(const std::string& b, uint64_t guest_offset) {
  const Layout l = ParseLayout(b);
  const uint64_t l1_index = (guest_offset >> l.cluster_bits) / l.l2_entries();
  if (l1_index >= l.l1_size) return {};
  const uint64_t l2 = GetBE(b, l.l1_table_offset + l1_index * 8, 8) & kOffsetMask;
  if (l2 == 0) return {};
  const uint64_t at = l2 + ((guest_offset >> l.cluster_bits) % l.l2_entries()) * l.entry_size();
  return {GetBE(b, at, 8), l.extended_l2 ? GetBE(b, at + 8, 8) : 0};
}

// The refcount of the host cluster at `host_offset` (spec: "Host cluster
// management").
uint64_t Refcount(const std::string& b, uint64_t host_offset) {
  const Layout l = ParseLayout(b);
  const uint32_t bits = 1u << l.refcount_order;
  const uint64_t per_block = (l.cluster_size() * 8) / bits;
  const uint64_t cluster = host_offset >> l.cluster_bits;
  const uint64_t table_index = cluster / per_block;
  if (table_index >= uint64_t{l.refcount_table_clusters} * l.cluster_size() / 8) return 0;
  const uint64_t block = GetBE(b, l.refcount_table_offset + table_index * 8, 8) & ~uint64_t{0x1ff};
  if (block == 0) return 0;
  const uint64_t i = cluster % per_block;
  if (bits < 8) return (GetBE(b, block + i * bits / 8, 1) >> (i * bits % 8)) & ((1u << bits) - 1);
  return GetBE(b, block + i * bits / 8, static_cast<int>(bits / 8));
}

// Host clusters with a non-zero refcount: a little past the end of the
// file too, since a refcount there would be a leak just as well.
uint64_t UsedClusters(const std::string& b) {
  const Layout l = ParseLayout(b);
  uint64_t n = 0;
  for (uint64_t o = 0; o < b.size() + 16 * l.cluster_size(); o += l.cluster_size()) n += Refcount(b, o) != 0;
  return n;
}

// The host clusters [first, end) the bytes of a compressed descriptor touch
// (spec: "Compressed Clusters Descriptor").
std::pair<uint64_t, uint64_t> CompressedHostClusters(uint64_t descriptor, uint32_t cluster_bits) {
  const uint32_t x = 62 - (cluster_bits - 8);
  const uint64_t host = descriptor & ((uint64_t{1} << x) - 1);
  const uint64_t sectors = ((descriptor >> x) & ((uint64_t{1} << (cluster_bits - 8)) - 1)) + 1;
  const uint64_t end = (host & ~uint64_t{511}) + sectors * 512;
  return {host >> cluster_bits, (end + (uint64_t{1} << cluster_bits) - 1) >> cluster_bits};
}

// --- QEMU's verdicts ------------------------------------------------------------

struct QemuCheck {
  int exit_code = -1;
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;
  uint64_t allocated_clusters = 0;
  std::string output;
};

uint64_t JsonCount(const std::string& json, const std::string& key) {
  std::smatch m;
  const std::regex re("\"" + key + "\"\\s*:\\s*(\\d+)");
  uint64_t v = 0;
  if (std::regex_search(json, m, re)) (void)absl::SimpleAtoi(m[1].str(), &v);
  return v;  // QEMU leaves out the counts that are 0
}

absl::StatusOr<QemuCheck> RunQemuCheck(const std::string& path) {
  absl::StatusOr<CommandResult> r = RunCommand({"qemu-img", "check", "-f", "qcow2", "--output=json", path});
  if (!r.ok()) return r.status();
  QemuCheck c;
  c.exit_code = r->status.exited() ? r->status.code() : -1;
  c.corruptions = JsonCount(r->stdout_text, "corruptions");
  c.leaks = JsonCount(r->stdout_text, "leaks");
  c.check_errors = JsonCount(r->stdout_text, "check-errors");
  c.allocated_clusters = JsonCount(r->stdout_text, "allocated-clusters");
  c.output = r->stdout_text + r->stderr_text.substr(0, 4000);
  return c;
}

// (b): no corruption, no leak, no error.
void ExpectQemuClean(const QemuCheck& c) {
  EXPECT_EQ(c.corruptions, 0u) << c.output;
  EXPECT_EQ(c.leaks, 0u) << "leaked clusters after Flush and close\n" << c.output;
  EXPECT_EQ(c.check_errors, 0u) << c.output;
  EXPECT_EQ(c.exit_code, 0) << c.output;
}

void ExpectQemuClean(const std::string& image) {
  ASSERT_OK_AND_ASSIGN(QemuCheck c, RunQemuCheck(image));
  ExpectQemuClean(c);
}

// (c): the qcow2 disk, backing chain included, reads as the raw twin.
void ExpectSameAsRaw(const std::string& image, const std::string& raw) {
  ASSERT_OK_AND_ASSIGN(CommandResult r, RunCommand({"qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw}));
  EXPECT_TRUE(r.ok()) << "qemu-img compare " << image << " " << raw << ": " << r.status.ToString() << "\n"
                      << r.stdout_text << r.stderr_text;
}

// (d) in the file itself: the freed host cluster at `offset` was given back
// to the file system (punched). The part of it inside the file must read
// as zeros, and its whole file-system blocks must be a hole; a partial last
// block (a compressed cluster at the end of the file) can only be zeroed.
// Whether the file system holding `path` punches holes (fallocate
// PUNCH_HOLE). Where it cannot, the engine may only leave the bytes.
bool PunchesHoles(const std::string& path) {
  const std::string probe = path + ".punch-probe";
  const int fd = open(probe.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  const std::string data(2 * kCluster, 'x');
  bool ok = pwrite(fd, data.data(), data.size(), 0) == static_cast<ssize_t>(data.size()) && fsync(fd) == 0 &&
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kCluster) == 0;
  ok = ok && lseek(fd, 0, SEEK_DATA) >= static_cast<off_t>(kCluster);
  close(fd);
  unlink(probe.c_str());
  return ok;
}

void ExpectPunched(const std::string& path, uint64_t offset) {
  constexpr uint64_t kBlock = 4096;
  static const bool punches = PunchesHoles(path);
  ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(path));
  ASSERT_OK_AND_ASSIGN(uint64_t size, FileSize(fd.get()));
  const uint64_t end = std::min(offset + kCluster, size);
  if (end <= offset) return;  // past the end of the file: nothing left
  EXPECT_OK(CheckZeros(fd.get(), {offset, end - offset})) << "the freed host cluster " << Hex(offset);
  const uint64_t block_end = end / kBlock * kBlock;
  if (block_end <= offset || !punches) return;
  ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> data, DataRegions(fd.get()));
  for (const ByteRange& r : data) {
    EXPECT_FALSE(r.offset < block_end && offset < r.end())
        << "the freed host cluster " << Hex(offset) << " still holds data in the file at " << r;
  }
}

// --- The engine -----------------------------------------------------------------

ImageOptions ReadWrite(uint64_t l2_cache_size = ImageOptions{}.l2_cache_size,
                       DetectZeroes detect_zeroes = DetectZeroes::kOff) {
  ImageOptions o;
  o.read_only = false;
  o.l2_cache_size = l2_cache_size;
  o.detect_zeroes = detect_zeroes;
  return o;
}

absl::StatusOr<std::unique_ptr<Image>> OpenImage(const std::string& path, ImageOptions options = ReadWrite()) {
  return SyncWait(Image::Open(path, std::move(options)));
}

// What a zeroing does to the raw twin. A range inside the file is punched
// (writing the 1 GiB of zeros of ZeroBigRangeTest took 5 s, 15 s under
// ThreadSanitizer); one past its end, or on a file system that cannot
// punch, is written.
absl::Status ZeroRaw(const std::string& raw, uint64_t offset, uint64_t length) {
  const int fd = open(raw.c_str(), O_RDWR | O_CLOEXEC);
  struct stat st;
  const bool punched = fd >= 0 && fstat(fd, &st) == 0 && offset + length <= static_cast<uint64_t>(st.st_size) &&
                       fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                                 static_cast<off_t>(length)) == 0;
  if (fd >= 0) close(fd);
  if (punched) return absl::OkStatus();
  return WriteFileAt(raw, offset, std::string(length, '\0'));
}

// --- The cases ----------------------------------------------------------------------

enum class Format { kStandard, kExtended, kV2 };
enum class Start {
  kData,                  // qemu-io write
  kCompressed,            // qemu-io write -c
  kZeroWithHost,          // qemu-io write, then write -z: a preallocated zero cluster
  kZeroNoHost,            // qemu-io write -z over nothing
  kUnallocated,           // nothing written
  kMetadataPreallocated,  // qemu-img create -o preallocation=metadata: a host cluster and,
                          // with extended L2, every subcluster unallocated
  kMixedSubclusters,      // extended L2: subclusters 0..3 data, 8..9 zero, the rest unallocated
};
enum class Op { kDiscard, kZero, kZeroUnmap, kPreallocate };
// The part of the target cluster a request covers.
enum class Span {
  kWholeCluster,      // [0, 64K)
  kWholeSubclusters,  // [8K, 24K): subclusters 4..11 (extended L2 only)
  kUnaligned,         // [5000, 30000): subclusters 3..13 whole, 2 and 14 in part
  kInsideSubcluster,  // [2100, 3000): 900 bytes of subcluster 1
};

const char* Name(Format f) {
  switch (f) {
    case Format::kStandard:
      return "Standard";
    case Format::kExtended:
      return "ExtendedL2";
    case Format::kV2:
      return "V2";
  }
  return "?";
}
const char* Name(Start s) {
  switch (s) {
    case Start::kData:
      return "Data";
    case Start::kCompressed:
      return "Compressed";
    case Start::kZeroWithHost:
      return "ZeroWithHost";
    case Start::kZeroNoHost:
      return "ZeroNoHost";
    case Start::kUnallocated:
      return "Unallocated";
    case Start::kMetadataPreallocated:
      return "MetadataPreallocated";
    case Start::kMixedSubclusters:
      return "MixedSubclusters";
  }
  return "?";
}
const char* Name(Op o) {
  switch (o) {
    case Op::kDiscard:
      return "Discard";
    case Op::kZero:
      return "Zero";
    case Op::kZeroUnmap:
      return "ZeroUnmap";
    case Op::kPreallocate:
      return "Preallocate";
  }
  return "?";
}
const char* Name(Span s) {
  switch (s) {
    case Span::kWholeCluster:
      return "WholeCluster";
    case Span::kWholeSubclusters:
      return "WholeSubclusters";
    case Span::kUnaligned:
      return "Unaligned";
    case Span::kInsideSubcluster:
      return "InsideSubcluster";
  }
  return "?";
}

// Guest cluster 1 is the one each case changes; clusters 0 and 2 hold data
// and must come through untouched.
constexpr uint64_t kTarget = kCluster;

std::pair<uint64_t, uint64_t> SpanRange(Span s) {  // within the cluster
  switch (s) {
    case Span::kWholeCluster:
      return {0, kCluster};
    case Span::kWholeSubclusters:
      return {8 * kKiB, 24 * kKiB};
    case Span::kUnaligned:
      return {5000, 30000};
    case Span::kInsideSubcluster:
      return {2100, 3000};
  }
  return {0, 0};
}

struct Case {
  Format format;
  bool backing;
  Start start;
  Op op;
  Span span;
};

std::string CaseName(const Case& c) {
  return absl::StrCat(Name(c.format), "_", c.backing ? "Backing" : "NoBacking", "_", Name(c.start), "_", Name(c.op),
                      "_", Name(c.span));
}

void PrintTo(const Case& c, std::ostream* out) { *out << CaseName(c); }
void PrintTo(Format f, std::ostream* out) { *out << Name(f); }
void PrintTo(Op o, std::ostream* out) { *out << Name(o); }
void PrintTo(Span s, std::ostream* out) { *out << Name(s); }

// What the target entry must be afterwards.
enum class Host {
  kUnchanged,  // the whole entry is as it was
  kNone,       // no host cluster
  kOld,        // the host cluster it had
  kNew,        // a host cluster it did not have
};

struct Expected {
  Host host;
  bool zero_flag = false;   // standard entries: bit 0
  uint64_t bitmap = 0;      // extended entries
  int used_delta = 0;       // host clusters allocated minus freed
  uint64_t data_bytes = 0;  // guest data (explicit zeros) the engine wrote
};

std::ostream& operator<<(std::ostream& out, const Expected& e) {
  static const char* const kHost[] = {"unchanged", "none", "old", "new"};
  return out << "{host " << kHost[static_cast<int>(e.host)] << ", zero flag " << e.zero_flag << ", bitmap "
             << Hex(e.bitmap) << ", used clusters " << e.used_delta << ", data bytes " << e.data_bytes << "}";
}

// The state of each subcluster of the target cluster before the request
// (standard entries: one "subcluster", the cluster).
struct Before {
  bool host;       // has a host cluster (compressed clusters: no)
  uint64_t alloc;  // allocated subclusters (bitmap bits 0-31)
  uint64_t zero;   // zero subclusters (bitmap bits 32-63, shifted down)
};

Before BeforeOf(Start start, bool ext) {
  const uint64_t all = ext ? kAllAlloc : 1;
  switch (start) {
    case Start::kData:
      return {true, all, 0};
    case Start::kCompressed:
      return {false, 0, 0};
    case Start::kZeroWithHost:
      return {true, 0, all};
    case Start::kZeroNoHost:
      return {false, 0, all};
    case Start::kUnallocated:
      return {false, 0, 0};
    // Standard entries: an ordinary data cluster whose host bytes are a hole.
    case Start::kMetadataPreallocated:
      return {true, ext ? uint64_t{0} : uint64_t{1}, 0};
    case Start::kMixedSubclusters:
      return {true, Subclusters(0, 3), Subclusters(8, 9)};
  }
  return {};
}

// The oracle: the transition table at the top of qcow2_zero.cc for whole
// clusters, and for parts of clusters what its comments promise (zero bits
// for whole subclusters, explicit zeros only where data is, nothing where
// the range reads as zeros already). Written out per state, not computed
// the way the engine does it.
Expected Expect(const Case& c) {
  const bool ext = c.format == Format::kExtended;
  const bool v2 = c.format == Format::kV2;
  const Before was = BeforeOf(c.start, ext);
  const bool compressed = c.start == Start::kCompressed;
  const int freed = (was.host || compressed) ? -1 : 0;
  const Expected unchanged{Host::kUnchanged};
  const Expected unallocated{Host::kNone, false, 0, freed};
  const Expected zero_no_host{Host::kNone, !ext, ext ? kAllZero : 0, freed};
  const Expected zero_keeps_host{Host::kOld, !ext, ext ? kAllZero : 0, 0};
  const Expected zero_new_host{Host::kNew, !ext, ext ? kAllZero : 0, 1};
  // Data in a cluster of its own, all of it written.
  const Expected data_new_host{Host::kNew, false, ext ? kAllAlloc : 0, 1 + freed, kCluster};
  const Expected data_old_host{Host::kOld, false, ext ? kAllAlloc : 0, 0, kCluster};

  if (c.op == Op::kPreallocate) {
    // Any span: every cluster it touches gets a host cluster, reading as
    // it did. Backing data (or a version 2 image, without zero flag) means
    // copying what the guest sees.
    if (was.host || compressed) return unchanged;
    if (c.start == Start::kZeroNoHost) return zero_new_host;
    return (c.backing || v2) ? data_new_host : zero_new_host;
  }

  if (c.span == Span::kWholeCluster) {
    if (v2) {
      // No zero flag: unallocated where nothing shows through and the host
      // cluster may go, zeros written as data otherwise.
      const bool unmap = c.op != Op::kZero && !c.backing;
      if (was.host) return unmap ? unallocated : data_old_host;
      if (compressed) return unmap ? unallocated : data_new_host;
      return c.backing ? data_new_host : unchanged;  // unallocated
    }
    // Discard: "zero, or unallocated without backing"; zero: keeps a host
    // cluster; zero+unmap: frees it. Zero clusters without a host cluster
    // stay as they are; unallocated ones become zero over a backing file.
    const Expected discarded = c.backing ? zero_no_host : unallocated;
    if (c.start == Start::kZeroNoHost) return unchanged;
    if (c.start == Start::kUnallocated) return c.backing ? zero_no_host : unchanged;
    switch (c.op) {
      case Op::kDiscard:
        return discarded;
      case Op::kZero:
        if (compressed) return zero_no_host;
        return c.start == Start::kZeroWithHost ? unchanged : zero_keeps_host;
      default:
        return zero_no_host;
    }
  }

  // Part of the cluster: the same for discard and both kinds of zeroing.
  const auto [begin, end] = SpanRange(c.span);
  const uint64_t sub = ext ? kSub : kCluster;
  auto reads_data = [&](uint64_t i) {  // what BlockStatus calls data
    return ((was.alloc >> i) & 1) || (!((was.zero >> i) & 1) && c.backing);
  };
  bool any_data = compressed;
  for (uint64_t i = begin / sub; i <= (end - 1) / sub; ++i) any_data |= reads_data(i);
  if (!any_data) return unchanged;       // reads as zeros already
  if (compressed) return data_new_host;  // copied out, then zeros written
  if (!ext && c.start == Start::kMetadataPreallocated && !c.backing) {
    // Zeros written into a cluster that held only zeros: it reads as zeros
    // all through, so it ends as a whole-cluster request would leave it
    // (version 2 without unmap has no better way than the zeros written).
    Expected collapsed = c.op == Op::kDiscard ? unallocated
                         : c.op == Op::kZero  ? zero_keeps_host
                                              : zero_no_host;
    if (v2) collapsed = c.op == Op::kZero ? Expected{Host::kOld, false, 0, 0} : unallocated;
    collapsed.data_bytes = end - begin;
    return collapsed;
  }
  if (!ext) {
    if (was.host) return {Host::kOld, false, 0, 0, end - begin};  // zeros written in place
    return data_new_host;                                         // backing data copied, then zeros
  }
  // Extended L2: whole subclusters get their zero bit; subclusters covered
  // in part get zeros written where they read data (copying the backing
  // data into the subcluster first if it is not allocated).
  const uint64_t first = (begin + sub - 1) / sub, last = end / sub;  // whole: [first, last)
  uint64_t alloc = was.alloc, zero = was.zero, data_bytes = 0;
  if (first < last) {
    const uint64_t whole = Subclusters(first, last - 1);
    alloc &= ~whole;
    zero |= whole;
  }
  std::vector<std::pair<uint64_t, uint64_t>> parts;
  if (first >= last) {
    parts.push_back({begin, end});
  } else {
    if (begin < first * sub) parts.push_back({begin, first * sub});
    if (last * sub < end) parts.push_back({last * sub, end});
  }
  bool needs_host = false;
  for (const auto& [from, to] : parts) {
    const uint64_t i = from / sub;
    if (!reads_data(i)) continue;
    if ((was.alloc >> i) & 1) {
      data_bytes += to - from;  // in place
    } else {
      alloc |= uint64_t{1} << i;  // copy-on-write of the whole subcluster
      data_bytes += sub;
      needs_host = true;
    }
  }
  const uint64_t bitmap = alloc | (zero << 32);
  if (was.host) return {Host::kOld, false, bitmap, 0, data_bytes};
  if (needs_host) return {Host::kNew, false, bitmap, 1, data_bytes};
  return {Host::kNone, false, bitmap, 0, data_bytes};
}

// The state a starting entry is in, to check that qemu made what the case
// wants.
std::optional<Start> StateOf(const Entry& e, bool ext) {
  if (e.compressed()) return Start::kCompressed;
  if (!ext) {
    if (e.descriptor == 0) return Start::kUnallocated;
    if (e.descriptor == kOflagZero) return Start::kZeroNoHost;
    if (e.host() != 0 && (e.descriptor & kOflagZero)) return Start::kZeroWithHost;
    if (e.host() != 0) return Start::kData;
    return std::nullopt;
  }
  if (e.host() == 0 && e.bitmap == 0) return Start::kUnallocated;
  if (e.host() == 0 && e.bitmap == kAllZero) return Start::kZeroNoHost;
  if (e.host() != 0 && e.bitmap == kAllZero) return Start::kZeroWithHost;
  if (e.host() != 0 && e.bitmap == kAllAlloc) return Start::kData;
  if (e.host() != 0 && e.bitmap == 0) return Start::kMetadataPreallocated;
  if (e.host() != 0 && e.bitmap == (Subclusters(0, 3) | (Subclusters(8, 9) << 32))) return Start::kMixedSubclusters;
  return std::nullopt;
}

// What StateOf must say of a cluster in `start`.
Start LooksLike(Start start, bool ext) {
  return (start == Start::kMetadataPreallocated && !ext) ? Start::kData : start;
}

// qemu-io commands that put the target cluster in `start`; clusters 0 and 2
// always hold data.
std::vector<std::string> SetupCommands(Start start) {
  std::vector<std::string> cmds = {"write -P 0x11 0 64k", "write -P 0x33 128k 64k"};
  switch (start) {
    case Start::kData:
      cmds.push_back("write -P 0x22 64k 64k");
      break;
    case Start::kCompressed:
      cmds.push_back("write -c -P 0x22 64k 64k");
      break;
    case Start::kZeroWithHost:  // without -u, QEMU keeps the host cluster
      cmds.push_back("write -P 0x22 64k 64k");
      cmds.push_back("write -z 64k 64k");
      break;
    case Start::kZeroNoHost:
      cmds.push_back("write -z 64k 64k");
      break;
    case Start::kUnallocated:
    case Start::kMetadataPreallocated:  // see CreateExtras
      break;
    case Start::kMixedSubclusters:
      cmds.push_back("write -P 0x22 64k 8k");  // subclusters 0..3
      cmds.push_back("write -z 80k 4k");       // subclusters 8..9
      break;
  }
  return cmds;
}

// Options for qemu-img create that the starting state needs.
std::vector<std::string> CreateExtras(Start start) {
  if (start == Start::kMetadataPreallocated) return {"preallocation=metadata"};
  return {};
}

// A qcow2 image (over a qcow2 backing file filled with kBackingByte, if
// wanted) and its raw twin, both after `commands`.
struct Images {
  std::string image;
  std::string raw;
  std::string base;  // empty without backing
};

std::vector<std::string> CreateOptions(Format format) {
  std::vector<std::string> options = {"cluster_size=65536"};
  if (format == Format::kExtended) options.push_back("extended_l2=on");
  if (format == Format::kV2) options.push_back("compat=0.10");
  return options;
}

absl::StatusOr<Images> MakeImages(const TempDir& dir, Format format, bool backing,
                                  const std::vector<std::string>& commands, uint64_t size = kDisk,
                                  const std::vector<std::string>& extra_options = {}) {
  Images p{dir.Join("disk.qcow2"), dir.Join("twin.raw"), ""};
  std::vector<std::string> options = CreateOptions(format);
  options.insert(options.end(), extra_options.begin(), extra_options.end());
  const std::string fill = absl::StrFormat("write -P %#x 0 %u", kBackingByte, size);
  absl::Status s = CreateImage(p.raw, "raw", size);
  if (s.ok() && backing) {
    p.base = dir.Join("base.qcow2");
    s = CreateImage(p.base, "qcow2", size, CreateOptions(format));
    if (s.ok()) s = QemuIo(p.base, "qcow2", {fill});
    if (s.ok()) s = QemuIo(p.raw, "raw", {fill});
    options.push_back("backing_file=" + p.base);
    options.push_back("backing_fmt=qcow2");
  }
  if (s.ok()) s = CreateImage(p.image, "qcow2", size, options);
  // A raw file holds no compressed data: the same write, uncompressed.
  std::vector<std::string> raw_commands;
  for (std::string c : commands) {
    if (c.rfind("write -c ", 0) == 0) c = "write " + c.substr(9);
    raw_commands.push_back(c);
  }
  if (s.ok() && !commands.empty()) s = QemuIo(p.image, "qcow2", commands);
  if (s.ok() && !raw_commands.empty()) s = QemuIo(p.raw, "raw", raw_commands);
  if (!s.ok()) return s;
  return p;
}

absl::Status Apply(Image& image, Op op, uint64_t offset, uint64_t length) {
  switch (op) {
    case Op::kDiscard:
      return SyncWait(image.Discard(offset, length));
    case Op::kZero:
      return SyncWait(image.WriteZeroes(offset, length, false));
    case Op::kZeroUnmap:
      return SyncWait(image.WriteZeroes(offset, length, true));
    case Op::kPreallocate:
      return SyncWait(image.Preallocate(offset, length));
  }
  return absl::InternalError("no such op");
}

std::vector<Case> AllCases() {
  std::vector<Case> cases;
  for (Format format : {Format::kStandard, Format::kExtended, Format::kV2}) {
    for (bool backing : {false, true}) {
      for (Start start : {Start::kData, Start::kCompressed, Start::kZeroWithHost, Start::kZeroNoHost,
                          Start::kUnallocated, Start::kMetadataPreallocated, Start::kMixedSubclusters}) {
        // Version 2 has no zero clusters, only extended L2 has subclusters,
        // and QEMU preallocates metadata over a backing file only with
        // extended L2.
        if (format == Format::kV2 && (start == Start::kZeroWithHost || start == Start::kZeroNoHost)) continue;
        if (format != Format::kExtended && start == Start::kMixedSubclusters) continue;
        if (format != Format::kExtended && backing && start == Start::kMetadataPreallocated) continue;
        for (Op op : {Op::kDiscard, Op::kZero, Op::kZeroUnmap, Op::kPreallocate}) {
          for (Span span : {Span::kWholeCluster, Span::kWholeSubclusters, Span::kUnaligned, Span::kInsideSubcluster}) {
            // Whole subclusters mean something only with extended L2.
            if (span == Span::kWholeSubclusters && format != Format::kExtended) continue;
            cases.push_back({format, backing, start, op, span});
          }
        }
      }
    }
  }
  return cases;
}

class ZeroTransitionTest : public ::testing::TestWithParam<Case> {};

TEST_P(ZeroTransitionTest, EntryCheckCompareAndRefcounts) {
  const Case& c = GetParam();
  const bool ext = c.format == Format::kExtended;
  const Expected want = Expect(c);
  SCOPED_TRACE(::testing::Message() << CaseName(c) << ": expecting " << want);

  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-" + CaseName(c)));
  ASSERT_OK_AND_ASSIGN(Images p,
                       MakeImages(dir, c.format, c.backing, SetupCommands(c.start), kDisk, CreateExtras(c.start)));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(p.image));
  const Entry old = EntryAt(before, kTarget);
  ASSERT_EQ(StateOf(old, ext), LooksLike(c.start, ext)) << "qemu made " << old;
  ASSERT_OK_AND_ASSIGN(QemuCheck check_before, RunQemuCheck(p.image));
  ASSERT_EQ(check_before.corruptions + check_before.leaks, 0u) << check_before.output;

  const auto [begin, end] = SpanRange(c.span);
  ImageCounters counters;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    ASSERT_OK(Apply(*image, c.op, kTarget + begin, end - begin));
    ASSERT_OK(SyncWait(image->Flush()));
    counters = image->counters();
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
  const Entry now = EntryAt(after, kTarget);

  // (a) The entry.
  SCOPED_TRACE(::testing::Message() << "entry before " << old << ", after " << now);
  switch (want.host) {
    case Host::kUnchanged:
      EXPECT_EQ(now, old) << "the entry must not change";
      break;
    case Host::kNone:
      EXPECT_EQ(now.descriptor, want.zero_flag ? kOflagZero : 0) << "no host cluster, no flags but the zero flag";
      EXPECT_EQ(now.bitmap, want.bitmap);
      break;
    case Host::kOld:
    case Host::kNew:
      EXPECT_FALSE(now.compressed());
      EXPECT_NE(now.host(), 0u);
      if (want.host == Host::kOld) {
        EXPECT_EQ(now.host(), old.host()) << "the host cluster must be kept";
      } else {
        EXPECT_NE(now.host(), old.host()) << "a new host cluster was expected";
      }
      EXPECT_TRUE(now.descriptor & kOflagCopied) << "COPIED must be set on a cluster with refcount 1";
      EXPECT_EQ(bool(now.descriptor & kOflagZero), want.zero_flag);
      EXPECT_EQ(now.bitmap, want.bitmap);
      EXPECT_EQ(Refcount(after, now.host()), 1u);
      break;
  }
  EXPECT_EQ(EntryAt(after, 0), EntryAt(before, 0)) << "neighbour cluster 0 changed";
  EXPECT_EQ(EntryAt(after, 2 * kCluster), EntryAt(before, 2 * kCluster)) << "neighbour cluster 2 changed";
  EXPECT_EQ(counters.data_bytes_written, want.data_bytes) << "guest data (explicit zeros) written";
  if (want.host == Host::kUnchanged) {
    EXPECT_EQ(counters.l2_slices_dirtied, 0u) << "nothing changed, yet an L2 slice was dirtied";
  }

  // (b) qemu-img check.
  ASSERT_OK_AND_ASSIGN(QemuCheck check_after, RunQemuCheck(p.image));
  ExpectQemuClean(check_after);

  // (d) Host clusters allocated and freed.
  EXPECT_EQ(static_cast<int64_t>(UsedClusters(after)) - static_cast<int64_t>(UsedClusters(before)), want.used_delta)
      << "host clusters with a refcount, after minus before";
  EXPECT_EQ(
      static_cast<int64_t>(check_after.allocated_clusters) - static_cast<int64_t>(check_before.allocated_clusters),
      want.used_delta)
      << "qemu-img check's allocated-clusters, after minus before";
  const bool freed = want.host == Host::kNone || want.host == Host::kNew;
  if (freed && old.compressed()) {
    const auto [first, last] = CompressedHostClusters(old.descriptor, 16);
    for (uint64_t hc = first; hc < last; ++hc) {
      EXPECT_EQ(Refcount(after, hc * kCluster), 0u)
          << "host cluster " << Hex(hc * kCluster) << " of the compressed data";
      ExpectPunched(p.image, hc * kCluster);
    }
  } else if (freed && old.host() != 0) {
    EXPECT_EQ(Refcount(after, old.host()), 0u) << "the old host cluster " << Hex(old.host()) << " is still counted";
    ExpectPunched(p.image, old.host());
  }

  // (c) Same disk as the raw twin.
  if (c.op != Op::kPreallocate) {
    ASSERT_OK(ZeroRaw(p.raw, kTarget + begin, end - begin));
  }
  ExpectSameAsRaw(p.image, p.raw);
}

INSTANTIATE_TEST_SUITE_P(AllTransitions, ZeroTransitionTest, ::testing::ValuesIn(AllCases()),
                         [](const ::testing::TestParamInfo<Case>& info) { return CaseName(info.param); });

// --- Requests that change nothing write nothing ------------------------------------------

// A request on a range that already reads as it would make it, without a
// host cluster in the way, must change nothing: no L2 slice dirtied, no
// metadata written, no data written, before or after a Flush.
struct Repeat {
  std::optional<Op> first;  // applied (and flushed) before the measured request
  Op second;                // the measured request
  // Whether the measured request may write data: zeros written into the
  // unaligned head and tail of a range are data, and are written again.
  bool may_write_data = false;
};

class ZeroNoOpTest : public ::testing::TestWithParam<Format> {
 protected:
  // Makes an image (cluster 0 data, so the L2 table exists, then `setup`),
  // opens it, applies `r.first` if any and flushes, then measures `r.second`
  // over [offset, offset + length).
  void Run(const std::vector<std::string>& setup, const Repeat& r, uint64_t offset, uint64_t length) {
    const Format format = GetParam();
    ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-noop"));
    std::vector<std::string> cmds = {"write -P 0x11 0 64k"};
    cmds.insert(cmds.end(), setup.begin(), setup.end());
    ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, format, false, cmds));
    ASSERT_OK_AND_ASSIGN(std::string original, ReadFile(p.image));
    {
      ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
      if (r.first) {
        ASSERT_OK(Apply(*image, *r.first, offset, length));
        ASSERT_OK(SyncWait(image->Flush()));
      }
      const ImageCounters a = image->counters();
      ASSERT_OK(Apply(*image, r.second, offset, length));
      const ImageCounters b = image->counters();
      ASSERT_OK(SyncWait(image->Flush()));
      const ImageCounters c = image->counters();
      EXPECT_EQ(b.l2_slices_dirtied, a.l2_slices_dirtied) << "the request dirtied an L2 slice";
      EXPECT_EQ(b.metadata_writes, a.metadata_writes) << "the request wrote metadata";
      EXPECT_EQ(c.l2_slices_dirtied, a.l2_slices_dirtied);
      EXPECT_EQ(c.metadata_writes, a.metadata_writes) << "the Flush after the request wrote metadata";
      if (!r.may_write_data) {
        EXPECT_EQ(b.data_bytes_written, a.data_bytes_written) << "the request wrote data";
      }
      if (!r.first) {
        EXPECT_EQ(c.l2_slices_dirtied, 0u);
        EXPECT_EQ(c.metadata_writes, 0u);
        EXPECT_EQ(c.data_bytes_written, 0u);
      }
    }
    if (!r.first) {
      ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
      EXPECT_TRUE(after == original) << "a request that changes nothing changed the image file";
    }
    ExpectQemuClean(p.image);
    if (r.second != Op::kPreallocate) {
      ASSERT_OK(ZeroRaw(p.raw, offset, length));
    }
    ExpectSameAsRaw(p.image, p.raw);
  }
};

// Already as the request would make it.
TEST_P(ZeroNoOpTest, DiscardUnallocatedWithoutBacking) {
  Run({}, {std::nullopt, Op::kDiscard}, kCluster, 3 * kCluster);
}
TEST_P(ZeroNoOpTest, DiscardUnallocatedUnalignedWithoutBacking) {
  Run({}, {std::nullopt, Op::kDiscard}, kCluster + 1000, 2 * kCluster);
}
TEST_P(ZeroNoOpTest, DiscardUnallocatedToTheEndOfTheDisk) {
  Run({}, {std::nullopt, Op::kDiscard}, kDisk - 2 * kCluster, 2 * kCluster);
}
TEST_P(ZeroNoOpTest, ZeroUnallocatedWithoutBacking) { Run({}, {std::nullopt, Op::kZero}, kCluster, 3 * kCluster); }
TEST_P(ZeroNoOpTest, ZeroZeroCluster) { Run({"write -z 64k 128k"}, {std::nullopt, Op::kZero}, kCluster, 2 * kCluster); }
TEST_P(ZeroNoOpTest, ZeroUnmapZeroCluster) {
  Run({"write -z 64k 128k"}, {std::nullopt, Op::kZeroUnmap}, kCluster, 2 * kCluster);
}
TEST_P(ZeroNoOpTest, DiscardZeroCluster) {
  Run({"write -z 64k 128k"}, {std::nullopt, Op::kDiscard}, kCluster, 2 * kCluster);
}
TEST_P(ZeroNoOpTest, ZeroPreallocatedZeroCluster) {
  Run({"write -P 0x22 64k 64k", "write -z 64k 64k"}, {std::nullopt, Op::kZero}, kCluster, kCluster);
}
TEST_P(ZeroNoOpTest, ZeroPartOfZeroCluster) {
  Run({"write -z 64k 64k"}, {std::nullopt, Op::kZero}, kCluster + 5000, 25000);
}
TEST_P(ZeroNoOpTest, PreallocateDataCluster) {
  Run({"write -P 0x22 64k 64k"}, {std::nullopt, Op::kPreallocate}, kCluster, kCluster);
}

// The same request twice: the second finds nothing to do.
TEST_P(ZeroNoOpTest, DiscardTwice) {
  Run({"write -P 0x22 64k 128k"}, {Op::kDiscard, Op::kDiscard}, kCluster, 2 * kCluster);
}
TEST_P(ZeroNoOpTest, ZeroTwice) { Run({"write -P 0x22 64k 128k"}, {Op::kZero, Op::kZero}, kCluster, 2 * kCluster); }
TEST_P(ZeroNoOpTest, ZeroUnmapTwice) {
  Run({"write -P 0x22 64k 128k"}, {Op::kZeroUnmap, Op::kZeroUnmap}, kCluster, 2 * kCluster);
}
TEST_P(ZeroNoOpTest, ZeroAfterDiscard) {
  Run({"write -P 0x22 64k 128k"}, {Op::kDiscard, Op::kZero}, kCluster, 2 * kCluster);
}
TEST_P(ZeroNoOpTest, DiscardAfterZeroUnmap) {
  Run({"write -P 0x22 64k 128k"}, {Op::kZeroUnmap, Op::kDiscard}, kCluster, 2 * kCluster);
}
TEST_P(ZeroNoOpTest, PreallocateTwice) { Run({}, {Op::kPreallocate, Op::kPreallocate}, kCluster, 2 * kCluster); }
// Unaligned: the zeros written into the partial head and tail are data and
// may be written again, but no entry changes.
TEST_P(ZeroNoOpTest, DiscardTwiceUnaligned) {
  Run({"write -P 0x22 64k 128k"}, {Op::kDiscard, Op::kDiscard, true}, kCluster + 5000, kCluster + 20000);
}
TEST_P(ZeroNoOpTest, ZeroTwiceUnaligned) {
  Run({"write -P 0x22 64k 128k"}, {Op::kZero, Op::kZero, true}, kCluster + 5000, kCluster + 20000);
}

INSTANTIATE_TEST_SUITE_P(Formats, ZeroNoOpTest, ::testing::Values(Format::kStandard, Format::kExtended),
                         [](const ::testing::TestParamInfo<Format>& info) { return std::string(Name(info.param)); });

// --- Known zero: no L2 reads, even after eviction -----------------------------------------

// A 2 GiB disk with 4 KiB of data every 16 MiB: 128 L2 slices of 4 KiB
// (32 MiB of guest space each with standard entries, 16 MiB with extended),
// far more than a 64 KiB cache holds. Clusters 1..3 are the range under
// test, in `setup`'s state; `first` makes them known zero; then every other
// slice is read, evicting theirs; then `repeats` must not read an L2 slice
// (nor dirty, nor write anything).
struct KnownZeroCase {
  const char* name;
  std::vector<std::string> setup;  // qemu-io commands for clusters 1..3
  Op first;
  std::vector<Op> repeats;
};

std::ostream& operator<<(std::ostream& out, const KnownZeroCase& c) { return out << c.name; }

const KnownZeroCase kKnownZeroCases[] = {
    {"AfterDiscardOfData", {"write -P 0x22 64k 192k"}, Op::kDiscard, {Op::kDiscard, Op::kZero, Op::kZeroUnmap}},
    {"AfterZeroUnmapOfData", {"write -P 0x22 64k 192k"}, Op::kZeroUnmap, {Op::kZeroUnmap, Op::kZero, Op::kDiscard}},
    {"AfterDiscardOfUnallocated", {}, Op::kDiscard, {Op::kDiscard, Op::kZero, Op::kZeroUnmap}},
    {"AfterZeroOfZeroClusters", {"write -z 64k 192k"}, Op::kZero, {Op::kZero, Op::kZeroUnmap, Op::kDiscard}},
    // Zeroing without unmap keeps the host clusters (preallocated zero
    // clusters): the range reads as zeros, and zeroing it again changes
    // nothing.
    {"AfterZeroKeepingHostOfData", {"write -P 0x22 64k 192k"}, Op::kZero, {Op::kZero}},
};

class ZeroKnownZeroTest : public ::testing::TestWithParam<std::tuple<Format, KnownZeroCase>> {};

TEST_P(ZeroKnownZeroTest, RepeatedRequestsReadNoL2SliceAfterEviction) {
  const auto& [format, kc] = GetParam();
  constexpr uint64_t kBig = 2048 * kMiB;
  constexpr uint64_t kStride = 16 * kMiB;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-known"));
  std::vector<std::string> cmds;
  for (uint64_t o = 0; o < kBig; o += kStride) {
    cmds.push_back(absl::StrFormat("write -P 0x%x %u 4k", 1 + (o / kStride) % 250, o));
  }
  cmds.insert(cmds.end(), kc.setup.begin(), kc.setup.end());
  ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, format, false, cmds, kBig));
  const uint64_t offset = kCluster, length = 3 * kCluster;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image, ReadWrite(64 * kKiB)));
    ASSERT_OK(Apply(*image, kc.first, offset, length));
    ASSERT_OK(SyncWait(image->Flush()));

    // Read every other slice's data, so the first slice is evicted.
    std::vector<uint8_t> buf(4096);
    for (uint64_t o = kStride; o < kBig; o += kStride) ASSERT_OK(SyncWait(image->Read(o, buf)));
    const uint64_t evicted_reads = image->counters().l2_slice_reads;
    for (Op op : kc.repeats) {
      SCOPED_TRACE(::testing::Message() << "repeated " << Name(op));
      const ImageCounters a = image->counters();
      ASSERT_OK(Apply(*image, op, offset, length));
      ASSERT_OK(Apply(*image, op, offset + 1000, length - 5000));  // and an unaligned part of it
      const ImageCounters b = image->counters();
      EXPECT_EQ(b.l2_slice_reads, a.l2_slice_reads) << "a request on a range known zero read an L2 slice";
      EXPECT_EQ(b.l2_slices_dirtied, a.l2_slices_dirtied);
      EXPECT_EQ(b.metadata_writes, a.metadata_writes);
      EXPECT_EQ(b.data_bytes_written, a.data_bytes_written);
    }
    // The slice really was evicted: reading cluster 0, in the same slice
    // but not known zero, must miss (unless a repeat above read it again,
    // which proves it as well).
    const uint64_t reads = image->counters().l2_slice_reads;
    if (reads == evicted_reads) {
      ASSERT_OK(SyncWait(image->Read(0, buf)));
      EXPECT_EQ(image->counters().l2_slice_reads, reads + 1)
          << "the first L2 slice was still cached: the test did not prove anything";
    }
    ASSERT_OK(SyncWait(image->Flush()));
  }
  ExpectQemuClean(p.image);
  ASSERT_OK(ZeroRaw(p.raw, offset, length));
  ExpectSameAsRaw(p.image, p.raw);
}

INSTANTIATE_TEST_SUITE_P(All, ZeroKnownZeroTest,
                         ::testing::Combine(::testing::Values(Format::kStandard, Format::kExtended),
                                            ::testing::ValuesIn(kKnownZeroCases)),
                         [](const ::testing::TestParamInfo<std::tuple<Format, KnownZeroCase>>& info) {
                           return absl::StrCat(Name(std::get<0>(info.param)), "_", std::get<1>(info.param).name);
                         });

// --- detect_zeroes -----------------------------------------------------------------------------

struct DetectCase {
  const char* name;
  Format format;
  DetectZeroes mode;
  bool backing;
  bool start_data;  // target cluster holds data (else unallocated)
  bool zeros;       // the write's buffer is all zeros
  // Expected target entry.
  Host host;
  bool zero_flag;
  uint64_t bitmap;
  int used_delta;
  uint64_t data_bytes;
};

std::ostream& operator<<(std::ostream& out, const DetectCase& c) { return out << c.name; }

// Short names for the table.
constexpr Format kStd = Format::kStandard, kExt = Format::kExtended;
constexpr DetectZeroes kOff = DetectZeroes::kOff, kOn = DetectZeroes::kOn, kUnmap = DetectZeroes::kUnmap;

// clang-format off
const DetectCase kDetectCases[] = {
    // name, format, mode, backing, start data, zeros, host, zero flag, bitmap, used, data bytes
    {"Off_WritesZerosAsData", kStd, kOff, false, true, true, Host::kOld, false, 0, 0, kCluster},
    {"Off_UnallocatedAllocates", kStd, kOff, false, false, true, Host::kNew, false, 0, 1, kCluster},
    {"On_DataBecomesZeroKeepingHost", kStd, kOn, false, true, true, Host::kOld, true, 0, 0, 0},
    {"On_UnallocatedOverBackingBecomesZero", kStd, kOn, true, false, true, Host::kNone, true, 0, 0, 0},
    {"On_UnallocatedStaysUnallocated", kStd, kOn, false, false, true, Host::kUnchanged, false, 0, 0, 0},
    {"On_NonZeroDataIsWritten", kStd, kOn, false, true, false, Host::kOld, false, 0, 0, kCluster},
    {"Unmap_DataIsFreed", kStd, kUnmap, false, true, true, Host::kNone, true, 0, -1, 0},
    {"Unmap_DataOverBackingIsFreed", kStd, kUnmap, true, true, true, Host::kNone, true, 0, -1, 0},
    {"ExtendedL2_Off_WritesZerosAsData", kExt, kOff, false, true, true, Host::kOld, false, kAllAlloc, 0, kCluster},
    {"ExtendedL2_On_DataBecomesZeroKeepingHost", kExt, kOn, false, true, true, Host::kOld, false, kAllZero, 0, 0},
    {"ExtendedL2_Unmap_DataIsFreed", kExt, kUnmap, false, true, true, Host::kNone, false, kAllZero, -1, 0},
};
// clang-format on

class ZeroDetectTest : public ::testing::TestWithParam<DetectCase> {};

TEST_P(ZeroDetectTest, WholeClusterWrite) {
  const DetectCase& c = GetParam();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-detect"));
  std::vector<std::string> cmds = {"write -P 0x11 0 64k"};
  if (c.start_data) cmds.push_back("write -P 0x22 64k 64k");
  ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, c.format, c.backing, cmds));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(p.image));
  const Entry old = EntryAt(before, kTarget);
  const std::vector<uint8_t> data = c.zeros ? std::vector<uint8_t>(kCluster, 0) : Pattern(kCluster, 7);
  ImageCounters counters;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image,
                         OpenImage(p.image, ReadWrite(ImageOptions{}.l2_cache_size, c.mode)));
    ASSERT_OK(SyncWait(image->Write(kTarget, data)));
    ASSERT_OK(SyncWait(image->Flush()));
    counters = image->counters();
    std::vector<uint8_t> back(kCluster);
    ASSERT_OK(SyncWait(image->Read(kTarget, back)));
    EXPECT_TRUE(back == data) << "the write does not read back";
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
  const Entry now = EntryAt(after, kTarget);
  SCOPED_TRACE(::testing::Message() << "entry before " << old << ", after " << now);
  EXPECT_EQ(counters.data_bytes_written, c.data_bytes);
  switch (c.host) {
    case Host::kUnchanged:
      EXPECT_EQ(now, old);
      break;
    case Host::kNone:
      EXPECT_EQ(now.descriptor, c.zero_flag ? kOflagZero : 0);
      EXPECT_EQ(now.bitmap, c.bitmap);
      break;
    case Host::kOld:
    case Host::kNew:
      EXPECT_NE(now.host(), 0u);
      if (c.host == Host::kOld) {
        EXPECT_EQ(now.host(), old.host());
      }
      EXPECT_TRUE(now.descriptor & kOflagCopied);
      EXPECT_EQ(bool(now.descriptor & kOflagZero), c.zero_flag);
      EXPECT_EQ(now.bitmap, c.bitmap);
      break;
  }
  EXPECT_EQ(static_cast<int64_t>(UsedClusters(after)) - static_cast<int64_t>(UsedClusters(before)), c.used_delta);
  if (c.used_delta < 0) {
    ExpectPunched(p.image, old.host());
  }
  ExpectQemuClean(p.image);
  ASSERT_OK(WriteFileAt(p.raw, kTarget, std::string(data.begin(), data.end())));
  ExpectSameAsRaw(p.image, p.raw);
}

INSTANTIATE_TEST_SUITE_P(Modes, ZeroDetectTest, ::testing::ValuesIn(kDetectCases),
                         [](const ::testing::TestParamInfo<DetectCase>& info) { return std::string(info.param.name); });

// --- Writes into preallocated clusters -----------------------------------------------------

class ZeroPreallocateThenWriteTest : public ::testing::TestWithParam<Format> {};

TEST_P(ZeroPreallocateThenWriteTest, WriteAllocatesNothing) {
  const Format format = GetParam();
  const bool ext = format == Format::kExtended;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-prealloc"));
  ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, format, false, {"write -P 0x11 0 64k"}));
  const std::vector<uint8_t> data = Pattern(4096, 9);
  const uint64_t at = kTarget + 1000;  // subclusters 0..2
  uint64_t host = 0;
  std::string preallocated;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    ASSERT_OK(SyncWait(image->Preallocate(kTarget, 2 * kCluster)));
    ASSERT_OK(SyncWait(image->Flush()));
  }
  ASSERT_OK_AND_ASSIGN(preallocated, ReadFile(p.image));
  const Entry pre = EntryAt(preallocated, kTarget);
  host = pre.host();
  ASSERT_NE(host, 0u) << pre;
  EXPECT_TRUE(pre.descriptor & kOflagCopied) << pre;
  ASSERT_OK_AND_ASSIGN(QemuCheck check_pre, RunQemuCheck(p.image));
  ExpectQemuClean(check_pre);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    ASSERT_OK(SyncWait(image->Write(at, data)));
    ASSERT_OK(SyncWait(image->Flush()));
    EXPECT_EQ(image->counters().metadata_writes, format == Format::kV2 ? 0u : 1u)
        << "only the L2 slice with the changed entry may be written";
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
  const Entry now = EntryAt(after, kTarget);
  SCOPED_TRACE(::testing::Message() << "entry after Preallocate " << pre << ", after the write " << now);
  EXPECT_EQ(now.host(), host) << "the write must use the preallocated host cluster";
  EXPECT_TRUE(now.descriptor & kOflagCopied);
  EXPECT_FALSE(now.descriptor & kOflagZero) << "the zero flag must be cleared";
  if (ext) {
    // The written subclusters hold data; the others still read as zeros.
    EXPECT_EQ(now.bitmap, Subclusters(0, 2) | (Subclusters(3, 31) << 32));
  }
  EXPECT_EQ(UsedClusters(after), UsedClusters(preallocated)) << "the write allocated a host cluster";
  ASSERT_OK_AND_ASSIGN(QemuCheck check_after, RunQemuCheck(p.image));
  ExpectQemuClean(check_after);
  EXPECT_EQ(check_after.allocated_clusters, check_pre.allocated_clusters);
  EXPECT_EQ(EntryAt(after, 2 * kCluster), EntryAt(preallocated, 2 * kCluster))
      << "the second preallocated cluster changed";
  ASSERT_OK(WriteFileAt(p.raw, at, std::string(data.begin(), data.end())));
  ExpectSameAsRaw(p.image, p.raw);
}

TEST_P(ZeroPreallocateThenWriteTest, WriteInSameSessionAllocatesNothing) {
  const Format format = GetParam();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-prealloc2"));
  ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, format, false, {"write -P 0x11 0 64k"}));
  const std::vector<uint8_t> data = Pattern(kCluster, 10);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    ASSERT_OK(SyncWait(image->Preallocate(kTarget, kCluster)));
    ASSERT_OK(SyncWait(image->Flush()));
    const ImageCounters a = image->counters();
    ASSERT_OK_AND_ASSIGN(std::string mid, ReadFile(p.image));
    ASSERT_OK(SyncWait(image->Write(kTarget, data)));
    ASSERT_OK(SyncWait(image->Flush()));
    ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
    EXPECT_EQ(UsedClusters(after), UsedClusters(mid)) << "the write allocated a host cluster";
    EXPECT_EQ(EntryAt(after, kTarget).host(), EntryAt(mid, kTarget).host());
    EXPECT_EQ(image->counters().data_bytes_written - a.data_bytes_written, kCluster);
  }
  ExpectQemuClean(p.image);
  ASSERT_OK(WriteFileAt(p.raw, kTarget, std::string(data.begin(), data.end())));
  ExpectSameAsRaw(p.image, p.raw);
}

INSTANTIATE_TEST_SUITE_P(Formats, ZeroPreallocateThenWriteTest,
                         ::testing::Values(Format::kStandard, Format::kExtended, Format::kV2),
                         [](const ::testing::TestParamInfo<Format>& info) { return std::string(Name(info.param)); });

// --- Ranges that touch several clusters, and the end of the disk ----------------------------

// One request over clusters in every state, starting and ending mid-cluster.
class ZeroMixedRangeTest : public ::testing::TestWithParam<std::tuple<Format, Op>> {};

TEST_P(ZeroMixedRangeTest, EveryStateInOneRequest) {
  const auto [format, op] = GetParam();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-mixed"));
  // 0: data, 1: compressed, 2: zero with host, 3: zero, 4: unallocated,
  // 5: data; the request runs from the middle of 0 to the middle of 5.
  std::vector<std::string> cmds = {"write -P 0x11 0 64k", "write -c -P 0x22 64k 64k", "write -P 0x66 320k 64k"};
  if (format != Format::kV2) {
    cmds.push_back("write -P 0x33 128k 64k");
    cmds.push_back("write -z 128k 64k");
    cmds.push_back("write -z 192k 64k");
  }
  ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, format, false, cmds));
  const uint64_t offset = 30000, end = 5 * kCluster + 7000;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    ASSERT_OK(Apply(*image, op, offset, end - offset));
    ASSERT_OK(SyncWait(image->Flush()));
  }
  ExpectQemuClean(p.image);
  if (op != Op::kPreallocate) {
    ASSERT_OK(ZeroRaw(p.raw, offset, end - offset));
  }
  ExpectSameAsRaw(p.image, p.raw);
}

INSTANTIATE_TEST_SUITE_P(All, ZeroMixedRangeTest,
                         ::testing::Combine(::testing::Values(Format::kStandard, Format::kExtended, Format::kV2),
                                            ::testing::Values(Op::kDiscard, Op::kZero, Op::kZeroUnmap,
                                                              Op::kPreallocate)),
                         [](const ::testing::TestParamInfo<std::tuple<Format, Op>>& info) {
                           return absl::StrCat(Name(std::get<0>(info.param)), "_", Name(std::get<1>(info.param)));
                         });

// A disk whose last cluster is partial: a request reaching the end of the
// disk covers that cluster whole, so it is freed like any whole cluster.
class ZeroEndOfDiskTest : public ::testing::TestWithParam<Format> {};

TEST_P(ZeroEndOfDiskTest, DiscardToTheEndFreesThePartialLastCluster) {
  const Format format = GetParam();
  const uint64_t size = kDisk - 32 * kKiB;  // last cluster: 32 KiB of disk
  const uint64_t last = kDisk - kCluster;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-end"));
  ASSERT_OK_AND_ASSIGN(
      Images p,
      MakeImages(dir, format, false, {"write -P 0x11 0 64k", absl::StrFormat("write -P 0x22 %u 32k", last)}, size));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(p.image));
  const Entry old = EntryAt(before, last);
  ASSERT_NE(old.host(), 0u);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    ASSERT_OK(SyncWait(image->Discard(last, size - last)));
    ASSERT_OK(SyncWait(image->Flush()));
    EXPECT_EQ(image->counters().data_bytes_written, 0u) << "zeros were written instead of freeing the cluster";
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
  EXPECT_EQ(EntryAt(after, last), Entry{}) << "the last cluster must become unallocated";
  EXPECT_EQ(UsedClusters(after) + 1, UsedClusters(before));
  EXPECT_EQ(Refcount(after, old.host()), 0u);
  ExpectQemuClean(p.image);
  ASSERT_OK(ZeroRaw(p.raw, last, size - last));
  ExpectSameAsRaw(p.image, p.raw);
}

TEST_P(ZeroEndOfDiskTest, ZeroUnmapToTheEndFreesThePartialLastCluster) {
  const Format format = GetParam();
  const uint64_t size = kDisk - 32 * kKiB;
  const uint64_t last = kDisk - kCluster;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-end2"));
  ASSERT_OK_AND_ASSIGN(
      Images p,
      MakeImages(dir, format, false, {"write -P 0x11 0 64k", absl::StrFormat("write -P 0x22 %u 32k", last)}, size));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(p.image));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    ASSERT_OK(SyncWait(image->WriteZeroes(last, size - last, true)));
    ASSERT_OK(SyncWait(image->Flush()));
    EXPECT_EQ(image->counters().data_bytes_written, 0u);
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
  const Entry now = EntryAt(after, last);
  EXPECT_EQ(now.host(), 0u) << now;
  EXPECT_EQ(UsedClusters(after) + 1, UsedClusters(before));
  ExpectQemuClean(p.image);
  ASSERT_OK(ZeroRaw(p.raw, last, size - last));
  ExpectSameAsRaw(p.image, p.raw);
}

INSTANTIATE_TEST_SUITE_P(Formats, ZeroEndOfDiskTest,
                         ::testing::Values(Format::kStandard, Format::kExtended, Format::kV2),
                         [](const ::testing::TestParamInfo<Format>& info) { return std::string(Name(info.param)); });

// A disk that ends inside a subcluster: a request reaching the end covers
// the last subcluster whole, so it gets its zero bit like the others.
TEST(ZeroEndOfDiskExtendedTest, DiscardToTheEndZeroesThePartialLastSubcluster) {
  const uint64_t size = kDisk - 512;
  const uint64_t last = kDisk - kCluster;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-end-sub"));
  ASSERT_OK_AND_ASSIGN(
      Images p, MakeImages(dir, Format::kExtended, false,
                           {"write -P 0x11 0 64k", absl::StrFormat("write -P 0x22 %u %u", last, size - last)}, size));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(p.image));
  const Entry old = EntryAt(before, last);
  ASSERT_EQ(old.bitmap, kAllAlloc) << old;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    ASSERT_OK(SyncWait(image->Discard(last + 5000, size - last - 5000)));
    ASSERT_OK(SyncWait(image->Flush()));
    EXPECT_EQ(image->counters().data_bytes_written, 3 * kSub - 5000) << "only the head of subcluster 2 is written";
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
  const Entry now = EntryAt(after, last);
  EXPECT_EQ(now.descriptor, old.descriptor);
  EXPECT_EQ(now.bitmap, Subclusters(0, 2) | (Subclusters(3, 31) << 32)) << now;
  ExpectQemuClean(p.image);
  ASSERT_OK(ZeroRaw(p.raw, last + 5000, size - last - 5000));
  ExpectSameAsRaw(p.image, p.raw);
}

// A backing file smaller than the disk: a discarded cluster must read as
// zeros, so it becomes a zero cluster wherever any of the backing file lies
// beneath it, and may become unallocated only past its end.
class ZeroShortBackingTest : public ::testing::TestWithParam<std::tuple<Format, Op>> {};

TEST_P(ZeroShortBackingTest, ClustersOverAndPastTheBackingFile) {
  const auto [format, op] = GetParam();
  const bool ext = format == Format::kExtended;
  const uint64_t base_size = kDisk - 96 * kKiB;  // ends in the middle of cluster 62
  const uint64_t c61 = kDisk - 3 * kCluster, c62 = kDisk - 2 * kCluster, c63 = kDisk - kCluster;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-short-backing"));
  const std::string base = dir.Join("base.qcow2"), image = dir.Join("disk.qcow2"), raw = dir.Join("twin.raw");
  ASSERT_OK(CreateImage(base, "qcow2", base_size, CreateOptions(format)));
  ASSERT_OK(QemuIo(base, "qcow2", {absl::StrFormat("write -P 0x5a 0 %u", base_size)}));
  std::vector<std::string> options = CreateOptions(format);
  options.push_back("backing_file=" + base);
  options.push_back("backing_fmt=qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDisk, options));
  const std::string write = absl::StrFormat("write -P 0x22 %u 192k", c61);
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x11 0 64k", write}));
  ASSERT_OK(CreateImage(raw, "raw", kDisk));
  ASSERT_OK(QemuIo(raw, "raw", {absl::StrFormat("write -P 0x5a 0 %u", base_size), "write -P 0x11 0 64k", write}));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(image));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> img, OpenImage(image));
    ASSERT_OK(Apply(*img, op, c61, 3 * kCluster));
    ASSERT_OK(SyncWait(img->Flush()));
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(image));
  const Entry zero_no_host = ext ? Entry{0, kAllZero} : Entry{kOflagZero, 0};
  if (format != Format::kV2 && (op == Op::kDiscard || op == Op::kZeroUnmap)) {
    EXPECT_EQ(EntryAt(after, c61), zero_no_host) << "over the backing file";
    EXPECT_EQ(EntryAt(after, c62), zero_no_host) << "partly over the backing file";
    EXPECT_EQ(EntryAt(after, c63), op == Op::kDiscard ? Entry{} : zero_no_host) << "past the backing file";
  }
  if (format != Format::kV2 && op == Op::kZero) {
    for (uint64_t c : {c61, c62, c63}) {
      const Entry now = EntryAt(after, c);
      EXPECT_EQ(now.host(), EntryAt(before, c).host()) << "zeroing keeps the host cluster at " << c;
      EXPECT_EQ(now.bitmap, ext ? kAllZero : 0) << now;
      EXPECT_EQ(bool(now.descriptor & kOflagZero), !ext) << now;
    }
  }
  if (format == Format::kV2 && op == Op::kDiscard) {
    EXPECT_EQ(EntryAt(after, c61).host(), EntryAt(before, c61).host()) << "zeros written in place";
    EXPECT_EQ(EntryAt(after, c62).host(), EntryAt(before, c62).host()) << "zeros written in place";
    EXPECT_EQ(EntryAt(after, c63), Entry{}) << "past the backing file nothing shows through";
  }
  ExpectQemuClean(image);
  if (op != Op::kPreallocate) {
    ASSERT_OK(ZeroRaw(raw, c61, 3 * kCluster));
  }
  ExpectSameAsRaw(image, raw);
}

INSTANTIATE_TEST_SUITE_P(All, ZeroShortBackingTest,
                         ::testing::Combine(::testing::Values(Format::kStandard, Format::kExtended, Format::kV2),
                                            ::testing::Values(Op::kDiscard, Op::kZero, Op::kZeroUnmap,
                                                              Op::kPreallocate)),
                         [](const ::testing::TestParamInfo<std::tuple<Format, Op>>& info) {
                           return absl::StrCat(Name(std::get<0>(info.param)), "_", Name(std::get<1>(info.param)));
                         });

// Two compressed clusters whose bytes share one host cluster: freeing one
// drops the shared cluster's refcount to 1 and must neither free nor punch
// it, since the other still reads from it.
class ZeroSharedCompressedTest : public ::testing::TestWithParam<std::tuple<Format, Op, Span>> {};

TEST_P(ZeroSharedCompressedTest, OtherClusterKeepsItsBytes) {
  const auto [format, op, span] = GetParam();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-shared-compressed"));
  ASSERT_OK_AND_ASSIGN(Images p,
                       MakeImages(dir, format, false, {"write -c -P 0x22 0 64k", "write -c -P 0x23 64k 64k"}));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(p.image));
  const Entry a = EntryAt(before, 0), b = EntryAt(before, kCluster);
  ASSERT_TRUE(a.compressed() && b.compressed());
  const auto [a_first, a_end] = CompressedHostClusters(a.descriptor, 16);
  const auto [b_first, b_end] = CompressedHostClusters(b.descriptor, 16);
  ASSERT_EQ(a_first, b_first) << "qemu-io did not pack the two clusters into one host cluster";
  const uint64_t shared = a_first * kCluster;
  ASSERT_EQ(Refcount(before, shared), 2u);
  const auto [begin, end] = SpanRange(span);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    ASSERT_OK(Apply(*image, op, begin, end - begin));
    ASSERT_OK(SyncWait(image->Flush()));
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
  EXPECT_EQ(EntryAt(after, kCluster), b);
  if (op != Op::kPreallocate) {
    EXPECT_FALSE(EntryAt(after, 0).compressed());
    EXPECT_EQ(Refcount(after, shared), 1u) << "the shared host cluster " << Hex(shared);
  }
  ExpectQemuClean(p.image);
  if (op != Op::kPreallocate) {
    ASSERT_OK(ZeroRaw(p.raw, begin, end - begin));
  }
  ExpectSameAsRaw(p.image, p.raw);
}

INSTANTIATE_TEST_SUITE_P(All, ZeroSharedCompressedTest,
                         ::testing::Combine(::testing::Values(Format::kStandard, Format::kExtended, Format::kV2),
                                            ::testing::Values(Op::kDiscard, Op::kZero, Op::kZeroUnmap,
                                                              Op::kPreallocate),
                                            ::testing::Values(Span::kWholeCluster, Span::kUnaligned)),
                         [](const ::testing::TestParamInfo<std::tuple<Format, Op, Span>>& info) {
                           return absl::StrCat(Name(std::get<0>(info.param)), "_", Name(std::get<1>(info.param)), "_",
                                               Name(std::get<2>(info.param)));
                         });

// An internal snapshot shares the L2 tables and data clusters (refcount 2,
// no COPIED flag): the request must copy the L2 table, may not free or
// punch a shared cluster, and must leave the snapshot as it was.
class ZeroSnapshotTest : public ::testing::TestWithParam<std::tuple<Format, Op, Span>> {};

TEST_P(ZeroSnapshotTest, SnapshotKeepsItsData) {
  const auto [format, op, span] = GetParam();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-snapshot"));
  std::vector<std::string> cmds = {"write -P 0x11 0 64k", "write -P 0x22 64k 64k", "write -c -P 0x33 128k 64k"};
  if (format != Format::kV2) cmds.insert(cmds.end(), {"write -P 0x44 192k 64k", "write -z 192k 64k"});
  ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, format, false, cmds));
  ASSERT_OK(QemuImg({"snapshot", "-c", "snap", p.image}));
  const std::string snap_raw = dir.Join("snap-expected.raw");
  ASSERT_OK(RunChecked({"cp", p.raw, snap_raw}));
  // Each of clusters 1 (data), 2 (compressed) and 3 (zero with a host
  // cluster) gets the span.
  const auto [begin, end] = SpanRange(span);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    for (uint64_t c = 1; c <= 3; ++c) ASSERT_OK(Apply(*image, op, c * kCluster + begin, end - begin));
    ASSERT_OK(SyncWait(image->Flush()));
  }
  ExpectQemuClean(p.image);
  if (op != Op::kPreallocate) {
    for (uint64_t c = 1; c <= 3; ++c) ASSERT_OK(ZeroRaw(p.raw, c * kCluster + begin, end - begin));
  }
  ExpectSameAsRaw(p.image, p.raw);
  const std::string snap_now = dir.Join("snap-now.raw");
  ASSERT_OK(QemuImg({"convert", "-f", "qcow2", "-l", "snapshot.name=snap", "-O", "raw", p.image, snap_now}));
  EXPECT_OK(CompareFiles(snap_now, snap_raw)) << "the snapshot changed";
}

INSTANTIATE_TEST_SUITE_P(All, ZeroSnapshotTest,
                         ::testing::Combine(::testing::Values(Format::kStandard, Format::kExtended, Format::kV2),
                                            ::testing::Values(Op::kDiscard, Op::kZero, Op::kZeroUnmap,
                                                              Op::kPreallocate),
                                            ::testing::Values(Span::kWholeCluster, Span::kUnaligned)),
                         [](const ::testing::TestParamInfo<std::tuple<Format, Op, Span>>& info) {
                           return absl::StrCat(Name(std::get<0>(info.param)), "_", Name(std::get<1>(info.param)), "_",
                                               Name(std::get<2>(info.param)));
                         });

// An external data file (with and without data_file_raw): guest offsets
// map 1:1 into it and it keeps no refcounts. Only QEMU's verdicts here.
class ZeroDataFileTest : public ::testing::TestWithParam<std::tuple<Format, bool, Op, Span>> {};

TEST_P(ZeroDataFileTest, CheckAndCompare) {
  const auto [format, data_file_raw, op, span] = GetParam();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-data-file"));
  const std::string image = dir.Join("disk.qcow2"), data = dir.Join("data.raw"), raw = dir.Join("twin.raw");
  std::vector<std::string> options = CreateOptions(format);
  options.push_back("data_file=" + data);
  if (data_file_raw) options.push_back("data_file_raw=on");
  ASSERT_OK(CreateImage(image, "qcow2", kDisk, options));
  // Clusters: 0 data, 1 data, 2 zero (had data), 3 zero, 4 unallocated.
  const std::vector<std::string> cmds = {"write -P 0x11 0 128k", "write -P 0x33 128k 64k", "write -z 128k 64k",
                                         "write -z 192k 64k"};
  ASSERT_OK(QemuIo(image, "qcow2", cmds));
  ASSERT_OK(CreateImage(raw, "raw", kDisk));
  ASSERT_OK(QemuIo(raw, "raw", cmds));
  const auto [begin, end] = SpanRange(span);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> img, OpenImage(image));
    for (uint64_t c = 1; c <= 4; ++c) ASSERT_OK(Apply(*img, op, c * kCluster + begin, end - begin));
    ASSERT_OK(SyncWait(img->Flush()));
  }
  ExpectQemuClean(image);
  if (op != Op::kPreallocate) {
    for (uint64_t c = 1; c <= 4; ++c) ASSERT_OK(ZeroRaw(raw, c * kCluster + begin, end - begin));
  }
  ExpectSameAsRaw(image, raw);
  if (data_file_raw) {
    // The data file itself must read as the disk does.
    EXPECT_OK(CompareFiles(data, raw)) << "data_file_raw: the data file is not the disk";
  }
}

INSTANTIATE_TEST_SUITE_P(All, ZeroDataFileTest,
                         ::testing::Combine(::testing::Values(Format::kStandard, Format::kExtended), ::testing::Bool(),
                                            ::testing::Values(Op::kDiscard, Op::kZero, Op::kZeroUnmap,
                                                              Op::kPreallocate),
                                            ::testing::Values(Span::kWholeCluster, Span::kUnaligned)),
                         [](const ::testing::TestParamInfo<std::tuple<Format, bool, Op, Span>>& info) {
                           return absl::StrCat(Name(std::get<0>(info.param)), "_",
                                               std::get<1>(info.param) ? "RawDataFile" : "DataFile", "_",
                                               Name(std::get<2>(info.param)), "_", Name(std::get<3>(info.param)));
                         });

// --- L2 tables that do not exist yet, and compressed bytes across host clusters -----------

// Without a backing file, a range whose L2 table was never allocated reads
// as zeros already: no table may be allocated for it. Over a backing file
// the table must be made, with zero entries.
class ZeroNoL2TableTest : public ::testing::TestWithParam<std::tuple<Format, bool>> {};

TEST_P(ZeroNoL2TableTest, DiscardAndZeroWhereNoL2TableExists) {
  const auto [format, backing] = GetParam();
  const bool ext = format == Format::kExtended;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-no-l2"));
  ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, format, backing, {}));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(p.image));
  ASSERT_EQ(GetBE(before, ParseLayout(before).l1_table_offset, 8), 0u) << "the image already has an L2 table";
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    ASSERT_OK(SyncWait(image->Discard(kCluster, kCluster)));
    ASSERT_OK(SyncWait(image->WriteZeroes(2 * kCluster, kCluster, false)));
    ASSERT_OK(SyncWait(image->WriteZeroes(3 * kCluster, kCluster, true)));
    ASSERT_OK(SyncWait(image->Discard(4 * kCluster + 1000, 3000)));
    ASSERT_OK(SyncWait(image->Flush()));
    if (!backing) {
      EXPECT_EQ(image->counters().metadata_writes, 0u);
      EXPECT_EQ(image->counters().data_bytes_written, 0u);
    }
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
  if (!backing) {
    EXPECT_TRUE(after == before) << "nothing to do, yet the image changed";
  } else if (format != Format::kV2) {
    const Entry zero_no_host = ext ? Entry{0, kAllZero} : Entry{kOflagZero, 0};
    for (uint64_t c = 1; c <= 3; ++c) EXPECT_EQ(EntryAt(after, c * kCluster), zero_no_host) << "cluster " << c;
  }
  ExpectQemuClean(p.image);
  ASSERT_OK(ZeroRaw(p.raw, kCluster, 3 * kCluster));
  ASSERT_OK(ZeroRaw(p.raw, 4 * kCluster + 1000, 3000));
  ExpectSameAsRaw(p.image, p.raw);
}

INSTANTIATE_TEST_SUITE_P(All, ZeroNoL2TableTest,
                         ::testing::Combine(::testing::Values(Format::kStandard, Format::kExtended, Format::kV2),
                                            ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<Format, bool>>& info) {
                           return absl::StrCat(Name(std::get<0>(info.param)), "_",
                                               std::get<1>(info.param) ? "Backing" : "NoBacking");
                         });

// `qemu-img convert -c` packs compressed clusters back to back, so some
// of them start in one host cluster and end in the next: freeing such a
// cluster drops the refcount of both host clusters, by one each.
class ZeroCompressedAcrossHostClustersTest : public ::testing::TestWithParam<std::tuple<Format, Op, Span>> {};

TEST_P(ZeroCompressedAcrossHostClustersTest, BothHostClustersLoseOneReference) {
  const auto [format, op, span] = GetParam();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-compressed-span"));
  constexpr uint64_t kClusters = 8;
  // Half random, half zeros: about 32 KiB compressed.
  std::string content;
  for (uint32_t c = 0; c < kClusters; ++c) {
    const Bytes half = Pattern(kCluster / 2, 100 + c);
    content += std::string(half.begin(), half.end()) + std::string(kCluster / 2, '\0');
  }
  const std::string source = dir.Join("source.raw"), image = dir.Join("disk.qcow2"), raw = dir.Join("twin.raw");
  ASSERT_OK(WriteFileAt(source, 0, content));
  ASSERT_OK(WriteFileAt(raw, 0, content));
  std::vector<std::string> convert_options = {"-c", "-o"};
  std::string joined;
  for (const std::string& o : CreateOptions(format)) joined += (joined.empty() ? "" : ",") + o;
  convert_options.push_back(joined);
  ASSERT_OK(ConvertImage(source, "raw", image, "qcow2", convert_options));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(image));
  // A compressed cluster whose bytes touch two host clusters.
  std::optional<uint64_t> target;
  for (uint64_t c = 0; c < kClusters && !target; ++c) {
    const Entry e = EntryAt(before, c * kCluster);
    ASSERT_TRUE(e.compressed()) << "cluster " << c << " did not compress: " << e;
    const auto [first, end] = CompressedHostClusters(e.descriptor, 16);
    if (end - first == 2) target = c;
  }
  ASSERT_TRUE(target.has_value()) << "no compressed cluster crosses a host cluster boundary";
  const uint64_t guest = *target * kCluster;
  const auto [first, end] = CompressedHostClusters(EntryAt(before, guest).descriptor, 16);
  const auto [begin, stop] = SpanRange(span);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> img, OpenImage(image));
    ASSERT_OK(Apply(*img, op, guest + begin, stop - begin));
    ASSERT_OK(SyncWait(img->Flush()));
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(image));
  if (op != Op::kPreallocate) {
    for (uint64_t hc = first; hc < end; ++hc) {
      EXPECT_EQ(Refcount(after, hc * kCluster) + 1, Refcount(before, hc * kCluster))
          << "host cluster " << Hex(hc * kCluster) << " of the freed compressed cluster";
    }
  }
  ExpectQemuClean(image);
  if (op != Op::kPreallocate) {
    ASSERT_OK(ZeroRaw(raw, guest + begin, stop - begin));
  }
  ExpectSameAsRaw(image, raw);
}

INSTANTIATE_TEST_SUITE_P(All, ZeroCompressedAcrossHostClustersTest,
                         ::testing::Combine(::testing::Values(Format::kStandard, Format::kExtended, Format::kV2),
                                            ::testing::Values(Op::kDiscard, Op::kZero, Op::kZeroUnmap,
                                                              Op::kPreallocate),
                                            ::testing::Values(Span::kWholeCluster, Span::kUnaligned)),
                         [](const ::testing::TestParamInfo<std::tuple<Format, Op, Span>>& info) {
                           return absl::StrCat(Name(std::get<0>(info.param)), "_", Name(std::get<1>(info.param)), "_",
                                               Name(std::get<2>(info.param)));
                         });

// --- Arguments ------------------------------------------------------------------------------

TEST(ZeroArgumentsTest, RangesOutsideTheDiskAndReadOnlyImagesAreRefused) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-args"));
  ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, Format::kStandard, false, {"write -P 0x11 0 64k"}));
  ASSERT_OK_AND_ASSIGN(std::string original, ReadFile(p.image));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
    for (Op op : {Op::kDiscard, Op::kZero, Op::kZeroUnmap, Op::kPreallocate}) {
      SCOPED_TRACE(Name(op));
      EXPECT_TRUE(absl::IsOutOfRange(Apply(*image, op, kDisk, 1)));
      EXPECT_TRUE(absl::IsOutOfRange(Apply(*image, op, kDisk - 512, 1024)));
      EXPECT_TRUE(absl::IsOutOfRange(Apply(*image, op, 512, UINT64_MAX - 100)));
    }
  }
  {
    ImageOptions ro;
    ro.read_only = true;
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image, ro));
    for (Op op : {Op::kDiscard, Op::kZero, Op::kZeroUnmap, Op::kPreallocate}) {
      SCOPED_TRACE(Name(op));
      EXPECT_TRUE(absl::IsFailedPrecondition(Apply(*image, op, 0, kCluster)));
    }
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
  EXPECT_TRUE(after == original) << "a refused request changed the image";
}

// Zero-length requests are no-ops, like fallocate's (which refuses them).
TEST(ZeroArgumentsTest, ZeroLengthRequestsChangeNothing) {
  for (Format format : {Format::kStandard, Format::kExtended}) {
    SCOPED_TRACE(Name(format));
    ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-len0"));
    ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, format, false, {"write -P 0x11 0 64k"}));
    ASSERT_OK_AND_ASSIGN(std::string original, ReadFile(p.image));
    {
      ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image));
      for (Op op : {Op::kDiscard, Op::kZero, Op::kZeroUnmap, Op::kPreallocate}) {
        SCOPED_TRACE(Name(op));
        for (uint64_t offset : {uint64_t{0}, uint64_t{100}, kCluster, kCluster + 100, kDisk}) {
          EXPECT_OK(Apply(*image, op, offset, 0)) << "at " << offset;
        }
      }
      ASSERT_OK(SyncWait(image->Flush()));
      const ImageCounters c = image->counters();
      EXPECT_EQ(c.l2_slices_dirtied, 0u);
      EXPECT_EQ(c.metadata_writes, 0u);
      EXPECT_EQ(c.data_bytes_written, 0u);
    }
    ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
    EXPECT_EQ(EntryAt(after, 0), EntryAt(original, 0));
    EXPECT_EQ(EntryAt(after, kCluster), Entry{}) << "a zero-length request allocated cluster 1";
    EXPECT_EQ(UsedClusters(after), UsedClusters(original));
  }
}

// --- Big ranges: many L2 slices and tables, a small cache ------------------------------------

// A 1 GiB disk with data in every 4 MiB, across the boundary of the first
// L2 table (512 MiB with standard entries, 256 MiB with extended ones), and
// a 64 KiB L2 cache: the request dirties more slices than the cache holds,
// so the engine must flush in the middle of it.
class ZeroBigRangeTest : public ::testing::TestWithParam<std::tuple<Format, Op>> {};

TEST_P(ZeroBigRangeTest, WholeDiskWithSmallCache) {
  const auto [format, op] = GetParam();
  constexpr uint64_t kBig = 1024 * kMiB;
  constexpr uint64_t kStride = 4 * kMiB;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-big"));
  std::vector<std::string> cmds;
  for (uint64_t o = 0; o < kBig; o += kStride) {
    cmds.push_back(absl::StrFormat("write -P 0x%x %u 64k", 1 + (o / kStride) % 250, o));
  }
  cmds.push_back("write -c -P 0x77 101M 64k");
  if (format != Format::kV2) cmds.push_back("write -z 201M 64k");
  ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, format, false, cmds, kBig));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(p.image));
  const uint64_t used_before = UsedClusters(before);
  // Unaligned at both ends, and for preallocation only a part of the disk
  // (every cluster would be 1 GiB of real space).
  const uint64_t offset = 1000;
  const uint64_t length = (op == Op::kPreallocate ? 40 * kMiB : kBig - 3000) - offset;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image, ReadWrite(64 * kKiB)));
    ASSERT_OK(Apply(*image, op, offset, length));
    ASSERT_OK(SyncWait(image->Flush()));
    // What the engine now says of the range it changed.
    std::vector<uint8_t> buf(kCluster);
    for (uint64_t o = 0; o < kBig; o += kStride) {
      ASSERT_OK(SyncWait(image->Read(o, buf)));
      if (op != Op::kPreallocate && o >= offset + kCluster && o + kCluster <= offset + length) {
        ASSERT_TRUE(std::all_of(buf.begin(), buf.end(), [](uint8_t b) { return b == 0; })) << "at " << o;
      }
    }
  }
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(p.image));
  const uint64_t used_after = UsedClusters(after);
  // The range covers 255 of the 256 data clusters whole (cluster 0 only in
  // part) and the compressed one; preallocation covers clusters 0..639, of
  // which 10 hold data.
  int64_t want = 0;
  switch (op) {
    case Op::kDiscard:
    case Op::kZeroUnmap:
      want = -256;
      break;
    case Op::kZero:
      want = format == Format::kV2 ? 0 : -1;
      break;  // v2: the compressed one is rewritten
    case Op::kPreallocate:
      want = 630;
      break;
  }
  EXPECT_EQ(static_cast<int64_t>(used_after) - static_cast<int64_t>(used_before), want)
      << "host clusters with a refcount, after minus before";
  ExpectQemuClean(p.image);
  if (op != Op::kPreallocate) {
    ASSERT_OK(ZeroRaw(p.raw, offset, length));
  }
  ExpectSameAsRaw(p.image, p.raw);
}

INSTANTIATE_TEST_SUITE_P(All, ZeroBigRangeTest,
                         ::testing::Combine(::testing::Values(Format::kStandard, Format::kExtended, Format::kV2),
                                            ::testing::Values(Op::kDiscard, Op::kZero, Op::kZeroUnmap,
                                                              Op::kPreallocate)),
                         [](const ::testing::TestParamInfo<std::tuple<Format, Op>>& info) {
                           return absl::StrCat(Name(std::get<0>(info.param)), "_", Name(std::get<1>(info.param)));
                         });

// --- Random sequences against a model -------------------------------------------------------

// Random writes (some all zeros), discards, zeroing and preallocation over
// a small disk that starts with data, compressed and zero clusters, with
// random detect_zeroes. After every request the engine must read what the
// model holds there, and BlockStatus must never call data-holding bytes
// zero; at the end `qemu-img check` must be clean and the disk must equal
// the model. Set QCOW2FUSE_ZERO_SEED to replay one seed.
struct RandomCase {
  Format format;
  bool backing;
  uint32_t seed;
};

class ZeroRandomOpsTest : public ::testing::TestWithParam<RandomCase> {};

TEST_P(ZeroRandomOpsTest, MatchesModel) {
  const RandomCase& rc = GetParam();
  uint32_t seed = rc.seed;
  if (const char* env = std::getenv("QCOW2FUSE_ZERO_SEED"); env != nullptr) (void)absl::SimpleAtoi(env, &seed);
  std::cout << "ZeroRandomOpsTest seed " << seed << " (set QCOW2FUSE_ZERO_SEED=" << seed << " to replay)\n";
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  auto below = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };

  constexpr uint64_t kSize = 2 * kMiB;
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-random"));
  std::vector<std::string> cmds = {"write -P 0x11 0 192k", "write -c -P 0x22 256k 64k", "write -c -P 0x23 320k 64k",
                                   "write -P 0x55 1M 300k"};
  if (rc.format != Format::kV2) {
    cmds.insert(cmds.end(), {"write -P 0x44 512k 64k", "write -z 512k 64k", "write -z 640k 128k"});
  }
  if (rc.format == Format::kExtended) cmds.insert(cmds.end(), {"write -P 0x66 1536k 6k", "write -z 1600k 4k"});
  ASSERT_OK_AND_ASSIGN(Images p, MakeImages(dir, rc.format, rc.backing, cmds, kSize));
  ASSERT_OK_AND_ASSIGN(std::string initial, ReadFile(p.raw));
  std::vector<uint8_t> model(initial.begin(), initial.end());
  ASSERT_EQ(model.size(), kSize);

  const DetectZeroes detect = std::array{DetectZeroes::kOff, DetectZeroes::kOn, DetectZeroes::kUnmap}[below(3)];
  const uint64_t cache = below(2) ? 64 * kKiB : ImageOptions{}.l2_cache_size;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenImage(p.image, ReadWrite(cache, detect)));

  auto pick_offset = [&]() -> uint64_t {
    switch (below(4)) {
      case 0:
        return below(kSize / kCluster) * kCluster;
      case 1:
        return below(kSize / kSub) * kSub;
      case 2:
        return below(kSize / 512) * 512;
      default:
        return below(kSize);
    }
  };
  auto pick_length = [&](uint64_t offset) -> uint64_t {
    uint64_t n;
    switch (below(4)) {
      case 0:
        n = (1 + below(3)) * kCluster;
        break;
      case 1:
        n = (1 + below(8)) * kSub;
        break;
      case 2:
        n = 1 + below(4 * kCluster);
        break;
      default:
        n = 1 + below(3000);
        break;
    }
    return std::min(n, kSize - offset);
  };
  auto verify = [&](uint64_t offset, uint64_t length, const std::string& what) {
    std::vector<uint8_t> got(length);
    ASSERT_OK(SyncWait(image->Read(offset, got)));
    const auto mismatch = std::mismatch(got.begin(), got.end(), model.begin() + offset);
    ASSERT_TRUE(mismatch.first == got.end())
        << "after " << what << ": byte " << offset + (mismatch.first - got.begin()) << " reads " << int(*mismatch.first)
        << ", the model has " << int(*mismatch.second);
    // BlockStatus: whatever it calls zero or unallocated reads as zeros.
    for (uint64_t o = offset; o < offset + length;) {
      ASSERT_OK_AND_ASSIGN(Extent e, SyncWait(image->BlockStatus(o, offset + length - o)));
      ASSERT_GT(e.length, 0u);
      if (e.kind != ExtentKind::kData) {
        const uint64_t to = std::min(o + e.length, offset + length);
        ASSERT_TRUE(std::all_of(model.begin() + o, model.begin() + to, [](uint8_t b) { return b == 0; }))
            << "after " << what << ": BlockStatus calls [" << o << ", " << to << ") zero but it holds data";
      }
      o += e.length;
    }
  };

  // QCOW2FUSE_TEST_OPS shortens the run (the ThreadSanitizer build does).
  int ops = 300;
  if (const char* env = std::getenv("QCOW2FUSE_TEST_OPS"); env != nullptr) (void)absl::SimpleAtoi(env, &ops);
  std::string history;
  for (int i = 0; i < ops; ++i) {
    const uint64_t offset = pick_offset();
    if (offset >= kSize) continue;
    const uint64_t length = pick_length(offset);
    const uint64_t r = below(100);
    std::string what;
    if (r < 30) {
      const bool zeros = below(3) == 0;
      std::vector<uint8_t> data =
          zeros ? std::vector<uint8_t>(length, 0) : Pattern(length, static_cast<uint32_t>(rng()));
      what = absl::StrFormat("#%d write%s %u+%u", i, zeros ? " (zeros)" : "", offset, length);
      ASSERT_OK(SyncWait(image->Write(offset, data))) << what;
      std::copy(data.begin(), data.end(), model.begin() + offset);
    } else if (r < 50) {
      what = absl::StrFormat("#%d discard %u+%u", i, offset, length);
      ASSERT_OK(SyncWait(image->Discard(offset, length))) << what;
      std::fill(model.begin() + offset, model.begin() + offset + length, 0);
    } else if (r < 65) {
      what = absl::StrFormat("#%d write-zeroes %u+%u", i, offset, length);
      ASSERT_OK(SyncWait(image->WriteZeroes(offset, length, false))) << what;
      std::fill(model.begin() + offset, model.begin() + offset + length, 0);
    } else if (r < 80) {
      what = absl::StrFormat("#%d write-zeroes unmap %u+%u", i, offset, length);
      ASSERT_OK(SyncWait(image->WriteZeroes(offset, length, true))) << what;
      std::fill(model.begin() + offset, model.begin() + offset + length, 0);
    } else if (r < 92) {
      what = absl::StrFormat("#%d preallocate %u+%u", i, offset, length);
      ASSERT_OK(SyncWait(image->Preallocate(offset, length))) << what;
    } else if (r < 97) {
      what = absl::StrFormat("#%d flush", i);
      ASSERT_OK(SyncWait(image->Flush()));
    } else {
      what = absl::StrFormat("#%d reopen", i);
      ASSERT_OK(SyncWait(image->Flush()));
      image.reset();
      ASSERT_OK_AND_ASSIGN(image, OpenImage(p.image, ReadWrite(cache, detect)));
    }
    history += what + "\n";
    SCOPED_TRACE(history);
    // The bytes around the request, then a random range.
    const uint64_t from = offset > kCluster ? offset - kCluster : 0;
    verify(from, std::min(kSize, offset + length + kCluster) - from, what);
    if (HasFatalFailure()) return;
    const uint64_t o = below(kSize);
    verify(o, std::min<uint64_t>(kSize - o, 1 + below(4 * kCluster)), what);
    if (HasFatalFailure()) return;
  }
  SCOPED_TRACE(history);
  verify(0, kSize, "all requests");
  ASSERT_OK(SyncWait(image->Flush()));
  image.reset();
  ExpectQemuClean(p.image);
  ASSERT_OK(WriteFileAt(p.raw, 0, std::string(model.begin(), model.end())));
  ExpectSameAsRaw(p.image, p.raw);
}

std::vector<RandomCase> RandomCases() {
  std::vector<RandomCase> cases;
  for (Format format : {Format::kStandard, Format::kExtended, Format::kV2}) {
    for (bool backing : {false, true}) {
      for (uint32_t seed = 1; seed <= 6; ++seed) cases.push_back({format, backing, seed});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Seeds, ZeroRandomOpsTest, ::testing::ValuesIn(RandomCases()),
                         [](const ::testing::TestParamInfo<RandomCase>& info) {
                           return absl::StrCat(Name(info.param.format), "_",
                                               info.param.backing ? "Backing" : "NoBacking", "_Seed", info.param.seed);
                         });

}  // namespace
}  // namespace qcow2fuse::test
