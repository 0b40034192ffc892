// The partition table decoder (qcow2fuse/partition_table.h).
//
// Real tables come from sfdisk (and fdisk, for 4096-byte sectors) on raw
// files, and the decoder must agree with two independent readers: `sfdisk
// -d` (libfdisk) and `partx` (libblkid, which numbers partitions as the
// kernel does). The kernel itself is not asked: a loop device's partitions
// need a kernel built with MSDOS and EFI partition support, which the
// machines these tests run on need not have. Damaged and hostile tables
// are those tables with bytes changed, or built by hand: EBR loops and
// long chains, GPT headers whose sizes, counts and offsets lie, CRCs that
// do not match, partitions past the end of the disk.
//
// Every decode goes through a reader that fails the test if the decoder
// reads outside the disk.

#include "qcow2fuse/partition_table.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "base/endian.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse {

// For gtest's messages.
void PrintTo(const Partition& p, std::ostream* out) {
  *out << "{" << p.number << ", offset " << p.offset << ", length " << p.length << ", " << p.type << ", " << p.uuid
       << ", \"" << p.name << "\"}";
}

namespace test {
namespace {

using Bytes = std::vector<uint8_t>;

constexpr uint64_t kSector = 512;
constexpr uint64_t kMiB = uint64_t{1} << 20;

// --- A disk in memory -----------------------------------------------------------

// A sparse disk of any size, in 512-byte sectors; unwritten ones read as
// zeros.
class Disk {
 public:
  explicit Disk(uint64_t size) : size_(size) {}

  // The contents of a file (its non-zero sectors).
  static absl::StatusOr<Disk> Load(const std::string& path) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
    Disk disk(static_cast<uint64_t>(in.tellg()));
    in.seekg(0);
    Bytes block(kMiB);
    for (uint64_t pos = 0; pos < disk.size_; pos += block.size()) {
      const uint64_t n = std::min<uint64_t>(block.size(), disk.size_ - pos);
      if (!in.read(reinterpret_cast<char*>(block.data()), static_cast<std::streamsize>(n))) {
        return absl::DataLossError(absl::StrCat("cannot read ", path));
      }
      for (uint64_t s = 0; s < n; s += kSector) {
        const uint64_t len = std::min<uint64_t>(kSector, n - s);
        if (std::any_of(block.begin() + s, block.begin() + s + len, [](uint8_t b) { return b != 0; })) {
          disk.Write(pos + s, std::span(block).subspan(s, len));
        }
      }
    }
    return disk;
  }

  uint64_t size() const { return size_; }

  void Write(uint64_t offset, std::span<const uint8_t> bytes) {
    for (uint64_t i = 0; i < bytes.size();) {
      const uint64_t at = offset + i;
      auto& sector = sectors_[at / kSector];
      const uint64_t n = std::min<uint64_t>(kSector - at % kSector, bytes.size() - i);
      std::copy_n(bytes.begin() + i, n, sector.begin() + at % kSector);
      i += n;
    }
  }
  void Zero(uint64_t offset, uint64_t length) { Write(offset, Bytes(length, 0)); }

  void Read(uint64_t offset, std::span<uint8_t> out) const {
    std::fill(out.begin(), out.end(), 0);
    auto it = sectors_.lower_bound(offset / kSector);
    for (; it != sectors_.end() && it->first * kSector < offset + out.size(); ++it) {
      const uint64_t sector_start = it->first * kSector;
      const uint64_t from = std::max(sector_start, offset);
      const uint64_t to = std::min(sector_start + kSector, offset + out.size());
      std::copy(it->second.begin() + (from - sector_start), it->second.begin() + (to - sector_start),
                out.begin() + (from - offset));
    }
  }
  Bytes Read(uint64_t offset, uint64_t length) const {
    Bytes out(length);
    Read(offset, out);
    return out;
  }

  uint32_t LE32(uint64_t offset) const { return LoadLE32(Read(offset, 4).data()); }
  void Put8(uint64_t offset, uint8_t v) { Write(offset, Bytes{v}); }
  void PutLE16(uint64_t offset, uint16_t v) {
    Bytes b(2);
    StoreLE16(b.data(), v);
    Write(offset, b);
  }
  void PutLE32(uint64_t offset, uint32_t v) {
    Bytes b(4);
    StoreLE32(b.data(), v);
    Write(offset, b);
  }
  void PutLE64(uint64_t offset, uint64_t v) {
    Bytes b(8);
    StoreLE64(b.data(), v);
    Write(offset, b);
  }

  // Decodes the table. Any read outside the disk fails the test;
  // `fail_at_offset` makes the read of that offset fail.
  absl::StatusOr<PartitionTable> Decode(std::optional<uint64_t> fail_at_offset = std::nullopt) const {
    return DecodePartitionTable(size_, [&](uint64_t offset, std::span<uint8_t> out) -> absl::Status {
      if (offset > size_ || out.size() > size_ - offset) {
        ADD_FAILURE() << "read of " << out.size() << " bytes at byte " << offset << " on a disk of " << size_
                      << " bytes";
        return absl::OutOfRangeError("read past the end of the disk");
      }
      if (fail_at_offset == offset) return absl::UnavailableError("injected read error");
      Read(offset, out);
      return absl::OkStatus();
    });
  }

 private:
  uint64_t size_;
  std::map<uint64_t, std::array<uint8_t, kSector>> sectors_;
};

// --- Building tables by hand ---------------------------------------------------

// Entry `index` (0-based) of the MBR or EBR at `sector_offset`.
void PutMbrEntry(Disk& disk, uint64_t sector_offset, uint32_t index, uint8_t os_type, uint32_t starting_lba,
                 uint32_t size_in_lba, uint8_t boot_indicator = 0) {
  const uint64_t e = sector_offset + mbr::kOffPartitionRecord + index * mbr::kPartitionRecordSize;
  disk.Put8(e + mbr::kOffBootIndicator, boot_indicator);
  disk.Put8(e + mbr::kOffOSType, os_type);
  disk.PutLE32(e + mbr::kOffStartingLBA, starting_lba);
  disk.PutLE32(e + mbr::kOffSizeInLBA, size_in_lba);
}

void Sign(Disk& disk, uint64_t sector_offset) { disk.PutLE16(sector_offset + mbr::kOffSignature, mbr::kSignature); }

uint32_t Crc32(std::span<const uint8_t> bytes) {
  return static_cast<uint32_t>(crc32_z(crc32_z(0, nullptr, 0), bytes.data(), bytes.size()));
}

// A GUID from its text, as GPT stores it (first three fields little-endian).
std::array<uint8_t, 16> Guid(const std::string& text) {
  std::string hex = text;
  hex.erase(std::remove(hex.begin(), hex.end(), '-'), hex.end());
  std::array<uint8_t, 16> b{};
  for (int i = 0; i < 16; ++i) {
    int v = 0;
    EXPECT_TRUE(absl::SimpleHexAtoi(hex.substr(2 * i, 2), &v)) << text;
    b[i] = static_cast<uint8_t>(v);
  }
  std::reverse(b.begin(), b.begin() + 4);
  std::reverse(b.begin() + 4, b.begin() + 6);
  std::reverse(b.begin() + 6, b.begin() + 8);
  return b;
}

const std::string kLinuxFs = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const std::string kLinuxSwap = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";

struct GptEntrySpec {
  uint32_t index = 0;
  std::string type = kLinuxFs;
  std::string uuid = {};  // empty: made from the index
  uint64_t starting_lba = 0;
  uint64_t ending_lba = 0;
  std::u16string name = {};
};

struct GptSpec {
  uint32_t sector_size = 512;
  uint32_t entry_size = 128;
  uint32_t entry_count = 128;
  std::vector<GptEntrySpec> entries;
};

uint64_t LastLba(const Disk& disk, const GptSpec& spec) { return disk.size() / spec.sector_size - 1; }
uint64_t PrimaryHeader(const GptSpec& spec) { return spec.sector_size; }
uint64_t BackupHeader(const Disk& disk, const GptSpec& spec) { return LastLba(disk, spec) * spec.sector_size; }

// The CRC of the header at `offset`, after changing its fields.
void FixHeaderCrc(Disk& disk, uint64_t offset) {
  const uint32_t size = disk.LE32(offset + gpt::kOffHeaderSize);
  disk.PutLE32(offset + gpt::kOffHeaderCRC32, 0);
  disk.PutLE32(offset + gpt::kOffHeaderCRC32, Crc32(disk.Read(offset, std::min<uint32_t>(size, 4096))));
}

// A protective MBR, both headers and both entry arrays.
void WriteGpt(Disk& disk, const GptSpec& spec) {
  const uint64_t ss = spec.sector_size;
  const uint64_t last = LastLba(disk, spec);
  const uint64_t array_bytes = uint64_t{spec.entry_size} * spec.entry_count;
  const uint64_t array_sectors = (array_bytes + ss - 1) / ss;
  PutMbrEntry(disk, 0, 0, mbr::kTypeGptProtective, 1,
              static_cast<uint32_t>(std::min<uint64_t>(last, UINT32_MAX)));
  Sign(disk, 0);

  Bytes array(array_bytes);
  for (const GptEntrySpec& e : spec.entries) {
    uint8_t* p = array.data() + uint64_t{e.index} * spec.entry_size;
    const auto type = Guid(e.type);
    const auto uuid = Guid(e.uuid.empty() ? absl::StrFormat("11111111-2222-3333-4444-%012X", e.index + 1) : e.uuid);
    std::copy(type.begin(), type.end(), p + gpt::kOffPartitionTypeGUID);
    std::copy(uuid.begin(), uuid.end(), p + gpt::kOffUniquePartitionGUID);
    StoreLE64(p + gpt::kOffStartingLBA, e.starting_lba);
    StoreLE64(p + gpt::kOffEndingLBA, e.ending_lba);
    for (size_t i = 0; i < e.name.size() && i < gpt::kPartitionNameBytes / 2; ++i) {
      StoreLE16(p + gpt::kOffPartitionName + 2 * i, static_cast<uint16_t>(e.name[i]));
    }
  }
  const uint32_t array_crc = Crc32(array);

  // The primary: header at LBA 1, array from LBA 2. The backup: header at
  // the last LBA, array just before it.
  for (bool backup : {false, true}) {
    const uint64_t my_lba = backup ? last : 1;
    const uint64_t entry_lba = backup ? last - array_sectors : 2;
    Bytes h(ss);
    StoreLE64(h.data() + gpt::kOffSignature, gpt::kSignature);
    StoreLE32(h.data() + gpt::kOffRevision, 0x00010000);
    StoreLE32(h.data() + gpt::kOffHeaderSize, gpt::kMinHeaderSize);
    StoreLE64(h.data() + gpt::kOffMyLBA, my_lba);
    StoreLE64(h.data() + gpt::kOffAlternateLBA, backup ? 1 : last);
    StoreLE64(h.data() + gpt::kOffFirstUsableLBA, 2 + array_sectors);
    StoreLE64(h.data() + gpt::kOffLastUsableLBA, last - array_sectors - 1);
    StoreLE64(h.data() + gpt::kOffPartitionEntryLBA, entry_lba);
    StoreLE32(h.data() + gpt::kOffNumberOfPartitionEntries, spec.entry_count);
    StoreLE32(h.data() + gpt::kOffSizeOfPartitionEntry, spec.entry_size);
    StoreLE32(h.data() + gpt::kOffPartitionEntryArrayCRC32, array_crc);
    StoreLE32(h.data() + gpt::kOffHeaderCRC32, Crc32(std::span(h).first(gpt::kMinHeaderSize)));
    disk.Write(my_lba * ss, h);
    disk.Write(entry_lba * ss, array);
  }
}

// Sets a 32- or 64-bit field of both headers and fixes their CRCs.
void PatchBothHeaders(Disk& disk, const GptSpec& spec, uint32_t field, uint64_t value, int width) {
  for (uint64_t h : {PrimaryHeader(spec), BackupHeader(disk, spec)}) {
    if (width == 4) {
      disk.PutLE32(h + field, static_cast<uint32_t>(value));
    } else {
      disk.PutLE64(h + field, value);
    }
    FixHeaderCrc(disk, h);
  }
}

// --- Expectations ----------------------------------------------------------------

// A partition as a reference tool lists it, in 512-byte sectors.
struct Listed {
  uint32_t number = 0;
  uint64_t start = 0;
  uint64_t sectors = 0;
  std::string type;  // MBR: hex without 0x; GPT: GUID
  std::string uuid;  // GPT
  std::string name;  // GPT
};

std::string Describe(const PartitionTable& t) {
  std::string s = absl::StrCat("kind ", t.kind, ", sector ", t.sector_size, ":");
  for (const Partition& p : t.partitions) {
    absl::StrAppend(&s, " {", p.number, " ", p.offset, "+", p.length, " ", p.type, " \"", p.name, "\"}");
  }
  for (const std::string& w : t.warnings) absl::StrAppend(&s, "\n  warning: ", w);
  return s;
}

// Undoes sfdisk's and partx's \xHH escapes.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    int v = 0;
    if (s[i] == '\\' && i + 3 < s.size() && s[i + 1] == 'x' && absl::SimpleHexAtoi(s.substr(i + 2, 2), &v)) {
      out += static_cast<char>(v);
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

// `sfdisk -d`: "PATHN : start=S, size=N, type=T[, uuid=U][, name="X"]".
absl::StatusOr<std::vector<Listed>> SfdiskList(const std::string& path) {
  absl::StatusOr<std::string> out = RunChecked({"sfdisk", "-d", path});
  if (!out.ok()) return out.status();
  std::vector<Listed> listed;
  for (absl::string_view line : absl::StrSplit(*out, '\n')) {
    const size_t colon = line.find(" : ");
    if (colon == absl::string_view::npos || !absl::StartsWith(line, path)) continue;
    Listed l;
    const std::string node(absl::StripAsciiWhitespace(line.substr(path.size(), colon - path.size())));
    if (!absl::SimpleAtoi(node, &l.number)) return absl::InternalError(absl::StrCat("bad line: ", line));
    std::string rest(line.substr(colon + 3));
    if (const size_t name = rest.find("name=\""); name != std::string::npos) {
      const size_t close = rest.find('"', name + 6);
      l.name = Unescape(rest.substr(name + 6, close - name - 6));
      rest.erase(name);
    }
    for (absl::string_view field : absl::StrSplit(rest, ',', absl::SkipWhitespace())) {
      std::pair<std::string, std::string> kv = absl::StrSplit(field, absl::MaxSplits('=', 1));
      const std::string key(absl::StripAsciiWhitespace(kv.first));
      const std::string value(absl::StripAsciiWhitespace(kv.second));
      if (key == "start") (void)absl::SimpleAtoi(value, &l.start);
      if (key == "size") (void)absl::SimpleAtoi(value, &l.sectors);
      if (key == "type") l.type = value;
      if (key == "uuid") l.uuid = value;
    }
    listed.push_back(l);
  }
  return listed;
}

// `partx -g -r -o NR,START,SECTORS,TYPE,UUID,NAME` (libblkid).
absl::StatusOr<std::vector<Listed>> PartxList(const std::string& path) {
  absl::StatusOr<std::string> out = RunChecked({"partx", "-g", "-r", "-o", "NR,START,SECTORS,TYPE,UUID,NAME", path});
  if (!out.ok()) return out.status();
  std::vector<Listed> listed;
  for (absl::string_view line : absl::StrSplit(*out, '\n', absl::SkipEmpty())) {
    std::vector<std::string> f = absl::StrSplit(line, ' ');
    f.resize(6);
    Listed l;
    if (!absl::SimpleAtoi(f[0], &l.number) || !absl::SimpleAtoi(f[1], &l.start) ||
        !absl::SimpleAtoi(f[2], &l.sectors)) {
      return absl::InternalError(absl::StrCat("bad partx line: ", line));
    }
    l.type = absl::AsciiStrToUpper(absl::StripPrefix(f[3], "0x"));
    l.uuid = f[4];
    l.name = Unescape(f[5]);
    listed.push_back(l);
  }
  return listed;
}

bool IsExtendedType(const std::string& hex) {
  int v = 0;
  return absl::SimpleHexAtoi(hex, &v) && (v == 0x05 || v == 0x0f || v == 0x85);
}

// The decoded table lists exactly the partitions `listed` does, extended
// partitions left out (the decoder does not list them). With `gpt`, type
// and UUID are GUIDs, and `compare_uuid_name` compares the UUID and name.
void ExpectSame(const PartitionTable& table, std::vector<Listed> listed, bool gpt, bool compare_uuid_name,
                const std::string& tool) {
  SCOPED_TRACE(tool + " vs " + Describe(table));
  if (!gpt) std::erase_if(listed, [](const Listed& l) { return IsExtendedType(l.type); });
  std::sort(listed.begin(), listed.end(), [](const Listed& a, const Listed& b) { return a.number < b.number; });
  ASSERT_EQ(table.partitions.size(), listed.size());
  for (size_t i = 0; i < listed.size(); ++i) {
    const Partition& p = table.partitions[i];
    const Listed& l = listed[i];
    EXPECT_EQ(p.number, l.number);
    EXPECT_EQ(p.offset, l.start * kSector) << "partition " << l.number;
    EXPECT_EQ(p.length, l.sectors * kSector) << "partition " << l.number;
    if (gpt) {
      EXPECT_EQ(p.type, absl::AsciiStrToUpper(l.type)) << "partition " << l.number;
      if (compare_uuid_name) {
        EXPECT_EQ(p.uuid, absl::AsciiStrToUpper(l.uuid)) << "partition " << l.number;
        EXPECT_EQ(p.name, l.name) << "partition " << l.number;
      }
    } else {
      int want = 0;
      ASSERT_TRUE(absl::SimpleHexAtoi(l.type, &want)) << l.type;
      EXPECT_EQ(p.type, absl::StrFormat("0x%02x", want)) << "partition " << l.number;
    }
  }
}

::testing::AssertionResult HasWarning(const PartitionTable& table, const std::string& text) {
  for (const std::string& w : table.warnings) {
    if (absl::StrContains(w, text)) return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no warning contains \"" << text << "\": " << Describe(table);
}

::testing::AssertionResult FailsWith(const absl::StatusOr<PartitionTable>& result, absl::StatusCode code,
                                     const std::vector<std::string>& texts) {
  if (result.ok()) return ::testing::AssertionFailure() << "decoded: " << Describe(*result);
  for (const std::string& text : texts) {
    if (result.status().code() != code || !absl::StrContains(result.status().message(), text)) {
      return ::testing::AssertionFailure() << "got " << result.status() << "; want code "
                                           << absl::StatusCodeToString(code) << " and \"" << text << "\"";
    }
  }
  return ::testing::AssertionSuccess();
}

std::vector<uint32_t> Numbers(const PartitionTable& table) {
  std::vector<uint32_t> n;
  for (const Partition& p : table.partitions) n.push_back(p.number);
  return n;
}

// --- Tables made by sfdisk and fdisk -------------------------------------------

class PartitionTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<TempDir> dir = TempDir::Create("parttable");
    ASSERT_OK(dir);
    dir_ = std::make_unique<TempDir>(std::move(*dir));
  }

  // A sparse raw file of `size` bytes, partitioned by sfdisk from `script`.
  std::string Sfdisk(const std::string& name, uint64_t size, const std::string& script) {
    const std::string path = dir_->Join(name);
    const std::string script_path = path + ".sfdisk";
    std::ofstream(script_path) << script;
    EXPECT_OK(RunChecked({"truncate", "-s", std::to_string(size), path}));
    EXPECT_OK(RunChecked({"sh", "-c", "sfdisk -q \"$1\" < \"$2\"", "sh", path, script_path}));
    return path;
  }

  std::unique_ptr<TempDir> dir_;
};

const std::string kGptScript =
    "label: gpt\n"
    "size=8M, type=L, name=\"root fs\"\n"
    "size=4M, type=S\n"
    "size=10M, type=L, name=\"daten \xc3\xbc\"\n"
    "size=3M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"efi\"\n"
    "type=L\n";

TEST_F(PartitionTableTest, GptAgreesWithSfdiskAndPartx) {
  const std::string path = Sfdisk("gpt.raw", 64 * kMiB, kGptScript);
  // An unused entry keeps its number unused: partition 2 goes.
  ASSERT_OK(RunChecked({"sfdisk", "-q", "--delete", path, "2"}));
  ASSERT_OK_AND_ASSIGN(Disk disk, Disk::Load(path));
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kGpt);
  EXPECT_EQ(table.sector_size, 512u);
  EXPECT_TRUE(table.warnings.empty()) << Describe(table);
  EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 3, 4, 5}));
  ASSERT_OK_AND_ASSIGN(std::vector<Listed> sfdisk, SfdiskList(path));
  ExpectSame(table, sfdisk, /*gpt=*/true, /*compare_uuid_name=*/true, "sfdisk -d");
  ASSERT_OK_AND_ASSIGN(std::vector<Listed> partx, PartxList(path));
  ExpectSame(table, partx, /*gpt=*/true, /*compare_uuid_name=*/true, "partx");
}

// MBR primaries, an extended partition of each type, logical partitions
// 5, 6 and 7 in chain order.
class MbrTest : public PartitionTableTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(MbrTest, AgreesWithSfdiskAndPartx) {
  const std::string script = absl::StrCat(
      "label: dos\n"
      "start=2048, size=8M, type=83, bootable\n"
      "size=40M, type=", GetParam(), "\n"
      "size=4M, type=82\n"
      "size=2M, type=83\n"
      "size=6M, type=83\n"
      "size=5M, type=8e\n"
      "size=7M, type=c\n");
  const std::string path = Sfdisk("mbr.raw", 64 * kMiB, script);
  ASSERT_OK_AND_ASSIGN(Disk disk, Disk::Load(path));
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kMbr);
  EXPECT_TRUE(table.warnings.empty()) << Describe(table);
  EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 3, 4, 5, 6, 7}));
  ASSERT_OK_AND_ASSIGN(std::vector<Listed> sfdisk, SfdiskList(path));
  ASSERT_EQ(sfdisk.size(), 7u);
  ExpectSame(table, sfdisk, /*gpt=*/false, false, "sfdisk -d");
  ASSERT_OK_AND_ASSIGN(std::vector<Listed> partx, PartxList(path));
  ExpectSame(table, partx, /*gpt=*/false, false, "partx");
  // Logical partitions lie inside the extended one (2 MiB in, after their EBRs).
  EXPECT_EQ(table.partitions[3].offset, 10 * kMiB);
  EXPECT_EQ(table.partitions[3].type, "0x83");
  EXPECT_EQ(table.partitions[5].type, "0x0c");
}

INSTANTIATE_TEST_SUITE_P(ExtendedTypes, MbrTest, ::testing::Values("5", "f", "85"));

TEST_F(PartitionTableTest, MbrWithOnlyLogicalPartitions) {
  // Entries 1, 3 and 4 unused; the extended partition holds 5 and 6.
  const std::string path = Sfdisk("logical.raw", 32 * kMiB,
                                  "label: dos\n"
                                  "logical.raw2 : start=2048, size=40960, type=5\n"
                                  "logical.raw5 : start=4096, size=8192, type=83\n"
                                  "logical.raw6 : start=14336, size=8192, type=83\n");
  ASSERT_OK_AND_ASSIGN(Disk disk, Disk::Load(path));
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{5, 6})) << Describe(table);
  ASSERT_OK_AND_ASSIGN(std::vector<Listed> partx, PartxList(path));
  ExpectSame(table, partx, /*gpt=*/false, false, "partx");
}

TEST_F(PartitionTableTest, NoTable) {
  EXPECT_EQ(Disk(0).Decode()->kind, PartitionTable::kNone);
  EXPECT_EQ(Disk(511).Decode()->kind, PartitionTable::kNone);
  ASSERT_OK_AND_ASSIGN(PartitionTable empty, Disk(64 * kMiB).Decode());
  EXPECT_EQ(empty.kind, PartitionTable::kNone);
  EXPECT_TRUE(empty.partitions.empty());

  // A whole-disk file system.
  const std::string path = dir_->Join("ext4.raw");
  ASSERT_OK(RunChecked({"truncate", "-s", "16M", path}));
  ASSERT_OK(RunChecked({"mkfs.ext4", "-q", "-F", path}));
  ASSERT_OK_AND_ASSIGN(Disk ext4, Disk::Load(path));
  ASSERT_OK_AND_ASSIGN(PartitionTable table, ext4.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kNone) << Describe(table);
  EXPECT_TRUE(table.partitions.empty());
}

TEST_F(PartitionTableTest, BootSectorIsNotAnMbr) {
  // A FAT boot sector ends in 0x55AA too; its code lies where entries do.
  Disk disk(8 * kMiB);
  PutMbrEntry(disk, 0, 0, 0x83, 2048, 2048);
  disk.Put8(mbr::kOffPartitionRecord + mbr::kPartitionRecordSize, 0x4e);  // entry 2's boot indicator
  Sign(disk, 0);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kNone);
  EXPECT_TRUE(table.partitions.empty());
  EXPECT_TRUE(HasWarning(table, "boot indicator 0x4e"));

  // 0x80 (active) is an MBR.
  disk.Put8(mbr::kOffPartitionRecord + mbr::kPartitionRecordSize, 0x80);
  ASSERT_OK_AND_ASSIGN(table, disk.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kMbr);
  EXPECT_EQ(Numbers(table), std::vector<uint32_t>{1});
}

TEST_F(PartitionTableTest, GptBackupUsedWhenPrimaryHeaderDamaged) {
  const std::string path = Sfdisk("gpt.raw", 64 * kMiB, kGptScript);
  ASSERT_OK_AND_ASSIGN(Disk disk, Disk::Load(path));
  ASSERT_OK_AND_ASSIGN(PartitionTable good, disk.Decode());
  ASSERT_EQ(good.partitions.size(), 5u);

  // One byte of the DiskGUID: the header's CRC no longer matches.
  disk.Put8(kSector + gpt::kOffDiskGUID, disk.Read(kSector + gpt::kOffDiskGUID, 1)[0] ^ 1);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kGpt);
  EXPECT_EQ(table.partitions, good.partitions);
  EXPECT_TRUE(HasWarning(table, "primary GPT header at byte 512 is not valid (HeaderCRC32 is"));
  EXPECT_TRUE(HasWarning(table, absl::StrCat("backup GPT header at byte ", 64 * kMiB - kSector, " is used")));

  // Gone altogether: the same.
  disk.Zero(kSector, kSector);
  ASSERT_OK_AND_ASSIGN(table, disk.Decode());
  EXPECT_EQ(table.partitions, good.partitions);
  EXPECT_TRUE(HasWarning(table, "primary GPT header at byte 512 is not valid (no \"EFI PART\" signature)"));
}

TEST_F(PartitionTableTest, GptBackupUsedWhenPrimaryEntriesDamaged) {
  const std::string path = Sfdisk("gpt.raw", 64 * kMiB, kGptScript);
  ASSERT_OK_AND_ASSIGN(Disk disk, Disk::Load(path));
  ASSERT_OK_AND_ASSIGN(PartitionTable good, disk.Decode());
  // Partition 1's starting LBA, in the primary array at LBA 2.
  disk.PutLE64(2 * kSector + gpt::kOffStartingLBA, 4096);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(table.partitions, good.partitions);
  EXPECT_TRUE(HasWarning(table, "(PartitionEntryArrayCRC32 is"));
}

TEST_F(PartitionTableTest, GptBothDamaged) {
  const std::string path = Sfdisk("gpt.raw", 64 * kMiB, kGptScript);
  ASSERT_OK_AND_ASSIGN(Disk disk, Disk::Load(path));
  const uint64_t backup = 64 * kMiB - kSector;
  disk.PutLE64(2 * kSector + gpt::kOffStartingLBA, 4096);  // primary entries
  disk.Put8(backup + gpt::kOffDiskGUID, 0x5a);             // backup header
  EXPECT_TRUE(FailsWith(disk.Decode(), absl::StatusCode::kDataLoss,
                        {"no GPT header is valid", "primary GPT header at byte 512: PartitionEntryArrayCRC32 is",
                         absl::StrCat("backup GPT header at byte ", backup, ": HeaderCRC32 is")}));
}

TEST_F(PartitionTableTest, ProtectiveMbrWithoutGpt) {
  Disk disk(8 * kMiB);
  PutMbrEntry(disk, 0, 0, mbr::kTypeGptProtective, 1, 16383);
  Sign(disk, 0);
  EXPECT_TRUE(FailsWith(disk.Decode(), absl::StatusCode::kDataLoss,
                        {"primary GPT header at byte 512: no \"EFI PART\" signature",
                         "backup GPT header at byte 8388096: no \"EFI PART\" signature"}));
  // A disk of one sector has no room for a GPT header.
  Disk tiny(kSector);
  PutMbrEntry(tiny, 0, 0, mbr::kTypeGptProtective, 1, 1);
  Sign(tiny, 0);
  EXPECT_TRUE(FailsWith(tiny.Decode(), absl::StatusCode::kDataLoss, {"too small for a GPT"}));
}

TEST_F(PartitionTableTest, HybridMbrIsReadAsGpt) {
  const std::string path = Sfdisk("gpt.raw", 64 * kMiB, kGptScript);
  ASSERT_OK_AND_ASSIGN(Disk disk, Disk::Load(path));
  ASSERT_OK_AND_ASSIGN(PartitionTable good, disk.Decode());
  // A hybrid MBR: partition 1 also in MBR entry 2, the 0xee entry first.
  PutMbrEntry(disk, 0, 0, mbr::kTypeGptProtective, 1, 2047);
  PutMbrEntry(disk, 0, 1, 0x83, 2048, 16384, 0x80);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kGpt);
  EXPECT_EQ(table.partitions, good.partitions);
  // And with the 0xee entry last.
  PutMbrEntry(disk, 0, 0, 0x83, 2048, 16384);
  PutMbrEntry(disk, 0, 3, mbr::kTypeGptProtective, 1, 2047);
  ASSERT_OK_AND_ASSIGN(table, disk.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kGpt);
  EXPECT_EQ(table.partitions, good.partitions);
}

TEST_F(PartitionTableTest, Gpt4096ByteSectors) {
  // fdisk lays the table out in 4096-byte sectors: header at byte 4096.
  const std::string path = dir_->Join("4k.raw");
  ASSERT_OK(RunChecked({"truncate", "-s", "16M", path}));
  ASSERT_OK(RunChecked({"sh", "-c", "printf 'g\\nn\\n\\n\\n+2M\\nn\\n\\n\\n+3M\\nw\\n' | fdisk -b 4096 \"$1\"",
                        "sh", path}));
  ASSERT_OK_AND_ASSIGN(Disk disk, Disk::Load(path));
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kGpt);
  EXPECT_EQ(table.sector_size, 4096u);
  EXPECT_TRUE(table.warnings.empty()) << Describe(table);
  // fdisk -l -b 4096 says: start 256, 512 sectors; start 768, 768 sectors.
  ASSERT_EQ(Numbers(table), (std::vector<uint32_t>{1, 2}));
  EXPECT_EQ(table.partitions[0].offset, 1 * kMiB);
  EXPECT_EQ(table.partitions[0].length, 2 * kMiB);
  EXPECT_EQ(table.partitions[1].offset, 3 * kMiB);
  EXPECT_EQ(table.partitions[1].length, 3 * kMiB);
  EXPECT_EQ(table.partitions[0].type, kLinuxFs);

  // The primary damaged: the backup, in the last 4096-byte sector.
  const PartitionTable good = table;
  disk.Put8(4096 + gpt::kOffDiskGUID, disk.Read(4096 + gpt::kOffDiskGUID, 1)[0] ^ 1);
  ASSERT_OK_AND_ASSIGN(table, disk.Decode());
  EXPECT_EQ(table.partitions, good.partitions);
  EXPECT_TRUE(HasWarning(table, absl::StrCat("backup GPT header at byte ", 16 * kMiB - 4096, " is used")));

  // Both damaged: the error names the 4096-byte headers.
  disk.Put8(16 * kMiB - 4096 + gpt::kOffDiskGUID, 0x5a);
  EXPECT_TRUE(FailsWith(disk.Decode(), absl::StatusCode::kDataLoss,
                        {"primary GPT header at byte 4096: HeaderCRC32",
                         absl::StrCat("backup GPT header at byte ", 16 * kMiB - 4096, ": HeaderCRC32")}));
}

TEST_F(PartitionTableTest, ShrunkDisk) {
  // MBR: partitions past the new end go, the one across it is cut.
  const std::string mbr_path = Sfdisk("mbr.raw", 64 * kMiB,
                                      "label: dos\n"
                                      "start=2048, size=8M, type=83\n"
                                      "size=20M, type=83\n"
                                      "size=20M, type=83\n");
  ASSERT_OK(RunChecked({"truncate", "-s", "20M", mbr_path}));
  ASSERT_OK_AND_ASSIGN(Disk mbr_disk, Disk::Load(mbr_path));
  ASSERT_OK_AND_ASSIGN(PartitionTable table, mbr_disk.Decode());
  EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 2}));
  EXPECT_EQ(table.partitions[1].offset, 9 * kMiB);
  EXPECT_EQ(table.partitions[1].length, 11 * kMiB);
  EXPECT_TRUE(HasWarning(table, "partition 2 (MBR entry 2) ends at byte 30408704, past the end of the disk "
                                "(20971520 bytes): cut to 11534336 bytes"));
  EXPECT_TRUE(HasWarning(table, "partition 3 (MBR entry 3) starts at byte 30408704"));

  // GPT: the primary's usable LBAs run past the end, the backup is gone.
  const std::string gpt_path = Sfdisk("gpt.raw", 64 * kMiB, kGptScript);
  ASSERT_OK(RunChecked({"truncate", "-s", "20M", gpt_path}));
  ASSERT_OK_AND_ASSIGN(Disk gpt_disk, Disk::Load(gpt_path));
  EXPECT_TRUE(FailsWith(gpt_disk.Decode(), absl::StatusCode::kDataLoss,
                        {"primary GPT header at byte 512: the usable LBAs (2048 to 131038) are not a range on the "
                         "disk, whose last LBA is 40959"}));
}

// --- Hand-built GPTs ------------------------------------------------------------

TEST(PartitionTableGptTest, EntrySizes) {
  for (uint32_t entry_size : {128u, 136u, 256u, 512u, 4096u}) {
    SCOPED_TRACE(entry_size);
    Disk disk(16 * kMiB);
    GptSpec spec;
    spec.entry_size = entry_size;
    spec.entry_count = 16;
    spec.entries = {{.index = 0, .starting_lba = 2048, .ending_lba = 4095, .name = u"one"},
                    {.index = 2, .type = kLinuxSwap, .starting_lba = 4096, .ending_lba = 8191},
                    {.index = 15, .starting_lba = 10000, .ending_lba = 10000, .name = u"last"}};
    WriteGpt(disk, spec);
    ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
    EXPECT_TRUE(table.warnings.empty()) << Describe(table);
    ASSERT_EQ(Numbers(table), (std::vector<uint32_t>{1, 3, 16}));
    EXPECT_EQ(table.partitions[0], (Partition{1, 2048 * kSector, 2048 * kSector, kLinuxFs,
                                              "11111111-2222-3333-4444-000000000001", "one"}));
    EXPECT_EQ(table.partitions[1], (Partition{3, 4096 * kSector, 4096 * kSector, kLinuxSwap,
                                              "11111111-2222-3333-4444-000000000003", ""}));
    EXPECT_EQ(table.partitions[2], (Partition{16, 10000 * kSector, kSector, kLinuxFs,
                                              "11111111-2222-3333-4444-000000000010", "last"}));
  }
  for (uint32_t entry_size : {0u, 64u, 127u, 130u}) {
    SCOPED_TRACE(entry_size);
    Disk disk(16 * kMiB);
    GptSpec spec;
    spec.entry_size = 128;
    spec.entries = {{.index = 0, .starting_lba = 2048, .ending_lba = 4095}};
    WriteGpt(disk, spec);
    PatchBothHeaders(disk, spec, gpt::kOffSizeOfPartitionEntry, entry_size, 4);
    EXPECT_TRUE(FailsWith(disk.Decode(), absl::StatusCode::kDataLoss,
                          {absl::StrFormat("primary GPT header at byte 512: SizeOfPartitionEntry %u is not",
                                           entry_size)}));
  }
}

TEST(PartitionTableGptTest, EntryArrayBounds) {
  // The largest array allowed: 8192 entries of 128 bytes (1 MiB), used.
  {
    Disk disk(16 * kMiB);
    GptSpec spec;
    spec.entry_count = 8192;
    spec.entries = {{.index = 8191, .starting_lba = 8192, .ending_lba = 9000}};
    WriteGpt(disk, spec);
    ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
    EXPECT_EQ(Numbers(table), std::vector<uint32_t>{8192});
  }
  // One entry more, a huge count, a huge entry size: refused before any
  // allocation (the CRCs match whatever the count claims).
  for (auto [count, size] : std::vector<std::pair<uint32_t, uint32_t>>{
           {8193, 128}, {0xffffffff, 128}, {2, 0x80000000}, {0xffffffff, 0xfffffff8}}) {
    SCOPED_TRACE(absl::StrCat(count, " x ", size));
    Disk disk(16 * kMiB);
    GptSpec spec;
    WriteGpt(disk, spec);
    PatchBothHeaders(disk, spec, gpt::kOffNumberOfPartitionEntries, count, 4);
    PatchBothHeaders(disk, spec, gpt::kOffSizeOfPartitionEntry, size, 4);
    EXPECT_TRUE(FailsWith(disk.Decode(), absl::StatusCode::kDataLoss,
                          {absl::StrFormat("primary GPT header at byte 512: its partition entry array (%u entries "
                                           "of %u bytes) is larger than the limit of 1048576 bytes",
                                           count, size)}));
  }
  // An array past the end of the disk, or so far that LBA x 512 overflows.
  for (uint64_t lba : {uint64_t{32767}, uint64_t{1} << 40, uint64_t{1} << 55, UINT64_MAX}) {
    SCOPED_TRACE(lba);
    Disk disk(16 * kMiB);
    GptSpec spec;
    WriteGpt(disk, spec);
    PatchBothHeaders(disk, spec, gpt::kOffPartitionEntryLBA, lba, 8);
    EXPECT_TRUE(FailsWith(disk.Decode(), absl::StatusCode::kDataLoss,
                          {absl::StrFormat("its partition entry array (16384 bytes at LBA %u) runs past the end",
                                           lba)}));
  }
  // No entries at all: a GPT with no partitions.
  Disk disk(16 * kMiB);
  GptSpec spec;
  spec.entry_count = 0;
  WriteGpt(disk, spec);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kGpt);
  EXPECT_TRUE(table.partitions.empty());
}

TEST(PartitionTableGptTest, HeaderFields) {
  struct Case {
    uint32_t field;
    uint64_t value;
    int width;
    std::string error;
  };
  const std::vector<Case> cases = {
      {gpt::kOffHeaderSize, 91, 4, "HeaderSize 91 is not between 92 and the sector size, 512"},
      {gpt::kOffHeaderSize, 513, 4, "HeaderSize 513 is not between"},
      {gpt::kOffHeaderSize, 0xffffffff, 4, "HeaderSize 4294967295 is not between"},
      {gpt::kOffMyLBA, 7, 8, "MyLBA is 7, not 1"},
      {gpt::kOffLastUsableLBA, 32768, 8, "the usable LBAs (34 to 32768) are not a range"},
      {gpt::kOffFirstUsableLBA, 40000, 8, "the usable LBAs (40000 to 32734) are not a range"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.error);
    Disk disk(16 * kMiB);
    GptSpec spec;
    spec.entries = {{.index = 0, .starting_lba = 2048, .ending_lba = 4095}};
    WriteGpt(disk, spec);
    PatchBothHeaders(disk, spec, c.field, c.value, c.width);
    EXPECT_TRUE(FailsWith(disk.Decode(), absl::StatusCode::kDataLoss, {"primary GPT header at byte 512: " + c.error}));
  }
  // A header larger than 92 bytes is checked over all of them.
  Disk disk(16 * kMiB);
  GptSpec spec;
  spec.entries = {{.index = 0, .starting_lba = 2048, .ending_lba = 4095}};
  WriteGpt(disk, spec);
  PatchBothHeaders(disk, spec, gpt::kOffHeaderSize, 512, 4);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(Numbers(table), std::vector<uint32_t>{1});
  disk.Put8(kSector + 500, 1);
  disk.Put8(BackupHeader(disk, spec) + 500, 1);
  EXPECT_TRUE(FailsWith(disk.Decode(), absl::StatusCode::kDataLoss, {"HeaderCRC32 is"}));
}

TEST(PartitionTableGptTest, PartitionsPastTheEnd) {
  Disk disk(16 * kMiB);  // LBAs 0 to 32767
  GptSpec spec;
  spec.entries = {
      {.index = 0, .starting_lba = 2048, .ending_lba = 4095},
      {.index = 1, .starting_lba = 32000, .ending_lba = 40000},            // across the end: cut
      {.index = 2, .starting_lba = 32768, .ending_lba = 40000},            // at the end: left out
      {.index = 3, .starting_lba = 30000, .ending_lba = UINT64_MAX},       // end overflows: cut
      {.index = 4, .starting_lba = UINT64_MAX / 2, .ending_lba = UINT64_MAX},  // start overflows: left out
      {.index = 5, .starting_lba = 4096, .ending_lba = 6000},              // overlaps 7: kept
      {.index = 6, .starting_lba = 5000, .ending_lba = 5000},
  };
  WriteGpt(disk, spec);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  ASSERT_EQ(Numbers(table), (std::vector<uint32_t>{1, 2, 4, 6, 7}));
  EXPECT_EQ(table.partitions[1].offset, 32000 * kSector);
  EXPECT_EQ(table.partitions[1].length, 768 * kSector);
  EXPECT_EQ(table.partitions[2].offset, 30000 * kSector);
  EXPECT_EQ(table.partitions[2].length, 2768 * kSector);
  EXPECT_EQ(table.partitions[4].offset, 5000 * kSector);
  EXPECT_EQ(table.partitions[4].length, kSector);
  EXPECT_TRUE(HasWarning(table, "partition 2 (GPT partition entry 1 at byte 1152) ends at byte 20480512, past the "
                                "end of the disk (16777216 bytes): cut to 393216 bytes"));
  EXPECT_TRUE(HasWarning(table, "partition 3 (GPT partition entry 2 at byte 1280) starts at byte 16777216"));
  EXPECT_TRUE(
      HasWarning(table, "partition 5 (GPT partition entry 4 at byte 1536) starts at byte 18446744073709551615"));
  for (const Partition& p : table.partitions) EXPECT_LE(p.offset + p.length, disk.size());
}

TEST(PartitionTableGptTest, EntryEndingBeforeItStarts) {
  Disk disk(16 * kMiB);
  GptSpec spec;
  spec.entries = {{.index = 0, .starting_lba = 2048, .ending_lba = 4095},
                  {.index = 3, .starting_lba = 5000, .ending_lba = 4999}};
  WriteGpt(disk, spec);
  EXPECT_TRUE(FailsWith(disk.Decode(), absl::StatusCode::kDataLoss,
                        {"GPT partition entry 3 (partition 4) at byte 1408 of the GPT at byte 512: EndingLBA 4999 is "
                         "before StartingLBA 5000"}));
}

TEST(PartitionTableGptTest, Names) {
  Disk disk(16 * kMiB);
  GptSpec spec;
  // Latin, CJK, a surrogate pair (U+1F600), an unpaired surrogate, then a
  // name that fills all 36 code units with no NUL.
  spec.entries = {{.index = 0, .starting_lba = 100, .ending_lba = 199, .name = u"na\u00efve \u6587"},
                  {.index = 1, .starting_lba = 200, .ending_lba = 299, .name = u"\U0001F600!"},
                  {.index = 2, .starting_lba = 300, .ending_lba = 399, .name = std::u16string(u"a\xd800z")},
                  {.index = 3, .starting_lba = 400, .ending_lba = 499, .name = std::u16string(36, u'x')}};
  WriteGpt(disk, spec);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  ASSERT_EQ(table.partitions.size(), 4u);
  EXPECT_EQ(table.partitions[0].name, "na\xc3\xafve \xe6\x96\x87");
  EXPECT_EQ(table.partitions[1].name, "\xf0\x9f\x98\x80!");
  EXPECT_EQ(table.partitions[2].name, "a\xef\xbf\xbdz");
  EXPECT_EQ(table.partitions[3].name, std::string(36, 'x'));
}

// --- Hand-built MBRs and EBR chains ------------------------------------------------

// An MBR whose entry 2 is an extended partition at LBA 2048 of `sectors`.
Disk ExtendedDisk(uint64_t disk_size, uint32_t sectors, uint8_t type = mbr::kTypeExtended) {
  Disk disk(disk_size);
  PutMbrEntry(disk, 0, 0, 0x83, 64, 1984);
  PutMbrEntry(disk, 0, 1, type, 2048, sectors);
  Sign(disk, 0);
  return disk;
}

constexpr uint64_t kExtStart = 2048 * kSector;

// The EBR `at` sectors into the extended partition: a logical partition of
// `data_sectors` one sector after it, and a link to the EBR `next` sectors
// into the extended partition (none if 0).
void PutEbr(Disk& disk, uint32_t at, uint32_t data_sectors, uint32_t next, uint8_t link_type = mbr::kTypeExtended) {
  const uint64_t ebr = kExtStart + uint64_t{at} * kSector;
  if (data_sectors > 0) PutMbrEntry(disk, ebr, 0, 0x83, 1, data_sectors);
  if (next > 0) PutMbrEntry(disk, ebr, 1, link_type, next, data_sectors + 1);
  Sign(disk, ebr);
}

TEST(PartitionTableMbrTest, EbrLoop) {
  Disk disk = ExtendedDisk(16 * kMiB, 8192);
  PutEbr(disk, 0, 100, 1000);
  PutEbr(disk, 1000, 100, 2000);
  PutEbr(disk, 2000, 100, 0);
  PutMbrEntry(disk, kExtStart + 2000 * kSector, 1, mbr::kTypeExtended, 1000, 10);  // back to the second
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 5, 6, 7}));
  EXPECT_EQ(table.partitions[2].offset, kExtStart + 1001 * kSector);
  EXPECT_TRUE(HasWarning(table, absl::StrCat("loops back to the EBR at byte ", kExtStart + 1000 * kSector)));

  // An EBR that links to itself.
  Disk self = ExtendedDisk(16 * kMiB, 8192);
  PutEbr(self, 0, 100, 0);
  PutMbrEntry(self, kExtStart, 1, mbr::kTypeExtended, 0, 10);
  ASSERT_OK_AND_ASSIGN(table, self.Decode());
  EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 5}));
  EXPECT_TRUE(HasWarning(table, absl::StrCat("loops back to the EBR at byte ", kExtStart)));
}

TEST(PartitionTableMbrTest, LongChainIsCut) {
  Disk disk = ExtendedDisk(64 * kMiB, 100000);
  constexpr uint32_t kEbrs = 300;
  for (uint32_t i = 0; i < kEbrs; ++i) PutEbr(disk, i * 10, 9, i + 1 < kEbrs ? (i + 1) * 10 : 0);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  ASSERT_EQ(table.partitions.size(), 1 + kMaxEbrLinks);
  EXPECT_EQ(table.partitions.back().number, 4 + kMaxEbrLinks);
  EXPECT_TRUE(HasWarning(table, "the EBR chains hold more than 128 EBRs"));
}

TEST(PartitionTableMbrTest, EbrChainEnds) {
  // A link outside the extended partition.
  {
    Disk disk = ExtendedDisk(16 * kMiB, 4096);
    PutEbr(disk, 0, 100, 200);
    PutEbr(disk, 200, 100, 4096);
    PutEbr(disk, 4096, 100, 0);  // a valid EBR, but outside
    ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
    EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 5, 6}));
    EXPECT_TRUE(HasWarning(table, "outside the extended partition (partition 2, bytes 1048576 to 3145728)"));
  }
  // An extended partition larger than the disk, a link past the end.
  {
    Disk disk = ExtendedDisk(2 * kMiB, 0xffffffff);
    PutEbr(disk, 0, 100, 0xfffff000);
    ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
    EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 5}));
    EXPECT_TRUE(HasWarning(table, "lies past the end of the disk (2097152 bytes)"));
  }
  // An EBR without a signature; a first EBR without one is no warning.
  {
    Disk disk = ExtendedDisk(16 * kMiB, 8192);
    PutEbr(disk, 0, 100, 200);
    ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
    EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 5}));
    EXPECT_TRUE(HasWarning(table, absl::StrCat("the EBR at byte ", kExtStart + 200 * kSector,
                                               " has no 0x55AA signature")));
    Disk blank = ExtendedDisk(16 * kMiB, 8192);
    ASSERT_OK_AND_ASSIGN(table, blank.Decode());
    EXPECT_EQ(Numbers(table), std::vector<uint32_t>{1});
    EXPECT_TRUE(table.warnings.empty()) << Describe(table);
  }
  // A link entry that is no link, and an extended type where the logical
  // partition belongs.
  {
    Disk disk = ExtendedDisk(16 * kMiB, 8192);
    PutEbr(disk, 0, 100, 200, /*link_type=*/0x83);
    ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
    EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 5}));
    EXPECT_TRUE(HasWarning(table, "has a partition of type 0x83 in entry 2"));

    Disk odd = ExtendedDisk(16 * kMiB, 8192);
    PutEbr(odd, 0, 0, 200);
    PutMbrEntry(odd, kExtStart, 0, mbr::kTypeExtendedLba, 1, 100);
    PutEbr(odd, 200, 100, 0);
    ASSERT_OK_AND_ASSIGN(table, odd.Decode());
    EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 5}));
    EXPECT_EQ(table.partitions[1].offset, kExtStart + 201 * kSector);
    EXPECT_TRUE(HasWarning(table, "has an extended partition (type 0x0f) in entry 1"));
  }
  // An EBR with no logical partition (size 0) uses no number.
  {
    Disk disk = ExtendedDisk(16 * kMiB, 8192);
    PutEbr(disk, 0, 0, 200);
    PutEbr(disk, 200, 100, 0);
    ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
    EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 5}));
    EXPECT_EQ(table.partitions[1].offset, kExtStart + 201 * kSector);
  }
}

TEST(PartitionTableMbrTest, TwoExtendedPartitionsNumberOnFromEachOther) {
  Disk disk = ExtendedDisk(16 * kMiB, 4096);
  PutEbr(disk, 0, 100, 200);
  PutEbr(disk, 200, 100, 0);
  PutMbrEntry(disk, 0, 3, mbr::kTypeExtendedLinux, 8192, 4096);
  const uint64_t second = 8192 * kSector;
  PutMbrEntry(disk, second, 0, 0x82, 1, 50);
  Sign(disk, second);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 5, 6, 7}));
  EXPECT_EQ(table.partitions[3].offset, second + kSector);
  EXPECT_EQ(table.partitions[3].type, "0x82");
}

TEST(PartitionTableMbrTest, UnusedOverlappingAndPastTheEnd) {
  Disk disk(8 * kMiB);  // 16384 sectors
  PutMbrEntry(disk, 0, 0, 0x83, 2048, 4096);
  PutMbrEntry(disk, 0, 1, 0x83, 4096, 0);          // no sectors: unused
  PutMbrEntry(disk, 0, 2, 0x00, 4096, 100);        // type 0: unused
  PutMbrEntry(disk, 0, 3, 0x07, 3000, 0xffffffff);  // overlaps 1, runs past the end
  Sign(disk, 0);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  ASSERT_EQ(Numbers(table), (std::vector<uint32_t>{1, 4}));
  EXPECT_EQ(table.partitions[1].offset, 3000 * kSector);
  EXPECT_EQ(table.partitions[1].length, (16384 - 3000) * kSector);
  EXPECT_EQ(table.partitions[1].type, "0x07");
  EXPECT_TRUE(HasWarning(table, "partition 4 (MBR entry 4)"));

  // All four unused: an MBR with no partitions.
  Disk empty(8 * kMiB);
  Sign(empty, 0);
  ASSERT_OK_AND_ASSIGN(table, empty.Decode());
  EXPECT_EQ(table.kind, PartitionTable::kMbr);
  EXPECT_TRUE(table.partitions.empty());
}

TEST(PartitionTableMbrTest, ReadErrorsAreReturned) {
  Disk disk = ExtendedDisk(16 * kMiB, 8192);
  PutEbr(disk, 0, 100, 200);
  PutEbr(disk, 200, 100, 0);
  EXPECT_TRUE(FailsWith(disk.Decode(0), absl::StatusCode::kUnavailable,
                        {"reading the MBR at byte 0: injected read error"}));
  EXPECT_TRUE(FailsWith(disk.Decode(kExtStart + 200 * kSector), absl::StatusCode::kUnavailable,
                        {absl::StrCat("reading the EBR at byte ", kExtStart + 200 * kSector)}));

  Disk gpt_disk(16 * kMiB);
  WriteGpt(gpt_disk, GptSpec{});
  EXPECT_TRUE(FailsWith(gpt_disk.Decode(512), absl::StatusCode::kUnavailable, {"reading the GPT header at byte 512"}));
  EXPECT_TRUE(FailsWith(gpt_disk.Decode(1024), absl::StatusCode::kUnavailable,
                        {"reading the GPT partition entry array at byte 1024"}));
}

TEST(PartitionTableMbrTest, HugeDisk) {
  // Offsets near 2^64: nothing overflows, nothing is read past the end.
  Disk disk(UINT64_MAX - 1000);
  PutMbrEntry(disk, 0, 0, 0x83, 0xfffffff0, 0xffffffff);
  PutMbrEntry(disk, 0, 1, mbr::kTypeExtended, 0xffff0000, 0xffffffff);
  Sign(disk, 0);
  const uint64_t ebr = uint64_t{0xffff0000} * kSector;
  PutMbrEntry(disk, ebr, 0, 0x83, 0xffffffff, 0xffffffff);
  PutMbrEntry(disk, ebr, 1, mbr::kTypeExtended, 0xffff, 1);
  Sign(disk, ebr);
  ASSERT_OK_AND_ASSIGN(PartitionTable table, disk.Decode());
  EXPECT_EQ(Numbers(table), (std::vector<uint32_t>{1, 5})) << Describe(table);

  Disk gpt_disk(UINT64_MAX / 2);
  GptSpec spec;
  spec.entries = {{.index = 0, .starting_lba = 2048, .ending_lba = UINT64_MAX}};
  WriteGpt(gpt_disk, spec);
  ASSERT_OK_AND_ASSIGN(table, gpt_disk.Decode());
  ASSERT_EQ(Numbers(table), std::vector<uint32_t>{1});
  EXPECT_EQ(table.partitions[0].offset + table.partitions[0].length, gpt_disk.size());
}

}  // namespace
}  // namespace test
}  // namespace qcow2fuse
