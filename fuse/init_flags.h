// INIT flags newer than libfuse 3.14.
//
// libfuse 3.14 speaks FUSE protocol 7.38 and answers the kernel's INIT
// with the flags it knows. The newer ones the daemon wants are added to
// that reply on its way to /dev/fuse, by a hook on libfuse's writes
// (fuse_session_custom_io): UringChannel's, which also adds
// FUSE_OVER_IO_URING, or, on a session without a UringChannel, the one
// InstallInitHooks sets. A flag is added only when the kernel's INIT
// offered it; an older kernel never sees it.

#ifndef QCOW2FUSE_FUSE_INIT_FLAGS_H_
#define QCOW2FUSE_FUSE_INIT_FLAGS_H_

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <linux/fuse.h>

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace qcow2fuse {

// FUSE_DIRECT_IO_ALLOW_MMAP (protocol 7.39, Linux 6.6): a descriptor in
// direct-I/O mode (Open in ops.cc) may be mapped MAP_SHARED; the kernel
// keeps the mapping's pages coherent with the descriptor's writes.
inline constexpr uint64_t kFuseDirectIoAllowMmap = uint64_t{1} << 36;

// What the daemon adds to every INIT reply, where the kernel offers it.
inline constexpr uint64_t kAddedInitFlags = kFuseDirectIoAllowMmap;

// The kernel's INIT as libfuse reads it, for a writev hook that adds
// flags to the reply. Thread-safe.
class InitWatch {
 public:
  // read(2) of /dev/fuse that notes the INIT request among what it reads.
  ssize_t Read(int fd, void* buf, size_t len);
  // Whether `out` heads the successful reply to INIT.
  bool IsInitReply(const fuse_out_header& out) const;
  // The flags INIT offered (flags2 as the high 32 bits); 0 before INIT.
  uint64_t offered() const { return offered_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> unique_{0};
  std::atomic<uint64_t> offered_{0};
};

// Adds `flags` (flags2 as the high 32 bits) to the INIT reply `reply`, of
// which libfuse wrote `reply_len` bytes. False, and nothing added, when the
// reply does not carry flags2 (FUSE_INIT_EXT unset).
bool AddInitFlags(fuse_init_out& reply, size_t reply_len, uint64_t flags);

// Sets hooks on `session`, mounted and not yet looping, that add
// kAddedInitFlags to libfuse's INIT reply. For a session without a
// UringChannel, whose hooks do the same; one session per process.
absl::Status InstallInitHooks(fuse_session* session);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_INIT_FLAGS_H_
