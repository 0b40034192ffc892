// qcow2fuse: shows a qcow2 disk image as one raw file.
//
// Start-up order matters for error reporting: everything that can fail
// (options, opening the image and its chain, the mountpoint, the mount
// itself) happens before the command returns, so a failure is one line on
// stderr and a non-zero exit with nothing mounted. Without -f the work is
// done in a child process, and the parent waits until the child reports
// that the kernel's INIT was answered: then the view answers requests.

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "log.h"
#include "ops.h"
#include "options.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/scheduler.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

constexpr char kVersion[] = "0.1.0";
constexpr int kMallocArenas = 2;

// Reports the outcome of start-up to the waiting parent, once: an empty
// message means success. Without a parent (-f) it does nothing.
class StartupReport {
 public:
  explicit StartupReport(int fd) : fd_(fd) {}
  ~StartupReport() {
    if (fd_ >= 0) close(fd_);
  }
  void Send(const std::string& error) {
    if (fd_ < 0) return;
    const char status = error.empty() ? 0 : 1;
    (void)!write(fd_, &status, 1);
    (void)!write(fd_, error.data(), error.size());
    close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

// Bounds how long a stop may wait for requests. Once the session has been
// told to end (unmount, SIGTERM), the loop waits for every request still
// running; one stuck in the engine (its backing file on a hung network
// file system) would keep the daemon and the mount forever. After
// `timeout` the watchdog calls `give_up`, which must not return.
class StopWatchdog {
 public:
  StopWatchdog(fuse_session* session, std::chrono::seconds timeout, std::function<void()> give_up)
      : session_(session), timeout_(timeout), give_up_(std::move(give_up)), thread_([this] { Watch(); }) {}
  // The requests are drained: nothing left to watch.
  ~StopWatchdog() {
    {
      std::lock_guard lock(mu_);
      drained_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void Watch() {
    // libfuse's signal handler only sets a flag, so the start of a stop is
    // polled for; a tenth of a second is nothing next to the timeout.
    constexpr auto kPoll = std::chrono::milliseconds(100);
    std::unique_lock lock(mu_);
    while (!drained_ && !fuse_session_exited(session_)) cv_.wait_for(lock, kPoll);
    if (cv_.wait_for(lock, timeout_, [this] { return drained_; })) return;
    give_up_();
  }

  fuse_session* const session_;
  const std::chrono::seconds timeout_;
  const std::function<void()> give_up_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool drained_ = false;  // under mu_
  std::thread thread_;    // last: starts once the rest is set
};

// Makes sure MOUNTPOINT is a regular file, creating it if missing. Returns
// whether it was created (and so is ours to remove afterwards).
absl::StatusOr<bool> PrepareMountpoint(const std::string& path, struct stat& st) {
  if (stat(path.c_str(), &st) == 0) {
    if (!S_ISREG(st.st_mode)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "mountpoint %s is not a regular file (the view is one file, not a directory)", path));
    }
    return false;
  }
  if (errno != ENOENT) return ErrnoStatus(errno, absl::StrFormat("mountpoint %s", path));
  int fd = open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus(errno, absl::StrFormat("create mountpoint %s", path));
  fstat(fd, &st);
  close(fd);
  return true;
}

void DetachFromTerminal() {
  setsid();
  if (chdir("/") != 0) {
    // Harmless: every path we use is absolute.
  }
  int null = open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    dup2(null, STDIN_FILENO);
    dup2(null, STDOUT_FILENO);
    dup2(null, STDERR_FILENO);
    if (null > STDERR_FILENO) close(null);
  }
}

// Everything from opening the image to unmounting. Returns the exit code.
int Serve(const MountOptions& options, StartupReport& report) {
  auto fail = [&](const std::string& message) {
    if (options.foreground) std::fprintf(stderr, "qcow2fuse: %s\n", message.c_str());
    report.Send(message);
    return 1;
  };

  absl::StatusOr<std::unique_ptr<Image>> image =
      SyncWait(Image::Open(options.image, options.image_options));
  if (!image.ok()) return fail(std::string(image.status().message()));

  MountState state;
  state.image = image->get();
  state.image_path = options.image;
  absl::StatusOr<bool> created = PrepareMountpoint(options.mountpoint, state.mountpoint_stat);
  if (!created.ok()) return fail(std::string(created.status().message()));
  auto remove_created = [&] {
    if (*created) unlink(options.mountpoint.c_str());
  };

  std::vector<std::string> arg_strings = {"qcow2fuse", "-o"};
  std::string mount_opts = "fsname=" + options.image + ",subtype=qcow2fuse,default_permissions";
  if (options.image_options.read_only) mount_opts += ",ro";
  if (options.allow_other) mount_opts += ",allow_other";
  arg_strings.push_back(mount_opts);
  if (options.debug) arg_strings.push_back("-d");
  std::vector<char*> argv;
  for (std::string& s : arg_strings) argv.push_back(s.data());
  struct fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());

  fuse_session* session = fuse_session_new(&args, &Operations(), sizeof(fuse_lowlevel_ops), &state);
  fuse_opt_free_args(&args);  // the session keeps copies of what it needs
  if (session == nullptr) {
    remove_created();
    return fail("cannot create the FUSE session");
  }
  if (fuse_session_mount(session, options.mountpoint.c_str()) != 0) {
    fuse_session_destroy(session);
    remove_created();
    return fail(absl::StrFormat("cannot mount on %s (is /dev/fuse available?)", options.mountpoint));
  }
  if (fuse_set_signal_handlers(session) != 0) {
    fuse_session_unmount(session);
    fuse_session_destroy(session);
    remove_created();
    return fail("cannot install signal handlers");
  }

  if (!options.pidfile.empty()) {
    if (FILE* f = std::fopen(options.pidfile.c_str(), "w")) {
      std::fprintf(f, "%d\n", getpid());
      std::fclose(f);
    }
  }

  // glibc gives every thread a malloc arena of its own (up to eight per
  // core), and each keeps what its thread freed: with 16 workers that
  // tripled the peak RSS (42 MiB against 12 MiB with two arenas, after
  // random reads across a 1 TiB image) for no measurable speed.
  mallopt(M_ARENA_MAX, kMallocArenas);

  int loop_result;
  {
    // Threads start here, after any fork. Requests run on libfuse's worker
    // threads (Scheduler::Start), so the scheduler needs none of its own.
    Scheduler scheduler(/*threads=*/0);
    state.scheduler = &scheduler;
    state.on_ready = [&] {
      if (!options.foreground) {
        report.Send("");
        LogToSyslog();
        DetachFromTerminal();
      }
      Log(LogLevel::kInfo, absl::StrFormat("serving %s on %s: %s", options.image,
                                           options.mountpoint, (*image)->DescribeChain()));
      Log(LogLevel::kInfo, absl::StrFormat("requests run on up to %d threads, each doing its "
                                           "file I/O synchronously (pread/pwrite)",
                                           options.threads));
    };
    // Each worker reads requests from its own clone of the /dev/fuse fd and
    // runs them itself; libfuse starts workers as requests arrive, up to
    // `threads`, and keeps them (an idle worker costs one blocked read).
    fuse_loop_config* loop_config = fuse_loop_cfg_create();
    fuse_loop_cfg_set_clone_fd(loop_config, 1);
    fuse_loop_cfg_set_max_threads(loop_config, options.threads);
    fuse_loop_cfg_set_idle_threads(loop_config, options.threads);
    {
      StopWatchdog watchdog(session, std::chrono::seconds(options.drain_timeout_seconds), [&] {
        // The image is as a crash would leave it: consistent, without the
        // stuck requests' changes, and without unflushed ones (a flush
        // would wait for the locks the stuck requests hold).
        Log(LogLevel::kError,
            absl::StrFormat("%u requests still running %d s after the stop; exiting without them",
                            scheduler.in_flight(), options.drain_timeout_seconds));
        fuse_session_unmount(session);
        remove_created();
        if (!options.pidfile.empty()) unlink(options.pidfile.c_str());
        _exit(1);
      });
      loop_result = fuse_session_loop_mt(session, loop_config);
      // Requests still running hold `req` pointers of this session.
      scheduler.Drain();
    }
    fuse_loop_cfg_destroy(loop_config);
  }
  // What was written reaches the disk before we go.
  absl::Status flushed = SyncWait((*image)->Flush());
  if (!flushed.ok()) {
    Log(LogLevel::kError, absl::StrFormat("flushing the image at unmount: %s", flushed.ToString()));
  }

  fuse_remove_signal_handlers(session);
  fuse_session_unmount(session);
  fuse_session_destroy(session);
  remove_created();
  if (!options.pidfile.empty()) unlink(options.pidfile.c_str());
  // libfuse ends the loop with the number of the signal that stopped it: a
  // clean stop, as is an unmount.
  const int signal = loop_result < 0 ? -loop_result : loop_result;
  if (!flushed.ok()) return 1;
  if (loop_result == -ECONNABORTED) {
    // The kernel dropped the connection (a forced or lazy unmount); the
    // image has been flushed all the same, so this is an unmount too.
    Log(LogLevel::kWarning, "the kernel aborted the FUSE connection; the image is flushed");
    return 0;
  }
  if (loop_result != 0 && signal != SIGTERM && signal != SIGINT && signal != SIGHUP) {
    Log(LogLevel::kError, absl::StrFormat("FUSE session ended with error %d", loop_result));
    return 1;
  }
  Log(LogLevel::kInfo, "unmounted");
  return 0;
}

// Forks; the parent waits for the child's start-up report and exits with
// its outcome, the child goes on to serve.
int Daemonize(const MountOptions& options) {
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) {
    std::fprintf(stderr, "qcow2fuse: pipe: %s\n", std::strerror(errno));
    return 1;
  }
  pid_t pid = fork();
  if (pid < 0) {
    std::fprintf(stderr, "qcow2fuse: fork: %s\n", std::strerror(errno));
    return 1;
  }
  if (pid == 0) {
    close(pipe_fds[0]);
    StartupReport report(pipe_fds[1]);
    int code = Serve(options, report);
    _exit(code);
  }
  close(pipe_fds[1]);
  char status = 1;
  std::string message;
  ssize_t n = read(pipe_fds[0], &status, 1);
  char buf[4096];
  ssize_t m;
  while ((m = read(pipe_fds[0], buf, sizeof buf)) > 0) message.append(buf, m);
  close(pipe_fds[0]);
  if (n == 1 && status == 0) return 0;
  if (message.empty()) {
    int wstatus;
    waitpid(pid, &wstatus, 0);
    message = "the daemon exited during start-up";
  }
  std::fprintf(stderr, "qcow2fuse: %s\n", message.c_str());
  return 1;
}

int Main(int argc, char** argv) {
  absl::StatusOr<MountOptions> options = ParseCommandLine(argc, argv);
  if (!options.ok()) {
    std::fprintf(stderr, "qcow2fuse: %s\n%s", std::string(options.status().message()).c_str(),
                 UsageText());
    return 2;
  }
  if (options->help) {
    std::fputs(UsageText(), stdout);
    return 0;
  }
  if (options->version) {
    std::printf("qcow2fuse %s (libfuse %s)\n", kVersion, fuse_pkgversion());
    return 0;
  }
  if (options->foreground) {
    StartupReport none(-1);
    return Serve(*options, none);
  }
  return Daemonize(*options);
}

}  // namespace
}  // namespace qcow2fuse

int main(int argc, char** argv) { return qcow2fuse::Main(argc, argv); }
