// Fuzz target: L1/L2 entries and compressed cluster descriptors
// (format/l2_entry.h), standard and extended L2.
//
// Input: flags:u8 (bit 0 extended L2, bit 1 external data file), a byte
// choosing cluster_bits among those the header check lets through
// (9..21, 14..21 with extended L2), then entries of 8 or 16 bytes.
//
// Each entry is decoded and encoded again (the same bytes must come back),
// every subcluster is classified and compared with the spec's rules as
// written out here ("Cluster mapping", "Extended L2 Entries" and
// "Compressed Clusters Descriptor"), and the offsets and sizes derived
// from it must stay inside the fields they come from.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "absl/strings/str_format.h"
#include "format/l2_entry.h"
#include "fuzz_image.h"

namespace qcow2fuse::fuzz {
namespace {

constexpr uint64_t kCopied = uint64_t{1} << 63;
constexpr uint64_t kCompressed = uint64_t{1} << 62;
constexpr uint64_t kZeroFlag = 1;
constexpr uint64_t kOffsetBits9To55 = 0x00fffffffffffe00ull;

// The spec's classification, independent of the engine's.
SubclusterType Expected(const L2Entry& e, uint32_t index, const L2Format& f) {
  if (e.descriptor & kCompressed) return SubclusterType::kCompressed;
  // "The offset may only be 0 with bit 63 set (indicating a host cluster
  // offset of 0) when an external data file is used."
  const bool host = (e.descriptor & kOffsetBits9To55) != 0 ||
                    (f.external_data_file && (e.descriptor & kCopied));
  if (!f.extended_l2) {
    if (e.descriptor & kZeroFlag) return host ? SubclusterType::kZeroAlloc : SubclusterType::kZeroPlain;
    return host ? SubclusterType::kNormal : SubclusterType::kUnallocatedPlain;
  }
  const bool alloc = (e.bitmap >> index) & 1;
  const bool zero = (e.bitmap >> (32 + index)) & 1;
  if (alloc && zero) return SubclusterType::kInvalid;
  if (alloc) return host ? SubclusterType::kNormal : SubclusterType::kInvalid;
  if (zero) return host ? SubclusterType::kZeroAlloc : SubclusterType::kZeroPlain;
  return host ? SubclusterType::kUnallocatedAlloc : SubclusterType::kUnallocatedPlain;
}

void CheckEntry(const uint8_t* p, const L2Format& f) {
  const L2Entry e = DecodeL2Entry(p, f);
  uint8_t again[16] = {};
  EncodeL2Entry(e, again, f);
  FUZZ_CHECK(std::memcmp(p, again, f.entry_size()) == 0, "encode(decode(entry)) differs");
  FUZZ_CHECK(f.extended_l2 || e.bitmap == 0, "a standard entry with a bitmap");

  const uint32_t n = f.subclusters_per_cluster();
  FUZZ_CHECK(n == (f.extended_l2 ? 32u : 1u), absl::StrFormat("%u subclusters", n));
  FUZZ_CHECK(f.subcluster_bits() + (f.extended_l2 ? 5 : 0) == f.cluster_bits, "subcluster_bits");
  for (uint32_t i = 0; i < n; ++i) {
    const SubclusterType got = GetSubclusterType(e, i, f);
    const SubclusterType want = Expected(e, i, f);
    FUZZ_CHECK(got == want, absl::StrFormat("entry %#016x:%#016x subcluster %u: %s, spec says %s",
                                            e.descriptor, e.bitmap, i, SubclusterTypeName(got),
                                            SubclusterTypeName(want)));
  }

  const uint64_t host = L2EntryHostOffset(e);
  FUZZ_CHECK((host & ~kOffsetBits9To55) == 0, absl::StrFormat("host offset %#x", host));
  const uint64_t reserved = L2EntryReservedBits(e, f);
  FUZZ_CHECK((reserved & ~e.descriptor) == 0, "reserved bits not in the entry");
  if (e.descriptor & kCompressed) {
    FUZZ_CHECK(reserved == 0, "reserved bits reported for a compressed entry");
  } else {
    // Bits 1-8 and 56-61 always; bit 0 too with extended L2 (zeros are in the bitmap).
    const uint64_t mask = 0x3f000000000001feull | (f.extended_l2 ? kZeroFlag : 0);
    FUZZ_CHECK(reserved == (e.descriptor & mask), absl::StrFormat("reserved bits %#x", reserved));
  }

  // Compressed descriptor: x = 62 - (cluster_bits - 8) offset bits, then
  // the count of additional 512-byte sectors up to bit 61.
  const uint32_t x = 62 - (f.cluster_bits - 8);
  const CompressedDescriptor d = DecodeCompressedDescriptor(e.descriptor, f.cluster_bits);
  FUZZ_CHECK(d.host_offset == (e.descriptor & ((uint64_t{1} << x) - 1)), "compressed host offset");
  const uint64_t sectors = ((e.descriptor & ~(kCopied | kCompressed)) >> x) + 1;
  FUZZ_CHECK(d.max_size == sectors * 512 - (d.host_offset % 512),
             absl::StrFormat("compressed size %u for %u sectors at %#x", d.max_size, sectors, d.host_offset));
  FUZZ_CHECK(d.max_size >= 1, "empty compressed cluster");

  // The same bytes as an L1 entry.
  const uint64_t l2 = L1EntryL2Offset(e.descriptor);
  FUZZ_CHECK(l2 == (e.descriptor & kOffsetBits9To55), absl::StrFormat("L2 offset %#x", l2));
}

}  // namespace
}  // namespace qcow2fuse::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qcow2fuse;
  fuzz::Reader r(std::span<const uint8_t>(data, size));
  const uint64_t flags = r.Take(1);
  const uint64_t bits = r.Take(1);
  L2Format f;
  f.extended_l2 = flags & 1;
  f.external_data_file = flags & 2;
  f.cluster_bits = f.extended_l2 ? 14 + bits % 8 : 9 + bits % 13;
  std::span<const uint8_t> entries = r.rest();
  for (size_t at = 0; at + f.entry_size() <= entries.size(); at += f.entry_size()) {
    fuzz::CheckEntry(entries.data() + at, f);
  }
  return 0;
}
