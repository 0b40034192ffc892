#include "cli_util.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <dirent.h>
#include <string.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "support/file_util.h"
#include "support/mount.h"

namespace qcow2fuse::test::cli {

MountOptions WritableView(const std::string& image, const std::string& mountpoint) {
  MountOptions options;
  options.binary = Binary();
  options.image = image;
  options.mountpoint = mountpoint;
  options.read_only = false;
  return options;
}

MountOptions ReadOnlyView(const std::string& image, const std::string& mountpoint) {
  MountOptions options = WritableView(image, mountpoint);
  options.read_only = true;
  return options;
}

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

size_t TracedRequests(const std::string& log, const std::string& opcode) {
  // libfuse prints "unique: N, opcode: NAME (CODE), ..." for each request.
  const std::string word = "opcode: " + opcode + " ";
  size_t n = 0;
  for (size_t at = log.find(word); at != std::string::npos; at = log.find(word, at + 1)) ++n;
  return n;
}

absl::StatusOr<size_t> PagesInCache(int fd, uint64_t offset, uint64_t length) {
  void* map = mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (map == MAP_FAILED) return absl::ErrnoToStatus(errno, "mmap");
  std::vector<unsigned char> resident((length + 4095) / 4096);
  const int result = mincore(map, length, resident.data());
  const int error = errno;
  munmap(map, length);
  if (result != 0) return absl::ErrnoToStatus(error, "mincore");
  return std::count_if(resident.begin(), resident.end(), [](unsigned char r) { return r & 1; });
}

absl::Status HideHeaderExtension(const std::string& path, uint32_t type) {
  // A type no QEMU defines; readers skip extensions they do not know.
  constexpr uint32_t kUnknownExtension = 0x71667573;
  absl::StatusOr<uint32_t> header_length = ReadBE32At(path, hdr::kHeaderLength);
  if (!header_length.ok()) return header_length.status();
  uint64_t at = *header_length;
  for (int i = 0; i < 64; ++i) {
    absl::StatusOr<uint32_t> found = ReadBE32At(path, at);
    if (!found.ok()) return found.status();
    absl::StatusOr<uint32_t> length = ReadBE32At(path, at + 4);
    if (!length.ok()) return length.status();
    if (*found == 0) break;  // the end of the extensions
    if (*found == type) return WriteBE32At(path, at, kUnknownExtension);
    at += 8 + (uint64_t{*length} + 7) / 8 * 8;  // data padded to 8 bytes
  }
  return absl::NotFoundError(absl::StrFormat("%s has no header extension %#x", path, type));
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
    // The words after the "qcow2fuse: " prefix, which would match "qcow2".
    const std::string lower = absl::AsciiStrToLower(
        absl::StartsWith(err, "qcow2fuse: ") ? err.substr(sizeof "qcow2fuse: " - 1) : err);
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

void TempDirTest::SetUp() {
  BecomeSubreaper();
  absl::StatusOr<TempDir> dir = TempDir::Create("cli");
  ASSERT_TRUE(dir.ok()) << dir.status();
  dir_ = std::make_unique<TempDir>(std::move(*dir));
}

absl::StatusOr<RunResult> StartDaemon(const std::string& image,
                                      const std::string& mountpoint,
                                      const std::string& pidfile,
                                      const std::vector<std::string>& options) {
  std::vector<std::string> argv = {Binary()};
  if (!options.empty()) {
    argv.push_back("-o");
    argv.push_back(absl::StrJoin(options, ","));
  }
  argv.insert(argv.end(), {"--pidfile", pidfile, image, mountpoint});
  RunOptions run_options;
  run_options.timeout = std::chrono::seconds(30);
  return RunBounded(argv, run_options);
}

absl::StatusOr<RunResult> RunUnmount(const std::string& path) {
  RunOptions options;
  options.timeout = std::chrono::seconds(60);
  return RunBounded({Binary(), "-u", path}, options);
}

::testing::AssertionResult FailsWithOneLine(const RunResult& run,
                                            const std::vector<std::string>& words) {
  std::vector<std::string> problems;
  if (run.timed_out) problems.push_back("did not finish in time");
  if (!run.timed_out && !run.status.exited()) problems.push_back("ended by a signal");
  if (run.status.exited() && run.status.code() == 0) problems.push_back("exited with code 0");
  const std::string& err = run.stderr_text;
  if (!absl::StartsWith(err, "qcow2fuse: ")) {
    problems.push_back("stderr does not start with \"qcow2fuse: \"");
  }
  if (std::count(err.begin(), err.end(), '\n') != 1 || !absl::EndsWith(err, "\n")) {
    problems.push_back("stderr is not exactly one line");
  }
  // The words after the prefix, which holds "qcow2" and "qcow2fuse".
  const std::string lower = absl::AsciiStrToLower(
      absl::StartsWith(err, "qcow2fuse: ") ? err.substr(sizeof "qcow2fuse: " - 1) : err);
  for (const std::string& word : words) {
    if (!absl::StrContains(lower, absl::AsciiStrToLower(word))) {
      problems.push_back(absl::StrCat("stderr does not say \"", word, "\""));
    }
  }
  if (problems.empty()) {
    std::cout << "[refused] " << err;
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << absl::StrJoin(problems, "; ") << "\n"
                                       << run.Describe();
}

absl::StatusOr<std::vector<std::pair<pid_t, unsigned long>>> ThreadFlags(pid_t pid) {
  const std::string task_dir = absl::StrCat("/proc/", pid, "/task");
  DIR* dir = opendir(task_dir.c_str());
  if (dir == nullptr) {
    return absl::NotFoundError(absl::StrCat("cannot list ", task_dir, ": ", strerror(errno)));
  }
  std::vector<std::pair<pid_t, unsigned long>> flags;
  while (dirent* entry = readdir(dir)) {
    int tid = 0;
    if (!absl::SimpleAtoi(entry->d_name, &tid)) continue;
    std::ifstream in(absl::StrCat(task_dir, "/", tid, "/stat"));
    std::string line;
    if (!std::getline(in, line)) continue;  // the thread just ended
    // "tid (comm) state ppid pgrp session tty_nr tpgid flags ...": comm
    // may hold spaces, so count from the last ')'.
    const size_t paren = line.rfind(')');
    std::vector<std::string> fields =
        absl::StrSplit(line.substr(paren + 2), ' ', absl::SkipEmpty());
    unsigned long value = 0;
    if (fields.size() < 7 || !absl::SimpleAtoi(fields[6], &value)) {
      closedir(dir);
      return absl::InternalError(absl::StrCat("cannot parse ", task_dir, "/", tid, "/stat: ", line));
    }
    flags.emplace_back(tid, value);
  }
  closedir(dir);
  return flags;
}

bool HasEffectiveCapability(int cap) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (!absl::StartsWith(line, "CapEff:")) continue;
    uint64_t mask = 0;
    if (!absl::SimpleHexAtoi(absl::StripAsciiWhitespace(line.substr(7)), &mask)) return false;
    return (mask >> cap) & 1;
  }
  return false;
}

namespace {

// One command to a DescriptorHolder's child: 'w'rite or 'c'lose.
struct HolderCommand {
  char op;
  int pattern;
  uint64_t offset;
  uint64_t length;
};

bool ReadAll(int fd, void* data, size_t size) {
  char* p = static_cast<char*>(data);
  while (size > 0) {
    const ssize_t n = read(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    size -= n;
  }
  return true;
}

// The child, after fork() of a multi-threaded process: system calls only,
// no allocation.
[[noreturn]] void HolderChild(const char* path, int commands, int results) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  int result = fd < 0 ? errno : 0;
  (void)!write(results, &result, sizeof result);
  if (fd < 0) _exit(1);
  static char buffer[64 * 1024];
  HolderCommand command;
  while (ReadAll(commands, &command, sizeof command)) {
    result = 0;
    if (command.op == 'w') {
      memset(buffer, command.pattern, sizeof buffer);
      for (uint64_t done = 0; done < command.length && result == 0;) {
        const size_t chunk = std::min<uint64_t>(sizeof buffer, command.length - done);
        const ssize_t n = pwrite(fd, buffer, chunk, command.offset + done);
        if (n <= 0) result = n < 0 ? errno : EIO;
        done += n > 0 ? n : 0;
      }
    } else if (fd >= 0) {
      result = close(fd) == 0 ? 0 : errno;
      fd = -1;
    }
    (void)!write(results, &result, sizeof result);
  }
  if (fd >= 0) close(fd);
  _exit(0);
}

}  // namespace

absl::StatusOr<std::unique_ptr<DescriptorHolder>> DescriptorHolder::Open(const std::string& path) {
  int commands[2], results[2];
  if (pipe2(commands, O_CLOEXEC) != 0) return absl::InternalError(strerror(errno));
  if (pipe2(results, O_CLOEXEC) != 0) {
    close(commands[0]);
    close(commands[1]);
    return absl::InternalError(strerror(errno));
  }
  const pid_t pid = fork();
  if (pid == 0) {
    // Only its own two pipe ends: a copy of any other descriptor of the
    // parent (this holder's other ends, another holder's pipes) would keep
    // that pipe from ever reporting its end.
    const int low = std::min(commands[0], results[1]);
    const int high = std::max(commands[0], results[1]);
    close_range(STDERR_FILENO + 1, low - 1, 0);
    close_range(low + 1, high - 1, 0);
    close_range(high + 1, ~0U, 0);
    HolderChild(path.c_str(), commands[0], results[1]);
  }
  close(commands[0]);
  close(results[1]);
  if (pid < 0) {
    close(commands[1]);
    close(results[0]);
    return absl::InternalError(absl::StrCat("fork: ", strerror(errno)));
  }
  std::unique_ptr<DescriptorHolder> holder(new DescriptorHolder(pid, commands[1], results[0]));
  int opened = 0;
  if (!ReadAll(holder->from_child_, &opened, sizeof opened)) return absl::InternalError("the holder died");
  if (opened != 0) {
    holder->closed_ = true;
    return absl::InternalError(absl::StrCat("open ", path, ": ", strerror(opened)));
  }
  return holder;
}

DescriptorHolder::~DescriptorHolder() {
  close(to_child_);  // end of commands: the child closes and exits
  close(from_child_);
  int status;
  while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
}

absl::StatusOr<int> DescriptorHolder::Command(char op, int pattern, uint64_t offset, uint64_t length) {
  const HolderCommand command = {op, pattern, offset, length};
  if (write(to_child_, &command, sizeof command) != sizeof command) {
    return absl::InternalError(absl::StrCat("cannot reach the holder: ", strerror(errno)));
  }
  int result = 0;
  if (!ReadAll(from_child_, &result, sizeof result)) return absl::InternalError("the holder died");
  return result;
}

absl::Status DescriptorHolder::Write(int pattern, uint64_t offset, uint64_t length) {
  absl::StatusOr<int> result = Command('w', pattern, offset, length);
  if (!result.ok()) return result.status();
  if (*result != 0) {
    return absl::InternalError(absl::StrCat("pwrite of ", length, " bytes at ", offset, ": ", strerror(*result)));
  }
  return absl::OkStatus();
}

absl::Status DescriptorHolder::Close() {
  if (closed_) return absl::OkStatus();
  closed_ = true;
  absl::StatusOr<int> result = Command('c', 0, 0, 0);
  if (!result.ok()) return result.status();
  if (*result != 0) return absl::InternalError(absl::StrCat("close: ", strerror(*result)));
  return absl::OkStatus();
}

bool KernelAtLeast(int major, int minor) {
  struct utsname u;
  int have_major = 0;
  int have_minor = 0;
  if (uname(&u) != 0 || std::sscanf(u.release, "%d.%d", &have_major, &have_minor) != 2) return false;
  return have_major > major || (have_major == major && have_minor >= minor);
}

}  // namespace qcow2fuse::test::cli
