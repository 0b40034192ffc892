// DirtyBitmaps: the persistent dirty bitmaps of a writable image ("Bitmaps"
// and "Dirty tracking bitmaps" in the spec), kept up to date as QEMU keeps
// them.
//
// A bitmap has one bit per `granularity` bytes of the disk; a set bit says
// that range was written while the bitmap was enabled (its `auto` flag).
// Incremental backups trust the clear bits: a bitmap that misses a write
// makes the next backup silently wrong. So on disk a bitmap is, at every
// instant, either consistent (it holds every write) or marked in use (not
// to be trusted; the next backup is a full one).
//
// Load() sorts every bitmap of the directory into one of:
//   - recorded: enabled, and in a shape this engine maintains. Its bits are
//     loaded into memory. The first change of the disk marks it in use
//     (MarkInUse); every write, write-zeroes and discard sets the bits of
//     the granules it touches (Mark); Store() writes it back and clears
//     the flag.
//   - disabled (no auto flag): left as it is, flags and bytes, unless the
//     disk is resized; a resize resizes it too, as QEMU does (it is then
//     loaded, marked in use, and stored like a recorded one, recording
//     nothing).
//   - inconsistent: in use already at open, an unknown type or flag, extra
//     data, a granularity or size QEMU does not support, a table that does
//     not fit the disk or is damaged (reserved bits, outside the file, a
//     refcount other than 1, overlapping other metadata), or more memory
//     than the budget allows. The first change marks it in use, if it is
//     not yet, and it stays so. A resize is refused while one exists, as
//     QEMU refuses it.
//
// Crash safety. MarkInUse ends with a barrier, and runs before the first
// change's data can reach the disk. Store() clears the flags only after
// everything it wrote is durable:
//   1. data clusters: rewritten in place (the bitmap is in use, and each
//      cluster's refcount is 1), or allocated where the table holds none
//      (an all-zeros or all-ones entry); the refcounts; barrier;
//   2. the table entries that changed, in place, or a new table where a
//      grown disk needs more table clusters; barrier;
//   3. for a moved table, the directory entry's table offset; barrier;
//   4. the directory: table sizes, and in-use flags cleared; barrier;
//   5. the clusters a shrink or a moved table left behind are given back.
// So a bitmap is in use until the barrier after step 4; every field that
// changes (flags with table size, table offset, table entries) is 8 bytes
// and 8-byte aligned, so no sector holds half of one; every cluster the
// directory reaches is counted and holds what it claims; and a crash leaks
// at most what steps 1 and 2 allocated.
//
// Concurrency. Mark() takes no lock: it ORs 64-bit words atomically and
// runs in parallel with other Marks. Every other call requires the image's
// metadata lock and no Mark in progress (the layer holds every cluster
// lock around Store and Resize, and Marks run under a cluster lock).

#ifndef QCOW2FUSE_META_DIRTY_BITMAPS_H_
#define QCOW2FUSE_META_DIRTY_BITMAPS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/budget.h"
#include "format/bitmap.h"
#include "format/header.h"
#include "io/block_file.h"
#include "meta/metadata_map.h"
#include "meta/refcounts.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

class DirtyBitmaps {
 public:
  // What the bitmaps live among. All outlive this object.
  struct Context {
    BlockFile* file = nullptr;
    Refcounts* refcounts = nullptr;
    MetadataMap* metadata = nullptr;
    MemoryBudget* budget = nullptr;
    uint32_t cluster_bits = 0;
  };

  // Reads the bitmap directory `ext` names and loads the bitmaps to record
  // for a disk of `disk_size` bytes (of which whole 512-byte sectors
  // count, as in QEMU). Fails only on I/O errors and a directory that does
  // not decode or fit the budget; a bitmap it cannot maintain is set aside
  // as inconsistent, with the reason.
  static Task<absl::StatusOr<std::unique_ptr<DirtyBitmaps>>> Load(const Context& context,
                                                                  const BitmapsExtension& ext,
                                                                  uint64_t disk_size);
  ~DirtyBitmaps();

  DirtyBitmaps(const DirtyBitmaps&) = delete;
  DirtyBitmaps& operator=(const DirtyBitmaps&) = delete;

  // Marks in use, durably, every bitmap the changes to come may make wrong
  // (recorded and inconsistent ones) and is not marked yet. No I/O when
  // there is none.
  Task<absl::Status> MarkInUse();

  // Records that the disk's bytes [offset, offset + length) changed, in
  // every recorded bitmap.
  void Mark(uint64_t offset, uint64_t length);

  // Before the disk changes size to `new_size`: FailedPreconditionError
  // (errno EOPNOTSUPP) naming the bitmap when one cannot follow (an
  // inconsistent one, a disabled one that does not load, one that would
  // exceed QEMU's limits); otherwise loads the disabled bitmaps and marks
  // them in use, durably. Changes no size.
  Task<absl::Status> PrepareResize(uint64_t new_size);
  // Once the new size is durable: every loaded bitmap takes it (new
  // granules clean, granules past a shrunken end dropped), as QEMU does.
  // PrepareResize(new_size) must have succeeded.
  void Resize(uint64_t new_size);

  // Writes back every bitmap marked in use by MarkInUse or PrepareResize
  // and clears its flag (see the top of this file). Everything Mark()ed
  // must be durable on disk already. Nothing to do, no I/O.
  Task<absl::Status> Store();

  // Whether some bitmap is marked in use by this engine and not stored.
  bool marked() const;

  enum class State { kRecorded, kDisabled, kInconsistent };
  struct Description {
    std::string name;
    State state;
    bool loaded;      // bits in memory (recorded, or disabled after a resize)
    std::string why;  // kInconsistent: the reason
  };
  // One per bitmap, in directory order.
  std::vector<Description> Describe() const;

 private:
  struct Bitmap;
  explicit DirtyBitmaps(const Context& context);

  uint64_t cluster_size() const { return uint64_t{1} << context_.cluster_bits; }
  std::string What(const Bitmap& b) const;
  // Checks `b`'s table against the image and reads its bits into memory,
  // registering its data clusters as metadata; an error says why it cannot
  // be maintained (and leaves nothing registered or charged).
  Task<absl::Status> LoadBits(Bitmap& b);
  // The granules, table entries and memory of a bitmap of `b`'s
  // granularity over a disk of `disk_size` bytes; an error if QEMU would
  // refuse such a bitmap.
  struct Geometry {
    uint64_t granules = 0;
    uint64_t entries = 0;  // bitmap table entries (data clusters)
    uint64_t words = 0;    // 64-bit words in memory: whole clusters
    uint64_t memory = 0;   // bytes of memory for bits, table, flags
  };
  absl::StatusOr<Geometry> GeometryFor(const Bitmap& b, uint64_t disk_size) const;
  // The bytes of data cluster `index` of `b`, into `out` (one cluster).
  void Serialize(const Bitmap& b, uint64_t index, std::span<uint8_t> out) const;
  bool AllOnes(const Bitmap& b, uint64_t index) const;
  // Sets the in-use flag of `b` in the directory bytes (not yet written).
  void SetFlags(Bitmap& b, uint32_t flags);
  Task<absl::Status> WriteDirectory();
  // Sets the in-use flag of every bitmap `pick` chooses that lacks it and
  // writes the directory, durably; on failure the flags are put back.
  // Returns the bitmaps it marked.
  Task<absl::StatusOr<std::vector<Bitmap*>>> SetInUse(std::function<bool(const Bitmap&)> pick);

  const Context context_;
  uint64_t directory_offset_ = 0;
  std::vector<uint8_t> directory_;  // as on disk once written
  BudgetCharge directory_charge_;
  uint64_t disk_size_ = 0;  // whole sectors
  std::vector<std::unique_ptr<Bitmap>> bitmaps_;
  // The bitmaps Mark() records into: recorded and loaded.
  std::vector<Bitmap*> recording_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_META_DIRTY_BITMAPS_H_
