// The bytes of a new, empty qcow2 image: what `qemu-img create -f qcow2`
// writes, for overlays made at mount time (-o overlay=, -o volatile).
//
// Layout, as QEMU lays it out: the header and its extensions, with the
// backing file name after them, in cluster 0; the refcount table from
// cluster 1; its refcount blocks next; then the L1 table, all zeros. Every
// one of those clusters has refcount 1 (16-bit refcounts, refcount_order
// 4); nothing else is allocated. Version 3, no features, zlib (deflate)
// compression.

#ifndef QCOW2FUSE_FORMAT_CREATE_H_
#define QCOW2FUSE_FORMAT_CREATE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace qcow2fuse {

struct NewImageSpec {
  uint64_t size = 0;             // virtual disk size, a multiple of 512
  uint32_t cluster_bits = 16;    // 9..21
  std::string backing_file;      // recorded as given; empty: none
  std::string backing_format;    // recorded in the backing format extension; empty: none
};

struct NewImageLayout {
  // The leading bytes of the file: header cluster, refcount table and
  // refcount blocks. The rest, up to file_size, is zeros (the L1 table).
  std::vector<uint8_t> head;
  uint64_t file_size = 0;
};

// Lays out a new image; refuses a spec that QEMU could not open either (a
// size or cluster size out of range, a backing name too long for the
// header cluster) with a message naming the value.
absl::StatusOr<NewImageLayout> LayOutNewImage(const NewImageSpec& spec);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FORMAT_CREATE_H_
