// The FUSE front end's pool of read buffers (fuse/buffer_pool.h).

#include "buffer_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

namespace qcow2fuse {
namespace {

TEST(BufferPoolTest, BuffersArePageAlignedAndWholeSize) {
  BufferPool pool(1 << 20, 4);
  BufferPool::Buffer b = pool.Take();
  std::span<uint8_t> bytes = b.first(1 << 20);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(bytes.data()) % 4096, 0u);
  std::memset(bytes.data(), 0xab, bytes.size());  // ASan: all of it is ours
}

TEST(BufferPoolTest, AReturnedBufferIsTheNextOneTaken) {
  BufferPool pool(64 << 10, 4);
  uint8_t* first;
  {
    BufferPool::Buffer b = pool.Take();
    first = b.first(1).data();
    EXPECT_EQ(pool.kept(), 0u);
  }
  EXPECT_EQ(pool.kept(), 1u);
  BufferPool::Buffer again = pool.Take();
  EXPECT_EQ(again.first(1).data(), first);
  EXPECT_EQ(pool.kept(), 0u);
}

TEST(BufferPoolTest, KeepsAtMostMaxKept) {
  BufferPool pool(4096, 2);
  {
    std::vector<BufferPool::Buffer> taken;
    for (int i = 0; i < 5; ++i) taken.push_back(pool.Take());
  }
  EXPECT_EQ(pool.kept(), 2u);
}

TEST(BufferPoolTest, AMovedBufferGoesBackOnce) {
  BufferPool pool(4096, 4);
  {
    BufferPool::Buffer a = pool.Take();
    BufferPool::Buffer b(std::move(a));
  }
  EXPECT_EQ(pool.kept(), 1u);
}

// Buffers taken on one thread and returned on others, as a read's
// coroutine may end on another thread; each holder owns its bytes alone.
TEST(BufferPoolTest, ThreadsNeverShareABuffer) {
  BufferPool pool(8192, 3);
  std::vector<std::thread> threads;
  std::atomic<int> clashes{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&pool, &clashes, t] {
      for (int i = 0; i < 2000; ++i) {
        BufferPool::Buffer b = pool.Take();
        std::span<uint8_t> bytes = b.first(8192);
        std::memset(bytes.data(), t, bytes.size());
        for (uint8_t x : bytes.subspan(0, 64)) clashes += x != t;
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(clashes.load(), 0);
  EXPECT_LE(pool.kept(), 3u);
}

}  // namespace
}  // namespace qcow2fuse
