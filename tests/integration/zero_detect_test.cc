// detect_zeroes through a real mount, written as programs write: a buffered
// write of zeros from a buffer that is not page aligned (a Python bytes
// object) reaches the daemon as alternating 4048- and 48-byte requests,
// none of which covers a cluster. The clusters it zeroes must end as one
// aligned zero write leaves them: zero clusters, freed with unmap, kept as
// preallocated zero clusters with `on`. qemu-img map, check and compare
// against a raw twin judge the image.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kDisk = uint64_t{16} << 20;
constexpr uint64_t kZeroStart = uint64_t{2} << 20;
constexpr uint64_t kZeroBytes = uint64_t{2} << 20;

// Writes `length` zero bytes at `offset` of `path` with one os.write() of a
// bytes object, whose buffer is not page aligned, then closes the file.
absl::Status WriteZerosFromUnalignedBuffer(const std::string& path, uint64_t offset, uint64_t length) {
  const std::string script = absl::StrFormat(
      "import os\n"
      "fd = os.open('%s', os.O_WRONLY)\n"
      "data = bytes(%u)\n"
      "assert os.pwrite(fd, data, %u) == len(data)\n"
      "os.close(fd)\n",
      path, length, offset);
  return RunChecked({"python3", "-c", script}).status();
}

// "allocated-clusters" of qemu-img check's JSON report.
uint64_t AllocatedClusters(const QemuCheckReport& report) {
  const std::string key = "\"allocated-clusters\": ";
  const size_t at = report.output.find(key);
  return at == std::string::npos ? 0 : std::stoull(report.output.substr(at + key.size()));
}

class UnalignedZerosTest : public ::testing::TestWithParam<std::string> {};

TEST_P(UnalignedZerosTest, MakeZeroClusters) {
  const std::string mode = GetParam();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("zero-detect-" + mode));
  const std::string image = dir.Join("disk.qcow2");
  const std::string twin = dir.Join("twin.raw");
  ASSERT_OK(CreateImage(image, "qcow2", kDisk, {"cluster_size=64k"}));
  ASSERT_OK(CreateImage(twin, "raw", kDisk));
  // Data first: 8 MiB of it, so the zeros land on allocated clusters.
  const std::vector<std::string> data = {"write -P 0x5a 0 8M"};
  ASSERT_OK(QemuIo(image, "qcow2", data));
  ASSERT_OK(QemuIo(twin, "raw", data));
  ASSERT_OK_AND_ASSIGN(QemuCheckReport before, QemuCheck(image));

  MountOptions options;
  options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  options.image = image;
  options.mountpoint = dir.Join("disk.raw");
  options.read_only = false;
  options.extra_options = {"detect_zeroes=" + mode};
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
    ASSERT_OK(WriteZerosFromUnalignedBuffer(view->path(), kZeroStart, kZeroBytes));
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  }
  ASSERT_OK(QemuIo(twin, "raw", {absl::StrFormat("write -z %u %u", kZeroStart, kZeroBytes)}));

  // qemu-img map --output=json: the zeroed range is one zero extent with no
  // data behind it ("data": false).
  ASSERT_OK_AND_ASSIGN(std::string map, QemuImg({"map", "--output=json", image}));
  const std::string zero_extent =
      absl::StrFormat("\"start\": %u, \"length\": %u, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false",
                      kZeroStart, kZeroBytes);
  EXPECT_NE(map.find(zero_extent), std::string::npos) << "the zeros stayed allocated data:\n" << map;

  ASSERT_OK_AND_ASSIGN(QemuCheckReport after, QemuCheck(image));
  EXPECT_EQ(after.corruptions + after.leaks + after.check_errors, 0u) << after.output;
  const uint64_t clusters = kZeroBytes / 65536;
  if (mode == "unmap") {
    EXPECT_EQ(AllocatedClusters(after) + clusters, AllocatedClusters(before))
        << "the zeroed clusters were not freed\n" << after.output;
  } else {
    EXPECT_EQ(AllocatedClusters(after), AllocatedClusters(before))
        << "detect_zeroes=on keeps the host clusters\n" << after.output;
  }
  ASSERT_OK_AND_ASSIGN(std::string compared, QemuImg({"compare", "-f", "qcow2", "-F", "raw", image, twin}));
  EXPECT_NE(compared.find("identical"), std::string::npos) << compared;
}

INSTANTIATE_TEST_SUITE_P(Modes, UnalignedZerosTest, ::testing::Values("on", "unmap"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

}  // namespace
}  // namespace qcow2fuse::test
