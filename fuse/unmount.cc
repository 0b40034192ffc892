#include "unmount.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <stddef.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "mount_table.h"
#include "qcow2fuse/status.h"

extern char** environ;

namespace qcow2fuse {
namespace {

constexpr int kListenBacklog = 16;
// Connections the daemon holds at most; more wait in the backlog.
constexpr size_t kMaxWaiters = 64;
constexpr char kOkLine[] = "ok";
constexpr char kErrorPrefix[] = "error ";
// Without pidfd_open (Linux < 5.3) the client polls for the pid instead.
constexpr auto kPidPoll = std::chrono::milliseconds(20);
// How long a busy view is retried before -u gives up on it.
constexpr auto kBusyGrace = std::chrono::seconds(2);
constexpr auto kBusyRetry = std::chrono::milliseconds(50);
// How long a new daemon waits for the daemon of an earlier mount with the
// same device number to release the socket name.
constexpr auto kNameReuseWait = std::chrono::seconds(3);

// "\0qcow2fuse/MAJOR:MINOR": abstract, so nothing is left in the file
// system, and the name goes away with the daemon's last descriptor.
socklen_t SocketAddress(const MountEntry& mount, sockaddr_un& addr) {
  std::memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  const std::string name = absl::StrFormat("qcow2fuse/%u:%u", mount.dev_major, mount.dev_minor);
  std::memcpy(addr.sun_path + 1, name.data(), name.size());
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
}

void PrintError(const std::string& message) { std::fprintf(stderr, "qcow2fuse: %s\n", message.c_str()); }

// ---------------------------------------------------------------- client --

// The daemon of a view, as the client knows it.
struct Daemon {
  int socket = -1;  // connected to the daemon's listener
  pid_t pid = 0;
  int pidfd = -1;   // -1: pidfd_open is missing, or the daemon is gone already
  bool gone = false;  // it exited before we could watch it
  ~Daemon() {
    if (socket >= 0) close(socket);
    if (pidfd >= 0) close(pidfd);
  }
};

// Connects to the daemon of `mount`. Returns nullopt when nobody listens
// (the daemon died, or it runs in another network namespace).
absl::StatusOr<std::optional<std::unique_ptr<Daemon>>> ConnectToDaemon(const MountEntry& mount,
                                                                        const std::string& path) {
  auto daemon = std::make_unique<Daemon>();
  daemon->socket = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (daemon->socket < 0) return ErrnoStatus(errno, "socket");
  sockaddr_un addr;
  const socklen_t length = SocketAddress(mount, addr);
  if (connect(daemon->socket, reinterpret_cast<sockaddr*>(&addr), length) != 0) {
    if (errno == ECONNREFUSED || errno == ENOENT) return std::nullopt;
    return ErrnoStatus(errno, absl::StrFormat("cannot reach the daemon of %s", path));
  }
  ucred peer;
  socklen_t peer_length = sizeof peer;
  if (getsockopt(daemon->socket, SOL_SOCKET, SO_PEERCRED, &peer, &peer_length) != 0) {
    return ErrnoStatus(errno, absl::StrFormat("cannot identify the daemon of %s", path));
  }
  // Anyone may bind an abstract name: trust only the view's owner (or root).
  const std::optional<std::string> owner = mount.SuperOption("user_id");
  uid_t owner_uid = 0;
  if (peer.uid != 0 && (!owner || !absl::SimpleAtoi(*owner, &owner_uid) || peer.uid != owner_uid)) {
    return absl::PermissionDeniedError(absl::StrFormat(
        "the process answering for %s (pid %d, uid %u) is not its daemon (the view belongs to uid %s)", path,
        peer.pid, peer.uid, owner.value_or("?")));
  }
  daemon->pid = peer.pid;
  daemon->pidfd = static_cast<int>(syscall(SYS_pidfd_open, peer.pid, 0));
  if (daemon->pidfd < 0) {
    if (errno == ESRCH) {
      daemon->gone = true;
    } else if (errno != ENOSYS) {
      return ErrnoStatus(errno, absl::StrFormat("cannot watch the daemon of %s (pid %d)", path, peer.pid));
    }
  }
  return daemon;
}

// Runs `fusermount3 -u path` (for a caller that may not umount2 itself) and
// returns its complaint, if any.
absl::Status Fusermount(const std::string& path) {
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) return ErrnoStatus(errno, "pipe");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], STDERR_FILENO);
  const char* argv[] = {"fusermount3", "-u", "--", path.c_str(), nullptr};
  pid_t pid;
  const int spawned =
      posix_spawnp(&pid, "fusermount3", &actions, nullptr, const_cast<char* const*>(argv), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(pipe_fds[1]);
  std::string complaint;
  char buf[512];
  ssize_t n;
  while (spawned == 0 && (n = read(pipe_fds[0], buf, sizeof buf)) > 0) complaint.append(buf, n);
  close(pipe_fds[0]);
  if (spawned != 0) return ErrnoStatus(spawned, "cannot run fusermount3");
  int wait_status;
  while (waitpid(pid, &wait_status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0) return absl::OkStatus();
  complaint = std::string(absl::StripAsciiWhitespace(absl::StrReplaceAll(complaint, {{"\n", " "}})));
  if (absl::StrContains(complaint, "busy")) return ErrnoStatus(EBUSY, complaint);
  return absl::UnknownError(complaint.empty() ? "fusermount3 -u failed" : complaint);
}

// Detaches the mount once. Someone else having unmounted it meanwhile is
// fine.
absl::Status DetachOnce(const std::string& path) {
  if (geteuid() != 0) return Fusermount(path);
  if (umount2(path.c_str(), UMOUNT_NOFOLLOW) == 0 || errno == EINVAL) return absl::OkStatus();
  return ErrnoStatus(errno, "umount");
}

// Detaches the mount, waiting out a short EBUSY: a loop device detached a
// moment ago (`losetup -d; qcow2fuse -u`) lets go of the view
// asynchronously.
absl::Status Detach(const std::string& path) {
  const auto deadline = std::chrono::steady_clock::now() + kBusyGrace;
  for (;;) {
    absl::Status status = DetachOnce(path);
    if (status.ok() || StatusErrno(status) != EBUSY || std::chrono::steady_clock::now() >= deadline) return status;
    std::this_thread::sleep_for(kBusyRetry);
  }
}

// Reads the daemon's last line; empty if it closed without one (it was
// killed, or stopped by a signal before this client connected).
std::string ReadOutcome(int socket) {
  std::string line;
  char buf[512];
  for (;;) {
    const ssize_t n = read(socket, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    line.append(buf, n);
  }
  const size_t newline = line.find('\n');
  return newline == std::string::npos ? "" : line.substr(0, newline);
}

void WaitForExit(const Daemon& daemon) {
  // Its pid may belong to another process by now.
  if (daemon.gone) return;
  if (daemon.pidfd >= 0) {
    pollfd p = {daemon.pidfd, POLLIN, 0};
    while (poll(&p, 1, -1) < 0 && errno == EINTR) {
    }
    return;
  }
  // A zombie still answers kill(0), but its files are closed already; one
  // whose parent is gone is reaped by init at once.
  while (kill(daemon.pid, 0) == 0) std::this_thread::sleep_for(kPidPoll);
}

}  // namespace

// ---------------------------------------------------------------- daemon --

absl::StatusOr<std::unique_ptr<UnmountListener>> UnmountListener::Listen(const MountEntry& mount) {
  // Non-blocking: a client may give up between poll() and accept().
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return ErrnoStatus(errno, "socket");
  sockaddr_un addr;
  const socklen_t length = SocketAddress(mount, addr);
  // The device number of a mount that was just unmounted is reused at
  // once, and its daemon lets go of the name only when it sees the unmount
  // (ReleaseName): wait a little for it.
  int bound = bind(fd, reinterpret_cast<sockaddr*>(&addr), length);
  for (auto give_up = std::chrono::steady_clock::now() + kNameReuseWait;
       bound != 0 && errno == EADDRINUSE && std::chrono::steady_clock::now() < give_up;) {
    std::this_thread::sleep_for(kPidPoll);
    bound = bind(fd, reinterpret_cast<sockaddr*>(&addr), length);
  }
  int stop[2];
  if (bound != 0 || listen(fd, kListenBacklog) != 0 || pipe2(stop, O_CLOEXEC) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoStatus(err, absl::StrFormat("cannot listen on @%s", addr.sun_path + 1));
  }
  return std::unique_ptr<UnmountListener>(new UnmountListener(fd, stop[0], stop[1]));
}

UnmountListener::UnmountListener(int listen_fd, int stop_read, int stop_write)
    : listen_fd_(listen_fd), stop_read_(stop_read), stop_write_(stop_write), thread_([this] { Run(); }) {}

UnmountListener::~UnmountListener() {
  std::lock_guard lock(mu_);
  if (!thread_stopped_) StopThread();
  for (int client : clients_) close(client);
  if (listen_fd_ >= 0) close(listen_fd_);
  close(stop_read_);
  close(stop_write_);
}

bool UnmountListener::MayWait(int client) {
  ucred peer;
  socklen_t peer_length = sizeof peer;
  return getsockopt(client, SOL_SOCKET, SO_PEERCRED, &peer, &peer_length) == 0 &&
         (peer.uid == 0 || peer.uid == geteuid());
}

void UnmountListener::Run() {
  for (;;) {
    std::vector<pollfd> fds = {{stop_read_, POLLIN, 0},
                               {listen_fd_, static_cast<short>(clients_.size() < kMaxWaiters ? POLLIN : 0), 0}};
    for (int client : clients_) fds.push_back({client, POLLIN, 0});
    if (poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return;  // cannot happen with valid descriptors; -u still sees the exit
    }
    if (fds[0].revents != 0) return;
    // A client only ever waits: anything it sends, or its hang-up, ends it.
    for (size_t i = fds.size(); i-- > 2;) {
      if (fds[i].revents == 0) continue;
      close(fds[i].fd);
      clients_.erase(clients_.begin() + (i - 2));
    }
    if (fds[1].revents & POLLIN) {
      const int client = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (client < 0) continue;
      if (!MayWait(client)) {
        close(client);
        continue;
      }
      clients_.push_back(client);
    }
  }
}

void UnmountListener::StopThread() {
  thread_stopped_ = true;
  (void)!write(stop_write_, "x", 1);
  thread_.join();
}

void UnmountListener::AcceptRestAndClose() {
  if (listen_fd_ < 0) return;
  for (int client; (client = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC)) >= 0;) {
    // No cap here: the listen backlog bounds these, and each one waits.
    if (MayWait(client)) {
      clients_.push_back(client);
    } else {
      close(client);
    }
  }
  close(listen_fd_);
  listen_fd_ = -1;
}

void UnmountListener::ReleaseName() {
  std::lock_guard lock(mu_);
  if (!thread_stopped_) StopThread();
  AcceptRestAndClose();
}

void UnmountListener::Announce(const absl::Status& outcome) {
  std::lock_guard lock(mu_);
  if (announced_) return;
  announced_ = true;
  if (!thread_stopped_) StopThread();
  AcceptRestAndClose();
  std::string line = outcome.ok() ? kOkLine
                                  : kErrorPrefix + absl::StrReplaceAll(outcome.message(), {{"\n", " "}});
  line += '\n';
  for (int client : clients_) {
    // A client that went away must not kill us with SIGPIPE.
    (void)!send(client, line.data(), line.size(), MSG_NOSIGNAL);
    close(client);
  }
  clients_.clear();
}

// ----------------------------------------------------------------- -u --

int UnmountCommand(const std::string& given) {
  absl::StatusOr<std::string> path = CanonicalMountPath(given);
  if (!path.ok()) {
    PrintError(std::string(path.status().message()));
    return 1;
  }
  absl::StatusOr<std::optional<MountEntry>> mount = FindMount(*path);
  if (!mount.ok()) {
    PrintError(std::string(mount.status().message()));
    return 1;
  }
  if (!mount->has_value()) {
    PrintError(absl::StrFormat("%s is not a qcow2fuse view (not a mount point)", *path));
    return 1;
  }
  if ((*mount)->fs_type != kViewFsType) {
    PrintError(absl::StrFormat("%s is not a qcow2fuse view (it is a %s mount)", *path, (*mount)->fs_type));
    return 1;
  }
  // fusermount3 would refuse another user's view with a puzzling word
  // about /etc/mtab: say who may unmount it.
  const std::optional<std::string> owner = (*mount)->SuperOption("user_id");
  uid_t owner_uid = 0;
  if (getuid() != 0 && owner && absl::SimpleAtoi(*owner, &owner_uid) && owner_uid != getuid()) {
    PrintError(absl::StrFormat("%s belongs to uid %u: only its owner or root can unmount it", *path, owner_uid));
    return 1;
  }
  absl::StatusOr<std::optional<std::unique_ptr<Daemon>>> daemon = ConnectToDaemon(**mount, *path);
  if (!daemon.ok()) {
    PrintError(std::string(daemon.status().message()));
    return 1;
  }
  if (absl::Status detached = Detach(*path); !detached.ok()) {
    if (StatusErrno(detached) == EBUSY) {
      PrintError(absl::StrFormat("%s is busy (a loop device or an open file uses it); it stays mounted", *path));
    } else {
      PrintError(absl::StrFormat("cannot unmount %s: %s", *path, detached.message()));
    }
    return 1;
  }
  if (!daemon->has_value()) {
    // Every daemon listens from before its view answers: nobody listening
    // means the daemon is dead (a crash, kill -9), and the mount was a
    // leftover. Its locks went with it.
    PrintError(absl::StrFormat("unmounted %s, whose daemon was not running (no final flush was done)", *path));
    return 1;
  }
  const Daemon& d = ***daemon;
  const std::string outcome = ReadOutcome(d.socket);
  WaitForExit(d);
  if (outcome == kOkLine) return 0;
  if (absl::StartsWith(outcome, kErrorPrefix)) {
    PrintError(absl::StrFormat("%s is unmounted, but %s", *path, outcome.substr(sizeof kErrorPrefix - 1)));
  } else {
    PrintError(absl::StrFormat("%s is unmounted, but its daemon (pid %d) exited without confirming its final flush",
                               *path, d.pid));
  }
  return 1;
}

}  // namespace qcow2fuse
