// New images (Image::Create, format/create.h), checked by QEMU: qemu-img
// check finds them clean, qemu-img info reads back the size, cluster size
// and backing file, and they take writes through the engine that QEMU then
// reads back.

#include <fcntl.h>
#include <unistd.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "format/create.h"
#include "gtest/gtest.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"
#include "support/file_util.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

class CreateTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_OK_AND_ASSIGN(dir_, TempDir::Create("create")); }

  absl::Status CreateAt(const std::string& path, const NewImageOptions& options) {
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return absl::InternalError("open failed");
    absl::Status status = Image::Create(fd, path, options);
    close(fd);
    return status;
  }

  std::optional<TempDir> dir_;
};

TEST_F(CreateTest, QemuFindsItCleanWithTheSizesAsked) {
  struct Case {
    uint64_t size;
    uint64_t cluster_size;
  };
  // From one L2 table's reach to many L1 clusters and several refcount
  // blocks (512-byte clusters: one block counts 256 clusters).
  for (const Case& c : std::vector<Case>{{kMiB, 65536},
                                         {16 * kMiB, 512},
                                         {64ull << 30, 512},
                                         {1ull << 40, 65536},
                                         {3 * kMiB + 512, 4096},
                                         {1ull << 40, 2 * kMiB}}) {
    SCOPED_TRACE(absl::StrCat("size ", c.size, ", clusters of ", c.cluster_size));
    const std::string image = dir_->Join(absl::StrCat("new-", c.size, "-", c.cluster_size, ".qcow2"));
    NewImageOptions options;
    options.size = c.size;
    options.cluster_size = c.cluster_size;
    ASSERT_OK(CreateAt(image, options));
    EXPECT_OK(CheckImage(image));
    ASSERT_OK_AND_ASSIGN(std::string info, QemuImg({"info", "--output=json", image}));
    EXPECT_TRUE(absl::StrContains(info, absl::StrCat("\"virtual-size\": ", c.size))) << info;
    EXPECT_TRUE(absl::StrContains(info, absl::StrCat("\"cluster-size\": ", c.cluster_size))) << info;
    EXPECT_TRUE(absl::StrContains(info, "\"compat\": \"1.1\"")) << info;
  }
}

// Written through the engine, then read by QEMU: the same bytes as a raw
// file that got the same writes, and still clean.
TEST_F(CreateTest, TakesWritesThatQemuReads) {
  const std::string base = dir_->Join("base.qcow2");
  ASSERT_OK(CreateImage(base, "qcow2", 8 * kMiB));
  ASSERT_OK(QemuIo(base, "qcow2", {qemu_io_cmd::W(0x11, 0, 8 * kMiB)}));
  const std::string image = dir_->Join("overlay.qcow2");
  NewImageOptions options;
  options.size = 8 * kMiB;
  options.cluster_size = 65536;
  options.backing_file = base;
  options.backing_format = "qcow2";
  ASSERT_OK(CreateAt(image, options));
  ASSERT_OK_AND_ASSIGN(std::string info, QemuImg({"info", "--output=json", image}));
  EXPECT_TRUE(absl::StrContains(info, absl::StrCat("\"backing-filename\": \"", base, "\""))) << info;
  EXPECT_TRUE(absl::StrContains(info, "\"backing-filename-format\": \"qcow2\"")) << info;

  {
    ImageOptions open_options;
    open_options.read_only = false;
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> opened, SyncWait(Image::Open(image, open_options)));
    const std::vector<uint8_t> data(100000, 0x22);
    ASSERT_OK(SyncWait(opened->Write(3 * kMiB + 1000, data)));
    ASSERT_OK(SyncWait(opened->Flush()));
  }
  EXPECT_OK(CheckImage(image));
  const std::string twin = dir_->Join("twin.qcow2");
  ASSERT_OK(CreateImage(twin, "qcow2", 8 * kMiB, {"backing_file=" + base, "backing_fmt=qcow2"}));
  ASSERT_OK(QemuIo(twin, "qcow2", {"write -P 0x22 3146728 100000"}));
  EXPECT_OK(QemuImg({"compare", image, twin}));
}

TEST_F(CreateTest, RefusesWhatQemuCouldNotOpen) {
  NewImageSpec spec;
  spec.size = 1ull << 40;
  spec.cluster_bits = 9;  // an L1 table of 256 MiB
  EXPECT_FALSE(LayOutNewImage(spec).ok());
  spec.size = 1000;  // not whole sectors
  EXPECT_FALSE(LayOutNewImage(spec).ok());
  spec.size = kMiB;
  spec.backing_file = std::string(1000, 'b');  // past the 512-byte header cluster
  absl::StatusOr<NewImageLayout> layout = LayOutNewImage(spec);
  ASSERT_FALSE(layout.ok());
  EXPECT_TRUE(absl::StrContains(layout.status().message(), "does not fit")) << layout.status();
  spec.cluster_bits = 16;
  EXPECT_OK(LayOutNewImage(spec).status());
}

}  // namespace
}  // namespace qcow2fuse::test
