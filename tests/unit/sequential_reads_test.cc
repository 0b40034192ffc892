// Which reads of a view have the host read the image ahead, and how far
// (fuse/sequential_reads.h). What a mount does with the ranges is in
// tests/cli/mount_options_test.cc (ImageReadahead*).

#include "sequential_reads.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "support/seed.h"

namespace qcow2fuse {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;

using Range = SequentialReads::Range;

::testing::AssertionResult Is(Range got, uint64_t offset, uint64_t length) {
  if (got.offset == offset && got.length == length) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got [" << got.offset << ", +" << got.length << "), want [" << offset << ", +"
                                       << length << ")";
}

::testing::AssertionResult Nothing(Range got) {
  if (got.length == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got [" << got.offset << ", +" << got.length << "), want nothing";
}

TEST(SequentialReadsTest, AStreamIsReadAheadFromItsThirdReadInQuarterWindowSteps) {
  SequentialReads reads;
  EXPECT_TRUE(Nothing(reads.Read(0, kMiB, kGiB, 8 * kMiB)));
  EXPECT_TRUE(Nothing(reads.Read(kMiB, kMiB, kGiB, 8 * kMiB)));
  EXPECT_TRUE(Is(reads.Read(2 * kMiB, kMiB, kGiB, 8 * kMiB), 3 * kMiB, 8 * kMiB));
  // 1 MiB more of the window is free: less than a quarter of it.
  EXPECT_TRUE(Nothing(reads.Read(3 * kMiB, kMiB, kGiB, 8 * kMiB)));
  EXPECT_TRUE(Is(reads.Read(4 * kMiB, kMiB, kGiB, 8 * kMiB), 11 * kMiB, 2 * kMiB));
}

TEST(SequentialReadsTest, AStreamMayStartAnywhere) {
  SequentialReads reads;
  const uint64_t at = 700 * kMiB + 4 * kKiB;
  EXPECT_TRUE(Nothing(reads.Read(at, 128 * kKiB, kGiB, kMiB)));
  EXPECT_TRUE(Nothing(reads.Read(at + 128 * kKiB, 128 * kKiB, kGiB, kMiB)));
  EXPECT_TRUE(Is(reads.Read(at + 256 * kKiB, 128 * kKiB, kGiB, kMiB), at + 384 * kKiB, kMiB));
}

TEST(SequentialReadsTest, SmallReadsAreNotLookedAt) {
  SequentialReads reads;
  for (uint64_t at = 0; at < 4 * kMiB; at += 32 * kKiB) {
    EXPECT_TRUE(Nothing(reads.Read(at, 32 * kKiB, kGiB, 8 * kMiB))) << at;
  }
  // Nor do they count: the stream below starts at its own first read.
  EXPECT_TRUE(Nothing(reads.Read(4 * kMiB, 64 * kKiB, kGiB, 8 * kMiB)));
  EXPECT_TRUE(Nothing(reads.Read(4 * kMiB + 64 * kKiB, 64 * kKiB, kGiB, 8 * kMiB)));
  EXPECT_FALSE(Nothing(reads.Read(4 * kMiB + 128 * kKiB, 64 * kKiB, kGiB, 8 * kMiB)));
}

TEST(SequentialReadsTest, NothingWithoutAWindow) {
  SequentialReads reads;
  for (uint64_t at = 0; at < 16 * kMiB; at += kMiB) EXPECT_TRUE(Nothing(reads.Read(at, kMiB, kGiB, 0))) << at;
}

TEST(SequentialReadsTest, RandomReadsAreNeverReadAhead) {
  const uint64_t seed = test::TestSeed();
  std::mt19937_64 rng(seed);
  SequentialReads reads;
  const uint64_t size = 1024 * kGiB;
  for (int i = 0; i < 10000; ++i) {
    const uint64_t at = rng() % (size / (128 * kKiB)) * (128 * kKiB);
    // Reads that happen to land near each other twice in a row would
    // count as a stream; over 1 TiB that is too rare to test for.
    ASSERT_TRUE(Nothing(reads.Read(at, 128 * kKiB, size, 8 * kMiB))) << "read " << i << " at " << at;
  }
}

TEST(SequentialReadsTest, AJumpStartsANewStream) {
  SequentialReads reads;
  for (uint64_t at = 0; at < 8 * kMiB; at += kMiB) reads.Read(at, kMiB, kGiB, 4 * kMiB);
  // Far away, and far back: two more reads to confirm each.
  for (const uint64_t start : {500 * kMiB, 100 * kMiB}) {
    EXPECT_TRUE(Nothing(reads.Read(start, kMiB, kGiB, 4 * kMiB)));
    EXPECT_TRUE(Nothing(reads.Read(start + kMiB, kMiB, kGiB, 4 * kMiB)));
    EXPECT_TRUE(Is(reads.Read(start + 2 * kMiB, kMiB, kGiB, 4 * kMiB), start + 3 * kMiB, 4 * kMiB));
  }
}

// Within kSlack of the stream's end, ahead or behind, a read continues it;
// a page further it does not.
TEST(SequentialReadsTest, AReadWithinTheSlackContinuesTheStream) {
  const uint64_t slack = SequentialReads::kSlack;
  for (const int64_t gap : {int64_t(slack), -int64_t(slack)}) {
    SequentialReads reads;
    reads.Read(64 * kMiB, kMiB, kGiB, 8 * kMiB);
    const uint64_t at = 65 * kMiB + gap;
    EXPECT_TRUE(Nothing(reads.Read(at, kMiB, kGiB, 8 * kMiB))) << gap;
    EXPECT_FALSE(Nothing(reads.Read(at + kMiB, kMiB, kGiB, 8 * kMiB))) << gap;
  }
  for (const int64_t gap : {int64_t(slack + 4 * kKiB), -int64_t(slack + 4 * kKiB)}) {
    SequentialReads reads;
    reads.Read(64 * kMiB, kMiB, kGiB, 8 * kMiB);
    const uint64_t at = 65 * kMiB + gap;
    EXPECT_TRUE(Nothing(reads.Read(at, kMiB, kGiB, 8 * kMiB))) << gap;
    // The read there started a stream of its own: one more to confirm it.
    EXPECT_TRUE(Nothing(reads.Read(at + kMiB, kMiB, kGiB, 8 * kMiB))) << gap;
    EXPECT_FALSE(Nothing(reads.Read(at + 2 * kMiB, kMiB, kGiB, 8 * kMiB))) << gap;
  }
}

TEST(SequentialReadsTest, AStreamThatOvertookTheWindowIsReadAheadFromWhereItIs) {
  SequentialReads reads;
  for (uint64_t at = 0; at < 3 * kMiB; at += kMiB) reads.Read(at, kMiB, kGiB, 2 * kMiB);  // ahead to 5 MiB
  // Reads of 4 MiB: the stream's end passes what was handed out.
  EXPECT_TRUE(Is(reads.Read(3 * kMiB, 4 * kMiB, kGiB, 2 * kMiB), 7 * kMiB, 2 * kMiB));
}

TEST(SequentialReadsTest, NeverPastTheEndAndTheShortLastStepToo) {
  SequentialReads reads;
  const uint64_t size = 10 * kMiB + 4 * kKiB;
  reads.Read(0, kMiB, size, 8 * kMiB);
  reads.Read(kMiB, kMiB, size, 8 * kMiB);
  EXPECT_TRUE(Is(reads.Read(2 * kMiB, kMiB, size, 8 * kMiB), 3 * kMiB, size - 3 * kMiB));
  EXPECT_TRUE(Nothing(reads.Read(3 * kMiB, kMiB, size, 8 * kMiB)));
  // A file that shrank below what was handed out gets nothing more.
  EXPECT_TRUE(Nothing(reads.Read(4 * kMiB, kMiB, 6 * kMiB, 8 * kMiB)));

  SequentialReads tail;
  const uint64_t small = 20 * kMiB + 4 * kKiB;
  for (uint64_t at = 0; at < 3 * kMiB; at += kMiB) tail.Read(at, kMiB, small, 8 * kMiB);  // ahead to 11 MiB
  for (uint64_t at = 3 * kMiB; at < 12 * kMiB; at += kMiB) tail.Read(at, kMiB, small, 8 * kMiB);
  // Handed out up to 19 MiB; the window now reaches the file's end, 1 MiB
  // and 4 KiB further: less than a quarter window, but all there is.
  EXPECT_TRUE(Is(tail.Read(12 * kMiB, kMiB, small, 8 * kMiB), 19 * kMiB, kMiB + 4 * kKiB));
  EXPECT_TRUE(Nothing(tail.Read(13 * kMiB, kMiB, small, 8 * kMiB)));
}

// The kernel sends a readahead batch as several requests, and the workers
// answer them in any order: the stream still holds, and what is handed out
// is each byte once, in order, always ahead of the reads.
TEST(SequentialReadsTest, ReadsOfABatchInAnyOrderKeepTheStream) {
  const uint64_t seed = test::TestSeed();
  std::mt19937_64 rng(seed);
  SequentialReads reads;
  const uint64_t size = 256 * kMiB;
  const uint64_t window = 8 * kMiB;
  const uint64_t request = 512 * kKiB;
  uint64_t handed_to = 0;  // end of what was handed out so far
  for (uint64_t batch = 0; batch < size; batch += 2 * kMiB) {
    std::vector<uint64_t> offsets;
    for (uint64_t at = batch; at < batch + 2 * kMiB; at += request) offsets.push_back(at);
    std::shuffle(offsets.begin(), offsets.end(), rng);
    for (const uint64_t at : offsets) {
      const Range r = reads.Read(at, request, size, window);
      if (r.length == 0) continue;
      if (handed_to != 0) {
        ASSERT_EQ(r.offset, handed_to) << "read at " << at;
      }
      ASSERT_GE(r.offset, at + request) << "read at " << at;
      ASSERT_LE(r.offset + r.length, size);
      handed_to = r.offset + r.length;
    }
    if (batch >= 2 * kMiB) {
      ASSERT_GE(handed_to, std::min(size, batch + 2 * kMiB + window - window / 4)) << "after the batch at " << batch;
    }
  }
  EXPECT_EQ(handed_to, size);
}

}  // namespace
}  // namespace qcow2fuse
