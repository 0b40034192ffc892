// Logging for the daemon: stderr while in the foreground, syslog once
// daemonized (stderr then goes nowhere).

#ifndef QCOW2FUSE_FUSE_LOG_H_
#define QCOW2FUSE_FUSE_LOG_H_

#include <string_view>

namespace qcow2fuse {

enum class LogLevel { kInfo, kWarning, kError };

// From now on, log to syslog instead of stderr.
void LogToSyslog();

void Log(LogLevel level, std::string_view message);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_LOG_H_
