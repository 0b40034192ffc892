// GuestModel: what each byte of a disk should read after a sequence of
// writes, zeroings and resizes, as far as that is known; ModelComparer
// reads an image and compares it with the model. write_fuzzer.cc uses
// both, during its requests and after reopening the image.
//
// The disk is a list of runs: still as the image had it before the
// sequence (kOriginal), zeros, bytes written, or unknown (a request that
// failed may have changed any part of its range). Written bytes are shared
// between the runs split from one write, so the model costs what the
// writes cost, whatever the disk's size.

#ifndef QCOW2FUSE_TESTS_FUZZ_GUEST_MODEL_H_
#define QCOW2FUSE_TESTS_FUZZ_GUEST_MODEL_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "data/qcow2_layer.h"

namespace qcow2fuse::fuzz {

class GuestModel {
 public:
  enum class Kind { kOriginal, kZero, kBytes, kUnknown };
  static constexpr uint64_t kEnd = UINT64_MAX;

  GuestModel() { runs_[0] = Run{Kind::kOriginal, nullptr, 0}; }

  void SetBytes(uint64_t offset, std::span<const uint8_t> data);
  void SetZero(uint64_t begin, uint64_t end) { Assign(begin, end, Run{Kind::kZero, nullptr, 0}); }
  void SetUnknown(uint64_t begin, uint64_t end) { Assign(begin, end, Run{Kind::kUnknown, nullptr, 0}); }

  // Calls `fn` for each run inside [begin, end), in order; `bytes` holds
  // the run's bytes for kBytes and is empty otherwise.
  void Visit(uint64_t begin, uint64_t end,
             const std::function<void(uint64_t begin, uint64_t end, Kind kind,
                                      std::span<const uint8_t> bytes)>& fn) const;

 private:
  struct Run {
    Kind kind;
    std::shared_ptr<const std::vector<uint8_t>> bytes;  // kBytes
    uint64_t skip;                                      // where in `bytes` the run starts
  };
  void Split(uint64_t at);
  void Assign(uint64_t begin, uint64_t end, Run run);

  // Each run reaches to the next key; the last one to kEnd.
  std::map<uint64_t, Run> runs_;
};

// Compares an image with a model, aborting (Fail) at the first difference.
// `result` is the image after the requests; kOriginal runs are compared
// with `original`, the image as it was before them (skipped when null).
// No backing file lies below either, so runs their block status calls
// zero or unallocated read as zeros without being read. Reads stop
// silently after `budget` bytes or `max_steps` calls: the model may
// describe a disk of terabytes.
class ModelComparer {
 public:
  ModelComparer(Qcow2Layer& result, Qcow2Layer* original, uint64_t budget = uint64_t{4} << 20,
                uint64_t max_steps = 8192)
      : result_(result), original_(original), budget_(budget), steps_left_(max_steps) {}

  void Compare(const GuestModel& model, uint64_t begin, uint64_t end);

 private:
  bool Spend(uint64_t bytes);
  // The length of the run at `offset` known to read as zeros, or 0.
  static uint64_t NonData(Qcow2Layer& layer, uint64_t offset, uint64_t max);
  std::vector<uint8_t> MustRead(uint64_t offset, uint64_t length, const char* what);
  void CompareBytes(uint64_t offset, std::span<const uint8_t> want);
  void CompareZero(uint64_t begin, uint64_t end);
  void CompareOriginal(uint64_t begin, uint64_t end);

  Qcow2Layer& result_;
  Qcow2Layer* const original_;
  uint64_t budget_;
  uint64_t steps_left_;
};

}  // namespace qcow2fuse::fuzz

#endif  // QCOW2FUSE_TESTS_FUZZ_GUEST_MODEL_H_
