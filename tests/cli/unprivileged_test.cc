// qcow2fuse as a plain user runs it: the owner of an image mounts it
// read-only or read-write, reads and writes the view, and unmounts it with
// `qcow2fuse -u` or `fusermount3 -u`, all without root (issue 12, item 3).
//
// The test itself runs as root, to set up what a Debian 12 machine has and
// this container lacks, and runs every step that matters as the user:
//
//  * a user, `qcow2fuse-test` (useradd, if missing; userdel -r afterwards,
//    if the test made it);
//  * /dev/fuse mode 0666 (Debian's udev rule; with no udev it is 0600
//    here): libfuse opens it as the user, before fusermount3 mounts;
//  * a scratch directory (0755) and images owned by the user;
//  * commands run as `setpriv --reuid=U --regid=U --init-groups
//    --reset-env -- ...`, so the user's qcow2fuse mounts through the setuid
//    fusermount3, as it would from a login shell;
//  * for -o allow_other, an /etc/fuse.conf with and without
//    `user_allow_other`.
//
// Everything changed is put back when the test ends, however it ends:
// every view is unmounted and its daemon waited for (DaemonGuard), then
// /etc/fuse.conf and the mode of /dev/fuse are restored and the user
// removed (RAII members of the fixture). The tests take a lock file for
// that whole time, so that two of them run by `ctest --parallel` never
// restore a mode or a file under the other's feet.
//
// QEMU is the oracle, run as root: qemu-img convert for the expected
// contents, check and compare after the writes.
//
// The test skips, saying why, where it cannot run: not root (no
// CAP_SETUID, CAP_SETGID, CAP_CHOWN or CAP_SYS_ADMIN), no_new_privs (the
// setuid fusermount3 would not be root), no setpriv/useradd/userdel, a
// fusermount3 that is not setuid root, or a binary or scratch directory the
// user cannot reach. With QCOW2FUSE_REQUIRE_UNPRIVILEGED_TEST=1 (for CI) a
// reason to skip is a failure instead.

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
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
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test::cli {
namespace {

constexpr char kUserName[] = "qcow2fuse-test";
constexpr char kDevFuse[] = "/dev/fuse";
constexpr char kFuseConf[] = "/etc/fuse.conf";
// Held (flock) by a test from its set-up to its end; see the top comment.
constexpr char kLockPath[] = "/tmp/qcow2fuse-unprivileged-test.lock";
constexpr uint64_t kDiskSize = 32 * kMiB;
constexpr std::chrono::seconds kDaemonExit(30);

bool Exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

// CI sets this so that a machine that cannot run the test fails it
// instead of skipping it.
bool RunIsRequired() {
  const char* value = getenv("QCOW2FUSE_REQUIRE_UNPRIVILEGED_TEST");
  return value != nullptr && *value != '\0' && std::string(value) != "0";
}

// `name` as root would run it: $PATH, then the sbin directories (useradd,
// losetup), which a plain user's PATH lacks. Empty if not found.
std::string FindProgram(const std::string& name) {
  std::vector<std::string> dirs;
  if (const char* path = getenv("PATH"); path != nullptr) {
    dirs = absl::StrSplit(path, ':', absl::SkipEmpty());
  }
  for (const char* dir : {"/usr/sbin", "/sbin", "/usr/bin", "/bin"}) dirs.push_back(dir);
  for (const std::string& dir : dirs) {
    const std::string candidate = absl::StrCat(dir, "/", name);
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// The NoNewPrivs flag of this process: with it, exec of the setuid
// fusermount3 does not make it root, and a plain user cannot mount.
bool NoNewPrivs() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "NoNewPrivs:")) {
      return absl::StripAsciiWhitespace(line.substr(11)) != "0";
    }
  }
  return false;
}

// Why this process cannot run a test as a plain user, or empty if it can.
std::string WhyRootSetUpIsUnavailable() {
  struct Needed {
    int cap;
    const char* name;
  };
  for (const Needed& needed : {Needed{CAP_SETUID, "CAP_SETUID"}, Needed{CAP_SETGID, "CAP_SETGID"},
                               Needed{CAP_CHOWN, "CAP_CHOWN"}, Needed{CAP_SYS_ADMIN, "CAP_SYS_ADMIN"}}) {
    if (!HasEffectiveCapability(needed.cap)) {
      return absl::StrCat("this process lacks ", needed.name,
                          " (run the tests as root to cover a plain user's mounts)");
    }
  }
  if (NoNewPrivs()) {
    return "this process runs with no_new_privs: the setuid fusermount3 would not be root for the user";
  }
  for (const char* program : {"setpriv", "useradd", "userdel", "fusermount3"}) {
    if (FindProgram(program).empty()) return absl::StrCat(program, " is not installed");
  }
  struct stat st;
  if (stat("/usr/bin/fusermount3", &st) != 0 || st.st_uid != 0 || (st.st_mode & S_ISUID) == 0) {
    return "/usr/bin/fusermount3 (which libfuse runs) is missing or not setuid root";
  }
  if (stat(kDevFuse, &st) != 0 || !S_ISCHR(st.st_mode)) {
    return absl::StrCat(kDevFuse, " is missing");
  }
  return "";
}

// An exclusive flock on kLockPath for the life of the object.
class ScopedLock {
 public:
  static absl::StatusOr<std::unique_ptr<ScopedLock>> Acquire(const std::string& path) {
    const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return absl::InternalError(absl::StrCat("open ", path, ": ", strerror(errno)));
    while (flock(fd, LOCK_EX) != 0) {
      if (errno != EINTR) {
        const int error = errno;
        close(fd);
        return absl::InternalError(absl::StrCat("flock ", path, ": ", strerror(error)));
      }
    }
    return std::unique_ptr<ScopedLock>(new ScopedLock(fd));
  }
  ScopedLock(const ScopedLock&) = delete;
  ScopedLock& operator=(const ScopedLock&) = delete;
  ~ScopedLock() { close(fd_); }

 private:
  explicit ScopedLock(int fd) : fd_(fd) {}
  const int fd_;
};

// The test user: an existing account of that name, or one made with
// useradd and removed again (userdel -r) on destruction.
class TestUser {
 public:
  static absl::StatusOr<std::unique_ptr<TestUser>> Ensure(const std::string& name) {
    bool created = false;
    if (getpwnam(name.c_str()) == nullptr) {
      absl::StatusOr<std::string> added =
          RunChecked({FindProgram("useradd"), "--create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                      "--comment", "qcow2fuse tests (tests/cli/unprivileged_test.cc)", name});
      if (!added.ok()) return added.status();
      created = true;
    }
    const passwd* pw = getpwnam(name.c_str());
    if (pw == nullptr) return absl::InternalError(absl::StrCat("no user ", name, " after useradd"));
    if (pw->pw_uid == 0) return absl::FailedPreconditionError(absl::StrCat("user ", name, " has uid 0"));
    return std::unique_ptr<TestUser>(new TestUser(name, pw->pw_uid, pw->pw_gid, created));
  }
  TestUser(const TestUser&) = delete;
  TestUser& operator=(const TestUser&) = delete;
  ~TestUser() {
    if (!created_) return;
    // Fails while a process of the user is left: a daemon the test could
    // not end, which the failure message then names.
    absl::StatusOr<std::string> deleted = RunChecked({FindProgram("userdel"), "-r", name_});
    if (!deleted.ok()) ADD_FAILURE() << "removing the test user: " << deleted.status();
  }

  const std::string& name() const { return name_; }
  uid_t uid() const { return uid_; }
  gid_t gid() const { return gid_; }

 private:
  TestUser(std::string name, uid_t uid, gid_t gid, bool created)
      : name_(std::move(name)), uid_(uid), gid_(gid), created_(created) {}

  const std::string name_;
  const uid_t uid_;
  const gid_t gid_;
  const bool created_;
};

// A file's permission bits, restored on destruction.
class ScopedMode {
 public:
  static absl::StatusOr<std::unique_ptr<ScopedMode>> Set(const std::string& path, mode_t mode) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) return absl::InternalError(absl::StrCat("stat ", path, ": ", strerror(errno)));
    std::unique_ptr<ScopedMode> saved(new ScopedMode(path, st.st_mode & 07777));
    if (chmod(path.c_str(), mode) != 0) {
      return absl::InternalError(absl::StrCat("chmod ", path, ": ", strerror(errno)));
    }
    return saved;
  }
  ScopedMode(const ScopedMode&) = delete;
  ScopedMode& operator=(const ScopedMode&) = delete;
  ~ScopedMode() {
    if (chmod(path_.c_str(), mode_) != 0) {
      ADD_FAILURE() << "restoring the mode of " << path_ << ": " << strerror(errno);
    }
  }

 private:
  ScopedMode(std::string path, mode_t mode) : path_(std::move(path)), mode_(mode) {}
  const std::string path_;
  const mode_t mode_;
};

// /etc/fuse.conf as the test needs it; on destruction the original bytes
// and mode come back (or the file goes, if there was none). Written in
// place, never renamed over, so a bind-mounted file works too.
class ScopedFuseConf {
 public:
  static absl::StatusOr<std::unique_ptr<ScopedFuseConf>> Save(const std::string& path) {
    std::unique_ptr<ScopedFuseConf> saved(new ScopedFuseConf(path));
    struct stat st;
    if (stat(path.c_str(), &st) == 0) {
      absl::StatusOr<std::string> text = ReadFile(path);
      if (!text.ok()) return text.status();
      saved->original_ = *std::move(text);
      saved->mode_ = st.st_mode & 07777;
    } else if (errno != ENOENT) {
      return absl::InternalError(absl::StrCat("stat ", path, ": ", strerror(errno)));
    }
    return saved;
  }
  ScopedFuseConf(const ScopedFuseConf&) = delete;
  ScopedFuseConf& operator=(const ScopedFuseConf&) = delete;
  ~ScopedFuseConf() {
    if (!written_) return;
    absl::Status restored = original_ ? Write(*original_) : absl::OkStatus();
    if (!original_ && unlink(path_.c_str()) != 0) {
      restored = absl::InternalError(absl::StrCat("unlink: ", strerror(errno)));
    }
    if (original_ && restored.ok() && chmod(path_.c_str(), mode_) != 0) {
      restored = absl::InternalError(absl::StrCat("chmod: ", strerror(errno)));
    }
    if (!restored.ok()) ADD_FAILURE() << "restoring " << path_ << ": " << restored;
  }

  // The original settings, with `user_allow_other` on a line of its own
  // or with no such line.
  absl::Status SetUserAllowOther(bool allow) {
    std::string text;
    if (original_) {
      for (absl::string_view line : absl::StrSplit(*original_, '\n', absl::SkipEmpty())) {
        if (absl::StripAsciiWhitespace(line) == "user_allow_other") continue;
        absl::StrAppend(&text, line, "\n");
      }
    }
    if (allow) absl::StrAppend(&text, "user_allow_other\n");
    written_ = true;
    return Write(text);
  }

 private:
  explicit ScopedFuseConf(std::string path) : path_(std::move(path)) {}

  absl::Status Write(const std::string& text) {
    const int fd = open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return absl::InternalError(absl::StrCat("open ", path_, ": ", strerror(errno)));
    const ssize_t n = write(fd, text.data(), text.size());
    const int error = errno;
    close(fd);
    if (n != static_cast<ssize_t>(text.size())) {
      return absl::InternalError(absl::StrCat("write ", path_, ": ", n < 0 ? strerror(error) : "short write"));
    }
    return absl::OkStatus();
  }

  const std::string path_;
  std::optional<std::string> original_;
  mode_t mode_ = 0644;
  bool written_ = false;
};

// Whether any open file description holds one of QEMU's lock bytes (100
// to 299, see engine/io/image_lock.h) of `image`: F_OFD_GETLK asks for the
// conflicts an exclusive lock would have, without taking it.
absl::StatusOr<bool> ImageIsLocked(const std::string& image) {
  absl::StatusOr<ScopedFd> fd = OpenReadOnly(image);
  if (!fd.ok()) return fd.status();
  struct flock probe = {};
  probe.l_type = F_WRLCK;
  probe.l_whence = SEEK_SET;
  probe.l_start = 100;
  probe.l_len = 200;
  if (fcntl(fd->get(), F_OFD_GETLK, &probe) != 0) {
    return absl::InternalError(absl::StrCat("F_OFD_GETLK on ", image, ": ", strerror(errno)));
  }
  return probe.l_type != F_UNLCK;
}

// The real and effective uid of process `pid` (the Uid: line of its status).
absl::StatusOr<std::pair<uid_t, uid_t>> ProcessUids(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (!absl::StartsWith(line, "Uid:")) continue;
    std::vector<std::string> fields = absl::StrSplit(line.substr(4), '\t', absl::SkipWhitespace());
    uint32_t real = 0, effective = 0;
    if (fields.size() < 2 || !absl::SimpleAtoi(fields[0], &real) || !absl::SimpleAtoi(fields[1], &effective)) {
      return absl::InternalError(absl::StrCat("cannot parse: ", line));
    }
    return std::make_pair(static_cast<uid_t>(real), static_cast<uid_t>(effective));
  }
  return absl::NotFoundError(absl::StrCat("no Uid: line for pid ", pid));
}

// The processes of `uid` (real uid), after reaping every child of ours
// that has exited: as the subreaper, the test inherits the user's daemons,
// and also the daemon of a refused mount, whose pid it never learns.
std::vector<std::string> ProcessesOf(uid_t uid) {
  while (waitpid(-1, nullptr, WNOHANG) > 0) {
  }
  std::vector<std::string> found;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return found;
  while (dirent* entry = readdir(proc)) {
    int pid = 0;
    if (!absl::SimpleAtoi(entry->d_name, &pid)) continue;
    absl::StatusOr<std::pair<uid_t, uid_t>> uids = ProcessUids(pid);
    if (!uids.ok() || uids->first != uid) continue;
    std::string command;
    std::getline(std::ifstream(absl::StrCat("/proc/", pid, "/cmdline")), command);
    std::replace(command.begin(), command.end(), '\0', ' ');
    found.push_back(absl::StrCat(pid, " ", command));
  }
  closedir(proc);
  return found;
}

class UnprivilegedTest : public TempDirTest {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(TempDirTest::SetUp());
    if (std::string why = WhyRootSetUpIsUnavailable(); !why.empty()) {
      ASSERT_FALSE(RunIsRequired()) << why << " (and QCOW2FUSE_REQUIRE_UNPRIVILEGED_TEST is set)";
      GTEST_SKIP() << why;
    }
    setpriv_ = FindProgram("setpriv");
    ASSERT_OK_AND_ASSIGN(lock_, ScopedLock::Acquire(kLockPath));
    ASSERT_OK_AND_ASSIGN(user_, TestUser::Ensure(kUserName));
    // The scratch directory becomes the user's: qcow2fuse creates the
    // mountpoint file and the pidfile in it, as the user.
    ASSERT_EQ(chown(dir_->path().c_str(), user_->uid(), user_->gid()), 0) << strerror(errno);
    ASSERT_EQ(chmod(dir_->path().c_str(), 0755), 0) << strerror(errno);
    if (std::string why = WhyUserCannotRun(); !why.empty()) {
      ASSERT_FALSE(RunIsRequired()) << why << " (and QCOW2FUSE_REQUIRE_UNPRIVILEGED_TEST is set)";
      GTEST_SKIP() << why;
    }
    ASSERT_OK_AND_ASSIGN(dev_fuse_, ScopedMode::Set(kDevFuse, 0666));
  }

  void TearDown() override {
    // The test body's guards have run by now: no process of the user may
    // be left (beyond a moment to exit), and nothing mounted.
    if (user_ != nullptr) {
      std::vector<std::string> left = ProcessesOf(user_->uid());
      for (const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
           !left.empty() && std::chrono::steady_clock::now() < deadline;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        left = ProcessesOf(user_->uid());
      }
      EXPECT_TRUE(left.empty()) << "processes of " << kUserName << " still running after the test:\n"
                                << absl::StrJoin(left, "\n");
    }
    if (dir_ != nullptr) {
      absl::StatusOr<std::vector<MountEntry>> table = ReadMountInfo();
      ASSERT_OK(table);
      for (const MountEntry& entry : *table) {
        EXPECT_FALSE(absl::StartsWith(entry.mount_point, dir_->path() + "/"))
            << "still mounted after the test: " << entry.mount_point;
      }
    }
  }

  // Why the user cannot run the binary under test or use the scratch
  // directory (a directory on the way that is not world-searchable), or
  // empty if they can.
  std::string WhyUserCannotRun() {
    absl::StatusOr<RunResult> run = AsUser({"true"});
    if (!run.ok() || !run->status.success()) {
      return absl::StrCat("cannot run a command as ", kUserName, " with setpriv: ",
                          run.ok() ? run->Describe() : run.status().ToString());
    }
    run = AsUser({"test", "-x", Binary()});
    if (!run.ok() || !run->status.success()) {
      return absl::StrCat("user ", kUserName, " cannot execute ", Binary(),
                          ": every directory on its path must be searchable by others (chmod o+x)");
    }
    run = AsUser({"test", "-w", dir_->path()});
    if (!run.ok() || !run->status.success()) {
      return absl::StrCat("user ", kUserName, " cannot reach the scratch directory ", dir_->path(),
                          ": every directory above it must be searchable by others (or set TMPDIR)");
    }
    return "";
  }

  // Runs `argv` as the test user, in the scratch directory.
  absl::StatusOr<RunResult> AsUser(const std::vector<std::string>& argv, RunOptions options = {}) const {
    std::vector<std::string> full = {setpriv_,
                                     absl::StrCat("--reuid=", user_->uid()),
                                     absl::StrCat("--regid=", user_->gid()),
                                     "--init-groups",
                                     "--reset-env",
                                     "--"};
    full.insert(full.end(), argv.begin(), argv.end());
    if (options.cwd.empty()) options.cwd = dir_->path();
    return RunBounded(full, options);
  }

  absl::Status GiveToUser(const std::string& path) const {
    if (chown(path.c_str(), user_->uid(), user_->gid()) != 0) {
      return absl::InternalError(absl::StrCat("chown ", path, ": ", strerror(errno)));
    }
    return absl::OkStatus();
  }

  // A qcow2 image owned by the user, with data, a compressed cluster, a
  // zeroed range and holes; and, as root, its contents per qemu-img.
  void MakeImage(const std::string& image, const std::string& reference) {
    ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
    ASSERT_OK(QemuIo(image, "qcow2",
                     {qemu_io_cmd::W(0x11, 0, 64 * kKiB), qemu_io_cmd::W(0x22, kMiB, 4 * kKiB),
                      qemu_io_cmd::Zero(2 * kMiB, 64 * kKiB), qemu_io_cmd::Compressed(0x33, 4 * kMiB, 64 * kKiB),
                      qemu_io_cmd::W(0x44, kDiskSize - kMiB, kMiB)}));
    ASSERT_OK(GiveToUser(image));
    ASSERT_OK(ConvertToRaw(image, reference));
  }

  // `qcow2fuse [-o OPTIONS] --pidfile PIDFILE IMAGE VIEW` as the user.
  absl::StatusOr<RunResult> MountAsUser(const std::string& image, const std::string& view, const std::string& pidfile,
                                        const std::string& options, const std::string& watch = "") const {
    // The daemon's log, for failure messages (LogOf).
    std::vector<std::string> argv = {Binary(), "-o",
                                     absl::StrCat(options, options.empty() ? "" : ",", "log=", view, ".log")};
    argv.insert(argv.end(), {"--pidfile", pidfile, image, view});
    RunOptions run_options;
    run_options.timeout = std::chrono::seconds(30);
    run_options.watch_mountpoint = watch;
    return AsUser(argv, run_options);
  }

  // The log of the daemon serving `view`, for failure messages.
  static std::string LogOf(const std::string& view) {
    absl::StatusOr<std::string> text = ReadFile(view + ".log");
    return absl::StrCat("--- daemon log ---\n", text.ok() ? *text : std::string(text.status().message()),
                        "--- end of log ---\n");
  }

  // The view is the user's mount: served by qcow2fuse under its own type,
  // mounted in the user's name (user_id=, which lets them unmount it), by a
  // daemon running as the user.
  void ExpectUsersView(const std::string& view, pid_t pid) const {
    EXPECT_EQ(MountedFsType(view).value_or("(not mounted)"), "fuse.qcow2fuse");
    std::optional<std::vector<std::string>> options = MountSuperOptions(view);
    ASSERT_TRUE(options.has_value()) << view << " is not mounted";
    EXPECT_TRUE(std::find(options->begin(), options->end(), absl::StrCat("user_id=", user_->uid())) !=
                options->end())
        << "super options: " << absl::StrJoin(*options, ",");
    absl::StatusOr<std::pair<uid_t, uid_t>> uids = ProcessUids(pid);
    ASSERT_OK(uids);
    EXPECT_EQ(uids->first, user_->uid());
    EXPECT_EQ(uids->second, user_->uid());
  }

  // What a qcow2fuse -u (which waits) or a fusermount3 -u (then a wait
  // here) must leave: no mount, no daemon (reaped with exit code 0), no
  // pidfile, no mountpoint file (qcow2fuse created it), no image lock.
  void ExpectEnded(DaemonGuard& guard, const std::string& image, const std::string& view, const std::string& pidfile,
                   pid_t pid, std::chrono::milliseconds wait) const {
    PidGone gone = WaitForPidGone(pid, wait);
    ASSERT_TRUE(gone.gone) << "daemon pid " << pid << " still running";
    guard.Forget();
    if (gone.status) {
      EXPECT_TRUE(gone.status->success()) << "the daemon ended with " << gone.status->ToString();
    }
    EXPECT_FALSE(IsMounted(view));
    EXPECT_FALSE(Exists(pidfile)) << "the daemon left its pidfile";
    EXPECT_FALSE(Exists(view)) << "the mountpoint file qcow2fuse created is still there";
    absl::StatusOr<bool> locked = ImageIsLocked(image);
    ASSERT_OK(locked);
    EXPECT_FALSE(*locked) << "a lock byte of " << image << " is still held";
  }

  // Dropped in this order after the test body (and its DaemonGuards): the
  // fuse.conf comes back, /dev/fuse gets its mode, the user goes, and the
  // lock is released.
  std::unique_ptr<ScopedLock> lock_;
  std::unique_ptr<TestUser> user_;
  std::unique_ptr<ScopedMode> dev_fuse_;
  std::unique_ptr<ScopedFuseConf> fuse_conf_;
  std::string setpriv_;
};

// Read-only: the user mounts their image, reads all of it, and ends the
// view with `qcow2fuse -u`, which returns once the daemon is gone and the
// image free again.
TEST_F(UnprivilegedTest, UserMountsReadOnlyReadsAndUnmountsWithQcow2fuseU) {
  const std::string image = Path("disk.qcow2");
  const std::string reference = Path("reference.raw");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  ASSERT_NO_FATAL_FAILURE(MakeImage(image, reference));

  DaemonGuard guard(view, pidfile);
  // Only root may raise a mount's readahead: asked for, it is a warning in
  // the log, and the view works with the kernel's.
  ASSERT_OK_AND_ASSIGN(RunResult started, MountAsUser(image, view, pidfile, "ro,readahead=2M"));
  ASSERT_TRUE(started.status.success()) << started.Describe();
  EXPECT_EQ(started.stderr_text, "") << started.Describe();
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  ASSERT_NO_FATAL_FAILURE(ExpectUsersView(view, pid));
  ASSERT_OK_AND_ASSIGN(uint64_t readahead_kb, ReadaheadKb(view));
  EXPECT_EQ(readahead_kb, 128u);  // the kernel's default (VM_READAHEAD_PAGES)
  ASSERT_OK_AND_ASSIGN(bool locked, ImageIsLocked(image));
  EXPECT_TRUE(locked) << "the daemon holds no QEMU lock on the image (the probe would prove nothing)";

  // The whole view, read by the user.
  const std::string copy = Path("copy.raw");
  ASSERT_OK_AND_ASSIGN(RunResult read, AsUser({"dd", "if=" + view, "of=" + copy, "bs=1M", "status=none"}));
  ASSERT_TRUE(read.status.success()) << read.Describe();
  EXPECT_OK(CompareFiles(copy, reference));
  // And not written: the view of a read-only mount has no write bits.
  ASSERT_OK_AND_ASSIGN(RunResult write, AsUser({"dd", "if=/dev/zero", "of=" + view, "bs=512", "count=1",
                                                "conv=notrunc", "status=none"}));
  EXPECT_FALSE(write.status.success()) << write.Describe();

  ASSERT_OK_AND_ASSIGN(RunResult unmounted, AsUser({Binary(), "-u", view}));
  EXPECT_TRUE(unmounted.status.success()) << unmounted.Describe();
  EXPECT_EQ(unmounted.stderr_text, "") << unmounted.Describe();
  // No waiting: -u has promised that the daemon is gone.
  ASSERT_NO_FATAL_FAILURE(ExpectEnded(guard, image, view, pidfile, pid, std::chrono::milliseconds(0)));
  EXPECT_OK(QemuImg({"info", image}));  // without -U: takes QEMU's locks
  // No loop device can be attached to a view closed to root: no warning
  // about PR_SET_IO_FLUSHER, which a user's daemon never gets.
  EXPECT_FALSE(absl::StrContains(LogOf(view), "PR_SET_IO_FLUSHER")) << LogOf(view);
  EXPECT_TRUE(absl::StrContains(LogOf(view), "readahead stays at the kernel's default")) << LogOf(view);
}

// Directory mode: the user mounts their image on a directory of their own
// and reads the ext4 file system of a partition with debugfs, straight
// from its partN.raw: no loop device, no root.
TEST_F(UnprivilegedTest, UserReadsAPartitionFileSystemWithoutALoopDevice) {
  const std::string raw = Path("disk.raw");
  const std::string image = Path("disk.qcow2");
  const std::string dir = Path("vm");
  const std::string pidfile = Path("vm.pid");
  ASSERT_OK(RunChecked({"truncate", "-s", "32M", raw}).status());
  ASSERT_OK_AND_ASSIGN(CommandResult table, RunCommand({"sh", "-c", "printf 'label: gpt\\n,16M\\n' | sfdisk -q " + raw}));
  ASSERT_TRUE(table.status.success()) << table.stderr_text;
  // The partition starts at sector 2048 (sfdisk's default alignment).
  ASSERT_OK(RunChecked({"mkfs.ext4", "-q", "-F", "-E", "offset=1048576", raw, "16M"}).status());
  ASSERT_OK(ConvertImage(raw, "raw", image, "qcow2"));
  ASSERT_OK(GiveToUser(image));
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0);
  ASSERT_OK(GiveToUser(dir));

  DaemonGuard guard(dir, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult started, MountAsUser(image, dir, pidfile, "ro"));
  ASSERT_TRUE(started.status.success()) << started.Describe();
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  ASSERT_NO_FATAL_FAILURE(ExpectUsersView(dir, pid));
  // debugfs lives in /sbin, outside a user's PATH: named by its path.
  ASSERT_OK_AND_ASSIGN(std::string debugfs, RunChecked({"sh", "-c", "command -v debugfs"}));
  debugfs = std::string(absl::StripAsciiWhitespace(debugfs));
  ASSERT_OK_AND_ASSIGN(RunResult listing, AsUser({debugfs, "-R", "ls -l /", dir + "/part1.raw"}));
  EXPECT_TRUE(listing.status.success()) << listing.Describe();
  EXPECT_TRUE(absl::StrContains(listing.stdout_text, "lost+found")) << listing.Describe();
  ASSERT_OK_AND_ASSIGN(RunResult unmounted, AsUser({Binary(), "-u", dir}));
  EXPECT_TRUE(unmounted.status.success()) << unmounted.Describe();
  PidGone gone = WaitForPidGone(pid, std::chrono::milliseconds(0));
  ASSERT_TRUE(gone.gone) << "daemon pid " << pid << " still running";
  guard.Forget();
  EXPECT_FALSE(IsMounted(dir));
  struct stat st;
  EXPECT_TRUE(stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) << "the directory must stay";
}

// Read-write: the user writes with dd at a few offsets (a raw twin gets the
// same writes), unmounts with `fusermount3 -u`, which does not wait, and
// the image is then clean and equal to the twin.
TEST_F(UnprivilegedTest, UserMountsReadWriteWritesAndUnmountsWithFusermount3U) {
  const std::string image = Path("disk.qcow2");
  const std::string twin = Path("twin.raw");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  ASSERT_NO_FATAL_FAILURE(MakeImage(image, twin));
  // What dd copies from: 4 MiB of bytes that differ from one offset to
  // the next.
  const std::string source = Path("source.bin");
  {
    std::string bytes(4 * kMiB, '\0');
    uint32_t x = 12345;
    for (char& c : bytes) {
      x = x * 1103515245 + 12345;
      c = static_cast<char>(x >> 24);
    }
    ASSERT_OK(WriteFileAt(source, 0, bytes));
  }

  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult started, MountAsUser(image, view, pidfile, ""));
  ASSERT_TRUE(started.status.success()) << started.Describe();
  EXPECT_EQ(started.stderr_text, "") << started.Describe();
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  ASSERT_NO_FATAL_FAILURE(ExpectUsersView(view, pid));

  struct Write {
    uint64_t offset, length, from;
  };
  // The first cluster over data, an unaligned run across a cluster edge, a
  // long run through the zeroed range and the compressed cluster, the
  // last bytes of the disk.
  const std::vector<Write> writes = {
      {0, 4 * kKiB, 0},
      {kMiB + 60 * kKiB + 123, 10000, 4 * kKiB},
      {2 * kMiB + 512, 2 * kMiB + 300 * kKiB, 1 * kMiB},
      {kDiskSize - 5000, 5000, 3 * kMiB + 700 * kKiB},
  };
  for (const Write& w : writes) {
    for (const std::string& target : {view, twin}) {
      std::vector<std::string> dd = {"dd",
                                     "if=" + source,
                                     "of=" + target,
                                     "bs=64K",
                                     "iflag=skip_bytes,count_bytes",
                                     "oflag=seek_bytes",
                                     absl::StrCat("skip=", w.from),
                                     absl::StrCat("count=", w.length),
                                     absl::StrCat("seek=", w.offset),
                                     "conv=notrunc",
                                     "status=none"};
      if (target == view) {
        ASSERT_OK_AND_ASSIGN(RunResult run, AsUser(dd));
        ASSERT_TRUE(run.status.success()) << run.Describe();
      } else {
        ASSERT_OK(RunChecked(dd));  // root writes the twin
      }
    }
  }

  ASSERT_OK_AND_ASSIGN(RunResult unmounted, AsUser({"fusermount3", "-u", view}));
  EXPECT_TRUE(unmounted.status.success()) << unmounted.Describe();
  // fusermount3 -u does not wait for the daemon: this does.
  ASSERT_NO_FATAL_FAILURE(ExpectEnded(guard, image, view, pidfile, pid, kDaemonExit));
  EXPECT_OK(CheckImage(image));
  EXPECT_OK(QemuImg({"compare", "-f", "raw", "-F", "qcow2", twin, image}));
  // The default readahead, which a user's daemon cannot set, is no warning.
  EXPECT_FALSE(absl::StrContains(LogOf(view), "readahead")) << LogOf(view);
}

// -o allow_other needs `user_allow_other` in /etc/fuse.conf. Without it the
// user gets one line that says so, and nothing is mounted; with it the view
// mounts and root (another user) can read it, also through a loop device,
// which the user's daemon, not being root, leaves in buffered mode
// (-o loop_direct_io is root's).
TEST_F(UnprivilegedTest, AllowOtherNeedsUserAllowOtherInFuseConf) {
  const std::string image = Path("disk.qcow2");
  const std::string reference = Path("reference.raw");
  ASSERT_NO_FATAL_FAILURE(MakeImage(image, reference));
  ASSERT_OK_AND_ASSIGN(fuse_conf_, ScopedFuseConf::Save(kFuseConf));

  {
    SCOPED_TRACE("without user_allow_other");
    ASSERT_OK(fuse_conf_->SetUserAllowOther(false));
    const std::string view = Path("refused.raw");
    const std::string pidfile = Path("refused.pid");
    DaemonGuard guard(view, pidfile);  // in case it mounts after all
    ASSERT_OK_AND_ASSIGN(RunResult run, MountAsUser(image, view, pidfile, "ro,allow_other", /*watch=*/view));
    EXPECT_TRUE(run.status.exited() && run.status.code() == 1) << run.Describe();
    EXPECT_TRUE(FailsWithOneLine(run, {"user_allow_other", "/etc/fuse.conf"}));
    EXPECT_FALSE(run.mounted_during_run) << run.Describe();
    EXPECT_FALSE(IsMounted(view));
    EXPECT_FALSE(Exists(view)) << "the mountpoint file qcow2fuse created is still there";
    EXPECT_FALSE(Exists(pidfile)) << "a pidfile was left";
    guard.Cleanup();
  }
  {
    SCOPED_TRACE("with user_allow_other");
    ASSERT_OK(fuse_conf_->SetUserAllowOther(true));
    const std::string view = Path("shared.raw");
    const std::string pidfile = Path("shared.pid");
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult started, MountAsUser(image, view, pidfile, "ro,allow_other"));
    ASSERT_TRUE(started.status.success()) << started.Describe();
    EXPECT_EQ(started.stderr_text, "") << started.Describe();
    ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
    ASSERT_NO_FATAL_FAILURE(ExpectUsersView(view, pid));
    std::optional<std::vector<std::string>> options = MountSuperOptions(view);
    ASSERT_TRUE(options.has_value());
    EXPECT_TRUE(std::find(options->begin(), options->end(), "allow_other") != options->end())
        << "super options: " << absl::StrJoin(*options, ",");
    EXPECT_OK(CompareFiles(view, reference));  // read by root
    if (LoopUnavailableReason().empty()) {
      ASSERT_OK_AND_ASSIGN(std::unique_ptr<LoopDevice> loop, LoopDevice::Attach(view, /*read_only=*/true));
      // Fifty times the interval at which a root daemon looks for it.
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      EXPECT_EQ(LoopDioFlag(loop->device()), "0") << "the user's daemon switched " << loop->device();
      ASSERT_OK_AND_ASSIGN(std::string through_loop, ReadFile(loop->device()));
      ASSERT_OK_AND_ASSIGN(std::string expected, ReadFile(reference));
      EXPECT_TRUE(through_loop == expected) << "the bytes read through " << loop->device() << " are not the image's";
    }
    ASSERT_OK_AND_ASSIGN(RunResult unmounted, AsUser({Binary(), "-u", view}));
    EXPECT_TRUE(unmounted.status.success()) << unmounted.Describe();
    ASSERT_NO_FATAL_FAILURE(ExpectEnded(guard, image, view, pidfile, pid, std::chrono::milliseconds(0)));
    // Root may open this view, and so attach a loop device to it.
    EXPECT_TRUE(absl::StrContains(LogOf(view), "PR_SET_IO_FLUSHER")) << LogOf(view);
  }
}

// What makes a user's mount fail for certain is refused before trying,
// with one line saying what to do: /dev/fuse closed to the user (no udev
// rule), and a mountpoint file the user may not write.
TEST_F(UnprivilegedTest, StartUpRefusalsSayWhatToDo) {
  const std::string image = Path("disk.qcow2");
  const std::string reference = Path("reference.raw");
  ASSERT_NO_FATAL_FAILURE(MakeImage(image, reference));
  const std::string view = Path("refused.raw");
  const std::string pidfile = Path("refused.pid");
  {
    SCOPED_TRACE("/dev/fuse 0600");
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<ScopedMode> closed, ScopedMode::Set(kDevFuse, 0600));
    DaemonGuard guard(view, pidfile);  // in case it mounts after all
    ASSERT_OK_AND_ASSIGN(RunResult run, MountAsUser(image, view, pidfile, "ro", /*watch=*/view));
    EXPECT_TRUE(FailsWithOneLine(run, {"/dev/fuse is not open to this user", "chmod 0666 /dev/fuse"}));
    EXPECT_FALSE(run.mounted_during_run) << run.Describe();
  }
  {
    SCOPED_TRACE("a mountpoint of root's");
    ASSERT_OK(WriteFileAt(view, 0, ""));  // made by root, 0644
    ASSERT_EQ(chmod(view.c_str(), 0644), 0) << strerror(errno);
    DaemonGuard guard(view, pidfile);
    ASSERT_OK_AND_ASSIGN(RunResult run, MountAsUser(image, view, pidfile, "ro", /*watch=*/view));
    EXPECT_TRUE(FailsWithOneLine(run, {"cannot mount on " + view, "you may not write to it"}));
    EXPECT_FALSE(run.mounted_during_run) << run.Describe();
    EXPECT_TRUE(Exists(view)) << "the user's refused mount removed root's file";
  }
}

// What stays root's: without allow_other even root cannot open a user's
// view (the kernel's FUSE access check does not exempt root), and a plain
// user cannot attach a loop device to their view.
TEST_F(UnprivilegedTest, RootCannotOpenTheViewAndTheUserCannotAttachALoopDevice) {
  const std::string image = Path("disk.qcow2");
  const std::string reference = Path("reference.raw");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  ASSERT_NO_FATAL_FAILURE(MakeImage(image, reference));

  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult started, MountAsUser(image, view, pidfile, "ro"));
  ASSERT_TRUE(started.status.success()) << started.Describe();
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  ASSERT_NO_FATAL_FAILURE(ExpectUsersView(view, pid));

  {
    errno = 0;
    const int fd = open(view.c_str(), O_RDONLY | O_CLOEXEC);
    const int error = errno;
    if (fd >= 0) close(fd);
    EXPECT_LT(fd, 0) << "root opened a view mounted by " << kUserName << " without allow_other";
    EXPECT_EQ(error, EACCES) << strerror(error);
  }

  if (const std::string losetup = FindProgram("losetup"); !losetup.empty()) {
    ASSERT_OK_AND_ASSIGN(RunResult attached, AsUser({losetup, "--find", "--show", "--read-only", view}));
    if (attached.status.success()) {
      // Detached again at once: an attached device keeps the view busy.
      const std::string device(absl::StripAsciiWhitespace(attached.stdout_text));
      ADD_FAILURE() << "a plain user attached " << device << " to the view\n" << attached.Describe();
      if (!device.empty()) {
        EXPECT_OK(RunChecked({losetup, "-d", device}));
      }
    } else {
      std::cout << "[losetup as " << kUserName << "] " << attached.stderr_text;
    }
  }

  ASSERT_OK_AND_ASSIGN(RunResult unmounted, AsUser({Binary(), "-u", view}));
  EXPECT_TRUE(unmounted.status.success()) << unmounted.Describe() << LogOf(view);
  ASSERT_NO_FATAL_FAILURE(ExpectEnded(guard, image, view, pidfile, pid, std::chrono::milliseconds(0)));
}

// A user cannot take down a view that is not theirs: `qcow2fuse -u` on a
// view root mounted fails with one line, and the view stays mounted and
// served until its owner unmounts it.
TEST_F(UnprivilegedTest, AUserCannotUnmountAnotherUsersView) {
  const std::string image = Path("disk.qcow2");
  const std::string reference = Path("reference.raw");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  ASSERT_NO_FATAL_FAILURE(MakeImage(image, reference));

  DaemonGuard guard(view, pidfile);
  ASSERT_OK_AND_ASSIGN(RunResult started, StartDaemon(image, view, pidfile, {"ro", "allow_other"}));
  ASSERT_TRUE(started.status.success()) << started.Describe();
  ASSERT_OK_AND_ASSIGN(RunResult refused, AsUser({Binary(), "-u", view}));
  EXPECT_TRUE(FailsWithOneLine(refused, {view, "belongs to uid 0", "only its owner or root"})) << refused.Describe();
  EXPECT_TRUE(IsMounted(view)) << "another user's -u took the view down";
  EXPECT_OK(CompareFiles(view, reference));
  ASSERT_OK_AND_ASSIGN(RunResult unmounted, RunUnmount(view));
  EXPECT_TRUE(unmounted.status.success()) << unmounted.Describe();
  guard.Cleanup();
  EXPECT_FALSE(IsMounted(view));
}

}  // namespace
}  // namespace qcow2fuse::test::cli
