// Who opens a view: the program behind an OPEN request.
//
// A loop device over the view reads it through the view's page cache
// unless the view says otherwise at OPEN. That cache is then a third copy
// of the same bytes: the guest file system on the loop device caches its
// blocks, and the host caches the image file's. Filling it also costs
// latency, since each of the loop device's reads that misses it waits for
// a readahead request to the daemon. The kernel tells a daemon nothing of
// what will use a file, only which process opened it, and a loop device's
// file is opened by the program that attaches it (`losetup`, `mount -o
// loop`, udisks, cryptsetup, systemd's image tools), which reads nothing
// itself. So the view answers such an open in FUSE's direct-I/O mode
// (ops.cc), and every other reader keeps the page cache and its readahead.

#ifndef QCOW2FUSE_FUSE_OPENER_H_
#define QCOW2FUSE_FUSE_OPENER_H_

#include <sys/types.h>

#include <string>
#include <string_view>

namespace qcow2fuse {

// The name of process `pid` as /proc/PID/comm gives it (at most 15
// bytes, what `ps` shows), read under `proc`; empty when it cannot be
// read: the process is gone, or lives in a pid namespace the daemon
// cannot see (the kernel then sends pid 0).
std::string ProcessName(pid_t pid, const std::string& proc = "/proc");

// Whether `name` is a program that opens files to attach loop devices
// to them: losetup, mount (-o loop, or any regular file it mounts),
// udisksctl, udisksd and GNOME Disks' image mounter, kpartx, cryptsetup
// and veritysetup, and systemd's tools that mount disk images.
bool AttachesLoopDevices(std::string_view name);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_OPENER_H_
