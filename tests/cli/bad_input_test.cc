// What qcow2fuse does with images it cannot or should not serve.
//
// Open-time problems (a header that is not qcow2 or is impossible, an
// unsupported feature, encryption, a broken backing chain, a missing data
// file) must be refused before anything is mounted: a normal non-zero exit,
// one "qcow2fuse: ..." line on stderr that says what is wrong, no mount and
// no leftover mountpoint file. Each is checked in daemon mode and with -f.
//
// Read-time damage (metadata that only turns out bad when a read reaches
// it) must fail just that read with EIO, be logged, and leave every other
// range readable and the daemon running until a clean unmount.
//
// Damaged files are made by patching bytes of images made by qemu-img, at
// offsets taken from header fields parsed here (cli_util.h), or written
// from scratch.

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test::cli {
namespace {

constexpr uint64_t kDiskSize = 64 * kMiB;

bool ContainsNoCase(const std::string& text, const std::string& word) {
  return absl::StrContains(absl::AsciiStrToLower(text), absl::AsciiStrToLower(word));
}

// True while `pid` exists and is not a zombie.
bool IsRunning(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  if (!std::getline(in, line)) return false;
  const size_t paren = line.rfind(')');
  if (paren == std::string::npos || paren + 2 >= line.size()) return false;
  const char state = line[paren + 2];
  return state != 'Z' && state != 'X';
}

std::string RandomBytes(std::mt19937_64& rng, size_t n) {
  std::string bytes(n, '\0');
  for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
  return bytes;
}

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    BecomeSubreaper();
    absl::StatusOr<TempDir> dir = TempDir::Create("badinput");
    ASSERT_OK(dir);
    dir_ = std::make_unique<TempDir>(std::move(*dir));
  }

  std::string Path(absl::string_view name) const { return dir_->Join(name); }

  // Checks a clean refusal of `image` both in daemon mode and with -f.
  void ExpectRefused(const std::string& image, const std::vector<std::string>& keywords,
                     const std::vector<std::string>& extra_options = {}) {
    EXPECT_TRUE(RefusesCleanly(dir_->path(), absl::StrCat("daemon", ++runs_), image,
                               extra_options, keywords, Mode::kDaemon));
    EXPECT_TRUE(RefusesCleanly(dir_->path(), absl::StrCat("fg", ++runs_), image,
                               extra_options, keywords, Mode::kForeground));
  }

  // A v3 qcow2 image with data at a few places.
  std::string MakeImage(absl::string_view name, uint64_t size = kDiskSize,
                        const std::vector<std::string>& options = {}) {
    const std::string image = Path(name);
    EXPECT_OK(CreateImage(image, "qcow2", size, options));
    EXPECT_OK(QemuIo(image, "qcow2", {"write -P 0x5a 0 64k", "write -P 0xa5 8M 64k"}));
    return image;
  }

  // Mounts `image` (which must mount despite its damage), and checks that
  // reading `damaged` fails with EIO while `good` reads `good_bytes`, that
  // the daemon lives on and unmounts cleanly with exit 0, and that its log
  // mentions `log_keyword`.
  void ExpectReadDamage(const std::string& image, uint64_t damaged, uint64_t good,
                        const std::string& good_bytes, const std::string& log_keyword) {
    MountOptions options;
    options.binary = Binary();
    options.image = image;
    options.mountpoint = Path("view.raw");
    absl::StatusOr<std::unique_ptr<MountedView>> started = MountedView::Start(options);
    // The log of a daemon that failed every getattr is long: show its start.
    ASSERT_TRUE(started.ok()) << "damage that only a read meets must not stop the mount, "
                                 "nor make the view unusable:\n"
                              << started.status().ToString().substr(0, 3000);
    std::unique_ptr<MountedView> view = std::move(*started);
    {
      ASSERT_OK_AND_ASSIGN(ScopedFd fd, OpenReadOnly(view->path()));
      std::string buf(4096, '\0');

      errno = 0;
      ssize_t n = pread(fd.get(), buf.data(), buf.size(), damaged);
      const int damaged_errno = errno;
      EXPECT_EQ(n, -1) << "read of the damaged range at " << damaged << " succeeded";
      EXPECT_EQ(damaged_errno, EIO) << "errno " << damaged_errno << " ("
                                    << strerror(damaged_errno) << "), expected EIO";

      std::string got(good_bytes.size(), '\0');
      n = pread(fd.get(), got.data(), got.size(), good);
      ASSERT_EQ(n, static_cast<ssize_t>(got.size()))
          << "read of the undamaged range at " << good << ": " << strerror(errno) << "\n"
          << view->ReadLog();
      EXPECT_TRUE(got == good_bytes) << "the undamaged range at " << good << " reads wrong data";

      // Again, in the other order: a failed read changes nothing.
      errno = 0;
      n = pread(fd.get(), buf.data(), buf.size(), damaged);
      EXPECT_EQ(n, -1);
      EXPECT_EQ(errno, EIO);
      std::fill(got.begin(), got.end(), '\0');
      posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
      n = pread(fd.get(), got.data(), got.size(), good);
      EXPECT_EQ(n, static_cast<ssize_t>(got.size())) << strerror(errno);
      EXPECT_TRUE(got == good_bytes);

      struct stat st;
      EXPECT_EQ(fstat(fd.get(), &st), 0) << strerror(errno);
      EXPECT_TRUE(IsRunning(view->pid())) << "the daemon died\n" << view->ReadLog();
      EXPECT_FALSE(view->exit_status().has_value());
    }
    ASSERT_OK(view->Unmount()) << view->ReadLog();
    ASSERT_TRUE(view->exit_status().has_value());
    EXPECT_TRUE(view->exit_status()->exited())
        << view->exit_status()->ToString() << "\n" << view->ReadLog();
    EXPECT_TRUE(view->exit_status()->success())
        << view->exit_status()->ToString() << "\n" << view->ReadLog();
    EXPECT_FALSE(IsMounted(view->path()));
    const std::string log = view->ReadLog();
    EXPECT_TRUE(ContainsNoCase(log, log_keyword))
        << "the -f log does not mention \"" << log_keyword << "\":\n" << log;
  }

  std::unique_ptr<TempDir> dir_;
  int runs_ = 0;
};

// ------------------------------------------------- not qcow2 at all --

const std::vector<std::string> kNotQcow2Words = {"qcow2", "magic", "header",
                                                 "short", "small", "empty"};

TEST_F(BadInputTest, EmptyFileIsRefused) {
  const std::string image = Path("empty.qcow2");
  ASSERT_OK(WriteFileAt(image, 0, ""));
  ExpectRefused(image, kNotQcow2Words);
}

TEST_F(BadInputTest, TenByteFileIsRefused) {
  const std::string image = Path("ten.qcow2");
  ASSERT_OK(WriteFileAt(image, 0, std::string("QFI\xfb\0\0\0\x03xy", 10)));
  ExpectRefused(image, kNotQcow2Words);
}

TEST_F(BadInputTest, RandomGarbageIsRefused) {
  std::mt19937_64 rng(TestSeed());
  const std::string image = Path("garbage.qcow2");
  std::string bytes = RandomBytes(rng, 256 * kKiB);
  if (bytes.compare(0, 4, "QFI\xfb") == 0) bytes[0] = 'X';
  ASSERT_OK(WriteFileAt(image, 0, bytes));
  ExpectRefused(image, kNotQcow2Words);
}

TEST_F(BadInputTest, RandomGarbageAfterQcow2MagicIsRefused) {
  std::mt19937_64 rng(TestSeed());
  // Random bytes behind a valid magic and version; each later round fixes
  // one more field to a sane value so the randomness reaches deeper checks.
  for (int round = 0; round < 8; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    const std::string image = Path(absl::StrCat("garbage", round, ".qcow2"));
    ASSERT_OK(WriteFileAt(image, 0, RandomBytes(rng, 256 * kKiB)));
    ASSERT_OK(WriteBE32At(image, hdr::kMagic, hdr::kQcow2Magic));
    ASSERT_OK(WriteBE32At(image, hdr::kVersion, 3));
    // Random incompatible feature bits alone would be refused: clear them.
    ASSERT_OK(WriteBE64At(image, hdr::kIncompatibleFeatures, 0));
    const int depth = round % 4;
    if (depth >= 1) {
      ASSERT_OK(WriteBE32At(image, 100, 104));  // header_length
    }
    if (depth >= 2) {
      ASSERT_OK(WriteBE32At(image, hdr::kClusterBits, 16));
      ASSERT_OK(WriteBE32At(image, 96, 4));  // refcount_order
      ASSERT_OK(WriteBE32At(image, hdr::kCryptMethod, 0));
      ASSERT_OK(WriteBE64At(image, 104, 0));  // end of header extensions
    }
    if (depth >= 3) {
      ASSERT_OK(WriteBE64At(image, hdr::kSize, kDiskSize));
      ASSERT_OK(WriteBE32At(image, hdr::kL1Size, 1));
      ASSERT_OK(WriteBE64At(image, hdr::kBackingFileOffset, 0));
      ASSERT_OK(WriteBE32At(image, hdr::kBackingFileSize, 0));
    }
    ExpectRefused(image, {});  // says something: one line, any words
  }
}

TEST_F(BadInputTest, Version1IsRefused) {
  const std::string image = MakeImage("v1.qcow2");
  ASSERT_OK(WriteBE32At(image, hdr::kVersion, 1));
  ExpectRefused(image, {"version"});
}

TEST_F(BadInputTest, Version4IsRefused) {
  const std::string image = MakeImage("v4.qcow2");
  ASSERT_OK(WriteBE32At(image, hdr::kVersion, 4));
  ExpectRefused(image, {"version"});
}

// ------------------------------------------- impossible header fields --

TEST_F(BadInputTest, ClusterBits30IsRefused) {
  const std::string image = MakeImage("cb30.qcow2");
  ASSERT_OK(WriteBE32At(image, hdr::kClusterBits, 30));
  ExpectRefused(image, {"cluster"});
}

TEST_F(BadInputTest, HugeVirtualSizeWithSmallL1IsRefused) {
  const std::string image = MakeImage("huge.qcow2");
  ASSERT_OK_AND_ASSIGN(Qcow2Header h, ReadQcow2Header(image));
  ASSERT_LE(h.l1_size, 16u) << "expected a small L1 table";
  ASSERT_OK(WriteBE64At(image, hdr::kSize, uint64_t{1} << 60));  // 1 EiB
  ExpectRefused(image, {"L1", "size"});
}

TEST_F(BadInputTest, L1TablePastEndOfFileIsRefused) {
  const std::string image = MakeImage("l1eof.qcow2");
  ASSERT_OK_AND_ASSIGN(Qcow2Header h, ReadQcow2Header(image));
  struct stat st;
  ASSERT_EQ(stat(image.c_str(), &st), 0);
  const uint64_t past_eof =
      (static_cast<uint64_t>(st.st_size) / h.cluster_size() + 1000) * h.cluster_size();
  ASSERT_OK(WriteBE64At(image, hdr::kL1TableOffset, past_eof));
  ExpectRefused(image, {"L1"});
}

// --------------------------------------------------------- features --

TEST_F(BadInputTest, UnknownIncompatibleFeatureBitIsRefusedAndNamed) {
  const std::string image = MakeImage("feature10.qcow2");
  ASSERT_OK_AND_ASSIGN(Qcow2Header h, ReadQcow2Header(image));
  ASSERT_EQ(h.version, 3u);
  ASSERT_OK(WriteBE64At(image, hdr::kIncompatibleFeatures,
                        h.incompatible_features | (uint64_t{1} << 10)));
  ExpectRefused(image, {"bit 10", "0x400"});
}

TEST_F(BadInputTest, CorruptBitImageStillMountsReadOnly) {
  const std::string image = MakeImage("corrupt.qcow2");
  const std::string reference = Path("corrupt.ref");
  ASSERT_OK(ConvertToRaw(image, reference));
  ASSERT_OK_AND_ASSIGN(Qcow2Header h, ReadQcow2Header(image));
  ASSERT_OK(WriteBE64At(image, hdr::kIncompatibleFeatures,
                        h.incompatible_features | (uint64_t{1} << 1)));  // corrupt

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(ReadOnlyView(image, Path("view.raw"))));
  EXPECT_OK(CompareFiles(view->path(), reference));
  ASSERT_OK(view->Unmount());
  EXPECT_TRUE(view->exit_status() && view->exit_status()->success()) << view->ReadLog();
}

TEST_F(BadInputTest, EncryptedImageIsRefused) {
  const std::string image = Path("luks.qcow2");
  ASSERT_OK(CreateLuksImage(image, "secret,id=sec0,data=abc", "encrypt.format=luks,encrypt.key-secret=sec0", "16M"));
  ExpectRefused(image, {"encrypt"});
}

// ---------------------------------------------------- backing chains --

TEST_F(BadInputTest, MissingBackingFileIsRefusedNamingIt) {
  const std::string base = Path("base.qcow2");
  const std::string top = Path("top.qcow2");
  ASSERT_OK(CreateImage(base, "qcow2", kDiskSize));
  ASSERT_OK(CreateImage(top, "qcow2", kDiskSize, {"backing_file=" + base, "backing_fmt=qcow2"}));
  ASSERT_EQ(unlink(base.c_str()), 0);
  ExpectRefused(top, {base});
}

TEST_F(BadInputTest, LoopingBackingChainIsRefused) {
  const std::string a = Path("a.qcow2");
  const std::string b = Path("b.qcow2");
  // -u: qemu-img would itself refuse to open the loop to check it.
  ASSERT_OK(QemuImg({"create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", a,
                     "64M"}));
  ASSERT_OK(QemuImg({"create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b,
                     "64M"}));
  ExpectRefused(a, {"loop", "deep", "chain", "backing"});
}

TEST_F(BadInputTest, SelfBackedImageIsRefused) {
  const std::string a = Path("self.qcow2");
  ASSERT_OK(QemuImg({"create", "-q", "-f", "qcow2", "-u", "-b", "self.qcow2", "-F", "qcow2",
                     a, "64M"}));
  ExpectRefused(a, {"loop", "deep", "chain", "backing"});
}

TEST_F(BadInputTest, VmdkBackingFormatIsRefused) {
  const std::string base = Path("base.vmdk");
  const std::string top = Path("top.qcow2");
  ASSERT_OK(CreateImage(base, "vmdk", kDiskSize));
  ASSERT_OK(CreateImage(top, "qcow2", kDiskSize, {"backing_file=" + base, "backing_fmt=vmdk"}));
  ExpectRefused(top, {"vmdk"});
}

TEST_F(BadInputTest, MissingExternalDataFileIsRefused) {
  const std::string data = Path("data.raw");
  const std::string image = Path("ext.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize, {"data_file=" + data}));
  ASSERT_EQ(unlink(data.c_str()), 0);
  ExpectRefused(image, {"data.raw"});
}

// ------------------------------------------------- read-time damage --

TEST_F(BadInputTest, L2EntryPastEndOfFileFailsThatReadWithEio) {
  const std::string image = MakeImage("l2eof.qcow2");
  ASSERT_OK_AND_ASSIGN(uint64_t entry_at, L2EntryOffset(image, 0));
  ASSERT_OK_AND_ASSIGN(uint64_t entry, ReadBE64At(image, entry_at));
  ASSERT_NE(entry & kOffsetMask, 0u) << "guest cluster 0 should be allocated";
  ASSERT_OK(WriteBE64At(image, entry_at, kCopiedFlag | (uint64_t{1} << 40)));  // 1 TiB
  ExpectReadDamage(image, /*damaged=*/0, /*good=*/8 * kMiB, std::string(64 * kKiB, '\xa5'),
                   "L2");
}

TEST_F(BadInputTest, L1EntryPointingPastEndOfFileFailsThatReadWithEio) {
  // 64 KiB clusters: each L2 table maps 512 MiB, so guest 0 and guest 1 GiB
  // hang off different L1 entries.
  const std::string image = Path("l1eof.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", 2048 * kMiB));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x5a 0 64k", "write -P 0xc3 1G 64k"}));
  ASSERT_OK_AND_ASSIGN(uint64_t l1_entry_at, L1EntryOffset(image, 0));
  ASSERT_OK_AND_ASSIGN(uint64_t other_l1_entry_at, L1EntryOffset(image, 1024 * kMiB));
  ASSERT_NE(l1_entry_at, other_l1_entry_at);
  ASSERT_OK_AND_ASSIGN(uint64_t l1_entry, ReadBE64At(image, l1_entry_at));
  ASSERT_NE(l1_entry & kOffsetMask, 0u);
  ASSERT_OK(WriteBE64At(image, l1_entry_at, kCopiedFlag | (uint64_t{1} << 40)));
  ExpectReadDamage(image, /*damaged=*/0, /*good=*/1024 * kMiB, std::string(64 * kKiB, '\xc3'),
                   "L2");
}

TEST_F(BadInputTest, GarbageCompressedClusterFailsThatReadWithEio) {
  // Compressible but not trivial contents for two clusters, far apart.
  auto text = [](char tag) {
    std::string s;
    for (int line = 0; s.size() < 64 * kKiB; ++line) {
      s += absl::StrFormat("cluster %c, line %d: the quick brown fox %d\n", tag, line,
                           line * 7919 % 1000);
    }
    s.resize(64 * kKiB);
    return s;
  };
  const std::string first = text('A');
  const std::string second = text('B');
  const std::string source = Path("source.raw");
  const std::string image = Path("compressed.qcow2");
  ASSERT_OK(CreateImage(source, "raw", 4 * kMiB));
  ASSERT_OK(WriteFileAt(source, 0, first));
  ASSERT_OK(WriteFileAt(source, 1 * kMiB, second));
  ASSERT_OK(ConvertImage(source, "raw", image, "qcow2", {"-c"}));

  ASSERT_OK_AND_ASSIGN(Qcow2Header h, ReadQcow2Header(image));
  const uint32_t x = 62 - (h.cluster_bits - 8);  // bits of the host offset
  auto host_of = [&](uint64_t guest) -> absl::StatusOr<uint64_t> {
    absl::StatusOr<uint64_t> at = L2EntryOffset(image, guest);
    if (!at.ok()) return at.status();
    absl::StatusOr<uint64_t> entry = ReadBE64At(image, *at);
    if (!entry.ok()) return entry.status();
    if ((*entry & kCompressedFlag) == 0) {
      return absl::FailedPreconditionError(
          absl::StrFormat("guest %u is not compressed (entry %#x)", guest, *entry));
    }
    return *entry & ((uint64_t{1} << x) - 1);
  };
  ASSERT_OK_AND_ASSIGN(uint64_t damaged_host, host_of(0));
  ASSERT_OK_AND_ASSIGN(uint64_t good_host, host_of(1 * kMiB));
  ASSERT_TRUE(good_host >= damaged_host + 16 || good_host + 16 <= damaged_host)
      << "the two compressed clusters overlap the patched bytes";
  // 0xff... starts a deflate block of the reserved type 3: never valid.
  ASSERT_OK(WriteFileAt(image, damaged_host, std::string(16, '\xff')));
  ExpectReadDamage(image, /*damaged=*/0, /*good=*/1 * kMiB, second, "compress");
}

}  // namespace
}  // namespace qcow2fuse::test::cli
