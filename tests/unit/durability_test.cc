// Durability steps of the write path under simulated power cuts: what a
// close, a periodic flush and a failed fdatasync leave on disk.
//
// Images are made with qemu-img/qemu-io and opened as a writable Qcow2Layer
// (Image::Flush is top_->Flush()) over a stack of test files:
//
//   Qcow2Layer -> (LatchedFile, the engine's own) -> [GatedFile] -> FaultyFile
//              -> RecordingFile -> memory file
//
// The RecordingFile belongs to the test (Disk), so the layer can be
// destroyed and opened again over the same file and the same log: a close.
// FaultyFile fails the Nth fdatasync with EIO, without passing it on (so no
// barrier is logged for it: the crash model then lets any subset of what was
// written since the last good barrier be lost, in any order, which is what a
// failed fdatasync may have done). Every crash state of the log (CrashStates,
// plus "all but one write of the failed barrier" states) is checked with
// `qemu-img check` (no corruption, no check error; leaks allowed, as in the
// crash tests of write_path_test.cc) and read back with `qemu-img convert`:
// every byte written before the last completed flush or close is there, and
// every other byte is either as before or as one of the writes issued so far
// (per L2-entry piece of a write: all old or all new).
//
//   - Close: random writes and discards in sessions, each ended by Flush(),
//     destroying the layer and opening it again; after each close the file
//     itself is clean (no leaks either) and reads as the model.
//   - Interval flush: a Flush() with nothing changed since the last one does
//     no I/O at all; after an in-place overwrite it is exactly one barrier;
//     a free held back by a read in flight is done by the next idle Flush()
//     once that read is over.
//   - Failed fdatasync: at each of the four barriers of a flush that has
//     dirty refcounts, L2 slices, L1 entries and frees, and at a random
//     fdatasync of a random workload. The failed Flush() reports EIO, later
//     ones fail too naming it (though the file would now succeed), writes go
//     on, no barrier and no write of the header, the L1 table or an L2 table
//     reaches the file after the failure, and every crash state is
//     consistent. A reopen (remount) works again.
//
// GrowWhoseFlushFailedIsNotReportedDoneByARetry: a grow whose flush fails
// leaves the layer at its old size, so a retry writes the header (a bug
// these tests found, fixed in Resize).

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <iostream>
#include <memory>
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
#include "format/header.h"
#include "format/l2_entry.h"
#include "gated_file.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "io/recording_file.h"
#include "qcow2_builder.h"  // Bytes, Pattern
#include "qcow2fuse/image.h"
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"
#include "support/command.h"
#include "support/qemu.h"
#include "support/seed.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

using Kind = FileOp::Kind;
constexpr uint64_t kHostMask = 0x00fffffffffffe00ull;

// The ThreadSanitizer run (it sets QCOW2FUSE_TEST_OPS) is there for races
// and runs the engine ten times slower: it samples fewer crash states.
size_t Sample(size_t n) { return std::getenv("QCOW2FUSE_TEST_OPS") != nullptr ? 1 : n; }

// --- Files ---------------------------------------------------------------------------

// Forwards everything to a file the test owns: the layer can be destroyed
// and opened again over the same RecordingFile.
class Borrowed final : public BlockFile {
 public:
  explicit Borrowed(BlockFile& inner) : inner_(inner) {}
  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override { return inner_.Read(offset, out); }
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override {
    return inner_.Write(offset, data);
  }
  Task<absl::Status> Flush() override { return inner_.Flush(); }
  Task<absl::Status> Discard(uint64_t offset, uint64_t length) override { return inner_.Discard(offset, length); }
  Task<absl::Status> Allocate(uint64_t offset, uint64_t length) override { return inner_.Allocate(offset, length); }
  Task<absl::Status> Truncate(uint64_t size) override { return inner_.Truncate(size); }
  uint64_t size() const override { return inner_.size(); }
  bool writable() const override { return inner_.writable(); }
  const std::string& name() const override { return inner_.name(); }

 private:
  BlockFile& inner_;
};

// What FaultyFile saw; it outlives the layers (and their files).
struct FlushCounts {
  size_t calls = 0;                 // Flush calls that reached the file
  size_t failed_at_log = SIZE_MAX;  // log size when the injected failure happened
  size_t after_failure = 0;         // Flush calls that reached the file after it
  bool fail_next_write = false;     // the next Write fails with ENOSPC
};

// Forwards everything to `rec`, except that Flush call number `fail_at`
// (from 1; 0: none) fails with EIO, as a failed fdatasync, without reaching
// `rec`: no barrier is logged for it. Later calls go through (and would
// succeed): whatever fails them is the engine's doing. A Write fails with
// ENOSPC when FlushCounts::fail_next_write is set (and clears it).
class FaultyFile final : public BlockFile {
 public:
  FaultyFile(RecordingFile& rec, size_t fail_at, FlushCounts* counts)
      : rec_(rec), fail_at_(fail_at), counts_(counts) {}
  Task<absl::Status> Flush() override {
    ++counts_->calls;
    if (counts_->calls == fail_at_) {
      counts_->failed_at_log = rec_.log().size();
      co_return ErrnoStatus(EIO, absl::StrCat("fdatasync of ", name(), " (injected failure)"));
    }
    if (counts_->failed_at_log != SIZE_MAX) ++counts_->after_failure;
    co_return co_await rec_.Flush();
  }
  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override { return rec_.Read(offset, out); }
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override {
    if (std::exchange(counts_->fail_next_write, false)) {
      co_return ErrnoStatus(ENOSPC, absl::StrCat("write of ", name(), " at ", offset, " (injected failure)"));
    }
    co_return co_await rec_.Write(offset, data);
  }
  Task<absl::Status> Discard(uint64_t offset, uint64_t length) override { return rec_.Discard(offset, length); }
  Task<absl::Status> Allocate(uint64_t offset, uint64_t length) override { return rec_.Allocate(offset, length); }
  Task<absl::Status> Truncate(uint64_t size) override { return rec_.Truncate(size); }
  uint64_t size() const override { return rec_.size(); }
  bool writable() const override { return rec_.writable(); }
  const std::string& name() const override { return rec_.name(); }

 private:
  RecordingFile& rec_;
  const size_t fail_at_;
  FlushCounts* const counts_;
};

ImageOptions Writable() {
  ImageOptions o;
  o.read_only = false;
  return o;
}

// --- The disk under test -----------------------------------------------------------

// An image file in memory with its RecordingFile, the layer open on it, and
// what the guest wrote, with the barrier from which each write is durable.
class Disk {
 public:
  struct GuestWrite {
    uint64_t offset;
    Bytes data;          // a discard: zeros
    bool atomic;         // each L2-entry piece all old or all new (not for discards)
    size_t log_before;   // log size when it was issued
    size_t durable_at;   // barriers in the log when a Flush covering it returned; SIZE_MAX: never
  };

  // `fail_flush`: the Flush call of the file that fails (FaultyFile); 0: none.
  Disk(Bytes initial, size_t fail_flush)
      : initial_(initial), rec_(NewMemFile("durability.qcow2", std::move(initial))), fail_flush_(fail_flush) {}
  ~Disk() { layer_.reset(); }

  // Opens a layer on the current contents; `gated` puts a GatedFile in the stack.
  absl::Status Open(bool gated = false) {
    absl::StatusOr<Bytes> now = Contents();
    if (!now.ok()) return now.status();
    absl::StatusOr<Header> header = DecodeHeader(*now, now->size());
    if (!header.ok()) return header.status();
    std::unique_ptr<BlockFile> file = std::make_unique<FaultyFile>(rec_, fail_flush_, &counts_);
    gate_ = nullptr;
    if (gated) {
      auto gate = std::make_unique<GatedFile>(std::move(file));
      gate_ = gate.get();
      file = std::move(gate);
    }
    absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer =
        SyncWait(Qcow2Layer::Open(std::move(file), std::move(*header), nullptr, nullptr, Writable()));
    if (!layer.ok()) return layer.status();
    layer_ = std::move(*layer);
    return absl::OkStatus();
  }
  void Close() {
    layer_.reset();
    gate_ = nullptr;
  }

  absl::Status Write(uint64_t offset, Bytes data) {
    const size_t before = rec_.log().size();
    absl::Status s = SyncWait(layer_->Write(offset, data));
    if (s.ok()) s = NoteDataClusters(offset, data.size());
    if (s.ok()) writes_.push_back({offset, std::move(data), true, before, SIZE_MAX});
    return s;
  }
  absl::Status Discard(uint64_t offset, uint64_t length) {
    const size_t before = rec_.log().size();
    // A partial cluster is zeroed in place, in the host cluster it had
    // before; the entry may then say "zero" and no longer name it.
    if (absl::Status noted = NoteDataClusters(offset, length); !noted.ok()) return noted;
    absl::Status s = SyncWait(layer_->Discard(offset, length));
    if (s.ok()) s = NoteDataClusters(offset, length);
    if (s.ok()) writes_.push_back({offset, Bytes(length, 0), false, before, SIZE_MAX});
    return s;
  }
  absl::Status Flush() {
    absl::Status s = SyncWait(layer_->Flush());
    if (s.ok()) {
      const size_t barriers = Barriers();
      for (GuestWrite& w : writes_) w.durable_at = std::min(w.durable_at, barriers);
    }
    return s;
  }
  // A close: Flush(), the layer destroyed, and a fresh one opened.
  absl::Status CloseAndReopen() {
    absl::Status flushed = Flush();
    Close();
    absl::Status opened = Open();
    return flushed.ok() ? opened : flushed;
  }

  Qcow2Layer& layer() { return *layer_; }
  GatedFile* gate() { return gate_; }
  const FlushCounts& counts() const { return counts_; }
  void FailNextWrite() { counts_.fail_next_write = true; }
  const Bytes& initial() const { return initial_; }
  std::vector<FileOp> log() const { return rec_.log(); }
  size_t Barriers() const {
    const std::vector<FileOp> log = rec_.log();
    return std::count_if(log.begin(), log.end(), [](const FileOp& op) { return op.kind == Kind::kFlush; });
  }
  absl::StatusOr<Bytes> Contents() const { return MemFileContents(rec_.inner()); }
  const std::vector<GuestWrite>& writes() const { return writes_; }
  // The guest disk `old_guest` with every write applied.
  Bytes Expected(Bytes guest) const {
    for (const GuestWrite& w : writes_) std::copy(w.data.begin(), w.data.end(), guest.begin() + w.offset);
    return guest;
  }
  // Host clusters that guest writes made after the injected failure went
  // to (as the layer mapped them right after each write), and those a
  // discard after it may zero in place (mapped before and after it).
  const std::set<uint64_t>& data_clusters_after_failure() const { return data_clusters_; }

 private:
  const Bytes initial_;
  RecordingFile rec_;
  const size_t fail_flush_;
  FlushCounts counts_;
  GatedFile* gate_ = nullptr;
  std::unique_ptr<Qcow2Layer> layer_;
  std::vector<GuestWrite> writes_;
  std::set<uint64_t> data_clusters_;

  absl::Status NoteDataClusters(uint64_t offset, uint64_t length) {
    if (counts_.failed_at_log == SIZE_MAX) return absl::OkStatus();
    const uint64_t cs = layer_->cluster_size();
    for (uint64_t pos = offset; pos < offset + length;) {
      absl::StatusOr<Qcow2Layer::Mapping> m = SyncWait(layer_->Map(pos, offset + length - pos));
      if (!m.ok()) return m.status();
      if (m->type == SubclusterType::kNormal) {
        for (uint64_t c = m->host_offset / cs * cs; c < m->host_offset + m->length; c += cs) data_clusters_.insert(c);
      }
      pos += m->length;
    }
    return absl::OkStatus();
  }
};

// --- Decoding the image bytes ---------------------------------------------------------

struct Geometry {
  uint64_t cluster_size;
  uint64_t size;
  uint32_t l1_size;
  uint64_t l1_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
};

Geometry Geom(const Bytes& b) {
  return {uint64_t{1} << GetBE(b, 20, 4), GetBE(b, 24, 8), static_cast<uint32_t>(GetBE(b, 36, 4)), GetBE(b, 40, 8),
          GetBE(b, 48, 8), static_cast<uint32_t>(GetBE(b, 56, 4))};
}

// Host offsets of the L2 tables the on-disk L1 table points to.
std::set<uint64_t> L2Tables(const Bytes& b) {
  const Geometry g = Geom(b);
  std::set<uint64_t> out;
  for (uint32_t i = 0; i < g.l1_size; ++i) {
    const uint64_t l2 = GetBE(b, g.l1_offset + 8 * i, 8) & kHostMask;
    if (l2 != 0) out.insert(l2);
  }
  return out;
}

// Host clusters of the refcount table and of the blocks it points to.
std::set<uint64_t> RefcountClusters(const Bytes& b) {
  const Geometry g = Geom(b);
  std::set<uint64_t> out;
  for (uint32_t i = 0; i < g.refcount_table_clusters; ++i) out.insert(g.refcount_table_offset + i * g.cluster_size);
  for (uint64_t i = 0; i < g.refcount_table_clusters * g.cluster_size / 8; ++i) {
    const uint64_t block = GetBE(b, g.refcount_table_offset + 8 * i, 8) & ~uint64_t{0x1ff};
    if (block != 0) out.insert(block);
  }
  return out;
}

Bytes Apply(Bytes contents, const std::vector<FileOp>& log, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) ApplyFileOp(log[i], true, &contents);
  return contents;
}

// --- QEMU's verdicts ---------------------------------------------------------------------

// The image at `path` checks with no corruption, error or leak, and reads as
// `guest`.
void ExpectCleanAndReads(const TempDir& dir, const Bytes& image, const Bytes& guest, const std::string& when) {
  const std::string path = dir.Join("now.qcow2");
  const std::string raw = dir.Join("now.raw");
  ASSERT_OK(WriteBytes(path, image));
  ASSERT_OK_AND_ASSIGN(QemuCheckReport c, QemuCheck(path));
  EXPECT_EQ(c.corruptions, 0u) << when << "\n" << c.output;
  EXPECT_EQ(c.check_errors, 0u) << when << "\n" << c.output;
  EXPECT_EQ(c.leaks, 0u) << when << ": leaked clusters with no request in flight\n" << c.output;
  EXPECT_EQ(c.exit_code, 0) << when << "\n" << c.output;
  ASSERT_OK(ConvertToRaw(path, raw));
  ASSERT_OK_AND_ASSIGN(Bytes disk, ReadBytes(raw));
  ASSERT_EQ(disk.size(), guest.size()) << when;
  if (disk != guest) {
    const size_t at = std::mismatch(disk.begin(), disk.end(), guest.begin()).first - disk.begin();
    ADD_FAILURE() << when << ": the image reads differently from what was written, first at guest byte " << at;
  }
}

struct CrashSummary {
  size_t states = 0;
  size_t failed = 0;
  size_t with_leaks = 0;
  uint64_t max_leaks = 0;
};

// Checks crash states of `disk`'s log: qemu-img check finds no corruption
// (leaks allowed) and the guest disk holds every write durable at the
// state's barrier, and otherwise only bytes of writes issued by then.
class CrashChecker {
 public:
  CrashChecker(const TempDir& dir, const Disk& disk, std::vector<FileOp> log, Bytes old_guest)
      : dir_(dir), disk_(disk), log_(std::move(log)), old_guest_(std::move(old_guest)) {
    for (size_t i = 0; i < log_.size(); ++i) {
      if (log_[i].kind == Kind::kFlush) barrier_index_.push_back(i);
    }
    cluster_size_ = Geom(disk.initial()).cluster_size;
  }
  const std::vector<FileOp>& log() const { return log_; }
  const std::vector<size_t>& barrier_index() const { return barrier_index_; }

  void CheckAll(CrashStateOptions options) {
    CrashStates states(disk_.initial(), log_, options);
    Bytes contents;
    std::string what;
    while (states.Next(&contents, &what)) Check(contents, states.barrier(), what);
  }

  // One state: `barrier` barriers applied and some operations after it.
  void Check(const Bytes& contents, size_t barrier, const std::string& what) {
    ++summary_.states;
    if (summary_.failed >= 5) return;  // enough to go on
    bool ok = true;
    auto fail = [&](const std::string& why) {
      if (ok) ++summary_.failed;
      ok = false;
      ADD_FAILURE() << "crash state " << what << ": " << why;
    };
    const std::string state_path = dir_.Join("state.qcow2");
    const std::string raw_path = dir_.Join("state.raw");
    ASSERT_OK(WriteBytes(state_path, contents));
    std::future<absl::StatusOr<QemuCheckReport>> checked =
        std::async(std::launch::async, [&] { return QemuCheck(state_path); });
    absl::StatusOr<CommandResult> conv =
        RunCommand({"qemu-img", "convert", "-t", "unsafe", "-f", "qcow2", "-O", "raw", state_path, raw_path});
    ASSERT_OK_AND_ASSIGN(QemuCheckReport c, checked.get());
    if (c.corruptions != 0 || c.check_errors != 0 || (c.exit_code != 0 && c.exit_code != 3)) {
      return fail("qemu-img check: " + c.output);
    }
    summary_.with_leaks += c.leaks != 0;
    summary_.max_leaks = std::max(summary_.max_leaks, c.leaks);
    ASSERT_OK(conv);
    if (!conv->ok()) return fail("qemu-img convert: " + conv->stderr_text);
    ASSERT_OK_AND_ASSIGN(Bytes disk, ReadBytes(raw_path));
    if (disk.size() != old_guest_.size()) return fail(absl::StrCat("virtual size ", disk.size()));

    const size_t segment_end = barrier < barrier_index_.size() ? barrier_index_[barrier] : log_.size();
    if (barrier != base_barrier_) {
      base_ = old_guest_;
      for (const Disk::GuestWrite& w : disk_.writes()) {
        if (w.durable_at <= barrier) std::copy(w.data.begin(), w.data.end(), base_.begin() + w.offset);
      }
      base_barrier_ = barrier;
    }
    // The writes that may have reached the disk without being durable.
    std::vector<const Disk::GuestWrite*> maybe;
    for (const Disk::GuestWrite& w : disk_.writes()) {
      if (w.durable_at > barrier && w.log_before < segment_end) maybe.push_back(&w);
    }
    // Every byte: as durable, or as one of those writes.
    for (size_t b = 0; b < disk.size() && ok; ++b) {
      if (disk[b] == base_[b]) continue;
      const bool explained = std::any_of(maybe.begin(), maybe.end(), [&](const Disk::GuestWrite* w) {
        return b >= w->offset && b < w->offset + w->data.size() && w->data[b - w->offset] == disk[b];
      });
      if (!explained) {
        fail(absl::StrCat("guest byte ", b, " is neither what the last durable flush left nor what a write ",
                          "issued since put there", base_[b] == old_guest_[b] ? "" : " (it had been written)"));
      }
    }
    // A piece of a write that one L2 entry switches is all old or all new,
    // where no other such write covers it.
    for (const Disk::GuestWrite* w : maybe) {
      if (!w->atomic || !ok) continue;
      for (uint64_t o = w->offset; o < w->offset + w->data.size();) {
        const uint64_t end = std::min<uint64_t>(w->offset + w->data.size(), (o / cluster_size_ + 1) * cluster_size_);
        const bool shared = std::any_of(maybe.begin(), maybe.end(), [&](const Disk::GuestWrite* v) {
          return v != w && v->offset < end && o < v->offset + v->data.size();
        });
        const bool is_new = std::memcmp(disk.data() + o, w->data.data() + (o - w->offset), end - o) == 0;
        const bool is_old = std::memcmp(disk.data() + o, base_.data() + o, end - o) == 0;
        if (!shared && !is_new && !is_old) {
          fail(absl::StrCat("guest bytes [", o, ", ", end, ") of a write at ", w->offset, " are partly old, partly new"));
        }
        o = end;
      }
    }
  }

  const CrashSummary& summary() const { return summary_; }
  void Report(const std::string& label) const {
    std::cout << label << ": " << summary_.states << " crash states checked (" << barrier_index_.size()
              << " barriers, " << log_.size() << " logged operations); with leaks: " << summary_.with_leaks
              << ", most leaked clusters: " << summary_.max_leaks << "\n";
    EXPECT_EQ(summary_.failed, 0u) << label << ": of " << summary_.states << " crash states";
  }

 private:
  const TempDir& dir_;
  const Disk& disk_;
  const std::vector<FileOp> log_;
  const Bytes old_guest_;
  std::vector<size_t> barrier_index_;  // log index of barrier k+1 at [k]
  uint64_t cluster_size_ = 0;
  size_t base_barrier_ = SIZE_MAX;
  Bytes base_;
  CrashSummary summary_;
};

// --- Images -----------------------------------------------------------------------------------

// A disk of 2 MiB less 16 KiB with 512-byte clusters (an L2 table maps
// 32 KiB, a 16-bit refcount block 128 KiB of file; the one-cluster L1 table
// covers 2 MiB, so the disk can grow without a new L1 table): 8 KiB of data
// at 0 and two compressed clusters at 16 KiB. Returns the image bytes and
// the guest disk.
struct Made {
  Bytes image;
  Bytes guest;
};

absl::StatusOr<Made> MakeImage(const TempDir& dir) {
  const std::string path = dir.Join("base.qcow2");
  const std::string raw = dir.Join("base.raw");
  absl::Status s = CreateImage(path, "qcow2", 2 * kMiB - 16 * kKiB, {"cluster_size=512"});
  if (s.ok()) s = QemuIo(path, "qcow2", {"write -P 0x11 0 8k", "write -c -P 0x22 16k 1k"});
  if (s.ok()) s = ConvertToRaw(path, raw);
  if (!s.ok()) return s;
  absl::StatusOr<Bytes> image = ReadBytes(path);
  if (!image.ok()) return image.status();
  absl::StatusOr<Bytes> guest = ReadBytes(raw);
  if (!guest.ok()) return guest.status();
  return Made{*std::move(image), *std::move(guest)};
}

// Reads the first `size` bytes of the disk (all of it by default) through
// the layer.
absl::StatusOr<Bytes> ReadAll(Qcow2Layer& layer, uint64_t size = 0) {
  Bytes out(size != 0 ? size : layer.size());
  absl::Status s = SyncWait(layer.Read(0, out));
  if (!s.ok()) return s;
  return out;
}

// --- Random workloads ------------------------------------------------------------------------

struct Step {
  enum Kind { kWrite, kDiscard, kFlush, kClose } kind;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint32_t pattern = 0;
};

std::string Describe(const Step& s) {
  switch (s.kind) {
    case Step::kWrite:
      return absl::StrFormat("write [%u, +%u) pattern %u", s.offset, s.length, s.pattern);
    case Step::kDiscard:
      return absl::StrFormat("discard [%u, +%u)", s.offset, s.length);
    case Step::kFlush:
      return "flush";
    case Step::kClose:
      return "close";
  }
  return "?";
}

// Writes (half of them in the first 64 KiB: overwrites in place and
// copy-on-write of the compressed clusters), discards, and every few steps
// a flush or a close (`ender`).
std::vector<Step> RandomSteps(std::mt19937_64& rng, uint64_t disk_size, int sessions, Step::Kind ender) {
  auto uniform = [&](uint64_t lo, uint64_t hi) { return std::uniform_int_distribution<uint64_t>(lo, hi)(rng); };
  std::vector<Step> steps;
  uint32_t pattern = 100;
  for (int s = 0; s < sessions; ++s) {
    const int n = static_cast<int>(uniform(2, 6));
    for (int i = 0; i < n; ++i) {
      Step step{Step::kWrite};
      const uint64_t zone = uniform(0, 1) == 0 ? 64 * kKiB : disk_size;
      if (uniform(0, 9) == 0) {
        step.kind = Step::kDiscard;
        step.length = uniform(0, 1) == 0 ? 512 * uniform(1, 8) : uniform(1, 4096);
        step.offset = uniform(0, zone - 1);
        if (uniform(0, 1) == 0) step.offset = step.offset / 512 * 512;
      } else {
        step.length = uniform(0, 3) == 0 ? uniform(1, 8192) : uniform(1, 1500);
        step.offset = uniform(0, zone - 1);
        step.pattern = pattern++;
      }
      step.length = std::min(step.length, disk_size - step.offset);
      steps.push_back(step);
    }
    steps.push_back(Step{ender});
  }
  return steps;
}

// Runs `step` on `disk`: the status of the engine's call.
absl::Status RunStep(Disk& disk, const Step& step) {
  switch (step.kind) {
    case Step::kWrite:
      return disk.Write(step.offset, Pattern(step.length, step.pattern));
    case Step::kDiscard:
      return disk.Discard(step.offset, step.length);
    case Step::kFlush:
      return disk.Flush();
    case Step::kClose:
      return disk.CloseAndReopen();
  }
  return absl::InternalError("unknown step");
}

// --- Close ------------------------------------------------------------------------------------------

// Each close (Flush, the layer destroyed, a new one opened) leaves the file
// clean and holding every write; every crash state of the whole run is
// consistent and holds every write made before the last completed close.
TEST(DurabilityTest, CloseMakesEverythingDurableAndLeavesTheImageClean) {
  const uint64_t seed = TestSeed();
  std::mt19937_64 rng(seed);
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("durable-close"));
  ASSERT_OK_AND_ASSIGN(Made made, MakeImage(dir));
  Disk disk(made.image, 0);
  ASSERT_OK(disk.Open());
  const std::vector<Step> steps = RandomSteps(rng, made.guest.size(), 6, Step::kClose);
  int closes = 0;
  for (const Step& step : steps) {
    SCOPED_TRACE(Describe(step));
    ASSERT_OK(RunStep(disk, step));
    if (step.kind != Step::kClose) continue;
    ++closes;
    // The reopened layer and QEMU both see everything written.
    const Bytes expected = disk.Expected(made.guest);
    ASSERT_OK_AND_ASSIGN(Bytes read, ReadAll(disk.layer()));
    EXPECT_TRUE(read == expected) << "after close " << closes << ", the reopened image reads differently";
    ASSERT_OK_AND_ASSIGN(Bytes now, disk.Contents());
    ASSERT_NO_FATAL_FAILURE(ExpectCleanAndReads(dir, now, expected, absl::StrCat("after close ", closes)));
  }
  // A close with nothing written since is no I/O.
  const size_t logged = disk.log().size();
  ASSERT_OK(disk.CloseAndReopen());
  EXPECT_EQ(disk.log().size(), logged) << "a close with nothing changed did I/O";
  disk.Close();

  CrashChecker checker(dir, disk, disk.log(), made.guest);
  EXPECT_GE(checker.barrier_index().size(), static_cast<size_t>(closes)) << "every close is at least one barrier";
  checker.CheckAll({.seed = seed, .random_subsets = Sample(3), .max_prefixes = Sample(4), .max_states = 0});
  checker.Report("closes");
}

// --- Interval flush -------------------------------------------------------------------------------

std::vector<FileOp> OpsSince(const Disk& disk, size_t from) {
  std::vector<FileOp> log = disk.log();
  return std::vector<FileOp>(log.begin() + std::min(from, log.size()), log.end());
}

std::string Kinds(const std::vector<FileOp>& ops) {
  std::string out;
  for (const FileOp& op : ops) absl::StrAppend(&out, out.empty() ? "" : ", ", op.ToString());
  return out.empty() ? "(nothing)" : out;
}

// What a periodic flush does: nothing at all when nothing changed, one
// barrier after an in-place overwrite, and the frees a read in flight held
// back once that read is over. Every crash state is consistent.
TEST(DurabilityTest, IntervalFlushDoesNoIoWhenIdleAndOneBarrierAfterAnOverwrite) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("durable-interval"));
  ASSERT_OK_AND_ASSIGN(Made made, MakeImage(dir));
  Disk disk(made.image, 0);
  ASSERT_OK(disk.Open(/*gated=*/true));

  // An allocating write, flushed.
  ASSERT_OK(disk.Write(40 * kKiB + 100, Pattern(1000, 1)));
  ASSERT_OK(disk.Flush());
  // Ticks with nothing changed, with a read between them.
  size_t mark = disk.log().size();
  for (int tick = 0; tick < 3; ++tick) {
    ASSERT_OK(disk.Flush());
    Bytes some(4096);
    ASSERT_OK(SyncWait(disk.layer().Read(38 * kKiB, some)));
  }
  EXPECT_EQ(Kinds(OpsSince(disk, mark)), "(nothing)") << "an idle flush must not write or fdatasync";

  // In-place overwrites (of our cluster, and of one qemu-io wrote): the data
  // write, then exactly one barrier.
  for (uint64_t at : {40 * kKiB + 300, uint64_t{600}}) {
    mark = disk.log().size();
    ASSERT_OK(disk.Write(at, Pattern(200, static_cast<uint32_t>(at))));
    const std::vector<FileOp> written = OpsSince(disk, mark);
    ASSERT_EQ(written.size(), 1u) << "an in-place overwrite is one write: " << Kinds(written);
    mark = disk.log().size();
    ASSERT_OK(disk.Flush());
    EXPECT_EQ(Kinds(OpsSince(disk, mark)), "flush") << "after an in-place overwrite at " << at;
    mark = disk.log().size();
    ASSERT_OK(disk.Flush());
    EXPECT_EQ(Kinds(OpsSince(disk, mark)), "(nothing)") << "the next tick";
  }

  // A read in flight on a cluster that a discard then frees: the flush
  // after the discard must keep the cluster (the read may still use it), so
  // the file leaks it for now; ticks while the read runs do nothing; the
  // first tick after it has ended frees it.
  ASSERT_OK_AND_ASSIGN(Qcow2Layer::Mapping m, SyncWait(disk.layer().Map(40 * kKiB, 512)));
  ASSERT_EQ(m.type, SubclusterType::kNormal);
  const uint64_t host = m.host_offset;
  const Bytes before_discard = disk.Expected(made.guest);
  Bytes in_flight(512);
  disk.gate()->HoldNextRead([&](uint64_t offset, size_t) { return offset == host; });
  Started read(disk.layer().Read(40 * kKiB, in_flight));
  ASSERT_TRUE(disk.gate()->holding_read());
  ASSERT_OK(disk.Discard(40 * kKiB, 512));
  ASSERT_OK(disk.Flush());
  {
    ASSERT_OK_AND_ASSIGN(Bytes now, disk.Contents());
    const std::string path = dir.Join("pending.qcow2");
    ASSERT_OK(WriteBytes(path, now));
    ASSERT_OK_AND_ASSIGN(QemuCheckReport c, QemuCheck(path));
    EXPECT_EQ(c.corruptions, 0u) << c.output;
    EXPECT_EQ(c.leaks, 1u) << "the cluster a read in flight may use stays allocated\n" << c.output;
  }
  mark = disk.log().size();
  ASSERT_OK(disk.Flush());
  EXPECT_EQ(Kinds(OpsSince(disk, mark)), "(nothing)") << "a tick while the read still runs";
  disk.gate()->ReleaseRead();
  ASSERT_TRUE(read.done());
  ASSERT_OK(read.status());
  EXPECT_TRUE(std::equal(in_flight.begin(), in_flight.end(), before_discard.begin() + 40 * kKiB))
      << "the read in flight saw its cluster's old data";
  mark = disk.log().size();
  ASSERT_OK(disk.Flush());
  const std::vector<FileOp> freed = OpsSince(disk, mark);
  EXPECT_TRUE(std::any_of(freed.begin(), freed.end(), [](const FileOp& op) { return op.kind == Kind::kFlush; }))
      << "the tick after the read must do the free: " << Kinds(freed);
  {
    ASSERT_OK_AND_ASSIGN(Bytes now, disk.Contents());
    ASSERT_NO_FATAL_FAILURE(ExpectCleanAndReads(dir, now, disk.Expected(made.guest), "after the held-back free"));
  }
  mark = disk.log().size();
  ASSERT_OK(disk.Flush());
  EXPECT_EQ(Kinds(OpsSince(disk, mark)), "(nothing)") << "the tick after that";
  disk.Close();

  CrashChecker checker(dir, disk, disk.log(), made.guest);
  checker.CheckAll({.seed = 1, .random_subsets = Sample(4), .max_prefixes = Sample(8), .max_states = 0});
  checker.Report("interval flushes");
}

// --- Failed fdatasync -----------------------------------------------------------------------------

// After the injected failure (log index `failed_at`), no barrier, and no
// write of the header, the L1 table or an L2 table the file's L1 table
// points to (then or at the end) may reach the file: only guest data (into
// the clusters the layer mapped the writes made after the failure to),
// refcount structures, and empty new L2 tables that no on-disk L1 entry
// points to.
void ExpectNoTableWritesAfter(const Disk& disk, const std::vector<FileOp>& log, size_t failed_at,
                              const std::set<uint64_t>& data_clusters) {
  const Bytes at_failure = Apply(disk.initial(), log, 0, failed_at);
  const Bytes at_end = Apply(disk.initial(), log, 0, log.size());
  const Geometry g = Geom(at_failure);
  const Geometry e = Geom(at_end);
  EXPECT_EQ(e.l1_offset, g.l1_offset);
  EXPECT_EQ(e.l1_size, g.l1_size);
  std::set<uint64_t> tables = L2Tables(at_failure);
  for (uint64_t t : L2Tables(at_end)) tables.insert(t);
  const std::set<uint64_t> refcounts = RefcountClusters(at_end);
  const uint64_t cs = g.cluster_size;
  for (size_t i = failed_at; i < log.size(); ++i) {
    const FileOp& op = log[i];
    const std::string what = absl::StrCat("operation ", i, " (", op.ToString(), "), after the failed barrier: ");
    if (op.kind == Kind::kFlush) {
      ADD_FAILURE() << what << "a barrier after a failed fdatasync claims durability the kernel may not give";
      continue;
    }
    if (op.kind != Kind::kWrite && op.kind != Kind::kAllocate) {
      ADD_FAILURE() << what << "unexpected after the failure";
      continue;
    }
    if (op.length == 0) continue;
    const bool fresh_table = op.kind == Kind::kWrite && op.offset % cs == 0 && op.length == cs &&
                             std::all_of(op.data.begin(), op.data.end(), [](uint8_t b) { return b == 0; });
    for (uint64_t c = op.offset / cs * cs; c < op.offset + op.length; c += cs) {
      if (c == 0) {
        ADD_FAILURE() << what << "writes the header";
      } else if (c < g.l1_offset + uint64_t{g.l1_size} * 8 && g.l1_offset < c + cs) {
        ADD_FAILURE() << what << "writes the L1 table";
      } else if (tables.contains(c)) {
        ADD_FAILURE() << what << "writes the L2 table at " << c << ", which the file's L1 table points to";
      } else if (refcounts.contains(c) || data_clusters.contains(c)) {
        // refcounts may go first; guest data lands in clusters no durable table points to
      } else if (!fresh_table) {
        ADD_FAILURE() << what << "writes cluster " << c
                      << ", neither guest data nor a refcount structure: an L2 slice written back?";
      }
    }
  }
}

// States the crash model holds but CrashStates may not pick: everything up
// to the last good barrier, then every write of the failed barrier but one,
// then everything after the failure.
void CheckAllButOne(CrashChecker& checker, const Disk& disk, size_t failed_at) {
  const std::vector<FileOp>& log = checker.log();
  const std::vector<size_t>& barriers = checker.barrier_index();
  const size_t last = barriers.size();
  const size_t from = last == 0 ? 0 : barriers.back() + 1;
  const Bytes base = Apply(disk.initial(), log, 0, from);
  for (size_t skip = from; skip < failed_at; ++skip) {
    if (log[skip].kind != Kind::kWrite) continue;
    Bytes state = base;
    for (size_t i = from; i < log.size(); ++i) {
      if (i != skip) ApplyFileOp(log[i], true, &state);
    }
    checker.Check(state, last, absl::StrCat("barrier ", last, " + all but operation ", skip, " (", log[skip].ToString(),
                                            ") of the failed barrier + everything after it"));
  }
}

// Runs the rest of a workload after the failure and checks what must hold.
void ExpectLatched(Disk& disk, const absl::Status& first_failure, const std::function<void()>& more_writes) {
  ASSERT_FALSE(first_failure.ok());
  EXPECT_EQ(StatusErrno(first_failure), EIO) << first_failure;
  EXPECT_TRUE(absl::StrContains(first_failure.message(), "injected failure")) << first_failure;
  for (int attempt = 0; attempt < 3; ++attempt) {
    more_writes();
    if (::testing::Test::HasFatalFailure()) return;
    const absl::Status again = disk.Flush();
    EXPECT_FALSE(again.ok()) << "flush " << attempt + 1 << " after a failed fdatasync succeeded";
    EXPECT_EQ(StatusErrno(again), EIO) << again;
    EXPECT_TRUE(absl::StrContains(again.message(), "earlier flush")) << again;
    EXPECT_TRUE(absl::StrContains(again.message(), "injected failure")) << "must name the first failure: " << again;
  }
  EXPECT_EQ(disk.counts().after_failure, 0u) << "an fdatasync reached the file after the failed one";
}

// After the failure the file is opened again (a remount): it reads as QEMU
// reads the file (what reached the file's tables, not the lost cache), and
// writes and a good flush work again, leaving no corruption (the lost
// flush may leak).
void ExpectReopenWorks(const TempDir& dir, Disk& disk) {
  disk.Close();
  ASSERT_OK_AND_ASSIGN(Bytes file, disk.Contents());
  const std::string path = dir.Join("reopened.qcow2");
  const std::string raw = dir.Join("reopened.raw");
  ASSERT_OK(WriteBytes(path, file));
  ASSERT_OK(ConvertToRaw(path, raw));
  ASSERT_OK_AND_ASSIGN(Bytes qemu_reads, ReadBytes(raw));
  ASSERT_OK(disk.Open());
  ASSERT_OK_AND_ASSIGN(Bytes read, ReadAll(disk.layer()));
  EXPECT_TRUE(read == qemu_reads) << "the reopened image reads differently from what qemu reads in the file";
  ASSERT_OK(disk.Write(300 * kKiB, Pattern(700, 9999)));
  ASSERT_OK(disk.Flush()) << "a flush after reopening";
  disk.Close();
  ASSERT_OK_AND_ASSIGN(Bytes now, disk.Contents());
  ASSERT_OK(WriteBytes(path, now));
  ASSERT_OK_AND_ASSIGN(QemuCheckReport c, QemuCheck(path));
  EXPECT_EQ(c.corruptions, 0u) << c.output;
  EXPECT_EQ(c.check_errors, 0u) << c.output;
}

// The scenario of a full flush: refcounts and data (step 1), dirty L2
// slices (2), a dirty L1 entry (3), frees (4).
void FullFlushBefore(Disk& disk) {
  // Phase A, flushed: allocations in the first L2 table and a new one.
  ASSERT_OK(disk.Write(20 * kKiB + 100, Pattern(700, 1)));
  ASSERT_OK(disk.Write(40 * kKiB, Pattern(512, 2)));
  ASSERT_OK(disk.Flush());
  // Phase B: every step of the next flush has work.
  ASSERT_OK(disk.Write(24 * kKiB, Pattern(1000, 3)));         // dirty L2 slice
  ASSERT_OK(disk.Write(100 * kKiB + 7, Pattern(600, 4)));     // new L2 table: dirty L1 entry
  ASSERT_OK(disk.Write(16 * kKiB + 10, Pattern(100, 5)));     // copy-on-write of a compressed cluster
  ASSERT_OK(disk.Discard(0, 1024));                            // two clusters freed
}

void AfterFailure(Disk& disk, int round) {
  const uint32_t p = 50 + 10 * round;
  ASSERT_OK(disk.Write(20 * kKiB + 150 + round, Pattern(300, p)));          // in place, over flushed data
  ASSERT_OK(disk.Write(28 * kKiB + 1000 * round, Pattern(300, p + 1)));     // allocating, existing table
  ASSERT_OK(disk.Write(200 * kKiB + 40 * kKiB * round, Pattern(300, p + 2)));  // allocating, new table
  if (round == 0) {
    ASSERT_OK(disk.Discard(40 * kKiB, 512));  // a free that must wait forever
  }
}

// The fault at barrier `step` (1 to 4) of the full flush.
void RunFailedBarrier(int step) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("durable-fail-step"));
  ASSERT_OK_AND_ASSIGN(Made made, MakeImage(dir));
  // A dry run counts the fdatasyncs before and during the full flush.
  size_t before = 0, during = 0;
  {
    Disk dry(made.image, 0);
    ASSERT_OK(dry.Open());
    ASSERT_NO_FATAL_FAILURE(FullFlushBefore(dry));
    before = dry.counts().calls;
    ASSERT_OK(dry.Flush());
    during = dry.counts().calls - before;
  }
  ASSERT_EQ(during, 4u) << "the full flush must have four barriers";

  Disk disk(made.image, before + step);
  ASSERT_OK(disk.Open());
  ASSERT_NO_FATAL_FAILURE(FullFlushBefore(disk));
  const absl::Status failed = disk.Flush();
  ASSERT_NE(disk.counts().failed_at_log, SIZE_MAX) << "the fault was not reached";
  int round = 0;
  ExpectLatched(disk, failed, [&] { AfterFailure(disk, round++); });
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  // A resize needs a flush before it changes the header: it fails, writes
  // no header (ExpectNoTableWritesAfter below) and keeps the size. Growing
  // within the L1 table: the path where the new size is set before that
  // flush (see GrowWhoseFlushFailedIsNotReportedDoneByARetry).
  const uint64_t size = disk.layer().size();
  const absl::Status grown = SyncWait(disk.layer().Truncate(size + 16 * kKiB));
  EXPECT_FALSE(grown.ok()) << "growing the disk after a failed fdatasync";
  EXPECT_TRUE(absl::StrContains(grown.message(), "earlier flush")) << grown;
  EXPECT_EQ(disk.layer().size(), size) << "a grow that failed changed the layer's size";
  // The view still shows every write.
  ASSERT_OK_AND_ASSIGN(Bytes read, ReadAll(disk.layer(), made.guest.size()));
  EXPECT_TRUE(read == disk.Expected(made.guest)) << "writes after a failed flush must still be readable";
  const std::vector<FileOp> log = disk.log();
  ExpectNoTableWritesAfter(disk, log, disk.counts().failed_at_log, disk.data_clusters_after_failure());

  CrashChecker checker(dir, disk, log, made.guest);
  CheckAllButOne(checker, disk, disk.counts().failed_at_log);
  checker.CheckAll({.seed = static_cast<uint64_t>(step), .random_subsets = Sample(6), .max_prefixes = Sample(6), .max_states = 0});
  checker.Report(absl::StrCat("fdatasync failed at barrier ", step, " of a full flush"));
  ExpectReopenWorks(dir, disk);
}

// Step 1: the first barrier of a flush with dirty L2 slices (refcounts and
// data not known to be durable: no L2 slice may follow).
TEST(DurabilityTest, FailedFdatasyncAtTheFirstBarrierOfAFlushWithDirtyL2) { RunFailedBarrier(1); }
// Step 2: after the L2 slices (no L1 entry may follow).
TEST(DurabilityTest, FailedFdatasyncAtTheL2Barrier) { RunFailedBarrier(2); }
// Step 3: after the L1 entries.
TEST(DurabilityTest, FailedFdatasyncAtTheL1Barrier) { RunFailedBarrier(3); }
// Step 4: the last barrier, after the refcounts of the freed clusters
// dropped (the freed clusters may be reused, but never linked).
TEST(DurabilityTest, FailedFdatasyncAtTheLastBarrierOfTheFrees) { RunFailedBarrier(4); }

// A random workload of writes, discards and flushes, with the fault at a
// random fdatasync: everything after it runs against a latched image.
void FailedFdatasyncAtARandomBarrier(uint64_t seed) {
  std::mt19937_64 rng(seed);
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("durable-fail-random"));
  ASSERT_OK_AND_ASSIGN(Made made, MakeImage(dir));
  const std::vector<Step> steps = RandomSteps(rng, made.guest.size(), 8, Step::kFlush);
  size_t total = 0;
  {
    Disk dry(made.image, 0);
    ASSERT_OK(dry.Open());
    for (const Step& step : steps) ASSERT_OK(RunStep(dry, step)) << Describe(step);
    total = dry.counts().calls;
  }
  ASSERT_GT(total, 0u);
  const size_t fail_at = std::uniform_int_distribution<size_t>(1, total)(rng);
  std::cout << "fdatasync " << fail_at << " of " << total << " fails\n";

  Disk disk(made.image, fail_at);
  ASSERT_OK(disk.Open());
  bool latched = false;
  for (const Step& step : steps) {
    SCOPED_TRACE(Describe(step));
    const absl::Status s = RunStep(disk, step);
    if (step.kind == Step::kFlush) {
      if (!latched && disk.counts().failed_at_log != SIZE_MAX) {
        latched = true;
        ASSERT_FALSE(s.ok()) << "the flush whose fdatasync failed succeeded";
        EXPECT_EQ(StatusErrno(s), EIO) << s;
        EXPECT_TRUE(absl::StrContains(s.message(), "injected failure")) << s;
      } else if (latched) {
        EXPECT_FALSE(s.ok()) << "a flush after the failed one succeeded";
        EXPECT_TRUE(absl::StrContains(s.message(), "earlier flush") &&
                    absl::StrContains(s.message(), "injected failure"))
            << s;
      } else {
        ASSERT_OK(s);
      }
    } else {
      ASSERT_OK(s) << "writes go on after a failed flush";
    }
  }
  ASSERT_TRUE(latched) << "the fault was not reached";
  EXPECT_EQ(disk.counts().after_failure, 0u) << "an fdatasync reached the file after the failed one";
  ASSERT_OK_AND_ASSIGN(Bytes read, ReadAll(disk.layer()));
  EXPECT_TRUE(read == disk.Expected(made.guest)) << "writes after a failed flush must still be readable";
  const std::vector<FileOp> log = disk.log();
  ExpectNoTableWritesAfter(disk, log, disk.counts().failed_at_log, disk.data_clusters_after_failure());

  CrashChecker checker(dir, disk, log, made.guest);
  CheckAllButOne(checker, disk, disk.counts().failed_at_log);
  checker.CheckAll({.seed = seed, .random_subsets = Sample(4), .max_prefixes = Sample(4), .max_states = 0});
  checker.Report("fdatasync failed at a random barrier");
  ExpectReopenWorks(dir, disk);
}

TEST(DurabilityTest, FailedFdatasyncAtARandomBarrier) { FailedFdatasyncAtARandomBarrier(TestSeed()); }

// Seeds that failed once. 1883307191968613494: after the failed fdatasync
// a discard zeroed the partial clusters at its ends in place, in host
// clusters the test did not count as guest data (the entries said "zero"
// afterwards).
TEST(DurabilityTest, FailedFdatasyncAtARandomBarrierRegressionSeeds) {
  for (const uint64_t seed : {uint64_t{1883307191968613494u}}) {
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    FailedFdatasyncAtARandomBarrier(seed);
  }
}

// Resize sets the new size before the flush that must precede the header
// write. When that flush fails (here: ENOSPC writing a refcount block; the
// same with a failed fdatasync) the layer must go back to the old size, as
// the header has it: otherwise a retry of the same grow finds nothing to do
// (new_size == old_size) and reports success without ever writing the
// header, the view shows the new size, every later flush succeeds, and
// after a remount the disk has its old size again (and what was written
// past it is gone). Found by these tests; fixed in Resize.
TEST(DurabilityTest, GrowWhoseFlushFailedIsNotReportedDoneByARetry) {
  ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("durable-grow"));
  ASSERT_OK_AND_ASSIGN(Made made, MakeImage(dir));
  Disk disk(made.image, 0);
  ASSERT_OK(disk.Open());
  const uint64_t old_size = disk.layer().size();
  const uint64_t new_size = old_size + 16 * kKiB;  // the L1 table covers it already
  ASSERT_OK(disk.Write(100 * kKiB, Pattern(600, 1)));  // refcounts to write at the next flush
  disk.FailNextWrite();
  EXPECT_FALSE(SyncWait(disk.layer().Truncate(new_size)).ok()) << "the refcount write failed";
  EXPECT_EQ(disk.layer().size(), old_size) << "a grow that failed changed the layer's size";
  const absl::Status retry = SyncWait(disk.layer().Truncate(new_size));
  ASSERT_OK(retry);
  ASSERT_OK(disk.Flush());
  disk.Close();
  ASSERT_OK(disk.Open());
  EXPECT_EQ(disk.layer().size(), new_size) << "the retried grow reported success, but the header kept the old size";
}

}  // namespace
}  // namespace qcow2fuse::test
