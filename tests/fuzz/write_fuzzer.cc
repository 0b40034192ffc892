// Fuzz target: the write path (data/qcow2_write.cc, data/qcow2_zero.cc).
// An image is opened read-write, a sequence of requests is applied, the
// image is flushed, closed and opened again, and the engine's own checker
// (meta/check.h) judges the file.
//
// Input: a packed image (fuzz_image.h) whose tail is the sequence, at most
// kMaxOps requests of 10 bytes each:
//
//   op := kind:u8 offset:u32 length:u32 fill:u8     (big-endian)
//
//   kind & 7:  0 write, 1 write-zeroes, 2 write-zeroes with unmap,
//              3 discard, 4 preallocate, 5 truncate, 6 flush,
//              7 read the range and compare it with the model
//   kind & 8:  offset and length count 512-byte sectors, not bytes
//   truncate:  to offset * 512 bytes; with kind & 0x10 grow by length
//              instead, with kind & 0x20 shrink by length (both rounded
//              to whole sectors); never past kMaxResizeL1Entries L1 entries
//
// Offsets are taken modulo the disk size and lengths cut at its end, as
// the public Image checks them; writes carry at most kMaxWrite bytes and
// the other requests cover at most kMaxRange. A write's bytes are `fill`
// mixed with the sector and the request's index, so no two requests write
// the same bytes; fill 0 writes zeros.
//
// What must hold, for any input: no crash, no undefined behaviour, no
// allocation the input size does not justify, errors only as statuses;
// the image still opens, with its header extensions and backing file name
// as they were (the engine writes only fixed header fields in the first
// cluster). And when the image checked clean (no corruption) right after
// the open (which repairs a dirty image):
//   - the disk size follows every resize that succeeded, and the count
//     behind st_blocks every change;
//   - the file stays an image that opens again and checks without
//     corruption, whatever failed on the way (every state on disk is
//     consistent, see the flush protocol in data/qcow2_layer.h);
//   - if the last flush succeeded, every byte reads back as the requests
//     left it (GuestModel), a failed request leaving only its own range
//     unknown, and the image opens read-write again;
//   - if nothing failed, the requests leaked no cluster.
//   - the reads during the sequence (kind 7) see the same.
// The checks run only while the file has at most kMaxCheckedClusters
// clusters: the checker's memory is per host cluster, and a clean image
// cannot get far past its end from requests this size. Comparing reads
// at most a few MiB (ModelComparer), whatever the disk's size.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "fuzz_image.h"
#include "guest_model.h"
#include "meta/check.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse::fuzz {
namespace {

constexpr int kMaxOps = 32;
constexpr uint64_t kMaxWrite = uint64_t{1} << 20;
constexpr uint64_t kMaxRange = uint64_t{4} << 20;
constexpr uint64_t kMaxResizeL1Entries = 1 << 16;
constexpr uint64_t kSector = 512;
constexpr uint64_t kMaxCheckedClusters = uint64_t{1} << 22;
constexpr uint64_t kCompareSteps = 8192;
constexpr uint64_t kMaxRead = uint64_t{1} << 20;

enum OpKind { kWrite, kZero, kZeroUnmap, kDiscard, kPreallocate, kTruncate, kFlush, kRead };
const char* const kOpNames[] = {"write",      "write-zeroes", "write-zeroes (unmap)", "discard",
                                "preallocate", "truncate",     "flush",                "read"};

uint64_t DiskSize(const Qcow2Layer& layer) { return layer.size() / kSector * kSector; }

struct CheckSummary {
  bool ran = false;
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  std::string first_message;
};

CheckSummary Check(const std::shared_ptr<SparseStore>& image, const std::shared_ptr<SparseStore>& data) {
  if (image->size() == 0) return {};
  CheckSummary summary;
  absl::StatusOr<Header> header = ReadHeader(*image);
  if (!header.ok()) return summary;
  if ((image->size() >> header->cluster_bits) > kMaxCheckedClusters) return summary;
  std::unique_ptr<BlockFile> file = NewSparseFile("fuzz.qcow2", image, false);
  std::unique_ptr<BlockFile> data_file = NewSparseFile("data.raw", data, false);
  absl::StatusOr<CheckResult> result =
      SyncWait(CheckImage(*file, *header, header->has_data_file() ? data_file.get() : nullptr));
  if (!result.ok()) return summary;
  summary.ran = true;
  summary.corruptions = result->corruptions;
  summary.leaks = result->leaks;
  if (!result->messages.empty()) summary.first_message = result->messages.front();
  return summary;
}

// The first cluster past the fixed header fields: extensions and the
// backing file name, which no request may change.
std::vector<uint8_t> ExtensionArea(const SparseStore& image, const Header& h) {
  const uint64_t end = std::min(h.cluster_size(), image.size());
  std::vector<uint8_t> bytes(end > h.header_length ? end - h.header_length : 0);
  image.Read(h.header_length, bytes);
  return bytes;
}

// The count behind st_blocks, kept up to date by every request, must be
// what a walk of the block status finds now (when the walk meets no damage
// and ends within kCompareSteps).
void CheckDataCount(Qcow2Layer& layer) {
  const std::optional<uint64_t> counted = layer.DataBytes();
  if (!counted) return;
  const uint64_t size = layer.size();
  uint64_t data = 0, offset = 0;
  for (uint64_t steps = 0; offset < size; ++steps) {
    if (steps == kCompareSteps) return;
    absl::StatusOr<Extent> e = SyncWait(layer.BlockStatus(offset, size - offset));
    if (!e.ok()) return;
    if (e->kind == ExtentKind::kData) data += e->length;
    offset += e->length;
  }
  FUZZ_CHECK(*counted == data, absl::StrFormat("st_blocks count %u after the requests, block status walk %u",
                                               *counted, data));
}

struct Op {
  OpKind kind;
  uint64_t offset;
  uint64_t length;
  uint8_t fill;
};

// Decodes one request against the disk as it is now (see the top of the
// file); a resize goes at most to `max_size`.
Op Decode(Reader& r, uint64_t disk, uint64_t max_size) {
  const uint64_t kind = r.Take(1);
  uint64_t offset = r.Take(4);
  uint64_t length = r.Take(4);
  Op op{static_cast<OpKind>(kind & 7), 0, 0, static_cast<uint8_t>(r.Take(1))};
  if (op.kind == kTruncate) {
    if (kind & 0x10) {
      op.offset = (disk + length + kSector - 1) / kSector * kSector;
    } else if (kind & 0x20) {
      op.offset = (disk - std::min(disk, length)) / kSector * kSector;
    } else {
      op.offset = offset * kSector;
    }
    op.offset = std::min(op.offset, max_size);
    return op;
  }
  if (kind & 8) {
    offset *= kSector;
    length *= kSector;
  }
  if (disk == 0) return op;
  op.offset = offset % disk;
  op.length = std::min({length, disk - op.offset, op.kind == kWrite ? kMaxWrite : kMaxRange});
  return op;
}

// Resizes walk the L1 entries they cut off or add, as they must: a disk of
// kMaxResizeL1Entries L1 entries still grows the L1 table, and keeps each
// request short enough to fuzz.
uint64_t MaxSize(const Header& h) {
  return kMaxResizeL1Entries * h.cluster_size() * h.l2_entries() / kSector * kSector;
}

std::vector<uint8_t> Pattern(const Op& op, int index) {
  std::vector<uint8_t> data(op.length, 0);
  if (op.fill == 0) return data;
  for (uint64_t i = 0; i < data.size();) {
    const uint64_t sector = (op.offset + i) / kSector;
    const uint64_t n = std::min<uint64_t>(data.size() - i, (sector + 1) * kSector - (op.offset + i));
    std::fill_n(data.begin() + i, n, static_cast<uint8_t>(op.fill + index * 37 + sector * 7));
    i += n;
  }
  return data;
}

void Run(std::span<const uint8_t> input) {
  PackedImage packed = Unpack(input);
  // The image as it was, for the model's untouched runs.
  const std::shared_ptr<SparseStore> original_image = packed.image->Clone();
  const std::shared_ptr<SparseStore> original_data = packed.data_file->Clone();

  absl::StatusOr<std::unique_ptr<Qcow2Layer>> opened = OpenLayer(packed.image, packed.data_file, true);
  FUZZ_LOG("open read-write: %s", opened.status().ToString());
  if (!opened.ok()) return;
  std::unique_ptr<Qcow2Layer> layer = std::move(*opened);
  const std::vector<uint8_t> extension_area = ExtensionArea(*packed.image, layer->header());
  CountIfSmall(*layer);
  const CheckSummary before = Check(packed.image, packed.data_file);
  const bool strict = before.ran && before.corruptions == 0;
  // The file as the requests found it, to tell the leaks they made from
  // refcounts that lay past the end of the file all along.
  const std::shared_ptr<SparseStore> opened_image = strict ? packed.image->Clone() : nullptr;
  FUZZ_LOG("check before: %s, %u corruptions, %u leaks %s", before.ran ? "ran" : "skipped",
           before.corruptions, before.leaks, before.first_message);

  GuestModel model;
  uint64_t expected_size = DiskSize(*layer);
  bool size_known = true;
  bool all_ok = true;
  std::unique_ptr<Qcow2Layer> original;  // opened at the first read request

  Reader tail(packed.tail);
  for (int i = 0; i < kMaxOps && !tail.empty(); ++i) {
    const uint64_t disk = DiskSize(*layer);
    if (strict && size_known) {
      FUZZ_CHECK(disk == expected_size, absl::StrFormat("disk of %u bytes, expected %u", disk, expected_size));
    }
    const Op op = Decode(tail, disk, MaxSize(layer->header()));
    if (op.kind != kTruncate && op.kind != kFlush && disk == 0) continue;
    absl::Status st;
    switch (op.kind) {
      case kWrite: {
        const std::vector<uint8_t> data = Pattern(op, i);
        st = SyncWait(layer->Write(op.offset, data));
        if (st.ok()) model.SetBytes(op.offset, data);
        break;
      }
      case kZero:
      case kZeroUnmap:
        st = SyncWait(layer->WriteZeroes(op.offset, op.length, op.kind == kZeroUnmap));
        if (st.ok()) model.SetZero(op.offset, op.offset + op.length);
        break;
      case kDiscard:
        st = SyncWait(layer->Discard(op.offset, op.length));
        if (st.ok()) model.SetZero(op.offset, op.offset + op.length);
        break;
      case kPreallocate:
        st = SyncWait(layer->Preallocate(op.offset, op.length));
        break;
      case kTruncate:
        st = SyncWait(layer->Truncate(op.offset));
        if (st.ok()) {
          if (op.offset > disk) model.SetZero(disk, op.offset);
          expected_size = op.offset;
        } else if (!absl::IsFailedPrecondition(st)) {
          // A refused shrink changes nothing; any other failure may have
          // resized part of the way.
          model.SetUnknown(std::min(disk, op.offset), GuestModel::kEnd);
          size_known = false;
        }
        break;
      case kFlush:
        st = SyncWait(layer->Flush());
        break;
      case kRead: {
        if (!strict) break;
        if (original == nullptr) {
          absl::StatusOr<std::unique_ptr<Qcow2Layer>> o = OpenLayer(original_image, original_data, false);
          if (!o.ok()) break;
          original = std::move(*o);
        }
        ModelComparer(*layer, original.get()).Compare(model, op.offset, op.offset + std::min(op.length, kMaxRead));
        break;
      }
    }
    FUZZ_LOG("%s %#x +%u (disk %u): %s", kOpNames[op.kind], op.offset, op.length, disk, st.ToString());
    if (!st.ok()) {
      all_ok = false;
      if (op.kind != kTruncate) model.SetUnknown(op.offset, op.offset + op.length);
    }
  }
  const absl::Status flushed = SyncWait(layer->Flush());
  FUZZ_LOG("final flush: %s", flushed.ToString());
  const bool durable = flushed.ok();
  if (strict) CheckDataCount(*layer);
  layer.reset();

  // Whatever the image held, the engine writes nothing but its own header
  // fields into the first cluster: guest data or a table landing there
  // would destroy the header extensions or the backing file name.
  absl::StatusOr<std::unique_ptr<Qcow2Layer>> reopened = OpenLayer(packed.image, packed.data_file, false);
  FUZZ_CHECK(reopened.ok(), "the image no longer opens: " + reopened.status().ToString());
  FUZZ_CHECK(ExtensionArea(*packed.image, (*reopened)->header()) == extension_area,
             "the header extensions or the backing file name were overwritten");
  if (!strict) return;

  const CheckSummary after = Check(packed.image, packed.data_file);
  FUZZ_LOG("check after: %u corruptions, %u leaks %s", after.corruptions, after.leaks, after.first_message);
  FUZZ_CHECK(after.ran, absl::StrFormat("the image grew to %u bytes", packed.image->size()));
  FUZZ_CHECK(after.corruptions == 0,
             absl::StrFormat("%u corruptions after the requests, first: %s", after.corruptions, after.first_message));
  if (all_ok && durable && after.leaks > before.leaks) {
    // The checker looks only at the clusters inside the file: a refcount
    // block may count clusters past its end, which show as leaks once the
    // file grows over them (QEMU leaves them so too).
    (void)opened_image->Truncate(std::max(opened_image->size(), packed.image->size()));
    const CheckSummary hidden = Check(opened_image, packed.data_file);
    FUZZ_LOG("check before, over the file grown: %u leaks", hidden.leaks);
    FUZZ_CHECK(after.leaks <= hidden.leaks,
               absl::StrFormat("%u leaked clusters after requests that all succeeded (%u before), first: %s",
                               after.leaks, hidden.leaks, after.first_message));
  }
  if (!durable) return;

  Qcow2Layer& result = **reopened;
  if (size_known) {
    FUZZ_CHECK(DiskSize(result) == expected_size,
               absl::StrFormat("reopened disk of %u bytes, expected %u", DiskSize(result), expected_size));
  }
  if (original == nullptr) {
    absl::StatusOr<std::unique_ptr<Qcow2Layer>> o = OpenLayer(original_image, original_data, false);
    if (o.ok()) original = std::move(*o);
  }
  ModelComparer(result, original.get()).Compare(model, 0, DiskSize(result));
  reopened->reset();

  absl::StatusOr<std::unique_ptr<Qcow2Layer>> writable = OpenLayer(packed.image, packed.data_file, true);
  FUZZ_CHECK(!all_ok || writable.ok(), "the image no longer opens read-write: " + writable.status().ToString());
}

}  // namespace
}  // namespace qcow2fuse::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qcow2fuse::fuzz::Run(std::span<const uint8_t>(data, size));
  return 0;
}
