// Crash-state replays of the write path, shared by the tests that run
// them (write_path_test.cc, crash_states_test.cc).
//
// CrashRun drives a writable Qcow2Layer over a RecordingFile around a
// memory copy of an image, optionally over a backing layer, and remembers
// what each request asked the guest disk to read and from which barrier on
// it is durable. CrashChecker then judges file states (those CrashStates
// enumerates, or any other) with QEMU's tools:
//
//   - `qemu-img check` finds no corruption and no check error. Leaks are
//     allowed: a crash may leak the clusters of requests not yet flushed.
//   - `qemu-img convert` reads a disk the requests explain (the promise of
//     the flush protocol): every request whose Flush returned at or before
//     the state's barrier is there; any other request issued before the end
//     of the state's segment may be there, wholly or in part, byte by byte;
//     nothing else changed. A guest write is, within each guest cluster no
//     other such request touches, all old or all new: one L2 entry switches
//     the piece, or it was written in place in one go. Zeroing requests
//     (discard, write-zeroes) may land in pieces (zeros written in place,
//     then a zero bit switched), so only the byte rule holds for them.
//   - The virtual size is the durable one, or one a resize not yet durable
//     asked for. Growing makes the new space read as zeros, whatever lies
//     in a longer backing file: the model's disk is zeros there.
//
//   auto run = CrashRun::Start(image_bytes, std::move(backing));
//   ASSERT_OK((*run)->Discard(0, 65536));
//   ASSERT_OK((*run)->Flush());
//   CrashChecker checker(dir, **run, old_guest);
//   checker.CheckAll({.seed = seed, .random_subsets = 4, .max_states = 0});
//   checker.Report("discard");

#ifndef QCOW2FUSE_TESTS_UNIT_CRASH_HARNESS_H_
#define QCOW2FUSE_TESTS_UNIT_CRASH_HARNESS_H_

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <iostream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "data/layer.h"
#include "data/qcow2_layer.h"
#include "format/header.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "io/recording_file.h"
#include "qcow2_builder.h"  // Bytes, GetBE, ReadBytes, ReadBytesInto, WriteBytes
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"
#include "support/command.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {

// The ThreadSanitizer run (it sets QCOW2FUSE_TEST_OPS) is there for races
// and runs the engine ten times slower: it samples fewer crash states.
inline size_t SampleStates(size_t n) {
  return std::getenv("QCOW2FUSE_TEST_OPS") != nullptr ? std::min<size_t>(n, 1) : n;
}

// One request in the model of the guest disk.
struct CrashRequest {
  std::string what;      // e.g. "discard [0, +65536)", for failure messages
  uint64_t offset = 0;
  Bytes data;            // what the range reads once done (zeros for discard, write-zeroes)
  bool atomic = false;   // all old or all new per guest cluster (guest writes)
  size_t log_before = 0;           // log size when it was issued
  size_t durable_at = SIZE_MAX;    // barriers in the log when a Flush covering it returned
};

// One resize in the model.
struct CrashResize {
  uint64_t size = 0;
  size_t log_before = 0;
  size_t durable_at = SIZE_MAX;
};

class CrashRun {
 public:
  // Opens `initial` writable (a dirty image is repaired right here, and
  // that is logged too) over `backing` (or none).
  static absl::StatusOr<std::unique_ptr<CrashRun>> Start(Bytes initial, std::unique_ptr<Layer> backing = nullptr,
                                                         ImageOptions options = Options()) {
    absl::StatusOr<Header> header = DecodeHeader(initial, initial.size());
    if (!header.ok()) return header.status();
    std::unique_ptr<CrashRun> run(new CrashRun());
    run->initial_ = initial;
    run->initial_size_ = header->size;
    auto rec = std::make_unique<RecordingFile>(NewMemFile("crash.qcow2", std::move(initial)));
    run->rec_ = rec.get();
    absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer =
        SyncWait(Qcow2Layer::Open(std::move(rec), std::move(*header), nullptr, std::move(backing), options));
    if (!layer.ok()) return layer.status();
    run->layer_ = std::move(*layer);
    return run;
  }

  static ImageOptions Options() {
    ImageOptions o;
    o.read_only = false;
    return o;
  }

  absl::Status Write(uint64_t offset, Bytes data) {
    const size_t before = LogSize();
    absl::Status s = SyncWait(layer_->Write(offset, data));
    if (s.ok()) {
      requests_.push_back(
          {absl::StrCat("write [", offset, ", +", data.size(), ")"), offset, std::move(data), true, before});
    }
    return s;
  }
  absl::Status Discard(uint64_t offset, uint64_t length) {
    const size_t before = LogSize();
    absl::Status s = SyncWait(layer_->Discard(offset, length));
    if (s.ok()) {
      requests_.push_back(
          {absl::StrCat("discard [", offset, ", +", length, ")"), offset, Bytes(length, 0), false, before});
    }
    return s;
  }
  absl::Status WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) {
    const size_t before = LogSize();
    absl::Status s = SyncWait(layer_->WriteZeroes(offset, length, may_unmap));
    if (s.ok()) {
      requests_.push_back({absl::StrCat(may_unmap ? "write-zeroes unmap [" : "write-zeroes [", offset, ", +",
                                        length, ")"),
                           offset, Bytes(length, 0), false, before});
    }
    return s;
  }
  // Changes nothing the guest reads.
  absl::Status Preallocate(uint64_t offset, uint64_t length) { return SyncWait(layer_->Preallocate(offset, length)); }
  // Growing only: the model has no room for what a shrink would drop.
  absl::Status Truncate(uint64_t size) {
    if (size < layer_->size()) return absl::InvalidArgumentError("the crash model grows disks only");
    const size_t before = LogSize();
    absl::Status s = SyncWait(layer_->Truncate(size));
    if (s.ok()) resizes_.push_back({size, before, Barriers()});  // the header write is flushed
    return s;
  }
  absl::Status Flush() { return Durable(SyncWait(layer_->Flush())); }
  // The final flush, which also stores the persistent dirty bitmaps.
  absl::Status Close() { return Durable(SyncWait(layer_->Close())); }

  const Bytes& initial() const { return initial_; }
  uint64_t initial_size() const { return initial_size_; }
  // What the file holds now.
  absl::StatusOr<Bytes> contents() const { return MemFileContents(rec_->inner()); }
  std::vector<FileOp> log() const { return rec_->log(); }
  const std::vector<CrashRequest>& requests() const { return requests_; }
  const std::vector<CrashResize>& resizes() const { return resizes_; }
  Qcow2Layer& layer() { return *layer_; }
  const Qcow2Layer& layer() const { return *layer_; }
  size_t Barriers() const {
    const std::vector<FileOp> log = rec_->log();
    return std::count_if(log.begin(), log.end(), [](const FileOp& op) { return op.kind == FileOp::Kind::kFlush; });
  }

 private:
  CrashRun() = default;
  size_t LogSize() const { return rec_->log().size(); }
  // After a flush or close: what it covered is durable.
  absl::Status Durable(absl::Status s) {
    if (s.ok()) {
      const size_t barriers = Barriers();
      for (CrashRequest& r : requests_) r.durable_at = std::min(r.durable_at, barriers);
      for (CrashResize& r : resizes_) r.durable_at = std::min(r.durable_at, barriers);
    }
    return s;
  }

  Bytes initial_;
  uint64_t initial_size_ = 0;
  RecordingFile* rec_ = nullptr;
  std::unique_ptr<Qcow2Layer> layer_;
  std::vector<CrashRequest> requests_;
  std::vector<CrashResize> resizes_;
};

struct CrashSummary {
  size_t states = 0;
  size_t failed = 0;
  size_t with_leaks = 0;
  uint64_t max_leaks = 0;
  double qemu_seconds = 0;
};

// Judges file states of a CrashRun's log (see the top of this file).
class CrashChecker {
 public:
  // `old_guest`: what the disk read when the run started (run.initial()
  // read by qemu-img convert).
  CrashChecker(const TempDir& dir, const CrashRun& run, Bytes old_guest)
      : dir_(dir), run_(run), log_(run.log()), old_guest_(std::move(old_guest)) {
    for (size_t i = 0; i < log_.size(); ++i) {
      if (log_[i].kind == FileOp::Kind::kFlush) barrier_index_.push_back(i);
    }
    cluster_size_ = run.layer().cluster_size();
    uint64_t largest = old_guest_.size();
    for (const CrashResize& r : run.resizes()) largest = std::max(largest, r.size);
    old_guest_.resize(largest, 0);  // new space reads as zeros
  }

  const std::vector<FileOp>& log() const { return log_; }
  // Log index of barrier k + 1 at [k].
  const std::vector<size_t>& barrier_index() const { return barrier_index_; }

  // Every state CrashStates yields; `transform`, if given, turns a state
  // into the file to judge (e.g. what opening it again would make of it).
  void CheckAll(CrashStateOptions options,
                const std::function<absl::StatusOr<Bytes>(const Bytes&)>& transform = nullptr) {
    CrashStates states(run_.initial(), log_, options);
    Bytes contents;
    std::string what;
    while (states.Next(&contents, &what)) {
      if (summary_.failed >= 5) {  // enough to go on
        ++summary_.states;
        continue;
      }
      if (transform) {
        absl::StatusOr<Bytes> changed = transform(contents);
        if (!changed.ok()) {
          ++summary_.states;
          ++summary_.failed;
          ADD_FAILURE() << "crash state " << what << ": " << changed.status();
          continue;
        }
        contents = *std::move(changed);
      }
      Check(contents, states.barrier(), what);
    }
  }

  // One state: everything up to barrier `barrier` and some operations of
  // the segment after it.
  void Check(const Bytes& contents, size_t barrier, const std::string& what) {
    ++summary_.states;
    if (summary_.failed >= 5) return;
    bool ok = true;
    auto fail = [&](const std::string& why) {
      if (ok) ++summary_.failed;
      ok = false;
      ADD_FAILURE() << "crash state " << what << ": " << why;
    };
    const std::string state_path = dir_.Join("state.qcow2");
    const std::string raw_path = dir_.Join("state.raw");
    ASSERT_OK(WriteBytes(state_path, contents));
    const auto start = std::chrono::steady_clock::now();
    // qemu-img check and the conversion to raw side by side.
    std::future<absl::StatusOr<QemuCheckReport>> checked =
        std::async(std::launch::async, [&] { return QemuCheck(state_path); });
    absl::StatusOr<CommandResult> conv =
        RunCommand({"qemu-img", "convert", "-t", "unsafe", "-f", "qcow2", "-O", "raw", state_path, raw_path});
    ASSERT_OK_AND_ASSIGN(QemuCheckReport c, checked.get());
    summary_.qemu_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (c.corruptions != 0 || c.check_errors != 0 || (c.exit_code != 0 && c.exit_code != 3)) {
      return fail("qemu-img check: " + c.output);
    }
    summary_.with_leaks += c.leaks != 0;
    summary_.max_leaks = std::max(summary_.max_leaks, c.leaks);
    ASSERT_OK(conv);
    if (!conv->ok()) return fail("qemu-img convert: " + conv->stderr_text);
    ASSERT_OK(ReadBytesInto(raw_path, disk_));
    const Bytes& disk = disk_;

    const size_t segment_end = barrier < barrier_index_.size() ? barrier_index_[barrier] : log_.size();
    // The size: the durable one, or one a resize issued since asked for.
    uint64_t durable_size = run_.initial_size();
    std::vector<uint64_t> sizes;
    for (const CrashResize& r : run_.resizes()) {
      if (r.durable_at <= barrier) {
        durable_size = r.size;
      } else if (r.log_before < segment_end) {
        sizes.push_back(r.size);
      }
    }
    sizes.push_back(durable_size);
    if (std::find(sizes.begin(), sizes.end(), disk.size()) == sizes.end()) {
      return fail(absl::StrCat("virtual size ", disk.size(), "; the durable size is ", durable_size));
    }
    if (barrier != base_barrier_) {
      base_ = old_guest_;
      for (const CrashRequest& r : run_.requests()) {
        if (r.durable_at <= barrier) std::copy(r.data.begin(), r.data.end(), base_.begin() + r.offset);
      }
      base_barrier_ = barrier;
    }
    // The requests that may have reached the disk without being durable.
    std::vector<const CrashRequest*> maybe;
    for (const CrashRequest& r : run_.requests()) {
      if (r.durable_at > barrier && r.log_before < segment_end) maybe.push_back(&r);
    }
    // Every byte: as durable, or as one of those requests left it. Compared
    // a block at a time, and byte by byte only where a block is neither as
    // durable nor as one request left it.
    constexpr uint64_t kBlock = 4096;
    for (uint64_t from = 0; from < disk.size() && ok; from += kBlock) {
      const uint64_t to = std::min<uint64_t>(from + kBlock, disk.size());
      if (std::memcmp(disk.data() + from, base_.data() + from, to - from) == 0) continue;
      const bool one_request = std::any_of(maybe.begin(), maybe.end(), [&](const CrashRequest* r) {
        return r->offset <= from && to <= r->offset + r->data.size() &&
               std::memcmp(disk.data() + from, r->data.data() + (from - r->offset), to - from) == 0;
      });
      if (one_request) continue;
      for (uint64_t b = from; b < to && ok; ++b) {
        if (disk[b] == base_[b]) continue;
        const CrashRequest* explained = nullptr;
        for (const CrashRequest* r : maybe) {
          if (b >= r->offset && b < r->offset + r->data.size() && r->data[b - r->offset] == disk[b]) explained = r;
        }
        if (explained == nullptr) {
          fail(absl::StrCat("guest byte ", b, " reads ", int{disk[b]}, ", neither what the durable requests left (",
                            int{base_[b]}, ") nor what a request issued since put there",
                            base_[b] == old_guest_[b] ? "" : " (a durable request had changed it)"));
        }
      }
    }
    // A guest write is all old or all new in each cluster no other such
    // request touches.
    for (const CrashRequest* r : maybe) {
      if (!r->atomic || !ok) continue;
      for (uint64_t o = r->offset; o < r->offset + r->data.size() && ok;) {
        const uint64_t end = std::min<uint64_t>(r->offset + r->data.size(), (o / cluster_size_ + 1) * cluster_size_);
        const bool shared = std::any_of(maybe.begin(), maybe.end(), [&](const CrashRequest* v) {
          return v != r && v->offset < end && o < v->offset + v->data.size();
        });
        if (!shared && end <= disk.size()) {
          const bool is_new = std::memcmp(disk.data() + o, r->data.data() + (o - r->offset), end - o) == 0;
          const bool is_old = std::memcmp(disk.data() + o, base_.data() + o, end - o) == 0;
          if (!is_new && !is_old) {
            fail(absl::StrCat("guest bytes [", o, ", ", end, ") of ", r->what, " are partly old, partly new"));
          }
        }
        o = end;
      }
    }
  }

  const CrashSummary& summary() const { return summary_; }
  // Prints what was checked and fails the test if any state failed.
  void Report(const std::string& label) const {
    std::cout << label << ": " << summary_.states << " crash states checked (" << barrier_index_.size()
              << " barriers, " << log_.size() << " logged operations); with leaks: " << summary_.with_leaks
              << ", most leaked clusters: " << summary_.max_leaks << "; " << summary_.qemu_seconds
              << " s in qemu-img\n";
    ::testing::Test::RecordProperty("crash_states", std::to_string(summary_.states));
    EXPECT_EQ(summary_.failed, 0u) << label << ": of " << summary_.states << " crash states";
  }

 private:
  const TempDir& dir_;
  const CrashRun& run_;
  const std::vector<FileOp> log_;
  Bytes old_guest_;
  std::vector<size_t> barrier_index_;
  uint64_t cluster_size_ = 0;
  size_t base_barrier_ = SIZE_MAX;
  Bytes base_;
  Bytes disk_;  // the state's disk as qemu-img converts it, kept to reuse its pages
  CrashSummary summary_;
};

// The file with the whole log applied: what a run left.
inline Bytes FinalContents(const CrashRun& run) {
  Bytes out = run.initial();
  for (const FileOp& op : run.log()) ApplyFileOp(op, true, &out);
  return out;
}

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_UNIT_CRASH_HARNESS_H_
