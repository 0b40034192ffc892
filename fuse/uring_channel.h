// UringChannel: FUSE requests over io_uring (Linux 6.14 and later).
//
// Over /dev/fuse a request costs the daemon two system calls, a read for
// the request and a write for the reply, and a wakeup of whichever thread
// waits in read. Over io_uring each thread owns a ring entry: a header
// buffer and a payload buffer registered with the kernel. The kernel copies
// a request into a free entry and completes that thread's command; the
// thread sends the reply and waits for its next request in one
// io_uring_enter (COMMIT_AND_FETCH). The kernel keeps one queue of entries
// per CPU and gives a request to the queue of the CPU its caller runs on;
// each queue has threads / CPUs entries.
//
// libfuse 3.14 knows nothing of this, so the channel works around it
// through libfuse's custom I/O hooks (fuse_session_custom_io):
//  - it sees the kernel's INIT as libfuse reads it, and when INIT offers
//    FUSE_OVER_IO_URING adds that flag to libfuse's INIT reply, with the
//    other flags libfuse cannot ask for (init_flags.h);
//  - its threads hand each request of an entry to fuse_session_process_buf
//    laid out as if read from /dev/fuse, so the operations are the same;
//  - the writev hook puts the reply into the request's entry, found by the
//    request's unique ID, and commits it. A reply made on the entry's
//    thread is committed by that thread when libfuse returns; a reply made
//    later on another thread (a request that waited for a lock, or a
//    compressed read finished by the inflate threads) is committed by the
//    thread that replied, whose caches hold it. A test seam
//    (ring_turn_seam.h) lets a test force either order.
// FORGET, INTERRUPT and notifications stay on /dev/fuse, so libfuse's own
// loop runs beside the ring threads. A READ may build its reply in its
// entry's payload buffer (ReplySpace), which then costs no copy.
//
// The kernel offers io_uring only where root has set the fuse module's
// enable_uring parameter (kEnableParameter). Once it has accepted the flag
// it holds every request until each queue has an entry, so the rings and
// buffers are made before INIT is answered, and the flag is left out when
// they cannot be.

#ifndef QCOW2FUSE_FUSE_URING_CHANNEL_H_
#define QCOW2FUSE_FUSE_URING_CHANNEL_H_

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcow2fuse {

class UringChannel {
 public:
  // Where the kernel says whether it offers FUSE over io_uring ("Y").
  static constexpr const char* kEnableParameter = "/sys/module/fuse/parameters/enable_uring";

  // Whether kEnableParameter is "Y": a kernel with FUSE over io_uring,
  // turned on.
  static bool KernelOffers();

  // Prepares `session`, mounted and not yet looping, to move onto io_uring
  // at INIT, with `threads` ring threads spread over the CPUs' queues
  // (at least one each). An error leaves the session as it was.
  static absl::StatusOr<std::unique_ptr<UringChannel>> Install(fuse_session* session, int threads);

  // Stops the threads. Destroy only after fuse_session_destroy: libfuse's
  // hooks reach the channel until then.
  ~UringChannel();

  UringChannel(const UringChannel&) = delete;
  UringChannel& operator=(const UringChannel&) = delete;

  // Whether INIT accepted io_uring: the ring threads serve requests.
  bool active() const;

  // Requests that came over io_uring so far.
  uint64_t served() const;

  // Ends the ring threads once each has handed its request to libfuse.
  // Later requests wait in the kernel until the unmount ends them, as they
  // do on /dev/fuse once libfuse's loop has returned. Replies to requests
  // still running are committed by the threads that make them.
  void Stop();

  // On the thread where libfuse runs a request's callback: the payload
  // buffer of the request's ring entry, where the reply may be built so
  // that sending it costs no copy; empty for a request from /dev/fuse.
  // Valid until the request is answered.
  static std::span<uint8_t> ReplySpace();

  class Impl;

 private:
  explicit UringChannel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_URING_CHANNEL_H_
