#include "unmount_watcher.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <time.h>
#include <unistd.h>

#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// How long the watcher tries again while its open of the view fails with
// ECONNABORTED: the kernel tears a dead daemon's connection down in far
// less.
constexpr int kTries = 500;
constexpr long kPauseNanoseconds = 10'000'000;  // 10 ms, 5 s in all

// Unmounts the dead view at `path` and exits; runs in the watcher. As
// `qcow2fuse -u` does (unmount.cc), but lazily: nothing is left to flush.
[[noreturn]] void UnmountDeadView(const char* path) {
  if (geteuid() == 0) {
    umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW);
    _exit(0);
  }
  // A user's mount: only fusermount3 (set-uid root) may take it down,
  // found on PATH as unmount.cc finds it.
  const char* const argv[] = {"fusermount3", "-u", "-z", "-q", "--", path, nullptr};
  execvp("fusermount3", const_cast<char* const*>(argv));
  _exit(1);
}

// The watcher's life; only async-signal-safe calls, since it was forked.
[[noreturn]] void Watch(const char* path, int daemon_gone) {
  // Its own session: a Ctrl-C meant for a daemon in the foreground must not
  // end the watcher before the daemon.
  setsid();
  signal(SIGINT, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  // No descriptor of the daemon's: not its /dev/fuse (the kernel tears the
  // connection down only when the last one closes), its image locks, or
  // the pipe its foreground parent reads its start-up report from.
  const int gone = fcntl(daemon_gone, F_DUPFD, 3);  // clear of 0 to 2
  const int null = open("/dev/null", O_RDWR | O_CLOEXEC);
  for (int fd = 0; fd < 3; ++fd) dup2(null, fd);
  if (gone != 3) dup2(gone, 3);
  close_range(4, ~0u, 0);

  char byte;
  while (read(3, &byte, 1) < 0 && errno == EINTR) {
  }
  // The daemon has exited: the pipe's write end is closed.
  for (int i = 0; i < kTries; ++i) {
    const int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0) {
      // Unmounted already (the view's file underneath, or nothing), or
      // another daemon serves it.
      close(fd);
      _exit(0);
    }
    if (errno == ENOTCONN) UnmountDeadView(path);
    if (errno != ECONNABORTED && errno != EINTR) _exit(0);
    const struct timespec pause = {0, kPauseNanoseconds};
    nanosleep(&pause, nullptr);
  }
  _exit(0);
}

}  // namespace

absl::StatusOr<pid_t> StartUnmountWatcher(const std::string& mountpoint) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return ErrnoStatus(errno, "a pipe for the unmount watcher");
  const pid_t pid = fork();
  if (pid < 0) {
    const int error = errno;
    close(fds[0]);
    close(fds[1]);
    return ErrnoStatus(error, "starting the unmount watcher");
  }
  if (pid == 0) Watch(mountpoint.c_str(), fds[0]);
  // The write end stays open in the daemon until it exits.
  close(fds[0]);
  return pid;
}

}  // namespace qcow2fuse
