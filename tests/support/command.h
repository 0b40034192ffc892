// Runs external programs (qemu-img, fusermount3, losetup, ...) from tests.
//
// A program and its arguments always travel as a vector and are started
// with posix_spawnp, never through a shell, so paths with spaces or quotes
// reach the program unchanged. Output is captured into unlinked temporary
// files rather than pipes: a child that writes a lot to stderr can never
// block against a parent that is waiting for it to exit.
//
// Typical use in a test:
//
//   ASSERT_OK(RunChecked({"qemu-img", "create", "-f", "qcow2", path, "8M"}));
//
// where a failure reports the command line, how the program ended and
// what it wrote to stderr.

#ifndef QCOW2FUSE_TESTS_SUPPORT_COMMAND_H_
#define QCOW2FUSE_TESTS_SUPPORT_COMMAND_H_

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcow2fuse::test {

// How a child process ended, decoded from a waitpid() status word.
class ExitStatus {
 public:
  static ExitStatus FromWaitStatus(int wait_status);

  bool exited() const { return exited_; }
  // Exit code; meaningful only if exited().
  int code() const { return code_; }
  bool signaled() const { return !exited_; }
  // Terminating signal; meaningful only if signaled().
  int signal() const { return signal_; }

  // True for a normal exit with code 0.
  bool success() const { return exited_ && code_ == 0; }

  // "exit code 3" or "killed by signal 9 (Killed)".
  std::string ToString() const;

 private:
  bool exited_ = true;
  int code_ = 0;
  int signal_ = 0;
};

// Everything a finished command left behind.
struct CommandResult {
  std::vector<std::string> argv;
  ExitStatus status;
  // It overran CommandOptions::timeout and was killed (status says SIGKILL).
  bool timed_out = false;
  std::string stdout_text;
  std::string stderr_text;

  bool ok() const { return status.success(); }
};

// Renders `argv` as one shell command line, quoting only where needed, so
// a failure message can be pasted into a terminal to reproduce it.
std::string CommandLine(const std::vector<std::string>& argv);

struct CommandOptions {
  // Working directory of the child; empty means ours.
  std::string cwd;
  // A child still running after this long is killed with SIGKILL (that pid
  // only: it is our unreaped child), so a hang fails a test instead of
  // stalling it. None means wait for as long as it takes.
  std::optional<std::chrono::milliseconds> timeout;
  // Called every few milliseconds while the child runs, for a caller that
  // must react to what the child does (e.g. take down a mount it made).
  std::function<void()> while_running;
};

// Runs argv[0] (looked up in $PATH) with `argv`, stdin from /dev/null, and
// waits for it. The result is an error only if the program could not be
// started or waited for; a non-zero exit, a signal or a timeout is reported
// in CommandResult.
absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv,
                                         const CommandOptions& options = {});

// Like RunCommand, but any way of not exiting with code 0 is an error whose
// message holds the command line, how it ended and its stderr. Returns the
// program's stdout.
absl::StatusOr<std::string> RunChecked(const std::vector<std::string>& argv);

// Low-level pieces, for callers that keep a child running (see mount.h).

// Starts `argv` with stdin from /dev/null, stdout/stderr sent to the given
// descriptors (which may be equal) and, unless `cwd` is empty, `cwd` as its
// working directory. Returns the child's pid.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, int stdout_fd,
                            int stderr_fd, const std::string& cwd = "");

// Waits for `pid` to exit, for as long as it takes.
absl::StatusOr<ExitStatus> WaitForExit(pid_t pid);

// Waits up to `timeout` for `pid` to exit, polling. Returns nullopt if it
// is still running then, and an error if it cannot be waited for (not our
// child, or already reaped): a caller must then not signal that pid, which
// may belong to someone else by now.
absl::StatusOr<std::optional<ExitStatus>> WaitForExitFor(
    pid_t pid, std::chrono::milliseconds timeout);

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_SUPPORT_COMMAND_H_
