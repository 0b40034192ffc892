#include "support/mount.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace qcow2fuse::test {
namespace {

constexpr std::chrono::milliseconds kPollInterval(20);
constexpr std::chrono::seconds kBusyTimeout(10);
constexpr std::chrono::milliseconds kBusyRetryInterval(100);
constexpr size_t kLogTail = 8192;

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string DecodeMountInfoPath(absl::string_view field) {
  std::string decoded;
  for (size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size() &&
        std::all_of(field.begin() + i + 1, field.begin() + i + 4,
                    [](char c) { return c >= '0' && c <= '7'; })) {
      decoded +=
          static_cast<char>((field[i + 1] - '0') * 64 +
                            (field[i + 2] - '0') * 8 + (field[i + 3] - '0'));
      i += 3;
    } else {
      decoded += field[i];
    }
  }
  return decoded;
}

// The canonical form of a path whose last component may not exist yet
// (qcow2fuse creates a missing mount point file).
std::string CanonicalMountpoint(const std::string& path) {
  std::error_code error;
  std::filesystem::path p = std::filesystem::absolute(path, error);
  std::filesystem::path parent =
      std::filesystem::weakly_canonical(p.parent_path(), error);
  if (error) return p.string();
  return (parent / p.filename()).string();
}

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

// Runs fusermount3 with `flags` on `path`; returns its failure, if any.
absl::Status Fusermount(const std::string& flags, const std::string& path) {
  return RunChecked({"fusermount3", flags, path}).status();
}

}  // namespace

std::string Qcow2fuseBinary(const char* built) {
  const char* override_path = getenv("QCOW2FUSE_BINARY");
  if (override_path != nullptr && *override_path != '\0') return override_path;
  return built;
}

absl::StatusOr<std::vector<MountEntry>> ReadMountInfo() {
  std::ifstream in("/proc/self/mountinfo");
  if (!in) return absl::InternalError("cannot read /proc/self/mountinfo");
  std::vector<MountEntry> entries;
  std::string line;
  while (std::getline(in, line)) {
    // id parent major:minor root mount_point options [optional...] - type
    // source super_options
    std::vector<absl::string_view> fields = absl::StrSplit(line, ' ');
    auto dash = std::find(fields.begin(), fields.end(), "-");
    if (fields.size() < 5 || dash == fields.end() || fields.end() - dash < 4) {
      continue;
    }
    MountEntry entry;
    entry.mount_point = DecodeMountInfoPath(fields[4]);
    entry.fs_type = std::string(dash[1]);
    entry.source = DecodeMountInfoPath(dash[2]);
    entry.device = std::string(fields[2]);
    entry.super_options = absl::StrSplit(dash[3], ',');
    entries.push_back(std::move(entry));
  }
  return entries;
}

namespace {

// The topmost mount at `path`, if any.
std::optional<MountEntry> TopmostMount(const std::string& path) {
  absl::StatusOr<std::vector<MountEntry>> entries = ReadMountInfo();
  if (!entries.ok()) return std::nullopt;
  std::optional<MountEntry> topmost;
  for (const MountEntry& entry : *entries) {
    if (entry.mount_point == path) topmost = entry;  // Last wins.
  }
  return topmost;
}

}  // namespace

std::optional<std::string> MountedFsType(const std::string& path) {
  std::optional<MountEntry> mount = TopmostMount(path);
  if (!mount) return std::nullopt;
  return mount->fs_type;
}

std::optional<std::vector<std::string>> MountSuperOptions(const std::string& path) {
  std::optional<MountEntry> mount = TopmostMount(path);
  if (!mount) return std::nullopt;
  return mount->super_options;
}

absl::StatusOr<uint64_t> ReadaheadKb(const std::string& path) {
  std::optional<MountEntry> mount = TopmostMount(path);
  if (!mount) return absl::NotFoundError(absl::StrCat(path, " is not a mount point"));
  const std::string knob = absl::StrCat("/sys/class/bdi/", mount->device, "/read_ahead_kb");
  std::ifstream in(knob);
  uint64_t kb = 0;
  if (!(in >> kb)) return absl::InternalError(absl::StrCat("cannot read ", knob));
  return kb;
}

absl::StatusOr<std::unique_ptr<MountedView>> MountedView::Start(
    const MountOptions& options) {
  std::string mountpoint = CanonicalMountpoint(options.mountpoint);
  std::string log_path =
      options.log_path.empty() ? mountpoint + ".log" : options.log_path;
  std::vector<std::string> mount_options;
  if (options.read_only) mount_options.push_back("ro");
  mount_options.insert(mount_options.end(), options.extra_options.begin(),
                       options.extra_options.end());
  std::vector<std::string> argv = {
      options.binary, "-f",      "-o", absl::StrJoin(mount_options, ","),
      options.image,  mountpoint};

  int log_fd =
      open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    return absl::InternalError(
        absl::StrCat("cannot create ", log_path, ": ", strerror(errno)));
  }
  // setpriv makes the kernel send SIGTERM to the daemon if this process
  // dies before it could unmount; it then execs the daemon in place, so
  // the pid we get is the daemon's.
  std::vector<std::string> guarded = {"setpriv", "--pdeathsig", "TERM", "--"};
  guarded.insert(guarded.end(), argv.begin(), argv.end());
  absl::StatusOr<pid_t> pid = Spawn(guarded, log_fd, log_fd);
  if (!pid.ok()) pid = Spawn(argv, log_fd, log_fd);  // No setpriv here.
  close(log_fd);
  if (!pid.ok()) return pid.status();

  std::unique_ptr<MountedView> view(new MountedView(
      mountpoint, log_path, CommandLine(argv), *pid, options.stop_timeout));
  if (absl::Status live = view->WaitUntilLive(options.start_timeout);
      !live.ok()) {
    // A daemon that never came up has nothing to unmount cleanly; waiting
    // for it to exit after fusermount3 -u would only add a timeout.
    view->ForceCleanup();
    return live;
  }
  return view;
}

MountedView::MountedView(std::string mountpoint, std::string log_path,
                         std::string command_line, pid_t pid,
                         std::chrono::milliseconds stop_timeout)
    : mountpoint_(std::move(mountpoint)),
      log_path_(std::move(log_path)),
      command_line_(std::move(command_line)),
      pid_(pid),
      stop_timeout_(stop_timeout) {}

MountedView::~MountedView() {
  if (::testing::Test::HasFailure()) {
    // The daemon's own account is usually what explains a failed test.
    std::string log = ReadLog();
    if (log.size() > kLogTail)
      log = "...\n" + log.substr(log.size() - kLogTail);
    std::cerr << "--- qcow2fuse log (" << log_path_ << ") ---\n"
              << log << "--- end of log ---\n";
  }
  if (!reaped_) {
    absl::Status unmounted = Unmount();
    if (!unmounted.ok()) {
      std::cerr << "MountedView: clean unmount of " << mountpoint_
                << " failed, forcing: " << unmounted << "\n";
    }
  }
  ForceCleanup();
}

std::string MountedView::ReadLog() const { return ReadWholeFile(log_path_); }

bool MountedView::ReapIfExited() {
  if (reaped_) return true;
  absl::StatusOr<std::optional<ExitStatus>> status =
      WaitForExitFor(pid_, std::chrono::milliseconds(0));
  if (!status.ok()) {
    reaped_ = true;  // Not ours to wait for any more; never signal it.
    return true;
  }
  if (!status->has_value()) return false;
  reaped_ = true;
  exit_status_ = **status;
  return true;
}

absl::Status MountedView::WaitUntilLive(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (ReapIfExited()) {
      return absl::InternalError(absl::StrCat(
          "qcow2fuse exited before the mount was live (",
          exit_status_ ? exit_status_->ToString() : "status unknown",
          "): ", command_line_, "\n--- log ---\n", ReadLog()));
    }
    std::optional<std::string> fs_type = MountedFsType(mountpoint_);
    struct stat st;
    if (fs_type && absl::StartsWith(*fs_type, "fuse") &&
        stat(mountpoint_.c_str(), &st) == 0) {
      return absl::OkStatus();
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("mount not live after ", timeout.count(),
                       " ms: ", command_line_, "\n--- log ---\n", ReadLog()));
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

absl::Status MountedView::WaitForChild() {
  if (reaped_) return absl::OkStatus();
  absl::StatusOr<std::optional<ExitStatus>> status =
      WaitForExitFor(pid_, stop_timeout_);
  if (!status.ok()) {
    reaped_ = true;
    return status.status();
  }
  if (!status->has_value()) {
    return absl::DeadlineExceededError(
        absl::StrCat("qcow2fuse (pid ", pid_, ") still running ",
                     stop_timeout_.count(), " ms after unmount"));
  }
  reaped_ = true;
  exit_status_ = **status;
  return absl::OkStatus();
}

absl::Status MountedView::Unmount() {
  if (reaped_ && !MountedFsType(mountpoint_)) return absl::OkStatus();
  // A loop device detached a moment ago may still hold the view (the
  // kernel lets go of it asynchronously), which fails fusermount3 with
  // EBUSY: retry for a while before giving up.
  const auto deadline = std::chrono::steady_clock::now() + kBusyTimeout;
  while (MountedFsType(mountpoint_)) {
    absl::Status unmounted = Fusermount("-u", mountpoint_);
    if (unmounted.ok()) break;
    if (std::chrono::steady_clock::now() >= deadline) return unmounted;
    std::this_thread::sleep_for(kBusyRetryInterval);
  }
  return WaitForChild();
}

absl::Status MountedView::StopWithSignal(int signal) {
  if (reaped_) return absl::FailedPreconditionError("daemon already reaped");
  if (kill(pid_, signal) != 0) {
    return absl::InternalError(
        absl::StrCat("kill ", pid_, ": ", strerror(errno)));
  }
  return WaitForChild();
}

void MountedView::ForceCleanup() {
  if (!reaped_) {
    std::cerr << "MountedView: killing qcow2fuse pid " << pid_ << "\n";
    kill(pid_, SIGKILL);
    // SIGKILL cannot be ignored; the bound only guards against a process
    // stuck in the kernel, which is then reported and left to the reaper.
    absl::StatusOr<std::optional<ExitStatus>> status =
        WaitForExitFor(pid_, stop_timeout_);
    if (status.ok() && status->has_value()) exit_status_ = **status;
    reaped_ = true;
  }
  if (MountedFsType(mountpoint_)) {
    absl::Status detached = Fusermount("-uz", mountpoint_);
    if (!detached.ok()) {
      std::cerr << "MountedView: could not detach " << mountpoint_ << ": "
                << detached << "\n";
    }
  }
}

}  // namespace qcow2fuse::test
