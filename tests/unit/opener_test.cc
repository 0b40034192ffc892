// Who opened a view: ProcessName on this process, on a fake /proc and on
// processes that cannot be named, and the list of programs that attach
// loop devices, and the kernels whose loop driver reads whole requests.
// That an open by losetup gets direct-I/O mode through a real mount is in
// tests/cli/mount_options_test.cc.

#include "opener.h"

#include <gtest/gtest.h>
#include <sys/prctl.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "support/temp_dir.h"

namespace qcow2fuse {
namespace {

namespace fs = std::filesystem;

TEST(ProcessNameTest, NamesThisProcessAsPsDoes) {
  char name[16] = {};
  ASSERT_EQ(prctl(PR_GET_NAME, name), 0);
  EXPECT_EQ(ProcessName(getpid()), name);
}

TEST(ProcessNameTest, ReadsCommUnderTheGivenProc) {
  absl::StatusOr<test::TempDir> dir = test::TempDir::Create("proc");
  ASSERT_TRUE(dir.ok()) << dir.status();
  fs::create_directories(fs::path(dir->path()) / "4242");
  std::ofstream(fs::path(dir->path()) / "4242" / "comm") << "losetup\n";
  EXPECT_EQ(ProcessName(4242, dir->path()), "losetup");
  // No newline (not as the kernel writes it, but no reason to fail).
  fs::create_directories(fs::path(dir->path()) / "7");
  std::ofstream(fs::path(dir->path()) / "7" / "comm") << "mount";
  EXPECT_EQ(ProcessName(7, dir->path()), "mount");
}

// A process that is gone, an empty comm, and pid 0, which the kernel
// sends for an opener outside the daemon's pid namespace: no name, so
// the open keeps the page cache.
TEST(ProcessNameTest, UnknownProcessesHaveNoName) {
  absl::StatusOr<test::TempDir> dir = test::TempDir::Create("proc");
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(ProcessName(4242, dir->path()), "");
  fs::create_directories(fs::path(dir->path()) / "5");
  std::ofstream(fs::path(dir->path()) / "5" / "comm") << "";
  EXPECT_EQ(ProcessName(5, dir->path()), "");
  EXPECT_EQ(ProcessName(0), "");
  EXPECT_EQ(ProcessName(-1), "");
}

TEST(AttachesLoopDevicesTest, ProgramsThatAttachLoopDevices) {
  for (const char* name : {"losetup", "mount", "udisksctl", "gnome-disk-imag", "kpartx", "cryptsetup", "veritysetup",
                           "systemd-dissect", "systemd-nspawn", "systemd-portabl", "systemd-sysext"}) {
    EXPECT_TRUE(AttachesLoopDevices(name)) << name;
  }
}

// Readers of the view keep its page cache, and names that only resemble
// the listed ones do not count. udisksd attaches loop devices to
// descriptors that its clients opened.
TEST(AttachesLoopDevicesTest, ReadersDoNot) {
  for (const char* name : {"cat", "dd", "cp", "sha256sum", "qemu-img", "fio", "e2fsck", "umount", "mount.ntfs",
                           "losetu", "losetup2", "", "systemd", "udisksd"}) {
    EXPECT_FALSE(AttachesLoopDevices(name)) << name;
  }
}

// Before Linux 6.15 a plain loop device read its file a page at a time.
TEST(LoopDoesWholeRequestsTest, FromLinux615) {
  for (const char* release : {"6.15.0", "6.18.44-fc-v1252", "6.15-rc1", "6.16.3+deb13-amd64", "7.0.0", "10.1"}) {
    EXPECT_TRUE(LoopDoesWholeRequests(release)) << release;
  }
  for (const char* release : {"6.14.11", "6.12.48+deb13-amd64", "6.9.0", "6.1.0-37-amd64", "5.19.17", "6.1", "6"}) {
    EXPECT_FALSE(LoopDoesWholeRequests(release)) << release;
  }
}

// A release that cannot be read is taken for an old kernel.
TEST(LoopDoesWholeRequestsTest, AnUnreadableReleaseIsOld) {
  for (const char* release : {"", "linux", "six.fifteen", ".15", "6.", "6.x"}) {
    EXPECT_FALSE(LoopDoesWholeRequests(release)) << release;
  }
}

TEST(LoopDoesWholeRequestsTest, KernelReleaseIsUnames) {
  struct utsname u;
  ASSERT_EQ(uname(&u), 0);
  EXPECT_EQ(KernelRelease(), u.release);
}

}  // namespace
}  // namespace qcow2fuse
