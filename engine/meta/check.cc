#include "meta/check.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_format.h"
#include "base/endian.h"
#include "format/l2_entry.h"
#include "format/refcount.h"
#include "format/spec.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// Numbers of the spec, and QEMU limits, that format/spec.h does not name
// (yet). Named as the spec and QEMU name them.
namespace ck {
// "Host cluster management": refcount table entry bits 0-8 are reserved.
inline constexpr uint64_t kRefcountTableReservedMask = 0x00000000000001ffull;

// "Snapshots": the fixed part of a snapshot table entry, then extra data,
// the ID string and the name; each entry is padded to 8 bytes.
inline constexpr uint32_t kSnapshotHeaderSize = 40;
inline constexpr uint32_t kSnapOffL1TableOffset = 0;
inline constexpr uint32_t kSnapOffL1Size = 8;
inline constexpr uint32_t kSnapOffIdStrSize = 12;
inline constexpr uint32_t kSnapOffNameSize = 14;
inline constexpr uint32_t kSnapOffExtraDataSize = 36;
inline constexpr uint32_t kSnapshotEntryAlignment = 8;
// QEMU: QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE.
inline constexpr uint32_t kMaxSnapshotExtraData = 1024;
inline constexpr uint64_t kMaxSnapshotTableBytes = 1024ull * spec::kMaxSnapshots;

// "Bitmaps": a bitmap directory entry.
inline constexpr uint32_t kBitmapDirEntryHeaderSize = 24;
inline constexpr uint32_t kBmOffTableOffset = 0;
inline constexpr uint32_t kBmOffTableSize = 8;
inline constexpr uint32_t kBmOffFlags = 12;
inline constexpr uint32_t kBmOffType = 16;
inline constexpr uint32_t kBmOffGranularityBits = 17;
inline constexpr uint32_t kBmOffNameSize = 18;
inline constexpr uint32_t kBmOffExtraDataSize = 20;
inline constexpr uint32_t kBitmapDirEntryAlignment = 8;
inline constexpr uint32_t kBitmapFlagInUse = 1u << 0;
inline constexpr uint32_t kBitmapReservedFlags = ~uint32_t{0x7};  // bits 3-31
inline constexpr uint8_t kBitmapTypeDirtyTracking = 1;
inline constexpr uint32_t kMinBitmapGranularityBits = 9;  // QEMU's limits
inline constexpr uint32_t kMaxBitmapGranularityBits = 31;
inline constexpr uint32_t kMaxBitmapNameSize = 1023;
// "Bitmaps": a bitmap table entry.
inline constexpr uint32_t kBitmapTableEntrySize = 8;
inline constexpr uint64_t kBitmapTableOffsetMask = 0x00fffffffffffe00ull;    // bits 9-55
inline constexpr uint64_t kBitmapTableReservedMask = 0xff000000000001feull;  // bits 1-8, 56-63
inline constexpr uint64_t kBitmapTableAllOnes = 1ull << 0;                   // only with offset 0
// QEMU: BME_MAX_TABLE_SIZE, BME_MAX_PHYS_SIZE, QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
inline constexpr uint64_t kMaxBitmapTableEntries = 0x8000000;
inline constexpr uint64_t kMaxBitmapPhysBytes = 0x20000000;
inline constexpr uint64_t kMaxBitmapDirectoryBytes = 1024ull * spec::kMaxBitmaps;

// QEMU refuses to check files of more than INT_MAX clusters.
inline constexpr uint64_t kMaxFileClusters = (uint64_t{1} << 31) - 1;
}  // namespace ck

// Ranges of more clusters than this are counted in one sweep at the end
// rather than cluster by cluster, so that thousands of snapshots naming one
// big L1 table cost no more than one.
constexpr uint64_t kDirectRefClusters = 16;
// Tables are read in pieces of this size.
constexpr uint64_t kSweepChunkBytes = 1 << 20;
// Refcount blocks read to learn refcounts of clusters past the end of the
// file (only the COPIED check wants them); a hostile image could otherwise
// make every entry read a block.
constexpr int kMaxPastEofBlockReads = 4096;

// Stored refcounts, as kept for the COPIED check: the value, capped.
constexpr uint8_t kStoredMany = 254;     // 254 or more
constexpr uint8_t kStoredUnknown = 255;  // the refcount block could not be read

uint64_t AlignUp(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) & ~(alignment - 1);
}

std::string Times(uint64_t times) {
  if (times == 1) return "";
  return absl::StrFormat(" (counted %u times: the table holding it is shared)", times);
}

std::string RefcountString(std::optional<uint64_t> refcount) {
  if (!refcount) return "unknown";
  if (*refcount >= kStoredMany) return absl::StrFormat("%u or more", kStoredMany);
  return absl::StrFormat("%u", *refcount);
}

// A table of 64-bit big-endian entries in the image file.
struct TableRef {
  uint64_t offset = 0;
  uint64_t entries = 0;
  std::string name;
};

// How often the L1 tables reference one L2 table, and the first reference.
struct L2Use {
  uint64_t times = 0;
  size_t table = 0;  // index into the L1 tables
  uint64_t index = 0;
};

struct SnapshotInfo {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  std::string id;
  std::string name;
};

enum class ClusterType { kUnallocated, kZeroPlain, kZeroAlloc, kNormal, kCompressed };

class Checker {
 public:
  Checker(BlockFile& image, const Header& header, BlockFile* data_file, CheckOptions options)
      : image_(image), h_(header), data_file_(data_file), options_(options) {}

  Task<absl::StatusOr<CheckResult>> Run();

 private:
  using EntryVisitor =
      std::function<void(uint64_t entry, uint64_t times, const TableRef& table, uint64_t index)>;

  // --- Reporting ----------------------------------------------------------
  // Adds `times` to `counter`; true if there is room for a message.
  bool Count(uint64_t& counter, uint64_t times) {
    counter += times;
    if (result_.messages.size() < options_.max_messages) return true;
    ++omitted_;
    return false;
  }
  bool Corruption(uint64_t times = 1) { return Count(result_.corruptions, times); }
  bool Leak(uint64_t times = 1) { return Count(result_.leaks, times); }
  bool Warning(uint64_t times = 1) { return Count(result_.warnings, times); }
  void Message(std::string line) { result_.messages.push_back(std::move(line)); }

  // --- References ---------------------------------------------------------
  // Counts `times` references to every cluster that [offset, offset+length)
  // touches. `what` names the range for a message.
  template <typename What>
  void AddRef(uint64_t offset, uint64_t length, uint64_t times, const What& what);
  void AddToCluster(uint64_t cluster, uint64_t times) {
    uint32_t& ref = result_.expected_refcounts[cluster];
    const uint64_t sum = uint64_t{ref} + times;
    ref = sum > std::numeric_limits<uint32_t>::max() ? std::numeric_limits<uint32_t>::max()
                                                     : static_cast<uint32_t>(sum);
  }
  void ApplyPendingRanges();

  // --- Reading ------------------------------------------------------------
  // Reads `out` at `offset`; past the end of the file it is zeros.
  Task<absl::Status> ReadAt(uint64_t offset, std::span<uint8_t> out);
  // Visits every entry position covered by `tables` once, with the number
  // of tables that cover it and the first of them.
  Task<absl::Status> Sweep(const std::vector<TableRef>& tables, const EntryVisitor& visit);
  Task<absl::Status> VisitSegment(uint64_t begin, uint64_t end, uint64_t times,
                                  const TableRef& table, const EntryVisitor& visit);

  // --- The steps ------------------------------------------------------------
  Task<absl::Status> ReadSnapshotTable();
  Task<absl::Status> CountL1Tables();
  void VisitL1Entry(uint64_t entry, uint64_t times, size_t table_index, const TableRef& table,
                    uint64_t index);
  Task<absl::Status> CountL2Tables();
  void CheckL2Entry(uint64_t l2_offset, const L2Use& use, uint64_t index, const L2Entry& entry);
  ClusterType TypeOf(const L2Entry& entry) const;
  Task<absl::Status> CountBitmaps();
  void VisitBitmapTableEntry(uint64_t entry, uint64_t times, const TableRef& table, uint64_t index);
  Task<absl::Status> LoadRefcountTable();
  void CountRefcountBlocks();
  Task<absl::Status> CompareRefcounts();
  Task<absl::Status> CheckCopiedFlags();
  std::optional<uint64_t> StoredInFile(uint64_t cluster) const {
    const uint8_t s = stored_[cluster];
    if (s == kStoredUnknown) return std::nullopt;
    return s;
  }
  Task<absl::StatusOr<std::optional<uint64_t>>> StoredPastEof(uint64_t cluster);
  void CheckDataFileSize();

  BlockFile& image_;
  const Header& h_;
  BlockFile* const data_file_;
  const CheckOptions options_;

  uint64_t file_size_ = 0;
  uint32_t cluster_bits_ = 0;
  uint64_t cluster_size_ = 0;
  uint64_t nb_clusters_ = 0;
  uint64_t l2_entries_ = 0;
  L2Format l2_format_;
  bool has_data_file_ = false;

  CheckResult result_;
  uint64_t omitted_ = 0;

  std::vector<SnapshotInfo> snapshots_;
  uint64_t snapshot_table_bytes_ = 0;
  std::vector<TableRef> l1_tables_;  // the active one first, if it has entries
  bool has_active_l1_ = false;
  std::map<uint64_t, L2Use> l2_uses_;  // aligned L2 tables inside the file
  struct PendingRange {
    uint64_t first;  // cluster index
    uint64_t end;
    uint64_t times;
  };
  std::vector<PendingRange> pending_;

  std::vector<uint64_t> refcount_table_;
  uint64_t refcount_block_entries_ = 0;
  std::vector<uint8_t> stored_;  // per cluster of the file: capped stored refcount
  uint64_t cached_block_offset_ = 0;
  std::vector<uint8_t> cached_block_;
  int past_eof_block_reads_ = 0;
};

template <typename What>
void Checker::AddRef(uint64_t offset, uint64_t length, uint64_t times, const What& what) {
  if (length == 0 || times == 0) return;
  // As QEMU: the last cluster of an image may be short, so a reference may
  // run less than a cluster past the end of the file; a cluster or more is
  // corrupt. (file_size_ + cluster_size_ cannot overflow: sizes are < 2^63.)
  const uint64_t limit = file_size_ + cluster_size_;
  if (offset >= limit || length >= limit - offset) {
    if (Corruption(times)) {
      Message(
          absl::StrFormat("%s at %#x (%u bytes) runs a cluster or more past the end of the "
                          "file (%u bytes)%s",
                          what(), offset, length, file_size_, Times(times)));
    }
    return;
  }
  const uint64_t first = offset >> cluster_bits_;
  const uint64_t end = std::min(((offset + length - 1) >> cluster_bits_) + 1, nb_clusters_);
  if (first >= end) return;  // entirely in the short tail past the end of the file
  if (end - first > kDirectRefClusters) {
    pending_.push_back({first, end, times});
    return;
  }
  for (uint64_t c = first; c < end; ++c) AddToCluster(c, times);
}

void Checker::ApplyPendingRanges() {
  // (cluster, +times) at each start and (cluster, -times) at each end,
  // summed in one pass: cost linear in the clusters covered, not in the
  // number of ranges times their length.
  std::vector<std::pair<uint64_t, int64_t>> events;
  events.reserve(pending_.size() * 2);
  for (const PendingRange& r : pending_) {
    // Counts saturate at 2^32 - 1 anyway; capping each keeps the sum of
    // any number of ranges far from int64 overflow.
    const int64_t t = static_cast<int64_t>(std::min<uint64_t>(r.times, uint64_t{1} << 32));
    events.emplace_back(r.first, t);
    events.emplace_back(r.end, -t);
  }
  pending_.clear();
  std::sort(events.begin(), events.end());
  int64_t running = 0;
  for (size_t k = 0; k < events.size();) {
    const uint64_t pos = events[k].first;
    for (; k < events.size() && events[k].first == pos; ++k) running += events[k].second;
    const uint64_t next = k < events.size() ? events[k].first : pos;
    if (running > 0) {
      for (uint64_t c = pos; c < next; ++c) AddToCluster(c, static_cast<uint64_t>(running));
    }
  }
}

Task<absl::Status> Checker::ReadAt(uint64_t offset, std::span<uint8_t> out) {
  if (out.empty()) co_return absl::OkStatus();
  if (offset >= file_size_) {
    std::fill(out.begin(), out.end(), 0);
    co_return absl::OkStatus();
  }
  absl::Status status = co_await image_.Read(offset, out);
  if (!status.ok()) {
    co_return Annotate(status, absl::StrFormat("check: reading %u bytes at %#x of %s", out.size(),
                                               offset, image_.name()));
  }
  co_return absl::OkStatus();
}

Task<absl::Status> Checker::Sweep(const std::vector<TableRef>& tables, const EntryVisitor& visit) {
  struct Event {
    uint64_t pos;
    size_t table;
    bool start;
  };
  std::vector<Event> events;
  const uint64_t limit = AlignUp(file_size_, spec::kL2EntrySize);
  for (size_t i = 0; i < tables.size(); ++i) {
    const TableRef& t = tables[i];
    // Callers pass cluster-aligned tables; entries of overlapping tables
    // then line up. Past the end of the file there are only zeros.
    if (t.entries == 0 || t.offset % spec::kL2EntrySize != 0 || t.offset >= limit) continue;
    const uint64_t n = std::min(t.entries, (limit - t.offset) / spec::kL2EntrySize);
    events.push_back({t.offset, i, true});
    events.push_back({t.offset + n * spec::kL2EntrySize, i, false});
  }
  std::sort(events.begin(), events.end(),
            [](const Event& a, const Event& b) { return a.pos < b.pos; });
  std::set<size_t> open;
  uint64_t segment_start = 0;
  for (size_t k = 0; k < events.size();) {
    const uint64_t pos = events[k].pos;
    if (!open.empty() && pos > segment_start) {
      CO_RETURN_IF_ERROR(
          co_await VisitSegment(segment_start, pos, open.size(), tables[*open.begin()], visit));
    }
    for (; k < events.size() && events[k].pos == pos; ++k) {
      if (events[k].start) {
        open.insert(events[k].table);
      } else {
        open.erase(events[k].table);
      }
    }
    segment_start = pos;
  }
  co_return absl::OkStatus();
}

Task<absl::Status> Checker::VisitSegment(uint64_t begin, uint64_t end, uint64_t times,
                                         const TableRef& table, const EntryVisitor& visit) {
  std::vector<uint8_t> buf(std::min(end - begin, kSweepChunkBytes));
  for (uint64_t pos = begin; pos < end;) {
    const uint64_t n = std::min<uint64_t>(end - pos, buf.size());
    CO_RETURN_IF_ERROR(co_await ReadAt(pos, std::span<uint8_t>(buf.data(), n)));
    for (uint64_t i = 0; i < n; i += spec::kL2EntrySize) {
      visit(LoadBE64(buf.data() + i), times, table, (pos + i - table.offset) / spec::kL2EntrySize);
    }
    pos += n;
  }
  co_return absl::OkStatus();
}

// --- Snapshots ---------------------------------------------------------------

Task<absl::Status> Checker::ReadSnapshotTable() {
  const uint64_t count = h_.nb_snapshots;
  if (count == 0) co_return absl::OkStatus();
  if (has_data_file_ && Corruption()) {
    Message(absl::StrFormat("%u internal snapshots in an image with an external data file", count));
  }
  if (count > spec::kMaxSnapshots) {
    if (Corruption()) {
      Message(absl::StrFormat("the header claims %u snapshots, more than the maximum of %u", count,
                              spec::kMaxSnapshots));
    }
    co_return absl::OkStatus();
  }
  const uint64_t offset = h_.snapshots_offset;
  if (offset == 0 || offset % cluster_size_ != 0 || offset >= file_size_) {
    if (Corruption()) {
      Message(
          absl::StrFormat("snapshot table offset %#x is not cluster aligned or not inside the "
                          "file (%u bytes)",
                          offset, file_size_));
    }
    co_return absl::OkStatus();
  }
  const uint64_t available = std::min(file_size_ - offset, ck::kMaxSnapshotTableBytes);
  std::vector<uint8_t> buf(available);
  CO_RETURN_IF_ERROR(co_await ReadAt(offset, buf));

  uint64_t pos = 0;
  for (uint64_t i = 0; i < count; ++i) {
    pos = AlignUp(pos, ck::kSnapshotEntryAlignment);
    if (pos > available || available - pos < ck::kSnapshotHeaderSize) {
      if (Corruption()) {
        Message(
            absl::StrFormat("snapshot table entry %u at %#x runs past the end of the file or "
                            "QEMU's limit of %u bytes for the table",
                            i, offset + pos, ck::kMaxSnapshotTableBytes));
      }
      break;
    }
    const uint8_t* p = buf.data() + pos;
    SnapshotInfo sn;
    sn.l1_table_offset = LoadBE64(p + ck::kSnapOffL1TableOffset);
    sn.l1_size = LoadBE32(p + ck::kSnapOffL1Size);
    const uint32_t id_size = LoadBE16(p + ck::kSnapOffIdStrSize);
    const uint32_t name_size = LoadBE16(p + ck::kSnapOffNameSize);
    const uint32_t extra_size = LoadBE32(p + ck::kSnapOffExtraDataSize);
    if (extra_size > ck::kMaxSnapshotExtraData) {
      if (Corruption()) {
        Message(
            absl::StrFormat("snapshot table entry %u at %#x has %u bytes of extra data, more "
                            "than QEMU's limit of %u",
                            i, offset + pos, extra_size, ck::kMaxSnapshotExtraData));
      }
      break;
    }
    const uint64_t length = uint64_t{ck::kSnapshotHeaderSize} + extra_size + id_size + name_size;
    if (length > available - pos) {
      if (Corruption()) {
        Message(
            absl::StrFormat("snapshot table entry %u at %#x (%u bytes) runs past the end of "
                            "the file",
                            i, offset + pos, length));
      }
      break;
    }
    const uint8_t* id = p + ck::kSnapshotHeaderSize + extra_size;
    sn.id.assign(id, id + id_size);
    sn.name.assign(id + id_size, id + id_size + name_size);
    snapshots_.push_back(std::move(sn));
    pos += length;
  }
  // As QEMU: the table's size ends with the last entry, without padding.
  snapshot_table_bytes_ = pos;
  co_return absl::OkStatus();
}

// --- L1 and L2 tables --------------------------------------------------------

Task<absl::Status> Checker::CountL1Tables() {
  const uint64_t max_l1_entries = spec::kMaxL1Bytes / spec::kL2EntrySize;
  if (h_.l1_size > 0) {
    TableRef t{h_.l1_table_offset, h_.l1_size, "active L1 table"};
    if (t.entries > max_l1_entries) {
      if (Corruption()) {
        Message(absl::StrFormat("active L1 table has %u entries, more than the maximum of %u",
                                t.entries, max_l1_entries));
      }
      t.entries = max_l1_entries;
    }
    if (t.offset % cluster_size_ != 0 && Corruption()) {
      Message(absl::StrFormat("active L1 table offset %#x is not cluster aligned", t.offset));
    }
    AddRef(t.offset, t.entries * spec::kL2EntrySize, 1, [&] { return t.name; });
    l1_tables_.push_back(std::move(t));
    has_active_l1_ = true;  // l1_tables_[0]
  }
  for (const SnapshotInfo& sn : snapshots_) {
    // Names come from the image: escaped, so a hostile one cannot forge lines.
    const std::string name =
        absl::StrFormat("snapshot %s (%s)", absl::CHexEscape(sn.id), absl::CHexEscape(sn.name));
    if (sn.l1_table_offset % cluster_size_ != 0) {
      if (Corruption()) {
        Message(absl::StrFormat("%s: L1 table offset %#x is not cluster aligned", name,
                                sn.l1_table_offset));
      }
      continue;
    }
    if (sn.l1_size > max_l1_entries) {
      if (Corruption()) {
        Message(absl::StrFormat("%s: L1 table of %u entries is larger than the maximum of %u", name,
                                sn.l1_size, max_l1_entries));
      }
      continue;
    }
    if (sn.l1_size == 0) continue;
    TableRef t{sn.l1_table_offset, sn.l1_size, absl::StrFormat("L1 table of %s", name)};
    AddRef(t.offset, t.entries * spec::kL2EntrySize, 1, [&] { return t.name; });
    l1_tables_.push_back(std::move(t));
  }
  co_return co_await Sweep(
      l1_tables_, [this](uint64_t entry, uint64_t times, const TableRef& table, uint64_t index) {
        VisitL1Entry(entry, times, static_cast<size_t>(&table - l1_tables_.data()), table, index);
      });
}

void Checker::VisitL1Entry(uint64_t entry, uint64_t times, size_t table_index,
                           const TableRef& table, uint64_t index) {
  if (entry == 0) return;
  if ((entry & spec::kL1ReservedMask) && Corruption(times)) {
    Message(absl::StrFormat("%s entry %u (%#x): reserved bits %#x are set%s", table.name, index,
                            entry, entry & spec::kL1ReservedMask, Times(times)));
  }
  const uint64_t l2_offset = L1EntryL2Offset(entry);
  if (l2_offset == 0) {
    if (!(entry & spec::kL1ReservedMask) && Corruption(times)) {
      Message(absl::StrFormat("%s entry %u (%#x) has flags but no L2 table offset%s", table.name,
                              index, entry, Times(times)));
    }
    return;
  }
  const auto what = [&] {
    return absl::StrFormat("L2 table at %#x (%s entry %u)", l2_offset, table.name, index);
  };
  if (l2_offset % cluster_size_ != 0) {
    // Counted, as QEMU does, but not read: its entries would be those of
    // some other table shifted, and reading every such offset is how a
    // hostile image makes a checker do unbounded work.
    AddRef(l2_offset, cluster_size_, times, what);
    if (Corruption(times)) {
      Message(
          absl::StrFormat("%s is not cluster aligned; L1 entry corrupted%s", what(), Times(times)));
    }
    return;
  }
  if (l2_offset >= file_size_) {
    AddRef(l2_offset, cluster_size_, times, what);  // reports it
    return;
  }
  L2Use& use = l2_uses_[l2_offset];
  if (use.times == 0) {
    use.table = table_index;
    use.index = index;
  }
  use.times += times;
}

ClusterType Checker::TypeOf(const L2Entry& entry) const {
  // QEMU's qcow2_get_cluster_type(): the type of the whole cluster, which is
  // what refcounts and the COPIED flag are about.
  const uint64_t d = entry.descriptor;
  if (d & spec::kOflagCompressed) return ClusterType::kCompressed;
  const bool has_offset = L2EntryHostOffset(entry) != 0;
  if (!l2_format_.extended_l2 && (d & spec::kOflagZero)) {
    return has_offset ? ClusterType::kZeroAlloc : ClusterType::kZeroPlain;
  }
  if (!has_offset) {
    // Offset 0 is valid in an external data file; its clusters all have
    // refcount 1, so COPIED tells an allocated one apart.
    return has_data_file_ && (d & spec::kOflagCopied) ? ClusterType::kNormal
                                                      : ClusterType::kUnallocated;
  }
  return ClusterType::kNormal;
}

Task<absl::Status> Checker::CountL2Tables() {
  std::vector<uint8_t> buf(cluster_size_);
  const uint32_t entry_size = l2_format_.entry_size();
  for (const auto& item : l2_uses_) {
    const uint64_t l2_offset = item.first;  // not a structured binding: lambdas capture it
    const L2Use& use = item.second;
    const TableRef& from = l1_tables_[use.table];
    AddRef(l2_offset, cluster_size_, use.times, [&] {
      return absl::StrFormat("L2 table at %#x (%s entry %u)", l2_offset, from.name, use.index);
    });
    CO_RETURN_IF_ERROR(co_await ReadAt(l2_offset, buf));
    for (uint64_t j = 0; j < l2_entries_; ++j) {
      CheckL2Entry(l2_offset, use, j, DecodeL2Entry(buf.data() + j * entry_size, l2_format_));
    }
  }
  co_return absl::OkStatus();
}

void Checker::CheckL2Entry(uint64_t l2_offset, const L2Use& use, uint64_t index,
                           const L2Entry& entry) {
  const uint64_t d = entry.descriptor;
  const uint64_t times = use.times;
  const auto where = [&] {
    return absl::StrFormat("L2 table %#x entry %u (%#x)", l2_offset, index, d);
  };
  const ClusterType type = TypeOf(entry);
  if (type != ClusterType::kCompressed) {
    const uint64_t reserved = L2EntryReservedBits(entry, l2_format_);
    if (reserved && Corruption(times)) {
      Message(absl::StrFormat("%s: reserved bits %#x are set%s", where(), reserved, Times(times)));
    }
  }
  switch (type) {
    case ClusterType::kCompressed: {
      if ((d & spec::kOflagCopied) && Corruption(times)) {
        Message(absl::StrFormat("%s: COPIED flag set on a compressed cluster%s", where(),
                                Times(times)));
      }
      if (has_data_file_) {
        if (Corruption(times)) {
          Message(absl::StrFormat("%s: compressed cluster in an image with an external data file%s",
                                  where(), Times(times)));
        }
        return;
      }
      if (l2_format_.extended_l2 && entry.bitmap != 0) {
        if (Corruption(times)) {
          Message(absl::StrFormat("%s: compressed cluster with a non-zero subcluster bitmap %#x%s",
                                  where(), entry.bitmap, Times(times)));
        }
        return;
      }
      const CompressedDescriptor c = DecodeCompressedDescriptor(d, cluster_bits_);
      AddRef(c.host_offset, c.max_size, times,
             [&] { return absl::StrFormat("compressed data of %s", where()); });
      return;
    }
    case ClusterType::kNormal:
    case ClusterType::kZeroAlloc: {
      const uint64_t offset = L2EntryHostOffset(entry);
      if (l2_format_.extended_l2 &&
          ((entry.bitmap >> spec::kSubclusterZeroShift) & entry.bitmap &
           spec::kSubclusterAllocMask) &&
          Corruption(times)) {
        Message(absl::StrFormat("%s: subclusters both allocated and zero in bitmap %#x%s", where(),
                                entry.bitmap, Times(times)));
      }
      if (offset % cluster_size_ != 0 && Corruption(times)) {
        Message(absl::StrFormat("%s: host offset %#x is not cluster aligned%s", where(), offset,
                                Times(times)));
      }
      if (!has_data_file_) {
        AddRef(offset, cluster_size_, times,
               [&] { return absl::StrFormat("data cluster of %s", where()); });
        return;
      }
      // External data file: not refcounted, and the spec wants the host
      // offset to equal the guest offset. The guest offset is known for an
      // L2 table that only the active L1 table uses once.
      const L2Use& u = use;
      if (u.times == 1 && u.table == 0 && has_active_l1_) {
        const uint64_t guest = (u.index * l2_entries_ + index) << cluster_bits_;
        if (offset != guest && Corruption()) {
          Message(
              absl::StrFormat("%s: host offset %#x in the external data file differs from the "
                              "guest offset %#x",
                              where(), offset, guest));
        }
      }
      const bool holds_data =
          type == ClusterType::kNormal &&
          (!l2_format_.extended_l2 || (entry.bitmap & spec::kSubclusterAllocMask) != 0);
      if (holds_data && data_file_ != nullptr && offset >= data_file_->size() && Warning()) {
        Message(
            absl::StrFormat("warning: %s: data at %#x lies past the end of the external data "
                            "file %s (%u bytes) and reads as zeros",
                            where(), offset, data_file_->name(), data_file_->size()));
      }
      return;
    }
    case ClusterType::kZeroPlain:
      return;
    case ClusterType::kUnallocated:
      if (l2_format_.extended_l2 && (entry.bitmap & spec::kSubclusterAllocMask) &&
          Corruption(times)) {
        Message(
            absl::StrFormat("%s: unallocated cluster with allocated subclusters in bitmap "
                            "%#x%s",
                            where(), entry.bitmap, Times(times)));
      }
      return;
  }
}

// --- Bitmaps -----------------------------------------------------------------

Task<absl::Status> Checker::CountBitmaps() {
  if (!h_.bitmaps) co_return absl::OkStatus();
  const BitmapsExtension& ext = *h_.bitmaps;
  const uint64_t dir_offset = ext.bitmap_directory_offset;
  const uint64_t dir_size = ext.bitmap_directory_size;
  AddRef(dir_offset, dir_size, 1, [] { return std::string("bitmap directory"); });
  if (dir_size == 0 || dir_size > ck::kMaxBitmapDirectoryBytes || dir_offset >= file_size_ ||
      dir_size > file_size_ - dir_offset || ext.nb_bitmaps > spec::kMaxBitmaps) {
    if (Corruption()) {
      Message(
          absl::StrFormat("bitmap directory at %#x (%u bytes, %u bitmaps) is not inside the "
                          "file or exceeds QEMU's limits",
                          dir_offset, dir_size, ext.nb_bitmaps));
    }
    co_return absl::OkStatus();
  }
  std::vector<uint8_t> dir(dir_size);
  CO_RETURN_IF_ERROR(co_await ReadAt(dir_offset, dir));

  // As QEMU's bitmap_list_load(): any broken entry makes the whole directory
  // unusable, one corruption, and no bitmap table is counted.
  std::vector<TableRef> tables;
  std::string broken;
  uint64_t pos = 0;
  uint64_t n = 0;
  while (pos < dir_size && broken.empty()) {
    if (dir_size - pos < ck::kBitmapDirEntryHeaderSize) {
      broken = absl::StrFormat("entry %u at %#x is truncated", n, dir_offset + pos);
      break;
    }
    if (++n > ext.nb_bitmaps) {
      broken =
          absl::StrFormat("more entries than the %u the header extension names", ext.nb_bitmaps);
      break;
    }
    const uint8_t* p = dir.data() + pos;
    const uint64_t table_offset = LoadBE64(p + ck::kBmOffTableOffset);
    const uint32_t table_size = LoadBE32(p + ck::kBmOffTableSize);
    const uint32_t flags = LoadBE32(p + ck::kBmOffFlags);
    const uint8_t type = p[ck::kBmOffType];
    const uint8_t granularity_bits = p[ck::kBmOffGranularityBits];
    const uint32_t name_size = LoadBE16(p + ck::kBmOffNameSize);
    const uint32_t extra_size = LoadBE32(p + ck::kBmOffExtraDataSize);
    const uint64_t entry_size =
        AlignUp(uint64_t{ck::kBitmapDirEntryHeaderSize} + extra_size + name_size,
                ck::kBitmapDirEntryAlignment);
    if (entry_size > dir_size - pos) {
      broken = absl::StrFormat("entry %u at %#x (%u bytes) runs past the directory's end", n - 1,
                               dir_offset + pos, entry_size);
      break;
    }
    const uint8_t* name_p = p + ck::kBitmapDirEntryHeaderSize + extra_size;
    const std::string name = absl::CHexEscape(std::string(name_p, name_p + name_size));
    // QEMU's check_dir_entry().
    const uint64_t phys_bytes = uint64_t{table_size} * cluster_size_;
    std::string why;
    if (table_size == 0 || table_offset == 0 || table_offset % cluster_size_ != 0) {
      why = absl::StrFormat("bitmap table at %#x (%u entries) is empty or not cluster aligned",
                            table_offset, table_size);
    } else if (table_size > ck::kMaxBitmapTableEntries || phys_bytes > ck::kMaxBitmapPhysBytes) {
      why = absl::StrFormat("bitmap table of %u entries is too large", table_size);
    } else if (granularity_bits < ck::kMinBitmapGranularityBits ||
               granularity_bits > ck::kMaxBitmapGranularityBits) {
      why = absl::StrFormat("granularity_bits %u is outside %u..%u", granularity_bits,
                            ck::kMinBitmapGranularityBits, ck::kMaxBitmapGranularityBits);
    } else if (flags & ck::kBitmapReservedFlags) {
      why = absl::StrFormat("reserved flags %#x are set", flags & ck::kBitmapReservedFlags);
    } else if (name_size > ck::kMaxBitmapNameSize) {
      why = absl::StrFormat("name of %u bytes is too long", name_size);
    } else if (type != ck::kBitmapTypeDirtyTracking) {
      why = absl::StrFormat("unknown bitmap type %u", type);
    } else if (!(flags & ck::kBitmapFlagInUse) &&
               h_.size > ((phys_bytes * 8) << granularity_bits)) {
      why = absl::StrFormat("bitmap table of %u entries is too small for the disk", table_size);
    }
    if (!why.empty()) {
      broken = absl::StrFormat("bitmap '%s': %s", name, why);
      break;
    }
    tables.push_back({table_offset, table_size, absl::StrFormat("table of bitmap '%s'", name)});
    pos += entry_size;
  }
  if (broken.empty() && n != ext.nb_bitmaps) {
    broken = absl::StrFormat("%u entries, but the header extension names %u", n, ext.nb_bitmaps);
  }
  if (!broken.empty()) {
    if (Corruption()) {
      Message(absl::StrFormat("bitmap directory at %#x is damaged: %s", dir_offset, broken));
    }
    co_return absl::OkStatus();
  }
  for (const TableRef& t : tables) {
    AddRef(t.offset, t.entries * ck::kBitmapTableEntrySize, 1, [&] { return t.name; });
  }
  co_return co_await Sweep(
      tables, [this](uint64_t entry, uint64_t times, const TableRef& table, uint64_t index) {
        VisitBitmapTableEntry(entry, times, table, index);
      });
}

void Checker::VisitBitmapTableEntry(uint64_t entry, uint64_t times, const TableRef& table,
                                    uint64_t index) {
  const uint64_t offset = entry & ck::kBitmapTableOffsetMask;
  std::string why;
  if (entry & ck::kBitmapTableReservedMask) {
    why = absl::StrFormat("reserved bits %#x are set", entry & ck::kBitmapTableReservedMask);
  } else if (offset != 0 && (entry & ck::kBitmapTableAllOnes)) {
    why = "the all-ones flag is set together with an offset";
  } else if (offset % cluster_size_ != 0) {
    why = "the offset is not cluster aligned";
  }
  if (!why.empty()) {
    if (Corruption(times)) {
      Message(
          absl::StrFormat("%s entry %u (%#x): %s%s", table.name, index, entry, why, Times(times)));
    }
    return;
  }
  if (offset == 0) return;
  AddRef(offset, cluster_size_, times,
         [&] { return absl::StrFormat("bitmap data cluster (%s entry %u)", table.name, index); });
}

// --- Refcounts ---------------------------------------------------------------

Task<absl::Status> Checker::LoadRefcountTable() {
  uint64_t bytes = uint64_t{h_.refcount_table_clusters} * cluster_size_;
  if (bytes > spec::kMaxRefcountTableBytes) {
    if (Corruption()) {
      Message(
          absl::StrFormat("refcount table of %u clusters is larger than the maximum of %u bytes",
                          h_.refcount_table_clusters, spec::kMaxRefcountTableBytes));
    }
    bytes = spec::kMaxRefcountTableBytes;
  }
  if (h_.refcount_table_offset % cluster_size_ != 0 && Corruption()) {
    Message(absl::StrFormat("refcount table offset %#x is not cluster aligned",
                            h_.refcount_table_offset));
  }
  // Past the end of the file the table reads as zeros; don't allocate for
  // more than the file holds.
  const uint64_t in_file = h_.refcount_table_offset < file_size_
                               ? std::min(bytes, AlignUp(file_size_ - h_.refcount_table_offset,
                                                         spec::kRefcountTableEntrySize))
                               : 0;
  std::vector<uint8_t> buf(in_file);
  CO_RETURN_IF_ERROR(co_await ReadAt(h_.refcount_table_offset, buf));
  refcount_table_.resize(in_file / spec::kRefcountTableEntrySize);
  for (size_t i = 0; i < refcount_table_.size(); ++i) {
    refcount_table_[i] = LoadBE64(buf.data() + i * spec::kRefcountTableEntrySize);
  }
  co_return absl::OkStatus();
}

void Checker::CountRefcountBlocks() {
  // QEMU's check_refblocks(), after every other reference has been counted.
  const uint64_t max = MaxRefcount(h_.refcount_order);
  for (uint64_t i = 0; i < refcount_table_.size(); ++i) {
    const uint64_t entry = refcount_table_[i];
    const uint64_t offset = entry & spec::kRefcountTableOffsetMask;
    if (entry & ck::kRefcountTableReservedMask) {
      if (Corruption()) {
        Message(absl::StrFormat("refcount table entry %u (%#x): reserved bits %#x are set", i,
                                entry, entry & ck::kRefcountTableReservedMask));
      }
      continue;
    }
    if (offset % cluster_size_ != 0) {
      if (Corruption()) {
        Message(
            absl::StrFormat("refcount table entry %u: refcount block %#x is not cluster "
                            "aligned",
                            i, offset));
      }
      continue;
    }
    const uint64_t cluster = offset >> cluster_bits_;
    if (cluster >= nb_clusters_) {
      if (Corruption()) {
        Message(
            absl::StrFormat("refcount table entry %u: refcount block %#x is past the end of the "
                            "file (%u bytes)",
                            i, offset, file_size_));
      }
      continue;
    }
    if (offset == 0) continue;
    AddToCluster(cluster, 1);
    const uint64_t refs = result_.expected_refcounts[cluster];
    if (std::min(refs, max) != 1 && Corruption()) {
      Message(
          absl::StrFormat("refcount table entry %u: refcount block %#x is referenced %u times "
                          "(it overlaps other metadata or data)",
                          i, offset, refs));
    }
  }
}

Task<absl::Status> Checker::CompareRefcounts() {
  const uint64_t max = MaxRefcount(h_.refcount_order);
  const uint64_t entries = refcount_block_entries_;
  stored_.assign(nb_clusters_, 0);
  std::vector<uint8_t> block(cluster_size_);
  for (uint64_t first = 0; first < nb_clusters_; first += entries) {
    const uint64_t end = std::min(nb_clusters_, first + entries);
    const uint64_t table_index = first / entries;
    enum { kZero, kUnknown, kBlock } state = kZero;
    if (table_index < refcount_table_.size()) {
      const uint64_t offset = refcount_table_[table_index] & spec::kRefcountTableOffsetMask;
      if (offset != 0 && offset % cluster_size_ != 0) {
        state = kUnknown;  // reported by CountRefcountBlocks()
      } else if (offset != 0) {
        CO_RETURN_IF_ERROR(co_await ReadAt(offset, block));
        state = kBlock;
      }
    }
    for (uint64_t c = first; c < end; ++c) {
      const uint64_t refs = result_.expected_refcounts[c];
      if (refs > max && Corruption(refs - max)) {
        Message(
            absl::StrFormat("cluster %u (offset %#x) has %u references, more than %u-bit "
                            "refcounts can count",
                            c, c << cluster_bits_, refs, h_.refcount_bits()));
      } else if (refs == std::numeric_limits<uint32_t>::max() && max >= refs && Corruption()) {
        Message(absl::StrFormat("cluster %u (offset %#x) has %u or more references", c,
                                c << cluster_bits_, refs));
      }
      if (state == kUnknown) {
        stored_[c] = kStoredUnknown;
        continue;
      }
      const uint64_t stored =
          state == kBlock ? GetRefcount(block, c - first, h_.refcount_order) : 0;
      stored_[c] = static_cast<uint8_t>(std::min<uint64_t>(stored, kStoredMany));
      const uint64_t expected = std::min(refs, max);
      if (stored < expected) {
        if (Corruption()) {
          Message(absl::StrFormat("cluster %u (offset %#x): refcount %u is below its %u references",
                                  c, c << cluster_bits_, stored, expected));
        }
      } else if (stored > expected) {
        if (Leak()) {
          Message(absl::StrFormat("leaked cluster %u (offset %#x): refcount %u but %u references",
                                  c, c << cluster_bits_, stored, expected));
        }
      }
    }
  }
  co_return absl::OkStatus();
}

Task<absl::StatusOr<std::optional<uint64_t>>> Checker::StoredPastEof(uint64_t cluster) {
  const uint64_t table_index = cluster / refcount_block_entries_;
  if (table_index >= refcount_table_.size()) co_return std::optional<uint64_t>(0);
  const uint64_t offset = refcount_table_[table_index] & spec::kRefcountTableOffsetMask;
  if (offset == 0 || offset >= file_size_) co_return std::optional<uint64_t>(0);
  if (offset % cluster_size_ != 0) co_return std::optional<uint64_t>();
  if (cached_block_.empty() || cached_block_offset_ != offset) {
    if (++past_eof_block_reads_ > kMaxPastEofBlockReads) co_return std::optional<uint64_t>();
    cached_block_.resize(cluster_size_);
    CO_RETURN_IF_ERROR(co_await ReadAt(offset, cached_block_));
    cached_block_offset_ = offset;
  }
  co_return std::optional<uint64_t>(
      GetRefcount(cached_block_, cluster % refcount_block_entries_, h_.refcount_order));
}

Task<absl::Status> Checker::CheckCopiedFlags() {
  // QEMU's check_oflag_copied(): the active L1 table and the L2 tables it
  // points to, against the stored refcounts.
  if (!has_active_l1_ || h_.l1_table_offset % spec::kL2EntrySize != 0 ||
      h_.l1_table_offset >= file_size_) {
    co_return absl::OkStatus();
  }
  const TableRef& l1 = l1_tables_[0];
  const uint64_t entries = std::min(
      l1.entries, AlignUp(file_size_ - l1.offset, spec::kL2EntrySize) / spec::kL2EntrySize);
  std::vector<uint8_t> l1_bytes(entries * spec::kL2EntrySize);
  CO_RETURN_IF_ERROR(co_await ReadAt(l1.offset, l1_bytes));

  std::map<uint64_t, uint64_t> active_l2;  // offset -> L1 entries pointing to it
  for (uint64_t i = 0; i < entries; ++i) {
    const uint64_t entry = LoadBE64(l1_bytes.data() + i * spec::kL2EntrySize);
    const uint64_t l2_offset = L1EntryL2Offset(entry);
    if (l2_offset == 0) continue;
    const uint64_t cluster = l2_offset >> cluster_bits_;
    std::optional<uint64_t> refcount;
    if (cluster < nb_clusters_) {
      refcount = StoredInFile(cluster);
    } else {
      CO_ASSIGN_OR_RETURN(refcount, co_await StoredPastEof(cluster));
    }
    const bool copied = (entry & spec::kOflagCopied) != 0;
    if (refcount && (*refcount == 1) != copied && Corruption()) {
      Message(
          absl::StrFormat("active L1 table entry %u (%#x): COPIED flag is %s, but the refcount "
                          "of L2 table %#x is %s",
                          i, entry, copied ? "set" : "clear", l2_offset, RefcountString(refcount)));
    }
    if (l2_offset % cluster_size_ == 0 && l2_offset < file_size_) ++active_l2[l2_offset];
  }

  std::vector<uint8_t> buf(cluster_size_);
  const uint32_t entry_size = l2_format_.entry_size();
  for (const auto& [l2_offset, times] : active_l2) {
    CO_RETURN_IF_ERROR(co_await ReadAt(l2_offset, buf));
    for (uint64_t j = 0; j < l2_entries_; ++j) {
      const L2Entry entry = DecodeL2Entry(buf.data() + j * entry_size, l2_format_);
      const ClusterType type = TypeOf(entry);
      if (type != ClusterType::kNormal && type != ClusterType::kZeroAlloc) continue;
      std::optional<uint64_t> refcount;
      if (has_data_file_) {
        refcount = 1;  // data file clusters are not refcounted and count as 1
      } else {
        const uint64_t cluster = L2EntryHostOffset(entry) >> cluster_bits_;
        if (cluster < nb_clusters_) {
          refcount = StoredInFile(cluster);
        } else {
          CO_ASSIGN_OR_RETURN(refcount, co_await StoredPastEof(cluster));
        }
      }
      const bool copied = (entry.descriptor & spec::kOflagCopied) != 0;
      if (refcount && (*refcount == 1) != copied && Corruption(times)) {
        Message(
            absl::StrFormat("L2 table %#x entry %u (%#x): COPIED flag is %s, but the refcount "
                            "of data cluster %#x is %s%s",
                            l2_offset, j, entry.descriptor, copied ? "set" : "clear",
                            L2EntryHostOffset(entry), RefcountString(refcount), Times(times)));
      }
    }
  }
  co_return absl::OkStatus();
}

void Checker::CheckDataFileSize() {
  if (data_file_ == nullptr || !h_.has_data_file_raw()) return;
  if (data_file_->size() < h_.size && Warning()) {
    Message(
        absl::StrFormat("warning: raw external data file %s (%u bytes) is shorter than the "
                        "virtual disk (%u bytes)",
                        data_file_->name(), data_file_->size(), h_.size));
  }
}

Task<absl::StatusOr<CheckResult>> Checker::Run() {
  if (h_.cluster_bits < spec::kMinClusterBits || h_.cluster_bits > spec::kMaxClusterBits) {
    co_return absl::InvalidArgumentError(absl::StrFormat("check: cluster_bits %u is outside %u..%u",
                                                         h_.cluster_bits, spec::kMinClusterBits,
                                                         spec::kMaxClusterBits));
  }
  if (h_.refcount_order > spec::kMaxRefcountOrder) {
    co_return absl::InvalidArgumentError(absl::StrFormat(
        "check: refcount_order %u is larger than %u", h_.refcount_order, spec::kMaxRefcountOrder));
  }
  cluster_bits_ = h_.cluster_bits;
  cluster_size_ = uint64_t{1} << cluster_bits_;
  file_size_ = image_.size();
  nb_clusters_ = (file_size_ >> cluster_bits_) + ((file_size_ & (cluster_size_ - 1)) != 0);
  if (nb_clusters_ > ck::kMaxFileClusters) {
    co_return absl::ResourceExhaustedError(
        absl::StrFormat("check: %s has %u clusters, more than %u", image_.name(), nb_clusters_,
                        ck::kMaxFileClusters));
  }
  has_data_file_ = h_.has_data_file();
  l2_format_.extended_l2 = h_.has_extended_l2();
  l2_format_.external_data_file = has_data_file_;
  l2_format_.cluster_bits = cluster_bits_;
  l2_entries_ = cluster_size_ / l2_format_.entry_size();
  refcount_block_entries_ = RefcountBlockEntries(cluster_bits_, h_.refcount_order);
  result_.cluster_bits = cluster_bits_;
  result_.expected_refcounts.assign(nb_clusters_, 0);

  AddRef(0, cluster_size_, 1, [] { return std::string("header"); });
  CO_RETURN_IF_ERROR(co_await ReadSnapshotTable());
  CO_RETURN_IF_ERROR(co_await CountL1Tables());
  CO_RETURN_IF_ERROR(co_await CountL2Tables());
  AddRef(h_.snapshots_offset, snapshot_table_bytes_, 1,
         [] { return std::string("snapshot table"); });
  AddRef(h_.refcount_table_offset, uint64_t{h_.refcount_table_clusters} * cluster_size_, 1,
         [] { return std::string("refcount table"); });
  if (h_.full_disk_encryption) {
    AddRef(h_.full_disk_encryption->offset, h_.full_disk_encryption->length, 1,
           [] { return std::string("full disk encryption header"); });
  }
  CO_RETURN_IF_ERROR(co_await CountBitmaps());
  ApplyPendingRanges();
  CO_RETURN_IF_ERROR(co_await LoadRefcountTable());
  CountRefcountBlocks();
  CO_RETURN_IF_ERROR(co_await CompareRefcounts());
  CO_RETURN_IF_ERROR(co_await CheckCopiedFlags());
  CheckDataFileSize();

  if (omitted_ > 0) {
    result_.messages.push_back(absl::StrFormat("... and %u more problems not listed", omitted_));
  }
  co_return std::move(result_);
}

}  // namespace

Task<absl::StatusOr<CheckResult>> CheckImage(BlockFile& image, const Header& header,
                                             BlockFile* external_data_file_or_null,
                                             CheckOptions options) {
  Checker checker(image, header, external_data_file_or_null, options);
  co_return co_await checker.Run();
}

}  // namespace qcow2fuse
