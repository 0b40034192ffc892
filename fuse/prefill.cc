#include "prefill.h"

#include <algorithm>
#include <span>

#include "qcow2fuse/blocking.h"
#include "qcow2fuse/scheduler.h"

namespace qcow2fuse {
namespace {

// How many extents Next looks at for the next run: a hole and the data
// after it are two (BlockStatus merges runs of one kind); a reader that
// jumps far finds it itself.
constexpr int kMaxExtentsToNextRun = 8;

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
  // them may need (see the read below).
  if (Scheduler::OnOwnThread() || offset >= end || !Claim(ino, offset, end)) co_return;
  if (buffer_ == nullptr) buffer_.reset(new uint8_t[kMaxRunBytes]);
  const std::span<uint8_t> bytes(buffer_.get(), end - offset);
  bool stored = false;
  absl::Status read;
  {
    // A compressed run is inflated on the image's own threads, and an
    // awaiting coroutine goes on there (Scheduler::OnOwnThread): a store
    // from one of them could wait for a READ of the same pages that waits
    // for that very thread to inflate. So this worker waits for the read
    // and stores itself.
    ScopedBlockingCall blocking;
    read = SyncWait(image.Read(view.start() + offset, bytes));
  }
  if (read.ok()) {
    fuse_bufvec data = FUSE_BUFVEC_INIT(bytes.size());
    data.buf[0].mem = bytes.data();
    // Waits for the locks of pages that READs in flight hold. Written to
    // /dev/fuse from the buffer: spliced, libfuse would keep a pipe for
    // each thread that ever stored.
    ScopedBlockingCall blocking;
    stored = fuse_lowlevel_notify_store(session_, ino, static_cast<off_t>(offset), &data, FUSE_BUF_NO_SPLICE) == 0;
  }
  if (stored) {
    runs_.fetch_add(1, std::memory_order_relaxed);
    bytes_.fetch_add(bytes.size(), std::memory_order_relaxed);
  }
  Release(stored);
}

Task<void> Prefill::Next(fuse_ino_t ino, View& view, Image& image, uint64_t hole) {
  const uint64_t size = view.size();
  uint64_t pos = hole;
  for (int i = 0; i < kMaxExtentsToNextRun && pos < size; ++i) {
    absl::StatusOr<Extent> e = co_await image.BlockStatus(view.start() + pos, size - pos);
    if (!e.ok()) co_return;  // the reader's own SEEK_DATA reports it
    if (e->kind == ExtentKind::kData) co_return co_await Run(ino, view, image, pos, pos + e->length);
    pos += e->length;
  }
}

}  // namespace qcow2fuse
