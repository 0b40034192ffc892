// Helpers local to the command-line tests (tests/cli): running qcow2fuse
// itself with a bounded wait and a working directory, cleaning up after a
// daemon-mode mount, and reading and patching qcow2 metadata by hand.
//
// What tests/support already offers (MountedView, RunCommand, TempDir, the
// qemu helpers) is used as is; this file only adds what the command-line
// tests need beyond it:
//
//  * RunBounded: RunCommand with a time limit (a hang is a test failure,
//    never a stuck test) and a watch on the mountpoint, so that a
//    foreground run that mounts when it should have refused is taken down
//    again instead of waiting for the limit.
//  * DaemonGuard: without -f, qcow2fuse forks a daemon that outlives the
//    command; the guard unmounts it and waits for (and if need be kills)
//    that pid, in every path out of a test.
//  * Qcow2Header and friends: the few big-endian header fields the damage
//    tests need, parsed here rather than trusted from the code under test.
//  * TempDirTest, StartDaemon, RunUnmount, FailsWithOneLine, ThreadFlags:
//    what the durability, unmount and safety tests share.

#ifndef QCOW2FUSE_TESTS_CLI_CLI_UTIL_H_
#define QCOW2FUSE_TESTS_CLI_CLI_UTIL_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "absl/strings/string_view.h"
#include "support/command.h"
#include "support/mount.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test::cli {

// The binary under test: $QCOW2FUSE_BINARY if set (an installed build, or
// an older one to see a test fail), else the one built with the tests.
inline const std::string& Binary() {
  static const std::string binary = Qcow2fuseBinary(QCOW2FUSE_BINARY);
  return binary;
}

// Options for a read-write view of `image` at `mountpoint`, served by the
// binary under test (MountedView mounts it, and always unmounts it).
MountOptions WritableView(const std::string& image, const std::string& mountpoint);
// The same for a read-only view (-o ro).
MountOptions ReadOnlyView(const std::string& image, const std::string& mountpoint);

// Makes this process a child subreaper (prctl), so a daemon that qcow2fuse
// forks is re-parented to the test when its parent exits: the test can then
// reap it and learn its exit status, and it never lingers as a zombie.
void BecomeSubreaper();

struct RunOptions {
  // Working directory of the child; empty means the test's own.
  std::string cwd;
  // A run that takes longer is killed (that pid only) and reported.
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
  // If non-empty (absolute, canonical): a mount that appears here while the
  // command runs is recorded and taken down with `fusermount3 -u`, so a
  // foreground run that should have failed does not sit until the timeout.
  std::string watch_mountpoint;
};

// A CommandResult and what RunBounded adds to it.
struct RunResult : CommandResult {
  std::string cwd;
  bool mounted_during_run = false;  // only with RunOptions::watch_mountpoint

  // Command line, working directory, how it ended, stdout and stderr: for
  // failure messages.
  std::string Describe() const;
};

// RunCommand under `options`. An error only if it could not be run at all.
absl::StatusOr<RunResult> RunBounded(const std::vector<std::string>& argv,
                                     const RunOptions& options = {});

// How a process that is not (necessarily) our child ended.
struct PidGone {
  bool gone = false;                  // no longer running
  std::optional<ExitStatus> status;   // known if we could reap it
};

// Waits up to `timeout` for `pid` to be gone: reaped by us (when it is our
// child, e.g. via BecomeSubreaper) or, when it is not our child, kill(pid, 0)
// answering ESRCH.
PidGone WaitForPidGone(pid_t pid, std::chrono::milliseconds timeout);

// Reads the decimal pid in a --pidfile.
absl::StatusOr<pid_t> ReadPidFile(const std::string& path);

// True if `path` (absolute, canonical) is currently a mount point.
bool IsMounted(const std::string& path);

// Takes down a daemon-mode mount whatever state the test left it in.
// Construct it before starting `qcow2fuse` without -f; on destruction (or
// Cleanup()): `fusermount3 -u` if still mounted, a bounded wait for the pid
// (remembered or read from the pidfile) to go, SIGKILL for that pid only if
// it does not, and `fusermount3 -uz` if a mount is still left.
class DaemonGuard {
 public:
  DaemonGuard(std::string mountpoint, std::string pidfile);
  DaemonGuard(const DaemonGuard&) = delete;
  DaemonGuard& operator=(const DaemonGuard&) = delete;
  ~DaemonGuard();

  // Reads the pidfile and remembers the pid for Cleanup().
  absl::StatusOr<pid_t> ReadPid();
  // The daemon is known to be gone (the test waited for it itself).
  void Forget() { pid_ = 0; }
  void Cleanup();

 private:
  std::string mountpoint_;
  std::string pidfile_;
  pid_t pid_ = 0;
};

// Big-endian integers in a file.
absl::StatusOr<uint64_t> ReadBE64At(const std::string& path, uint64_t offset);
absl::StatusOr<uint32_t> ReadBE32At(const std::string& path, uint64_t offset);
absl::Status WriteBE64At(const std::string& path, uint64_t offset,
                         uint64_t value);
absl::Status WriteBE32At(const std::string& path, uint64_t offset,
                         uint32_t value);

// Byte offsets of qcow2 header fields (docs/interop/qcow2.txt).
namespace hdr {
inline constexpr uint64_t kMagic = 0;
inline constexpr uint64_t kVersion = 4;
inline constexpr uint64_t kBackingFileOffset = 8;
inline constexpr uint64_t kBackingFileSize = 16;
inline constexpr uint64_t kClusterBits = 20;
inline constexpr uint64_t kSize = 24;
inline constexpr uint64_t kCryptMethod = 32;
inline constexpr uint64_t kL1Size = 36;
inline constexpr uint64_t kL1TableOffset = 40;
inline constexpr uint64_t kRefcountTableOffset = 48;
inline constexpr uint64_t kIncompatibleFeatures = 72;
inline constexpr uint64_t kHeaderLength = 100;  // version 3
inline constexpr uint32_t kQcow2Magic = 0x514649fb;  // "QFI\xfb"
// Header extension types.
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtExternalDataFile = 0x44415441;
}  // namespace hdr

// How many requests of `opcode` ("READ", "FLUSH", ...) libfuse's trace
// (-o debug) in the daemon's log `log` shows.
size_t TracedRequests(const std::string& log, const std::string& opcode);

// How many pages of [offset, offset + length) of the file open at `fd`
// (offset a multiple of 4 KiB) are in its page cache: mincore of a shared
// mapping, which reads nothing.
absl::StatusOr<size_t> PagesInCache(int fd, uint64_t offset, uint64_t length);

// Gives header extension `type` of the version 3 image at `path` a type
// no reader knows, so that readers skip it (docs/interop/qcow2.txt,
// "Header extensions"): the image reads as one that never recorded it, as
// images of older QEMUs (no backing format) or other tools (a data file
// without a name) do. NotFound if the image has no such extension.
absl::Status HideHeaderExtension(const std::string& path, uint32_t type);

// The header fields the tests use.
struct Qcow2Header {
  uint32_t magic = 0;
  uint32_t version = 0;
  uint32_t cluster_bits = 0;
  uint64_t size = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t incompatible_features = 0;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint64_t l2_entries() const { return cluster_size() / 8; }
};

absl::StatusOr<Qcow2Header> ReadQcow2Header(const std::string& path);

// Where, in the image file, the L1 entry and the L2 entry that map guest
// offset `guest` are (standard 64-bit L2 entries; the L1 entry must point
// to an L2 table).
absl::StatusOr<uint64_t> L1EntryOffset(const std::string& image,
                                       uint64_t guest);
absl::StatusOr<uint64_t> L2EntryOffset(const std::string& image,
                                       uint64_t guest);

// Bits of L1/L2 entries.
inline constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ULL;
inline constexpr uint64_t kCopiedFlag = uint64_t{1} << 63;
inline constexpr uint64_t kCompressedFlag = uint64_t{1} << 62;

// How qcow2fuse is started in a refusal check.
enum class Mode { kDaemon, kForeground };

// Runs `qcow2fuse [-f] -o ro[,extra_options] [--pidfile P] IMAGE MNT` in
// `dir`, with MNT = dir/<label>.raw which does not exist yet, and checks a
// clean refusal: a normal exit (not a signal, not a hang) with a non-zero
// code; exactly one line on stderr, starting "qcow2fuse: " and containing
// at least one of `keywords` (case-insensitive); nothing mounted at MNT
// during or after the run; MNT (created by qcow2fuse, if at all) gone again;
// no pidfile left. `stderr_out`, if given, receives stderr.
::testing::AssertionResult RefusesCleanly(
    const std::string& dir, const std::string& label, const std::string& image,
    const std::vector<std::string>& extra_options,
    const std::vector<std::string>& keywords, Mode mode,
    std::string* stderr_out = nullptr);

// A test with a scratch directory of its own, made a subreaper (see
// BecomeSubreaper) so the daemons it starts become its children.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override;
  std::string Path(absl::string_view name) const { return dir_->Join(name); }

  // Declared before any guard a test body makes, so destroyed after it.
  std::unique_ptr<TempDir> dir_;
};

// Runs `qcow2fuse [-o OPTIONS] --pidfile PIDFILE IMAGE MOUNTPOINT` (daemon
// mode; read-write unless OPTIONS say ro), which returns once the view
// answers. Make a DaemonGuard for MOUNTPOINT and PIDFILE first.
absl::StatusOr<RunResult> StartDaemon(const std::string& image,
                                      const std::string& mountpoint,
                                      const std::string& pidfile,
                                      const std::vector<std::string>& options = {});

// `qcow2fuse -u PATH`.
absl::StatusOr<RunResult> RunUnmount(const std::string& path);

// A clean refusal or failure: a normal exit with a non-zero code, and on
// stderr exactly one line, starting "qcow2fuse: " and holding every one of
// `words` (case-insensitive).
::testing::AssertionResult FailsWithOneLine(const RunResult& run,
                                            const std::vector<std::string>& words);

// The flags field (the 9th) of /proc/PID/task/TID/stat, for every thread
// of `pid`: the kernel's PF_* bits.
absl::StatusOr<std::vector<std::pair<pid_t, unsigned long>>> ThreadFlags(pid_t pid);

// Whether this process has capability number `cap` in its effective set.
bool HasEffectiveCapability(int cap);

// Whether the running kernel is at least MAJOR.MINOR (uname's release).
bool KernelAtLeast(int major, int minor);

// A writable descriptor of a file, held by a child process. A test that
// checks when writes become durable must not hold the descriptor itself:
// every program it starts (qemu-io, fusermount3) gets a copy of its
// descriptor table, and the exec that closes the copy is a close of the
// view, whose FLUSH makes the writes durable.
class DescriptorHolder {
 public:
  // Forks a child that opens `path` O_WRONLY and waits for commands.
  static absl::StatusOr<std::unique_ptr<DescriptorHolder>> Open(const std::string& path);
  DescriptorHolder(const DescriptorHolder&) = delete;
  DescriptorHolder& operator=(const DescriptorHolder&) = delete;
  // Closes the descriptor (if still open) and reaps the child.
  ~DescriptorHolder();

  // pwrite of `length` bytes of `pattern` at `offset`, all of them.
  absl::Status Write(int pattern, uint64_t offset, uint64_t length);
  // close() of the descriptor, with its result.
  absl::Status Close();

 private:
  DescriptorHolder(pid_t pid, int to_child, int from_child)
      : pid_(pid), to_child_(to_child), from_child_(from_child) {}
  // Sends one command and returns the child's errno for it (0: success).
  absl::StatusOr<int> Command(char op, int pattern, uint64_t offset, uint64_t length);

  const pid_t pid_;
  int to_child_;
  int from_child_;
  bool closed_ = false;
};

}  // namespace qcow2fuse::test::cli

#endif  // QCOW2FUSE_TESTS_CLI_CLI_UTIL_H_
