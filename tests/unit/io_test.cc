// BlockFile's contract, checked on PosixFile (on a real file under the test
// temp dir) and on MemFile with the same test bodies: reads past the end,
// writes in place and past the end, flush, discard, truncate, concurrent
// writers and size(); then what only one of them has (allocation shrinking
// on discard, read-only opens, errno errors that name the path).

#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "../support/file_util.h"  // TellsWhetherAReadWouldSleep
#include "../support/status_testing.h"  // ASSERT_OK, ASSERT_OK_AND_ASSIGN
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "qcow2fuse/blocking.h"
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {
namespace {

using Bytes = std::vector<uint8_t>;

// Whether `status`'s message contains `what`, showing the message if not.
::testing::AssertionResult Mentions(const absl::Status& status, absl::string_view what) {
  if (absl::StrContains(status.message(), what)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << status.message() << "\" does not mention \""
                                       << what << "\"";
}

Bytes Pattern(size_t n, uint8_t seed) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 8));
  return b;
}

// A path under the test temp dir, removed at the end of the test.
class TempPath {
 public:
  TempPath() {
    static std::atomic<int> counter{0};
    std::string dir = ::testing::TempDir();
    if (!dir.empty() && dir.back() != '/') dir += '/';
    path_ = absl::StrCat(dir, "io_test.", getpid(), ".", counter++);
  }
  ~TempPath() { unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void WriteWholeFile(const std::string& path, const Bytes& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(contents.data()), contents.size());
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

Bytes ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A file under test, and its contents as stored, read around the BlockFile.
struct Subject {
  std::unique_ptr<TempPath> temp;  // PosixFile only
  std::unique_ptr<BlockFile> file;

  Bytes Stored() const {
    if (temp) return ReadWholeFile(temp->path());
    absl::StatusOr<Bytes> contents = MemFileContents(*file);
    EXPECT_OK(contents);
    return contents.ok() ? *contents : Bytes();
  }
};

using Factory = Subject (*)(const Bytes& initial);

Subject MakePosix(const Bytes& initial) {
  Subject s;
  s.temp = std::make_unique<TempPath>();
  WriteWholeFile(s.temp->path(), initial);
  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(s.temp->path(), true);
  EXPECT_OK(file);
  if (file.ok()) s.file = std::move(*file);
  return s;
}

Subject MakeMem(const Bytes& initial) {
  Subject s;
  s.file = NewMemFile("mem.img", initial);
  return s;
}

Bytes ReadAt(BlockFile& f, uint64_t offset, size_t n) {
  Bytes out(n, 0xee);  // not zero: a read that skips bytes shows
  EXPECT_OK(SyncWait(f.Read(offset, out)));
  return out;
}

absl::Status WriteAt(BlockFile& f, uint64_t offset, const Bytes& data) {
  return SyncWait(f.Write(offset, data));
}

// Whether `dir`'s filesystem punches holes, asked directly, so that a
// Discard that silently did nothing cannot pass for an unsupported one.
bool FilesystemPunchesHoles() {
  TempPath probe;
  WriteWholeFile(probe.path(), Bytes(65536, 1));
  int fd = open(probe.path().c_str(), O_RDWR);
  if (fd < 0) return false;
  int r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 65536);
  close(fd);
  return r == 0;
}

// Declares the body of a contract test and runs it on both files.
#define IO_CONTRACT_TEST(Name)                       \
  void Name##Body(Factory make);                     \
  TEST(IoTest, Posix##Name) { Name##Body(MakePosix); } \
  TEST(IoTest, Mem##Name) { Name##Body(MakeMem); }   \
  void Name##Body(Factory make)

// --- The contract, on both ------------------------------------------------

IO_CONTRACT_TEST(ReadsPastEndAsZeros) {
  Subject s = make(Pattern(1000, 1));
  ASSERT_NE(s.file, nullptr);
  EXPECT_EQ(s.file->size(), 1000u);
  Bytes expected = Pattern(1000, 1);
  expected.resize(1500, 0);
  EXPECT_EQ(ReadAt(*s.file, 500, 1000), Bytes(expected.begin() + 500, expected.end()));
  EXPECT_EQ(ReadAt(*s.file, 5000, 100), Bytes(100, 0));
}

IO_CONTRACT_TEST(WritesInPlace) {
  Subject s = make(Pattern(8192, 1));
  ASSERT_NE(s.file, nullptr);
  EXPECT_TRUE(s.file->writable());
  Bytes model = Pattern(8192, 1);
  const Bytes data = Pattern(100, 99);
  ASSERT_OK(WriteAt(*s.file, 1000, data));
  std::copy(data.begin(), data.end(), model.begin() + 1000);
  EXPECT_EQ(s.file->size(), 8192u);
  EXPECT_EQ(ReadAt(*s.file, 0, 8192), model);
  EXPECT_EQ(s.Stored(), model);
}

IO_CONTRACT_TEST(WritesPastEndExtend) {
  Subject s = make(Pattern(4096, 1));
  ASSERT_NE(s.file, nullptr);
  Bytes model = Pattern(4096, 1);

  // Straddling the end.
  ASSERT_OK(WriteAt(*s.file, 4000, Pattern(200, 2)));
  model.resize(4200);
  std::ranges::copy(Pattern(200, 2), model.begin() + 4000);
  EXPECT_EQ(s.file->size(), 4200u);

  // Past the end, leaving a gap that reads as zeros.
  ASSERT_OK(WriteAt(*s.file, 10000, Pattern(512, 3)));
  model.resize(10512, 0);
  std::ranges::copy(Pattern(512, 3), model.begin() + 10000);
  EXPECT_EQ(s.file->size(), 10512u);
  EXPECT_EQ(ReadAt(*s.file, 0, 10512), model);
  EXPECT_EQ(s.Stored(), model);

  // An empty write past the end changes nothing.
  ASSERT_OK(WriteAt(*s.file, 20000, Bytes()));
  EXPECT_EQ(s.file->size(), 10512u);
}

IO_CONTRACT_TEST(FlushKeepsContents) {
  Subject s = make(Pattern(4096, 1));
  ASSERT_NE(s.file, nullptr);
  ASSERT_OK(WriteAt(*s.file, 8192, Pattern(4096, 5)));
  ASSERT_OK(SyncWait(s.file->Flush()));
  ASSERT_OK(SyncWait(s.file->Flush()));  // nothing new: still fine
  Bytes model = Pattern(4096, 1);
  model.resize(8192, 0);
  const Bytes tail = Pattern(4096, 5);
  model.insert(model.end(), tail.begin(), tail.end());
  EXPECT_EQ(s.Stored(), model);
}

IO_CONTRACT_TEST(DiscardReadsZerosAndKeepsSize) {
  Subject s = make(Pattern(65536, 1));
  ASSERT_NE(s.file, nullptr);
  // Where the filesystem cannot punch, the contract keeps the old bytes.
  const bool punches = !s.temp || FilesystemPunchesHoles();
  if (!punches) std::cout << "note: the temp dir's filesystem does not punch holes\n";
  Bytes model = Pattern(65536, 1);

  // Block-aligned and unaligned ranges: a filesystem zeroes the partial
  // blocks at either end of a punched hole.
  for (auto [offset, length] : {std::pair<uint64_t, uint64_t>{8192, 16384}, {100, 1000}}) {
    ASSERT_OK(SyncWait(s.file->Discard(offset, length)));
    if (punches) std::fill_n(model.begin() + offset, length, 0);
  }
  // Zero length; straddling the end; wholly past it; "to the end".
  ASSERT_OK(SyncWait(s.file->Discard(30000, 0)));
  ASSERT_OK(SyncWait(s.file->Discard(61440, 1 << 20)));
  ASSERT_OK(SyncWait(s.file->Discard(1 << 20, 4096)));
  if (punches) std::fill(model.begin() + 61440, model.end(), 0);
  EXPECT_EQ(s.file->size(), 65536u);
  EXPECT_EQ(ReadAt(*s.file, 0, 65536), model);
  EXPECT_EQ(s.Stored(), model);

  ASSERT_OK(SyncWait(s.file->Discard(40000, std::numeric_limits<uint64_t>::max())));
  if (punches) std::fill(model.begin() + 40000, model.end(), 0);
  EXPECT_EQ(s.file->size(), 65536u);
  EXPECT_EQ(ReadAt(*s.file, 0, 65536), model);
}

IO_CONTRACT_TEST(TruncateShrinksAndGrows) {
  Subject s = make(Pattern(8192, 1));
  ASSERT_NE(s.file, nullptr);
  ASSERT_OK(SyncWait(s.file->Truncate(1000)));
  EXPECT_EQ(s.file->size(), 1000u);
  Bytes model = Pattern(1000, 1);
  EXPECT_EQ(s.Stored(), model);
  // The dropped bytes do not come back when the file grows again.
  ASSERT_OK(SyncWait(s.file->Truncate(5000)));
  EXPECT_EQ(s.file->size(), 5000u);
  model.resize(5000, 0);
  EXPECT_EQ(ReadAt(*s.file, 0, 6000), [&] {
    Bytes b = model;
    b.resize(6000, 0);
    return b;
  }());
  EXPECT_EQ(s.Stored(), model);
  // Writes and truncates interleave.
  ASSERT_OK(WriteAt(*s.file, 4990, Pattern(20, 9)));
  EXPECT_EQ(s.file->size(), 5010u);
  ASSERT_OK(SyncWait(s.file->Truncate(0)));
  EXPECT_EQ(s.file->size(), 0u);
  EXPECT_EQ(ReadAt(*s.file, 0, 10), Bytes(10, 0));
  EXPECT_EQ(s.Stored(), Bytes());
}

IO_CONTRACT_TEST(ConcurrentWritersAndSize) {
  Subject s = make(Bytes());
  ASSERT_NE(s.file, nullptr);
  constexpr int kThreads = 6;
  constexpr int kBlocksPerThread = 40;
  constexpr size_t kBlock = 4096;
  std::atomic<bool> done{false};
  std::atomic<bool> size_went_down{false};
  // A reader of size() that runs while the writers extend the file.
  std::thread watcher([&] {
    uint64_t last = 0;
    while (!done.load()) {
      uint64_t now = s.file->size();
      if (now < last) size_went_down = true;
      last = now;
    }
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < kThreads; ++t) {
    writers.emplace_back([&, t] {
      for (int i = 0; i < kBlocksPerThread; ++i) {
        const uint64_t block = i * kThreads + t;
        EXPECT_OK(WriteAt(*s.file, block * kBlock, Bytes(kBlock, static_cast<uint8_t>(block))));
      }
    });
  }
  for (std::thread& w : writers) w.join();
  done = true;
  watcher.join();
  EXPECT_FALSE(size_went_down) << "size() went down while writes only extended the file";
  const uint64_t blocks = kThreads * kBlocksPerThread;
  EXPECT_EQ(s.file->size(), blocks * kBlock);
  Bytes model;
  for (uint64_t b = 0; b < blocks; ++b) model.insert(model.end(), kBlock, static_cast<uint8_t>(b));
  EXPECT_EQ(s.Stored(), model);
}

// --- PosixFile --------------------------------------------------------------

TEST(IoTest, PosixDiscardFreesBlocks) {
  if (!FilesystemPunchesHoles()) {
    GTEST_SKIP() << "the filesystem of " << ::testing::TempDir()
                 << " does not punch holes: cannot check that st_blocks shrinks";
  }
  Subject s = MakePosix(Pattern(1 << 20, 1));
  ASSERT_NE(s.file, nullptr);
  ASSERT_OK(SyncWait(s.file->Flush()));
  struct stat before, after;
  ASSERT_EQ(fstat(s.file->fd(), &before), 0);
  ASSERT_OK(SyncWait(s.file->Discard(256 << 10, 512 << 10)));
  ASSERT_EQ(fstat(s.file->fd(), &after), 0);
  // st_blocks counts 512-byte units; allow a filesystem block of slack.
  EXPECT_LE(after.st_blocks, before.st_blocks - (512 << 10) / 512 + 8)
      << "before " << before.st_blocks << " blocks, after " << after.st_blocks;
  EXPECT_EQ(after.st_size, 1 << 20);
  // And the hole is a hole: SEEK_HOLE finds it.
  ASSERT_OK_AND_ASSIGN(uint64_t hole, s.file->NextHole(0));
  EXPECT_EQ(hole, 256u << 10);
  ASSERT_OK_AND_ASSIGN(uint64_t data, s.file->NextData(256 << 10));
  EXPECT_EQ(data, 768u << 10);
}

// Counts what PosixFile announces (qcow2fuse/blocking.h).
class CountingObserver final : public BlockingObserver {
 public:
  void WillBlock() override { ++announced; }
  void DoneBlocking() override { ++ended; }
  std::atomic<int> announced{0};
  std::atomic<int> ended{0};
};

// A read the page cache answers is not announced; one it cannot answer,
// and every call that changes or syncs the file, is.
TEST(IoTest, PosixAnnouncesTheCallsThatMaySleep) {
  const Bytes all = Pattern(1 << 20, 1);
  Subject s = MakePosix(all);
  ASSERT_NE(s.file, nullptr);
  ASSERT_OK(SyncWait(s.file->Flush()));
  struct statfs fs;
  ASSERT_EQ(fstatfs(s.file->fd(), &fs), 0);
  if (fs.f_type == TMPFS_MAGIC) GTEST_SKIP() << ::testing::TempDir() << " is a tmpfs: its pages cannot be dropped";
  if (!test::TellsWhetherAReadWouldSleep(s.file->fd())) {
    GTEST_SKIP() << "the file system of " << ::testing::TempDir() << " cannot say whether a read would sleep";
  }
  CountingObserver observer;
  SetBlockingObserver(&observer);
  struct Reset {
    ~Reset() { SetBlockingObserver(nullptr); }
  } reset;
  // Cached: the file was just written.
  EXPECT_EQ(ReadAt(*s.file, 4096, 8192), Bytes(all.begin() + 4096, all.begin() + 12288));
  EXPECT_EQ(observer.announced, 0);
  // Dropped from the page cache (clean pages go at once): the read sleeps.
  ASSERT_EQ(posix_fadvise(s.file->fd(), 0, 0, POSIX_FADV_DONTNEED), 0);
  EXPECT_EQ(ReadAt(*s.file, 512 << 10, 4096), Bytes(all.begin() + (512 << 10), all.begin() + (516 << 10)));
  EXPECT_EQ(observer.announced, 1);
  const Bytes data = Pattern(4096, 7);
  ASSERT_OK(SyncWait(s.file->Write(0, data)));
  EXPECT_EQ(observer.announced, 2);
  ASSERT_OK(SyncWait(s.file->Flush()));
  EXPECT_EQ(observer.announced, 3);
  ASSERT_OK(SyncWait(s.file->Allocate(2 << 20, 4096)));
  ASSERT_OK(SyncWait(s.file->Discard(0, 4096)));
  ASSERT_OK(SyncWait(s.file->Truncate(1 << 20)));
  EXPECT_EQ(observer.announced, 6);
  EXPECT_EQ(observer.ended, observer.announced);
}

TEST(IoTest, PosixOpensReadOnlyByDefault) {
  TempPath temp;
  WriteWholeFile(temp.path(), Pattern(4096, 1));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlockFile> file, OpenPosixFile(temp.path()));
  EXPECT_FALSE(file->writable());
  ASSERT_GE(file->fd(), 0);
  EXPECT_EQ(fcntl(file->fd(), F_GETFL) & O_ACCMODE, O_RDONLY);
  EXPECT_EQ(ReadAt(*file, 0, 4096), Pattern(4096, 1));

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlockFile> rw, OpenPosixFile(temp.path(), true));
  EXPECT_TRUE(rw->writable());
  EXPECT_EQ(fcntl(rw->fd(), F_GETFL) & O_ACCMODE, O_RDWR);
}

TEST(IoTest, PosixReadOnlyRefusesWrites) {
  TempPath temp;
  WriteWholeFile(temp.path(), Pattern(4096, 1));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlockFile> file, OpenPosixFile(temp.path()));

  absl::Status write = WriteAt(*file, 0, Bytes(10, 0));
  EXPECT_EQ(write.code(), absl::StatusCode::kFailedPrecondition) << write;
  EXPECT_TRUE(Mentions(write, temp.path()));
  EXPECT_TRUE(Mentions(write, "read-only"));
  absl::Status discard = SyncWait(file->Discard(0, 4096));
  EXPECT_EQ(discard.code(), absl::StatusCode::kFailedPrecondition) << discard;
  EXPECT_TRUE(Mentions(discard, absl::StrCat("discard ", temp.path(), " at offset 0, 4096 bytes")));
  absl::Status truncate = SyncWait(file->Truncate(0));
  EXPECT_EQ(truncate.code(), absl::StatusCode::kFailedPrecondition) << truncate;
  EXPECT_TRUE(Mentions(truncate, temp.path()));
  EXPECT_OK(SyncWait(file->Flush()));  // nothing to make durable

  EXPECT_EQ(file->size(), 4096u);
  EXPECT_EQ(ReadWholeFile(temp.path()), Pattern(4096, 1));
}

TEST(IoTest, PosixOpenErrorsCarryPathAndErrno) {
  TempPath missing;
  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(missing.path(), true);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound) << file.status();
  EXPECT_TRUE(Mentions(file.status(), missing.path()));
  EXPECT_EQ(StatusErrno(file.status()), ENOENT);

  const std::string dir = ::testing::TempDir();
  file = OpenPosixFile(dir, true);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(StatusErrno(file.status()), EISDIR) << file.status();
  EXPECT_TRUE(Mentions(file.status(), dir));

  file = OpenPosixFile(dir);  // opens, but is no file
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
  EXPECT_TRUE(Mentions(file.status(), dir));
}

TEST(IoTest, PosixIoErrorsCarryPathOffsetAndErrno) {
  Subject s = MakePosix(Pattern(4096, 1));
  ASSERT_NE(s.file, nullptr);
  const uint64_t too_far = uint64_t{1} << 63;  // past what off_t holds

  Bytes buf(16);
  absl::Status read = SyncWait(s.file->Read(too_far, buf));
  ASSERT_FALSE(read.ok());
  EXPECT_TRUE(Mentions(read, s.temp->path()));
  EXPECT_TRUE(Mentions(read, absl::StrCat("offset ", too_far)));
  EXPECT_TRUE(StatusErrno(read).has_value()) << read;

  absl::Status write = WriteAt(*s.file, too_far - 8, Bytes(16, 1));
  ASSERT_FALSE(write.ok());
  EXPECT_EQ(StatusErrno(write), EFBIG) << write;
  EXPECT_TRUE(Mentions(write, s.temp->path()));
  EXPECT_TRUE(Mentions(write, absl::StrCat("offset ", too_far - 8)));
  EXPECT_TRUE(Mentions(write, "16 bytes"));

  absl::Status allocate = SyncWait(s.file->Allocate(too_far - 8, 16));
  ASSERT_FALSE(allocate.ok());
  EXPECT_EQ(StatusErrno(allocate), EFBIG) << allocate;
  EXPECT_TRUE(Mentions(allocate, absl::StrCat("allocate ", s.temp->path())));
  EXPECT_TRUE(Mentions(allocate, absl::StrCat("offset ", too_far - 8)));
  EXPECT_TRUE(Mentions(allocate, "16 bytes"));

  absl::Status truncate = SyncWait(s.file->Truncate(too_far));
  ASSERT_FALSE(truncate.ok());
  EXPECT_EQ(StatusErrno(truncate), EFBIG) << truncate;
  EXPECT_TRUE(Mentions(truncate, s.temp->path()));

  // The file is as it was.
  EXPECT_EQ(s.file->size(), 4096u);
  EXPECT_EQ(s.Stored(), Pattern(4096, 1));
}

// --- MemFile ----------------------------------------------------------------

TEST(IoTest, MemFileIsWritableWithoutFd) {
  std::unique_ptr<BlockFile> file = NewMemFile("mem.img", Pattern(10, 1));
  EXPECT_TRUE(file->writable());
  EXPECT_EQ(file->fd(), -1);
  EXPECT_EQ(file->name(), "mem.img");
}

TEST(IoTest, MemFileTooLargeIsAnErrorNamingTheFile) {
  std::unique_ptr<BlockFile> file = NewMemFile("mem.img", Pattern(10, 1));
  absl::Status write = WriteAt(*file, std::numeric_limits<uint64_t>::max() - 4, Bytes(8, 1));
  ASSERT_FALSE(write.ok());
  EXPECT_TRUE(Mentions(write, "mem.img"));
  absl::Status truncate = SyncWait(file->Truncate(std::numeric_limits<uint64_t>::max()));
  ASSERT_FALSE(truncate.ok());
  EXPECT_TRUE(Mentions(truncate, "mem.img"));
  EXPECT_EQ(file->size(), 10u);
}

TEST(IoTest, MemFileContentsRejectsOtherFiles) {
  TempPath temp;
  WriteWholeFile(temp.path(), Pattern(10, 1));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlockFile> posix, OpenPosixFile(temp.path()));
  absl::StatusOr<Bytes> contents = MemFileContents(*posix);
  EXPECT_EQ(contents.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Mentions(contents.status(), temp.path()));
}

// --- BlockFile's defaults ---------------------------------------------------

// A file that implements only what a read-only file must.
class MinimalFile final : public BlockFile {
 public:
  Task<absl::Status> Read(uint64_t, std::span<uint8_t> out) override {
    std::memset(out.data(), 0, out.size());
    co_return absl::OkStatus();
  }
  uint64_t size() const override { return 0; }
  const std::string& name() const override { return name_; }

 private:
  const std::string name_ = "minimal.img";
};

TEST(IoTest, DefaultsAreReadOnly) {
  MinimalFile file;
  EXPECT_FALSE(file.writable());
  EXPECT_EQ(file.fd(), -1);
  EXPECT_OK(SyncWait(file.Flush()));
  for (absl::Status status : {WriteAt(file, 512, Bytes(10, 1)), SyncWait(file.Discard(0, 512)),
                              SyncWait(file.Truncate(512))}) {
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
    EXPECT_TRUE(Mentions(status, "minimal.img is open read-only"));
    EXPECT_TRUE(Mentions(status, "512"));
  }
}

}  // namespace
}  // namespace qcow2fuse
