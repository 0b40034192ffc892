// -o backing=PATH and -o backing_format=FORMAT, through real mounts. An
// overlay whose base was moved mounts with the base named for this mount
// only: it reads as `qemu-img rebase -u` onto that base makes it read,
// writes land in the overlay (copy-on-write from the named base), and
// afterwards the overlay still records its old backing name, passes
// qemu-img check, and matches a rebased twin that got the same writes. The
// base is never written.

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
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

// The backing file name the header of `image` records ("" for none).
std::string RecordedBacking(const std::string& image) {
  absl::StatusOr<std::string> info = QemuImg({"info", "--output=json", "-U", image});
  if (!info.ok()) return "(qemu-img info failed)";
  const std::string key = "\"backing-filename\": \"";
  const size_t at = info->find(key);
  if (at == std::string::npos) return "";
  const size_t start = at + key.size();
  return info->substr(start, info->find('"', start) - start);
}

class BackingOptionTest : public TempDirTest {
 protected:
  // top.qcow2 over base.FORMAT, both holding data; then the base is moved
  // to moved/, where the overlay's recorded name no longer finds it, and
  // twin.qcow2 is a copy of the overlay rebased (unsafely: data untouched)
  // onto the moved base.
  void MakeMovedOverlay(const std::string& format) {
    format_ = format;
    const std::string base = Path("base." + format);
    ASSERT_OK(CreateImage(base, format, kDisk));
    ASSERT_OK(QemuIo(base, format, {W(0x11, 0, 4 * kMiB), W(0x22, 8 * kMiB, kMiB)}));
    top_ = Path("top.qcow2");
    ASSERT_OK(CreateImage(top_, "qcow2", kDisk, {"backing_file=base." + format, "backing_fmt=" + format}));
    ASSERT_OK(QemuIo(top_, "qcow2", {W(0x33, kMiB, kMiB), W(0x44, 10 * kMiB, 64 * kKiB)}));
    ASSERT_EQ(mkdir(Path("moved").c_str(), 0755), 0);
    moved_ = Path("moved/base." + format);
    ASSERT_EQ(rename(base.c_str(), moved_.c_str()), 0);
    ASSERT_OK_AND_ASSIGN(base_sha_, Sha256File(moved_));
    twin_ = Path("twin.qcow2");
    ASSERT_OK(RebasedCopy(top_, twin_));
  }

  // A copy of `image` whose header names the moved base.
  absl::Status RebasedCopy(const std::string& image, const std::string& copy) {
    std::error_code error;
    std::filesystem::copy_file(image, copy, std::filesystem::copy_options::overwrite_existing, error);
    if (error) return absl::InternalError(error.message());
    return QemuImg({"rebase", "-u", "-f", "qcow2", "-b", moved_, "-F", format_, copy}).status();
  }

  // The view of top.qcow2 read-write with `options`, its bytes compared
  // with the twin's; then the same writes (one straddling the overlay's
  // data and the base's, one onto the base's data alone, one onto no
  // data) to both, unmounted, and the results compared.
  void MountWriteAndCompare(const std::vector<std::string>& options) {
    const std::string expected = Path("expected.raw");
    ASSERT_OK(ConvertToRaw(twin_, expected));
    MountOptions mount = WritableView(top_, Path("view.raw"));
    mount.extra_options = options;
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(mount));
    EXPECT_OK(CompareFiles(view->path(), expected));
    const std::string straddling(2 * kMiB, '\x55');  // 1.5M..3.5M: overlay's, then base's
    ASSERT_OK(WriteFileAt(view->path(), 3 * kMiB / 2, straddling));
    ASSERT_OK(WriteFileAt(view->path(), 8 * kMiB + 4 * kKiB, std::string(8 * kKiB, '\x66')));
    ASSERT_OK(WriteFileAt(view->path(), 14 * kMiB + 512, std::string(4 * kKiB, '\x77')));
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
    ASSERT_OK(QemuIo(twin_, "qcow2",
                     {"write -P 0x55 1536k 2M", "write -P 0x66 8196k 8k",
                      absl::StrCat("write -P 0x77 ", 14 * kMiB + 512, " 4k")}));

    EXPECT_EQ(RecordedBacking(top_), "base." + format_) << "the mount changed the recorded backing file";
    const std::string rebased = Path("top-rebased.qcow2");
    ASSERT_OK(RebasedCopy(top_, rebased));
    EXPECT_OK(CheckImage(rebased));
    EXPECT_OK(QemuImg({"compare", "-f", "qcow2", "-F", "qcow2", rebased, twin_}));
    ASSERT_OK_AND_ASSIGN(std::string base_sha, Sha256File(moved_));
    EXPECT_EQ(base_sha, base_sha_) << "the base was written";
  }

  // `qcow2fuse -f -o OPTIONS IMAGE MNT` must refuse with one line holding
  // `words`, mounting nothing.
  void ExpectMountRefused(const std::string& image, const std::vector<std::string>& options,
                          const std::vector<std::string>& words) {
    const std::string mountpoint = Path(absl::StrCat("refused", ++refusals_, ".raw"));
    RunOptions run_options;
    run_options.timeout = std::chrono::seconds(30);
    run_options.watch_mountpoint = mountpoint;
    ASSERT_OK_AND_ASSIGN(
        RunResult run, RunBounded({Binary(), "-f", "-o", absl::StrJoin(options, ","), image, mountpoint}, run_options));
    EXPECT_TRUE(FailsWithOneLine(run, words)) << run.Describe();
    EXPECT_FALSE(run.mounted_during_run || IsMounted(mountpoint)) << run.Describe();
  }

  std::string format_, top_, moved_, twin_, base_sha_;
  int refusals_ = 0;
};

TEST_F(BackingOptionTest, AMovedQcow2BaseIsReadFromThePathGiven) {
  MakeMovedOverlay("qcow2");
  // Without the option the recorded name is looked for, and not found.
  ExpectMountRefused(top_, {"ro"}, {"base.qcow2", "No such file"});
  MountWriteAndCompare({"backing=" + moved_});
}

TEST_F(BackingOptionTest, AMovedRawBaseWithItsFormat) {
  MakeMovedOverlay("raw");
  MountWriteAndCompare({"backing=" + moved_, "backing_format=raw"});
}

// A relative PATH is taken from the working directory of the command, as
// any path on its command line, not from the image's directory.
TEST_F(BackingOptionTest, ARelativePathIsFromTheWorkingDirectory) {
  MakeMovedOverlay("qcow2");
  const std::string cwd = std::filesystem::current_path();
  ASSERT_EQ(chdir(Path("moved").c_str()), 0);
  MountWriteAndCompare({"backing=base.qcow2"});
  ASSERT_EQ(chdir(cwd.c_str()), 0);
}

// An image without a backing file gets one for the mount: its unallocated
// clusters read from the base.
TEST_F(BackingOptionTest, AnImageWithoutBackingGetsOne) {
  const std::string base = Path("base.qcow2");
  ASSERT_OK(CreateImage(base, "qcow2", kDisk));
  ASSERT_OK(QemuIo(base, "qcow2", {W(0x11, 0, 2 * kMiB)}));
  const std::string lone = Path("lone.qcow2");
  ASSERT_OK(CreateImage(lone, "qcow2", kDisk));
  ASSERT_OK(QemuIo(lone, "qcow2", {W(0x33, kMiB, 64 * kKiB)}));
  const std::string expected_image = Path("expected.qcow2");
  ASSERT_OK(CreateImage(expected_image, "qcow2", kDisk, {"backing_file=" + base, "backing_fmt=qcow2"}));
  ASSERT_OK(QemuIo(expected_image, "qcow2", {W(0x33, kMiB, 64 * kKiB)}));
  const std::string expected = Path("expected.raw");
  ASSERT_OK(ConvertToRaw(expected_image, expected));

  MountOptions mount = WritableView(lone, Path("view.raw"));
  mount.read_only = true;
  mount.extra_options = {"backing=" + base, "backing_format=qcow2"};
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(mount));
  EXPECT_OK(CompareFiles(view->path(), expected));
  ASSERT_OK(view->Unmount());
  EXPECT_EQ(RecordedBacking(lone), "");
}

// An image that records no backing file format: the backing file is
// probed, as QEMU does, a qcow2 base by its magic and anything else as raw.
TEST_F(BackingOptionTest, AnUnrecordedBackingFormatIsProbed) {
  for (const std::string format : {"qcow2", "raw"}) {
    SCOPED_TRACE(format);
    const std::string base = Path("probed-base." + format);
    ASSERT_OK(CreateImage(base, format, kDisk));
    ASSERT_OK(QemuIo(base, format, {W(0x11, 0, 4 * kMiB), W(0x22, 8 * kMiB, kMiB)}));
    const std::string top = Path("probed-top-" + format + ".qcow2");
    ASSERT_OK(CreateImage(top, "qcow2", kDisk, {"backing_file=" + base, "backing_fmt=" + format}));
    ASSERT_OK(QemuIo(top, "qcow2", {W(0x33, kMiB, kMiB)}));
    ASSERT_OK(HideHeaderExtension(top, hdr::kExtBackingFormat));
    ASSERT_OK_AND_ASSIGN(std::string info, QemuImg({"info", top}));
    ASSERT_FALSE(absl::StrContains(info, "backing file format")) << info;
    const std::string expected = Path("probed-" + format + ".raw");
    ASSERT_OK(ConvertToRaw(top, expected));  // QEMU probes the base too

    MountOptions mount = WritableView(top, Path("probed.raw"));
    mount.read_only = true;
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(mount));
    EXPECT_OK(CompareFiles(view->path(), expected));
    ASSERT_OK(view->Unmount());
  }
}

// A backing file name that is a protocol (QEMU's nbd:, http: and the
// like) is refused with one line; a chain of 64 images mounts, one of 65
// is refused.
TEST_F(BackingOptionTest, ProtocolsAndChainsDeeperThan64AreRefused) {
  const std::string top = Path("net.qcow2");
  ASSERT_OK(CreateImage(top, "qcow2", kDisk));
  ASSERT_OK(QemuImg({"rebase", "-u", "-f", "qcow2", "-b", "nbd:localhost:10809", "-F", "raw", top}).status());
  ASSERT_EQ(RecordedBacking(top), "nbd:localhost:10809");
  ExpectMountRefused(top, {"ro"}, {"nbd:localhost:10809", "protocol"});

  // chain0 is the base; chainN backs onto chain(N-1).
  constexpr int kDepth = 65;
  for (int i = 0; i < kDepth; ++i) {
    std::vector<std::string> options;
    if (i > 0) options = {absl::StrCat("backing_file=chain", i - 1, ".qcow2"), "backing_fmt=qcow2"};
    ASSERT_OK(CreateImage(Path(absl::StrCat("chain", i, ".qcow2")), "qcow2", kDisk, options));
  }
  ASSERT_OK(QemuIo(Path("chain0.qcow2"), "qcow2", {W(0x5a, 0, 64 * kKiB)}));
  {
    // 64 images: chain63 down to chain0.
    MountOptions mount = WritableView(Path("chain63.qcow2"), Path("deep.raw"));
    mount.read_only = true;
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(mount));
    ASSERT_OK_AND_ASSIGN(std::string bytes, ReadFile(view->path()));
    EXPECT_EQ(bytes.substr(0, 64 * kKiB), std::string(64 * kKiB, '\x5a'));
    ASSERT_OK(view->Unmount());
  }
  ExpectMountRefused(Path("chain64.qcow2"), {"ro"}, {"deeper than 64"});
}

// What cannot work is refused in one line, and nothing is mounted.
TEST_F(BackingOptionTest, RefusalsNameTheCause) {
  MakeMovedOverlay("qcow2");
  ExpectMountRefused(top_, {"ro", "backing=" + Path("nosuch.qcow2")}, {"nosuch.qcow2", "No such file"});
  // The overlay as its own base: a loop.
  ExpectMountRefused(top_, {"ro", "backing=" + top_}, {"loops back"});
  // A qcow2 base read as the wrong format fails no check, but a format we
  // do not know is a usage error.
  ASSERT_OK_AND_ASSIGN(RunResult run,
                       RunBounded({Binary(), "-f", "-o", "backing_format=vmdk", top_, Path("v.raw")}, {}));
  EXPECT_TRUE(run.status.exited() && run.status.code() == 2) << run.Describe();
  EXPECT_TRUE(FailsWithOneLine(run, {"backing_format must be qcow2 or raw", "'vmdk'"})) << run.Describe();
}

}  // namespace
}  // namespace qcow2fuse::test::cli
