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
#include "format/snapshot.h"
#include "format/spec.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// QEMU refuses to check files of more than INT_MAX clusters.
constexpr uint64_t kMaxFileClusters = (uint64_t{1} << 31) - 1;

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

enum class ClusterType { kUnallocated, kZeroPlain, kZeroAlloc, kNormal, kCompressed };

// Bytes charged per entry of the structures that grow with the metadata
// (vector elements, with room for their growth).
constexpr uint64_t kL2UseBytes = 2 * 32;
constexpr uint64_t kPendingRangeBytes = 2 * 24 + 2 * 16;  // the range and its two sweep events

// One pass of the check over a window of host clusters (see check.h).
struct Pass {
  enum Mode {
    kFull,       // walk the metadata, compare, check COPIED flags
    kCountOnly,  // walk the metadata and count references, nothing else
    kTail,       // no walk: nothing references the window; stored refcounts are leaks
  };
  Mode mode = kFull;
  uint64_t first = 0;  // a multiple of the refcount block entries
  uint64_t end = std::numeric_limits<uint64_t>::max();
  bool global = true;  // count the problems that do not depend on the window
};

class Checker {
 public:
  Checker(BlockFile& image, const Header& header, BlockFile* data_file, CheckOptions options,
          Pass pass = {})
      : image_(image), h_(header), data_file_(data_file), options_(options), pass_(pass) {}

  // Checks the header fields the geometry depends on.
  static absl::Status CheckGeometry(const Header& h);

  Task<absl::StatusOr<CheckResult>> Run();
  uint64_t omitted() const { return omitted_; }
  uint64_t end_referenced() const { return end_referenced_; }
  uint64_t nb_clusters() const { return nb_clusters_; }

 private:
  using EntryVisitor =
      std::function<void(uint64_t entry, uint64_t times, const TableRef& table, uint64_t index)>;

  // --- Reporting ----------------------------------------------------------
  // Adds `times` to `counter`; true if there is room for a message. A
  // problem that does not depend on the window counts in the global pass
  // only.
  bool Count(uint64_t& counter, uint64_t times, bool in_window) {
    if (!in_window && !pass_.global) return false;
    counter += times;
    if (result_.messages.size() < options_.max_messages) return true;
    ++omitted_;
    return false;
  }
  bool Corruption(uint64_t times = 1) { return Count(result_.corruptions, times, false); }
  bool Warning(uint64_t times = 1) { return Count(result_.warnings, times, false); }
  // Problems of one cluster of the window.
  bool WindowCorruption(uint64_t times = 1) { return Count(result_.corruptions, times, true); }
  bool WindowLeak(uint64_t times = 1) { return Count(result_.leaks, times, true); }

  // Charges `bytes` of the pass's structures to the budget, for the pass.
  absl::Status Charge(uint64_t bytes, std::string_view what) {
    return charge_.Take(options_.budget, bytes, what);
  }
  std::string OfImage(std::string_view what) const {
    return absl::StrFormat("%s of %s (consistency check)", what, image_.name());
  }
  bool InWindow(uint64_t cluster) const { return cluster >= win_first_ && cluster < win_end_; }
  void Message(std::string line) { result_.messages.push_back(std::move(line)); }

  // --- References ---------------------------------------------------------
  // Counts `times` references to every cluster that [offset, offset+length)
  // touches. `what` names the range for a message.
  template <typename What>
  void AddRef(uint64_t offset, uint64_t length, uint64_t times, const What& what);
  void AddToCluster(uint64_t cluster, uint64_t times) {
    end_referenced_ = std::max(end_referenced_, cluster + 1);
    if (InWindow(cluster)) AddInWindow(cluster, times);
  }
  void AddInWindow(uint64_t cluster, uint64_t times) {
    uint32_t& ref = result_.expected_refcounts[cluster - win_first_];
    const uint64_t sum = uint64_t{ref} + times;
    ref = sum > std::numeric_limits<uint32_t>::max() ? std::numeric_limits<uint32_t>::max()
                                                     : static_cast<uint32_t>(sum);
  }
  uint64_t Expected(uint64_t cluster) const { return result_.expected_refcounts[cluster - win_first_]; }
  absl::Status ApplyPendingRanges();

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
  Task<absl::Status> CompareTail();
  Task<absl::Status> CheckCopiedFlags();
  // The stored refcount of a cluster of the window.
  std::optional<uint64_t> StoredInFile(uint64_t cluster) const {
    const uint8_t s = stored_[cluster - win_first_];
    if (s == kStoredUnknown) return std::nullopt;
    return s;
  }
  Task<absl::StatusOr<std::optional<uint64_t>>> StoredPastEof(uint64_t cluster);
  // Each stored refcount is checked in the pass whose window holds it;
  // those past the end of the file in the global pass. `here`: this pass
  // checks `cluster`; `refcount`: then its stored refcount, if known.
  struct StoredHere {
    bool here = false;
    std::optional<uint64_t> refcount;
  };
  Task<absl::StatusOr<StoredHere>> StoredInThisPass(uint64_t cluster);
  void CheckDataFileSize();

  BlockFile& image_;
  const Header& h_;
  BlockFile* const data_file_;
  const CheckOptions options_;
  const Pass pass_;
  BudgetCharge charge_;  // what this pass holds until it ends

  uint64_t file_size_ = 0;
  uint32_t cluster_bits_ = 0;
  uint64_t cluster_size_ = 0;
  uint64_t nb_clusters_ = 0;
  uint64_t l2_entries_ = 0;
  L2Format l2_format_;
  bool has_data_file_ = false;

  CheckResult result_;
  uint64_t omitted_ = 0;
  uint64_t win_first_ = 0;  // the window: expected_refcounts[0] is cluster win_first_
  uint64_t win_end_ = 0;
  uint64_t end_referenced_ = 0;

  std::vector<SnapshotEntry> snapshots_;
  uint64_t snapshot_table_bytes_ = 0;
  std::vector<TableRef> l1_tables_;  // the active one first, if it has entries
  bool has_active_l1_ = false;
  // Aligned L2 tables inside the file, in the order the sweep met them;
  // sorted by offset and merged (the first reference kept) before use.
  std::vector<std::pair<uint64_t, L2Use>> l2_uses_;
  absl::Status l2_uses_status_;  // a failed charge for l2_uses_
  struct PendingRange {
    uint64_t first;  // cluster index
    uint64_t end;
    uint64_t times;
  };
  std::vector<PendingRange> pending_;
  absl::Status pending_status_;  // a failed charge for pending_

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
  end_referenced_ = std::max(end_referenced_, end);
  if (end - first > kDirectRefClusters) {
    // Charged as they come: their number grows with the snapshots and
    // bitmaps the image claims. A failed charge ends the pass (Run()).
    if (pending_status_.ok()) {
      pending_status_ = Charge(kPendingRangeBytes, OfImage("the list of large references"));
    }
    if (pending_status_.ok()) pending_.push_back({first, end, times});
    return;
  }
  for (uint64_t c = std::max(first, win_first_); c < std::min(end, win_end_); ++c) AddInWindow(c, times);
}

absl::Status Checker::ApplyPendingRanges() {
  RETURN_IF_ERROR(pending_status_);
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
      for (uint64_t c = std::max(pos, win_first_); c < std::min(next, win_end_); ++c) {
        AddInWindow(c, static_cast<uint64_t>(running));
      }
    }
  }
  return absl::OkStatus();
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
  BudgetCharge charge;
  CO_RETURN_IF_ERROR(charge.Take(options_.budget, tables.size() * (2 * sizeof(Event) + 64),
                                 OfImage("the list of tables")));
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
  const uint64_t available = std::min(file_size_ - offset, spec::kMaxSnapshotTableBytes);
  BudgetCharge buf_charge;
  CO_RETURN_IF_ERROR(buf_charge.Take(options_.budget, available, OfImage("the snapshot table")));
  std::vector<uint8_t> buf(available);
  CO_RETURN_IF_ERROR(co_await ReadAt(offset, buf));

  // The entries before the first bad one are checked; that one is
  // reported, as QEMU stops reading the table there.
  SnapshotTable table = DecodeSnapshotEntries(buf, static_cast<uint32_t>(count));
  if (!table.error.ok() && Corruption()) {
    Message(absl::StrFormat("the snapshot table at %#x (%u bytes readable, QEMU's limit %u): %s", offset,
                            available, spec::kMaxSnapshotTableBytes, table.error.message()));
  }
  for (SnapshotEntry& sn : table.entries) {
    CO_RETURN_IF_ERROR(Charge(2 * sizeof(SnapshotEntry) + sn.id.size() + sn.name.size() + 2,
                              OfImage("the list of snapshots")));
    snapshots_.push_back(std::move(sn));
  }
  const uint64_t pos = table.bytes;
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
  for (const SnapshotEntry& sn : snapshots_) {
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
    CO_RETURN_IF_ERROR(Charge(2 * sizeof(TableRef) + t.name.size() + 1, OfImage("the list of L1 tables")));
    AddRef(t.offset, t.entries * spec::kL2EntrySize, 1, [&] { return t.name; });
    l1_tables_.push_back(std::move(t));
  }
  CO_RETURN_IF_ERROR(co_await Sweep(
      l1_tables_, [this](uint64_t entry, uint64_t times, const TableRef& table, uint64_t index) {
        VisitL1Entry(entry, times, static_cast<size_t>(&table - l1_tables_.data()), table, index);
      }));
  CO_RETURN_IF_ERROR(l2_uses_status_);
  // In offset order, one element per table; a stable sort keeps the first
  // reference the sweep met first.
  std::stable_sort(l2_uses_.begin(), l2_uses_.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  size_t out = 0;
  for (size_t i = 0; i < l2_uses_.size(); ++i) {
    if (out > 0 && l2_uses_[out - 1].first == l2_uses_[i].first) {
      l2_uses_[out - 1].second.times += l2_uses_[i].second.times;
    } else {
      l2_uses_[out++] = l2_uses_[i];
    }
  }
  l2_uses_.resize(out);
  co_return absl::OkStatus();
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
  if (!l2_uses_status_.ok()) return;
  l2_uses_status_ = Charge(kL2UseBytes, OfImage("the list of L2 tables"));
  if (l2_uses_status_.ok()) l2_uses_.push_back({l2_offset, L2Use{times, table_index, index}});
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
  BudgetCharge buf_charge;
  CO_RETURN_IF_ERROR(buf_charge.Take(options_.budget, cluster_size_, OfImage("an L2 table")));
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
  if (dir_size == 0 || dir_size > spec::kMaxBitmapDirectoryBytes || dir_offset >= file_size_ ||
      dir_size > file_size_ - dir_offset || ext.nb_bitmaps > spec::kMaxBitmaps) {
    if (Corruption()) {
      Message(
          absl::StrFormat("bitmap directory at %#x (%u bytes, %u bitmaps) is not inside the "
                          "file or exceeds QEMU's limits",
                          dir_offset, dir_size, ext.nb_bitmaps));
    }
    co_return absl::OkStatus();
  }
  BudgetCharge dir_charge;
  CO_RETURN_IF_ERROR(dir_charge.Take(options_.budget, dir_size, OfImage("the bitmap directory")));
  std::vector<uint8_t> dir(dir_size);
  CO_RETURN_IF_ERROR(co_await ReadAt(dir_offset, dir));

  // As QEMU's bitmap_list_load(): any broken entry makes the whole directory
  // unusable, one corruption, and no bitmap table is counted.
  std::vector<TableRef> tables;
  std::string broken;
  uint64_t pos = 0;
  uint64_t n = 0;
  while (pos < dir_size && broken.empty()) {
    if (dir_size - pos < spec::kBitmapDirEntryFixedSize) {
      broken = absl::StrFormat("entry %u at %#x is truncated", n, dir_offset + pos);
      break;
    }
    if (++n > ext.nb_bitmaps) {
      broken =
          absl::StrFormat("more entries than the %u the header extension names", ext.nb_bitmaps);
      break;
    }
    const uint8_t* p = dir.data() + pos;
    const uint64_t table_offset = LoadBE64(p + spec::kBitmapDirOffTableOffset);
    const uint32_t table_size = LoadBE32(p + spec::kBitmapDirOffTableSize);
    const uint32_t flags = LoadBE32(p + spec::kBitmapDirOffFlags);
    const uint8_t type = p[spec::kBitmapDirOffType];
    const uint8_t granularity_bits = p[spec::kBitmapDirOffGranularityBits];
    const uint32_t name_size = LoadBE16(p + spec::kBitmapDirOffNameSize);
    const uint32_t extra_size = LoadBE32(p + spec::kBitmapDirOffExtraDataSize);
    const uint64_t entry_size =
        AlignUp(uint64_t{spec::kBitmapDirEntryFixedSize} + extra_size + name_size,
                spec::kBitmapDirEntryAlignment);
    if (entry_size > dir_size - pos) {
      broken = absl::StrFormat("entry %u at %#x (%u bytes) runs past the directory's end", n - 1,
                               dir_offset + pos, entry_size);
      break;
    }
    const uint8_t* name_p = p + spec::kBitmapDirEntryFixedSize + extra_size;
    const std::string name = absl::CHexEscape(std::string(name_p, name_p + name_size));
    // QEMU's check_dir_entry().
    const uint64_t phys_bytes = uint64_t{table_size} * cluster_size_;
    std::string why;
    if (table_size == 0 || table_offset == 0 || table_offset % cluster_size_ != 0) {
      why = absl::StrFormat("bitmap table at %#x (%u entries) is empty or not cluster aligned",
                            table_offset, table_size);
    } else if (table_size > spec::kMaxBitmapTableEntries || phys_bytes > spec::kMaxBitmapPhysBytes) {
      why = absl::StrFormat("bitmap table of %u entries is too large", table_size);
    } else if (granularity_bits < spec::kMinBitmapGranularityBits ||
               granularity_bits > spec::kMaxBitmapGranularityBits) {
      why = absl::StrFormat("granularity_bits %u is outside %u..%u", granularity_bits,
                            spec::kMinBitmapGranularityBits, spec::kMaxBitmapGranularityBits);
    } else if (flags & spec::kBitmapReservedFlags) {
      why = absl::StrFormat("reserved flags %#x are set", flags & spec::kBitmapReservedFlags);
    } else if (name_size > spec::kMaxBitmapNameSize) {
      why = absl::StrFormat("name of %u bytes is too long", name_size);
    } else if (type != spec::kBitmapTypeDirtyTracking) {
      why = absl::StrFormat("unknown bitmap type %u", type);
    } else if (!(flags & spec::kBitmapFlagInUse) &&
               h_.size > ((phys_bytes * 8) << granularity_bits)) {
      why = absl::StrFormat("bitmap table of %u entries is too small for the disk", table_size);
    }
    if (!why.empty()) {
      broken = absl::StrFormat("bitmap '%s': %s", name, why);
      break;
    }
    CO_RETURN_IF_ERROR(Charge(2 * sizeof(TableRef) + name.size() + 20, OfImage("the list of bitmaps")));
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
    AddRef(t.offset, t.entries * spec::kBitmapTableEntrySize, 1, [&] { return t.name; });
  }
  co_return co_await Sweep(
      tables, [this](uint64_t entry, uint64_t times, const TableRef& table, uint64_t index) {
        VisitBitmapTableEntry(entry, times, table, index);
      });
}

void Checker::VisitBitmapTableEntry(uint64_t entry, uint64_t times, const TableRef& table,
                                    uint64_t index) {
  const uint64_t offset = entry & spec::kBitmapTableOffsetMask;
  std::string why;
  if (entry & spec::kBitmapTableReservedMask) {
    why = absl::StrFormat("reserved bits %#x are set", entry & spec::kBitmapTableReservedMask);
  } else if (offset != 0 && (entry & spec::kBitmapTableAllOnes)) {
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
  CO_RETURN_IF_ERROR(Charge(in_file, OfImage("the refcount table")));
  BudgetCharge buf_charge;
  CO_RETURN_IF_ERROR(buf_charge.Take(options_.budget, in_file, OfImage("the refcount table")));
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
    if (entry & spec::kRefcountTableReservedMask) {
      if (Corruption()) {
        Message(absl::StrFormat("refcount table entry %u (%#x): reserved bits %#x are set", i,
                                entry, entry & spec::kRefcountTableReservedMask));
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
    if (!InWindow(cluster)) continue;
    const uint64_t refs = Expected(cluster);
    if (std::min(refs, max) != 1 && WindowCorruption()) {
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
  CO_RETURN_IF_ERROR(Charge(win_end_ - win_first_, OfImage("the stored refcounts")));
  stored_.assign(win_end_ - win_first_, 0);
  BudgetCharge block_charge;
  CO_RETURN_IF_ERROR(block_charge.Take(options_.budget, cluster_size_, OfImage("a refcount block")));
  std::vector<uint8_t> block(cluster_size_);
  for (uint64_t first = win_first_; first < win_end_; first += entries) {
    const uint64_t end = std::min(win_end_, first + entries);
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
      const uint64_t refs = Expected(c);
      if (refs > max && WindowCorruption(refs - max)) {
        Message(
            absl::StrFormat("cluster %u (offset %#x) has %u references, more than %u-bit "
                            "refcounts can count",
                            c, c << cluster_bits_, refs, h_.refcount_bits()));
      } else if (refs == std::numeric_limits<uint32_t>::max() && max >= refs && WindowCorruption()) {
        Message(absl::StrFormat("cluster %u (offset %#x) has %u or more references", c,
                                c << cluster_bits_, refs));
      }
      if (state == kUnknown) {
        stored_[c - win_first_] = kStoredUnknown;
        continue;
      }
      const uint64_t stored =
          state == kBlock ? GetRefcount(block, c - first, h_.refcount_order) : 0;
      stored_[c - win_first_] = static_cast<uint8_t>(std::min<uint64_t>(stored, kStoredMany));
      const uint64_t expected = std::min(refs, max);
      if (stored < expected) {
        if (WindowCorruption()) {
          Message(absl::StrFormat("cluster %u (offset %#x): refcount %u is below its %u references",
                                  c, c << cluster_bits_, stored, expected));
        }
      } else if (stored > expected) {
        if (WindowLeak()) {
          Message(absl::StrFormat("leaked cluster %u (offset %#x): refcount %u but %u references",
                                  c, c << cluster_bits_, stored, expected));
        }
      }
    }
  }
  co_return absl::OkStatus();
}

Task<absl::StatusOr<Checker::StoredHere>> Checker::StoredInThisPass(uint64_t cluster) {
  if (cluster < nb_clusters_) {
    if (!InWindow(cluster)) co_return StoredHere{};
    co_return StoredHere{true, StoredInFile(cluster)};
  }
  if (!pass_.global) co_return StoredHere{};
  CO_ASSIGN_OR_RETURN(const std::optional<uint64_t> refcount, co_await StoredPastEof(cluster));
  co_return StoredHere{true, refcount};
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
  std::vector<uint64_t> active_l2;  // one element per L1 entry pointing to it
  BudgetCharge active_l2_charge;
  {
    BudgetCharge l1_charge;
    CO_RETURN_IF_ERROR(l1_charge.Take(options_.budget, entries * spec::kL2EntrySize,
                                      OfImage("the active L1 table")));
    std::vector<uint8_t> l1_bytes(entries * spec::kL2EntrySize);
    CO_RETURN_IF_ERROR(co_await ReadAt(l1.offset, l1_bytes));
    const auto readable = [&](uint64_t l2_offset) {
      return l2_offset != 0 && l2_offset % cluster_size_ == 0 && l2_offset < file_size_;
    };
    uint64_t tables = 0;
    for (uint64_t i = 0; i < entries; ++i) {
      tables += readable(L1EntryL2Offset(LoadBE64(l1_bytes.data() + i * spec::kL2EntrySize)));
    }
    CO_RETURN_IF_ERROR(active_l2_charge.Take(options_.budget, tables * sizeof(uint64_t),
                                             OfImage("the list of active L2 tables")));
    active_l2.reserve(tables);
    for (uint64_t i = 0; i < entries; ++i) {
      const uint64_t entry = LoadBE64(l1_bytes.data() + i * spec::kL2EntrySize);
      const uint64_t l2_offset = L1EntryL2Offset(entry);
      if (l2_offset == 0) continue;
      CO_ASSIGN_OR_RETURN(const StoredHere stored, co_await StoredInThisPass(l2_offset >> cluster_bits_));
      const bool here = stored.here;
      const std::optional<uint64_t> refcount = stored.refcount;
      const bool copied = (entry & spec::kOflagCopied) != 0;
      if (here && refcount && (*refcount == 1) != copied && WindowCorruption()) {
        Message(absl::StrFormat(
            "active L1 table entry %u (%#x): COPIED flag is %s, but the refcount of L2 table %#x "
            "is %s",
            i, entry, copied ? "set" : "clear", l2_offset, RefcountString(refcount)));
      }
      if (readable(l2_offset)) active_l2.push_back(l2_offset);
    }
  }
  std::sort(active_l2.begin(), active_l2.end());

  BudgetCharge buf_charge;
  CO_RETURN_IF_ERROR(buf_charge.Take(options_.budget, cluster_size_, OfImage("an L2 table")));
  std::vector<uint8_t> buf(cluster_size_);
  const uint32_t entry_size = l2_format_.entry_size();
  for (size_t k = 0; k < active_l2.size();) {
    const uint64_t l2_offset = active_l2[k];
    uint64_t times = 0;
    for (; k < active_l2.size() && active_l2[k] == l2_offset; ++k) ++times;
    CO_RETURN_IF_ERROR(co_await ReadAt(l2_offset, buf));
    for (uint64_t j = 0; j < l2_entries_; ++j) {
      const L2Entry entry = DecodeL2Entry(buf.data() + j * entry_size, l2_format_);
      const ClusterType type = TypeOf(entry);
      if (type != ClusterType::kNormal && type != ClusterType::kZeroAlloc) continue;
      std::optional<uint64_t> refcount;
      bool here = true;
      if (has_data_file_) {
        here = pass_.global;
        refcount = 1;  // data file clusters are not refcounted and count as 1
      } else {
        CO_ASSIGN_OR_RETURN(const StoredHere stored,
                            co_await StoredInThisPass(L2EntryHostOffset(entry) >> cluster_bits_));
        here = stored.here;
        refcount = stored.refcount;
      }
      const bool copied = (entry.descriptor & spec::kOflagCopied) != 0;
      if (here && refcount && (*refcount == 1) != copied && WindowCorruption(times)) {
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

absl::Status Checker::CheckGeometry(const Header& h) {
  if (h.cluster_bits < spec::kMinClusterBits || h.cluster_bits > spec::kMaxClusterBits) {
    return absl::InvalidArgumentError(absl::StrFormat("check: cluster_bits %u is outside %u..%u",
                                                      h.cluster_bits, spec::kMinClusterBits,
                                                      spec::kMaxClusterBits));
  }
  if (h.refcount_order > spec::kMaxRefcountOrder) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "check: refcount_order %u is larger than %u", h.refcount_order, spec::kMaxRefcountOrder));
  }
  return absl::OkStatus();
}

Task<absl::Status> Checker::CompareTail() {
  // Every reference lies below the window, so every cluster in it should
  // have refcount 0: read only the refcount blocks that describe it.
  const uint64_t entries = refcount_block_entries_;
  BudgetCharge block_charge;
  CO_RETURN_IF_ERROR(block_charge.Take(options_.budget, cluster_size_, OfImage("a refcount block")));
  std::vector<uint8_t> block(cluster_size_);
  const uint64_t last_index = std::min<uint64_t>(refcount_table_.size(), (win_end_ - 1) / entries + 1);
  for (uint64_t index = win_first_ / entries; index < last_index; ++index) {
    const uint64_t offset = refcount_table_[index] & spec::kRefcountTableOffsetMask;
    // As CompareRefcounts(): an unaligned block is unknown (and reported
    // by CountRefcountBlocks()); past the end of the file it reads as zeros.
    if (offset == 0 || offset % cluster_size_ != 0 || offset >= file_size_) continue;
    CO_RETURN_IF_ERROR(co_await ReadAt(offset, block));
    const uint64_t first = std::max(win_first_, index * entries);
    const uint64_t end = std::min(win_end_, (index + 1) * entries);
    for (uint64_t c = first; c < end; ++c) {
      const uint64_t stored = GetRefcount(block, c - index * entries, h_.refcount_order);
      if (stored > 0 && WindowLeak()) {
        Message(absl::StrFormat("leaked cluster %u (offset %#x): refcount %u but 0 references", c,
                                c << cluster_bits_, stored));
      }
    }
  }
  co_return absl::OkStatus();
}

Task<absl::StatusOr<CheckResult>> Checker::Run() {
  CO_RETURN_IF_ERROR(CheckGeometry(h_));
  cluster_bits_ = h_.cluster_bits;
  cluster_size_ = uint64_t{1} << cluster_bits_;
  file_size_ = image_.size();
  nb_clusters_ = (file_size_ >> cluster_bits_) + ((file_size_ & (cluster_size_ - 1)) != 0);
  if (nb_clusters_ > kMaxFileClusters) {
    co_return absl::ResourceExhaustedError(
        absl::StrFormat("check: %s has %u clusters, more than %u", image_.name(), nb_clusters_,
                        kMaxFileClusters));
  }
  has_data_file_ = h_.has_data_file();
  l2_format_.extended_l2 = h_.has_extended_l2();
  l2_format_.external_data_file = has_data_file_;
  l2_format_.cluster_bits = cluster_bits_;
  l2_entries_ = cluster_size_ / l2_format_.entry_size();
  refcount_block_entries_ = RefcountBlockEntries(cluster_bits_, h_.refcount_order);
  result_.cluster_bits = cluster_bits_;
  win_first_ = std::min(pass_.first, nb_clusters_);
  win_end_ = std::max(win_first_, std::min(pass_.end, nb_clusters_));

  if (pass_.mode == Pass::kTail) {
    CO_RETURN_IF_ERROR(co_await LoadRefcountTable());
    CO_RETURN_IF_ERROR(co_await CompareTail());
    co_return std::move(result_);
  }
  CO_RETURN_IF_ERROR(Charge((win_end_ - win_first_) * sizeof(uint32_t), OfImage("the reference counts")));
  result_.expected_refcounts.assign(win_end_ - win_first_, 0);

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
  CO_RETURN_IF_ERROR(ApplyPendingRanges());
  CO_RETURN_IF_ERROR(co_await LoadRefcountTable());
  CountRefcountBlocks();
  if (pass_.mode == Pass::kFull) {
    CO_RETURN_IF_ERROR(co_await CompareRefcounts());
    CO_RETURN_IF_ERROR(co_await CheckCopiedFlags());
    CheckDataFileSize();
  }
  co_return std::move(result_);
}

// Adds the problems of one pass to the total.
void Merge(CheckResult& total, uint64_t& omitted, CheckResult pass, uint64_t pass_omitted,
           size_t max_messages) {
  total.corruptions += pass.corruptions;
  total.leaks += pass.leaks;
  total.warnings += pass.warnings;
  for (std::string& m : pass.messages) {
    if (total.messages.size() < max_messages) {
      total.messages.push_back(std::move(m));
    } else {
      ++omitted;
    }
  }
  omitted += pass_omitted;
}

}  // namespace

Task<absl::StatusOr<CheckResult>> CheckImage(BlockFile& image, const Header& header,
                                             BlockFile* external_data_file_or_null,
                                             CheckOptions options) {
  CO_RETURN_IF_ERROR(Checker::CheckGeometry(header));
  const uint64_t cluster_size = header.cluster_size();
  const uint64_t nb_clusters = image.size() / cluster_size + (image.size() % cluster_size != 0);
  const uint64_t per_block = RefcountBlockEntries(header.cluster_bits, header.refcount_order);
  // Clusters per pass: whole refcount blocks, so that each block is
  // compared in one pass.
  uint64_t window = nb_clusters;
  if (options.window_clusters > 0) {
    window = AlignUp(options.window_clusters, per_block);
  } else if (options.budget != nullptr) {
    const uint64_t fits = options.budget->available() / 2 / kCheckBytesPerCluster;
    window = std::max(per_block, fits / per_block * per_block);
  }
  if (window >= nb_clusters) {
    Checker checker(image, header, external_data_file_or_null, options);
    absl::StatusOr<CheckResult> result = co_await checker.Run();
    if (result.ok() && checker.omitted() > 0) {
      result->messages.push_back(
          absl::StrFormat("... and %u more problems not listed", checker.omitted()));
    }
    co_return result;
  }

  CheckResult total;
  total.cluster_bits = header.cluster_bits;
  uint64_t omitted = 0;
  uint64_t end_referenced = nb_clusters;  // known after the first pass
  uint64_t first = 0;
  for (; first < std::min(end_referenced, nb_clusters); first += window) {
    Pass pass{Pass::kFull, first, first + window, /*global=*/first == 0};
    Checker checker(image, header, external_data_file_or_null, options, pass);
    absl::StatusOr<CheckResult> result = co_await checker.Run();
    if (!result.ok()) co_return result.status();
    if (first == 0) end_referenced = checker.end_referenced();
    Merge(total, omitted, *std::move(result), checker.omitted(), options.max_messages);
  }
  if (first < nb_clusters) {
    Pass pass{Pass::kTail, first, nb_clusters, /*global=*/false};
    Checker checker(image, header, external_data_file_or_null, options, pass);
    absl::StatusOr<CheckResult> result = co_await checker.Run();
    if (!result.ok()) co_return result.status();
    Merge(total, omitted, *std::move(result), checker.omitted(), options.max_messages);
  }
  if (omitted > 0) {
    total.messages.push_back(absl::StrFormat("... and %u more problems not listed", omitted));
  }
  co_return total;
}

Task<absl::StatusOr<ReferenceCounts>> CountReferences(BlockFile& image, const Header& header,
                                                      uint64_t first_cluster, uint64_t end_cluster,
                                                      MemoryBudget* budget) {
  CheckOptions options;
  options.max_messages = 0;  // only the counts are wanted
  options.budget = budget;
  Pass pass{Pass::kCountOnly, first_cluster, end_cluster, /*global=*/false};
  Checker checker(image, header, nullptr, options, pass);
  absl::StatusOr<CheckResult> result = co_await checker.Run();
  if (!result.ok()) co_return result.status();
  ReferenceCounts counts;
  counts.first_cluster = std::min(first_cluster, checker.nb_clusters());
  counts.counts = std::move(result->expected_refcounts);
  counts.nb_clusters = checker.nb_clusters();
  counts.end_referenced = checker.end_referenced();
  co_return counts;
}

}  // namespace qcow2fuse
