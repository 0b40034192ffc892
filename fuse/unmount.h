// `qcow2fuse -u MOUNTPOINT`: an unmount that returns only once the daemon
// is gone.
//
// A plain `fusermount3 -u` or `umount` of a FUSE file (not fuseblk) detaches
// the mount at once and does not wait for the daemon: its final flush, the
// release of QEMU's image locks (they go with the image file's descriptor)
// and its exit all race whatever the caller runs next, e.g. `qemu-img
// check`, which then fails to get its lock. So:
//
//  * The daemon, once mounted, listens on an abstract unix socket named
//    after the mount's device number, "\0qcow2fuse/MAJOR:MINOR", which it
//    reads from /proc/self/mountinfo (a stat of its own mount would wait
//    for the daemon itself). SO_PEERCRED tells a client the listener's
//    pid. A thread accepts the connections of the mount's owner (and
//    root) and holds them, dropping those whose client went away; when
//    the daemon stops, after the final flush, it writes each one line:
//    "ok", or "error <what failed>".
//  * The client finds the mount by its path in /proc/self/mountinfo (not
//    by stat, which a hung daemon would hang), connects, takes the
//    daemon's pid from SO_PEERCRED and opens a pidfd for it, unmounts
//    (umount2 as root, else fusermount3 -u), reads the daemon's line and
//    waits until the pidfd is readable: the process has exited, and the
//    kernel closed its files (so released its locks) before that.

#ifndef QCOW2FUSE_FUSE_UNMOUNT_H_
#define QCOW2FUSE_FUSE_UNMOUNT_H_

#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "mount_table.h"

namespace qcow2fuse {

// The daemon's end: the listening socket of one mount.
class UnmountListener {
 public:
  // Listens for `mount` (FindViewMount), which this process has just
  // mounted. Errors say why `qcow2fuse -u` cannot wait for this daemon;
  // the view works without it.
  static absl::StatusOr<std::unique_ptr<UnmountListener>> Listen(const MountEntry& mount);

  // Stops listening; clients that wait learn nothing but the end.
  ~UnmountListener();
  UnmountListener(const UnmountListener&) = delete;
  UnmountListener& operator=(const UnmountListener&) = delete;

  // Stops listening, keeping the clients that connected; they still learn
  // the outcome from Announce. Call it once the mount is gone or about to
  // go: the kernel reuses the device number at once, and the next mount's
  // daemon needs the name (the final flush may take a while). Later calls
  // do nothing. Safe from any thread.
  void ReleaseName();

  // Tells every waiting `qcow2fuse -u` how the daemon ends (OK: the image
  // is flushed; otherwise the message says what failed), then stops
  // listening. Call it last before exiting; later calls do nothing. Safe
  // from any thread.
  void Announce(const absl::Status& outcome);

 private:
  UnmountListener(int listen_fd, int stop_read, int stop_write);
  // The thread: accepts clients, drops those that hang up, until
  // StopThread().
  void Run();
  // Ends Run() and joins its thread; then clients_ is the caller's.
  void StopThread();
  // Accepts the clients whose connect() completed but that the thread has
  // not taken yet, then closes the listening socket. Under mu_, with the
  // thread stopped.
  void AcceptRestAndClose();
  // Whether the peer of `client` may wait: the view's owner (this
  // process's user) or root, so that nobody else can use up descriptors.
  static bool MayWait(int client);

  int listen_fd_;        // non-blocking; -1 once closed
  const int stop_read_;  // a pipe: a byte written to stop_write_ ends Run()
  const int stop_write_;
  std::vector<int> clients_;  // the thread's until StopThread() returns
  std::mutex mu_;             // serializes the public calls and the destructor
  bool thread_stopped_ = false;  // under mu_
  bool announced_ = false;       // under mu_
  std::thread thread_;           // last: starts once the rest is set
};

// The `-u` command: unmounts the view at `path` and waits for its daemon
// to exit. Prints one line on stderr on failure; returns the exit code.
int UnmountCommand(const std::string& path);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_UNMOUNT_H_
