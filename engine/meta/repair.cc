#include "meta/repair.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/endian.h"
#include "format/refcount.h"
#include "format/spec.h"
#include "meta/check.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

uint64_t CeilDiv(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

}  // namespace

Task<absl::Status> RebuildRefcounts(BlockFile& file, Header& header, BlockFile* external_data_file) {
  absl::StatusOr<CheckResult> check = co_await CheckImage(file, header, external_data_file);
  if (!check.ok()) co_return check.status();
  const uint64_t cluster_size = header.cluster_size();
  const uint32_t order = header.refcount_order;
  const uint64_t per_block = RefcountBlockEntries(header.cluster_bits, order);
  const uint64_t per_table_cluster = cluster_size / spec::kRefcountTableEntrySize;

  // What the metadata references, less the old refcount structures, which
  // the new ones replace.
  std::vector<uint64_t> counts(check->expected_refcounts.begin(), check->expected_refcounts.end());
  auto drop = [&](uint64_t offset) {
    const uint64_t cluster = offset / cluster_size;
    if (cluster < counts.size() && counts[cluster] > 0) --counts[cluster];
  };
  std::vector<uint8_t> old_table(uint64_t{header.refcount_table_clusters} * cluster_size);
  CO_RETURN_IF_ERROR(co_await file.Read(header.refcount_table_offset, old_table));
  for (uint64_t i = 0; i < header.refcount_table_clusters; ++i) {
    drop(header.refcount_table_offset + i * cluster_size);
  }
  for (size_t i = 0; i < old_table.size(); i += spec::kRefcountTableEntrySize) {
    const uint64_t block = LoadBE64(old_table.data() + i) & spec::kRefcountTableOffsetMask;
    if (block != 0) drop(block);
  }

  // The new table and blocks go at the end; the blocks describe every
  // cluster up to and including themselves.
  const uint64_t area = CeilDiv(file.size(), cluster_size);
  uint64_t blocks = 0, table_clusters = 0;
  for (;;) {
    const uint64_t need_blocks = CeilDiv(area + table_clusters + blocks, per_block);
    const uint64_t need_table = CeilDiv(need_blocks, per_table_cluster);
    if (need_blocks == blocks && need_table == table_clusters) break;
    blocks = need_blocks;
    table_clusters = need_table;
  }
  if (table_clusters * cluster_size > spec::kMaxRefcountTableBytes) {
    co_return absl::ResourceExhaustedError("the rebuilt refcount table would be too large");
  }
  counts.resize(area + table_clusters + blocks, 0);
  for (uint64_t c = area; c < area + table_clusters + blocks; ++c) counts[c] = 1;

  const uint64_t max = MaxRefcount(order);
  std::vector<uint8_t> table(table_clusters * cluster_size, 0);
  std::vector<uint8_t> block(cluster_size);
  for (uint64_t b = 0; b < blocks; ++b) {
    std::fill(block.begin(), block.end(), 0);
    for (uint64_t i = 0; i < per_block && b * per_block + i < counts.size(); ++i) {
      const uint64_t count = counts[b * per_block + i];
      if (count > max) {
        co_return absl::FailedPreconditionError(absl::StrFormat(
            "cluster %#x has %u references, more than %u-bit refcounts can hold",
            (b * per_block + i) * cluster_size, count, 1u << order));
      }
      SetRefcount(block, i, order, count);
    }
    const uint64_t block_offset = (area + table_clusters + b) * cluster_size;
    CO_RETURN_IF_ERROR(co_await file.Write(block_offset, block));
    StoreBE64(table.data() + b * spec::kRefcountTableEntrySize, block_offset);
  }
  CO_RETURN_IF_ERROR(co_await file.Write(area * cluster_size, table));
  CO_RETURN_IF_ERROR(co_await file.Flush());

  // Switch to the new structures, then declare the image clean.
  uint8_t fields[12];
  StoreBE64(fields, area * cluster_size);
  StoreBE32(fields + 8, static_cast<uint32_t>(table_clusters));
  CO_RETURN_IF_ERROR(co_await file.Write(spec::kOffRefcountTableOffset, fields));
  CO_RETURN_IF_ERROR(co_await file.Flush());
  header.refcount_table_offset = area * cluster_size;
  header.refcount_table_clusters = static_cast<uint32_t>(table_clusters);

  // Anything still wrong is not a refcount problem (a COPIED flag, an
  // entry past the end of the file): leave it to qemu-img check -r.
  absl::StatusOr<CheckResult> after = co_await CheckImage(file, header, external_data_file);
  if (!after.ok()) co_return after.status();
  if (after->corruptions > 0) {
    co_return absl::DataLossError(absl::StrFormat(
        "%s: after rebuilding its refcounts the image still has %u corruptions (%s); repair it "
        "with qemu-img check -r all",
        file.name(), after->corruptions, absl::StrJoin(after->messages, "; ")));
  }
  header.incompatible_features &= ~spec::kIncompatDirty;
  uint8_t features[8];
  StoreBE64(features, header.incompatible_features);
  CO_RETURN_IF_ERROR(co_await file.Write(spec::kOffIncompatibleFeatures, features));
  co_return co_await file.Flush();
}

}  // namespace qcow2fuse
