// The partition table of a disk: an MBR, with the logical partitions of its
// extended partitions, or a GPT. Decoded from bytes the caller reads; no
// other I/O, and nothing about how the partitions are then shown.
//
// Partitions are numbered as Linux numbers them, so partN here is what
// `losetup -P` shows as loopXpN: MBR primary entries 1-4 by slot, logical
// partitions from 5 in the order of the EBR chain, GPT entries by index + 1
// (an unused entry leaves its number unused).
//
// Every field a disk claims is checked before it is used, and what the
// decoder reads is bounded (one sector, at most kMaxEbrLinks EBRs, and at
// most four GPT headers with kMaxGptEntryArrayBytes of entries each), so a
// hostile table gets an error, never a crash, a hang or a large allocation.
//
// What is decided here, and how it differs from Linux (block/partitions/):
//
// - No 0x55AA signature in sector 0, or a boot indicator other than 0x00
//   or 0x80 (a FAT or NTFS boot sector, not an MBR): kNone, no partitions.
// - An MBR entry is unused when its type is 0 or its size is 0 (Linux
//   shows a type 0 entry that has a size).
// - An extended partition (type 0x05, 0x0f or 0x85) is a container, not a
//   partition: it is not listed (Linux shows a 1 KiB stub of it, "room for
//   LILO"). Its EBR chain is walked: in each EBR, entry 1 is the logical
//   partition, its start relative to that EBR, and entry 2 the link to the
//   next EBR, relative to the start of the extended partition; entries 3
//   and 4 are ignored (Linux also takes data partitions from entries 2-4,
//   for old DR-DOS and OS/2 layouts). The walk ends, keeping what it found
//   and adding a warning, at an EBR that was visited before (a loop), at
//   an EBR outside the extended partition or the disk, at a link entry that
//   is not of an extended type, and after kMaxEbrLinks EBRs in all. (Linux
//   stops after 100 links that found no partition, so it follows a loop
//   of data partitions up to its partition limit.)
// - Any MBR entry of type 0xee (a protective or hybrid MBR) means GPT,
//   whatever the other entries say; if then no GPT header is valid, that
//   is an error. (Linux also requires the 0xee entry to start at LBA 1, and
//   shows no partitions when the GPT is invalid.)
// - GPT headers are tried in order: 512-byte sectors at LBA 1 (byte 512),
//   4096-byte sectors at LBA 1 (byte 4096, a disk image of a 4Kn disk),
//   then the backup header at the last LBA for 512, then for 4096. The
//   first valid one is used; using a backup adds a warning. (Linux reads
//   the backup only with the gpt kernel parameter, and reads a GPT only in
//   the sector size of the device, 512 for a loop device by default.)
// - A GPT entry may be larger than 128 bytes (Linux requires exactly 128);
//   its first 128 bytes are read.
// - A partition that starts at or past the disk's end is dropped; one that
//   runs past the end is clipped to it; each with a warning. A dropped
//   partition's number stays unused. Linux does the same with MBR
//   partitions, but drops a GPT entry that ends past the disk's last LBA.
// - Overlapping partitions are kept as they are, as Linux keeps them:
//   each one is only a window onto the disk.
// - Linux shows at most 255 GPT entries of a loop device; here there is
//   no limit beyond the entry array's (kMaxGptEntryArrayBytes).
// - MBR and EBR sectors are 512 bytes. A 4Kn disk with an MBR cannot be
//   told from a 512-byte one (nothing in the MBR records the sector size)
//   and is read as 512.

#ifndef QCOW2FUSE_PARTITION_TABLE_H_
#define QCOW2FUSE_PARTITION_TABLE_H_

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcow2fuse {

// The layouts, named as the UEFI specification (2.10, chapter 5 "GUID
// Partition Table (GPT) Disk Layout") names their fields. Every integer in
// them is little-endian.
namespace mbr {
// 5.2.1 "Legacy Master Boot Record (MBR)", table 5-1 and 5-2. An EBR has
// the same layout (only its entries 1 and 2 are used).
inline constexpr uint32_t kSectorSize = 512;
inline constexpr uint32_t kOffPartitionRecord = 446;
inline constexpr uint32_t kPartitionRecordSize = 16;
inline constexpr uint32_t kPartitionRecords = 4;
inline constexpr uint32_t kOffSignature = 510;
inline constexpr uint16_t kSignature = 0xaa55;  // bytes 0x55 0xaa
// Offsets inside one partition record.
inline constexpr uint32_t kOffBootIndicator = 0;
inline constexpr uint32_t kOffOSType = 4;
inline constexpr uint32_t kOffStartingLBA = 8;
inline constexpr uint32_t kOffSizeInLBA = 12;
inline constexpr uint8_t kBootIndicatorNone = 0x00;
inline constexpr uint8_t kBootIndicatorActive = 0x80;
// OSType values: unused, the extended partition types that hold an EBR
// chain (DOS, Windows LBA, Linux), and GPT protective (5.2.3).
inline constexpr uint8_t kTypeUnused = 0x00;
inline constexpr uint8_t kTypeExtended = 0x05;
inline constexpr uint8_t kTypeExtendedLba = 0x0f;
inline constexpr uint8_t kTypeExtendedLinux = 0x85;
inline constexpr uint8_t kTypeGptProtective = 0xee;
}  // namespace mbr

namespace gpt {
// 5.3.2 "GPT Header", table 5-5.
inline constexpr uint64_t kSignature = 0x5452415020494645;  // "EFI PART"
inline constexpr uint32_t kOffSignature = 0;
inline constexpr uint32_t kOffRevision = 8;
inline constexpr uint32_t kOffHeaderSize = 12;
inline constexpr uint32_t kOffHeaderCRC32 = 16;
inline constexpr uint32_t kOffMyLBA = 24;
inline constexpr uint32_t kOffAlternateLBA = 32;
inline constexpr uint32_t kOffFirstUsableLBA = 40;
inline constexpr uint32_t kOffLastUsableLBA = 48;
inline constexpr uint32_t kOffDiskGUID = 56;
inline constexpr uint32_t kOffPartitionEntryLBA = 72;
inline constexpr uint32_t kOffNumberOfPartitionEntries = 80;
inline constexpr uint32_t kOffSizeOfPartitionEntry = 84;
inline constexpr uint32_t kOffPartitionEntryArrayCRC32 = 88;
inline constexpr uint32_t kMinHeaderSize = 92;
inline constexpr uint32_t kPrimaryHeaderLBA = 1;
// 5.3.3 "GPT Partition Entry Array", table 5-6.
inline constexpr uint32_t kOffPartitionTypeGUID = 0;
inline constexpr uint32_t kOffUniquePartitionGUID = 16;
inline constexpr uint32_t kOffStartingLBA = 32;
inline constexpr uint32_t kOffEndingLBA = 40;  // inclusive
inline constexpr uint32_t kOffAttributes = 48;
inline constexpr uint32_t kOffPartitionName = 56;
inline constexpr uint32_t kPartitionNameBytes = 72;  // 36 UTF-16LE code units
inline constexpr uint32_t kMinPartitionEntrySize = 128;
}  // namespace gpt

// Bounds on what a disk can make the decoder do.
inline constexpr uint32_t kMaxEbrLinks = 128;
inline constexpr uint64_t kMaxGptEntryArrayBytes = uint64_t{1} << 20;  // 8192 entries of 128 bytes

struct Partition {
  uint32_t number = 0;  // as Linux numbers it (see the top of this file)
  uint64_t offset = 0;  // bytes from the start of the disk
  uint64_t length = 0;  // bytes; > 0, and offset + length <= the disk's size
  // MBR: the OSType as "0x83". GPT: the partition type GUID, as
  // "0FC63DAF-8483-4772-8E79-3D69D8477DE4".
  std::string type;
  // GPT only: the unique partition GUID (same form) and the name, as UTF-8.
  std::string uuid;
  std::string name;

  friend bool operator==(const Partition&, const Partition&) = default;
};

struct PartitionTable {
  enum Kind { kNone, kMbr, kGpt };
  Kind kind = kNone;
  // Bytes per LBA: 512, or 4096 for a GPT found at byte 4096.
  uint32_t sector_size = mbr::kSectorSize;
  std::vector<Partition> partitions;  // by number, ascending
  // What was dropped, clipped or not followed, one sentence each, for the
  // log: the partitions are usable, but not all the table describes.
  std::vector<std::string> warnings;
};

// Reads exactly out.size() bytes of the disk at `offset`. The decoder asks
// only for bytes inside the disk; an error it returns is returned as is,
// with what was being read prefixed to its message.
using DiskReader = std::function<absl::Status(uint64_t offset, std::span<uint8_t> out)>;

// The partition table of a disk of `disk_size` bytes. kNone when sector 0
// is no MBR. A damaged or hostile table (a GPT whose headers are all
// invalid, an entry that ends before it starts) is a DataLoss error naming
// each structure and its byte offset, such as "... primary GPT header at
// byte 512: PartitionEntryArrayCRC32 is 0x1234abcd, the entries' is
// 0x89ab0123; backup GPT header at byte 67108352: ...". A read error is
// returned with what was being read and where in front of its message.
absl::StatusOr<PartitionTable> DecodePartitionTable(uint64_t disk_size, const DiskReader& read);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_PARTITION_TABLE_H_
