// Loop devices over the views, switched to direct I/O.
//
// A loop device attached without --direct-io reads and writes its file
// from one worker, a request at a time, each waiting for its answer: over
// a view, every request that misses the view's page cache waits for a
// round trip to the daemon, and none overlaps another. In direct-I/O mode
// the loop driver sends them as asynchronous O_DIRECT requests, many in
// flight. Reading every file of a 1 GiB ext4 tree through a read-only loop
// device on Linux 6.18 took 7.6-7.9 s once `losetup --direct-io=on` had
// switched the device, against 11.1-12.7 s buffered (the same mount,
// alternating runs); the raw file on the same disk took 6.2-7.1 s.
//
// The kernel tells a daemon nothing of what uses its files. The OPEN of a
// program that attaches loop devices (opener.h) is the hint, and its
// device shows up a moment later, once that program has bound it. So each
// such open starts a watch: for a few seconds, every bound loop device
// whose file lies on this mount (LOOP_GET_STATUS64: the device number of
// the file) and which does buffered I/O is switched with
// LOOP_SET_DIRECT_IO, as `losetup --direct-io=on DEVICE` would. The
// switch runs on a thread of its own: the kernel first syncs the file,
// which is a request to this daemon's workers.
//
// Only root may open loop devices; for anyone else this does nothing.

#ifndef QCOW2FUSE_FUSE_LOOP_DIRECT_IO_H_
#define QCOW2FUSE_FUSE_LOOP_DIRECT_IO_H_

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <string>
#include <thread>

namespace qcow2fuse {

class LoopDirectIo {
 public:
  // How long a watch lasts after the open that started it.
  static constexpr std::chrono::milliseconds kWatch{5000};
  // How often the loop devices are looked at during a watch.
  static constexpr std::chrono::milliseconds kPoll{10};

  // `mount_major`/`mount_minor`: the mount's device number (mountinfo).
  // `sys_block` and `dev` are where the loop devices are listed and their
  // nodes found ("/sys/block", "/dev").
  LoopDirectIo(unsigned mount_major, unsigned mount_minor, std::string sys_block = "/sys/block",
               std::string dev = "/dev");
  // Ends a watch under way and waits for the thread.
  ~LoopDirectIo();

  LoopDirectIo(const LoopDirectIo&) = delete;
  LoopDirectIo& operator=(const LoopDirectIo&) = delete;

  // A program that attaches loop devices opened a view: watch for its
  // device. Starts the thread on first use.
  void Watch();

 private:
  void Run();
  // One look at every bound loop device; switches those over this mount
  // that do buffered I/O. Returns how many it switched.
  int Scan();

  const unsigned major_;
  const unsigned minor_;
  const std::string sys_block_;
  const std::string dev_;

  std::mutex mu_;
  std::condition_variable wake_;
  std::chrono::steady_clock::time_point until_;  // guarded by mu_
  int pending_ = 0;                              // opens not yet matched by a switch; guarded by mu_
  bool stop_ = false;                            // guarded by mu_
  std::thread thread_;                           // started by the first Watch
  // Devices ("loop3") over another file system, or that the kernel refused
  // to switch: not opened again until the next open of a view. Only the
  // thread touches it.
  std::set<std::string> skip_;
  bool reset_skip_ = false;  // guarded by mu_
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_LOOP_DIRECT_IO_H_
