// RecordingFile and CrashStates: what gets logged and where a flush lands in
// the log, the exact states of small logs (no barrier, one barrier, writes
// after the last barrier, discards and truncates), that random subsets never
// cross a barrier, the bounds, and that a seed reproduces its states.

#include "io/recording_file.h"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "../support/seed.h"
#include "../support/status_testing.h"  // ASSERT_OK, ASSERT_OK_AND_ASSIGN
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {
namespace {

using Bytes = std::vector<uint8_t>;
using Kind = FileOp::Kind;

FileOp Write(uint64_t offset, Bytes data) {
  const uint64_t length = data.size();
  return FileOp{.kind = Kind::kWrite, .offset = offset, .length = length, .data = std::move(data)};
}
FileOp Flush() { return FileOp{.kind = Kind::kFlush}; }
FileOp Discard(uint64_t offset, uint64_t length) {
  return FileOp{.kind = Kind::kDiscard, .offset = offset, .length = length};
}
FileOp Truncate(uint64_t size) { return FileOp{.kind = Kind::kTruncate, .offset = size}; }

// Tests that need to tell writes apart give each its own block and value.
constexpr size_t kBlock = 16;
FileOp WriteBlock(size_t block, uint8_t value) { return Write(block * kBlock, Bytes(kBlock, value)); }

// `initial` with the log entries at `indices` applied in that order.
Bytes Apply(Bytes contents, const std::vector<FileOp>& log, const std::vector<size_t>& indices) {
  for (size_t i : indices) ApplyFileOp(log[i], true, &contents);
  return contents;
}

struct State {
  Bytes contents;
  std::string description;
  size_t barrier;
  std::vector<size_t> applied;
};

std::vector<State> AllStates(const Bytes& initial, const std::vector<FileOp>& log,
                             CrashStateOptions options) {
  CrashStates states(initial, log, options);
  std::vector<State> all;
  State s;
  while (states.Next(&s.contents, &s.description)) {
    s.barrier = states.barrier();
    s.applied = states.unflushed_applied();
    all.push_back(s);
  }
  EXPECT_EQ(states.states_yielded(), all.size());
  return all;
}

using test::TestSeed;

// A memory file whose operations can be made to fail, and whose Flush can
// run a hook while it is in flight.
class ControlledFile final : public BlockFile {
 public:
  ControlledFile() : inner_(NewMemFile("controlled.img", Bytes(64, 0))) {}

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override {
    return inner_->Read(offset, out);
  }
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override {
    if (fail) co_return absl::UnavailableError("injected write failure");
    co_return co_await inner_->Write(offset, data);
  }
  Task<absl::Status> Flush() override {
    if (during_flush) during_flush();
    if (fail) co_return absl::UnavailableError("injected flush failure");
    co_return co_await inner_->Flush();
  }
  Task<absl::Status> Discard(uint64_t offset, uint64_t length) override {
    if (fail) co_return absl::UnavailableError("injected discard failure");
    co_return co_await inner_->Discard(offset, length);
  }
  Task<absl::Status> Truncate(uint64_t size) override {
    if (fail) co_return absl::UnavailableError("injected truncate failure");
    co_return co_await inner_->Truncate(size);
  }
  uint64_t size() const override { return inner_->size(); }
  bool writable() const override { return true; }
  const std::string& name() const override { return inner_->name(); }

  bool fail = false;
  std::function<void()> during_flush;

 private:
  std::unique_ptr<BlockFile> inner_;
};

// --- RecordingFile ------------------------------------------------------------

TEST(CrashReplayTest, RecordsOperationsInOrder) {
  RecordingFile rec(NewMemFile("rec.img", Bytes(100, 0xaa)));
  EXPECT_EQ(rec.name(), "rec.img");
  EXPECT_TRUE(rec.writable());
  EXPECT_EQ(rec.fd(), -1);

  const Bytes data = {1, 2, 3};
  ASSERT_OK(SyncWait(rec.Write(10, data)));
  ASSERT_OK(SyncWait(rec.Flush()));
  ASSERT_OK(SyncWait(rec.Discard(0, 5)));
  ASSERT_OK(SyncWait(rec.Truncate(50)));
  ASSERT_OK(SyncWait(rec.Write(60, Bytes{9})));
  Bytes read(3);
  ASSERT_OK(SyncWait(rec.Read(10, read)));  // reads are forwarded, not logged
  EXPECT_EQ(read, data);
  EXPECT_EQ(rec.size(), 61u);

  std::vector<FileOp> log = rec.log();
  ASSERT_EQ(log.size(), 5u);
  std::vector<std::string> described;
  for (const FileOp& op : log) described.push_back(op.ToString());
  EXPECT_EQ(described, (std::vector<std::string>{"write [10, +3)", "flush", "discard [0, +5)",
                                                 "truncate to 50", "write [60, +1)"}));
  EXPECT_EQ(log[0].data, data);
  EXPECT_EQ(log[0].length, 3u);
  EXPECT_EQ(log[2].length, 5u);
  EXPECT_EQ(log[4].data, Bytes{9});

  // Replaying the log onto the initial contents gives the inner file.
  ASSERT_OK_AND_ASSIGN(Bytes inner, MemFileContents(rec.inner()));
  EXPECT_EQ(Apply(Bytes(100, 0xaa), log, {0, 1, 2, 3, 4}), inner);

  rec.ClearLog();
  EXPECT_TRUE(rec.log().empty());
}

TEST(CrashReplayTest, FailedOperationsAreNotLogged) {
  auto controlled = std::make_unique<ControlledFile>();
  ControlledFile* file = controlled.get();
  RecordingFile rec(std::move(controlled));

  file->fail = true;
  EXPECT_FALSE(SyncWait(rec.Write(0, Bytes{1})).ok());
  EXPECT_FALSE(SyncWait(rec.Flush()).ok());
  EXPECT_FALSE(SyncWait(rec.Discard(0, 8)).ok());
  EXPECT_FALSE(SyncWait(rec.Truncate(8)).ok());
  EXPECT_TRUE(rec.log().empty());

  file->fail = false;
  ASSERT_OK(SyncWait(rec.Write(0, Bytes{1})));
  ASSERT_OK(SyncWait(rec.Flush()));
  std::vector<FileOp> log = rec.log();
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[0].kind, Kind::kWrite);
  EXPECT_EQ(log[1].kind, Kind::kFlush);
}

TEST(CrashReplayTest, FlushCoversOnlyWhatCompletedBeforeIt) {
  auto controlled = std::make_unique<ControlledFile>();
  ControlledFile* file = controlled.get();
  RecordingFile rec(std::move(controlled));

  ASSERT_OK(SyncWait(rec.Write(0, Bytes{1})));
  // A write that completes while the flush is in flight.
  file->during_flush = [&] { EXPECT_OK(SyncWait(rec.Write(1, Bytes{2}))); };
  ASSERT_OK(SyncWait(rec.Flush()));
  std::vector<FileOp> log = rec.log();
  ASSERT_EQ(log.size(), 3u);
  EXPECT_EQ(log[0].ToString(), "write [0, +1)");
  EXPECT_EQ(log[1].kind, Kind::kFlush);
  EXPECT_EQ(log[2].ToString(), "write [1, +1)");  // after the barrier: not covered

  // And a flush that fails with a write in flight leaves only the write.
  rec.ClearLog();
  file->during_flush = [&] {
    EXPECT_OK(SyncWait(rec.Write(2, Bytes{3})));
    file->fail = true;
  };
  EXPECT_FALSE(SyncWait(rec.Flush()).ok());
  log = rec.log();
  ASSERT_EQ(log.size(), 1u);
  EXPECT_EQ(log[0].ToString(), "write [2, +1)");
}

TEST(CrashReplayTest, ForwardsToPosixFile) {
  // The wrapper must not hide what the engine needs from a real file.
  std::string path = ::testing::TempDir();
  if (path.back() != '/') path += '/';
  path += "crash_replay_test." + std::to_string(getpid());
  FILE* f = fopen(path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  fclose(f);
  absl::StatusOr<std::unique_ptr<BlockFile>> posix = OpenPosixFile(path, true);
  ASSERT_OK(posix);
  const int fd = (*posix)->fd();
  RecordingFile rec(std::move(*posix));
  EXPECT_EQ(rec.fd(), fd);
  EXPECT_EQ(rec.name(), path);
  EXPECT_TRUE(rec.writable());
  ASSERT_OK(SyncWait(rec.Write(4096, Bytes(10, 1))));
  ASSERT_OK(SyncWait(rec.Flush()));
  EXPECT_EQ(rec.size(), 4106u);
  ASSERT_OK_AND_ASSIGN(uint64_t data, rec.NextData(0));
  EXPECT_LE(data, 4096u);
  EXPECT_EQ(rec.log().size(), 2u);
  unlink(path.c_str());
}

// --- CrashStates: exact states of small logs ----------------------------------

TEST(CrashReplayTest, EmptyLogHasOnlyTheInitialState) {
  for (const std::vector<FileOp>& log : {std::vector<FileOp>{}, {Flush(), Flush()}}) {
    std::vector<State> states = AllStates(Bytes(32, 5), log, {});
    ASSERT_EQ(states.size(), 1u);
    EXPECT_EQ(states[0].contents, Bytes(32, 5));
    EXPECT_EQ(states[0].barrier, 0u);
    EXPECT_TRUE(absl::StrContains(states[0].description, "barrier 0")) << states[0].description;
  }
}

TEST(CrashReplayTest, NoBarrierGivesEveryPrefix) {
  const std::vector<FileOp> log = {WriteBlock(0, 1), WriteBlock(1, 2), WriteBlock(2, 3)};
  const Bytes initial(3 * kBlock, 0);
  std::vector<State> states = AllStates(initial, log, {.random_subsets = 0});
  ASSERT_EQ(states.size(), 4u);
  const std::vector<std::vector<size_t>> expected = {{}, {0}, {0, 1}, {0, 1, 2}};
  for (size_t i = 0; i < states.size(); ++i) {
    SCOPED_TRACE(states[i].description);
    EXPECT_EQ(states[i].barrier, 0u);
    EXPECT_EQ(states[i].applied, expected[i]);
    EXPECT_EQ(states[i].contents, Apply(initial, log, expected[i]));
    EXPECT_TRUE(absl::StrContains(states[i].description, "barrier 0"));
  }
}

TEST(CrashReplayTest, OneBarrier) {
  const std::vector<FileOp> log = {WriteBlock(0, 1), WriteBlock(1, 2), Flush(), WriteBlock(2, 3),
                                   WriteBlock(3, 4)};
  const Bytes initial(4 * kBlock, 0);
  std::vector<State> states = AllStates(initial, log, {.random_subsets = 0});
  // The whole first segment is barrier 1's state, so it is not a prefix too.
  struct Expected {
    size_t barrier;
    std::vector<size_t> applied;
    std::vector<size_t> all;
  };
  const std::vector<Expected> expected = {
      {0, {}, {}}, {0, {0}, {0}}, {1, {}, {0, 1}}, {1, {3}, {0, 1, 3}}, {1, {3, 4}, {0, 1, 3, 4}}};
  ASSERT_EQ(states.size(), expected.size());
  for (size_t i = 0; i < states.size(); ++i) {
    SCOPED_TRACE(states[i].description);
    EXPECT_EQ(states[i].barrier, expected[i].barrier);
    EXPECT_EQ(states[i].applied, expected[i].applied);
    EXPECT_EQ(states[i].contents, Apply(initial, log, expected[i].all));
  }
  EXPECT_TRUE(absl::StrContains(states[2].description, "barrier 1")) << states[2].description;
}

TEST(CrashReplayTest, WritesAfterTheLastBarrier) {
  const std::vector<FileOp> log = {WriteBlock(0, 1), Flush(), WriteBlock(1, 2), WriteBlock(2, 3)};
  const Bytes initial(3 * kBlock, 0);
  std::vector<State> states = AllStates(initial, log, {.seed = 1, .random_subsets = 16});
  // initial; barrier 1; prefixes {2}, {2,3}; the only other orderings of
  // the unflushed pair, {3} and {3,2}, as random subsets.
  std::set<std::vector<size_t>> after_barrier;
  ASSERT_EQ(states.size(), 6u);
  EXPECT_EQ(states[0].contents, initial);
  for (size_t i = 1; i < states.size(); ++i) {
    SCOPED_TRACE(states[i].description);
    EXPECT_EQ(states[i].barrier, 1u);
    EXPECT_EQ(states[i].contents, Apply(Apply(initial, log, {0}), log, states[i].applied));
    after_barrier.insert(states[i].applied);
  }
  EXPECT_EQ(after_barrier,
            (std::set<std::vector<size_t>>{{}, {2}, {2, 3}, {3}, {3, 2}}));
  // The file as it was when the log was taken is among them.
  EXPECT_EQ(states[3].contents, Apply(initial, log, {0, 2, 3}));
}

TEST(CrashReplayTest, LogEndingInABarrierRepeatsNoState) {
  const std::vector<FileOp> log = {WriteBlock(0, 1), WriteBlock(1, 2), Flush()};
  std::vector<State> states = AllStates(Bytes(2 * kBlock, 0), log, {.random_subsets = 0});
  ASSERT_EQ(states.size(), 3u);  // initial, first write, barrier 1
  std::set<Bytes> distinct;
  for (const State& s : states) distinct.insert(s.contents);
  EXPECT_EQ(distinct.size(), 3u);
  EXPECT_EQ(states.back().contents, Apply(Bytes(2 * kBlock, 0), log, {0, 1}));
}

TEST(CrashReplayTest, OverlappingUnflushedWritesMayLandInEitherOrder) {
  const std::vector<FileOp> log = {Write(0, Bytes(16, 1)), Write(8, Bytes(16, 2))};
  std::vector<State> states = AllStates(Bytes(24, 0), log, {.seed = 7, .random_subsets = 16});
  ASSERT_EQ(states.size(), 5u);  // {}, {0}, {0,1}, and at random {1}, {1,0}
  bool saw_reversed = false;
  for (const State& s : states) {
    if (s.applied == std::vector<size_t>{1, 0}) {
      saw_reversed = true;
      // The older write's bytes on top where they overlap.
      Bytes expected(24, 1);
      std::fill(expected.begin() + 16, expected.end(), 2);
      EXPECT_EQ(s.contents, expected) << s.description;
    }
  }
  EXPECT_TRUE(saw_reversed);
}

TEST(CrashReplayTest, DiscardsAndTruncates) {
  Bytes initial(8192);
  for (size_t i = 0; i < initial.size(); ++i) initial[i] = 1 + i % 251;
  const std::vector<FileOp> log = {Discard(0, 4096), Flush(), Truncate(2048),
                                   Write(3000, Bytes(10, 7))};

  std::vector<State> states = AllStates(initial, log, {.seed = 3, .random_subsets = 16});
  // initial; barrier 1; prefixes {T}, {T, W}; at random {W}, {W, T}.
  ASSERT_EQ(states.size(), 6u);
  std::vector<uint64_t> sizes;
  for (size_t i = 0; i < 4; ++i) sizes.push_back(states[i].contents.size());
  EXPECT_EQ(sizes, (std::vector<uint64_t>{8192, 8192, 2048, 3010}));
  Bytes discarded = initial;
  std::fill_n(discarded.begin(), 4096, 0);
  EXPECT_EQ(states[1].contents, discarded);
  Bytes grown(3010, 0);
  std::fill_n(grown.begin() + 3000, 10, 7);
  EXPECT_EQ(states[3].contents, grown);  // the truncated tail does not come back
  // The random ones, in whichever order the seed gave them.
  for (size_t i = 4; i < 6; ++i) {
    SCOPED_TRACE(states[i].description);
    if (states[i].applied == std::vector<size_t>{3}) {
      Bytes written = discarded;
      std::fill_n(written.begin() + 3000, 10, 7);
      EXPECT_EQ(states[i].contents, written);
    } else {
      EXPECT_EQ(states[i].applied, (std::vector<size_t>{3, 2}));
      EXPECT_EQ(states[i].contents, Bytes(2048, 0));  // written, then cut off
    }
  }

  // A filesystem that cannot punch keeps the discarded bytes.
  std::vector<State> kept =
      AllStates(initial, log, {.seed = 3, .random_subsets = 0, .discard_zeroes = false});
  ASSERT_GE(kept.size(), 2u);
  EXPECT_EQ(kept[1].contents, initial);
}

// --- CrashStates: random subsets ------------------------------------------------

// 3 segments of 6 writes, each to its own block with its own value, so a
// state tells exactly which writes it holds.
struct BlockLog {
  static constexpr size_t kSegments = 3;
  static constexpr size_t kPerSegment = 6;
  std::vector<FileOp> log;
  std::vector<size_t> block_of_entry;  // log index -> block, or SIZE_MAX
  BlockLog() {
    for (size_t seg = 0; seg < kSegments; ++seg) {
      if (seg > 0) {
        log.push_back(Flush());
        block_of_entry.push_back(SIZE_MAX);
      }
      for (size_t i = 0; i < kPerSegment; ++i) {
        const size_t block = seg * kPerSegment + i;
        log.push_back(WriteBlock(block, static_cast<uint8_t>(block + 1)));
        block_of_entry.push_back(block);
      }
    }
  }
  static Bytes Initial() { return Bytes(kSegments * kPerSegment * kBlock, 0); }
};

TEST(CrashReplayTest, SubsetsRespectBarriers) {
  const uint64_t seed = TestSeed();
  BlockLog b;
  constexpr size_t kRandom = 40;
  std::vector<State> states =
      AllStates(BlockLog::Initial(), b.log, {.seed = seed, .random_subsets = kRandom});
  // 3 barrier states, prefixes 5 + 5 + 6, and kRandom subsets per segment
  // (6 writes have 1956 ordered subsets, enough for 40 new ones).
  EXPECT_EQ(states.size(), 3 + 16 + 3 * kRandom);

  bool saw_gap = false;  // a later write on disk, an earlier one of its segment not
  for (const State& s : states) {
    SCOPED_TRACE(s.description);
    std::set<size_t> present;
    for (size_t block = 0; block < BlockLog::kSegments * BlockLog::kPerSegment; ++block) {
      const Bytes got(s.contents.begin() + block * kBlock, s.contents.begin() + (block + 1) * kBlock);
      if (got == Bytes(kBlock, static_cast<uint8_t>(block + 1))) {
        present.insert(block);
      } else {
        ASSERT_EQ(got, Bytes(kBlock, 0)) << "block " << block << " is torn";
      }
    }
    std::set<size_t> unflushed;
    for (size_t i : s.applied) unflushed.insert(b.block_of_entry[i]);
    for (size_t block = 0; block < BlockLog::kSegments * BlockLog::kPerSegment; ++block) {
      const size_t seg = block / BlockLog::kPerSegment;
      if (seg < s.barrier) {
        EXPECT_TRUE(present.count(block)) << "block " << block << " is before the barrier";
      } else if (seg > s.barrier) {
        EXPECT_FALSE(present.count(block)) << "block " << block << " is after the next barrier";
      } else {
        EXPECT_EQ(present.count(block), unflushed.count(block)) << "block " << block;
      }
    }
    for (size_t block : present) {
      if (block / BlockLog::kPerSegment == s.barrier && block % BlockLog::kPerSegment > 0 &&
          !present.count(block - 1)) {
        saw_gap = true;
      }
    }
  }
  EXPECT_TRUE(saw_gap) << "no state reordered unflushed writes";
}

TEST(CrashReplayTest, DeterministicForASeed) {
  const uint64_t seed = TestSeed();
  // Overlapping writes, so that the order of application shows in the bytes.
  std::mt19937_64 rng(seed);
  std::vector<FileOp> log;
  for (int i = 0; i < 30; ++i) {
    if (i % 10 == 9) {
      log.push_back(Flush());
      continue;
    }
    log.push_back(Write(rng() % 200, Bytes(1 + rng() % 64, static_cast<uint8_t>(i + 1))));
  }
  const CrashStateOptions options{.seed = seed, .random_subsets = 20};
  std::vector<State> first = AllStates(Bytes(256, 0), log, options);
  std::vector<State> second = AllStates(Bytes(256, 0), log, options);
  ASSERT_EQ(first.size(), second.size());
  for (size_t i = 0; i < first.size(); ++i) {
    EXPECT_EQ(first[i].description, second[i].description);
    EXPECT_EQ(first[i].applied, second[i].applied);
    EXPECT_EQ(first[i].contents, second[i].contents) << first[i].description;
  }
  // Only the random states depend on the seed, and they do.
  CrashStateOptions other = options;
  other.seed = seed + 1;
  std::vector<State> third = AllStates(Bytes(256, 0), log, other);
  bool differs = false;
  for (size_t i = 0; i < first.size() && i < third.size(); ++i) {
    differs = differs || first[i].applied != third[i].applied;
  }
  EXPECT_TRUE(differs || first.size() != third.size());
  // Descriptions of random states name the seed, to replay them from a log.
  bool names_seed = false;
  for (const State& s : first) {
    names_seed = names_seed || absl::StrContains(s.description, "seed " + std::to_string(seed));
  }
  EXPECT_TRUE(names_seed);
}

// --- CrashStates: bounds ----------------------------------------------------------

TEST(CrashReplayTest, OptionsBoundTheStates) {
  std::vector<FileOp> log;
  for (size_t i = 0; i < 100; ++i) log.push_back(WriteBlock(i, static_cast<uint8_t>(i + 1)));
  const Bytes initial(100 * kBlock, 0);

  // Evenly spaced prefixes, the longest (the whole log) included.
  std::vector<State> states = AllStates(initial, log, {.random_subsets = 0, .max_prefixes = 10});
  ASSERT_EQ(states.size(), 11u);
  for (size_t i = 1; i < states.size(); ++i) EXPECT_EQ(states[i].applied.size(), 10 * i);
  EXPECT_EQ(states.back().contents, Apply(initial, log, states.back().applied));

  states = AllStates(initial, log, {.random_subsets = 3, .max_prefixes = 10});
  EXPECT_EQ(states.size(), 14u);

  CrashStates capped(initial, log, {.max_states = 5});
  size_t n = 0;
  while (capped.Next(nullptr, nullptr)) ++n;
  EXPECT_EQ(n, 5u);
  EXPECT_FALSE(capped.Next(nullptr, nullptr));
}

// --- End to end ---------------------------------------------------------------

TEST(CrashReplayTest, BarrierStatesMatchTheFileAtEachFlush) {
  const uint64_t seed = TestSeed();
  std::mt19937_64 rng(seed);
  const Bytes initial(4096, 0x5a);
  RecordingFile rec(NewMemFile("e2e.img", initial));
  std::vector<Bytes> at_barrier = {initial};
  for (int i = 0; i < 200; ++i) {
    switch (rng() % 10) {
      case 0: {
        ASSERT_OK(SyncWait(rec.Flush()));
        ASSERT_OK_AND_ASSIGN(Bytes now, MemFileContents(rec.inner()));
        at_barrier.push_back(now);
        break;
      }
      case 1:
        ASSERT_OK(SyncWait(rec.Discard(rng() % 8192, rng() % 2048)));
        break;
      case 2:
        ASSERT_OK(SyncWait(rec.Truncate(rng() % 8192)));
        break;
      default:
        ASSERT_OK(SyncWait(
            rec.Write(rng() % 8192, Bytes(1 + rng() % 512, static_cast<uint8_t>(rng())))));
    }
  }
  ASSERT_OK_AND_ASSIGN(Bytes final_contents, MemFileContents(rec.inner()));

  CrashStates states(initial, rec.log(), {.seed = seed, .random_subsets = 4});
  EXPECT_EQ(states.barrier_count() + 1, at_barrier.size());
  Bytes contents;
  std::string description;
  size_t barriers_seen = 0;
  bool saw_final = false;
  while (states.Next(&contents, &description)) {
    if (states.unflushed_applied().empty()) {
      ASSERT_LT(states.barrier(), at_barrier.size());
      EXPECT_EQ(contents, at_barrier[states.barrier()]) << description;
      ++barriers_seen;
    }
    saw_final = saw_final || contents == final_contents;
  }
  EXPECT_GE(barriers_seen, 1u);
  EXPECT_TRUE(saw_final) << "no state is the file as it was when the log was taken";
}

}  // namespace
}  // namespace qcow2fuse
