#include "meta/repair.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/endian.h"
#include "format/refcount.h"
#include "format/spec.h"
#include "meta/check.h"
#include "meta/header_writer.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

uint64_t CeilDiv(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

class Rebuilder {
 public:
  Rebuilder(BlockFile& file, Header& header, BlockFile* data_file, MemoryBudget* budget,
            uint64_t window_clusters)
      : window_clusters_(window_clusters),
        file_(file),
        h_(header),
        data_file_(data_file),
        budget_(budget),
        cluster_size_(header.cluster_size()),
        per_block_(RefcountBlockEntries(header.cluster_bits, header.refcount_order)) {}

  Task<absl::Status> Run();

 private:
  std::string Name(std::string_view what) const {
    return absl::StrFormat("%s of %s (refcount rebuild)", what, file_.name());
  }
  Task<absl::Status> ReadOldTable();
  // The new refcount of every cluster of [first, first + window): the
  // references, less those of the old refcount structures (replaced).
  Task<absl::Status> Count(uint64_t first);
  // Finds the refcount blocks that count something in the current window.
  absl::Status NoteBlocks();
  absl::Status PlaceNewStructures();
  // Writes the new refcount blocks whose index lies below `end_index`,
  // from the counts of the current window (if any).
  Task<absl::Status> WriteBlocks(uint64_t end_index);
  Task<absl::Status> SwitchAndVerify();

  const uint64_t window_clusters_;
  BlockFile& file_;
  Header& h_;
  BlockFile* const data_file_;
  MemoryBudget* const budget_;
  const uint64_t cluster_size_;
  const uint64_t per_block_;

  uint64_t nb_clusters_ = 0;
  uint64_t window_ = 0;  // clusters per pass, whole refcount blocks
  // The old refcount table (clusters) and blocks (cluster indices, sorted).
  uint64_t old_table_first_ = 0;
  uint64_t old_table_end_ = 0;
  std::vector<uint64_t> old_blocks_;
  BudgetCharge old_charge_;

  // The counts of the current window.
  std::optional<ReferenceCounts> counts_;
  BudgetCharge counts_charge_;
  uint64_t end_referenced_ = 0;

  // Indices of the refcount blocks the new structure has, sorted; block k
  // is written at cluster new_first_ + table_clusters_ + k.
  std::vector<uint64_t> blocks_;
  BudgetCharge blocks_charge_;
  uint64_t new_first_ = 0;  // the new refcount table's first cluster
  uint64_t table_clusters_ = 0;
  uint64_t new_end_ = 0;  // one past the new structures
  std::vector<uint8_t> table_;
  BudgetCharge table_charge_;
  size_t next_block_ = 0;  // the next of blocks_ to write
};

Task<absl::Status> Rebuilder::ReadOldTable() {
  // The header check bounded the table to the file and to the spec's limit.
  const uint64_t bytes = uint64_t{h_.refcount_table_clusters} * cluster_size_;
  BudgetCharge read_charge;
  CO_RETURN_IF_ERROR(read_charge.Take(budget_, bytes, Name("the old refcount table")));
  std::vector<uint8_t> old_table(bytes);
  CO_RETURN_IF_ERROR(co_await file_.Read(h_.refcount_table_offset, old_table));
  old_table_first_ = h_.refcount_table_offset / cluster_size_;
  old_table_end_ = old_table_first_ + h_.refcount_table_clusters;
  // The blocks the check counts as references (meta/check.cc): an entry
  // with reserved bits or an unaligned offset names no block, and must not
  // take a reference away from whatever its offset points into.
  auto block_of = [&](size_t i) -> uint64_t {
    const uint64_t entry = LoadBE64(old_table.data() + i);
    const uint64_t offset = entry & spec::kRefcountTableOffsetMask;
    if (offset != entry || offset % cluster_size_ != 0) return 0;
    return offset;
  };
  size_t used = 0;
  for (size_t i = 0; i < old_table.size(); i += spec::kRefcountTableEntrySize) used += block_of(i) != 0;
  CO_RETURN_IF_ERROR(
      old_charge_.Take(budget_, used * sizeof(uint64_t), Name("the old refcount blocks")));
  old_blocks_.reserve(used);
  for (size_t i = 0; i < old_table.size(); i += spec::kRefcountTableEntrySize) {
    if (const uint64_t block = block_of(i); block != 0) old_blocks_.push_back(block / cluster_size_);
  }
  std::sort(old_blocks_.begin(), old_blocks_.end());
  co_return absl::OkStatus();
}

Task<absl::Status> Rebuilder::Count(uint64_t first) {
  if (counts_ && counts_->first_cluster == first) co_return absl::OkStatus();  // one window: kept
  counts_.reset();
  counts_charge_.Reset();
  absl::StatusOr<ReferenceCounts> counted =
      co_await CountReferences(file_, h_, first, first + window_, budget_);
  if (!counted.ok()) co_return counted.status();
  counts_ = *std::move(counted);
  // The vector outlives the pass that charged it.
  counts_charge_.TakeExisting(budget_, counts_->counts.size() * sizeof(uint32_t));
  std::vector<uint32_t>& c = counts_->counts;
  const uint64_t end = first + c.size();
  auto drop = [&](uint64_t cluster) {
    if (cluster >= first && cluster < end && c[cluster - first] > 0) --c[cluster - first];
  };
  for (uint64_t t = std::max(old_table_first_, first); t < std::min(old_table_end_, end); ++t) drop(t);
  // Each old block once per table entry naming it, as the check counted it.
  for (auto it = std::lower_bound(old_blocks_.begin(), old_blocks_.end(), first);
       it != old_blocks_.end() && *it < end; ++it) {
    drop(*it);
  }
  const uint64_t max = MaxRefcount(h_.refcount_order);
  for (uint64_t i = 0; i < c.size(); ++i) {
    if (c[i] > max) {
      co_return absl::FailedPreconditionError(absl::StrFormat(
          "%s: cluster %#x has %u references, more than %u-bit refcounts can hold", file_.name(),
          (first + i) * cluster_size_, c[i], h_.refcount_bits()));
    }
  }
  co_return absl::OkStatus();
}

absl::Status Rebuilder::NoteBlocks() {
  const std::vector<uint32_t>& c = counts_->counts;
  const uint64_t first = counts_->first_cluster;
  for (uint64_t i = 0; i < c.size(); i += per_block_) {
    const uint64_t n = std::min<uint64_t>(per_block_, c.size() - i);
    if (std::all_of(c.begin() + i, c.begin() + i + n, [](uint32_t v) { return v == 0; })) continue;
    // A table that can name this block is within the spec's limit.
    const uint64_t index = (first + i) / per_block_;
    if ((index + 1) * spec::kRefcountTableEntrySize > spec::kMaxRefcountTableBytes) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s: cluster %#x is referenced, but a refcount table that reaches it would be larger "
          "than %s",
          file_.name(), (first + i) * cluster_size_, FormatSize(spec::kMaxRefcountTableBytes)));
    }
    RETURN_IF_ERROR(blocks_charge_.Take(budget_, sizeof(uint64_t), Name("the list of refcount blocks")));
    blocks_.push_back(index);
  }
  return absl::OkStatus();
}

absl::Status Rebuilder::PlaceNewStructures() {
  // Nothing at or past end_referenced_ is referenced, not even by the old
  // refcount structures: the new ones can go there without touching
  // anything the header still leads to.
  new_first_ = std::max<uint64_t>(end_referenced_, 1);
  // The table, then every block (those that count something, and those
  // for the new structures themselves), each size depending on the other.
  uint64_t table_clusters = 0, total_blocks = blocks_.size();
  for (;;) {
    const uint64_t end = new_first_ + table_clusters + total_blocks;
    uint64_t needed = blocks_.size(), last_index = blocks_.empty() ? 0 : blocks_.back();
    if (end > new_first_) {
      // The lowest may be one that counts something already.
      const uint64_t lo = new_first_ / per_block_, hi = (end - 1) / per_block_;
      needed += hi - lo + 1 - (!blocks_.empty() && blocks_.back() == lo);
      last_index = std::max(last_index, hi);
    }
    const uint64_t table_bytes = (last_index + 1) * spec::kRefcountTableEntrySize;
    if (table_bytes > spec::kMaxRefcountTableBytes) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s: the rebuilt refcount table would be larger than %s", file_.name(),
          FormatSize(spec::kMaxRefcountTableBytes)));
    }
    const uint64_t need_table = CeilDiv(table_bytes, cluster_size_);
    if (need_table == table_clusters && needed == total_blocks) break;
    table_clusters = need_table;
    total_blocks = needed;
  }
  table_clusters_ = table_clusters;
  new_end_ = new_first_ + table_clusters + total_blocks;
  const uint64_t lo = new_first_ / per_block_, hi = (new_end_ - 1) / per_block_;
  RETURN_IF_ERROR(blocks_charge_.Take(budget_, (hi - lo + 1) * sizeof(uint64_t),
                                      Name("the list of refcount blocks")));
  for (uint64_t index = lo; index <= hi; ++index) {
    if (blocks_.empty() || blocks_.back() < index) blocks_.push_back(index);
  }
  if (blocks_.size() != total_blocks) {
    return absl::InternalError(absl::StrFormat("%s: refcount rebuild: %u blocks laid out, %u listed",
                                               file_.name(), total_blocks, blocks_.size()));
  }
  return absl::OkStatus();
}

Task<absl::Status> Rebuilder::WriteBlocks(uint64_t end_index) {
  BudgetCharge block_charge;
  CO_RETURN_IF_ERROR(block_charge.Take(budget_, cluster_size_, Name("a refcount block")));
  std::vector<uint8_t> block(cluster_size_);
  for (; next_block_ < blocks_.size() && blocks_[next_block_] < end_index; ++next_block_) {
    const uint64_t index = blocks_[next_block_];
    std::fill(block.begin(), block.end(), 0);
    for (uint64_t i = 0; i < per_block_; ++i) {
      const uint64_t cluster = index * per_block_ + i;
      uint64_t count = 0;
      if (counts_ && cluster >= counts_->first_cluster &&
          cluster - counts_->first_cluster < counts_->counts.size()) {
        count = counts_->counts[cluster - counts_->first_cluster];
      }
      if (cluster >= new_first_ && cluster < new_end_) count = 1;
      if (count != 0) SetRefcount(block, i, h_.refcount_order, count);
    }
    const uint64_t offset = (new_first_ + table_clusters_ + next_block_) * cluster_size_;
    CO_RETURN_IF_ERROR(co_await file_.Write(offset, block));
    StoreBE64(table_.data() + index * spec::kRefcountTableEntrySize, offset);
  }
  co_return absl::OkStatus();
}

Task<absl::Status> Rebuilder::SwitchAndVerify() {
  CO_RETURN_IF_ERROR(co_await file_.Write(new_first_ * cluster_size_, table_));
  CO_RETURN_IF_ERROR(co_await file_.Flush());

  // Switch to the new structures, then declare the image clean. A switch
  // that fails leaves the old fields: the image stays dirty, and the next
  // open rebuilds again.
  HeaderWriter header(&file_);
  uint8_t fields[12];
  StoreBE64(fields, new_first_ * cluster_size_);
  StoreBE32(fields + 8, static_cast<uint32_t>(table_clusters_));
  uint8_t old_fields[12];
  StoreBE64(old_fields, h_.refcount_table_offset);
  StoreBE32(old_fields + 8, h_.refcount_table_clusters);
  CO_RETURN_IF_ERROR(co_await header.Switch(spec::kOffRefcountTableOffset, fields, old_fields));
  h_.refcount_table_offset = new_first_ * cluster_size_;
  h_.refcount_table_clusters = static_cast<uint32_t>(table_clusters_);

  // What the rebuild held is no longer needed by the check.
  table_ = {};
  table_charge_.Reset();
  counts_.reset();
  counts_charge_.Reset();
  blocks_ = {};
  blocks_charge_.Reset();
  old_blocks_ = {};
  old_charge_.Reset();

  // Anything still wrong is not a refcount problem (a COPIED flag, an
  // entry past the end of the file): leave it to qemu-img check -r.
  CheckOptions options;
  options.budget = budget_;
  absl::StatusOr<CheckResult> after = co_await CheckImage(file_, h_, data_file_, options);
  if (!after.ok()) co_return after.status();
  if (after->corruptions > 0) {
    co_return absl::DataLossError(absl::StrFormat(
        "%s: after rebuilding its refcounts the image still has %u corruptions (%s); repair it "
        "with qemu-img check -r all",
        file_.name(), after->corruptions, absl::StrJoin(after->messages, "; ")));
  }
  uint8_t features[8];
  StoreBE64(features, h_.incompatible_features & ~spec::kIncompatDirty);
  uint8_t old_features[8];
  StoreBE64(old_features, h_.incompatible_features);
  CO_RETURN_IF_ERROR(co_await header.Switch(spec::kOffIncompatibleFeatures, features, old_features));
  h_.incompatible_features &= ~spec::kIncompatDirty;
  co_return absl::OkStatus();
}

Task<absl::Status> Rebuilder::Run() {
  CO_RETURN_IF_ERROR(co_await ReadOldTable());
  // Half of what is left for the counts; the rest for what a pass of the
  // check reads (tables, the list of L2 tables).
  window_ = std::max(per_block_, budget_->available() / 2 / kCountBytesPerCluster / per_block_ * per_block_);
  if (window_clusters_ > 0) window_ = CeilDiv(window_clusters_, per_block_) * per_block_;

  // 1. Which refcount blocks count something, and where the references end.
  uint64_t limit = std::numeric_limits<uint64_t>::max();
  for (uint64_t first = 0; first < limit; first += window_) {
    CO_RETURN_IF_ERROR(co_await Count(first));
    if (first == 0) {
      nb_clusters_ = counts_->nb_clusters;
      end_referenced_ = counts_->end_referenced;
      limit = end_referenced_;
    }
    CO_RETURN_IF_ERROR(NoteBlocks());
  }

  // 2. The new table and blocks, after the last referenced cluster.
  CO_RETURN_IF_ERROR(PlaceNewStructures());
  CO_RETURN_IF_ERROR(
      table_charge_.Take(budget_, table_clusters_ * cluster_size_, Name("the new refcount table")));
  table_.assign(table_clusters_ * cluster_size_, 0);

  // 3. The blocks, counting again window by window (unless one held all).
  for (uint64_t first = 0; first < end_referenced_; first += window_) {
    CO_RETURN_IF_ERROR(co_await Count(first));
    CO_RETURN_IF_ERROR(co_await WriteBlocks((first + window_) / per_block_));
  }
  counts_.reset();
  counts_charge_.Reset();
  CO_RETURN_IF_ERROR(co_await WriteBlocks(std::numeric_limits<uint64_t>::max()));
  co_return co_await SwitchAndVerify();
}

}  // namespace

Task<absl::Status> RebuildRefcounts(BlockFile& file, Header& header, BlockFile* external_data_file,
                                    MemoryBudget* budget, uint64_t window_clusters) {
  std::optional<MemoryBudget> own;
  if (budget == nullptr) budget = &own.emplace(ImageOptions{}.max_metadata_memory);
  Rebuilder rebuilder(file, header, external_data_file, budget, window_clusters);
  co_return co_await rebuilder.Run();
}

}  // namespace qcow2fuse
