// The qcow2fuse command line as a user meets it:
//
//   qcow2fuse [-f] [-d] [-o OPT[,OPT...]] [--pidfile PATH] IMAGE MOUNTPOINT
//
// usage errors, the -o ro requirement, the mountpoint file's life cycle,
// daemon mode (which must return only once the view is live), every way a
// foreground mount can be stopped, and the l2_cache_size and data_file
// options. Every mount is taken down by an RAII guard (MountedView for -f,
// DaemonGuard for daemon mode) whatever happens to the test.

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/scoped_env.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test::cli {
namespace {

constexpr uint64_t kSampleSize = 64 * kMiB;

bool Exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    BecomeSubreaper();
    absl::StatusOr<TempDir> dir = TempDir::Create("cli");
    ASSERT_OK(dir);
    dir_ = std::make_unique<TempDir>(std::move(*dir));
  }

  std::string Path(absl::string_view name) const { return dir_->Join(name); }

  // A 64 MiB qcow2 image with some data, a zeroed range and holes, and its
  // reference contents from `qemu-img convert -O raw`.
  void MakeSample(const std::string& image, const std::string& reference,
                  const std::vector<std::string>& create_options = {}) {
    ASSERT_OK(CreateImage(image, "qcow2", kSampleSize, create_options));
    ASSERT_OK(QemuIo(image, "qcow2",
                     {"write -P 0x11 0 64k", "write -P 0x22 1M 4k",
                      "write -P 0x33 33M 100k", "write -z 2M 64k",
                      "write -P 0x44 63M 1M"}));
    ASSERT_OK(ConvertToRaw(image, reference));
  }

  MountOptions ViewOptions(const std::string& image,
                           const std::string& mountpoint) const {
    MountOptions options;
    options.binary = Binary();
    options.image = image;
    options.mountpoint = mountpoint;
    return options;
  }

  // Mounts `image` with -o data_file=`data_file`, expects the view to read
  // as `reference`, and unmounts it cleanly.
  void ExpectViewWithDataFile(const std::string& image, const std::string& mountpoint,
                              const std::string& data_file, const std::string& reference) {
    MountOptions options = ViewOptions(image, mountpoint);
    options.extra_options = {"data_file=" + data_file};
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
    EXPECT_OK(CompareFiles(mountpoint, reference));
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status() && view->exit_status()->success()) << view->ReadLog();
  }

  // Declared first among the members a test body uses, destroyed last:
  // after every guard that mounts inside it.
  std::unique_ptr<TempDir> dir_;
};

// ---------------------------------------------------------------- usage --

TEST_F(CliTest, HelpPrintsUsageAndExitsZero) {
  for (const char* flag : {"-h", "--help"}) {
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded({Binary(), flag}));
    EXPECT_TRUE(run.status.success()) << run.Describe();
    EXPECT_TRUE(absl::StrContains(run.stdout_text, "usage")) << run.Describe();
    EXPECT_TRUE(absl::StrContains(run.stdout_text, "MOUNTPOINT")) << run.Describe();
  }
}

TEST_F(CliTest, VersionPrintsVersionAndExitsZero) {
  for (const char* flag : {"-V", "--version"}) {
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded({Binary(), flag}));
    EXPECT_TRUE(run.status.success()) << run.Describe();
    EXPECT_TRUE(absl::StrContains(run.stdout_text, "qcow2fuse")) << run.Describe();
    EXPECT_TRUE(std::regex_search(run.stdout_text, std::regex("[0-9]+\\.[0-9]+")))
        << run.Describe();
    // and libfuse's, which decides what the kernel is offered.
    EXPECT_TRUE(std::regex_search(run.stdout_text, std::regex("libfuse [0-9]+\\.[0-9]+\\.[0-9]+")))
        << run.Describe();
  }
}

TEST_F(CliTest, MissingArgumentsIsAUsageError) {
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kSampleSize));
  const std::vector<std::vector<std::string>> cases = {
      {Binary()},
      {Binary(), "-o", "ro"},
      {Binary(), "-o", "ro", image},
      {Binary(), "-f", "-o", "ro", image},
      {Binary(), "-o"},                       // -o without its value
      {Binary(), "-o", "ro", "--pidfile"},    // --pidfile without its value
  };
  for (const std::vector<std::string>& argv : cases) {
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded(argv));
    EXPECT_FALSE(run.timed_out) << run.Describe();
    EXPECT_TRUE(run.status.exited()) << run.Describe();
    EXPECT_NE(run.status.code(), 0) << run.Describe();
    EXPECT_TRUE(FailsWithOneLine(run, {"qcow2fuse --help"}));
  }
}

// One line, not the usage text: mount_options_test.cc checks the wording.
TEST_F(CliTest, UnknownOptionExitsTwoWithOneLine) {
  const std::string image = Path("disk.qcow2");
  const std::string mountpoint = Path("view.raw");
  ASSERT_OK(CreateImage(image, "qcow2", kSampleSize));
  const std::vector<std::vector<std::string>> cases = {
      {Binary(), "--bogus", "-o", "ro", image, mountpoint},
      {Binary(), "-x", "-o", "ro", image, mountpoint},
      {Binary(), "-f", "-o", "ro,no_such_option", image, mountpoint},
      {Binary(), "-f", "-o", "ro", "-o", "l2_cache_size=lots", image, mountpoint},
  };
  for (const std::vector<std::string>& argv : cases) {
    RunOptions options;
    options.watch_mountpoint = mountpoint;
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded(argv, options));
    EXPECT_TRUE(run.status.exited() && run.status.code() == 2) << run.Describe();
    EXPECT_TRUE(FailsWithOneLine(run, {"qcow2fuse --help"}));
    EXPECT_FALSE(run.mounted_during_run) << run.Describe();
    EXPECT_FALSE(IsMounted(mountpoint));
    EXPECT_FALSE(Exists(mountpoint)) << "a usage error created the mountpoint";
  }
}

TEST_F(CliTest, ForceShareWithoutReadOnlyIsRefused) {
  const std::string image = Path("disk.qcow2");
  const std::string mountpoint = Path("view.raw");
  ASSERT_OK(CreateImage(image, "qcow2", kSampleSize));
  RunOptions options;
  options.timeout = std::chrono::seconds(30);
  options.watch_mountpoint = mountpoint;
  ASSERT_OK_AND_ASSIGN(RunResult run,
                       RunBounded({Binary(), "-f", "-o", "force_share", image, mountpoint}, options));
  EXPECT_TRUE(run.status.exited() && run.status.code() == 2) << run.Describe();
  EXPECT_TRUE(absl::StrContains(run.stderr_text, "force_share needs ro")) << run.Describe();
  EXPECT_FALSE(run.mounted_during_run || IsMounted(mountpoint)) << run.Describe();
}

TEST_F(CliTest, ReadWriteMountWritesAndLeavesImageConsistent) {
  const std::string image = Path("disk.qcow2");
  const std::string mountpoint = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  ASSERT_OK(CreateImage(image, "qcow2", kSampleSize));
  {
    DaemonGuard guard(mountpoint, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult run,
                         RunBounded({Binary(), "--pidfile", pidfile, image, mountpoint}));
    ASSERT_TRUE(run.status.success()) << run.Describe();
    int fd = open(mountpoint.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0) << strerror(errno);
    std::vector<char> pattern(100000, static_cast<char>(0xa5));
    EXPECT_EQ(pwrite(fd, pattern.data(), pattern.size(), 12345), static_cast<ssize_t>(pattern.size()));
    EXPECT_EQ(fsync(fd), 0) << strerror(errno);
    close(fd);
    // While mounted read-write, QEMU may not write the image.
    EXPECT_FALSE(QemuIo(image, "qcow2", {"write 0 4k"}).ok());
    guard.Cleanup();
  }
  EXPECT_OK(CheckImage(image));
  EXPECT_OK(QemuIo(image, "qcow2", {"read -P 0xa5 12345 100000", "read -P 0 0 12345"}));
}

// fallocate modes other than PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE and
// preallocation (mode 0, KEEP_SIZE) fail with EOPNOTSUPP and leave the disk
// as it was: shifting a disk's bytes (COLLAPSE_RANGE, INSERT_RANGE) is not
// something a disk does, and a hole punched must keep the size.
TEST_F(CliTest, OtherFallocateModesAreNotSupported) {
  const std::string image = Path("disk.qcow2");
  const std::string mountpoint = Path("view.raw");
  ASSERT_OK(CreateImage(image, "qcow2", kSampleSize));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x5a 0 4M"}));
  const std::string before = Path("before.raw");
  ASSERT_OK(ConvertToRaw(image, before));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(WritableView(image, mountpoint)));
    const int fd = open(mountpoint.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0) << strerror(errno);
    struct Mode {
      int mode;
      const char* name;
    };
    for (const Mode& m : {Mode{FALLOC_FL_COLLAPSE_RANGE, "COLLAPSE_RANGE"},
                          Mode{FALLOC_FL_INSERT_RANGE, "INSERT_RANGE"},
                          Mode{FALLOC_FL_UNSHARE_RANGE, "UNSHARE_RANGE"},
                          Mode{FALLOC_FL_PUNCH_HOLE, "PUNCH_HOLE without KEEP_SIZE"}}) {
      errno = 0;
      EXPECT_EQ(fallocate(fd, m.mode, kMiB, kMiB), -1) << m.name << " succeeded";
      EXPECT_EQ(errno, EOPNOTSUPP) << m.name << ": " << strerror(errno);
    }
    struct stat st;
    ASSERT_EQ(fstat(fd, &st), 0) << strerror(errno);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), kSampleSize);
    EXPECT_EQ(close(fd), 0) << strerror(errno);
    EXPECT_OK(CompareFiles(mountpoint, before));
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  }
  EXPECT_OK(CheckImage(image));
  const std::string after = Path("after.raw");
  ASSERT_OK(ConvertToRaw(image, after));
  EXPECT_OK(CompareFiles(after, before));
}

// A crash with lazy refcounts leaves the dirty bit set and refcounts that
// undercount. A read-write mount rebuilds them before writing anything.
TEST_F(CliTest, DirtyImageIsRepairedBeforeWriting) {
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kSampleSize, {"lazy_refcounts=on"}));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x11 0 3M"}));
  // What a crash leaves: dirty, and the data clusters' refcounts never
  // written (the first refcount block's entries 5.. are data clusters).
  ASSERT_OK_AND_ASSIGN(uint64_t features, ReadBE64At(image, hdr::kIncompatibleFeatures));
  ASSERT_OK(WriteBE64At(image, hdr::kIncompatibleFeatures, features | 1));
  ASSERT_OK_AND_ASSIGN(uint64_t table, ReadBE64At(image, hdr::kRefcountTableOffset));
  ASSERT_OK_AND_ASSIGN(uint64_t block, ReadBE64At(image, table));
  for (int i = 5; i < 25; i += 4) ASSERT_OK(WriteBE64At(image, block + 2 * i, 0));
  EXPECT_FALSE(CheckImage(image, /*allow_leaks=*/true).ok()) << "the damage did not take";

  MountOptions options = WritableView(image, Path("view.raw"));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
    int fd = open(view->path().c_str(), O_WRONLY);
    ASSERT_GE(fd, 0) << strerror(errno);
    std::vector<char> data(1 << 20, 0x22);
    EXPECT_EQ(pwrite(fd, data.data(), data.size(), 8 << 20), static_cast<ssize_t>(data.size()));
    close(fd);
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  }
  EXPECT_OK(CheckImage(image));
  EXPECT_OK(QemuIo(image, "qcow2", {"read -P 0x11 0 3M", "read -P 0x22 8M 1M"}));
  ASSERT_OK_AND_ASSIGN(uint64_t after, ReadBE64At(image, hdr::kIncompatibleFeatures));
  EXPECT_EQ(after & 1, 0u) << "the dirty bit is still set";
}

// Refcounts that lie (an L2 table in use counted as free) would make the
// allocator hand out the table's cluster for guest data. The overlap guard
// refuses the write, marks the image corrupt and keeps refusing.
TEST_F(CliTest, WriteThatWouldOverwriteMetadataMarksImageCorrupt) {
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kSampleSize));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x33 0 64k"}));
  ASSERT_OK_AND_ASSIGN(uint64_t l1_entry_at, L1EntryOffset(image, 0));
  ASSERT_OK_AND_ASSIGN(uint64_t l1_entry, ReadBE64At(image, l1_entry_at));
  const uint64_t l2_cluster = (l1_entry & kOffsetMask) >> 16;  // 64 KiB clusters
  ASSERT_OK_AND_ASSIGN(uint64_t table, ReadBE64At(image, hdr::kRefcountTableOffset));
  ASSERT_OK_AND_ASSIGN(uint64_t block, ReadBE64At(image, table));
  // 16-bit refcounts: zero the L2 table's entry (and its neighbour's).
  ASSERT_OK(WriteBE32At(image, block + 2 * l2_cluster, 0));

  MountOptions options = WritableView(image, Path("view.raw"));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
    int fd = open(view->path().c_str(), O_WRONLY);
    ASSERT_GE(fd, 0) << strerror(errno);
    std::vector<char> data(4096, 0x44);
    EXPECT_EQ(pwrite(fd, data.data(), data.size(), 32 << 20), -1);
    EXPECT_EQ(errno, EIO);
    EXPECT_EQ(pwrite(fd, data.data(), data.size(), 40 << 20), -1) << "writes must stay refused";
    close(fd);
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(absl::StrContains(view->ReadLog(), "it would overwrite an L2 table at")) << view->ReadLog();
  }
  ASSERT_OK_AND_ASSIGN(uint64_t features, ReadBE64At(image, hdr::kIncompatibleFeatures));
  EXPECT_NE(features & 2, 0u) << "the corrupt bit is not set";
  // The L2 table survived: the data it maps still reads back.
  const std::string raw = Path("after.raw");
  ASSERT_OK(ConvertToRaw(image, raw));
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(raw));
  EXPECT_EQ(after.substr(0, 65536), std::string(65536, '\x33'));
  EXPECT_EQ(after.substr(32 << 20, 4096), std::string(4096, '\0'));
}

// Without /dev/fuse (the module not loaded) the mount is refused with one
// line saying so. The test hides /dev/fuse in a mount namespace of its own
// (a tmpfs over /dev), where qcow2fuse runs.
TEST_F(CliTest, MissingDevFuseIsRefusedWithWhatToDo) {
  if (geteuid() != 0) GTEST_SKIP() << "a mount namespace needs root";
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kSampleSize));
  const std::string script = "mount -t tmpfs none /dev && exec \"$0\" -f -o ro \"$1\" \"$2\"";
  ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded({"unshare", "--mount", "--propagation", "private", "sh", "-c",
                                                  script, Binary(), image, Path("view.raw")}));
  if (absl::StartsWith(run.stderr_text, "unshare:") || absl::StartsWith(run.stderr_text, "mount:")) {
    GTEST_SKIP() << "no mount namespace here: " << run.stderr_text;
  }
  EXPECT_TRUE(FailsWithOneLine(run, {"there is no /dev/fuse", "modprobe fuse"}));
  EXPECT_FALSE(IsMounted(Path("view.raw")));
}

// A mountpoint must be a regular file (single-file mode) or a directory
// (directory mode): a FIFO is refused in one line and left alone.
TEST_F(CliTest, SpecialFileMountpointIsRefused) {
  const std::string image = Path("disk.qcow2");
  const std::string fifo = Path("mnt");
  const std::string pidfile = Path("mnt.pid");
  ASSERT_OK(CreateImage(image, "qcow2", kSampleSize));
  ASSERT_EQ(mkfifo(fifo.c_str(), 0644), 0);
  const std::vector<std::vector<std::string>> cases = {
      {Binary(), "-f", "-o", "ro", image, fifo},
      {Binary(), "-o", "ro", "--pidfile", pidfile, image, fifo},
  };
  for (const std::vector<std::string>& argv : cases) {
    DaemonGuard guard(fifo, pidfile);
    RunOptions options;
    options.timeout = std::chrono::seconds(30);
    options.watch_mountpoint = fifo;
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded(argv, options));
    const bool mounted_after = IsMounted(fifo);
    guard.Cleanup();
    EXPECT_FALSE(run.timed_out) << run.Describe();
    EXPECT_TRUE(run.status.exited()) << run.Describe();
    EXPECT_NE(run.status.code(), 0) << run.Describe();
    EXPECT_FALSE(run.mounted_during_run || mounted_after) << run.Describe();
    EXPECT_TRUE(absl::StartsWith(run.stderr_text, "qcow2fuse: ")) << run.Describe();
    EXPECT_EQ(std::count(run.stderr_text.begin(), run.stderr_text.end(), '\n'), 1)
        << run.Describe();
    EXPECT_TRUE(absl::StrContains(run.stderr_text, "neither a regular file") &&
                absl::StrContains(run.stderr_text, "nor a directory"))
        << run.Describe();
    struct stat st;
    EXPECT_TRUE(lstat(fifo.c_str(), &st) == 0 && S_ISFIFO(st.st_mode)) << "the FIFO must be left alone";
    EXPECT_FALSE(Exists(pidfile)) << run.Describe();
  }
}

// ------------------------------------------------------ mountpoint file --

TEST_F(CliTest, MissingMountpointFileIsCreatedAndRemovedAtUnmount) {
  const std::string image = Path("disk.qcow2");
  const std::string reference = Path("disk.ref");
  const std::string mountpoint = Path("view.raw");
  MakeSample(image, reference);
  ASSERT_FALSE(Exists(mountpoint));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                       MountedView::Start(ViewOptions(image, mountpoint)));
  struct stat st;
  ASSERT_EQ(stat(mountpoint.c_str(), &st), 0) << strerror(errno);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kSampleSize);
  EXPECT_TRUE(absl::StartsWith(MountedFsType(mountpoint).value_or(""), "fuse"));
  EXPECT_OK(CompareFiles(mountpoint, reference));
  ASSERT_OK(view->Unmount());
  ASSERT_TRUE(view->exit_status().has_value());
  EXPECT_TRUE(view->exit_status()->success())
      << view->exit_status()->ToString() << "\n" << view->ReadLog();
  EXPECT_FALSE(IsMounted(mountpoint));
  EXPECT_FALSE(Exists(mountpoint))
      << "the mountpoint file qcow2fuse created must be removed at unmount";
}

TEST_F(CliTest, ExistingMountpointFileIsKeptAtUnmount) {
  const std::string image = Path("disk.qcow2");
  const std::string reference = Path("disk.ref");
  const std::string mountpoint = Path("view.raw");
  MakeSample(image, reference);
  ASSERT_OK(WriteFileAt(mountpoint, 0, "keep me"));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                         MountedView::Start(ViewOptions(image, mountpoint)));
    EXPECT_OK(CompareFiles(mountpoint, reference));
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status() && view->exit_status()->success())
        << view->ReadLog();
  }
  EXPECT_FALSE(IsMounted(mountpoint));
  ASSERT_OK_AND_ASSIGN(std::string contents, ReadFile(mountpoint));
  EXPECT_EQ(contents, "keep me") << "a mountpoint file that existed must be left as it was";
}

// ---------------------------------------------------------- daemon mode --

TEST_F(CliTest, DaemonModeReturnsOnceLiveAndExitsAfterFusermountU) {
  const std::string image = Path("disk.qcow2");
  const std::string reference = Path("disk.ref");
  const std::string mountpoint = Path("view.raw");
  const std::string pidfile = Path("qcow2fuse.pid");
  MakeSample(image, reference);

  DaemonGuard guard(mountpoint, pidfile);
  ASSERT_OK_AND_ASSIGN(
      RunResult run,
      RunBounded({Binary(), "-o", "ro", "--pidfile", pidfile, image, mountpoint}));
  ASSERT_TRUE(run.status.success()) << run.Describe();
  // No waiting: the command's return promises a live view.
  EXPECT_OK(CompareFiles(mountpoint, reference));
  EXPECT_TRUE(absl::StartsWith(MountedFsType(mountpoint).value_or(""), "fuse"))
      << "not a fuse mount right after the command returned";

  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  EXPECT_EQ(kill(pid, 0), 0) << "the daemon named in the pidfile is not running";
  ASSERT_OK(RunChecked({"fusermount3", "-u", mountpoint}));
  PidGone gone = WaitForPidGone(pid, std::chrono::seconds(20));
  ASSERT_TRUE(gone.gone) << "daemon pid " << pid << " still running after fusermount3 -u";
  guard.Forget();
  if (gone.status) {  // known when the daemon was re-parented to us
    EXPECT_TRUE(gone.status->success()) << gone.status->ToString();
  }
  EXPECT_FALSE(IsMounted(mountpoint));
  EXPECT_FALSE(Exists(pidfile)) << "the pidfile must be removed at exit";
  EXPECT_FALSE(Exists(mountpoint)) << "the created mountpoint file must be removed";
}

TEST_F(CliTest, RelativeImageAndMountpointWorkInDaemonMode) {
  const std::string image = Path("disk.qcow2");
  const std::string reference = Path("disk.ref");
  const std::string mountpoint = Path("view.raw");
  const std::string pidfile = Path("daemon.pid");
  MakeSample(image, reference);

  DaemonGuard guard(mountpoint, pidfile);
  RunOptions options;
  options.cwd = dir_->path();
  ASSERT_OK_AND_ASSIGN(
      RunResult run,
      RunBounded({Binary(), "-o", "ro", "--pidfile", "daemon.pid", "disk.qcow2",
                  "view.raw"},
                 options));
  ASSERT_TRUE(run.status.success()) << run.Describe();
  EXPECT_TRUE(IsMounted(mountpoint)) << "expected the mount at " << mountpoint;
  EXPECT_OK(CompareFiles(mountpoint, reference));
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());

  ASSERT_OK(RunChecked({"fusermount3", "-u", mountpoint}));
  PidGone gone = WaitForPidGone(pid, std::chrono::seconds(20));
  ASSERT_TRUE(gone.gone) << "daemon pid " << pid << " still running after fusermount3 -u";
  guard.Forget();
  if (gone.status) {
    EXPECT_TRUE(gone.status->success()) << gone.status->ToString();
  }
  EXPECT_FALSE(IsMounted(mountpoint));
  EXPECT_FALSE(Exists(mountpoint));
  EXPECT_FALSE(Exists(pidfile));
}

// ---------------------------------------------- stopping a foreground run --

class ForegroundStopTest : public CliTest {
 protected:
  // Mounts the sample with -f, checks the view, then runs `stop` and checks
  // that qcow2fuse exited 0 on its own and left nothing behind.
  template <typename Stop>
  void MountCheckAndStop(Stop stop) {
    const std::string image = Path("disk.qcow2");
    const std::string reference = Path("disk.ref");
    const std::string mountpoint = Path("view.raw");
    MakeSample(image, reference);
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                         MountedView::Start(ViewOptions(image, mountpoint)));
    EXPECT_OK(CompareFiles(mountpoint, reference));
    stop(*view);
    ASSERT_TRUE(view->exit_status().has_value())
        << "qcow2fuse did not exit\n" << view->ReadLog();
    EXPECT_TRUE(view->exit_status()->exited())
        << view->exit_status()->ToString() << "\n" << view->ReadLog();
    EXPECT_TRUE(view->exit_status()->success())
        << view->exit_status()->ToString() << "\n" << view->ReadLog();
    EXPECT_FALSE(IsMounted(mountpoint)) << view->ReadLog();
    EXPECT_FALSE(Exists(mountpoint)) << view->ReadLog();
  }
};

TEST_F(ForegroundStopTest, ExitsZeroOnSigterm) {
  MountCheckAndStop([](MountedView& view) { EXPECT_OK(view.StopWithSignal(SIGTERM)); });
}

TEST_F(ForegroundStopTest, ExitsZeroOnSigint) {
  MountCheckAndStop([](MountedView& view) { EXPECT_OK(view.StopWithSignal(SIGINT)); });
}

TEST_F(ForegroundStopTest, ExitsZeroOnFusermountU) {
  MountCheckAndStop([](MountedView& view) {
    EXPECT_OK(RunChecked({"fusermount3", "-u", view.path()}));
    EXPECT_OK(view.Unmount());  // nothing left to unmount: waits for the exit
  });
}

TEST_F(ForegroundStopTest, ExitsZeroOnUmount) {
  MountCheckAndStop([](MountedView& view) {
    EXPECT_OK(RunChecked({"umount", view.path()}));
    EXPECT_OK(view.Unmount());
  });
}

// A request stuck below the engine (the backing file on a hung file
// system) must not keep a stopping daemon, or its mount, forever. The
// backing file here is another qcow2fuse view whose daemon is stopped with
// SIGSTOP, so a read through the overlay hangs in the overlay's daemon.
TEST_F(CliTest, StopGivesUpOnAStuckRequestAfterTheDrainTimeout) {
  const std::string base = Path("base.qcow2");
  const std::string base_ref = Path("base.ref");
  const std::string base_view = Path("base.raw");
  const std::string overlay = Path("overlay.qcow2");
  const std::string overlay_view = Path("overlay.raw");
  MakeSample(base, base_ref);
  // The outer daemon finds the backing file's data with SEEK_HOLE, and the
  // inner one would then put it in its view's page cache (prefill.h),
  // where the read below would find it without asking the inner daemon.
  MountOptions inner_options = ViewOptions(base, base_view);
  inner_options.extra_options = {"prefill_runs=off"};
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> inner, MountedView::Start(inner_options));
  ASSERT_OK(RunChecked({"qemu-img", "create", "-q", "-f", "qcow2", "-b", base_view, "-F", "raw", overlay}));
  constexpr int kDrainTimeoutSeconds = 2;
  MountOptions outer_options = ViewOptions(overlay, overlay_view);
  outer_options.extra_options = {absl::StrCat("drain_timeout=", kDrainTimeoutSeconds)};
  outer_options.stop_timeout = std::chrono::seconds(20);
  std::unique_ptr<MountedView> outer;
  {
    ScopedThreadLeaksAllowed leaves_a_thread;  // the stuck one
    ASSERT_OK_AND_ASSIGN(outer, MountedView::Start(outer_options));
  }

  ASSERT_EQ(kill(inner->pid(), SIGSTOP), 0);
  // The backing file's daemon answers nothing now: a direct read of the
  // overlay view reaches the overlay's daemon and hangs there.
  ASSERT_OK_AND_ASSIGN(pid_t reader, Spawn({"dd", "if=" + overlay_view, "of=/dev/null", "bs=4k", "count=1",
                                            "iflag=direct", "status=none"},
                                           STDERR_FILENO, STDERR_FILENO));
  std::this_thread::sleep_for(std::chrono::seconds(1));
  ASSERT_OK_AND_ASSIGN(std::optional<ExitStatus> early, WaitForExitFor(reader, std::chrono::milliseconds(0)));
  if (early.has_value()) {
    kill(inner->pid(), SIGCONT);
    FAIL() << "the read did not hang (dd " << early->ToString() << "): the test proves nothing\n"
           << inner->ReadLog();
  }

  const auto stop_started = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(outer->pid(), SIGTERM), 0);
  // The daemon gives up once the timeout has passed: it says so and takes
  // its mount down. (It cannot finish exiting while the backing file's
  // daemon is stopped: the kernel flushes the backing file at close and
  // waits for that daemon's answer.)
  const auto deadline = stop_started + std::chrono::seconds(kDrainTimeoutSeconds + 10);
  while (!absl::StrContains(outer->ReadLog(), "still running") && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const double stop_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - stop_started).count();
  EXPECT_TRUE(absl::StrContains(outer->ReadLog(), "still running")) << outer->ReadLog();
  EXPECT_GE(stop_seconds, kDrainTimeoutSeconds - 0.5);
  for (int i = 0; i < 100 && IsMounted(overlay_view); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(IsMounted(overlay_view)) << "the mount was left behind";
  kill(inner->pid(), SIGCONT);
  EXPECT_OK(outer->Unmount());  // nothing left to unmount: waits for the exit
  ASSERT_TRUE(outer->exit_status().has_value()) << outer->ReadLog();
  EXPECT_EQ(outer->exit_status()->code(), 1) << outer->exit_status()->ToString();
  EXPECT_FALSE(Exists(overlay_view)) << "the created mountpoint file was left behind";
  // The reader learns that the view is gone instead of hanging.
  ASSERT_OK_AND_ASSIGN(std::optional<ExitStatus> reader_status,
                       WaitForExitFor(reader, std::chrono::seconds(10)));
  if (!reader_status.has_value()) {
    kill(reader, SIGKILL);
    (void)WaitForExit(reader);
    ADD_FAILURE() << "the reader still hangs after the daemon exited";
  }
  EXPECT_OK(inner->Unmount());
}

// -------------------------------------------------------------- options --

// 4 KiB clusters and a 1 GiB disk: 512 L2 tables of 4 KiB each, one cluster
// of data in every one of them. A 64 KiB cache holds 16 tables at most, so
// reading across the disk must evict and reload tables all the time.
TEST_F(CliTest, SmallL2CacheReadsLargeImageCorrectly) {
  const std::string image = Path("big.qcow2");
  const std::string reference = Path("big.ref");
  const std::string mountpoint = Path("big.raw");
  constexpr uint64_t kDisk = 1024 * kMiB;
  constexpr uint64_t kCluster = 4 * kKiB;
  constexpr uint64_t kPerL2 = kCluster * (kCluster / 8);  // 2 MiB
  constexpr int kTables = kDisk / kPerL2;
  ASSERT_OK(CreateImage(image, "qcow2", kDisk, {"cluster_size=4096"}));
  std::vector<std::string> writes;
  std::vector<uint64_t> offsets;
  for (int i = 0; i < kTables; ++i) {
    // A different entry of each table, and a pattern that tells them apart.
    const uint64_t offset = i * kPerL2 + (i * 37 % 512) * kCluster;
    offsets.push_back(offset);
    writes.push_back(absl::StrFormat("write -P %d %u 4k", i % 250 + 1, offset));
  }
  ASSERT_OK(QemuIo(image, "qcow2", writes));
  ASSERT_OK(ConvertToRaw(image, reference));

  MountOptions options = ViewOptions(image, mountpoint);
  options.extra_options = {"l2_cache_size=64K"};
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
  {
    ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(mountpoint));
    ASSERT_OK_AND_ASSIGN(uint64_t size, FileSize(fd.get()));
    EXPECT_EQ(size, kDisk);
    // Backwards first, then in a stride that jumps between far tables.
    std::vector<int> order;
    for (int i = kTables - 1; i >= 0; --i) order.push_back(i);
    for (int i = 0; i < kTables; ++i) order.push_back(i * 97 % kTables);
    std::string buf(kCluster, '\0');
    int mismatches = 0;
    for (int i : order) {
      ssize_t n = pread(fd.get(), buf.data(), buf.size(), offsets[i]);
      ASSERT_EQ(n, static_cast<ssize_t>(kCluster))
          << "read at " << offsets[i] << ": " << strerror(errno) << "\n" << view->ReadLog();
      const char expected = static_cast<char>(i % 250 + 1);
      if (std::count(buf.begin(), buf.end(), expected) != static_cast<long>(kCluster) &&
          ++mismatches <= 5) {
        ADD_FAILURE() << "cluster of table " << i << " at " << offsets[i]
                      << " does not hold pattern " << (i % 250 + 1);
      }
      // Drop the page cache so every pass asks the daemon again.
      posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
    }
    EXPECT_EQ(mismatches, 0);
  }
  EXPECT_OK(CompareFiles(mountpoint, reference));
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status() && view->exit_status()->success()) << view->ReadLog();
}

TEST_F(CliTest, DataFileOptionOverridesMovedExternalDataFile) {
  const std::string image = Path("disk.qcow2");
  const std::string data = Path("data.raw");
  const std::string moved = Path("moved-data.raw");
  const std::string reference = Path("disk.ref");
  const std::string mountpoint = Path("view.raw");
  MakeSample(image, reference, {"data_file=" + data});
  ASSERT_EQ(rename(data.c_str(), moved.c_str()), 0) << strerror(errno);

  ExpectViewWithDataFile(image, mountpoint, moved, reference);
}

// An image that keeps its data in an external data file without naming it
// is refused with one line saying what to do, and mounts with -o data_file=.
TEST_F(CliTest, DataFileOptionNamesAnUnnamedExternalDataFile) {
  const std::string image = Path("disk.qcow2");
  const std::string data = Path("data.raw");
  const std::string reference = Path("disk.ref");
  const std::string mountpoint = Path("view.raw");
  MakeSample(image, reference, {"data_file=" + data});
  ASSERT_OK(HideHeaderExtension(image, hdr::kExtExternalDataFile));
  ASSERT_OK_AND_ASSIGN(std::string info, QemuImg({"info", image}));
  ASSERT_FALSE(absl::StrContains(info, data)) << info;

  RunOptions run_options;
  run_options.watch_mountpoint = mountpoint;
  ASSERT_OK_AND_ASSIGN(RunResult refused, RunBounded({Binary(), "-f", "-o", "ro", image, mountpoint}, run_options));
  EXPECT_TRUE(FailsWithOneLine(refused, {"does not record its name", "-o data_file=PATH"}));
  EXPECT_FALSE(refused.mounted_during_run || IsMounted(mountpoint)) << refused.Describe();

  ExpectViewWithDataFile(image, mountpoint, data, reference);
}

TEST_F(CliTest, RelativeDataFileOptionIsResolvedAgainstWorkingDirectory) {
  const std::string image = Path("disk.qcow2");
  const std::string data = Path("data.raw");
  const std::string reference = Path("disk.ref");
  const std::string mountpoint = Path("view.raw");
  const std::string pidfile = Path("daemon.pid");
  MakeSample(image, reference, {"data_file=" + data});
  ASSERT_EQ(mkdir(Path("elsewhere").c_str(), 0755), 0);
  ASSERT_EQ(rename(data.c_str(), Path("elsewhere/d.raw").c_str()), 0) << strerror(errno);

  DaemonGuard guard(mountpoint, pidfile);
  RunOptions run_options;
  run_options.cwd = Path("elsewhere");
  ASSERT_OK_AND_ASSIGN(
      RunResult run,
      RunBounded({Binary(), "-o", "ro,data_file=d.raw", "--pidfile", pidfile, image,
                  mountpoint},
                 run_options));
  ASSERT_TRUE(run.status.success()) << run.Describe();
  EXPECT_OK(CompareFiles(mountpoint, reference));
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  ASSERT_OK(RunChecked({"fusermount3", "-u", mountpoint}));
  PidGone gone = WaitForPidGone(pid, std::chrono::seconds(20));
  ASSERT_TRUE(gone.gone);
  guard.Forget();
  if (gone.status) {
    EXPECT_TRUE(gone.status->success()) << gone.status->ToString();
  }
}

}  // namespace
}  // namespace qcow2fuse::test::cli
