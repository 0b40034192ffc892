// Who opens a view: the program behind an OPEN request.
//
// Such an open is the hint that a loop device is about to be bound over
// the view, which the daemon then switches to direct I/O
// (loop_direct_io.h). What follows is for a loop device that stays
// buffered (-o loop_direct_io=off, or a daemon that is not root).
//
// A loop device over the view reads and writes it through the view's page
// cache unless the view says otherwise at OPEN. For its writes that cache
// is a copy too many: the guest file system on the loop device caches its
// blocks, and the host caches the image file's, so a descriptor opened
// for writing is answered in FUSE's direct-I/O mode (ops.cc), and its
// writes go to the daemon from the guest's own pages. For reads the cache
// earns its copy: a guest file system reads each small file as a block or
// two, and those reads come one after another. Through the view's cache
// they meet its readahead, which brings the blocks around them in one READ;
// without it each is a round trip to the daemon. On Linux 6.18, reading
// every file of a 1 GiB ext4 tree through a read-only loop device took
// 7.34 s through the cache against 8.91 s without it (a raw file: 6.44 s;
// medians of 5), and unpacking 400 MiB onto a writable one 2.37 s
// through the cache against 2.23 s without it (medians of 3). So a
// read-only descriptor keeps the cache, as every other reader does, unless
// -o uncached_loops says otherwise.
//
// The kernel tells a daemon nothing of what will use a file, only which
// thread opened it, and a loop device's file is opened by the program
// that attaches it (`losetup`, `mount -o loop`, udisks' clients,
// cryptsetup, systemd's image tools), which reads little or nothing
// through it itself.

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
