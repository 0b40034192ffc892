// Section numbers are those of the UEFI specification 2.10, chapter 5,
// which describes the legacy MBR as well as the GPT. The EBR chain is
// described by no specification: its layout is the one DOS fdisk wrote and
// every partitioner since writes (see the top of partition_table.h).

#include "qcow2fuse/partition_table.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <set>
#include <string_view>
#include <utility>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/endian.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// --- Arithmetic ------------------------------------------------------------
//
// GPT fields are 64-bit LBAs: every product and sum saturates at 2^64 - 1,
// which is past the end of any disk, so an overflowing range is treated as
// one that runs past the end. MBR fields are 32-bit sector counts: their
// byte offsets stay below 2^43 and cannot overflow.

uint64_t SaturatingMul(uint64_t a, uint64_t b) {
  uint64_t product;
  return __builtin_mul_overflow(a, b, &product) ? UINT64_MAX : product;
}

uint64_t SaturatingAdd(uint64_t a, uint64_t b) {
  uint64_t sum;
  return __builtin_add_overflow(a, b, &sum) ? UINT64_MAX : sum;
}

// --- Reading ---------------------------------------------------------------

// The disk, read only inside its bounds.
class Disk {
 public:
  Disk(uint64_t size, const DiskReader& read) : size_(size), read_(read) {}

  uint64_t size() const { return size_; }

  bool Contains(uint64_t offset, uint64_t length) const {
    return offset <= size_ && length <= size_ - offset;
  }

  // `length` bytes at `offset`, which the caller has checked are inside
  // the disk (and bounded); `what` names them in an error.
  absl::StatusOr<std::vector<uint8_t>> Read(uint64_t offset, uint64_t length, std::string_view what) const {
    std::vector<uint8_t> bytes(length);
    absl::Status status = read_(offset, bytes);
    if (!status.ok()) return Annotate(status, absl::StrFormat("reading the %s at byte %u", what, offset));
    return bytes;
  }

 private:
  const uint64_t size_;
  const DiskReader& read_;
};

// --- Partitions ------------------------------------------------------------

// Adds partition `p` for the disk's bytes [p.offset, end) as the table
// describes them (`where` names its entry), or drops it if it starts at
// or past the disk's end, or clips it there if it runs past it, as Linux
// does (block/partitions/core.c). The caller has given it its number,
// which a dropped partition keeps using, as on Linux.
void AddPartition(PartitionTable& table, uint64_t disk_size, Partition p, uint64_t end, std::string_view where) {
  if (p.offset >= disk_size) {
    table.warnings.push_back(absl::StrFormat(
        "partition %u (%s) starts at byte %u, at or past the end of the disk (%u bytes): left out", p.number,
        where, p.offset, disk_size));
    return;
  }
  if (end > disk_size) {
    table.warnings.push_back(absl::StrFormat(
        "partition %u (%s) ends at byte %u, past the end of the disk (%u bytes): cut to %u bytes", p.number, where,
        end, disk_size, disk_size - p.offset));
    end = disk_size;
  }
  if (end <= p.offset) return;  // empty (the callers skip those already)
  p.length = end - p.offset;
  table.partitions.push_back(std::move(p));
}

// --- MBR and EBRs (5.2.1) ----------------------------------------------------

struct MbrEntry {
  uint8_t boot_indicator = 0;
  uint8_t os_type = 0;
  uint32_t starting_lba = 0;
  uint32_t size_in_lba = 0;

  // Type 0 marks an unused entry; an entry of no sectors holds nothing
  // either (Linux skips only the latter).
  bool unused() const { return os_type == mbr::kTypeUnused || size_in_lba == 0; }
  bool extended() const {
    return os_type == mbr::kTypeExtended || os_type == mbr::kTypeExtendedLba || os_type == mbr::kTypeExtendedLinux;
  }
  uint64_t start_byte() const { return uint64_t{starting_lba} * mbr::kSectorSize; }
  uint64_t size_bytes() const { return uint64_t{size_in_lba} * mbr::kSectorSize; }
  std::string type() const { return absl::StrFormat("0x%02x", os_type); }
};

bool HasMbrSignature(std::span<const uint8_t> sector) {
  return LoadLE16(sector.data() + mbr::kOffSignature) == mbr::kSignature;
}

std::array<MbrEntry, mbr::kPartitionRecords> MbrEntries(std::span<const uint8_t> sector) {
  std::array<MbrEntry, mbr::kPartitionRecords> entries;
  for (uint32_t i = 0; i < mbr::kPartitionRecords; ++i) {
    const uint8_t* p = sector.data() + mbr::kOffPartitionRecord + i * mbr::kPartitionRecordSize;
    entries[i].boot_indicator = p[mbr::kOffBootIndicator];
    entries[i].os_type = p[mbr::kOffOSType];
    entries[i].starting_lba = LoadLE32(p + mbr::kOffStartingLBA);
    entries[i].size_in_lba = LoadLE32(p + mbr::kOffSizeInLBA);
  }
  return entries;
}

// What the walks of all extended partitions share.
struct EbrWalk {
  uint32_t next_number = 5;     // logical partitions are numbered from 5
  uint32_t links = 0;           // EBRs read, against kMaxEbrLinks
  std::set<uint64_t> visited;   // EBR byte offsets
};

// Walks the EBR chain of the extended partition in MBR entry `slot`
// (0-based), adding its logical partitions. Each EBR is one sector: entry 1
// is the logical partition, its StartingLBA relative to this EBR; entry 2
// links to the next EBR, its StartingLBA relative to the extended
// partition's start. Anything that would lead the walk astray ends it,
// with a warning; only a read error is an error.
absl::Status WalkEbrChain(const Disk& disk, const MbrEntry& extended, uint32_t slot, EbrWalk& walk,
                          PartitionTable& table) {
  const uint64_t start = extended.start_byte();
  const uint64_t end = start + extended.size_bytes();
  uint64_t ebr = start;
  while (true) {
    if (walk.links == kMaxEbrLinks) {
      table.warnings.push_back(absl::StrFormat(
          "the EBR chains hold more than %u EBRs: the one at byte %u and those after it are not read", kMaxEbrLinks,
          ebr));
      return absl::OkStatus();
    }
    ++walk.links;
    if (!walk.visited.insert(ebr).second) {
      table.warnings.push_back(
          absl::StrFormat("the EBR chain loops back to the EBR at byte %u: the walk ends there", ebr));
      return absl::OkStatus();
    }
    if (ebr + mbr::kSectorSize > end) {
      table.warnings.push_back(absl::StrFormat(
          "an EBR link points to byte %u, outside the extended partition (partition %u, bytes %u to %u): the "
          "walk ends there",
          ebr, slot + 1, start, end));
      return absl::OkStatus();
    }
    if (!disk.Contains(ebr, mbr::kSectorSize)) {
      table.warnings.push_back(absl::StrFormat(
          "the EBR at byte %u lies past the end of the disk (%u bytes): the walk ends there", ebr, disk.size()));
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(std::vector<uint8_t> sector, disk.Read(ebr, mbr::kSectorSize, "EBR"));
    // No signature: the chain ends (an extended partition with no logical
    // partition may hold a blank first EBR).
    if (!HasMbrSignature(sector)) {
      if (ebr != start) {
        table.warnings.push_back(
            absl::StrFormat("the EBR at byte %u has no 0x55AA signature: the walk ends there", ebr));
      }
      return absl::OkStatus();
    }
    const auto entries = MbrEntries(sector);

    const MbrEntry& data = entries[0];
    if (data.extended()) {
      table.warnings.push_back(absl::StrFormat(
          "the EBR at byte %u has an extended partition (type %s) in entry 1, where its logical partition "
          "belongs: left out",
          ebr, data.type()));
    } else if (!data.unused()) {
      Partition p;
      p.number = walk.next_number++;
      p.offset = ebr + data.start_byte();
      p.type = data.type();
      AddPartition(table, disk.size(), std::move(p), ebr + data.start_byte() + data.size_bytes(),
                   absl::StrFormat("entry 1 of the EBR at byte %u", ebr));
    }

    const MbrEntry& link = entries[1];
    if (link.unused()) return absl::OkStatus();
    if (!link.extended()) {
      table.warnings.push_back(absl::StrFormat(
          "the EBR at byte %u has a partition of type %s in entry 2, where the link to the next EBR belongs: "
          "the walk ends there",
          ebr, link.type()));
      return absl::OkStatus();
    }
    ebr = start + link.start_byte();
  }
}

absl::Status DecodeMbr(const Disk& disk, std::span<const uint8_t> sector, PartitionTable& table) {
  table.kind = PartitionTable::kMbr;
  const auto entries = MbrEntries(sector);
  EbrWalk walk;
  for (uint32_t slot = 0; slot < mbr::kPartitionRecords; ++slot) {
    const MbrEntry& e = entries[slot];
    if (e.unused()) continue;
    if (e.extended()) {
      RETURN_IF_ERROR(WalkEbrChain(disk, e, slot, walk, table));
      continue;
    }
    Partition p;
    p.number = slot + 1;
    p.offset = e.start_byte();
    p.type = e.type();
    AddPartition(table, disk.size(), std::move(p), e.start_byte() + e.size_bytes(),
                 absl::StrFormat("MBR entry %u", slot + 1));
  }
  return absl::OkStatus();
}

// --- GPT (5.3) --------------------------------------------------------------

// "0FC63DAF-8483-4772-8E79-3D69D8477DE4": the first three fields are
// little-endian on disk, the last eight bytes in order (Appendix A, "GUID
// and Time Formats").
std::string GuidText(const uint8_t* g) {
  return absl::StrFormat("%08X-%04X-%04X-%02X%02X-%02X%02X%02X%02X%02X%02X", LoadLE32(g), LoadLE16(g + 4),
                         LoadLE16(g + 6), g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
}

bool IsZeroGuid(const uint8_t* g) {
  return std::all_of(g, g + 16, [](uint8_t b) { return b == 0; });
}

void AppendUtf8(std::string& out, uint32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xc0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3f));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xe0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (c & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (c & 0x3f));
  }
}

// PartitionName: UTF-16LE up to the first NUL; an unpaired surrogate
// becomes U+FFFD.
std::string PartitionName(const uint8_t* name) {
  constexpr uint32_t kUnits = gpt::kPartitionNameBytes / 2;
  std::string out;
  for (uint32_t i = 0; i < kUnits; ++i) {
    uint32_t c = LoadLE16(name + 2 * i);
    if (c == 0) break;
    if (c >= 0xd800 && c < 0xdc00 && i + 1 < kUnits) {
      const uint32_t low = LoadLE16(name + 2 * (i + 1));
      if (low >= 0xdc00 && low < 0xe000) {
        c = 0x10000 + ((c - 0xd800) << 10) + (low - 0xdc00);
        ++i;
      }
    }
    if (c >= 0xd800 && c < 0xe000) c = 0xfffd;
    AppendUtf8(out, c);
  }
  return out;
}

uint32_t Crc32(std::span<const uint8_t> bytes) {
  return static_cast<uint32_t>(crc32_z(crc32_z(0, nullptr, 0), bytes.data(), bytes.size()));
}

// One GPT: a header and its partition entry array, both checked.
struct Gpt {
  uint32_t sector_size = 0;
  uint64_t header_offset = 0;  // bytes
  uint64_t entries_offset = 0;  // bytes
  uint32_t number_of_partition_entries = 0;
  uint32_t size_of_partition_entry = 0;
  std::vector<uint8_t> entries;
};

// Reads the GPT header at `lba` (of `sector_size` bytes) and its entry
// array into `gpt`, checking what 5.3.2 asks of a valid header (the
// signature, HeaderCRC32, MyLBA, then PartitionEntryArrayCRC32), and what
// makes it safe to use: every size and offset bounded and inside the disk,
// as Linux checks them (block/partitions/efi.c). A header that is not valid
// sets `invalid` to why, and `signature` tells whether it at least had the
// signature; only a read error is returned.
absl::Status ReadGpt(const Disk& disk, uint32_t sector_size, uint64_t lba, Gpt& gpt, bool& signature,
                     std::string& invalid) {
  signature = false;
  invalid.clear();
  const uint64_t sectors = disk.size() / sector_size;
  if (sectors < 2 || lba >= sectors) {
    invalid = absl::StrFormat("the disk (%u bytes) is too small for a GPT of %u-byte sectors", disk.size(),
                              sector_size);
    return absl::OkStatus();
  }
  const uint64_t offset = lba * sector_size;  // lba < sectors: no overflow
  ASSIGN_OR_RETURN(std::vector<uint8_t> h, disk.Read(offset, sector_size, "GPT header"));
  if (LoadLE64(h.data() + gpt::kOffSignature) != gpt::kSignature) {
    invalid = "no \"EFI PART\" signature";
    return absl::OkStatus();
  }
  signature = true;
  // HeaderSize: at least the fields, at most one block (5.3.2).
  const uint32_t header_size = LoadLE32(h.data() + gpt::kOffHeaderSize);
  if (header_size < gpt::kMinHeaderSize || header_size > sector_size) {
    invalid = absl::StrFormat("HeaderSize %u is not between %u and the sector size, %u", header_size,
                              gpt::kMinHeaderSize, sector_size);
    return absl::OkStatus();
  }
  // HeaderCRC32 covers HeaderSize bytes, itself counted as zero.
  const uint32_t header_crc = LoadLE32(h.data() + gpt::kOffHeaderCRC32);
  StoreLE32(h.data() + gpt::kOffHeaderCRC32, 0);
  const uint32_t computed_header_crc = Crc32(std::span(h).first(header_size));
  if (header_crc != computed_header_crc) {
    invalid = absl::StrFormat("HeaderCRC32 is 0x%08x, the header's is 0x%08x", header_crc, computed_header_crc);
    return absl::OkStatus();
  }
  const uint64_t my_lba = LoadLE64(h.data() + gpt::kOffMyLBA);
  if (my_lba != lba) {
    invalid = absl::StrFormat("MyLBA is %u, not %u, where the header lies", my_lba, lba);
    return absl::OkStatus();
  }
  // The usable LBAs must lie on the disk, as Linux requires: a header
  // written for a larger disk (one that was shrunk since) is not trusted.
  const uint64_t last_lba = sectors - 1;
  const uint64_t first_usable = LoadLE64(h.data() + gpt::kOffFirstUsableLBA);
  const uint64_t last_usable = LoadLE64(h.data() + gpt::kOffLastUsableLBA);
  if (first_usable > last_usable || last_usable > last_lba) {
    invalid = absl::StrFormat(
        "the usable LBAs (%u to %u) are not a range on the disk, whose last LBA is %u (was the disk shrunk?)",
        first_usable, last_usable, last_lba);
    return absl::OkStatus();
  }
  // SizeOfPartitionEntry: UEFI 2.x says 128 x 2^n, EFI 1.10 a multiple of
  // 8; the looser rule is taken, since only the first 128 bytes are read.
  const uint32_t entry_size = LoadLE32(h.data() + gpt::kOffSizeOfPartitionEntry);
  const uint32_t entry_count = LoadLE32(h.data() + gpt::kOffNumberOfPartitionEntries);
  if (entry_size < gpt::kMinPartitionEntrySize || entry_size % 8 != 0) {
    invalid = absl::StrFormat("SizeOfPartitionEntry %u is not a multiple of 8 of at least %u", entry_size,
                              gpt::kMinPartitionEntrySize);
    return absl::OkStatus();
  }
  const uint64_t array_bytes = uint64_t{entry_count} * entry_size;  // 32 x 32 bits: no overflow
  if (array_bytes > kMaxGptEntryArrayBytes) {
    invalid = absl::StrFormat("its partition entry array (%u entries of %u bytes) is larger than the limit of %u bytes",
                              entry_count, entry_size, kMaxGptEntryArrayBytes);
    return absl::OkStatus();
  }
  const uint64_t entry_lba = LoadLE64(h.data() + gpt::kOffPartitionEntryLBA);
  const uint64_t entries_offset = SaturatingMul(entry_lba, sector_size);
  if (!disk.Contains(entries_offset, array_bytes)) {
    invalid = absl::StrFormat("its partition entry array (%u bytes at LBA %u) runs past the end of the disk",
                              array_bytes, entry_lba);
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(std::vector<uint8_t> entries,
                   disk.Read(entries_offset, array_bytes, "GPT partition entry array"));
  const uint32_t array_crc = LoadLE32(h.data() + gpt::kOffPartitionEntryArrayCRC32);
  const uint32_t computed_array_crc = Crc32(entries);
  if (array_crc != computed_array_crc) {
    invalid = absl::StrFormat("PartitionEntryArrayCRC32 is 0x%08x, the entries' is 0x%08x", array_crc,
                              computed_array_crc);
    return absl::OkStatus();
  }
  gpt.sector_size = sector_size;
  gpt.header_offset = offset;
  gpt.entries_offset = entries_offset;
  gpt.number_of_partition_entries = entry_count;
  gpt.size_of_partition_entry = entry_size;
  gpt.entries = std::move(entries);
  return absl::OkStatus();
}

// Finds a valid GPT: the primary header (LBA 1), then the backup (the
// last LBA), for 512-byte sectors and for 4096-byte ones (see the top of
// partition_table.h for the order). 5.3.2 sends software that finds the
// primary corrupt to the backup at the last LBA.
absl::StatusOr<Gpt> FindGpt(const Disk& disk, PartitionTable& table) {
  struct Attempt {
    uint32_t sector_size;
    bool backup = false;
    std::string where = {};
    bool signature = false;
    std::string invalid = {};
  };
  std::array<Attempt, 4> attempts = {{{.sector_size = 512, .backup = false},
                                       {.sector_size = 4096, .backup = false},
                                       {.sector_size = 512, .backup = true},
                                       {.sector_size = 4096, .backup = true}}};
  for (Attempt& a : attempts) {
    const uint64_t sectors = disk.size() / a.sector_size;
    const uint64_t lba = a.backup ? (sectors > 0 ? sectors - 1 : 0) : gpt::kPrimaryHeaderLBA;
    a.where = absl::StrFormat("%s GPT header at byte %u", a.backup ? "backup" : "primary", lba * a.sector_size);
    Gpt gpt;
    RETURN_IF_ERROR(ReadGpt(disk, a.sector_size, lba, gpt, a.signature, a.invalid));
    if (!a.invalid.empty()) continue;
    if (a.backup) {
      const Attempt& primary = a.sector_size == 512 ? attempts[0] : attempts[1];
      table.warnings.push_back(
          absl::StrFormat("the %s is not valid (%s): the %s is used", primary.where, primary.invalid, a.where));
    }
    return gpt;
  }
  // Name the headers of the sector size that has a signature somewhere,
  // 512 if neither has.
  const bool is_4k = !attempts[0].signature && !attempts[2].signature &&
                     (attempts[1].signature || attempts[3].signature);
  const Attempt& primary = attempts[is_4k ? 1 : 0];
  const Attempt& backup = attempts[is_4k ? 3 : 2];
  return absl::DataLossError(
      absl::StrFormat("the MBR has a GPT protective entry (type 0xee), but no GPT header is valid: %s: %s; %s: %s",
                      primary.where, primary.invalid, backup.where, backup.invalid));
}

absl::Status DecodeGpt(const Disk& disk, PartitionTable& table) {
  ASSIGN_OR_RETURN(Gpt gpt, FindGpt(disk, table));
  table.kind = PartitionTable::kGpt;
  table.sector_size = gpt.sector_size;
  for (uint32_t i = 0; i < gpt.number_of_partition_entries; ++i) {
    const uint8_t* e = gpt.entries.data() + uint64_t{i} * gpt.size_of_partition_entry;
    // 5.3.3: a zero PartitionTypeGUID marks an unused entry.
    if (IsZeroGuid(e + gpt::kOffPartitionTypeGUID)) continue;
    const uint64_t entry_offset = gpt.entries_offset + uint64_t{i} * gpt.size_of_partition_entry;
    const uint64_t starting_lba = LoadLE64(e + gpt::kOffStartingLBA);
    const uint64_t ending_lba = LoadLE64(e + gpt::kOffEndingLBA);  // inclusive
    if (ending_lba < starting_lba) {
      return absl::DataLossError(absl::StrFormat(
          "GPT partition entry %u (partition %u) at byte %u of the GPT at byte %u: EndingLBA %u is before "
          "StartingLBA %u",
          i, i + 1, entry_offset, gpt.header_offset, ending_lba, starting_lba));
    }
    Partition p;
    p.number = i + 1;
    p.offset = SaturatingMul(starting_lba, gpt.sector_size);
    p.type = GuidText(e + gpt::kOffPartitionTypeGUID);
    p.uuid = GuidText(e + gpt::kOffUniquePartitionGUID);
    p.name = PartitionName(e + gpt::kOffPartitionName);
    AddPartition(table, disk.size(), std::move(p), SaturatingMul(SaturatingAdd(ending_lba, 1), gpt.sector_size),
                 absl::StrFormat("GPT partition entry %u at byte %u", i, entry_offset));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PartitionTable> DecodePartitionTable(uint64_t disk_size, const DiskReader& read) {
  PartitionTable table;
  const Disk disk(disk_size, read);
  if (!disk.Contains(0, mbr::kSectorSize)) return table;
  ASSIGN_OR_RETURN(std::vector<uint8_t> sector, disk.Read(0, mbr::kSectorSize, "MBR"));
  if (!HasMbrSignature(sector)) return table;
  const auto entries = MbrEntries(sector);

  // A protective MBR (5.2.3), or a hybrid one: the GPT describes the disk.
  if (std::any_of(entries.begin(), entries.end(),
                  [](const MbrEntry& e) { return e.os_type == mbr::kTypeGptProtective; })) {
    RETURN_IF_ERROR(DecodeGpt(disk, table));
    return table;
  }

  // A FAT or NTFS boot sector ends in 0x55AA too, but its code and fields
  // lie where an MBR's entries do; Linux takes a boot indicator other than
  // 0x00 or 0x80 as the sign that sector 0 is not an MBR.
  for (uint32_t slot = 0; slot < mbr::kPartitionRecords; ++slot) {
    const uint8_t boot = entries[slot].boot_indicator;
    if (boot != mbr::kBootIndicatorNone && boot != mbr::kBootIndicatorActive) {
      table.warnings.push_back(absl::StrFormat(
          "sector 0 ends in 0x55AA, but entry %u has boot indicator 0x%02x: a boot sector, not an MBR", slot + 1,
          boot));
      return table;
    }
  }
  RETURN_IF_ERROR(DecodeMbr(disk, sector, table));
  std::sort(table.partitions.begin(), table.partitions.end(),
            [](const Partition& a, const Partition& b) { return a.number < b.number; });
  return table;
}

}  // namespace qcow2fuse
