// LockImage against the real thing: qemu-img and qemu-io 7.2 processes on
// images in a temp dir, checking both directions (our lock keeps QEMU out,
// QEMU's lock keeps us out) and that our bytes are exactly QEMU's.

#include "io/image_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "qcow2fuse/status.h"
#include "support/command.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

extern char** environ;

namespace qcow2fuse::test {
namespace {

using std::chrono::milliseconds;

// Generous bounds: only reached when something is broken.
constexpr milliseconds kCommandTimeout{60'000};
constexpr milliseconds kLockAppearTimeout{20'000};
constexpr milliseconds kExitGrace{10'000};

// The bytes QEMU 7.2 holds on a qcow2 image's file, observed in /proc/locks.
const std::set<int> kQemuReadWriteBytes = {100, 101, 103, 201, 203};
const std::set<int> kQemuReadOnlyBytes = {100, 201, 203};
// And on its external data file: the same, but write is shared.
const std::set<int> kQemuDataFileReadWriteBytes = {100, 101, 103, 203};
const std::set<int> kQemuDataFileReadOnlyBytes = {100, 203};

// A file descriptor closed on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      Reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  ~Fd() { Reset(); }

  int get() const { return fd_; }
  void Reset() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

absl::StatusOr<Fd> OpenFile(const std::string& path, int flags) {
  int fd = open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("open ", path));
  return Fd(fd);
}

// A child process, reaped in every path: the destructor closes its stdin,
// gives it kExitGrace to finish, then kills it, and always waits for it.
// stdout and stderr go together into an unlinked temporary file.
class Child {
 public:
  // Starts `argv`. With `stdin_pipe`, the child's stdin is a pipe that stays
  // open until CloseStdin() (qemu-io then keeps running, reading commands);
  // without it, stdin is /dev/null.
  static absl::StatusOr<std::unique_ptr<Child>> Start(std::vector<std::string> argv,
                                                      bool stdin_pipe) {
    auto child = std::unique_ptr<Child>(new Child(std::move(argv)));
    RETURN_IF_ERROR(child->Spawn(stdin_pipe));
    return child;
  }

  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  ~Child() {
    if (pid_ <= 0 || reaped_) return;
    CloseStdin();
    absl::StatusOr<std::optional<ExitStatus>> done = WaitForExitFor(pid_, kExitGrace);
    if (done.ok() && !done->has_value()) {
      kill(pid_, SIGKILL);
      WaitForExit(pid_).IgnoreError();
    }
  }

  pid_t pid() const { return pid_; }
  const std::vector<std::string>& argv() const { return argv_; }

  void CloseStdin() { stdin_.Reset(); }

  // Whether the child has exited (and is then reaped), without waiting.
  bool Exited() {
    if (reaped_) return true;
    absl::StatusOr<std::optional<ExitStatus>> done = WaitForExitFor(pid_, milliseconds(0));
    if (done.ok() && done->has_value()) {
      reaped_ = true;
      status_ = **done;
    }
    return reaped_;
  }

  // Closes stdin and waits up to `timeout` for the child to exit; kills it
  // (and reports an error) if it does not.
  absl::StatusOr<ExitStatus> Finish(milliseconds timeout) {
    CloseStdin();
    if (!reaped_) {
      ASSIGN_OR_RETURN(std::optional<ExitStatus> done, WaitForExitFor(pid_, timeout));
      if (!done.has_value()) {
        kill(pid_, SIGKILL);
        WaitForExit(pid_).IgnoreError();
        reaped_ = true;
        return absl::DeadlineExceededError(
            absl::StrCat(CommandLine(argv_), " did not exit in time; output:\n", Output()));
      }
      reaped_ = true;
      status_ = *done;
    }
    return status_;
  }

  std::string Output() const {
    std::string text;
    char buffer[4096];
    off_t offset = 0;
    for (;;) {
      ssize_t n = pread(output_.get(), buffer, sizeof(buffer), offset);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      text.append(buffer, n);
      offset += n;
    }
    return text;
  }

 private:
  explicit Child(std::vector<std::string> argv) : argv_(std::move(argv)) {}

  absl::Status Spawn(bool stdin_pipe) {
    const char* tmpdir = getenv("TMPDIR");
    std::string pattern = absl::StrCat(
        (tmpdir != nullptr && *tmpdir != '\0') ? tmpdir : "/tmp", "/qcow2fuse-lock-out-XXXXXX");
    int out = mkostemp(pattern.data(), O_CLOEXEC);
    if (out < 0) return ErrnoStatus(errno, absl::StrCat("mkostemp ", pattern));
    unlink(pattern.c_str());
    output_ = Fd(out);

    Fd read_end;
    if (stdin_pipe) {
      int fds[2];
      // Close-on-exec, so no other child inherits the write end and keeps
      // this one's stdin open after CloseStdin().
      if (pipe2(fds, O_CLOEXEC) != 0) return ErrnoStatus(errno, "pipe2");
      read_end = Fd(fds[0]);
      stdin_ = Fd(fds[1]);
    }

    std::vector<char*> c_argv;
    for (std::string& arg : argv_) c_argv.push_back(arg.data());
    c_argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    if (stdin_pipe) {
      posix_spawn_file_actions_adddup2(&actions, read_end.get(), STDIN_FILENO);
    } else {
      posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    }
    posix_spawn_file_actions_adddup2(&actions, output_.get(), STDOUT_FILENO);
    posix_spawn_file_actions_adddup2(&actions, output_.get(), STDERR_FILENO);
    int error = posix_spawnp(&pid_, c_argv[0], &actions, nullptr, c_argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (error != 0) {
      pid_ = -1;
      return ErrnoStatus(error, absl::StrCat("start ", CommandLine(argv_)));
    }
    return absl::OkStatus();
  }

  std::vector<std::string> argv_;
  pid_t pid_ = -1;
  bool reaped_ = false;
  ExitStatus status_;
  Fd stdin_;
  Fd output_;
};

struct RunResult {
  ExitStatus status;
  std::string output;  // stdout and stderr, interleaved
};

// Runs `argv` to completion (bounded by kCommandTimeout).
absl::StatusOr<RunResult> RunProgram(std::vector<std::string> argv) {
  ASSIGN_OR_RETURN(std::unique_ptr<Child> child, Child::Start(std::move(argv), false));
  ASSIGN_OR_RETURN(ExitStatus status, child->Finish(kCommandTimeout));
  return RunResult{status, child->Output()};
}

// Expects `argv` to succeed.
void ExpectRuns(const std::vector<std::string>& argv) {
  absl::StatusOr<RunResult> result = RunProgram(argv);
  ASSERT_OK(result);
  EXPECT_TRUE(result->status.success())
      << CommandLine(argv) << ": " << result->status.ToString() << "\n" << result->output;
}

// Expects `argv` to fail with QEMU's lock error `lock_error` (e.g.
// 'Failed to get shared "write" lock').
void ExpectLockedOut(const std::vector<std::string>& argv, const std::string& lock_error) {
  absl::StatusOr<RunResult> result = RunProgram(argv);
  ASSERT_OK(result);
  EXPECT_FALSE(result->status.success()) << CommandLine(argv) << " succeeded:\n" << result->output;
  EXPECT_TRUE(absl::StrContains(result->output, lock_error))
      << CommandLine(argv) << ": expected \"" << lock_error << "\" in:\n" << result->output;
}

// The bytes below 1000 locked on `path`'s inode, from /proc/locks (OFD
// locks show there with pid -1, so this is everybody's locks together).
absl::StatusOr<std::set<int>> LockedBytes(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return ErrnoStatus(errno, absl::StrCat("stat ", path));
  std::ifstream locks("/proc/locks");
  if (!locks) return absl::UnavailableError("cannot read /proc/locks");
  const std::string inode_suffix = absl::StrCat(":", st.st_ino);
  std::set<int> bytes;
  std::string line;
  while (std::getline(locks, line)) {
    if (absl::StrContains(line, "->")) continue;  // a blocked waiter
    std::vector<std::string> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
    // "1: OFDLCK ADVISORY READ -1 fe:00:10993750 100 101"
    if (fields.size() < 8 || !absl::EndsWith(fields[5], inode_suffix)) continue;
    int start, end;
    if (!absl::SimpleAtoi(fields[6], &start)) continue;
    if (!absl::SimpleAtoi(fields[7], &end)) end = 999;  // "EOF"
    for (int b = start; b <= end && b < 1000; ++b) bytes.insert(b);
  }
  return bytes;
}

std::string Show(const std::set<int>& bytes) { return absl::StrJoin(bytes, " "); }

// Whether another open file description holds a lock on `byte` of `fd`'s file.
bool HeldByOthers(int fd, int byte) {
  struct flock fl = {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  return fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

// `qemu-io -f qcow2 [-r] IMAGE` kept running on an open stdin pipe, holding
// the image the way a running VM does, until Stop() or destruction.
class QemuIoHolder {
 public:
  static absl::StatusOr<std::unique_ptr<QemuIoHolder>> Start(const std::string& image,
                                                             bool read_only) {
    std::vector<std::string> argv = {"qemu-io", "-f", "qcow2"};
    if (read_only) argv.push_back("-r");
    argv.push_back(image);
    auto holder = std::unique_ptr<QemuIoHolder>(new QemuIoHolder);
    ASSIGN_OR_RETURN(holder->child_, Child::Start(std::move(argv), true));
    RETURN_IF_ERROR(holder->WaitForLocks(image, read_only ? kQemuReadOnlyBytes
                                                          : kQemuReadWriteBytes));
    return holder;
  }

  // Ends qemu-io (EOF on its stdin) and waits for it; its locks are gone after.
  absl::Status Stop() {
    ASSIGN_OR_RETURN(ExitStatus status, child_->Finish(kCommandTimeout));
    if (!status.success()) {
      return absl::InternalError(absl::StrCat(CommandLine(child_->argv()), " ended with ",
                                              status.ToString(), ":\n", child_->Output()));
    }
    return absl::OkStatus();
  }

 private:
  QemuIoHolder() = default;

  // Polls (from a probe descriptor of our own) until every byte of `bytes`
  // is locked, i.e. qemu-io has opened the image.
  absl::Status WaitForLocks(const std::string& image, const std::set<int>& bytes) {
    ASSIGN_OR_RETURN(Fd probe, OpenFile(image, O_RDONLY));
    const auto deadline = std::chrono::steady_clock::now() + kLockAppearTimeout;
    for (;;) {
      bool all = true;
      for (int byte : bytes) all = all && HeldByOthers(probe.get(), byte);
      if (all) return absl::OkStatus();
      if (child_->Exited()) {
        return absl::InternalError(absl::StrCat(CommandLine(child_->argv()),
                                                " exited early:\n", child_->Output()));
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat(
            CommandLine(child_->argv()), " did not lock bytes ", Show(bytes), " in time"));
      }
      std::this_thread::sleep_for(milliseconds(5));
    }
  }

  std::unique_ptr<Child> child_;
};

class ImageLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<RunResult> version = RunProgram({"qemu-io", "--version"});
    if (!version.ok() || !version->status.success()) GTEST_SKIP() << "qemu-io not available";
    absl::StatusOr<TempDir> dir = TempDir::Create("image-lock");
    ASSERT_OK(dir);
    dir_.emplace(std::move(*dir));
    image_ = dir_->Join("disk.qcow2");
    ASSERT_OK(CreateImage(image_, "qcow2", 4 * kMiB));
  }

  // A new open file description of the image, locked in `mode`.
  absl::StatusOr<Fd> OpenLocked(LockMode mode) {
    ASSIGN_OR_RETURN(Fd fd, OpenFile(image_, mode == LockMode::kReadOnly ? O_RDONLY : O_RDWR));
    RETURN_IF_ERROR(LockImage(fd.get(), mode, image_));
    return fd;
  }

  // Expects `status` to be our "in use" refusal of `name` (default: the
  // image) naming `byte`.
  void ExpectInUse(const absl::Status& status, int byte, const std::string& what,
                   const std::string& name = "") {
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
    EXPECT_EQ(StatusErrno(status), std::optional<int>(EAGAIN)) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), (name.empty() ? image_ : name) + " is in use: "))
        << status;
    EXPECT_TRUE(absl::StrContains(status.message(), absl::StrCat("QEMU lock byte ", byte)))
        << status;
    EXPECT_TRUE(absl::StrContains(status.message(), what)) << status;
  }

  std::optional<TempDir> dir_;
  std::string image_;
};

constexpr char kSharedWriteError[] = "Failed to get shared \"write\" lock";
constexpr char kWriteError[] = "Failed to get \"write\" lock";

TEST_F(ImageLockTest, BytesMatchWhatQemuIoTakes) {
  {
    ASSERT_OK_AND_ASSIGN(std::set<int> none, LockedBytes(image_));
    ASSERT_TRUE(none.empty()) << Show(none);
  }
  for (bool read_only : {false, true}) {
    SCOPED_TRACE(read_only ? "read-only" : "read-write");
    std::set<int> qemu, ours;
    {
      ASSERT_OK_AND_ASSIGN(auto holder, QemuIoHolder::Start(image_, read_only));
      ASSERT_OK_AND_ASSIGN(qemu, LockedBytes(image_));
      ASSERT_OK(holder->Stop());
    }
    {
      ASSERT_OK_AND_ASSIGN(Fd fd, OpenLocked(read_only ? LockMode::kReadOnly
                                                       : LockMode::kReadWrite));
      ASSERT_OK_AND_ASSIGN(ours, LockedBytes(image_));
    }
    EXPECT_EQ(Show(ours), Show(qemu));
    EXPECT_EQ(Show(ours), Show(read_only ? kQemuReadOnlyBytes : kQemuReadWriteBytes));
  }
  ASSERT_OK_AND_ASSIGN(std::set<int> after, LockedBytes(image_));
  EXPECT_TRUE(after.empty()) << "closing the fd should release everything: " << Show(after);
}

TEST_F(ImageLockTest, ReadWriteLockKeepsQemuOut) {
  ASSERT_OK_AND_ASSIGN(Fd fd, OpenLocked(LockMode::kReadWrite));
  ExpectLockedOut({"qemu-img", "info", image_}, kSharedWriteError);
  ExpectLockedOut({"qemu-img", "check", image_}, kSharedWriteError);
  ExpectLockedOut({"qemu-io", "-f", "qcow2", "-c", "write 0 4k", image_}, kWriteError);
  ExpectLockedOut({"qemu-io", "-f", "qcow2", "-r", "-c", "read 0 4k", image_},
                  kSharedWriteError);
  ExpectRuns({"qemu-img", "info", "-U", image_});
  ExpectRuns({"qemu-io", "-f", "qcow2", "-r", "-U", "-c", "read 0 4k", image_});

  ASSERT_OK(UnlockImage(fd.get()));
  ExpectRuns({"qemu-img", "check", image_});
}

TEST_F(ImageLockTest, ReadOnlyLockLetsReadersInKeepsWritersOut) {
  ASSERT_OK_AND_ASSIGN(Fd fd, OpenLocked(LockMode::kReadOnly));
  ExpectRuns({"qemu-img", "info", image_});
  ExpectRuns({"qemu-img", "check", image_});
  ExpectRuns({"qemu-io", "-f", "qcow2", "-r", "-c", "read 0 4k", image_});
  ExpectLockedOut({"qemu-io", "-f", "qcow2", "-c", "write 0 4k", image_}, kWriteError);
  ExpectLockedOut({"qemu-img", "resize", image_, "8M"}, "Failed to get \"write\" lock");

  fd.Reset();
  ExpectRuns({"qemu-io", "-f", "qcow2", "-c", "write 0 4k", image_});
}

TEST_F(ImageLockTest, QemuWriterRefusesBothModesUntilItExits) {
  ASSERT_OK_AND_ASSIGN(auto holder, QemuIoHolder::Start(image_, /*read_only=*/false));
  {
    ASSERT_OK_AND_ASSIGN(Fd fd, OpenFile(image_, O_RDWR));
    ExpectInUse(LockImage(fd.get(), LockMode::kReadWrite, image_), 201,
                "another process has it open and does not share write access");
    // Like qemu-img info/check without -U against a running VM.
    ExpectInUse(LockImage(fd.get(), LockMode::kReadOnly, image_), 101,
                "another process has it open for writing");
    // A refused attempt leaves nothing of ours behind.
    ASSERT_OK_AND_ASSIGN(std::set<int> bytes, LockedBytes(image_));
    EXPECT_EQ(Show(bytes), Show(kQemuReadWriteBytes));
  }
  ASSERT_OK(holder->Stop());
  {
    ASSERT_OK_AND_ASSIGN(Fd fd, OpenLocked(LockMode::kReadWrite));
  }
  {
    ASSERT_OK_AND_ASSIGN(Fd fd, OpenLocked(LockMode::kReadOnly));
  }
}

TEST_F(ImageLockTest, QemuReaderAdmitsOurReaderNotOurWriter) {
  ASSERT_OK_AND_ASSIGN(auto holder, QemuIoHolder::Start(image_, /*read_only=*/true));
  {
    ASSERT_OK_AND_ASSIGN(Fd fd, OpenLocked(LockMode::kReadOnly));
  }
  {
    ASSERT_OK_AND_ASSIGN(Fd fd, OpenFile(image_, O_RDWR));
    ExpectInUse(LockImage(fd.get(), LockMode::kReadWrite, image_), 201,
                "does not share write access");
  }
  ASSERT_OK(holder->Stop());
  ASSERT_OK_AND_ASSIGN(Fd fd, OpenLocked(LockMode::kReadWrite));
}

TEST_F(ImageLockTest, OurReadOnlyLocksCoexist) {
  ASSERT_OK_AND_ASSIGN(Fd first, OpenLocked(LockMode::kReadOnly));
  ASSERT_OK_AND_ASSIGN(Fd second, OpenLocked(LockMode::kReadOnly));
  ExpectRuns({"qemu-img", "info", image_});
  // Each holds the same bytes; dropping one keeps the other's.
  first.Reset();
  ExpectLockedOut({"qemu-io", "-f", "qcow2", "-c", "write 0 4k", image_}, kWriteError);
  ASSERT_OK_AND_ASSIGN(std::set<int> bytes, LockedBytes(image_));
  EXPECT_EQ(Show(bytes), Show(kQemuReadOnlyBytes));
}

TEST_F(ImageLockTest, OurReadWriteConflictsWithOurOtherLocks) {
  {
    ASSERT_OK_AND_ASSIGN(Fd writer, OpenLocked(LockMode::kReadWrite));
    ASSERT_OK_AND_ASSIGN(Fd other, OpenFile(image_, O_RDWR));
    ExpectInUse(LockImage(other.get(), LockMode::kReadOnly, image_), 101, "open for writing");
    ExpectInUse(LockImage(other.get(), LockMode::kReadWrite, image_), 201,
                "does not share write access");
  }
  {
    ASSERT_OK_AND_ASSIGN(Fd reader, OpenLocked(LockMode::kReadOnly));
    ASSERT_OK_AND_ASSIGN(Fd other, OpenFile(image_, O_RDWR));
    ExpectInUse(LockImage(other.get(), LockMode::kReadWrite, image_), 201,
                "does not share write access");
  }
}

TEST_F(ImageLockTest, LocksLiveAsLongAsTheOpenFileDescription) {
  ASSERT_OK_AND_ASSIGN(Fd fd, OpenLocked(LockMode::kReadWrite));
  Fd copy(dup(fd.get()));
  ASSERT_GE(copy.get(), 0);
  fd.Reset();  // the description lives on through the copy
  ExpectLockedOut({"qemu-img", "info", image_}, kSharedWriteError);
  copy.Reset();  // last descriptor: the locks go with it
  ExpectRuns({"qemu-img", "info", image_});
  ASSERT_OK_AND_ASSIGN(std::set<int> bytes, LockedBytes(image_));
  EXPECT_TRUE(bytes.empty()) << Show(bytes);
}

TEST_F(ImageLockTest, SwitchingModesLeavesExactlyTheNewBytes) {
  ASSERT_OK_AND_ASSIGN(Fd fd, OpenLocked(LockMode::kReadOnly));
  ASSERT_OK(LockImage(fd.get(), LockMode::kReadWrite, image_));
  ASSERT_OK_AND_ASSIGN(std::set<int> upgraded, LockedBytes(image_));
  EXPECT_EQ(Show(upgraded), Show(kQemuReadWriteBytes));
  ExpectLockedOut({"qemu-img", "info", image_}, kSharedWriteError);

  ASSERT_OK(LockImage(fd.get(), LockMode::kReadOnly, image_));
  ASSERT_OK_AND_ASSIGN(std::set<int> downgraded, LockedBytes(image_));
  EXPECT_EQ(Show(downgraded), Show(kQemuReadOnlyBytes));
  ExpectRuns({"qemu-img", "info", image_});

  ASSERT_OK(UnlockImage(fd.get()));
  ASSERT_OK_AND_ASSIGN(std::set<int> none, LockedBytes(image_));
  EXPECT_TRUE(none.empty()) << Show(none);
}

// --- External data files -------------------------------------------------------

class DataFileLockTest : public ImageLockTest {
 protected:
  void SetUp() override {
    ImageLockTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    // An image keeping its data in data.raw, and a copy naming the same file.
    with_data_ = dir_->Join("with-data.qcow2");
    other_ = dir_->Join("other.qcow2");
    data_ = dir_->Join("data.raw");
    ASSERT_OK(CreateImage(with_data_, "qcow2", 4 * kMiB, {"data_file=" + data_}));
    ExpectRuns({"cp", with_data_, other_});
  }

  // QemuIoHolder waits for the image's locks; the data file's may come a
  // moment later.
  absl::StatusOr<std::set<int>> WaitForDataFileBytes(const std::set<int>& bytes) {
    const auto deadline = std::chrono::steady_clock::now() + kLockAppearTimeout;
    for (;;) {
      ASSIGN_OR_RETURN(std::set<int> held, LockedBytes(data_));
      if (held == bytes || std::chrono::steady_clock::now() >= deadline) return held;
      std::this_thread::sleep_for(milliseconds(5));
    }
  }

  absl::StatusOr<Fd> OpenDataLocked(LockMode mode) {
    ASSIGN_OR_RETURN(Fd fd, OpenFile(data_, mode == LockMode::kDataFileReadOnly ? O_RDONLY : O_RDWR));
    RETURN_IF_ERROR(LockImage(fd.get(), mode, data_));
    return fd;
  }

  std::string with_data_, other_, data_;
};

TEST_F(DataFileLockTest, BytesMatchWhatQemuIoTakesOnADataFile) {
  for (bool read_only : {false, true}) {
    SCOPED_TRACE(read_only ? "read-only" : "read-write");
    std::set<int> qemu, ours;
    const std::set<int>& expected = read_only ? kQemuDataFileReadOnlyBytes : kQemuDataFileReadWriteBytes;
    {
      ASSERT_OK_AND_ASSIGN(auto holder, QemuIoHolder::Start(with_data_, read_only));
      ASSERT_OK_AND_ASSIGN(qemu, WaitForDataFileBytes(expected));
      ASSERT_OK(holder->Stop());
    }
    {
      ASSERT_OK_AND_ASSIGN(Fd fd, OpenDataLocked(read_only ? LockMode::kDataFileReadOnly
                                                           : LockMode::kDataFileReadWrite));
      ASSERT_OK_AND_ASSIGN(ours, LockedBytes(data_));
    }
    EXPECT_EQ(Show(ours), Show(qemu));
    EXPECT_EQ(Show(ours), Show(expected));
  }
}

// A QEMU writer of one image keeps us from opening another image onto its
// data file, reading or writing (it holds resize, which neither shares).
TEST_F(DataFileLockTest, QemuWriterOfTheDataFileRefusesBothModes) {
  ASSERT_OK_AND_ASSIGN(auto holder, QemuIoHolder::Start(with_data_, /*read_only=*/false));
  ASSERT_OK(WaitForDataFileBytes(kQemuDataFileReadWriteBytes));
  {
    ASSERT_OK_AND_ASSIGN(Fd fd, OpenFile(data_, O_RDWR));
    ExpectInUse(LockImage(fd.get(), LockMode::kDataFileReadWrite, data_), 203,
                "does not share resizing", data_);
    ExpectInUse(LockImage(fd.get(), LockMode::kDataFileReadOnly, data_), 103,
                "open for resizing", data_);
  }
  ASSERT_OK(holder->Stop());
  ASSERT_OK_AND_ASSIGN(Fd fd, OpenDataLocked(LockMode::kDataFileReadWrite));
}

// A QEMU reader admits our reader, not our writer, as QEMU admits its own.
TEST_F(DataFileLockTest, QemuReaderOfTheDataFileAdmitsOnlyOurReader) {
  ASSERT_OK_AND_ASSIGN(auto holder, QemuIoHolder::Start(with_data_, /*read_only=*/true));
  ASSERT_OK(WaitForDataFileBytes(kQemuDataFileReadOnlyBytes));
  {
    ASSERT_OK_AND_ASSIGN(Fd fd, OpenDataLocked(LockMode::kDataFileReadOnly));
  }
  ASSERT_OK_AND_ASSIGN(Fd fd, OpenFile(data_, O_RDWR));
  ExpectInUse(LockImage(fd.get(), LockMode::kDataFileReadWrite, data_), 203, "does not share resizing",
              data_);
}

// Our locks on a data file keep QEMU from opening another image onto it,
// but not from opening the data file alone as raw, which QEMU allows too.
// (QEMU names the first conflict it finds: "shared \"resize\"" when we
// hold resize, "\"resize\"" when we refuse to share it.)
TEST_F(DataFileLockTest, OurDataFileLocksKeepQemuOut) {
  {
    ASSERT_OK_AND_ASSIGN(Fd fd, OpenDataLocked(LockMode::kDataFileReadWrite));
    ExpectLockedOut({"qemu-io", "-f", "qcow2", "-c", "read 0 4k", other_},
                    "Failed to get shared \"resize\" lock");
    ExpectLockedOut({"qemu-io", "-f", "qcow2", "-r", "-c", "read 0 4k", other_},
                    "Failed to get shared \"resize\" lock");
    ExpectRuns({"qemu-io", "-f", "raw", "-c", "read 0 4k", data_});
  }
  {
    ASSERT_OK_AND_ASSIGN(Fd fd, OpenDataLocked(LockMode::kDataFileReadOnly));
    ExpectLockedOut({"qemu-io", "-f", "qcow2", "-c", "read 0 4k", other_}, "Failed to get \"resize\" lock");
    ExpectRuns({"qemu-io", "-f", "qcow2", "-r", "-c", "read 0 4k", other_});
  }
  ExpectRuns({"qemu-io", "-f", "qcow2", "-c", "write 0 4k", other_});
}

TEST_F(ImageLockTest, SystemErrorsAreNotInUse) {
  absl::Status bad = LockImage(-1, LockMode::kReadOnly, image_);
  EXPECT_FALSE(absl::StrContains(bad.message(), "is in use")) << bad;
  EXPECT_EQ(StatusErrno(bad), std::optional<int>(EBADF)) << bad;

  // A read lock needs a descriptor open for reading.
  ASSERT_OK_AND_ASSIGN(Fd write_only, OpenFile(image_, O_WRONLY));
  absl::Status status = LockImage(write_only.get(), LockMode::kReadWrite, image_);
  EXPECT_FALSE(absl::StrContains(status.message(), "is in use")) << status;
  EXPECT_EQ(StatusErrno(status), std::optional<int>(EBADF)) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), image_)) << status;
}

}  // namespace
}  // namespace qcow2fuse::test
