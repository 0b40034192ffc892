#include "qcow2fuse/blocking.h"

#include <atomic>

namespace qcow2fuse {
namespace {

std::atomic<BlockingObserver*> g_observer{nullptr};

}  // namespace

void SetBlockingObserver(BlockingObserver* observer) { g_observer.store(observer, std::memory_order_release); }

bool ScopedBlockingCall::Observed() { return g_observer.load(std::memory_order_acquire) != nullptr; }

ScopedBlockingCall::ScopedBlockingCall() : observer_(g_observer.load(std::memory_order_acquire)) {
  if (observer_ != nullptr) observer_->WillBlock();
}

ScopedBlockingCall::~ScopedBlockingCall() {
  if (observer_ != nullptr) observer_->DoneBlocking();
}

}  // namespace qcow2fuse
