#include "options.h"

#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace qcow2fuse {
namespace {

// realpath() of the parent directory joined with the last component, so the
// path survives the daemon's chdir("/") even if the file does not exist yet.
absl::StatusOr<std::string> AbsolutePath(const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError("empty path");
  if (path[0] == '/') return path;
  char cwd[PATH_MAX];
  if (getcwd(cwd, sizeof cwd) == nullptr) return absl::InternalError("cannot get the working directory");
  return std::string(cwd) + "/" + path;
}

constexpr int kMaxThreads = 64;
constexpr int kMaxDrainTimeoutSeconds = 24 * 3600;
constexpr int kMaxFlushIntervalSeconds = 24 * 3600;
// Below this few images open at all (a 2 MiB cluster is read whole);
// a smaller value is a typo, not a choice.
constexpr uint64_t kMinMetadataMemory = uint64_t{1} << 20;

absl::Status ApplyMountOption(const std::string& option, MountOptions& out) {
  std::vector<std::string> kv = absl::StrSplit(option, absl::MaxSplits('=', 1));
  const std::string& key = kv[0];
  const bool has_value = kv.size() == 2;
  if (key == "ro" && !has_value) {
    out.image_options.read_only = true;
  } else if (key == "rw" && !has_value) {
    out.image_options.read_only = false;
  } else if (key == "force_share" && !has_value) {
    out.image_options.force_share = true;
  } else if (key == "allow_other" && !has_value) {
    out.allow_other = true;
  } else if (key == "l2_cache_size" && has_value) {
    absl::StatusOr<uint64_t> bytes = ParseByteSize(kv[1]);
    if (!bytes.ok()) return bytes.status();
    out.image_options.l2_cache_size = *bytes;
  } else if (key == "max_metadata_memory" && has_value) {
    absl::StatusOr<uint64_t> bytes = ParseByteSize(kv[1]);
    if (!bytes.ok()) return bytes.status();
    if (*bytes < kMinMetadataMemory) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "max_metadata_memory must be at least %uM, not '%s'", kMinMetadataMemory >> 20, kv[1]));
    }
    out.image_options.max_metadata_memory = *bytes;
  } else if (key == "threads" && has_value) {
    int n = 0;
    if (!absl::SimpleAtoi(kv[1], &n) || n < 1 || n > kMaxThreads) {
      return absl::InvalidArgumentError(
          absl::StrFormat("threads must be a number from 1 to %d, not '%s'", kMaxThreads, kv[1]));
    }
    out.threads = n;
  } else if (key == "drain_timeout" && has_value) {
    int n = 0;
    if (!absl::SimpleAtoi(kv[1], &n) || n < 1 || n > kMaxDrainTimeoutSeconds) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "drain_timeout must be a number of seconds from 1 to %d, not '%s'", kMaxDrainTimeoutSeconds, kv[1]));
    }
    out.drain_timeout_seconds = n;
  } else if (key == "flush_interval" && has_value) {
    int n = 0;
    if (!absl::SimpleAtoi(kv[1], &n) || n < 0 || n > kMaxFlushIntervalSeconds) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "flush_interval must be a number of seconds from 0 to %d, not '%s'", kMaxFlushIntervalSeconds, kv[1]));
    }
    out.flush_interval_seconds = n;
  } else if (key == "detect_zeroes" && has_value) {
    // QEMU's spelling and values.
    if (kv[1] == "off") {
      out.image_options.detect_zeroes = DetectZeroes::kOff;
    } else if (kv[1] == "on") {
      out.image_options.detect_zeroes = DetectZeroes::kOn;
    } else if (kv[1] == "unmap") {
      out.image_options.detect_zeroes = DetectZeroes::kUnmap;
    } else {
      return absl::InvalidArgumentError(
          absl::StrFormat("detect_zeroes must be off, on or unmap, not '%s'", kv[1]));
    }
  } else if (key == "data_file" && has_value && !kv[1].empty()) {
    absl::StatusOr<std::string> path = AbsolutePath(kv[1]);
    if (!path.ok()) return path.status();
    out.image_options.data_file = *path;
  } else {
    return absl::InvalidArgumentError(absl::StrFormat("unknown mount option '%s'", option));
  }
  return absl::OkStatus();
}

}  // namespace

const char* UsageText() {
  return "usage: qcow2fuse [options] IMAGE MOUNTPOINT\n"
         "       qcow2fuse -u MOUNTPOINT\n"
         "\n"
         "Shows the qcow2 disk image IMAGE as the raw file MOUNTPOINT (a regular\n"
         "file, created if missing and removed again at unmount).\n"
         "\n"
         "qcow2fuse -u MOUNTPOINT unmounts the view and returns once its daemon has\n"
         "flushed the image, released its locks and exited, so that qemu-img or a\n"
         "new mount can use the image right away (fusermount3 -u does not wait).\n"
         "\n"
         "options:\n"
         "  -o ro                  read-only view\n"
         "  -o force_share         with ro: take no image locks, like qemu-img -U\n"
         "  -o allow_other         let other users access the view\n"
         "  -o l2_cache_size=SIZE  L2 table cache per image (default 4M)\n"
         "  -o max_metadata_memory=SIZE\n"
         "                         memory the image and its backing chain may use\n"
         "                         for tables and caches whose size the images\n"
         "                         decide; a larger image is refused (default 256M)\n"
         "  -o data_file=PATH      the image's external data file\n"
         "  -o threads=N           requests run on N threads (default 16)\n"
         "  -o drain_timeout=S     at unmount, wait S seconds for running requests,\n"
         "                         then exit without them (default 30)\n"
         "  -o flush_interval=S    make writes durable at most S seconds after they\n"
         "                         were acknowledged, also while the view stays open\n"
         "                         (default 5; 0: only at fsync, close and unmount)\n"
         "  -o detect_zeroes=MODE  off (default), on: all-zero writes become zero\n"
         "                         clusters; unmap: and free their space\n"
         "  -f                     stay in the foreground, log to stderr\n"
         "  -d                     foreground, with libfuse's request trace\n"
         "  --pidfile PATH         write the daemon's process id to PATH\n"
         "  -u                     unmount MOUNTPOINT and wait for its daemon to exit\n"
         "  -h, --help             this text\n"
         "  -V, --version          the version\n";
}

absl::StatusOr<uint64_t> ParseByteSize(const std::string& text) {
  std::string digits = text;
  uint64_t multiplier = 1;
  if (!digits.empty()) {
    switch (digits.back()) {
      case 'k': case 'K': multiplier = uint64_t{1} << 10; break;
      case 'm': case 'M': multiplier = uint64_t{1} << 20; break;
      case 'g': case 'G': multiplier = uint64_t{1} << 30; break;
      case 't': case 'T': multiplier = uint64_t{1} << 40; break;
      default: break;
    }
    if (multiplier != 1) digits.pop_back();
  }
  uint64_t value;
  if (!absl::SimpleAtoi(digits, &value) || value > UINT64_MAX / multiplier) {
    return absl::InvalidArgumentError(absl::StrFormat("'%s' is not a size", text));
  }
  return value * multiplier;
}

absl::StatusOr<MountOptions> ParseCommandLine(int argc, char** argv) {
  MountOptions out;
  out.image_options.read_only = false;  // a plain mount asks for writing
  std::vector<std::string> positional;
  bool mount_options_given = false;  // anything that only a mount uses
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&]() -> absl::StatusOr<std::string> {
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrFormat("%s needs a value", arg));
      return std::string(argv[++i]);
    };
    if (arg == "-h" || arg == "--help") {
      out.help = true;
    } else if (arg == "-V" || arg == "--version") {
      out.version = true;
    } else if (arg == "-u") {
      out.unmount = true;
    } else if (arg == "-f") {
      out.foreground = mount_options_given = true;
    } else if (arg == "-d") {
      out.debug = out.foreground = mount_options_given = true;
    } else if (arg == "-o") {
      mount_options_given = true;
      absl::StatusOr<std::string> value = next();
      if (!value.ok()) return value.status();
      for (const std::string& option : std::vector<std::string>(absl::StrSplit(*value, ',', absl::SkipEmpty()))) {
        if (absl::Status s = ApplyMountOption(option, out); !s.ok()) return s;
      }
    } else if (arg == "--pidfile") {
      mount_options_given = true;
      absl::StatusOr<std::string> value = next();
      if (!value.ok()) return value.status();
      absl::StatusOr<std::string> path = AbsolutePath(*value);
      if (!path.ok()) return path.status();
      out.pidfile = *path;
    } else if (arg.size() > 1 && arg[0] == '-') {
      return absl::InvalidArgumentError(absl::StrFormat("unknown option '%s'", arg));
    } else {
      positional.push_back(arg);
    }
  }
  if (out.help || out.version) return out;
  if (out.unmount) {
    if (mount_options_given || positional.size() != 1) {
      return absl::InvalidArgumentError("-u takes a MOUNTPOINT and nothing else");
    }
    out.mountpoint = positional[0];  // resolved by the unmount itself
    return out;
  }
  if (out.image_options.force_share && !out.image_options.read_only) {
    return absl::InvalidArgumentError("force_share needs ro: a writer must hold the image's locks");
  }
  if (positional.size() != 2) {
    return absl::InvalidArgumentError("expected an IMAGE and a MOUNTPOINT");
  }
  absl::StatusOr<std::string> image = AbsolutePath(positional[0]);
  if (!image.ok()) return image.status();
  absl::StatusOr<std::string> mountpoint = AbsolutePath(positional[1]);
  if (!mountpoint.ok()) return mountpoint.status();
  out.image = *image;
  out.mountpoint = *mountpoint;
  return out;
}

}  // namespace qcow2fuse
