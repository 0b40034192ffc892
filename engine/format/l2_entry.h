// L1 and L2 table entries ("Cluster mapping" and "Extended L2 Entries" in
// the spec) and the compressed cluster descriptor ("Compressed Clusters
// Descriptor"). Pure decoding: no I/O, no validation against the file.

#ifndef QCOW2FUSE_FORMAT_L2_ENTRY_H_
#define QCOW2FUSE_FORMAT_L2_ENTRY_H_

#include <cstdint>

namespace qcow2fuse {

// The offset of the L2 table an L1 entry points to; 0 means the whole L2
// table is unallocated.
uint64_t L1EntryL2Offset(uint64_t l1_entry);

// One L2 entry: the 64-bit cluster descriptor and, with extended L2
// entries, the 64-bit subcluster allocation bitmap (0 otherwise).
struct L2Entry {
  uint64_t descriptor = 0;
  uint64_t bitmap = 0;
};

// How the image lays out its L2 entries and data; fixed for an image.
struct L2Format {
  bool extended_l2 = false;
  // With an external data file, host offset 0 is a valid data offset and
  // the COPIED flag tells it apart from "unallocated".
  bool external_data_file = false;
  uint32_t cluster_bits = 16;

  uint32_t entry_size() const;
  uint32_t subclusters_per_cluster() const;
  uint32_t subcluster_bits() const;
};

// Decodes the entry at `p` (8 or 16 bytes, big-endian).
L2Entry DecodeL2Entry(const uint8_t* p, const L2Format& format);
// Encodes `entry` at `p`, the inverse of DecodeL2Entry.
void EncodeL2Entry(const L2Entry& entry, uint8_t* p, const L2Format& format);
// How many of the `count` entries from `p` on, before the first that is
// not, are all zero bytes: an all-zero entry, standard or extended, is an
// unallocated cluster that reads from the backing file. A sparse image's
// L2 tables are mostly such entries, and a walk over a large hole skips
// them here without decoding each one.
uint64_t CountZeroL2Entries(const uint8_t* p, uint64_t count, const L2Format& format);

// What reading one subcluster must do. Standard L2 entries have one
// subcluster per cluster. Names follow QEMU's, since the spec describes
// the same states in prose.
enum class SubclusterType {
  kUnallocatedPlain,  // no host cluster: read the backing file (or zeros)
  kUnallocatedAlloc,  // host cluster exists, but this subcluster reads the backing file
  kZeroPlain,         // reads as zeros, no host cluster
  kZeroAlloc,         // reads as zeros; the host cluster is only preallocated
  kNormal,            // data at host offset
  kCompressed,        // whole cluster compressed; see CompressedDescriptor
  kInvalid,           // the entry contradicts itself: the image is corrupt
};

const char* SubclusterTypeName(SubclusterType type);

// The type of subcluster `index` (0 for standard entries).
SubclusterType GetSubclusterType(const L2Entry& entry, uint32_t index, const L2Format& format);

// Host offset of the cluster for kNormal, kZeroAlloc and kUnallocatedAlloc
// entries (bits 9-55 of the descriptor).
uint64_t L2EntryHostOffset(const L2Entry& entry);

// Reserved bits that are set in a standard (non-compressed) descriptor. The
// spec says they must be zero; non-zero means a damaged entry.
uint64_t L2EntryReservedBits(const L2Entry& entry, const L2Format& format);

// A compressed cluster: where its bytes start, and how many bytes at most
// belong to it. The size is only known to 512-byte sector precision, so
// the range may include the start of the next compressed cluster.
struct CompressedDescriptor {
  uint64_t host_offset = 0;
  uint64_t max_size = 0;
};
CompressedDescriptor DecodeCompressedDescriptor(uint64_t descriptor, uint32_t cluster_bits);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FORMAT_L2_ENTRY_H_
