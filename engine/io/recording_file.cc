#include "io/recording_file.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace qcow2fuse {
namespace {

// Descriptions list at most this many operations; a state of a segment of
// thousands of writes needs a readable message more than a complete one.
constexpr size_t kMaxListed = 12;

// SplitMix64: spreads (seed, segment) into independent generator seeds, so
// that a segment's random states depend only on the seed and the segment,
// not on how many states other segments produced.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

std::string FileOp::ToString() const {
  switch (kind) {
    case Kind::kWrite:
      return absl::StrFormat("write [%u, +%u)", offset, data.size());
    case Kind::kFlush:
      return "flush";
    case Kind::kDiscard:
      return absl::StrFormat("discard [%u, +%u)", offset, length);
    case Kind::kTruncate:
      return absl::StrFormat("truncate to %u", offset);
    case Kind::kAllocate:
      return absl::StrFormat("allocate [%u, +%u)", offset, length);
  }
  return "?";
}

void ApplyFileOp(const FileOp& op, bool discard_zeroes, std::vector<uint8_t>* contents) {
  switch (op.kind) {
    case FileOp::Kind::kWrite:
      if (op.data.empty()) break;  // does not extend the file, as pwrite
      if (contents->size() < op.offset + op.data.size()) {
        contents->resize(op.offset + op.data.size());
      }
      std::memcpy(contents->data() + op.offset, op.data.data(), op.data.size());
      break;
    case FileOp::Kind::kDiscard:
      if (discard_zeroes && op.offset < contents->size()) {
        const uint64_t n = std::min<uint64_t>(op.length, contents->size() - op.offset);
        std::memset(contents->data() + op.offset, 0, n);
      }
      break;
    case FileOp::Kind::kTruncate:
      contents->resize(op.offset);
      break;
    case FileOp::Kind::kAllocate:
      // Grows the file; what the range held, it keeps.
      if (contents->size() < op.offset + op.length) contents->resize(op.offset + op.length);
      break;
    case FileOp::Kind::kFlush:
      break;
  }
}

// --- RecordingFile --------------------------------------------------------

RecordingFile::RecordingFile(std::unique_ptr<BlockFile> inner) : inner_(std::move(inner)) {}

Task<absl::Status> RecordingFile::Read(uint64_t offset, std::span<uint8_t> out) {
  co_return co_await inner_->Read(offset, out);
}

Task<absl::Status> RecordingFile::Write(uint64_t offset, std::span<const uint8_t> data) {
  FileOp op{.kind = FileOp::Kind::kWrite,
            .offset = offset,
            .length = data.size(),
            .data = std::vector<uint8_t>(data.begin(), data.end())};
  absl::Status status = co_await inner_->Write(offset, data);
  if (status.ok()) Append(std::move(op));
  co_return status;
}

Task<absl::Status> RecordingFile::Flush() {
  // Logged before it runs: it covers only operations completed by now.
  uint64_t id;
  {
    std::lock_guard lock(mu_);
    id = next_id_++;
    log_.push_back({id, FileOp{.kind = FileOp::Kind::kFlush}});
  }
  absl::Status status = co_await inner_->Flush();
  if (!status.ok()) {
    std::lock_guard lock(mu_);
    auto it = std::find_if(log_.rbegin(), log_.rend(), [id](const Entry& e) { return e.id == id; });
    if (it != log_.rend()) log_.erase(std::next(it).base());
  }
  co_return status;
}

Task<absl::Status> RecordingFile::Discard(uint64_t offset, uint64_t length) {
  absl::Status status = co_await inner_->Discard(offset, length);
  if (status.ok()) {
    Append(FileOp{.kind = FileOp::Kind::kDiscard, .offset = offset, .length = length});
  }
  co_return status;
}

Task<absl::Status> RecordingFile::Truncate(uint64_t size) {
  absl::Status status = co_await inner_->Truncate(size);
  if (status.ok()) Append(FileOp{.kind = FileOp::Kind::kTruncate, .offset = size});
  co_return status;
}

Task<absl::Status> RecordingFile::Allocate(uint64_t offset, uint64_t length) {
  absl::Status status = co_await inner_->Allocate(offset, length);
  if (status.ok()) Append(FileOp{.kind = FileOp::Kind::kAllocate, .offset = offset, .length = length});
  co_return status;
}

void RecordingFile::Append(FileOp op) {
  std::lock_guard lock(mu_);
  log_.push_back({next_id_++, std::move(op)});
}

std::vector<FileOp> RecordingFile::log() const {
  std::lock_guard lock(mu_);
  std::vector<FileOp> ops;
  ops.reserve(log_.size());
  for (const Entry& e : log_) ops.push_back(e.op);
  return ops;
}

void RecordingFile::ClearLog() {
  std::lock_guard lock(mu_);
  log_.clear();
}

// --- CrashStates ----------------------------------------------------------

CrashStates::CrashStates(std::vector<uint8_t> initial, std::vector<FileOp> log,
                         CrashStateOptions options)
    : log_(std::move(log)), options_(options), base_(std::move(initial)) {
  Segment current;
  for (size_t i = 0; i < log_.size(); ++i) {
    if (log_[i].kind == FileOp::Kind::kFlush) {
      current.ends_in_barrier = true;
      current.end_index = i;
      segments_.push_back(std::move(current));
      current = Segment();
    } else {
      current.ops.push_back(i);
    }
  }
  current.end_index = log_.size();
  segments_.push_back(std::move(current));
}

bool CrashStates::Next(std::vector<uint8_t>* contents, std::string* description) {
  while (true) {
    if (options_.max_states != 0 && yielded_ >= options_.max_states) phase_ = Phase::kDone;
    switch (phase_) {
      case Phase::kDone:
        return false;

      case Phase::kBarrier: {
        StartSegment();
        phase_ = Phase::kPrefix;
        // After an empty segment this barrier's state is the previous one's.
        if (segment_ > 0 && segments_[segment_ - 1].ops.empty()) break;
        applied_.clear();
        if (contents) *contents = base_;
        if (description) {
          *description =
              segment_ == 0
                  ? std::string("barrier 0: the initial contents")
                  : absl::StrFormat("barrier %u: log[0, %u) durable (flush at log[%u])", segment_,
                                    segments_[segment_ - 1].end_index,
                                    segments_[segment_ - 1].end_index);
        }
        ++yielded_;
        return true;
      }

      case Phase::kPrefix: {
        if (next_prefix_ >= prefix_lengths_.size()) {
          phase_ = Phase::kRandom;
          break;
        }
        const Segment& seg = segments_[segment_];
        const size_t length = prefix_lengths_[next_prefix_++];
        if (prefix_applied_ == 0) prefix_ = base_;
        for (; prefix_applied_ < length; ++prefix_applied_) {
          ApplyFileOp(log_[seg.ops[prefix_applied_]], options_.discard_zeroes, &prefix_);
        }
        applied_.assign(seg.ops.begin(), seg.ops.begin() + length);
        if (contents) *contents = prefix_;
        if (description) {
          *description = absl::StrFormat("barrier %u + the first %u of %u unflushed ops: %s",
                                         segment_, length, seg.ops.size(), OpList(applied_));
        }
        ++yielded_;
        return true;
      }

      case Phase::kRandom:
        if (NextRandom(contents, description)) {
          ++yielded_;
          return true;
        }
        FinishSegment();
        break;
    }
  }
}

void CrashStates::StartSegment() {
  const Segment& seg = segments_[segment_];
  const size_t n = seg.ops.size();
  // The whole segment followed by its barrier is that barrier's state.
  const size_t longest = seg.ends_in_barrier && n > 0 ? n - 1 : n;
  prefix_lengths_.clear();
  if (options_.max_prefixes != 0 && longest > options_.max_prefixes) {
    for (size_t i = 1; i <= options_.max_prefixes; ++i) {
      prefix_lengths_.push_back(i * longest / options_.max_prefixes);
    }
  } else {
    for (size_t i = 1; i <= longest; ++i) prefix_lengths_.push_back(i);
  }
  next_prefix_ = 0;
  prefix_applied_ = 0;
  prefix_.clear();
  rng_.seed(Mix(options_.seed ^ Mix(segment_)));
  seen_subsets_.clear();
  random_yielded_ = 0;
  random_attempts_ = 0;
}

bool CrashStates::NextRandom(std::vector<uint8_t>* contents, std::string* description) {
  const Segment& seg = segments_[segment_];
  const size_t n = seg.ops.size();
  if (n < 2) return false;  // every subset of one op is a prefix
  // Small segments have few distinct subsets; give up after a few misses
  // rather than loop looking for ones that do not exist.
  const size_t max_attempts = 4 * options_.random_subsets + 16;
  std::vector<size_t> order(n);
  while (random_yielded_ < options_.random_subsets && random_attempts_ < max_attempts) {
    ++random_attempts_;
    // A random size, then a partial Fisher-Yates shuffle: the first `size`
    // positions are a uniformly random ordered sample of the segment.
    const size_t size = 1 + Random(n);
    std::iota(order.begin(), order.end(), size_t{0});
    for (size_t i = 0; i < size; ++i) std::swap(order[i], order[i + Random(n - i)]);
    std::vector<size_t> pick(order.begin(), order.begin() + size);
    bool is_prefix = true;
    for (size_t i = 0; i < size; ++i) is_prefix = is_prefix && pick[i] == i;
    if (is_prefix || !seen_subsets_.insert(pick).second) continue;

    applied_.clear();
    for (size_t p : pick) applied_.push_back(seg.ops[p]);
    if (contents) {
      *contents = base_;
      for (size_t i : applied_) ApplyFileOp(log_[i], options_.discard_zeroes, contents);
    }
    if (description) {
      *description =
          absl::StrFormat("barrier %u + random subset %u (seed %u) of %u unflushed ops, applied "
                          "in this order: %s",
                          segment_, random_yielded_, options_.seed, n, OpList(applied_));
    }
    ++random_yielded_;
    return true;
  }
  return false;
}

void CrashStates::FinishSegment() {
  const Segment& seg = segments_[segment_];
  if (segment_ + 1 >= segments_.size()) {
    phase_ = Phase::kDone;
    return;
  }
  // The next barrier's contents: reuse the longest prefix built, if any.
  if (prefix_applied_ > 0) base_ = std::move(prefix_);
  for (size_t i = prefix_applied_; i < seg.ops.size(); ++i) {
    ApplyFileOp(log_[seg.ops[i]], options_.discard_zeroes, &base_);
  }
  prefix_.clear();
  prefix_applied_ = 0;
  ++segment_;
  phase_ = Phase::kBarrier;
}

std::string CrashStates::OpList(const std::vector<size_t>& ops) const {
  std::string out;
  for (size_t i = 0; i < ops.size() && i < kMaxListed; ++i) {
    absl::StrAppend(&out, i > 0 ? ", " : "", "log[", ops[i], "] ", log_[ops[i]].ToString());
  }
  if (ops.size() > kMaxListed) absl::StrAppend(&out, ", ... (", ops.size() - kMaxListed, " more)");
  return out;
}

uint64_t CrashStates::Random(uint64_t bound) {
  // Not std::uniform_int_distribution, whose output differs between
  // standard libraries; the modulo bias is nil for segment-sized bounds.
  return rng_() % bound;
}

}  // namespace qcow2fuse
