// Readers racing the recycling of host clusters, through a real mount.
//
// A read maps a guest range to host clusters and then reads them. If a
// copy-on-write or a discard, then a flush (which frees the replaced
// clusters), then an allocating write (which takes the lowest free cluster
// again) all happen between the two steps, the read returns another guest
// offset's data, or, for a compressed cluster, fails to inflate the new
// bytes ("corrupt deflate stream", EIO). This test makes those orders as
// likely as it can and checks every block read:
//
// - The disk (16 MiB, 64 KiB clusters) is filled so that every 16-byte unit
//   of every 4 KiB block is a stamp of its own offset: word 0 is
//   kTag | (unit's guest offset), word 1 is the block's version XOR a hash
//   of that offset. The first unit of a block thus says "offset B,
//   version V", and every unit says where it belongs. The image is made
//   from that raw disk by `qemu-img convert`, plain or compressed (zlib,
//   zstd), and mounted read-write. The disk is small so that each cluster
//   is discarded, rewritten and recycled often; the image lives in /dev/shm
//   when there is room, where an fsync costs no disk flush, so flushes (and
//   with them frees and reuse) come about ten times as often as on a disk.
// - For a few seconds, reader threads keep 32 libaio O_DIRECT reads each in
//   flight (4 KiB to 64 KiB at random 4 KiB-aligned offsets). Every 16-byte
//   unit read must be zeros (discarded) or carry its own offset's tag; a
//   read error (EIO) or a short read fails the test. A block mixing two
//   versions of its own stamp, or stamp and zeros, is a read that overlapped
//   a write of that very block (the kernel does not make those atomic); it
//   is counted as "torn", not an error.
// - Writer threads, each owning its half of the disk, keep up to 8 libaio
//   O_DIRECT writes in flight (new versions of the blocks' own stamps: single
//   blocks, whole clusters, ranges across clusters) and now and then
//   discard a range (fallocate PUNCH_HOLE|KEEP_SIZE: whole clusters, which
//   frees them, or parts of clusters), never overlapping one of their own
//   writes in flight. A flusher thread calls fsync every 2 ms, so replaced
//   clusters are freed, and reused by the next allocation, all the time.
// - Afterwards the view is unmounted, `qemu-img check` must be clean, and
//   `qemu-img convert -O raw` of the image must match a per-block model
//   exactly: since a writer never has two overlapping requests in flight and
//   no one else writes its half, the last completed write (its version) or
//   discard (zeros) of each block is known.
//
// On the engine before reads held off the frees, the zlib and zstd variants
// failed within a fraction of a second (EIO, "corrupt deflate stream" /
// "corrupt zstd stream"). The plain variant passed there: its window, from
// the L2 lookup to the pread, is microseconds, against milliseconds for a
// discard, flush and reuse; with a 5 ms sleep put into that window (a test
// of this test), it failed within 0.1 s with another offset's stamp.
//
// QCOW2FUSE_TEST_SEED=N replays the random choices (the interleaving is the
// machine's); QCOW2FUSE_STRESS_SECONDS=S changes the run time (default 4);
// QCOW2FUSE_TEST_OPS=N stops each writer after N operations (the
// ThreadSanitizer run sets 60), and the run ends when the writers are done.

#include <fcntl.h>
#include <libaio.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kDiskSize = 16 * kMiB;
constexpr uint64_t kClusterSize = 64 * kKiB;
constexpr uint64_t kBlockSize = 4 * kKiB;
constexpr uint64_t kBlocks = kDiskSize / kBlockSize;
constexpr uint64_t kBlocksPerCluster = kClusterSize / kBlockSize;
constexpr uint64_t kUnit = 16;
constexpr uint64_t kUnitsPerBlock = kBlockSize / kUnit;

constexpr int kReaders = 3;
constexpr int kReadDepth = 32;
constexpr uint64_t kMaxReadBlocks = 16;  // 64 KiB
constexpr int kWriters = 2;
constexpr int kWriteDepth = 8;
constexpr uint64_t kMaxWriteBlocks = 32;  // 128 KiB
constexpr uint64_t kRegionBlocks = kBlocks / kWriters;
constexpr auto kFsyncInterval = std::chrono::milliseconds(2);

// Word 0 of a unit: the tag in the high bits, the unit's guest offset in
// the low 48.
constexpr uint64_t kTag = 0x5eed'0000'0000'0000ull;
constexpr uint64_t kOffsetMask = (uint64_t{1} << 48) - 1;
// The model's value for a block that must read as zeros.
constexpr uint64_t kZeroBlock = ~uint64_t{0};

uint64_t Mix(uint64_t x) {  // splitmix64's finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t LoadWord(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Fills `out` (whole blocks) with the stamp of the blocks from guest offset
// `offset` on, all of version `version`.
void Stamp(uint8_t* out, uint64_t length, uint64_t offset, uint64_t version) {
  for (uint64_t u = 0; u < length; u += kUnit) {
    const uint64_t at = offset + u;
    const uint64_t words[2] = {kTag | at, version ^ Mix(at)};
    std::memcpy(out + u, words, sizeof words);
  }
}

enum class BlockKind { kStamp, kZero, kTorn, kForeign };

struct BlockCheck {
  BlockKind kind = BlockKind::kStamp;
  uint64_t version = 0;  // kStamp
  std::string detail;    // kForeign: what was expected and seen
};

// Describes what a unit holds, for messages.
std::string DescribeUnit(const uint8_t* unit) {
  const uint64_t w0 = LoadWord(unit), w1 = LoadWord(unit + 8);
  if (w0 == 0 && w1 == 0) return "zeros";
  if ((w0 & ~kOffsetMask) == kTag) {
    const uint64_t at = w0 & kOffsetMask;
    return absl::StrFormat("the stamp of guest offset %#x, version %#x", at, w1 ^ Mix(at));
  }
  return absl::StrFormat("bytes %016x %016x (no stamp)", w0, w1);
}

// A block read from guest offset `offset`: its own stamp in one version,
// zeros, a mix of its own stamps and zeros (torn), or anything else
// (foreign: the error this test looks for).
BlockCheck CheckBlock(const uint8_t* block, uint64_t offset) {
  BlockCheck result;
  bool any_zero = false, any_stamp = false, one_version = true;
  uint64_t version = 0;
  for (uint64_t u = 0; u < kUnitsPerBlock; ++u) {
    const uint8_t* unit = block + u * kUnit;
    const uint64_t at = offset + u * kUnit;
    const uint64_t w0 = LoadWord(unit), w1 = LoadWord(unit + 8);
    if (w0 == 0 && w1 == 0) {
      any_zero = true;
      continue;
    }
    if (w0 != (kTag | at)) {
      result.kind = BlockKind::kForeign;
      result.detail = absl::StrFormat(
          "block at guest offset %#x, byte %u (guest offset %#x): expected the stamp of guest offset %#x "
          "(any version) or zeros, saw %s; the block starts with %s",
          offset, u * kUnit, at, at, DescribeUnit(unit), DescribeUnit(block));
      return result;
    }
    const uint64_t v = w1 ^ Mix(at);
    if (any_stamp && v != version) one_version = false;
    version = v;
    any_stamp = true;
  }
  if (!any_stamp) {
    result.kind = BlockKind::kZero;
  } else if (any_zero || !one_version) {
    result.kind = BlockKind::kTorn;
  } else {
    result.version = version;
  }
  return result;
}

uint64_t EnvNumber(const char* name, uint64_t fallback) {
  const char* text = std::getenv(name);
  uint64_t value = 0;
  if (text == nullptr || !absl::SimpleAtoi(text, &value)) return fallback;
  return value;
}

// What the threads share.
struct Shared {
  std::string path;
  std::atomic<bool> stop{false};
  std::atomic<int> writers_running{kWriters};
  uint64_t writer_ops_limit = 0;  // 0: until stop

  std::mutex mu;
  std::vector<std::string> failures;  // the first few
  uint64_t failure_count = 0;

  std::atomic<uint64_t> reads{0}, blocks_checked{0}, zero_blocks{0}, torn_blocks{0};
  std::atomic<uint64_t> writes{0}, discards{0}, fsyncs{0};

  // Per block: the version of the last completed write, or kZeroBlock. A
  // block is only ever touched by the writer owning its half of the disk.
  std::vector<uint64_t> model = std::vector<uint64_t>(kBlocks, 0);

  void Fail(std::string message) {
    std::lock_guard lock(mu);
    if (failures.size() < 10) failures.push_back(std::move(message));
    ++failure_count;
    stop = true;
  }
};

// Waits for completions on `ctx` until `pending` is at most `until`, or the
// time is up (an error). Calls `done` for each completion.
template <typename Done>
bool Reap(io_context_t ctx, int& pending, int until, Shared& shared, const char* who, Done done) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  io_event events[kReadDepth];
  while (pending > until) {
    timespec timeout = {0, 100'000'000};
    const int n = io_getevents(ctx, 1, std::min(pending, kReadDepth), events, &timeout);
    if (n < 0 && n != -EINTR) {
      shared.Fail(absl::StrFormat("%s: io_getevents: %s", who, std::strerror(-n)));
      return false;
    }
    for (int i = 0; i < n; ++i) {
      --pending;
      done(events[i]);
    }
    if (n <= 0 && std::chrono::steady_clock::now() > deadline) {
      shared.Fail(absl::StrFormat("%s: %d requests still unanswered after 60 s", who, pending));
      return false;
    }
  }
  return true;
}

class AioContext {
 public:
  explicit AioContext(int depth) { ok_ = io_setup(depth, &ctx_) == 0; }
  ~AioContext() {
    if (ok_) io_destroy(ctx_);
  }
  bool ok() const { return ok_; }
  io_context_t get() const { return ctx_; }

 private:
  io_context_t ctx_ = nullptr;
  bool ok_ = false;
};

void Reader(Shared& shared, uint64_t seed, int id) {
  const std::string who = absl::StrCat("reader ", id);
  ScopedFd fd(open(shared.path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC));
  if (fd.get() < 0) return shared.Fail(absl::StrFormat("%s: open: %s", who, std::strerror(errno)));
  AioContext ctx(kReadDepth);
  if (!ctx.ok()) return shared.Fail(who + ": io_setup failed");
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<uint64_t> length_blocks(1, kMaxReadBlocks);

  struct Slot {
    iocb cb;
    AlignedBuffer buffer;
  };
  std::vector<Slot> slots(kReadDepth);
  std::vector<Slot*> free_slots;
  for (Slot& s : slots) {
    s.buffer = AllocAligned(kMaxReadBlocks * kBlockSize);
    free_slots.push_back(&s);
  }
  int pending = 0;
  auto done = [&](const io_event& e) {
    Slot* slot = static_cast<Slot*>(e.data);
    free_slots.push_back(slot);
    const uint64_t offset = slot->cb.u.c.offset, length = slot->cb.u.c.nbytes;
    const long res = static_cast<long>(e.res);
    shared.reads++;
    if (res < 0) {
      return shared.Fail(absl::StrFormat("read of [%#x, %#x) (%u bytes) failed: %s", offset, offset + length, length,
                                         std::strerror(static_cast<int>(-res))));
    }
    if (static_cast<uint64_t>(res) != length) {
      return shared.Fail(absl::StrFormat("read of [%#x, %#x) returned %d bytes, not %u", offset, offset + length,
                                         res, length));
    }
    for (uint64_t b = 0; b < length; b += kBlockSize) {
      const BlockCheck check = CheckBlock(slot->buffer.get() + b, offset + b);
      shared.blocks_checked++;
      switch (check.kind) {
        case BlockKind::kForeign:
          shared.Fail(absl::StrFormat("read of [%#x, %#x): %s", offset, offset + length, check.detail));
          return;
        case BlockKind::kZero:
          shared.zero_blocks++;
          break;
        case BlockKind::kTorn:
          shared.torn_blocks++;
          break;
        case BlockKind::kStamp:
          break;
      }
    }
  };
  while (!shared.stop) {
    while (!free_slots.empty() && !shared.stop) {
      const uint64_t blocks = length_blocks(rng);
      const uint64_t first = std::uniform_int_distribution<uint64_t>(0, kBlocks - blocks)(rng);
      Slot* slot = free_slots.back();
      io_prep_pread(&slot->cb, fd.get(), slot->buffer.get(), blocks * kBlockSize, first * kBlockSize);
      slot->cb.data = slot;
      iocb* list[1] = {&slot->cb};
      const int rc = io_submit(ctx.get(), 1, list);
      if (rc != 1) {
        shared.Fail(absl::StrFormat("%s: io_submit of a read: %s", who, rc < 0 ? std::strerror(-rc) : "none taken"));
        break;
      }
      free_slots.pop_back();
      ++pending;
    }
    if (!Reap(ctx.get(), pending, pending - 1, shared, who.c_str(), done)) return;
  }
  Reap(ctx.get(), pending, 0, shared, who.c_str(), done);
}

void Writer(Shared& shared, uint64_t seed, int id) {
  const std::string who = absl::StrCat("writer ", id);
  struct Done {
    Shared& shared;
    ~Done() { shared.writers_running--; }
  } done_guard{shared};
  ScopedFd fd(open(shared.path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC));
  if (fd.get() < 0) return shared.Fail(absl::StrFormat("%s: open: %s", who, std::strerror(errno)));
  AioContext ctx(kWriteDepth);
  if (!ctx.ok()) return shared.Fail(who + ": io_setup failed");
  std::mt19937_64 rng(seed);
  const uint64_t region_first = id * kRegionBlocks;  // in blocks
  auto pick = [&](uint64_t lo, uint64_t hi) { return std::uniform_int_distribution<uint64_t>(lo, hi)(rng); };

  struct Slot {
    iocb cb;
    AlignedBuffer buffer;
    uint64_t first = 0, blocks = 0, version = 0;  // blocks = 0: free
  };
  std::vector<Slot> slots(kWriteDepth);
  for (Slot& s : slots) s.buffer = AllocAligned(kMaxWriteBlocks * kBlockSize);
  auto overlaps_in_flight = [&](uint64_t first, uint64_t blocks) {
    for (const Slot& s : slots) {
      if (s.blocks != 0 && first < s.first + s.blocks && s.first < first + blocks) return true;
    }
    return false;
  };
  int pending = 0;
  auto done = [&](const io_event& e) {
    Slot* slot = static_cast<Slot*>(e.data);
    const uint64_t offset = slot->first * kBlockSize, length = slot->blocks * kBlockSize;
    const long res = static_cast<long>(e.res);
    if (res < 0 || static_cast<uint64_t>(res) != length) {
      shared.Fail(absl::StrFormat("write of [%#x, %#x) (version %#x) %s", offset, offset + length, slot->version,
                                  res < 0 ? absl::StrCat("failed: ", std::strerror(static_cast<int>(-res)))
                                          : absl::StrCat("returned ", res)));
    } else {
      for (uint64_t b = 0; b < slot->blocks; ++b) shared.model[slot->first + b] = slot->version;
      shared.writes++;
    }
    slot->blocks = 0;
  };

  uint64_t sequence = 0, ops = 0;
  while (!shared.stop && (shared.writer_ops_limit == 0 || ops < shared.writer_ops_limit)) {
    if (pending == kWriteDepth && !Reap(ctx.get(), pending, pending - 1, shared, who.c_str(), done)) return;
    // Choose a range of the region: one block, one whole cluster, or a
    // range that may cross clusters (a partial copy-on-write of two).
    const int kind = static_cast<int>(pick(0, 99));
    uint64_t first, blocks;
    if (kind < 40) {
      blocks = 1;
      first = region_first + pick(0, kRegionBlocks - 1);
    } else if (kind < 65 || (kind >= 90 && kind < 95)) {
      blocks = kBlocksPerCluster * (kind < 65 ? 1 : pick(1, 4));
      first = region_first + pick(0, kRegionBlocks / kBlocksPerCluster - blocks / kBlocksPerCluster) * kBlocksPerCluster;
    } else {
      blocks = pick(1, kind < 90 ? kMaxWriteBlocks : 3 * kBlocksPerCluster);
      first = region_first + pick(0, kRegionBlocks - blocks);
    }
    if (overlaps_in_flight(first, blocks)) continue;
    ++ops;
    if (kind >= 90) {
      // A discard, synchronous, while this writer's other writes go on.
      const uint64_t offset = first * kBlockSize, length = blocks * kBlockSize;
      if (fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0) {
        shared.Fail(absl::StrFormat("discard of [%#x, %#x): %s", offset, offset + length, std::strerror(errno)));
        break;
      }
      for (uint64_t b = 0; b < blocks; ++b) shared.model[first + b] = kZeroBlock;
      shared.discards++;
      continue;
    }
    Slot* slot = nullptr;
    for (Slot& s : slots) {
      if (s.blocks == 0) slot = &s;
    }
    slot->first = first;
    slot->blocks = blocks;
    slot->version = (uint64_t{static_cast<uint32_t>(id) + 1} << 32) | ++sequence;
    Stamp(slot->buffer.get(), blocks * kBlockSize, first * kBlockSize, slot->version);
    io_prep_pwrite(&slot->cb, fd.get(), slot->buffer.get(), blocks * kBlockSize, first * kBlockSize);
    slot->cb.data = slot;
    iocb* list[1] = {&slot->cb};
    const int rc = io_submit(ctx.get(), 1, list);
    if (rc != 1) {
      slot->blocks = 0;
      shared.Fail(absl::StrFormat("%s: io_submit of a write: %s", who, rc < 0 ? std::strerror(-rc) : "none taken"));
      break;
    }
    ++pending;
    // Take what is done without waiting.
    io_event events[kWriteDepth];
    timespec zero = {0, 0};
    const int n = io_getevents(ctx.get(), 0, kWriteDepth, events, &zero);
    for (int i = 0; i < n; ++i) {
      --pending;
      done(events[i]);
    }
  }
  Reap(ctx.get(), pending, 0, shared, who.c_str(), done);
}

void Flusher(Shared& shared) {
  ScopedFd fd(open(shared.path.c_str(), O_RDWR | O_CLOEXEC));
  if (fd.get() < 0) return shared.Fail(absl::StrFormat("flusher: open: %s", std::strerror(errno)));
  while (!shared.stop && shared.writers_running > 0) {
    if (fsync(fd.get()) != 0) return shared.Fail(absl::StrFormat("fsync: %s", std::strerror(errno)));
    shared.fsyncs++;
    std::this_thread::sleep_for(kFsyncInterval);
  }
}

// A directory for the image on a RAM file system when one has room (see
// the top of the file), else `fallback`; removed with everything in it.
// Nothing is ever mounted inside it (the view is in the TempDir).
class ImageDir {
 public:
  explicit ImageDir(const std::string& fallback) : path_(fallback) {
    struct statvfs st;
    if (statvfs("/dev/shm", &st) != 0 || st.f_bavail * st.f_frsize < 8 * kDiskSize) return;
    char name[] = "/dev/shm/qcow2fuse-recycle-XXXXXX";
    if (mkdtemp(name) == nullptr) return;
    path_ = owned_ = name;
  }
  ImageDir(const ImageDir&) = delete;
  ImageDir& operator=(const ImageDir&) = delete;
  ~ImageDir() {
    std::error_code ignored;
    if (!owned_.empty()) std::filesystem::remove_all(owned_, ignored);
  }
  std::string Join(absl::string_view name) const { return absl::StrCat(path_, "/", name); }

 private:
  std::string path_;
  std::string owned_;  // the directory made here, to remove
};

struct Variant {
  std::string name;
  std::vector<std::string> convert;  // extra `qemu-img convert` arguments
};

void PrintTo(const Variant& v, std::ostream* out) { *out << v.name; }

class RecycleStressTest : public ::testing::TestWithParam<Variant> {};

TEST_P(RecycleStressTest, ReadsNeverSeeRecycledClusters) {
  const Variant& variant = GetParam();
  const uint64_t seed = TestSeed();
  const auto seconds = std::chrono::seconds(EnvNumber("QCOW2FUSE_STRESS_SECONDS", 4));
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("recycle-" + variant.name));
  const ImageDir image_dir(dir.path());
  const std::string raw = dir.Join("stamped.raw");
  const std::string image = image_dir.Join("disk.qcow2");

  // Every block stamped with its own offset, version 0.
  {
    std::vector<uint8_t> chunk(kMiB);
    for (uint64_t offset = 0; offset < kDiskSize; offset += chunk.size()) {
      Stamp(chunk.data(), chunk.size(), offset, 0);
      ASSERT_OK(WriteFileAt(raw, offset, absl::string_view(reinterpret_cast<const char*>(chunk.data()), chunk.size())));
    }
  }
  ASSERT_OK(ConvertImage(raw, "raw", image, "qcow2", variant.convert));
  ASSERT_EQ(unlink(raw.c_str()), 0);

  MountOptions options;
  options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  options.image = image;
  options.mountpoint = dir.Join("disk.raw");
  options.read_only = false;
  options.start_timeout = std::chrono::seconds(30);
  options.stop_timeout = std::chrono::seconds(60);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));

  Shared shared;
  shared.path = view->path();
  shared.writer_ops_limit = EnvNumber("QCOW2FUSE_TEST_OPS", 0);
  std::cout << variant.name << ": image " << image << ", " << kReaders << " readers at QD" << kReadDepth << ", " << kWriters
            << " writers at QD" << kWriteDepth << ", fsync every " << kFsyncInterval.count() << " ms, for "
            << seconds.count() << " s"
            << (shared.writer_ops_limit ? absl::StrCat(" or ", shared.writer_ops_limit, " operations per writer") : "")
            << std::endl;
  const auto started = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int i = 0; i < kReaders; ++i) threads.emplace_back(Reader, std::ref(shared), Mix(seed + 2 * i), i);
  for (int i = 0; i < kWriters; ++i) threads.emplace_back(Writer, std::ref(shared), Mix(seed + 2 * i + 1), i);
  threads.emplace_back(Flusher, std::ref(shared));
  while (!shared.stop && shared.writers_running > 0 && std::chrono::steady_clock::now() - started < seconds) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  shared.stop = true;
  for (std::thread& t : threads) t.join();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  std::cout << absl::StrFormat(
                   "%s: %.1f s: %u reads (%u blocks checked, %u zero, %u torn by a concurrent write of the same "
                   "block), %u writes, %u discards, %u fsyncs",
                   variant.name, elapsed, shared.reads.load(), shared.blocks_checked.load(),
                   shared.zero_blocks.load(), shared.torn_blocks.load(), shared.writes.load(),
                   shared.discards.load(), shared.fsyncs.load())
            << std::endl;
  RecordProperty("reads", static_cast<int>(shared.reads.load()));
  RecordProperty("writes", static_cast<int>(shared.writes.load()));
  RecordProperty("discards", static_cast<int>(shared.discards.load()));
  RecordProperty("fsyncs", static_cast<int>(shared.fsyncs.load()));
  EXPECT_EQ(shared.failure_count, 0u) << shared.failure_count << " failure(s), the first ones:\n"
                                      << absl::StrJoin(shared.failures, "\n");
  EXPECT_GT(shared.reads.load(), 0u);
  EXPECT_GT(shared.writes.load(), 0u);

  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  ASSERT_OK(CheckImage(image));

  // The image as QEMU reads it must be the model: the last write's version
  // of each block, or zeros after a discard.
  const std::string final_raw = dir.Join("final.raw");
  ASSERT_OK(ConvertToRaw(image, final_raw));
  ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(final_raw));
  std::vector<uint8_t> chunk(kMiB);
  int mismatches = 0;
  for (uint64_t offset = 0; offset < kDiskSize && mismatches < 10; offset += chunk.size()) {
    ASSERT_EQ(pread(fd.get(), chunk.data(), chunk.size(), offset), static_cast<ssize_t>(chunk.size()));
    for (uint64_t b = 0; b < chunk.size() && mismatches < 10; b += kBlockSize) {
      const uint64_t at = offset + b;
      const uint64_t expected = shared.model[at / kBlockSize];
      const BlockCheck check = CheckBlock(chunk.data() + b, at);
      const bool ok = expected == kZeroBlock ? check.kind == BlockKind::kZero
                                             : check.kind == BlockKind::kStamp && check.version == expected;
      if (!ok) {
        ++mismatches;
        ADD_FAILURE() << absl::StrFormat(
            "after the run, block at guest offset %#x: expected %s, saw %s", at,
            expected == kZeroBlock ? "zeros" : absl::StrFormat("its stamp, version %#x", expected),
            check.kind == BlockKind::kForeign ? check.detail : DescribeUnit(chunk.data() + b) +
                (check.kind == BlockKind::kTorn ? " (and other versions or zeros further on)" : ""));
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Images, RecycleStressTest,
    ::testing::Values(Variant{"plain", {"-o", "cluster_size=65536"}},
                      Variant{"zlib", {"-c", "-o", "cluster_size=65536,compression_type=zlib"}},
                      Variant{"zstd", {"-c", "-o", "cluster_size=65536,compression_type=zstd"}}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace qcow2fuse::test
