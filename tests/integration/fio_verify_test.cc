// fio through a read-write view, 4 jobs at a time, every block checked with
// crc32c: the parallel engine must neither lose nor mix up writes.
//
// "overlap": four jobs write interleaved 4 KiB blocks (job i writes block i
// of every 16 KiB), so every 64 KiB cluster gets allocating writes from all
// four jobs at once and their copy-on-writes contend for one L2 entry.
// "disjoint": four jobs write random 4 KiB blocks in their own 16 MiB.
// After the run, `qemu-img check` must be clean; after a remount fio
// verifies every block again (verify_only).

#include <string>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr char kJob[] = R"([global]
filename=%s
ioengine=psync
direct=1
bs=4k
verify=crc32c
verify_fatal=1
do_verify=1
[overlap]
rw=write
numjobs=4
offset_increment=4k
size=8M
zonemode=strided
zonesize=4k
zoneskip=12k
[disjoint]
rw=randwrite
numjobs=4
offset=64M
offset_increment=16M
size=8M
)";

class FioVerifyTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FioVerifyTest, FourJobsVerifyAndVerifyAgainAfterRemount) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("fio"));
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", uint64_t{160} << 20, {GetParam()}));
  const std::string job = dir.Join("job.fio");

  MountOptions options;
  options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  options.image = image;
  options.mountpoint = dir.Join("disk.raw");
  options.read_only = false;
  options.start_timeout = std::chrono::seconds(30);
  options.stop_timeout = std::chrono::seconds(60);
  ASSERT_OK(WriteFileAt(job, 0, absl::StrFormat(kJob, options.mountpoint)));

  for (const bool verify_only : {false, true}) {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
    std::vector<std::string> argv = {"fio", "--output-format=terse"};
    if (verify_only) argv.push_back("--verify_only");
    argv.push_back(job);
    absl::StatusOr<std::string> out = RunChecked(argv);
    EXPECT_OK(out.status()) << (verify_only ? "verify after remount" : "write and verify");
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
    EXPECT_OK(CheckImage(image));
  }
}

INSTANTIATE_TEST_SUITE_P(Images, FioVerifyTest,
                         ::testing::Values("cluster_size=64k", "cluster_size=64k,extended_l2=on"),
                         [](const auto& info) { return info.index == 0 ? "standard" : "extended_l2"; });

}  // namespace
}  // namespace qcow2fuse::test
