// Rebuilding the refcounts of an image whose refcounts cannot be trusted:
// one left dirty by a crash while lazy refcounts were on ("dirty bit",
// incompatible feature bit 0, in the spec).
//
// The references the metadata makes (meta/check.h) are the truth. A new
// refcount table and new refcount blocks that record exactly them are
// written past the end of the image, made durable, and only then does the
// header switch to them and drop the dirty bit, so a crash during the
// rebuild leaves the image as it was. The old table and blocks become
// unreferenced (their clusters get refcount 0).

#ifndef QCOW2FUSE_META_REPAIR_H_
#define QCOW2FUSE_META_REPAIR_H_

#include "absl/status/status.h"
#include "format/header.h"
#include "io/block_file.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

// Rebuilds the refcounts of the image in `file` (writable) and clears its
// dirty bit; `header` is updated to match what is now on disk. Refuses an
// image whose metadata is inconsistent in ways refcounts cannot fix.
Task<absl::Status> RebuildRefcounts(BlockFile& file, Header& header, BlockFile* external_data_file);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_META_REPAIR_H_
