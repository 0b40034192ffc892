// GatedFile: a BlockFile that can hold a write in flight, for tests that
// force an interleaving of engine requests.
//
// Engine requests run until their I/O suspends them. Real I/O completes in
// an order the test cannot choose; GatedFile lets the test park the next
// matching write (the coroutine suspends before the write reaches the
// file), start other requests while it is parked, and then resume it with
// Release(), all on the test's own thread:
//
//   gated->HoldNextWrite([](uint64_t offset, size_t n) { return n == 65536; });
//   Started write = Start(layer->Write(...));    // runs until parked
//   Started discard = Start(layer->Discard(...));
//   EXPECT_FALSE(discard.done());                 // it must wait
//   gated->Release();                             // the write goes on
//
// Reads can be parked the same way (HoldNextRead): a read request between
// its lookup of the L2 entry and its read of the host cluster, or a cache
// fill of an L2 slice.
//
// It also counts the writes that reached the file since its last successful
// Flush (the barrier), so a test can tell that what a flush made durable
// was followed by a barrier: writes_since_flush() == 0.
//
// Not thread-safe: everything runs on the test thread.

#ifndef QCOW2FUSE_TESTS_UNIT_GATED_FILE_H_
#define QCOW2FUSE_TESTS_UNIT_GATED_FILE_H_

#include <coroutine>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <utility>

#include "absl/status/status.h"
#include "io/block_file.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse::test {

class GatedFile : public BlockFile {
 public:
  using Match = std::function<bool(uint64_t offset, size_t length)>;
  using DataMatch = std::function<bool(uint64_t offset, std::span<const uint8_t> data)>;

  explicit GatedFile(std::unique_ptr<BlockFile> inner) : inner_(std::move(inner)) {}

  // The next write that `match` accepts parks until Release().
  void HoldNextWrite(Match match) {
    match_ = [match = std::move(match)](uint64_t offset, std::span<const uint8_t> data) {
      return match(offset, data.size());
    };
  }
  // The same, choosing by the bytes written: a request's own data write,
  // whatever size the engine gives it.
  void HoldNextWriteOf(DataMatch match) { match_ = std::move(match); }
  // The next read that `match` accepts parks until ReleaseRead(), before
  // it reads the file (HoldNextRead) or after, with the bytes it read then
  // (HoldNextReadResult): a slow read that returns what the file held
  // when it started.
  void HoldNextRead(Match match) {
    read_match_ = std::move(match);
    park_read_after_ = false;
  }
  void HoldNextReadResult(Match match) {
    read_match_ = std::move(match);
    park_read_after_ = true;
  }
  // Whether a write is parked now.
  bool holding() const { return static_cast<bool>(parked_); }
  // Whether a read is parked now.
  bool holding_read() const { return static_cast<bool>(parked_read_); }
  // Resumes the parked write; it runs on this thread until it next suspends.
  void Release() { std::exchange(parked_, nullptr).resume(); }
  // Resumes the parked read, likewise.
  void ReleaseRead() { std::exchange(parked_read_, nullptr).resume(); }
  // Writes that succeeded since the last successful Flush(). A parked write
  // has not reached the file and is not counted.
  uint64_t writes_since_flush() const { return writes_since_flush_; }

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override {
    if (!read_match_ || !read_match_(offset, out.size())) co_return co_await inner_->Read(offset, out);
    read_match_ = nullptr;
    if (!park_read_after_) co_await Park{&parked_read_};
    absl::Status status = co_await inner_->Read(offset, out);
    if (park_read_after_) co_await Park{&parked_read_};
    co_return status;
  }
  uint64_t size() const override { return inner_->size(); }
  bool writable() const override { return inner_->writable(); }
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override {
    if (match_ && match_(offset, data)) {
      match_ = nullptr;
      co_await Park{&parked_};
    }
    absl::Status status = co_await inner_->Write(offset, data);
    if (status.ok()) ++writes_since_flush_;
    co_return status;
  }
  Task<absl::Status> Flush() override {
    // Only writes that completed before the barrier was issued are covered.
    const uint64_t covered = writes_since_flush_;
    absl::Status status = co_await inner_->Flush();
    if (status.ok()) writes_since_flush_ -= covered;
    co_return status;
  }
  Task<absl::Status> Discard(uint64_t offset, uint64_t length) override { return inner_->Discard(offset, length); }
  Task<absl::Status> Truncate(uint64_t size) override { return inner_->Truncate(size); }
  Task<absl::Status> Allocate(uint64_t offset, uint64_t length) override { return inner_->Allocate(offset, length); }
  int fd() const override { return inner_->fd(); }
  const std::string& name() const override { return inner_->name(); }

 private:
  struct Park {
    std::coroutine_handle<>* slot;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) noexcept { *slot = h; }
    void await_resume() const noexcept {}
  };

  std::unique_ptr<BlockFile> inner_;
  DataMatch match_;
  std::coroutine_handle<> parked_;
  Match read_match_;
  bool park_read_after_ = false;
  std::coroutine_handle<> parked_read_;
  uint64_t writes_since_flush_ = 0;
};

// A request started on the test thread that may suspend; done() once it
// has finished.
class Started {
 public:
  explicit Started(Task<absl::Status> task) : state_(std::make_shared<std::optional<absl::Status>>()) {
    Run(std::move(task), state_).handle.resume();
  }
  bool done() const { return state_->has_value(); }
  const absl::Status& status() const { return **state_; }

 private:
  static internal::DetachedCoroutine Run(Task<absl::Status> task,
                                         std::shared_ptr<std::optional<absl::Status>> out) {
    *out = co_await std::move(task);
  }
  std::shared_ptr<std::optional<absl::Status>> state_;
};

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_UNIT_GATED_FILE_H_
