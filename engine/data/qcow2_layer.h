// Qcow2Layer: one qcow2 image. It maps guest offsets to host clusters
// through the L1 table (held in memory) and L2 slices (in a TableCache),
// reads data from the image or its external data file, inflates compressed
// clusters, and sends what the image does not hold to its backing layer.
//
// The top image of a chain may be writable (qcow2_write.cc): allocating
// writes with copy-on-write, refcounts, L1 growth, and a flush protocol
// that keeps the image consistent on disk at every instant:
//   1. refcount blocks (then new refcount table entries) and guest data,
//      barrier: every cluster that will be referenced is counted and holds
//      its data;
//   2. dirty L2 slices, barrier;
//   3. dirty L1 entries, barrier;
//   4. only now drop the refcounts of clusters no longer referenced, and
//      discard those that became free.
// Persistent dirty bitmaps (meta/dirty_bitmaps.h) are marked in use before
// the first change, record every write, write-zeroes and discard, and are
// stored consistent again by Close().
// Until a flush, changed metadata lives in the caches; a crash loses the
// unflushed writes (as a disk loses its write cache) and leaks at most the
// clusters allocated for them.
//
// Zeroes and discard (qcow2_zero.cc): Discard and WriteZeroes turn whole
// clusters into zero or unallocated entries and whole subclusters into zero
// subclusters, write explicit zeros only for the unaligned remainder, and
// leave alone what already reads as zero with no host cluster: its L2 slice
// is not even dirtied. ZeroRanges remembers what is known to be zero, so
// repeating such a request costs no I/O at all.
//
// Concurrency. Requests run in parallel on the scheduler's threads, and
// wait only where they conflict:
//   - cluster_locks_: every request that changes L2 entries holds its guest
//     clusters from its first lookup to its last store, so a discard never
//     frees a cluster an allocating write is about to link, and two
//     copy-on-writes into one cluster cannot both allocate. Requests over
//     other clusters, and reads, do not wait for it.
//   - meta_mu_ (a coroutine mutex) guards the shared write-side state:
//     refcounts, allocation, L2 stores, the dirty L1 entries, the frees
//     waiting for a flush. It is held for the metadata steps of a request,
//     never across its data I/O, and for the whole of a flush, whose order
//     it protects.
//   - l1_mu_ guards the L1 table in memory, for a few instructions at a
//     time: readers copy an entry under it.
// Reads take none of these beyond l1_mu_; the L2 cache hands them tables
// that no writer changes in place (TableCache::Modify).

#ifndef QCOW2FUSE_DATA_QCOW2_LAYER_H_
#define QCOW2FUSE_DATA_QCOW2_LAYER_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_set.h"

#include "base/budget.h"
#include "data/codec.h"
#include "data/layer.h"
#include "format/bitmap.h"
#include "format/header.h"
#include "format/l2_entry.h"
#include "format/snapshot.h"
#include "io/block_file.h"
#include "meta/dirty_bitmaps.h"
#include "meta/header_writer.h"
#include "meta/metadata_map.h"
#include "meta/refcounts.h"
#include "meta/table_cache.h"
#include "meta/zero_ranges.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/scheduler.h"
#include "sched/latch.h"
#include "sched/range_lock.h"
#include "sched/read_tracker.h"

namespace qcow2fuse {

class Qcow2Layer final : public Layer {
 public:
  // Opens the image in `file`, whose header has been decoded. `backing` is
  // the layer below it, or null. `data_file` is its external data file, or
  // null when the image holds its own data.
  static Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> Open(std::unique_ptr<BlockFile> file,
                                                                 Header header,
                                                                 std::unique_ptr<BlockFile> data_file,
                                                                 std::unique_ptr<Layer> backing,
                                                                 const ImageOptions& options);

  uint64_t size() const override { return header_.size; }
  uint64_t cluster_size() const override { return header_.cluster_size(); }
  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override;
  Task<absl::StatusOr<Extent>> BlockStatus(uint64_t offset, uint64_t max_length) override;
  Task<void> WillNeed(uint64_t offset, uint64_t length, uint64_t max_data) override;
  // Image::SendStored, for this image alone: its backing chain is not
  // looked at.
  Task<absl::StatusOr<bool>> SendStored(uint64_t offset, uint64_t length,
                                        absl::FunctionRef<void(int fd, uint64_t file_offset)> send);
  uint64_t L2TableBytes() const override;
  std::string Describe() const override;
  void AppendFileDescriptors(std::vector<int>& fds) const override;

  // Bytes the image file occupies on its file system (st_blocks). A file
  // that reports no blocks, a block device above all, counts its size:
  // 0 is for an empty file only, since this is the estimate behind
  // st_blocks until the count is made, and a file of no blocks reads as
  // one without data (GNU tar --sparse then archives zeros).
  uint64_t HostFileBytes() const;

  // The count of data bytes behind st_blocks (bytes of the disk that are
  // kData through the chain). One walk of the tables makes it, inline or
  // on a thread of its own (`in_background`, for large images); from then
  // on every change of an L2 entry adjusts it (StoreEntry), and a resize
  // adjusts it for the bytes that came or went, so reading it costs
  // nothing, whatever the size of the image.
  Task<void> StartDataCount(bool in_background);
  // The count, or nullopt while the walk has not finished.
  std::optional<uint64_t> DataBytes() const;
  ~Qcow2Layer() override;

  // The image's snapshot table, read from the file now; a table that cannot
  // be decoded is a DataLossError naming the entry.
  Task<absl::StatusOr<SnapshotTable>> ReadSnapshotTable();
  // A read-only layer that reads the disk as `snapshot` (an entry of
  // ReadSnapshotTable) recorded it: through the snapshot's L1 table, at the
  // snapshot's disk size (`default_size` for an entry that records none),
  // borrowing this layer's files, L2 cache and backing
  // layer; destroy it before this layer. Sharing the L2 cache is safe while
  // this layer writes, for an image whose COPIED flags and refcounts agree
  // (QEMU's invariant, which a damaged image may break): an L2 table or
  // data cluster that a snapshot also references has a refcount above 1
  // and no COPIED flag, so it is copied, never changed in place, and a
  // cache slot is only reused (Forget) for a cluster that no snapshot
  // references. An image with an external data file is refused, as QEMU
  // refuses snapshots there: its data is always written in place.
  Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> OpenSnapshot(const SnapshotEntry& snapshot,
                                                                 uint64_t default_size);

  const Header& header() const { return header_; }
  bool writable() const { return refcounts_ != nullptr; }

  // Writes `data` at guest `offset` (inside size()).
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data);
  // Puts everything written so far on stable storage (the protocol above).
  Task<absl::Status> Flush();
  // Brings the slow part of the next Flush forward: fdatasync of the file
  // that holds guest data, under no lock, so requests go on meanwhile. It
  // makes no write durable by itself (the metadata that finds the data
  // waits for Flush); an extra barrier only narrows the orders in which
  // writes reach the disk, which the protocol already allows. A failure
  // latches in the file (io/latched_file.h), so the next Flush reports it.
  Task<absl::Status> SyncData();
  // Waits for every change in flight, flushes, and stores the persistent
  // dirty bitmaps, which are consistent on disk once it returns OK. A
  // change after it marks them in use again.
  Task<absl::Status> Close();
  // The persistent bitmaps of a writable image with a bitmaps extension.
  const DirtyBitmaps* bitmaps() const { return bitmaps_.get(); }
  // Changes the virtual size. Growing makes the new space read as zeros;
  // shrinking is refused (FailedPreconditionError) if data would be lost.
  Task<absl::Status> Truncate(uint64_t new_size);
  // The error Truncate(new_size) would refuse a shrink with, or OK.
  Task<absl::Status> CheckShrink(uint64_t new_size);

  // Makes [offset, offset + length) read as zeros and frees the host
  // clusters wholly inside it (PUNCH_HOLE). Where a backing file could show
  // through, freed clusters become zero clusters, not unallocated ones.
  Task<absl::Status> Discard(uint64_t offset, uint64_t length);
  // Makes the range read as zeros with zero clusters and zero subclusters
  // (ZERO_RANGE). Host clusters are kept (as preallocated zero clusters)
  // unless `may_unmap`; compressed clusters are always freed.
  Task<absl::Status> WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap);
  // Gives every cluster of the range a host cluster without changing what
  // it reads (fallocate mode 0): later writes there allocate nothing.
  Task<absl::Status> Preallocate(uint64_t offset, uint64_t length);

  // What the write path has done since Open, for tests and statistics.
  ImageCounters counters() const;

  // A run of guest bytes that one L2 entry type covers, from Map().
  struct Mapping {
    SubclusterType type;
    uint64_t length;
    uint64_t host_offset;             // kNormal: host offset of the run's first byte
    CompressedDescriptor compressed;  // kCompressed: the cluster's descriptor
  };
  // Maps the run starting at `offset`, at most `max_length` bytes, that has
  // one type (and, for data, contiguous host offsets). A run never crosses
  // an L2 slice, and a compressed run never crosses its cluster.
  Task<absl::StatusOr<Mapping>> Map(uint64_t offset, uint64_t max_length);

 private:
  // `l2_cache`: the cache to share (OpenSnapshot), or null for one of its own.
  Qcow2Layer(std::unique_ptr<BlockFile> file, Header header, std::unique_ptr<BlockFile> data_file,
             std::unique_ptr<Layer> backing, const ImageOptions& options,
             std::shared_ptr<TableCache> l2_cache = nullptr);
  // Open's work once the layer is made.
  static Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> Load(std::unique_ptr<Qcow2Layer> layer);

  Task<absl::Status> ReadBacking(uint64_t offset, std::span<uint8_t> out);
  Task<absl::Status> ReadCompressed(uint64_t offset, const CompressedDescriptor& descriptor,
                                    std::span<uint8_t> out);
  // One compressed cluster's part of a read.
  struct CompressedRead {
    uint64_t offset;
    CompressedDescriptor descriptor;
    std::span<uint8_t> out;
  };
  // Reads several compressed clusters, inflating them in parallel on the
  // inflate pool: inflating is the time of a compressed read, and one
  // request holds up to sixteen 64 KiB clusters.
  Task<absl::Status> ReadCompressedClusters(std::span<const CompressedRead> reads);
  static Task<void> ReadCompressedJob(Qcow2Layer* self, CompressedRead read, absl::Status* result, Latch* latch);
  Scheduler& InflatePool();
  // The cluster of `descriptor`, inflated, from the cache of recently
  // inflated clusters or else inflated and cached.
  Task<absl::StatusOr<std::shared_ptr<const std::vector<uint8_t>>>> Decompress(
      const CompressedDescriptor& descriptor);
  // Reads the compressed stream of `descriptor` and inflates it into `out`
  // (one whole cluster), bypassing the cache.
  Task<absl::Status> Inflate(const CompressedDescriptor& descriptor, std::span<uint8_t> out);

  // The offset of the L2 table for L1 entry `l1_index` after checking it,
  // or 0 when the entry is unallocated.
  absl::StatusOr<uint64_t> L2TableOffset(uint64_t l1_index) const;

  // The slice of the L2 table at host offset `l2_offset` that holds the
  // entry of guest `offset`, as the L2 cache holds it.
  struct L2Slice {
    uint64_t host_offset;      // of the slice in the file: the cache's key
    uint64_t entry_offset;     // of the entry within the slice, in bytes
    uint64_t first_entry;      // index in the table of the slice's first entry
    uint64_t guest_start;      // the guest range the slice maps
    uint64_t guest_end;
    uint64_t table_guest_end;  // the end of the whole table's guest range
  };
  L2Slice SliceOf(uint64_t offset, uint64_t l2_offset) const;
  // A walk from `slice` goes on to guest offset `end`: the slices of its
  // table that it needs, at most 64 KiB of them, are read into the cache
  // in one read of the file if `slice` is not cached (TableCache::Prefetch).
  // Only advice.
  Task<void> PrefetchL2(const L2Slice& slice, uint64_t end);

  // Write path (qcow2_write.cc).
  Task<absl::Status> PrepareFirstWrite();
  Task<absl::Status> WriteInCluster(uint64_t offset, std::span<const uint8_t> data);
  Task<absl::Status> FillFromGuest(uint64_t offset, std::span<uint8_t> out);
  Task<absl::StatusOr<L2Entry>> LookupEntry(uint64_t guest_offset);
  // The L1 entry at `l1_index` (under l1_mu_); 0 past the table's end.
  uint64_t L1Entry(uint64_t l1_index) const;
  uint64_t L1Size() const;
  // These four require meta_mu_ held.
  Task<absl::Status> StoreEntry(uint64_t guest_offset, const L2Entry& entry);
  Task<absl::StatusOr<uint64_t>> WritableL2Table(uint64_t l1_index);
  Task<absl::StatusOr<uint64_t>> AllocateDataCluster(uint64_t guest_cluster);
  // Gives up the host clusters `old_entry` points to, or `clusters` host
  // clusters from `offset`: their refcounts drop at a flush once nothing
  // on disk points to them and no request that could have mapped them is
  // still running (see pending_frees_).
  void FreeLater(const L2Entry& old_entry);
  void FreeLater(uint64_t offset, uint64_t clusters);
  // Whether some pending free may be done now.
  bool FreesReady() const;
  // Requires meta_mu_ held: the flush protocol itself.
  Task<absl::Status> FlushLocked();
  // Requires meta_mu_ held: FlushLocked unless every change finished is
  // covered already.
  Task<absl::Status> FlushChangesLocked();
  // Discards the host clusters whose refcount dropped to 0, once that is
  // durable.
  Task<absl::Status> DiscardFreed();
  // The walk behind StartDataCount: one L2 slice's worth of disk at a time,
  // each counted under meta_mu_ so that no entry changes between what it
  // sees and count_end_ moving past it.
  Task<void> CountDataBytes();
  // Bytes of [begin, end) of `layer` (this one or the backing layer) that
  // are data; a damaged entry counts its cluster as data.
  static Task<uint64_t> DataBytesIn(Layer& layer, uint64_t begin, uint64_t end);
  // Data bytes of [begin, end), inside one guest cluster, if its entry were
  // `entry`.
  Task<uint64_t> EntryDataBytes(const L2Entry& entry, uint64_t begin, uint64_t end);
  // Requires meta_mu_ held: the entry of `guest_cluster` changed from `old`.
  Task<void> CountEntryChange(uint64_t guest_cluster, const L2Entry& old, const L2Entry& now);
  // Held by every request for as long as it may map and read host
  // clusters (see sched/read_tracker.h); none for a read-only layer, which
  // never frees a cluster.
  ReadTracker::Ticket BeginRequest() { return writable() ? reads_.Begin() : ReadTracker::Ticket(); }
  Task<absl::Status> GrowL1(uint64_t entries);
  // Writes `now` over header field bytes that are `before` (HeaderWriter).
  Task<absl::Status> WriteHeaderField(uint32_t field_offset, std::span<const uint8_t> now,
                                      std::span<const uint8_t> before);
  // The bitmap directory (the header has the extension), its bytes and
  // decoded entries; their memory is charged to `charge`.
  struct BitmapDirectory {
    std::vector<uint8_t> bytes;
    std::vector<BitmapDirectoryEntry> entries;
  };
  Task<absl::StatusOr<BitmapDirectory>> ReadBitmapDirectory(BudgetCharge& charge);
  Task<absl::Status> ZeroNewSpace(uint64_t old_size, uint64_t new_size);
  Task<absl::Status> FlushIfCachesFull();
  // The one check before every write to a host cluster that is not a
  // write of that structure itself (guest data in place or copied, zeros,
  // a preallocated cluster, a new L1 or L2 table): [offset, offset +
  // length) of the data file must lie where a cluster can be (inside the
  // file, or for a new cluster inside the clusters handed out; for an
  // external data file, inside the disk) and, in the image file, touch no
  // metadata (metadata_). DataLossError naming `what` and what it would
  // have hit, which marks the image corrupt (Finish), as QEMU does.
  // Requires meta_mu_ held, except `in_place` (a cluster already linked,
  // which must lie inside the file).
  absl::Status CheckHostWrite(uint64_t offset, uint64_t length, std::string_view what,
                              bool in_place = false) const;
  // The same for giving back the host clusters of `entry` (guest cluster
  // `guest_cluster`): a crafted entry must not free metadata, whose cluster
  // would then be discarded and handed out again. Call before the entry is
  // replaced.
  absl::Status CheckFreeable(uint64_t guest_cluster, const L2Entry& entry) const;
  // Refuses an L1 table with two entries naming one L2 table (at open).
  absl::Status CheckL2TablesDistinct();
  // Registers the metadata of a writable image in metadata_ (at open),
  // refusing structures that overlap one another.
  Task<absl::Status> RegisterMetadata();
  // Marks the image corrupt (header bit) after `status`, a DataLossError
  // met while changing it, and latches it: later changes fail.
  Task<absl::Status> MarkCorrupt(absl::Status status);
  // The error every change gets once the image is marked corrupt, or OK.
  absl::Status CorruptStatus() const;
  Task<absl::Status> WriteData(uint64_t offset, std::span<const uint8_t> data);
  Task<absl::Status> Resize(uint64_t new_size);
  // The shrink rule: FailedPreconditionError (errno EINVAL) naming the first
  // non-zero byte at or past `new_size`.
  Task<absl::Status> CheckNoDataFrom(uint64_t new_size);
  // Holds the guest clusters of [offset, offset + length) (see
  // cluster_locks_); every public change takes this first.
  auto LockClusters(uint64_t offset, uint64_t length) {
    const uint32_t bits = header_.cluster_bits;
    return cluster_locks_.Lock(offset >> bits, (offset + std::max<uint64_t>(length, 1) - 1) >> bits);
  }
  // The end of every public change: a DataLossError met while changing the
  // image marks it corrupt (MarkCorrupt).
  Task<absl::Status> Finish(absl::Status status);

  // Zeroes and discard (qcow2_zero.cc).
  enum class ZeroMode { kDiscard, kZero, kZeroUnmap };
  Task<absl::Status> ZeroRange(uint64_t offset, uint64_t length, ZeroMode mode);
  Task<absl::Status> ZeroWholeCluster(uint64_t guest_cluster, ZeroMode mode);
  Task<absl::Status> ZeroPartOfCluster(uint64_t offset, uint64_t end, ZeroMode mode);
  // ZeroPartOfCluster's zeroing of [offset, end), which holds data.
  Task<absl::Status> ZeroDataInCluster(uint64_t offset, uint64_t end);
  Task<absl::Status> WriteZeroBytes(uint64_t offset, uint64_t end);
  Task<absl::StatusOr<bool>> HoldsData(uint64_t offset, uint64_t end);
  Task<absl::Status> PreallocateCluster(uint64_t guest_cluster);
  // The L2 entry of a cluster that reads as zeros without a host cluster.
  L2Entry ZeroEntry() const;
  // Whether `entry` points to a host cluster of its own (normal or
  // preallocated zero; not compressed).
  bool HasHostCluster(const L2Entry& entry) const;
  // Whether the part of the disk a cluster covers lies over a backing file.
  bool OverBacking(uint64_t guest_cluster) const;

  const std::unique_ptr<BlockFile> file_;
  Header header_;  // size and table locations change as the image grows
  const std::unique_ptr<BlockFile> external_data_file_;
  BlockFile* const data_file_;  // external_data_file_ or file_
  const std::unique_ptr<Layer> backing_;
  const L2Format format_;
  const CompressionType compression_;
  // Memory taken for the image's own structures (see base/budget.h),
  // shared with the rest of the chain.
  const std::shared_ptr<MemoryBudget> budget_;
  mutable std::shared_mutex l1_mu_;
  std::vector<uint64_t> l1_;
  // Shared with the layers of the image's snapshots (OpenSnapshot).
  const std::shared_ptr<TableCache> l2_cache_owner_;
  TableCache& l2_cache_;

  // Writing (null refcounts_ for a read-only layer). Under meta_mu_.
  AsyncMutex meta_mu_;
  std::unique_ptr<HeaderWriter> header_writer_;  // before refcounts_, which uses it
  std::unique_ptr<Refcounts> refcounts_;
  std::atomic<bool> prepared_for_write_{false};
  absl::btree_set<uint64_t> dirty_l1_;
  // Host clusters to give back once no durable metadata points to them
  // (step 4 of the flush protocol) and no request that began before
  // `moment`, and so may have mapped them, is still running. In the order
  // given up, so moments never decrease along the list.
  struct PendingFree {
    uint64_t offset;
    uint64_t clusters;
    uint64_t moment;  // reads_.Now() when the last reference went
  };
  std::vector<PendingFree> pending_frees_;
  ReadTracker reads_;
  // Changes finished so far (Finish), and how many of them the last good
  // flush covered: a flush with nothing new to cover does no I/O, so a
  // close or a periodic flush of an idle view costs nothing. Both under
  // meta_mu_ except the increment.
  std::atomic<uint64_t> changes_{0};
  uint64_t flushed_changes_ = 0;
  bool flush_failed_ = false;
  // Where the metadata of a writable image lies (null when read-only), for
  // CheckHostWrite; the refcounts keep their part of it up to date.
  std::unique_ptr<MetadataMap> metadata_;
  // The persistent dirty bitmaps (null when read-only or without any).
  std::unique_ptr<DirtyBitmaps> bitmaps_;
  BudgetCharge l1_charge_;    // l1_
  BudgetCharge map_charge_;   // metadata_'s clusters
  // Set once the image is found inconsistent while writing: it is marked
  // corrupt on disk and every later change is refused.
  std::atomic<bool> is_corrupt_{false};
  mutable std::mutex corrupt_mu_;
  absl::Status corrupt_;
  RangeLock cluster_locks_;
  ZeroRanges known_zero_;
  // Clusters known to read as zeros that keep a host cluster (zeroed
  // without unmap, preallocated): a repeated plain zeroing skips them, a
  // discard does not (it has a cluster to free).
  ZeroRanges known_zero_with_host_;
  // The data-bytes count (StartDataCount): data_bytes_ covers the disk
  // below count_end_, and count_limit_ is the size of the disk it counts
  // (both under meta_mu_). Counted once count_end_ reaches count_limit_.
  std::atomic<uint64_t> data_bytes_{0};
  std::atomic<bool> counted_{false};
  uint64_t count_end_ = 0;
  uint64_t count_limit_ = 0;
  std::thread counter_;  // the background walk, if any
  std::atomic<bool> closing_{false};
  // Counters not kept by the caches (see counters()).
  std::atomic<uint64_t> data_bytes_written_{0};
  std::atomic<uint64_t> other_metadata_writes_{0};  // L1 entries, new tables, header fields

  // The last few inflated clusters: FUSE reads 128 KiB to 1 MiB at a time,
  // so one compressed 2 MiB cluster would otherwise be inflated many times.
  struct Inflated {
    uint64_t host_offset;
    std::shared_ptr<const std::vector<uint8_t>> data;
  };
  std::mutex inflated_mu_;
  std::list<Inflated> inflated_;
  // Threads that inflate clusters, one per core; made at the first read
  // with more than one compressed cluster.
  std::once_flag inflate_pool_once_;
  std::unique_ptr<Scheduler> inflate_pool_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_DATA_QCOW2_LAYER_H_
