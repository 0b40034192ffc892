// Rebuilding the refcounts of an image whose refcounts cannot be trusted:
// one left dirty by a crash while lazy refcounts were on ("dirty bit",
// incompatible feature bit 0, in the spec).
//
// The references the metadata makes (meta/check.h) are the truth. A new
// refcount table and new refcount blocks that record exactly them are
// written in clusters nothing references, right after the last cluster
// that anything references (old refcount structures included), made
// durable, and only then does the header switch to them and drop the
// dirty bit, so a crash during the rebuild leaves the image as it was. The
// old table and blocks become unreferenced (their clusters get refcount 0).
// Only refcount blocks that count something are written: the sparse tail
// of a file costs neither blocks nor refcount table entries.
//
// Memory: the references are counted in passes over windows of host
// clusters, 4 bytes per cluster, as many clusters per pass as half the
// budget holds; each pass walks the metadata again. Clusters past the last
// one referenced are not counted at all, so a sparse 1 TiB file of 512-byte
// clusters (2^31 clusters) whose metadata lies at its start costs what its
// start costs. What the budget cannot hold (a window of one refcount block,
// the refcount table) refuses the repair with the budget's one-line error.

#ifndef QCOW2FUSE_META_REPAIR_H_
#define QCOW2FUSE_META_REPAIR_H_

#include "absl/status/status.h"
#include "base/budget.h"
#include "format/header.h"
#include "io/block_file.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

// Rebuilds the refcounts of the image in `file` (writable) and clears its
// dirty bit; `header` is updated to match what is now on disk. Refuses an
// image whose metadata is inconsistent in ways refcounts cannot fix. The
// structures of the rebuild are charged to `budget`; null: a budget of its
// own, of the default size (ImageOptions::max_metadata_memory).
// `window_clusters`, for tests: clusters counted per pass (rounded up to
// whole refcount blocks) instead of what half the budget holds.
Task<absl::Status> RebuildRefcounts(BlockFile& file, Header& header, BlockFile* external_data_file,
                                    MemoryBudget* budget = nullptr, uint64_t window_clusters = 0);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_META_REPAIR_H_
