// Crafted images through a real mount, with the daemon's address space
// limited to 4 GiB (prlimit --as): none of them may kill the daemon. Each
// either refuses the mount with one line naming what is wrong, or mounts,
// answers the write that meets the damage with EIO, keeps answering, and
// exits normally at unmount.
//
//   - an L2 entry with COPIED pointing at the refcount table (an in-place
//     write would overwrite it), or 4 PiB past the end of the file;
//   - an entry whose cluster lies 1 PiB out, in an image with 512-byte
//     clusters and 64-bit refcounts (freeing it once made the daemon build a
//     multi-GiB refcount table layout: std::bad_alloc at the first fsync);
//   - a bitmap directory claiming 32 GiB in a sparse file;
//   - a refcount table entry pointing at the L1 table;
//   - two L1 entries naming one L2 table.
//
// Sanitizer builds reserve terabytes of shadow memory, so there the limit
// is left out; the rest of each check stays.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/status_testing.h"

namespace qcow2fuse::test::cli {
namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kLimitMemory = false;
#else
constexpr bool kLimitMemory = true;
#endif

class HostileMountTest : public TempDirTest {
 protected:
  // A launcher for the daemon under a 4 GiB address-space limit.
  std::string LimitedBinary() {
    if (!kLimitMemory) return Binary();
    const std::string script = Path("limited.sh");
    std::ofstream(script) << "#!/bin/sh\nexec prlimit --as=4294967296 " << Binary() << " \"$@\"\n";
    chmod(script.c_str(), 0755);
    return script;
  }

  // A 64 MiB image with data at guest 0, made by QEMU.
  std::string MakeImage(const std::string& name, const std::vector<std::string>& options = {}) {
    const std::string image = Path(name);
    EXPECT_OK(CreateImage(image, "qcow2", 64 << 20, options));
    EXPECT_OK(QemuIo(image, "qcow2", {"write -P 0x11 0 64k"}));
    return image;
  }

  // Mounts `image` read-write under the limit, writes 64 KiB at guest 0,
  // and expects EIO from it, a daemon that still answers, and a normal
  // exit at unmount.
  void ExpectWriteFailsAndDaemonLives(const std::string& image) {
    MountOptions options = WritableView(image, Path("view.raw"));
    options.binary = LimitedBinary();
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
    {
      const int fd = open(view->path().c_str(), O_RDWR);
      ASSERT_GE(fd, 0) << strerror(errno);
      std::vector<char> data(64 << 10, 'x');
      errno = 0;
      EXPECT_EQ(pwrite(fd, data.data(), data.size(), 0), -1);
      EXPECT_EQ(errno, EIO) << strerror(errno);
      // Still answering: a read elsewhere and the file's attributes.
      char byte;
      EXPECT_EQ(pread(fd, &byte, 1, 32 << 20), 1) << strerror(errno);
      struct stat st;
      EXPECT_EQ(fstat(fd, &st), 0);
      close(fd);
    }
    ASSERT_OK(view->Unmount());
    ASSERT_TRUE(view->exit_status().has_value()) << view->ReadLog();
    EXPECT_FALSE(view->exit_status()->signaled()) << view->ReadLog();
    EXPECT_TRUE(absl::StrContains(view->ReadLog(), "refusing")) << view->ReadLog();
  }

  // Mounts `image` read-write under the limit and expects a one-line
  // refusal containing `keyword`.
  void ExpectMountRefused(const std::string& image, const std::string& keyword) {
    const std::string script = LimitedBinary();
    RunOptions run;
    run.timeout = std::chrono::seconds(30);
    run.watch_mountpoint = Path("refused.raw");  // taken down at once if it mounts after all
    ASSERT_OK_AND_ASSIGN(RunResult r, RunBounded({script, "-f", "-o", "rw", image, Path("refused.raw")}, run));
    EXPECT_FALSE(r.status.signaled()) << r.Describe();
    EXPECT_NE(r.status.code(), 0) << r.Describe();
    EXPECT_TRUE(absl::StrContains(r.stderr_text, keyword)) << r.Describe();
    EXPECT_FALSE(r.mounted_during_run);
  }
};

TEST_F(HostileMountTest, CopiedEntryOnTheRefcountTable) {
  const std::string image = MakeImage("copied.qcow2");
  ASSERT_OK_AND_ASSIGN(uint64_t entry, L2EntryOffset(image, 0));
  ASSERT_OK_AND_ASSIGN(uint64_t refcount_table, ReadBE64At(image, hdr::kRefcountTableOffset));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(image));
  ASSERT_OK(WriteBE64At(image, entry, refcount_table | kCopiedFlag));
  ExpectWriteFailsAndDaemonLives(image);
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(image));
  EXPECT_EQ(after.substr(refcount_table, 4096), before.substr(refcount_table, 4096));
}

TEST_F(HostileMountTest, CopiedEntryFourPebibytesOut) {
  const std::string image = MakeImage("far.qcow2");
  ASSERT_OK_AND_ASSIGN(uint64_t entry, L2EntryOffset(image, 0));
  ASSERT_OK(WriteBE64At(image, entry, (uint64_t{1} << 52) | kCopiedFlag));
  struct stat before;
  ASSERT_EQ(stat(image.c_str(), &before), 0);
  ExpectWriteFailsAndDaemonLives(image);
  struct stat after;
  ASSERT_EQ(stat(image.c_str(), &after), 0);
  EXPECT_LE(after.st_size, before.st_size + (1 << 20));
}

TEST_F(HostileMountTest, FreeingAClusterFarPastTheEnd) {
  const std::string image = MakeImage("free.qcow2", {"cluster_size=512", "refcount_bits=64"});
  ASSERT_OK_AND_ASSIGN(uint64_t entry, L2EntryOffset(image, 0));
  ASSERT_OK(WriteBE64At(image, entry, uint64_t{1} << 50));  // shared (no COPIED): copied on write, then freed
  ASSERT_OK_AND_ASSIGN(uint64_t refcount_table, ReadBE64At(image, hdr::kRefcountTableOffset));
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(image));
  ExpectWriteFailsAndDaemonLives(image);
  // Nothing was laid out for the cluster 1 PiB out: the file did not grow
  // past the one copy the write may have allocated, and the refcount table
  // is where it was.
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(image));
  EXPECT_LE(after.size(), before.size() + (1 << 20));
  ASSERT_OK_AND_ASSIGN(uint64_t refcount_table_after, ReadBE64At(image, hdr::kRefcountTableOffset));
  EXPECT_EQ(refcount_table_after, refcount_table);
}

TEST_F(HostileMountTest, HugeBitmapDirectoryIsRefused) {
  const std::string image = MakeImage("bitmaps.qcow2");
  ASSERT_OK(QemuImg({"bitmap", "--add", image, "b0"}).status());
  ASSERT_OK_AND_ASSIGN(std::string bytes, ReadFile(image));
  // The bitmaps extension: directory size at byte 8 of its data.
  ASSERT_OK_AND_ASSIGN(uint32_t header_length, ReadBE32At(image, 100));
  uint64_t pos = header_length;
  for (;;) {
    ASSERT_OK_AND_ASSIGN(uint32_t type, ReadBE32At(image, pos));
    ASSERT_NE(type, 0u) << "no bitmaps extension";
    ASSERT_OK_AND_ASSIGN(uint32_t length, ReadBE32At(image, pos + 4));
    if (type == 0x23852875) break;
    pos += 8 + ((length + 7) & ~7u);
  }
  ASSERT_OK(WriteBE64At(image, pos + 8 + 8, uint64_t{32} << 30));
  ASSERT_EQ(truncate(image.c_str(), int64_t{40} << 30), 0);  // sparse: the directory "fits"
  ExpectMountRefused(image, "bitmap directory");
}

TEST_F(HostileMountTest, RefcountTableEntryOnTheL1TableIsRefused) {
  const std::string image = MakeImage("refcount.qcow2");
  ASSERT_OK_AND_ASSIGN(uint64_t refcount_table, ReadBE64At(image, hdr::kRefcountTableOffset));
  ASSERT_OK_AND_ASSIGN(uint64_t l1, ReadBE64At(image, hdr::kL1TableOffset));
  ASSERT_OK(WriteBE64At(image, refcount_table + 8, l1));
  ExpectMountRefused(image, "refcount table entry 1");
}

TEST_F(HostileMountTest, L1EntriesSharingAnL2TableAreRefused) {
  const std::string image = MakeImage("shared.qcow2", {"cluster_size=4096"});
  ASSERT_OK_AND_ASSIGN(uint64_t l1, ReadBE64At(image, hdr::kL1TableOffset));
  ASSERT_OK_AND_ASSIGN(uint64_t first, ReadBE64At(image, l1));
  for (int i = 1; i < 32; ++i) ASSERT_OK(WriteBE64At(image, l1 + 8 * i, first));
  ExpectMountRefused(image, "both point to the L2 table");
}

}  // namespace
}  // namespace qcow2fuse::test::cli
