#include "loop_direct_io.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "log.h"

namespace qcow2fuse {

namespace {

// The first line of `path`, without surrounding white space; empty if it
// cannot be read.
std::string ReadLine(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  char text[4096];
  const ssize_t got = read(fd, text, sizeof(text) - 1);
  close(fd);
  if (got <= 0) return "";
  const absl::string_view all(text, static_cast<size_t>(got));
  return std::string(absl::StripAsciiWhitespace(all.substr(0, all.find('\n'))));
}

// Whether `name` is a loop device's ("loop" and a number).
bool IsLoopName(absl::string_view name) {
  if (!absl::StartsWith(name, "loop") || name.size() == 4) return false;
  for (char c : name.substr(4)) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace

LoopDirectIo::LoopDirectIo(unsigned mount_major, unsigned mount_minor, std::string sys_block, std::string dev)
    : major_(mount_major), minor_(mount_minor), sys_block_(std::move(sys_block)), dev_(std::move(dev)) {}

LoopDirectIo::~LoopDirectIo() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void LoopDirectIo::Watch() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    until_ = std::chrono::steady_clock::now() + kWatch;
    ++pending_;
    reset_skip_ = true;
    if (!thread_.joinable()) thread_ = std::thread([this] { Run(); });
  }
  wake_.notify_all();
}

void LoopDirectIo::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    wake_.wait(lock, [this] { return stop_ || (pending_ > 0 && std::chrono::steady_clock::now() < until_); });
    if (stop_) return;
    if (reset_skip_) {
      skip_.clear();
      reset_skip_ = false;
    }
    lock.unlock();
    const int switched = Scan();
    lock.lock();
    pending_ = std::max(0, pending_ - switched);
    if (std::chrono::steady_clock::now() >= until_) pending_ = 0;  // the watch is over
    if (pending_ > 0) wake_.wait_for(lock, kPoll, [this] { return stop_; });
  }
}

int LoopDirectIo::Scan() {
  DIR* dir = opendir(sys_block_.c_str());
  if (dir == nullptr) return 0;
  std::vector<std::string> names;
  while (const dirent* entry = readdir(dir)) {
    if (IsLoopName(entry->d_name)) names.emplace_back(entry->d_name);
  }
  closedir(dir);

  int switched = 0;
  for (const std::string& name : names) {
    if (skip_.contains(name)) continue;
    // Bound devices only (their loop/ directory comes and goes with the
    // file), and only those still doing buffered I/O: no device is opened
    // for nothing.
    const std::string attributes = absl::StrFormat("%s/%s/loop", sys_block_, name);
    if (ReadLine(attributes + "/backing_file").empty() || ReadLine(attributes + "/dio") != "0") continue;

    const std::string node = absl::StrFormat("%s/%s", dev_, name);
    const int fd = open(node.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) continue;  // not root, or no node in this /dev
    loop_info64 info = {};
    // Whose file is it? The device number of the file's file system
    // (huge_encode_dev, which major() and minor() decode).
    if (ioctl(fd, LOOP_GET_STATUS64, &info) != 0 || major(info.lo_device) != major_ ||
        minor(info.lo_device) != minor_) {
      skip_.insert(name);  // another file system's: not opened again during this watch
    } else if (!(info.lo_flags & LO_FLAGS_DIRECT_IO)) {
      if (ioctl(fd, LOOP_SET_DIRECT_IO, 1UL) == 0) {
        ++switched;
        Log(LogLevel::kInfo, absl::StrFormat("%s reads and writes the view with direct I/O now, many requests in "
                                             "flight (-o loop_direct_io)",
                                             node));
      } else {
        skip_.insert(name);
        Log(LogLevel::kInfo, absl::StrFormat("%s stays in buffered mode: the kernel did not switch it to direct "
                                             "I/O: %s",
                                             node, strerror(errno)));
      }
    }
    close(fd);
  }
  return switched;
}

}  // namespace qcow2fuse
