#include "format/refcount.h"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <vector>

#include "gtest/gtest.h"

namespace qcow2fuse::test {
namespace {

using Bytes = std::vector<uint8_t>;

// --- Reading hand-built blocks --------------------------------------------

// 1-bit entries, least significant bit first: 0xb2 = 1011 0010.
TEST(RefcountTest, Get1BitEntriesLsbFirst) {
  const Bytes block = {0xb2, 0x01};
  const uint64_t want[] = {0, 1, 0, 0, 1, 1, 0, 1, 1, 0};
  for (uint64_t i = 0; i < std::size(want); ++i) {
    EXPECT_EQ(GetRefcount(block, i, 0), want[i]) << "entry " << i;
  }
}

// 0xe4 = 11 10 01 00: entries 0..3 are 0, 1, 2, 3.
TEST(RefcountTest, Get2BitEntriesLsbFirst) {
  const Bytes block = {0xe4, 0x1b};
  const uint64_t want[] = {0, 1, 2, 3, 3, 2, 1, 0};
  for (uint64_t i = 0; i < std::size(want); ++i) {
    EXPECT_EQ(GetRefcount(block, i, 1), want[i]) << "entry " << i;
  }
}

TEST(RefcountTest, Get4BitEntriesLowNibbleFirst) {
  const Bytes block = {0x21, 0xf0};
  EXPECT_EQ(GetRefcount(block, 0, 2), 1u);
  EXPECT_EQ(GetRefcount(block, 1, 2), 2u);
  EXPECT_EQ(GetRefcount(block, 2, 2), 0u);
  EXPECT_EQ(GetRefcount(block, 3, 2), 15u);
}

TEST(RefcountTest, Get8BitEntries) {
  const Bytes block = {0x01, 0xff, 0x80};
  EXPECT_EQ(GetRefcount(block, 0, 3), 1u);
  EXPECT_EQ(GetRefcount(block, 1, 3), 255u);
  EXPECT_EQ(GetRefcount(block, 2, 3), 128u);
}

TEST(RefcountTest, Get16BitEntriesBigEndian) {
  const Bytes block = {0x00, 0x01, 0x12, 0x34, 0xff, 0xfe};
  EXPECT_EQ(GetRefcount(block, 0, 4), 1u);
  EXPECT_EQ(GetRefcount(block, 1, 4), 0x1234u);
  EXPECT_EQ(GetRefcount(block, 2, 4), 0xfffeu);
}

TEST(RefcountTest, Get32BitEntriesBigEndian) {
  const Bytes block = {0, 0, 0, 1, 0x12, 0x34, 0x56, 0x78};
  EXPECT_EQ(GetRefcount(block, 0, 5), 1u);
  EXPECT_EQ(GetRefcount(block, 1, 5), 0x12345678u);
}

TEST(RefcountTest, Get64BitEntriesBigEndian) {
  const Bytes block = {0, 0, 0, 0, 0, 0, 0, 2, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef};
  EXPECT_EQ(GetRefcount(block, 0, 6), 2u);
  EXPECT_EQ(GetRefcount(block, 1, 6), 0x0123456789abcdefull);
}

// --- Writing: exact bytes -------------------------------------------------

TEST(RefcountTest, Set1BitEntries) {
  Bytes block(2, 0);
  SetRefcount(block, 1, 0, 1);
  SetRefcount(block, 7, 0, 1);
  SetRefcount(block, 8, 0, 1);
  EXPECT_EQ(block, (Bytes{0x82, 0x01}));
}

TEST(RefcountTest, Set2BitEntries) {
  Bytes block(2, 0);
  SetRefcount(block, 0, 1, 3);
  SetRefcount(block, 2, 1, 1);
  SetRefcount(block, 5, 1, 2);
  EXPECT_EQ(block, (Bytes{0x13, 0x08}));
}

TEST(RefcountTest, Set4BitEntries) {
  Bytes block(2, 0);
  SetRefcount(block, 1, 2, 0xa);
  SetRefcount(block, 2, 2, 0x5);
  EXPECT_EQ(block, (Bytes{0xa0, 0x05}));
}

TEST(RefcountTest, Set8BitEntries) {
  Bytes block(3, 0);
  SetRefcount(block, 1, 3, 0xc3);
  EXPECT_EQ(block, (Bytes{0x00, 0xc3, 0x00}));
}

TEST(RefcountTest, Set16BitEntriesBigEndian) {
  Bytes block(6, 0);
  SetRefcount(block, 1, 4, 0x1234);
  EXPECT_EQ(block, (Bytes{0, 0, 0x12, 0x34, 0, 0}));
}

TEST(RefcountTest, Set32BitEntriesBigEndian) {
  Bytes block(12, 0);
  SetRefcount(block, 1, 5, 0x89abcdef);
  EXPECT_EQ(block, (Bytes{0, 0, 0, 0, 0x89, 0xab, 0xcd, 0xef, 0, 0, 0, 0}));
}

TEST(RefcountTest, Set64BitEntriesBigEndian) {
  Bytes block(24, 0);
  SetRefcount(block, 1, 6, 0x0123456789abcdefull);
  Bytes want(24, 0);
  const Bytes value = {0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef};
  std::copy(value.begin(), value.end(), want.begin() + 8);
  EXPECT_EQ(block, want);
}

// --- Neighbours -----------------------------------------------------------

// In a block of all ones, clearing an entry must leave every other entry at
// the maximum, for every width.
TEST(RefcountTest, SetDoesNotDisturbNeighbours) {
  for (uint32_t order = 0; order <= 6; ++order) {
    SCOPED_TRACE(order);
    Bytes block(64, 0xff);
    const uint64_t entries = block.size() * 8 >> order;
    const uint64_t target = entries / 2 + 1;
    SetRefcount(block, target, order, 0);
    for (uint64_t i = 0; i < entries; ++i) {
      EXPECT_EQ(GetRefcount(block, i, order), i == target ? 0 : MaxRefcount(order)) << "entry " << i;
    }
  }
}

TEST(RefcountTest, SetThenGetEveryEntry) {
  for (uint32_t order = 0; order <= 6; ++order) {
    SCOPED_TRACE(order);
    Bytes block(64, 0);
    const uint64_t entries = block.size() * 8 >> order;
    for (uint64_t i = 0; i < entries; ++i) SetRefcount(block, i, order, (i * 7 + 3) & MaxRefcount(order));
    for (uint64_t i = 0; i < entries; ++i) {
      EXPECT_EQ(GetRefcount(block, i, order), (i * 7 + 3) & MaxRefcount(order)) << "entry " << i;
    }
  }
}

// A value wider than the entry must not spill into the next one.
TEST(RefcountTest, SetSubByteValueIsMaskedToItsEntry) {
  Bytes block(1, 0);
  SetRefcount(block, 0, 1, 0xff);
  EXPECT_EQ(block, Bytes{0x03});
}

// --- Limits ---------------------------------------------------------------

TEST(RefcountTest, MaxRefcount) {
  EXPECT_EQ(MaxRefcount(0), 1u);
  EXPECT_EQ(MaxRefcount(1), 3u);
  EXPECT_EQ(MaxRefcount(2), 15u);
  EXPECT_EQ(MaxRefcount(3), 255u);
  EXPECT_EQ(MaxRefcount(4), 65535u);
  EXPECT_EQ(MaxRefcount(5), 0xffffffffull);
  EXPECT_EQ(MaxRefcount(6), 0xffffffffffffffffull);
}

TEST(RefcountTest, RefcountBlockEntries) {
  EXPECT_EQ(RefcountBlockEntries(16, 4), 32768u);  // QEMU's default
  EXPECT_EQ(RefcountBlockEntries(9, 0), 4096u);
  EXPECT_EQ(RefcountBlockEntries(9, 6), 64u);
  EXPECT_EQ(RefcountBlockEntries(12, 3), 4096u);
  EXPECT_EQ(RefcountBlockEntries(21, 0), 16777216u);
  EXPECT_EQ(RefcountBlockEntries(21, 6), 262144u);
}

}  // namespace
}  // namespace qcow2fuse::test
