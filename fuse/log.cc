#include "log.h"

#include <fcntl.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <string>

#include "absl/strings/str_format.h"
#include "ops.h"  // fuse_log.h at our FUSE_USE_VERSION
#include "qcow2fuse/status.h"

namespace qcow2fuse {

void AppendToCapture(const std::string& line);

namespace {

std::atomic<bool> use_syslog{false};
std::atomic<int> log_file_fd{-1};
LibfuseLogCapture* capture = nullptr;  // the innermost, while one lives

const char* LevelWord(LogLevel level) {
  return level == LogLevel::kError ? "error: " : level == LogLevel::kWarning ? "warning: " : "";
}

std::string Format(const char* format, va_list ap) {
  char buffer[1024];
  va_list copy;
  va_copy(copy, ap);
  const int n = std::vsnprintf(buffer, sizeof buffer, format, copy);
  va_end(copy);
  std::string text = n < 0 ? std::string(format) : std::string(buffer, std::min<size_t>(n, sizeof buffer - 1));
  while (!text.empty() && text.back() == '\n') text.pop_back();
  return text;
}

void CaptureLibfuse(enum fuse_log_level /*level*/, const char* format, va_list ap) {
  AppendToCapture(Format(format, ap));
}

void ForwardLibfuse(enum fuse_log_level level, const char* format, va_list ap) {
  // Debug messages (the request trace) come only with -d, which asked for them.
  std::string text = Format(format, ap);
  // libfuse prefixes its messages with "fuse: "; ours name the program.
  if (text.rfind("fuse: ", 0) == 0) text.erase(0, 6);
  Log(level <= FUSE_LOG_ERR ? LogLevel::kError : level == FUSE_LOG_WARNING ? LogLevel::kWarning : LogLevel::kInfo,
      absl::StrFormat("libfuse: %s", text));
}

}  // namespace

void LogToSyslog() {
  openlog("qcow2fuse", LOG_PID, LOG_DAEMON);
  use_syslog = true;
}

absl::Status LogAlsoToFile(const std::string& path) {
  const int fd = open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
  if (fd < 0) return ErrnoStatus(errno, absl::StrFormat("cannot open the log file %s", path));
  const int old = log_file_fd.exchange(fd);
  if (old >= 0) close(old);
  return absl::OkStatus();
}

void Log(LogLevel level, std::string_view message) {
  const std::string text(message);
  if (const int fd = log_file_fd.load(); fd >= 0) {
    char stamp[64] = "";
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    if (localtime_r(&now.tv_sec, &tm) != nullptr) strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
    // One write per line: lines of concurrent requests never interleave.
    const std::string line = absl::StrFormat("%s qcow2fuse[%d]: %s%s\n", stamp, getpid(), LevelWord(level), text);
    (void)!write(fd, line.data(), line.size());
  }
  if (use_syslog) {
    const int priority = level == LogLevel::kError ? LOG_ERR
                         : level == LogLevel::kWarning ? LOG_WARNING
                                                       : LOG_INFO;
    syslog(priority, "%s", text.c_str());
    return;
  }
  std::fprintf(stderr, "qcow2fuse: %s%s\n", LevelWord(level), text.c_str());
}

void RouteLibfuseLog() { fuse_set_log_func(ForwardLibfuse); }

void AppendToCapture(const std::string& line) {
  if (capture == nullptr) return;
  capture->text_ += line;
  capture->text_ += '\n';
}

LibfuseLogCapture::LibfuseLogCapture() : outer_(capture) {
  capture = this;
  fuse_set_log_func(CaptureLibfuse);
}

LibfuseLogCapture::~LibfuseLogCapture() {
  capture = outer_;
  if (capture == nullptr) fuse_set_log_func(nullptr);  // back to libfuse's own: stderr
}

}  // namespace qcow2fuse
