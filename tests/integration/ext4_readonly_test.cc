// An ext4 file system inside a qcow2 image, read through the whole stack:
// qcow2fuse view -> read-only loop device -> kernel ext4 mount.
//
// The file system is built without mounting anything on the host
// (mkfs.ext4 -d populates it from a directory), converted to qcow2 (plain
// and compressed), and every file read back through the stack must match
// its original. Every layer sits in an RAII guard, torn down in reverse
// order, so a failing test leaves no mount or loop device behind.
//
// Needs root and loop devices; skipped, with the reason, without them.

#include <filesystem>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
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

// Lays out a small tree of files of assorted shapes under `root`.
absl::Status PopulateTree(const std::string& root, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto random_bytes = [&rng](size_t length) {
    std::string bytes(length, '\0');
    for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
    return bytes;
  };
  std::error_code error;
  fs::create_directories(root + "/docs/nested/deeper", error);
  fs::create_directories(root + "/bin", error);
  if (error) return absl::InternalError(error.message());

  std::string text;
  for (int i = 0; i < 2000; ++i) {
    absl::StrAppend(&text, "line ", i, ": qcow2fuse ext4 round trip\n");
  }
  struct File {
    std::string name;
    std::string data;
  };
  const std::vector<File> files = {
      {"empty", ""},
      {"hello.txt", "hello, world\n"},
      {"docs/text.txt", text},
      {"docs/nested/odd_size.bin", random_bytes(12345)},
      {"docs/nested/deeper/one_block.bin", random_bytes(4096)},
      {"bin/random_3m.bin", random_bytes(3 * kMiB + 17)},
  };
  for (const File& file : files) {
    absl::Status written = WriteFileAt(root + "/" + file.name, 0, file.data);
    if (!written.ok()) return written;
  }
  // A mostly sparse file with islands of data, to exercise holes.
  const std::string sparse = root + "/bin/sparse_8m.bin";
  for (uint64_t offset : {uint64_t{0}, 3 * kMiB + 5, 8 * kMiB - 100}) {
    absl::Status written = WriteFileAt(sparse, offset, random_bytes(100));
    if (!written.ok()) return written;
  }
  fs::create_symlink("docs/text.txt", root + "/link_to_text", error);
  if (error) return absl::InternalError(error.message());
  return absl::OkStatus();
}

// Every entry of `original` must exist in `mounted` with the same type,
// and the same contents or symlink target.
void CompareTrees(const std::string& original, const std::string& mounted) {
  int compared_files = 0;
  for (const fs::directory_entry& entry :
       fs::recursive_directory_iterator(original)) {
    // lexically: fs::relative() would resolve symlinks to their targets.
    const fs::path relative = entry.path().lexically_relative(original);
    const fs::path copy = fs::path(mounted) / relative;
    SCOPED_TRACE(relative.string());
    ASSERT_EQ(fs::symlink_status(copy).type(), entry.symlink_status().type());
    if (entry.is_symlink()) {
      EXPECT_EQ(fs::read_symlink(copy), fs::read_symlink(entry.path()));
    } else if (entry.is_regular_file()) {
      EXPECT_OK(CompareFiles(copy.string(), entry.path().string()));
      absl::StatusOr<std::string> want = Sha256File(entry.path().string());
      absl::StatusOr<std::string> got = Sha256File(copy.string());
      ASSERT_OK(want);
      ASSERT_OK(got);
      EXPECT_EQ(*got, *want);
      ++compared_files;
    }
  }
  EXPECT_GT(compared_files, 0);
  // Nothing extra either (mkfs adds lost+found, nothing else).
  auto count = [](const std::string& root) {
    int entries = 0;
    for (const fs::directory_entry& entry :
         fs::recursive_directory_iterator(root)) {
      if (entry.path().filename() != "lost+found") ++entries;
    }
    return entries;
  };
  EXPECT_EQ(count(mounted), count(original));
}

struct Variant {
  std::string name;
  std::vector<std::string> convert_options;  // After qemu-img convert -O qcow2.
};

void PrintTo(const Variant& variant, std::ostream* out) {
  *out << variant.name;
}

class Ext4ReadonlyTest : public ::testing::TestWithParam<Variant> {};

TEST_P(Ext4ReadonlyTest, FilesReadBackThroughLoopMount) {
  if (std::string reason = LoopUnavailableReason(); !reason.empty()) {
    GTEST_SKIP() << "loop devices unavailable: " << reason;
  }
  const uint64_t seed = TestSeed();

  // Declared first so it is removed last, after every mount inside it.
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("ext4-" + GetParam().name));
  const std::string tree = dir.Join("tree");
  const std::string raw = dir.Join("fs.raw");
  const std::string image = dir.Join("fs.qcow2");
  const std::string mount_dir = dir.Join("mnt");
  ASSERT_OK(PopulateTree(tree, seed));
  fs::create_directory(mount_dir);

  ASSERT_OK(CreateImage(raw, "raw", 64 * kMiB));
  ASSERT_OK(RunChecked({"mkfs.ext4", "-q", "-F", "-d", tree, raw}));
  ASSERT_OK(
      ConvertImage(raw, "raw", image, "qcow2", GetParam().convert_options));

  MountOptions options;
  options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  options.image = image;
  options.mountpoint = dir.Join("view.raw");
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                       MountedView::Start(options));
  EXPECT_OK(CompareFiles(view->path(), raw));
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<LoopDevice> loop,
                         LoopDevice::Attach(view->path(), /*read_only=*/true));
    ASSERT_OK_AND_ASSIGN(
        std::unique_ptr<KernelMount> mounted,
        KernelMount::Mount(loop->device(), mount_dir, "ext4", "ro,noload"));
    CompareTrees(tree, mount_dir);
    ASSERT_OK(RunChecked({"fsck.ext4", "-n", "-f", loop->device()}));
  }  // umount, then losetup -d.

  ASSERT_OK(view->Unmount());
  ASSERT_TRUE(view->exit_status().has_value());
  EXPECT_TRUE(view->exit_status()->success())
      << view->exit_status()->ToString();
}

INSTANTIATE_TEST_SUITE_P(
    Images, Ext4ReadonlyTest,
    ::testing::Values(Variant{"plain", {}}, Variant{"zlib_compressed", {"-c"}},
                      Variant{"zstd_compressed_4k",
                              {"-c", "-o",
                               "compression_type=zstd,cluster_size=4096"}}),
    [](const ::testing::TestParamInfo<Variant>& info) {
      return info.param.name;
    });

}  // namespace
}  // namespace qcow2fuse::test
