// Persistent dirty bitmaps on read-write opens (meta/dirty_bitmaps.h),
// checked against QEMU: images made by qemu-img (bitmap --add) with bits
// set by qemu-io writes, changed through Image and closed; then
// `qemu-img info` must show each recorded bitmap without in-use,
// `qemu-img check` must find nothing (no leak either), and the dirty
// extents QEMU reads (qemu-nbd -B, nbdinfo --map=qemu:dirty-bitmap:NAME)
// must be exactly the granules set before plus those the requests touched.
// Where QEMU can do the same requests (qemu-io on a copy), its bitmaps
// must come out the same as ours.

#include <errno.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bitmap_reader.h"
#include "data/qcow2_layer.h"
#include "fault_file.h"
#include "format/header.h"
#include "io/block_file.h"
#include "gtest/gtest.h"
#include "qcow2_builder.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"
#include "support/command.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

using qemu_io_cmd::W;

std::string Show(const std::vector<ByteRange>& ranges) {
  std::vector<std::string> parts;
  for (const ByteRange& r : ranges) parts.push_back(absl::StrCat("[", r.offset, ", ", r.end(), ")"));
  return "{" + absl::StrJoin(parts, " ") + "}";
}

// What a bitmap should hold: a flag per granule of the disk.
class Model {
 public:
  Model(uint64_t disk, uint64_t granularity) : disk_(disk), granularity_(granularity) {
    bits_.assign((disk + granularity - 1) / granularity, false);
  }
  void Add(uint64_t offset, uint64_t length) {
    if (length == 0) return;
    for (uint64_t g = offset / granularity_; g <= (offset + length - 1) / granularity_ && g < bits_.size(); ++g) {
      bits_[g] = true;
    }
  }
  void Add(const std::vector<ByteRange>& ranges) {
    for (const ByteRange& r : ranges) Add(r.offset, r.length);
  }
  // As QEMU resizes a bitmap: new granules clean, those past the end gone.
  void Resize(uint64_t disk) {
    disk_ = disk;
    bits_.resize((disk + granularity_ - 1) / granularity_, false);
  }
  // The dirty runs, as nbdinfo reports them (the last one ends at the
  // disk's end).
  std::vector<ByteRange> Ranges() const {
    std::vector<ByteRange> out;
    for (uint64_t g = 0; g < bits_.size(); ++g) {
      if (!bits_[g]) continue;
      const uint64_t begin = g * granularity_, end = std::min(disk_, (g + 1) * granularity_);
      if (!out.empty() && out.back().end() == begin) {
        out.back().length += end - begin;
      } else {
        out.push_back({begin, end - begin});
      }
    }
    return out;
  }
  uint64_t granularity() const { return granularity_; }

 private:
  uint64_t disk_;
  uint64_t granularity_;
  std::vector<bool> bits_;
};

// One request, for our image, the model and qemu-io.
struct Op {
  enum Kind { kWrite, kZero, kZeroUnmap, kDiscard, kResize } kind;
  uint64_t offset = 0;  // kResize: the new size
  uint64_t length = 0;
  std::string ToString() const {
    switch (kind) {
      case kWrite: return absl::StrCat("write ", offset, " +", length);
      case kZero: return absl::StrCat("write-zeroes ", offset, " +", length);
      case kZeroUnmap: return absl::StrCat("write-zeroes unmap ", offset, " +", length);
      case kDiscard: return absl::StrCat("discard ", offset, " +", length);
      case kResize: return absl::StrCat("resize to ", offset);
    }
    return "?";
  }
  std::string QemuIo() const {
    switch (kind) {
      case kWrite: return W(static_cast<int>((offset / 512 + 1) & 0xff), offset, length);
      case kZero: return qemu_io_cmd::Zero(offset, length);
      case kZeroUnmap: return qemu_io_cmd::Zero(offset, length, true);
      case kDiscard: return qemu_io_cmd::Discard(offset, length);
      case kResize: return absl::StrCat("truncate ", offset);
    }
    return "";
  }
};

absl::Status Apply(Image& image, const Op& op) {
  switch (op.kind) {
    case Op::kWrite: return SyncWait(image.Write(op.offset, Pattern(op.length, static_cast<uint32_t>(op.offset))));
    case Op::kZero: return SyncWait(image.WriteZeroes(op.offset, op.length, false));
    case Op::kZeroUnmap: return SyncWait(image.WriteZeroes(op.offset, op.length, true));
    case Op::kDiscard: return SyncWait(image.Discard(op.offset, op.length));
    case Op::kResize: return SyncWait(image.Truncate(op.offset));
  }
  return absl::InternalError("unknown op");
}

void ApplyToModels(std::map<std::string, Model>& models, const Op& op,
                   const std::vector<std::string>& recording) {
  for (auto& [name, model] : models) {
    if (op.kind == Op::kResize) {
      model.Resize(op.offset);
    } else if (std::find(recording.begin(), recording.end(), name) != recording.end()) {
      model.Add(op.offset, op.length);
    }
  }
}

// qemu-io with no flush reaching the disk: with 512-byte clusters QEMU
// flushes between every refcount and L2 update, and takes half a minute
// for a discard of 250 MiB. The file is read back whole.
absl::Status QemuIoUnsafe(const std::string& path, const std::vector<std::string>& commands) {
  std::vector<std::string> argv = {"qemu-io", "-t", "unsafe", "-f", "qcow2"};
  for (const std::string& c : commands) argv.insert(argv.end(), {"-c", c});
  argv.push_back(path);
  return RunChecked(argv).status();
}

absl::StatusOr<std::unique_ptr<Image>> OpenWritable(const std::string& path, ImageOptions options = {}) {
  options.read_only = false;
  return SyncWait(Image::Open(path, options));
}

// Opens `path`, applies `ops`, closes it.
absl::Status RunOps(const std::string& path, const std::vector<Op>& ops) {
  absl::StatusOr<std::unique_ptr<Image>> image = OpenWritable(path);
  if (!image.ok()) return image.status();
  for (const Op& op : ops) {
    absl::Status s = Apply(**image, op);
    if (!s.ok()) return Annotate(s, op.ToString());
  }
  return SyncWait((*image)->Close());
}

BitmapInfo InfoOf(const std::string& path, const std::string& name) {
  absl::StatusOr<std::vector<BitmapInfo>> bitmaps = ImageBitmaps(path);
  EXPECT_OK(bitmaps);
  if (bitmaps.ok()) {
    for (const BitmapInfo& b : *bitmaps) {
      if (b.name == name) return b;
    }
  }
  ADD_FAILURE() << "qemu-img info lists no bitmap " << name << " in " << path;
  return {};
}

// qemu-img check finds nothing at all: no corruption, no leak.
void ExpectCheckClean(const std::string& path) {
  ASSERT_OK_AND_ASSIGN(QemuCheckReport c, QemuCheck(path));
  EXPECT_EQ(c.exit_code, 0) << c.output;
  EXPECT_EQ(c.corruptions + c.leaks + c.check_errors, 0u) << c.output;
}

// QEMU reads bitmap `name` of `path` as `model`, stored consistent.
void ExpectBitmap(const std::string& path, const std::string& name, const Model& model, bool enabled = true) {
  const BitmapInfo info = InfoOf(path, name);
  EXPECT_FALSE(info.in_use) << "bitmap " << name << " still in use";
  EXPECT_EQ(info.enabled, enabled) << "bitmap " << name << "'s auto flag";
  EXPECT_EQ(info.granularity, model.granularity()) << name;
  ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> dirty, DirtyExtents(path, name));
  EXPECT_EQ(Show(dirty), Show(model.Ranges())) << "the dirty extents of bitmap " << name;
}

Model ModelFromQemu(const std::string& path, const std::string& name, uint64_t disk, uint64_t granularity) {
  Model m(disk, granularity);
  absl::StatusOr<std::vector<ByteRange>> dirty = DirtyExtents(path, name);
  EXPECT_OK(dirty);
  if (dirty.ok()) m.Add(*dirty);
  return m;
}

class DirtyBitmapsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("bitmaps"));
    dir_.emplace(std::move(dir));
    path_ = dir_->Join("disk.qcow2");
  }
  void Create(uint64_t size, const std::vector<std::string>& options = {}) {
    ASSERT_OK(CreateImage(path_, "qcow2", size, options));
  }
  void AddBitmap(const std::string& name, uint64_t granularity = 0, bool disabled = false) {
    std::vector<std::string> args = {"bitmap", "--add"};
    if (granularity != 0) args.insert(args.end(), {"-g", absl::StrCat(granularity)});
    if (disabled) args.push_back("--disable");
    args.insert(args.end(), {path_, name});
    ASSERT_OK(QemuImg(args));
  }
  std::string Copy(const std::string& name) {
    const std::string copy = dir_->Join(name);
    std::filesystem::copy_file(path_, copy, std::filesystem::copy_options::overwrite_existing);
    return copy;
  }
  Bytes ImageBytes() {
    absl::StatusOr<Bytes> b = ReadBytes(path_);
    EXPECT_OK(b);
    return b.ok() ? *b : Bytes{};
  }
  DecodedBitmap Decoded(const std::string& name) {
    absl::StatusOr<std::vector<DecodedBitmap>> all = DecodeBitmaps(ImageBytes());
    EXPECT_OK(all);
    if (!all.ok()) return {};
    absl::StatusOr<DecodedBitmap> b = FindBitmap(*all, name);
    EXPECT_OK(b);
    return b.ok() ? *b : DecodedBitmap{};
  }

  std::optional<TempDir> dir_;
  std::string path_;
};

// Three granularities (QEMU's smallest, the default, 1 MiB) record writes
// that cross granule boundaries, write-zeroes with and without unmap, and
// discards of data and of nothing; the bits qemu-io set before stay.
TEST_F(DirtyBitmapsTest, RecordsWritesZeroesAndDiscardsAtEachGranularity) {
  const uint64_t disk = 32 * kMiB;
  Create(disk);
  AddBitmap("fine", 512);
  AddBitmap("mid");
  AddBitmap("coarse", kMiB);
  ASSERT_OK(QemuIo(path_, "qcow2", {W(0x11, 0, 4096), W(0x22, 5 * kMiB, 100 * kKiB), W(0x33, 12 * kMiB, kMiB)}));
  std::map<std::string, Model> models;
  for (auto [name, g] : {std::pair{"fine", 512ull}, {"mid", 65536ull}, {"coarse", kMiB}}) {
    models.emplace(name, ModelFromQemu(path_, name, disk, g));
  }
  const std::vector<Op> ops = {
      {Op::kWrite, 4095, 2},                   // two granules of each size
      {Op::kWrite, kMiB - 1, 2},               // across a 1 MiB boundary
      {Op::kWrite, 3 * kMiB + 7, 1},           // one byte
      {Op::kZero, 10 * kMiB, 128 * kKiB},
      {Op::kZeroUnmap, 12 * kMiB + 100, 1000},  // over qemu-io's data
      {Op::kDiscard, 20 * kMiB, 2 * kMiB},     // nothing there: marked all the same
      {Op::kDiscard, 30 * kMiB + 511, 2},
  };
  ASSERT_OK(RunOps(path_, ops));
  for (const Op& op : ops) ApplyToModels(models, op, {"fine", "mid", "coarse"});
  ExpectCheckClean(path_);
  for (const auto& [name, model] : models) ExpectBitmap(path_, name, model);
}

// The same requests through qemu-io on a copy leave the same bitmaps.
TEST_F(DirtyBitmapsTest, SameBitmapsAsQemuForTheSameRequests) {
  const uint64_t disk = 16 * kMiB + 512;  // the last granule is partial
  Create(disk, {"cluster_size=4096"});
  AddBitmap("a", 4096);
  AddBitmap("b", 16384);
  ASSERT_OK(QemuIo(path_, "qcow2", {W(0x44, 2 * kMiB, 8192)}));
  const std::string twin = Copy("twin.qcow2");
  const std::vector<Op> ops = {
      {Op::kWrite, 100, 10},       {Op::kWrite, 4096 * 3 - 1, 4098}, {Op::kZero, kMiB + 1, 70000},
      {Op::kZeroUnmap, 2 * kMiB, 4096}, {Op::kDiscard, 3 * kMiB + 4095, 8194}, {Op::kWrite, disk - 1, 1},
  };
  ASSERT_OK(RunOps(path_, ops));
  std::vector<std::string> commands;
  for (const Op& op : ops) commands.push_back(op.QemuIo());
  ASSERT_OK(QemuIo(twin, "qcow2", commands));
  ExpectCheckClean(path_);
  for (const std::string name : {"a", "b"}) {
    EXPECT_FALSE(InfoOf(path_, name).in_use);
    ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> ours, DirtyExtents(path_, name));
    ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> qemus, DirtyExtents(twin, name));
    EXPECT_EQ(Show(ours), Show(qemus)) << "bitmap " << name;
  }
}

// Unaligned writes mark every granule they touch, and only those.
TEST_F(DirtyBitmapsTest, UnalignedWritesMarkEveryGranuleTheyTouch) {
  Create(kMiB);
  AddBitmap("g4k", 4096);
  ASSERT_OK(RunOps(path_, {{Op::kWrite, 4095, 2},
                        {Op::kWrite, 8192, 1},
                        {Op::kWrite, 16383, 1},
                        {Op::kWrite, 20480, 4096},
                        {Op::kWrite, 28671, 4098},
                        {Op::kWrite, kMiB - 1, 1}}));
  ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> dirty, DirtyExtents(path_, "g4k"));
  const uint64_t k = 4096;
  // Granules 0-1, 2, 3, 5, 6-8 and the last one.
  EXPECT_EQ(Show(dirty), Show({{0, 4 * k}, {5 * k, 4 * k}, {kMiB - k, k}}));
  ExpectCheckClean(path_);
}

// Preallocation (fallocate mode 0) reserves clusters and changes no byte
// of the disk, so it marks no bit; the write after it does.
TEST_F(DirtyBitmapsTest, PreallocationMarksNothing) {
  Create(8 * kMiB);
  AddBitmap("b", 65536);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenWritable(path_));
    ASSERT_OK(SyncWait(image->Preallocate(kMiB, 2 * kMiB)));
    ASSERT_OK(SyncWait(image->Write(5 * kMiB, Pattern(100, 1))));
    ASSERT_OK(SyncWait(image->Close()));
  }
  ExpectCheckClean(path_);
  ASSERT_OK_AND_ASSIGN(std::vector<MapExtent> map, MapImage(path_));
  EXPECT_TRUE(std::any_of(map.begin(), map.end(), [](const MapExtent& e) {
    return e.offset.has_value() && e.start <= kMiB && e.end() > kMiB;
  })) << "the preallocation reserved no cluster: the test proves nothing";
  Model m(8 * kMiB, 65536);
  m.Add(5 * kMiB, 100);
  ExpectBitmap(path_, "b", m);
}

// A bitmap that has no data yet (its table is all zero entries) gets a
// cluster at close, counted in the refcounts.
TEST_F(DirtyBitmapsTest, BitmapWithoutDataGetsAClusterAtClose) {
  Create(8 * kMiB);
  AddBitmap("empty", 65536);
  const DecodedBitmap before = Decoded("empty");
  ASSERT_EQ(before.table.size(), 1u);
  ASSERT_EQ(before.table[0], 0u) << "qemu-img bitmap --add stores no data";
  ASSERT_OK(RunOps(path_, {{Op::kWrite, 3 * kMiB, 100}}));
  const DecodedBitmap after = Decoded("empty");
  EXPECT_NE(after.table[0] & kOffsetMask, 0u);
  EXPECT_EQ(after.table_offset, before.table_offset) << "the table stays where it was";
  ExpectCheckClean(path_);
  Model m(8 * kMiB, 65536);
  m.Add(3 * kMiB, 100);
  ExpectBitmap(path_, "empty", m);
}

// A disabled bitmap is left as it is: its directory entry, table and data
// keep their bytes, it is never marked in use, and QEMU reads the same
// bits. The enabled one beside it records.
TEST_F(DirtyBitmapsTest, DisabledBitmapIsLeftAsItIs) {
  const uint64_t disk = 8 * kMiB;
  Create(disk);
  AddBitmap("off", 65536);
  AddBitmap("on", 65536);
  ASSERT_OK(QemuIo(path_, "qcow2", {W(0x55, kMiB, 200 * kKiB)}));
  ASSERT_OK(QemuImg({"bitmap", "--disable", path_, "off"}));
  const Model off_before = ModelFromQemu(path_, "off", disk, 65536);
  Model on = ModelFromQemu(path_, "on", disk, 65536);
  const Bytes before = ImageBytes();
  const DecodedBitmap off = Decoded("off");
  ASSERT_FALSE(off.enabled());
  ASSERT_NE(off.table[0] & kOffsetMask, 0u) << "qemu-io's writes gave it data";

  ASSERT_OK(RunOps(path_, {{Op::kWrite, 0, 4096}, {Op::kDiscard, kMiB, 64 * kKiB}, {Op::kWrite, 5 * kMiB, 1}}));
  on.Add(0, 4096);
  on.Add(kMiB, 64 * kKiB);
  on.Add(5 * kMiB, 1);
  const Bytes after = ImageBytes();
  auto same = [&](uint64_t offset, uint64_t length, const std::string& what) {
    EXPECT_TRUE(std::equal(before.begin() + offset, before.begin() + offset + length, after.begin() + offset))
        << what << " changed";
  };
  same(off.entry_offset, off.entry_bytes, "the directory entry of the disabled bitmap");
  same(off.table_offset, off.table_size * 8, "the table of the disabled bitmap");
  same(off.table[0] & kOffsetMask, 65536, "the data of the disabled bitmap");
  ExpectCheckClean(path_);
  ExpectBitmap(path_, "off", off_before, /*enabled=*/false);
  ExpectBitmap(path_, "on", on);
}

// A bitmap already in use when the image is opened (a crash of its last
// writer) is inconsistent: it stays in use, the others are maintained,
// and a resize is refused as QEMU refuses it.
TEST_F(DirtyBitmapsTest, BitmapInUseAtOpenStaysInUseAndRefusesResize) {
  Create(4 * kMiB);
  AddBitmap("stale");
  AddBitmap("good");
  Bytes bytes = ImageBytes();
  const DecodedBitmap stale = Decoded("stale");
  PutBE32(bytes, stale.entry_offset + 12, stale.flags | 1);
  ASSERT_OK(WriteBytes(path_, bytes));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenWritable(path_));
    EXPECT_TRUE(absl::StrContains(image->DescribeChain(), "'stale' left in use: it was in use already"))
        << image->DescribeChain();
    EXPECT_TRUE(absl::StrContains(image->DescribeChain(), "'good' recorded")) << image->DescribeChain();
    ASSERT_OK(SyncWait(image->Write(0, Pattern(512, 1))));
    absl::Status resized = SyncWait(image->Truncate(8 * kMiB));
    EXPECT_EQ(resized.code(), absl::StatusCode::kFailedPrecondition) << resized;
    EXPECT_TRUE(absl::StrContains(resized.message(), "'stale' is inconsistent")) << resized;
    EXPECT_EQ(StatusErrno(resized), EOPNOTSUPP) << "as QEMU's -ENOTSUP";
    EXPECT_EQ(image->virtual_size(), 4 * kMiB);
    ASSERT_OK(SyncWait(image->Close()));
  }
  EXPECT_TRUE(InfoOf(path_, "stale").in_use);
  Model good(4 * kMiB, 65536);
  good.Add(0, 512);
  ExpectCheckClean(path_);
  ExpectBitmap(path_, "good", good);
}

// Bitmaps this engine cannot maintain are marked in use at the first
// write and stay so; the bitmap beside them is maintained.
struct Damage {
  std::string name;
  std::string reason;  // part of the reason the engine gives
  std::function<void(Bytes&, const DecodedBitmap& victim, const DecodedBitmap& other)> apply;
  bool qemu_can_read = false;  // qemu-img still reads the directory
};

// Gives the last entry of the directory (`v`) 8 bytes of extra data before
// its name: the entry and the directory (which has its cluster to itself)
// grow by 8 bytes, and the header extension says so.
void AddExtraData(Bytes& b, const DecodedBitmap& v, const DecodedBitmap&) {
  const uint64_t name_at = v.entry_offset + 24;
  const uint64_t name_size = GetBE(b, v.entry_offset + 18, 2);
  Bytes name(b.begin() + name_at, b.begin() + name_at + name_size);
  // The directory may end the file: the rest of its cluster reads as zeros.
  b.resize(std::max<uint64_t>(b.size(), v.entry_offset + v.entry_bytes + 8), 0);
  PutBE32(b, v.entry_offset + 20, 8);
  std::fill(b.begin() + name_at, b.begin() + name_at + 8, 0);
  PutBytes(b, name_at + 8, name);
  std::fill(b.begin() + name_at + 8 + name_size, b.begin() + v.entry_offset + v.entry_bytes + 8, 0);
  // The bitmaps extension: its directory size (bytes 8-15 of its data).
  for (uint64_t pos = GetBE(b, 100, 4); GetBE(b, pos, 4) != 0; pos += 8 + (GetBE(b, pos + 4, 4) + 7) / 8 * 8) {
    if (GetBE(b, pos, 4) == kExtBitmaps) PutBE64(b, pos + 16, GetBE(b, pos + 16, 8) + 8);
  }
}

void PrintTo(const Damage& damage, std::ostream* out) { *out << damage.name; }

class UnmaintainableBitmapTest : public DirtyBitmapsTest, public ::testing::WithParamInterface<Damage> {};

TEST_P(UnmaintainableBitmapTest, IsMarkedInUseAndStaysSo) {
  const Damage& damage = GetParam();
  Create(4 * kMiB);
  AddBitmap("other", 65536);
  AddBitmap("victim", 65536);
  ASSERT_OK(QemuIo(path_, "qcow2", {W(0x66, 0, 4096)}));  // both get a data cluster
  Bytes bytes = ImageBytes();
  damage.apply(bytes, Decoded("victim"), Decoded("other"));
  ASSERT_OK(WriteBytes(path_, bytes));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenWritable(path_));
    const std::string described = image->DescribeChain();
    EXPECT_TRUE(absl::StrContains(described, "'victim' left in use: ")) << described;
    EXPECT_TRUE(absl::StrContains(described, damage.reason)) << described;
    EXPECT_FALSE(Decoded("victim").in_use()) << "nothing is marked before a change";
    ASSERT_OK(SyncWait(image->Write(2 * kMiB, Pattern(512, 2))));
    EXPECT_TRUE(Decoded("victim").in_use());
    ASSERT_OK(SyncWait(image->Close()));
  }
  const DecodedBitmap victim = Decoded("victim");
  const DecodedBitmap other = Decoded("other");
  EXPECT_TRUE(victim.in_use()) << "after close";
  EXPECT_FALSE(other.in_use());
  ASSERT_FALSE(other.bits.empty());
  EXPECT_TRUE(other.Dirty(0) && other.Dirty(2 * kMiB) && !other.Dirty(kMiB));
  if (damage.qemu_can_read) {
    EXPECT_TRUE(InfoOf(path_, "victim").in_use);
    ExpectCheckClean(path_);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Damages, UnmaintainableBitmapTest,
    ::testing::Values(
        Damage{"UnknownFlag", "flags 0x20",
               [](Bytes& b, const DecodedBitmap& v, const DecodedBitmap&) { PutBE32(b, v.entry_offset + 12, v.flags | 0x20); }},
        Damage{"ExtraDataCompatibleFlag", "flags 0x4",
               [](Bytes& b, const DecodedBitmap& v, const DecodedBitmap&) { PutBE32(b, v.entry_offset + 12, v.flags | 4); }},
        Damage{"UnknownType", "type 2",
               [](Bytes& b, const DecodedBitmap& v, const DecodedBitmap&) { PutBE8(b, v.entry_offset + 16, 2); }},
        Damage{"GranularityBelowQemus", "granularity of 2^8",
               [](Bytes& b, const DecodedBitmap& v, const DecodedBitmap&) { PutBE8(b, v.entry_offset + 17, 8); }},
        Damage{"TableLargerThanTheDisk", "its table has 2 entries, but a disk of 4194304 bytes needs 1",
               [](Bytes& b, const DecodedBitmap& v, const DecodedBitmap&) { PutBE32(b, v.entry_offset + 8, 2); },
               /*qemu_can_read=*/true},
        Damage{"ReservedBitsInTheTable", "reserved bits",
               [](Bytes& b, const DecodedBitmap& v, const DecodedBitmap&) { PutBE64(b, v.table_offset, v.table[0] | 2); }},
        Damage{"DataSharedWithAnotherBitmap", "overlaps",
               [](Bytes& b, const DecodedBitmap& v, const DecodedBitmap& o) { PutBE64(b, v.table_offset, o.table[0]); }},
        Damage{"ExtraData", "8 bytes of extra data", AddExtraData}),
    [](const ::testing::TestParamInfo<Damage>& info) { return info.param.name; });

// A bitmap larger than QEMU allows (512 MiB of bits): here a 4 TiB disk
// whose 64 KiB granularity was turned into 512 bytes, 1 GiB of bits.
TEST_F(DirtyBitmapsTest, BitmapLargerThanQemuAllowsIsLeftInUse) {
  Create(4 * 1024 * 1024 * kMiB);
  AddBitmap("big", 65536);
  Bytes bytes = ImageBytes();
  PutBE8(bytes, Decoded("big").entry_offset + 17, 9);
  ASSERT_OK(WriteBytes(path_, bytes));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenWritable(path_));
    EXPECT_TRUE(absl::StrContains(image->DescribeChain(), "'big' left in use: ")) << image->DescribeChain();
    EXPECT_TRUE(absl::StrContains(image->DescribeChain(), "more than QEMU's limit")) << image->DescribeChain();
    ASSERT_OK(SyncWait(image->Write(0, Pattern(512, 1))));
    ASSERT_OK(SyncWait(image->Close()));
  }
  EXPECT_TRUE(Decoded("big").in_use());
}

// A bitmap whose bits would not fit the memory budget is refused before
// anything is allocated for it, and left in use.
TEST_F(DirtyBitmapsTest, BitmapOverTheMemoryBudgetIsLeftInUse) {
  const uint64_t disk = 16 * 1024 * kMiB;
  Create(disk);
  AddBitmap("huge", 512);  // 32 Mi granules: 4 MiB of bits
  AddBitmap("small", 1 << 24);
  ImageOptions options;
  options.max_metadata_memory = 2 * kMiB;
  options.l2_cache_size = 64 * kKiB;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenWritable(path_, options));
    const std::string described = image->DescribeChain();
    EXPECT_TRUE(absl::StrContains(described, "'huge' left in use: ")) << described;
    EXPECT_TRUE(absl::StrContains(described, "max_metadata_memory")) << described;
    EXPECT_TRUE(absl::StrContains(described, "'small' recorded")) << described;
    ASSERT_OK(SyncWait(image->Write(kMiB, Pattern(512, 3))));
    ASSERT_OK(SyncWait(image->Close()));
  }
  EXPECT_TRUE(InfoOf(path_, "huge").in_use);
  Model small(disk, 1 << 24);
  small.Add(kMiB, 512);
  ExpectCheckClean(path_);
  ExpectBitmap(path_, "small", small);
}

// Close stores the bitmaps while the image stays open; a write after it
// marks them in use again; a second Close and a second open keep every
// bit.
TEST_F(DirtyBitmapsTest, CloseThenWriteMarksInUseAgainAndReopenKeepsEveryBit) {
  const uint64_t disk = 8 * kMiB;
  Create(disk);
  AddBitmap("b", 65536);
  Model m(disk, 65536);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenWritable(path_));
    ASSERT_OK(SyncWait(image->Write(0, Pattern(100, 1))));
    EXPECT_TRUE(Decoded("b").in_use()) << "in use from the first write on";
    ASSERT_OK(SyncWait(image->Close()));
    DecodedBitmap stored = Decoded("b");
    EXPECT_FALSE(stored.in_use());
    EXPECT_TRUE(stored.Dirty(0));
    ASSERT_OK(SyncWait(image->Write(kMiB, Pattern(100, 2))));
    EXPECT_TRUE(Decoded("b").in_use()) << "a write after Close";
    ASSERT_OK(SyncWait(image->Flush()));
    EXPECT_TRUE(Decoded("b").in_use()) << "a flush stores nothing";
    ASSERT_OK(SyncWait(image->Close()));
    ASSERT_OK(SyncWait(image->Close()));  // nothing to do
    stored = Decoded("b");
    EXPECT_FALSE(stored.in_use());
    EXPECT_TRUE(stored.Dirty(0) && stored.Dirty(kMiB) && !stored.Dirty(2 * kMiB));
  }
  m.Add(0, 100);
  m.Add(kMiB, 100);
  ASSERT_OK(RunOps(path_, {{Op::kWrite, 7 * kMiB, 1}}));
  m.Add(7 * kMiB, 1);
  ExpectCheckClean(path_);
  ExpectBitmap(path_, "b", m);
}

// An open that changes nothing leaves the image's bytes alone.
TEST_F(DirtyBitmapsTest, OpenWithoutChangesWritesNothing) {
  Create(4 * kMiB);
  AddBitmap("b");
  ASSERT_OK(QemuIo(path_, "qcow2", {W(0x11, 0, 4096)}));
  const Bytes before = ImageBytes();
  ASSERT_OK(RunOps(path_, {}));
  EXPECT_TRUE(before == ImageBytes());
}

// Writes from many threads at once: every granule they touched is set.
TEST_F(DirtyBitmapsTest, ConcurrentWritesAreAllRecorded) {
  const uint64_t disk = 16 * kMiB;
  Create(disk, {"cluster_size=4096"});
  AddBitmap("b", 512);
  const uint64_t seed = TestSeed();
  Model m(disk, 512);
  std::vector<std::vector<Op>> per_thread(6);
  std::mt19937_64 rng(seed);
  for (std::vector<Op>& ops : per_thread) {
    for (int i = 0; i < 150; ++i) {
      const uint64_t offset = rng() % (disk - 3000);
      const uint64_t length = 1 + rng() % 3000;
      ops.push_back({i % 5 == 4 ? Op::kZero : Op::kWrite, offset, length});
      m.Add(offset, length);
    }
  }
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenWritable(path_));
    std::vector<std::thread> threads;
    std::vector<absl::Status> results(per_thread.size());
    for (size_t t = 0; t < per_thread.size(); ++t) {
      threads.emplace_back([&, t] {
        for (const Op& op : per_thread[t]) {
          absl::Status s = Apply(*image, op);
          if (!s.ok() && results[t].ok()) results[t] = s;
        }
      });
    }
    for (std::thread& t : threads) t.join();
    for (const absl::Status& s : results) ASSERT_OK(s);
    ASSERT_OK(SyncWait(image->Close()));
  }
  ExpectCheckClean(path_);
  ExpectBitmap(path_, "b", m);
}

// Seeded random requests over a few bitmaps of random granularities, in
// several opens, against a model and against QEMU doing the same.
TEST_F(DirtyBitmapsTest, RandomRequestsMatchTheModelAndQemu) {
  const uint64_t seed = TestSeed();
  std::mt19937_64 rng(seed);
  const uint64_t cluster = rng() % 2 ? 4096 : 65536;
  const uint64_t disk = (8 * kMiB + rng() % (24 * kMiB)) / 512 * 512;
  Create(disk, {absl::StrCat("cluster_size=", cluster)});
  std::map<std::string, Model> models;
  std::vector<std::string> names;
  for (int i = 0; i < 3; ++i) {
    const uint64_t g = uint64_t{1} << (9 + rng() % 12);
    const std::string name = absl::StrCat("b", i, "_", g);
    AddBitmap(name, g);
    models.emplace(name, Model(disk, g));
    names.push_back(name);
  }
  ASSERT_OK(QemuIo(path_, "qcow2", {W(0x77, rng() % (disk - 4096), 4096)}));
  for (auto& [name, model] : models) model = ModelFromQemu(path_, name, disk, model.granularity());
  const std::string twin = Copy("twin.qcow2");
  for (int round = 0; round < 3; ++round) {
    std::vector<Op> ops;
    std::vector<std::string> commands;
    for (int i = 0; i < 25; ++i) {
      const uint64_t length = 1 + (rng() % 4 == 0 ? rng() % (2 * kMiB) : rng() % 20000);
      const uint64_t offset = rng() % (disk - length);
      const Op::Kind kind = std::array{Op::kWrite, Op::kWrite, Op::kZero, Op::kZeroUnmap, Op::kDiscard}[rng() % 5];
      ops.push_back({kind, offset, length});
      commands.push_back(ops.back().QemuIo());
    }
    SCOPED_TRACE(absl::StrCat("round ", round));
    ASSERT_OK(RunOps(path_, ops));
    ASSERT_OK(QemuIo(twin, "qcow2", commands));
    for (const Op& op : ops) ApplyToModels(models, op, names);
    ExpectCheckClean(path_);
    for (const auto& [name, model] : models) {
      ExpectBitmap(path_, name, model);
      ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> qemus, DirtyExtents(twin, name));
      EXPECT_EQ(Show(qemus), Show(model.Ranges())) << "QEMU's bitmap " << name;
    }
  }
}

// Host errors (EIO, a short write, a failed fdatasync) at every call of a
// workload that marks the bitmaps in use, stores them and marks them
// again: whatever fails, the file left never has a bitmap that claims to
// be consistent while missing a change that succeeded (nor one marking
// what no request touched), and qemu-img check finds no corruption.
TEST_F(DirtyBitmapsTest, HostErrorsNeverLeaveABitmapClaimingTooLittle) {
  const uint64_t disk = 4 * kMiB;
  Create(disk, {"cluster_size=4096"});
  AddBitmap("a", 4096);
  ASSERT_OK(QemuIo(path_, "qcow2", {W(0x11, 64 * kKiB, 8192)}));
  AddBitmap("fresh", 65536);
  const Bytes initial = ImageBytes();
  ASSERT_OK_AND_ASSIGN(std::vector<DecodedBitmap> before, DecodeBitmaps(initial));
  const std::vector<Op> ops = {{Op::kWrite, 0, 4096},         {Op::kDiscard, kMiB, 64 * kKiB},
                               {Op::kZero, 2 * kMiB + 5, 100}, {Op::kWrite, 512 * kKiB, 10},
                               {Op::kWrite, 3 * kMiB, 70000}};
  // Runs the workload with `state`'s fault: ops 0-2, Close, ops 3-4, a
  // flush, Close, and Close again: as in fault_injection_test.cc, the disk
  // works again after a one-shot fault, and what failed is retried (a
  // short write may have torn an L1 entry; the retry writes it whole).
  // Returns the file, and which ops succeeded.
  auto run = [&](const std::shared_ptr<FaultState>& state, std::vector<bool>* succeeded) -> absl::StatusOr<Bytes> {
    std::unique_ptr<BlockFile> mem = NewMemFile("disk.qcow2", initial);
    absl::StatusOr<Header> header = DecodeHeader(initial, initial.size());
    if (!header.ok()) return header.status();
    ImageOptions options;
    options.read_only = false;
    absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer = SyncWait(
        Qcow2Layer::Open(std::make_unique<FaultFile>(*mem, state), *std::move(header), nullptr, nullptr, options));
    if (!layer.ok()) return layer.status();
    succeeded->clear();
    for (size_t i = 0; i < ops.size(); ++i) {
      const Op& op = ops[i];
      absl::Status s = op.kind == Op::kWrite     ? SyncWait((*layer)->Write(op.offset, Pattern(op.length, i)))
                       : op.kind == Op::kDiscard ? SyncWait((*layer)->Discard(op.offset, op.length))
                                                 : SyncWait((*layer)->WriteZeroes(op.offset, op.length, false));
      succeeded->push_back(s.ok());
      if (i == 2) (void)SyncWait((*layer)->Close());
      if (i == 3) (void)SyncWait((*layer)->Flush());
    }
    (void)SyncWait((*layer)->Close());
    (void)SyncWait((*layer)->Close());
    layer->reset();
    return MemFileContents(*mem);
  };
  std::vector<bool> succeeded;
  auto counting = std::make_shared<FaultState>();
  ASSERT_OK_AND_ASSIGN(Bytes clean, run(counting, &succeeded));
  ASSERT_OK_AND_ASSIGN(std::vector<DecodedBitmap> stored, DecodeBitmaps(clean));
  for (const DecodedBitmap& b : stored) ASSERT_FALSE(b.in_use()) << "without a fault, " << b.name;
  std::vector<Fault> faults;
  for (uint64_t n = 1; n <= counting->calls(HostOp::kWrite); ++n) {
    faults.push_back({Fault::kOnce, HostOp::kWrite, n, EIO});
    faults.push_back({Fault::kShort, HostOp::kWrite, n, ENOSPC});
  }
  for (uint64_t n = 1; n <= counting->calls(HostOp::kFlush); ++n) faults.push_back({Fault::kOnce, HostOp::kFlush, n, EIO});
  size_t consistent = 0, in_use = 0;
  for (const Fault& fault : faults) {
    SCOPED_TRACE(fault.ToString());
    auto state = std::make_shared<FaultState>(fault);
    ASSERT_OK_AND_ASSIGN(Bytes left, run(state, &succeeded));
    ASSERT_TRUE(state->fired());
    const std::string file = dir_->Join("left.qcow2");
    ASSERT_OK(WriteBytes(file, left));
    ASSERT_OK_AND_ASSIGN(QemuCheckReport c, QemuCheck(file));
    EXPECT_EQ(c.corruptions + c.check_errors, 0u) << c.output;
    ASSERT_OK_AND_ASSIGN(std::vector<DecodedBitmap> now, DecodeBitmaps(left));
    for (size_t k = 0; k < now.size(); ++k) {
      const DecodedBitmap& b = now[k];
      if (b.in_use()) {
        ++in_use;
        continue;
      }
      ASSERT_EQ(b.bits.size(), before[k].bits.size()) << b.name;
      std::vector<bool> least = before[k].bits, most = before[k].bits;
      for (size_t i = 0; i < ops.size(); ++i) {
        for (uint64_t g = ops[i].offset / b.granularity(); g <= (ops[i].offset + ops[i].length - 1) / b.granularity();
             ++g) {
          most[g] = true;
          if (succeeded[i]) least[g] = true;
        }
      }
      for (uint64_t g = 0; g < b.bits.size(); ++g) {
        EXPECT_FALSE(least[g] && !b.bits[g]) << b.name << " is consistent but misses granule " << g;
        EXPECT_FALSE(b.bits[g] && !most[g]) << b.name << " marks granule " << g << ", which nothing changed";
      }
      ++consistent;
    }
  }
  std::cout << faults.size() << " faults; bitmaps left consistent " << consistent << " times, in use " << in_use
            << " times\n";
  EXPECT_GT(consistent, 0u);
  EXPECT_GT(in_use, 0u) << "no fault kept a bitmap from being stored";
}

// --- Resize ------------------------------------------------------------------

// A resize takes every bitmap along as QEMU's does (qemu-io truncate on a
// copy): granules of a grown disk start clean, those past a shrunken end
// go; the disabled bitmap is resized too (as in QEMU) and stays disabled.
TEST_F(DirtyBitmapsTest, ResizeTakesTheBitmapsAlongAsQemuDoes) {
  const uint64_t disk = 8 * kMiB;
  Create(disk);
  AddBitmap("on", 65536);
  AddBitmap("off", 16384);
  ASSERT_OK(QemuIo(path_, "qcow2", {W(0x11, 7 * kMiB, 200 * kKiB), W(0x12, 0, 4096)}));
  ASSERT_OK(QemuImg({"bitmap", "--disable", path_, "off"}));
  const std::string twin = Copy("twin.qcow2");
  const std::vector<Op> ops = {
      {Op::kWrite, kMiB, 100},
      {Op::kResize, 12 * kMiB + 512},            // a partial last granule
      {Op::kWrite, 12 * kMiB, 512},
      {Op::kDiscard, 6 * kMiB, 6 * kMiB + 512},  // so that the shrink loses no data
      {Op::kResize, 6 * kMiB + 4096},
      {Op::kWrite, 6 * kMiB, 4096},
  };
  ASSERT_OK(RunOps(path_, ops));
  std::vector<std::string> commands;
  for (const Op& op : ops) commands.push_back(op.QemuIo());
  ASSERT_OK(QemuIo(twin, "qcow2", commands));
  ExpectCheckClean(path_);
  EXPECT_FALSE(InfoOf(path_, "off").enabled);
  EXPECT_FALSE(InfoOf(path_, "off").in_use);
  for (const std::string name : {"on", "off"}) {
    EXPECT_FALSE(InfoOf(path_, name).in_use) << name;
    ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> ours, DirtyExtents(path_, name));
    ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> qemus, DirtyExtents(twin, name));
    EXPECT_EQ(Show(ours), Show(qemus)) << "bitmap " << name;
  }
  // A disabled bitmap that no resize reached is never marked in use.
  EXPECT_FALSE(InfoOf(twin, "off").in_use);
}

// With 512-byte clusters a bitmap table cluster holds 64 entries: growing
// the disk past what they cover moves the table; shrinking it back gives
// back the table clusters and the data clusters past the end.
TEST_F(DirtyBitmapsTest, GrowthMovesTheTableAndShrinkingGivesClustersBack) {
  const uint64_t disk = 100 * kMiB;  // 50 entries of 2 MiB each
  Create(disk, {"cluster_size=512"});
  AddBitmap("b", 512);
  ASSERT_OK(QemuIo(path_, "qcow2", {W(0x21, 0, 4096), W(0x22, 90 * kMiB, 4096)}));
  const std::string twin = Copy("twin.qcow2");
  const DecodedBitmap before = Decoded("b");
  ASSERT_EQ(before.table_size, 50u);
  const std::vector<Op> grow = {{Op::kResize, 300 * kMiB}, {Op::kWrite, 250 * kMiB, 1024}, {Op::kWrite, kMiB, 1}};
  ASSERT_OK(RunOps(path_, grow));
  const DecodedBitmap grown = Decoded("b");
  EXPECT_EQ(grown.table_size, 150u);
  EXPECT_NE(grown.table_offset, before.table_offset) << "three table clusters: the table moved";
  ExpectCheckClean(path_);
  const std::vector<Op> shrink = {{Op::kDiscard, 50 * kMiB, 250 * kMiB}, {Op::kResize, 50 * kMiB}};
  ASSERT_OK(RunOps(path_, shrink));
  const DecodedBitmap shrunk = Decoded("b");
  EXPECT_EQ(shrunk.table_size, 25u);
  EXPECT_EQ(shrunk.table_offset, grown.table_offset) << "a smaller table stays in place";
  ExpectCheckClean(path_);  // no leak: clusters past the end were given back
  std::vector<std::string> commands;
  for (const Op& op : grow) commands.push_back(op.QemuIo());
  for (const Op& op : shrink) commands.push_back(op.QemuIo());
  ASSERT_OK(QemuIoUnsafe(twin, commands));
  ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> ours, DirtyExtents(path_, "b"));
  ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> qemus, DirtyExtents(twin, "b"));
  EXPECT_EQ(Show(ours), Show(qemus));
  Model m(disk, 512);
  m.Add(0, 4096);
  m.Add(90 * kMiB, 4096);
  m.Resize(300 * kMiB);
  m.Add(250 * kMiB, 1024);
  m.Add(kMiB, 1);
  m.Add(50 * kMiB, 250 * kMiB);
  m.Resize(50 * kMiB);
  EXPECT_EQ(Show(ours), Show(m.Ranges()));
}

// A disabled bitmap that cannot follow a resize (its table does not fit
// the disk) makes the resize fail, naming it; nothing changes.
TEST_F(DirtyBitmapsTest, ResizeRefusedWhenADisabledBitmapCannotFollow) {
  Create(4 * kMiB);
  AddBitmap("off", 65536, /*disabled=*/true);
  Bytes bytes = ImageBytes();
  const DecodedBitmap off = Decoded("off");
  PutBE32(bytes, off.entry_offset + 8, 2);  // a table larger than the disk needs
  ASSERT_OK(WriteBytes(path_, bytes));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, OpenWritable(path_));
    absl::Status resized = SyncWait(image->Truncate(16 * kMiB));
    EXPECT_EQ(resized.code(), absl::StatusCode::kFailedPrecondition) << resized;
    EXPECT_TRUE(absl::StrContains(resized.message(), "'off' (disabled) cannot follow")) << resized;
    EXPECT_EQ(StatusErrno(resized), EOPNOTSUPP);
    EXPECT_EQ(image->virtual_size(), 4 * kMiB);
    ASSERT_OK(SyncWait(image->Close()));
  }
  EXPECT_FALSE(Decoded("off").in_use());
  EXPECT_EQ(GetBE(ImageBytes(), 24, 8), 4 * kMiB) << "the disk size in the header";
}

}  // namespace
}  // namespace qcow2fuse::test
