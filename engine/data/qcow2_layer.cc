#include "data/qcow2_layer.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/endian.h"
#include "format/spec.h"
#include "io/latched_file.h"
#include "format/bitmap.h"
#include "format/snapshot.h"
#include "meta/repair.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// Threads inflating compressed clusters at most (one per core up to this).
constexpr unsigned kMaxInflateThreads = 8;

// st_blocks counts units of this many bytes.
constexpr uint64_t kStatBlockBytes = 512;

// Inflated clusters kept; with 2 MiB clusters this is 8 MiB at most.
constexpr size_t kInflatedCacheEntries = 4;
// Refcount blocks cached by a writable image: one 64 KiB block describes
// 2 GiB of 64 KiB clusters, so a few cover any working set.
constexpr uint64_t kRefcountCacheBytes = uint64_t{1} << 20;
// A walk through a long range reads this much of an L2 table at once (16
// slices of 4 KiB: a 64 KiB cluster's whole table).
constexpr uint64_t kL2PrefetchBytes = uint64_t{64} << 10;

L2Format MakeL2Format(const Header& h) {
  L2Format f;
  f.extended_l2 = h.has_extended_l2();
  f.external_data_file = h.has_data_file();
  f.cluster_bits = h.cluster_bits;
  return f;
}

CompressionType MakeCompressionType(const Header& h) {
  return h.compression_type == spec::kCompressionZstd ? CompressionType::kZstd
                                                      : CompressionType::kDeflate;
}

std::string SizeString(uint64_t bytes) {
  if (bytes >= (1u << 20) && bytes % (1u << 20) == 0) return absl::StrFormat("%u MiB", bytes >> 20);
  if (bytes >= (1u << 10) && bytes % (1u << 10) == 0) return absl::StrFormat("%u KiB", bytes >> 10);
  return absl::StrFormat("%u bytes", bytes);
}

}  // namespace

Qcow2Layer::Qcow2Layer(std::unique_ptr<BlockFile> file, Header header,
                       std::unique_ptr<BlockFile> data_file, std::unique_ptr<Layer> backing,
                       const ImageOptions& options, std::shared_ptr<TableCache> l2_cache)
    : file_(LatchFlushErrors(std::move(file))),
      header_(std::move(header)),
      external_data_file_(data_file ? LatchFlushErrors(std::move(data_file)) : nullptr),
      data_file_(external_data_file_ ? external_data_file_.get() : file_.get()),
      backing_(std::move(backing)),
      format_(MakeL2Format(header_)),
      compression_(MakeCompressionType(header_)),
      budget_(options.budget ? options.budget : std::make_shared<MemoryBudget>(options.max_metadata_memory)),
      l2_cache_owner_(l2_cache ? std::move(l2_cache)
                               : std::make_shared<TableCache>(file_.get(), L2SliceSize(header_.cluster_size()),
                                                              options.l2_cache_size, budget_.get(),
                                                              absl::StrCat("the L2 cache of ", file_->name()))),
      l2_cache_(*l2_cache_owner_) {}

Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> Qcow2Layer::Open(
    std::unique_ptr<BlockFile> file, Header header, std::unique_ptr<BlockFile> data_file,
    std::unique_ptr<Layer> backing, const ImageOptions& options) {
  co_return co_await Load(std::unique_ptr<Qcow2Layer>(new Qcow2Layer(
      std::move(file), std::move(header), std::move(data_file), std::move(backing), options)));
}

Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> Qcow2Layer::Load(std::unique_ptr<Qcow2Layer> layer) {
  // The header check has bounded the L1 table to 32 MiB and to the file;
  // the budget bounds what a chain of them costs. Open holds the raw table
  // and the decoded one at once.
  const Header& h = layer->header_;
  const uint64_t l1_bytes = uint64_t{h.l1_size} * spec::kL2EntrySize;
  const std::string l1_what = absl::StrFormat("the L1 table of %s", layer->file_->name());
  CO_RETURN_IF_ERROR(layer->l1_charge_.Take(layer->budget_.get(), l1_bytes, l1_what));
  {
    BudgetCharge raw_charge;
    CO_RETURN_IF_ERROR(raw_charge.Take(layer->budget_.get(), l1_bytes, l1_what));
    std::vector<uint8_t> raw(l1_bytes);
    CO_RETURN_IF_ERROR(co_await layer->file_->Read(h.l1_table_offset, raw));
    layer->l1_.resize(h.l1_size);
    for (uint32_t i = 0; i < h.l1_size; ++i) layer->l1_[i] = LoadBE64(raw.data() + i * spec::kL2EntrySize);
  }
  CO_RETURN_IF_ERROR(layer->CheckL2TablesDistinct());
  // L2 ranges without a table, past the end of any backing file, read as
  // zeros: a fresh image answers reads without looking at its metadata.
  const uint64_t bytes_per_l2 = h.cluster_size() * h.l2_entries();
  for (uint32_t i = 0; i < h.l1_size; ++i) {
    if (L1EntryL2Offset(layer->l1_[i]) == 0 && !layer->OverBacking(i * bytes_per_l2)) {
      layer->known_zero_.Add(i * bytes_per_l2, (i + 1) * bytes_per_l2);
    }
  }
  if (layer->file_->writable()) {
    if (h.incompatible_features & spec::kIncompatDirty) {
      // Left dirty by a crash with lazy refcounts: the refcounts are not to
      // be trusted until rebuilt ("dirty bit" in the spec).
      absl::Status repaired =
          co_await RebuildRefcounts(*layer->file_, layer->header_, layer->external_data_file_.get(),
                                    layer->budget_.get());
      if (!repaired.ok()) co_return Annotate(repaired, "rebuilding the refcounts of a dirty image");
    }
    layer->metadata_ = std::make_unique<MetadataMap>(h.cluster_bits);
    layer->header_writer_ = std::make_unique<HeaderWriter>(layer->file_.get());
    layer->refcounts_ =
        std::make_unique<Refcounts>(layer->file_.get(), h, kRefcountCacheBytes, layer->metadata_.get(),
                                    layer->budget_.get(), layer->header_writer_.get());
    CO_RETURN_IF_ERROR(co_await layer->RegisterMetadata());
    if (h.bitmaps) {
      // After the rest of the metadata: a bitmap's data clusters join it.
      absl::StatusOr<std::unique_ptr<DirtyBitmaps>> bitmaps = co_await DirtyBitmaps::Load(
          {layer->file_.get(), layer->refcounts_.get(), layer->metadata_.get(), layer->budget_.get(), h.cluster_bits},
          *h.bitmaps, h.size);
      if (!bitmaps.ok()) co_return bitmaps.status();
      layer->bitmaps_ = *std::move(bitmaps);
    }
  }
  co_return layer;
}

absl::Status Qcow2Layer::CheckL2TablesDistinct() {
  // Two L1 entries naming one L2 table never happen in a real image (QEMU
  // copies a shared table before changing it), and a crafted L1 table full
  // of them would make every walk of the disk (st_blocks, SEEK_HOLE, a
  // shrink) read the same table millions of times: hours for a 4 KiB file.
  // With distinct tables inside the file, a walk costs at most one read of
  // each table the file really holds.
  std::vector<std::pair<uint64_t, uint32_t>> tables;  // (L2 offset, L1 index)
  BudgetCharge charge;
  RETURN_IF_ERROR(charge.Take(budget_.get(), l1_.size() * sizeof(tables[0]),
                                      absl::StrFormat("checking the L1 table of %s", file_->name())));
  for (uint32_t i = 0; i < l1_.size(); ++i) {
    if (L1EntryL2Offset(l1_[i]) != 0) tables.emplace_back(L1EntryL2Offset(l1_[i]), i);
  }
  std::sort(tables.begin(), tables.end());
  for (size_t i = 1; i < tables.size(); ++i) {
    if (tables[i].first == tables[i - 1].first) {
      return absl::DataLossError(absl::StrFormat("L1 entries %u and %u both point to the L2 table at %#x",
                                                 tables[i - 1].second, tables[i].second, tables[i].first));
    }
  }
  return absl::OkStatus();
}

Task<absl::Status> Qcow2Layer::RegisterMetadata() {
  const Header& h = header_;
  const uint64_t cluster_size = h.cluster_size();
  MetadataMap& map = *metadata_;
  auto placed = [&](absl::Status status, const std::string& where) {
    // (Open's caller names the file.)
    return status.ok() ? status : absl::DataLossError(absl::StrCat(where, status.message()));
  };
  // A structure must lie inside the file and within the spec's bounds
  // before it is trusted as metadata.
  auto in_file = [&](uint64_t offset, uint64_t length, std::string_view what) -> absl::Status {
    if ((offset & (cluster_size - 1)) != 0 || offset > file_->size() || length > file_->size() - offset) {
      return absl::DataLossError(
          absl::StrFormat("%s at %#x (%u bytes) is not cluster aligned or not inside the file", what, offset, length));
    }
    return absl::OkStatus();
  };
  CO_RETURN_IF_ERROR(placed(map.Add(MetadataKind::kHeader, 0, cluster_size), ""));
  CO_RETURN_IF_ERROR(placed(map.Add(MetadataKind::kL1Table, h.l1_table_offset, uint64_t{h.l1_size} * spec::kL2EntrySize), ""));

  // Snapshot table and the snapshots' L1 tables.
  if (h.nb_snapshots > 0) {
    absl::StatusOr<SnapshotTable> table = co_await ReadSnapshotTable();
    if (!table.ok()) co_return placed(table.status(), "");
    CO_RETURN_IF_ERROR(placed(map.Add(MetadataKind::kSnapshotTable, h.snapshots_offset, table->bytes), ""));
    for (size_t i = 0; i < table->entries.size(); ++i) {
      const SnapshotEntry& sn = table->entries[i];
      const uint64_t l1 = uint64_t{sn.l1_size} * spec::kL2EntrySize;
      if (l1 == 0) continue;
      const std::string what = absl::StrFormat("the L1 table of snapshot %u", i);
      if (l1 > spec::kMaxL1Bytes) {
        co_return absl::DataLossError(absl::StrFormat("%s has %u entries, more than the limit", what, sn.l1_size));
      }
      CO_RETURN_IF_ERROR(in_file(sn.l1_table_offset, l1, what));
      CO_RETURN_IF_ERROR(placed(map.Add(MetadataKind::kSnapshotL1Table, sn.l1_table_offset, l1), what + ": "));
    }
  }

  // Bitmap directory and bitmap tables.
  if (h.bitmaps) {
    const BitmapsExtension& b = *h.bitmaps;
    BudgetCharge charge;
    absl::StatusOr<BitmapDirectory> dir = co_await ReadBitmapDirectory(charge);
    if (!dir.ok()) co_return placed(dir.status(), "");
    CO_RETURN_IF_ERROR(placed(map.Add(MetadataKind::kBitmapDirectory, b.bitmap_directory_offset, dir->bytes.size()), ""));
    for (const BitmapDirectoryEntry& e : dir->entries) {
      const uint64_t bytes = uint64_t{e.bitmap_table_size} * spec::kBitmapTableEntrySize;
      if (e.bitmap_table_offset == 0 || bytes == 0) continue;
      const std::string what = absl::StrFormat("the bitmap table of bitmap '%s'", absl::CHexEscape(e.name));
      if (e.bitmap_table_size > spec::kMaxBitmapTableEntries) {
        co_return absl::DataLossError(absl::StrFormat("%s has %u entries, more than the limit", what, e.bitmap_table_size));
      }
      CO_RETURN_IF_ERROR(in_file(e.bitmap_table_offset, bytes, what));
      CO_RETURN_IF_ERROR(placed(map.Add(MetadataKind::kBitmapTable, e.bitmap_table_offset, bytes), what + ": "));
    }
  }

  // The active L2 tables (distinct: CheckL2TablesDistinct), then the
  // refcount table and blocks (Refcounts::Load). Each costs a little memory.
  uint64_t clusters = 0;
  for (uint64_t entry : l1_) clusters += L1EntryL2Offset(entry) != 0;
  CO_RETURN_IF_ERROR(map_charge_.Take(budget_.get(), clusters * MetadataMap::kBytesPerCluster,
                                      absl::StrFormat("the index of the L2 tables of %s", file_->name())));
  for (size_t i = 0; i < l1_.size(); ++i) {
    const uint64_t l2 = L1EntryL2Offset(l1_[i]);
    if (l2 == 0) continue;
    // A table that is not aligned or not inside the file is never used
    // (L2TableOffset refuses it at every access, so that the rest of the
    // disk stays readable): nothing to guard.
    if (!L2TableOffset(i).ok()) continue;
    CO_RETURN_IF_ERROR(placed(map.Add(MetadataKind::kL2Table, l2, cluster_size), absl::StrFormat("L1 entry %u: ", i)));
  }
  CO_RETURN_IF_ERROR(co_await refcounts_->Load());
  co_return absl::OkStatus();
}

Task<absl::StatusOr<SnapshotTable>> Qcow2Layer::ReadSnapshotTable() {
  const Header& h = header_;
  if (h.nb_snapshots == 0) co_return SnapshotTable{};
  // Entries vary in size, so the table's length shows only as it is
  // decoded. Read a little and double while the entries run past what was
  // read, up to what the table may hold at most within the file (the
  // header check put its offset inside the file): a typical table costs
  // one small read, not QEMU's 64 MiB limit.
  const uint64_t available = std::min(file_->size() - std::min(file_->size(), h.snapshots_offset),
                                      spec::kMaxSnapshotTableBytes);
  constexpr uint64_t kFirstRead = 64 << 10;
  for (uint64_t length = std::min(kFirstRead, available);; length = std::min(2 * length, available)) {
    BudgetCharge charge;
    CO_RETURN_IF_ERROR(charge.Take(budget_.get(), length, absl::StrFormat("the snapshot table of %s", file_->name())));
    std::vector<uint8_t> bytes(length);
    CO_RETURN_IF_ERROR(co_await file_->Read(h.snapshots_offset, bytes));
    absl::StatusOr<SnapshotTable> table = DecodeSnapshotTable(bytes, h.nb_snapshots);
    if (table.ok() || length == available) co_return table;
  }
}

Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> Qcow2Layer::OpenSnapshot(const SnapshotEntry& snapshot,
                                                                          uint64_t default_size) {
  // The header as it is now: a writer changes it under meta_mu_ (resize,
  // L1 growth); what the snapshot takes from it (geometry, features) never
  // changes.
  Header header;
  if (writable()) {
    RangeLock::Guard meta = co_await meta_mu_.Lock();
    header = header_;
  } else {
    header = header_;
  }
  const uint64_t cluster_size = header.cluster_size();
  const uint64_t l1_bytes = uint64_t{snapshot.l1_size} * spec::kL2EntrySize;
  const std::string what = absl::StrFormat("snapshot '%s' (ID %s) of %s", absl::CHexEscape(snapshot.name),
                                           absl::CHexEscape(snapshot.id), file_->name());
  // QEMU refuses snapshots of an image with an external data file: its data
  // is written in place, so a snapshot could not keep its bytes.
  if (external_data_file_) {
    co_return absl::FailedPreconditionError(
        absl::StrFormat("%s: an image with an external data file cannot have usable snapshots", what));
  }
  // The same bounds the header check puts on the active L1 table.
  if (l1_bytes > spec::kMaxL1Bytes) {
    co_return absl::DataLossError(absl::StrFormat("the L1 table of %s has %u entries, more than the limit", what,
                                                  snapshot.l1_size));
  }
  if (l1_bytes > 0 && (snapshot.l1_table_offset == 0 || (snapshot.l1_table_offset & (cluster_size - 1)) != 0 ||
                       snapshot.l1_table_offset > file_->size() || l1_bytes > file_->size() - snapshot.l1_table_offset)) {
    co_return absl::DataLossError(absl::StrFormat(
        "the L1 table of %s at %#x (%u entries) is not cluster aligned or not inside the file", what,
        snapshot.l1_table_offset, snapshot.l1_size));
  }
  // A disk no L1 table of the maximum size could map is not a disk QEMU
  // makes; the part the snapshot's own table does not reach reads as
  // unallocated (QEMU does the same).
  const uint64_t disk_size = snapshot.has_disk_size ? snapshot.disk_size : default_size;
  const uint64_t max_disk = spec::kMaxL1Bytes / spec::kL2EntrySize * cluster_size * header.l2_entries();
  if (disk_size > max_disk) {
    co_return absl::DataLossError(absl::StrFormat("%s claims a disk of %u bytes, more than an L1 table can map",
                                                  what, disk_size));
  }
  header.size = disk_size;
  header.l1_table_offset = snapshot.l1_table_offset;
  header.l1_size = snapshot.l1_size;
  ImageOptions options;
  options.read_only = true;
  options.budget = budget_;
  std::unique_ptr<Layer> backing = backing_ ? std::make_unique<BorrowedLayer>(backing_.get()) : nullptr;
  std::unique_ptr<BlockFile> data_file = external_data_file_ ? BorrowReadOnly(external_data_file_.get()) : nullptr;
  absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer = co_await Load(std::unique_ptr<Qcow2Layer>(
      new Qcow2Layer(BorrowReadOnly(file_.get()), std::move(header), std::move(data_file), std::move(backing),
                     options, l2_cache_owner_)));
  if (!layer.ok()) co_return Annotate(layer.status(), what);
  co_return layer;
}

Task<absl::StatusOr<Qcow2Layer::Mapping>> Qcow2Layer::Map(uint64_t offset, uint64_t max_length) {
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t l2_entries = header_.l2_entries();
  const uint64_t bytes_per_l2 = cluster_size * l2_entries;

  const uint64_t l1_index = offset / bytes_per_l2;
  uint64_t end = std::min(offset + max_length, (l1_index + 1) * bytes_per_l2);
  if (l1_index >= L1Size()) {
    // The header check makes the active L1 table cover the disk; a
    // snapshot's may be shorter than the disk it recorded, and what it does
    // not reach is unallocated, as QEMU reads it.
    if (!writable()) co_return Mapping{SubclusterType::kUnallocatedPlain, end - offset, 0, {}};
    co_return absl::OutOfRangeError(absl::StrFormat(
        "%s: guest offset %#x is beyond the L1 table (%u entries)", file_->name(), offset, L1Size()));
  }

  absl::StatusOr<uint64_t> l2_table = L2TableOffset(l1_index);
  if (!l2_table.ok()) co_return l2_table.status();
  const uint64_t l2_offset = *l2_table;
  if (l2_offset == 0) co_return Mapping{SubclusterType::kUnallocatedPlain, end - offset, 0, {}};

  // The slice of the L2 table that holds the entry, and the guest range it maps.
  const L2Slice located = SliceOf(offset, l2_offset);
  const uint64_t first_in_slice = located.first_entry;
  const uint64_t slice_guest_start = located.guest_start;
  const uint64_t wanted_end = end;
  end = std::min(end, located.guest_end);
  // The caller goes on past this slice (a SEEK_DATA across a hole, a
  // zeroed range): the slices it needs next are read with this one.
  if (wanted_end > end) co_await PrefetchL2(located, wanted_end);

  absl::StatusOr<std::shared_ptr<const Table>> slice = co_await l2_cache_.Get(located.host_offset);
  if (!slice.ok()) co_return Annotate(slice.status(), "reading L2 table");

  const uint32_t subcluster_bits = format_.subcluster_bits();
  struct Piece {
    SubclusterType type;
    L2Entry entry;
    uint64_t host;  // host offset of the guest byte, for kNormal
  };
  auto classify = [&](uint64_t pos) -> absl::StatusOr<Piece> {
    const uint64_t index_in_slice = ((pos - slice_guest_start) >> cluster_bits);
    const L2Entry entry =
        DecodeL2Entry((*slice)->data() + index_in_slice * format_.entry_size(), format_);
    const uint32_t subcluster = (pos & (cluster_size - 1)) >> subcluster_bits;
    const SubclusterType type = GetSubclusterType(entry, subcluster, format_);
    auto damaged = [&](std::string_view why) {
      return absl::DataLossError(absl::StrFormat(
          "%s: L2 table at %#x, entry %u (guest offset %#x, value %#016x:%#016x): %s", file_->name(),
          l2_offset, first_in_slice + index_in_slice, pos, entry.descriptor, entry.bitmap, why));
    };
    if (type == SubclusterType::kInvalid) return damaged("the subcluster is both allocated and zero, or allocated without a host cluster");
    uint64_t host = 0;
    if (type == SubclusterType::kNormal) {
      const uint64_t host_cluster = L2EntryHostOffset(entry);
      if ((host_cluster & (cluster_size - 1)) != 0) return damaged("host offset is not cluster aligned");
      if (!external_data_file_ && host_cluster >= file_->size()) {
        return damaged("host offset points past the end of the file");
      }
      host = host_cluster + (pos & (cluster_size - 1));
    } else if (type == SubclusterType::kCompressed) {
      if (header_.has_data_file()) return damaged("compressed cluster in an image with an external data file");
      if (DecodeCompressedDescriptor(entry.descriptor, cluster_bits).host_offset >= file_->size()) {
        return damaged("compressed data starts past the end of the file");
      }
    }
    return Piece{type, entry, host};
  };
  auto next_boundary = [&](uint64_t pos, SubclusterType type) {
    // A compressed cluster is one unit; everything else goes subcluster by subcluster.
    const uint32_t bits = type == SubclusterType::kCompressed ? cluster_bits : subcluster_bits;
    return std::min(end, ((pos >> bits) + 1) << bits);
  };

  absl::StatusOr<Piece> first = classify(offset);
  if (!first.ok()) co_return first.status();
  Mapping m{first->type, 0, first->host, {}};
  if (m.type == SubclusterType::kCompressed) {
    m.compressed = DecodeCompressedDescriptor(first->entry.descriptor, cluster_bits);
    m.length = next_boundary(offset, m.type) - offset;
    co_return m;
  }
  uint64_t pos = next_boundary(offset, m.type);
  while (pos < end) {
    if (m.type == SubclusterType::kUnallocatedPlain) {
      // Sparse images are mostly all-zero entries: a 64 GiB hole is a
      // million of them, skipped in one tight loop (not in this coroutine,
      // whose locals live in its frame).
      const uint64_t cluster = pos >> cluster_bits;
      const uint64_t index_in_slice = cluster - (slice_guest_start >> cluster_bits);
      const uint64_t zeros =
          CountZeroL2Entries((*slice)->data() + index_in_slice * format_.entry_size(),
                             ((end - 1) >> cluster_bits) - cluster + 1, format_);
      if (zeros > 0) {
        pos = std::min(end, (cluster + zeros) << cluster_bits);
        continue;
      }
    }
    absl::StatusOr<Piece> next = classify(pos);
    // A damaged entry further on ends the run; the caller meets it next.
    if (!next.ok() || next->type != m.type) break;
    if (m.type == SubclusterType::kNormal && next->host != m.host_offset + (pos - offset)) break;
    pos = next_boundary(pos, m.type);
  }
  m.length = pos - offset;
  co_return m;
}

Qcow2Layer::L2Slice Qcow2Layer::SliceOf(uint64_t offset, uint64_t l2_offset) const {
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t l2_entries = header_.l2_entries();
  const uint64_t entries_per_slice = l2_cache_.table_size() / format_.entry_size();
  const uint64_t cluster = offset >> cluster_bits;
  const uint64_t l2_index = cluster % l2_entries;
  const uint64_t first_entry = l2_index - l2_index % entries_per_slice;
  const uint64_t table_guest_start = (cluster - l2_index) << cluster_bits;
  const uint64_t guest_start = table_guest_start + (first_entry << cluster_bits);
  return L2Slice{
      .host_offset = l2_offset + first_entry * format_.entry_size(),
      .entry_offset = (l2_index - first_entry) * format_.entry_size(),
      .first_entry = first_entry,
      .guest_start = guest_start,
      .guest_end = guest_start + (entries_per_slice << cluster_bits),
      .table_guest_end = table_guest_start + (l2_entries << cluster_bits),
  };
}

Task<void> Qcow2Layer::PrefetchL2(const L2Slice& slice, uint64_t end) {
  const uint64_t span = slice.guest_end - slice.guest_start;
  const uint64_t slices = (std::min(end, slice.table_guest_end) - slice.guest_start + span - 1) / span;
  const uint64_t most = std::max<uint64_t>(1, kL2PrefetchBytes / l2_cache_.table_size());
  co_await l2_cache_.Prefetch(slice.host_offset, static_cast<uint32_t>(std::min(slices, most)));
}

uint64_t Qcow2Layer::L1Entry(uint64_t l1_index) const {
  std::shared_lock lock(l1_mu_);
  return l1_index < l1_.size() ? l1_[l1_index] : 0;
}

uint64_t Qcow2Layer::L1Size() const {
  std::shared_lock lock(l1_mu_);
  return l1_.size();
}

absl::StatusOr<uint64_t> Qcow2Layer::L2TableOffset(uint64_t l1_index) const {
  const uint64_t l2_offset = L1EntryL2Offset(L1Entry(l1_index));
  if (l2_offset == 0) return 0;
  if ((l2_offset & (header_.cluster_size() - 1)) != 0 || l2_offset >= file_->size()) {
    return absl::DataLossError(absl::StrFormat(
        "%s: L1 entry %u points to an L2 table at %#x, which is %s", file_->name(), l1_index,
        l2_offset, l2_offset >= file_->size() ? "past the end of the file" : "not cluster aligned"));
  }
  return l2_offset;
}

Task<absl::Status> Qcow2Layer::Read(uint64_t offset, std::span<uint8_t> out) {
  ReadTracker::Ticket ticket = BeginRequest();
  // Compressed clusters met in a row are inflated together, in parallel.
  std::vector<CompressedRead> compressed;
  while (!out.empty()) {
    if (const uint64_t known = known_zero_.ZeroRunAt(offset); known > 0) {
      const uint64_t n = std::min<uint64_t>(known, out.size());
      std::memset(out.data(), 0, n);
      offset += n;
      out = out.subspan(n);
      continue;
    }
    absl::StatusOr<Mapping> m = co_await Map(offset, out.size());
    if (!m.ok()) co_return m.status();
    if (m->type != SubclusterType::kCompressed && !compressed.empty()) {
      CO_RETURN_IF_ERROR(co_await ReadCompressedClusters(std::exchange(compressed, {})));
    }
    std::span<uint8_t> chunk = out.first(m->length);
    switch (m->type) {
      case SubclusterType::kNormal:
        CO_RETURN_IF_ERROR(co_await data_file_->Read(m->host_offset, chunk));
        break;
      case SubclusterType::kZeroPlain:
      case SubclusterType::kZeroAlloc:
        std::memset(chunk.data(), 0, chunk.size());
        break;
      case SubclusterType::kUnallocatedPlain:
      case SubclusterType::kUnallocatedAlloc:
        CO_RETURN_IF_ERROR(co_await ReadBacking(offset, chunk));
        break;
      case SubclusterType::kCompressed:
        compressed.push_back({offset, m->compressed, chunk});
        break;
      case SubclusterType::kInvalid:  // Map() reports these as errors
        co_return absl::InternalError("invalid subcluster type from Map");
    }
    offset += chunk.size();
    out = out.subspan(chunk.size());
  }
  if (!compressed.empty()) CO_RETURN_IF_ERROR(co_await ReadCompressedClusters(compressed));
  co_return absl::OkStatus();
}

Task<absl::StatusOr<bool>> Qcow2Layer::SendStored(uint64_t offset, uint64_t length,
                                                  absl::FunctionRef<void(int, uint64_t)> send) {
  // Held across `send`: a cluster freed meanwhile (a discard, a
  // copy-on-write elsewhere) is not reused until the bytes are out.
  ReadTracker::Ticket ticket = BeginRequest();
  const int fd = data_file_->fd();
  if (fd < 0 || length == 0) co_return false;
  absl::StatusOr<Mapping> m = co_await Map(offset, length);
  if (!m.ok()) co_return m.status();
  if (m->type != SubclusterType::kNormal || m->length < length) co_return false;
  // A file that ends inside the run would cut the bytes short; Read
  // reports that as the error it is.
  if (m->host_offset + length > data_file_->size()) co_return false;
  send(fd, m->host_offset);
  co_return true;
}

Task<void> Qcow2Layer::WillNeed(uint64_t offset, uint64_t length, uint64_t max_data) {
  ReadTracker::Ticket ticket = BeginRequest();
  const uint64_t end = std::min(offset + length, size());
  while (offset < end && max_data > 0) {
    absl::StatusOr<Mapping> m = co_await Map(offset, std::min(end - offset, max_data));
    if (!m.ok()) co_return;  // the read that follows reports it
    switch (m->type) {
      case SubclusterType::kNormal:
        data_file_->WillNeed(m->host_offset, m->length);
        max_data -= m->length;
        break;
      case SubclusterType::kCompressed:
        file_->WillNeed(m->compressed.host_offset, m->compressed.max_size);
        max_data -= std::min(max_data, m->length);
        break;
      case SubclusterType::kUnallocatedPlain:
      case SubclusterType::kUnallocatedAlloc:
        if (backing_ && offset < backing_->size()) {
          const uint64_t n = std::min(m->length, backing_->size() - offset);
          co_await backing_->WillNeed(offset, n, max_data);
          max_data -= std::min(max_data, n);
        }
        break;
      default:  // zeros: nothing to read
        break;
    }
    offset += m->length;
  }
}

uint64_t Qcow2Layer::L2TableBytes() const {
  uint64_t tables = 0;
  {
    std::shared_lock lock(l1_mu_);
    for (uint64_t entry : l1_) tables += L1EntryL2Offset(entry) != 0;
  }
  return tables * header_.cluster_size() + (backing_ ? backing_->L2TableBytes() : 0);
}

Qcow2Layer::~Qcow2Layer() {
  closing_ = true;
  if (counter_.joinable()) counter_.join();
}

Task<void> Qcow2Layer::StartDataCount(bool in_background) {
  {
    RangeLock::Guard meta = co_await meta_mu_.Lock();
    count_end_ = 0;
    count_limit_ = header_.size;
  }
  if (!in_background) co_return co_await CountDataBytes();
  counter_ = std::thread([this] { SyncWait(CountDataBytes()); });
}

std::optional<uint64_t> Qcow2Layer::DataBytes() const {
  if (!counted_) return std::nullopt;
  return data_bytes_.load();
}

Task<void> Qcow2Layer::CountDataBytes() {
  const uint64_t step = l2_cache_.table_size() / format_.entry_size() * header_.cluster_size();
  while (!closing_) {
    uint64_t pos, end, limit;
    {
      RangeLock::Guard meta = co_await meta_mu_.Lock();
      pos = count_end_;
      limit = count_limit_;
      if (pos >= limit) {
        counted_ = true;
        co_return;
      }
      end = std::min(limit, (pos / step + 1) * step);
    }
    // Bring the step's tables into the cache without holding up writers;
    // the count that matters is taken under the lock, from the cache. The
    // steps after it are read with it: the walk goes on to the limit.
    const uint64_t l1_index = (pos >> header_.cluster_bits) / header_.l2_entries();
    if (absl::StatusOr<uint64_t> l2_offset = L2TableOffset(l1_index); l2_offset.ok() && *l2_offset != 0) {
      co_await PrefetchL2(SliceOf(pos, *l2_offset), limit);
    }
    (void)co_await DataBytesIn(*this, pos, end);
    RangeLock::Guard meta = co_await meta_mu_.Lock();
    if (count_end_ != pos) continue;  // a resize moved it
    end = std::min(end, count_limit_);
    data_bytes_ += co_await DataBytesIn(*this, pos, end);
    count_end_ = end;
  }
}

Task<uint64_t> Qcow2Layer::DataBytesIn(Layer& layer, uint64_t begin, uint64_t end) {
  uint64_t total = 0;
  for (uint64_t pos = begin; pos < end;) {
    absl::StatusOr<Extent> e = co_await layer.BlockStatus(pos, end - pos);
    if (!e.ok()) {
      // st_blocks must not fail the view: the damaged cluster counts as
      // data, and the read of it reports the damage.
      const uint64_t cluster = layer.cluster_size();
      e = Extent{ExtentKind::kData, std::min(end, (pos / cluster + 1) * cluster) - pos};
    }
    if (e->kind == ExtentKind::kData) total += e->length;
    pos += e->length;
  }
  co_return total;
}

Task<uint64_t> Qcow2Layer::EntryDataBytes(const L2Entry& entry, uint64_t begin, uint64_t end) {
  const uint32_t bits = format_.subcluster_bits();
  const uint64_t guest_cluster = begin & ~(header_.cluster_size() - 1);
  uint64_t total = 0;
  for (uint64_t pos = begin; pos < end;) {
    const uint64_t piece_end = std::min(end, ((pos >> bits) + 1) << bits);
    switch (GetSubclusterType(entry, static_cast<uint32_t>((pos - guest_cluster) >> bits), format_)) {
      case SubclusterType::kZeroPlain:
      case SubclusterType::kZeroAlloc:
        break;
      case SubclusterType::kUnallocatedPlain:
      case SubclusterType::kUnallocatedAlloc:
        if (backing_ && pos < backing_->size()) {
          total += co_await DataBytesIn(*backing_, pos, std::min(piece_end, backing_->size()));
        }
        break;
      default:  // data and compressed; a damaged entry counts as data, as in the walk
        total += piece_end - pos;
        break;
    }
    pos = piece_end;
  }
  co_return total;
}

Task<void> Qcow2Layer::CountEntryChange(uint64_t guest_cluster, const L2Entry& old, const L2Entry& now) {
  if (old.descriptor == now.descriptor && old.bitmap == now.bitmap) co_return;
  // Only the part the count covers: the walk counts the rest when it gets
  // there, and bytes past the counted disk are not the disk's.
  const uint64_t end = std::min({guest_cluster + header_.cluster_size(), count_end_, count_limit_});
  if (end <= guest_cluster) co_return;
  const uint64_t before = co_await EntryDataBytes(old, guest_cluster, end);
  const uint64_t after = co_await EntryDataBytes(now, guest_cluster, end);
  data_bytes_ += after - before;  // wraps around to a subtraction
}

uint64_t Qcow2Layer::HostFileBytes() const {
  struct stat st;
  if (file_->fd() < 0 || fstat(file_->fd(), &st) != 0 || st.st_blocks == 0) return file_->size();
  return static_cast<uint64_t>(st.st_blocks) * kStatBlockBytes;
}

Task<absl::Status> Qcow2Layer::ReadBacking(uint64_t offset, std::span<uint8_t> out) {
  // Past the end of a shorter backing file the disk reads as zeros.
  const uint64_t backing_size = backing_ ? backing_->size() : 0;
  const uint64_t from_backing = offset < backing_size ? std::min<uint64_t>(out.size(), backing_size - offset) : 0;
  std::memset(out.data() + from_backing, 0, out.size() - from_backing);
  if (from_backing == 0) co_return absl::OkStatus();
  co_return FromBackingFile(co_await backing_->Read(offset, out.first(from_backing)));
}

Task<absl::Status> Qcow2Layer::ReadCompressed(uint64_t offset, const CompressedDescriptor& descriptor,
                                              std::span<uint8_t> out) {
  const auto where = [&] {
    return absl::StrFormat("%s: compressed cluster at host offset %#x (guest offset %#x)", file_->name(),
                           descriptor.host_offset, offset);
  };
  // A read of the whole cluster (sequential readers, the kernel's
  // readahead) inflates straight into the caller's buffer: the page cache
  // above keeps those bytes, so the cache here would only add a copy.
  if (out.size() == header_.cluster_size()) {
    absl::Status status = co_await Inflate(descriptor, out);
    if (!status.ok()) co_return Annotate(status, where());
    co_return absl::OkStatus();
  }
  absl::StatusOr<std::shared_ptr<const std::vector<uint8_t>>> cluster = co_await Decompress(descriptor);
  if (!cluster.ok()) co_return Annotate(cluster.status(), where());
  const uint64_t in_cluster = offset & (header_.cluster_size() - 1);
  std::memcpy(out.data(), (*cluster)->data() + in_cluster, out.size());
  co_return absl::OkStatus();
}

Task<absl::Status> Qcow2Layer::ReadCompressedClusters(std::span<const CompressedRead> reads) {
  if (reads.size() == 1) co_return co_await ReadCompressed(reads[0].offset, reads[0].descriptor, reads[0].out);
  std::vector<absl::Status> results(reads.size());
  Latch latch(reads.size());
  Scheduler& pool = InflatePool();
  for (size_t i = 0; i < reads.size(); ++i) pool.Spawn(ReadCompressedJob(this, reads[i], &results[i], &latch));
  co_await latch.Wait();
  for (absl::Status& status : results) CO_RETURN_IF_ERROR(status);
  co_return absl::OkStatus();
}

Task<void> Qcow2Layer::ReadCompressedJob(Qcow2Layer* self, CompressedRead read, absl::Status* result, Latch* latch) {
  *result = co_await self->ReadCompressed(read.offset, read.descriptor, read.out);
  latch->Arrive();  // the last thing: the reader may be gone after it
}

Scheduler& Qcow2Layer::InflatePool() {
  std::call_once(inflate_pool_once_, [this] {
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    inflate_pool_ = std::make_unique<Scheduler>(static_cast<int>(std::min(cores, kMaxInflateThreads)));
  });
  return *inflate_pool_;
}

Task<absl::StatusOr<std::shared_ptr<const std::vector<uint8_t>>>> Qcow2Layer::Decompress(
    const CompressedDescriptor& descriptor) {
  {
    std::lock_guard lock(inflated_mu_);
    for (auto it = inflated_.begin(); it != inflated_.end(); ++it) {
      if (it->host_offset == descriptor.host_offset) {
        inflated_.splice(inflated_.begin(), inflated_, it);
        co_return it->data;
      }
    }
  }
  auto cluster = std::make_shared<std::vector<uint8_t>>(header_.cluster_size());
  CO_RETURN_IF_ERROR(co_await Inflate(descriptor, *cluster));

  std::lock_guard lock(inflated_mu_);
  inflated_.push_front({descriptor.host_offset, cluster});
  if (inflated_.size() > kInflatedCacheEntries) inflated_.pop_back();
  co_return std::shared_ptr<const std::vector<uint8_t>>(std::move(cluster));
}

Task<absl::Status> Qcow2Layer::Inflate(const CompressedDescriptor& descriptor, std::span<uint8_t> out) {
  // The stream may be cut short by the end of the file; the decoder says
  // whether what is there is enough. Not zero-filled: Read fills it all.
  const uint64_t available = file_->size() - descriptor.host_offset;
  const size_t length = std::min(descriptor.max_size, available);
  std::unique_ptr<uint8_t[]> compressed(new uint8_t[length]);
  CO_RETURN_IF_ERROR(co_await file_->Read(descriptor.host_offset, std::span(compressed.get(), length)));
  // The decoder fills all of `out` or fails.
  co_return DecompressCluster(compression_, std::span<const uint8_t>(compressed.get(), length), out);
}

Task<absl::StatusOr<Extent>> Qcow2Layer::BlockStatus(uint64_t offset, uint64_t max_length) {
  ReadTracker::Ticket ticket = BeginRequest();
  absl::StatusOr<Mapping> m = co_await Map(offset, max_length);
  if (!m.ok()) co_return m.status();
  switch (m->type) {
    case SubclusterType::kNormal:
    case SubclusterType::kCompressed:
      co_return Extent{ExtentKind::kData, m->length};
    case SubclusterType::kZeroPlain:
    case SubclusterType::kZeroAlloc:
      co_return Extent{ExtentKind::kZero, m->length};
    default:
      break;
  }
  const uint64_t backing_size = backing_ ? backing_->size() : 0;
  if (offset >= backing_size) co_return Extent{ExtentKind::kUnallocated, m->length};
  absl::StatusOr<Extent> below = co_await backing_->BlockStatus(offset, std::min(m->length, backing_size - offset));
  if (!below.ok()) co_return FromBackingFile(below.status());
  co_return below;
}

ImageCounters Qcow2Layer::counters() const {
  const TableCache::Stats l2 = l2_cache_.stats();
  ImageCounters c;
  c.l2_slices_dirtied = l2.dirtied;
  c.l2_slice_reads = l2.misses + l2.prefetched;
  c.l2_reads = l2.misses + l2.prefetch_reads;
  c.metadata_writes = l2.writes + other_metadata_writes_.load() + (refcounts_ ? refcounts_->metadata_writes() : 0);
  c.data_bytes_written = data_bytes_written_.load();
  return c;
}

void Qcow2Layer::AppendFileDescriptors(std::vector<int>& fds) const {
  if (file_->fd() >= 0) fds.push_back(file_->fd());
  if (external_data_file_ && external_data_file_->fd() >= 0) fds.push_back(external_data_file_->fd());
  if (backing_) backing_->AppendFileDescriptors(fds);
}

std::string Qcow2Layer::Describe() const {
  std::vector<std::string> traits;
  traits.push_back(SizeString(header_.cluster_size()) + " clusters");
  if (header_.has_extended_l2()) traits.push_back("extended L2");
  if (header_.compression_type == spec::kCompressionZstd) traits.push_back("zstd");
  if (external_data_file_) traits.push_back("data file " + external_data_file_->name());
  if (header_.incompatible_features & spec::kIncompatDirty) traits.push_back("dirty");
  if (header_.incompatible_features & spec::kIncompatCorrupt) traits.push_back("marked corrupt");
  std::string line = absl::StrFormat("qcow2 v%u image %s (%u bytes; %s)", header_.version, file_->name(),
                                     header_.size, absl::StrJoin(traits, ", "));
  if (bitmaps_) {
    std::vector<std::string> states;
    for (const DirtyBitmaps::Description& d : bitmaps_->Describe()) {
      const std::string name = absl::StrCat("'", absl::CHexEscape(d.name), "'");
      switch (d.state) {
        case DirtyBitmaps::State::kRecorded: states.push_back(name + " recorded"); break;
        case DirtyBitmaps::State::kDisabled: states.push_back(name + " disabled"); break;
        case DirtyBitmaps::State::kInconsistent: states.push_back(absl::StrCat(name, " left in use: ", d.why)); break;
      }
    }
    line += "\n  persistent bitmaps: " + absl::StrJoin(states, "; ");
  }
  if (backing_) line += "\n  backed by " + backing_->Describe();
  return line;
}

}  // namespace qcow2fuse
