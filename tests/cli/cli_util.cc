#include "cli_util.h"

#include <errno.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "support/file_util.h"
#include "support/mount.h"

namespace qcow2fuse::test::cli {
namespace {

constexpr std::chrono::milliseconds kPoll(10);

void Fusermount(const char* flag, const std::string& path) {
  absl::StatusOr<CommandResult> r = RunCommand({"fusermount3", flag, path});
  if (!r.ok() || !r->ok()) {
    std::cerr << "cli_util: fusermount3 " << flag << " " << path << " failed: "
              << (r.ok() ? r->status.ToString() + " " + r->stderr_text
                         : r.status().ToString())
              << "\n";
  }
}

}  // namespace

void BecomeSubreaper() { prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); }

std::string RunResult::Describe() const {
  return absl::StrCat(
      "command: ", CommandLine(argv), cwd.empty() ? "" : "\n(in " + cwd + ")",
      "\nended: ", timed_out ? "TIMED OUT, killed" : status.ToString(),
      mounted_during_run ? "\n(a mount appeared while it ran)" : "",
      "\n--- stdout ---\n", stdout_text, "--- stderr ---\n", stderr_text,
      "--- end ---");
}

bool IsMounted(const std::string& path) {
  return MountedFsType(path).has_value();
}

absl::StatusOr<RunResult> RunBounded(const std::vector<std::string>& argv,
                                     const RunOptions& options) {
  const std::string& watched = options.watch_mountpoint;
  bool mounted = false;
  CommandOptions command_options;
  command_options.cwd = options.cwd;
  command_options.timeout = options.timeout;
  if (!watched.empty()) {
    command_options.while_running = [&mounted, &watched] {
      // Only a foreground process mounts and stays: take it down, and let
      // the wait collect how it exits.
      if (!mounted && IsMounted(watched)) {
        mounted = true;
        Fusermount("-u", watched);
      }
    };
  }
  absl::StatusOr<CommandResult> run = RunCommand(argv, command_options);
  if (!run.ok()) return run.status();
  // A daemon killed at the time limit leaves its mount behind.
  if (run->timed_out && !watched.empty()) {
    if (IsMounted(watched)) Fusermount("-u", watched);
    if (IsMounted(watched)) Fusermount("-uz", watched);
  }
  return RunResult{*std::move(run), options.cwd, mounted};
}

PidGone WaitForPidGone(pid_t pid, std::chrono::milliseconds timeout) {
  PidGone result;
  if (pid <= 0) return result;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int wait_status = 0;
    pid_t done = waitpid(pid, &wait_status, WNOHANG);
    if (done == pid) {
      result.gone = true;
      result.status = ExitStatus::FromWaitStatus(wait_status);
      return result;
    }
    if (done < 0 && errno == ECHILD) {
      // Not our child (no subreaper): all we can see is whether it exists.
      if (kill(pid, 0) != 0 && errno == ESRCH) {
        result.gone = true;
        return result;
      }
    }
    if (std::chrono::steady_clock::now() >= deadline) return result;
    std::this_thread::sleep_for(kPoll);
  }
}

absl::StatusOr<pid_t> ReadPidFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  int pid = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(*text), &pid) || pid <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pidfile ", path, " holds no pid: '", *text, "'"));
  }
  return static_cast<pid_t>(pid);
}

DaemonGuard::DaemonGuard(std::string mountpoint, std::string pidfile)
    : mountpoint_(std::move(mountpoint)), pidfile_(std::move(pidfile)) {}

DaemonGuard::~DaemonGuard() { Cleanup(); }

absl::StatusOr<pid_t> DaemonGuard::ReadPid() {
  absl::StatusOr<pid_t> pid = ReadPidFile(pidfile_);
  if (pid.ok()) pid_ = *pid;
  return pid;
}

void DaemonGuard::Cleanup() {
  if (pid_ == 0 && !pidfile_.empty()) {
    absl::StatusOr<pid_t> pid = ReadPidFile(pidfile_);
    if (pid.ok()) pid_ = *pid;
  }
  if (IsMounted(mountpoint_)) Fusermount("-u", mountpoint_);
  if (pid_ > 0) {
    PidGone gone = WaitForPidGone(pid_, std::chrono::seconds(10));
    if (!gone.gone) {
      std::cerr << "DaemonGuard: qcow2fuse pid " << pid_
                << " still running after unmount; killing it\n";
      kill(pid_, SIGKILL);
      WaitForPidGone(pid_, std::chrono::seconds(5));
    }
    pid_ = 0;
  }
  if (IsMounted(mountpoint_)) Fusermount("-uz", mountpoint_);
}

absl::StatusOr<uint64_t> ReadBE64At(const std::string& path, uint64_t offset) {
  absl::StatusOr<ScopedFd> fd = OpenReadOnly(path);
  if (!fd.ok()) return fd.status();
  unsigned char b[8];
  if (pread(fd->get(), b, 8, offset) != 8) {
    return absl::OutOfRangeError(
        absl::StrCat("cannot read 8 bytes at ", offset, " of ", path));
  }
  uint64_t v = 0;
  for (unsigned char c : b) v = (v << 8) | c;
  return v;
}

absl::StatusOr<uint32_t> ReadBE32At(const std::string& path, uint64_t offset) {
  absl::StatusOr<ScopedFd> fd = OpenReadOnly(path);
  if (!fd.ok()) return fd.status();
  unsigned char b[4];
  if (pread(fd->get(), b, 4, offset) != 4) {
    return absl::OutOfRangeError(
        absl::StrCat("cannot read 4 bytes at ", offset, " of ", path));
  }
  uint32_t v = 0;
  for (unsigned char c : b) v = (v << 8) | c;
  return v;
}

absl::Status WriteBE64At(const std::string& path, uint64_t offset,
                         uint64_t value) {
  char b[8];
  for (int i = 7; i >= 0; --i) {
    b[i] = static_cast<char>(value & 0xff);
    value >>= 8;
  }
  return WriteFileAt(path, offset, std::string(b, 8));
}

absl::Status WriteBE32At(const std::string& path, uint64_t offset,
                         uint32_t value) {
  char b[4];
  for (int i = 3; i >= 0; --i) {
    b[i] = static_cast<char>(value & 0xff);
    value >>= 8;
  }
  return WriteFileAt(path, offset, std::string(b, 4));
}

absl::StatusOr<Qcow2Header> ReadQcow2Header(const std::string& path) {
  Qcow2Header h;
  auto u32 = [&](uint64_t off, uint32_t& out) -> absl::Status {
    absl::StatusOr<uint32_t> v = ReadBE32At(path, off);
    if (!v.ok()) return v.status();
    out = *v;
    return absl::OkStatus();
  };
  auto u64 = [&](uint64_t off, uint64_t& out) -> absl::Status {
    absl::StatusOr<uint64_t> v = ReadBE64At(path, off);
    if (!v.ok()) return v.status();
    out = *v;
    return absl::OkStatus();
  };
  for (absl::Status s :
       {u32(hdr::kMagic, h.magic), u32(hdr::kVersion, h.version),
        u32(hdr::kClusterBits, h.cluster_bits), u64(hdr::kSize, h.size),
        u32(hdr::kL1Size, h.l1_size),
        u64(hdr::kL1TableOffset, h.l1_table_offset)}) {
    if (!s.ok()) return s;
  }
  if (h.magic != hdr::kQcow2Magic) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not qcow2"));
  }
  if (h.version >= 3) {
    if (absl::Status s = u64(hdr::kIncompatibleFeatures, h.incompatible_features);
        !s.ok()) {
      return s;
    }
  }
  if (h.cluster_bits < 9 || h.cluster_bits > 21) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": unexpected cluster_bits ", h.cluster_bits));
  }
  return h;
}

absl::StatusOr<uint64_t> L1EntryOffset(const std::string& image,
                                       uint64_t guest) {
  absl::StatusOr<Qcow2Header> h = ReadQcow2Header(image);
  if (!h.ok()) return h.status();
  const uint64_t l1_index = guest / (h->cluster_size() * h->l2_entries());
  if (l1_index >= h->l1_size) {
    return absl::OutOfRangeError(
        absl::StrCat("guest offset ", guest, " is beyond the L1 table"));
  }
  return h->l1_table_offset + 8 * l1_index;
}

absl::StatusOr<uint64_t> L2EntryOffset(const std::string& image,
                                       uint64_t guest) {
  absl::StatusOr<Qcow2Header> h = ReadQcow2Header(image);
  if (!h.ok()) return h.status();
  absl::StatusOr<uint64_t> l1_entry_at = L1EntryOffset(image, guest);
  if (!l1_entry_at.ok()) return l1_entry_at.status();
  absl::StatusOr<uint64_t> l1_entry = ReadBE64At(image, *l1_entry_at);
  if (!l1_entry.ok()) return l1_entry.status();
  const uint64_t l2_table = *l1_entry & kOffsetMask;
  if (l2_table == 0) {
    return absl::NotFoundError(
        absl::StrCat("guest offset ", guest, " has no L2 table"));
  }
  const uint64_t l2_index = (guest >> h->cluster_bits) % h->l2_entries();
  return l2_table + 8 * l2_index;
}

::testing::AssertionResult RefusesCleanly(
    const std::string& dir, const std::string& label, const std::string& image,
    const std::vector<std::string>& extra_options,
    const std::vector<std::string>& keywords, Mode mode,
    std::string* stderr_out) {
  const std::string mountpoint = absl::StrCat(dir, "/", label, ".raw");
  const std::string pidfile = absl::StrCat(dir, "/", label, ".pid");
  std::vector<std::string> mount_options = {"ro"};
  mount_options.insert(mount_options.end(), extra_options.begin(),
                       extra_options.end());
  std::vector<std::string> argv = {Binary()};
  if (mode == Mode::kForeground) argv.push_back("-f");
  argv.push_back("-o");
  argv.push_back(absl::StrJoin(mount_options, ","));
  if (mode == Mode::kDaemon) {
    argv.push_back("--pidfile");
    argv.push_back(pidfile);
  }
  argv.push_back(image);
  argv.push_back(mountpoint);

  if (access(mountpoint.c_str(), F_OK) == 0) {
    return ::testing::AssertionFailure()
           << "test bug: " << mountpoint << " exists already";
  }
  DaemonGuard guard(mountpoint, pidfile);  // in case it mounts after all
  RunOptions options;
  options.timeout = std::chrono::seconds(30);
  options.watch_mountpoint = mountpoint;
  absl::StatusOr<RunResult> run = RunBounded(argv, options);
  if (!run.ok()) {
    return ::testing::AssertionFailure() << run.status().ToString();
  }
  if (stderr_out != nullptr) *stderr_out = run->stderr_text;
  const bool mounted_after = IsMounted(mountpoint);
  guard.Cleanup();

  std::vector<std::string> problems;
  if (run->timed_out) problems.push_back("did not finish in time (a hang?)");
  if (!run->timed_out && run->status.signaled()) {
    problems.push_back("ended by a signal (a crash?)");
  }
  if (!run->timed_out && run->status.exited() && run->status.code() == 0) {
    problems.push_back("exited with code 0 (accepted the image)");
  }
  if (run->mounted_during_run || mounted_after) {
    problems.push_back("mounted the view");
  }
  const std::string& err = run->stderr_text;
  const size_t newlines = std::count(err.begin(), err.end(), '\n');
  if (!absl::StartsWith(err, "qcow2fuse: ")) {
    problems.push_back("stderr does not start with \"qcow2fuse: \"");
  }
  if (newlines != 1 || !absl::EndsWith(err, "\n")) {
    problems.push_back(absl::StrCat("stderr is not exactly one line (",
                                    newlines, " newlines)"));
  }
  if (!keywords.empty()) {
    const std::string lower = absl::AsciiStrToLower(err);
    bool found = false;
    for (const std::string& keyword : keywords) {
      if (absl::StrContains(lower, absl::AsciiStrToLower(keyword))) found = true;
    }
    if (!found) {
      problems.push_back(absl::StrCat("stderr names none of: ",
                                      absl::StrJoin(keywords, " | ")));
    }
  }
  if (access(mountpoint.c_str(), F_OK) == 0) {
    problems.push_back("left the mountpoint file it created behind");
  }
  if (access(pidfile.c_str(), F_OK) == 0) {
    problems.push_back("left a pidfile behind");
  }
  if (problems.empty()) {
    std::cout << (mode == Mode::kDaemon ? "[daemon] " : "[-f] ") << err;
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << (mode == Mode::kDaemon ? "[daemon mode] " : "[foreground -f] ")
         << absl::StrJoin(problems, "; ") << "\n"
         << run->Describe();
}

}  // namespace qcow2fuse::test::cli
