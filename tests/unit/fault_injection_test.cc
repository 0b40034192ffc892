// Host errors at every I/O point of a mixed write workload: what EIO,
// ENOSPC, a short write, a failed fdatasync or a full disk does to the
// request that meets it, to the requests after it, and to the image.
//
// The image (made with qemu-img and qemu-io) has 512-byte clusters and
// 64-bit refcounts, so that a refcount block covers only 32 KiB of file and
// the one-cluster refcount table 2 MiB: qemu-io fills it to just under the
// point where the workload's allocations need a new refcount block, and the
// new L1 table of the grow needs a larger refcount table. A raw backing
// file, a little longer than the disk, lies beneath. The workload (see
// Workload()) has in-place overwrites, copy-on-write from the backing file,
// allocation past the end of the file, discard, write-zeroes with and
// without unmap, preallocation, a grow over the longer backing file and
// flushes. The layer runs over
//
//   Qcow2Layer -> (LatchedFile, the engine's) -> FaultFile -> RecordingFile -> memory file
//
// A pass-through run counts the host calls of each kind; then, for each
// kind of fault, the workload runs once per call N, with call N failing.
// Each time:
//   - the request that met the fault fails with the errno injected (the
//     one fuse/errno_map.cc answers the kernel with), and never as damage;
//   - later requests are answered; after a one-shot fault they succeed (the
//     disk works again), after a failed fdatasync only flushes (and what
//     needs one) fail, naming the first failure (the latch), and on a full
//     disk they succeed or fail with ENOSPC until it has room again, then
//     succeed;
//   - a write and a flush after the workload succeed, except after a failed
//     fdatasync, when the flush fails (latched) and no fdatasync reaches
//     the file any more;
//   - the live layer reads as the model of the disk (a failed request may
//     have changed its range or not, byte by byte);
//   - the file as it was right after the first successful flush after the
//     fault (a crash then), and the file after the layer is closed, pass
//     `qemu-img check` (leaks allowed), have no corrupt bit, and read
//     (opened again) as what the last successful flush made durable, each
//     byte possibly changed by a request issued since. After a failed
//     fdatasync, so do two crash states: the last good barrier alone, and
//     the whole file without what the failed fdatasync should have made
//     durable (the kernel dropped those pages and went on).
// The workload has no BlockFile::Truncate (only an external data file is
// truncated, when the disk grows): a small test of its own fails that one.
// The sanitizer builds, and QCOW2FUSE_TEST_OPS (the ThreadSanitizer run),
// walk a seeded sample of the points instead of all of them.

#include <errno.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <future>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "data/qcow2_layer.h"
#include "data/raw_layer.h"
#include "fault_file.h"
#include "format/header.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "io/recording_file.h"
#include "qcow2_builder.h"  // Bytes, Pattern, GetBE, ReadBytes, WriteBytes
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"
#include "support/command.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kCluster = 512;
constexpr uint64_t kDiskSize = 4032 * kKiB;     // 126 L1 entries
constexpr uint64_t kBackingSize = 4096 * kKiB;  // one L2 range longer than the disk
// What qemu-io writes first: the file ends a few clusters short of the
// 63rd refcount block (cluster 4032), so the first allocations create it.
constexpr uint64_t kPrefill = 1948 * kKiB;
// The grow: a 4096-entry L1 table is 64 clusters, which takes the file past
// cluster 4096, the end of what a one-cluster refcount table covers.
constexpr uint64_t kGrownSize = 128 * kMiB;
// The part of the disk the workload touches, compared byte by byte; the
// rest must read as zeros.
constexpr uint64_t kModelBytes = 5 * kMiB;
// Steps a full disk stays full after the step that found it full.
constexpr size_t kFullSteps = 2;
constexpr uint64_t kIncompatCorruptBit = uint64_t{1} << 1;

// --- The workload ----------------------------------------------------------------------

struct Step {
  enum Kind { kWrite, kDiscard, kZero, kZeroUnmap, kPreallocate, kGrow, kFlush } kind;
  uint64_t offset = 0;
  uint64_t length = 0;  // kGrow: the new size
  uint32_t pattern = 0;
  const char* what = "";
};

std::string Describe(const Step& s) {
  static const char* const kNames[] = {"write", "discard", "write-zeroes", "write-zeroes (unmap)",
                                       "preallocate", "grow", "flush"};
  if (s.kind == Step::kFlush) return "flush";
  if (s.kind == Step::kGrow) return absl::StrFormat("grow to %u: %s", s.length, s.what);
  return absl::StrFormat("%s [%u, +%u): %s", kNames[s.kind], s.offset, s.length, s.what);
}

const std::vector<Step>& Workload() {
  static const std::vector<Step> steps = {
      {Step::kWrite, 100, 3000, 1, "in place, over qemu-io's clusters"},
      {Step::kWrite, 2 * kMiB + 700, 1500, 2, "partial clusters over the backing file: copy-on-write, a new L2 table"},
      {Step::kWrite, 2 * kMiB + 8 * kKiB, 1024, 3, "whole clusters over the backing file: allocation, no copy"},
      {Step::kFlush},
      {Step::kDiscard, 1 * kMiB, 8 * kKiB, 0, "zero clusters over the backing file; 16 clusters freed at the flush"},
      {Step::kWrite, 1 * kMiB + 1000, 200, 4, "into a zero cluster: allocation past the end of the file"},
      {Step::kFlush},
      {Step::kZero, 1 * kMiB + 64 * kKiB + 100, 3000, 0, "zeros written at both ends, whole clusters keep their host cluster"},
      {Step::kZeroUnmap, 1536 * kKiB, 4 * kKiB, 0, "zero clusters, host clusters freed"},
      {Step::kPreallocate, 1 * kMiB + 2 * kKiB, 2 * kKiB, 0, "over zero clusters: host clusters reserved"},
      {Step::kPreallocate, 3 * kMiB + 100, 1000, 0, "over backing data: copied into clusters of its own"},
      {Step::kWrite, 3 * kMiB + 64 * kKiB, 2048, 5, "allocation in a new L2 table"},
      {Step::kFlush},
      {Step::kGrow, 0, kGrownSize, 0, "a new L1 table, the refcount table grows, zero clusters over the backing file"},
      {Step::kWrite, kDiskSize + 1000, 600, 6, "in the grown part, over a zero cluster"},
      {Step::kWrite, 4 * kMiB + 512 * kKiB + 3, 700, 7, "in the grown part, a new L2 table"},
      {Step::kZero, 2 * kMiB + 8 * kKiB, 1024, 0, "whole clusters written by this workload"},
      {Step::kFlush},
  };
  return steps;
}

// --- The image --------------------------------------------------------------------------

struct Prepared {
  TempDir dir;
  Bytes image;                         // the qcow2 file as qemu made it
  std::shared_ptr<BlockFile> backing;  // base.raw, read by every layer
  Bytes guest;                         // the first kModelBytes of the disk (zeros past its end)
};

// Reads a file that several layers share (the backing file): a copy of
// 4 MiB for each of the thousand layers a walk opens would cost more than
// the walk.
class SharedFile final : public BlockFile {
 public:
  explicit SharedFile(std::shared_ptr<BlockFile> inner) : inner_(std::move(inner)) {}
  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override { return inner_->Read(offset, out); }
  uint64_t size() const override { return inner_->size(); }
  const std::string& name() const override { return inner_->name(); }

 private:
  const std::shared_ptr<BlockFile> inner_;
};

absl::StatusOr<Prepared> MakePrepared(const std::string& label) {
  absl::StatusOr<TempDir> dir = TempDir::Create(label);
  if (!dir.ok()) return dir.status();
  const std::string base = dir->Join("base.raw");
  const std::string top = dir->Join("top.qcow2");
  const std::string raw = dir->Join("top.raw");
  const Bytes backing = Pattern(kBackingSize, 77);
  absl::Status s = WriteBytes(base, backing);
  if (s.ok()) {
    s = CreateImage(top, "qcow2", kDiskSize,
                    {"cluster_size=512", "refcount_bits=64", "backing_file=base.raw", "backing_fmt=raw"});
  }
  // -t unsafe: qemu-io's flushes would cost a second here.
  if (s.ok()) {
    s = RunChecked({"qemu-io", "-t", "unsafe", "-f", "qcow2", "-c",
                    absl::StrFormat("write -P 0x11 0 %u", kPrefill), top})
            .status();
  }
  if (s.ok()) s = ConvertToRaw(top, raw);
  if (!s.ok()) return s;
  absl::StatusOr<Bytes> image = ReadBytes(top);
  if (!image.ok()) return image.status();
  absl::StatusOr<Bytes> guest = ReadBytes(raw);
  if (!guest.ok()) return guest.status();
  guest->resize(kModelBytes, 0);
  return Prepared{*std::move(dir), *std::move(image), NewMemFile("base.raw", backing), *std::move(guest)};
}

ImageOptions Options(bool writable) {
  ImageOptions o;
  o.read_only = !writable;
  return o;
}

// Opens the qcow2 image in `file` over the backing file's bytes.
absl::StatusOr<std::unique_ptr<Qcow2Layer>> OpenLayer(std::unique_ptr<BlockFile> file,
                                                      const std::shared_ptr<BlockFile>& backing, bool writable) {
  Bytes head(std::min<uint64_t>(kHeaderReadSize, file->size()));
  absl::Status read = SyncWait(file->Read(0, head));
  if (!read.ok()) return read;
  absl::StatusOr<Header> header = DecodeHeader(head, file->size());
  if (!header.ok()) return header.status();
  return SyncWait(Qcow2Layer::Open(std::move(file), *std::move(header), nullptr,
                                   NewRawLayer(std::make_unique<SharedFile>(backing)), Options(writable)));
}

// --- The model of the disk -------------------------------------------------------------------

// What each byte of the disk may read as: its value, or, where a request
// failed, any of the values it had or was given since.
class GuestModel {
 public:
  GuestModel(Bytes bytes, uint64_t size) : bytes_(std::move(bytes)), size_(size) {}

  // A request that succeeded.
  void Set(uint64_t offset, std::span<const uint8_t> data) {
    std::copy(data.begin(), data.end(), bytes_.begin() + offset);
    maybe_.erase(maybe_.lower_bound(offset), maybe_.lower_bound(offset + data.size()));
  }
  // A request that failed: each byte is as before or as it asked.
  void Maybe(uint64_t offset, std::span<const uint8_t> data) {
    for (size_t i = 0; i < data.size(); ++i) {
      std::vector<uint8_t>& values = maybe_[offset + i];
      for (uint8_t v : {bytes_[offset + i], data[i]}) {
        if (std::find(values.begin(), values.end(), v) == values.end()) values.push_back(v);
      }
    }
  }
  bool Allows(uint64_t b, uint8_t v) const {
    if (bytes_[b] == v) return true;
    auto it = maybe_.find(b);
    return it != maybe_.end() && std::find(it->second.begin(), it->second.end(), v) != it->second.end();
  }
  bool Certain(uint64_t begin, uint64_t end) const {
    auto it = maybe_.lower_bound(begin);
    return it == maybe_.end() || it->first >= end;
  }
  const Bytes& bytes() const { return bytes_; }
  uint64_t size() const { return size_; }
  void set_size(uint64_t size) { size_ = size; }

 private:
  Bytes bytes_;
  std::map<uint64_t, std::vector<uint8_t>> maybe_;
  uint64_t size_;
};

// A request issued after the last successful flush: on disk, its bytes may
// be there or not.
struct Unflushed {
  uint64_t offset;
  Bytes data;
};

// What the disk may read as: `durable` (with its sizes), each byte possibly
// changed by one of `since`.
struct Expectation {
  const GuestModel& durable;
  const std::vector<Unflushed>& since;
  std::set<uint64_t> sizes;
};

// A file to check, and what its disk may read as.
struct FileState {
  std::string label;
  Bytes file;
  GuestModel durable;
  std::vector<Unflushed> since;
  std::set<uint64_t> sizes;
};

// The first byte of `read` (the disk from 0) the expectation does not allow,
// or SIZE_MAX.
uint64_t FirstUnexplained(const Bytes& read, const Expectation& e) {
  const Bytes& d = e.durable.bytes();
  constexpr uint64_t kChunk = 4096;
  for (uint64_t at = 0; at < read.size(); at += kChunk) {
    const uint64_t end = std::min<uint64_t>(read.size(), at + kChunk);
    if (std::memcmp(read.data() + at, d.data() + at, end - at) == 0) continue;
    for (uint64_t b = at; b < end; ++b) {
      if (e.durable.Allows(b, read[b])) continue;
      const bool explained = std::any_of(e.since.begin(), e.since.end(), [&](const Unflushed& u) {
        return b >= u.offset && b < u.offset + u.data.size() && u.data[b - u.offset] == read[b];
      });
      if (!explained) return b;
    }
  }
  return SIZE_MAX;
}

// Reads the disk of `layer` and checks it against `e`: the first
// kModelBytes byte by byte, a few places past them as zeros.
std::string CheckReads(Qcow2Layer& layer, const Expectation& e) {
  if (!e.sizes.contains(layer.size())) {
    return absl::StrCat("the disk has ", layer.size(), " bytes, not one of the sizes it may have");
  }
  Bytes read(std::min(layer.size(), kModelBytes));
  if (absl::Status s = SyncWait(layer.Read(0, read)); !s.ok()) return absl::StrCat("read: ", s.ToString());
  if (uint64_t b = FirstUnexplained(read, e); b != SIZE_MAX) {
    return absl::StrFormat("guest byte %u reads %#x: neither what the last good flush left (%#x) nor what a "
                           "request since wrote",
                           b, read[b], e.durable.bytes()[b]);
  }
  if (layer.size() > kModelBytes + 4096) {
    for (uint64_t at : {kModelBytes, layer.size() / 2 / 4096 * 4096, layer.size() - 4096}) {
      Bytes tail(4096);
      if (absl::Status s = SyncWait(layer.Read(at, tail)); !s.ok()) return absl::StrCat("read: ", s.ToString());
      if (!std::all_of(tail.begin(), tail.end(), [](uint8_t x) { return x == 0; })) {
        return absl::StrCat("the disk past what the workload wrote is not zero at ", at);
      }
    }
  }
  return "";
}

// --- One run ---------------------------------------------------------------------------------

bool IsFlushFault(const Fault& f) { return f.mode == Fault::kOnce && f.op == HostOp::kFlush; }

// Reports at most this many failures per walk, then only counts them.
constexpr int kMaxReported = 6;

struct WalkSummary {
  size_t runs = 0;
  size_t failed_runs = 0;
  size_t with_leaks = 0;
  uint64_t max_leaks = 0;
};

class FaultRun {
 public:
  FaultRun(const Prepared& setup, Fault fault)
      : setup_(setup),
        fault_(fault),
        state_(std::make_shared<FaultState>(fault)),
        rec_(NewMemFile("top.qcow2", setup.image)),
        model_(setup.guest, kDiskSize),
        durable_(model_) {
    state_->set_on_fire([this] { fired_log_ = rec_.log().size(); });
  }

  const FaultState& state() const { return *state_; }
  std::vector<FileOp> log() const { return rec_.log(); }
  // The problems found, one line each.
  const std::vector<std::string>& problems() const { return problems_; }
  uint64_t leaks() const { return leaks_; }
  // The calls of `op` the workload made (not counting the write and flush
  // after it).
  uint64_t workload_calls(HostOp op) const { return workload_calls_[static_cast<size_t>(op)]; }

  // Runs the workload, then a write and a flush.
  void Go() {
    absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer =
        OpenLayer(std::make_unique<FaultFile>(rec_, state_), setup_.backing, true);
    if (!layer.ok()) return Problem("open: " + layer.status().ToString());
    layer_ = *std::move(layer);
    const std::vector<Step>& steps = Workload();
    size_t clear_before = SIZE_MAX;  // the step before which a full disk has room again
    for (size_t i = 0; i < steps.size(); ++i) {
      if (i == clear_before) state_->ClearDiskFull();
      const bool full_before = state_->disk_full();
      const bool fired_before = state_->fired();
      const absl::Status status = RunStep(steps[i]);
      const std::string where = absl::StrCat("step ", i, " (", Describe(steps[i]), ")");
      if (!fired_before && state_->fired()) {
        ExpectFaultStatus(status, where);
        if (fault_.mode == Fault::kDiskFull) clear_before = i + 1 + kFullSteps;
      } else if (!fired_before) {
        if (!status.ok()) Problem(where + " failed before any fault: " + status.ToString());
      } else {
        ExpectLaterStatus(status, where, full_before);
      }
    }
    for (size_t k = 0; k < kHostOpKinds; ++k) workload_calls_[k] = state_->calls(static_cast<HostOp>(k));
    state_->ClearDiskFull();
    if (fault_.mode != Fault::kNone && !state_->fired()) return Problem("the fault was never reached");
    AfterWorkload();
  }

  // Closes the layer and checks the file, and the crash states that matter.
  void CheckFiles(const TempDir& dir) {
    layer_.reset();
    absl::StatusOr<Bytes> now = MemFileContents(rec_.inner());
    if (!now.ok()) return Problem(now.status().ToString());
    std::vector<FileState> states;
    if (after_flush_) states.push_back(*std::move(after_flush_));
    states.push_back({"the file after close", *now, durable_, since_, Sizes()});
    if (IsFlushFault(fault_)) {
      // No barrier follows the failed one, so the last barrier in the log
      // is the last good one.
      const std::vector<FileOp> log = rec_.log();
      size_t last = 0;
      for (size_t i = 0; i < log.size(); ++i) {
        if (log[i].kind == FileOp::Kind::kFlush) last = i + 1;
      }
      // A crash after the failed fdatasync: nothing since the last good
      // barrier reached the disk.
      Bytes state = setup_.image;
      for (size_t i = 0; i < last; ++i) ApplyFileOp(log[i], true, &state);
      states.push_back({absl::StrCat("the crash state at the last barrier (", last, " of ", log.size(), " operations)"),
                        state, durable_, since_, Sizes()});
      // The kernel dropped the pages the failed fdatasync could not write
      // and went on: everything written after it reached the disk, what
      // it should have covered did not.
      for (size_t i = fired_log_; i < log.size(); ++i) ApplyFileOp(log[i], true, &state);
      states.push_back({absl::StrCat("the file without what the failed fdatasync covered (operations ", last, " to ",
                                     fired_log_, " of ", log.size(), " lost)"),
                        std::move(state), durable_, since_, Sizes()});
    }
    CheckStates(dir, states);
  }

 private:
  absl::Status RunStep(const Step& s) {
    if (s.kind != Step::kGrow && s.kind != Step::kFlush && s.offset + s.length > model_.size()) {
      return absl::OkStatus();  // past the end of a disk whose grow failed: not run
    }
    absl::Status status;
    Bytes data;
    switch (s.kind) {
      case Step::kWrite:
        data = Pattern(s.length, s.pattern);
        status = SyncWait(layer_->Write(s.offset, data));
        break;
      case Step::kDiscard:
        data.assign(s.length, 0);
        status = SyncWait(layer_->Discard(s.offset, s.length));
        break;
      case Step::kZero:
      case Step::kZeroUnmap:
        data.assign(s.length, 0);
        status = SyncWait(layer_->WriteZeroes(s.offset, s.length, s.kind == Step::kZeroUnmap));
        break;
      case Step::kPreallocate:
        status = SyncWait(layer_->Preallocate(s.offset, s.length));
        break;
      case Step::kGrow:
        status = SyncWait(layer_->Truncate(s.length));
        if (status.ok()) {
          model_.set_size(s.length);
          durable_.set_size(s.length);  // the header is written and synced before Truncate returns
        } else {
          failed_grows_.insert(s.length);
        }
        return status;
      case Step::kFlush:
        status = SyncWait(layer_->Flush());
        if (status.ok()) NoteGoodFlush();
        return status;
    }
    if (!data.empty()) {
      if (status.ok()) {
        model_.Set(s.offset, data);
      } else {
        model_.Maybe(s.offset, data);
      }
      since_.push_back({s.offset, std::move(data)});
    }
    return status;
  }

  // The request that met the fault.
  void ExpectFaultStatus(const absl::Status& status, const std::string& where) {
    const int want = fault_.mode == Fault::kDiskFull ? ENOSPC : fault_.error;
    if (status.ok()) {
      return Problem(absl::StrCat(where, " met the fault (", state_->fired_call(), ") and succeeded"));
    }
    if (StatusErrno(status) != want) {
      Problem(absl::StrCat(where, " met the fault and failed with errno ", StatusErrno(status).value_or(0), ", not ",
                           want, ": ", status.ToString()));
    }
    ExpectNotDamage(status, where);
  }

  // A request after the fault.
  void ExpectLaterStatus(const absl::Status& status, const std::string& where, bool full) {
    if (status.ok()) return;
    if (IsFlushFault(fault_)) {
      // Only the latch may fail it: a flush, or a request that needs one.
      if (StatusErrno(status) != EIO || !absl::StrContains(status.message(), "earlier flush")) {
        Problem(absl::StrCat(where, " after the failed fdatasync failed otherwise than by the latch: ",
                             status.ToString()));
      }
    } else if (full) {
      if (StatusErrno(status) != ENOSPC) {
        Problem(absl::StrCat(where, " on a full disk failed with errno ", StatusErrno(status).value_or(0),
                             ", not ENOSPC: ", status.ToString()));
      }
    } else {
      Problem(absl::StrCat(where, " failed after the disk works again: ", status.ToString()));
    }
    ExpectNotDamage(status, where);
  }

  void ExpectNotDamage(const absl::Status& status, const std::string& where) {
    if (absl::IsDataLoss(status) || absl::StrContains(status.message(), "corrupt")) {
      Problem(absl::StrCat(where, ": a host error was taken for damage: ", status.ToString()));
    }
  }

  void AfterWorkload() {
    const bool latched = IsFlushFault(fault_);
    // A write still works; a flush works unless the latch holds.
    const Bytes probe = Pattern(1500, 99);
    const uint64_t at = 3 * kMiB + 5000;
    absl::Status wrote = SyncWait(layer_->Write(at, probe));
    if (wrote.ok()) {
      model_.Set(at, probe);
    } else {
      model_.Maybe(at, probe);
      if (!latched) Problem("a write after the workload failed: " + wrote.ToString());
    }
    since_.push_back({at, probe});
    const absl::Status flushed = SyncWait(layer_->Flush());
    if (latched) {
      if (flushed.ok()) Problem("a flush after the failed fdatasync succeeded");
      if (!absl::StrContains(flushed.message(), "earlier flush") ||
          !absl::StrContains(flushed.message(), "injected failure")) {
        Problem("the flush after the failed fdatasync does not name it: " + flushed.ToString());
      }
      if (state_->calls_after_fault(HostOp::kFlush) != 0) {
        Problem(absl::StrCat(state_->calls_after_fault(HostOp::kFlush),
                             " fdatasync calls reached the file after the failed one"));
      }
    } else if (!flushed.ok()) {
      Problem("a flush after the workload failed: " + flushed.ToString());
    } else {
      NoteGoodFlush();
    }
    // The live view shows every request as the model has it.
    std::set<uint64_t> sizes = {model_.size()};
    const std::vector<Unflushed> none;
    if (std::string why = CheckReads(*layer_, Expectation{model_, none, sizes}); !why.empty()) {
      Problem("the live layer: " + why);
    }
  }

  // After a successful flush everything so far is durable. The first one
  // after the fault is where a crash shows whether the engine recovered
  // from it: the file then is kept to check.
  void NoteGoodFlush() {
    durable_ = model_;
    since_.clear();
    if (!state_->fired() || after_flush_ || fault_.mode == Fault::kNone) return;
    absl::StatusOr<Bytes> now = MemFileContents(rec_.inner());
    if (!now.ok()) return Problem(now.status().ToString());
    after_flush_ = FileState{"the file at the first good flush after the fault", *std::move(now), durable_, {}, Sizes()};
  }

  std::set<uint64_t> Sizes() const {
    std::set<uint64_t> sizes = failed_grows_;
    sizes.insert(durable_.size());
    return sizes;
  }

  // Each state: no corrupt bit, `qemu-img check` (run in parallel), and
  // the engine's reading of it against the model.
  void CheckStates(const TempDir& dir, const std::vector<FileState>& states) {
    std::vector<std::future<absl::StatusOr<QemuCheckReport>>> checks;
    for (size_t i = 0; i < states.size(); ++i) {
      const std::string path = dir.Join(absl::StrCat("state", i, ".qcow2"));
      if (absl::Status s = WriteBytes(path, states[i].file); !s.ok()) return Problem(s.ToString());
      checks.push_back(std::async(std::launch::async, [path] { return QemuCheck(path); }));
    }
    for (size_t i = 0; i < states.size(); ++i) {
      const FileState& st = states[i];
      if (GetBE(st.file, 72, 8) & kIncompatCorruptBit) Problem(st.label + ": the image is marked corrupt");
      absl::StatusOr<std::unique_ptr<Qcow2Layer>> reopened =
          OpenLayer(NewMemFile("state.qcow2", st.file), setup_.backing, false);
      if (!reopened.ok()) {
        Problem(st.label + ": open: " + reopened.status().ToString());
      } else if (std::string why = CheckReads(**reopened, Expectation{st.durable, st.since, st.sizes});
                 !why.empty()) {
        Problem(st.label + ": " + why);
      }
    }
    for (size_t i = 0; i < states.size(); ++i) {
      absl::StatusOr<QemuCheckReport> c = checks[i].get();
      if (!c.ok()) {
        Problem(states[i].label + ": qemu-img check: " + c.status().ToString());
        continue;
      }
      if (c->corruptions != 0 || c->check_errors != 0 || (c->exit_code != 0 && c->exit_code != 3)) {
        Problem(absl::StrCat(states[i].label, ": qemu-img check: ", c->output.substr(0, 1200),
                             c->output.size() > 1200 ? "..." : ""));
      }
      leaks_ = std::max(leaks_, c->leaks);
    }
  }

  void Problem(const std::string& what) { problems_.push_back(what); }

  const Prepared& setup_;
  const Fault fault_;
  std::shared_ptr<FaultState> state_;
  RecordingFile rec_;
  std::unique_ptr<Qcow2Layer> layer_;
  GuestModel model_;    // what the disk reads as now
  GuestModel durable_;  // what the last successful flush made durable
  std::vector<Unflushed> since_;
  std::set<uint64_t> failed_grows_;
  size_t fired_log_ = 0;  // the log's size when the fault fired
  std::optional<FileState> after_flush_;
  std::vector<std::string> problems_;
  uint64_t leaks_ = 0;
  std::array<uint64_t, kHostOpKinds> workload_calls_ = {};
};

// --- Walking the points ----------------------------------------------------------------------

// The calls of each kind the workload made in `run`.
std::map<HostOp, uint64_t> CountsOf(const FaultRun& run) {
  std::map<HostOp, uint64_t> counts;
  for (size_t k = 0; k < kHostOpKinds; ++k) counts[static_cast<HostOp>(k)] = run.workload_calls(static_cast<HostOp>(k));
  return counts;
}

// The sanitizer builds run a walk ten times slower; they are there for
// memory errors and races on the error paths, which a sample finds too.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

// The points to walk out of 1..n: all of them, or in a sanitizer build and
// under QCOW2FUSE_TEST_OPS (the ThreadSanitizer run) a seeded sample of at
// most 6.
std::vector<uint64_t> Points(uint64_t n) {
  constexpr size_t kSample = 6;
  std::vector<uint64_t> all;
  for (uint64_t i = 1; i <= n; ++i) all.push_back(i);
  if ((!kSanitized && std::getenv("QCOW2FUSE_TEST_OPS") == nullptr) || n <= kSample) return all;
  std::mt19937_64 rng(TestSeed());
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(kSample);
  std::sort(all.begin(), all.end());
  return all;
}

// Runs the workload once for each point of `op` with `mode` and `error`.
void Walk(const std::string& label, HostOp op, Fault::Mode mode, int error) {
  ASSERT_OK_AND_ASSIGN(Prepared setup, MakePrepared(label));
  FaultRun pass(setup, Fault{});
  pass.Go();
  ASSERT_TRUE(pass.problems().empty()) << "the workload fails with no fault: " << pass.problems().front();
  const uint64_t total = CountsOf(pass).at(op);
  ASSERT_GT(total, 0u) << "the workload makes no " << HostOpName(op) << " call";
  const std::vector<uint64_t> points = Points(total);
  WalkSummary summary;
  int reported = 0;
  for (uint64_t n : points) {
    const Fault fault{.mode = mode, .op = op, .nth = n, .error = error};
    FaultRun run(setup, fault);
    run.Go();
    if (run.state().fired()) run.CheckFiles(setup.dir);
    ++summary.runs;
    summary.with_leaks += run.leaks() != 0;
    summary.max_leaks = std::max(summary.max_leaks, run.leaks());
    if (run.problems().empty()) continue;
    ++summary.failed_runs;
    if (reported++ < kMaxReported) {
      std::string all;
      for (const std::string& p : run.problems()) absl::StrAppend(&all, "\n  ", p);
      ADD_FAILURE() << fault.ToString() << " (" << run.state().fired_call() << "):" << all;
    }
  }
  std::cout << label << ": " << HostOpName(op) << " calls in the workload: " << total << "; points walked: "
            << summary.runs << " (the call " << Fault{.mode = mode, .op = op, .nth = 0, .error = error}.What()
            << "); runs with problems: " << summary.failed_runs << "; runs that leaked: " << summary.with_leaks
            << " (at most " << summary.max_leaks << " clusters)\n";
  EXPECT_EQ(summary.failed_runs, 0u) << "of " << summary.runs << " runs";
}

// --- The workload covers what it claims ----------------------------------------------------------

// The pass-through run creates a refcount block without growing the table,
// then grows the table, and makes calls of every kind the walks fail; the
// image it leaves is clean and reads as the model.
TEST(FaultInjectionTest, WorkloadCoversRefcountGrowthAndEveryKindOfCall) {
  ASSERT_OK_AND_ASSIGN(Prepared setup, MakePrepared("fi-workload"));
  const uint64_t table_before = GetBE(setup.image, 48, 8);
  ASSERT_EQ(GetBE(setup.image, 56, 4), 1u) << "qemu made a refcount table of more than one cluster";
  const uint64_t clusters_before = setup.image.size() / kCluster;
  ASSERT_LT(clusters_before, 4032u) << "the prefill already reached the 63rd refcount block";
  ASSERT_GT(clusters_before, 4032u - 16) << "the prefill leaves too much room before the 63rd refcount block";

  FaultRun run(setup, Fault{});
  run.Go();
  const std::vector<FileOp> log = run.log();
  run.CheckFiles(setup.dir);
  for (const std::string& p : run.problems()) ADD_FAILURE() << "with no fault: " << p;
  EXPECT_EQ(run.leaks(), 0u) << "with no fault, nothing may leak";
  Bytes file = setup.image;
  for (const FileOp& op : log) ApplyFileOp(op, true, &file);
  EXPECT_NE(GetBE(file, 48, 8), table_before) << "the refcount table did not move: it did not grow";
  EXPECT_GT(GetBE(file, 56, 4), 1u) << "the refcount table did not grow";
  // Blocks 63 (made without growing the table) and 64 (made with it).
  const uint64_t table = GetBE(file, 48, 8);
  EXPECT_NE(GetBE(file, table + 63 * 8, 8), 0u) << "no refcount block 63";
  EXPECT_NE(GetBE(file, table + 64 * 8, 8), 0u) << "no refcount block 64";
  std::map<FileOp::Kind, size_t> kinds;
  for (const FileOp& op : log) ++kinds[op.kind];
  EXPECT_GT(kinds[FileOp::Kind::kWrite], 0u);
  EXPECT_GT(kinds[FileOp::Kind::kFlush], 0u);
  EXPECT_GT(kinds[FileOp::Kind::kDiscard], 0u) << "no host discard (freed clusters)";
  EXPECT_GT(kinds[FileOp::Kind::kAllocate], 0u) << "no host allocation (preallocation, allocation past the end)";
  const std::map<HostOp, uint64_t> counts = CountsOf(run);
  std::cout << "host calls of the workload:";
  for (const auto& [op, n] : counts) std::cout << " " << HostOpName(op) << " " << n << ";";
  std::cout << "\n";
  for (HostOp op : {HostOp::kWrite, HostOp::kAllocate, HostOp::kDiscard, HostOp::kFlush}) {
    EXPECT_GT(counts.at(op), 0u) << HostOpName(op);
  }
}

// --- The walks -------------------------------------------------------------------------------

TEST(FaultInjectionTest, EveryWriteFailingWithEio) { Walk("fi-write-eio", HostOp::kWrite, Fault::kOnce, EIO); }
TEST(FaultInjectionTest, EveryWriteFailingWithEnospc) { Walk("fi-write-enospc", HostOp::kWrite, Fault::kOnce, ENOSPC); }
// A short write lands half its bytes: in a 12-byte header switch (the
// refcount table's or the L1 table's offset and size) that is an offset
// half old and half new, which HeaderWriter must write back.
TEST(FaultInjectionTest, EveryWriteShortThenEnospc) { Walk("fi-write-short", HostOp::kWrite, Fault::kShort, ENOSPC); }
TEST(FaultInjectionTest, EveryAllocateFailingWithEio) { Walk("fi-alloc-eio", HostOp::kAllocate, Fault::kOnce, EIO); }
TEST(FaultInjectionTest, EveryAllocateFailingWithEnospc) {
  Walk("fi-alloc-enospc", HostOp::kAllocate, Fault::kOnce, ENOSPC);
}
TEST(FaultInjectionTest, EveryDiscardFailingWithEio) { Walk("fi-discard-eio", HostOp::kDiscard, Fault::kOnce, EIO); }
TEST(FaultInjectionTest, EveryDiscardFailingWithEnospc) {
  Walk("fi-discard-enospc", HostOp::kDiscard, Fault::kOnce, ENOSPC);
}
TEST(FaultInjectionTest, EveryFdatasyncFailingWithEio) { Walk("fi-flush-eio", HostOp::kFlush, Fault::kOnce, EIO); }
TEST(FaultInjectionTest, DiskFullAtEveryCallThatNeedsSpaceUntilCleared) {
  Walk("fi-full", HostOp::kSpace, Fault::kDiskFull, ENOSPC);
}

// --- The external data file's truncate ---------------------------------------------------------

// Growing a disk whose data lies in an external data file first grows that
// file (Resize), the one BlockFile::Truncate the engine makes. Each such
// call fails in turn: the grow fails with the errno and leaves the disk at
// its old size, writes and a flush go on, the grow tried again works, and
// the image (both files) checks clean and reads as written.
void WalkDataFileTruncate(int error) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("fi-truncate"));
  const std::string image = dir.Join("ext.qcow2");
  const std::string data = dir.Join("ext.data");
  const std::string raw = dir.Join("ext.raw");
  // An absolute name: QEMU's tools take a relative one from their working
  // directory.
  ASSERT_OK(CreateImage(image, "qcow2", kMiB, {"data_file=" + data, "data_file_raw=on"}));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x33 0 64k"}));
  ASSERT_OK_AND_ASSIGN(const Bytes image_bytes, ReadBytes(image));
  ASSERT_OK_AND_ASSIGN(const Bytes data_bytes, ReadBytes(data));
  const Bytes a = Pattern(3000, 1), b = Pattern(5000, 2);
  const uint64_t at_a = 100 * kKiB, at_b = kMiB + 300 * kKiB;

  // Runs the sequence with `fault`; returns the truncate calls it made.
  auto run = [&](Fault fault) -> uint64_t {
    auto state = std::make_shared<FaultState>(fault);
    std::unique_ptr<BlockFile> image_file = NewMemFile("ext.qcow2", image_bytes);
    std::unique_ptr<BlockFile> data_file = NewMemFile("ext.data", data_bytes);
    absl::StatusOr<Header> header = DecodeHeader(image_bytes, image_bytes.size());
    EXPECT_OK(header);
    if (!header.ok()) return 0;
    absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer =
        SyncWait(Qcow2Layer::Open(std::make_unique<FaultFile>(*image_file, state), *std::move(header),
                                  std::make_unique<FaultFile>(*data_file, state), nullptr, Options(true)));
    EXPECT_OK(layer);
    if (!layer.ok()) return 0;
    Qcow2Layer& l = **layer;
    EXPECT_OK(SyncWait(l.Write(at_a, a)));
    const absl::Status grown = SyncWait(l.Truncate(2 * kMiB));
    if (fault.mode != Fault::kNone) {
      EXPECT_TRUE(state->fired()) << fault.ToString() << ": not reached";
      EXPECT_FALSE(grown.ok()) << fault.ToString() << ": the grow succeeded";
      EXPECT_EQ(StatusErrno(grown), error) << grown;
      EXPECT_FALSE(absl::IsDataLoss(grown)) << grown;
      EXPECT_EQ(l.size(), kMiB) << "a grow that failed changed the disk's size";
      EXPECT_OK(SyncWait(l.Flush())) << "a flush after the failed grow";
      EXPECT_OK(SyncWait(l.Truncate(2 * kMiB))) << "the grow tried again";
    } else {
      EXPECT_OK(grown);
    }
    const uint64_t calls = state->calls(HostOp::kTruncate);
    EXPECT_OK(SyncWait(l.Write(at_b, b)));
    EXPECT_OK(SyncWait(l.Flush()));
    layer->reset();
    absl::StatusOr<Bytes> image_now = MemFileContents(*image_file);
    absl::StatusOr<Bytes> data_now = MemFileContents(*data_file);
    EXPECT_OK(image_now);
    EXPECT_OK(data_now);
    if (!image_now.ok() || !data_now.ok()) return calls;
    EXPECT_FALSE(GetBE(*image_now, 72, 8) & kIncompatCorruptBit) << fault.ToString() << ": marked corrupt";
    EXPECT_OK(WriteBytes(image, *image_now));
    EXPECT_OK(WriteBytes(data, *data_now));
    absl::StatusOr<QemuCheckReport> c = QemuCheck(image);
    EXPECT_OK(c);
    if (c.ok()) {
      EXPECT_EQ(c->corruptions + c->check_errors, 0u) << fault.ToString() << "\n" << c->output;
    }
    Bytes want(2 * kMiB, 0);
    std::fill(want.begin(), want.begin() + 64 * kKiB, 0x33);
    std::copy(a.begin(), a.end(), want.begin() + at_a);
    std::copy(b.begin(), b.end(), want.begin() + at_b);
    EXPECT_OK(ConvertToRaw(image, raw));
    absl::StatusOr<Bytes> read = ReadBytes(raw);
    EXPECT_OK(read);
    if (read.ok()) {
      EXPECT_TRUE(*read == want) << fault.ToString() << ": the disk reads differently";
    }
    return calls;
  };

  const uint64_t total = run(Fault{});
  ASSERT_GT(total, 0u) << "growing the disk did not truncate the data file";
  for (uint64_t n = 1; n <= total; ++n) run(Fault{.mode = Fault::kOnce, .op = HostOp::kTruncate, .nth = n, .error = error});
  std::cout << "truncate calls of the data file: " << total << "; points walked: " << total << " (the call "
            << Fault{.mode = Fault::kOnce, .op = HostOp::kTruncate, .nth = 0, .error = error}.What() << ")\n";
}

TEST(FaultInjectionTest, EveryDataFileTruncateFailingWithEio) { WalkDataFileTruncate(EIO); }
TEST(FaultInjectionTest, EveryDataFileTruncateFailingWithEnospc) { WalkDataFileTruncate(ENOSPC); }

}  // namespace
}  // namespace qcow2fuse::test
