// qcow2fuse: shows a qcow2 disk image as one raw file.
//
// Start-up order matters for error reporting: everything that can fail
// (options, opening the image and its chain, the mountpoint, the mount
// itself) happens before the command returns, so a failure is one line on
// stderr and a non-zero exit with nothing mounted. Without -f the work is
// done in a child process, and the parent waits until the child reports
// that the kernel's INIT was answered: then the view answers requests.
//
// The daemon never does I/O through a path that may lead into its own
// mount: the mountpoint is checked in the mount table rather than by stat,
// a mountpoint that is a file of the image's chain is refused, and the
// view's timestamps and statfs come from the image's open descriptor.
//
// `qcow2fuse -u MOUNTPOINT` (unmount.h) unmounts and waits for the daemon.

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
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
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/algorithm/container.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "init_flags.h"
#include "log.h"
#include "mount_table.h"
#include "opener.h"
#include "ops.h"
#include "options.h"
#include "overlay.h"
#include "periodic_flush.h"
#include "readahead.h"
#include "unmount.h"
#include "unmount_watcher.h"
#include "uring_channel.h"
#include "worker_gate.h"
#include "qcow2fuse/blocking.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/scheduler.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

constexpr char kVersion[] = QCOW2FUSE_VERSION;  // project(VERSION) in CMakeLists.txt
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
  // The loop has returned: the stop has begun, whatever the session says
  // (libfuse's loop clears its "exited" flag as it returns).
  void Begin() {
    {
      std::lock_guard lock(mu_);
      begun_ = true;
    }
    cv_.notify_all();
  }

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
    while (!drained_ && !begun_ && !fuse_session_exited(session_)) cv_.wait_for(lock, kPoll);
    if (cv_.wait_for(lock, timeout_, [this] { return drained_; })) return;
    give_up_();
  }

  fuse_session* const session_;
  const std::chrono::seconds timeout_;
  const std::function<void()> give_up_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool drained_ = false;  // under mu_
  bool begun_ = false;    // under mu_
  std::thread thread_;    // last: starts once the rest is set
};

// A mount stacked on another would hide it, and stat()ing the path to
// check it (as PrepareMountpoint does) would wait for whatever serves the
// mount below, possibly forever: look in the mount table instead.
absl::Status CheckNotMounted(const std::string& path) {
  absl::StatusOr<std::optional<MountEntry>> mount = FindMount(path);
  if (!mount.ok()) return mount.status();
  if (!mount->has_value()) return absl::OkStatus();
  const MountEntry& m = **mount;
  const std::string what = m.fs_type == kViewFsType
                               ? absl::StrFormat("a qcow2fuse view of %s", m.source)
                               : absl::StrFormat("a %s mount of %s", m.fs_type, m.source);
  return absl::FailedPreconditionError(
      absl::StrFormat("mountpoint %s is already a mount point (%s); unmount it first", path, what));
}

// Refuses a mountpoint that is a file of the image's own chain: every read
// of the view would then go through the view itself, and the daemon would
// wait for itself. Compares inodes, so hard links and other names of the
// file are caught too.
absl::Status CheckNotInChain(const std::string& path, const struct stat& mountpoint, const std::vector<int>& fds) {
  for (size_t i = 0; i < fds.size(); ++i) {
    struct stat st;
    if (fstat(fds[i], &st) != 0 || st.st_dev != mountpoint.st_dev || st.st_ino != mountpoint.st_ino) continue;
    if (i == 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("mountpoint %s is the image file itself: the view would read itself", path));
    }
    // The descriptor's link names the file even if it was reached through
    // a relative backing path.
    char name[PATH_MAX] = "";
    const ssize_t n = readlink(absl::StrFormat("/proc/self/fd/%d", fds[i]).c_str(), name, sizeof name - 1);
    if (n > 0) name[n] = '\0';
    return absl::InvalidArgumentError(absl::StrFormat(
        "mountpoint %s is %s, a file of the image's chain (backing or data file): the view would read itself",
        path, n > 0 ? name : "a file"));
  }
  return absl::OkStatus();
}

// Makes sure MOUNTPOINT is a regular file (single-file mode) or a
// directory (directory mode), creating a file if it is missing. Returns
// whether it was created (and so is ours to remove afterwards).
absl::StatusOr<bool> PrepareMountpoint(const std::string& path, struct stat& st) {
  if (stat(path.c_str(), &st) == 0) {
    if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "mountpoint %s is neither a regular file (for the disk as one file) nor a directory (for the disk, "
          "its partitions and snapshots as files)",
          path));
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

// Whether /etc/fuse.conf lets users other than root mount with
// allow_other or allow_root (fusermount3 refuses them otherwise).
bool UserAllowOther() {
  FILE* f = std::fopen("/etc/fuse.conf", "re");
  if (f == nullptr) return false;
  bool allowed = false;
  char line[512];
  while (std::fgets(line, sizeof line, f) != nullptr) {
    absl::string_view text = line;
    text = text.substr(0, text.find('#'));
    if (absl::StripAsciiWhitespace(text) == "user_allow_other") allowed = true;
  }
  std::fclose(f);
  return allowed;
}

// What makes a mount fail for certain, found before trying it: each gets
// one line saying what to do, where libfuse and fusermount3 would print
// several lines or none.
absl::Status CheckCanMount(const std::string& mountpoint, const MountOptions& options) {
  if (access("/dev/fuse", F_OK) != 0) {
    return absl::FailedPreconditionError(
        "cannot mount: there is no /dev/fuse; load the fuse kernel module (modprobe fuse)");
  }
  if (geteuid() == 0) return absl::OkStatus();
  if (const int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC); fd >= 0) {
    close(fd);
  } else if (errno == EACCES || errno == EPERM) {
    return absl::FailedPreconditionError(
        "cannot mount: /dev/fuse is not open to this user; it needs mode 0666, as Debian's udev rules set it "
        "(chmod 0666 /dev/fuse as root)");
  }
  if ((options.allow_other || options.allow_root) && !UserAllowOther()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s needs the line user_allow_other in /etc/fuse.conf when qcow2fuse does not run as root; "
        "add it as root, or mount without %s",
        options.allow_other ? "allow_other" : "allow_root", options.allow_other ? "allow_other" : "allow_root"));
  }
  if (access(mountpoint.c_str(), W_OK) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "cannot mount on %s: you may not write to it, and fusermount3 lets a user other than root mount only "
        "on a file they may write",
        mountpoint));
  }
  return absl::OkStatus();
}

// Mounts `session` on `mountpoint`. libfuse logs why a mount failed, and
// fusermount3 (which mounts for a user other than root) prints why on our
// stderr; both are caught and told as one line.
absl::Status Mount(fuse_session* session, const std::string& mountpoint, const MountOptions& options) {
  if (absl::Status can = CheckCanMount(mountpoint, options); !can.ok()) return can;
  // No other thread runs yet, so borrowing stderr is safe. A memfd, not a
  // pipe: with auto_unmount fusermount3 lives on and keeps it open.
  const int catcher = memfd_create("qcow2fuse-mount-errors", MFD_CLOEXEC);
  const int saved_stderr = catcher >= 0 ? fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3) : -1;
  if (saved_stderr >= 0) dup2(catcher, STDERR_FILENO);
  int result;
  std::string said;
  {
    LibfuseLogCapture capture;
    result = fuse_session_mount(session, mountpoint.c_str());
    said = capture.text();
  }
  if (saved_stderr >= 0) {
    dup2(saved_stderr, STDERR_FILENO);
    close(saved_stderr);
    char buffer[4096];
    const ssize_t n = pread(catcher, buffer, sizeof buffer, 0);
    if (n > 0) said.append(buffer, n);
  }
  if (catcher >= 0) close(catcher);
  if (result == 0) return absl::OkStatus();
  std::vector<std::string> reasons;
  for (absl::string_view line : absl::StrSplit(said, '\n', absl::SkipWhitespace())) {
    for (absl::string_view prefix : {"fuse: ", "fusermount3: ", "fusermount: "}) absl::ConsumePrefix(&line, prefix);
    std::string reason(absl::StripAsciiWhitespace(line));
    if (std::find(reasons.begin(), reasons.end(), reason) == reasons.end()) reasons.push_back(reason);
  }
  return absl::FailedPreconditionError(absl::StrFormat(
      "cannot mount on %s: %s", mountpoint, reasons.empty() ? "the kernel refused" : absl::StrJoin(reasons, "; ")));
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

Task<void> FlushInto(Image& image, absl::Status& status) { status = co_await image.Flush(); }
Task<void> SyncDataInto(Image& image, absl::Status& status) { status = co_await image.SyncData(); }

// Everything from opening the image to unmounting. Returns the exit code.
int Serve(const MountOptions& options, StartupReport& report) {
  auto fail = [&](const std::string& message) {
    if (options.foreground) std::fprintf(stderr, "qcow2fuse: %s\n", message.c_str());
    report.Send(message);
    return 1;
  };

  // Warnings of the start-up, logged once the log has its final place
  // (syslog, for a daemon): until then stderr is the user's terminal, where
  // only a refusal belongs.
  std::vector<std::string> warnings;

  // First, before any thread starts, so that every thread has it: writeback
  // of a loop device on the view waits for this process, so the memory
  // reclaim of its own allocations must not start I/O (which could be that
  // very writeback). Without CAP_SYS_RESOURCE the view still works.
  // Only root sets up loop devices: a view closed to root needs no warning.
  const bool root_may_open = geteuid() == 0 || options.allow_other || options.allow_root;
  if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0 && root_may_open) {
    warnings.push_back(absl::StrFormat(
        "cannot set PR_SET_IO_FLUSHER (%s; it needs CAP_SYS_RESOURCE): a loop device on this view may "
        "deadlock under memory pressure",
        std::strerror(errno)));
  }

  if (!options.log_file.empty()) {
    if (absl::Status opened = LogAlsoToFile(options.log_file); !opened.ok()) return fail(std::string(opened.message()));
  }

  absl::StatusOr<std::string> mountpoint = CanonicalMountPath(options.mountpoint);
  if (!mountpoint.ok()) return fail(absl::StrFormat("mountpoint: %s", mountpoint.status().message()));
  if (absl::Status free = CheckNotMounted(*mountpoint); !free.ok()) return fail(std::string(free.message()));

  // -o overlay= and -o volatile serve a new image over IMAGE. Declared
  // before the image, so that it outlives it.
  std::optional<Overlay> overlay;
  std::string served = options.image;  // what the messages call the image
  std::string open_path = options.image;
  if (!options.overlay.empty() || options.volatile_overlay) {
    absl::StatusOr<Overlay> made = Overlay::Make(options);
    if (!made.ok()) return fail(std::string(made.status().message()));
    overlay.emplace(*std::move(made));
    open_path = overlay->path();
    served = options.volatile_overlay ? absl::StrFormat("a volatile overlay over %s", options.image)
                                      : absl::StrFormat("%s (an overlay over %s)", options.overlay, options.image);
  }
  absl::StatusOr<std::unique_ptr<Image>> image = SyncWait(Image::Open(open_path, options.image_options));
  if (!image.ok()) {
    std::string message(image.status().message());
    const std::optional<int> error = StatusErrno(image.status());
    if (error && (*error == EACCES || *error == EPERM || *error == EROFS) && !options.image_options.read_only &&
        absl::StrContains(message, options.image + " for writing")) {
      message += " (to only read it, mount with -o ro)";
    } else if (error && *error == EAGAIN && !options.image_options.force_share) {
      // QEMU's image locks (engine/io/image_lock.h).
      message += "; stop what uses it (a VM, qemu-img, another mount) first, or read it as it changes with "
                 "-o ro,force_share";
    }
    return fail(message);
  }
  const std::vector<int> image_fds = (*image)->FileDescriptors();

  MountState state;
  state.disk = image->get();
  state.image_fd = image_fds.at(0);
  state.chain_fds = image_fds;
  state.parallel_direct_writes = options.parallel_direct_writes;
  state.uncached_writes = options.uncached_writes;
  state.uncached_loops = options.uncached_loops;
  state.splice_reads = options.splice_reads;
  state.loops_by_page = !LoopDoesWholeRequests(KernelRelease());
  state.readahead = options.readahead_set ? options.readahead : kMinDefaultReadahead;
  state.image_readahead = options.image_readahead_set ? options.image_readahead : ImageDiskReadahead(image_fds);
  absl::StatusOr<bool> created = PrepareMountpoint(*mountpoint, state.mountpoint_stat);
  if (!created.ok()) return fail(std::string(created.status().message()));
  auto remove_created = [&] {
    if (*created) unlink(mountpoint->c_str());
  };
  if (absl::Status apart = CheckNotInChain(*mountpoint, state.mountpoint_stat, image_fds); !apart.ok()) {
    remove_created();
    return fail(std::string(apart.message()));
  }
  // After the image, so that its snapshot views go first.
  const bool directory_mode = S_ISDIR(state.mountpoint_stat.st_mode);
  std::optional<ViewTable> views;
  if (directory_mode) {
    views.emplace(ViewTable::Directory(image->get(), warnings));
  } else {
    views.emplace(ViewTable::SingleFile(image->get()));
  }
  state.views = &*views;

  // Ours first, then the user's: libfuse wants them as one escaped list
  // (an image path may hold a comma).
  struct fuse_args args = FUSE_ARGS_INIT(0, nullptr);
  char* mount_opts = nullptr;
  // The source column of mountinfo and df: the image written to.
  const std::string fsname = options.overlay.empty() ? options.image : options.overlay;
  std::vector<std::string> words = {"fsname=" + fsname, "subtype=qcow2fuse", "default_permissions"};
  if (options.image_options.read_only) words.push_back("ro");
  if (options.allow_other) words.push_back("allow_other");
  // auto_unmount's watcher (fusermount3) looks once, when the daemon dies,
  // whether the connection is gone; a killed daemon's rings are torn down
  // after that look, so the mount would stay: requests stay on /dev/fuse.
  const bool auto_unmount = absl::c_linear_search(options.fuse_options, "auto_unmount");
  const bool uring_wanted = options.io_uring && UringChannel::KernelOffers() && !auto_unmount;
  // Replies over io_uring are built in the ring's buffers, never spliced.
  state.max_read = MaxReadRequest(options.splice_reads && !uring_wanted);
  if (state.max_read != 0) words.push_back(absl::StrFormat("max_read=%u", state.max_read));
  words.insert(words.end(), options.fuse_options.begin(), options.fuse_options.end());
  bool args_ok = true;
  for (const std::string& word : words) args_ok = args_ok && fuse_opt_add_opt_escaped(&mount_opts, word.c_str()) == 0;
  args_ok = args_ok && fuse_opt_add_arg(&args, "qcow2fuse") == 0 && fuse_opt_add_arg(&args, "-o") == 0 && fuse_opt_add_arg(&args, mount_opts) == 0;
  if (options.debug) args_ok = args_ok && fuse_opt_add_arg(&args, "-d") == 0;
  free(mount_opts);

  // The options were checked by ParseCommandLine; what fails here is rare
  // enough for libfuse's own words.
  fuse_session* session =
      args_ok ? fuse_session_new(&args, &Operations(), sizeof(fuse_lowlevel_ops), &state) : nullptr;
  fuse_opt_free_args(&args);  // the session keeps copies of what it needs
  if (session == nullptr) {
    remove_created();
    return fail("cannot create the FUSE session");
  }
  if (absl::Status mounted = Mount(session, *mountpoint, options); !mounted.ok()) {
    fuse_session_destroy(session);
    remove_created();
    return fail(std::string(mounted.message()));
  }
  if (overlay) overlay->Keep();
  if (auto_unmount) {
    // Still the daemon's only thread: the watcher is forked.
    if (absl::StatusOr<pid_t> watcher = StartUnmountWatcher(*mountpoint); watcher.ok()) {
      Log(LogLevel::kInfo,
          absl::StrFormat("auto_unmount: process %d unmounts the view if this daemon dies", *watcher));
    } else {
      warnings.push_back(absl::StrFormat("auto_unmount is left to fusermount3 alone: %s",
                                         watcher.status().message()));
    }
  }
  // The view's mount, from the mount table (device number for the
  // readahead knob, the loop switch and the unmount listener's name): a
  // stat() of the mount point would be a request to this very daemon,
  // which does not serve yet.
  const absl::StatusOr<MountEntry> view_mount = FindViewMount(*mountpoint);
  // Loop devices attached over the views do direct I/O (loop_direct_io.h).
  // Outlives the session: a switch under way ends, at the latest, when the
  // session's end fails the requests it waits for.
  std::optional<LoopDirectIo> loop_direct_io;
  if (options.loop_direct_io && geteuid() == 0 && view_mount.ok()) {
    state.loop_direct_io = &loop_direct_io.emplace(view_mount->dev_major, view_mount->dev_minor);
  }
  // Before INIT is answered (readahead.h). The kernel's 128 KiB is what a
  // user other than root gets: worth a word only if they asked for more.
  // A loop device switched to direct I/O does not read through the view's
  // page cache, so its opener raises nothing.
  std::optional<LoopReadahead> loop_readahead;
  const std::string readahead_knob = view_mount.ok() ? MountReadaheadKnob(*view_mount) : "";
  absl::Status readahead_written = view_mount.status();
  if (readahead_written.ok()) readahead_written = SetReadahead(readahead_knob, state.readahead);
  if (!readahead_written.ok() && options.readahead_set) {
    warnings.push_back(absl::StrFormat("readahead stays at the kernel's default: %s", readahead_written.message()));
  }
  if (readahead_written.ok() && !options.readahead_set && state.loop_direct_io == nullptr) {
    if (const uint64_t deeper = ImageDiskReadahead(image_fds); deeper > state.readahead) {
      state.loop_readahead = &loop_readahead.emplace(readahead_knob, state.readahead, deeper);
    }
  }
  RouteLibfuseLog();
  // Before libfuse reads INIT, whose reply asks for io_uring. Destroyed
  // after the session, whose I/O hooks lead to it.
  std::unique_ptr<UringChannel> uring;
  if (options.io_uring && UringChannel::KernelOffers()) {
    if (auto_unmount) {
      Log(LogLevel::kInfo, "requests stay on /dev/fuse: auto_unmount needs them there");
    } else if (absl::StatusOr<std::unique_ptr<UringChannel>> installed =
                   UringChannel::Install(session, options.threads);
               installed.ok()) {
      uring = *std::move(installed);
    } else {
      warnings.push_back(absl::StrFormat("requests stay on /dev/fuse: %s", installed.status().message()));
    }
  }
  if (uring == nullptr) {
    if (absl::Status hooked = InstallInitHooks(session); !hooked.ok()) {
      warnings.push_back(absl::StrFormat("descriptors in direct-I/O mode cannot be mapped MAP_SHARED: %s",
                                         hooked.message()));
    }
  }
  if (fuse_set_signal_handlers(session) != 0) {
    fuse_session_unmount(session);
    fuse_session_destroy(session);
    remove_created();
    return fail("cannot install signal handlers");
  }
  // Listening starts before the view answers, so `qcow2fuse -u` finds the
  // daemon of any view it can see.
  std::unique_ptr<UnmountListener> unmount_listener;
  absl::StatusOr<std::unique_ptr<UnmountListener>> listener =
      view_mount.ok() ? UnmountListener::Listen(*view_mount) : view_mount.status();
  if (listener.ok()) {
    unmount_listener = *std::move(listener);
  } else {
    warnings.push_back(absl::StrFormat("qcow2fuse -u cannot wait for this daemon: %s", listener.status().message()));
  }
  auto announce = [&](const absl::Status& outcome) {
    if (unmount_listener) unmount_listener->Announce(outcome);
  };

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
    // A store may wait for a READ that only another worker can answer
    // (prefill.h).
    std::optional<Prefill> prefill;
    if (options.prefill_runs && uring == nullptr && options.threads >= 2) {
      state.prefill = &prefill.emplace(session, state.spliced_reads);
    }
    // Syncs run as scheduler tasks, like flushes; stopped before the drain.
    std::optional<SyncAhead> sync_ahead;
    if (!options.image_options.read_only && options.sync_ahead > 0) {
      state.sync_ahead = &sync_ahead.emplace(
          options.sync_ahead,
          [&] {
            absl::Status status;
            scheduler.Run(SyncDataInto(**image, status));
            return status;
          },
          [&](const absl::Status& status) {
            Log(LogLevel::kError, absl::StrFormat("syncing the written data of %s ahead of a flush failed, so "
                                                  "every flush will fail; not trying again: %s",
                                                  served, status.message()));
          });
    }
    // Only directory mode has files that overlap; gone before the session.
    std::optional<Invalidator> invalidator;
    if (directory_mode) {
      invalidator.emplace(session);
      state.invalidator = &*invalidator;
    }
    state.on_ready = [&] {
      if (!options.foreground) {
        report.Send("");
        LogToSyslog();
        DetachFromTerminal();
      }
      Log(LogLevel::kInfo, absl::StrFormat("serving %s on %s%s: %s", served, options.mountpoint,
                                           directory_mode ? " (a directory of disk, partition and snapshot files)" : "",
                                           (*image)->DescribeChain()));
      Log(LogLevel::kInfo, absl::StrFormat("requests run on up to %d threads, each doing its "
                                           "file I/O synchronously (pread/pwrite)",
                                           options.threads));
      for (const std::string& warning : warnings) Log(LogLevel::kWarning, warning);
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
        const std::string message =
            absl::StrFormat("%u requests still running %d s after the stop; exiting without them",
                            scheduler.in_flight(), options.drain_timeout_seconds);
        Log(LogLevel::kError, message);
        announce(absl::DeadlineExceededError(absl::StrFormat(
            "its daemon gave up: %s (the image is as a crash leaves it, without their writes)", message)));
        fuse_session_unmount(session);
        remove_created();
        if (!options.pidfile.empty()) unlink(options.pidfile.c_str());
        _exit(1);
      });
      {
        // Flushes run as scheduler tasks (Run), so the drain below and
        // the watchdog count a periodic flush still in progress.
        std::optional<PeriodicFlusher> flusher;
        if (!options.image_options.read_only && options.flush_interval_seconds > 0) {
          flusher.emplace(
              std::chrono::seconds(options.flush_interval_seconds),
              [&] {
                absl::Status status;
                scheduler.Run(FlushInto(**image, status));
                return status;
              },
              served);
        }
        // Over /dev/fuse, only as many workers as CPUs take requests while
        // the others are not needed (worker_gate.h). Never freed: a thread
        // may still be in a call it announced to the gate when main returns.
        if (uring == nullptr && options.park_workers) {
          static WorkerGate* const gate = new WorkerGate(WorkerGate::UsableCpus());
          state.gate = gate;
          SetBlockingObserver(gate);
        }
        loop_result = fuse_session_loop_mt(session, loop_config);
        if (state.gate != nullptr) {
          Log(LogLevel::kInfo, absl::StrFormat("workers parked %d times while %d others took the requests",
                                               state.gate->parks(), state.gate->active()));
        }
        if (state.prefill != nullptr && state.prefill->runs() > 0) {
          Log(LogLevel::kInfo, absl::StrFormat("runs of data put in the view's page cache ahead of their reader: "
                                               "%u (%u KiB; %u spliced from the image file); runs the host was "
                                               "advised to read ahead: %u",
                                               state.prefill->runs(), state.prefill->bytes() >> 10,
                                               state.prefill->spliced_runs(), state.prefill->advised_runs()));
        }
        watchdog.Begin();  // a ring thread may still hold a stuck request
        if (state.sync_ahead != nullptr) {
          state.sync_ahead->Stop();  // a sync stuck in the disk is the watchdog's
          if (state.sync_ahead->syncs() > 0) {
            Log(LogLevel::kInfo, absl::StrFormat("syncs of the written data ahead of a flush: %u",
                                                 state.sync_ahead->syncs()));
          }
        }
        if (uring && uring->active()) {
          uring->Stop();
          Log(LogLevel::kInfo, absl::StrFormat("%u requests came over io_uring", uring->served()));
        }
        // Ended by an unmount: the kernel has freed the device number, and
        // the next mount that gets it needs the socket name.
        if ((loop_result == 0 || loop_result == -ECONNABORTED) && unmount_listener) unmount_listener->ReleaseName();
      }
      // Requests still running hold `req` pointers of this session.
      scheduler.Drain();
    }
    fuse_loop_cfg_destroy(loop_config);
  }
  // How much of the L2 tables the mount read: a walk reads several
  // slices at once (table_cache.h).
  if (const ImageCounters counters = (*image)->counters(); counters.l2_slice_reads > 0) {
    Log(LogLevel::kInfo, absl::StrFormat("L2 table slices read: %u, in %u reads of the image file",
                                         counters.l2_slice_reads, counters.l2_reads));
  }
  // What was written reaches the disk before we go, and the persistent
  // bitmaps are stored consistent.
  absl::Status flushed = SyncWait((*image)->Close());
  if (!flushed.ok()) {
    Log(LogLevel::kError, absl::StrFormat("flushing the image at unmount: %s", flushed.message()));
  }

  fuse_remove_signal_handlers(session);
  if (unmount_listener) unmount_listener->ReleaseName();
  fuse_session_unmount(session);
  fuse_session_destroy(session);
  remove_created();
  if (!options.pidfile.empty()) unlink(options.pidfile.c_str());
  // A waiting `qcow2fuse -u` learns the outcome now, and returns once this
  // process has exited, which closes the image and so releases its locks.
  announce(flushed.ok() ? flushed
                        : absl::Status(flushed.code(), absl::StrFormat("the final flush of %s failed: %s",
                                                                       served, flushed.message())));
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
    std::fprintf(stderr, "qcow2fuse: %s; see qcow2fuse --help\n", std::string(options.status().message()).c_str());
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
  if (options->unmount) return UnmountCommand(options->mountpoint);
  if (options->foreground) {
    StartupReport none(-1);
    return Serve(*options, none);
  }
  return Daemonize(*options);
}

}  // namespace
}  // namespace qcow2fuse

int main(int argc, char** argv) { return qcow2fuse::Main(argc, argv); }
