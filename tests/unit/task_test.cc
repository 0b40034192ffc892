// Task<T>, SyncWait and Scheduler: laziness, results, nesting, and that
// spawned tasks run on the scheduler's thread and are all drained.

#include <atomic>
#include <chrono>
#include <optional>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "qcow2fuse/scheduler.h"
#include "qcow2fuse/task.h"
#include "sched/latch.h"
#include "sched/range_lock.h"

namespace qcow2fuse {
namespace {

Task<int> Value(int v) { co_return v; }

Task<int> Sum(int a, int b) {
  int x = co_await Value(a);
  int y = co_await Value(b);
  co_return x + y;
}

Task<void> SetFlag(bool* flag) {
  *flag = true;
  co_return;
}

TEST(TaskTest, ReturnsValue) { EXPECT_EQ(SyncWait(Value(42)), 42); }

TEST(TaskTest, AwaitsNestedTasks) { EXPECT_EQ(SyncWait(Sum(40, 2)), 42); }

TEST(TaskTest, IsLazy) {
  bool ran = false;
  {
    Task<void> t = SetFlag(&ran);
    EXPECT_FALSE(ran);  // created, never awaited
  }
  EXPECT_FALSE(ran);  // destroyed unawaited: frame freed, body never ran
  SyncWait(SetFlag(&ran));
  EXPECT_TRUE(ran);
}

// A loop awaiting many tasks that finish without suspending must not grow
// the stack, at any optimisation level (this file is built at -O0, see
// CMakeLists.txt).
Task<int> SumOfOnes(int n) {
  int sum = 0;
  for (int i = 0; i < n; ++i) sum += co_await Value(1);
  co_return sum;
}

TEST(TaskTest, LongLoopOfAwaitsUsesBoundedStack) { EXPECT_EQ(SyncWait(SumOfOnes(1000000)), 1000000); }

// A task that really suspends, resumed from another thread, still hands its
// result to the awaiter.
Task<int> ValueAfterHop(Scheduler* scheduler, int v) {
  co_await scheduler->Schedule();
  co_return v;
}

Task<int> SumAcrossHops(Scheduler* scheduler, int n) {
  int sum = 0;
  for (int i = 0; i < n; ++i) sum += co_await ValueAfterHop(scheduler, 1);
  co_return sum;
}

TEST(TaskTest, AwaitsTasksThatSuspend) {
  Scheduler scheduler(2);
  EXPECT_EQ(SyncWait(SumAcrossHops(&scheduler, 1000)), 1000);
}

TEST(TaskTest, MoveOnlyResult) {
  auto make = []() -> Task<std::unique_ptr<int>> { co_return std::make_unique<int>(7); };
  std::unique_ptr<int> p = SyncWait(make());
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p, 7);
}

Task<void> RecordThread(std::thread::id* where, std::atomic<int>* done) {
  *where = std::this_thread::get_id();
  done->fetch_add(1);
  co_return;
}

TEST(SchedulerTest, SpawnedTasksRunOnSchedulerThreadAndDrain) {
  std::atomic<int> done{0};
  std::vector<std::thread::id> where(100);
  {
    Scheduler scheduler(1);
    for (auto& w : where) scheduler.Spawn(RecordThread(&w, &done));
    scheduler.Drain();
    EXPECT_EQ(done.load(), 100);
  }
  for (const auto& w : where) {
    EXPECT_NE(w, std::this_thread::get_id());
    EXPECT_EQ(w, where[0]);  // one thread does all the work
  }
}

Task<int> HopAndAdd(Scheduler* scheduler, int v, std::thread::id* where) {
  co_await scheduler->Schedule();
  *where = std::this_thread::get_id();
  co_return v + 1;
}

TEST(SchedulerTest, ScheduleMovesCoroutineToSchedulerThread) {
  Scheduler scheduler(1);
  std::thread::id where;
  // SyncWait blocks this thread while the scheduler thread finishes the task.
  EXPECT_EQ(SyncWait(HopAndAdd(&scheduler, 1, &where)), 2);
  EXPECT_NE(where, std::this_thread::get_id());
}

Task<void> HopAndTell(Scheduler* scheduler, bool* before, bool* after) {
  *before = Scheduler::OnOwnThread();
  co_await scheduler->Schedule();
  *after = Scheduler::OnOwnThread();
}

// OnOwnThread tells a scheduler's threads from the threads that start or
// wait for its tasks.
TEST(SchedulerTest, OnOwnThreadIsTrueOnlyOnASchedulersThreads) {
  EXPECT_FALSE(Scheduler::OnOwnThread());
  Scheduler scheduler(1);
  bool before = true;
  bool after = false;
  SyncWait(HopAndTell(&scheduler, &before, &after));
  EXPECT_FALSE(before);
  EXPECT_TRUE(after);
  EXPECT_FALSE(Scheduler::OnOwnThread());
}

Task<void> Count(std::atomic<int>* done) {
  done->fetch_add(1);
  co_return;
}

TEST(SchedulerTest, DestructorDrainsSpawnedTasks) {
  std::atomic<int> done{0};
  {
    Scheduler scheduler(2);
    for (int i = 0; i < 50; ++i) scheduler.Spawn(Count(&done));
  }
  EXPECT_EQ(done.load(), 50);
}

// Waits on `lock` (so it can suspend mid-task), then records its thread.
Task<void> LockAndRecord(AsyncMutex* lock, std::thread::id* where, std::atomic<int>* done) {
  RangeLock::Guard guard = co_await lock->Lock();
  *where = std::this_thread::get_id();
  done->fetch_add(1);
}

TEST(SchedulerTest, StartRunsOnTheCallingThreadAndIsCountedUntilDone) {
  Scheduler scheduler(0);  // no threads of its own: every task is started
  AsyncMutex lock;
  std::atomic<int> done{0};
  std::thread::id first, second;
  {
    // Hold the lock: the second task suspends inside Start() and is still
    // counted when Start() returns.
    std::optional<RangeLock::Guard> held;
    held.emplace(SyncWait([](AsyncMutex* m) -> Task<RangeLock::Guard> { co_return co_await m->Lock(); }(&lock)));
    scheduler.Start(LockAndRecord(&lock, &second, &done));
    EXPECT_EQ(done.load(), 0);
    EXPECT_EQ(scheduler.in_flight(), 1u);
    // Releasing the lock here resumes the task on this thread.
    held.reset();
  }
  EXPECT_EQ(done.load(), 1);
  EXPECT_EQ(second, std::this_thread::get_id());
  EXPECT_EQ(scheduler.in_flight(), 0u);
  // A task that never waits is done when Start() returns.
  scheduler.Start(LockAndRecord(&lock, &first, &done));
  EXPECT_EQ(done.load(), 2);
  EXPECT_EQ(first, std::this_thread::get_id());
  scheduler.Drain();
}

Task<void> ArriveAfterCount(std::atomic<int>* done, Latch* latch) {
  done->fetch_add(1);
  latch->Arrive();
  co_return;
}

Task<int> WaitForJobs(Scheduler* pool, int jobs, std::atomic<int>* done) {
  Latch latch(jobs);
  for (int i = 0; i < jobs; ++i) pool->Spawn(ArriveAfterCount(done, &latch));
  co_await latch.Wait();
  co_return done->load();
}

TEST(LatchTest, WaiterGoesOnOnceEveryJobHasArrived) {
  Scheduler pool(2);
  for (int round = 0; round < 200; ++round) {
    std::atomic<int> done{0};
    EXPECT_EQ(SyncWait(WaitForJobs(&pool, 8, &done)), 8);
  }
}

Task<bool> WaitAfterAllArrived() {
  Latch latch(2);
  latch.Arrive();
  latch.Arrive();
  co_await latch.Wait();  // must not suspend: nobody is left to resume it
  co_return true;
}

TEST(LatchTest, WaitAfterEveryArrivalDoesNotSuspend) { EXPECT_TRUE(SyncWait(WaitAfterAllArrived())); }

TEST(SchedulerTest, RunWaitsForATaskThatSuspends) {
  Scheduler scheduler(0);
  AsyncMutex lock;
  std::atomic<int> done{0};
  std::thread::id where;
  std::optional<RangeLock::Guard> held;
  held.emplace(SyncWait([](AsyncMutex* m) -> Task<RangeLock::Guard> { co_return co_await m->Lock(); }(&lock)));
  // Another thread lets go of the lock a little later; Run() must not
  // return before the task it runs has finished.
  std::thread releaser([&] {
    while (scheduler.in_flight() == 0) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    held.reset();
  });
  scheduler.Run(LockAndRecord(&lock, &where, &done));
  EXPECT_EQ(done.load(), 1);
  EXPECT_EQ(scheduler.in_flight(), 0u);
  EXPECT_EQ(where, releaser.get_id()) << "resumed by the thread that released the lock";
  releaser.join();
}

}  // namespace
}  // namespace qcow2fuse
