// Logging for the daemon: stderr while in the foreground, syslog once
// daemonized (stderr then goes nowhere), and a file of the user's choice
// (-o log=FILE) in both cases.

#ifndef QCOW2FUSE_FUSE_LOG_H_
#define QCOW2FUSE_FUSE_LOG_H_

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace qcow2fuse {

enum class LogLevel { kInfo, kWarning, kError };

// From now on, log to syslog instead of stderr.
void LogToSyslog();

// From now on, also append every message, with its time, to `path`.
absl::Status LogAlsoToFile(const std::string& path);

void Log(LogLevel level, std::string_view message);

// From now on, what libfuse logs (fuse_log) goes through Log.
void RouteLibfuseLog();

// While one exists, what libfuse logs is collected instead of printed, so
// that the caller can tell the user in its own words; the innermost of
// nested captures collects. Not thread-safe: for start-up, before other
// threads exist.
class LibfuseLogCapture {
 public:
  LibfuseLogCapture();
  ~LibfuseLogCapture();
  LibfuseLogCapture(const LibfuseLogCapture&) = delete;
  LibfuseLogCapture& operator=(const LibfuseLogCapture&) = delete;

  // Everything logged so far, one message per line.
  const std::string& text() const { return text_; }

 private:
  friend void AppendToCapture(const std::string& line);
  std::string text_;
  LibfuseLogCapture* const outer_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_LOG_H_
