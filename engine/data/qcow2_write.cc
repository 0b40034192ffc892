// The write path of Qcow2Layer: allocation, copy-on-write, the flush
// protocol and resizing. See qcow2_layer.h for the ordering rules.

#include <errno.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/all_zero.h"
#include "base/endian.h"
#include "data/qcow2_layer.h"
#include "format/bitmap.h"
#include "format/spec.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// How much of the disk a shrink reads at a time to see whether it is zero.
constexpr uint64_t kShrinkCheckChunk = uint64_t{1} << 20;

uint64_t RoundUp(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// Bits first..last (inclusive) of a 32-bit subcluster bitmap half.
uint64_t SubclusterMask(uint32_t first, uint32_t last) {
  return ((uint64_t{1} << (last + 1)) - 1) & ~((uint64_t{1} << first) - 1);
}

}  // namespace

Task<absl::Status> Qcow2Layer::WriteHeaderField(uint32_t field_offset, std::span<const uint8_t> now,
                                                std::span<const uint8_t> before) {
  ++other_metadata_writes_;
  co_return co_await header_writer_->Switch(field_offset, now, before);
}

Task<absl::StatusOr<Qcow2Layer::BitmapDirectory>> Qcow2Layer::ReadBitmapDirectory(BudgetCharge& charge) {
  const BitmapsExtension& b = *header_.bitmaps;
  // The header check bounded the directory to QEMU's 64 MiB limit.
  CO_RETURN_IF_ERROR(charge.Take(budget_.get(), b.bitmap_directory_size,
                                 absl::StrFormat("the bitmap directory of %s", file_->name())));
  BitmapDirectory dir;
  dir.bytes.resize(b.bitmap_directory_size);
  CO_RETURN_IF_ERROR(co_await file_->Read(b.bitmap_directory_offset, dir.bytes));
  absl::StatusOr<std::vector<BitmapDirectoryEntry>> entries = DecodeBitmapDirectory(dir.bytes, b.nb_bitmaps);
  if (!entries.ok()) co_return entries.status();
  dir.entries = *std::move(entries);
  co_return dir;
}

// Before the first change (and the first after a Close): refuse images
// whose refcounts cannot be trusted, mark the persistent bitmaps in use,
// and stop claiming what we do not maintain (spec: "Autoclear feature
// bits").
Task<absl::Status> Qcow2Layer::PrepareFirstWrite() {
  if (prepared_for_write_) co_return absl::OkStatus();
  if (!writable()) {
    co_return absl::FailedPreconditionError(absl::StrFormat("%s is open read-only", file_->name()));
  }
  RangeLock::Guard meta = co_await meta_mu_.Lock();
  if (prepared_for_write_) co_return absl::OkStatus();  // another request got here first
  if (header_.incompatible_features & spec::kIncompatDirty) {
    // Open() rebuilds the refcounts of a dirty image it may write.
    co_return absl::InternalError(absl::StrFormat("%s is still dirty", file_->name()));
  }
  // Durably in use before any change can reach the disk: a bitmap that
  // claims to be consistent must hold every write.
  if (bitmaps_) CO_RETURN_IF_ERROR(co_await bitmaps_->MarkInUse());
  // The bitmaps bit stays only where there are bitmaps to mark: without the
  // extension it would claim a bitmap directory that QEMU then looks for.
  const uint64_t kept = (header_.bitmaps ? spec::kAutoclearBitmaps : 0) | spec::kAutoclearDataFileRaw;
  if (header_.autoclear_features & ~kept) {
    uint8_t field[8];
    StoreBE64(field, header_.autoclear_features & kept);
    uint8_t old_field[8];
    StoreBE64(old_field, header_.autoclear_features);
    CO_RETURN_IF_ERROR(co_await WriteHeaderField(spec::kOffAutoclearFeatures, field, old_field));
    header_.autoclear_features &= kept;
  }
  prepared_for_write_ = true;
  co_return absl::OkStatus();
}

absl::Status Qcow2Layer::CorruptStatus() const {
  if (!is_corrupt_) return absl::OkStatus();
  std::lock_guard lock(corrupt_mu_);
  return corrupt_;
}

Task<absl::Status> Qcow2Layer::MarkCorrupt(absl::Status status) {
  RangeLock::Guard meta = co_await meta_mu_.Lock();
  if (is_corrupt_) co_return CorruptStatus();  // marked by a request in parallel
  const absl::Status latched = Annotate(status, "the image is marked corrupt and now refuses writes");
  {
    std::lock_guard lock(corrupt_mu_);
    corrupt_ = latched;
  }
  is_corrupt_ = true;
  // Version 2 has no corrupt bit: its header ends where the field would
  // be, and the bytes there are header extensions (QEMU marks only v3).
  if (header_.version < spec::kVersion3) co_return latched;
  uint8_t field[8];
  StoreBE64(field, header_.incompatible_features | spec::kIncompatCorrupt);
  uint8_t old_field[8];
  StoreBE64(old_field, header_.incompatible_features);
  absl::Status marked = co_await WriteHeaderField(spec::kOffIncompatibleFeatures, field, old_field);
  if (!marked.ok()) co_return Annotate(latched, absl::StrCat("(setting the corrupt bit failed too: ", marked.message(), ")"));
  header_.incompatible_features |= spec::kIncompatCorrupt;
  co_return latched;
}

absl::Status Qcow2Layer::CheckHostWrite(uint64_t offset, uint64_t length, std::string_view what,
                                        bool in_place) const {
  const uint64_t cluster_size = header_.cluster_size();
  // Where a cluster of ours can be. In the image file: inside the file, or
  // for a cluster handed out just now, the clusters the refcounts know of
  // (an L2 entry pointing past the end would send the write to a sparse
  // 4 PiB file). In an external data file, guest and host offsets are the
  // same: inside the disk.
  const uint64_t in_file = RoundUp(file_->size(), cluster_size);
  const uint64_t limit = external_data_file_ ? RoundUp(header_.size, cluster_size)
                         : in_place          ? in_file
                                             : std::max(in_file, refcounts_->end_cluster() << header_.cluster_bits);
  std::string problem;
  if (offset > limit || length > limit - offset) {
    problem = external_data_file_ ? "it lies past the end of the disk in the external data file"
                                  : "it lies past the end of the image file";
  } else if (!external_data_file_) {
    if (std::optional<MetadataMap::Hit> h = metadata_->Find(offset, length)) {
      problem = absl::StrFormat("it would overwrite %s at %#x", MetadataKindName(h->kind), h->offset);
    }
  }
  if (problem.empty()) return absl::OkStatus();
  return absl::DataLossError(absl::StrFormat("%s: refusing to write %s at host offset %#x (%u bytes): %s",
                                             file_->name(), what, offset, length, problem));
}

absl::Status Qcow2Layer::CheckFreeable(uint64_t guest_cluster, const L2Entry& entry) const {
  if (external_data_file_) {
    // Data clusters there have no refcounts. A compressed descriptor
    // cannot be there at all (the spec allows none with a data file), and
    // its clusters would be counted in the image file: freeing them could
    // free the header's own cluster.
    if (entry.descriptor & spec::kOflagCompressed) {
      return absl::DataLossError(absl::StrFormat(
          "%s: the L2 entry of guest offset %#x (%#016x) is a compressed cluster in an image with an "
          "external data file: refusing to free it",
          file_->name(), guest_cluster, entry.descriptor));
    }
    return absl::OkStatus();
  }
  const uint32_t cluster_bits = header_.cluster_bits;
  uint64_t offset = 0, length = 0;
  if (entry.descriptor & spec::kOflagCompressed) {
    const CompressedDescriptor d = DecodeCompressedDescriptor(entry.descriptor, cluster_bits);
    offset = d.host_offset >> cluster_bits << cluster_bits;
    length = d.host_offset + d.max_size - offset;
  } else if (L2EntryHostOffset(entry) != 0) {
    offset = L2EntryHostOffset(entry);
    length = header_.cluster_size();
  } else {
    return absl::OkStatus();
  }
  // A referenced cluster lies inside the file; compressed data may end in
  // the last cluster's successor (its descriptor counts whole sectors).
  // Freeing one far past the end would make the refcounts describe it.
  const uint64_t limit = RoundUp(file_->size(), header_.cluster_size()) + header_.cluster_size();
  if (offset > limit || length > limit - offset) {
    return absl::DataLossError(absl::StrFormat(
        "%s: the L2 entry of guest offset %#x (%#016x) points to host offset %#x, past the end of the "
        "file: refusing to free it",
        file_->name(), guest_cluster, entry.descriptor, offset));
  }
  std::optional<MetadataMap::Hit> hit = metadata_->Find(offset, length);
  if (!hit) return absl::OkStatus();
  return absl::DataLossError(absl::StrFormat(
      "%s: the L2 entry of guest offset %#x (%#016x) points to host offset %#x, which is %s at %#x: "
      "refusing to free it",
      file_->name(), guest_cluster, entry.descriptor, offset, MetadataKindName(hit->kind), hit->offset));
}

Task<absl::Status> Qcow2Layer::Finish(absl::Status status) {
  // Failed or not, the change may have left something to flush.
  changes_.fetch_add(1);
  // Damage met in a backing file is that file's, not this image's.
  if (absl::IsDataLoss(status) && !IsFromBackingFile(status) && !is_corrupt_) {
    co_return co_await MarkCorrupt(status);
  }
  co_return status;
}

Task<absl::Status> Qcow2Layer::Write(uint64_t offset, std::span<const uint8_t> data) {
  CO_RETURN_IF_ERROR(CorruptStatus());
  ReadTracker::Ticket ticket = BeginRequest();
  RangeLock::Guard guard = co_await LockClusters(offset, data.size());
  co_return co_await Finish(co_await WriteData(offset, data));
}

Task<absl::Status> Qcow2Layer::WriteData(uint64_t offset, std::span<const uint8_t> data) {
  CO_RETURN_IF_ERROR(co_await PrepareFirstWrite());
  // Before the data goes anywhere: a failed write may still have changed
  // the disk, and a granule marked for nothing is only a larger backup.
  if (bitmaps_) bitmaps_->Mark(offset, data.size());
  const uint64_t cluster_size = header_.cluster_size();
  while (!data.empty()) {
    const uint64_t n = std::min<uint64_t>(data.size(), cluster_size - (offset & (cluster_size - 1)));
    CO_RETURN_IF_ERROR(co_await WriteInCluster(offset, data.first(n)));
    offset += n;
    data = data.subspan(n);
  }
  co_return co_await FlushIfCachesFull();
}

Task<absl::Status> Qcow2Layer::FillFromGuest(uint64_t offset, std::span<uint8_t> out) {
  // What the guest sees there now; nothing past the end of the disk.
  const uint64_t inside = offset < header_.size ? std::min<uint64_t>(out.size(), header_.size - offset) : 0;
  std::memset(out.data() + inside, 0, out.size() - inside);
  if (inside == 0) co_return absl::OkStatus();
  co_return co_await Read(offset, out.first(inside));
}

Task<absl::Status> Qcow2Layer::WriteInCluster(uint64_t offset, std::span<const uint8_t> data) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t guest_cluster = offset & ~(cluster_size - 1);
  const uint64_t begin = offset - guest_cluster;  // [begin, end) within the cluster
  const uint64_t end = begin + data.size();

  absl::StatusOr<L2Entry> old = co_await LookupEntry(guest_cluster);
  if (!old.ok()) co_return old.status();
  const bool compressed = old->descriptor & spec::kOflagCompressed;
  const bool copied = old->descriptor & spec::kOflagCopied;
  const uint64_t host = compressed ? 0 : L2EntryHostOffset(*old);
  const bool has_host = !compressed && (host != 0 || (external_data_file_ && copied));
  if (has_host && (host & (cluster_size - 1)) != 0) {
    co_return absl::DataLossError(absl::StrFormat(
        "%s: L2 entry for guest offset %#x has an unaligned host offset %#x", file_->name(),
        guest_cluster, host));
  }
  // A host cluster whose refcount is 1 (COPIED) is ours to write in place.
  const bool in_place = has_host && copied;

  // The part of the cluster this write must put on disk, [from, to): whole
  // subclusters with extended L2 entries; the whole cluster otherwise,
  // except for an in-place write over data.
  uint64_t from = 0, to = cluster_size;
  L2Entry updated = *old;
  if (format_.extended_l2) {
    const uint32_t sc_bits = format_.subcluster_bits();
    const uint32_t first = begin >> sc_bits, last = (end - 1) >> sc_bits;
    const uint64_t touched = SubclusterMask(first, last);
    if (in_place || (!has_host && !compressed)) {
      // Subclusters outside the write keep their state (unallocated or
      // zero), so only the touched ones are written.
      from = uint64_t{first} << sc_bits;
      to = uint64_t{last + 1} << sc_bits;
      updated.bitmap = (old->bitmap | touched) & ~(touched << spec::kSubclusterZeroShift);
      if (in_place && (old->bitmap & touched) == touched) {
        // Every touched subcluster already holds data: a plain overwrite.
        CO_RETURN_IF_ERROR(CheckHostWrite(host + begin, data.size(), "guest data in place", true));
        data_bytes_written_ += data.size();
        co_return co_await data_file_->Write(host + begin, data);
      }
    } else {
      // Copying a compressed or shared cluster: all of it becomes data.
      updated.bitmap = spec::kSubclusterAllocMask;
    }
  } else {
    const SubclusterType type = GetSubclusterType(*old, 0, format_);
    if (type == SubclusterType::kNormal && in_place) {
      CO_RETURN_IF_ERROR(CheckHostWrite(host + begin, data.size(), "guest data in place", true));
      data_bytes_written_ += data.size();
      co_return co_await data_file_->Write(host + begin, data);
    }
    updated.descriptor &= ~spec::kOflagZero;
  }

  // Copy-on-write: what the guest sees around the write comes along. A
  // write that covers [from, to) itself needs no copy.
  std::vector<uint8_t> copy;
  std::span<const uint8_t> buffer = data;
  if (begin > from || to > end) {
    copy.resize(to - from);
    std::span<uint8_t> out(copy);
    if (begin > from) CO_RETURN_IF_ERROR(co_await FillFromGuest(guest_cluster + from, out.first(begin - from)));
    if (to > end) CO_RETURN_IF_ERROR(co_await FillFromGuest(guest_cluster + end, out.subspan(end - from)));
    std::memcpy(copy.data() + (begin - from), data.data(), data.size());
    buffer = copy;
  }

  uint64_t target = host;
  bool past_end = false;  // a new cluster beyond the end of the data file
  // The old cluster is given up below: it must be ours to give.
  if (!in_place) CO_RETURN_IF_ERROR(CheckFreeable(guest_cluster, *old));
  {
    RangeLock::Guard meta = co_await meta_mu_.Lock();
    if (!in_place) {
      absl::StatusOr<uint64_t> fresh = co_await AllocateDataCluster(guest_cluster);
      if (!fresh.ok()) co_return fresh.status();
      target = *fresh;
      // Nobody else writes there: the cluster is this request's alone.
      past_end = target >= data_file_->size();
    }
    CO_RETURN_IF_ERROR(CheckHostWrite(target + from, buffer.size(), "guest data", in_place));
  }
  // The data goes to disk with no lock held: only this request knows the
  // new cluster until its entry is stored.
  if (past_end && !copy.empty() && IsAllZero(std::span(copy).first(begin - from)) &&
      IsAllZero(std::span(copy).subspan(end - from))) {
    // Beyond the end of the file every byte already reads as zero: extend
    // the file over the cluster and write the guest's bytes alone, not a
    // cluster of zeros around them (a 4 KiB write into a new 64 KiB
    // cluster stays a 4 KiB write).
    CO_RETURN_IF_ERROR(co_await data_file_->Allocate(target + from, to - from));
    CO_RETURN_IF_ERROR(co_await data_file_->Write(target + begin, data));
    data_bytes_written_ += data.size();
  } else {
    CO_RETURN_IF_ERROR(co_await data_file_->Write(target + from, buffer));
    data_bytes_written_ += buffer.size();
  }
  updated.descriptor = target | spec::kOflagCopied;
  RangeLock::Guard meta = co_await meta_mu_.Lock();
  CO_RETURN_IF_ERROR(co_await StoreEntry(guest_cluster, updated));
  if (!in_place) FreeLater(*old);
  co_return absl::OkStatus();
}

Task<absl::StatusOr<uint64_t>> Qcow2Layer::AllocateDataCluster(uint64_t guest_cluster) {
  // An external data file maps guest offsets to the same host offsets and
  // keeps no refcounts ("External data file" in the spec).
  if (external_data_file_) co_return guest_cluster;
  co_return co_await refcounts_->Allocate(1);
}

void Qcow2Layer::FreeLater(const L2Entry& old_entry) {
  if (external_data_file_) return;  // nothing of the image file (CheckFreeable)
  const uint32_t cluster_bits = header_.cluster_bits;
  if (old_entry.descriptor & spec::kOflagCompressed) {
    // Every host cluster the compressed bytes touch holds a reference.
    const CompressedDescriptor d = DecodeCompressedDescriptor(old_entry.descriptor, cluster_bits);
    const uint64_t first = d.host_offset >> cluster_bits;
    const uint64_t last = (d.host_offset + d.max_size - 1) >> cluster_bits;
    FreeLater(first << cluster_bits, last - first + 1);
    return;
  }
  const uint64_t host = L2EntryHostOffset(old_entry);
  if (host != 0) FreeLater(host, 1);
}

void Qcow2Layer::FreeLater(uint64_t offset, uint64_t clusters) {
  pending_frees_.push_back({offset, clusters, reads_.Now()});
}

bool Qcow2Layer::FreesReady() const {
  // Moments only grow along the list: the first is the oldest.
  return !pending_frees_.empty() && pending_frees_.front().moment <= reads_.Horizon();
}

Task<absl::StatusOr<L2Entry>> Qcow2Layer::LookupEntry(uint64_t guest_offset) {
  const uint64_t l2_entries = header_.l2_entries();
  const uint64_t l1_index = (guest_offset >> header_.cluster_bits) / l2_entries;
  if (l1_index >= L1Size()) {
    co_return absl::OutOfRangeError(absl::StrFormat(
        "%s: guest offset %#x is beyond the L1 table", file_->name(), guest_offset));
  }
  absl::StatusOr<uint64_t> l2_offset = L2TableOffset(l1_index);
  if (!l2_offset.ok()) co_return l2_offset.status();
  if (*l2_offset == 0) co_return L2Entry{};
  const L2Slice located = SliceOf(guest_offset, *l2_offset);
  absl::StatusOr<std::shared_ptr<const Table>> slice = co_await l2_cache_.Get(located.host_offset);
  if (!slice.ok()) co_return slice.status();
  co_return DecodeL2Entry((*slice)->data() + located.entry_offset, format_);
}

Task<absl::Status> Qcow2Layer::StoreEntry(uint64_t guest_offset, const L2Entry& entry) {
  // Whoever knows the new entry reads as zero says so again after this.
  const uint64_t guest_cluster = guest_offset & ~(header_.cluster_size() - 1);
  known_zero_.Remove(guest_cluster, guest_cluster + header_.cluster_size());
  known_zero_with_host_.Remove(guest_cluster, guest_cluster + header_.cluster_size());
  const uint64_t l2_entries = header_.l2_entries();
  const uint64_t l1_index = (guest_offset >> header_.cluster_bits) / l2_entries;
  absl::StatusOr<uint64_t> l2_offset = co_await WritableL2Table(l1_index);
  if (!l2_offset.ok()) co_return l2_offset.status();
  const L2Slice located = SliceOf(guest_offset, *l2_offset);
  L2Entry old;
  CO_RETURN_IF_ERROR(co_await l2_cache_.Modify(located.host_offset, [&](Table& slice) {
    old = DecodeL2Entry(slice.data() + located.entry_offset, format_);
    EncodeL2Entry(entry, slice.data() + located.entry_offset, format_);
  }));
  co_await CountEntryChange(guest_cluster, old, entry);
  co_return absl::OkStatus();
}

// The L2 table of `l1_index`, made private to the active L1 table: a new
// zeroed table where there was none, a copy where the table is shared with
// a snapshot (no COPIED flag on the L1 entry).
Task<absl::StatusOr<uint64_t>> Qcow2Layer::WritableL2Table(uint64_t l1_index) {
  absl::StatusOr<uint64_t> old = L2TableOffset(l1_index);
  if (!old.ok()) co_return old.status();
  if (*old != 0 && (L1Entry(l1_index) & spec::kOflagCopied)) co_return *old;

  absl::StatusOr<uint64_t> fresh = co_await refcounts_->Allocate(1);
  if (!fresh.ok()) co_return fresh.status();
  Table table(header_.cluster_size(), 0);
  if (*old != 0) CO_RETURN_IF_ERROR(co_await file_->Read(*old, table));
  // The whole table goes to disk now; the L1 entry that points to it is
  // written only after a barrier (flush step 3).
  CO_RETURN_IF_ERROR(CheckHostWrite(*fresh, table.size(), "a new L2 table"));
  CO_RETURN_IF_ERROR(map_charge_.Take(budget_.get(), MetadataMap::kBytesPerCluster,
                                      absl::StrFormat("the index of the L2 tables of %s", file_->name())));
  ++other_metadata_writes_;
  CO_RETURN_IF_ERROR(co_await file_->Write(*fresh, table));
  for (uint64_t s = 0; s < header_.cluster_size(); s += l2_cache_.table_size()) {
    l2_cache_.Forget(*fresh + s);  // the cluster may have held another table
  }
  {
    std::unique_lock lock(l1_mu_);
    l1_[l1_index] = *fresh | spec::kOflagCopied;
  }
  dirty_l1_.insert(l1_index);
  if (*old != 0) {
    // Still in use by a snapshot, but no longer ours to guard: QEMU's
    // default overlap checks leave inactive tables out too.
    metadata_->Remove(MetadataKind::kL2Table, *old);
    FreeLater(*old, 1);
  }
  CO_RETURN_IF_ERROR(metadata_->Add(MetadataKind::kL2Table, *fresh, header_.cluster_size()));
  co_return *fresh;
}

Task<absl::Status> Qcow2Layer::FlushIfCachesFull() {
  if (!l2_cache_.over_capacity() && !refcounts_->over_capacity()) co_return absl::OkStatus();
  RangeLock::Guard meta = co_await meta_mu_.Lock();
  co_return co_await FlushLocked();
}

Task<absl::Status> Qcow2Layer::Flush() {
  if (!writable()) co_return absl::OkStatus();
  RangeLock::Guard meta = co_await meta_mu_.Lock();
  co_return co_await FlushChangesLocked();
}

Task<absl::Status> Qcow2Layer::SyncData() {
  if (!writable()) co_return absl::OkStatus();
  co_return co_await data_file_->Flush();
}

Task<absl::Status> Qcow2Layer::Close() {
  if (!writable()) co_return absl::OkStatus();
  // No change runs while the bitmaps are stored: every granule a change
  // marked is in what Store writes, and no change can reach the disk after
  // the flags are cleared without marking them in use again first.
  RangeLock::Guard guard = co_await cluster_locks_.Lock(0, UINT64_MAX);
  RangeLock::Guard meta = co_await meta_mu_.Lock();
  CO_RETURN_IF_ERROR(co_await FlushChangesLocked());
  // A corrupt image takes no more writes; its bitmaps stay in use.
  if (!bitmaps_ || !bitmaps_->marked() || is_corrupt_) co_return absl::OkStatus();
  CO_RETURN_IF_ERROR(co_await bitmaps_->Store());
  prepared_for_write_ = false;  // the next change marks them in use again
  co_return co_await DiscardFreed();
}

Task<absl::Status> Qcow2Layer::FlushChangesLocked() {
  // Changes that finish from here on are not this flush's to cover.
  const uint64_t changes = changes_.load();
  if (changes == flushed_changes_ && !flush_failed_ && !FreesReady() && !header_writer_->unsettled()) {
    co_return absl::OkStatus();
  }
  absl::Status status = co_await FlushLocked();
  if (!status.ok()) {
    flush_failed_ = true;
    co_return status;
  }
  flushed_changes_ = changes;
  co_return absl::OkStatus();
}

Task<absl::Status> Qcow2Layer::FlushLocked() {
  // 0. A header field that a failed switch could not restore yet.
  CO_RETURN_IF_ERROR(co_await header_writer_->Settle());
  // 1. Refcounts and guest data.
  CO_RETURN_IF_ERROR(co_await refcounts_->WriteBack());
  if (external_data_file_) CO_RETURN_IF_ERROR(co_await external_data_file_->Flush());
  CO_RETURN_IF_ERROR(co_await file_->Flush());
  // 2. L2 tables.
  if (l2_cache_.has_dirty()) {
    CO_RETURN_IF_ERROR(co_await l2_cache_.WriteBack());
    CO_RETURN_IF_ERROR(co_await file_->Flush());
  }
  // 3. L1 entries.
  if (!dirty_l1_.empty()) {
    for (uint64_t index : dirty_l1_) {
      uint8_t entry[spec::kL2EntrySize];
      StoreBE64(entry, L1Entry(index));
      ++other_metadata_writes_;
      CO_RETURN_IF_ERROR(
          co_await file_->Write(header_.l1_table_offset + index * spec::kL2EntrySize, entry));
    }
    CO_RETURN_IF_ERROR(co_await file_->Flush());
    dirty_l1_.clear();
  }
  // 4. Nothing on disk points to these any more: drop their refcounts, and
  // once that is durable too, discard what became free. A cluster that a
  // request still running may have mapped waits for a later flush: freed
  // now, it could be reused and that request would read another offset's
  // data (see sched/read_tracker.h).
  const uint64_t horizon = reads_.Horizon();
  const auto not_ready = std::find_if(pending_frees_.begin(), pending_frees_.end(),
                                      [&](const PendingFree& f) { return f.moment > horizon; });
  std::vector<PendingFree> ready(pending_frees_.begin(), not_ready);
  pending_frees_.erase(pending_frees_.begin(), not_ready);
  if (!ready.empty()) {
    for (const PendingFree& f : ready) CO_RETURN_IF_ERROR(co_await refcounts_->Update(f.offset, f.clusters, -1));
    CO_RETURN_IF_ERROR(co_await refcounts_->WriteBack());
    CO_RETURN_IF_ERROR(co_await file_->Flush());
  }
  co_return co_await DiscardFreed();
}

Task<absl::Status> Qcow2Layer::DiscardFreed() {
  for (const auto& [offset, length] : refcounts_->TakeFreed()) {
    for (uint64_t s = 0; s < length; s += l2_cache_.table_size()) l2_cache_.Forget(offset + s);
    CO_RETURN_IF_ERROR(co_await file_->Discard(offset, length));
  }
  co_return absl::OkStatus();
}

Task<absl::Status> Qcow2Layer::GrowL1(uint64_t entries) {
  const uint64_t cluster_size = header_.cluster_size();
  if (entries * spec::kL2EntrySize > spec::kMaxL1Bytes) {
    co_return absl::OutOfRangeError(absl::StrFormat(
        "%s: the disk cannot grow that far: its L1 table would exceed %u bytes", file_->name(),
        spec::kMaxL1Bytes));
  }
  RangeLock::Guard meta = co_await meta_mu_.Lock();
  // The larger table in memory, and while it is built, its bytes.
  BudgetCharge growth;
  const std::string what = absl::StrFormat("the L1 table of %s", file_->name());
  CO_RETURN_IF_ERROR(growth.Take(budget_.get(), (entries - L1Size()) * spec::kL2EntrySize, what));
  BudgetCharge raw_charge;
  CO_RETURN_IF_ERROR(raw_charge.Take(budget_.get(), RoundUp(entries * spec::kL2EntrySize, cluster_size), what));
  // The new table copies the in-memory entries: what they point to must be
  // durable before the header can point to it.
  CO_RETURN_IF_ERROR(co_await FlushLocked());
  const uint64_t bytes = RoundUp(entries * spec::kL2EntrySize, cluster_size);
  absl::StatusOr<uint64_t> fresh = co_await refcounts_->Allocate(bytes / cluster_size);
  if (!fresh.ok()) co_return fresh.status();
  std::vector<uint8_t> raw(bytes, 0);
  {
    std::shared_lock lock(l1_mu_);
    for (size_t i = 0; i < l1_.size(); ++i) StoreBE64(raw.data() + i * spec::kL2EntrySize, l1_[i]);
  }
  CO_RETURN_IF_ERROR(CheckHostWrite(*fresh, raw.size(), "a new L1 table"));
  ++other_metadata_writes_;
  CO_RETURN_IF_ERROR(co_await file_->Write(*fresh, raw));
  CO_RETURN_IF_ERROR(co_await refcounts_->WriteBack());
  CO_RETURN_IF_ERROR(co_await file_->Flush());

  // l1_size and l1_table_offset are adjacent: one write, one sector.
  static_assert(spec::kOffL1TableOffset == spec::kOffL1Size + 4);
  uint8_t fields[12];
  StoreBE32(fields, static_cast<uint32_t>(entries));
  StoreBE64(fields + 4, *fresh);
  uint8_t old_fields[12];
  StoreBE32(old_fields, header_.l1_size);
  StoreBE64(old_fields + 4, header_.l1_table_offset);
  CO_RETURN_IF_ERROR(co_await WriteHeaderField(spec::kOffL1Size, fields, old_fields));

  const uint64_t old_offset = header_.l1_table_offset;
  const uint64_t old_clusters = RoundUp(uint64_t{header_.l1_size} * spec::kL2EntrySize, cluster_size) / cluster_size;
  {
    std::unique_lock lock(l1_mu_);
    l1_.resize(entries, 0);
  }
  header_.l1_size = static_cast<uint32_t>(entries);
  header_.l1_table_offset = *fresh;
  metadata_->Move(MetadataKind::kL1Table, old_offset, *fresh, entries * spec::kL2EntrySize);
  // The growth now belongs to the table (given back and taken at once;
  // nothing else takes from the budget of an open image meanwhile).
  const uint64_t grown = growth.bytes();
  growth.Reset();
  l1_charge_.Take(budget_.get(), grown, what).IgnoreError();
  if (old_clusters > 0) FreeLater(old_offset, old_clusters);
  co_return absl::OkStatus();
}

// New space must read as zeros, whatever lies under it: stale entries past
// the old end (left by a shrink elsewhere) or a larger backing file.
Task<absl::Status> Qcow2Layer::ZeroNewSpace(uint64_t old_size, uint64_t new_size) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t backing_size = backing_ ? backing_->size() : 0;
  if (old_size % cluster_size != 0) {
    // The rest of the old last cluster.
    const uint64_t tail_end = std::min(RoundUp(old_size, cluster_size), new_size);
    std::vector<uint8_t> zeros(tail_end - old_size, 0);
    absl::StatusOr<L2Entry> entry = co_await LookupEntry(old_size);
    if (!entry.ok()) co_return entry.status();
    if (entry->descriptor != 0 || entry->bitmap != 0 || backing_size > old_size) {
      CO_RETURN_IF_ERROR(co_await WriteInCluster(old_size, zeros));
    }
  }
  const uint64_t bytes_per_l2 = cluster_size * header_.l2_entries();
  for (uint64_t gc = RoundUp(old_size, cluster_size); gc < new_size;) {
    absl::StatusOr<uint64_t> l2 = L2TableOffset(gc / bytes_per_l2);
    if (!l2.ok()) co_return l2.status();
    if (*l2 == 0 && backing_size <= gc) {
      gc = (gc / bytes_per_l2 + 1) * bytes_per_l2;  // nothing anywhere in this L2 range
      continue;
    }
    absl::StatusOr<L2Entry> entry = co_await LookupEntry(gc);
    if (!entry.ok()) co_return entry.status();
    const bool empty = entry->descriptor == 0 && entry->bitmap == 0;
    if (!empty || backing_size > gc) {
      if (header_.version < spec::kVersion3) {
        // Version 2 has no zero clusters: write zeros.
        std::vector<uint8_t> zeros(std::min(cluster_size, new_size - gc), 0);
        CO_RETURN_IF_ERROR(co_await WriteInCluster(gc, zeros));
      } else {
        L2Entry zero;
        if (format_.extended_l2) {
          zero.bitmap = spec::kSubclusterAllocMask << spec::kSubclusterZeroShift;
        } else {
          zero.descriptor = spec::kOflagZero;
        }
        CO_RETURN_IF_ERROR(CheckFreeable(gc, *entry));
        RangeLock::Guard meta = co_await meta_mu_.Lock();
        CO_RETURN_IF_ERROR(co_await StoreEntry(gc, zero));
        FreeLater(*entry);
      }
    }
    gc += cluster_size;
  }
  co_return absl::OkStatus();
}

Task<absl::Status> Qcow2Layer::CheckNoDataFrom(uint64_t new_size) {
  // Only bytes that are not zero would be lost; stored zeros (such as
  // those a grow writes over a larger backing file) are not data.
  const uint64_t old_size = header_.size;
  std::vector<uint8_t> chunk;
  for (uint64_t offset = new_size; offset < old_size;) {
    absl::StatusOr<Extent> e = co_await BlockStatus(offset, old_size - offset);
    if (!e.ok()) co_return e.status();
    for (uint64_t done = 0; e->kind == ExtentKind::kData && done < e->length;) {
      chunk.resize(std::min<uint64_t>(e->length - done, kShrinkCheckChunk));
      CO_RETURN_IF_ERROR(co_await Read(offset + done, chunk));
      const auto nonzero = std::find_if(chunk.begin(), chunk.end(), [](uint8_t b) { return b != 0; });
      if (nonzero != chunk.end()) {
        co_return WithErrno(absl::FailedPreconditionError(absl::StrFormat(
                                "cannot shrink %s to %u bytes: the disk holds data at offset %u",
                                file_->name(), new_size, offset + done + (nonzero - chunk.begin()))),
                            EINVAL);
      }
      done += chunk.size();
    }
    offset += e->length;
  }
  co_return absl::OkStatus();
}

Task<absl::Status> Qcow2Layer::CheckShrink(uint64_t new_size) {
  ReadTracker::Ticket ticket = BeginRequest();
  // As a resize would: with every change in flight done.
  RangeLock::Guard guard = co_await cluster_locks_.Lock(0, UINT64_MAX);
  co_return co_await CheckNoDataFrom(new_size);
}

Task<absl::Status> Qcow2Layer::Truncate(uint64_t new_size) {
  CO_RETURN_IF_ERROR(CorruptStatus());
  ReadTracker::Ticket ticket = BeginRequest();
  // Resizing touches the whole disk: it waits for every change in flight.
  RangeLock::Guard guard = co_await cluster_locks_.Lock(0, UINT64_MAX);
  co_return co_await Finish(co_await Resize(new_size));
}

Task<absl::Status> Qcow2Layer::Resize(uint64_t new_size) {
  CO_RETURN_IF_ERROR(co_await PrepareFirstWrite());
  const uint64_t old_size = header_.size;
  if (new_size == old_size) co_return absl::OkStatus();
  if (new_size < old_size) CO_RETURN_IF_ERROR(co_await CheckNoDataFrom(new_size));
  if (bitmaps_) {
    // Every persistent bitmap follows the disk's size, or none does.
    RangeLock::Guard meta = co_await meta_mu_.Lock();
    CO_RETURN_IF_ERROR(co_await bitmaps_->PrepareResize(new_size));
  }
  if (new_size > old_size) {
    const uint64_t bytes_per_l2 = header_.cluster_size() * header_.l2_entries();
    const uint64_t l1_needed = new_size / bytes_per_l2 + (new_size % bytes_per_l2 != 0);
    if (l1_needed > L1Size()) CO_RETURN_IF_ERROR(co_await GrowL1(l1_needed));
    if (external_data_file_ && external_data_file_->size() < new_size) {
      CO_RETURN_IF_ERROR(co_await external_data_file_->Truncate(new_size));
    }
    header_.size = new_size;
    absl::Status zeroed = co_await ZeroNewSpace(old_size, new_size);
    if (!zeroed.ok()) {
      header_.size = old_size;
      co_return zeroed;
    }
    if (header_.version >= spec::kVersion3) {
      // Every new whole cluster is now a zero entry or empty past the backing file.
      known_zero_.Add(RoundUp(old_size, header_.cluster_size()), RoundUp(new_size, header_.cluster_size()));
    }
  }
  if (new_size < old_size) {
    known_zero_.Remove(new_size, UINT64_MAX);
    known_zero_with_host_.Remove(new_size, UINT64_MAX);
  }
  // Everything the new size relies on is durable before the size changes.
  RangeLock::Guard meta = co_await meta_mu_.Lock();
  const uint64_t data_gone = new_size < std::min(count_end_, old_size)
                                 ? co_await DataBytesIn(*this, new_size, std::min(count_end_, old_size))
                                 : 0;
  absl::Status durable = co_await FlushLocked();
  if (durable.ok()) {
    uint8_t field[8];
    StoreBE64(field, new_size);
    uint8_t old_field[8];
    StoreBE64(old_field, old_size);
    durable = co_await WriteHeaderField(spec::kOffSize, field, old_field);
  }
  if (!durable.ok()) {
    // The header keeps the old size, and so must the layer: a retry of the
    // same resize must not find nothing to do and report success.
    header_.size = old_size;
    co_return durable;
  }
  header_.size = new_size;
  if (bitmaps_) bitmaps_->Resize(new_size);
  // The data count: the bytes that left the disk go, those that came in
  // are counted (if the walk is past the old end; otherwise it counts them).
  if (new_size < old_size) {
    data_bytes_ -= data_gone;
    count_end_ = std::min(count_end_, new_size);
  } else if (count_end_ >= old_size) {
    data_bytes_ += co_await DataBytesIn(*this, old_size, new_size);
    count_end_ = new_size;
  }
  count_limit_ = new_size;
  co_return absl::OkStatus();
}

}  // namespace qcow2fuse
