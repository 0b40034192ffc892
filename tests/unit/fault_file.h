// FaultFile: a BlockFile that makes chosen host I/O fail, for tests of what
// a failing or full disk does to the engine.
//
// It forwards every call to an inner file and counts, per kind, the calls
// that change the file (reads are never failed). A Fault picks a kind and a
// call number (from 1) and what happens to that call:
//
//   kOnce      the call fails with `error` (EIO, ENOSPC, ...) and reaches
//              nothing; every other call goes through.
//   kShort     (Write only) the first half of the data lands, then the call
//              fails with `error`: what PosixFile reports when pwrite
//              returns a short count and the retry of the rest fails. A
//              write too small to split fails whole.
//   kDiskFull  from that call on the disk is full: every call that may need
//              space (Write, Allocate, a Truncate that grows) fails with
//              ENOSPC, until the test calls FaultState::ClearDiskFull().
//              Flush, Discard and shrinking pass: a full disk still syncs
//              and still frees.
//
// A failed Flush is not passed on, so a RecordingFile below it logs no
// barrier for it: the crash model then lets any subset of what was written
// since the last barrier be lost, which is what a failed fdatasync may do.
//
// The counts live in a FaultState shared by the files of one image (the
// image and its external data file count together) and outliving them, so
// a pass-through run (Fault{} counts and fails nothing) tells a test how
// many calls of each kind a workload makes: the points it can walk.
//
//   auto state = std::make_shared<FaultState>(Fault{.mode = Fault::kOnce,
//       .op = HostOp::kWrite, .nth = 7, .error = ENOSPC});
//   auto file = std::make_unique<FaultFile>(recording, state);  // borrows
//   ... run the engine; state->fired() says whether call 7 came ...

#ifndef QCOW2FUSE_TESTS_UNIT_FAULT_FILE_H_
#define QCOW2FUSE_TESTS_UNIT_FAULT_FILE_H_

#include <errno.h>

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "io/block_file.h"
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse::test {

// The kinds of host call a FaultFile counts. kSpace is not a call of its
// own: it counts every call that may need free space (Write, Allocate, a
// Truncate that grows), the calls a full disk refuses.
enum class HostOp { kWrite, kAllocate, kDiscard, kTruncate, kFlush, kSpace };
inline constexpr size_t kHostOpKinds = 6;

inline const char* HostOpName(HostOp op) {
  switch (op) {
    case HostOp::kWrite: return "write";
    case HostOp::kAllocate: return "allocate";
    case HostOp::kDiscard: return "discard";
    case HostOp::kTruncate: return "truncate";
    case HostOp::kFlush: return "flush";
    case HostOp::kSpace: return "space";
  }
  return "?";
}

struct Fault {
  enum Mode { kNone, kOnce, kShort, kDiskFull };
  Mode mode = kNone;
  HostOp op = HostOp::kWrite;
  uint64_t nth = 0;  // the call of kind `op`, from 1
  int error = EIO;   // kDiskFull always uses ENOSPC

  // E.g. "write call 7 fails (ENOSPC)".
  std::string ToString() const {
    if (mode == kNone) return "no fault";
    return absl::StrFormat("%s call %u %s", HostOpName(op), nth, What());
  }
  // What happens to the chosen call, e.g. "is short, then fails (ENOSPC)".
  std::string What() const {
    const char* how = mode == kOnce ? "fails" : mode == kShort ? "is short, then fails" : "finds the disk full";
    return absl::StrFormat("%s (%s)", how, mode == kDiskFull ? "ENOSPC" : ErrnoName(error));
  }
  static const char* ErrnoName(int error) {
    switch (error) {
      case EIO: return "EIO";
      case ENOSPC: return "ENOSPC";
      default: return "errno";
    }
  }
};

// What the FaultFiles of one test saw; thread-safe.
class FaultState {
 public:
  explicit FaultState(Fault fault = {}) : fault_(fault) {}

  const Fault& fault() const { return fault_; }
  // Calls of `op` so far (a failed call counts).
  uint64_t calls(HostOp op) const {
    std::lock_guard lock(mu_);
    return calls_[static_cast<size_t>(op)];
  }
  // Calls of `op` that came after the fault fired.
  uint64_t calls_after_fault(HostOp op) const {
    std::lock_guard lock(mu_);
    return after_[static_cast<size_t>(op)];
  }
  // Whether the chosen call came (and was failed or cut short).
  bool fired() const {
    std::lock_guard lock(mu_);
    return fired_;
  }
  // Calls failed so far, the chosen one and those refused for a full disk.
  uint64_t failures() const {
    std::lock_guard lock(mu_);
    return failures_;
  }
  // The call that met the fault, e.g. "write of d.qcow2 at offset 512, 512 bytes".
  std::string fired_call() const {
    std::lock_guard lock(mu_);
    return fired_call_;
  }
  bool disk_full() const {
    std::lock_guard lock(mu_);
    return full_;
  }
  // The disk has room again (kDiskFull).
  void ClearDiskFull() {
    std::lock_guard lock(mu_);
    full_ = false;
  }
  // Called (under no lock of the file) when the fault fires, before the
  // call fails: e.g. to note the RecordingFile's log size then.
  void set_on_fire(std::function<void()> on_fire) { on_fire_ = std::move(on_fire); }

  enum class Verdict { kPass, kFail, kShort };
  // Counts one call and decides it. `needs_space`: the call may need free
  // space. `what` describes the call, for fired_call().
  Verdict Decide(HostOp op, bool needs_space, const std::string& what, int* error) {
    bool fire = false;
    Verdict verdict = Verdict::kPass;
    {
      std::lock_guard lock(mu_);
      const uint64_t n = ++calls_[static_cast<size_t>(op)];
      const uint64_t space = needs_space ? ++calls_[static_cast<size_t>(HostOp::kSpace)] : 0;
      if (fired_) {
        ++after_[static_cast<size_t>(op)];
        if (needs_space) ++after_[static_cast<size_t>(HostOp::kSpace)];
      }
      const uint64_t number = fault_.op == HostOp::kSpace ? space : n;
      const bool chosen = !fired_ && fault_.mode != Fault::kNone && number != 0 && number == fault_.nth &&
                          (fault_.op == op || (fault_.op == HostOp::kSpace && needs_space));
      if (chosen) {
        fired_ = true;
        fire = true;
        fired_call_ = what;
        if (fault_.mode == Fault::kDiskFull) full_ = true;
      }
      if (full_ && needs_space) {
        verdict = Verdict::kFail;
        *error = ENOSPC;
      } else if (chosen) {
        verdict = fault_.mode == Fault::kShort && op == HostOp::kWrite ? Verdict::kShort : Verdict::kFail;
        *error = fault_.error;
      }
      if (verdict != Verdict::kPass) ++failures_;
    }
    if (fire && on_fire_) on_fire_();
    return verdict;
  }

 private:
  const Fault fault_;
  mutable std::mutex mu_;
  std::array<uint64_t, kHostOpKinds> calls_ = {};
  std::array<uint64_t, kHostOpKinds> after_ = {};
  bool fired_ = false;
  bool full_ = false;
  uint64_t failures_ = 0;
  std::string fired_call_;
  std::function<void()> on_fire_;
};

class FaultFile final : public BlockFile {
 public:
  // Borrows `inner` (a RecordingFile the test keeps, say).
  FaultFile(BlockFile& inner, std::shared_ptr<FaultState> state) : inner_(&inner), state_(std::move(state)) {}
  FaultFile(std::unique_ptr<BlockFile> inner, std::shared_ptr<FaultState> state)
      : owned_(std::move(inner)), inner_(owned_.get()), state_(std::move(state)) {}

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override { return inner_->Read(offset, out); }
  uint64_t size() const override { return inner_->size(); }
  bool writable() const override { return inner_->writable(); }
  absl::StatusOr<uint64_t> NextData(uint64_t offset) override { return inner_->NextData(offset); }
  absl::StatusOr<uint64_t> NextHole(uint64_t offset) override { return inner_->NextHole(offset); }
  void WillNeed(uint64_t offset, uint64_t length) override { inner_->WillNeed(offset, length); }
  int fd() const override { return inner_->fd(); }
  const std::string& name() const override { return inner_->name(); }

  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override {
    const std::string what = absl::StrFormat("write %s at offset %u, %u bytes", name(), offset, data.size());
    int error = 0;
    const FaultState::Verdict v = state_->Decide(HostOp::kWrite, true, what, &error);
    if (v == FaultState::Verdict::kShort && data.size() >= 2) {
      const size_t half = data.size() / 2;
      CO_RETURN_IF_ERROR(co_await inner_->Write(offset, data.first(half)));
      co_return Injected(error, absl::StrFormat("write %s at offset %u, %u bytes", name(), offset + half,
                                                data.size() - half));
    }
    if (v != FaultState::Verdict::kPass) co_return Injected(error, what);
    co_return co_await inner_->Write(offset, data);
  }
  Task<absl::Status> Allocate(uint64_t offset, uint64_t length) override {
    const std::string what = absl::StrFormat("allocate %s at offset %u, %u bytes", name(), offset, length);
    int error = 0;
    if (state_->Decide(HostOp::kAllocate, true, what, &error) != FaultState::Verdict::kPass) {
      co_return Injected(error, what);
    }
    co_return co_await inner_->Allocate(offset, length);
  }
  Task<absl::Status> Discard(uint64_t offset, uint64_t length) override {
    const std::string what = absl::StrFormat("discard %s at offset %u, %u bytes", name(), offset, length);
    int error = 0;
    if (state_->Decide(HostOp::kDiscard, false, what, &error) != FaultState::Verdict::kPass) {
      co_return Injected(error, what);
    }
    co_return co_await inner_->Discard(offset, length);
  }
  Task<absl::Status> Truncate(uint64_t size) override {
    const std::string what = absl::StrFormat("truncate %s to %u bytes", name(), size);
    int error = 0;
    if (state_->Decide(HostOp::kTruncate, size > inner_->size(), what, &error) != FaultState::Verdict::kPass) {
      co_return Injected(error, what);
    }
    co_return co_await inner_->Truncate(size);
  }
  Task<absl::Status> Flush() override {
    const std::string what = absl::StrFormat("flush %s", name());
    int error = 0;
    if (state_->Decide(HostOp::kFlush, false, what, &error) != FaultState::Verdict::kPass) {
      co_return Injected(error, what);
    }
    co_return co_await inner_->Flush();
  }

 private:
  // The error PosixFile would return, marked as injected for messages.
  static absl::Status Injected(int error, const std::string& what) {
    return ErrnoStatus(error, what + " (injected failure)");
  }

  std::unique_ptr<BlockFile> owned_;
  BlockFile* const inner_;
  const std::shared_ptr<FaultState> state_;
};

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_UNIT_FAULT_FILE_H_
