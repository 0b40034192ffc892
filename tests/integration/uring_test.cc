// Requests over io_uring (fuse/uring_channel.h), through real mounts.
//
// The kernel offers FUSE over io_uring only where the fuse module's
// enable_uring parameter is Y. The suite sets it for its run and puts the
// old value back; on a kernel without the parameter (before Linux 6.14) it
// is skipped, saying why. Mounts that other tests make meanwhile may come
// over io_uring too, which they must survive as well.
//
// Every test checks the daemon's log: the mount came over io_uring, and at
// the unmount a count of requests that did.

#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
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

// -o io_uring=off keeps /dev/fuse even where the kernel offers io_uring.
TEST_F(UringTest, OffKeepsDevFuse) {
  const std::string log = ReadWholeImageWith("io_uring=off");
  EXPECT_FALSE(absl::StrContains(log, "io_uring")) << log;
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
