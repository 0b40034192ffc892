#include "support/loop_device.h"

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "support/command.h"

namespace qcow2fuse::test {
namespace {

namespace fs = std::filesystem;

constexpr std::chrono::seconds kDetachTimeout(10);

}  // namespace

std::string LoopUnavailableReason() {
  if (geteuid() != 0) return "not root: losetup and mount need root";
  if (!fs::exists("/dev/loop-control")) return "no /dev/loop-control";
  absl::StatusOr<CommandResult> free_device = RunCommand({"losetup", "-f"});
  if (!free_device.ok()) return std::string(free_device.status().message());
  if (!free_device->ok()) {
    return absl::StrCat("losetup -f failed: ", free_device->stderr_text);
  }
  return "";
}

absl::StatusOr<std::unique_ptr<LoopDevice>> LoopDevice::Attach(
    const std::string& file, bool read_only, bool direct_io) {
  std::vector<std::string> argv = {"losetup"};
  if (read_only) argv.push_back("-r");
  if (direct_io) argv.push_back("--direct-io=on");
  argv.insert(argv.end(), {"-f", "--show", file});
  absl::StatusOr<std::string> out = RunChecked(argv);
  if (!out.ok()) return out.status();
  std::string device(absl::StripAsciiWhitespace(*out));
  auto loop = std::unique_ptr<LoopDevice>(new LoopDevice(device));
  if (direct_io) {
    // losetup falls back to buffered I/O, with only a warning, where the
    // file refuses O_DIRECT.
    if (const std::string value = LoopDioFlag(device); value != "1") {
      return absl::FailedPreconditionError(
          absl::StrCat(device, " over ", file, " does buffered I/O, not direct I/O (loop/dio is '", value, "')"));
    }
  }
  return loop;
}

std::string LoopDioFlag(const std::string& device) {
  std::ifstream dio(absl::StrCat("/sys/block/", fs::path(device).filename().string(), "/loop/dio"));
  std::string value;
  std::getline(dio, value);
  return value;
}

bool WaitUntilDetached(const std::string& device) {
  const std::string backing =
      absl::StrCat("/sys/block/", fs::path(device).filename().string(),
                   "/loop/backing_file");
  const auto deadline = std::chrono::steady_clock::now() + kDetachTimeout;
  while (fs::exists(backing) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return !fs::exists(backing);
}

LoopDevice::~LoopDevice() {
  absl::Status detached = RunChecked({"losetup", "-d", device_}).status();
  if (!detached.ok()) std::cerr << "LoopDevice: " << detached << "\n";
  if (!WaitUntilDetached(device_)) {
    std::cerr << "LoopDevice: " << device_ << " still attached\n";
  }
}

absl::StatusOr<std::unique_ptr<KernelMount>> KernelMount::Mount(
    const std::string& device, const std::string& dir,
    const std::string& fs_type, const std::string& options) {
  absl::Status mounted =
      RunChecked({"mount", "-t", fs_type, "-o", options, device, dir}).status();
  if (!mounted.ok()) return mounted;
  return std::unique_ptr<KernelMount>(new KernelMount(dir));
}

absl::Status KernelMount::Unmount() {
  if (!mounted_) return absl::OkStatus();
  absl::Status status = RunChecked({"umount", dir_}).status();
  if (status.ok()) mounted_ = false;
  return status;
}

KernelMount::~KernelMount() {
  if (!mounted_ || Unmount().ok()) return;
  absl::Status lazy = RunChecked({"umount", "-l", dir_}).status();
  if (!lazy.ok()) std::cerr << "KernelMount: " << lazy << "\n";
}

}  // namespace qcow2fuse::test
