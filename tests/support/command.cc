#include "support/command.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

extern char** environ;

namespace qcow2fuse::test {
namespace {

absl::Status ErrnoError(absl::string_view what, int error_number) {
  return absl::InternalError(absl::StrCat(what, ": ", strerror(error_number)));
}

// An unlinked temporary file that collects one output stream of a child.
class CaptureFile {
 public:
  CaptureFile() = default;
  CaptureFile(const CaptureFile&) = delete;
  CaptureFile& operator=(const CaptureFile&) = delete;
  ~CaptureFile() {
    if (fd_ >= 0) close(fd_);
  }

  absl::Status Open() {
    const char* tmpdir = getenv("TMPDIR");
    std::string pattern =
        absl::StrCat((tmpdir != nullptr && *tmpdir != '\0') ? tmpdir : "/tmp",
                     "/qcow2fuse-capture-XXXXXX");
    fd_ = mkostemp(pattern.data(), O_CLOEXEC);
    if (fd_ < 0) return ErrnoError(absl::StrCat("mkostemp ", pattern), errno);
    unlink(pattern.c_str());
    return absl::OkStatus();
  }

  int fd() const { return fd_; }

  std::string Contents() const {
    std::string contents;
    char buffer[65536];
    off_t offset = 0;
    for (;;) {
      ssize_t n = pread(fd_, buffer, sizeof(buffer), offset);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      contents.append(buffer, n);
      offset += n;
    }
    return contents;
  }

 private:
  int fd_ = -1;
};

// The last `limit` bytes of `text`: qemu-io prints a line per request, and a
// failure message should show the end, where the error is.
std::string Tail(const std::string& text, size_t limit = 4096) {
  if (text.size() <= limit) return text;
  return "...\n" + text.substr(text.size() - limit);
}

// Characters that never need quoting in a POSIX shell word.
bool IsShellSafe(char c) {
  return isalnum(static_cast<unsigned char>(c)) ||
         strchr("@%+=:,./_-", c) != nullptr;
}

std::string ShellQuote(const std::string& word) {
  if (!word.empty() && std::all_of(word.begin(), word.end(), IsShellSafe)) {
    return word;
  }
  std::string quoted = "'";
  for (char c : word) {
    if (c == '\'') {
      quoted += "'\\''";
    } else {
      quoted += c;
    }
  }
  quoted += "'";
  return quoted;
}

// Waits for `pid` as `options` say: for as long as it takes, or polling so
// that the callback runs and the time limit is kept.
absl::StatusOr<ExitStatus> WaitWhileRunning(pid_t pid,
                                            const CommandOptions& options,
                                            bool* timed_out) {
  if (!options.timeout && !options.while_running) return WaitForExit(pid);
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    absl::StatusOr<std::optional<ExitStatus>> done =
        WaitForExitFor(pid, std::chrono::milliseconds(10));
    if (!done.ok()) return done.status();
    if (done->has_value()) return **done;
    if (options.while_running) options.while_running();
    if (options.timeout &&
        std::chrono::steady_clock::now() - start >= *options.timeout) {
      *timed_out = true;
      kill(pid, SIGKILL);
      return WaitForExit(pid);
    }
  }
}

}  // namespace

ExitStatus ExitStatus::FromWaitStatus(int wait_status) {
  ExitStatus status;
  if (WIFEXITED(wait_status)) {
    status.exited_ = true;
    status.code_ = WEXITSTATUS(wait_status);
  } else {
    status.exited_ = false;
    status.signal_ = WIFSIGNALED(wait_status) ? WTERMSIG(wait_status) : 0;
  }
  return status;
}

std::string ExitStatus::ToString() const {
  if (exited_) return absl::StrCat("exit code ", code_);
  return absl::StrFormat("killed by signal %d (%s)", signal_,
                         strsignal(signal_));
}

std::string CommandLine(const std::vector<std::string>& argv) {
  std::vector<std::string> words;
  words.reserve(argv.size());
  for (const std::string& arg : argv) words.push_back(ShellQuote(arg));
  return absl::StrJoin(words, " ");
}

absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, int stdout_fd,
                            int stderr_fd, const std::string& cwd) {
  if (argv.empty()) return absl::InvalidArgumentError("empty argv");
  std::vector<char*> c_argv;
  for (const std::string& arg : argv) {
    c_argv.push_back(const_cast<char*>(arg.c_str()));
  }
  c_argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null",
                                   O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, stdout_fd, STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, stderr_fd, STDERR_FILENO);
  if (!cwd.empty()) posix_spawn_file_actions_addchdir_np(&actions, cwd.c_str());
  pid_t pid = -1;
  int error =
      posix_spawnp(&pid, c_argv[0], &actions, nullptr, c_argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) {
    return ErrnoError(absl::StrCat("cannot start ", CommandLine(argv)), error);
  }
  return pid;
}

absl::StatusOr<ExitStatus> WaitForExit(pid_t pid) {
  int wait_status = 0;
  while (waitpid(pid, &wait_status, 0) < 0) {
    if (errno != EINTR) {
      return ErrnoError(absl::StrCat("waitpid ", pid), errno);
    }
  }
  return ExitStatus::FromWaitStatus(wait_status);
}

absl::StatusOr<std::optional<ExitStatus>> WaitForExitFor(
    pid_t pid, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int wait_status = 0;
    pid_t done = waitpid(pid, &wait_status, WNOHANG);
    if (done == pid) return ExitStatus::FromWaitStatus(wait_status);
    if (done < 0 && errno != EINTR) {
      return ErrnoError(absl::StrCat("waitpid ", pid), errno);
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return std::optional<ExitStatus>();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv,
                                         const CommandOptions& options) {
  CaptureFile out, err;
  if (absl::Status s = out.Open(); !s.ok()) return s;
  if (absl::Status s = err.Open(); !s.ok()) return s;
  absl::StatusOr<pid_t> pid = Spawn(argv, out.fd(), err.fd(), options.cwd);
  if (!pid.ok()) return pid.status();

  CommandResult result;
  result.argv = argv;
  absl::StatusOr<ExitStatus> status = WaitWhileRunning(*pid, options,
                                                       &result.timed_out);
  if (!status.ok()) return status.status();
  result.status = *status;
  result.stdout_text = out.Contents();
  result.stderr_text = err.Contents();
  return result;
}

absl::StatusOr<std::string> RunChecked(const std::vector<std::string>& argv) {
  absl::StatusOr<CommandResult> result = RunCommand(argv);
  if (!result.ok()) return result.status();
  if (!result->ok()) {
    return absl::InternalError(absl::StrCat(
        "command failed (", result->status.ToString(), "): ", CommandLine(argv),
        "\n--- stderr ---\n", Tail(result->stderr_text), "--- stdout ---\n",
        Tail(result->stdout_text)));
  }
  return std::move(result->stdout_text);
}

}  // namespace qcow2fuse::test
