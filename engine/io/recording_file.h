// RecordingFile and CrashStates: the tools of the crash-consistency tests.
//
// A test runs the engine's write path on a RecordingFile wrapped around a
// memory file. The RecordingFile passes every operation through and keeps
// an ordered log of the ones that changed the file. CrashStates then replays
// that log onto the file's initial contents and yields, one at a time, the
// contents a power failure could have left on disk at some point of the run;
// the test opens each with the engine and checks it is consistent.
//
//   auto rec = std::make_unique<RecordingFile>(NewMemFile("t.qcow2", image));
//   ... engine writes through rec ...
//   CrashStates states(image, rec->log(), {.seed = seed, .random_subsets = 32});
//   std::vector<uint8_t> disk;
//   std::string what;
//   while (states.Next(&disk, &what)) { SCOPED_TRACE(what); ... check disk ... }
//
// The crash model
// ---------------
// The log is a sequence of operations: writes, discards, truncates, and
// barriers (flushes that succeeded). Barrier k (k >= 1) is the k-th flush;
// "barrier 0" stands for the start, whose contents are durable by
// definition. The barriers cut the log into segments: segment k is the
// operations after barrier k and before barrier k+1 (or the end of the log).
//
// A barrier guarantees exactly this: once it is in the log, every operation
// logged before it is on disk, in log order. It guarantees nothing about
// operations logged after it. So a crash while segment k is in flight leaves
//   everything up to barrier k, plus any subset of segment k's operations,
//   applied in any order,
// because a disk (or the page cache writing back) may persist unflushed
// writes in any order, or not at all. Applying a subset in a different order
// than it was issued models writes that overlap being persisted sector by
// sector: where two unflushed writes overlap, each sector may hold either.
//
// The states yielded, for each barrier k in order:
//   (a) "barrier k": everything up to barrier k, none of segment k (this is
//       also the state where no unflushed operation reached the disk);
//   (b) each prefix of segment k applied in log order (the prefix that is
//       the whole segment is the next barrier's state, yielded as that);
//   (c) up to `random_subsets` random non-empty subsets of segment k, each
//       applied in a random order, skipping those equal to a prefix or to an
//       earlier subset. Reproducible from `seed`.
// Unless max_states cuts the enumeration short, one of the states is the
// whole log applied, i.e. what the file held when the log was taken: the
// last barrier's state, or the longest prefix after it.
//
// What the model leaves out: an operation is atomic (a write is never torn
// within itself); a failed operation is not logged, although a failed write
// may have written part of its data; the file size simply follows the
// operations applied (a write past the end extends the file even when
// nothing before it persisted). A discard zeroes its range when applied
// (a punched hole), or with `discard_zeroes` off never changes anything (a
// filesystem that cannot punch); run both if the engine must not care.
//
// Logging order. Writes, discards and truncates are logged when they
// complete, and only if they succeed. A flush is logged where it was
// *issued*, and dropped again if it fails: it covers only what completed
// before it was called, so a write that completes while the flush is in
// flight lands after its barrier, in the unflushed segment.

#ifndef QCOW2FUSE_IO_RECORDING_FILE_H_
#define QCOW2FUSE_IO_RECORDING_FILE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "io/block_file.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

// One logged operation.
struct FileOp {
  enum class Kind { kWrite, kFlush, kDiscard, kTruncate, kAllocate };

  Kind kind = Kind::kWrite;
  // kWrite, kDiscard, kAllocate: where the range starts. kTruncate: the
  // new size.
  uint64_t offset = 0;
  // kDiscard, kAllocate: the length of the range. kWrite: data.size().
  uint64_t length = 0;
  // kWrite: the bytes written.
  std::vector<uint8_t> data = {};

  // E.g. "write [4096, +512)", "flush", "discard [0, +65536)",
  // "truncate to 8192".
  std::string ToString() const;
};

// Applies `op` to `contents` as the disk would: a write overwrites and
// extends, a discard zeroes its range within the file when `discard_zeroes`
// (else does nothing), a truncate resizes (growing with zeros), a flush
// does nothing.
void ApplyFileOp(const FileOp& op, bool discard_zeroes, std::vector<uint8_t>* contents);

// A BlockFile that forwards everything to `inner` and logs the operations
// that change it (see the logging order above). Thread-safe like `inner`.
class RecordingFile final : public BlockFile {
 public:
  explicit RecordingFile(std::unique_ptr<BlockFile> inner);

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override;
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override;
  Task<absl::Status> Flush() override;
  Task<absl::Status> Discard(uint64_t offset, uint64_t length) override;
  Task<absl::Status> Truncate(uint64_t size) override;
  Task<absl::Status> Allocate(uint64_t offset, uint64_t length) override;

  uint64_t size() const override { return inner_->size(); }
  bool writable() const override { return inner_->writable(); }
  absl::StatusOr<uint64_t> NextData(uint64_t offset) override { return inner_->NextData(offset); }
  absl::StatusOr<uint64_t> NextHole(uint64_t offset) override { return inner_->NextHole(offset); }
  int fd() const override { return inner_->fd(); }
  const std::string& name() const override { return inner_->name(); }

  // A copy of the log so far, in order.
  std::vector<FileOp> log() const;
  // Forgets the log, e.g. after setting up the file, so that the setup
  // counts as the initial contents.
  void ClearLog();

  BlockFile& inner() { return *inner_; }
  const BlockFile& inner() const { return *inner_; }

 private:
  struct Entry {
    uint64_t id;  // finds a pending flush again to drop it
    FileOp op;
  };
  void Append(FileOp op);

  const std::unique_ptr<BlockFile> inner_;
  mutable std::mutex mu_;
  std::vector<Entry> log_;  // guarded by mu_
  uint64_t next_id_ = 0;    // guarded by mu_
};

// Bounds and seed of a CrashStates enumeration.
struct CrashStateOptions {
  // Seeds the random subsets; the same seed, log and options give the same
  // states in the same order, on any platform.
  uint64_t seed = 0;
  // At most this many random subsets per segment; 0 for prefixes only.
  size_t random_subsets = 16;
  // At most this many prefix states per segment; when a segment has more
  // prefixes, evenly spaced ones are taken (always including the longest).
  // 0 for no limit.
  size_t max_prefixes = 64;
  // Stop after this many states in all; 0 for no limit.
  size_t max_states = 10000;
  // Whether an applied discard zeroes its range (see the model above).
  bool discard_zeroes = true;
};

// Yields the crash states of a log, one at a time, holding only a few
// copies of the file at once.
class CrashStates {
 public:
  CrashStates(std::vector<uint8_t> initial, std::vector<FileOp> log,
              CrashStateOptions options = {});

  // Stores the next state's contents and a description of it (which
  // barrier, which operations, the seed for random ones) and returns true;
  // returns false when there are no more. Either pointer may be null.
  bool Next(std::vector<uint8_t>* contents, std::string* description);

  // About the state Next() last returned: its barrier, and the log indices
  // of the unflushed operations applied on top of that barrier, in the
  // order they were applied.
  size_t barrier() const { return segment_; }
  const std::vector<size_t>& unflushed_applied() const { return applied_; }

  // The number of barriers in the log, and of states yielded so far.
  size_t barrier_count() const { return segments_.size() - 1; }
  size_t states_yielded() const { return yielded_; }

 private:
  enum class Phase { kBarrier, kPrefix, kRandom, kDone };
  struct Segment {
    std::vector<size_t> ops = {};  // log indices, flushes excluded
    bool ends_in_barrier = false;  // false for the last segment
    size_t end_index = 0;          // log index of the closing barrier, or log size
  };

  void StartSegment();
  bool NextRandom(std::vector<uint8_t>* contents, std::string* description);
  void FinishSegment();
  std::string OpList(const std::vector<size_t>& ops) const;
  uint64_t Random(uint64_t bound);  // uniform in [0, bound), portable

  const std::vector<FileOp> log_;
  const CrashStateOptions options_;
  std::vector<Segment> segments_;

  Phase phase_ = Phase::kBarrier;
  size_t segment_ = 0;               // current segment = current barrier
  std::vector<uint8_t> base_;        // contents at barrier segment_
  std::vector<uint8_t> prefix_;      // base_ plus the first prefix_applied_ ops
  size_t prefix_applied_ = 0;
  std::vector<size_t> prefix_lengths_;
  size_t next_prefix_ = 0;
  std::mt19937_64 rng_;
  std::set<std::vector<size_t>> seen_subsets_;
  size_t random_yielded_ = 0;
  size_t random_attempts_ = 0;
  std::vector<size_t> applied_;
  size_t yielded_ = 0;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_IO_RECORDING_FILE_H_
