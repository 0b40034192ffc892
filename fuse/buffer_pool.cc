#include "buffer_pool.h"

#include <cstdlib>
#include <new>

namespace qcow2fuse {
namespace {

constexpr size_t kPageSize = 4096;

uint8_t* Allocate(size_t size) {
  void* p = std::aligned_alloc(kPageSize, (size + kPageSize - 1) / kPageSize * kPageSize);
  if (p == nullptr) throw std::bad_alloc();
  return static_cast<uint8_t*>(p);
}

}  // namespace

BufferPool::BufferPool(size_t buffer_size, size_t max_kept) : buffer_size_(buffer_size), max_kept_(max_kept) {
  free_.reserve(max_kept);
}

BufferPool::~BufferPool() {
  for (uint8_t* p : free_) std::free(p);
}

BufferPool::Buffer BufferPool::Take() {
  {
    std::lock_guard lock(mu_);
    if (!free_.empty()) {
      uint8_t* p = free_.back();
      free_.pop_back();
      return Buffer(this, p);
    }
  }
  return Buffer(this, Allocate(buffer_size_));
}

void BufferPool::Give(uint8_t* data) {
  {
    std::lock_guard lock(mu_);
    if (free_.size() < max_kept_) {
      free_.push_back(data);
      return;
    }
  }
  std::free(data);
}

size_t BufferPool::kept() const {
  std::lock_guard lock(mu_);
  return free_.size();
}

}  // namespace qcow2fuse
