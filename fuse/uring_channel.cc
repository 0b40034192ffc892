#include "uring_channel.h"

#include <dlfcn.h>
#include <errno.h>
#include <liburing.h>
#include <linux/fuse.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "commit_turn.h"
#include "init_flags.h"
#include "log.h"
#include "ring_turn_seam.h"

namespace qcow2fuse {
namespace {

// The kernel's FUSE-over-io_uring protocol (include/uapi/linux/fuse.h of
// Linux 6.14), which Debian 12's kernel headers predate.
//
// The INIT flag by which the daemon says it will serve ring entries.
constexpr uint64_t kFuseOverIoUring = uint64_t{1} << 41;
// The two header areas of an entry: the fuse_in_header (request) or
// fuse_out_header (reply), and the operation's own header (fuse_read_in...).
constexpr size_t kInOutHeaderArea = 128;
constexpr size_t kOpHeaderArea = 128;
// The commands of IORING_OP_URING_CMD on /dev/fuse.
constexpr uint32_t kCmdRegister = 1;
constexpr uint32_t kCmdCommitAndFetch = 2;
// The smallest payload buffer the kernel takes, whatever max_write says.
constexpr size_t kMinReadBuffer = 8192;
constexpr size_t kPageSize = 4096;

// struct fuse_uring_ent_in_out: what the kernel and the daemon tell each
// other about an entry besides the FUSE headers.
struct EntryInOut {
  uint64_t flags;
  uint64_t commit_id;   // the request's unique ID, given back at commit
  uint32_t payload_sz;  // bytes of payload, each way
  uint32_t padding;
  uint64_t reserved;
};

// struct fuse_uring_req_header: an entry's first buffer.
struct EntryHeader {
  char in_out[kInOutHeaderArea];
  char op_in[kOpHeaderArea];
  EntryInOut ring_ent_in_out;
};

// struct fuse_uring_cmd_req: the command, in the second half of a 128-byte
// submission queue entry.
struct CommandRequest {
  uint64_t flags;
  uint64_t commit_id;
  uint16_t qid;
  uint8_t padding[6];
};

// user_data of a worker's completions: its command, or the message that
// stops it.
constexpr uint64_t kCommandTag = 1;
constexpr uint64_t kStopTag = 2;

// A worker has one command in flight; a completion may wait beside it.
constexpr unsigned kRingDepth = 4;

// The payload of the ring entry whose request this thread is giving to
// libfuse (UringChannel::ReplySpace).
thread_local std::span<uint8_t> reply_space;

// The kernel keeps one queue per possible CPU, numbered by CPU.
int PossibleCpus() {
  std::ifstream in("/sys/devices/system/cpu/possible");
  std::string text;
  std::getline(in, text);
  // "0-N", or ranges and numbers separated by commas: the last is highest.
  const size_t last = text.find_last_of(",-");
  int highest = 0;
  if (!absl::SimpleAtoi(last == std::string::npos ? text : text.substr(last + 1), &highest) || highest < 0) {
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  return highest + 1;
}

}  // namespace

bool UringChannel::KernelOffers() {
  std::ifstream in(kEnableParameter);
  std::string value;
  return static_cast<bool>(std::getline(in, value)) && value == "Y";
}

class UringChannel::Impl {
 public:
  Impl(fuse_session* session, int queues, int workers_per_queue)
      : session_(session),
        fd_(fuse_session_fd(session)),
        queues_(queues),
        workers_per_queue_(workers_per_queue),
        workers_(static_cast<size_t>(queues) * workers_per_queue) {}

  ~Impl() {
    Stop();
    for (Worker& w : workers_) {
      if (w.ring_made) io_uring_queue_exit(&w.ring);
      free(w.block);
    }
    if (stopper_made_) io_uring_queue_exit(&stopper_);
  }

  // Made before INIT is answered: a kernel that has accepted io_uring
  // holds every request until each queue has an entry.
  absl::Status MakeRings() {
    for (size_t i = 0; i < workers_.size(); ++i) {
      Worker& w = workers_[i];
      w.qid = static_cast<uint16_t>(i / workers_per_queue_);
      io_uring_params params = {};
      params.flags = IORING_SETUP_SQE128;  // room for CommandRequest
      if (int err = io_uring_queue_init_params(kRingDepth, &w.ring, &params); err < 0) {
        return absl::UnavailableError(absl::StrFormat("cannot make an io_uring: %s", strerror(-err)));
      }
      w.ring_made = true;
    }
    if (int err = io_uring_queue_init(kRingDepth, &stopper_, 0); err < 0) {
      return absl::UnavailableError(absl::StrFormat("cannot make an io_uring: %s", strerror(-err)));
    }
    stopper_made_ = true;
    return absl::OkStatus();
  }

  bool active() const { return active_.load(std::memory_order_acquire); }
  uint64_t served() const { return served_.load(std::memory_order_relaxed); }

  // libfuse's read of /dev/fuse: notes what INIT offers.
  ssize_t Read(int fd, void* buf, size_t len) { return init_.Read(fd, buf, len); }

  // libfuse's write of a reply or a notification: a reply to a request
  // from a ring entry goes into that entry.
  ssize_t Writev(int fd, iovec* iov, int count) {
    if (count < 1 || iov[0].iov_len < sizeof(fuse_out_header)) return writev(fd, iov, count);
    const auto* out = static_cast<const fuse_out_header*>(iov[0].iov_base);
    if (out->unique == 0) return writev(fd, iov, count);  // a notification
    if (active()) {
      if (Worker* w = TakeInFlight(out->unique); w != nullptr) return Reply(*w, iov, count);
    }
    if (init_.IsInitReply(*out) && count == 2) return AnswerInit(fd, iov);
    return writev(fd, iov, count);
  }

  void Stop() {
    std::lock_guard<std::mutex> lock(stop_mu_);
    if (stopped_) return;
    stopped_ = true;
    for (Worker& w : workers_) {
      if (!w.thread.joinable()) continue;
      io_uring_sqe* sqe = io_uring_get_sqe(&stopper_);
      if (sqe == nullptr) {
        io_uring_submit(&stopper_);
        sqe = io_uring_get_sqe(&stopper_);
      }
      io_uring_prep_msg_ring(sqe, w.ring.ring_fd, 0, kStopTag, 0);
      sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    }
    io_uring_submit(&stopper_);
    for (Worker& w : workers_) {
      if (w.thread.joinable()) w.thread.join();
    }
  }

 private:
  // A thread, its ring, and the one ring entry it serves.
  struct Worker {
    uint16_t qid = 0;
    io_uring ring;
    bool ring_made = false;
    EntryHeader header;        // the entry's first buffer
    uint8_t* block = nullptr;  // a page, then the payload: the second buffer
    uint8_t* payload = nullptr;
    iovec iov[2];
    uint64_t commit_id = 0;
    CommitTurn turn;  // who commits the reply
    // Orders the submissions of the worker and of a replying thread, which
    // follow one another through the kernel, where no checker sees them.
    std::mutex submit_mu;
    std::thread thread;
  };

  // Sends libfuse's INIT reply with the flags libfuse cannot ask for
  // (init_flags.h), and FUSE_OVER_IO_URING where offered; then starts the
  // workers, which register their entries.
  ssize_t AnswerInit(int fd, iovec* iov) {
    fuse_init_out init = {};
    const size_t init_len = std::min(iov[1].iov_len, sizeof init);
    memcpy(&init, iov[1].iov_base, init_len);
    const uint64_t offered = init_.offered();
    if (!AddInitFlags(init, init_len, kAddedInitFlags & offered)) return writev(fd, iov, 2);
    iovec patched[2] = {iov[0], {&init, init_len}};
    max_payload_ = std::max({kMinReadBuffer, size_t{init.max_write}, size_t{init.max_pages} * kPageSize});
    if ((offered & kFuseOverIoUring) == 0 || !AllocateEntries()) return writev(fd, patched, 2);
    AddInitFlags(init, init_len, kFuseOverIoUring);
    const ssize_t n = writev(fd, patched, 2);
    if (n < 0) return n;
    active_.store(true, std::memory_order_release);
    for (Worker& w : workers_) w.thread = std::thread([this, &w] { Serve(w); });
    Log(LogLevel::kInfo, absl::StrFormat("requests come over io_uring: %d queues (one per CPU) of %d threads",
                                         queues_, workers_per_queue_));
    return n;
  }

  bool AllocateEntries() {
    for (Worker& w : workers_) {
      if (posix_memalign(reinterpret_cast<void**>(&w.block), kPageSize, kPageSize + max_payload_) != 0) {
        Log(LogLevel::kWarning, "requests stay on /dev/fuse: no memory for the io_uring entries");
        return false;
      }
      w.payload = w.block + kPageSize;
      w.iov[0] = {&w.header, sizeof w.header};
      w.iov[1] = {w.payload, max_payload_};
    }
    return true;
  }

  Worker* TakeInFlight(uint64_t unique) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = in_flight_.find(unique);
    if (it == in_flight_.end()) return nullptr;
    Worker* w = it->second;
    in_flight_.erase(it);
    return w;
  }

  // Puts a reply into its request's entry, and commits it unless the ring
  // thread will (CommitTurn).
  ssize_t Reply(Worker& w, const iovec* iov, int count) {
    auto* out = reinterpret_cast<fuse_out_header*>(w.header.in_out);
    memcpy(out, iov[0].iov_base, sizeof *out);
    size_t copied = 0;
    for (int i = 1; i < count; ++i) {
      if (copied + iov[i].iov_len > max_payload_) {
        // libfuse's replies fit max_write; fail the request, not the entry.
        out->error = -EIO;
        out->len = sizeof *out;
        copied = 0;
        break;
      }
      // A reply built in place (ReplySpace) is there already.
      if (iov[i].iov_base != w.payload + copied) memcpy(w.payload + copied, iov[i].iov_base, iov[i].iov_len);
      copied += iov[i].iov_len;
    }
    w.header.ring_ent_in_out.payload_sz = static_cast<uint32_t>(copied);
    const uint64_t commit_id = w.commit_id;  // the worker rewrites it once committed
    const uint64_t unique = out->unique;
    Seam(unique, kRingReplying);
    const bool commits = w.turn.Replied();
    Seam(unique, kRingReplied, commits);
    if (commits) Submit(w, kCmdCommitAndFetch, commit_id);
    return static_cast<ssize_t>(sizeof *out + copied);
  }

  void Serve(Worker& w) {
    Submit(w, kCmdRegister, 0);
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      const int err = io_uring_wait_cqe(&w.ring, &cqe);
      if (err == -EINTR) continue;
      if (err < 0) {
        Log(LogLevel::kError, absl::StrFormat("io_uring thread of queue %u: %s", w.qid, strerror(-err)));
        return;
      }
      const uint64_t tag = cqe->user_data;
      const int res = cqe->res;
      io_uring_cqe_seen(&w.ring, cqe);
      if (tag == kStopTag) return;
      if (res < 0) {
        // ENOTCONN: the connection ended (unmount). Anything else is the
        // kernel refusing the entry, which sends requests to /dev/fuse.
        if (res != -ENOTCONN && res != -ECONNABORTED && res != -ECANCELED) {
          Log(LogLevel::kError, absl::StrFormat("io_uring entry of queue %u: %s", w.qid, strerror(-res)));
        }
        return;
      }
      w.turn.SeeReply();
      served_.fetch_add(1, std::memory_order_relaxed);
      if (Handle(w)) Submit(w, kCmdCommitAndFetch, w.commit_id);
    }
  }

  // Gives the request in `w`'s entry to libfuse, laid out as a read from
  // /dev/fuse would be. True when its reply is there for the worker to
  // commit; false when the thread that replies will.
  bool Handle(Worker& w) {
    w.commit_id = w.header.ring_ent_in_out.commit_id;
    fuse_in_header in;
    memcpy(&in, w.header.in_out, sizeof in);
    const uint32_t payload = w.header.ring_ent_in_out.payload_sz;
    // What is neither the fuse_in_header nor payload is the op header.
    if (in.len < sizeof in + uint64_t{payload} || in.len - sizeof in - payload > kOpHeaderArea ||
        payload > max_payload_) {
      Log(LogLevel::kError, absl::StrFormat("io_uring: request %u (opcode %u) of %u bytes with %u of payload "
                                            "does not fit its entry; answered EIO",
                                            in.unique, in.opcode, in.len, payload));
      auto* out = reinterpret_cast<fuse_out_header*>(w.header.in_out);
      *out = {sizeof(fuse_out_header), -EIO, in.unique};
      w.header.ring_ent_in_out.payload_sz = 0;
      return true;
    }
    const size_t op_header = in.len - sizeof in - payload;
    // The headers go in the page before the payload, which stays put.
    uint8_t* start = w.payload - sizeof in - op_header;
    memcpy(start, &in, sizeof in);
    memcpy(start + sizeof in, w.header.op_in, op_header);
    w.turn.Reset();
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_flight_[in.unique] = &w;
    }
    fuse_buf buf = {};
    buf.size = in.len;
    buf.mem = start;
    // Only a READ uses it, and a READ has no payload of its own.
    reply_space = std::span(w.payload, max_payload_);
    Seam(in.unique, kRingHanding);
    fuse_session_process_buf(session_, &buf);
    reply_space = {};
    Seam(in.unique, kRingReturning);
    const bool commits = w.turn.Returned();
    Seam(in.unique, kRingReturned, commits);
    return commits;
  }

  // Sends `w`'s one command, from the worker or from a replying thread
  // (see turn); the stop message comes from another ring.
  void Submit(Worker& w, uint32_t command, uint64_t commit_id) {
    std::lock_guard<std::mutex> lock(w.submit_mu);
    io_uring_sqe* sqe = io_uring_get_sqe(&w.ring);
    const bool registering = command == kCmdRegister;
    io_uring_prep_rw(IORING_OP_URING_CMD, sqe, fd_, registering ? w.iov : nullptr, registering ? 2 : 0, 0);
    sqe->cmd_op = command;
    sqe->user_data = kCommandTag;
    CommandRequest request = {};
    request.commit_id = commit_id;
    request.qid = w.qid;
    // `cmd` is an array of no declared size that marks where the second
    // half of the 128-byte entry begins.
    static_assert(offsetof(io_uring_sqe, cmd) + sizeof(CommandRequest) <= 2 * sizeof(io_uring_sqe));
    memcpy(reinterpret_cast<uint8_t*>(sqe) + offsetof(io_uring_sqe, cmd), &request, sizeof request);
    if (int err = io_uring_submit(&w.ring); err < 0) {
      Log(LogLevel::kError, absl::StrFormat("io_uring entry of queue %u: cannot send its command: %s", w.qid,
                                            strerror(-err)));
    }
  }

  fuse_session* const session_;
  const int fd_;
  const int queues_;
  const int workers_per_queue_;
  size_t max_payload_ = 0;
  std::vector<Worker> workers_;
  io_uring stopper_;  // sends the stop messages
  bool stopper_made_ = false;

  InitWatch init_;
  std::atomic<bool> active_{false};
  std::atomic<uint64_t> served_{0};

  std::mutex mu_;
  absl::flat_hash_map<uint64_t, Worker*> in_flight_;  // by request unique ID

  std::mutex stop_mu_;
  bool stopped_ = false;

  // The test seam (ring_turn_seam.h): null unless a preloaded library
  // defines it.
  const RingTurnHook seam_ = reinterpret_cast<RingTurnHook>(dlsym(RTLD_DEFAULT, QCOW2FUSE_RING_TURN_SYMBOL));
  void Seam(uint64_t unique, RingTurnStep step, bool commits = false) const {
    if (seam_ != nullptr) seam_(unique, step, commits ? 1 : 0);
  }
};

namespace {

// libfuse gives its custom I/O hooks the session's userdata (the
// MountState), not ours; a process serves one session.
UringChannel::Impl* installed = nullptr;

ssize_t HookRead(int fd, void* buf, size_t len, void*) { return installed->Read(fd, buf, len); }
ssize_t HookWritev(int fd, iovec* iov, int count, void*) { return installed->Writev(fd, iov, count); }

}  // namespace

absl::StatusOr<std::unique_ptr<UringChannel>> UringChannel::Install(fuse_session* session, int threads) {
  if (installed != nullptr) return absl::FailedPreconditionError("io_uring: one session per process");
  const int queues = PossibleCpus();
  auto impl = std::make_unique<Impl>(session, queues, std::max(1, threads / queues));
  if (absl::Status made = impl->MakeRings(); !made.ok()) return made;
  fuse_custom_io io = {};
  io.read = HookRead;
  io.writev = HookWritev;
  installed = impl.get();
  if (int err = fuse_session_custom_io(session, &io, fuse_session_fd(session)); err != 0) {
    installed = nullptr;
    return absl::InternalError(absl::StrFormat("libfuse refused custom I/O: %s", strerror(-err)));
  }
  return std::unique_ptr<UringChannel>(new UringChannel(std::move(impl)));
}

UringChannel::UringChannel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

UringChannel::~UringChannel() {
  impl_->Stop();
  installed = nullptr;
}

bool UringChannel::active() const { return impl_->active(); }

uint64_t UringChannel::served() const { return impl_->served(); }

void UringChannel::Stop() { impl_->Stop(); }

std::span<uint8_t> UringChannel::ReplySpace() { return reply_space; }

}  // namespace qcow2fuse
