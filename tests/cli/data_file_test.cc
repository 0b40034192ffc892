// An image's external data file as an attack surface, and the memory an
// image may make the daemon spend, through real mounts:
//
//  * the data file is where guest data is written, at guest offsets: one
//    that is the image itself (by name, hard link or symlink) or a file of
//    the backing chain would have a 4 KiB write land on metadata. Such a
//    data file is refused, from the header or from -o data_file, and so is
//    one that is not a regular file or block device (a FIFO would hang the
//    mount in open());
//  * the data file is locked as QEMU locks it: a data file in use by a
//    running QEMU (qemu-storage-daemon) refuses the mount, and while the
//    view is mounted QEMU cannot open another image onto the same data;
//  * -o max_metadata_memory: an image whose structures exceed it is refused
//    with one line, and a dirty image in a sparse 1 TiB file of 512-byte
//    clusters is repaired by a daemon limited to 4 GiB of address space.

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <utility>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/status_testing.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define QCOW2FUSE_DATA_FILE_TEST_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define QCOW2FUSE_DATA_FILE_TEST_SANITIZED 1
#endif

namespace qcow2fuse::test::cli {
namespace {

constexpr uint64_t kDisk = 16 * kMiB;

// Whether another open file description holds a lock on `byte` of `path`.
bool LockedByOthers(const std::string& path, int byte) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  struct flock fl = {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  const bool held = fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
  close(fd);
  return held;
}

// qemu-storage-daemon serving `image` read-write over NBD, as a VM would
// use it, until destroyed: then SIGTERM (SIGKILL if it does not go), and
// always reaped.
class StorageDaemon {
 public:
  static absl::StatusOr<std::unique_ptr<StorageDaemon>> Start(const std::string& image,
                                                              const std::string& socket,
                                                              const std::string& wait_for_lock_on) {
    const std::vector<std::string> argv = {
        "qemu-storage-daemon",
        "--blockdev", absl::StrCat("driver=file,node-name=file0,filename=", image),
        "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
        "--nbd-server", absl::StrCat("addr.type=unix,addr.path=", socket),
        "--export", "type=nbd,id=export0,node-name=disk0,writable=on"};
    absl::StatusOr<pid_t> pid = Spawn(argv, STDERR_FILENO, STDERR_FILENO);
    if (!pid.ok()) return pid.status();
    auto daemon = std::unique_ptr<StorageDaemon>(new StorageDaemon(*pid));
    // Running once it holds the write lock (byte 101) of the data file.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!LockedByOthers(wait_for_lock_on, 101)) {
      absl::StatusOr<std::optional<ExitStatus>> done = WaitForExitFor(*pid, std::chrono::milliseconds(20));
      if (!done.ok()) return done.status();
      if (done->has_value()) {
        daemon->reaped_ = true;
        return absl::InternalError(absl::StrCat(CommandLine(argv), " exited: ", (*done)->ToString()));
      }
      if (std::chrono::steady_clock::now() > deadline) {
        return absl::DeadlineExceededError(absl::StrCat(CommandLine(argv), " took no lock"));
      }
    }
    return daemon;
  }

  ~StorageDaemon() {
    if (reaped_) return;
    kill(pid_, SIGTERM);
    absl::StatusOr<std::optional<ExitStatus>> done = WaitForExitFor(pid_, std::chrono::seconds(10));
    if (done.ok() && !done->has_value()) {
      kill(pid_, SIGKILL);
      (void)WaitForExit(pid_);
    }
  }

 private:
  explicit StorageDaemon(pid_t pid) : pid_(pid) {}
  const pid_t pid_;
  bool reaped_ = false;
};

class DataFileTest : public TempDirTest {
 protected:
  // A qcow2 image whose data lives in the file `data_file` of the test's
  // directory (recorded as an absolute path: qemu-img resolves a relative
  // one against its working directory), with data at 0 and 1 MiB.
  void MakeImage(const std::string& image, const std::string& data_file,
                 std::vector<std::string> options = {}) {
    options.push_back("data_file=" + Path(data_file));
    ASSERT_OK(CreateImage(image, "qcow2", kDisk, options));
    ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x5a 0 64k", "write -P 0xa5 1M 64k"}));
  }

  // `qcow2fuse -f [-o OPTIONS] IMAGE MNT` must refuse with one line holding
  // `words`, mounting nothing.
  void ExpectRefused(const std::string& image, const std::vector<std::string>& options,
                     const std::vector<std::string>& words) {
    const std::string mountpoint = Path(absl::StrCat("refused", ++refusals_, ".raw"));
    std::vector<std::string> argv = {Binary(), "-f"};
    if (!options.empty()) {
      argv.push_back("-o");
      argv.push_back(absl::StrJoin(options, ","));
    }
    argv.push_back(image);
    argv.push_back(mountpoint);
    RunOptions run_options;
    run_options.timeout = std::chrono::seconds(30);
    run_options.watch_mountpoint = mountpoint;
    ASSERT_OK_AND_ASSIGN(RunResult run, RunBounded(argv, run_options));
    EXPECT_TRUE(FailsWithOneLine(run, words)) << run.Describe();
    EXPECT_FALSE(run.mounted_during_run || IsMounted(mountpoint)) << run.Describe();
  }

  int refusals_ = 0;
};

// An overwrite of an image with a raw external data file changes only the
// data file: the view's mtime follows it all the same, so rsync, backup
// tools and make see that the disk changed.
TEST_F(DataFileTest, AnOverwriteInTheDataFileMovesTheViewsMtime) {
  const std::string image = Path("ext.qcow2");
  const std::string data = Path("ext.data");
  ASSERT_OK(CreateImage(image, "qcow2", 16 * kMiB, {"data_file=" + data, "data_file_raw=on"}));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(WritableView(image, Path("view.raw"))));
  const std::string block(64 * 1024, 'w');
  ASSERT_OK(WriteFileAt(view->path(), 0, block));  // the first write may mark the image in use
  auto mtime_of = [](const std::string& path) {
    struct stat st = {};
    EXPECT_EQ(stat(path.c_str(), &st), 0) << path << ": " << strerror(errno);
    return std::pair{st.st_mtim.tv_sec, st.st_mtim.tv_nsec};
  };
  // Past the kernel's attribute cache (1 s) and any coarse clock tick.
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  const auto view_before = mtime_of(view->path());
  const auto image_before = mtime_of(image);
  ASSERT_OK(WriteFileAt(view->path(), 8 * 1024 * 1024, block));
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  ASSERT_EQ(mtime_of(image), image_before) << "the image file was written too: the test shows nothing";
  EXPECT_GT(mtime_of(view->path()), view_before) << "the view's mtime stayed";
  EXPECT_EQ(mtime_of(view->path()), mtime_of(data));
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
}

// The header names the image itself as its data file: a write at guest
// offset 0 would overwrite the header. QEMU refuses it; so do we, read-write
// and read-only, whether the name is the image's own, a hard link or a
// symlink to it, or given with -o data_file.
TEST_F(DataFileTest, TheImageItselfIsRefused) {
  // qemu-img creates the data file self.qcow2 beside the image; the image
  // then takes its place.
  const std::string image = Path("self.qcow2");
  MakeImage(Path("made.qcow2"), "self.qcow2");
  ASSERT_EQ(rename(Path("made.qcow2").c_str(), image.c_str()), 0) << strerror(errno);
  ASSERT_OK_AND_ASSIGN(std::string before, ReadFile(image));
  ExpectRefused(image, {"rw"}, {"self.qcow2", "external data file", "image itself"});
  ExpectRefused(image, {"ro"}, {"self.qcow2", "image itself"});
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(image));
  EXPECT_TRUE(before == after) << "the refused mount changed the image";

  // Another name for the same file.
  const std::string linked = Path("linked.qcow2");
  MakeImage(linked, "link.raw");
  ASSERT_EQ(unlink(Path("link.raw").c_str()), 0);
  ASSERT_EQ(link(linked.c_str(), Path("link.raw").c_str()), 0) << strerror(errno);
  ExpectRefused(linked, {"rw"}, {"link.raw", "image itself"});
  ASSERT_EQ(unlink(Path("link.raw").c_str()), 0);
  ASSERT_EQ(symlink("linked.qcow2", Path("link.raw").c_str()), 0) << strerror(errno);
  ExpectRefused(linked, {"rw"}, {"image itself"});

  // -o data_file naming the image.
  const std::string good = Path("good.qcow2");
  MakeImage(good, "good.raw");
  ExpectRefused(good, {"rw", "data_file=" + good}, {"image itself"});
  ASSERT_OK(CheckImage(good));
}

// A data file that is a file of the backing chain: guest writes would
// overwrite the backing image's metadata (or the backing image would read
// the top's data as its own). Refused either way round, and with
// -o data_file.
TEST_F(DataFileTest, AFileOfTheBackingChainIsRefused) {
  const std::string base = Path("base.qcow2");
  ASSERT_OK(CreateImage(base, "qcow2", kDisk));
  ASSERT_OK(QemuIo(base, "qcow2", {"write -P 0x11 0 1M"}));
  ASSERT_OK_AND_ASSIGN(std::string base_before, ReadFile(base));

  // The top's data file is the base image.
  const std::string top = Path("top.qcow2");
  MakeImage(top, "top.raw", {"backing_file=base.qcow2", "backing_fmt=qcow2"});
  ASSERT_EQ(unlink(Path("top.raw").c_str()), 0);
  ASSERT_EQ(symlink("base.qcow2", Path("top.raw").c_str()), 0) << strerror(errno);
  ExpectRefused(top, {"rw"}, {"base.qcow2", "external data file", "backing chain"});
  ExpectRefused(top, {"ro"}, {"base.qcow2", "external data file", "backing chain"});

  // The same through -o data_file.
  const std::string top2 = Path("top2.qcow2");
  MakeImage(top2, "top2.raw", {"backing_file=base.qcow2", "backing_fmt=qcow2"});
  ExpectRefused(top2, {"rw", "data_file=" + base}, {"base.qcow2", "external data file", "backing chain"});

  // The base's data file is the top image.
  const std::string low = Path("low.qcow2");
  MakeImage(low, "low.raw");
  const std::string high = Path("high.qcow2");
  ASSERT_OK(CreateImage(high, "qcow2", kDisk, {"backing_file=low.qcow2", "backing_fmt=qcow2"}));
  ASSERT_EQ(unlink(Path("low.raw").c_str()), 0);
  ASSERT_EQ(symlink("high.qcow2", Path("low.raw").c_str()), 0) << strerror(errno);
  ExpectRefused(high, {"rw"}, {"high.qcow2", "backing chain"});

  ASSERT_OK_AND_ASSIGN(std::string base_after, ReadFile(base));
  EXPECT_TRUE(base_before == base_after) << "a refused mount changed the base image";
}

// Only a regular file or a block device holds data. A directory is refused;
// so is a FIFO, at once rather than after an open() that waits for a writer.
TEST_F(DataFileTest, NotARegularFileOrBlockDeviceIsRefused) {
  const std::string image = Path("disk.qcow2");
  MakeImage(image, "disk.raw");
  ASSERT_EQ(mkdir(Path("dir").c_str(), 0755), 0);
  ExpectRefused(image, {"rw", "data_file=" + Path("dir")}, {"dir", "a directory"});
  ExpectRefused(image, {"ro", "data_file=" + Path("dir")}, {"a directory"});

  ASSERT_EQ(mkfifo(Path("fifo").c_str(), 0644), 0) << strerror(errno);
  const auto start = std::chrono::steady_clock::now();
  ExpectRefused(image, {"ro", "data_file=" + Path("fifo")}, {"fifo", "a FIFO"});
  // From the header too.
  ASSERT_EQ(unlink(Path("disk.raw").c_str()), 0);
  ASSERT_EQ(mkfifo(Path("disk.raw").c_str(), 0644), 0) << strerror(errno);
  ExpectRefused(image, {"ro"}, {"disk.raw", "a FIFO"});
  ExpectRefused(image, {"rw"}, {"disk.raw", "a FIFO"});
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
}

// QEMU locks the data file with the image's permissions but shares write.
// Two images naming one data file (a copy of an image, say) then keep each
// other out, and that is what protects the data: the mount of one is
// refused while a qemu-storage-daemon serves the other, and while the view
// is mounted, qemu-io cannot open the other.
TEST_F(DataFileTest, ADataFileInUseByQemuIsRefused) {
  const std::string image = Path("a.qcow2");
  const std::string copy = Path("b.qcow2");
  const std::string data = Path("shared.raw");
  MakeImage(image, "shared.raw");
  ASSERT_OK(RunChecked({"cp", image, copy}));  // b.qcow2 names shared.raw too
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<StorageDaemon> daemon,
                         StorageDaemon::Start(image, Path("nbd.sock"), data));
    ExpectRefused(copy, {"rw"}, {"shared.raw", "in use"});
    ExpectRefused(copy, {"ro"}, {"shared.raw", "in use"});
  }

  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view,
                         MountedView::Start(WritableView(copy, Path("view.raw"))));
    // The bytes QEMU takes on a data file it writes.
    for (int byte : {100, 101, 103, 203}) EXPECT_TRUE(LockedByOthers(data, byte)) << "byte " << byte;
    EXPECT_FALSE(LockedByOthers(data, 201)) << "QEMU shares write on a data file";
    ASSERT_OK_AND_ASSIGN(CommandResult rw, RunCommand({"qemu-io", "-f", "qcow2", "-c", "read 0 4k", image}));
    EXPECT_FALSE(rw.ok());
    EXPECT_TRUE(absl::StrContains(rw.stderr_text, "Failed to get shared \"resize\" lock")) << rw.stderr_text;
    ASSERT_OK_AND_ASSIGN(CommandResult ro,
                         RunCommand({"qemu-io", "-r", "-f", "qcow2", "-c", "read 0 4k", image}));
    EXPECT_FALSE(ro.ok());
    EXPECT_TRUE(absl::StrContains(ro.stderr_text, "Failed to get shared \"resize\" lock")) << ro.stderr_text;
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  }
  EXPECT_OK(QemuIo(image, "qcow2", {"read -P 0x5a 0 64k"}));
}

// --- The memory budget --------------------------------------------------------

TEST_F(DataFileTest, ImageBeyondMaxMetadataMemoryIsRefusedWithOneLine) {
  const std::string image = Path("big-clusters.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDisk, {"cluster_size=2M"}));
  ExpectRefused(image, {"ro", "max_metadata_memory=1M"},
                {"big-clusters.qcow2", "2 MiB", "max_metadata_memory"});
  // Values that are not a size, or too small to open anything: usage errors.
  for (const char* bad : {"max_metadata_memory=lots", "max_metadata_memory=64K", "max_metadata_memory"}) {
    const std::string mountpoint = Path("usage.raw");
    RunOptions run_options;
    run_options.watch_mountpoint = mountpoint;
    ASSERT_OK_AND_ASSIGN(
        RunResult run,
        RunBounded({Binary(), "-f", "-o", absl::StrCat("ro,", bad), image, mountpoint}, run_options));
    EXPECT_TRUE(run.status.exited() && run.status.code() == 2) << run.Describe();
    EXPECT_TRUE(absl::StartsWith(run.stderr_text, "qcow2fuse: ")) << run.Describe();
    EXPECT_TRUE(absl::StrContains(run.stderr_text, "max_metadata_memory")) << run.Describe();
    EXPECT_FALSE(run.mounted_during_run || IsMounted(mountpoint)) << run.Describe();
  }
  // The default holds it.
  MountOptions options;
  options.binary = Binary();
  options.image = image;
  options.mountpoint = Path("ok.raw");
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
  ASSERT_OK(view->Unmount());
}

// A dirty image in a sparse file of almost 1 TiB with 512-byte clusters:
// 2^31 host clusters, which a rebuild that keeps 12 bytes per cluster would
// need 24 GiB for. Mounted read-write by a daemon limited to 4 GiB of
// address space, it is repaired, its data intact, and the new refcount
// structures lie right after the data.
TEST_F(DataFileTest, DirtyHugeSparseImageIsRepairedWithin4GiBOfAddressSpace) {
  const std::string image = Path("dirty.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", 64 * kMiB, {"cluster_size=512", "lazy_refcounts=on"}));
  ASSERT_OK_AND_ASSIGN(CommandResult killed,
                       RunCommand({"qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c",
                                   "write -P 0x22 40M 512k", "-c", "sigraise 9", image}));
  ASSERT_TRUE(killed.status.signaled()) << killed.status.ToString();
  ASSERT_OK_AND_ASSIGN(uint64_t features, ReadBE64At(image, hdr::kIncompatibleFeatures));
  ASSERT_NE(features & 1, 0u) << "qemu-io left the image clean";
  struct stat st;
  ASSERT_EQ(stat(image.c_str(), &st), 0);
  const uint64_t data_end = st.st_size;
  ASSERT_EQ(truncate(image.c_str(), (uint64_t{1} << 40) - kMiB), 0) << strerror(errno);

  // The daemon through prlimit, which execs it: its pid stays the one the
  // mount fixture watches. Sanitizers reserve terabytes of shadow address
  // space, so those builds run without the limit.
  const std::string wrapper = Path("limited.sh");
#ifdef QCOW2FUSE_DATA_FILE_TEST_SANITIZED
  ASSERT_OK(WriteFileAt(wrapper, 0, absl::StrCat("#!/bin/sh\nexec '", Binary(), "' \"$@\"\n")));
#else
  ASSERT_OK(WriteFileAt(wrapper, 0, absl::StrCat("#!/bin/sh\nexec prlimit --as=", uint64_t{4} << 30,
                                                 " -- '", Binary(), "' \"$@\"\n")));
#endif
  ASSERT_EQ(chmod(wrapper.c_str(), 0755), 0);
  MountOptions options = WritableView(image, Path("view.raw"));
  options.binary = wrapper;
  options.start_timeout = std::chrono::seconds(60);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));
    int fd = open(view->path().c_str(), O_RDWR);
    ASSERT_GE(fd, 0) << strerror(errno);
    std::string got(4096, '\0');
    EXPECT_EQ(pread(fd, got.data(), got.size(), 40 << 20), 4096);
    EXPECT_EQ(got, std::string(4096, '\x22'));
    // Over data already there: written in place.
    const std::string again(4096, '\x33');
    EXPECT_EQ(pwrite(fd, again.data(), again.size(), 8192), 4096);
    EXPECT_EQ(fsync(fd), 0) << strerror(errno);
    close(fd);
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  }
  ASSERT_OK_AND_ASSIGN(features, ReadBE64At(image, hdr::kIncompatibleFeatures));
  EXPECT_EQ(features & 1, 0u) << "the dirty bit is still set";

  // Past the new refcount structures nothing is referenced: cut the file
  // there and let qemu-img check every refcount (it would need 4 GiB of
  // its own for the huge file).
  ASSERT_OK_AND_ASSIGN(uint64_t table, ReadBE64At(image, hdr::kRefcountTableOffset));
  ASSERT_OK_AND_ASSIGN(uint32_t table_clusters, ReadBE32At(image, hdr::kRefcountTableOffset + 8));
  EXPECT_LT(table, data_end + kMiB) << "the new refcount table went to the end of the file";
  uint64_t end = table + uint64_t{table_clusters} * 512;
  for (uint64_t i = 0; i < uint64_t{table_clusters} * 512 / 8; ++i) {
    ASSERT_OK_AND_ASSIGN(uint64_t block, ReadBE64At(image, table + 8 * i));
    if (block != 0) end = std::max(end, block + 512);
  }
  ASSERT_LT(end, data_end + kMiB);
  ASSERT_EQ(truncate(image.c_str(), end), 0) << strerror(errno);
  EXPECT_OK(CheckImage(image));
  EXPECT_OK(QemuIo(image, "qcow2",
                   {"read -P 0x11 0 8k", "read -P 0x33 8k 4k", "read -P 0x11 12k 1012k",
                    "read -P 0x22 40M 512k"}));
}

}  // namespace
}  // namespace qcow2fuse::test::cli
