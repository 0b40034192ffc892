#include "meta/refcounts.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/endian.h"
#include "format/refcount.h"
#include "format/spec.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {

Refcounts::Refcounts(BlockFile* file, const Header& header, uint64_t cache_bytes, MetadataMap* map,
                     MemoryBudget* budget, HeaderWriter* header_writer)
    : file_(file),
      map_(map),
      own_header_writer_(header_writer == nullptr ? std::make_unique<HeaderWriter>(file) : nullptr),
      header_writer_(header_writer != nullptr ? header_writer : own_header_writer_.get()),
      cluster_bits_(header.cluster_bits),
      refcount_order_(header.refcount_order),
      block_entries_(RefcountBlockEntries(header.cluster_bits, header.refcount_order)),
      table_offset_(header.refcount_table_offset),
      table_clusters_(header.refcount_table_clusters),
      blocks_(file, uint32_t{1} << header.cluster_bits, cache_bytes, budget,
              absl::StrCat("the refcount cache of ", file->name())) {}

Task<absl::Status> Refcounts::Load() {
  const uint64_t cluster_size = uint64_t{1} << cluster_bits_;
  // Without a table nothing is counted, not even the header: an allocation
  // would hand out cluster 0. QEMU refuses to open such an image.
  if (table_clusters_ == 0) {
    co_return absl::DataLossError(absl::StrFormat(
        "%s has no refcount table (its header gives it 0 clusters), so nothing says which clusters "
        "are in use; it can be mounted read-only",
        file_->name()));
  }
  // DecodeHeader bounded the table to 8 MiB inside the file.
  std::vector<uint8_t> raw(uint64_t{table_clusters_} * cluster_size);
  CO_RETURN_IF_ERROR(co_await file_->Read(table_offset_, raw));
  table_.resize(raw.size() / spec::kRefcountTableEntrySize);
  const uint64_t file_clusters = (file_->size() + cluster_size - 1) >> cluster_bits_;
  end_cluster_ = file_clusters;
  if (map_ != nullptr) {
    absl::Status placed = map_->Add(MetadataKind::kRefcountTable, table_offset_, raw.size());
    if (!placed.ok()) co_return absl::DataLossError(absl::StrCat(file_->name(), ": ", placed.message()));
  }
  for (size_t i = 0; i < table_.size(); ++i) {
    table_[i] = LoadBE64(raw.data() + i * spec::kRefcountTableEntrySize) & spec::kRefcountTableOffsetMask;
    if (table_[i] == 0) continue;
    if ((table_[i] & (cluster_size - 1)) != 0 || table_[i] >= file_->size()) {
      co_return absl::DataLossError(absl::StrFormat(
          "%s: refcount table entry %u points to a refcount block at %#x, which is %s", file_->name(),
          i, table_[i], table_[i] >= file_->size() ? "past the end of the file" : "not cluster aligned"));
    }
    // A block named twice would count two ranges of clusters in one place;
    // a block on other metadata would have its refcounts written over it.
    if (!block_offsets_.insert(table_[i]).second) {
      co_return absl::DataLossError(absl::StrFormat(
          "%s: refcount table entry %u points to the refcount block at %#x, which an earlier entry "
          "points to too", file_->name(), i, table_[i]));
    }
    if (map_ != nullptr) {
      absl::Status placed = map_->Add(MetadataKind::kRefcountBlock, table_[i], cluster_size);
      if (!placed.ok()) {
        co_return absl::DataLossError(
            absl::StrFormat("%s: refcount table entry %u: %s", file_->name(), i, placed.message()));
      }
    }
  }
  co_return absl::OkStatus();
}

Task<absl::StatusOr<uint64_t>> Refcounts::Get(uint64_t cluster_index) {
  const uint64_t block_index = cluster_index / block_entries_;
  if (block_index >= table_.size() || table_[block_index] == 0) co_return uint64_t{0};
  absl::StatusOr<std::shared_ptr<const Table>> block = co_await blocks_.Get(table_[block_index]);
  if (!block.ok()) co_return block.status();
  co_return GetRefcount(**block, cluster_index % block_entries_, refcount_order_);
}

Task<absl::Status> Refcounts::Update(uint64_t offset, uint64_t count, int64_t delta) {
  const uint64_t first = offset >> cluster_bits_;
  const uint64_t max = MaxRefcount(refcount_order_);
  for (uint64_t cluster = first; cluster < first + count;) {
    const uint64_t block_index = cluster / block_entries_;
    if (delta < 0 && (block_index >= table_.size() || table_[block_index] == 0)) {
      // No block: the refcount is 0 and cannot drop. Never make metadata
      // to find that out (the cluster may lie anywhere up to 2^56).
      co_return absl::DataLossError(absl::StrFormat(
          "%s: refcount of cluster at %#x would drop below zero (no refcount block describes it)",
          file_->name(), cluster << cluster_bits_));
    }
    CO_RETURN_IF_ERROR(co_await EnsureBlock(block_index));
    absl::StatusOr<Table*> block = co_await blocks_.GetMutable(table_[block_index]);
    if (!block.ok()) co_return block.status();
    // All clusters of this run that the same block describes.
    const uint64_t block_end = (block_index + 1) * block_entries_;
    for (; cluster < first + count && cluster < block_end; ++cluster) {
      const uint64_t index = cluster % block_entries_;
      const uint64_t old = GetRefcount(**block, index, refcount_order_);
      if (delta < 0 && old < static_cast<uint64_t>(-delta)) {
        co_return absl::DataLossError(absl::StrFormat(
            "%s: refcount of cluster at %#x would drop below zero (it is %u)", file_->name(),
            cluster << cluster_bits_, old));
      }
      if (delta > 0 && max - old < static_cast<uint64_t>(delta)) {
        co_return absl::OutOfRangeError(absl::StrFormat(
            "%s: refcount of cluster at %#x would exceed the %u-bit maximum", file_->name(),
            cluster << cluster_bits_, 1u << refcount_order_));
      }
      const uint64_t now = old + delta;
      SetRefcount(**block, index, refcount_order_, now);
      if (now == 0) {
        freed_.insert(cluster);
        free_hint_ = std::min(free_hint_, cluster);
      } else {
        freed_.erase(cluster);  // in use again: not to be discarded
        end_cluster_ = std::max(end_cluster_, cluster + 1);
      }
    }
  }
  co_return absl::OkStatus();
}

Task<absl::StatusOr<uint64_t>> Refcounts::Allocate(uint64_t count) {
  // First fit from the hint. Clusters past the last refcount block have
  // refcount 0, so the scan always ends.
  constexpr uint64_t kNone = ~uint64_t{0};
  uint64_t first_free = kNone;  // the next hint: no free cluster before it
  uint64_t run_start = 0;
  uint64_t run_length = 0;
  // Cluster 0 holds the header, whatever its refcount says.
  for (uint64_t cluster = std::max<uint64_t>(free_hint_, 1); run_length < count;) {
    const uint64_t block_index = cluster / block_entries_;
    const uint64_t block_end = (block_index + 1) * block_entries_;
    if (block_index >= table_.size() || table_[block_index] == 0) {
      // The whole block's range is free.
      if (first_free == kNone) first_free = cluster;
      if (run_length == 0) run_start = cluster;
      run_length += block_end - cluster;
      cluster = block_end;
      continue;
    }
    absl::StatusOr<std::shared_ptr<const Table>> block = co_await blocks_.Get(table_[block_index]);
    if (!block.ok()) co_return block.status();
    for (; cluster < block_end && run_length < count; ++cluster) {
      if (GetRefcount(**block, cluster % block_entries_, refcount_order_) != 0) {
        run_length = 0;
        continue;
      }
      if (first_free == kNone) first_free = cluster;
      if (run_length == 0) run_start = cluster;
      ++run_length;
    }
  }
  end_cluster_ = std::max(end_cluster_, run_start + count);
  // Set before Update: growing the refcount table there frees the old
  // table's clusters and lowers the hint to them.
  free_hint_ = first_free == run_start ? run_start + count : first_free;
  CO_RETURN_IF_ERROR(co_await Update(run_start << cluster_bits_, count, +1));
  co_return run_start << cluster_bits_;
}

Task<absl::StatusOr<uint64_t>> Refcounts::TakeEndCluster() {
  // Clusters past the end are free in a consistent image; a damaged one may
  // claim otherwise, so check.
  for (;;) {
    const uint64_t cluster = end_cluster_++;
    absl::StatusOr<uint64_t> refcount = co_await Get(cluster);
    if (!refcount.ok()) co_return refcount.status();
    if (*refcount == 0) co_return cluster;
  }
}

Task<absl::Status> Refcounts::EnsureBlock(uint64_t block_index) {
  if (block_index < table_.size() && table_[block_index] != 0) co_return absl::OkStatus();
  if (block_index >= table_.size()) {
    CO_RETURN_IF_ERROR(co_await GrowTable(block_index + 1));
    if (table_[block_index] != 0) co_return absl::OkStatus();  // growth created it
  }
  absl::StatusOr<uint64_t> cluster = co_await TakeEndCluster();
  if (!cluster.ok()) co_return cluster.status();
  Table block(uint64_t{1} << cluster_bits_, 0);
  if (*cluster / block_entries_ == block_index) {
    // The block describes its own cluster.
    SetRefcount(block, *cluster % block_entries_, refcount_order_, 1);
  } else {
    CO_RETURN_IF_ERROR(co_await Update(*cluster << cluster_bits_, 1, +1));
  }
  if (map_ != nullptr) {
    CO_RETURN_IF_ERROR(map_->Add(MetadataKind::kRefcountBlock, *cluster << cluster_bits_, uint64_t{1} << cluster_bits_));
  }
  blocks_.Install(*cluster << cluster_bits_, std::move(block));
  table_[block_index] = *cluster << cluster_bits_;
  block_offsets_.insert(table_[block_index]);
  dirty_table_entries_.insert(block_index);
  co_return absl::OkStatus();
}

Task<absl::Status> Refcounts::GrowTable(uint64_t min_entries) {
  const uint64_t cluster_size = uint64_t{1} << cluster_bits_;
  const uint64_t entries_per_cluster = cluster_size / spec::kRefcountTableEntrySize;
  // The new table copies the in-memory entries: what they point to must be
  // on disk before the header can point to the new table.
  CO_RETURN_IF_ERROR(co_await WriteBack());
  CO_RETURN_IF_ERROR(co_await file_->Flush());

  // Lay out, at the end of the image, the new table followed by the
  // refcount blocks missing for the clusters of that area itself.
  const uint64_t area = end_cluster_;
  uint64_t entries = std::max<uint64_t>(min_entries, table_.size() * 2);
  uint64_t table_clusters = 0;
  std::vector<uint64_t> new_blocks;  // block indices, placed after the table
  for (;;) {
    entries = (entries + entries_per_cluster - 1) / entries_per_cluster * entries_per_cluster;
    table_clusters = entries / entries_per_cluster;
    // Checked before laying anything out: the list of missing blocks grows
    // with the table.
    if (table_clusters * cluster_size > spec::kMaxRefcountTableBytes) {
      co_return absl::ResourceExhaustedError(absl::StrFormat(
          "%s: the refcount table would grow past %u bytes", file_->name(), spec::kMaxRefcountTableBytes));
    }
    std::vector<uint64_t> missing;
    for (;;) {
      missing.clear();
      const uint64_t area_end = area + table_clusters + new_blocks.size();
      for (uint64_t b = area / block_entries_; b <= (area_end - 1) / block_entries_; ++b) {
        if (b >= table_.size() || table_[b] == 0) missing.push_back(b);
      }
      if (missing.size() == new_blocks.size()) break;
      new_blocks.assign(missing.size(), 0);
    }
    new_blocks = missing;
    if (new_blocks.empty() || new_blocks.back() < entries) break;
    entries = new_blocks.back() + 1;
  }
  const uint64_t table_bytes = table_clusters * cluster_size;
  if (table_bytes > spec::kMaxRefcountTableBytes) {
    co_return absl::ResourceExhaustedError(absl::StrFormat(
        "%s: the refcount table would grow past %u bytes", file_->name(), spec::kMaxRefcountTableBytes));
  }

  std::vector<uint64_t> table = table_;
  table.resize(entries, 0);
  std::vector<Table> blocks(new_blocks.size(), Table(cluster_size, 0));
  for (size_t i = 0; i < new_blocks.size(); ++i) {
    table[new_blocks[i]] = (area + table_clusters + i) << cluster_bits_;
  }
  // Count every cluster of the area: in a new block, or in an existing one.
  const uint64_t area_end = area + table_clusters + new_blocks.size();
  for (uint64_t cluster = area; cluster < area_end; ++cluster) {
    const uint64_t b = cluster / block_entries_;
    auto it = std::find(new_blocks.begin(), new_blocks.end(), b);
    if (it != new_blocks.end()) {
      SetRefcount(blocks[it - new_blocks.begin()], cluster % block_entries_, refcount_order_, 1);
    } else {
      absl::StatusOr<Table*> block = co_await blocks_.GetMutable(table_[b]);
      if (!block.ok()) co_return block.status();
      SetRefcount(**block, cluster % block_entries_, refcount_order_, 1);
    }
  }
  CO_RETURN_IF_ERROR(co_await blocks_.WriteBack());
  for (size_t i = 0; i < new_blocks.size(); ++i) {
    ++writes_;
    CO_RETURN_IF_ERROR(co_await file_->Write(table[new_blocks[i]], blocks[i]));
  }
  std::vector<uint8_t> raw(table_bytes, 0);
  for (size_t i = 0; i < table.size(); ++i) StoreBE64(raw.data() + i * spec::kRefcountTableEntrySize, table[i]);
  ++writes_;
  CO_RETURN_IF_ERROR(co_await file_->Write(area << cluster_bits_, raw));
  CO_RETURN_IF_ERROR(co_await file_->Flush());

  // Switch the header: offset and cluster count are adjacent, in one
  // sector. A failed switch leaves the old fields, and this the old table.
  uint8_t fields[12];
  StoreBE64(fields, area << cluster_bits_);
  StoreBE32(fields + 8, static_cast<uint32_t>(table_clusters));
  uint8_t old_fields[12];
  StoreBE64(old_fields, table_offset_);
  StoreBE32(old_fields + 8, table_clusters_);
  static_assert(spec::kOffRefcountTableClusters == spec::kOffRefcountTableOffset + 8);
  ++writes_;
  CO_RETURN_IF_ERROR(co_await header_writer_->Switch(spec::kOffRefcountTableOffset, fields, old_fields));

  const uint64_t old_offset = table_offset_;
  const uint64_t old_clusters = table_clusters_;
  table_ = std::move(table);
  table_offset_ = area << cluster_bits_;
  table_clusters_ = static_cast<uint32_t>(table_clusters);
  end_cluster_ = std::max(end_cluster_, area_end);
  if (map_ != nullptr) map_->Move(MetadataKind::kRefcountTable, old_offset, table_offset_, table_bytes);
  for (size_t i = 0; i < new_blocks.size(); ++i) {
    block_offsets_.insert(table_[new_blocks[i]]);
    if (map_ != nullptr) CO_RETURN_IF_ERROR(map_->Add(MetadataKind::kRefcountBlock, table_[new_blocks[i]], cluster_size));
    blocks_.Install(table_[new_blocks[i]], std::move(blocks[i]));
  }
  // Installed blocks are already on disk; writing them again is harmless.
  co_return co_await Update(old_offset, old_clusters, -1);
}

Task<absl::Status> Refcounts::WriteBack() {
  CO_RETURN_IF_ERROR(co_await blocks_.WriteBack());
  if (dirty_table_entries_.empty()) co_return absl::OkStatus();
  // Table entries point to new blocks: those must be durable first.
  CO_RETURN_IF_ERROR(co_await file_->Flush());
  for (uint64_t index : dirty_table_entries_) {
    uint8_t entry[spec::kRefcountTableEntrySize];
    StoreBE64(entry, table_[index]);
    ++writes_;
    CO_RETURN_IF_ERROR(
        co_await file_->Write(table_offset_ + index * spec::kRefcountTableEntrySize, entry));
  }
  dirty_table_entries_.clear();
  co_return absl::OkStatus();
}

std::vector<std::pair<uint64_t, uint64_t>> Refcounts::TakeFreed() {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  const uint64_t cluster_size = uint64_t{1} << cluster_bits_;
  for (uint64_t cluster : freed_) {
    const uint64_t host = cluster << cluster_bits_;
    if (!ranges.empty() && ranges.back().first + ranges.back().second == host) {
      ranges.back().second += cluster_size;
    } else {
      ranges.emplace_back(host, cluster_size);
    }
  }
  freed_.clear();
  return ranges;
}

bool Refcounts::OverlapsMetadata(uint64_t offset, uint64_t length) const {
  const uint64_t cluster_size = uint64_t{1} << cluster_bits_;
  const uint64_t table_end = table_offset_ + uint64_t{table_clusters_} * cluster_size;
  if (offset < table_end && table_offset_ < offset + length) return true;
  for (uint64_t c = offset & ~(cluster_size - 1); c < offset + length; c += cluster_size) {
    if (block_offsets_.contains(c)) return true;
  }
  return false;
}

bool Refcounts::has_dirty() const { return blocks_.has_dirty() || !dirty_table_entries_.empty(); }

}  // namespace qcow2fuse
