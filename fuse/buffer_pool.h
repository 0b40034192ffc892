// BufferPool: page-aligned buffers of one size, handed out and taken back,
// for the replies to large reads.
//
// Why not malloc: a buffer of a megabyte comes from mmap, or from the top of
// a worker thread's arena, and goes back with munmap or a trim when freed.
// Every large read then faults its pages in again, and every free makes the
// kernel flush TLB entries on all cores. Reusing buffers avoids both. Small
// reads are cheap from malloc and do not come here.
//
// At most `max_kept` free buffers are kept; more are released, so a burst of
// concurrent reads costs memory only while it lasts. Thread-safe; a Buffer
// may be returned on another thread than took it.

#ifndef QCOW2FUSE_FUSE_BUFFER_POOL_H_
#define QCOW2FUSE_FUSE_BUFFER_POOL_H_

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <utility>
#include <vector>

namespace qcow2fuse {

class BufferPool {
 public:
  // A buffer of the pool's size; goes back to the pool when destroyed.
  class Buffer {
   public:
    Buffer(Buffer&& other) noexcept
        : pool_(std::exchange(other.pool_, nullptr)), data_(std::exchange(other.data_, nullptr)) {}
    Buffer& operator=(Buffer&&) = delete;
    ~Buffer() {
      if (pool_ != nullptr) pool_->Give(data_);
    }
    // The first `n` bytes, n <= the pool's buffer size.
    std::span<uint8_t> first(size_t n) const { return {data_, n}; }

   private:
    friend class BufferPool;
    Buffer(BufferPool* pool, uint8_t* data) : pool_(pool), data_(data) {}
    BufferPool* pool_;
    uint8_t* data_;
  };

  BufferPool(size_t buffer_size, size_t max_kept);
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;
  // Every Buffer must have been returned.
  ~BufferPool();

  size_t buffer_size() const { return buffer_size_; }

  // A kept buffer if there is one, else a new one. Its bytes are whatever
  // the previous user left.
  Buffer Take();

  // Free buffers kept now, for tests.
  size_t kept() const;

 private:
  void Give(uint8_t* data);

  const size_t buffer_size_;
  const size_t max_kept_;
  mutable std::mutex mu_;
  std::vector<uint8_t*> free_;  // guarded by mu_
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_BUFFER_POOL_H_
