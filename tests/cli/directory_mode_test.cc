// Directory mode: a mountpoint that is a directory shows disk.raw, one
// partN.raw per partition (MBR with logical partitions, GPT) and
// snapshots/NAME.raw per internal snapshot. Checked through real mounts
// against QEMU and sfdisk: each partition file is the byte range sfdisk
// --json gives of `qemu-img convert -O raw`, each snapshot file is what
// `qemu-img convert -l` reads, writes stay inside their partition (ENOSPC
// at its end), and the image is clean and equal to a raw twin that got the
// same writes. A damaged partition table gives no partition files, one log
// line and a working disk.raw.

#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sys/sysmacros.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <thread>
#include <map>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/status_testing.h"

namespace qcow2fuse::test::cli {
namespace {

using qemu_io_cmd::W;

constexpr uint64_t kDisk = 64 * kMiB;
constexpr uint64_t kSector = 512;

struct Range {
  uint64_t offset;
  uint64_t length;
};

// The data partitions sfdisk --json lists for `raw` (extended partitions,
// which only hold the logical ones, left out), by number: the oracle for
// which partN.raw files there are and what each holds.
absl::StatusOr<std::map<int, Range>> SfdiskPartitions(const std::string& raw) {
  absl::StatusOr<std::string> json = RunChecked({"sfdisk", "--json", raw});
  if (!json.ok()) return json.status();
  static const std::regex kEntry(
      R"re("node":\s*"[^"]*?(\d+)",\s*"start":\s*(\d+),\s*"size":\s*(\d+),\s*"type":\s*"([^"]+)")re");
  std::map<int, Range> partitions;
  for (auto it = std::sregex_iterator(json->begin(), json->end(), kEntry); it != std::sregex_iterator(); ++it) {
    const std::string type = (*it)[4];
    if (type == "5" || type == "f" || type == "85") continue;
    partitions[std::stoi((*it)[1])] = {std::stoull((*it)[2]) * kSector, std::stoull((*it)[3]) * kSector};
  }
  if (partitions.empty()) return absl::InternalError("sfdisk listed no partitions:\n" + *json);
  return partitions;
}

class DirectoryModeTest : public TempDirTest {
 protected:
  // A 64 MiB disk with the partition table `script` (sfdisk's input), each
  // partition then filled with its own pattern in its first and last 64
  // KiB, as a qcow2 image (disk.qcow2) and its raw twin (twin.raw).
  void MakeDisk(const std::string& script) {
    twin_ = Path("twin.raw");
    image_ = Path("disk.qcow2");
    ASSERT_OK(RunChecked({"truncate", "-s", std::to_string(kDisk), twin_}).status());
    ASSERT_OK_AND_ASSIGN(CommandResult made, RunCommand({"sh", "-c", "printf '" + script + "' | sfdisk -q " + twin_}));
    ASSERT_TRUE(made.status.success()) << made.stderr_text;
    ASSERT_OK_AND_ASSIGN(partitions_, SfdiskPartitions(twin_));
    ASSERT_OK(ConvertImage(twin_, "raw", image_, "qcow2"));
    std::vector<std::string> writes;
    for (const auto& [number, range] : partitions_) {
      writes.push_back(W(0x10 + number, range.offset, 64 * kKiB));
      writes.push_back(W(0x30 + number, range.offset + range.length - 64 * kKiB, 64 * kKiB));
    }
    ASSERT_OK(QemuIo(image_, "qcow2", writes));
    ASSERT_OK(QemuIo(twin_, "raw", writes));
  }

  MountOptions DirectoryView(bool read_only) {
    mountpoint_ = Path("mnt");
    mkdir(mountpoint_.c_str(), 0755);
    MountOptions options = read_only ? ReadOnlyView(image_, mountpoint_) : WritableView(image_, mountpoint_);
    return options;
  }

  std::string In(const std::string& name) const { return mountpoint_ + "/" + name; }

  // image_ (made by the caller) gets, for each of `names` in turn, `step`
  // bytes of its own pattern after the last's, then a snapshot so named:
  // snapshot ID n holds the first n writes.
  void WriteAndSnapshot(const std::vector<std::string>& names, uint64_t step) {
    for (size_t i = 0; i < names.size(); ++i) {
      ASSERT_OK(QemuIo(image_, "qcow2", {W(0x10 + i, i * step, step)}));
      ASSERT_OK(QemuImg({"snapshot", "-c", names[i], image_}).status());
    }
  }

  // snapshots/ holds exactly `files` (file name to snapshot ID), each
  // reading as qemu-img convert -l snapshot.id=ID.
  void ExpectSnapshotFiles(const std::map<std::string, std::string>& files) {
    std::vector<std::string> expected_names;
    for (const auto& [file, id] : files) expected_names.push_back(file);
    std::sort(expected_names.begin(), expected_names.end());
    EXPECT_EQ(DirectoryNames(In("snapshots")), expected_names);
    for (const auto& [file, id] : files) {
      SCOPED_TRACE(file);
      const std::string raw = Path("snapshot-" + id + ".raw");
      ASSERT_OK(ConvertImage(image_, "qcow2", raw, "raw", {"-U", "-l", "snapshot.id=" + id}));
      ASSERT_OK(CompareFiles(In("snapshots/" + file), raw));
    }
  }

  // Each partition file holds its range of `reference`, by default the
  // image as QEMU reads it (which a read-write mount's lock forbids: pass
  // the raw twin there).
  void ExpectPartitions(std::string reference = "") {
    if (reference.empty()) {
      reference = Path("reference.raw");
      ASSERT_OK(ConvertToRaw(image_, reference));
    }
    ASSERT_OK_AND_ASSIGN(std::string disk, ReadFile(reference));
    std::vector<std::string> expected = {"disk.raw", "snapshots"};
    for (const auto& [number, range] : partitions_) expected.push_back(absl::StrCat("part", number, ".raw"));
    std::sort(expected.begin(), expected.end());
    EXPECT_EQ(DirectoryNames(mountpoint_), expected);
    for (const auto& [number, range] : partitions_) {
      SCOPED_TRACE(absl::StrCat("part", number, ".raw"));
      ASSERT_OK_AND_ASSIGN(std::string part, ReadFile(In(absl::StrCat("part", number, ".raw"))));
      ASSERT_EQ(part.size(), range.length);
      EXPECT_TRUE(part == disk.substr(range.offset, range.length)) << "differs from its range of " << reference;
    }
    ASSERT_OK(CompareFiles(In("disk.raw"), reference));
  }

  std::string twin_;
  std::string image_;
  std::string mountpoint_;
  std::map<int, Range> partitions_;
};

TEST_F(DirectoryModeTest, GptPartitionsAreTheirRanges) {
  ASSERT_NO_FATAL_FAILURE(MakeDisk("label: gpt\\n,16M\\n,8M\\n,\\n"));
  EXPECT_EQ(partitions_.size(), 3u);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/true)));
  ExpectPartitions();
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
}

// Primaries by slot, logical partitions from 5 in chain order; the
// extended partition that holds them is no file.
TEST_F(DirectoryModeTest, MbrLogicalPartitionsAreNumberedFromFive) {
  // Primaries 1 and 3, the extended partition 2 holding logical ones 5-7
  // (sfdisk's dump format names each by its number).
  ASSERT_NO_FATAL_FAILURE(MakeDisk(
      "label: dos\\n"
      "p1 : start=2048, size=16384, type=83\\n"
      "p2 : start=18432, size=81920, type=5\\n"
      "p3 : start=100352, size=8192, type=83\\n"
      "p5 : start=20480, size=8192, type=83\\n"
      "p6 : start=30720, size=12288, type=83\\n"
      "p7 : start=45056, size=10240, type=83\\n"));
  EXPECT_EQ(partitions_.size(), 5u);
  EXPECT_TRUE(partitions_.contains(5) && partitions_.contains(6) && partitions_.contains(7));
  EXPECT_FALSE(partitions_.contains(2));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/true)));
  ExpectPartitions();
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
}

// Writes, zeroing and holes inside a partition land at its offset on the
// disk; at its end there is no room (ENOSPC), and a write across the end
// is cut short there. Its size is fixed. SEEK_DATA and st_blocks are the
// partition's own, and so is SEEK_HOLE.
TEST_F(DirectoryModeTest, WritesStayInsideTheirPartition) {
  ASSERT_NO_FATAL_FAILURE(MakeDisk("label: gpt\\n,16M\\n,8M\\n,\\n"));
  const Range p2 = partitions_.at(2);
  const Range p3 = partitions_.at(3);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/false)));
  {
    ScopedFd part(open(In("part2.raw").c_str(), O_RDWR | O_CLOEXEC));
    ASSERT_GE(part.get(), 0);
    const std::string data(8192, 'x');
    // Across the end: only the part inside is written.
    EXPECT_EQ(pwrite(part.get(), data.data(), data.size(), p2.length - 4096), 4096);
    ASSERT_OK(WriteFileAt(twin_, p2.offset + p2.length - 4096, data.substr(0, 4096)));
    errno = 0;
    EXPECT_EQ(pwrite(part.get(), data.data(), data.size(), p2.length), -1);
    EXPECT_EQ(errno, ENOSPC);
    EXPECT_EQ(pwrite(part.get(), data.data(), data.size(), kMiB + 512), 8192);
    ASSERT_OK(WriteFileAt(twin_, p2.offset + kMiB + 512, data));
    EXPECT_EQ(fallocate(part.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 64 * kKiB), 0);
    ASSERT_OK(WriteFileAt(twin_, p2.offset, std::string(64 * kKiB, '\0')));
    errno = 0;
    EXPECT_EQ(fallocate(part.get(), 0, p2.length - 4096, 8192), -1);
    EXPECT_EQ(errno, ENOSPC);
    errno = 0;
    EXPECT_EQ(ftruncate(part.get(), p2.length + kMiB), -1);
    EXPECT_EQ(errno, EPERM);
    EXPECT_EQ(ftruncate(part.get(), p2.length), 0);
    // The first data of the partition is where its first write went.
    EXPECT_EQ(lseek(part.get(), 0, SEEK_DATA), static_cast<off_t>(kMiB));
    // So is SEEK_HOLE: the cluster written ends at 1 MiB + 64 KiB, and the
    // partition's last data ends at its end, though part3's data follows
    // on the disk.
    EXPECT_EQ(lseek(part.get(), kMiB, SEEK_HOLE), static_cast<off_t>(kMiB + 64 * kKiB));
    EXPECT_EQ(lseek(part.get(), p2.length - 4096, SEEK_HOLE), static_cast<off_t>(p2.length));
    EXPECT_EQ(fsync(part.get()), 0);
  }
  struct stat st;
  ASSERT_EQ(stat(In("part2.raw").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), p2.length);
  // Its 64 KiB at the end and the cluster written at 1 MiB.
  EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512, 64 * kKiB);
  EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, 512 * kKiB);
  {
    // The next partition, right after the end written up to, is untouched.
    ASSERT_OK_AND_ASSIGN(std::string part3, ReadFile(In("part3.raw")));
    ASSERT_OK_AND_ASSIGN(std::string twin, ReadFile(twin_));
    EXPECT_TRUE(part3 == twin.substr(p3.offset, p3.length));
  }
  ExpectPartitions(twin_);
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  ASSERT_OK(CheckImage(image_));
  ASSERT_OK(QemuImg({"compare", "-f", "qcow2", "-F", "raw", image_, twin_}).status());
}

// disk.raw and a partition file show the same bytes: what is written or
// punched through one reads back through the other, even where the other
// was read (and so cached by the kernel) before.
TEST_F(DirectoryModeTest, DiskAndPartitionFilesStayCoherent) {
  ASSERT_NO_FATAL_FAILURE(MakeDisk("label: gpt\\n,16M\\n,8M\\n"));
  const Range p1 = partitions_.at(1);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/false)));
  ScopedFd disk(open(In("disk.raw").c_str(), O_RDWR | O_CLOEXEC));
  ScopedFd part(open(In("part1.raw").c_str(), O_RDWR | O_CLOEXEC));
  ASSERT_GE(disk.get(), 0);
  ASSERT_GE(part.get(), 0);
  std::string buf(64 * kKiB, '\0');
  auto read_disk = [&](uint64_t offset) {
    EXPECT_EQ(pread(disk.get(), buf.data(), buf.size(), offset), static_cast<ssize_t>(buf.size()));
    return buf;
  };
  auto read_part = [&](uint64_t offset) {
    EXPECT_EQ(pread(part.get(), buf.data(), buf.size(), offset), static_cast<ssize_t>(buf.size()));
    return buf;
  };
  // The other file drops its cached pages a moment after the change
  // returns (fuse/invalidator.h): wait for it, boundedly.
  auto eventually = [](const std::function<std::string()>& read, const std::string& expected) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    std::string got = read();
    while (got != expected && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      got = read();
    }
    return got == expected;
  };
  EXPECT_EQ(read_disk(p1.offset), std::string(64 * kKiB, 0x11));  // now in the kernel's cache
  const std::string data(64 * kKiB, 'p');
  ASSERT_EQ(pwrite(part.get(), data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
  EXPECT_TRUE(eventually([&] { return read_disk(p1.offset); }, data));
  const std::string other(64 * kKiB, 'd');
  ASSERT_EQ(pwrite(disk.get(), other.data(), other.size(), p1.offset), static_cast<ssize_t>(other.size()));
  EXPECT_TRUE(eventually([&] { return read_part(0); }, other));
  ASSERT_EQ(fallocate(part.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 64 * kKiB), 0);
  EXPECT_TRUE(eventually([&] { return read_disk(p1.offset); }, std::string(64 * kKiB, '\0')));
  disk.Reset();
  part.Reset();
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  ASSERT_OK(CheckImage(image_));
}

// Two writers, one through disk.raw and one through part1.raw, each
// writing 512 bytes at a time into the same pages (which the kernel keeps
// locked until each write is answered): neither may wait for the other.
// Should they ever hang, the FUSE connection is aborted, which fails their
// writes and lets the test end with no mount left.
TEST_F(DirectoryModeTest, ConcurrentPartialWritesThroughDiskAndPartitionNeverHang) {
  ASSERT_NO_FATAL_FAILURE(MakeDisk("label: gpt\\n,16M\\n"));
  const Range p1 = partitions_.at(1);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/false)));
  struct stat mounted;
  ASSERT_EQ(stat(mountpoint_.c_str(), &mounted), 0);
  constexpr int kWrites = 3000;
  std::atomic<int> done{0};
  auto writer = [&](const std::string& file, uint64_t base, char fill) {
    ScopedFd fd(open(file.c_str(), O_WRONLY | O_CLOEXEC));
    const std::string data(512, fill);
    for (int i = 0; i < kWrites && fd.get() >= 0; ++i) {
      if (pwrite(fd.get(), data.data(), data.size(), base + (i % 16) * 512) < 0) break;
    }
    ++done;
  };
  std::thread a(writer, In("disk.raw"), p1.offset + 512, 'a');
  std::thread b(writer, In("part1.raw"), 512, 'b');
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (done < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const bool hung = done < 2;
  if (hung) {
    // /sys/fs/fuse/connections/<device minor>/abort ends every request
    // (fusectl, mounted here for the while if the system has not).
    const std::string connections = "/sys/fs/fuse/connections";
    absl::StatusOr<CommandResult> fusectl = RunCommand({"mount", "-t", "fusectl", "none", connections});
    const bool mounted_fusectl = fusectl.ok() && fusectl->status.success();
    (void)WriteFileAt(absl::StrCat(connections, "/", minor(mounted.st_dev), "/abort"), 0, "1");
    a.join();
    b.join();
    if (mounted_fusectl) (void)RunCommand({"umount", connections});
    FAIL() << "writers through disk.raw and part1.raw hung";
  }
  a.join();
  b.join();
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  ASSERT_OK(CheckImage(image_));
}

// Snapshot file names stay distinct whatever the names: here a snapshot
// named like another's fallback, and two sharing a name.
TEST_F(DirectoryModeTest, SnapshotFileNamesNeverCollide) {
  image_ = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image_, "qcow2", 4 * kMiB));
  ASSERT_NO_FATAL_FAILURE(WriteAndSnapshot({"snapshot-2", "3", "dup", "dup"}, kMiB));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/true)));
  // ID 1 keeps its name; ID 2's name "3" is free; ID 3's "3.raw" is taken,
  // and so is snapshot-2.raw; ID 4 is by its ID.
  ExpectSnapshotFiles({{"snapshot-2.raw", "1"}, {"3.raw", "2"}, {"snapshot-2~1.raw", "3"}, {"4.raw", "4"}});
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
}

// A snapshot whose name is not a file name (a '/', "." or "..", too long
// for NAME_MAX with ".raw") is ID.raw; a name just short enough keeps it.
// A snapshot is opened at the first open of its file: until then its
// st_blocks counts its whole size, afterwards its data.
TEST_F(DirectoryModeTest, SnapshotsWithoutAFileNameAreByTheirId) {
  image_ = Path("disk.qcow2");
  constexpr uint64_t kSize = 4 * kMiB;
  ASSERT_OK(CreateImage(image_, "qcow2", kSize));
  const std::string longest(251, 'n');  // 251 + ".raw" = 255 bytes
  ASSERT_NO_FATAL_FAILURE(WriteAndSnapshot({"a/b", ".", "..", std::string(252, 'l'), longest}, 512 * kKiB));
  const std::map<std::string, std::string> files = {
      {"1.raw", "1"}, {"2.raw", "2"}, {"3.raw", "3"}, {"4.raw", "4"}, {longest + ".raw", "5"}};
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/true)));
  for (const auto& [file, id] : files) {
    SCOPED_TRACE(file);
    struct stat st;
    ASSERT_EQ(stat(In("snapshots/" + file).c_str(), &st), 0) << strerror(errno);
    EXPECT_EQ(static_cast<uint64_t>(st.st_blocks) * 512, kSize) << "a snapshot not yet opened";
  }
  ExpectSnapshotFiles(files);  // opens each
  // Once the kernel's cached attributes (1 s) are stale: snapshot ID n
  // holds the first n writes of 512 KiB.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  for (const auto& [file, id] : files) {
    SCOPED_TRACE(file);
    struct stat st;
    ASSERT_EQ(stat(In("snapshots/" + file).c_str(), &st), 0) << strerror(errno);
    EXPECT_EQ(static_cast<uint64_t>(st.st_blocks) * 512, std::stoull(id) * 512 * kKiB);
  }
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
}

// tar --sparse (GNU tar archives a file with no blocks as all holes,
// unread) of snapshots never opened keeps their bytes.
TEST_F(DirectoryModeTest, TarSparseOfSnapshotsKeepsTheirData) {
  image_ = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image_, "qcow2", 4 * kMiB));
  ASSERT_OK(QemuIo(image_, "qcow2", {W(0x41, 0, kMiB), W(0x42, 3 * kMiB, 64 * kKiB)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "first", image_}).status());
  const std::string expected = Path("first.expected");
  ASSERT_OK(ConvertImage(image_, "qcow2", expected, "raw", {"-l", "snapshot.name=first"}));
  const std::string archive = Path("snapshots.tar");
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/true)));
    ASSERT_OK(RunChecked({"tar", "-cSf", archive, "-C", In("snapshots"), "first.raw"}).status());
    ASSERT_OK(view->Unmount());
  }
  const std::string out = Path("out");
  ASSERT_EQ(mkdir(out.c_str(), 0755), 0);
  ASSERT_OK(RunChecked({"tar", "-xf", archive, "-C", out}).status());
  EXPECT_OK(CompareFiles(out + "/first.raw", expected));
}

// On a writable mount, only a snapshot's file, whose bytes never change,
// gets the run of data a SEEK_HOLE starts in put in its page cache
// (prefill.h); disk.raw, which can be written, does not.
TEST_F(DirectoryModeTest, OnAWritableMountOnlySnapshotsArePrefilled) {
  image_ = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image_, "qcow2", 4 * kMiB));
  ASSERT_OK(QemuIo(image_, "qcow2", {W(0x41, 0, 256 * kKiB)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "first", image_}).status());
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/false)));
  for (const auto& [file, prefilled] : {std::pair{"disk.raw", false}, std::pair{"snapshots/first.raw", true}}) {
    SCOPED_TRACE(file);
    ScopedFd fd(open(In(file).c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_GE(fd.get(), 0) << strerror(errno);
    EXPECT_EQ(lseek(fd.get(), 0, SEEK_HOLE), static_cast<off_t>(256 * kKiB));
    ASSERT_OK_AND_ASSIGN(const size_t cached, PagesInCache(fd.get(), 0, 256 * kKiB));
    EXPECT_EQ(cached, prefilled ? 64u : 0u);
  }
  ASSERT_OK(view->Unmount());
}

// Creating, removing or renaming a file of the mount is refused plainly:
// EPERM, or EROFS on a read-only mount.
TEST_F(DirectoryModeTest, FilesCannotBeMadeOrRemoved) {
  ASSERT_NO_FATAL_FAILURE(MakeDisk("label: gpt\\n,16M\\n"));
  for (const bool read_only : {false, true}) {
    SCOPED_TRACE(read_only ? "read-only" : "read-write");
    const int refused = read_only ? EROFS : EPERM;
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(read_only)));
    errno = 0;
    EXPECT_LT(open(In("new.raw").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644), 0);
    EXPECT_EQ(errno, refused) << strerror(errno);
    errno = 0;
    EXPECT_EQ(unlink(In("part1.raw").c_str()), -1);
    EXPECT_EQ(errno, refused) << strerror(errno);
    errno = 0;
    EXPECT_EQ(rename(In("part1.raw").c_str(), In("p.raw").c_str()), -1);
    EXPECT_EQ(errno, refused) << strerror(errno);
    errno = 0;
    EXPECT_EQ(mkdir(In("d").c_str(), 0755), -1);
    EXPECT_EQ(errno, refused) << strerror(errno);
    EXPECT_EQ(DirectoryNames(mountpoint_), (std::vector<std::string>{"disk.raw", "part1.raw", "snapshots"}));
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  }
}

// truncate grows disk.raw, and the image with it; the partition files keep
// their ranges and bytes.
TEST_F(DirectoryModeTest, TruncateGrowsTheDisk) {
  ASSERT_NO_FATAL_FAILURE(MakeDisk("label: gpt\\n,16M\\n,16M\\n"));
  constexpr uint64_t kGrown = kDisk + 16 * kMiB;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/false)));
    ASSERT_EQ(truncate(In("disk.raw").c_str(), kGrown), 0) << strerror(errno);
    struct stat st;
    ASSERT_EQ(stat(In("disk.raw").c_str(), &st), 0) << strerror(errno);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), kGrown);
    ASSERT_OK(WriteFileAt(In("disk.raw"), kDisk + kMiB, std::string(64 * kKiB, '\x77')));
    ASSERT_EQ(truncate(twin_.c_str(), kGrown), 0) << strerror(errno);
    ASSERT_OK(WriteFileAt(twin_, kDisk + kMiB, std::string(64 * kKiB, '\x77')));
    ExpectPartitions(twin_);
    ASSERT_OK(view->Unmount());
    EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  }
  ASSERT_OK_AND_ASSIGN(uint64_t size, VirtualSize(image_));
  EXPECT_EQ(size, kGrown);
  EXPECT_OK(CheckImage(image_));
  const std::string reference = Path("grown.raw");
  ASSERT_OK(ConvertToRaw(image_, reference));
  EXPECT_OK(CompareFiles(reference, twin_));
}

// Every snapshot is a read-only file equal to qemu-img convert -l; named
// by its ID where names are shared. Writing the disk meanwhile leaves them
// as they were.
TEST_F(DirectoryModeTest, SnapshotsAreReadOnlyFiles) {
  image_ = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image_, "qcow2", 8 * kMiB));
  ASSERT_OK(QemuIo(image_, "qcow2", {W(0x11, 0, 8 * kMiB)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "before upgrade", image_}).status());
  ASSERT_OK(QemuIo(image_, "qcow2", {W(0x22, kMiB, kMiB)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "same", image_}).status());
  ASSERT_OK(QemuIo(image_, "qcow2", {W(0x33, 2 * kMiB, kMiB)}));
  ASSERT_OK(QemuImg({"snapshot", "-c", "same", image_}).status());
  ASSERT_OK(QemuIo(image_, "qcow2", {W(0x44, 3 * kMiB, kMiB)}));
  struct Expected {
    std::string file;
    std::string id;
  };
  const std::vector<Expected> expected = {{"before upgrade.raw", "1"}, {"2.raw", "2"}, {"3.raw", "3"}};
  std::map<std::string, std::string> qemu;
  for (const Expected& e : expected) {
    const std::string raw = Path("snapshot-" + e.id + ".raw");
    ASSERT_OK(ConvertImage(image_, "qcow2", raw, "raw", {"-l", "snapshot.id=" + e.id}));
    ASSERT_OK_AND_ASSIGN(qemu[e.file], ReadFile(raw));
  }
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/false)));
  EXPECT_EQ(DirectoryNames(In("snapshots")), (std::vector<std::string>{"2.raw", "3.raw", "before upgrade.raw"}));
  {
    ScopedFd disk(open(In("disk.raw").c_str(), O_RDWR | O_CLOEXEC));
    ASSERT_GE(disk.get(), 0);
    const std::string data(2 * kMiB, 'z');
    EXPECT_EQ(pwrite(disk.get(), data.data(), data.size(), 512 * kKiB), static_cast<ssize_t>(data.size()));
  }
  for (const Expected& e : expected) {
    SCOPED_TRACE(e.file);
    const std::string path = In("snapshots/" + e.file);
    ASSERT_OK_AND_ASSIGN(std::string ours, ReadFile(path));
    EXPECT_TRUE(ours == qemu[e.file]) << "differs from qemu-img convert -l snapshot.id=" << e.id;
    struct stat st;
    ASSERT_EQ(stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0222, 0u);
    errno = 0;
    EXPECT_LT(open(path.c_str(), O_WRONLY | O_CLOEXEC), 0);
    EXPECT_EQ(errno, EROFS);
  }
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  ASSERT_OK(CheckImage(image_));
}

// A GPT whose headers are both damaged: no partition files, one line in
// the log, and the rest of the mount works.
TEST_F(DirectoryModeTest, DamagedPartitionTableGivesNoPartitionFiles) {
  ASSERT_NO_FATAL_FAILURE(MakeDisk("label: gpt\\n,16M\\n,8M\\n"));
  // Break the CRC of the primary header (byte 512 + 16) and the backup's
  // (the last sector).
  ASSERT_OK(QemuIo(image_, "qcow2", {"write -P 0x77 528 4", absl::StrCat("write -P 0x77 ", kDisk - 512 + 16, " 4")}));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/true)));
  EXPECT_EQ(DirectoryNames(mountpoint_), (std::vector<std::string>{"disk.raw", "snapshots"}));
  const std::string reference = Path("reference.raw");
  ASSERT_OK(ConvertToRaw(image_, reference));
  ASSERT_OK(CompareFiles(In("disk.raw"), reference));
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  EXPECT_TRUE(absl::StrContains(view->ReadLog(), "no partition files")) << view->ReadLog();
}

// What the README shows: a file system tool works on a partition file
// directly, no loop device or root needed; mkfs through the mount, then
// e2fsck, debugfs and fuse2fs read it back.
TEST_F(DirectoryModeTest, FileSystemToolsWorkOnPartitionFiles) {
  ASSERT_NO_FATAL_FAILURE(MakeDisk("label: gpt\\n,16M\\n,\\n"));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(DirectoryView(/*read_only=*/false)));
  ASSERT_OK(RunChecked({"mkfs.ext4", "-q", "-F", In("part1.raw")}).status());
  ASSERT_OK_AND_ASSIGN(std::string listing, RunChecked({"debugfs", "-R", "ls -l /", In("part1.raw")}));
  EXPECT_TRUE(absl::StrContains(listing, "lost+found")) << listing;
  ASSERT_OK(RunChecked({"e2fsck", "-fn", In("part1.raw")}).status());
  {
    // fuse2fs mounts the partition file itself (as a plain user could).
    const std::string guest = Path("guest");
    ASSERT_EQ(mkdir(guest.c_str(), 0755), 0);
    ASSERT_OK(RunChecked({"fuse2fs", "-o", "ro,fakeroot", In("part1.raw"), guest}).status());
    struct Unmount {
      std::string path;
      ~Unmount() { (void)RunCommand({"fusermount3", "-u", path}); }
    } unmount{guest};
    struct stat st;
    EXPECT_EQ(stat((guest + "/lost+found").c_str(), &st), 0);
    EXPECT_TRUE(S_ISDIR(st.st_mode));
  }
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status()->success()) << view->ReadLog();
  ASSERT_OK(CheckImage(image_));
  // The second partition kept what it held.
  const Range p2 = partitions_.at(2);
  const std::string reference = Path("reference.raw");
  ASSERT_OK(ConvertToRaw(image_, reference));
  ASSERT_OK_AND_ASSIGN(std::string now, ReadFile(reference));
  ASSERT_OK_AND_ASSIGN(std::string twin, ReadFile(twin_));
  EXPECT_TRUE(now.substr(p2.offset, p2.length) == twin.substr(p2.offset, p2.length));
}

}  // namespace
}  // namespace qcow2fuse::test::cli
