// -o overlay=NEW and -o volatile, through real mounts: writes go to a new
// qcow2 image over IMAGE, which is only read (its sha256 is unchanged, and
// it mounts read-only elsewhere meanwhile). A kept overlay is a valid
// image with IMAGE as backing file and IMAGE's cluster size, equal to a
// qemu-img-made overlay that got the same writes; a volatile one leaves
// nothing on disk.

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/status_testing.h"

namespace qcow2fuse::test::cli {
namespace {

using qemu_io_cmd::W;

constexpr uint64_t kDisk = 16 * kMiB;

class OverlayTest : public TempDirTest {
 protected:
  // base.qcow2 with 4 KiB clusters (the overlay must take them) and data.
  void SetUp() override {
    TempDirTest::SetUp();
    base_ = Path("base.qcow2");
    ASSERT_OK(CreateImage(base_, "qcow2", kDisk, {"cluster_size=4096"}));
    ASSERT_OK(QemuIo(base_, "qcow2", {W(0x11, 0, 6 * kMiB), W(0x22, 12 * kMiB, kMiB)}));
    ASSERT_OK_AND_ASSIGN(base_sha_, Sha256File(base_));
    base_raw_ = Path("base.raw");
    ASSERT_OK(ConvertToRaw(base_, base_raw_));
  }

  // The writes of every test: across the base's data and past it.
  static absl::Status WriteThrough(const std::string& view) {
    if (absl::Status s = WriteFileAt(view, 5 * kMiB + 100, std::string(2 * kMiB, '\x55')); !s.ok()) return s;
    return WriteFileAt(view, 14 * kMiB, std::string(12 * kKiB, '\x66'));
  }
  static std::vector<std::string> SameWritesForQemuIo() {
    return {absl::StrCat("write -P 0x55 ", 5 * kMiB + 100, " 2M"), "write -P 0x66 14M 12k"};
  }

  void ExpectBaseUnchanged() {
    ASSERT_OK_AND_ASSIGN(std::string sha, Sha256File(base_));
    EXPECT_EQ(sha, base_sha_) << "IMAGE was written";
  }

  // Mounts `image` read-only at `name` in the test's directory; the view
  // must equal the file `expected`.
  void ExpectReadOnlyViewEquals(const std::string& image, const std::string& name, const std::string& expected) {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(ReadOnlyView(image, Path(name))));
    EXPECT_OK(CompareFiles(view->path(), expected));
    ASSERT_OK(view->Unmount());
  }

  std::string base_, base_sha_, base_raw_;
};

TEST_F(OverlayTest, WritesGoToTheNewImageAndTheBaseStaysAsItWas) {
  const std::string overlay = Path("new.qcow2");
  MountOptions mount = WritableView(base_, Path("view.raw"));
  mount.extra_options = {"overlay=" + overlay};
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(mount));
  EXPECT_OK(CompareFiles(view->path(), base_raw_));
  ASSERT_OK(WriteThrough(view->path()));

  // Meanwhile IMAGE mounts read-only elsewhere, as it was.
  ExpectReadOnlyViewEquals(base_, "base-view.raw", base_raw_);
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  ExpectBaseUnchanged();

  EXPECT_OK(CheckImage(overlay));
  ASSERT_OK_AND_ASSIGN(std::string info, QemuImg({"info", "--output=json", overlay}));
  EXPECT_TRUE(absl::StrContains(info, absl::StrCat("\"backing-filename\": \"", base_, "\""))) << info;
  EXPECT_TRUE(absl::StrContains(info, "\"backing-filename-format\": \"qcow2\"")) << info;
  EXPECT_TRUE(absl::StrContains(info, "\"cluster-size\": 4096")) << info;
  const std::string twin = Path("twin.qcow2");
  ASSERT_OK(CreateImage(twin, "qcow2", kDisk, {"backing_file=" + base_, "backing_fmt=qcow2", "cluster_size=4096"}));
  ASSERT_OK(QemuIo(twin, "qcow2", SameWritesForQemuIo()));
  EXPECT_OK(QemuImg({"compare", "-f", "qcow2", "-F", "qcow2", overlay, twin}));

  // The kept overlay mounts like any image, its writes still there.
  const std::string expected = Path("expected.raw");
  ASSERT_OK(ConvertToRaw(twin, expected));
  ExpectReadOnlyViewEquals(overlay, "again.raw", expected);
}

TEST_F(OverlayTest, AnExistingFileIsNeverOverwritten) {
  const std::string existing = Path("precious.qcow2");
  ASSERT_OK(WriteFileAt(existing, 0, "keep me"));
  const std::string mountpoint = Path("view.raw");
  RunOptions run_options;
  run_options.watch_mountpoint = mountpoint;
  ASSERT_OK_AND_ASSIGN(RunResult run,
                       RunBounded({Binary(), "-f", "-o", "overlay=" + existing, base_, mountpoint}, run_options));
  EXPECT_TRUE(FailsWithOneLine(run, {"precious.qcow2", "exists"})) << run.Describe();
  EXPECT_FALSE(run.mounted_during_run) << run.Describe();
  ASSERT_OK_AND_ASSIGN(std::string content, ReadFile(existing));
  EXPECT_EQ(content, "keep me");
}

// A mount that fails after the overlay was made removes it: trying again
// must not find it "exists".
TEST_F(OverlayTest, AFailedMountLeavesNoOverlay) {
  const std::string overlay = Path("new.qcow2");
  // The mountpoint is a FIFO: refused after the overlay is made.
  ASSERT_EQ(mkfifo(Path("fifo").c_str(), 0644), 0);
  ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded({Binary(), "-f", "-o", "overlay=" + overlay, base_, Path("fifo")}, {}));
  EXPECT_FALSE(run.ok()) << run.Describe();
  struct stat st;
  EXPECT_NE(lstat(overlay.c_str(), &st), 0) << "the failed mount left " << overlay;
  ExpectBaseUnchanged();
}

TEST_F(OverlayTest, VolatileWritesVanishAtUnmount) {
  const std::string tmp = Path("tmp");
  ASSERT_EQ(mkdir(tmp.c_str(), 0755), 0);
  ASSERT_EQ(setenv("TMPDIR", tmp.c_str(), 1), 0);  // the daemon inherits it
  MountOptions mount = WritableView(base_, Path("view.raw"));
  mount.extra_options = {"volatile"};
  absl::StatusOr<std::unique_ptr<MountedView>> view = MountedView::Start(mount);
  unsetenv("TMPDIR");
  ASSERT_OK(view.status());
  EXPECT_OK(CompareFiles((*view)->path(), base_raw_));
  ASSERT_OK(WriteThrough((*view)->path()));
  // Written and read back while mounted...
  const std::string twin = Path("twin.qcow2");
  ASSERT_OK(CreateImage(twin, "qcow2", kDisk, {"backing_file=" + base_, "backing_fmt=qcow2"}));
  ASSERT_OK(QemuIo(twin, "qcow2", SameWritesForQemuIo()));
  const std::string expected = Path("expected.raw");
  ASSERT_OK(ConvertToRaw(twin, expected));
  EXPECT_OK(CompareFiles((*view)->path(), expected));
  // ...with no name anywhere in TMPDIR.
  EXPECT_TRUE(DirectoryNames(tmp).empty()) << DirectoryNames(tmp).front();
  ASSERT_OK((*view)->Unmount());
  EXPECT_TRUE((*view)->exit_status()->success()) << (*view)->ReadLog();
  EXPECT_TRUE(DirectoryNames(tmp).empty());
  ExpectBaseUnchanged();
  EXPECT_OK(CheckImage(base_));
}

// A volatile overlay leaves nothing on disk however the daemon ends: a
// daemon killed with SIGKILL leaves TMPDIR as empty as an unmount does.
TEST_F(OverlayTest, VolatileLeavesNothingWhenTheDaemonIsKilled) {
  const std::string tmp = Path("tmp");
  ASSERT_EQ(mkdir(tmp.c_str(), 0755), 0);
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  DaemonGuard guard(view, pidfile);
  ASSERT_EQ(setenv("TMPDIR", tmp.c_str(), 1), 0);  // the daemon inherits it
  absl::StatusOr<RunResult> started = StartDaemon(base_, view, pidfile, {"volatile"});
  unsetenv("TMPDIR");
  ASSERT_OK(started.status());
  ASSERT_TRUE(started->status.success()) << started->Describe();
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  ASSERT_OK(WriteThrough(view));
  ASSERT_EQ(kill(pid, SIGKILL), 0) << strerror(errno);
  ASSERT_TRUE(WaitForPidGone(pid, std::chrono::seconds(10)).gone) << "the killed daemon is still there";
  guard.Forget();
  EXPECT_TRUE(DirectoryNames(tmp).empty()) << DirectoryNames(tmp).front();
  guard.Cleanup();  // the dead mount
  EXPECT_FALSE(IsMounted(view));
  ExpectBaseUnchanged();
  EXPECT_OK(CheckImage(base_));
}

// In directory mode the snapshots are the new overlay's, which has none:
// snapshots/ is empty, though IMAGE has some.
TEST_F(OverlayTest, DirectoryModeShowsTheOverlaysSnapshotsWhichAreNone) {
  const std::string image = Path("snap.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDisk));
  ASSERT_OK(QemuIo(image, "qcow2", {W(0x44, 0, kMiB)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "before", image}).status());
  const std::string expected = Path("snap.raw");
  ASSERT_OK(ConvertToRaw(image, expected));
  const std::string mountpoint = Path("mnt");
  ASSERT_EQ(mkdir(mountpoint.c_str(), 0755), 0);
  {
    // The control: the image itself shows its snapshot.
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(ReadOnlyView(image, mountpoint)));
    EXPECT_EQ(DirectoryNames(mountpoint + "/snapshots"), std::vector<std::string>{"before.raw"});
    ASSERT_OK(view->Unmount());
  }
  for (const std::string& option : std::vector<std::string>{"volatile", "overlay=" + Path("new.qcow2")}) {
    SCOPED_TRACE(option);
    MountOptions mount = WritableView(image, mountpoint);
    mount.extra_options = {option};
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(mount));
    EXPECT_TRUE(DirectoryNames(mountpoint + "/snapshots").empty());
    EXPECT_OK(CompareFiles(mountpoint + "/disk.raw", expected));
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  }
}

TEST_F(OverlayTest, OptionsThatCannotGoTogetherAreUsageErrors) {
  const std::string mountpoint = Path("view.raw");
  struct Case {
    std::string options;
    std::vector<std::string> words;
  };
  for (const Case& c : std::vector<Case>{
           {"volatile,ro", {"volatile", "-o ro"}},
           {"overlay=" + Path("n.qcow2") + ",ro", {"overlay", "read-only"}},
           {"overlay=" + Path("n.qcow2") + ",volatile", {"exclude each other"}},
           {"volatile,backing=" + base_, {"backing cannot be combined with volatile"}},
           {"volatile,data_file=" + base_raw_, {"data_file cannot be combined with volatile"}},
       }) {
    SCOPED_TRACE(c.options);
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded({Binary(), "-f", "-o", c.options, base_, mountpoint}, {}));
    EXPECT_TRUE(run.status.exited() && run.status.code() == 2) << run.Describe();
    EXPECT_TRUE(FailsWithOneLine(run, c.words)) << run.Describe();
  }
  struct stat st;
  EXPECT_NE(lstat(Path("n.qcow2").c_str(), &st), 0);
}

}  // namespace
}  // namespace qcow2fuse::test::cli
