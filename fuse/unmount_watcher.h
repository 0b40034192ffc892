// With -o auto_unmount, a view whose daemon dies (killed, crashed) is to be
// unmounted, not left behind as a dead mount whose every access fails.
//
// libfuse gives that job to fusermount3, which waits on a socket for the
// daemon to die and then looks once: it unmounts if opening the view fails
// with ENOTCONN, the error of a connection the kernel has torn down. If it
// looks before the kernel has done so, its open fails with ECONNABORTED
// instead and it leaves the dead mount: fusermount3 3.14 did so for about
// one killed daemon in seven when the daemon was built with
// AddressSanitizer and other tests ran beside it.
//
// So the daemon also starts a watcher of its own, a small process that
// waits for the daemon to die and then looks again until the connection is
// gone.

#ifndef QCOW2FUSE_FUSE_UNMOUNT_WATCHER_H_
#define QCOW2FUSE_FUSE_UNMOUNT_WATCHER_H_

#include <sys/types.h>

#include <string>

#include "absl/status/statusor.h"

namespace qcow2fuse {

// Starts the watcher of the view mounted at `mountpoint` and returns its
// process id. It keeps no descriptor of the daemon's but a pipe whose other
// end the daemon holds until it exits, so it delays neither the kernel's
// teardown of the connection nor anyone waiting for the daemon's files.
// When the daemon is gone, the watcher unmounts the view if opening it
// fails with ENOTCONN, trying again for a while on ECONNABORTED (as root
// with umount2, else through fusermount3 -u -z), and exits. Call it once
// the view is mounted, before the daemon starts other threads (it forks).
absl::StatusOr<pid_t> StartUnmountWatcher(const std::string& mountpoint);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_UNMOUNT_WATCHER_H_
