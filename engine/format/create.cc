#include "format/create.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "base/endian.h"
#include "format/spec.h"

namespace qcow2fuse {
namespace {

// header_length of a version 3 header with the compression type byte,
// padded to the 8-byte multiple the spec requires.
constexpr uint32_t kHeaderLength = 112;
constexpr uint32_t kRefcountOrder = 4;  // 16-bit refcounts, QEMU's default

uint64_t DivRoundUp(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
uint64_t RoundUp8(uint64_t n) { return (n + spec::kExtAlignment - 1) / spec::kExtAlignment * spec::kExtAlignment; }

}  // namespace

absl::StatusOr<NewImageLayout> LayOutNewImage(const NewImageSpec& spec) {
  if (spec.cluster_bits < spec::kMinClusterBits || spec.cluster_bits > spec::kMaxClusterBits) {
    return absl::InvalidArgumentError(absl::StrFormat("cluster_bits %u is out of range (%u to %u)", spec.cluster_bits,
                                                      spec::kMinClusterBits, spec::kMaxClusterBits));
  }
  if (spec.size == 0 || spec.size % 512 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("a disk size must be a positive multiple of 512 bytes, not %u", spec.size));
  }
  if (spec.backing_file.size() > spec::kMaxBackingFileNameSize) {
    return absl::InvalidArgumentError(absl::StrFormat("the backing file name is %u bytes long; at most %u fit",
                                                      spec.backing_file.size(), spec::kMaxBackingFileNameSize));
  }
  const uint64_t cluster = uint64_t{1} << spec.cluster_bits;

  // "Cluster mapping": one L1 entry per L2 table of cluster / 8 entries.
  const uint64_t l2_covers = cluster * (cluster / spec::kL2EntrySize);
  const uint64_t l1_size = DivRoundUp(spec.size, l2_covers);
  if (l1_size * spec::kL2EntrySize > spec::kMaxL1Bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "a %u-byte disk needs an L1 table of %u entries with %u-byte clusters, more than QEMU allows", spec.size,
        l1_size, cluster));
  }
  const uint64_t l1_clusters = std::max<uint64_t>(1, DivRoundUp(l1_size * spec::kL2EntrySize, cluster));

  // "Host cluster management": enough refcount blocks for every cluster
  // laid out here, and a refcount table for those blocks; each grows the
  // other, so iterate to the fixed point.
  const uint64_t per_block = cluster * 8 / (1u << kRefcountOrder);
  const uint64_t per_table_cluster = cluster / spec::kRefcountTableEntrySize;
  uint64_t blocks = 1, table_clusters = 1;
  for (;;) {
    const uint64_t total = 1 + table_clusters + blocks + l1_clusters;
    const uint64_t need_blocks = DivRoundUp(total, per_block);
    const uint64_t need_table = DivRoundUp(need_blocks, per_table_cluster);
    if (need_blocks == blocks && need_table == table_clusters) break;
    blocks = std::max(blocks, need_blocks);
    table_clusters = std::max(table_clusters, need_table);
  }
  if (table_clusters * cluster > spec::kMaxRefcountTableBytes) {
    return absl::InvalidArgumentError("the refcount table of the new image would exceed QEMU's limit");
  }
  const uint64_t table_offset = cluster;
  const uint64_t blocks_offset = table_offset + table_clusters * cluster;
  const uint64_t l1_offset = blocks_offset + blocks * cluster;
  const uint64_t total_clusters = 1 + table_clusters + blocks + l1_clusters;

  NewImageLayout layout;
  layout.head.assign(l1_offset, 0);
  layout.file_size = total_clusters * cluster;
  uint8_t* h = layout.head.data();

  // "Header extensions" come right after the header; the backing file name
  // after the end-of-extensions marker.
  uint64_t at = kHeaderLength;
  if (!spec.backing_format.empty()) {
    StoreBE32(h + at, spec::kExtBackingFormat);
    StoreBE32(h + at + 4, static_cast<uint32_t>(spec.backing_format.size()));
    std::copy(spec.backing_format.begin(), spec.backing_format.end(), h + at + spec::kExtHeaderSize);
    at += spec::kExtHeaderSize + RoundUp8(spec.backing_format.size());
  }
  at += spec::kExtHeaderSize;  // kExtEnd: type 0, length 0
  if (at + spec.backing_file.size() > cluster) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the backing file name (%u bytes) does not fit in the first cluster of %u bytes", spec.backing_file.size(),
        cluster));
  }
  const uint64_t backing_offset = spec.backing_file.empty() ? 0 : at;
  std::copy(spec.backing_file.begin(), spec.backing_file.end(), h + at);

  // "Header".
  StoreBE32(h + spec::kOffMagic, spec::kMagic);
  StoreBE32(h + spec::kOffVersion, spec::kVersion3);
  StoreBE64(h + spec::kOffBackingFileOffset, backing_offset);
  StoreBE32(h + spec::kOffBackingFileSize, static_cast<uint32_t>(spec.backing_file.size()));
  StoreBE32(h + spec::kOffClusterBits, spec.cluster_bits);
  StoreBE64(h + spec::kOffSize, spec.size);
  StoreBE32(h + spec::kOffCryptMethod, spec::kCryptNone);
  StoreBE32(h + spec::kOffL1Size, static_cast<uint32_t>(l1_size));
  StoreBE64(h + spec::kOffL1TableOffset, l1_offset);
  StoreBE64(h + spec::kOffRefcountTableOffset, table_offset);
  StoreBE32(h + spec::kOffRefcountTableClusters, static_cast<uint32_t>(table_clusters));
  StoreBE32(h + spec::kOffRefcountOrder, kRefcountOrder);
  StoreBE32(h + spec::kOffHeaderLength, kHeaderLength);
  StoreBE8(h + spec::kOffCompressionType, spec::kCompressionDeflate);

  // The refcount table points at the blocks, which count every cluster of
  // this layout once.
  for (uint64_t b = 0; b < blocks; ++b) {
    StoreBE64(h + table_offset + b * spec::kRefcountTableEntrySize, blocks_offset + b * cluster);
  }
  for (uint64_t c = 0; c < total_clusters; ++c) StoreBE16(h + blocks_offset + c * 2, 1);
  return layout;
}

}  // namespace qcow2fuse
