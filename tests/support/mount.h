// Mounting a qcow2fuse view for the length of a test, and never longer.
//
//   MountOptions options;
//   options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
//   options.image = dir.Join("disk.qcow2");
//   options.mountpoint = dir.Join("disk.raw");
//   ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
//                        MountedView::Start(options));
//   ... read view->path() ...
//   ASSERT_OK(view->Unmount());
//   EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
//
// Start() runs `qcow2fuse -f -o ro[,more] IMAGE MOUNTPOINT` (without ro when
// read_only is false) as a child with
// stdout and stderr going to a log file, and returns once MOUNTPOINT shows
// up in /proc/self/mountinfo as a fuse mount and stat() works on it (or
// fails within a bounded time, with the log in the error).
//
// Whatever happens to the test, the destructor takes the mount down:
// `fusermount3 -u`, then a bounded wait for the child; only if that fails
// is the child (that pid, and no other process) killed with SIGKILL and the
// mount detached with `fusermount3 -uz`. The child is also started under
// `setpriv --pdeathsig TERM`, so if the test process itself dies (a crash,
// or ctest killing it at its timeout) the daemon is told to unmount and
// exit rather than being left behind.
//
// If the test has failed by the time the view goes away, the tail of the
// daemon's log is printed, as it usually explains the failure.
//
// Close every descriptor open on the view before unmounting: an open file
// makes `fusermount3 -u` fail with EBUSY, and Unmount() only waits out a
// holder that lets go by itself (a loop device being detached).

#ifndef QCOW2FUSE_TESTS_SUPPORT_MOUNT_H_
#define QCOW2FUSE_TESTS_SUPPORT_MOUNT_H_

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "support/command.h"

namespace qcow2fuse::test {

// One line of /proc/self/mountinfo, the fields tests care about.
struct MountEntry {
  std::string mount_point;  // Octal escapes (\040 etc.) already decoded.
  std::string fs_type;      // "fuse", "fuse.qcow2fuse", "ext4", ...
  std::string source;
  std::string device;       // "MAJOR:MINOR", the mount's st_dev.
  std::vector<std::string> super_options;  // "max_read=524288", ...
};

// The mount table as this process sees it.
absl::StatusOr<std::vector<MountEntry>> ReadMountInfo();

// The file system type mounted at `path` (the topmost one), or nullopt if
// `path` is not a mount point. `path` must be absolute and canonical.
std::optional<std::string> MountedFsType(const std::string& path);

// The super block's options of the mount at `path` (absolute and
// canonical), or nullopt if `path` is not a mount point.
std::optional<std::vector<std::string>> MountSuperOptions(const std::string& path);

// The kernel's readahead, in KiB, of the mount at `path` (absolute and
// canonical): its /sys/class/bdi/MAJOR:MINOR/read_ahead_kb, the device
// number taken from mountinfo (a mount of another user may not be stat()ed).
absl::StatusOr<uint64_t> ReadaheadKb(const std::string& path);

// The qcow2fuse executable to test: $QCOW2FUSE_BINARY if set (to try an
// installed or instrumented build), else `built` (the build tree's,
// passed in by CMake).
std::string Qcow2fuseBinary(const char* built);

struct MountOptions {
  std::string binary;      // Path to the qcow2fuse executable.
  std::string image;       // IMAGE argument.
  std::string mountpoint;  // MOUNTPOINT argument; its directory must exist.
  // Mount read-only (-o ro); false mounts the image read-write.
  bool read_only = true;
  // Joined after "ro" into the single -o argument, e.g. {"l2_cache_size=1M"}.
  std::vector<std::string> extra_options;
  // Where the child's stdout and stderr go; empty means mountpoint + ".log".
  std::string log_path;
  // How long Start() waits for the mount to become live.
  std::chrono::milliseconds start_timeout = std::chrono::seconds(10);
  // How long unmounting waits for the child to exit after fusermount3 -u.
  std::chrono::milliseconds stop_timeout = std::chrono::seconds(10);
};

class MountedView {
 public:
  // Starts the daemon and waits until the view is live. On failure nothing
  // is left mounted or running, and the error carries the daemon's log.
  static absl::StatusOr<std::unique_ptr<MountedView>> Start(
      const MountOptions& options);

  MountedView(const MountedView&) = delete;
  MountedView& operator=(const MountedView&) = delete;
  ~MountedView();

  // The raw view (the canonical mount point path).
  const std::string& path() const { return mountpoint_; }
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }
  // The command line the daemon was started with, for messages.
  const std::string& command_line() const { return command_line_; }

  // Everything the daemon has written to stdout/stderr so far.
  std::string ReadLog() const;

  // `fusermount3 -u`, retried for up to 10 s while it fails (the view is
  // busy), then waits (bounded) for the daemon to exit. An error means the
  // unmount or the wait failed; the destructor will then fall back to
  // SIGKILL. Calling it again after success does nothing.
  absl::Status Unmount();

  // Sends `signal` to the daemon and waits (bounded) for it to exit, e.g.
  // to check that SIGTERM unmounts cleanly.
  absl::Status StopWithSignal(int signal);

  // How the daemon ended, once it has been reaped (after Unmount(),
  // StopWithSignal() or its own early death).
  const std::optional<ExitStatus>& exit_status() const { return exit_status_; }

 private:
  MountedView(std::string mountpoint, std::string log_path,
              std::string command_line, pid_t pid,
              std::chrono::milliseconds stop_timeout);

  absl::Status WaitUntilLive(std::chrono::milliseconds timeout);
  // Reaps the child if it has exited, without blocking. True if reaped.
  bool ReapIfExited();
  absl::Status WaitForChild();
  void ForceCleanup();

  const std::string mountpoint_;
  const std::string log_path_;
  const std::string command_line_;
  const pid_t pid_;
  const std::chrono::milliseconds stop_timeout_;
  bool reaped_ =
      false;  // True once waitpid() collected pid_: never signal it then.
  std::optional<ExitStatus> exit_status_;
};

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_SUPPORT_MOUNT_H_
