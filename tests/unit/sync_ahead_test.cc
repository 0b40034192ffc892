// SyncAhead (fuse/sync_ahead.h): when a sync begins, what it counts, and how
// it stops. The sync function is the test's: it records what had been
// written when it began and can be held at its start until the test lets it
// go, so that writes arrive at a chosen point of a sync.

#include "sync_ahead.h"

#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <vector>

#include "gtest/gtest.h"

namespace qcow2fuse {
namespace {

constexpr uint64_t kThreshold = 64u << 20;
constexpr std::chrono::seconds kForever{60};

// The sync the SyncAhead under test calls. Each call records the bytes the
// test had written by then, and, while held, waits until released.
class FakeSync {
 public:
  absl::Status operator()() {
    std::unique_lock lock(mu_);
    began_.push_back(written_);
    cv_.notify_all();
    cv_.wait(lock, [this] { return !held_; });
    ++ended_;
    cv_.notify_all();
    return result_;
  }

  // Calls SyncAhead::Wrote and records the bytes.
  void Write(SyncAhead& ahead, uint64_t bytes) {
    {
      std::lock_guard lock(mu_);
      written_ += bytes;
    }
    ahead.Wrote(bytes);
  }

  void Hold() {
    std::lock_guard lock(mu_);
    held_ = true;
  }
  void Release() {
    {
      std::lock_guard lock(mu_);
      held_ = false;
    }
    cv_.notify_all();
  }
  void FailWith(absl::Status status) {
    std::lock_guard lock(mu_);
    result_ = std::move(status);
  }
  // Waits until `n` syncs have begun / ended; false after kForever.
  bool AwaitBegun(size_t n) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, kForever, [&] { return began_.size() >= n; });
  }
  bool AwaitEnded(size_t n) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, kForever, [&] { return ended_ >= n; });
  }
  std::vector<uint64_t> began() {
    std::lock_guard lock(mu_);
    return began_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t written_ = 0;
  bool held_ = false;
  size_t ended_ = 0;
  absl::Status result_;
  std::vector<uint64_t> began_;  // bytes written when each sync began
};

struct Fixture {
  FakeSync sync;
  std::vector<absl::Status> failures;  // only the SyncAhead thread adds, before Stop returns
  SyncAhead ahead{kThreshold, [this] { return sync(); },
                  [this](const absl::Status& status) { failures.push_back(status); }};
};

TEST(SyncAheadTest, BeginsOnlyOnceTheThresholdIsWritten) {
  Fixture f;
  for (int i = 0; i < 63; ++i) f.sync.Write(f.ahead, 1u << 20);
  f.sync.Write(f.ahead, (1u << 20) - 1);
  f.sync.Write(f.ahead, 1);  // 64 MiB now
  ASSERT_TRUE(f.sync.AwaitEnded(1));
  f.ahead.Stop();
  // The sync began after the write that reached the threshold, not before.
  EXPECT_EQ(f.sync.began(), std::vector<uint64_t>{kThreshold});
  EXPECT_EQ(f.ahead.syncs(), 1u);
  EXPECT_TRUE(f.failures.empty());
}

TEST(SyncAheadTest, OneLargeWriteAcrossTheThresholdBeginsOneSync) {
  Fixture f;
  f.sync.Write(f.ahead, 3 * kThreshold);
  ASSERT_TRUE(f.sync.AwaitEnded(1));
  f.ahead.Stop();
  EXPECT_EQ(f.ahead.syncs(), 1u);
}

TEST(SyncAheadTest, WritesDuringASyncCountForTheNextWhichFollowsAtOnce) {
  Fixture f;
  f.sync.Hold();
  f.sync.Write(f.ahead, kThreshold);
  ASSERT_TRUE(f.sync.AwaitBegun(1));
  // The first sync is held at its start: these come while it runs. They
  // reach the threshold twice over, which asks for one more sync, not two.
  f.sync.Write(f.ahead, kThreshold - 1);
  f.sync.Write(f.ahead, 1);
  f.sync.Write(f.ahead, 2 * kThreshold);
  f.sync.Release();
  ASSERT_TRUE(f.sync.AwaitEnded(2));
  f.ahead.Stop();
  EXPECT_EQ(f.sync.began(), (std::vector<uint64_t>{kThreshold, 4 * kThreshold}));
  EXPECT_EQ(f.ahead.syncs(), 2u);
}

TEST(SyncAheadTest, WritesBelowTheThresholdDuringASyncWaitForMore) {
  Fixture f;
  f.sync.Hold();
  f.sync.Write(f.ahead, kThreshold);
  ASSERT_TRUE(f.sync.AwaitBegun(1));
  f.sync.Write(f.ahead, kThreshold - 4096);  // counts from the sync's start
  f.sync.Release();
  ASSERT_TRUE(f.sync.AwaitEnded(1));
  f.sync.Write(f.ahead, 4096);  // now the next sync is due
  ASSERT_TRUE(f.sync.AwaitEnded(2));
  f.ahead.Stop();
  EXPECT_EQ(f.sync.began(), (std::vector<uint64_t>{kThreshold, 2 * kThreshold}));
}

TEST(SyncAheadTest, AFailedSyncIsReportedOnceAndEndsTheSyncing) {
  Fixture f;
  f.sync.FailWith(absl::DataLossError("fdatasync of disk.qcow2 failed: Input/output error"));
  f.sync.Write(f.ahead, kThreshold);
  ASSERT_TRUE(f.sync.AwaitEnded(1));
  // Twice more across the threshold: no sync follows a failure.
  f.sync.Write(f.ahead, kThreshold);
  f.sync.Write(f.ahead, kThreshold);
  f.ahead.Stop();
  EXPECT_EQ(f.ahead.syncs(), 1u);
  ASSERT_EQ(f.failures.size(), 1u);
  EXPECT_EQ(f.failures[0].code(), absl::StatusCode::kDataLoss);
}

TEST(SyncAheadTest, StopWaitsForTheSyncInProgress) {
  Fixture f;
  f.sync.Hold();
  f.sync.Write(f.ahead, kThreshold);
  ASSERT_TRUE(f.sync.AwaitBegun(1));
  std::future<void> stopped = std::async(std::launch::async, [&] { f.ahead.Stop(); });
  EXPECT_EQ(stopped.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout);
  f.sync.Release();
  stopped.get();
  EXPECT_TRUE(f.sync.AwaitEnded(1));
  // Writes after the stop only count.
  f.sync.Write(f.ahead, 2 * kThreshold);
  EXPECT_EQ(f.ahead.syncs(), 1u);
}

}  // namespace
}  // namespace qcow2fuse
