// Who opens a view: the program behind an OPEN request.
//
// A loop device over the view reads it through the view's page cache
// unless the view says otherwise at OPEN. That cache is then a third copy
// of the same bytes: the guest file system on the loop device caches its
// blocks, and the host caches the image file's. Filling it also costs
// latency, since each of the loop device's reads that misses it waits for
// a readahead request to the daemon. The kernel tells a daemon nothing of
// what will use a file, only which thread opened it, and a loop device's
// file is opened by the program that attaches it (`losetup`, `mount -o
// loop`, udisks' clients, cryptsetup, systemd's image tools), which reads
// little or nothing through it itself. So the view answers such an open
// in FUSE's direct-I/O mode (ops.cc), and every other reader keeps the
// page cache and its readahead.

#ifndef QCOW2FUSE_FUSE_OPENER_H_
#define QCOW2FUSE_FUSE_OPENER_H_

#include <sys/types.h>

#include <string>
#include <string_view>

namespace qcow2fuse {

// The name of `pid` as /proc/PID/comm gives it (at most 15 bytes, what
// `ps` shows), read under `proc`. The kernel sends the id of the thread
// that opens, and a thread may have a name of its own; the programs below
// open from their main thread. Empty when it cannot be read: the thread
// is gone, /proc hides it (hidepid, for a daemon that is not root), or it
// runs outside the daemon's pid namespace and its children (the kernel
// then sends pid 0).
std::string ProcessName(pid_t pid, const std::string& proc = "/proc");

// Whether `name` is a program that opens files to attach loop devices
// to them: losetup, mount (-o loop, or any regular file it mounts),
// udisksctl and GNOME Disks' image mounter (udisksd gets their
// descriptor), kpartx, cryptsetup and veritysetup, and systemd's tools
// that mount disk images.
bool AttachesLoopDevices(std::string_view name);

// Whether the loop driver of kernel `release` (uname -r, "6.18.2-amd64")
// reads and writes its file a whole request at a time: Linux 6.15 and
// later. Before, a loop device without --direct-io went through its file a
// page at a time; through the view's page cache those pages met its
// readahead, but in direct-I/O mode each would be a round trip to the
// daemon, so there such descriptors keep the cache.
bool LoopDoesWholeRequests(std::string_view release);

// The running kernel's release (uname -r); empty if uname fails.
std::string KernelRelease();

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_OPENER_H_
