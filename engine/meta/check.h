// The consistency check of a qcow2 image: the analysis `qemu-img check`
// does, without repairing anything.
//
// It counts, for every host cluster of the image file, how many references
// the metadata makes to it ("Host cluster management" in the spec: the
// refcount of a cluster is the number of references to it), and compares
// that with the refcounts stored in the refcount blocks. References come
// from:
//   - the header cluster (cluster 0);
//   - the active L1 table and the L1 table of every internal snapshot;
//   - every L2 table, once per L1 entry that points to it;
//   - every data cluster, once per L2 entry (standard entries and zero
//     entries with a host offset; a compressed cluster adds one to every
//     host cluster its byte range touches). With an external data file,
//     data clusters are not refcounted;
//   - the refcount table and every refcount block;
//   - the snapshot table;
//   - the bitmap directory, every bitmap table and the bitmap data clusters
//     (only when the autoclear bitmaps bit says the extension is valid);
//   - the full disk encryption header.
// Then it checks the COPIED flag (bit 63) of the active L1 entries and of
// the entries of the L2 tables they point to: set iff the stored refcount
// of the cluster is 1.
//
// The counts follow QEMU 7.2's `qemu-img check`, so that the two agree on
// an image: `corruptions` and `leaks` are what `qemu-img check
// --output=json` reports as "corruptions" and "leaks".
//
// Memory: the per-cluster counts cost 5 bytes per host cluster of the file
// (4 for the references, 1 for the stored refcount); a sparse 1 TiB file of
// 512-byte clusters would need 10 GiB. With a memory budget the check runs
// in passes over ranges ("windows") of host clusters, as many clusters per
// pass as half the budget holds: each pass walks the metadata again and
// counts only the references into its window. Clusters past the last one
// referenced need no walk at all: their stored refcounts are leaks, read
// from the refcount blocks that describe them. Problems that do not depend
// on the window (a reserved bit, an entry past the end of the file) are
// counted in the first pass only, so the totals are those of one pass over
// the whole file. Every other structure the check builds from the image
// (snapshot table, bitmap directory, refcount table, the list of L2 tables)
// is charged to the budget too; past it the check fails with the budget's
// error.
//
// Hostile images: every allocation and every loop is bounded by the size of
// the image file. Tables that overlap (for example many snapshots sharing
// one L1 table, or many L1 entries pointing to one L2 table) are read once
// and their entries counted with a multiplicity, so the work is linear in
// the file size whatever the metadata claims. Offsets past the end of the
// file are corruptions, never reads of unbounded size.

#ifndef QCOW2FUSE_META_CHECK_H_
#define QCOW2FUSE_META_CHECK_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/budget.h"
#include "format/header.h"
#include "io/block_file.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

struct CheckResult {
  uint32_t cluster_bits = 0;

  // Per host cluster of the image file (the file size rounded up to whole
  // clusters): the refcount the metadata implies, i.e. the number of
  // references to the cluster. Saturates at UINT32_MAX (only a hostile
  // image gets near it; that is reported as a corruption). References that
  // run less than a cluster past the end of the file (QEMU allows a short
  // last cluster) are clamped to it; references a whole cluster or more
  // past the end are corruptions and are not counted. Empty when the check
  // ran in more than one pass (see above).
  std::vector<uint32_t> expected_refcounts;

  // As `qemu-img check` counts them: a stored refcount below the number of
  // references (this includes two references to one cluster, and metadata
  // overlapping other metadata or data), references past the end of the
  // file, unaligned offsets, reserved bits set, contradictory entries
  // (compressed with COPIED, allocated and zero subclusters, ...), a wrong
  // COPIED flag (one per entry), a refcount block used by anything else,
  // more references than the refcount width can count, and damaged snapshot
  // and bitmap tables. One problem counts once per reference to the table
  // that holds it.
  uint64_t corruptions = 0;
  // Clusters whose stored refcount is above the number of references
  // (most often: refcount > 0 and no reference at all). Harmless for
  // readers; the space is wasted.
  uint64_t leaks = 0;
  // Not inconsistencies of the image file itself: data clusters that lie
  // past the end of the external data file (they read as zeros), a raw
  // external data file shorter than the virtual disk.
  uint64_t warnings = 0;

  // One line per problem, naming the table, the index and the offsets, in
  // the order found; at most CheckOptions::max_messages of them, then one
  // line saying how many more were left out.
  std::vector<std::string> messages;

  bool clean() const { return corruptions == 0 && leaks == 0; }
};

struct CheckOptions {
  size_t max_messages = 100;
  // Charged for the check's structures; null: no limit, one pass.
  MemoryBudget* budget = nullptr;
  // Host clusters counted per pass (rounded up to whole refcount blocks);
  // 0: as many as half the budget holds. For tests of the passes.
  uint64_t window_clusters = 0;
};

// Checks the image in `image` whose decoded header is `header` (see
// DecodeHeader). `external_data_file_or_null` is the opened external data
// file when the image has one and the caller has it; without it, data
// clusters are still checked, except against the data file's size.
//
// Problems of the image are reported in the CheckResult; the returned
// status is an error only when the check itself cannot run: a failed read
// (the error of the BlockFile), a header whose geometry cannot be checked
// (cluster_bits or refcount_order out of range: InvalidArgumentError), a
// file with more than 2^31 clusters (ResourceExhaustedError, as QEMU), or
// a budget too small for the structures of the check (the budget's
// ResourceExhaustedError, naming the structure).
Task<absl::StatusOr<CheckResult>> CheckImage(BlockFile& image, const Header& header,
                                             BlockFile* external_data_file_or_null,
                                             CheckOptions options = {});

// The references the metadata makes to host clusters [first_cluster,
// end_cluster) of the image, counted as CheckResult::expected_refcounts
// counts them: one pass of the check, for a repair that rebuilds the
// refcounts one window at a time. first_cluster must be a multiple of the
// entries of a refcount block.
struct ReferenceCounts {
  uint64_t first_cluster = 0;
  std::vector<uint32_t> counts;  // of clusters first_cluster, first_cluster + 1, ...
  uint64_t nb_clusters = 0;      // clusters of the file (its size rounded up)
  // One past the last cluster of the file that anything references
  // (refcount structures included); 0 if none is.
  uint64_t end_referenced = 0;
};
Task<absl::StatusOr<ReferenceCounts>> CountReferences(BlockFile& image, const Header& header,
                                                      uint64_t first_cluster, uint64_t end_cluster,
                                                      MemoryBudget* budget);

// Bytes a pass of the check spends per host cluster of its window.
inline constexpr uint64_t kCheckBytesPerCluster = sizeof(uint32_t) + sizeof(uint8_t);
inline constexpr uint64_t kCountBytesPerCluster = sizeof(uint32_t);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_META_CHECK_H_
