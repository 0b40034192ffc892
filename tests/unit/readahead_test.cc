// Where the readahead for loop devices comes from: DeviceReadahead on sysfs
// trees laid out as the kernel lays them out; and LoopReadahead's count of
// the loop devices' descriptors, on a file that stands in for the mount's
// read_ahead_kb. The mount-level behaviour (a view
// over an image on a loop device whose readahead was set) is in
// tests/cli/mount_options_test.cc.

#include "readahead.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse {
namespace {

namespace fs = std::filesystem;

class DeviceReadaheadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<test::TempDir> dir = test::TempDir::Create("sysfs");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_.emplace(std::move(*dir));
    sysfs_ = dir_->path();
  }

  // Writes `text` to `relative` under the fake sysfs, making directories.
  void Put(const std::string& relative, const std::string& text) {
    const fs::path path = fs::path(sysfs_) / relative;
    fs::create_directories(path.parent_path());
    std::ofstream(path) << text;
  }

  std::optional<test::TempDir> dir_;
  std::string sysfs_;
};

// A whole disk (or device-mapper device) has a bdi of its own number.
TEST_F(DeviceReadaheadTest, ReadsTheBdiOfTheDevice) {
  Put("class/bdi/254:0/read_ahead_kb", "8192\n");
  ASSERT_OK_AND_ASSIGN(uint64_t bytes, DeviceReadahead(makedev(254, 0), sysfs_));
  EXPECT_EQ(bytes, uint64_t{8} << 20);
}

// A number too large for bytes saturates instead of wrapping round to a
// small one.
TEST_F(DeviceReadaheadTest, AHugeNumberSaturates) {
  Put("class/bdi/8:16/read_ahead_kb", "18446744073709551615\n");
  ASSERT_OK_AND_ASSIGN(uint64_t bytes, DeviceReadahead(makedev(8, 16), sysfs_));
  EXPECT_EQ(bytes, UINT64_MAX);
}

// A partition has none: /sys/dev/block/MAJ:MIN links to the partition's
// directory inside its disk's, whose queue holds the readahead.
TEST_F(DeviceReadaheadTest, APartitionReadsAheadAsItsDisk) {
  Put("devices/pci0/nvme0n1/queue/read_ahead_kb", "2048\n");
  Put("devices/pci0/nvme0n1/nvme0n1p2/partition", "2\n");
  Put("class/bdi/259:0/read_ahead_kb", "4096\n");  // the disk's bdi: another number, not read
  fs::create_directories(fs::path(sysfs_) / "dev/block");
  fs::create_directory_symlink("../../devices/pci0/nvme0n1/nvme0n1p2", fs::path(sysfs_) / "dev/block/259:2");
  ASSERT_OK_AND_ASSIGN(uint64_t bytes, DeviceReadahead(makedev(259, 2), sysfs_));
  EXPECT_EQ(bytes, uint64_t{2} << 20);
}

// tmpfs, or btrfs (whose bdi is named btrfs-N): nothing to follow.
TEST_F(DeviceReadaheadTest, ADeviceWithoutABdiIsNotFound) {
  Put("class/bdi/btrfs-1/read_ahead_kb", "4096\n");
  EXPECT_TRUE(absl::IsNotFound(DeviceReadahead(makedev(0, 43), sysfs_).status()));
}

TEST_F(DeviceReadaheadTest, AFileWithoutANumberIsAnError) {
  Put("class/bdi/8:0/read_ahead_kb", "lots\n");
  absl::StatusOr<uint64_t> bytes = DeviceReadahead(makedev(8, 0), sysfs_);
  ASSERT_FALSE(bytes.ok());
  EXPECT_NE(bytes.status().message().find("class/bdi/8:0/read_ahead_kb"), std::string::npos) << bytes.status();
}

// A file in the same kind of temporary directory stands in for the
// mount's read_ahead_kb.
class LoopReadaheadTest : public DeviceReadaheadTest {
 protected:
  void SetUp() override {
    DeviceReadaheadTest::SetUp();
    knob_ = sysfs_ + "/read_ahead_kb";
    Put("read_ahead_kb", "1024\n");
  }

  // The knob's first line.
  std::string Kb() const {
    std::ifstream in(knob_);
    std::string text;
    std::getline(in, text);
    return text;
  }

  std::string knob_;
};

// The first open raises, only the last release lowers; a release that
// nothing opened changes nothing.
TEST_F(LoopReadaheadTest, RaisedFromTheFirstOpenToTheLastRelease) {
  LoopReadahead readahead(knob_, uint64_t{1} << 20, uint64_t{8} << 20);
  EXPECT_EQ(readahead.raised(), uint64_t{8} << 20);
  ASSERT_OK(readahead.Released());
  EXPECT_EQ(Kb(), "1024");
  ASSERT_OK(readahead.Opened());
  EXPECT_EQ(Kb(), "8192");
  ASSERT_OK(readahead.Opened());
  ASSERT_OK(readahead.Released());
  EXPECT_EQ(Kb(), "8192") << "one loop device's descriptor is still open";
  ASSERT_OK(readahead.Released());
  EXPECT_EQ(Kb(), "1024");
}

TEST_F(LoopReadaheadTest, AFailedWriteNamesTheKnob) {
  const std::string knob = sysfs_ + "/no/such/read_ahead_kb";
  LoopReadahead readahead(knob, uint64_t{1} << 20, uint64_t{4} << 20);
  absl::Status status = readahead.Opened();
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find(knob), std::string::npos) << status;
}

// An open whose raise failed is not counted, so the next release that
// ends the last counted one still lowers the readahead.
TEST_F(LoopReadaheadTest, AFailedRaiseIsNotCounted) {
  LoopReadahead readahead(knob_, uint64_t{1} << 20, uint64_t{4} << 20);
  ASSERT_OK(readahead.Opened());
  // The knob made unwritable (a directory in its place), then restored.
  ASSERT_EQ(unlink(knob_.c_str()), 0);
  ASSERT_EQ(mkdir(knob_.c_str(), 0700), 0);
  EXPECT_FALSE(readahead.Opened().ok());
  ASSERT_EQ(rmdir(knob_.c_str()), 0);
  std::ofstream(knob_) << "4096\n";
  ASSERT_OK(readahead.Released());
  EXPECT_EQ(Kb(), "1024") << "the failed open was counted";
}

}  // namespace
}  // namespace qcow2fuse
