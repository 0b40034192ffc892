// When what is written through the view is on stable storage:
//
//  * at every close of a writable descriptor (the FLUSH handler), so a
//    `dd` that has exited has its data in the image even if the daemon is
//    killed right after;
//  * at most flush_interval seconds (default 5) after a write was
//    acknowledged, while the view stays open (a loop device, a VM);
//  * and, as before, at fsync and unmount.
//
// Durability is checked the hard way: the daemon is killed with SIGKILL,
// which runs none of its code, and the image is then read with QEMU's own
// tools. While the daemon still holds its image locks, `qemu-io -U` (force
// share, read-only) reads what is on disk. The descriptor a test writes
// through is held by a child process (DescriptorHolder): the programs the
// test starts would otherwise inherit it, and closing their copies would
// flush.

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <random>
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
#include "support/seed.h"
#include "support/status_testing.h"

namespace qcow2fuse::test::cli {
namespace {

constexpr uint64_t kDiskSize = 64 * kMiB;

// `qemu-io -c "read -P PATTERN OFFSET LENGTH"` on the image: OK if it holds
// the pattern there. `force_share` (-U -r) reads an image a daemon holds.
absl::Status ImageHolds(const std::string& image, int pattern, uint64_t offset, uint64_t length,
                        bool force_share) {
  std::vector<std::string> argv = {"qemu-io"};
  if (force_share) argv.insert(argv.end(), {"-U", "-r"});
  argv.insert(argv.end(), {"-f", "qcow2", "-c", absl::StrFormat("read -P %d %u %u", pattern, offset, length),
                           image});
  return RunChecked(argv).status();
}

class ViewDurabilityTest : public TempDirTest {};

// close() returns only once the data and the metadata that finds it are on
// disk: QEMU reads them from the image while the view is still mounted.
// The periodic flush is off and no fsync is made, and before the close the
// write is not in the image yet (the new cluster's metadata is in the
// daemon's caches): only the close can have made it durable.
TEST_F(ViewDurabilityTest, CloseOfAWritableDescriptorMakesItsWritesDurable) {
  constexpr uint64_t kOffset = 5 * kMiB + 12345;
  constexpr uint64_t kLength = 100000;
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  MountOptions options = WritableView(image, Path("view.raw"));
  options.extra_options = {"flush_interval=0"};
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<DescriptorHolder> holder, DescriptorHolder::Open(view->path()));
  ASSERT_OK(holder->Write(0xa5, kOffset, kLength));
  EXPECT_FALSE(ImageHolds(image, 0xa5, kOffset, kLength, /*force_share=*/true).ok())
      << "the write was on disk before the close: this test cannot show that the close made it durable";
  ASSERT_OK(holder->Close());

  EXPECT_OK(ImageHolds(image, 0xa5, kOffset, kLength, /*force_share=*/true));
  EXPECT_OK(CheckImage(image, /*allow_leaks=*/false, {"-U"}));
  holder.reset();
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status() && view->exit_status()->success()) << view->ReadLog();
}

// A read-only open of a read-write view closes without a FLUSH round trip
// (noflush), and many closes in a row stay cheap; the view still works.
// libfuse's request trace (-o debug) shows no FLUSH for them, and one for
// the close of a descriptor opened for writing (the control).
TEST_F(ViewDurabilityTest, ReadOnlyOpensOfAWritableViewCloseCleanly) {
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x3c 1M 64k"}));
  MountOptions options = WritableView(image, Path("view.raw"));
  options.extra_options = {"debug"};
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
  for (int i = 0; i < 100; ++i) {
    ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(view->path()));
    char byte = 0;
    ASSERT_EQ(pread(fd.get(), &byte, 1, kMiB), 1) << strerror(errno);
    ASSERT_EQ(byte, 0x3c);
  }
  auto flushes = [&] { return TracedRequests(view->ReadLog(), "FLUSH"); };
  EXPECT_EQ(flushes(), 0u) << "a read-only close sent a FLUSH";
  const int fd = open(view->path().c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0) << strerror(errno);
  ASSERT_EQ(close(fd), 0) << strerror(errno);
  EXPECT_EQ(flushes(), 1u) << "the close of a writable descriptor sent no FLUSH (so the trace shows none)";
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status() && view->exit_status()->success()) << view->ReadLog();
}

// Through a real daemon (no -f): dd writes 16 MiB and exits, the daemon is
// killed at once with SIGKILL. Every byte is in the image, and the image
// is clean: dd's close made it all durable.
TEST_F(ViewDurabilityTest, DdThenSigkillOfTheDaemonLosesNothing) {
  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  const std::string source = Path("source.raw");
  const std::string twin = Path("twin.raw");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  std::mt19937_64 rng(TestSeed());
  std::string bytes(16 * kMiB, '\0');
  for (char& c : bytes) c = static_cast<char>(rng());
  ASSERT_OK(WriteFileAt(source, 0, bytes));
  // The disk as it must read afterwards: the data at 8 MiB, zeros around.
  ASSERT_OK(WriteFileAt(twin, 8 * kMiB, bytes));
  ASSERT_EQ(truncate(twin.c_str(), kDiskSize), 0) << strerror(errno);

  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult started, StartDaemon(image, view, pidfile));
  ASSERT_TRUE(started.status.success()) << started.Describe();
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  // conv=notrunc: dd would otherwise open with O_TRUNC, which asks to
  // truncate the disk to 0 (refused, or done on an empty disk).
  ASSERT_OK(RunChecked({"dd", "if=" + source, "of=" + view, "bs=1M", "seek=8", "conv=notrunc", "status=none"}));
  ASSERT_EQ(kill(pid, SIGKILL), 0) << strerror(errno);
  PidGone gone = WaitForPidGone(pid, std::chrono::seconds(10));
  ASSERT_TRUE(gone.gone) << "the killed daemon is still there";
  guard.Forget();

  // The dead mount is still there; -u takes it down, and says that no
  // daemon was left to flush anything.
  ASSERT_OK_AND_ASSIGN(RunResult unmounted, RunUnmount(view));
  EXPECT_TRUE(FailsWithOneLine(unmounted, {"not running"}));
  EXPECT_FALSE(IsMounted(view)) << "qcow2fuse -u left the dead mount behind";

  EXPECT_OK(CheckImage(image));
  EXPECT_OK(QemuImg({"compare", "-f", "qcow2", "-F", "raw", image, twin}));
}

// A write through a descriptor that stays open is durable once the flush
// interval has passed: 9 s after the write (the default interval is 5 s)
// SIGKILL loses nothing. The same write on a view with flush_interval=0,
// killed after the same time, is not in the image: the interval is what
// made it durable. Both views run side by side.
TEST_F(ViewDurabilityTest, FlushIntervalBoundsHowLongAnOpenViewKeepsWritesUnflushed) {
  constexpr int kPattern = 0x6b;
  constexpr uint64_t kOffset = 8 * kMiB + 4096;
  constexpr uint64_t kLength = kMiB;
  constexpr auto kWait = std::chrono::seconds(9);

  struct Case {
    std::string name;
    std::vector<std::string> options;
    std::string image, view, pidfile;
    std::unique_ptr<DaemonGuard> guard;
    pid_t pid = 0;
    // The open descriptor, in a child process (see DescriptorHolder).
    std::unique_ptr<DescriptorHolder> holder;
  };
  // Destroyed in reverse order: each holder closes before its guard
  // unmounts.
  std::vector<Case> cases(2);
  cases[0].name = "default";
  cases[1].name = "zero";
  cases[1].options = {"flush_interval=0"};
  for (Case& c : cases) {
    c.image = Path(c.name + ".qcow2");
    c.view = Path(c.name + ".raw");
    c.pidfile = Path(c.name + ".pid");
    ASSERT_OK(CreateImage(c.image, "qcow2", kDiskSize));
    c.guard = std::make_unique<DaemonGuard>(c.view, c.pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult started, StartDaemon(c.image, c.view, c.pidfile, c.options));
    ASSERT_TRUE(started.status.success()) << started.Describe();
    ASSERT_OK_AND_ASSIGN(c.pid, c.guard->ReadPid());
  }
  for (Case& c : cases) {
    ASSERT_OK_AND_ASSIGN(c.holder, DescriptorHolder::Open(c.view));
    ASSERT_OK(c.holder->Write(kPattern, kOffset, kLength));
  }
  std::this_thread::sleep_for(kWait);
  // Both daemons die before either descriptor is closed (a close would
  // flush).
  for (Case& c : cases) ASSERT_EQ(kill(c.pid, SIGKILL), 0) << strerror(errno);
  for (Case& c : cases) {
    ASSERT_TRUE(WaitForPidGone(c.pid, std::chrono::seconds(10)).gone);
    c.guard->Forget();
  }
  for (Case& c : cases) {
    c.holder.reset();
    c.guard->Cleanup();  // takes the dead mount down
    EXPECT_FALSE(IsMounted(c.view));
    EXPECT_OK(CheckImage(c.image, /*allow_leaks=*/true));
  }
  EXPECT_OK(ImageHolds(cases[0].image, kPattern, kOffset, kLength, /*force_share=*/false))
      << "a write acknowledged " << kWait.count() << " s before SIGKILL was lost with the default flush_interval";
  EXPECT_OK(ImageHolds(cases[1].image, 0, kOffset, kLength, /*force_share=*/false))
      << "with flush_interval=0 the write reached the image anyway: this test cannot show that the "
         "interval is what makes it durable";
}

TEST_F(ViewDurabilityTest, FlushIntervalOutOfRangeIsAUsageError) {
  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  for (const char* value : {"-1", "86401", "five", "", "1.5"}) {
    RunOptions options;
    options.watch_mountpoint = view;
    ASSERT_OK_AND_ASSIGN(RunResult run,
                         RunBounded({Binary(), "-f", "-o", absl::StrCat("flush_interval=", value), image, view},
                                    options));
    EXPECT_TRUE(run.status.exited() && run.status.code() == 2) << run.Describe();
    EXPECT_TRUE(absl::StrContains(run.stderr_text, "flush_interval") || absl::StrContains(run.stderr_text, "unknown"))
        << run.Describe();
    EXPECT_FALSE(run.mounted_during_run || IsMounted(view)) << run.Describe();
  }
}

}  // namespace
}  // namespace qcow2fuse::test::cli
