// Ways a view could hurt itself or its image, and how qcow2fuse avoids
// them:
//
//  * a mountpoint that is the image itself, or a file of its backing chain,
//    would make the daemon read through its own view (a self-deadlock):
//    refused before mounting;
//  * a mountpoint that already is a mount point would hide that mount, and
//    checking it by stat would wait for whatever serves it: refused, from
//    the mount table;
//  * the daemon runs with PR_SET_IO_FLUSHER, so a loop device on the view
//    cannot deadlock in memory reclaim;
//  * an open with O_TRUNC (`echo hi > view`) follows the shrink rule:
//    refused while the disk holds data; a disk that holds none keeps its
//    size, as a block device does.

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/status_testing.h"

namespace qcow2fuse::test::cli {
namespace {

constexpr uint64_t kDiskSize = 64 * kMiB;
// Kernel task flags (include/linux/sched.h), set by PR_SET_IO_FLUSHER.
constexpr unsigned long kPfMemallocNoio = 0x00080000;
constexpr unsigned long kPfLocalThrottle = 0x00100000;
constexpr int kCapSysResource = 24;

// How many mounts are stacked at `path`.
int MountCount(const std::string& path) {
  absl::StatusOr<std::vector<MountEntry>> table = ReadMountInfo();
  if (!table.ok()) return -1;
  return std::count_if(table->begin(), table->end(), [&](const MountEntry& e) { return e.mount_point == path; });
}

// Takes down a mount that a run stacked on an existing one, and its daemon.
class StackGuard {
 public:
  StackGuard(std::string mountpoint, std::string pidfile, int mounts_before)
      : mountpoint_(std::move(mountpoint)), pidfile_(std::move(pidfile)), mounts_before_(mounts_before) {}
  ~StackGuard() {
    if (MountCount(mountpoint_) > mounts_before_) (void)RunCommand({"fusermount3", "-u", mountpoint_});
    absl::StatusOr<pid_t> pid = ReadPidFile(pidfile_);
    if (pid.ok() && !WaitForPidGone(*pid, std::chrono::seconds(10)).gone) {
      kill(*pid, SIGKILL);
      WaitForPidGone(*pid, std::chrono::seconds(5));
    }
  }

 private:
  const std::string mountpoint_;
  const std::string pidfile_;
  const int mounts_before_;
};

class SafetyTest : public TempDirTest {
 protected:
  // A 64 MiB image with data at 0 and 8 MiB.
  std::string MakeImage(const std::string& name, const std::vector<std::string>& options = {}) {
    const std::string image = Path(name);
    EXPECT_OK(CreateImage(image, "qcow2", kDiskSize, options));
    EXPECT_OK(QemuIo(image, "qcow2", {"write -P 0x5a 0 64k", "write -P 0xa5 8M 64k"}));
    return image;
  }

  // Runs qcow2fuse on IMAGE and MOUNTPOINT (which exists), in daemon mode
  // and with -f, read-write, and checks a clean refusal naming `words`,
  // with nothing mounted at any time and every file of `untouched` as it
  // was.
  void ExpectRefused(const std::string& image, const std::string& mountpoint, const std::vector<std::string>& words,
                     const std::vector<std::string>& untouched) {
    std::vector<std::string> digests;
    for (const std::string& file : untouched) {
      absl::StatusOr<std::string> digest = Sha256File(file);
      ASSERT_OK(digest);
      digests.push_back(*digest);
    }
    const std::string pidfile = Path("refused.pid");
    const std::vector<std::vector<std::string>> runs = {
        {Binary(), "--pidfile", pidfile, image, mountpoint},
        {Binary(), "-f", image, mountpoint},
    };
    for (const std::vector<std::string>& argv : runs) {
      SCOPED_TRACE(CommandLine(argv));
      // Should it mount after all: a mount on a free path is taken down by
      // a DaemonGuard, one stacked on an existing mount by StackGuard
      // (a DaemonGuard would unmount the mount below too).
      const int mounts_before = MountCount(mountpoint);
      std::optional<DaemonGuard> guard;
      std::optional<StackGuard> stack_guard;
      RunOptions options;
      options.timeout = std::chrono::seconds(30);
      if (mounts_before == 0) {
        guard.emplace(mountpoint, pidfile);
        options.watch_mountpoint = mountpoint;
      } else {
        stack_guard.emplace(mountpoint, pidfile, mounts_before);
      }
      ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded(argv, options));
      EXPECT_TRUE(FailsWithOneLine(run, words));
      EXPECT_FALSE(run.mounted_during_run) << run.Describe();
      EXPECT_EQ(MountCount(mountpoint), mounts_before) << run.Describe();
      EXPECT_EQ(access(pidfile.c_str(), F_OK), -1) << "a pidfile was left behind";
      // Take down what a wrong mount left before looking at the path: a
      // view mounted onto its own image deadlocks at the first stat.
      guard.reset();
      stack_guard.reset();
      EXPECT_EQ(access(mountpoint.c_str(), F_OK), 0) << "the existing mountpoint file was removed";
    }
    for (size_t i = 0; i < untouched.size(); ++i) {
      absl::StatusOr<std::string> digest = Sha256File(untouched[i]);
      ASSERT_OK(digest);
      EXPECT_EQ(*digest, digests[i]) << untouched[i] << " changed";
    }
  }
};

TEST_F(SafetyTest, MountingAnImageOntoItselfIsRefused) {
  const std::string image = MakeImage("disk.qcow2");
  ExpectRefused(image, image, {"image file itself"}, {image});
  EXPECT_FALSE(IsMounted(image));
  EXPECT_OK(CheckImage(image));
  // A hard link is the same file under another name.
  const std::string link_path = Path("link.qcow2");
  ASSERT_EQ(link(image.c_str(), link_path.c_str()), 0) << strerror(errno);
  ExpectRefused(image, link_path, {"image file itself"}, {image});
  EXPECT_FALSE(IsMounted(link_path));
}

TEST_F(SafetyTest, MountingAnImageOntoItsBackingFileIsRefused) {
  const std::string base = MakeImage("base.qcow2");
  const std::string top = Path("top.qcow2");
  ASSERT_OK(CreateImage(top, "qcow2", kDiskSize, {"backing_file=base.qcow2", "backing_fmt=qcow2"}));
  ASSERT_OK(QemuIo(top, "qcow2", {"write -P 0x77 4M 64k"}));
  ExpectRefused(top, base, {"chain", base}, {base, top});
  EXPECT_FALSE(IsMounted(base));
  EXPECT_OK(CheckImage(base));
  EXPECT_OK(CheckImage(top));
}

TEST_F(SafetyTest, MountingAnImageOntoItsDataFileIsRefused) {
  const std::string image = Path("ext.qcow2");
  const std::string data = Path("ext.data");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize, {"data_file=" + data}));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x77 4M 64k"}));
  ExpectRefused(image, data, {"chain", data}, {image, data});
  EXPECT_FALSE(IsMounted(data));
  EXPECT_OK(CheckImage(image));
}

TEST_F(SafetyTest, MountingOntoAMountPointIsRefused) {
  const std::string first = MakeImage("first.qcow2");
  const std::string second = MakeImage("second.qcow2");
  const std::string reference = Path("first.ref");
  ASSERT_OK(ConvertToRaw(first, reference));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(ReadOnlyView(first, Path("view.raw"))));
  ExpectRefused(second, view->path(), {"already a mount point", "qcow2fuse view of " + first}, {second});
  // Still exactly one mount there, still serving the first image.
  ASSERT_OK_AND_ASSIGN(std::vector<MountEntry> table, ReadMountInfo());
  EXPECT_EQ(std::count_if(table.begin(), table.end(),
                          [&](const MountEntry& e) { return e.mount_point == view->path(); }),
            1);
  EXPECT_OK(CompareFiles(view->path(), reference));
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status() && view->exit_status()->success()) << view->ReadLog();
  EXPECT_OK(CheckImage(second));
}

// Every thread of the daemon carries the flags PR_SET_IO_FLUSHER sets. The
// call needs CAP_SYS_RESOURCE; without it the daemon serves all the same
// and says once why a loop device on the view may deadlock.
TEST_F(SafetyTest, DaemonRunsAsAnIoFlusher) {
  const std::string image = MakeImage("disk.qcow2");
  const bool capable = HasEffectiveCapability(kCapSysResource);
  if (!capable) {
    std::cout << "this test runs without CAP_SYS_RESOURCE: checking the daemon's warning, not the flags\n";
  }
  // In the foreground, where the log is ours to read.
  {
    MountOptions options = WritableView(image, Path("view.raw"));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
    ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(view->path()));
    char byte;
    ASSERT_EQ(pread(fd.get(), &byte, 1, 0), 1);  // the workers have started
    ASSERT_OK_AND_ASSIGN(auto threads, ThreadFlags(view->pid()));
    ASSERT_FALSE(threads.empty());
    const std::string log = view->ReadLog();
    if (capable) {
      for (const auto& [tid, flags] : threads) {
        EXPECT_EQ(flags & kPfMemallocNoio, kPfMemallocNoio) << "thread " << tid << " flags 0x" << std::hex << flags;
        EXPECT_EQ(flags & kPfLocalThrottle, kPfLocalThrottle) << "thread " << tid << " flags 0x" << std::hex << flags;
      }
      EXPECT_FALSE(absl::StrContains(log, "PR_SET_IO_FLUSHER")) << log;
    } else {
      size_t warnings = 0;
      for (size_t at = log.find("PR_SET_IO_FLUSHER"); at != std::string::npos;
           at = log.find("PR_SET_IO_FLUSHER", at + 1)) {
        ++warnings;
      }
      EXPECT_EQ(warnings, 1u) << log;
      EXPECT_TRUE(absl::StrContains(log, "CAP_SYS_RESOURCE")) << log;
    }
    fd = ScopedFd();
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status() && view->exit_status()->success()) << view->ReadLog();
  }
  // And as a daemon, where the flags are what can be checked.
  if (capable) {
    const std::string view = Path("daemon.raw");
    const std::string pidfile = Path("daemon.pid");
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult started, StartDaemon(image, view, pidfile, {"ro"}));
    ASSERT_TRUE(started.status.success()) << started.Describe();
    ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
    ASSERT_OK_AND_ASSIGN(auto threads, ThreadFlags(pid));
    for (const auto& [tid, flags] : threads) {
      EXPECT_EQ(flags & (kPfMemallocNoio | kPfLocalThrottle), kPfMemallocNoio | kPfLocalThrottle)
          << "thread " << tid << " flags 0x" << std::hex << flags;
    }
  }
}

// `echo hi > view` opens with O_TRUNC, a truncation of the disk to 0: it
// fails while the disk holds data, and the disk is left as it was.
TEST_F(SafetyTest, OpenWithTruncIsRefusedWhileTheDiskHoldsData) {
  const std::string image = MakeImage("disk.qcow2");
  const std::string reference = Path("disk.ref");
  ASSERT_OK(ConvertToRaw(image, reference));
  MountOptions options = WritableView(image, Path("view.raw"));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));

  ASSERT_OK_AND_ASSIGN(RunResult shell, RunBounded({"sh", "-c", "echo hi > \"$0\"", view->path()}));
  EXPECT_FALSE(shell.status.success()) << "echo hi > view succeeded\n" << shell.Describe();
  EXPECT_TRUE(absl::StrContains(shell.stderr_text, "Invalid argument")) << shell.Describe();

  errno = 0;
  const int fd = open(view->path().c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
  const int open_errno = errno;
  if (fd >= 0) close(fd);
  EXPECT_EQ(fd, -1) << "open with O_TRUNC succeeded";
  EXPECT_EQ(open_errno, EINVAL) << strerror(open_errno);

  struct stat st;
  ASSERT_EQ(stat(view->path().c_str(), &st), 0) << strerror(errno);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskSize);
  EXPECT_OK(CompareFiles(view->path(), reference));
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status() && view->exit_status()->success()) << view->ReadLog();
  EXPECT_TRUE(absl::StrContains(view->ReadLog(), "O_TRUNC")) << view->ReadLog();
  EXPECT_OK(CheckImage(image));
  EXPECT_OK(QemuImg({"compare", "-f", "qcow2", "-F", "raw", image, reference}));
}

// A read-only view refuses O_TRUNC as any write: EROFS.
TEST_F(SafetyTest, OpenWithTruncOfAReadOnlyViewIsEROFS) {
  const std::string image = MakeImage("disk.qcow2");
  MountOptions options;
  options.binary = Binary();
  options.image = image;
  options.mountpoint = Path("view.raw");
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
  errno = 0;
  const int fd = open(view->path().c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
  const int open_errno = errno;
  if (fd >= 0) close(fd);
  EXPECT_EQ(fd, -1);
  EXPECT_EQ(open_errno, EROFS) << strerror(open_errno);
  ASSERT_OK(view->Unmount());
}

// A disk that holds nothing loses nothing to O_TRUNC, and keeps its size,
// as a block device does: `dd of=VIEW` (which opens with O_TRUNC) onto a
// fresh image writes the data and leaves the disk as large as it was.
TEST_F(SafetyTest, OpenWithTruncKeepsADiskWithoutData) {
  const std::string image = Path("empty.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  const std::string data = Path("data.bin");
  ASSERT_OK(RunChecked({"sh", "-c", "head -c 65536 /dev/urandom > " + data}).status());
  MountOptions options = WritableView(image, Path("view.raw"));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
  {
    const int fd = open(view->path().c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
    ASSERT_GE(fd, 0) << strerror(errno);
    struct stat st;
    EXPECT_EQ(fstat(fd, &st), 0);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskSize);
    close(fd);
  }
  ASSERT_OK(RunChecked({"dd", "if=" + data, "of=" + view->path(), "bs=64k", "status=none"}).status());
  struct stat st;
  ASSERT_EQ(stat(view->path().c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskSize);
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status() && view->exit_status()->success()) << view->ReadLog();
  EXPECT_OK(CheckImage(image));
  ASSERT_OK_AND_ASSIGN(uint64_t size, VirtualSize(image));
  EXPECT_EQ(size, kDiskSize);
  const std::string copy = Path("copy.raw");
  ASSERT_OK(QemuImg({"convert", "-O", "raw", image, copy}).status());
  ASSERT_OK(RunChecked({"cmp", "-n", "65536", data, copy}).status());
}

}  // namespace
}  // namespace qcow2fuse::test::cli
