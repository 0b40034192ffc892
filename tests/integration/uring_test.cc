// Requests over io_uring (fuse/uring_channel.h), through real mounts.
//
// The kernel offers FUSE over io_uring only where the fuse module's
// enable_uring parameter is Y. The suite sets it for its run and puts the
// old value back; on a kernel without the parameter (before Linux 6.14) it
// is skipped, saying why. The parameter is the whole kernel's, so ctest
// runs each of these tests alone (RUN_SERIAL in CMakeLists.txt): a mount of
// a test beside it would otherwise come over io_uring or not by the moment
// it was made.
//
// Every test checks the daemon's log: the mount came over io_uring, and at
// the unmount a count of requests that did.

#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iostream>
#include <optional>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "ring_turn_shim.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/scoped_env.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

using qemu_io_cmd::Compressed;
using qemu_io_cmd::W;
using qemu_io_cmd::Zero;

constexpr char kEnableUring[] = "/sys/module/fuse/parameters/enable_uring";
constexpr uint64_t kMiB = uint64_t{1} << 20;

class UringTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::ifstream in(kEnableUring);
    if (!std::getline(in, *old_value_)) {
      *skip_reason_ = absl::StrFormat("%s is missing: this kernel has no FUSE over io_uring (Linux 6.14+)",
                                      kEnableUring);
      return;
    }
    std::ofstream out(kEnableUring);
    out << "Y\n";
    out.close();
    if (!out) *skip_reason_ = absl::StrFormat("cannot write Y to %s (not root?)", kEnableUring);
  }

  static void TearDownTestSuite() {
    if (old_value_->empty()) return;
    std::ofstream out(kEnableUring);
    out << *old_value_ << "\n";
  }

  void SetUp() override {
    if (!skip_reason_->empty()) GTEST_SKIP() << *skip_reason_;
    ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("uring"));
    dir_.emplace(std::move(dir));
  }

  MountOptions Options(const std::string& image, bool read_only) {
    MountOptions options;
    options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
    options.image = image;
    options.mountpoint = dir_->Join("disk.raw");
    options.read_only = read_only;
    options.start_timeout = std::chrono::seconds(30);
    options.stop_timeout = std::chrono::seconds(60);
    return options;
  }

  // Mounts an 8 MiB image of 0x5a bytes read-only with the mount option
  // `option`, reads it whole, unmounts it, and gives the daemon's log.
  std::string ReadWholeImageWith(const std::string& option) {
    const std::string image = dir_->Join("disk.qcow2");
    EXPECT_OK(CreateImage(image, "qcow2", 8 * kMiB));
    EXPECT_OK(QemuIo(image, "qcow2", {qemu_io_cmd::W(0x5a, 0, 8 * kMiB)}));
    MountOptions options = Options(image, true);
    options.extra_options = {option};
    absl::StatusOr<std::unique_ptr<MountedView>> view = MountedView::Start(options);
    if (!view.ok()) {
      ADD_FAILURE() << view.status();
      return "";
    }
    absl::StatusOr<std::string> got = ReadFile((*view)->path());
    EXPECT_TRUE(got.ok() && *got == std::string(8 * kMiB, '\x5a')) << "the view differs from what qemu-io wrote";
    EXPECT_OK((*view)->Unmount());
    EXPECT_TRUE((*view)->exit_status()->success()) << (*view)->ReadLog();
    return (*view)->ReadLog();
  }

  // Every request of the mount after INIT came over io_uring: the log
  // says so at the start, and at the stop gives a count of at least
  // `at_least`.
  static void ExpectServedOverUring(const MountedView& view, uint64_t at_least) {
    const std::string log = view.ReadLog();
    EXPECT_TRUE(absl::StrContains(log, "requests come over io_uring")) << log;
    const size_t at = log.find(" requests came over io_uring");
    ASSERT_NE(at, std::string::npos) << log;
    const size_t start = log.find_last_of(" :]", at - 1) + 1;
    uint64_t served = 0;
    ASSERT_TRUE(absl::SimpleAtoi(log.substr(start, at - start), &served)) << log;
    EXPECT_GE(served, at_least) << log;
  }

  std::optional<TempDir> dir_;
  static inline std::string* const old_value_ = new std::string;
  static inline std::string* const skip_reason_ = new std::string;
};

// Reads `length` bytes at `offset` of `path`, opened with `flags`, in
// requests of `block` bytes.
std::string ReadRange(const std::string& path, int flags, uint64_t offset, uint64_t length, size_t block) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | flags);
  if (fd < 0) return absl::StrFormat("<open failed: %s>", strerror(errno));
  AlignedBuffer buffer = AllocAligned(block);
  std::string out;
  for (uint64_t done = 0; done < length;) {
    const size_t want = std::min<uint64_t>(block, length - done);
    const ssize_t n = pread(fd, buffer.get(), want, static_cast<off_t>(offset + done));
    if (n <= 0) {
      out += absl::StrFormat("<pread at %u: %s>", offset + done, n < 0 ? strerror(errno) : "end of file");
      break;
    }
    out.append(reinterpret_cast<char*>(buffer.get()), static_cast<size_t>(n));
    done += static_cast<uint64_t>(n);
  }
  close(fd);
  return out;
}

// Data, zero, unallocated and backing clusters, and compressed ones of
// each compression type: whole 1 MiB reads of compressed clusters are
// inflated on the inflate threads, so their replies are committed by a
// thread other than the ring entry's.
class UringReadTest : public UringTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(UringReadTest, ReadsOfEveryKindOfClusterMatchQemu) {
  const std::string base = dir_->Join("base.qcow2");
  const std::string image = dir_->Join("disk.qcow2");
  const uint64_t size = 48 * kMiB;
  ASSERT_OK(CreateImage(base, "qcow2", size));
  ASSERT_OK(QemuIo(base, "qcow2", {W(0x11, 0, size)}));
  ASSERT_OK(CreateImage(image, "qcow2", size,
                        {"backing_file=" + base, "backing_fmt=qcow2", std::string("compression_type=") + GetParam()}));
  ASSERT_OK(QemuIo(image, "qcow2",
                   {W(0x22, 0, 8 * kMiB), Zero(8 * kMiB, 4 * kMiB), Compressed(0x33, 16 * kMiB, 16 * kMiB),
                    W(0x44, 40 * kMiB + 4096, 123 * 1024)}));
  const std::string expected_path = dir_->Join("expected.raw");
  ASSERT_OK(ConvertToRaw(image, expected_path));
  ASSERT_OK_AND_ASSIGN(const std::string expected, ReadFile(expected_path));

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(Options(image, true)));
  EXPECT_OK(CompareFiles(view->path(), expected_path));
  for (const size_t block : {size_t{4096}, size_t{128} << 10, size_t{1} << 20}) {
    const std::string got = ReadRange(view->path(), O_DIRECT, 0, size, block);
    EXPECT_TRUE(got == expected) << "O_DIRECT reads of " << block << " bytes differ from qemu-img convert";
  }
  // Unaligned buffered reads that straddle run boundaries.
  std::mt19937_64 rng(TestSeed());
  for (int i = 0; i < 200; ++i) {
    const uint64_t offset = rng() % size;
    const uint64_t length = std::min<uint64_t>(1 + rng() % (3 * kMiB), size - offset);
    const std::string got = ReadRange(view->path(), 0, offset, length, 1 + rng() % (2 * kMiB));
    ASSERT_TRUE(got == expected.substr(offset, length)) << "read of " << length << " bytes at " << offset;
  }
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  ExpectServedOverUring(*view, size / kMiB);
}

INSTANTIATE_TEST_SUITE_P(Compression, UringReadTest, ::testing::Values("zlib", "zstd"));

// Writes of every size, buffered and O_DIRECT, discards, zeroing and
// fsyncs, each done to a raw twin as well: the view and the twin agree
// while mounted, and after the unmount qemu-img finds the image clean and
// equal to the twin.
TEST_F(UringTest, WritesDiscardsAndFsyncsMatchARawTwin) {
  const std::string image = dir_->Join("disk.qcow2");
  const std::string twin = dir_->Join("twin.raw");
  const uint64_t size = 64 * kMiB;
  ASSERT_OK(CreateImage(image, "qcow2", size));
  ASSERT_OK(RunChecked({"truncate", "-s", std::to_string(size), twin}).status());
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(Options(image, false)));

  std::mt19937_64 rng(TestSeed());
  const int buffered = open(view->path().c_str(), O_RDWR | O_CLOEXEC);
  const int direct = open(view->path().c_str(), O_RDWR | O_CLOEXEC | O_DIRECT);
  const int raw = open(twin.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(buffered, 0);
  ASSERT_GE(direct, 0);
  ASSERT_GE(raw, 0);
  AlignedBuffer data = AllocAligned(2 * kMiB);
  for (int i = 0; i < 300; ++i) {
    const int kind = static_cast<int>(rng() % 10);
    if (kind < 7) {
      const bool use_direct = kind < 3;
      const uint64_t unit = use_direct ? 4096 : 1;
      const uint64_t length = std::max<uint64_t>(unit, (1 + rng() % (2 * kMiB)) / unit * unit);
      const uint64_t offset = (rng() % (size - length + 1)) / unit * unit;
      const uint8_t fill = static_cast<uint8_t>(rng());
      for (uint64_t j = 0; j < length; ++j) data.get()[j] = static_cast<uint8_t>(fill + j * 7 + (j >> 12));
      ASSERT_EQ(pwrite(use_direct ? direct : buffered, data.get(), length, static_cast<off_t>(offset)),
                static_cast<ssize_t>(length))
          << (use_direct ? "O_DIRECT " : "") << "write of " << length << " at " << offset << ": "
          << strerror(errno);
      ASSERT_EQ(pwrite(raw, data.get(), length, static_cast<off_t>(offset)), static_cast<ssize_t>(length));
    } else if (kind < 9) {
      const int mode = kind == 7 ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE;
      const uint64_t length = 1 + rng() % (3 * kMiB);
      const uint64_t offset = rng() % (size - length);
      ASSERT_EQ(fallocate(buffered, mode, static_cast<off_t>(offset), static_cast<off_t>(length)), 0)
          << "fallocate mode " << mode << " of " << length << " at " << offset << ": " << strerror(errno);
      ASSERT_EQ(fallocate(raw, mode, static_cast<off_t>(offset), static_cast<off_t>(length)), 0);
    } else {
      ASSERT_EQ(fsync(i % 2 ? buffered : direct), 0) << strerror(errno);
    }
  }
  // A shared mapping of a descriptor opened for writing, which is in
  // direct-I/O mode (-o uncached_writes): the channel's INIT reply allows
  // it (init_flags.h), as the hooks of a /dev/fuse session do.
  constexpr size_t kMapped = 64 * 1024;
  auto* shared = static_cast<uint8_t*>(mmap(nullptr, kMapped, PROT_READ | PROT_WRITE, MAP_SHARED, buffered, 0));
  ASSERT_NE(shared, MAP_FAILED) << strerror(errno);
  for (size_t j = 0; j < kMapped; ++j) data.get()[j] = static_cast<uint8_t>(j * 13 + 5);
  memcpy(shared, data.get(), kMapped);
  ASSERT_EQ(msync(shared, kMapped, MS_SYNC), 0) << strerror(errno);
  munmap(shared, kMapped);
  ASSERT_EQ(pwrite(raw, data.get(), kMapped, 0), static_cast<ssize_t>(kMapped));
  close(direct);
  close(buffered);
  close(raw);
  EXPECT_OK(CompareFiles(view->path(), twin));
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  ExpectServedOverUring(*view, 300);
  EXPECT_OK(CheckImage(image));
  EXPECT_OK(QemuImg({"compare", "-f", "qcow2", "-F", "raw", image, twin}).status());
}

// Many requests at once (libaio, O_DIRECT, 2 jobs of queue depth 32):
// allocating writes whose copy-on-writes contend for L2 entries wait for
// one another, and their replies come from the threads that release them.
// fio checks every block it wrote.
TEST_F(UringTest, ParallelAioWritesAndReadsVerify) {
  const std::string image = dir_->Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", 96 * kMiB));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(Options(image, false)));
  const std::vector<std::string> fio = {"fio",
                                        "--name=aio",
                                        "--filename=" + view->path(),
                                        "--ioengine=libaio",
                                        "--direct=1",
                                        "--iodepth=32",
                                        "--numjobs=2",
                                        "--offset_increment=48M",
                                        "--size=48M",
                                        "--bsrange=4k-256k",
                                        "--rw=randwrite",
                                        "--verify=crc32c",
                                        "--verify_fatal=1",
                                        "--do_verify=1",
                                        "--verify_state_save=0",  // no state files in the working directory
                                        "--output-format=terse"};
  EXPECT_OK(RunChecked(fio).status());
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  ExpectServedOverUring(*view, 1000);
  EXPECT_OK(CheckImage(image));
}

// SIGTERM ends the ring threads with libfuse's loop, flushes and
// unmounts: what was written is in the image.
TEST_F(UringTest, SigtermStopsTheRingAndKeepsTheWrites) {
  const std::string image = dir_->Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", 16 * kMiB));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(Options(image, false)));
  const std::string payload(3 * kMiB + 5, 'q');
  ASSERT_OK(WriteFileAt(view->path(), 4096, payload));
  ASSERT_OK(view->StopWithSignal(SIGTERM));
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  EXPECT_FALSE(MountedFsType(view->path()).has_value()) << "still mounted";
  ExpectServedOverUring(*view, 1);
  EXPECT_OK(CheckImage(image));
  const std::string raw = dir_->Join("after.raw");
  ASSERT_OK(ConvertToRaw(image, raw));
  ASSERT_OK_AND_ASSIGN(const std::string after, ReadFile(raw));
  EXPECT_TRUE(after.substr(4096, payload.size()) == payload);
}

// The two orders of a ring entry's CommitTurn, each forced through a real
// mount by the ring turn shim (ring_turn_shim.c): the entry's thread back
// from libfuse before another thread made the reply, or after. Compressed
// 1 MiB reads are finished on the inflate threads, and queue-depth-32
// writes that share L2 tables wait for one another, so many replies are
// made on another thread than their entry's. Whichever the order, each
// reply is committed exactly once, by the thread the order says, and the
// data is what QEMU reads and what fio wrote.
class UringTurnTest : public UringTest {
 protected:
  // The shim's control block, in a file that the daemon maps too.
  class Control {
   public:
    explicit Control(const std::string& path) : path_(path) {
      const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (fd < 0 || ftruncate(fd, sizeof(RingTurnControl)) != 0) {
        ADD_FAILURE() << "cannot make " << path << ": " << strerror(errno);
        if (fd >= 0) close(fd);
        return;
      }
      void* p = mmap(nullptr, sizeof(RingTurnControl), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      close(fd);
      if (p == MAP_FAILED) {
        ADD_FAILURE() << "cannot map " << path << ": " << strerror(errno);
        return;
      }
      c_ = static_cast<RingTurnControl*>(p);
      __atomic_store_n(&c_->magic, QCOW2FUSE_RING_TURN_MAGIC, __ATOMIC_SEQ_CST);
    }
    ~Control() {
      if (c_ != nullptr) munmap(c_, sizeof(RingTurnControl));
    }
    const std::string& path() const { return path_; }
    bool ok() const { return c_ != nullptr; }
    void SetOrder(RingTurnOrder order) { __atomic_store_n(&c_->order, static_cast<uint32_t>(order), __ATOMIC_SEQ_CST); }
    uint64_t Get(uint64_t RingTurnControl::*field) const { return __atomic_load_n(&(c_->*field), __ATOMIC_SEQ_CST); }

   private:
    const std::string path_;
    RingTurnControl* c_ = nullptr;
  };

  // Who committed what, as the shim counted it.
  struct Counts {
    uint64_t handed, elsewhere, held, timeouts, entry_commits, replier_commits, double_commits;
    std::string ToString() const {
      return absl::StrFormat(
          "handed %u, replied elsewhere %u, held %u (timed out %u), committed by the entry's thread %u, "
          "by the replier %u, twice %u",
          handed, elsewhere, held, timeouts, entry_commits, replier_commits, double_commits);
    }
  };

  // Mounts a zstd image with the shim forcing `order`, reads its 24 MiB of
  // compressed clusters with O_DIRECT in 1 MiB and 256 KiB requests, and
  // with `writes` has fio write and verify 48 MiB beside them. Unmounts,
  // checks the image and gives the shim's counts.
  Counts ReadAndWriteWithOrder(RingTurnOrder order, bool writes) {
    const std::string image = dir_->Join("disk.qcow2");
    const uint64_t compressed = 24 * kMiB;
    EXPECT_OK(CreateImage(image, "qcow2", compressed + 48 * kMiB, {"compression_type=zstd"}));
    EXPECT_OK(QemuIo(image, "qcow2", {Compressed(0x33, 0, compressed)}));
    const std::string expected_path = dir_->Join("expected.raw");
    EXPECT_OK(ConvertToRaw(image, expected_path));
    absl::StatusOr<std::string> expected = ReadFile(expected_path);
    EXPECT_OK(expected.status());
    if (!expected.ok()) return {};

    Control control(dir_->Join("turn.control"));
    if (!control.ok()) return {};
    control.SetOrder(order);
    absl::StatusOr<std::unique_ptr<MountedView>> view;
    {
      ScopedPreload shim(QCOW2FUSE_RING_TURN_SHIM);
      ScopedEnv ctl(QCOW2FUSE_RING_TURN_CONTROL_ENV, control.path());
      view = MountedView::Start(Options(image, false));
    }
    EXPECT_OK(view.status());
    if (!view.ok()) return {};
    for (const size_t block : {size_t{1} << 20, size_t{256} << 10}) {
      const std::string got = ReadRange((*view)->path(), O_DIRECT, 0, compressed, block);
      EXPECT_TRUE(got == expected->substr(0, compressed))
          << "O_DIRECT reads of " << block << " bytes differ from qemu-img convert";
    }
    if (writes) {
      EXPECT_OK(RunChecked({"fio", "--name=aio", "--filename=" + (*view)->path(), "--ioengine=libaio", "--direct=1",
                            "--iodepth=32", "--offset=" + std::to_string(compressed), "--size=48M",
                            "--bsrange=4k-128k", "--rw=randwrite", "--verify=crc32c", "--verify_fatal=1",
                            "--do_verify=1", "--verify_state_save=0", "--output-format=terse"})
                    .status());
    }
    EXPECT_OK((*view)->Unmount());
    EXPECT_TRUE((*view)->exit_status()->success()) << (*view)->ReadLog();
    ExpectServedOverUring(**view, 100);
    EXPECT_OK(CheckImage(image));

    const Counts counts = {control.Get(&RingTurnControl::handed),          control.Get(&RingTurnControl::replied_elsewhere),
                           control.Get(&RingTurnControl::held),            control.Get(&RingTurnControl::timeouts),
                           control.Get(&RingTurnControl::entry_commits),   control.Get(&RingTurnControl::replier_commits),
                           control.Get(&RingTurnControl::double_commits)};
    std::cout << counts.ToString() << "\n";
    EXPECT_EQ(counts.timeouts, 0u) << counts.ToString() << "\n" << (*view)->ReadLog();
    EXPECT_EQ(counts.double_commits, 0u) << counts.ToString();
    // Every request handed over was answered and committed once.
    EXPECT_EQ(counts.entry_commits + counts.replier_commits, counts.handed) << counts.ToString();
    // Many of the 24 + 96 compressed reads are finished on the inflate
    // threads (the rest, on the entry's thread: when every cluster was
    // inflated before the read waited, or came from the cache of inflated
    // clusters).
    EXPECT_GE(counts.elsewhere, 30u) << counts.ToString();
    return counts;
  }
};

// The rare order: held until its reply is in, the entry's thread commits
// every reply, even those made elsewhere.
TEST_F(UringTurnTest, ReplyBeforeReturnIsCommittedByTheEntryThread) {
  const Counts counts = ReadAndWriteWithOrder(kOrderReplyFirst, true);
  EXPECT_GT(counts.held, 0u) << "no entry's thread came back before its reply: " << counts.ToString();
  EXPECT_EQ(counts.replier_commits, 0u) << counts.ToString();
}

// The usual order, without exceptions: every reply made elsewhere is
// committed by the thread that made it. Reads only: a WRITE's entry thread
// waits for the write (OnWrite: libfuse's buffer dies with the callback),
// so a write's reply made elsewhere always comes before the return.
TEST_F(UringTurnTest, ReturnBeforeReplyIsCommittedByTheReplyingThread) {
  const Counts counts = ReadAndWriteWithOrder(kOrderReturnFirst, false);
  EXPECT_EQ(counts.replier_commits, counts.elsewhere) << counts.ToString();
}

// -o threads=N over io_uring: each CPU's queue gets N divided by the
// number of queues, and at least one thread.
TEST_F(UringTest, ThreadsAreSharedOutOverTheQueues) {
  static const std::regex kRings(R"(requests come over io_uring: (\d+) queues \(one per CPU\) of (\d+) threads)");
  for (const int threads : {1, 7, 64}) {
    SCOPED_TRACE(absl::StrCat("threads=", threads));
    const std::string log = ReadWholeImageWith(absl::StrCat("threads=", threads));
    std::smatch m;
    ASSERT_TRUE(std::regex_search(log, m, kRings)) << log;
    const int queues = std::stoi(m[1]);
    EXPECT_GE(queues, 1);
    EXPECT_EQ(std::stoi(m[2]), std::max(1, threads / queues)) << log;
    // The ring threads never park (fuse/worker_gate.h): no gate at all.
    EXPECT_FALSE(absl::StrContains(log, "workers parked")) << log;
  }
}

// -o io_uring=off keeps /dev/fuse even where the kernel offers io_uring.
TEST_F(UringTest, OffKeepsDevFuse) {
  const std::string log = ReadWholeImageWith("io_uring=off");
  EXPECT_FALSE(absl::StrContains(log, "io_uring")) << log;
  EXPECT_TRUE(absl::StrContains(log, "workers parked")) << log;
}

// With auto_unmount requests stay on /dev/fuse: its watcher, fusermount3,
// opens the view once as the daemon dies and unmounts only on ENOTCONN; a
// killed daemon's rings are torn down after that look, and the open then
// fails with ECONNABORTED, so the mount stayed. (That the watcher unmounts
// a killed daemon is MountOptionsTest's: the same look can lose the race
// with the kernel's release of /dev/fuse, rarely.)
TEST_F(UringTest, AutoUnmountKeepsDevFuse) {
  const std::string log = ReadWholeImageWith("auto_unmount");
  EXPECT_TRUE(absl::StrContains(log, "requests stay on /dev/fuse: auto_unmount needs them there")) << log;
  EXPECT_FALSE(absl::StrContains(log, "requests come over io_uring")) << log;
}

}  // namespace
}  // namespace qcow2fuse::test
