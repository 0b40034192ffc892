// Reading internal snapshots (Image::Snapshots, Image::OpenSnapshot): each
// snapshot reads as `qemu-img convert -l snapshot.id=ID` reads it, at the
// disk size the snapshot recorded, through the backing chain, and stays so while the
// active disk is written beside it. A snapshot table entry that points
// outside the file is refused with an error naming it.

#include <fcntl.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"
#include "support/file_util.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

using qemu_io_cmd::Compressed;
using qemu_io_cmd::W;
using qemu_io_cmd::Zero;


class SnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_OK_AND_ASSIGN(dir_, TempDir::Create("snapshot")); }

  // All of `image` as the engine reads it.
  static absl::StatusOr<std::string> ReadAll(Image& image) {
    std::string bytes(image.virtual_size(), '\0');
    absl::Status status =
        SyncWait(image.Read(0, std::span(reinterpret_cast<uint8_t*>(bytes.data()), bytes.size())));
    if (!status.ok()) return status;
    return bytes;
  }

  // Snapshot `id` of `image` as QEMU reads it.
  absl::StatusOr<std::string> QemuSnapshot(const std::string& image, const std::string& id) {
    const std::string raw = dir_->Join(absl::StrCat("qemu-snapshot-", id, ".raw"));
    absl::Status converted = ConvertImage(image, "qcow2", raw, "raw", {"-l", "snapshot.id=" + id});
    if (!converted.ok()) return converted;
    return ReadFile(raw);
  }

  absl::StatusOr<std::string> QemuDisk(const std::string& image) {
    const std::string raw = dir_->Join("qemu-disk.raw");
    absl::Status converted = ConvertToRaw(image, raw);
    if (!converted.ok()) return converted;
    return ReadFile(raw);
  }

  // Every snapshot of `path` read through the engine equals QEMU's.
  void ExpectSnapshotsAsQemu(Image& image, const std::string& path) {
    ASSERT_OK_AND_ASSIGN(std::vector<SnapshotInfo> snapshots, SyncWait(image.Snapshots()));
    for (const SnapshotInfo& info : snapshots) {
      SCOPED_TRACE(absl::StrCat("snapshot ", info.id, " '", info.name, "'"));
      ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> snapshot, SyncWait(image.OpenSnapshot(info)));
      EXPECT_TRUE(snapshot->read_only());
      EXPECT_EQ(snapshot->virtual_size(), info.disk_size);
      ASSERT_OK_AND_ASSIGN(std::string ours, ReadAll(*snapshot));
      ASSERT_OK_AND_ASSIGN(std::string qemu, QemuSnapshot(path, info.id));
      // qemu-img convert -l reads a snapshot at the disk's current size,
      // which only grows after a snapshot (QEMU refuses to shrink an image
      // with snapshots): its bytes past the snapshot's own size are not the
      // snapshot's. `qemu-img snapshot -a` restores the recorded size.
      ASSERT_GE(qemu.size(), ours.size());
      EXPECT_TRUE(ours == qemu.substr(0, ours.size())) << "the snapshot's bytes differ from qemu-img convert -l";
    }
  }

  std::optional<TempDir> dir_;
};

// Two snapshots at different disk sizes, each followed by changes, over
// compressed clusters, zero clusters and extended L2 entries alike.
TEST_F(SnapshotTest, EachSnapshotReadsAsQemuConvertReadsIt) {
  for (const bool extended_l2 : {false, true}) {
    SCOPED_TRACE(extended_l2 ? "extended L2" : "plain L2");
    const std::string img = dir_->Join(extended_l2 ? "ext.qcow2" : "plain.qcow2");
    std::vector<std::string> options = {"cluster_size=65536"};
    if (extended_l2) options.push_back("extended_l2=on");
    ASSERT_OK(CreateImage(img, "qcow2", 4 * kMiB, options));
    ASSERT_OK(QemuIo(img, "qcow2", {W(0x11, 0, kMiB), Compressed(0x22, 2 * kMiB, 128 << 10)}));
    ASSERT_OK(QemuImg({"snapshot", "-c", "first", img}).status());
    ASSERT_OK(QemuIo(img, "qcow2", {W(0x33, 512 << 10, 4096), Zero(2 * kMiB, 64 << 10), W(0x44, 3 * kMiB, 8192)}));
    ASSERT_OK(QemuImg({"resize", img, "6M"}).status());
    ASSERT_OK(QemuIo(img, "qcow2", {W(0x55, 5 * kMiB, 65536)}));
    ASSERT_OK(QemuImg({"snapshot", "-c", "second one", img}).status());
    ASSERT_OK(QemuIo(img, "qcow2", {W(0x66, 0, 2 * kMiB)}));

    ImageOptions read_only;
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, SyncWait(Image::Open(img, read_only)));
    ASSERT_OK_AND_ASSIGN(std::vector<SnapshotInfo> snapshots, SyncWait(image->Snapshots()));
    ASSERT_EQ(snapshots.size(), 2u);
    EXPECT_EQ(snapshots[0].id, "1");
    EXPECT_EQ(snapshots[0].name, "first");
    EXPECT_EQ(snapshots[0].disk_size, 4 * kMiB);
    EXPECT_EQ(snapshots[1].id, "2");
    EXPECT_EQ(snapshots[1].name, "second one");
    EXPECT_EQ(snapshots[1].disk_size, 6 * kMiB);
    ExpectSnapshotsAsQemu(*image, img);
  }
}

// The active disk is written while a snapshot is open beside it: the
// snapshot keeps its bytes (QEMU copies what a snapshot shares), the disk
// reads what was written, and the image stays clean.
TEST_F(SnapshotTest, SnapshotKeepsItsBytesWhileTheDiskIsWritten) {
  const std::string img = dir_->Join("busy.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", 8 * kMiB));
  ASSERT_OK(QemuIo(img, "qcow2", {W(0x11, 0, 8 * kMiB)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "base", img}).status());
  ASSERT_OK_AND_ASSIGN(std::string before, QemuSnapshot(img, "1"));

  ImageOptions writable;
  writable.read_only = false;
  std::string expected_disk;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, SyncWait(Image::Open(img, writable)));
    ASSERT_OK_AND_ASSIGN(std::vector<SnapshotInfo> snapshots, SyncWait(image->Snapshots()));
    ASSERT_EQ(snapshots.size(), 1u);
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> snapshot, SyncWait(image->OpenSnapshot(snapshots[0])));
    // Read first, so the shared L2 cache holds the tables the writes copy.
    ASSERT_OK_AND_ASSIGN(std::string first_read, ReadAll(*snapshot));
    ASSERT_TRUE(first_read == before);
    ASSERT_OK_AND_ASSIGN(expected_disk, ReadAll(*image));
    std::vector<uint8_t> data(3 * kMiB, 0x77);
    ASSERT_OK(SyncWait(image->Write(kMiB + 512, data)));
    ASSERT_OK(SyncWait(image->Discard(6 * kMiB, kMiB)));
    std::fill(expected_disk.begin() + kMiB + 512, expected_disk.begin() + 4 * kMiB + 512, 0x77);
    std::fill(expected_disk.begin() + 6 * kMiB, expected_disk.begin() + 7 * kMiB, 0);
    ASSERT_OK_AND_ASSIGN(std::string after, ReadAll(*snapshot));
    EXPECT_TRUE(after == before) << "a write to the disk changed the snapshot";
    ASSERT_OK_AND_ASSIGN(std::string disk, ReadAll(*image));
    EXPECT_TRUE(disk == expected_disk);
    snapshot.reset();
    ASSERT_OK(SyncWait(image->Flush()));
  }
  ASSERT_OK(CheckImage(img));
  ASSERT_OK_AND_ASSIGN(std::string qemu_after, QemuSnapshot(img, "1"));
  EXPECT_TRUE(qemu_after == before);
  ASSERT_OK_AND_ASSIGN(std::string qemu_disk, QemuDisk(img));
  EXPECT_TRUE(qemu_disk == expected_disk);
}

// What a snapshot never wrote comes from the backing file, as for the disk.
TEST_F(SnapshotTest, UnallocatedPartsReadTheBackingFile) {
  const std::string base = dir_->Join("base.qcow2");
  const std::string img = dir_->Join("top.qcow2");
  ASSERT_OK(CreateImage(base, "qcow2", 4 * kMiB));
  ASSERT_OK(QemuIo(base, "qcow2", {W(0x5a, 0, 4 * kMiB)}));
  ASSERT_OK(CreateImage(img, "qcow2", 4 * kMiB, {"backing_file=" + base, "backing_fmt=qcow2"}));
  ASSERT_OK(QemuIo(img, "qcow2", {W(0x11, kMiB, 4096)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "s", img}).status());
  ASSERT_OK(QemuIo(img, "qcow2", {W(0x22, 0, 4 * kMiB)}));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, SyncWait(Image::Open(img, ImageOptions{})));
  ExpectSnapshotsAsQemu(*image, img);
}

// A snapshot that records a larger disk than its L1 table reaches: the
// rest reads as unallocated (zeros here), as QEMU reads it after
// `qemu-img snapshot -a`, rather than failing.
TEST_F(SnapshotTest, DiskBeyondTheSnapshotsL1TableReadsAsUnallocated) {
  const std::string img = dir_->Join("short-l1.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", kMiB));
  ASSERT_OK(QemuIo(img, "qcow2", {W(0x11, 0, kMiB)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "s", img}).status());
  ASSERT_OK_AND_ASSIGN(std::string bytes, ReadFile(img));
  uint64_t table = 0;
  for (int i = 0; i < 8; ++i) table = table << 8 | static_cast<uint8_t>(bytes[64 + i]);
  // The extra data's disk size (bytes 8-15 after the 40-byte fixed part): 1 GiB.
  std::string size(8, '\0');
  size[4] = 0x40;
  ASSERT_OK(WriteFileAt(img, table + 40 + 8, size));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, SyncWait(Image::Open(img, ImageOptions{})));
  ASSERT_OK_AND_ASSIGN(std::vector<SnapshotInfo> snapshots, SyncWait(image->Snapshots()));
  ASSERT_EQ(snapshots.size(), 1u);
  EXPECT_EQ(snapshots[0].disk_size, uint64_t{1} << 30);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> snapshot, SyncWait(image->OpenSnapshot(snapshots[0])));
  std::vector<uint8_t> head(kMiB), far(kMiB, 0xff);
  ASSERT_OK(SyncWait(snapshot->Read(0, head)));
  EXPECT_EQ(head, std::vector<uint8_t>(kMiB, 0x11));
  ASSERT_OK(SyncWait(snapshot->Read(512 * kMiB, far)));
  EXPECT_EQ(far, std::vector<uint8_t>(kMiB, 0));
  ASSERT_OK_AND_ASSIGN(uint64_t data, SyncWait(snapshot->AllocatedBytes()));
  EXPECT_EQ(data, kMiB);
}

TEST_F(SnapshotTest, ImageWithoutSnapshotsListsNone) {
  const std::string img = dir_->Join("none.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", kMiB));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, SyncWait(Image::Open(img, ImageOptions{})));
  ASSERT_OK_AND_ASSIGN(std::vector<SnapshotInfo> snapshots, SyncWait(image->Snapshots()));
  EXPECT_TRUE(snapshots.empty());
  SnapshotInfo none;
  none.id = "1";
  EXPECT_EQ(SyncWait(image->OpenSnapshot(none)).status().code(), absl::StatusCode::kNotFound);
}

// A crafted snapshot entry: its L1 table unaligned, then past the end of
// the file, then a disk no L1 table could map. Each is refused, naming the
// snapshot; the image itself still opens and reads.
TEST_F(SnapshotTest, HostileSnapshotEntryIsRefused) {
  const std::string img = dir_->Join("hostile.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", kMiB));
  ASSERT_OK(QemuIo(img, "qcow2", {W(0x11, 0, 65536)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "evil", img}).status());
  ASSERT_OK_AND_ASSIGN(std::string header, ReadFile(img));
  auto be64 = [&](size_t at) {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = v << 8 | static_cast<uint8_t>(header[at + i]);
    return v;
  };
  const uint64_t table = be64(64);  // snapshots_offset
  auto put64 = [](uint64_t v) {
    std::string bytes(8, '\0');
    for (int i = 7; i >= 0; --i, v >>= 8) bytes[i] = static_cast<char>(v & 0xff);
    return bytes;
  };
  const uint64_t l1_offset = be64(table);
  struct Case {
    uint64_t at;
    std::string bytes;
    const char* says;
  };
  for (const Case& c : std::vector<Case>{
           {table, put64(l1_offset + 8), "not cluster aligned or not inside the file"},
           {table, put64(uint64_t{1} << 50), "not cluster aligned or not inside the file"},
           {table + 40 + 8, put64(~uint64_t{0} - 511), "more than an L1 table can map"},
       }) {
    SCOPED_TRACE(c.says);
    const std::string copy = dir_->Join("hostile-copy.qcow2");
    std::string bytes = header;
    bytes.replace(c.at, 8, c.bytes);
    ASSERT_OK(WriteFileAt(copy, 0, bytes));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, SyncWait(Image::Open(copy, ImageOptions{})));
    ASSERT_OK_AND_ASSIGN(std::vector<SnapshotInfo> snapshots, SyncWait(image->Snapshots()));
    ASSERT_EQ(snapshots.size(), 1u);
    absl::StatusOr<std::unique_ptr<Image>> snapshot = SyncWait(image->OpenSnapshot(snapshots[0]));
    ASSERT_FALSE(snapshot.ok());
    EXPECT_EQ(snapshot.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_TRUE(absl::StrContains(snapshot.status().message(), "snapshot 'evil' (ID 1)")) << snapshot.status();
    EXPECT_TRUE(absl::StrContains(snapshot.status().message(), c.says)) << snapshot.status();
    ASSERT_OK_AND_ASSIGN(std::string disk, ReadAll(*image));
    EXPECT_EQ(disk[0], 0x11);
  }
}

// QEMU refuses snapshots of an image with an external data file, whose
// data is written in place: an image that has both anyway (the feature bit
// set by hand here, the data file a copy of the image, so every offset
// still finds its bytes) lists the snapshot but refuses to open it,
// saying why; the disk itself reads.
TEST_F(SnapshotTest, SnapshotOfAnImageWithAnExternalDataFileIsRefused) {
  const std::string img = dir_->Join("both.qcow2");
  ASSERT_OK(CreateImage(img, "qcow2", kMiB));
  ASSERT_OK(QemuIo(img, "qcow2", {W(0x11, 0, 65536)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "kept", img}).status());
  ASSERT_OK_AND_ASSIGN(std::string bytes, ReadFile(img));
  const std::string data = dir_->Join("both.data");
  ASSERT_OK(WriteFileAt(data, 0, bytes));
  constexpr size_t kIncompatibleFeaturesLastByte = 72 + 7;  // big-endian
  constexpr char kExternalDataFileBit = 1 << 2;              // incompatible feature bit 2
  bytes[kIncompatibleFeaturesLastByte] |= kExternalDataFileBit;
  ASSERT_OK(WriteFileAt(img, 0, bytes));

  ImageOptions options;
  options.data_file = data;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image, SyncWait(Image::Open(img, options)));
  ASSERT_OK_AND_ASSIGN(std::vector<SnapshotInfo> snapshots, SyncWait(image->Snapshots()));
  ASSERT_EQ(snapshots.size(), 1u);
  absl::StatusOr<std::unique_ptr<Image>> snapshot = SyncWait(image->OpenSnapshot(snapshots[0]));
  ASSERT_FALSE(snapshot.ok());
  EXPECT_EQ(snapshot.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(snapshot.status().message(), "snapshot 'kept' (ID 1)")) << snapshot.status();
  EXPECT_TRUE(absl::StrContains(snapshot.status().message(), "external data file")) << snapshot.status();
  ASSERT_OK_AND_ASSIGN(std::string disk, ReadAll(*image));
  EXPECT_EQ(disk.substr(0, 65536), std::string(65536, '\x11'));
}

}  // namespace
}  // namespace qcow2fuse::test
