#include "init_flags.h"

#include <fcntl.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <optional>

#include "absl/strings/str_format.h"

namespace qcow2fuse {
namespace {

// The kernel's INIT request: its unique ID, and its flags with flags2 as
// the high 32 bits.
struct InitRequest {
  uint64_t unique = 0;
  uint64_t flags = 0;
};

// The INIT request in the `n` bytes read from /dev/fuse into `buf`, if
// they hold one.
std::optional<InitRequest> ParseInitRequest(const void* buf, size_t n) {
  if (n < sizeof(fuse_in_header) + sizeof(fuse_init_in)) return std::nullopt;
  fuse_in_header header;
  memcpy(&header, buf, sizeof header);
  if (header.opcode != FUSE_INIT) return std::nullopt;
  fuse_init_in init;
  memcpy(&init, static_cast<const char*>(buf) + sizeof header, sizeof init);
  // flags2 is there only when the kernel says so (FUSE_INIT_EXT).
  const uint64_t flags2 = (init.flags & FUSE_INIT_EXT) != 0 ? init.flags2 : 0;
  return InitRequest{.unique = header.unique, .flags = init.flags | flags2 << 32};
}

}  // namespace

ssize_t InitWatch::Read(int fd, void* buf, size_t len) {
  const ssize_t n = read(fd, buf, len);
  if (n > 0) {
    if (std::optional<InitRequest> init = ParseInitRequest(buf, static_cast<size_t>(n))) {
      offered_.store(init->flags, std::memory_order_relaxed);
      unique_.store(init->unique, std::memory_order_relaxed);
    }
  }
  return n;
}

bool InitWatch::IsInitReply(const fuse_out_header& out) const {
  // Notifications have unique 0, and so has unique_ before INIT.
  return out.unique != 0 && out.unique == unique_.load(std::memory_order_relaxed) && out.error == 0;
}

bool AddInitFlags(fuse_init_out& reply, size_t reply_len, uint64_t flags) {
  const bool has_flags2 =
      reply_len >= offsetof(fuse_init_out, flags2) + sizeof reply.flags2 && (reply.flags & FUSE_INIT_EXT) != 0;
  if (!has_flags2) return false;
  reply.flags |= static_cast<uint32_t>(flags);
  reply.flags2 |= static_cast<uint32_t>(flags >> 32);
  return true;
}

namespace {

// libfuse gives the hooks the session's userdata, not ours; a process
// serves one session.
std::atomic<bool> installed{false};
InitWatch watch;

ssize_t HookRead(int fd, void* buf, size_t len, void*) { return watch.Read(fd, buf, len); }

ssize_t HookWritev(int fd, iovec* iov, int count, void*) {
  if (count == 2 && iov[0].iov_len >= sizeof(fuse_out_header) &&
      watch.IsInitReply(*static_cast<const fuse_out_header*>(iov[0].iov_base))) {
    fuse_init_out init = {};
    const size_t len = std::min(iov[1].iov_len, sizeof init);
    memcpy(&init, iov[1].iov_base, len);
    if (AddInitFlags(init, len, kAddedInitFlags & watch.offered())) {
      iovec patched[2] = {iov[0], {&init, len}};
      return writev(fd, patched, 2);
    }
  }
  return writev(fd, iov, count);
}

// Without it libfuse would not splice replies (spliced_reply.h) for a
// session with hooks.
ssize_t HookSpliceSend(int fdin, off_t* offin, int fdout, off_t* offout, size_t len, unsigned int flags, void*) {
  return splice(fdin, offin, fdout, offout, len, flags);
}

}  // namespace

absl::Status InstallInitHooks(fuse_session* session) {
  if (installed.exchange(true)) return absl::FailedPreconditionError("INIT hooks: one session per process");
  fuse_custom_io io = {};
  io.read = HookRead;
  io.writev = HookWritev;
  io.splice_send = HookSpliceSend;
  if (int err = fuse_session_custom_io(session, &io, fuse_session_fd(session)); err != 0) {
    installed = false;
    return absl::InternalError(absl::StrFormat("libfuse refused custom I/O: %s", strerror(-err)));
  }
  return absl::OkStatus();
}

}  // namespace qcow2fuse
