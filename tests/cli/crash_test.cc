// A daemon killed with SIGKILL in the middle of a write load must leave an
// image that `qemu-img check` finds free of errors (leaked clusters are
// allowed: they are what unflushed allocations become), holding every byte
// that an fsync covered.

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kDiskSize = 64ull << 20;

// What the writer has done: `durable` is the disk as of the last completed
// fsync; `touched` marks bytes written since (their content is unknown
// after a crash: old, new, or torn).
struct Ledger {
  std::mutex mu;
  std::vector<uint8_t> twin = std::vector<uint8_t>(kDiskSize, 0);
  std::vector<uint8_t> durable = std::vector<uint8_t>(kDiskSize, 0);
  std::vector<std::pair<uint64_t, uint64_t>> touched;  // since the last fsync
  uint64_t writes = 0;
  uint64_t fsyncs = 0;
};

// Writes at random offsets, fsyncing every few writes, until an error
// (the daemon died) or `stop`.
void WriteLoad(const std::string& view, uint64_t seed, Ledger* ledger, std::atomic<bool>* stop) {
  std::mt19937_64 rng(seed);
  int fd = open(view.c_str(), O_RDWR);
  if (fd < 0) return;
  std::vector<uint8_t> buffer;
  while (!stop->load()) {
    const uint64_t length = 1 + rng() % (256 << 10);
    const uint64_t offset = rng() % (kDiskSize - length);
    buffer.resize(length);
    const uint8_t pattern = static_cast<uint8_t>(rng());
    for (uint64_t i = 0; i < length; ++i) buffer[i] = static_cast<uint8_t>(pattern + i / 512);
    {
      std::lock_guard lock(ledger->mu);
      ledger->touched.emplace_back(offset, length);  // before: it may land partly
    }
    if (pwrite(fd, buffer.data(), length, offset) != static_cast<ssize_t>(length)) break;
    std::lock_guard lock(ledger->mu);
    std::copy(buffer.begin(), buffer.end(), ledger->twin.begin() + offset);
    ++ledger->writes;
    if (rng() % 8 == 0) {
      if (fsync(fd) != 0) break;
      ledger->durable = ledger->twin;
      ledger->touched.clear();
      ++ledger->fsyncs;
    }
  }
  close(fd);
}

class CrashTest : public ::testing::TestWithParam<const char*> {};

TEST_P(CrashTest, KillDuringWritesLeavesConsistentImageWithFsyncedData) {
  const uint64_t seed = TestSeed();
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("crash"));
  const std::string image = dir.Join("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize, {GetParam()}));

  Ledger ledger;
  {
    MountOptions options;
    options.binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
    options.image = image;
    options.mountpoint = dir.Join("view.raw");
    options.read_only = false;
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> view, MountedView::Start(options));

    std::atomic<bool> stop{false};
    std::thread writer(WriteLoad, view->path(), seed, &ledger, &stop);
    // Let the load run until some fsyncs are behind us, then kill.
    std::mt19937_64 rng(seed ^ 0x5eed);
    const uint64_t target_fsyncs = 3 + rng() % 10;
    for (int i = 0; i < 3000; ++i) {
      {
        std::lock_guard lock(ledger.mu);
        if (ledger.fsyncs >= target_fsyncs) break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ASSERT_EQ(kill(view->pid(), SIGKILL), 0);
    stop = true;
    writer.join();
    // The dead mount still has to come down; the fixture reaps the daemon.
    (void)view->Unmount();
  }
  std::cout << "writes " << ledger.writes << ", fsyncs " << ledger.fsyncs << "\n";
  // Killed with fsync'd data behind it, or the test shows nothing.
  ASSERT_GT(ledger.writes, 0u) << "the writer never wrote (could it open the view?)";
  ASSERT_GE(ledger.fsyncs, 3u) << "the daemon was killed before the writes were fsync'd";

  EXPECT_OK(CheckImage(image, /*allow_leaks=*/true));
  const std::string raw = dir.Join("after.raw");
  ASSERT_OK(ConvertToRaw(image, raw));
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(raw));
  ASSERT_EQ(after.size(), kDiskSize);
  std::vector<bool> unknown(kDiskSize, false);
  for (const auto& [offset, length] : ledger.touched) {
    std::fill(unknown.begin() + offset, unknown.begin() + offset + length, true);
  }
  uint64_t mismatches = 0, first = 0;
  for (uint64_t i = 0; i < kDiskSize; ++i) {
    if (!unknown[i] && static_cast<uint8_t>(after[i]) != ledger.durable[i]) {
      if (mismatches++ == 0) first = i;
    }
  }
  EXPECT_EQ(mismatches, 0u) << "fsync'd bytes lost or changed, first at offset " << first;
}

INSTANTIATE_TEST_SUITE_P(Images, CrashTest,
                         ::testing::Values("cluster_size=65536", "cluster_size=4096",
                                           "extended_l2=on"));

}  // namespace
}  // namespace qcow2fuse::test
