// ext4 written THROUGH a read-write qcow2fuse view, then read back.
//
//   1. an empty 128 MiB qcow2 image is mounted read-write;
//   2. a loop device over the view gets a fresh ext4 (mkfs.ext4), which is
//      mounted read-write; a generated tree (a few hundred files, some MiB,
//      deterministic content) is copied in with cp -a; sync; checksums;
//   3. the file system, the loop device and the view are taken down (the
//      daemon must exit with status 0);
//   4. `qemu-img check` must be clean (no corruptions, no leaks) and
//      `e2fsck -fn` of `qemu-img convert -O raw` of the image too;
//   5. the view is mounted again read-only, loop-mounted read-only, and
//      every file's checksum must match.
//
// Every mount and loop device sits in an RAII guard, torn down in reverse
// order in every path. Needs root and loop devices; skipped without them.
// The tree is seeded: QCOW2FUSE_TEST_SEED=N replays it.

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "support/command.h"
#include "support/file_util.h"
#include "support/loop_device.h"
#include "support/mount.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

namespace fs = std::filesystem;

constexpr size_t kLogTail = 8192;

// A qcow2fuse mount (read-write unless asked otherwise) for the length of
// a scope: `qcow2fuse -f [-o ro] IMAGE MOUNTPOINT` under setpriv
// --pdeathsig TERM; taken down with fusermount3 -u and a bounded wait, or,
// failing that, SIGKILL to that pid only and fusermount3 -uz. The child is
// reaped in every path. (MountedView always mounts read-only.)
class RwView {
 public:
  static absl::StatusOr<std::unique_ptr<RwView>> Start(
      const std::string& image, const std::string& mountpoint,
      bool read_only = false) {
    const std::string log_path = mountpoint + ".log";
    std::vector<std::string> argv = {Qcow2fuseBinary(QCOW2FUSE_BINARY), "-f"};
    if (read_only) {
      argv.push_back("-o");
      argv.push_back("ro");
    }
    argv.push_back(image);
    argv.push_back(mountpoint);
    const int log_fd =
        open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      return absl::InternalError(
          absl::StrCat("cannot create ", log_path, ": ", strerror(errno)));
    }
    std::vector<std::string> guarded = {"setpriv", "--pdeathsig", "TERM",
                                        "--"};
    guarded.insert(guarded.end(), argv.begin(), argv.end());
    absl::StatusOr<pid_t> pid = Spawn(guarded, log_fd, log_fd);
    if (!pid.ok()) pid = Spawn(argv, log_fd, log_fd);
    close(log_fd);
    if (!pid.ok()) return pid.status();
    std::unique_ptr<RwView> view(
        new RwView(mountpoint, log_path, CommandLine(argv), *pid));
    if (absl::Status live = view->WaitUntilLive(); !live.ok()) {
      view->ForceCleanup();
      return live;
    }
    return view;
  }

  RwView(const RwView&) = delete;
  RwView& operator=(const RwView&) = delete;

  ~RwView() {
    if (::testing::Test::HasFailure()) {
      std::string log = ReadLog();
      if (log.size() > kLogTail) {
        log = "...\n" + log.substr(log.size() - kLogTail);
      }
      std::cerr << "--- qcow2fuse log (" << log_path_ << ") ---\n"
                << log << "--- end of log ---\n";
    }
    if (!reaped_) {
      absl::Status unmounted = Unmount();
      if (!unmounted.ok()) {
        std::cerr << "RwView: clean unmount of " << path_
                  << " failed, forcing: " << unmounted << "\n";
      }
    }
    ForceCleanup();
  }

  const std::string& path() const { return path_; }
  const std::optional<ExitStatus>& exit_status() const { return exit_; }

  std::string ReadLog() const {
    std::ifstream in(log_path_, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
  }

  absl::Status Unmount() {
    if (reaped_ && !MountedFsType(path_)) return absl::OkStatus();
    absl::Status unmounted = absl::OkStatus();
    // A just-detached loop device may hold the view for a moment.
    for (int attempt = 0; attempt < 100 && MountedFsType(path_); ++attempt) {
      unmounted = RunChecked({"fusermount3", "-u", path_}).status();
      if (unmounted.ok()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (!unmounted.ok()) return unmounted;
    return WaitForChild(std::chrono::seconds(60));
  }

 private:
  RwView(std::string path, std::string log_path, std::string command_line,
         pid_t pid)
      : path_(std::move(path)),
        log_path_(std::move(log_path)),
        command_line_(std::move(command_line)),
        pid_(pid) {}

  bool ReapIfExited() {
    if (reaped_) return true;
    absl::StatusOr<std::optional<ExitStatus>> status =
        WaitForExitFor(pid_, std::chrono::milliseconds(0));
    if (!status.ok()) {
      reaped_ = true;
      return true;
    }
    if (!status->has_value()) return false;
    reaped_ = true;
    exit_ = **status;
    return true;
  }

  absl::Status WaitUntilLive() {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(20);
    for (;;) {
      if (ReapIfExited()) {
        return absl::InternalError(absl::StrCat(
            "qcow2fuse exited before the mount was live (",
            exit_ ? exit_->ToString() : "status unknown", "): ", command_line_,
            "\n--- log ---\n", ReadLog()));
      }
      std::optional<std::string> type = MountedFsType(path_);
      struct stat st;
      if (type && absl::StartsWith(*type, "fuse") &&
          stat(path_.c_str(), &st) == 0) {
        return absl::OkStatus();
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat(
            "mount not live after 20 s: ", command_line_, "\n--- log ---\n",
            ReadLog()));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  absl::Status WaitForChild(std::chrono::milliseconds timeout) {
    if (reaped_) return absl::OkStatus();
    absl::StatusOr<std::optional<ExitStatus>> status =
        WaitForExitFor(pid_, timeout);
    if (!status.ok()) {
      reaped_ = true;
      return status.status();
    }
    if (!status->has_value()) {
      return absl::DeadlineExceededError(absl::StrCat(
          "qcow2fuse (pid ", pid_, ") still running ", timeout.count(),
          " ms after unmount"));
    }
    reaped_ = true;
    exit_ = **status;
    return absl::OkStatus();
  }

  void ForceCleanup() {
    if (!reaped_) {
      std::cerr << "RwView: killing qcow2fuse pid " << pid_ << "\n";
      kill(pid_, SIGKILL);
      absl::StatusOr<std::optional<ExitStatus>> status =
          WaitForExitFor(pid_, std::chrono::seconds(10));
      if (status.ok() && status->has_value()) exit_ = **status;
      reaped_ = true;
    }
    if (MountedFsType(path_)) {
      absl::Status detached = RunChecked({"fusermount3", "-uz", path_}).status();
      if (!detached.ok()) {
        std::cerr << "RwView: could not detach " << path_ << ": " << detached
                  << "\n";
      }
    }
  }

  const std::string path_;
  const std::string log_path_;
  const std::string command_line_;
  const pid_t pid_;
  bool reaped_ = false;
  std::optional<ExitStatus> exit_;
};

uint64_t TestSeed() {
  const char* text = std::getenv("QCOW2FUSE_TEST_SEED");
  uint64_t seed = 0;
  if (text != nullptr && absl::SimpleAtoi(text, &seed)) return seed;
  return std::random_device()();
}

// Generates about 300 files (some MiB in all) in nested directories.
// Returns their paths relative to `root`.
absl::StatusOr<std::vector<std::string>> GenerateTree(const std::string& root,
                                                      uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto uniform = [&rng](uint64_t lo, uint64_t hi) {
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng);
  };
  std::vector<std::string> dirs = {""};
  for (int i = 0; i < 24; ++i) {
    const std::string& parent = dirs[uniform(0, dirs.size() - 1)];
    dirs.push_back(absl::StrCat(parent, parent.empty() ? "" : "/", "dir", i));
  }
  std::error_code error;
  for (const std::string& dir : dirs) {
    fs::create_directories(root + "/" + dir, error);
    if (error) return absl::InternalError(error.message());
  }
  std::vector<std::string> files;
  for (int i = 0; i < 300; ++i) {
    const std::string& dir = dirs[uniform(0, dirs.size() - 1)];
    const std::string name =
        absl::StrCat(dir, dir.empty() ? "" : "/", "file", i, ".bin");
    const int shape = uniform(0, 99);
    uint64_t size;
    if (shape < 5) {
      size = 0;
    } else if (shape < 70) {
      size = uniform(1, 8 * kKiB);
    } else if (shape < 95) {
      size = uniform(8 * kKiB, 160 * kKiB);
    } else {
      size = uniform(kMiB, 3 * kMiB);
    }
    std::string data(size, '\0');
    const bool zeros = uniform(0, 19) == 0;  // some all-zero files
    if (!zeros) {
      for (size_t at = 0; at < size; at += 8) {
        const uint64_t word = rng();
        memcpy(data.data() + at, &word, std::min<size_t>(8, size - at));
      }
    }
    if (absl::Status s = WriteFileAt(root + "/" + name, 0, data); !s.ok()) {
      return s;
    }
    files.push_back(name);
  }
  return files;
}

// sha256sum of each of `files` (relative to `root`), in a few runs.
absl::StatusOr<std::map<std::string, std::string>> Checksums(
    const std::string& root, const std::vector<std::string>& files) {
  std::map<std::string, std::string> digests;
  constexpr size_t kBatch = 100;
  for (size_t start = 0; start < files.size(); start += kBatch) {
    std::vector<std::string> argv = {"sha256sum", "--"};
    for (size_t i = start; i < std::min(files.size(), start + kBatch); ++i) {
      argv.push_back(root + "/" + files[i]);
    }
    absl::StatusOr<std::string> out = RunChecked(argv);
    if (!out.ok()) return out.status();
    size_t i = start;
    for (absl::string_view line : absl::StrSplit(*out, '\n', absl::SkipEmpty())) {
      if (line.size() < 66 || i >= files.size()) {
        return absl::InternalError(absl::StrCat("bad sha256sum line: ", line));
      }
      digests[files[i++]] = std::string(line.substr(0, 64));
    }
    if (i != std::min(files.size(), start + kBatch)) {
      return absl::InternalError("sha256sum printed too few lines");
    }
  }
  return digests;
}

void ExpectCleanCheck(const std::string& image) {
  absl::StatusOr<CommandResult> result = RunCommand(
      {"qemu-img", "check", "-f", "qcow2", "--output=json", image});
  ASSERT_OK(result);
  auto count = [&](const std::string& key) -> uint64_t {
    std::smatch match;
    const std::regex field("\"" + key + "\"\\s*:\\s*(\\d+)");
    uint64_t value = 0;
    if (std::regex_search(result->stdout_text, match, field)) {
      (void)absl::SimpleAtoi(match[1].str(), &value);
    }
    return value;
  };
  const bool clean = result->ok() && count("corruptions") == 0 &&
                     count("leaks") == 0 && count("check-errors") == 0;
  if (clean) return;
  std::string human;
  absl::StatusOr<CommandResult> text =
      RunCommand({"qemu-img", "check", "-f", "qcow2", image});
  if (text.ok()) human = text->stdout_text + text->stderr_text;
  ADD_FAILURE() << "qemu-img check: " << result->status.ToString() << "\n"
                << result->stdout_text << result->stderr_text
                << "\n--- text ---\n"
                << human;
}

struct Variant {
  std::string name;
  std::vector<std::string> create_options;
};

void PrintTo(const Variant& variant, std::ostream* out) {
  *out << variant.name;
}

class Ext4WriteTest : public ::testing::TestWithParam<Variant> {};

TEST_P(Ext4WriteTest, MkfsCopyAndReadBack) {
  if (std::string reason = LoopUnavailableReason(); !reason.empty()) {
    GTEST_SKIP() << "loop devices unavailable: " << reason;
  }
  const auto started = std::chrono::steady_clock::now();
  const uint64_t seed = TestSeed();
  std::cout << "QCOW2FUSE_TEST_SEED=" << seed << "\n";
  RecordProperty("seed", absl::StrCat(seed));

  // Declared first so it is removed last, after every mount inside it.
  ASSERT_OK_AND_ASSIGN(TempDir dir,
                       TempDir::Create("ext4w-" + GetParam().name));
  const std::string tree = dir.Join("tree");
  const std::string image = dir.Join("fs.qcow2");
  const std::string view_path = dir.Join("view.raw");
  const std::string mount_dir = dir.Join("mnt");
  fs::create_directory(mount_dir);
  ASSERT_OK_AND_ASSIGN(std::vector<std::string> files,
                       GenerateTree(tree, seed));
  ASSERT_OK_AND_ASSIGN(auto want, Checksums(tree, files));
  ASSERT_OK(CreateImage(image, "qcow2", 128 * kMiB, GetParam().create_options));

  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<RwView> view,
                         RwView::Start(image, view_path));
    {
      ASSERT_OK_AND_ASSIGN(
          std::unique_ptr<LoopDevice> loop,
          LoopDevice::Attach(view->path(), /*read_only=*/false));
      ASSERT_OK(RunChecked({"mkfs.ext4", "-q", "-F", loop->device()}));
      ASSERT_OK_AND_ASSIGN(
          std::unique_ptr<KernelMount> mounted,
          KernelMount::Mount(loop->device(), mount_dir, "ext4", "rw"));
      ASSERT_OK(RunChecked({"cp", "-a", "--", tree + "/.", mount_dir}));
      ASSERT_OK(RunChecked({"sync"}));
      ASSERT_OK_AND_ASSIGN(auto written, Checksums(mount_dir, files));
      EXPECT_EQ(written, want);
      ASSERT_OK(mounted->Unmount());
    }  // losetup -d, waiting until the view is let go.
    ASSERT_OK(view->Unmount());
    ASSERT_TRUE(view->exit_status().has_value());
    EXPECT_TRUE(view->exit_status()->success())
        << view->exit_status()->ToString() << "\n" << view->ReadLog();
  }

  ExpectCleanCheck(image);
  const std::string raw = dir.Join("fs.raw");
  ASSERT_OK(ConvertToRaw(image, raw));
  {
    absl::StatusOr<CommandResult> fsck =
        RunCommand({"e2fsck", "-f", "-n", raw});
    ASSERT_OK(fsck);
    EXPECT_TRUE(fsck->ok()) << "e2fsck -fn of the image's raw conversion: "
                            << fsck->status.ToString() << "\n"
                            << fsck->stdout_text << fsck->stderr_text;
  }

  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<RwView> view,
                         RwView::Start(image, view_path, /*read_only=*/true));
    EXPECT_OK(CompareFiles(view->path(), raw));
    {
      ASSERT_OK_AND_ASSIGN(
          std::unique_ptr<LoopDevice> loop,
          LoopDevice::Attach(view->path(), /*read_only=*/true));
      ASSERT_OK_AND_ASSIGN(
          std::unique_ptr<KernelMount> mounted,
          KernelMount::Mount(loop->device(), mount_dir, "ext4", "ro,noload"));
      ASSERT_OK_AND_ASSIGN(auto read_back, Checksums(mount_dir, files));
      EXPECT_EQ(read_back.size(), want.size());
      for (const auto& [name, digest] : want) {
        EXPECT_EQ(read_back[name], digest) << name;
      }
      ASSERT_OK(mounted->Unmount());
    }
    ASSERT_OK(view->Unmount());
    ASSERT_TRUE(view->exit_status().has_value());
    EXPECT_TRUE(view->exit_status()->success())
        << view->exit_status()->ToString();
  }
  const double seconds = std::chrono::duration<double>(
                             std::chrono::steady_clock::now() - started)
                             .count();
  std::cout << GetParam().name << ": " << files.size() << " files, "
            << absl::StrFormat("%.2f", seconds) << " s\n";
}

INSTANTIATE_TEST_SUITE_P(
    Images, Ext4WriteTest,
    ::testing::Values(Variant{"cluster_64k", {}},
                      Variant{"cluster_4k", {"cluster_size=4096"}}),
    [](const ::testing::TestParamInfo<Variant>& info) {
      return info.param.name;
    });

}  // namespace
}  // namespace qcow2fuse::test
