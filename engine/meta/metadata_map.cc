#include "meta/metadata_map.h"

#include <mutex>

#include "absl/strings/str_format.h"

namespace qcow2fuse {

const char* MetadataKindName(MetadataKind kind) {
  switch (kind) {
    case MetadataKind::kHeader: return "the header";
    case MetadataKind::kL1Table: return "the L1 table";
    case MetadataKind::kL2Table: return "an L2 table";
    case MetadataKind::kRefcountTable: return "the refcount table";
    case MetadataKind::kRefcountBlock: return "a refcount block";
    case MetadataKind::kSnapshotTable: return "the snapshot table";
    case MetadataKind::kSnapshotL1Table: return "a snapshot's L1 table";
    case MetadataKind::kBitmapDirectory: return "the bitmap directory";
    case MetadataKind::kBitmapTable: return "a bitmap table";
    case MetadataKind::kBitmapData: return "a bitmap's data";
  }
  return "metadata";
}

absl::Status MetadataMap::Add(MetadataKind kind, uint64_t offset, uint64_t length) {
  if (length == 0) return absl::OkStatus();
  std::unique_lock lock(mu_);
  if (std::optional<Hit> hit = FindLocked(offset, length)) {
    return absl::DataLossError(absl::StrFormat("%s at %#x (%u bytes) overlaps %s at %#x",
                                               MetadataKindName(kind), offset, length,
                                               MetadataKindName(hit->kind), hit->offset));
  }
  if (IsCluster(kind)) {
    clusters_[offset] = kind;
  } else {
    ranges_[offset] = Range{offset + length, kind};
  }
  return absl::OkStatus();
}

void MetadataMap::Remove(MetadataKind kind, uint64_t offset) {
  std::unique_lock lock(mu_);
  // Only a structure of that kind: a table with no bytes (registered as
  // nothing) must not take the header at offset 0 with it.
  if (IsCluster(kind)) {
    auto it = clusters_.find(offset);
    if (it != clusters_.end() && it->second == kind) clusters_.erase(it);
  } else {
    auto it = ranges_.find(offset);
    if (it != ranges_.end() && it->second.kind == kind) ranges_.erase(it);
  }
}

void MetadataMap::Move(MetadataKind kind, uint64_t old_offset, uint64_t new_offset, uint64_t new_length) {
  std::unique_lock lock(mu_);
  auto it = ranges_.find(old_offset);
  if (it != ranges_.end() && it->second.kind == kind) ranges_.erase(it);
  if (new_length > 0) ranges_[new_offset] = Range{new_offset + new_length, kind};
}

std::optional<MetadataMap::Hit> MetadataMap::Find(uint64_t offset, uint64_t length) const {
  if (length == 0) return std::nullopt;
  std::shared_lock lock(mu_);
  return FindLocked(offset, length);
}

std::optional<MetadataMap::Hit> MetadataMap::FindLocked(uint64_t offset, uint64_t length) const {
  // Ranges never overlap one another: the one starting last at or before
  // `offset`, and the first starting after it, are the only candidates.
  const uint64_t end = offset + length < offset ? UINT64_MAX : offset + length;
  auto next = ranges_.upper_bound(offset);
  if (next != ranges_.begin()) {
    auto prev = std::prev(next);
    if (prev->second.end > offset) return Hit{prev->second.kind, prev->first};
  }
  if (next != ranges_.end() && next->first < end) return Hit{next->second.kind, next->first};

  // Clusters: look up each one the range touches, or, for a range of more
  // clusters than the set holds, go through the set.
  const uint64_t first = offset >> cluster_bits_;
  const uint64_t last = (end - 1) >> cluster_bits_;
  if (last - first < clusters_.size()) {
    for (uint64_t c = first; c <= last; ++c) {
      auto it = clusters_.find(c << cluster_bits_);
      if (it != clusters_.end()) return Hit{it->second, it->first};
    }
  } else {
    for (const auto& [cluster, kind] : clusters_) {
      if ((cluster >> cluster_bits_) >= first && (cluster >> cluster_bits_) <= last) return Hit{kind, cluster};
    }
  }
  return std::nullopt;
}

}  // namespace qcow2fuse
