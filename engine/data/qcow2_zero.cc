// Zeroes, discard and preallocation for Qcow2Layer: the L2 transitions
// behind fallocate PUNCH_HOLE, ZERO_RANGE and mode 0. See qcow2_layer.h.
//
// The transitions of a whole cluster (spec: "Cluster mapping"; standard L2
// entries use the zero flag, bit 0, extended ones the zero bits 32-63 of
// the subcluster bitmap):
//
//   from \ request     discard             zero                zero+unmap
//   data, host H       zero, or unalloc.   zero, keeps H       zero
//                      without backing
//   compressed         same                zero                zero
//   zero, keeps H      same                unchanged           zero
//   zero, no host      unchanged           unchanged           unchanged
//   unallocated        unchanged without backing, else zero
//
// "zero" is a zero entry without a host cluster. A host cluster no longer
// referenced is freed at the next flush (step 4 of the flush protocol).
// Version 2 images have no zero flag: where a zero entry would be needed,
// zeros are written as data.

#include <algorithm>
#include <vector>

#include "absl/strings/str_format.h"
#include "base/all_zero.h"
#include "data/qcow2_layer.h"
#include "format/spec.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// Bits first..last (inclusive) of a 32-bit subcluster bitmap half.
uint64_t SubclusterMask(uint32_t first, uint32_t last) {
  return ((uint64_t{1} << (last + 1)) - 1) & ~((uint64_t{1} << first) - 1);
}

bool SameEntry(const L2Entry& a, const L2Entry& b) {
  return a.descriptor == b.descriptor && a.bitmap == b.bitmap;
}

}  // namespace

Task<absl::Status> Qcow2Layer::Discard(uint64_t offset, uint64_t length) {
  CO_RETURN_IF_ERROR(CorruptStatus());
  ReadTracker::Ticket ticket = BeginRequest();
  RangeLock::Guard guard = co_await LockClusters(offset, length);
  co_return co_await Finish(co_await ZeroRange(offset, length, ZeroMode::kDiscard));
}

Task<absl::Status> Qcow2Layer::WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) {
  CO_RETURN_IF_ERROR(CorruptStatus());
  ReadTracker::Ticket ticket = BeginRequest();
  RangeLock::Guard guard = co_await LockClusters(offset, length);
  co_return co_await Finish(
      co_await ZeroRange(offset, length, may_unmap ? ZeroMode::kZeroUnmap : ZeroMode::kZero));
}

L2Entry Qcow2Layer::ZeroEntry() const {
  L2Entry zero;
  if (format_.extended_l2) {
    zero.bitmap = spec::kSubclusterAllocMask << spec::kSubclusterZeroShift;
  } else {
    zero.descriptor = spec::kOflagZero;
  }
  return zero;
}

bool Qcow2Layer::HasHostCluster(const L2Entry& entry) const {
  if (entry.descriptor & spec::kOflagCompressed) return false;
  // With an external data file, host offset 0 is a valid cluster.
  return L2EntryHostOffset(entry) != 0 || (external_data_file_ && (entry.descriptor & spec::kOflagCopied));
}

bool Qcow2Layer::OverBacking(uint64_t guest_cluster) const {
  return backing_ != nullptr && guest_cluster < backing_->size();
}

Task<absl::Status> Qcow2Layer::ZeroRange(uint64_t offset, uint64_t length, ZeroMode mode) {
  CO_RETURN_IF_ERROR(co_await PrepareFirstWrite());
  // The whole range, whatever it held: QEMU's bitmaps record a discard or
  // write-zeroes as a write.
  if (bitmaps_) bitmaps_->Mark(offset, std::min(length, header_.size - std::min(offset, header_.size)));
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t end = offset + length;
  // A request that reaches the end of the disk covers its last cluster
  // whole: the bytes past the end are not the guest's.
  const uint64_t whole_end = end >= header_.size ? std::max(end, (header_.size + cluster_size - 1) & ~(cluster_size - 1)) : end;
  const uint64_t bytes_per_l2 = cluster_size * header_.l2_entries();
  for (uint64_t pos = offset; pos < end;) {
    const uint64_t guest_cluster = pos & ~(cluster_size - 1);
    const uint64_t part_end = std::min(guest_cluster + cluster_size, end);
    if (uint64_t known = known_zero_.ZeroRunAt(pos); known > 0) {
      pos = std::min(end, pos + known);  // nothing to do: no lookup, no I/O
      continue;
    }
    if (mode == ZeroMode::kZero) {
      if (uint64_t known = known_zero_with_host_.ZeroRunAt(pos); known > 0) {
        pos = std::min(end, pos + known);
        continue;
      }
    }
    // An L2 range with no table and nothing beneath it is all zero already.
    // Only the clusters this request holds are recorded as known zero: a
    // write to another cluster of the range may be creating the table now,
    // and the record would hide its data.
    const uint64_t l1_index = pos / bytes_per_l2;
    if (l1_index < L1Size() && L1EntryL2Offset(L1Entry(l1_index)) == 0 &&
        !OverBacking(l1_index * bytes_per_l2)) {
      const uint64_t range_end = std::min(end, (l1_index + 1) * bytes_per_l2);
      known_zero_.Add(guest_cluster, std::min((l1_index + 1) * bytes_per_l2,
                                              (end + cluster_size - 1) & ~(cluster_size - 1)));
      pos = range_end;
      continue;
    }
    if (pos == guest_cluster && guest_cluster + cluster_size <= whole_end) {
      CO_RETURN_IF_ERROR(co_await ZeroWholeCluster(guest_cluster, mode));
    } else {
      CO_RETURN_IF_ERROR(co_await ZeroPartOfCluster(pos, part_end, mode));
    }
    pos = part_end;
  }
  co_return co_await FlushIfCachesFull();
}

Task<absl::Status> Qcow2Layer::ZeroWholeCluster(uint64_t guest_cluster, ZeroMode mode) {
  const uint64_t cluster_size = header_.cluster_size();
  absl::StatusOr<L2Entry> old = co_await LookupEntry(guest_cluster);
  if (!old.ok()) co_return old.status();
  const bool compressed = old->descriptor & spec::kOflagCompressed;
  const bool has_host = HasHostCluster(*old);
  const bool over_backing = OverBacking(guest_cluster);

  // What the cluster reads now, if it holds no host cluster: zeros when
  // every subcluster is zero, or nothing lies beneath.
  bool reads_zero = false;
  if (!has_host && !compressed) {
    const bool all_zero = format_.extended_l2
                              ? (old->bitmap >> spec::kSubclusterZeroShift) == spec::kSubclusterAllocMask
                              : (old->descriptor & spec::kOflagZero) != 0;
    reads_zero = all_zero || !over_backing;
  }
  if (reads_zero) {
    known_zero_.Add(guest_cluster, guest_cluster + cluster_size);
    co_return absl::OkStatus();
  }

  if (header_.version < spec::kVersion3 ||
      (external_data_file_ && (header_.autoclear_features & spec::kAutoclearDataFileRaw))) {
    // No zero flag (version 2), or a raw data file that must itself read as
    // the disk does: unallocated is enough only where nothing shows through.
    if (mode != ZeroMode::kZero && !over_backing && !external_data_file_) {
      CO_RETURN_IF_ERROR(CheckFreeable(guest_cluster, *old));
      RangeLock::Guard meta = co_await meta_mu_.Lock();
      CO_RETURN_IF_ERROR(co_await StoreEntry(guest_cluster, L2Entry{}));
      FreeLater(*old);
      known_zero_.Add(guest_cluster, guest_cluster + cluster_size);
      co_return absl::OkStatus();
    }
    co_return co_await WriteZeroBytes(guest_cluster, guest_cluster + cluster_size);
  }

  L2Entry updated = ZeroEntry();
  bool keep_host = false;
  if (mode == ZeroMode::kZero && has_host) {
    // A preallocated zero cluster: the host cluster stays for later writes.
    keep_host = true;
    updated = *old;
    if (format_.extended_l2) {
      updated.bitmap = spec::kSubclusterAllocMask << spec::kSubclusterZeroShift;
    } else {
      updated.descriptor |= spec::kOflagZero;
    }
  } else if (mode == ZeroMode::kDiscard && !over_backing) {
    updated = L2Entry{};
  }
  if (external_data_file_ && has_host) {
    // The data file keeps no refcounts and maps guest offsets 1:1; its
    // bytes there are no longer needed.
    keep_host = true;
    if (!SameEntry(updated, *old)) {
      updated.descriptor |= L2EntryHostOffset(*old) | (old->descriptor & spec::kOflagCopied);
      if (!format_.extended_l2) updated.descriptor |= spec::kOflagZero;
    }
    CO_RETURN_IF_ERROR(co_await external_data_file_->Discard(guest_cluster, cluster_size));
  }
  if (!SameEntry(updated, *old)) {
    if (!keep_host) CO_RETURN_IF_ERROR(CheckFreeable(guest_cluster, *old));
    RangeLock::Guard meta = co_await meta_mu_.Lock();
    CO_RETURN_IF_ERROR(co_await StoreEntry(guest_cluster, updated));
    if (!keep_host) FreeLater(*old);
  }
  (keep_host ? known_zero_with_host_ : known_zero_).Add(guest_cluster, guest_cluster + cluster_size);
  co_return absl::OkStatus();
}

Task<absl::StatusOr<bool>> Qcow2Layer::HoldsData(uint64_t offset, uint64_t end) {
  end = std::min(end, header_.size);
  while (offset < end) {
    absl::StatusOr<Extent> e = co_await BlockStatus(offset, end - offset);
    if (!e.ok()) co_return e.status();
    if (e->kind == ExtentKind::kData) co_return true;
    offset += e->length;
  }
  co_return false;
}

Task<absl::Status> Qcow2Layer::WriteZeroBytes(uint64_t offset, uint64_t end) {
  std::vector<uint8_t> zeros(end - offset, 0);
  co_return co_await WriteInCluster(offset, zeros);
}

// Part of one cluster: whole subclusters get their zero bit (extended L2),
// the rest gets zeros written, and only where it holds data now. A cluster
// that reads as zeros all through afterwards becomes a zero cluster, as if
// one request had zeroed it whole: zeros that arrive in pieces (the kernel
// splits a write from an unaligned buffer into 4 KiB requests, none of
// which covers a cluster) end up as they would in one aligned request.
Task<absl::Status> Qcow2Layer::ZeroPartOfCluster(uint64_t offset, uint64_t end, ZeroMode mode) {
  absl::StatusOr<bool> data = co_await HoldsData(offset, end);
  if (!data.ok()) co_return data.status();
  if (!*data) co_return absl::OkStatus();
  CO_RETURN_IF_ERROR(co_await ZeroDataInCluster(offset, end));

  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t guest_cluster = offset & ~(cluster_size - 1);
  // Without zero clusters (version 2, a raw data file) a whole-cluster
  // request could only write the zeros again, unless it may unallocate.
  const bool no_zero_flag = header_.version < spec::kVersion3 ||
                            (external_data_file_ && (header_.autoclear_features & spec::kAutoclearDataFileRaw));
  if (no_zero_flag && (mode == ZeroMode::kZero || OverBacking(guest_cluster) || external_data_file_)) {
    co_return absl::OkStatus();
  }
  std::vector<uint8_t> content(cluster_size);
  CO_RETURN_IF_ERROR(co_await FillFromGuest(guest_cluster, content));
  if (!IsAllZero(std::span<const uint8_t>(content))) co_return absl::OkStatus();
  co_return co_await ZeroWholeCluster(guest_cluster, mode);
}

Task<absl::Status> Qcow2Layer::ZeroDataInCluster(uint64_t offset, uint64_t end) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t guest_cluster = offset & ~(cluster_size - 1);
  const bool raw_data_file =
      external_data_file_ && (header_.autoclear_features & spec::kAutoclearDataFileRaw);
  if (!format_.extended_l2 || raw_data_file) co_return co_await WriteZeroBytes(offset, end);

  absl::StatusOr<L2Entry> old = co_await LookupEntry(guest_cluster);
  if (!old.ok()) co_return old.status();
  if (old->descriptor & spec::kOflagCompressed) co_return co_await WriteZeroBytes(offset, end);

  const uint64_t subcluster_size = uint64_t{1} << format_.subcluster_bits();
  // The last subcluster of the disk counts as whole if the range reaches
  // the end of the disk.
  const uint64_t aligned_end = end >= header_.size ? (end + subcluster_size - 1) & ~(subcluster_size - 1)
                                                   : end & ~(subcluster_size - 1);
  const uint64_t first = (offset - guest_cluster + subcluster_size - 1) / subcluster_size;
  const uint64_t last = (std::min(aligned_end, guest_cluster + cluster_size) - guest_cluster) / subcluster_size;
  if (first < last) {
    const uint64_t touched = SubclusterMask(first, last - 1);
    L2Entry updated = *old;
    updated.bitmap = (old->bitmap & ~touched) | (touched << spec::kSubclusterZeroShift);
    if (!SameEntry(updated, *old)) {
      RangeLock::Guard meta = co_await meta_mu_.Lock();
      CO_RETURN_IF_ERROR(co_await StoreEntry(guest_cluster, updated));
    }
    if (external_data_file_) {
      CO_RETURN_IF_ERROR(co_await external_data_file_->Discard(guest_cluster + first * subcluster_size,
                                                               (last - first) * subcluster_size));
    }
  }
  // The unaligned head and tail, where they still hold data.
  const uint64_t head_end = first < last ? guest_cluster + first * subcluster_size : end;
  const uint64_t tail_begin = first < last ? guest_cluster + last * subcluster_size : end;
  for (auto [from, to] : {std::pair{offset, std::min(head_end, end)}, std::pair{std::max(tail_begin, offset), end}}) {
    if (from >= to) continue;
    absl::StatusOr<bool> holds = co_await HoldsData(from, to);
    if (!holds.ok()) co_return holds.status();
    if (*holds) CO_RETURN_IF_ERROR(co_await WriteZeroBytes(from, to));
  }
  co_return absl::OkStatus();
}

Task<absl::Status> Qcow2Layer::Preallocate(uint64_t offset, uint64_t length) {
  CO_RETURN_IF_ERROR(CorruptStatus());
  if (length == 0) co_return absl::OkStatus();
  ReadTracker::Ticket ticket = BeginRequest();
  RangeLock::Guard guard = co_await LockClusters(offset, length);
  absl::Status status = co_await PrepareFirstWrite();
  const uint64_t cluster_size = header_.cluster_size();
  for (uint64_t gc = offset & ~(cluster_size - 1); status.ok() && gc < offset + length; gc += cluster_size) {
    status = co_await PreallocateCluster(gc);
  }
  if (status.ok()) status = co_await FlushIfCachesFull();
  co_return co_await Finish(status);
}

Task<absl::Status> Qcow2Layer::PreallocateCluster(uint64_t guest_cluster) {
  const uint64_t cluster_size = header_.cluster_size();
  absl::StatusOr<L2Entry> old = co_await LookupEntry(guest_cluster);
  if (!old.ok()) co_return old.status();
  const bool compressed = old->descriptor & spec::kOflagCompressed;
  const bool has_host = HasHostCluster(*old);
  if (has_host || compressed) co_return absl::OkStatus();  // already has its space

  absl::StatusOr<bool> data = co_await HoldsData(guest_cluster, guest_cluster + cluster_size);
  if (!data.ok()) co_return data.status();
  if (*data || header_.version < spec::kVersion3) {
    // Backing data shows through (or there is no zero flag): copy what the
    // guest sees into a cluster of its own.
    std::vector<uint8_t> content(cluster_size);
    CO_RETURN_IF_ERROR(co_await FillFromGuest(guest_cluster, content));
    co_return co_await WriteInCluster(guest_cluster, content);
  }
  absl::StatusOr<uint64_t> host;
  {
    RangeLock::Guard meta = co_await meta_mu_.Lock();
    host = co_await AllocateDataCluster(guest_cluster);
    if (!host.ok()) co_return host.status();
    CO_RETURN_IF_ERROR(CheckHostWrite(*host, cluster_size, "a preallocated cluster"));
  }
  CO_RETURN_IF_ERROR(co_await data_file_->Allocate(*host, cluster_size));
  L2Entry updated{*host | spec::kOflagCopied, 0};
  if (format_.extended_l2) {
    updated.bitmap = spec::kSubclusterAllocMask << spec::kSubclusterZeroShift;
  } else {
    updated.descriptor |= spec::kOflagZero;
  }
  RangeLock::Guard meta = co_await meta_mu_.Lock();
  CO_RETURN_IF_ERROR(co_await StoreEntry(guest_cluster, updated));
  known_zero_with_host_.Add(guest_cluster, guest_cluster + cluster_size);
  co_return absl::OkStatus();
}

}  // namespace qcow2fuse
