// Host errors under a real mount: the daemon runs with the fault shim
// (fault_shim.c) preloaded, which fails the Nth pwrite, fallocate or
// fdatasync the daemon makes on its image, or fills the disk, and a small
// workload runs through the view: writes, fsync, fallocate punch-hole,
// zero-range and preallocation, a grow by ftruncate, and close.
//
// A counting run first shows that the shim sees the calls the daemon
// really makes (PosixFile's pwrite, fallocate and fdatasync) and how many
// of each the workload makes. Then, for each kind of fault, the workload
// runs on a fresh image once per call N (every call in the normal build;
// one, seeded, under the sanitizers or QCOW2FUSE_TEST_OPS), and each time:
//   - the call that met the fault returns the injected errno (EIO or
//     ENOSPC) to the user;
//   - the daemon still answers: a read through a fresh descriptor works
//     after it;
//   - after a one-shot fault every later call succeeds; after a failed
//     fdatasync every later fsync (and the close) fails with EIO; on a full
//     disk calls fail with ENOSPC or succeed, and once the disk has room
//     again a write and an fsync succeed;
//   - the daemon exits cleanly at unmount (with status 1 when its final
//     flush was refused by the latch), never by a signal;
//   - `qemu-img check` finds no corruption (leaks allowed) and the disk
//     reads as what the last successful fsync made durable, each byte
//     possibly changed by a call issued since.

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <bit>
#include <cstdint>
#include <cstring>
#include <future>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cli_util.h"
#include "fault_shim.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/scoped_env.h"
#include "support/seed.h"
#include "support/status_testing.h"

namespace qcow2fuse::test::cli {
namespace {

constexpr uint64_t kDiskSize = 16 * kMiB;
constexpr uint64_t kGrownSize = 17 * kMiB;

// The sanitizer builds run the daemon several times slower: they, and the
// ThreadSanitizer run's QCOW2FUSE_TEST_OPS, walk a few points per kind.
bool Sampling() {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return true;
#else
  return std::getenv("QCOW2FUSE_TEST_OPS") != nullptr;
#endif
}

// --- The shim's control block ------------------------------------------------------------

class Control {
 public:
  static absl::StatusOr<std::unique_ptr<Control>> Create(const std::string& path) {
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return absl::InternalError(absl::StrCat("create ", path, ": ", strerror(errno)));
    if (ftruncate(fd, sizeof(FaultControl)) != 0) {
      close(fd);
      return absl::InternalError(absl::StrCat("size ", path, ": ", strerror(errno)));
    }
    void* p = mmap(nullptr, sizeof(FaultControl), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return absl::InternalError(absl::StrCat("map ", path, ": ", strerror(errno)));
    return std::unique_ptr<Control>(new Control(path, static_cast<FaultControl*>(p)));
  }
  ~Control() { munmap(c_, sizeof(FaultControl)); }

  const std::string& path() const { return path_; }
  void Arm(FaultMode mode, FaultCall call, uint64_t nth, int error) {
    __atomic_store_n(&c_->mode, static_cast<uint32_t>(mode), __ATOMIC_SEQ_CST);
    __atomic_store_n(&c_->call, static_cast<uint32_t>(call), __ATOMIC_SEQ_CST);
    __atomic_store_n(&c_->nth, nth, __ATOMIC_SEQ_CST);
    __atomic_store_n(&c_->error, error, __ATOMIC_SEQ_CST);
  }
  uint64_t calls(FaultCall call) const { return __atomic_load_n(&c_->calls[call], __ATOMIC_SEQ_CST); }
  uint64_t after(FaultCall call) const { return __atomic_load_n(&c_->after[call], __ATOMIC_SEQ_CST); }
  bool fired() const { return __atomic_load_n(&c_->fired, __ATOMIC_SEQ_CST) != 0; }
  // Waits up to 10 s for the chosen call to come; whether it came.
  bool WaitFired() const {
    for (int i = 0; i < 1000 && !fired(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return fired();
  }
  bool full() const { return __atomic_load_n(&c_->full, __ATOMIC_SEQ_CST) != 0; }
  void SetFull(bool full) { __atomic_store_n(&c_->full, full ? 1u : 0u, __ATOMIC_SEQ_CST); }

 private:
  Control(std::string path, FaultControl* c) : path_(std::move(path)), c_(c) {
    __atomic_store_n(&c_->magic, QCOW2FUSE_FAULT_MAGIC, __ATOMIC_SEQ_CST);
  }
  const std::string path_;
  FaultControl* const c_;
};

const char* CallName(FaultCall call) {
  switch (call) {
    case kFaultPwrite: return "pwrite";
    case kFaultFallocate: return "fallocate";
    case kFaultSync: return "fdatasync";
    case kFaultTruncate: return "ftruncate";
    case kFaultSplice: return "splice";
    default: return "?";
  }
}

// Waits up to `limit` for an fdatasync of the image after the first `since`;
// whether one came.
bool SyncedWithin(const Control& control, uint64_t since, std::chrono::milliseconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (control.calls(kFaultSync) == since && std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return control.calls(kFaultSync) > since;
}

// Starts the view of `image` with the shim preloaded, reporting to `control`.
absl::StatusOr<std::unique_ptr<MountedView>> StartWithShim(const std::string& image, const std::string& mountpoint,
                                                           const Control& control,
                                                           const std::vector<std::string>& extra = {},
                                                           bool read_only = false) {
  MountOptions options = WritableView(image, mountpoint);
  options.read_only = read_only;
  // No periodic flush: the test alone decides when the daemon syncs.
  options.extra_options = {"flush_interval=0"};
  options.extra_options.insert(options.extra_options.end(), extra.begin(), extra.end());
  ScopedPreload shim(QCOW2FUSE_FAULT_SHIM);
  ScopedEnv file(QCOW2FUSE_FAULT_FILE_ENV, image);
  ScopedEnv ctl(QCOW2FUSE_FAULT_CONTROL_ENV, control.path());
  return MountedView::Start(options);
}

// Unmounts `mounted`, has `qemu-img check` judge `image`, and returns the
// disk as QEMU reads it (converted to `raw`).
absl::StatusOr<std::string> UnmountCheckAndConvert(MountedView& mounted, const std::string& image,
                                                   const std::string& raw) {
  if (absl::Status s = mounted.Unmount(); !s.ok()) return s;
  if (absl::Status s = CheckImage(image); !s.ok()) return s;
  if (absl::Status s = ConvertToRaw(image, raw); !s.ok()) return s;
  return ReadFile(raw);
}

// --- The workload ----------------------------------------------------------------------------

struct Call {
  enum Kind { kWrite, kFsync, kPunch, kZeroRange, kPreallocate, kGrow } kind;
  uint64_t offset = 0;
  uint64_t length = 0;  // kGrow: the new size
  int pattern = 0;
};

std::string Describe(const Call& c) {
  switch (c.kind) {
    case Call::kWrite: return absl::StrFormat("pwrite [%u, +%u)", c.offset, c.length);
    case Call::kFsync: return "fsync";
    case Call::kPunch: return absl::StrFormat("fallocate punch-hole [%u, +%u)", c.offset, c.length);
    case Call::kZeroRange: return absl::StrFormat("fallocate zero-range [%u, +%u)", c.offset, c.length);
    case Call::kPreallocate: return absl::StrFormat("fallocate [%u, +%u)", c.offset, c.length);
    case Call::kGrow: return absl::StrFormat("ftruncate to %u", c.length);
  }
  return "?";
}

const std::vector<Call>& Workload() {
  static const std::vector<Call> calls = {
      {Call::kWrite, 1 * kMiB + 4096, 8192, 1},       // allocating: past the end of the file
      {Call::kWrite, 4096, 4096, 2},                  // in place, over qemu-io's data
      {Call::kFsync},
      {Call::kWrite, 5 * kMiB, 4096, 3},              // allocating
      {Call::kPunch, 1 * kMiB, 64 * kKiB},            // a whole cluster freed at the next fsync
      {Call::kZeroRange, 5 * kMiB + 1000, 2000},      // zeros written in place
      {Call::kFsync},
      {Call::kGrow, 0, kGrownSize},                   // the header, after a flush
      {Call::kWrite, kDiskSize + 4096, 4096, 4},      // in the grown part
      {Call::kPreallocate, 8 * kMiB, 64 * kKiB},      // a host cluster reserved
      {Call::kFsync},
  };
  return calls;
}

std::vector<uint8_t> Pattern(size_t n, int seed) {
  std::vector<uint8_t> b(n);
  uint32_t x = static_cast<uint32_t>(seed) * 2654435761u + 7;
  for (uint8_t& v : b) {
    x = x * 1103515245u + 12345;
    v = static_cast<uint8_t>(x >> 16);
  }
  return b;
}

// The first write of a mount may sync the image to mark it in use: written
// and fsynced before a test arms a fault, so that the fault meets the call
// the test means. 64 KiB into the disk's first cluster.
void SettleFirstWrite(int fd) {
  const std::vector<uint8_t> block = Pattern(64 * kKiB, 1);
  ASSERT_EQ(pwrite(fd, block.data(), block.size(), 0), static_cast<ssize_t>(block.size())) << strerror(errno);
  ASSERT_EQ(fsync(fd), 0) << strerror(errno);
}

// What each byte of the disk may read as (see fault_injection_test.cc for
// the same model on the engine).
struct Model {
  std::vector<uint8_t> bytes;
  std::map<uint64_t, std::vector<uint8_t>> maybe;
  uint64_t size = kDiskSize;

  void Set(uint64_t offset, const std::vector<uint8_t>& data) {
    std::copy(data.begin(), data.end(), bytes.begin() + offset);
    maybe.erase(maybe.lower_bound(offset), maybe.lower_bound(offset + data.size()));
  }
  void Maybe(uint64_t offset, const std::vector<uint8_t>& data) {
    for (size_t i = 0; i < data.size(); ++i) {
      std::vector<uint8_t>& values = maybe[offset + i];
      for (uint8_t v : {bytes[offset + i], data[i]}) {
        if (std::find(values.begin(), values.end(), v) == values.end()) values.push_back(v);
      }
    }
  }
  bool Allows(uint64_t b, uint8_t v) const {
    if (bytes[b] == v) return true;
    auto it = maybe.find(b);
    return it != maybe.end() && std::find(it->second.begin(), it->second.end(), v) != it->second.end();
  }
};

struct Unflushed {
  uint64_t offset;
  std::vector<uint8_t> data;
};

// --- One run ---------------------------------------------------------------------------------

struct Fault {
  FaultMode mode = kFaultNone;
  FaultCall call = kFaultPwrite;
  uint64_t nth = 0;
  int error = EIO;

  // E.g. "pwrite 3 fails (EIO)".
  std::string ToString() const {
    if (mode == kFaultNone) return "no fault";
    return absl::StrFormat("%s %u %s", CallName(call), nth, What());
  }
  // What happens to the chosen call, e.g. "fails (EIO)".
  std::string What() const {
    return absl::StrFormat("%s (%s)",
                           mode == kFaultOnce    ? "fails"
                           : mode == kFaultShort ? "is short, then its retry fails"
                                                 : "finds the disk full",
                           mode == kFaultFull ? "ENOSPC" : error == EIO ? "EIO" : "ENOSPC");
  }
};

// Calls the disk stays full for after the one that found it full.
constexpr size_t kFullCalls = 1;

class FaultRun {
 public:
  // `image`: the bytes of the image to start from (see MakeImage).
  FaultRun(std::string dir, const std::string& image, Fault fault)
      : dir_(std::move(dir)), initial_(image), fault_(fault) {}

  const std::vector<std::string>& problems() const { return problems_; }
  std::map<FaultCall, uint64_t> counted;  // what the shim counted in the workload
  bool fired = false;

  void Go() {
    const std::string image = dir_ + "/disk.qcow2";
    if (absl::Status s = WriteFileAt(image, 0, initial_); !s.ok()) return Problem(s.ToString());
    model_.bytes.assign(kGrownSize, 0);
    std::fill(model_.bytes.begin(), model_.bytes.begin() + 128 * kKiB, 0x11);
    durable_ = model_;
    absl::StatusOr<std::unique_ptr<Control>> control = Control::Create(dir_ + "/fault.ctl");
    if (!control.ok()) return Problem(control.status().ToString());
    control_ = *std::move(control);
    control_->Arm(fault_.mode, fault_.call, fault_.nth, fault_.error);
    {
      absl::StatusOr<std::unique_ptr<MountedView>> view = StartWithShim(image, dir_ + "/view.raw", *control_);
      if (!view.ok()) return Problem("mount: " + view.status().ToString());
      RunWorkload((*view)->path());
      if (absl::Status s = (*view)->Unmount(); !s.ok()) Problem("unmount: " + s.ToString());
      const std::optional<ExitStatus>& exit = (*view)->exit_status();
      const int want = latched_ ? 1 : 0;
      if (!exit || !exit->exited() || exit->code() != want) {
        Problem(absl::StrCat("the daemon ended with ", exit ? exit->ToString() : "an unknown status", ", not exit code ",
                             want, "\n", (*view)->ReadLog()));
      }
    }
    CheckImageFile(image);
  }

 private:
  bool IsSyncFault() const { return fault_.mode == kFaultOnce && fault_.call == kFaultSync; }

  // One call through `fd`: 0 or the errno it failed with.
  int Do(int fd, const Call& c) {
    switch (c.kind) {
      case Call::kWrite: {
        // As a program writes: a short count (the kernel sent the write as
        // several requests and a later one failed) is followed by a retry
        // of the rest, whose result is the call's.
        const std::vector<uint8_t> data = Pattern(c.length, c.pattern);
        since_.push_back({c.offset, data});
        size_t done = 0;
        short_count_ = false;
        while (done < data.size()) {
          const ssize_t n = pwrite(fd, data.data() + done, data.size() - done, c.offset + done);
          if (n <= 0) {
            const int err = n < 0 ? errno : EIO;
            model_.Maybe(c.offset + done, std::vector<uint8_t>(data.begin() + done, data.end()));
            return err;
          }
          model_.Set(c.offset + done, std::vector<uint8_t>(data.begin() + done, data.begin() + done + n));
          done += n;
          short_count_ |= done < data.size();
        }
        return 0;
      }
      case Call::kFsync:
        if (fsync(fd) != 0) return errno;
        durable_ = model_;
        since_.clear();
        return 0;
      case Call::kPunch:
      case Call::kZeroRange: {
        const int mode = c.kind == Call::kPunch ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                                                : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
        const std::vector<uint8_t> zeros(c.length, 0);
        const int r = fallocate(fd, mode, c.offset, c.length);
        if (r == 0) {
          model_.Set(c.offset, zeros);
        } else {
          model_.Maybe(c.offset, zeros);
        }
        since_.push_back({c.offset, zeros});
        return r == 0 ? 0 : errno;
      }
      case Call::kPreallocate:
        return fallocate(fd, 0, c.offset, c.length) == 0 ? 0 : errno;
      case Call::kGrow:
        if (ftruncate(fd, c.length) != 0) {
          failed_grow_ = c.length;
          return errno;
        }
        model_.size = c.length;
        durable_.size = c.length;  // the header is synced before the grow returns
        return 0;
    }
    return -1;
  }

  void RunWorkload(const std::string& view) {
    const int fd = open(view.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return Problem(absl::StrCat("open ", view, ": ", strerror(errno)));
    const std::vector<Call>& calls = Workload();
    size_t clear_before = SIZE_MAX;
    for (size_t i = 0; i < calls.size(); ++i) {
      if (i == clear_before) control_->SetFull(false);
      if (calls[i].kind != Call::kGrow && calls[i].kind != Call::kFsync &&
          calls[i].offset + calls[i].length > model_.size) {
        continue;  // past the end of a disk whose grow failed
      }
      const bool full_before = control_->full();
      const bool fired_before = control_->fired();
      const int err = Do(fd, calls[i]);
      const std::string where = absl::StrCat("call ", i, " (", Describe(calls[i]), ")");
      if (!fired_before && control_->fired()) {
        const int want = fault_.mode == kFaultFull ? ENOSPC : fault_.error;
        // A short count is how the kernel reports an error after progress.
        if (err != want && !(err == 0 && short_count_)) {
          Problem(absl::StrCat(where, " met the fault and returned ", err == 0 ? "success" : strerror(err), ", not ",
                               strerror(want)));
        }
        if (IsSyncFault()) latched_ = true;
        if (fault_.mode == kFaultFull) clear_before = i + 1 + kFullCalls;
        ExpectAnswers(view, where);
      } else if (!fired_before) {
        if (err != 0) Problem(absl::StrCat(where, " failed before any fault: ", strerror(err)));
      } else if (err != 0) {
        if (latched_) {
          if (err != EIO) Problem(absl::StrCat(where, " after the failed fdatasync: ", strerror(err), ", not EIO"));
          if (calls[i].kind != Call::kFsync && calls[i].kind != Call::kGrow) {
            Problem(absl::StrCat(where, " failed after the failed fdatasync, though it needs no sync"));
          }
        } else if (full_before) {
          if (err != ENOSPC) Problem(absl::StrCat(where, " on a full disk: ", strerror(err), ", not ENOSPC"));
        } else {
          Problem(absl::StrCat(where, " failed after the disk works again: ", strerror(err)));
        }
        ExpectAnswers(view, where);
      } else if (latched_ && calls[i].kind == Call::kFsync) {
        Problem(where + " succeeded after a failed fdatasync");
      }
    }
    for (FaultCall k : {kFaultPwrite, kFaultFallocate, kFaultSync, kFaultTruncate}) counted[k] = control_->calls(k);
    fired = control_->fired();
    control_->SetFull(false);
    if (fault_.mode != kFaultNone && !fired) Problem("the fault was never reached");
    // The disk works again: a write and an fsync succeed, except that the
    // latch refuses every fsync.
    const Call probe{Call::kWrite, 2 * kMiB + 100, 3000, 9};
    if (int err = Do(fd, probe); err != 0) Problem(absl::StrCat("a write after the workload: ", strerror(err)));
    const int synced = Do(fd, Call{Call::kFsync});
    if (latched_ != (synced != 0)) {
      Problem(absl::StrCat("an fsync after the workload ", synced == 0 ? "succeeded" : strerror(synced),
                           latched_ ? " after a failed fdatasync" : ""));
    }
    if (latched_ && synced != EIO) Problem(absl::StrCat("the latched fsync failed with ", strerror(synced)));
    const int closed = close(fd) == 0 ? 0 : errno;
    if (latched_ ? closed != EIO : closed != 0) {
      Problem(absl::StrCat("close: ", closed == 0 ? "success" : strerror(closed)));
    }
    if (latched_ && control_->after(kFaultSync) != 0) {
      Problem(absl::StrCat(control_->after(kFaultSync), " fdatasync calls reached the image after the failed one"));
    }
  }

  // A read through a fresh descriptor (so not from the page cache) works.
  void ExpectAnswers(const std::string& view, const std::string& where) {
    const int fd = open(view.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Problem(absl::StrCat("after ", where, ": open: ", strerror(errno)));
    char buf[4096];
    const ssize_t n = pread(fd, buf, sizeof(buf), 64 * kKiB);
    if (n != static_cast<ssize_t>(sizeof(buf))) {
      Problem(absl::StrCat("after ", where, ": the daemon does not answer a read: ", n < 0 ? strerror(errno) : "short"));
    }
    close(fd);
  }

  void CheckImageFile(const std::string& image) {
    absl::StatusOr<QemuCheckReport> c = QemuCheck(image);
    if (!c.ok()) return Problem("qemu-img check: " + c.status().ToString());
    if (c->corruptions != 0 || c->check_errors != 0 || (c->exit_code != 0 && c->exit_code != 3)) {
      Problem("qemu-img check: " + c->output.substr(0, 1500));
    }
    const std::string raw = dir_ + "/disk.raw";
    if (absl::Status s = ConvertToRaw(image, raw); !s.ok()) return Problem(s.ToString());
    absl::StatusOr<std::string> read = ReadFile(raw);
    if (!read.ok()) return Problem(read.status().ToString());
    if (read->size() != durable_.size && read->size() != failed_grow_) {
      return Problem(absl::StrCat("the disk has ", read->size(), " bytes"));
    }
    const std::string& disk = *read;
    constexpr uint64_t kChunk = 4096;
    for (uint64_t at = 0; at < disk.size(); at += kChunk) {
      const uint64_t end = std::min<uint64_t>(disk.size(), at + kChunk);
      if (std::memcmp(disk.data() + at, durable_.bytes.data() + at, end - at) == 0) continue;
      for (uint64_t b = at; b < end; ++b) {
        const uint8_t v = static_cast<uint8_t>(disk[b]);
        if (durable_.Allows(b, v)) continue;
        const bool explained = std::any_of(since_.begin(), since_.end(), [&](const Unflushed& u) {
          return b >= u.offset && b < u.offset + u.data.size() && u.data[b - u.offset] == v;
        });
        if (!explained) {
          return Problem(absl::StrFormat("disk byte %u reads %#x: neither what the last good fsync left (%#x) nor "
                                         "what a call since wrote",
                                         b, v, durable_.bytes[b]));
        }
      }
    }
  }

  void Problem(const std::string& what) { problems_.push_back(what); }

  const std::string dir_;
  const std::string& initial_;
  const Fault fault_;
  std::unique_ptr<Control> control_;
  Model model_;
  Model durable_;
  std::vector<Unflushed> since_;
  uint64_t failed_grow_ = 0;
  bool latched_ = false;
  bool short_count_ = false;  // the last write returned a short count first
  std::vector<std::string> problems_;
};

class FaultMountTest : public TempDirTest {
 protected:
  // The image every run starts from: made once by qemu-img and qemu-io,
  // then copied.
  void MakeImage() {
    const std::string path = Path("made.qcow2");
    ASSERT_OK(CreateImage(path, "qcow2", kDiskSize));
    ASSERT_OK(QemuIo(path, "qcow2", {"write -P 0x11 0 128k"}));
    ASSERT_OK_AND_ASSIGN(image_, ReadFile(path));
  }

  // The workload's calls of each kind, from a run that fails nothing.
  std::map<FaultCall, uint64_t> Count() {
    MakeImage();
    if (HasFatalFailure()) return {};
    FaultRun run(Path("count"), image_, Fault{});
    mkdir(Path("count").c_str(), 0700);
    run.Go();
    for (const std::string& p : run.problems()) ADD_FAILURE() << "with no fault: " << p;
    return run.counted;
  }

  // Runs the workload with the fault at each sampled call of `call`.
  void Walk(FaultMode mode, FaultCall call, int error) {
    const std::map<FaultCall, uint64_t> counts = Count();
    ASSERT_FALSE(HasFailure());
    const uint64_t total = counts.at(call);
    ASSERT_GT(total, 0u) << "the workload makes no " << CallName(call);
    std::vector<uint64_t> points;
    for (uint64_t n = 1; n <= total; ++n) points.push_back(n);
    if (Sampling()) {
      // One point, a different one each run (the seed is printed).
      std::mt19937_64 rng(TestSeed());
      points = {std::uniform_int_distribution<uint64_t>(1, total)(rng)};
    }
    size_t failed = 0;
    for (uint64_t n : points) {
      const Fault fault{mode, call, n, error};
      const std::string dir = Path(absl::StrCat("run", n));
      mkdir(dir.c_str(), 0700);
      FaultRun run(dir, image_, fault);
      run.Go();
      if (run.problems().empty()) continue;
      ++failed;
      std::string all;
      for (const std::string& p : run.problems()) absl::StrAppend(&all, "\n  ", p);
      ADD_FAILURE() << fault.ToString() << ":" << all;
    }
    std::cout << CallName(call) << " calls in the workload: " << total << "; points walked: " << points.size()
              << " (the call " << Fault{mode, call, 0, error}.What() << "); runs with problems: " << failed << "\n";
  }

  // The test's image copied to `image`, mounted through the shim with
  // sync_ahead=1M, and opened for reading and writing in `fd`, its first
  // write settled.
  void StartSyncAheadView(const std::string& image, std::unique_ptr<Control>& control,
                          std::unique_ptr<MountedView>& mounted, int& fd) {
    MakeImage();
    ASSERT_FALSE(HasFatalFailure());
    ASSERT_OK(WriteFileAt(image, 0, image_));
    ASSERT_OK_AND_ASSIGN(control, Control::Create(Path("control")));
    ASSERT_OK_AND_ASSIGN(mounted, StartWithShim(image, Path("view.raw"), *control, {"sync_ahead=1M"}));
    fd = open(mounted->path().c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0) << strerror(errno);
    SettleFirstWrite(fd);
  }

  std::string image_;
};

// The shim sees the daemon's own calls: its pwrite, fallocate and
// fdatasync on the image (no ftruncate: the image file is never resized
// that way), and the workload passes with nothing failed.
TEST_F(FaultMountTest, ShimCountsTheCallsTheDaemonMakes) {
  const std::map<FaultCall, uint64_t> counts = Count();
  std::cout << "calls on the image:";
  for (const auto& [call, n] : counts) std::cout << " " << CallName(call) << " " << n << ";";
  std::cout << "\n";
  EXPECT_GE(counts.at(kFaultPwrite), 5u) << "every allocating write and flush writes the image";
  EXPECT_GE(counts.at(kFaultSync), 3u) << "every fsync is at least one fdatasync";
  EXPECT_GE(counts.at(kFaultFallocate), 2u) << "a freed cluster is punched, a preallocated one reserved";
}

TEST_F(FaultMountTest, EveryPwriteFailingWithEio) { Walk(kFaultOnce, kFaultPwrite, EIO); }
TEST_F(FaultMountTest, EveryPwriteFailingWithEnospc) { Walk(kFaultOnce, kFaultPwrite, ENOSPC); }
TEST_F(FaultMountTest, EveryPwriteShortThenEnospc) { Walk(kFaultShort, kFaultPwrite, ENOSPC); }
TEST_F(FaultMountTest, EveryFallocateFailingWithEio) { Walk(kFaultOnce, kFaultFallocate, EIO); }
TEST_F(FaultMountTest, EveryFallocateFailingWithEnospc) { Walk(kFaultOnce, kFaultFallocate, ENOSPC); }
TEST_F(FaultMountTest, EveryFdatasyncFailingWithEio) { Walk(kFaultOnce, kFaultSync, EIO); }
TEST_F(FaultMountTest, DiskFullAtEveryPwriteUntilCleared) { Walk(kFaultFull, kFaultPwrite, ENOSPC); }

// What makes writes durable reaches the disk: fsync and the close of a
// writable descriptor each make the daemon fdatasync the image (not only
// write it, which a killed daemon would leave in the host's page cache);
// with flush_interval=0 nothing else does; with flush_interval=1 the
// daemon syncs a write by itself while the descriptor stays open.
TEST_F(FaultMountTest, FsyncCloseAndTheFlushIntervalSyncTheImage) {
  MakeImage();
  ASSERT_FALSE(HasFatalFailure());
  const std::vector<uint8_t> data = Pattern(64 * kKiB, 3);
  for (const bool periodic : {false, true}) {
    SCOPED_TRACE(periodic ? "flush_interval=1" : "flush_interval=0");
    const std::string image = Path(periodic ? "periodic.qcow2" : "requested.qcow2");
    ASSERT_OK(WriteFileAt(image, 0, image_));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Control> control, Control::Create(Path("control")));
    std::vector<std::string> extra;
    if (periodic) extra.push_back("flush_interval=1");  // after StartWithShim's 0
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted,
                         StartWithShim(image, Path("view.raw"), *control, extra));
    const int fd = open(mounted->path().c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << strerror(errno);
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), 2 * kMiB), static_cast<ssize_t>(data.size())) << strerror(errno);
    const uint64_t after_write = control->calls(kFaultSync);
    if (periodic) {
      EXPECT_TRUE(SyncedWithin(*control, after_write, std::chrono::seconds(10)))
          << "no sync while the view stayed open";
    } else {
      EXPECT_FALSE(SyncedWithin(*control, after_write, std::chrono::milliseconds(1500)))
          << "a sync nobody asked for (flush_interval=0)";
      ASSERT_EQ(fsync(fd), 0) << strerror(errno);
      EXPECT_GT(control->calls(kFaultSync), after_write) << "fsync returned without an fdatasync of the image";
      ASSERT_EQ(pwrite(fd, data.data(), data.size(), 3 * kMiB), static_cast<ssize_t>(data.size()))
          << strerror(errno);
    }
    const uint64_t before_close = control->calls(kFaultSync);
    ASSERT_EQ(close(fd), 0) << strerror(errno);
    if (!periodic) {
      EXPECT_GT(control->calls(kFaultSync), before_close) << "close returned without an fdatasync of the image";
    }
    ASSERT_OK(mounted->Unmount());
    EXPECT_TRUE(mounted->exit_status()->success()) << mounted->ReadLog();
    EXPECT_OK(CheckImage(image));
  }
}

// -o sync_ahead=SIZE: once SIZE bytes have been written through the view
// (64 MiB by default), the daemon fdatasyncs the image by itself while the
// descriptor stays open and nobody asked (no fsync, flush_interval=0); not
// below SIZE, and never with sync_ahead=0. The exit log counts the syncs.
TEST_F(FaultMountTest, SyncAheadSyncsTheImageOnceEnoughIsWritten) {
  struct Case {
    std::vector<std::string> options;
    uint64_t threshold;  // 0: never
  };
  const std::vector<uint8_t> data = Pattern(256 * kKiB, 7);
  const std::string written(data.begin(), data.end());
  for (const Case& c : {Case{{"sync_ahead=1M"}, kMiB}, Case{{}, 64 * kMiB}, Case{{"sync_ahead=0"}, 0}}) {
    SCOPED_TRACE(c.options.empty() ? "default" : c.options[0]);
    const std::string image = Path(absl::StrCat("disk", c.threshold, ".qcow2"));
    ASSERT_OK(CreateImage(image, "qcow2", 80 * kMiB));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Control> control, Control::Create(Path("control")));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted,
                         StartWithShim(image, Path("view.raw"), *control, c.options));
    const int fd = open(mounted->path().c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << strerror(errno);
    // Up to 256 KiB below the threshold (of the default where there is none).
    const uint64_t below = (c.threshold != 0 ? c.threshold : 64 * kMiB) - data.size();
    uint64_t at = 0;
    auto write_next = [&] {
      ASSERT_EQ(pwrite(fd, data.data(), data.size(), at), static_cast<ssize_t>(data.size())) << strerror(errno);
      at += data.size();
    };
    while (at < below) {
      write_next();
      ASSERT_FALSE(HasFatalFailure());
    }
    const uint64_t before = control->calls(kFaultSync);
    EXPECT_FALSE(SyncedWithin(*control, before, std::chrono::milliseconds(1500))) << "a sync below the threshold";
    // Counted from before the last write: the sync it starts may come
    // before pwrite has returned here.
    write_next();  // at the threshold now
    ASSERT_FALSE(HasFatalFailure());
    if (c.threshold != 0) {
      EXPECT_TRUE(SyncedWithin(*control, before, std::chrono::seconds(10))) << "no sync ahead at the threshold";
    } else {
      EXPECT_FALSE(SyncedWithin(*control, before, std::chrono::milliseconds(1500)))
          << "a sync nobody asked for (sync_ahead=0)";
    }
    ASSERT_EQ(close(fd), 0) << strerror(errno);
    ASSERT_OK_AND_ASSIGN(std::string after, UnmountCheckAndConvert(*mounted, image, Path("after.raw")));
    EXPECT_TRUE(mounted->exit_status()->success()) << mounted->ReadLog();
    EXPECT_EQ(absl::StrContains(mounted->ReadLog(), "syncs of the written data ahead of a flush: 1\n"),
              c.threshold != 0)
        << mounted->ReadLog();
    EXPECT_EQ(after.substr(0, data.size()), written);
    EXPECT_EQ(after.substr(at - data.size(), data.size()), written);
  }
}

// A sync ahead holds up no request: its fdatasync is parked in the shim,
// and meanwhile a write that allocates clusters, a read of it and an fsync
// through the view all finish. Once it goes on, the image is whole.
TEST_F(FaultMountTest, RequestsGoOnWhileASyncAheadIsParked) {
  const std::string image = Path("disk.qcow2");
  std::unique_ptr<Control> control;
  std::unique_ptr<MountedView> mounted;
  int fd = -1;
  StartSyncAheadView(image, control, mounted, fd);
  ASSERT_FALSE(HasFatalFailure());
  const std::vector<uint8_t> first = Pattern(kMiB, 8);
  const std::vector<uint8_t> second = Pattern(256 * kKiB, 9);
  control->Arm(kFaultPause, kFaultSync, control->calls(kFaultSync) + 1, 0);
  // However the test ends, the parked call goes on (else the close and the
  // unmount would wait for it forever).
  absl::Cleanup release = [&] { control->Arm(kFaultNone, kFaultSync, 0, 0); };
  ASSERT_EQ(pwrite(fd, first.data(), first.size(), kMiB), static_cast<ssize_t>(first.size())) << strerror(errno);
  ASSERT_TRUE(control->WaitFired()) << "no sync ahead after 1 MiB";
  std::future<std::string> meanwhile = std::async(std::launch::async, [&]() -> std::string {
    if (pwrite(fd, second.data(), second.size(), 8 * kMiB) != static_cast<ssize_t>(second.size())) {
      return absl::StrCat("write: ", strerror(errno));
    }
    std::vector<uint8_t> back(second.size());
    if (pread(fd, back.data(), back.size(), 8 * kMiB) != static_cast<ssize_t>(back.size())) {
      return absl::StrCat("read: ", strerror(errno));
    }
    if (back != second) return "the read does not return the write";
    if (fsync(fd) != 0) return absl::StrCat("fsync: ", strerror(errno));
    return "";
  });
  EXPECT_EQ(meanwhile.wait_for(std::chrono::seconds(20)), std::future_status::ready)
      << "requests waited for the parked sync";
  std::move(release).Invoke();  // lets the sync go on
  EXPECT_EQ(meanwhile.get(), "");
  ASSERT_EQ(close(fd), 0) << strerror(errno);
  ASSERT_OK_AND_ASSIGN(std::string after, UnmountCheckAndConvert(*mounted, image, Path("after.raw")));
  EXPECT_TRUE(mounted->exit_status()->success()) << mounted->ReadLog();
  EXPECT_EQ(after.substr(kMiB, kMiB), std::string(first.begin(), first.end()));
  EXPECT_EQ(after.substr(8 * kMiB, second.size()), std::string(second.begin(), second.end()));
}

// A sync ahead that fails is not retried and not forgotten: the daemon logs
// it, every later fsync and the close fail with EIO (the latch), the final
// flush is refused, and the image stays consistent.
TEST_F(FaultMountTest, AFailedSyncAheadFailsTheFsyncsAfterIt) {
  const std::string image = Path("disk.qcow2");
  std::unique_ptr<Control> control;
  std::unique_ptr<MountedView> mounted;
  int fd = -1;
  StartSyncAheadView(image, control, mounted, fd);
  ASSERT_FALSE(HasFatalFailure());
  const std::vector<uint8_t> data = Pattern(kMiB, 10);
  control->Arm(kFaultOnce, kFaultSync, control->calls(kFaultSync) + 1, EIO);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), kMiB), static_cast<ssize_t>(data.size())) << strerror(errno);
  ASSERT_TRUE(control->WaitFired()) << "no sync ahead after 1 MiB";
  // Written after the failure, and more than the threshold again.
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), 4 * kMiB), static_cast<ssize_t>(data.size())) << strerror(errno);
  errno = 0;
  EXPECT_NE(fsync(fd), 0) << "an fsync after the failed sync succeeded";
  EXPECT_EQ(errno, EIO) << strerror(errno);
  errno = 0;
  EXPECT_NE(close(fd), 0) << "the close after the failed sync succeeded";
  EXPECT_EQ(errno, EIO) << strerror(errno);
  ASSERT_OK(mounted->Unmount());
  ASSERT_TRUE(mounted->exit_status().has_value());
  EXPECT_EQ(mounted->exit_status()->code(), 1) << mounted->ReadLog();
  const std::string log = mounted->ReadLog();
  EXPECT_TRUE(absl::StrContains(log, "ahead of a flush failed")) << log;
  EXPECT_TRUE(absl::StrContains(log, "syncs of the written data ahead of a flush: 1")) << log;
  absl::StatusOr<QemuCheckReport> check = QemuCheck(image);
  ASSERT_OK(check.status());
  EXPECT_EQ(check->corruptions, 0u) << check->output;
}

// `qcow2fuse -u` says when the daemon's final flush failed: a failed
// fdatasync fails the close that asked for it, the daemon then refuses
// every later flush (its final one too), and -u exits 1 with one line
// naming the view, though the view is unmounted and the daemon gone.
TEST_F(FaultMountTest, UnmountSaysTheFinalFlushFailed) {
  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  const std::string pidfile = Path("view.pid");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Control> control, Control::Create(Path("fault.ctl")));
  DaemonGuard guard(view, pidfile);
  {
    ScopedPreload shim(QCOW2FUSE_FAULT_SHIM);
    ScopedEnv file(QCOW2FUSE_FAULT_FILE_ENV, image);
    ScopedEnv ctl(QCOW2FUSE_FAULT_CONTROL_ENV, control->path());
    ASSERT_OK_AND_ASSIGN(RunResult started, StartDaemon(image, view, pidfile, {"flush_interval=0"}));
    ASSERT_TRUE(started.status.success()) << started.Describe();
  }
  ASSERT_OK_AND_ASSIGN(pid_t pid, guard.ReadPid());
  control->Arm(kFaultOnce, kFaultSync, control->calls(kFaultSync) + 1, EIO);
  const int fd = open(view.c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0) << strerror(errno);
  const std::vector<uint8_t> data = Pattern(64 * kKiB, 5);
  EXPECT_EQ(pwrite(fd, data.data(), data.size(), kMiB), static_cast<ssize_t>(data.size())) << strerror(errno);
  errno = 0;
  EXPECT_NE(close(fd), 0) << "the close whose fdatasync failed succeeded";
  EXPECT_EQ(errno, EIO) << strerror(errno);
  EXPECT_TRUE(control->fired());

  ASSERT_OK_AND_ASSIGN(RunResult unmounted, RunUnmount(view));
  EXPECT_TRUE(FailsWithOneLine(unmounted, {view, "is unmounted, but"}));
  EXPECT_EQ(unmounted.status.code(), 1) << unmounted.Describe();
  EXPECT_FALSE(IsMounted(view));
  PidGone gone = WaitForPidGone(pid, std::chrono::seconds(30));
  ASSERT_TRUE(gone.gone) << "the daemon is still running after -u";
  guard.Forget();
  if (gone.status) {
    EXPECT_EQ(gone.status->code(), 1) << gone.status->ToString();
  }
  absl::StatusOr<QemuCheckReport> check = QemuCheck(image);
  ASSERT_OK(check.status());
  EXPECT_EQ(check->corruptions, 0u) << check->output;
}

// O_DIRECT writes of one file reach the daemon in parallel: one write is
// parked in the middle of its pwrite on the image, and a second write, to
// another cluster, must still reach the image. With
// parallel_direct_writes=off the kernel holds the second back until the
// first is done (the control: the test can tell the two apart).
TEST_F(FaultMountTest, DirectWritesReachTheImageInParallel) {
  MakeImage();  // clusters 0 and 1 hold data: both writes go in place
  ASSERT_FALSE(HasFatalFailure());
  for (const bool parallel : {true, false}) {
    SCOPED_TRACE(parallel ? "parallel_direct_writes=on" : "parallel_direct_writes=off");
    const std::string image = Path(parallel ? "on.qcow2" : "off.qcow2");
    const std::string view = Path(parallel ? "on.raw" : "off.raw");
    ASSERT_OK(WriteFileAt(image, 0, image_));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Control> control, Control::Create(Path("control")));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted,
                         StartWithShim(image, view, *control,
                                       {absl::StrCat("parallel_direct_writes=", parallel ? "on" : "off")}));
    const int fd = open(view.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
    ASSERT_GE(fd, 0) << strerror(errno);
    AlignedBuffer owned = AllocAligned(4096);
    uint8_t* const block = owned.get();
    std::memset(block, 0x77, 4096);
    // The first write of a mount marks the image in use; what is counted
    // from here on is data only.
    ASSERT_EQ(pwrite(fd, block, 4096, 8192), 4096) << strerror(errno);
    ASSERT_EQ(fsync(fd), 0) << strerror(errno);
    const uint64_t before = control->calls(kFaultPwrite);
    control->Arm(kFaultPause, kFaultPwrite, before + 1, 0);
    ssize_t first = -1;
    ssize_t second = -1;
    std::thread first_writer([&] { first = pwrite(fd, block, 4096, 0); });
    EXPECT_TRUE(control->WaitFired()) << "the first write never reached the image";
    std::thread second_writer([&] { second = pwrite(fd, block, 4096, 64 * kKiB); });
    // In parallel: the second write's pwrite arrives while the first is
    // parked. Serialised: it never does, however long we wait.
    const auto wait = parallel ? std::chrono::seconds(10) : std::chrono::seconds(2);
    const auto give_up = std::chrono::steady_clock::now() + wait;
    while (control->calls(kFaultPwrite) < before + 2 && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const bool reached = control->calls(kFaultPwrite) >= before + 2;
    control->Arm(kFaultNone, kFaultPwrite, 0, 0);  // lets the first go on
    first_writer.join();
    second_writer.join();
    EXPECT_EQ(first, 4096);
    EXPECT_EQ(second, 4096);
    // Before Linux 6.9 the daemon leaves direct writes to the kernel, which
    // serialises them (ops.cc, OnInit).
    EXPECT_EQ(reached, parallel && KernelAtLeast(6, 9)) << (parallel ? "the second write waited for the first"
                                              : "the kernel let the second write overtake: the control proves "
                                                "nothing");
    EXPECT_EQ(fsync(fd), 0) << strerror(errno);
    close(fd);
    ASSERT_OK_AND_ASSIGN(std::string after, UnmountCheckAndConvert(*mounted, image, Path("after.raw")));
    EXPECT_EQ(after.substr(0, 4096), std::string(4096, '\x77'));
    EXPECT_EQ(after.substr(64 * kKiB, 4096), std::string(4096, '\x77'));
    EXPECT_EQ(after.substr(4096, 4096), std::string(4096, '\x11'));
  }
}

// Workers park while others take the requests (fuse/worker_gate.h), and
// a write stuck in its pwrite of the image (a hung disk) leaves no request
// behind it: threads reading cached 4 KiB blocks keep being answered while
// it hangs, and it completes once the disk goes on. The daemon's log says
// that workers parked.
TEST_F(FaultMountTest, ReadsGoOnWhileAWriteHangsAndWorkersPark) {
  MakeImage();  // 0x11 in the first 128 KiB
  ASSERT_FALSE(HasFatalFailure());
  cpu_set_t affinity;
  ASSERT_EQ(sched_getaffinity(0, sizeof affinity, &affinity), 0) << strerror(errno);
  const int cpus = CPU_COUNT(&affinity);  // the daemon's too: it inherits the mask
  for (const bool park : {true, false}) {
    SCOPED_TRACE(park ? "park_workers=on" : "park_workers=off");
    const std::string image = Path(park ? "on.qcow2" : "off.qcow2");
    const std::string view = Path(park ? "on.raw" : "off.raw");
    const std::string log = Path(park ? "on.log" : "off.log");
    ASSERT_OK(WriteFileAt(image, 0, image_));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Control> control, Control::Create(Path("control")));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted,
                         StartWithShim(image, view, *control,
                                       {"log=" + log, "threads=64", park ? "park_workers=on" : "park_workers=off"}));
    const int writer = open(view.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
    ASSERT_GE(writer, 0) << strerror(errno);
    const int reader = open(view.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    ASSERT_GE(reader, 0) << strerror(errno);
    AlignedBuffer owned = AllocAligned(4096);
    uint8_t* const block = owned.get();
    std::memset(block, 0x77, 4096);
    ASSERT_EQ(pwrite(writer, block, 4096, 64 * kKiB), 4096) << strerror(errno);  // marks the image in use
    ASSERT_EQ(fsync(writer), 0) << strerror(errno);

    // More readers than CPUs: more workers than are kept at work.
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> reads{0};
    std::atomic<uint64_t> wrong{0};
    std::vector<std::thread> readers;
    for (int t = 0; t < cpus + 4; ++t) {
      readers.emplace_back([&, t] {
        AlignedBuffer buffer = AllocAligned(4096);
        for (uint64_t i = t; !stop; i += 7) {
          // The first 64 KiB: 0x11, in the image file's page cache.
          if (pread(reader, buffer.get(), 4096, (i % 16) * 4096) != 4096 || buffer.get()[0] != 0x11) ++wrong;
          ++reads;
        }
      });
    }
    const auto wait_for_reads = [&](uint64_t n) {
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (reads < n && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      return reads >= n;
    };
    EXPECT_TRUE(wait_for_reads(20000));
    const uint64_t before = control->calls(kFaultPwrite);
    control->Arm(kFaultPause, kFaultPwrite, before + 1, 0);
    ssize_t written = -1;
    std::thread hung([&] { written = pwrite(writer, block, 4096, 68 * kKiB); });
    EXPECT_TRUE(control->WaitFired()) << "the write never reached the image";
    EXPECT_TRUE(wait_for_reads(reads + 20000)) << "the reads stopped behind the hung write";
    EXPECT_EQ(control->calls(kFaultPwrite), before + 1) << "the hung write went on by itself";
    control->Arm(kFaultNone, kFaultPwrite, 0, 0);  // the disk goes on
    hung.join();
    stop = true;
    for (std::thread& t : readers) t.join();
    EXPECT_EQ(written, 4096) << strerror(errno);
    EXPECT_EQ(wrong, 0u);
    close(reader);
    EXPECT_EQ(fsync(writer), 0) << strerror(errno);
    close(writer);
    ASSERT_OK_AND_ASSIGN(std::string after, UnmountCheckAndConvert(*mounted, image, Path("after.raw")));
    EXPECT_EQ(after.substr(0, 64 * kKiB), std::string(64 * kKiB, '\x11'));
    EXPECT_EQ(after.substr(64 * kKiB, 8 * kKiB), std::string(8 * kKiB, '\x77'));
    ASSERT_OK_AND_ASSIGN(std::string messages, ReadFile(log));
    const size_t at = messages.find("workers parked ");
    if (!park) {
      EXPECT_EQ(at, std::string::npos) << messages;
      continue;
    }
    ASSERT_NE(at, std::string::npos) << messages;
    // Where the image's file system cannot say whether a read would sleep
    // (RWF_NOWAIT), every read counts as one that may, and nobody parks.
    ASSERT_OK_AND_ASSIGN(ScopedFd probe, OpenReadOnly(image));
    if (!TellsWhetherAReadWouldSleep(probe.get())) continue;
    long parks = 0;
    ASSERT_TRUE(absl::SimpleAtoi(messages.substr(at + 15, messages.find(' ', at + 15) - at - 15), &parks)) << messages;
    EXPECT_GT(parks, 0) << messages;
    EXPECT_TRUE(absl::StrContains(messages, absl::StrFormat("while %d others took the requests", cpus))) << messages;
  }
}

// A write stuck in its pwrite of the image (a hung disk) when the daemon
// is told to stop: after drain_timeout the daemon exits without it, and the
// image is as a crash would leave it: consistent, holding what was synced
// before, without the stuck write.
TEST_F(FaultMountTest, DrainTimeoutLeavesTheImageWithoutTheStuckWrite) {
  MakeImage();  // 0x11 in the first 128 KiB
  ASSERT_FALSE(HasFatalFailure());
  const std::string image = Path("disk.qcow2");
  const std::string view = Path("view.raw");
  ASSERT_OK(WriteFileAt(image, 0, image_));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Control> control, Control::Create(Path("control")));
  std::unique_ptr<MountedView> mounted;
  {
    ScopedThreadLeaksAllowed leaves_a_thread;  // the stuck one
    ASSERT_OK_AND_ASSIGN(mounted, StartWithShim(image, view, *control, {"drain_timeout=2"}));
  }
  const int fd = open(view.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  ASSERT_GE(fd, 0) << strerror(errno);
  AlignedBuffer owned = AllocAligned(64 * kKiB);
  uint8_t* const buffer = owned.get();
  std::memset(buffer, 0x77, 4096);
  ASSERT_EQ(pwrite(fd, buffer, 4096, 8192), 4096) << strerror(errno);  // in place
  std::memset(buffer, 0x66, 64 * kKiB);
  ASSERT_EQ(pwrite(fd, buffer, 64 * kKiB, kMiB), static_cast<ssize_t>(64 * kKiB)) << strerror(errno);  // allocating
  ASSERT_EQ(fsync(fd), 0) << strerror(errno);

  control->Arm(kFaultPause, kFaultPwrite, control->calls(kFaultPwrite) + 1, 0);
  std::memset(buffer, 0x99, 4096);
  ssize_t stuck = 0;
  int stuck_errno = 0;
  std::thread writer([&] {
    stuck = pwrite(fd, buffer, 4096, 0);
    stuck_errno = errno;
  });
  if (!control->WaitFired()) {
    control->Arm(kFaultNone, kFaultPwrite, 0, 0);
    writer.join();
    close(fd);
    FAIL() << "the write never reached the image: the test proves nothing";
  }
  ASSERT_EQ(kill(mounted->pid(), SIGTERM), 0) << strerror(errno);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!absl::StrContains(mounted->ReadLog(), "still running") && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_TRUE(absl::StrContains(mounted->ReadLog(), "still running")) << mounted->ReadLog();
  EXPECT_OK(mounted->Unmount());  // waits for the exit
  ASSERT_TRUE(mounted->exit_status().has_value()) << mounted->ReadLog();
  EXPECT_EQ(mounted->exit_status()->code(), 1) << mounted->exit_status()->ToString();
  writer.join();
  EXPECT_EQ(stuck, -1) << "the stuck write was acknowledged";
  EXPECT_NE(stuck_errno, 0);
  close(fd);

  absl::StatusOr<QemuCheckReport> check = QemuCheck(image);
  ASSERT_OK(check.status());
  EXPECT_EQ(check->corruptions, 0u) << check->output;
  EXPECT_EQ(check->check_errors, 0u) << check->output;
  ASSERT_OK(ConvertToRaw(image, Path("after.raw")));
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(Path("after.raw")));
  EXPECT_EQ(after.substr(0, 4096), std::string(4096, '\x11')) << "the stuck write reached the disk";
  EXPECT_EQ(after.substr(8192, 4096), std::string(4096, '\x77'));
  EXPECT_EQ(after.substr(kMiB, 64 * kKiB), std::string(64 * kKiB, '\x66'));
  EXPECT_EQ(after.substr(12288, 128 * kKiB - 12288), std::string(128 * kKiB - 12288, '\x11'));
}

// A sync ahead stuck in the disk does not hold up the stop forever: its
// fdatasync is parked in the shim, the close of the view (whose own flush
// goes through) returns, and at SIGTERM the daemon waits drain_timeout for
// it, then exits with status 1, the image consistent and the closed write
// in it.
TEST_F(FaultMountTest, DrainTimeoutEndsAStuckSyncAhead) {
  MakeImage();
  ASSERT_FALSE(HasFatalFailure());
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(WriteFileAt(image, 0, image_));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Control> control, Control::Create(Path("control")));
  std::unique_ptr<MountedView> mounted;
  {
    ScopedThreadLeaksAllowed leaves_a_thread;  // the stuck one
    ASSERT_OK_AND_ASSIGN(mounted,
                         StartWithShim(image, Path("view.raw"), *control, {"drain_timeout=2", "sync_ahead=1M"}));
  }
  const int fd = open(mounted->path().c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0) << strerror(errno);
  SettleFirstWrite(fd);
  ASSERT_FALSE(HasFatalFailure());
  const std::vector<uint8_t> data = Pattern(kMiB, 11);
  control->Arm(kFaultPause, kFaultSync, control->calls(kFaultSync) + 1, 0);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), kMiB), static_cast<ssize_t>(data.size())) << strerror(errno);
  if (!control->WaitFired()) {
    control->Arm(kFaultNone, kFaultSync, 0, 0);
    close(fd);
    FAIL() << "no sync ahead after 1 MiB: the test proves nothing";
  }
  EXPECT_EQ(close(fd), 0) << strerror(errno);
  ASSERT_EQ(kill(mounted->pid(), SIGTERM), 0) << strerror(errno);
  EXPECT_OK(mounted->Unmount());  // waits for the exit
  ASSERT_TRUE(mounted->exit_status().has_value()) << mounted->ReadLog();
  EXPECT_EQ(mounted->exit_status()->code(), 1) << mounted->ReadLog();
  EXPECT_TRUE(absl::StrContains(mounted->ReadLog(), "still running")) << mounted->ReadLog();
  absl::StatusOr<QemuCheckReport> check = QemuCheck(image);
  ASSERT_OK(check.status());
  EXPECT_EQ(check->corruptions, 0u) << check->output;
  ASSERT_OK(ConvertToRaw(image, Path("after.raw")));
  ASSERT_OK_AND_ASSIGN(std::string after, ReadFile(Path("after.raw")));
  EXPECT_EQ(after.substr(kMiB, kMiB), std::string(data.begin(), data.end()));
}

// Whether this process may size a pipe to hold a 1 MiB reply and its
// header: past /proc/sys/fs/pipe-max-size (1 MiB by default) only with
// CAP_SYS_RESOURCE or a larger maximum.
bool PipesMayHoldAMebibyteReply() {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return false;
  const bool may = fcntl(fds[0], F_SETPIPE_SZ, static_cast<int>(kMiB + 16 * kKiB)) >= 0;
  close(fds[0]);
  close(fds[1]);
  return may;
}

// A read of stored data is spliced from the image (spliced_reply.h); the
// largest a reply splices depends on the pipe sizes this process may use,
// and 512 KiB is below it everywhere (a pipe may hold 1 MiB). A splice that
// fails fails that read alone, with its errno and a line in the log, and
// -o splice_reads=off reads through a buffer instead: no splice at all.
// Splicing is for replies through /dev/fuse, so io_uring is off (the
// kernel offers it while uring_test runs beside).
TEST_F(FaultMountTest, SplicedReadFailingWithEioFailsThatReadAlone) {
  constexpr size_t kRead = 512 * kKiB;
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x11 0 1M"}));
  AlignedBuffer owned = AllocAligned(2 * kRead);
  uint8_t* const block = owned.get();
  const std::string expected(kRead, '\x11');
  for (const bool splice : {true, false}) {
    SCOPED_TRACE(splice ? "splice_reads=on" : "splice_reads=off");
    const std::string view = Path("view.raw");
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Control> control, Control::Create(Path("control")));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted,
                         StartWithShim(image, view, *control,
                                       {splice ? "splice_reads=on" : "splice_reads=off", "io_uring=off"}));
    const int fd = open(view.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    ASSERT_GE(fd, 0) << strerror(errno);
    control->Arm(kFaultOnce, kFaultSplice, 1, EIO);
    const ssize_t failed = pread(fd, block, kRead, 0);
    const int error = errno;
    const ssize_t again = pread(fd, block, kRead, 0);
    EXPECT_EQ(again, static_cast<ssize_t>(kRead)) << strerror(errno);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(block), kRead), expected);
    // Below 64 KiB a copy is cheaper: no splice; from 64 KiB on, spliced.
    const uint64_t spliced = control->calls(kFaultSplice);
    EXPECT_EQ(pread(fd, block, 60 * kKiB, 0), static_cast<ssize_t>(60 * kKiB)) << strerror(errno);
    EXPECT_EQ(control->calls(kFaultSplice), spliced);
    EXPECT_EQ(pread(fd, block, 64 * kKiB, 64 * kKiB), static_cast<ssize_t>(64 * kKiB)) << strerror(errno);
    EXPECT_EQ(control->calls(kFaultSplice) > spliced, splice);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(block), 64 * kKiB), expected.substr(0, 64 * kKiB));
    // 1 MiB is spliced too. Where a pipe may hold it and its header, as
    // the daemon's and this test's (both root) may alike, in one reply;
    // elsewhere the mount's max_read caps READs at the largest power of two
    // a pipe holds (MaxReadRequest in ops.h), 512 KiB under the default
    // pipe-max-size, and the kernel splits the read into spliced halves.
    const bool whole = PipesMayHoldAMebibyteReply();
    std::optional<std::vector<std::string>> super = MountSuperOptions(mounted->path());
    ASSERT_TRUE(super.has_value());
    const auto max_read = std::find_if(super->begin(), super->end(),
                                       [](const std::string& o) { return absl::StartsWith(o, "max_read="); });
    if (splice && !whole) {
      ASSERT_NE(max_read, super->end()) << absl::StrJoin(*super, ",");
      uint64_t bytes = 0;
      ASSERT_TRUE(absl::SimpleAtoi(max_read->substr(9), &bytes)) << *max_read;
      EXPECT_TRUE(std::has_single_bit(bytes) && bytes >= 64 * kKiB && bytes < kMiB) << *max_read;
    } else {
      EXPECT_EQ(max_read, super->end()) << *max_read;
    }
    const uint64_t before_1m = control->calls(kFaultSplice);
    EXPECT_EQ(pread(fd, block, 2 * kRead, 0), static_cast<ssize_t>(2 * kRead)) << strerror(errno);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(block), 2 * kRead), expected + expected);
    const uint64_t spliced_1m = control->calls(kFaultSplice) - before_1m;
    if (splice) {
      EXPECT_GE(spliced_1m, whole ? 1u : 2u);
    } else {
      EXPECT_EQ(spliced_1m, 0u);
    }
    close(fd);
    if (splice) {
      EXPECT_EQ(failed, -1);
      EXPECT_EQ(error, EIO) << strerror(error);
      EXPECT_TRUE(control->fired());
    } else {
      EXPECT_EQ(failed, static_cast<ssize_t>(kRead)) << strerror(error);
      EXPECT_EQ(control->calls(kFaultSplice), 0u);
    }
    const std::string log = mounted->ReadLog();
    ASSERT_OK(mounted->Unmount());
    EXPECT_TRUE(mounted->exit_status() && mounted->exit_status()->success()) << log;
    EXPECT_EQ(absl::StrContains(log, "splicing 524288 bytes at host offset"), splice) << log;
  }
}

// A read holds back the reuse of the host clusters it reads until its bytes
// are out (read_tracker.h); a spliced read must hold them to the end of the
// splice. One read is parked just before it splices its data; meanwhile
// the range is discarded through another descriptor, the image flushed (so
// the clusters would be free) and new data written elsewhere (where the
// allocator would take them). Let go, the read must return what the range
// held or zeros, never the new write's bytes.
TEST_F(FaultMountTest, ParkedSplicedReadNeverSeesItsClustersReused) {
  constexpr size_t kRead = 512 * kKiB;
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x11 0 512k"}));
  const std::string view = Path("view.raw");
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Control> control, Control::Create(Path("control")));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted, StartWithShim(image, view, *control, {"io_uring=off"}));
  const int reader = open(view.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  ASSERT_GE(reader, 0) << strerror(errno);
  const int writer = open(view.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  ASSERT_GE(writer, 0) << strerror(errno);
  AlignedBuffer owned_read = AllocAligned(kRead);
  AlignedBuffer owned_write = AllocAligned(kRead);
  uint8_t* const read_block = owned_read.get();
  uint8_t* const write_block = owned_write.get();
  std::memset(write_block, 0x22, kRead);

  control->Arm(kFaultPause, kFaultSplice, control->calls(kFaultSplice) + 1, 0);
  ssize_t got = -1;
  std::thread parked([&] { got = pread(reader, read_block, kRead, 0); });
  const bool fired = control->WaitFired();
  if (fired) {
    EXPECT_EQ(fallocate(writer, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kRead), 0) << strerror(errno);
    EXPECT_EQ(fsync(writer), 0) << strerror(errno);
    EXPECT_EQ(pwrite(writer, write_block, kRead, 4 * kMiB), static_cast<ssize_t>(kRead)) << strerror(errno);
    EXPECT_EQ(fsync(writer), 0) << strerror(errno);
  }
  control->Arm(kFaultNone, kFaultSplice, 0, 0);  // lets the read go on
  parked.join();
  ASSERT_TRUE(fired) << "the read never spliced from the image";
  ASSERT_EQ(got, static_cast<ssize_t>(kRead)) << strerror(errno);
  const std::string bytes(reinterpret_cast<const char*>(read_block), kRead);
  EXPECT_TRUE(bytes == std::string(kRead, '\x11') || bytes == std::string(kRead, '\0'))
      << "the parked read returned bytes that are neither the range's nor zeros, first byte "
      << static_cast<int>(bytes[0]);
  close(reader);
  close(writer);
  ASSERT_OK_AND_ASSIGN(std::string after, UnmountCheckAndConvert(*mounted, image, Path("after.raw")));
  EXPECT_EQ(after.substr(0, kRead), std::string(kRead, '\0'));
  EXPECT_EQ(after.substr(4 * kMiB, kRead), std::string(kRead, '\x22'));
}

// A store into the view's page cache (prefill.h) waits for the lock of
// each page it fills, and a page being read stays locked until its READ is
// answered. Here a READ of a run is parked in its splice from the image
// when a SEEK_HOLE from that run comes: the seek waits for the READ, since
// its store cannot go on; a third thread serves other requests meanwhile;
// once the READ goes on, both end with the image's bytes and the run is in
// the page cache.
TEST_F(FaultMountTest, ASeekHoleWhoseRunIsBeingReadWaitsForThatRead) {
  const std::string image = Path("disk.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", kDiskSize));
  ASSERT_OK(QemuIo(image, "qcow2", {"write -P 0x11 4M 256k"}));
  const std::string view = Path("view.raw");
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Control> control, Control::Create(Path("control")));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<MountedView> mounted,
                       StartWithShim(image, view, *control, {"io_uring=off", "threads=3"}, /*read_only=*/true));
  ScopedFd reader(open(view.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_GE(reader.get(), 0) << strerror(errno);
  ScopedFd seeker(open(view.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_GE(seeker.get(), 0) << strerror(errno);
  std::string read(128 * kKiB, '\0');
  ssize_t got = -1;
  std::atomic<off_t> hole{-2};
  control->Arm(kFaultPause, kFaultSplice, control->calls(kFaultSplice) + 1, 0);
  std::thread parked([&] { got = pread(reader.get(), read.data(), read.size(), 4 * kMiB); });
  const bool fired = control->WaitFired();
  std::thread seek([&] { hole = lseek(seeker.get(), 4 * kMiB, SEEK_HOLE); });
  if (fired) {
    // The other requests go on: an uncached read elsewhere.
    ScopedFd direct(open(view.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC));
    EXPECT_GE(direct.get(), 0) << strerror(errno);
    AlignedBuffer zeros = AllocAligned(64 * kKiB);
    EXPECT_EQ(pread(direct.get(), zeros.get(), 64 * kKiB, 0), static_cast<ssize_t>(64 * kKiB)) << strerror(errno);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    EXPECT_EQ(hole.load(), -2) << "the seek did not wait for the parked read of its run";
  }
  control->Arm(kFaultNone, kFaultSplice, 0, 0);  // lets the read go on
  parked.join();
  seek.join();
  ASSERT_TRUE(fired) << "the read never spliced from the image";
  EXPECT_EQ(got, static_cast<ssize_t>(read.size())) << strerror(errno);
  EXPECT_TRUE(read == std::string(read.size(), '\x11')) << "the parked read returned other bytes";
  EXPECT_EQ(hole.load(), static_cast<off_t>(4 * kMiB + 256 * kKiB));
  ASSERT_OK_AND_ASSIGN(const size_t cached, PagesInCache(seeker.get(), 4 * kMiB, 256 * kKiB));
  EXPECT_EQ(cached, 64u) << "the run is not in the view's page cache";
  reader.Reset();
  seeker.Reset();
  ASSERT_OK(mounted->Unmount());
  EXPECT_TRUE(absl::StrContains(mounted->ReadLog(), "runs of data put in the view's page cache ahead of their "
                                                    "reader: 1 (256 KiB; 1 spliced from the image file)"))
      << mounted->ReadLog();
}

}  // namespace
}  // namespace qcow2fuse::test::cli
