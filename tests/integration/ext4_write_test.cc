// ext4 written THROUGH a read-write qcow2fuse view, then read back.
//
//   1. an empty 128 MiB qcow2 image is mounted read-write;
//   2. a loop device over the view (buffered, or with direct I/O in one
//      variant) gets a fresh ext4 (mkfs.ext4), which is
//      mounted read-write; a generated tree (a few hundred files, some MiB,
//      deterministic content) is copied in with cp -a; sync; checksums;
//   3. the file system, the loop device and the view are taken down (the
//      daemon must exit with status 0);
//   4. `qemu-img check` must be clean (no corruptions, no leaks) and
//      `e2fsck -fn` of `qemu-img convert -O raw` of the image too;
//   5. the view is mounted again read-only, loop-mounted read-only, and
//      every file's checksum must match.
//
// Every mount and loop device sits in an RAII guard, torn down in reverse
// order in every path. Needs root and loop devices; skipped without them.
// The tree is seeded: QCOW2FUSE_TEST_SEED=N replays it.

#include <string.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
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

namespace fs = std::filesystem;

// A view of `image` for the length of a scope. Writing a file system
// through it takes a while, and more under sanitizers: allow for that.
absl::StatusOr<std::unique_ptr<MountedView>> StartView(
    const std::string& image, const std::string& mountpoint, bool read_only) {
  MountOptions options;
  options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  options.image = image;
  options.mountpoint = mountpoint;
  options.read_only = read_only;
  options.start_timeout = std::chrono::seconds(20);
  options.stop_timeout = std::chrono::seconds(60);
  return MountedView::Start(options);
}

// Generates about 300 files (some MiB in all) in nested directories.
// Returns their paths relative to `root`.
absl::StatusOr<std::vector<std::string>> GenerateTree(const std::string& root,
                                                      uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto uniform = [&rng](uint64_t lo, uint64_t hi) {
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng);
  };
  std::vector<std::string> dirs = {""};
  for (int i = 0; i < 24; ++i) {
    const std::string& parent = dirs[uniform(0, dirs.size() - 1)];
    dirs.push_back(absl::StrCat(parent, parent.empty() ? "" : "/", "dir", i));
  }
  std::error_code error;
  for (const std::string& dir : dirs) {
    fs::create_directories(root + "/" + dir, error);
    if (error) return absl::InternalError(error.message());
  }
  std::vector<std::string> files;
  for (int i = 0; i < 300; ++i) {
    const std::string& dir = dirs[uniform(0, dirs.size() - 1)];
    const std::string name =
        absl::StrCat(dir, dir.empty() ? "" : "/", "file", i, ".bin");
    const int shape = uniform(0, 99);
    uint64_t size;
    if (shape < 5) {
      size = 0;
    } else if (shape < 70) {
      size = uniform(1, 8 * kKiB);
    } else if (shape < 95) {
      size = uniform(8 * kKiB, 160 * kKiB);
    } else {
      size = uniform(kMiB, 3 * kMiB);
    }
    std::string data(size, '\0');
    const bool zeros = uniform(0, 19) == 0;  // some all-zero files
    if (!zeros) {
      for (size_t at = 0; at < size; at += 8) {
        const uint64_t word = rng();
        memcpy(data.data() + at, &word, std::min<size_t>(8, size - at));
      }
    }
    if (absl::Status s = WriteFileAt(root + "/" + name, 0, data); !s.ok()) {
      return s;
    }
    files.push_back(name);
  }
  return files;
}

// sha256sum of each of `files` (relative to `root`), in a few runs.
absl::StatusOr<std::map<std::string, std::string>> Checksums(
    const std::string& root, const std::vector<std::string>& files) {
  std::map<std::string, std::string> digests;
  constexpr size_t kBatch = 100;
  for (size_t start = 0; start < files.size(); start += kBatch) {
    std::vector<std::string> argv = {"sha256sum", "--"};
    for (size_t i = start; i < std::min(files.size(), start + kBatch); ++i) {
      argv.push_back(root + "/" + files[i]);
    }
    absl::StatusOr<std::string> out = RunChecked(argv);
    if (!out.ok()) return out.status();
    size_t i = start;
    for (absl::string_view line : absl::StrSplit(*out, '\n', absl::SkipEmpty())) {
      if (line.size() < 66 || i >= files.size()) {
        return absl::InternalError(absl::StrCat("bad sha256sum line: ", line));
      }
      digests[files[i++]] = std::string(line.substr(0, 64));
    }
    if (i != std::min(files.size(), start + kBatch)) {
      return absl::InternalError("sha256sum printed too few lines");
    }
  }
  return digests;
}

struct Variant {
  std::string name;
  std::vector<std::string> create_options;
  // The loop devices read and write the view with O_DIRECT (`losetup
  // --direct-io=on`); without it the writable one does so through a
  // descriptor that the view answered in direct-I/O mode (-o
  // uncached_writes), and the read-only one through the view's page cache.
  bool loop_direct_io = false;
};

void PrintTo(const Variant& variant, std::ostream* out) {
  *out << variant.name;
}

class Ext4WriteTest : public ::testing::TestWithParam<Variant> {};

TEST_P(Ext4WriteTest, MkfsCopyAndReadBack) {
  if (std::string reason = LoopUnavailableReason(); !reason.empty()) {
    GTEST_SKIP() << "loop devices unavailable: " << reason;
  }
  const auto started = std::chrono::steady_clock::now();
  const uint64_t seed = TestSeed();

  // Declared first so it is removed last, after every mount inside it.
  ASSERT_OK_AND_ASSIGN(TempDir dir,
                       TempDir::Create("ext4w-" + GetParam().name));
  const std::string tree = dir.Join("tree");
  const std::string image = dir.Join("fs.qcow2");
  const std::string view_path = dir.Join("view.raw");
  const std::string mount_dir = dir.Join("mnt");
  fs::create_directory(mount_dir);
  ASSERT_OK_AND_ASSIGN(std::vector<std::string> files,
                       GenerateTree(tree, seed));
  ASSERT_OK_AND_ASSIGN(auto want, Checksums(tree, files));
  ASSERT_OK(CreateImage(image, "qcow2", 128 * kMiB, GetParam().create_options));

  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                         StartView(image, view_path, /*read_only=*/false));
    {
      ASSERT_OK_AND_ASSIGN(
          std::unique_ptr<LoopDevice> loop,
          LoopDevice::Attach(view->path(), /*read_only=*/false,
                             GetParam().loop_direct_io));
      ASSERT_OK(RunChecked({"mkfs.ext4", "-q", "-F", loop->device()}));
      ASSERT_OK_AND_ASSIGN(
          std::unique_ptr<KernelMount> mounted,
          KernelMount::Mount(loop->device(), mount_dir, "ext4", "rw"));
      ASSERT_OK(RunChecked({"cp", "-a", "--", tree + "/.", mount_dir}));
      ASSERT_OK(RunChecked({"sync"}));
      ASSERT_OK_AND_ASSIGN(auto written, Checksums(mount_dir, files));
      EXPECT_EQ(written, want);
      ASSERT_OK(mounted->Unmount());
    }  // losetup -d, waiting until the view is let go.
    ASSERT_OK(view->Unmount());
    ASSERT_TRUE(view->exit_status().has_value());
    EXPECT_TRUE(view->exit_status()->success())
        << view->exit_status()->ToString() << "\n" << view->ReadLog();
  }

  EXPECT_OK(CheckImage(image));  // No corruptions, no leaks.
  const std::string raw = dir.Join("fs.raw");
  ASSERT_OK(ConvertToRaw(image, raw));
  {
    absl::StatusOr<CommandResult> fsck =
        RunCommand({"e2fsck", "-f", "-n", raw});
    ASSERT_OK(fsck);
    EXPECT_TRUE(fsck->ok()) << "e2fsck -fn of the image's raw conversion: "
                            << fsck->status.ToString() << "\n"
                            << fsck->stdout_text << fsck->stderr_text;
  }

  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                         StartView(image, view_path, /*read_only=*/true));
    EXPECT_OK(CompareFiles(view->path(), raw));
    {
      ASSERT_OK_AND_ASSIGN(
          std::unique_ptr<LoopDevice> loop,
          LoopDevice::Attach(view->path(), /*read_only=*/true,
                             GetParam().loop_direct_io));
      ASSERT_OK_AND_ASSIGN(
          std::unique_ptr<KernelMount> mounted,
          KernelMount::Mount(loop->device(), mount_dir, "ext4", "ro,noload"));
      ASSERT_OK_AND_ASSIGN(auto read_back, Checksums(mount_dir, files));
      EXPECT_EQ(read_back.size(), want.size());
      for (const auto& [name, digest] : want) {
        EXPECT_EQ(read_back[name], digest) << name;
      }
      ASSERT_OK(mounted->Unmount());
    }
    ASSERT_OK(view->Unmount());
    ASSERT_TRUE(view->exit_status().has_value());
    EXPECT_TRUE(view->exit_status()->success())
        << view->exit_status()->ToString();
  }
  const double seconds = std::chrono::duration<double>(
                             std::chrono::steady_clock::now() - started)
                             .count();
  std::cout << GetParam().name << ": " << files.size() << " files, "
            << absl::StrFormat("%.2f", seconds) << " s\n";
}

INSTANTIATE_TEST_SUITE_P(
    Images, Ext4WriteTest,
    ::testing::Values(Variant{"cluster_64k", {}},
                      Variant{"cluster_4k", {"cluster_size=4096"}},
                      Variant{"cluster_64k_loop_direct_io", {}, true}),
    [](const ::testing::TestParamInfo<Variant>& info) {
      return info.param.name;
    });

}  // namespace
}  // namespace qcow2fuse::test
