// ZeroRanges: the guest ranges of one image known to read as zeros without
// holding a host cluster: clusters discarded or zeroed here, and L2 ranges
// with no table at all past the end of any backing file.
//
// It lets a read of such a range, and a repeated discard or write-zeroes of
// it, finish without looking at a single L2 entry, so that zeroing what is
// already zero costs no I/O at all (the idea of QEMU's mirror zero bitmap).
// Knowledge is only ever a shortcut: a range missing from here is looked up
// in the metadata as usual, so the set may forget ranges (it stops growing
// at kMaxRanges runs) but must never hold one that is not zero. Every
// change to an L2 entry removes its cluster first (Qcow2Layer::StoreEntry).
//
// Thread-safe.

#ifndef QCOW2FUSE_META_ZERO_RANGES_H_
#define QCOW2FUSE_META_ZERO_RANGES_H_

#include <cstdint>
#include <mutex>

#include "absl/container/btree_map.h"

namespace qcow2fuse {

class ZeroRanges {
 public:
  // Runs kept at most; beyond that new knowledge is dropped.
  static constexpr size_t kMaxRanges = size_t{1} << 16;

  // Records that [begin, end) reads as zeros.
  void Add(uint64_t begin, uint64_t end);
  // Forgets [begin, end), which is about to change.
  void Remove(uint64_t begin, uint64_t end);
  // Bytes from `offset` known to be zero, 0 if `offset` is not.
  uint64_t ZeroRunAt(uint64_t offset) const;
  // Whether all of [begin, end) is known to be zero.
  bool Contains(uint64_t begin, uint64_t end) const { return ZeroRunAt(begin) >= end - begin; }

  size_t runs() const;

 private:
  mutable std::mutex mu_;
  absl::btree_map<uint64_t, uint64_t> runs_;  // begin -> end, disjoint, not adjacent
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_META_ZERO_RANGES_H_
