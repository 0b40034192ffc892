// Mount options as fstab, mount(8), mount.fuse3 and systemd hand them to
// qcow2fuse, and the one-line messages of a command line it refuses:
//
//  * every standard mount option is accepted, and the kernel's flags
//    (nodev, noexec, noatime, sync, ...) reach the mount;
//  * mount.fuse3, the helper behind `mount -t fuse.qcow2fuse`, starts a
//    working view, and `umount` ends its daemon;
//  * a typo is one line naming it and the option meant, exit code 2;
//  * -o log=FILE receives a failed request's reason in plain words.
//
// The installed package's mount(8), fstab and systemd paths are tested in
// tests/package; a user other than root in unprivileged_test.cc.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/loop_device.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/scoped_env.h"
#include "support/status_testing.h"

namespace qcow2fuse::test::cli {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kDiskSize = 16 * kMiB;

// The options of the mount at `path` in /proc/self/mountinfo: the per-mount
// flags (field 6) and the super block's options (after " - TYPE SOURCE"),
// joined by a comma; empty if `path` is not mounted.
std::vector<std::string> MountFlags(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  std::vector<std::string> flags;
  while (std::getline(in, line)) {
    std::vector<std::string> fields = absl::StrSplit(line, ' ');
    if (fields.size() < 10 || fields[4] != path) continue;
    flags = absl::StrSplit(fields[5], ',');
    for (size_t i = 6; i + 3 < fields.size(); ++i) {
      if (fields[i] != "-") continue;
      for (absl::string_view o : absl::StrSplit(fields[i + 3], ',')) flags.emplace_back(o);
      break;
    }
  }
  return flags;
}

bool Has(const std::vector<std::string>& flags, const std::string& flag) {
  return std::find(flags.begin(), flags.end(), flag) != flags.end();
}

// Waits until the daemon that created `view` has removed it again, which it
// does last, after its final flush; the image's locks go with its exit.
bool WaitForViewRemoved(const std::string& view) {
  for (int i = 0; i < 300; ++i) {
    if (access(view.c_str(), F_OK) != 0 && !IsMounted(view)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

class MountOptionsTest : public TempDirTest {
 protected:
  // An image with data at a few places, and its raw twin.
  void MakeImage(const std::string& image, const std::string& twin) {
    ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
    ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x5a 0 64k", "write -P 0xa5 5M 12k"}));
    ASSERT_OK(ConvertToRaw(image, twin));
  }

  // An empty 64 MiB ext4 on a loop device, mounted at `dir`: a disk for
  // images whose readahead a test sets through `knob` (in KiB, as
  // `blockdev --setra` would). The members go in reverse: a test's views
  // (made after) first, then the ext4, then the loop device.
  struct LoopExt4 {
    std::unique_ptr<LoopDevice> loop;
    std::unique_ptr<KernelMount> mounted;
    std::string dir;
    std::string knob;
  };
  absl::StatusOr<LoopExt4> MakeLoopExt4() {
    const std::string disk = Path("disk.ext4");
    LoopExt4 out;
    out.dir = Path("fs");
    for (const std::vector<std::string>& argv : std::vector<std::vector<std::string>>{
             {"truncate", "-s", "64M", disk}, {"mkfs.ext4", "-q", "-F", disk}}) {
      if (absl::Status made = RunChecked(argv).status(); !made.ok()) return made;
    }
    if (mkdir(out.dir.c_str(), 0700) != 0) return absl::ErrnoToStatus(errno, out.dir);
    absl::StatusOr<std::unique_ptr<LoopDevice>> loop = LoopDevice::Attach(disk, /*read_only=*/false);
    if (!loop.ok()) return loop.status();
    out.loop = std::move(*loop);
    absl::StatusOr<std::unique_ptr<KernelMount>> mounted =
        KernelMount::Mount(out.loop->device(), out.dir, "ext4", "rw");
    if (!mounted.ok()) return mounted.status();
    out.mounted = std::move(*mounted);
    const std::string& device = out.loop->device();
    out.knob = absl::StrCat("/sys/block/", device.substr(device.rfind('/') + 1), "/queue/read_ahead_kb");
    return out;
  }

  // An ext4 of `size` bytes whose one file, "file", holds `content`: the
  // raw disk `twin` and its qcow2 copy `image`.
  void MakeExt4Image(const std::string& image, const std::string& twin, uint64_t size, const std::string& content) {
    const std::string tree = Path("tree");
    ASSERT_TRUE(fs::create_directory(tree));
    ASSERT_OK(WriteFileAt(tree + "/file", 0, content));
    ASSERT_OK(CreateImage(twin, "raw", size));
    ASSERT_OK(RunChecked({"mkfs.ext4", "-q", "-F", "-d", tree, twin}));
    ASSERT_OK(ConvertImage(twin, "raw", image, "qcow2"));
  }

  // Mounts `image` with -o `options` and expects the mount's readahead to
  // be `kb` KiB, the view to read as `twin`, and no word on stderr.
  void ExpectReadahead(const std::string& image, const std::string& twin, const std::vector<std::string>& options,
                       uint64_t kb) {
    const std::string view = Path("view.raw");
    const std::string pidfile = Path("pid");
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, options));
    ASSERT_TRUE(run.status.success()) << run.Describe();
    EXPECT_EQ(run.stderr_text, "") << run.Describe();
    ASSERT_OK_AND_ASSIGN(uint64_t mount_kb, ReadaheadKb(view));
    EXPECT_EQ(mount_kb, kb);
    EXPECT_OK(CompareFiles(view, twin));
    UnmountWithU(view, guard);
  }

  // What MountedView::Start needs to mount `image` on `view`, with -o
  // `extra` after ro or rw.
  MountOptions ViewOptions(const std::string& image, const std::string& view, std::vector<std::string> extra,
                           bool read_only = true) {
    MountOptions options;
    options.binary = Binary();
    options.image = image;
    options.mountpoint = view;
    options.read_only = read_only;
    options.extra_options = std::move(extra);
    return options;
  }

  // `qcow2fuse -u VIEW`, which must succeed; then the daemon is gone and
  // `guard` has nothing left to wait for.
  void UnmountWithU(const std::string& view, DaemonGuard& guard) {
    ASSERT_OK_AND_ASSIGN(RunResult unmount, RunUnmount(view));
    EXPECT_TRUE(unmount.status.success()) << unmount.Describe();
    if (unmount.status.success()) guard.Forget();
  }
};

TEST_F(MountOptionsTest, UsageErrorsAreOneLineNamingTheArgument) {
  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  struct Case {
    std::vector<std::string> args;
    std::vector<std::string> words;
  };
  const std::vector<Case> cases = {
      {{"-o", "relatme"}, {"unknown mount option 'relatme'", "did you mean 'relatime'"}},
      {{"-o", "ro,thread=4"}, {"'thread=4'", "did you mean 'threads'"}},
      {{"-o", "auto_unmont"}, {"'auto_unmont'", "'auto_unmount'"}},
      {{"-o", "ro,no_such_option"}, {"'no_such_option'"}},
      {{"-o", "threads"}, {"'threads'", "needs a value"}},
      {{"-o", "ro=1"}, {"'ro=1'", "takes no value"}},
      {{"-o", "l2_cache_size=lots"}, {"l2_cache_size must be a size", "not 'lots'"}},
      {{"-o", "fsname=other"}, {"fsname", "set by qcow2fuse"}},
      {{"-o", "max_read=4096"}, {"max_read", "set by qcow2fuse"}},
      {{"-o", "blksize=4096"}, {"blksize", "block-device"}},
      {{"-o", "parallel_direct_writes=yes"}, {"parallel_direct_writes must be on or off", "'yes'"}},
      {{"-o", "uncached_writes=maybe"}, {"uncached_writes must be on or off", "'maybe'"}},
      {{"-o", "uncached_loops=auto"}, {"uncached_loops must be on or off", "'auto'"}},
      {{"-o", "loop_direct_io=yes"}, {"loop_direct_io must be on or off", "'yes'"}},
      {{"-o", "splice_reads=1"}, {"splice_reads must be on or off", "'1'"}},
      {{"-o", "io_uring=yes"}, {"io_uring must be on or off", "'yes'"}},
      {{"-o", "park_workers=2"}, {"park_workers must be on or off", "'2'"}},
      {{"-o", "prefill_runs=yes"}, {"prefill_runs must be on or off", "'yes'"}},
      {{"-o", "readahead=5000"}, {"readahead must be a multiple of 4K from 0 to 16M", "'5000'"}},
      {{"-o", "readahead=32M"}, {"readahead must be a multiple of 4K from 0 to 16M", "'32M'"}},
      {{"-o", "readahead=lots"}, {"readahead must be a size", "'lots'"}},
      {{"-o", "image_readahead=5000"}, {"image_readahead must be a multiple of 4K from 0 to 16M", "'5000'"}},
      {{"-o", "image_readahead=17M"}, {"image_readahead must be a multiple of 4K from 0 to 16M", "'17M'"}},
      {{"-o", "image_readahead"}, {"mount option 'image_readahead' needs a value"}},
      {{"-o", "sync_ahead=lots"}, {"sync_ahead must be a size", "'lots'"}},
      {{"-o", "sync_ahead"}, {"mount option 'sync_ahead' needs a value"}},
      {{"-o", "log="}, {"'log='", "needs a value"}},
      {{"-o", "threads=0"}, {"threads must be a number from 1 to 64", "not '0'"}},
      {{"-o", "threads=65"}, {"threads must be a number from 1 to 64", "not '65'"}},
      {{"-o", "threads=four"}, {"threads must be a number from 1 to 64", "not 'four'"}},
      {{"-o", "drain_timeout=0"}, {"drain_timeout must be a number of seconds from 1 to 86400", "not '0'"}},
      {{"-o", "drain_timeout=86401"}, {"drain_timeout must be a number of seconds from 1 to 86400", "'86401'"}},
      {{"-o", "flush_interval=-1"}, {"flush_interval must be a number of seconds from 0 to 86400", "'-1'"}},
      {{"-o", "flush_interval=86401"}, {"flush_interval must be a number of seconds from 0 to 86400", "'86401'"}},
      {{"-o", "detect_zeroes=yes"}, {"detect_zeroes must be off, on or unmap", "not 'yes'"}},
      {{"-o", "max_metadata_memory=512K"}, {"max_metadata_memory must be at least 1M", "not '512K'"}},
      {{"-o", "l2_cache_size=2X"}, {"l2_cache_size must be a size", "not '2X'"}},
      // T is a suffix (2^40): 1T is a size, out of readahead's range; 2^24 T
      // is past 64 bits.
      {{"-o", "readahead=1T"}, {"readahead must be a multiple of 4K from 0 to 16M", "not '1T'"}},
      {{"-o", "l2_cache_size=16777216T"}, {"l2_cache_size must be a size", "not '16777216T'"}},
      {{"-o", "backing_format=vmdk"}, {"backing_format must be qcow2 or raw", "not 'vmdk'"}},
      {{"-o", "subtype=other"}, {"subtype=other", "set by qcow2fuse"}},
      {{"-o", "blkdev"}, {"blkdev", "block-device"}},
      {{"-oro,thread=4"}, {"'thread=4'", "did you mean 'threads'"}},  // -oA,B: one word
      {{"--bogus"}, {"unknown option '--bogus'"}},
      {{"-x"}, {"unknown option '-x'"}},
  };
  for (const Case& c : cases) {
    std::vector<std::string> argv = {Binary(), "-f"};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    argv.insert(argv.end(), {image, view});
    RunOptions options;
    options.watch_mountpoint = view;
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded(argv, options));
    std::vector<std::string> words = c.words;
    words.push_back("qcow2fuse --help");
    EXPECT_TRUE(FailsWithOneLine(run, words));
    EXPECT_TRUE(run.status.exited() && run.status.code() == 2) << run.Describe();
    EXPECT_FALSE(run.mounted_during_run || IsMounted(view)) << run.Describe();
    EXPECT_NE(access(view.c_str(), F_OK), 0) << "a usage error created the mountpoint";
  }
  // Values missing at the end of the command line.
  for (const std::vector<std::string>& argv : std::vector<std::vector<std::string>>{
           {Binary(), image, view, "-o"}, {Binary(), image, view, "--pidfile"}}) {
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded(argv));
    EXPECT_TRUE(FailsWithOneLine(run, {absl::StrCat(argv.back(), " needs a value")}));
    EXPECT_TRUE(run.status.exited() && run.status.code() == 2) << run.Describe();
  }
}

// What mount.fuse3 would pass through, fstab's own words and systemd's are
// all accepted; the kernel's flags are applied.
TEST_F(MountOptionsTest, StandardMountOptionsAreAcceptedAndTheKernelsApplied) {
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("pid");
  MakeImage(image, twin);
  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(
      RunResult run,
      StartDaemon(image, view, pidfile,
                  {"ro", "defaults", "nofail", "x-systemd.automount", "X-mount.mkdir", "_netdev", "auto", "noauto",
                   "user", "users", "nouser", "owner", "group", "comment=systemd.automount", "relatime",
                   "norelatime", "strictatime", "lazytime", "nodiratime", "iversion", "nosymfollow", "silent",
                   "nonempty", "nodev", "nosuid", "noexec", "noatime", "sync", "dirsync", "threads=4"}));
  ASSERT_TRUE(run.status.success()) << run.Describe();
  const std::vector<std::string> flags = MountFlags(view);
  for (const char* flag : {"ro", "nodev", "nosuid", "noexec", "noatime", "sync", "dirsync"}) {
    EXPECT_TRUE(Has(flags, flag)) << flag << " not in " << absl::StrJoin(flags, ",");
  }
  EXPECT_OK(CompareFiles(view, twin));
  UnmountWithU(view, guard);
}

// The command line mount.fuse3 builds for `mount -t fuse.qcow2fuse` and for
// fstab lines: `sh -c 'qcow2fuse' IMAGE VIEW -o rw,...,dev,suid`, the program
// found on PATH. Then `umount`, as systemd stops a .mount unit.
TEST_F(MountOptionsTest, MountFuse3StartsAViewAndUmountEndsIt) {
  if (access("/sbin/mount.fuse3", X_OK) != 0) GTEST_SKIP() << "no /sbin/mount.fuse3 (package fuse3)";
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  const std::string view = Path("view.raw");
  MakeImage(image, twin);
  const std::string bin_dir = Binary().substr(0, Binary().rfind('/'));
  ASSERT_TRUE(absl::EndsWith(Binary(), "/qcow2fuse")) << "mount.fuse3 runs the program by its name";
  const std::string path = absl::StrCat("PATH=", bin_dir, ":/usr/sbin:/usr/bin:/sbin:/bin");
  struct Case {
    std::vector<std::string> argv;
    bool writable;
  };
  const std::vector<Case> cases = {
      {{"env", path, "/sbin/mount.fuse3", image, view, "-t", "fuse.qcow2fuse", "-o", "ro,nofail,noatime"}, false},
      {{"env", path, "/sbin/mount.fuse3", absl::StrCat("qcow2fuse#", image), view, "-o",
        "defaults,_netdev,nodev,nosuid,relatime,flush_interval=1"},
       true},
  };
  for (const Case& c : cases) {
    DaemonGuard guard(view, "");
    RunOptions options;
    options.timeout = std::chrono::seconds(60);
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded(c.argv, options));
    ASSERT_TRUE(run.status.success()) << run.Describe();
    ASSERT_TRUE(IsMounted(view)) << run.Describe();
    EXPECT_EQ(Has(MountFlags(view), "ro"), !c.writable);
    EXPECT_OK(CompareFiles(view, twin));
    if (c.writable) {
      const std::string block(8192, '\x3c');
      ASSERT_OK(WriteFileAt(view, 3 * kMiB + 512, block));
      ASSERT_OK(WriteFileAt(twin, 3 * kMiB + 512, block));
    }
    ASSERT_OK_AND_ASSIGN(RunResult umount, RunBounded({"umount", view}));
    EXPECT_TRUE(umount.status.success()) << umount.Describe();
    ASSERT_TRUE(WaitForViewRemoved(view)) << "the daemon did not end after umount";
    guard.Forget();
    // The lock is free only once the daemon has exited.
    for (int i = 0; i < 100 && !CheckImage(image).ok(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    EXPECT_OK(CheckImage(image));
    ASSERT_OK(ConvertToRaw(image, Path("after.raw")));
    EXPECT_OK(CompareFiles(Path("after.raw"), twin));
  }
}

// A request the engine refuses is logged with its reason, in words: in
// -o log=FILE (and syslog) for a daemon, without internal status codes.
TEST_F(MountOptionsTest, LogFileGetsTheReasonOfAFailedRequest) {
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("pid");
  const std::string log = Path("qcow2fuse.log");
  MakeImage(image, twin);
  // The log is appended to: what an earlier mount wrote stays.
  const std::string earlier = "an earlier mount's line\n";
  ASSERT_OK(WriteFileAt(log, 0, earlier));
  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, {"log=" + log}));
  ASSERT_TRUE(run.status.success()) << run.Describe();
  // Data lies at 5M: a shrink to 1M is refused with EINVAL.
  EXPECT_NE(truncate(view.c_str(), kMiB), 0);
  EXPECT_EQ(errno, EINVAL);
  UnmountWithU(view, guard);
  ASSERT_OK_AND_ASSIGN(std::string text, ReadFile(log));
  EXPECT_TRUE(absl::StartsWith(text, earlier)) << text;
  EXPECT_TRUE(absl::StrContains(text, "cannot shrink")) << text;
  EXPECT_TRUE(absl::StrContains(text, "serving " + image)) << text;
  for (const char* internal : {"FAILED_PRECONDITION", "INVALID_ARGUMENT", "qcow2fuse/errno", "errno='"}) {
    EXPECT_FALSE(absl::StrContains(text, internal)) << internal << " in\n" << text;
  }
  // Without CAP_SYS_RESOURCE a root daemon warns about PR_SET_IO_FLUSHER;
  // the log keeps that line too, so a user of a loop device learns it.
  if (!HasEffectiveCapability(24 /* CAP_SYS_RESOURCE */) && geteuid() == 0) {
    EXPECT_TRUE(absl::StrContains(text, "PR_SET_IO_FLUSHER")) << text;
  }
}

// Without -f the daemon's messages go to syslog, as qcow2fuse[PID] with
// facility daemon. Where no system logger owns /dev/log (a container), the
// test binds its own datagram socket there for the time of the test.
TEST_F(MountOptionsTest, DaemonMessagesGoToSyslog) {
  struct stat existing;
  if (lstat("/dev/log", &existing) == 0) GTEST_SKIP() << "a system logger owns /dev/log";
  const int sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(sock, 0) << strerror(errno);
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, "/dev/log");
  if (bind(sock, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    const int error = errno;
    close(sock);
    GTEST_SKIP() << "cannot bind /dev/log: " << strerror(error);
  }
  struct Cleanup {
    int fd;
    ~Cleanup() {
      unlink("/dev/log");
      close(fd);
    }
  } cleanup{sock};

  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("pid");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  pid_t pid = 0;
  {
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, {"ro"}));
    ASSERT_TRUE(run.status.success()) << run.Describe();
    ASSERT_OK_AND_ASSIGN(pid, guard.ReadPid());
    UnmountWithU(view, guard);
  }
  // LOG_DAEMON | LOG_INFO, the tag and pid, and the message.
  const std::string tag = absl::StrFormat("<%d>", LOG_DAEMON | LOG_INFO);
  const std::string ident = absl::StrFormat("qcow2fuse[%d]: ", pid);
  bool serving = false;
  bool unmounted = false;
  std::string seen;
  for (;;) {
    pollfd p = {sock, POLLIN, 0};
    if (poll(&p, 1, 2000) <= 0) break;
    char buffer[4096];
    const ssize_t n = recv(sock, buffer, sizeof buffer, 0);
    if (n <= 0) break;
    const std::string message(buffer, n);
    if (!absl::StrContains(message, ident)) continue;  // another test's daemon
    seen += message + "\n";
    if (!absl::StartsWith(message, tag)) continue;
    serving |= absl::StrContains(message, ident + "serving " + image);
    unmounted |= absl::StrContains(message, ident + "unmounted");
    if (serving && unmounted) break;
  }
  EXPECT_TRUE(serving) << seen;
  EXPECT_TRUE(unmounted) << seen;
}

// Past max_metadata_memory a request fails, and the log names the
// structure and the option: a grow whose L1 table would not fit fails with
// ENOMEM and changes nothing; a smaller grow still works.
TEST_F(MountOptionsTest, ARequestPastTheMetadataBudgetFailsNamingTheStructure) {
  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  const std::string log = Path("qcow2fuse.log");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted,
                       MountedView::Start(ViewOptions(image, view, {"max_metadata_memory=1M", "log=" + log}, /*read_only=*/false)));
  // 128 TiB of 64 KiB clusters: an L1 table of 2 MiB.
  constexpr uint64_t kTooLarge = uint64_t{128} << 40;
  errno = 0;
  EXPECT_NE(truncate(view.c_str(), kTooLarge), 0);
  EXPECT_EQ(errno, ENOMEM) << strerror(errno);
  struct stat st;
  ASSERT_EQ(stat(view.c_str(), &st), 0) << strerror(errno);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskSize);
  constexpr uint64_t kFits = uint64_t{2} << 40;  // 32 KiB of L1 table
  EXPECT_EQ(truncate(view.c_str(), kFits), 0) << strerror(errno);
  ASSERT_OK(mounted->Unmount());
  EXPECT_TRUE(mounted->exit_status()->success()) << mounted->ReadLog();
  ASSERT_OK_AND_ASSIGN(std::string text, ReadFile(log));
  EXPECT_TRUE(absl::StrContains(text, "the L1 table of " + image)) << text;
  EXPECT_TRUE(absl::StrContains(text, "max_metadata_memory")) << text;
  ASSERT_OK_AND_ASSIGN(uint64_t size, VirtualSize(image));
  EXPECT_EQ(size, kFits);
  EXPECT_OK(CheckImage(image));
}

TEST_F(MountOptionsTest, RefusalsNameTheFileAndWhatToDo) {
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  {
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded({Binary(), Path("nosuch.qcow2"), Path("a.raw")}));
    EXPECT_TRUE(FailsWithOneLine(run, {"cannot open " + Path("nosuch.qcow2"), "no such file"}));
    EXPECT_FALSE(absl::StrContains(run.stderr_text, "for writing")) << run.Describe();
    EXPECT_FALSE(absl::StrContains(run.stderr_text, "stat ")) << run.Describe();
  }
  {
    // mount.fuse3's drop_privileges passes /dev/fd/N for the mountpoint.
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded({Binary(), image, "/dev/fd/3"}));
    EXPECT_TRUE(FailsWithOneLine(run, {"/dev/fd/3", "drop_privileges"}));
    EXPECT_TRUE(run.status.exited() && run.status.code() == 2) << run.Describe();
  }
  {
    // An image another mount writes: say so once, and what to do.
    const std::string view = Path("first.raw");
    const std::string pidfile = Path("first.pid");
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult first, StartDaemon(image, view, pidfile));
    ASSERT_TRUE(first.status.success()) << first.Describe();
    for (const char* options : {"rw", "ro"}) {
      ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded({Binary(), "-o", options, image, Path("second.raw")}));
      EXPECT_TRUE(FailsWithOneLine(run, {image + " is in use", "-o ro,force_share"}));
      EXPECT_EQ(run.stderr_text.find(image), run.stderr_text.rfind(image)) << "the path twice: " << run.stderr_text;
    }
    UnmountWithU(view, guard);
  }
  {
    const std::string log = Path("no-dir/x.log");
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded({Binary(), "-o", "log=" + log, image, Path("b.raw")}));
    EXPECT_TRUE(FailsWithOneLine(run, {"log file", log}));
    EXPECT_FALSE(IsMounted(Path("b.raw")));
  }
}

// -o ro,force_share takes no image locks, like qemu-img -U: it mounts an
// image a read-write view holds, and while it is mounted QEMU may open the
// image for writing; a plain -o ro view keeps QEMU's writers out.
TEST_F(MountOptionsTest, ReadOnlyForceShareTakesNoLocks) {
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x5a 0 64k"}));
  const std::string expected(64 * 1024, '\x5a');
  {
    const std::string writer = Path("writer.raw");
    const std::string writer_pid = Path("writer.pid");
    DaemonGuard writer_guard(writer, writer_pid);
    ASSERT_OK_AND_ASSIGN(RunResult first, StartDaemon(image, writer, writer_pid));
    ASSERT_TRUE(first.status.success()) << first.Describe();

    const std::string reader = Path("reader.raw");
    const std::string reader_pid = Path("reader.pid");
    DaemonGuard reader_guard(reader, reader_pid);
    ASSERT_OK_AND_ASSIGN(RunResult second, StartDaemon(image, reader, reader_pid, {"ro", "force_share"}));
    ASSERT_TRUE(second.status.success()) << second.Describe();
    ASSERT_OK_AND_ASSIGN(std::string bytes, ReadFile(reader));
    EXPECT_EQ(bytes.substr(0, expected.size()), expected);
    UnmountWithU(reader, reader_guard);
    UnmountWithU(writer, writer_guard);
  }
  for (const bool force_share : {false, true}) {
    SCOPED_TRACE(force_share ? "ro,force_share" : "ro");
    const std::string view = Path("view.raw");
    const std::string pidfile = Path("view.pid");
    DaemonGuard guard(view, pidfile);
    std::vector<std::string> options = {"ro"};
    if (force_share) options.push_back("force_share");
    ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, options));
    ASSERT_TRUE(run.status.success()) << run.Describe();
    // qemu-io without -U takes QEMU's write lock, which a plain read-only
    // view's shared lock refuses.
    absl::Status write = QemuIo(image, "qcow2", {"write -P 0x33 1M 64k"});
    if (force_share) {
      EXPECT_OK(write);
    } else {
      EXPECT_FALSE(write.ok()) << "QEMU wrote an image a plain read-only view holds";
    }
    UnmountWithU(view, guard);
  }
  ASSERT_OK(CheckImage(image));
}

// An escaped comma stays inside its option on the way to libfuse's check:
// an SELinux context with a category set is one option, not two. (Without
// SELinux the kernel then refuses it: a failed mount, not a usage error.)
TEST_F(MountOptionsTest, AnEscapedCommaStaysInItsOption) {
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  const std::string view = Path("view.raw");
  RunOptions options;
  options.watch_mountpoint = view;
  ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded({Binary(), "-f", "-o", "ro,fscontext=system_u:object_r:tmp_t:s0:c1\\,c2",
                                                  image, view},
                                                 options));
  if (run.status.success()) return;  // a kernel with SELinux took it
  EXPECT_TRUE(FailsWithOneLine(run, {"cannot mount"}));
  EXPECT_TRUE(run.status.exited() && run.status.code() == 1) << run.Describe();
  EXPECT_FALSE(absl::StrContains(run.stderr_text, "unknown mount option")) << run.Describe();
}

// -d (or -o debug) shows libfuse's trace of every request.
TEST_F(MountOptionsTest, DebugShowsTheRequestTrace) {
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  const std::string view = Path("view.raw");
  MakeImage(image, twin);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted, MountedView::Start(ViewOptions(image, view, {"debug"})));
  EXPECT_OK(CompareFiles(view, twin));
  const std::string log = mounted->ReadLog();
  ASSERT_OK(mounted->Unmount());
  EXPECT_GT(TracedRequests(log, "READ"), 0u) << log.substr(0, 4000);
}

// A read-only view keeps its page cache from one open to the next
// (keep_cache): a new descriptor finds the pages the last reader left.
// Counted with mincore just before and just after the OPEN, not by READs
// sent on a second pass: under memory pressure (the sanitizer suites run two
// at a time) the kernel may evict a few pages at any moment, and a pass over
// the whole view gives it all the time it needs; the OPEN itself without
// keep_cache drops every page at once.
TEST_F(MountOptionsTest, ReadOnlyViewKeepsItsPageCacheAcrossOpens) {
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  const std::string view = Path("view.raw");
  MakeImage(image, twin);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted, MountedView::Start(ViewOptions(image, view, {})));
  {
    ScopedFd earlier(open(view.c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_GE(earlier.get(), 0) << strerror(errno);
    EXPECT_OK(CompareFiles(view, twin));  // opens, reads every byte, closes
    ASSERT_OK_AND_ASSIGN(const size_t before, PagesInCache(earlier.get(), 0, kDiskSize));
    EXPECT_GT(before, kDiskSize / 4096 / 2) << "the first read left little of the view in its page cache";
    ScopedFd later(open(view.c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_GE(later.get(), 0) << strerror(errno);
    ASSERT_OK_AND_ASSIGN(const size_t after, PagesInCache(later.get(), 0, kDiskSize));
    EXPECT_GE(after * 10, before * 9) << "a new open dropped the view's page cache: " << before << " pages before, "
                                      << after << " after";
  }
  EXPECT_OK(CompareFiles(view, twin));
  ASSERT_OK(mounted->Unmount());
}

// Kills the daemon `guard` watches (SIGKILL) and returns whether its view
// at `view` is unmounted within 10 s, as auto_unmount should see to. If it
// is not, unmounts it, so that no mount is left behind.
bool KillDaemonAndAwaitUnmount(DaemonGuard& guard, const std::string& view) {
  absl::StatusOr<pid_t> pid = guard.ReadPid();
  EXPECT_OK(pid.status());
  if (!pid.ok()) return false;
  EXPECT_EQ(kill(*pid, SIGKILL), 0) << strerror(errno);
  EXPECT_TRUE(WaitForPidGone(*pid, std::chrono::seconds(10)).gone);
  guard.Forget();
  bool unmounted = false;
  for (int i = 0; i < 100 && !(unmounted = !IsMounted(view)); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (!unmounted) umount2(view.c_str(), MNT_DETACH);
  return unmounted;
}

// libfuse's own options reach libfuse: with auto_unmount, fusermount3 takes
// the view down when the daemon dies (here: SIGKILL), where otherwise a
// dead mount would stay; allow_root opens the view to root as allow_other.
TEST_F(MountOptionsTest, LibfuseOptionsAutoUnmountAndAllowRootApply) {
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("pid");
  MakeImage(image, twin);
  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, {"ro", "auto_unmount", "allow_root"}));
  ASSERT_TRUE(run.status.success()) << run.Describe();
  EXPECT_TRUE(Has(MountFlags(view), "allow_other")) << absl::StrJoin(MountFlags(view), ",");
  EXPECT_OK(CompareFiles(view, twin));
  EXPECT_TRUE(KillDaemonAndAwaitUnmount(guard, view)) << "auto_unmount left the dead daemon's mount at " << view;
}

// The processes running `program` (the last part of their argv[0]) whose
// last argument is `last`.
std::vector<pid_t> ProcessesRunning(const std::string& program, const std::string& last) {
  std::vector<pid_t> found;
  for (const std::filesystem::directory_entry& entry : std::filesystem::directory_iterator("/proc")) {
    pid_t pid = 0;
    if (!absl::SimpleAtoi(entry.path().filename().string(), &pid)) continue;
    std::ifstream in(entry.path() / "cmdline");
    std::vector<std::string> argv;
    for (std::string arg; std::getline(in, arg, '\0');) argv.push_back(arg);
    if (argv.size() >= 2 && std::filesystem::path(argv.front()).filename() == program && argv.back() == last) {
      found.push_back(pid);
    }
  }
  return found;
}

// fusermount3 takes a dead view down only if the kernel has torn its
// connection down when it looks, once; the daemon's own watcher looks until
// it has (unmount_watcher.h). Here fusermount3 is killed first, so that the
// view's unmount after the daemon is killed is the watcher's doing.
TEST_F(MountOptionsTest, AutoUnmountTakesTheViewDownWithoutFusermount3) {
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("pid");
  MakeImage(image, twin);
  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, {"ro", "auto_unmount"}));
  ASSERT_TRUE(run.status.success()) << run.Describe();
  EXPECT_TRUE(absl::StrContains(run.stderr_text, "unmounts the view if this daemon dies")) << run.Describe();
  const std::vector<pid_t> helpers = ProcessesRunning("fusermount3", view);
  ASSERT_EQ(helpers.size(), 1u) << "fusermount3 watching " << view;
  ASSERT_EQ(kill(helpers[0], SIGKILL), 0);
  // Dead once it runs no more: the daemon, its parent, does not reap it.
  for (int i = 0; i < 100 && !ProcessesRunning("fusermount3", view).empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(ProcessesRunning("fusermount3", view).empty());
  EXPECT_OK(CompareFiles(view, twin));  // still served
  EXPECT_TRUE(KillDaemonAndAwaitUnmount(guard, view)) << "the dead daemon's view stayed mounted at " << view;
}

// Every descriptor of the view can be mapped MAP_SHARED, also one in FUSE's
// direct-I/O mode: uncached_writes (on by default) puts every descriptor
// opened for writing in that mode, parallel_direct_writes those opened
// with O_DIRECT (fault_mount_test.cc shows their writes run in parallel),
// and the daemon's INIT reply says FUSE_DIRECT_IO_ALLOW_MMAP, which
// libfuse 3.14 cannot (init_flags.h). Bytes stored through a writable
// mapping reach the image; MAP_PRIVATE works on all descriptors too.
TEST_F(MountOptionsTest, EveryDescriptorCanBeMappedSharedUnderEveryWriteMode) {
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  MakeImage(image, twin);
  const std::vector<std::vector<std::string>> modes = {
      {},
      {"uncached_writes=off"},
      {"uncached_writes=off", "parallel_direct_writes=off"},
      {"parallel_direct_writes=off"},
  };
  char stamp = 'A';
  for (const std::vector<std::string>& mode : modes) {
    SCOPED_TRACE(absl::StrCat("-o ", absl::StrJoin(mode, ",")));
    const std::string view = Path("view.raw");
    const std::string pidfile = Path("pid");
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, mode));
    ASSERT_TRUE(run.status.success()) << run.Describe();
    for (const int flags : {O_RDONLY, O_RDWR, O_RDWR | O_DIRECT}) {
      const bool writable = flags != O_RDONLY;
      SCOPED_TRACE(writable ? ((flags & O_DIRECT) ? "O_RDWR | O_DIRECT" : "O_RDWR") : "O_RDONLY");
      const int fd = open(view.c_str(), flags | O_CLOEXEC);
      ASSERT_GE(fd, 0) << strerror(errno);
      const int protection = PROT_READ | (writable ? PROT_WRITE : 0);
      auto* shared = static_cast<char*>(mmap(nullptr, 8192, protection, MAP_SHARED, fd, 0));
      ASSERT_NE(shared, MAP_FAILED) << strerror(errno);
      EXPECT_EQ(shared[0], '\x5a');
      if (writable) {
        // A page of the mapping, stored and synced, then read back
        // through another descriptor.
        const std::string page(4096, stamp++);
        memcpy(shared + 4096, page.data(), page.size());
        ASSERT_EQ(msync(shared, 8192, MS_SYNC), 0) << strerror(errno);
        ASSERT_OK(WriteFileAt(twin, 4096, page));
        const int reader = open(view.c_str(), O_RDONLY | O_CLOEXEC);
        ASSERT_GE(reader, 0) << strerror(errno);
        std::string back(page.size(), '\0');
        EXPECT_EQ(pread(reader, back.data(), back.size(), 4096), static_cast<ssize_t>(back.size()));
        EXPECT_EQ(back, page);
        close(reader);
      }
      munmap(shared, 8192);
      void* copy = mmap(nullptr, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
      ASSERT_NE(copy, MAP_FAILED) << strerror(errno);
      EXPECT_EQ(static_cast<const char*>(copy)[0], '\x5a');
      munmap(copy, 4096);
      ASSERT_EQ(close(fd), 0) << strerror(errno);
    }
    EXPECT_OK(CompareFiles(view, twin));
    UnmountWithU(view, guard);
    EXPECT_OK(CheckImage(image));
  }
  ASSERT_OK(ConvertToRaw(image, Path("after.raw")));
  EXPECT_OK(CompareFiles(Path("after.raw"), twin));
}

// Pages of [offset, offset + length) of a file in its page cache, through
// `map`, a shared mapping of it (mincore).
size_t CachedPages(const void* map, uint64_t offset, uint64_t length) {
  std::vector<unsigned char> resident(length / 4096);
  if (mincore(static_cast<char*>(const_cast<void*>(map)) + offset, length, resident.data()) != 0) {
    ADD_FAILURE() << "mincore: " << strerror(errno);
    return 0;
  }
  return std::count_if(resident.begin(), resident.end(), [](unsigned char r) { return r & 1; });
}

// A read-only shared mapping of `length` bytes of `fd`, unmapped when it
// goes (MAP_FAILED if mmap failed).
using Mapping = std::unique_ptr<void, std::function<void(void*)>>;
Mapping MapShared(int fd, size_t length) {
  return Mapping(mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, 0), [length](void* p) {
    if (p != MAP_FAILED) munmap(p, length);
  });
}

// Attaches a loop device to `view` (read-only unless `write` is given;
// `losetup --direct-io=on` with `loop_direct_io`), writes `write->second`
// at `write->first` through it and fsyncs, and `twin` gets the same bytes;
// then reads the whole device, `size` bytes, and expects `twin`'s. The
// device is opened with O_DIRECT, so that its own page cache does not
// answer: every byte goes to and comes from the view. It is closed and
// detached before this returns.
void LoopDeviceIo(const std::string& view, const std::string& twin, uint64_t size,
                  const std::optional<std::pair<uint64_t, std::string>>& write, bool loop_direct_io = false) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<LoopDevice> loop,
                       LoopDevice::Attach(view, /*read_only=*/!write, loop_direct_io));
  ScopedFd device(open(loop->device().c_str(), (write ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC));
  ASSERT_GE(device.get(), 0) << strerror(errno);
  AlignedBuffer buffer = AllocAligned(size);
  if (write) {
    const auto& [at, bytes] = *write;
    memcpy(buffer.get(), bytes.data(), bytes.size());
    EXPECT_EQ(pwrite(device.get(), buffer.get(), bytes.size(), at), static_cast<ssize_t>(bytes.size()))
        << strerror(errno);
    EXPECT_EQ(fsync(device.get()), 0) << strerror(errno);
    ASSERT_OK(WriteFileAt(twin, at, bytes));
  }
  ASSERT_OK_AND_ASSIGN(std::string expected, ReadFile(twin));
  const ssize_t n = pread(device.get(), buffer.get(), size, 0);
  EXPECT_TRUE(n == static_cast<ssize_t>(size) && memcmp(buffer.get(), expected.data(), size) == 0)
      << "the loop device read " << n << " bytes, not those of " << twin;
}

// The largest WRITE request in libfuse's trace (-d), in bytes of payload.
uint64_t LargestWrite(const std::string& log) {
  constexpr uint64_t kHeaders = 40 + 40;  // fuse_in_header, fuse_write_in
  uint64_t largest = 0;
  for (absl::string_view line : absl::StrSplit(log, '\n')) {
    if (!absl::StrContains(line, "opcode: WRITE")) continue;
    const size_t at = line.find("insize: ");
    uint64_t insize = 0;
    if (at == absl::string_view::npos ||
        !absl::SimpleAtoi(line.substr(at + 8, line.find(',', at) - at - 8), &insize)) {
      continue;
    }
    largest = std::max(largest, insize > kHeaders ? insize - kHeaders : 0);
  }
  return largest;
}

// With uncached_writes a buffered write() goes to the daemon as it is: the
// kernel pins the writer's pages and sends them in requests of up to 1 MiB
// (a megabyte from a buffer that is not page-aligned spans 257 pages, so
// it comes as two), and leaves no copy in the view's page cache, as
// mincore() shows through a read-only shared mapping made before the
// write. Reads through that descriptor are not read ahead either: they
// leave nothing cached, while those through a read-only descriptor are
// read ahead into the page cache as always. Without the option the page cache
// keeps the pages written through it, and the writer's reads are read
// ahead too. Either way, readers see the new bytes and the image stays
// clean.
TEST_F(MountOptionsTest, UncachedWritesBypassTheViewsPageCache) {
  if (!KernelAtLeast(6, 9)) GTEST_SKIP() << "direct-I/O mode for writers needs Linux 6.9 (FUSE io modes)";
  constexpr uint64_t kAt = 1 << 20;
  constexpr size_t kLength = 1 << 20;
  constexpr uint64_t kWriterReadAt = 8 << 20;
  constexpr uint64_t kReaderReadAt = 12 << 20;
  constexpr uint64_t kLooked = 256 << 10;  // how far mincore looks past a read
  for (const bool uncached : {true, false}) {
    SCOPED_TRACE(uncached ? "uncached_writes=on" : "uncached_writes=off");
    const std::string image = Path("disk.qcow2");
    const std::string twin = Path("twin.raw");
    const std::string view = Path("view.raw");
    MakeImage(image, twin);
    ASSERT_OK_AND_ASSIGN(
        std::unique_ptr<MountedView> mounted,
        MountedView::Start(ViewOptions(image, view, {"debug", uncached ? "uncached_writes=on" : "uncached_writes=off"},
                                       /*read_only=*/false)));
    const int reader = open(view.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(reader, 0) << strerror(errno);
    void* map = mmap(nullptr, kDiskSize, PROT_READ, MAP_SHARED, reader, 0);
    ASSERT_NE(map, MAP_FAILED) << strerror(errno);

    std::vector<char> storage(kLength + 1);
    char* unaligned = storage.data() + 1;
    if (reinterpret_cast<uintptr_t>(unaligned) % 4096 == 0) ++unaligned;  // never page-aligned
    for (size_t i = 0; i < kLength; ++i) unaligned[i] = static_cast<char>('a' + i % 23);
    const int writer = open(view.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(writer, 0) << strerror(errno);
    ASSERT_EQ(pwrite(writer, unaligned, kLength, kAt), static_cast<ssize_t>(kLength)) << strerror(errno);
    ASSERT_OK(WriteFileAt(twin, kAt, absl::string_view(unaligned, kLength)));
    const size_t written_cached = CachedPages(map, kAt, kLength);

    // Two pages in a row each: a sequential reader, whom the kernel reads
    // ahead of (a lone small read is taken for a random one).
    char page[4096];
    const auto read_two_pages = [&](int fd, uint64_t at) {
      for (uint64_t offset : {at, at + sizeof page}) {
        ASSERT_EQ(pread(fd, page, sizeof page, offset), static_cast<ssize_t>(sizeof page)) << strerror(errno);
      }
    };
    read_two_pages(writer, kWriterReadAt);
    const size_t writer_read_cached = CachedPages(map, kWriterReadAt, kLooked);
    read_two_pages(reader, kReaderReadAt);
    EXPECT_GT(CachedPages(map, kReaderReadAt, kLooked), 2u) << "a read-only descriptor is read ahead";

    // Through the mapping, the reader sees what was written.
    EXPECT_EQ(memcmp(static_cast<const char*>(map) + kAt, unaligned, kLength), 0);
    munmap(map, kDiskSize);
    close(reader);
    ASSERT_EQ(close(writer), 0) << strerror(errno);
    EXPECT_OK(CompareFiles(view, twin));
    const std::string log = mounted->ReadLog();
    ASSERT_OK(mounted->Unmount());
    if (uncached) {
      EXPECT_EQ(written_cached, 0u) << "pages of the view's page cache after the write";
      EXPECT_EQ(writer_read_cached, 0u) << "pages of the view's page cache after the writer's reads";
      EXPECT_GE(LargestWrite(log), kLength - 4096);
    } else {
      EXPECT_GT(written_cached, 0u) << "the kernel's write-through path keeps the pages it wrote";
      EXPECT_GT(writer_read_cached, 2u) << "the writer's reads are read ahead";
    }
    EXPECT_OK(CheckImage(image));
    ASSERT_OK(ConvertToRaw(image, Path("after.raw")));
    EXPECT_OK(CompareFiles(Path("after.raw"), twin));
  }
}

// A loop device caches the guest file system's blocks above the view; under
// -o uncached_loops the descriptor that its attaching program opens is in
// FUSE's direct-I/O mode, read-only or not. Without it (the default) the
// descriptor is as any other: read-only ones are cached and read ahead,
// writers are not unless uncached_writes is off. Read-only: `losetup -r`,
// then `mount -o loop,ro`; under the option what those loop devices read
// leaves nothing in the view's page cache, as mincore() shows through a
// mapping made before, while without it they fill it as any reader does.
// Writable, under uncached_writes=off (so that only uncached_loops can be
// what keeps the cache out): a plain `losetup` writes and reads back
// through the view, and leaves nothing cached under the option either,
// where without it the kernel's write-through path keeps the pages. Each
// time the test's own reads then fill the cache, so the look is not blind,
// the loop devices read and wrote the right bytes, and the image ends as a
// raw twin that got the same writes. The daemon's log names each opener
// it answered in direct-I/O mode; `losetup --direct-io=on`, which opens
// with O_DIRECT and whose loop device reads in parallel, is not among them.
TEST_F(MountOptionsTest, UncachedLoopsKeepLoopDevicesOutOfThePageCache) {
  if (!KernelAtLeast(6, 15)) GTEST_SKIP() << "loop devices keep the page cache before Linux 6.15 (opener.h)";
  if (std::string reason = LoopUnavailableReason(); !reason.empty()) GTEST_SKIP() << reason;
  constexpr uint64_t kFsSize = 16 * kMiB;
  constexpr size_t kFileSize = 3 * kMiB;
  // Where the writable loop devices write: raw bytes, so no file system is
  // mounted over those.
  constexpr uint64_t kWriteAt = 12 * kMiB;
  constexpr size_t kWriteLength = 512 << 10;
  const std::string raw = Path("fs.raw");
  const std::string image = Path("fs.qcow2");
  const std::string mount_dir = Path("mnt");
  std::string content(kFileSize, '\0');
  for (size_t i = 0; i < content.size(); ++i) content[i] = static_cast<char>(i * 7 % 251);
  ASSERT_TRUE(fs::create_directory(mount_dir));
  MakeExt4Image(image, raw, kFsSize, content);
  if (HasFatalFailure()) return;

  struct Case {
    std::vector<std::string> options;
    bool writable;
    bool uncached;  // what the loop devices should leave in the view's cache: nothing
  };
  const std::string log = Path("daemon.log");
  // The openers the daemon's log names as attaching loop devices, each
  // process once: losetup opens the file again for each device it tries,
  // and when another process took the free device it found (EBUSY, as a
  // test running beside this one may), it waits and tries another.
  const auto logged_openers = [&]() -> std::vector<std::string> {
    std::vector<std::string> openers;
    absl::StatusOr<std::string> text = ReadFile(log);
    if (!text.ok()) return openers;
    std::set<std::string> seen;  // "NAME (pid N)"
    for (absl::string_view line : absl::StrSplit(*text, '\n')) {
      // "... NAME (pid N) opened the view for a loop device: its reads and
      // writes bypass the view's page cache ..."
      const size_t pid = line.find(" (pid ");
      const size_t opened = line.find(") opened the view for a loop device: its reads and writes bypass");
      if (pid == absl::string_view::npos || opened == absl::string_view::npos || opened < pid) continue;
      const size_t start = line.substr(0, pid).rfind(' ') + 1;  // npos + 1: from the start
      if (seen.insert(std::string(line.substr(start, opened + 1 - start))).second) {
        openers.emplace_back(line.substr(start, pid - start));
      }
    }
    return openers;
  };
  char stamp = 'a';
  for (const Case& c : std::vector<Case>{{{"ro", "uncached_loops=on"}, false, true},
                                         {{"ro"}, false, false},
                                         {{"uncached_writes=off", "uncached_loops=on"}, true, true},
                                         {{"uncached_writes=off"}, true, false}}) {
    SCOPED_TRACE(absl::StrCat("-o ", absl::StrJoin(c.options, ",")));
    const std::string view = Path("view.raw");
    const std::string pidfile = Path("pid");
    unlink(log.c_str());
    std::vector<std::string> options = c.options;
    options.push_back("log=" + log);
    // What the descriptors leave in the cache, before any switch of the
    // loop device to direct I/O (the test after next) could change it.
    options.push_back("loop_direct_io=off");
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, options));
    ASSERT_TRUE(run.status.success()) << run.Describe();
    // Declared before the loop devices, so that on any way out they are
    // gone first, then the mapping and the descriptor, then the view.
    ScopedFd reader(open(view.c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_GE(reader.get(), 0) << strerror(errno);
    Mapping map = MapShared(reader.get(), kFsSize);
    ASSERT_NE(map.get(), MAP_FAILED) << strerror(errno);

    std::optional<std::pair<uint64_t, std::string>> write;
    if (c.writable) write.emplace(kWriteAt, std::string(kWriteLength, stamp++));
    LoopDeviceIo(view, raw, kFsSize, write);
    if (HasFatalFailure()) return;
    const size_t after_losetup = CachedPages(map.get(), 0, kFsSize);

    size_t after_mount = 0;
    if (!c.writable) {
      ASSERT_OK_AND_ASSIGN(std::unique_ptr<KernelMount> ext4,
                           KernelMount::Mount(view, mount_dir, "ext4", "loop,ro"));
      ASSERT_OK_AND_ASSIGN(std::string device, RunChecked({"findmnt", "-n", "-o", "SOURCE", mount_dir}));
      device = std::string(absl::StripAsciiWhitespace(device));
      ASSERT_OK_AND_ASSIGN(std::string back, ReadFile(mount_dir + "/file"));
      EXPECT_TRUE(back == content) << "the file read back through mount -o loop differs";
      ASSERT_OK(ext4->Unmount());
      // The loop device goes with the unmount (autoclear), maybe a moment
      // later; until then it holds the view.
      EXPECT_TRUE(WaitUntilDetached(device)) << device << " still attached";
      after_mount = CachedPages(map.get(), 0, kFsSize);
    }
    // `losetup --direct-io=on` opens the view with O_DIRECT.
    LoopDeviceIo(view, raw, kFsSize, std::nullopt, /*loop_direct_io=*/true);
    if (HasFatalFailure()) return;

    char page[4096];
    for (uint64_t offset : {uint64_t{0}, uint64_t{4096}}) {
      ASSERT_EQ(pread(reader.get(), page, sizeof page, offset), static_cast<ssize_t>(sizeof page)) << strerror(errno);
    }
    const size_t after_own_reads = CachedPages(map.get(), 0, kFsSize);
    map.reset();
    reader.Reset();
    EXPECT_OK(CompareFiles(view, raw));
    UnmountWithU(view, guard);
    if (c.uncached) {
      EXPECT_EQ(after_losetup, 0u) << "pages of the view's page cache after the loop device's I/O";
      EXPECT_EQ(after_mount, 0u) << "pages of the view's page cache after mount -o loop";
    } else {
      EXPECT_GE(after_losetup, kFsSize / 4096 / 2) << "the loop device goes through the view's page cache";
    }
    EXPECT_GE(after_own_reads, 2u) << "the test's own reads are cached";
    std::vector<std::string> openers;
    if (c.uncached) openers = c.writable ? std::vector<std::string>{"losetup"} : std::vector<std::string>{"losetup", "mount"};
    EXPECT_EQ(logged_openers(), openers) << "openers the log names as attaching loop devices";
    EXPECT_OK(CheckImage(image));
  }
  ASSERT_OK(ConvertToRaw(image, Path("after.raw")));
  EXPECT_OK(CompareFiles(Path("after.raw"), raw));
}

// Before Linux 6.15 a plain loop device went through its file a page at a
// time, so there a loop device's descriptor keeps the view's page cache
// and its readahead, even one opened for writing under uncached_writes.
// The daemon runs with a shim that makes uname() say 6.12; a writer that
// is not a loop device still bypasses the cache, so the shim changed only
// what it should. The bytes stay right either way.
TEST_F(MountOptionsTest, LoopDevicesKeepThePageCacheBeforeLinux615) {
  if (!KernelAtLeast(6, 9)) GTEST_SKIP() << "uncached writers need Linux 6.9 (FUSE io modes)";
  if (std::string reason = LoopUnavailableReason(); !reason.empty()) GTEST_SKIP() << reason;
  constexpr uint64_t kOwnReadAt = 8 * kMiB;  // where the test's own writer reads
  constexpr uint64_t kWriteAt = 12 * kMiB;
  constexpr size_t kWriteLength = 512 << 10;
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  MakeImage(image, twin);
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("pid");
  DaemonGuard guard(view, pidfile);
  {
    ScopedPreload shim(QCOW2FUSE_UNAME_SHIM);
    ScopedEnv release("QCOW2FUSE_TEST_KERNEL_RELEASE", "6.12.48+deb13-amd64");
    ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, {"loop_direct_io=off"}));
    ASSERT_TRUE(run.status.success()) << run.Describe();
  }
  ScopedFd reader(open(view.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_GE(reader.get(), 0) << strerror(errno);
  Mapping map = MapShared(reader.get(), kDiskSize);
  ASSERT_NE(map.get(), MAP_FAILED) << strerror(errno);

  // The test's own writer: in direct-I/O mode, its reads cache nothing.
  {
    ScopedFd writer(open(view.c_str(), O_RDWR | O_CLOEXEC));
    ASSERT_GE(writer.get(), 0) << strerror(errno);
    char page[4096];
    for (uint64_t offset : {kOwnReadAt, kOwnReadAt + 4096}) {
      ASSERT_EQ(pread(writer.get(), page, sizeof page, offset), static_cast<ssize_t>(sizeof page)) << strerror(errno);
    }
  }
  EXPECT_EQ(CachedPages(map.get(), kOwnReadAt, kMiB), 0u) << "a writer that is not a loop device is uncached";

  LoopDeviceIo(view, twin, kDiskSize, std::make_pair(kWriteAt, std::string(kWriteLength, 'L')));
  if (HasFatalFailure()) return;
  EXPECT_GE(CachedPages(map.get(), 0, kDiskSize), kDiskSize / 4096 / 2)
      << "a writable loop device goes through the view's page cache before Linux 6.15";
  map.reset();
  reader.Reset();
  EXPECT_OK(CompareFiles(view, twin));
  UnmountWithU(view, guard);
  EXPECT_OK(CheckImage(image));
  ASSERT_OK(ConvertToRaw(image, Path("after.raw")));
  EXPECT_OK(CompareFiles(Path("after.raw"), twin));
}

// A loop device attached without --direct-io over the view, read-only or
// writable, by `losetup` or by `mount -o loop`, is switched to direct I/O
// by the daemon a moment after it is bound (loop_direct_io.h), and the log
// names it; under -o loop_direct_io=off it stays buffered. Either way the
// bytes read through it are the image's, those written through it reach
// the image, and the image checks clean.
TEST_F(MountOptionsTest, LoopDevicesOverTheViewAreSwitchedToDirectIo) {
  if (std::string reason = LoopUnavailableReason(); !reason.empty()) GTEST_SKIP() << reason;
  constexpr uint64_t kFsSize = 16 * kMiB;
  constexpr uint64_t kWriteAt = 12 * kMiB;  // past the ext4's files
  constexpr size_t kWriteLength = 512 << 10;
  const std::string twin = Path("fs.raw");
  const std::string image = Path("fs.qcow2");
  const std::string mount_dir = Path("mnt");
  const std::string content(3 * kMiB, 'c');
  ASSERT_TRUE(fs::create_directory(mount_dir));
  MakeExt4Image(image, twin, kFsSize, content);
  if (HasFatalFailure()) return;

  const std::string log = Path("daemon.log");
  // Whether the loop device does direct I/O within 10 s.
  const auto becomes_direct = [](const std::string& device) {
    for (int i = 0; i < 1000 && LoopDioFlag(device) != "1"; ++i) usleep(10 * 1000);
    return LoopDioFlag(device) == "1";
  };
  const auto logged_switch = [&](const std::string& device) {
    absl::StatusOr<std::string> text = ReadFile(log);
    return text.ok() && absl::StrContains(*text, device + " reads and writes the view with direct I/O now");
  };
  char stamp = 'a';
  for (const bool on : {true, false}) {
    for (const bool writable : {false, true}) {
      SCOPED_TRACE(absl::StrCat(on ? "by default" : "loop_direct_io=off", writable ? ", writable" : ", ro"));
      unlink(log.c_str());
      std::vector<std::string> options = {"log=" + log};
      if (!on) options.push_back("loop_direct_io=off");
      if (!writable) options.push_back("ro");
      const std::string view = Path("view.raw");
      const std::string pidfile = Path("pid");
      DaemonGuard guard(view, pidfile);
      ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, options));
      ASSERT_TRUE(run.status.success()) << run.Describe();

      std::string device;
      {
        // A loop device over another file (the twin) is not the daemon's
        // to switch.
        std::unique_ptr<LoopDevice> other;
        if (on && !writable) {
          ASSERT_OK_AND_ASSIGN(other, LoopDevice::Attach(twin, /*read_only=*/true));
        }
        ASSERT_OK_AND_ASSIGN(std::unique_ptr<LoopDevice> loop, LoopDevice::Attach(view, /*read_only=*/!writable));
        device = loop->device();
        if (on) {
          EXPECT_TRUE(becomes_direct(device)) << device << " still does buffered I/O";
          if (other) {
            usleep(500 * 1000);  // fifty times the daemon's polling interval
            EXPECT_EQ(LoopDioFlag(other->device()), "0") << other->device() << ", over another file, was switched";
          }
        } else {
          usleep(500 * 1000);  // fifty times the daemon's polling interval
          EXPECT_EQ(LoopDioFlag(device), "0") << device << " was switched although the option is off";
        }
        ScopedFd fd(open(device.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC));
        ASSERT_GE(fd.get(), 0) << strerror(errno);
        if (writable) {
          const std::string bytes(kWriteLength, stamp++);
          EXPECT_EQ(pwrite(fd.get(), bytes.data(), bytes.size(), kWriteAt), static_cast<ssize_t>(bytes.size()))
              << strerror(errno);
          EXPECT_EQ(fsync(fd.get()), 0) << strerror(errno);
          ASSERT_OK(WriteFileAt(twin, kWriteAt, bytes));
        }
        ASSERT_OK_AND_ASSIGN(std::string expected, ReadFile(twin));
        std::string back(kFsSize, '\0');
        EXPECT_EQ(pread(fd.get(), back.data(), back.size(), 0), static_cast<ssize_t>(kFsSize)) << strerror(errno);
        EXPECT_TRUE(back == expected) << "the bytes read through " << device << " are not the image's";
      }
      EXPECT_TRUE(WaitUntilDetached(device)) << device << " still attached";
      EXPECT_EQ(logged_switch(device), on) << "the log on the switch of " << device;

      EXPECT_OK(CompareFiles(view, twin));
      // mount -o loop attaches the device itself (read-only, so that the
      // twin stays the image's).
      {
        ASSERT_OK_AND_ASSIGN(std::unique_ptr<KernelMount> ext4, KernelMount::Mount(view, mount_dir, "ext4", "loop,ro"));
        ASSERT_OK_AND_ASSIGN(std::string source, RunChecked({"findmnt", "-n", "-o", "SOURCE", mount_dir}));
        source = std::string(absl::StripAsciiWhitespace(source));
        if (on) {
          EXPECT_TRUE(becomes_direct(source)) << source << " (mount -o loop) still does buffered I/O";
        } else {
          EXPECT_EQ(LoopDioFlag(source), "0") << source << " (mount -o loop)";
        }
        ASSERT_OK_AND_ASSIGN(std::string file, ReadFile(mount_dir + "/file"));
        EXPECT_TRUE(file == content) << "the file read back through mount -o loop differs";
        ASSERT_OK(ext4->Unmount());
        EXPECT_TRUE(WaitUntilDetached(source)) << source << " still attached";
      }
      UnmountWithU(view, guard);
      EXPECT_OK(CheckImage(image));
      ASSERT_OK(ConvertToRaw(image, Path("after.raw")));
      EXPECT_OK(CompareFiles(Path("after.raw"), twin));
    }
  }
}

// The kernel starts a FUSE mount's readahead at 128 KiB, and INIT's
// max_readahead can only lower it; the daemon (root here) sets -o readahead
// on the mount. 8M, more than INIT would otherwise ask for, shows that INIT
// keeps what was set; 0 turns readahead off. Sequential reads of the whole
// view (CompareFiles) stay right with each. The default is the next test's.
TEST_F(MountOptionsTest, ReadaheadIsSetOnTheMount) {
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  MakeImage(image, twin);
  struct Case {
    std::vector<std::string> options;
    uint64_t kb;
  };
  for (const Case& c : std::vector<Case>{{{"ro", "readahead=8M"}, 8192},
                                         {{"readahead=128K"}, 128}, {{"ro", "readahead=0"}, 0}}) {
    SCOPED_TRACE(absl::StrJoin(c.options, ","));
    ExpectReadahead(image, twin, c.options, c.kb);
  }
}

// The view reads ahead 1M by default, whatever the disk under the image.
// While a loop device reads the view through its page cache (read-only;
// writable too before Linux 6.15) it reads ahead as far as the kernel
// reads ahead of a file on that disk, from 1M to 16M, and back to 1M once
// the loop device is gone: here an ext4 on a loop device, its readahead
// set through sysfs before each mount, as `blockdev --setra` would. The
// daemon told by the uname shim that it runs Linux 6.12 raises it for a
// writable loop device too. All that with -o loop_direct_io=off: a loop
// device the daemon switches to direct I/O (the default), one whose
// descriptor is in direct-I/O mode (-o uncached_loops) and an explicit -o
// readahead leave it as it is. The bytes read through the loop device are
// the image's each time.
TEST_F(MountOptionsTest, LoopDevicesReadAheadAsFarAsTheDiskUnderTheImage) {
  if (const std::string why = LoopUnavailableReason(); !why.empty()) GTEST_SKIP() << why;
  ASSERT_OK_AND_ASSIGN(LoopExt4 ext4, MakeLoopExt4());
  const std::string image = ext4.dir + "/disk.qcow2";
  const std::string twin = Path("twin.raw");
  MakeImage(image, twin);
  struct Case {
    uint64_t disk_kb;
    std::vector<std::string> options;
    bool writable_loop;
    uint64_t mounted_kb;  // the view's readahead before and after the loop device
    uint64_t with_loop_kb;
    bool linux_6_12 = false;  // the daemon runs under the uname shim
  };
  const bool has_uncached_loops = KernelAtLeast(6, 15);
  // The daemon leaves loop devices buffered, except in the last case.
  const std::string buffered = "loop_direct_io=off";
  std::vector<Case> cases = {{4096, {"ro", buffered}, false, 1024, 4096},
                             {64, {"ro", buffered}, false, 1024, 1024},
                             {32768, {"ro", buffered}, false, 1024, 16384},
                             {2048, {buffered}, false, 1024, 2048},
                             {4096, {"ro", "readahead=256K", buffered}, false, 256, 256},
                             {4096, {buffered}, true, 1024, 4096, /*linux_6_12=*/true}};
  if (has_uncached_loops) {
    cases.push_back({4096, {"ro", "uncached_loops=on", buffered}, false, 1024, 1024});
    // A writer is in direct-I/O mode under uncached_writes (on by default).
    cases.push_back({4096, {buffered}, true, 1024, 1024});
  }
  // By default the loop device is switched to direct I/O, and its reads
  // bypass the view's page cache: nothing to read ahead for.
  cases.push_back({4096, {"ro"}, false, 1024, 1024});
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("pid");
  const std::string log = Path("daemon.log");
  for (const Case& c : cases) {
    SCOPED_TRACE(absl::StrCat("disk ", c.disk_kb, "K, -o ", absl::StrJoin(c.options, ","),
                              c.writable_loop ? ", writable loop device" : ", read-only loop device",
                              c.linux_6_12 ? ", Linux 6.12" : ""));
    ASSERT_OK(WriteFileAt(ext4.knob, 0, absl::StrCat(c.disk_kb, "\n")));
    DaemonGuard guard(view, pidfile);
    {
      std::optional<ScopedPreload> shim;
      std::optional<ScopedEnv> release;
      if (c.linux_6_12) {
        shim.emplace(QCOW2FUSE_UNAME_SHIM);
        release.emplace("QCOW2FUSE_TEST_KERNEL_RELEASE", "6.12.48+deb13-amd64");
      }
      std::vector<std::string> options = c.options;
      options.push_back("log=" + log);
      ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, options));
      ASSERT_TRUE(run.status.success()) << run.Describe();
      EXPECT_EQ(run.stderr_text, "") << run.Describe();
    }
    ASSERT_OK_AND_ASSIGN(uint64_t mounted_kb, ReadaheadKb(view));
    EXPECT_EQ(mounted_kb, c.mounted_kb) << "after mounting";
    {
      ASSERT_OK_AND_ASSIGN(std::unique_ptr<LoopDevice> over_view,
                           LoopDevice::Attach(view, /*read_only=*/!c.writable_loop));
      ASSERT_OK_AND_ASSIGN(uint64_t with_loop_kb, ReadaheadKb(view));
      EXPECT_EQ(with_loop_kb, c.with_loop_kb) << "with the loop device attached";
      ASSERT_OK_AND_ASSIGN(std::string through_loop, ReadFile(over_view->device()));
      ASSERT_OK_AND_ASSIGN(std::string expected, ReadFile(twin));
      EXPECT_TRUE(through_loop == expected) << "the loop device read " << through_loop.size()
                                            << " bytes, not those of " << twin;
    }
    // The kernel sends the release of the loop device's file after it let
    // go of it, and does not wait for the answer.
    uint64_t after = 0;
    for (int i = 0; i < 200; ++i) {
      ASSERT_OK_AND_ASSIGN(after, ReadaheadKb(view));
      if (after == c.mounted_kb) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    EXPECT_EQ(after, c.mounted_kb) << "after the loop device is gone";
    EXPECT_OK(CompareFiles(view, twin));
    UnmountWithU(view, guard);
    // The raise is logged with the loop device's opener.
    ASSERT_OK_AND_ASSIGN(std::string logged, ReadFile(log));
    const std::string opener = "losetup (pid ";
    const std::string reads_ahead = absl::StrCat("the view reads ahead ", c.with_loop_kb, " KiB");
    EXPECT_EQ(absl::StrContains(logged, reads_ahead) && absl::StrContains(logged, opener),
              c.with_loop_kb != c.mounted_kb)
        << logged;
    unlink(log.c_str());
  }
  EXPECT_OK(CheckImage(image));
  ASSERT_OK(ext4.mounted->Unmount());
}

// Bytes of `path` in the host's page cache: of the whole file, or of the
// pages of [offset, offset + length).
absl::StatusOr<uint64_t> ResidentBytes(const std::string& path, uint64_t offset = 0,
                                       uint64_t length = UINT64_MAX) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, path);
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size == 0) {
    close(fd);
    return absl::InternalError(absl::StrCat("cannot size ", path));
  }
  void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return absl::ErrnoToStatus(errno, absl::StrCat("mmap of ", path));
  const size_t page = sysconf(_SC_PAGESIZE);
  const uint64_t size = st.st_size;
  const uint64_t first = std::min<uint64_t>(offset, size) / page * page;
  const uint64_t end = length >= size - std::min(offset, size) ? size : offset + length;
  std::vector<unsigned char> in_core((end - first + page - 1) / page);
  const int rc = mincore(static_cast<char*>(map) + first, end - first, in_core.data());
  const int error = errno;
  munmap(map, st.st_size);
  if (rc != 0) return absl::ErrnoToStatus(error, absl::StrCat("mincore of ", path));
  return std::count_if(in_core.begin(), in_core.end(), [](unsigned char c) { return c & 1; }) * page;
}

// Drops `path`'s pages from the host's page cache, written back first so
// that none stays behind dirty: the next read of them goes to the disk.
absl::Status DropFromHostCache(const std::string& path) {
  absl::StatusOr<ScopedFd> fd = OpenReadOnly(path);
  if (!fd.ok()) return fd.status();
  if (fdatasync(fd->get()) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("fdatasync of ", path));
  if (int err = posix_fadvise(fd->get(), 0, 0, POSIX_FADV_DONTNEED); err != 0) {
    return absl::ErrnoToStatus(err, absl::StrCat("POSIX_FADV_DONTNEED of ", path));
  }
  return absl::OkStatus();
}

// A SEEK_DATA that finds data has the host read that data ahead, as the
// caller (cp --sparse, qemu-img convert) reads it next: after an lseek
// alone, the image's bytes of the data found are in the host's page cache.
TEST_F(MountOptionsTest, SeekDataReadsTheDataFoundAhead) {
  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  ASSERT_OK(CreateImage(image, "qcow2", 64 * kMiB));
  // 8 MiB first, so the data at 32 MiB lies far from the metadata the
  // mount reads (and what the host reads ahead of that).
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x11 0 8M", "write -P 0x22 32M 1M"}));
  ASSERT_OK_AND_ASSIGN(std::vector<MapExtent> map, MapImage(image));
  std::optional<uint64_t> host;
  for (const MapExtent& e : map) {
    if (e.start == 32 * kMiB && e.data && e.offset) host = *e.offset;
  }
  ASSERT_TRUE(host.has_value()) << "no data extent at 32 MiB";
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted, MountedView::Start(ViewOptions(image, view, {})));
  ASSERT_OK(DropFromHostCache(image));
  ASSERT_OK_AND_ASSIGN(uint64_t before, ResidentBytes(image, *host, kMiB));
  if (before != 0) GTEST_SKIP() << "the image's file system keeps it in memory (tmpfs?)";
  ScopedFd fd(open(view.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_GE(fd.get(), 0) << strerror(errno);
  ASSERT_EQ(lseek(fd.get(), 16 * kMiB, SEEK_DATA), static_cast<off_t>(32 * kMiB));
  uint64_t resident = 0;
  for (int i = 0; i < 300 && resident < kMiB; ++i) {
    ASSERT_OK_AND_ASSIGN(resident, ResidentBytes(image, *host, kMiB));
    if (resident < kMiB) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(resident, kMiB) << "the data SEEK_DATA found was not read ahead";
  fd.Reset();
  ASSERT_OK(mounted->Unmount());
}

// After storing the next run, a SEEK_HOLE from data of a read-only view has
// the host read the runs after that one, so that the disk is busy ahead of
// the reader (cp --sparse) rather than one run at a time; as the reader
// moves on, the runs further on, up to 64 runs (small runs) or 8 MiB of
// data (large ones) past it, and not beyond. Nothing under
// -o prefill_runs=off. The runs are written last first, so that each lies
// before the one in front of it in the image file and the host's own
// read-ahead behind a run never reaches the next.
TEST_F(MountOptionsTest, SeekHoleFromDataHasTheHostReadTheRunsAfterTheNext) {
  struct Case {
    uint64_t run;  // bytes per run
    int runs;
    int ahead;  // runs the advice reaches past the run after the reader's
  };
  for (const Case& c : {Case{64 * kKiB, 100, 64}, Case{256 * kKiB, 64, 32}}) {
    SCOPED_TRACE(absl::StrCat(c.runs, " runs of ", c.run >> 10, " KiB"));
    auto run_at = [](int i) { return (1 + 2 * static_cast<uint64_t>(i)) * kMiB; };
    const std::string image = Path(absl::StrCat("disk", c.run, ".qcow2"));
    const std::string view = Path("view.raw");
    ASSERT_OK(CreateImage(image, "qcow2", 256 * kMiB));
    std::vector<std::string> writes;
    for (int i = c.runs - 1; i >= 0; --i) {
      writes.push_back(absl::StrFormat("write -P %d %u %u", i + 1, run_at(i), c.run));
    }
    ASSERT_OK(QemuIo(image, "qcow2", writes));
    ASSERT_OK_AND_ASSIGN(std::vector<MapExtent> map, MapImage(image));
    std::vector<uint64_t> host(c.runs);
    for (int i = 0; i < c.runs; ++i) {
      auto e = std::find_if(map.begin(), map.end(), [&](const MapExtent& e) { return e.start == run_at(i); });
      ASSERT_TRUE(e != map.end() && e->data && e->offset && e->length == c.run) << "run " << i << " is not one extent";
      host[i] = *e->offset;
    }
    auto resident = [&](int i) {
      absl::StatusOr<uint64_t> bytes = ResidentBytes(image, host[i], c.run);
      EXPECT_OK(bytes.status());
      return bytes.value_or(0);
    };
    // Waits (at most 3 s) until run i is read into the host's page cache.
    auto comes_in = [&](int i) {
      for (int t = 0; t < 300; ++t) {
        if (resident(i) == c.run) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      return false;
    };
    for (const bool prefill : {true, false}) {
      SCOPED_TRACE(prefill ? "prefill_runs=on" : "prefill_runs=off");
      ASSERT_OK_AND_ASSIGN(
          std::unique_ptr<MountedView> mounted,
          MountedView::Start(ViewOptions(image, view, {prefill ? "prefill_runs=on" : "prefill_runs=off"})));
      ASSERT_OK(DropFromHostCache(image));
      if (resident(2) != 0) GTEST_SKIP() << "the image's file system keeps it in memory (tmpfs?)";
      ScopedFd fd(open(view.c_str(), O_RDONLY | O_CLOEXEC));
      ASSERT_GE(fd.get(), 0) << strerror(errno);
      ASSERT_EQ(lseek(fd.get(), run_at(0), SEEK_HOLE), static_cast<off_t>(run_at(0) + c.run));
      if (!prefill) {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        EXPECT_EQ(resident(2), 0u) << "the run after the next was read without prefill_runs";
      } else {
        EXPECT_TRUE(comes_in(2)) << "the run after the next was not read ahead";
        EXPECT_TRUE(comes_in(4));
        EXPECT_EQ(resident(c.runs - 1), 0u) << "a run far past the reader was read ahead";
        // The reader goes on, run by run, as cp does, taking a while over
        // each run as cp does to write it out (the daemon tops the advice
        // up meanwhile): the advice keeps ahead of it up to its bound.
        // cp's two seeks from the end of run i - 1: where run i starts, and
        // where it ends.
        auto step_to = [&](int i) {
          EXPECT_EQ(lseek(fd.get(), run_at(i - 1) + c.run, SEEK_DATA), static_cast<off_t>(run_at(i)));
          EXPECT_EQ(lseek(fd.get(), run_at(i), SEEK_HOLE), static_cast<off_t>(run_at(i) + c.run));
        };
        constexpr int kReader = 20;
        for (int i = 1; i <= kReader; ++i) {
          step_to(i);
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        const int bound = kReader + 1 + c.ahead;
        EXPECT_TRUE(comes_in(bound - 2)) << "the advice did not reach " << c.ahead << " runs ahead";
        for (int i = bound + 2; i < c.runs; ++i) EXPECT_EQ(resident(i), 0u) << "run " << i << " was read ahead";
        // To the last run.
        for (int i = kReader + 1; i < c.runs - 1; ++i) step_to(i);
        EXPECT_TRUE(comes_in(c.runs - 1)) << "the advice did not follow the reader to the last run";
      }
      fd.Reset();
      ASSERT_OK(mounted->Unmount());
      if (prefill) {
        EXPECT_TRUE(absl::StrContains(mounted->ReadLog(), "runs the host was advised to read ahead: "))
            << mounted->ReadLog();
      }
    }
  }
}

// A SEEK_HOLE that starts in data of a read-only view puts that run in the
// view's page cache before it answers, and the next run after answering:
// reads of both (cp --sparse reads each run right after its SEEK_HOLE)
// reach no daemon, no READ in libfuse's trace. Not the run after those,
// and nothing where the view can change, under -o prefill_runs=off, or
// with a single thread (a store may wait for a READ that another thread
// answers). Runs stored in one piece of the image file are spliced from it
// (spliced_reply.h), and stored from a buffer under -o splice_reads=off;
// compressed runs always are.
TEST_F(MountOptionsTest, SeekHoleFromDataPutsTheRunAndTheNextInThePageCache) {
  constexpr uint64_t kDisk = 64 * kMiB;
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  const std::string view = Path("view.raw");
  ASSERT_OK(CreateImage(image, "qcow2", kDisk));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x11 4M 256k", "write -P 0x22 20M 512k", "write -P 0x33 40M 64k"}));
  ASSERT_OK(ConvertToRaw(image, twin));
  ASSERT_OK_AND_ASSIGN(std::string expected, ReadFile(twin));
  struct Case {
    std::vector<std::string> options;
    bool read_only;
    bool prefills;
    bool spliced = false;
  };
  for (const Case& c : std::vector<Case>{{{"debug"}, true, true, true},
                                         {{"debug", "splice_reads=off"}, true, true, false},
                                         {{"debug", "prefill_runs=off"}, true, false},
                                         {{"debug", "threads=1"}, true, false},
                                         {{"debug"}, false, false}}) {
    SCOPED_TRACE(absl::StrCat(c.read_only ? "ro," : "rw,", absl::StrJoin(c.options, ",")));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted,
                         MountedView::Start(ViewOptions(image, view, c.options, c.read_only)));
    {
      ScopedFd fd(open(view.c_str(), O_RDONLY | O_CLOEXEC));
      ASSERT_GE(fd.get(), 0) << strerror(errno);
      auto cached = [&](uint64_t at, uint64_t length) {
        absl::StatusOr<size_t> pages = PagesInCache(fd.get(), at, length);
        EXPECT_OK(pages.status());
        return pages.value_or(0);
      };
      ASSERT_EQ(cached(4 * kMiB, 256 * kKiB), 0u);
      ASSERT_EQ(lseek(fd.get(), 4 * kMiB, SEEK_HOLE), static_cast<off_t>(4 * kMiB + 256 * kKiB));
      // Stored before the answer.
      EXPECT_EQ(cached(4 * kMiB, 256 * kKiB), c.prefills ? 64u : 0u);
      if (c.prefills) {
        // Stored after the answer, while the reader goes on.
        size_t next = 0;
        for (int i = 0; i < 1000 && next < 128; ++i) {
          next = cached(20 * kMiB, 512 * kKiB);
          if (next < 128) std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        EXPECT_EQ(next, 128u) << "the next run was not put in the page cache";
        EXPECT_EQ(cached(40 * kMiB, 64 * kKiB), 0u);
        const size_t reads = TracedRequests(mounted->ReadLog(), "READ");
        for (const auto& [at, length] : {std::pair{4 * kMiB, 256 * kKiB}, std::pair{20 * kMiB, 512 * kKiB}}) {
          std::string got(length, '\0');
          ASSERT_EQ(pread(fd.get(), got.data(), length, at), static_cast<ssize_t>(length)) << strerror(errno);
          EXPECT_TRUE(got == expected.substr(at, length)) << "the bytes at " << at << " are not the image's";
        }
        EXPECT_EQ(TracedRequests(mounted->ReadLog(), "READ"), reads) << "a read of a stored run reached the daemon";
      }
    }
    ASSERT_OK(mounted->Unmount());
    const std::string log = mounted->ReadLog();
    EXPECT_EQ(absl::StrContains(log, "runs of data put in the view's page cache"), c.prefills) << log;
    EXPECT_EQ(absl::StrContains(log, absl::StrFormat("page cache ahead of their reader: 2 (768 KiB; %d spliced from",
                                                     c.spliced ? 2 : 0)),
              c.prefills)
        << log;
  }
  // Compressed runs too: the worker that stores waits for their inflating.
  const std::string compressed = Path("compressed.qcow2");
  ASSERT_OK(ConvertImage(image, "qcow2", compressed, "qcow2", {"-c"}));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted,
                         MountedView::Start(ViewOptions(compressed, view, {})));
    ScopedFd fd(open(view.c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_GE(fd.get(), 0) << strerror(errno);
    ASSERT_EQ(lseek(fd.get(), 20 * kMiB, SEEK_HOLE), static_cast<off_t>(20 * kMiB + 512 * kKiB));
    ASSERT_OK_AND_ASSIGN(const size_t cached, PagesInCache(fd.get(), 20 * kMiB, 512 * kKiB));
    EXPECT_EQ(cached, 128u) << "the compressed run was not put in the page cache";
    std::string got(512 * kKiB, '\0');
    ASSERT_EQ(pread(fd.get(), got.data(), got.size(), 20 * kMiB), static_cast<ssize_t>(got.size())) << strerror(errno);
    EXPECT_TRUE(got == expected.substr(20 * kMiB, got.size())) << "the compressed run's bytes are not the image's";
    fd.Reset();
    ASSERT_OK(mounted->Unmount());
    EXPECT_TRUE(absl::StrContains(mounted->ReadLog(), " KiB; 0 spliced from the image file)")) << mounted->ReadLog();
  }
  // The whole view, as cp --sparse reads it, is the image's.
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted, MountedView::Start(ViewOptions(image, view, {})));
  const std::string copy = Path("copy.raw");
  ASSERT_OK(RunChecked({"cp", "--sparse=always", view, copy}));
  ASSERT_OK(mounted->Unmount());
  EXPECT_OK(CompareFiles(copy, twin));
  EXPECT_TRUE(absl::StrContains(mounted->ReadLog(), "runs of data put in the view's page cache"))
      << mounted->ReadLog();
}

// The host reads the image ahead of a sequential reader of the view: here
// three 64 KiB O_DIRECT reads (no readahead of the view's own) at the start
// of a 32 MiB image whose every cluster holds data, on an ext4 whose disk
// reads ahead 16 MiB. The reads alone bring little of the image into the
// host's page cache (the host's readahead starts small); by default the
// daemon has the host read 16 MiB further, as far as the disk reads ahead,
// -o image_readahead sets how far, and 0 turns it off.
TEST_F(MountOptionsTest, ImageReadaheadReadsTheImageAheadOfASequentialReader) {
  if (const std::string why = LoopUnavailableReason(); !why.empty()) GTEST_SKIP() << why;
  ASSERT_OK_AND_ASSIGN(LoopExt4 ext4, MakeLoopExt4());
  ASSERT_OK(WriteFileAt(ext4.knob, 0, "16384\n"));
  const std::string image = ext4.dir + "/disk.qcow2";
  ASSERT_OK(CreateImage(image, "qcow2", 32 * kMiB));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x5a 0 32M"}));
  struct Case {
    std::vector<std::string> options;
    uint64_t at_least;  // bytes of the image in the page cache after the reads
    uint64_t below;
  };
  for (const Case& c : std::vector<Case>{{{"ro"}, 16 * kMiB, 64 * kMiB},
                                         {{"ro", "image_readahead=8M"}, 8 * kMiB, 14 * kMiB},
                                         {{"ro", "image_readahead=0"}, 0, 6 * kMiB}}) {
    SCOPED_TRACE(absl::StrJoin(c.options, ","));
    // Out of the page cache: written back, then dropped.
    {
      const int fd = open(image.c_str(), O_RDONLY | O_CLOEXEC);
      ASSERT_GE(fd, 0);
      EXPECT_EQ(fdatasync(fd), 0);
      EXPECT_EQ(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
      close(fd);
    }
    const std::string view = Path("view.raw");
    const std::string pidfile = Path("pid");
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, c.options));
    ASSERT_TRUE(run.status.success()) << run.Describe();
    {
      const int fd = open(view.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
      ASSERT_GE(fd, 0);
      void* buf = nullptr;
      ASSERT_EQ(posix_memalign(&buf, 4096, 64 * 1024), 0);
      for (int i = 0; i < 3; ++i) {
        EXPECT_EQ(pread(fd, buf, 64 * 1024, i * 64 * 1024), 64 * 1024);
        EXPECT_EQ(static_cast<unsigned char*>(buf)[0], 0x5a);
      }
      free(buf);
      close(fd);
    }
    // The host's reads ahead end a moment after the advice.
    uint64_t resident = 0;
    for (int i = 0; i < 50; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      ASSERT_OK_AND_ASSIGN(resident, ResidentBytes(image));
      if (c.at_least > 0 && resident >= c.at_least) break;
    }
    EXPECT_GE(resident, c.at_least);
    EXPECT_LT(resident, c.below);
    UnmountWithU(view, guard);
  }
  EXPECT_OK(CheckImage(image));
  ASSERT_OK(ext4.mounted->Unmount());
}

// libfuse takes its options as one comma-separated list: an image path with
// a comma or a backslash must reach it escaped.
TEST_F(MountOptionsTest, ImagePathWithACommaMounts) {
  const std::string image = Path("a,b\\c.qcow2");
  const std::string twin = Path("twin.raw");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("pid");
  MakeImage(image, twin);
  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult run, StartDaemon(image, view, pidfile, {"ro"}));
  ASSERT_TRUE(run.status.success()) << run.Describe();
  EXPECT_OK(CompareFiles(view, twin));
  UnmountWithU(view, guard);
}

}  // namespace
}  // namespace qcow2fuse::test::cli
