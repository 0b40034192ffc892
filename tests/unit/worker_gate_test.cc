// WorkerGate (fuse/worker_gate.h): which worker parks when, and what wakes
// it. Each "worker" is a thread of its own that runs the steps the test
// posts to it, one after another, as a libfuse worker runs callbacks.

#include "worker_gate.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

#include "gtest/gtest.h"

namespace qcow2fuse {
namespace {

using std::chrono::milliseconds;

// Long enough that no worker in these tests returns by itself unless the
// test waits for that.
constexpr milliseconds kForever{60'000};

class Worker {
 public:
  Worker() : thread_([this] { Loop(); }) {}
  ~Worker() {
    Post([this] { done_ = true; });
    thread_.join();
  }

  // Runs `step` on this worker; the future is ready once it has returned.
  std::future<void> Post(std::function<void()> step) {
    std::packaged_task<void()> task(std::move(step));
    std::future<void> done = task.get_future();
    {
      std::lock_guard lock(mu_);
      steps_.push_back(std::move(task));
    }
    cv_.notify_one();
    return done;
  }
  void Do(std::function<void()> step) { Post(std::move(step)).get(); }

 private:
  void Loop() {
    while (!done_) {
      std::packaged_task<void()> step;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [this] { return !steps_.empty(); });
        step = std::move(steps_.front());
        steps_.pop_front();
      }
      step();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<void()>> steps_;
  bool done_ = false;  // read and written on the worker's thread only
  std::thread thread_;
};

// Waits until `gate` has `n` workers parked (a parking thread gets there
// on its own time); false if it never does.
bool ParkedReaches(WorkerGate& gate, int n) {
  for (int i = 0; i < 10'000; ++i) {
    if (gate.parked() == n) return true;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return false;
}

// `worker` makes a call that sleeps, and is back from it.
void Sleeps(Worker& worker, WorkerGate& gate) {
  worker.Do([&] {
    gate.WillBlock();
    gate.DoneBlocking();
  });
}

bool Returned(std::future<void>& f) { return f.wait_for(milliseconds(0)) == std::future_status::ready; }

TEST(WorkerGateTest, AWorkerParksOnlyWhileEnoughOthersAreAtWork) {
  WorkerGate gate(/*active=*/2, kForever);
  Worker a, b, c;
  a.Do([&] { gate.Leave(); });  // alone: back to work at once
  b.Do([&] { gate.Leave(); });  // one other at work, two wanted
  EXPECT_EQ(gate.parks(), 0);
  std::future<void> c_left = c.Post([&] { gate.Leave(); });  // a and b at work: parks
  ASSERT_TRUE(ParkedReaches(gate, 1));
  EXPECT_FALSE(Returned(c_left));
  EXPECT_EQ(gate.parks(), 1);
  Sleeps(a, gate);  // only b would be left at work: c is woken
  c_left.get();
  EXPECT_EQ(gate.parked(), 0);
}

TEST(WorkerGateTest, ACallThatSleepsWakesOneWorkerOnlyWhenFewerThanActiveAreLeft) {
  WorkerGate gate(/*active=*/1, kForever);
  Worker a, b, c;
  a.Do([&] { gate.Leave(); });
  std::future<void> b_left = b.Post([&] { gate.Leave(); });
  ASSERT_TRUE(ParkedReaches(gate, 1));
  std::future<void> c_left = c.Post([&] { gate.Leave(); });
  ASSERT_TRUE(ParkedReaches(gate, 2));
  // a sleeps: nobody would be at work, so one parked worker is woken.
  a.Do([&] { gate.WillBlock(); });
  EXPECT_TRUE(ParkedReaches(gate, 1));
  // While a still sleeps, the woken worker is at work: a second call that
  // sleeps (another thread's, nested on a's) wakes nobody.
  Sleeps(a, gate);
  EXPECT_EQ(gate.parked(), 1);
  a.Do([&] { gate.DoneBlocking(); });
  // Exactly one of b and c returned.
  for (int i = 0; i < 1000 && !(Returned(b_left) || Returned(c_left)); ++i) std::this_thread::sleep_for(milliseconds(1));
  EXPECT_NE(Returned(b_left), Returned(c_left));
  // The other goes when the next call sleeps with nobody else at work:
  // the woken worker sleeps, and so does a.
  std::future<void>& still = Returned(b_left) ? c_left : b_left;
  Worker& woken = Returned(b_left) ? b : c;
  woken.Do([&] { gate.WillBlock(); });
  a.Do([&] { gate.WillBlock(); });
  still.get();
  woken.Do([&] { gate.DoneBlocking(); });
  a.Do([&] { gate.DoneBlocking(); });
}

TEST(WorkerGateTest, AWorkerWhoseRequestSleptGoesBackToWork) {
  WorkerGate gate(/*active=*/1, kForever);
  Worker a, b;
  a.Do([&] { gate.Leave(); });
  Sleeps(b, gate);  // not counted yet: b has never left the gate
  std::future<void> b_left = b.Post([&] { gate.Leave(); });
  ASSERT_TRUE(ParkedReaches(gate, 1));
  Sleeps(a, gate);
  b_left.get();
  // a's request slept: a does not park, though b is at work.
  a.Do([&] { gate.Leave(); });
  EXPECT_EQ(gate.parks(), 1);
  // Its next request, answered from memory, parks it.
  std::future<void> a_left = a.Post([&] { gate.Leave(); });
  ASSERT_TRUE(ParkedReaches(gate, 1));
  EXPECT_EQ(gate.parks(), 2);
  Sleeps(b, gate);
  a_left.get();
}

TEST(WorkerGateTest, NoWorkerParksWhileAnotherSleeps) {
  WorkerGate gate(/*active=*/1, kForever);
  Worker a, b, c;
  a.Do([&] { gate.Leave(); });
  std::future<void> b_left = b.Post([&] { gate.Leave(); });  // parks: a is at work...
  ASSERT_TRUE(ParkedReaches(gate, 1));
  a.Do([&] { gate.WillBlock(); });  // ... and is woken when a sleeps
  b_left.get();
  // With a asleep, the disk is busy: neither b nor c parks.
  b.Do([&] { gate.Leave(); });
  c.Do([&] { gate.Leave(); });
  EXPECT_EQ(gate.parks(), 1);
  a.Do([&] { gate.DoneBlocking(); });
}

TEST(WorkerGateTest, AParkedWorkerGoesBackByItself) {
  WorkerGate gate(/*active=*/1, milliseconds(20));
  Worker a, b;
  a.Do([&] { gate.Leave(); });
  b.Do([&] { gate.Leave(); });  // parks, and returns without a wake-up
  EXPECT_EQ(gate.parks(), 1);
  EXPECT_EQ(gate.parked(), 0);
  // Counted right afterwards: the next park and wake-up work as before.
  std::future<void> b_left = b.Post([&] { gate.Leave(); });
  ASSERT_TRUE(ParkedReaches(gate, 1));
  Sleeps(a, gate);
  b_left.get();
  EXPECT_EQ(gate.parks(), 2);
}

TEST(WorkerGateTest, CallsOfThreadsThatNeverLeftAreNotCounted) {
  WorkerGate gate(/*active=*/1, kForever);
  Worker a, b, other;
  a.Do([&] { gate.Leave(); });
  std::future<void> b_left = b.Post([&] { gate.Leave(); });
  ASSERT_TRUE(ParkedReaches(gate, 1));
  // An engine thread, a ring thread: its sleep wakes nobody.
  other.Do([&] { gate.WillBlock(); });
  EXPECT_EQ(gate.parked(), 1);
  EXPECT_FALSE(Returned(b_left));
  other.Do([&] { gate.DoneBlocking(); });
  Sleeps(a, gate);
  b_left.get();
}

// The observer the engine announces to (qcow2fuse/blocking.h).
TEST(WorkerGateTest, ScopedBlockingCallsReachTheInstalledGate) {
  WorkerGate gate(/*active=*/1, kForever);
  SetBlockingObserver(&gate);
  Worker a, b;
  a.Do([&] { gate.Leave(); });
  std::future<void> b_left = b.Post([&] { gate.Leave(); });
  ASSERT_TRUE(ParkedReaches(gate, 1));
  EXPECT_TRUE(ScopedBlockingCall::Observed());
  a.Do([] { ScopedBlockingCall sleeping; });
  b_left.get();
  SetBlockingObserver(nullptr);
  EXPECT_FALSE(ScopedBlockingCall::Observed());
}

}  // namespace
}  // namespace qcow2fuse
