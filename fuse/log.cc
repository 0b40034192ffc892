#include "log.h"

#include <syslog.h>

#include <atomic>
#include <cstdio>
#include <string>

namespace qcow2fuse {
namespace {
std::atomic<bool> use_syslog{false};
}  // namespace

void LogToSyslog() {
  openlog("qcow2fuse", LOG_PID, LOG_DAEMON);
  use_syslog = true;
}

void Log(LogLevel level, std::string_view message) {
  const std::string text(message);
  if (use_syslog) {
    const int priority = level == LogLevel::kError ? LOG_ERR
                         : level == LogLevel::kWarning ? LOG_WARNING
                                                       : LOG_INFO;
    syslog(priority, "%s", text.c_str());
    return;
  }
  const char* prefix = level == LogLevel::kError ? "error: " : level == LogLevel::kWarning ? "warning: " : "";
  std::fprintf(stderr, "qcow2fuse: %s%s\n", prefix, text.c_str());
}

}  // namespace qcow2fuse
