// Fuzz target: the header and its extensions (format/header.h).
//
// Input: file_size:u64 (big-endian), then the first bytes of the image
// file. The bytes are zero-extended to the first cluster (or the file, if
// shorter), so DecodeHeader sees what it would see in a real file of that
// size whose tail reads as zeros.
//
// Beyond "no crash, no undefined behaviour, no unbounded allocation", a
// header DecodeHeader accepts must keep its promises, which the rest of the
// engine relies on without checking again: the geometry within the spec's
// and QEMU's limits, the L1 table, refcount table, bitmap directory and
// backing file name inside the file, and no unknown incompatible feature.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/strings/str_format.h"
#include "base/endian.h"
#include "format/header.h"
#include "format/spec.h"
#include "fuzz_image.h"

namespace qcow2fuse::fuzz {
namespace {

bool InFile(uint64_t offset, uint64_t length, uint64_t file_size) {
  return offset <= file_size && length <= file_size - offset;
}

void CheckAccepted(const Header& h, uint64_t file_size) {
  FUZZ_CHECK(h.version == 2 || h.version == 3, absl::StrFormat("version %u", h.version));
  FUZZ_CHECK(h.cluster_bits >= 9 && h.cluster_bits <= 21, absl::StrFormat("cluster_bits %u", h.cluster_bits));
  FUZZ_CHECK(h.refcount_order <= 6, absl::StrFormat("refcount_order %u", h.refcount_order));
  FUZZ_CHECK(h.version == 3 || h.refcount_order == 4, "v2 images have 16-bit refcounts");
  FUZZ_CHECK(!h.has_extended_l2() || h.cluster_bits >= 14, "extended L2 needs 16 KiB clusters");
  FUZZ_CHECK((h.incompatible_features & ~uint64_t{0x1f}) == 0,
             absl::StrFormat("unknown incompatible features %#x accepted", h.incompatible_features));
  FUZZ_CHECK(h.crypt_method <= 2, absl::StrFormat("crypt_method %u", h.crypt_method));
  FUZZ_CHECK(h.compression_type <= 1, absl::StrFormat("compression_type %u", h.compression_type));
  FUZZ_CHECK(((h.incompatible_features >> 3) & 1) == (h.compression_type != 0),
             "compression type and its feature bit disagree");
  FUZZ_CHECK(!h.has_data_file_raw() || h.has_data_file(), "raw data bit without a data file");
  FUZZ_CHECK(h.version == 2 || (h.header_length >= 104 && h.header_length <= h.cluster_size()),
             absl::StrFormat("header_length %u", h.header_length));

  // L1: within QEMU's 32 MiB, large enough for the disk, inside the file.
  const uint64_t l1_bytes = uint64_t{h.l1_size} * 8;
  FUZZ_CHECK(l1_bytes <= (uint64_t{32} << 20), absl::StrFormat("l1_size %u", h.l1_size));
  const uint64_t per_l1_entry = h.cluster_size() * h.l2_entries();
  FUZZ_CHECK(h.size / per_l1_entry + (h.size % per_l1_entry != 0) <= h.l1_size,
             absl::StrFormat("l1_size %u too small for size %u", h.l1_size, h.size));
  if (h.l1_size > 0) {
    FUZZ_CHECK(h.l1_table_offset != 0 && h.l1_table_offset % h.cluster_size() == 0,
               absl::StrFormat("l1_table_offset %#x", h.l1_table_offset));
    FUZZ_CHECK(InFile(h.l1_table_offset, l1_bytes, file_size), "L1 table past the end of the file");
  }

  // Refcount table: within 8 MiB, aligned, inside the file.
  const uint64_t rt_bytes = uint64_t{h.refcount_table_clusters} * h.cluster_size();
  FUZZ_CHECK(rt_bytes <= (uint64_t{8} << 20), absl::StrFormat("refcount table of %u bytes", rt_bytes));
  FUZZ_CHECK(h.refcount_table_offset % h.cluster_size() == 0, "refcount table unaligned");
  FUZZ_CHECK(InFile(h.refcount_table_offset, rt_bytes, file_size), "refcount table past the end");

  FUZZ_CHECK(h.nb_snapshots <= 65536, absl::StrFormat("%u snapshots", h.nb_snapshots));
  if (h.nb_snapshots > 0) {
    FUZZ_CHECK(h.snapshots_offset % h.cluster_size() == 0 && h.snapshots_offset < file_size,
               absl::StrFormat("snapshots_offset %#x", h.snapshots_offset));
  }
  if (h.bitmaps) {
    FUZZ_CHECK(h.autoclear_features & 1, "bitmaps extension trusted without the autoclear bit");
    FUZZ_CHECK(h.bitmaps->nb_bitmaps >= 1 && h.bitmaps->nb_bitmaps <= 65535, "nb_bitmaps");
    FUZZ_CHECK(InFile(h.bitmaps->bitmap_directory_offset, h.bitmaps->bitmap_directory_size, file_size),
               "bitmap directory past the end");
  }
  FUZZ_CHECK(h.backing_file.size() <= 1023, absl::StrFormat("backing file name of %u bytes", h.backing_file.size()));
  FUZZ_CHECK(h.backing_file.empty() == (h.backing_file_offset == 0),
             "backing file name and offset disagree");

  // Everything the engine derives from the header must be computable.
  FUZZ_CHECK(h.l2_entries() >= 32, absl::StrFormat("%u L2 entries per table", h.l2_entries()));
  (void)h.refcount_bits();
  for (int bit = 0; bit < 64; ++bit) (void)h.DescribeFeature(spec::kFeatureTypeIncompatible, bit);
}

}  // namespace
}  // namespace qcow2fuse::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qcow2fuse;
  fuzz::Reader r(std::span<const uint8_t>(data, size));
  const uint64_t file_size = r.Take(8);
  std::span<const uint8_t> head = r.rest();
  // What DecodeHeader asks for: the first cluster, or the whole file if it
  // is shorter (the chain opener reads kHeaderReadSize, the largest
  // cluster; reading less keeps the fuzzer fast).
  uint32_t cluster_bits = 21;
  if (head.size() >= 24) cluster_bits = std::clamp<uint32_t>(LoadBE32(head.data() + 20), 9, 21);
  const uint64_t want = std::max<uint64_t>(head.size(), uint64_t{1} << cluster_bits);
  std::vector<uint8_t> bytes(std::min({kHeaderReadSize, file_size, want}));
  std::copy_n(head.begin(), std::min<size_t>(head.size(), bytes.size()), bytes.begin());
  absl::StatusOr<Header> header = DecodeHeader(bytes, file_size);
  if (header.ok()) {
    fuzz::CheckAccepted(*header, file_size);
  } else {
    FUZZ_CHECK(!header.status().message().empty(), "an error without a message");
  }
  return 0;
}
