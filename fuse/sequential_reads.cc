#include "sequential_reads.h"

#include <algorithm>

namespace qcow2fuse {

SequentialReads::Range SequentialReads::Read(uint64_t offset, uint64_t length, uint64_t size, uint64_t window) {
  if (window == 0 || length < kMinReadBytes) return {};
  const uint64_t end = offset + length;
  std::lock_guard lock(mu_);
  const bool continues = reads_ > 0 && offset + kSlack >= end_ && offset <= end_ + kSlack;
  if (!continues) {
    reads_ = 1;
    end_ = end;
    ahead_ = end;
    return {};
  }
  end_ = std::max(end_, end);
  if (reads_ <= kConfirmingReads) ++reads_;
  if (reads_ <= kConfirmingReads) return {};
  // A stream that overtook what was handed out is read ahead from where it is.
  const uint64_t from = std::max(ahead_, end_);
  const uint64_t to = std::min(size, end_ + window);
  // The last step may be short: the file ends there.
  if (to <= from || (to - from < window / 4 && to < size)) return {};
  ahead_ = to;
  return {from, to - from};
}

}  // namespace qcow2fuse
