// Fuzz target: the partition table decoder (qcow2fuse/partition_table.h).
//
// Input: a packed image (fuzz_image.h) whose image file is the disk, so a
// disk of up to 16 TiB, with a GPT backup header at its last LBA, is a
// few hundred bytes of input. If the tail's first byte N is not zero, the
// Nth read of the disk fails. If bit 0 of its second byte is set, every
// GPT header (at LBA 1 and at the last LBA, for 512- and 4096-byte
// sectors) first gets the CRCs its fields call for: a fuzzer cannot make
// a CRC match, and without them no mutation of a GPT would get past the
// CRC checks to those of the fields and entries.
//
// Beyond "no crash, no undefined behaviour, no unbounded allocation", the
// decoder must keep the promises the partition views rely on:
//   - it reads only inside the disk, and no more in all than one MBR,
//     kMaxEbrLinks EBRs and four GPT headers with their entry arrays;
//   - a read error is what it returns, never a table;
//   - the partitions of a table it accepts are numbered as Linux numbers
//     them (ascending and unique; MBR 1-4 and logical from 5 on, one per
//     EBR at most; GPT within the entry array's limit), and each is
//     non-empty and inside the disk;
//   - a table that is not valid is a DataLoss error with a message;
//   - the same disk decodes to the same table twice.

#include <zlib.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "base/endian.h"
#include "qcow2fuse/partition_table.h"
#include "fuzz_image.h"

namespace qcow2fuse::fuzz {
namespace {

constexpr uint64_t kMaxBytesRead = uint64_t{mbr::kSectorSize} * (1 + kMaxEbrLinks) +
                                   4 * (uint64_t{4096} + kMaxGptEntryArrayBytes);
constexpr uint32_t kMaxGptEntries = kMaxGptEntryArrayBytes / gpt::kMinPartitionEntrySize;

uint32_t Crc32(std::span<const uint8_t> bytes) {
  return static_cast<uint32_t>(crc32_z(crc32_z(0, nullptr, 0), bytes.data(), bytes.size()));
}

// Sets PartitionEntryArrayCRC32 (where the array is inside the disk and
// within the limit) and HeaderCRC32 of every GPT header.
void FixGptCrcs(SparseStore& disk) {
  for (uint64_t sector_size : {512, 4096}) {
    const uint64_t sectors = disk.size() / sector_size;
    if (sectors < 2) continue;
    for (uint64_t lba : {uint64_t{1}, sectors - 1}) {
      std::vector<uint8_t> h(sector_size);
      disk.Read(lba * sector_size, h);
      if (LoadLE64(h.data() + gpt::kOffSignature) != gpt::kSignature) continue;
      const uint64_t entry_lba = LoadLE64(h.data() + gpt::kOffPartitionEntryLBA);
      const uint64_t array_bytes = uint64_t{LoadLE32(h.data() + gpt::kOffNumberOfPartitionEntries)} *
                                   LoadLE32(h.data() + gpt::kOffSizeOfPartitionEntry);
      if (array_bytes <= kMaxGptEntryArrayBytes && entry_lba < sectors &&
          array_bytes <= disk.size() - entry_lba * sector_size) {
        std::vector<uint8_t> entries(array_bytes);
        disk.Read(entry_lba * sector_size, entries);
        StoreLE32(h.data() + gpt::kOffPartitionEntryArrayCRC32, Crc32(entries));
      }
      const uint32_t header_size = std::clamp<uint32_t>(LoadLE32(h.data() + gpt::kOffHeaderSize),
                                                        gpt::kMinHeaderSize, static_cast<uint32_t>(sector_size));
      StoreLE32(h.data() + gpt::kOffHeaderCRC32, 0);
      StoreLE32(h.data() + gpt::kOffHeaderCRC32, Crc32(std::span(h).first(header_size)));
      (void)disk.Write(lba * sector_size, h);
    }
  }
}

struct Outcome {
  absl::StatusOr<PartitionTable> table;
  bool read_failed = false;
};

Outcome Decode(const SparseStore& disk, uint32_t fail_read) {
  Outcome outcome;
  uint64_t bytes_read = 0;
  uint32_t reads = 0;
  outcome.table = DecodePartitionTable(disk.size(), [&](uint64_t offset, std::span<uint8_t> out) -> absl::Status {
    FUZZ_CHECK(offset <= disk.size() && out.size() <= disk.size() - offset,
               absl::StrFormat("read of %u bytes at byte %u of a disk of %u bytes", out.size(), offset, disk.size()));
    bytes_read += out.size();
    FUZZ_CHECK(bytes_read <= kMaxBytesRead, absl::StrFormat("%u bytes read", bytes_read));
    if (++reads == fail_read) {
      outcome.read_failed = true;
      return absl::UnavailableError("injected read error");
    }
    disk.Read(offset, out);
    return absl::OkStatus();
  });
  return outcome;
}

void CheckTable(const PartitionTable& table, uint64_t disk_size) {
  if (table.kind == PartitionTable::kNone) {
    FUZZ_CHECK(table.partitions.empty(), "partitions without a table");
    return;
  }
  FUZZ_CHECK(table.sector_size == 512 || (table.kind == PartitionTable::kGpt && table.sector_size == 4096),
             absl::StrFormat("sector size %u", table.sector_size));
  uint32_t previous = 0;
  for (const Partition& p : table.partitions) {
    FUZZ_CHECK(p.number > previous, absl::StrFormat("partition %u after %u", p.number, previous));
    previous = p.number;
    if (table.kind == PartitionTable::kMbr) {
      FUZZ_CHECK(p.number >= 1 && p.number <= 4 + kMaxEbrLinks, absl::StrFormat("MBR partition %u", p.number));
    } else {
      FUZZ_CHECK(p.number >= 1 && p.number <= kMaxGptEntries, absl::StrFormat("GPT partition %u", p.number));
      FUZZ_CHECK(p.uuid.size() == 36, "GPT partition without its GUID");
    }
    FUZZ_CHECK(p.length > 0, absl::StrFormat("partition %u is empty", p.number));
    FUZZ_CHECK(p.offset < disk_size && p.length <= disk_size - p.offset,
               absl::StrFormat("partition %u (%u bytes at byte %u) is not inside the disk (%u bytes)", p.number,
                               p.length, p.offset, disk_size));
    FUZZ_CHECK(!p.type.empty(), absl::StrFormat("partition %u has no type", p.number));
  }
  FUZZ_CHECK(table.warnings.size() <= kMaxGptEntries + 8, absl::StrFormat("%u warnings", table.warnings.size()));
}

}  // namespace
}  // namespace qcow2fuse::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qcow2fuse;
  fuzz::PackedImage packed = fuzz::Unpack(std::span<const uint8_t>(data, size));
  const uint32_t fail_read = packed.tail.empty() ? 0 : packed.tail[0];
  if (packed.tail.size() >= 2 && (packed.tail[1] & 1)) fuzz::FixGptCrcs(*packed.image);
  const fuzz::SparseStore& disk = *packed.image;

  fuzz::Outcome first = fuzz::Decode(disk, fail_read);
  if (first.read_failed) {
    FUZZ_LOG("read %u failed: %s", fail_read, first.table.status().ToString());
    FUZZ_CHECK(!first.table.ok() && first.table.status().code() == absl::StatusCode::kUnavailable,
               "a failed read did not fail the decode");
    return 0;
  }
  if (first.table.ok()) {
    FUZZ_LOG("kind %d, %u-byte sectors, %u partitions, %u warnings", first.table->kind, first.table->sector_size,
             first.table->partitions.size(), first.table->warnings.size());
    for (const Partition& p : first.table->partitions) {
      FUZZ_LOG("  %u: %u bytes at byte %u", p.number, p.length, p.offset);
    }
    for (const std::string& w : first.table->warnings) FUZZ_LOG("  warning: %s", w);
    fuzz::CheckTable(*first.table, disk.size());
  } else {
    FUZZ_LOG("error: %s", first.table.status().ToString());
    FUZZ_CHECK(first.table.status().code() == absl::StatusCode::kDataLoss,
               absl::StrFormat("unexpected error %s", first.table.status().ToString()));
    FUZZ_CHECK(!first.table.status().message().empty(), "an error without a message");
  }

  fuzz::Outcome second = fuzz::Decode(disk, 0);
  FUZZ_CHECK(first.table.ok() == second.table.ok(), "decoded differently the second time");
  if (first.table.ok()) {
    FUZZ_CHECK(first.table->kind == second.table->kind && first.table->partitions == second.table->partitions &&
                   first.table->warnings == second.table->warnings,
               "decoded differently the second time");
  } else {
    FUZZ_CHECK(first.table.status() == second.table.status(), "failed differently the second time");
  }
  return 0;
}
