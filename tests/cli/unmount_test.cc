// Ending a view:
//
//   qcow2fuse -u MOUNTPOINT
//
// returns once the daemon has flushed, released QEMU's image locks and
// exited, so the next command (qemu-img check, a new mount) finds the image
// free; a path that is not a view, or a busy view, is refused with one
// line. A plain `fusermount3 -u` does not wait for the daemon, but the
// daemon must still be gone a moment later.

#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
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

class UnmountTest : public TempDirTest {};

// Twenty times: mount read-write in daemon mode, write, `qcow2fuse -u`, and
// at once `qemu-img check` (which needs the image's lock) and the next
// mount. Any lock still held by a daemon on its way out fails the check.
TEST_F(UnmountTest, ReturnsOnlyOnceTheDaemonHasReleasedTheImage) {
  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  constexpr int kRounds = 20;
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult started, StartDaemon(image, view, pidfile));
    ASSERT_TRUE(started.status.success()) << started.Describe();
    ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
    {
      int fd = open(view.c_str(), O_WRONLY | O_CLOEXEC);
      ASSERT_GE(fd, 0) << strerror(errno);
      std::vector<char> data(64 * kKiB, static_cast<char>(round + 1));
      EXPECT_EQ(pwrite(fd, data.data(), data.size(), round * kMiB), static_cast<ssize_t>(data.size()));
      close(fd);
    }
    ASSERT_OK_AND_ASSIGN(RunResult unmounted, RunUnmount(view));
    ASSERT_TRUE(unmounted.status.success()) << unmounted.Describe();
    EXPECT_EQ(unmounted.stderr_text, "") << unmounted.Describe();
    // No waiting from here on: -u promised that the daemon is gone.
    ASSERT_OK(CheckImage(image));
    EXPECT_FALSE(IsMounted(view));
    EXPECT_FALSE(access(pidfile.c_str(), F_OK) == 0) << "the daemon had not finished";
    EXPECT_FALSE(access(view.c_str(), F_OK) == 0) << "the created mountpoint file is still there";
    // The daemon is our child (we are its subreaper): already a zombie.
    PidGone gone = WaitForPidGone(pid, std::chrono::milliseconds(0));
    ASSERT_TRUE(gone.gone) << "daemon pid " << pid << " still running after qcow2fuse -u returned";
    guard.Forget();
    if (gone.status) {
      EXPECT_TRUE(gone.status->success()) << gone.status->ToString();
    }
  }
  std::vector<std::string> reads;
  for (int round = 0; round < kRounds; ++round) {
    reads.push_back(absl::StrFormat("read -P %d %u 64k", round + 1, round * kMiB));
  }
  EXPECT_OK(QemuIo(image, "qcow2", reads));
}

// -u of a view served in the foreground: the daemon exits 0 by itself.
TEST_F(UnmountTest, EndsAForegroundDaemon) {
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  MountOptions options = WritableView(image, Path("view.raw"));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
  ASSERT_OK_AND_ASSIGN(RunResult unmounted, RunUnmount(view->path()));
  EXPECT_TRUE(unmounted.status.success()) << unmounted.Describe();
  EXPECT_FALSE(IsMounted(view->path()));
  ASSERT_OK(view->Unmount());  // nothing left to unmount: reaps the daemon
  ASSERT_TRUE(view->exit_status().has_value());
  EXPECT_TRUE(view->exit_status()->success()) << view->exit_status()->ToString() << "\n" << view->ReadLog();
}

TEST_F(UnmountTest, RefusesAPathThatIsNotMounted) {
  const std::string file = Path("plain.raw");
  ASSERT_OK(WriteFileAt(file, 0, "not a view"));
  for (const std::string& path : {file, Path("missing.raw"), dir_->path()}) {
    ASSERT_OK_AND_ASSIGN(RunResult run, RunUnmount(path));
    EXPECT_TRUE(FailsWithOneLine(run, {"not a qcow2fuse view", "not a mount point"}));
  }
  ASSERT_OK_AND_ASSIGN(std::string contents, ReadFile(file));
  EXPECT_EQ(contents, "not a view");
}

// A mount of another kind is named, and left mounted.
TEST_F(UnmountTest, RefusesAMountThatIsNotAView) {
  const std::string dir = Path("tmpfs");
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0) << strerror(errno);
  ASSERT_EQ(mount("qcow2fuse-test", dir.c_str(), "tmpfs", 0, "size=1m"), 0) << strerror(errno);
  struct Unmounter {
    std::string dir;
    ~Unmounter() {
      if (IsMounted(dir)) umount2(dir.c_str(), MNT_DETACH);
    }
  } unmounter{dir};
  ASSERT_OK_AND_ASSIGN(RunResult run, RunUnmount(dir));
  EXPECT_TRUE(FailsWithOneLine(run, {"not a qcow2fuse view", "tmpfs"}));
  EXPECT_TRUE(IsMounted(dir)) << "qcow2fuse -u unmounted a tmpfs";
}

// An open descriptor keeps the view busy: -u says so in one line and
// leaves the view and its daemon alone; once closed, -u works.
TEST_F(UnmountTest, SaysABusyViewIsBusyAndKeepsIt) {
  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult started, StartDaemon(image, view, pidfile, {"ro"}));
  ASSERT_TRUE(started.status.success()) << started.Describe();
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  {
    ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(view));
    ASSERT_OK_AND_ASSIGN(RunResult busy, RunUnmount(view));
    EXPECT_TRUE(FailsWithOneLine(busy, {"busy"}));
    EXPECT_TRUE(IsMounted(view));
    EXPECT_EQ(kill(pid, 0), 0) << "the daemon of a busy view went away";
    char byte;
    EXPECT_EQ(pread(fd.get(), &byte, 1, 0), 1) << "the view stopped answering: " << strerror(errno);
  }
  ASSERT_OK_AND_ASSIGN(RunResult unmounted, RunUnmount(view));
  EXPECT_TRUE(unmounted.status.success()) << unmounted.Describe();
  PidGone gone = WaitForPidGone(pid, std::chrono::milliseconds(0));
  EXPECT_TRUE(gone.gone);
  if (gone.gone) guard.Forget();
}

// The device number of the mount at `path`, "MAJOR:MINOR", from
// /proc/self/mountinfo (field 3).
std::string MountDevice(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line, device;
  while (std::getline(in, line)) {
    std::vector<std::string> fields = absl::StrSplit(line, ' ');
    if (fields.size() > 4 && fields[4] == path) device = fields[2];
  }
  return device;
}

// Every -u that gave up (a busy view, Ctrl-C) leaves a closed connection
// behind. The daemon drops them as they come, so they never fill its
// listen backlog and block the next -u in connect().
TEST_F(UnmountTest, ClientsThatWentAwayDoNotBlockTheNext) {
  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult started, StartDaemon(image, view, pidfile, {"ro"}));
  ASSERT_TRUE(started.status.success()) << started.Describe();
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  const std::string device = MountDevice(view);
  ASSERT_FALSE(device.empty());
  // The daemon's socket, as -u finds it (unmount.h).
  const std::string name = "qcow2fuse/" + device;
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  memcpy(addr.sun_path + 1, name.data(), name.size());
  const socklen_t length = offsetof(sockaddr_un, sun_path) + 1 + name.size();
  for (int i = 0; i < 200; ++i) {
    // Non-blocking: a full backlog answers EAGAIN instead of hanging the
    // test. The daemon gets a generous while to make room (a busy machine
    // may not run its thread at once); one that never drains fails here.
    int connected = -1, connect_errno = 0;
    for (int attempt = 0; attempt < 100 && connected != 0; ++attempt) {
      if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
      ASSERT_GE(fd, 0) << strerror(errno);
      connected = connect(fd, reinterpret_cast<sockaddr*>(&addr), length);
      connect_errno = errno;
      close(fd);
      if (connected != 0 && connect_errno != EAGAIN) break;
    }
    ASSERT_EQ(connected, 0) << "connection " << i << " to @" << name << ": " << strerror(connect_errno);
  }
  ASSERT_OK_AND_ASSIGN(RunResult unmounted, RunUnmount(view));
  EXPECT_TRUE(unmounted.status.success()) << unmounted.Describe();
  PidGone gone = WaitForPidGone(pid, std::chrono::milliseconds(0));
  EXPECT_TRUE(gone.gone);
  if (gone.gone) guard.Forget();
}

// -u takes nothing but a MOUNTPOINT.
TEST_F(UnmountTest, OtherArgumentsWithUAreAUsageError) {
  for (const std::vector<std::string>& argv : std::vector<std::vector<std::string>>{
           {Binary(), "-u"},
           {Binary(), "-u", "a.raw", "b.raw"},
           {Binary(), "-u", "-o", "ro", "a.raw"},
           {Binary(), "-u", "-f", "a.raw"},
       }) {
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded(argv));
    EXPECT_TRUE(run.status.exited() && run.status.code() == 2) << run.Describe();
    EXPECT_TRUE(FailsWithOneLine(run, {"-u takes a MOUNTPOINT"}));
  }
}

// `fusermount3 -u` does not wait for the daemon, but the daemon follows at
// once: its periodic flusher (here with a 24 h interval) and its -u socket
// must not hold it. The claim is "a fraction of a second"; the bound here
// is generous.
TEST_F(UnmountTest, DaemonExitsPromptlyAfterFusermountU) {
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  for (const std::string interval : {"flush_interval=5", "flush_interval=86400"}) {
    SCOPED_TRACE(interval);
    const std::string view = Path("view.raw");
    const std::string pidfile = Path("view.pid");
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult started, StartDaemon(image, view, pidfile, {interval}));
    ASSERT_TRUE(started.status.success()) << started.Describe();
    ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
    {
      int fd = open(view.c_str(), O_WRONLY | O_CLOEXEC);
      ASSERT_GE(fd, 0) << strerror(errno);
      std::vector<char> data(kMiB, 0x42);
      EXPECT_EQ(pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
      close(fd);
    }
    const auto start = std::chrono::steady_clock::now();
    ASSERT_OK(RunChecked({"fusermount3", "-u", view}));
    PidGone gone = WaitForPidGone(pid, std::chrono::seconds(2));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << interval << ": the daemon was gone " << seconds << " s after fusermount3 -u started\n";
    ASSERT_TRUE(gone.gone) << "daemon pid " << pid << " still running 2 s after fusermount3 -u";
    guard.Forget();
    if (gone.status) {
      EXPECT_TRUE(gone.status->success()) << gone.status->ToString();
    }
    EXPECT_OK(CheckImage(image));
  }
}

// The kernel gives a new mount the device number of one just unmounted,
// while that mount's daemon may still be on its way out (here: stopped with
// SIGSTOP, resumed a second later). The new daemon must get the socket
// name, which is named after the device number, once the old one has seen
// its unmount; and `qcow2fuse -u` of the new view must wait for the new
// daemon, not answer for the old one or call the new one dead.
TEST_F(UnmountTest, ANewMountGetsTheDeviceNumberOfALingeringDaemon) {
  const std::string image_a = Path("a.qcow2");
  const std::string image_b = Path("b.qcow2");
  ASSERT_OK(CreateImage(image_a, "qcow2", kDiskSize));
  ASSERT_OK(CreateImage(image_b, "qcow2", kDiskSize));
  const std::string view_a = Path("a.raw");
  const std::string pidfile_a = Path("a.pid");
  const std::string view_b = Path("b.raw");
  const std::string pidfile_b = Path("b.pid");
  DaemonGuard guard_a(view_a, pidfile_a);
  ASSERT_OK_AND_ASSIGN(RunResult started_a, StartDaemon(image_a, view_a, pidfile_a, {"ro"}));
  ASSERT_TRUE(started_a.status.success()) << started_a.Describe();
  ASSERT_OK_AND_ASSIGN(pid_t pid_a, guard_a.ReadPid());
  const std::string device_a = MountDevice(view_a);

  ASSERT_EQ(kill(pid_a, SIGSTOP), 0);
  // Resumed in every path out of the test, before guard_a cleans up.
  std::thread resume([pid_a] {
    std::this_thread::sleep_for(std::chrono::seconds(1));
    kill(pid_a, SIGCONT);
  });
  struct Join {
    std::thread& t;
    ~Join() { t.join(); }
  } join{resume};
  ASSERT_EQ(umount2(view_a.c_str(), MNT_DETACH), 0) << strerror(errno);

  DaemonGuard guard_b(view_b, pidfile_b);
  const std::string log_b = Path("b.log");
  ASSERT_OK_AND_ASSIGN(RunResult started_b, StartDaemon(image_b, view_b, pidfile_b, {"ro", "log=" + log_b}));
  ASSERT_TRUE(started_b.status.success()) << started_b.Describe();
  ASSERT_OK_AND_ASSIGN(pid_t pid_b, guard_b.ReadPid());
  const std::string device_b = MountDevice(view_b);
  std::cout << "device of the first view " << device_a << ", of the second " << device_b
            << (device_a == device_b ? " (reused, as this test wants)" : " (another mount took the number)") << "\n";

  ASSERT_OK_AND_ASSIGN(RunResult unmounted, RunUnmount(view_b));
  EXPECT_TRUE(unmounted.status.success()) << unmounted.Describe();
  EXPECT_EQ(unmounted.stderr_text, "") << unmounted.Describe();
  // -u returned: the second daemon has exited.
  PidGone gone_b = WaitForPidGone(pid_b, std::chrono::milliseconds(0));
  EXPECT_TRUE(gone_b.gone) << "qcow2fuse -u returned while its daemon, pid " << pid_b << ", still ran";
  if (gone_b.gone) guard_b.Forget();
  // It listened under its own device number (a -u that reached the first
  // daemon would also have waited, for that one).
  ASSERT_OK_AND_ASSIGN(std::string log, ReadFile(log_b));
  EXPECT_FALSE(absl::StrContains(log, "cannot wait")) << log;
  PidGone gone_a = WaitForPidGone(pid_a, std::chrono::seconds(10));
  EXPECT_TRUE(gone_a.gone) << "the first daemon did not end after its unmount";
  if (gone_a.gone) guard_a.Forget();
}

}  // namespace
}  // namespace qcow2fuse::test::cli
