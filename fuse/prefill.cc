#include "prefill.h"

#include <algorithm>
#include <span>
#include <thread>
#include <vector>

#include "qcow2fuse/blocking.h"
#include "qcow2fuse/scheduler.h"
#include "spliced_reply.h"

namespace qcow2fuse {
namespace {

// How many extents Next looks at for the next run: a hole and the data
// after it are two (BlockStatus merges runs of one kind); a reader that
// jumps far finds it itself.
constexpr int kMaxExtentsToNextRun = 8;
// How many extents one advice looks at: the first reaches a few runs
// ahead, and each later one, a run further on, tops the advice up.
constexpr int kMaxExtentsPerAdvice = 16;

}  // namespace

bool Prefill::Claim(fuse_ino_t ino, uint64_t start, uint64_t end) {
  std::lock_guard lock(mu_);
  if (busy_ || (ino == ino_ && start >= start_ && end <= end_)) return false;
  busy_ = true;
  ino_ = ino;
  start_ = start;
  end_ = end;
  return true;
}

void Prefill::Release(bool stored) {
  std::lock_guard lock(mu_);
  busy_ = false;
  // A store that failed leaves nothing that Claim should skip.
  if (!stored) end_ = start_;
}

Task<void> Prefill::Run(fuse_ino_t ino, View& view, Image& image, uint64_t offset, uint64_t hole) {
  const uint64_t end = std::min(hole, offset + kMaxRunBytes);
  // Stores wait on page locks: never from a thread that the READ holding
  // them may need (see the reads below).
  if (Scheduler::OnOwnThread() || offset >= end || !Claim(ino, offset, end)) co_return;
  const uint64_t length = end - offset;
  SplicedStore spliced = SplicedStore::kNotSpliced;
  if (splice_.load(std::memory_order_relaxed) && length <= MaxSplicedReply()) {
    // A run stored in one piece of the image file goes from the host page
    // cache to the view's without a copy here, as a spliced READ does. The
    // store must be made inside `send` (the clusters may be reused once it
    // returns), and only from this worker: should the mapping have waited
    // for a lock, `send` runs on the thread that let it go, and the buffer
    // below takes over.
    const std::thread::id worker = std::this_thread::get_id();
    absl::StatusOr<bool> sent;
    {
      ScopedBlockingCall blocking;
      sent = SyncWait(image.SendStored(view.start() + offset, length, [&](int fd, uint64_t file_offset) {
        if (std::this_thread::get_id() == worker) {
          spliced = StoreSpliced(session_, ino, offset, fd, file_offset, length);
        }
      }));
    }
    if (!sent.ok()) spliced = SplicedStore::kRefused;  // the reader's own READ reports it
  }
  bool stored = spliced == SplicedStore::kStored;
  if (spliced == SplicedStore::kNotSpliced) {
    if (buffer_ == nullptr) buffer_.reset(new uint8_t[kMaxRunBytes]);
    const std::span<uint8_t> bytes(buffer_.get(), length);
    absl::Status read;
    {
      // A compressed run is inflated on the image's own threads, and an
      // awaiting coroutine goes on there (Scheduler::OnOwnThread): a store
      // from one of them could wait for a READ of the same pages that
      // waits for that very thread to inflate. So this worker waits for
      // the read and stores itself.
      ScopedBlockingCall blocking;
      read = SyncWait(image.Read(view.start() + offset, bytes));
    }
    if (read.ok()) {
      fuse_bufvec data = FUSE_BUFVEC_INIT(bytes.size());
      data.buf[0].mem = bytes.data();
      // Waits for the locks of pages that READs in flight hold. Not
      // spliced from the buffer: it would be a copy into a pipe first.
      ScopedBlockingCall blocking;
      stored = fuse_lowlevel_notify_store(session_, ino, static_cast<off_t>(offset), &data, FUSE_BUF_NO_SPLICE) == 0;
    }
  }
  if (stored) {
    runs_.fetch_add(1, std::memory_order_relaxed);
    bytes_.fetch_add(length, std::memory_order_relaxed);
    if (spliced == SplicedStore::kStored) spliced_runs_.fetch_add(1, std::memory_order_relaxed);
  }
  Release(stored);
}

Task<void> Prefill::Next(fuse_ino_t ino, View& view, Image& image, uint64_t hole) {
  const uint64_t seq = next_seq_.fetch_add(1, std::memory_order_relaxed) + 1;
  const uint64_t size = view.size();
  uint64_t pos = hole;
  for (int i = 0; i < kMaxExtentsToNextRun && pos < size; ++i) {
    absl::StatusOr<Extent> e = co_await image.BlockStatus(view.start() + pos, size - pos);
    if (!e.ok()) co_return;  // the reader's own SEEK_DATA reports it
    if (e->kind == ExtentKind::kData) {
      co_await Run(ino, view, image, pos, pos + e->length);
      co_return co_await AdviseAhead(ino, view, image, seq, pos, pos + e->length);
    }
    pos += e->length;
  }
}

Task<void> Prefill::AdviseAhead(fuse_ino_t ino, View& view, Image& image, uint64_t seq, uint64_t run_start,
                                uint64_t run_end) {
  uint64_t pos;
  uint64_t bytes = 0;
  int runs;
  {
    std::lock_guard lock(mu_);
    Ahead& a = ahead_;
    // A Next that began before the last one to advise comes late: its
    // reader is further on already.
    if (a.walking || (ino == a.ino && seq < a.seq)) co_return;
    // A reader one or more runs further on keeps what lies advised past
    // it; any other reader (another file, a jump back) starts afresh.
    if (ino != a.ino || run_start < a.reader || run_end >= a.until) {
      a.advised.clear();
      a.until = run_end;
    }
    while (!a.advised.empty() && a.advised.front().start < run_end) a.advised.pop_front();
    for (const Range& r : a.advised) bytes += r.length;
    runs = static_cast<int>(a.advised.size());
    pos = a.until;
    a.ino = ino;
    a.seq = seq;
    a.reader = run_end;
    a.walking = true;
  }
  std::vector<Range> advised;
  const uint64_t size = view.size();
  for (int i = 0; i < kMaxExtentsPerAdvice && pos < size && bytes < kAheadBytes && runs < kAheadRuns; ++i) {
    absl::StatusOr<Extent> e = co_await image.BlockStatus(view.start() + pos, size - pos);
    if (!e.ok()) break;  // the reader's own seeks and reads report it
    uint64_t length = e->length;
    if (e->kind == ExtentKind::kData) {
      length = std::min(length, kAheadBytes - bytes);  // the rest of a long run later
      co_await image.WillNeed(view.start() + pos, length, length);
      advised.push_back({pos, length});
      bytes += length;
      ++runs;
    }
    pos += length;
  }
  advised_runs_.fetch_add(advised.size(), std::memory_order_relaxed);
  std::lock_guard lock(mu_);
  ahead_.advised.insert(ahead_.advised.end(), advised.begin(), advised.end());
  ahead_.until = pos;
  ahead_.walking = false;
}

}  // namespace qcow2fuse
