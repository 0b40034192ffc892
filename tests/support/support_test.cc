// Tests of the test helpers themselves: a helper that silently passes
// would make every test built on it pass too.

#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/loop_device.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

TEST(CommandTest, CommandLineQuotesOnlyWhatNeedsIt) {
  EXPECT_EQ(CommandLine({"qemu-img", "create", "-o", "a=1,b=2", "/tmp/x.img"}),
            "qemu-img create -o a=1,b=2 /tmp/x.img");
  EXPECT_EQ(CommandLine({"echo", "a b", "it's", ""}),
            "echo 'a b' 'it'\\''s' ''");
}

TEST(CommandTest, RunCommandCapturesOutputAndExitCode) {
  ASSERT_OK_AND_ASSIGN(
      CommandResult result,
      RunCommand({"sh", "-c", "echo out; echo err >&2; exit 3"}));
  EXPECT_EQ(result.stdout_text, "out\n");
  EXPECT_EQ(result.stderr_text, "err\n");
  EXPECT_TRUE(result.status.exited());
  EXPECT_EQ(result.status.code(), 3);
  EXPECT_FALSE(result.ok());
}

TEST(CommandTest, ArgumentsReachTheProgramUnchanged) {
  ASSERT_OK_AND_ASSIGN(std::string out,
                       RunChecked({"printf", "%s|", "a b", "$HOME", "'\""}));
  EXPECT_EQ(out, "a b|$HOME|'\"|");
}

TEST(CommandTest, RunCheckedReportsCommandAndStderr) {
  absl::StatusOr<std::string> out =
      RunChecked({"sh", "-c", "echo broken image >&2; exit 1", "x y"});
  ASSERT_FALSE(out.ok());
  const std::string message(out.status().message());
  EXPECT_TRUE(absl::StrContains(message, "exit code 1")) << message;
  EXPECT_TRUE(absl::StrContains(message, "broken image")) << message;
  EXPECT_TRUE(absl::StrContains(message, "'x y'")) << message;
}

TEST(CommandTest, MissingProgramIsAnError) {
  EXPECT_FALSE(RunCommand({"/nonexistent/qcow2fuse-no-such-tool"}).ok());
}

TEST(CommandTest, SignalDeathIsReported) {
  ASSERT_OK_AND_ASSIGN(CommandResult result,
                       RunCommand({"sh", "-c", "kill -9 $$"}));
  EXPECT_TRUE(result.status.signaled());
  EXPECT_EQ(result.status.signal(), SIGKILL);
  EXPECT_TRUE(absl::StrContains(result.status.ToString(), "signal 9"));
}

TEST(CommandTest, BoundedWaitReturnsWhileChildRuns) {
  ASSERT_OK_AND_ASSIGN(pid_t pid, Spawn({"sleep", "60"}, 2, 2));
  ASSERT_OK_AND_ASSIGN(std::optional<ExitStatus> early,
                       WaitForExitFor(pid, std::chrono::milliseconds(0)));
  EXPECT_FALSE(early.has_value());
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  ASSERT_OK_AND_ASSIGN(ExitStatus status, WaitForExit(pid));
  EXPECT_EQ(status.signal(), SIGKILL);
  // Reaped: waiting again is an error, not "still running".
  EXPECT_FALSE(WaitForExitFor(pid, std::chrono::milliseconds(0)).ok());
}

TEST(CommandTest, TimeoutKillsTheChild) {
  CommandOptions options;
  options.timeout = std::chrono::milliseconds(100);
  const auto start = std::chrono::steady_clock::now();
  ASSERT_OK_AND_ASSIGN(CommandResult result,
                       RunCommand({"sh", "-c", "echo started; exec sleep 60"},
                                  options));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  EXPECT_TRUE(result.timed_out);
  EXPECT_EQ(result.status.signal(), SIGKILL);
  EXPECT_EQ(result.stdout_text, "started\n");
}

TEST(CommandTest, FastChildIsNotTimedOut) {
  CommandOptions options;
  options.timeout = std::chrono::seconds(30);
  ASSERT_OK_AND_ASSIGN(CommandResult result,
                       RunCommand({"sh", "-c", "exit 4"}, options));
  EXPECT_FALSE(result.timed_out);
  EXPECT_EQ(result.status.code(), 4);
}

TEST(CommandTest, RunsInWorkingDirectoryAndCallsBackWhileRunning) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("selftest"));
  int calls = 0;
  CommandOptions options;
  options.cwd = dir.path();
  options.while_running = [&calls] { ++calls; };
  ASSERT_OK_AND_ASSIGN(CommandResult result,
                       RunCommand({"sh", "-c", "sleep 0.2; pwd"}, options));
  EXPECT_TRUE(result.ok());
  EXPECT_EQ(result.stdout_text, dir.path() + "\n");
  EXPECT_GT(calls, 0);
}

TEST(SeedTest, EnvironmentReplaysASeed) {
  const char* saved = getenv("QCOW2FUSE_TEST_SEED");
  const std::string restore = saved != nullptr ? saved : "";
  ASSERT_EQ(setenv("QCOW2FUSE_TEST_SEED", "18446744073709551615", 1), 0);
  EXPECT_EQ(TestSeed(), 18446744073709551615u);
  ASSERT_EQ(unsetenv("QCOW2FUSE_TEST_SEED"), 0);
  EXPECT_NE(TestSeed(), TestSeed());  // Fresh ones: equal 1 in 2^64.
  if (saved != nullptr) setenv("QCOW2FUSE_TEST_SEED", restore.c_str(), 1);
}

TEST(TempDirTest, CreatesAndRemovesRecursively) {
  std::string path;
  {
    ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("selftest"));
    path = dir.path();
    EXPECT_TRUE(std::filesystem::is_directory(path));
    EXPECT_EQ(dir.Join("a"), path + "/a");
    std::filesystem::create_directories(dir.Join("a/b"));
    ASSERT_OK(WriteFileAt(dir.Join("a/b/c"), 0, "data"));
    TempDir moved = std::move(dir);
    EXPECT_EQ(moved.path(), path);
  }
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(QemuTest, ParsesMapJson) {
  const char* json =
      "[{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, "
      "\"zero\": false, \"data\": true, \"offset\": 327680},\n"
      "{ \"start\": 65536, \"length\": 8323072, \"depth\": 1, "
      "\"present\": false, \"zero\": true, \"data\": false}]\n";
  ASSERT_OK_AND_ASSIGN(std::vector<MapExtent> map, ParseMapJson(json));
  ASSERT_EQ(map.size(), 2u);
  EXPECT_EQ(map[0].start, 0u);
  EXPECT_EQ(map[0].length, 65536u);
  EXPECT_TRUE(map[0].data);
  EXPECT_FALSE(map[0].zero);
  EXPECT_TRUE(map[0].present);
  EXPECT_EQ(map[0].offset, 327680u);
  EXPECT_EQ(map[1].end(), 65536u + 8323072u);
  EXPECT_EQ(map[1].depth, 1);
  EXPECT_TRUE(map[1].zero);
  EXPECT_FALSE(map[1].offset.has_value());
}

TEST(QemuTest, RejectsMalformedMapJson) {
  EXPECT_FALSE(ParseMapJson("[{ \"start\": 0, \"length\": x }]").ok());
  ASSERT_OK_AND_ASSIGN(std::vector<MapExtent> empty, ParseMapJson("[]"));
  EXPECT_TRUE(empty.empty());
}

class FileUtilTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("selftest"));
    dir_ = std::make_unique<TempDir>(std::move(dir));
  }

  std::unique_ptr<TempDir> dir_;
};

// An image qemu-img cannot open is no clean report: QemuCheck fails.
TEST(QemuTest, CheckOfAnImageQemuCannotOpenIsAnError) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("qemu-check"));
  const std::string bad = dir.Join("bad.qcow2");
  ASSERT_OK(WriteFileAt(bad, 0, "not an image\n"));
  EXPECT_FALSE(QemuCheck(bad).ok());
  const std::string good = dir.Join("good.qcow2");
  ASSERT_OK(CreateImage(good, "qcow2", kMiB));
  ASSERT_OK_AND_ASSIGN(QemuCheckReport report, QemuCheck(good));
  EXPECT_EQ(report.exit_code, 0);
  EXPECT_EQ(report.corruptions + report.leaks + report.check_errors, 0u);
}

TEST_F(FileUtilTest, CompareFilesNamesFirstMismatch) {
  const std::string a = dir_->Join("a"), b = dir_->Join("b");
  std::string data(3 << 20, 'x');
  ASSERT_OK(WriteFileAt(a, 0, data));
  ASSERT_OK(WriteFileAt(b, 0, data));
  EXPECT_OK(CompareFiles(a, b));

  ASSERT_OK(WriteFileAt(b, 2 * (1 << 20) + 12345, "y"));
  absl::Status differ = CompareFiles(a, b);
  EXPECT_FALSE(differ.ok());
  EXPECT_TRUE(absl::StrContains(differ.message(), "offset 2109497")) << differ;

  ASSERT_OK(WriteFileAt(b, 0, data));
  ASSERT_OK(WriteFileAt(b, data.size(), "tail"));
  absl::Status size = CompareFiles(a, b);
  EXPECT_FALSE(size.ok());
  EXPECT_TRUE(absl::StrContains(size.message(), "size")) << size;
}

TEST_F(FileUtilTest, Sha256MatchesKnownDigest) {
  ASSERT_OK(WriteFileAt(dir_->Join("abc"), 0, "abc"));
  ASSERT_OK_AND_ASSIGN(std::string digest, Sha256File(dir_->Join("abc")));
  EXPECT_EQ(digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_F(FileUtilTest, DataRegionsCoverWrittenDataAndHolesReadZero) {
  const std::string path = dir_->Join("sparse");
  ASSERT_OK(WriteFileAt(path, 0, std::string(4096, 'a')));
  ASSERT_OK(WriteFileAt(path, 1 << 20, std::string(4096, 'b')));
  std::filesystem::resize_file(path, 4 << 20);
  ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(path));
  ASSERT_OK_AND_ASSIGN(std::vector<ByteRange> data, DataRegions(fd.get()));
  // A file system may report more data than was written, never less.
  for (const ByteRange& written :
       {ByteRange{0, 4096}, ByteRange{1 << 20, 4096}}) {
    EXPECT_TRUE(std::any_of(data.begin(), data.end(), [&](const ByteRange& r) {
      return r.Contains(written);
    })) << written;
  }
  for (const ByteRange& hole : Complement(data, 4 << 20)) {
    EXPECT_OK(CheckZeros(fd.get(), hole));
  }
  absl::Status nonzero = CheckZeros(fd.get(), {4000, 200});
  EXPECT_FALSE(nonzero.ok());
  EXPECT_TRUE(absl::StrContains(nonzero.message(), "offset 4000")) << nonzero;
}

TEST(ComplementTest, FillsGapsAndEnds) {
  EXPECT_EQ(Complement({}, 10), (std::vector<ByteRange>{{0, 10}}));
  EXPECT_EQ(Complement({{2, 3}, {7, 1}}, 10),
            (std::vector<ByteRange>{{0, 2}, {5, 2}, {8, 2}}));
  EXPECT_EQ(Complement({{0, 10}}, 10), std::vector<ByteRange>{});
}

TEST(LoopDeviceTest, AttachesAndDetaches) {
  if (std::string reason = LoopUnavailableReason(); !reason.empty()) {
    GTEST_SKIP() << "loop devices unavailable: " << reason;
  }
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("selftest"));
  const std::string file = dir.Join("disk.raw");
  ASSERT_OK(WriteFileAt(file, 0, std::string(1 << 20, 'x')));
  std::string backing;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<LoopDevice> loop,
                         LoopDevice::Attach(file, /*read_only=*/true));
    backing = "/sys/block/" +
              std::filesystem::path(loop->device()).filename().string() +
              "/loop/backing_file";
    ASSERT_OK_AND_ASSIGN(std::string attached_to, ReadFile(backing));
    EXPECT_EQ(attached_to, file + "\n");
    ASSERT_OK_AND_ASSIGN(std::string data, ReadFile(loop->device()));
    EXPECT_TRUE(data == std::string(1 << 20, 'x')) << data.size() << " bytes";
  }
  EXPECT_FALSE(std::filesystem::exists(backing));
}

TEST(MountInfoTest, KnowsProc) {
  EXPECT_EQ(MountedFsType("/proc"), "proc");
  EXPECT_FALSE(MountedFsType("/proc/self").has_value());
}

}  // namespace
}  // namespace qcow2fuse::test
