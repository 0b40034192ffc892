// Fuzz target: opening an image read-only, walking its block status over
// the whole disk and reading it (data/qcow2_layer.h).
//
// Input: a packed image (fuzz_image.h). The tail gives extra reads, each
// offset:u64 length:u24 split:u24, at any alignment.
//
// The layer is opened with no backing file and, when the header asks for
// an external data file, over the data file packed in the input: names
// recorded in an image are never opened (a hostile one could name any file
// of the host). So every unallocated or zero run must read as zeros, and
// that is checked. A read must also give the same bytes and the same
// success as the same range read in two pieces, and the st_blocks count of
// a walk that met no damage must be the sum of its data runs.
//
// Work is bounded whatever the image claims: at most kMaxSteps block
// status calls, kReadBudget bytes read.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/strings/str_format.h"
#include "base/all_zero.h"
#include "fuzz_image.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse::fuzz {
namespace {

constexpr uint64_t kMaxSteps = 4096;
constexpr uint64_t kReadBudget = uint64_t{2} << 20;
constexpr uint64_t kMaxRead = uint64_t{1} << 20;
constexpr int kMaxTailReads = 8;

const char* KindName(ExtentKind kind) {
  switch (kind) {
    case ExtentKind::kData: return "data";
    case ExtentKind::kZero: return "zero";
    case ExtentKind::kUnallocated: return "unallocated";
  }
  return "?";
}

void Run(std::span<const uint8_t> input) {
  PackedImage packed = Unpack(input);
  absl::StatusOr<std::unique_ptr<Qcow2Layer>> opened = OpenLayer(packed.image, packed.data_file, false);
  FUZZ_LOG("open: %s", opened.status().ToString());
  if (!opened.ok()) return;
  Qcow2Layer& layer = **opened;
  CountIfSmall(layer);
  (void)layer.Describe();
  const uint64_t size = layer.size();
  const uint64_t cluster = layer.cluster_size();

  uint64_t budget = kReadBudget;
  uint64_t offset = 0;
  uint64_t data_bytes = 0;
  bool damaged = false;
  uint64_t steps = 0;
  std::vector<uint8_t> buf;
  for (; offset < size && steps < kMaxSteps; ++steps) {
    absl::StatusOr<Extent> extent = SyncWait(layer.BlockStatus(offset, size - offset));
    if (!extent.ok()) {
      damaged = true;
      offset = (offset / cluster + 1) * cluster;
      continue;
    }
    FUZZ_CHECK(extent->length >= 1 && extent->length <= size - offset,
               absl::StrFormat("block status at %#x: length %u, disk %u", offset, extent->length, size));
    if (extent->kind == ExtentKind::kData) data_bytes += extent->length;
    const uint64_t n = std::min({extent->length, budget, kMaxRead});
    if (n > 0) {
      budget -= n;
      buf.resize(n);
      absl::Status read = SyncWait(layer.Read(offset, buf));
      if (!read.ok()) damaged = true;
      FUZZ_CHECK(!read.ok() || extent->kind == ExtentKind::kData || IsAllZero(buf),
                 absl::StrFormat("a %s run at %#x (%u bytes) reads non-zero bytes with no backing file",
                                 KindName(extent->kind), offset, extent->length));
    }
    offset += extent->length;
  }
  FUZZ_LOG("walk: %u steps to %#x of %#x, %u data bytes, %s", steps, offset, size, data_bytes,
           damaged ? "damage met" : "no damage");
  if (offset >= size && !damaged) {
    if (std::optional<uint64_t> counted = layer.DataBytes()) {
      FUZZ_CHECK(*counted == data_bytes,
                 absl::StrFormat("st_blocks count %u, block status walk %u", *counted, data_bytes));
    }
  }

  if (size == 0) return;
  Reader tail(packed.tail);
  for (int i = 0; i < kMaxTailReads && !tail.empty(); ++i) {
    const uint64_t at = tail.Take(8) % size;
    const uint64_t length = std::min({tail.Take(3) + 1, size - at, kMaxRead});
    const uint64_t split = tail.Take(3) % length;
    if (length * 2 > budget) break;
    budget -= length * 2;
    std::vector<uint8_t> whole(length), parts(length);
    const absl::Status a = SyncWait(layer.Read(at, whole));
    const absl::Status b = SyncWait(layer.Read(at, std::span(parts).first(split)));
    const absl::Status c = SyncWait(layer.Read(at + split, std::span(parts).subspan(split)));
    FUZZ_CHECK(a.ok() == (b.ok() && c.ok()),
               absl::StrFormat("read at %#x of %u bytes: %s; split at %u: %s / %s", at, length,
                               a.ToString(), split, b.ToString(), c.ToString()));
    FUZZ_CHECK(!a.ok() || whole == parts,
               absl::StrFormat("read at %#x of %u bytes differs from the same read split at %u", at,
                               length, split));
    SyncWait(layer.WillNeed(at, length, length));
  }
}

}  // namespace
}  // namespace qcow2fuse::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qcow2fuse::fuzz::Run(std::span<const uint8_t>(data, size));
  return 0;
}
