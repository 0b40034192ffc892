#include "options.h"

#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "log.h"
#include "ops.h"  // fuse_lowlevel.h at our FUSE_USE_VERSION

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

// The keys of qcow2fuse's own -o options.
const absl::flat_hash_set<std::string_view> kOwnKeys = {
    "ro", "rw", "force_share", "allow_other", "l2_cache_size", "max_metadata_memory", "data_file",
    "threads", "drain_timeout", "flush_interval", "detect_zeroes", "log", "parallel_direct_writes",
    "uncached_writes", "uncached_loops", "loop_direct_io", "splice_reads", "io_uring", "park_workers", "prefill_runs",
    "readahead", "image_readahead", "sync_ahead", "backing", "backing_format", "overlay", "volatile",
};

// Standard mount options that mean nothing to a FUSE file system, or that
// libfuse 3.14 would refuse although mount(8), fstab or systemd pass them:
// accepted and dropped, as mount.fuse3 drops some of them. The *atime
// family is the daemon's business since libfuse 3.15; the view keeps no
// access times. A template ending in '=' matches any value.
constexpr const char* kIgnoredOptions[] = {
    "defaults", "auto", "noauto", "nofail", "_netdev", "user", "user=", "users", "nouser", "owner",
    "noowner", "group", "nogroup", "comment=", "relatime", "norelatime", "strictatime", "nostrictatime",
    "lazytime", "nolazytime", "diratime", "nodiratime", "iversion", "noiversion", "mand", "nomand", "silent",
    "loud", "nosymfollow", "nonempty",
};

// Mount options libfuse applies (lib/mount.c, fuse_lowlevel.c): the kernel's
// mount flags and FUSE's own. Only for suggesting the option a typo meant;
// libfuse itself decides what it accepts.
constexpr const char* kLibfuseOptions[] = {
    "dev", "nodev", "suid", "nosuid", "exec", "noexec", "sync", "async", "dirsync", "atime", "noatime",
    "allow_root", "default_permissions", "auto_unmount", "context=", "fscontext=", "defcontext=",
    "rootcontext=",
};

constexpr int kMaxThreads = 64;
constexpr int kMaxDrainTimeoutSeconds = 24 * 3600;
constexpr int kMaxFlushIntervalSeconds = 24 * 3600;
// Below this few images open at all (a 2 MiB cluster is read whole);
// a smaller value is a typo, not a choice.
constexpr uint64_t kMinMetadataMemory = uint64_t{1} << 20;

absl::Status NotASize(const std::string& key, const std::string& value) {
  return absl::InvalidArgumentError(
      absl::StrFormat("%s must be a size such as 512K, 64M or 1G, not '%s'", key, value));
}

// The value of a switch such as splice_reads=on.
absl::StatusOr<bool> OnOff(const std::string& key, const std::string& value) {
  if (value != "on" && value != "off") {
    return absl::InvalidArgumentError(absl::StrFormat("%s must be on or off, not '%s'", key, value));
  }
  return value == "on";
}

// The field of MountOptions that the switch `key` (splice_reads=on...)
// sets, or null.
bool MountOptions::*SwitchField(std::string_view key) {
  static constexpr std::pair<std::string_view, bool MountOptions::*> kSwitches[] = {
      {"parallel_direct_writes", &MountOptions::parallel_direct_writes},
      {"uncached_writes", &MountOptions::uncached_writes},
      {"uncached_loops", &MountOptions::uncached_loops},
      {"loop_direct_io", &MountOptions::loop_direct_io},
      {"splice_reads", &MountOptions::splice_reads},
      {"io_uring", &MountOptions::io_uring},
      {"park_workers", &MountOptions::park_workers},
      {"prefill_runs", &MountOptions::prefill_runs},
  };
  for (const auto& [name, field] : kSwitches) {
    if (name == key) return field;
  }
  return nullptr;
}

// Applies one of qcow2fuse's own -o options. NotFound: not one of ours.
absl::Status ApplyOwnOption(const std::string& option, MountOptions& out) {
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
    if (!bytes.ok()) return NotASize(key, kv[1]);
    out.image_options.l2_cache_size = *bytes;
  } else if (key == "max_metadata_memory" && has_value) {
    absl::StatusOr<uint64_t> bytes = ParseByteSize(kv[1]);
    if (!bytes.ok()) return NotASize(key, kv[1]);
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
  } else if (key == "backing" && has_value && !kv[1].empty()) {
    absl::StatusOr<std::string> path = AbsolutePath(kv[1]);
    if (!path.ok()) return path.status();
    out.image_options.backing_file = *path;
  } else if (key == "backing_format" && has_value) {
    if (kv[1] != "qcow2" && kv[1] != "raw") {
      return absl::InvalidArgumentError(
          absl::StrFormat("backing_format must be qcow2 or raw, not '%s'", kv[1]));
    }
    out.image_options.backing_format = kv[1];
  } else if (key == "overlay" && has_value && !kv[1].empty()) {
    absl::StatusOr<std::string> path = AbsolutePath(kv[1]);
    if (!path.ok()) return path.status();
    out.overlay = *path;
  } else if (key == "volatile" && !has_value) {
    out.volatile_overlay = true;
  } else if (bool MountOptions::*field = SwitchField(key); field != nullptr && has_value) {
    absl::StatusOr<bool> on = OnOff(key, kv[1]);
    if (!on.ok()) return on.status();
    out.*field = *on;
  } else if ((key == "readahead" || key == "image_readahead") && has_value) {
    absl::StatusOr<uint64_t> bytes = ParseByteSize(kv[1]);
    if (!bytes.ok()) return NotASize(key, kv[1]);
    // The kernel counts readahead in pages.
    if (*bytes > kMaxReadahead || *bytes % 4096 != 0) {
      return absl::InvalidArgumentError(absl::StrFormat("%s must be a multiple of 4K from 0 to %uM, not '%s'", key,
                                                        kMaxReadahead >> 20, kv[1]));
    }
    if (key == "readahead") {
      out.readahead = *bytes;
      out.readahead_set = true;
    } else {
      out.image_readahead = *bytes;
      out.image_readahead_set = true;
    }
  } else if (key == "sync_ahead" && has_value) {
    absl::StatusOr<uint64_t> bytes = ParseByteSize(kv[1]);
    if (!bytes.ok()) return NotASize(key, kv[1]);
    out.sync_ahead = *bytes;
  } else if (key == "log" && has_value && !kv[1].empty()) {
    absl::StatusOr<std::string> path = AbsolutePath(kv[1]);
    if (!path.ok()) return path.status();
    out.log_file = *path;
  } else if (kOwnKeys.contains(key)) {
    const bool takes_value =
        key != "ro" && key != "rw" && key != "force_share" && key != "allow_other" && key != "volatile";
    return absl::InvalidArgumentError(
        absl::StrFormat("mount option '%s' %s", option, takes_value ? "needs a value" : "takes no value"));
  } else {
    return absl::NotFoundError(option);
  }
  return absl::OkStatus();
}

// Levenshtein distance, for suggesting the option a typo meant.
size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// " (did you mean 'threads'?)" when a known option is close to `word`.
std::string Suggestion(const std::string& word) {
  const std::string_view key = std::string_view(word).substr(0, word.find('='));
  std::vector<std::string_view> known(kOwnKeys.begin(), kOwnKeys.end());
  for (std::string_view o : kIgnoredOptions) known.push_back(o);
  for (std::string_view o : kLibfuseOptions) known.push_back(o);
  std::string_view best;
  size_t best_distance = std::max<size_t>(1, std::min<size_t>(2, key.size() / 3)) + 1;
  for (std::string_view candidate : known) {
    if (!candidate.empty() && candidate.back() == '=') candidate.remove_suffix(1);
    const size_t d = EditDistance(key, candidate);
    if (d < best_distance || (d == best_distance && candidate < best)) {
      best = candidate;
      best_distance = d;
    }
  }
  if (best.empty()) return "";
  return absl::StrFormat(" (did you mean '%s'?)", best);
}

// Asks libfuse whether it takes `option` by making a session with it alone:
// the list of options libfuse knows changes between its versions.
absl::Status CheckWithLibfuse(const std::string& option) {
  // Options libfuse takes that cannot work for a view.
  const std::string_view key = std::string_view(option).substr(0, option.find('='));
  if (key == "fsname" || key == "subtype" || key == "max_read") {
    // mount_table finds our views by the type fuse.qcow2fuse and the image
    // named as the source; the request size is the daemon's choice, and
    // libfuse refuses a max_read its INIT handler did not ask for.
    return absl::InvalidArgumentError(
        absl::StrFormat("mount option '%s' is set by qcow2fuse and cannot be changed", option));
  }
  if (key == "blkdev" || key == "blksize") {
    return absl::InvalidArgumentError(absl::StrFormat(
        "mount option '%s' is for block-device FUSE mounts; a qcow2fuse view is a file", option));
  }
  // fuse_opt_parse has unescaped the word ("a\\,b" is now "a,b"): escape it
  // again, as Serve does for the real session.
  struct fuse_args args = FUSE_ARGS_INIT(0, nullptr);
  char* escaped = nullptr;
  const bool built = fuse_opt_add_opt_escaped(&escaped, option.c_str()) == 0 &&
                     fuse_opt_add_arg(&args, "qcow2fuse") == 0 && fuse_opt_add_arg(&args, "-o") == 0 &&
                     fuse_opt_add_arg(&args, escaped) == 0;
  free(escaped);
  if (!built) {
    fuse_opt_free_args(&args);
    return absl::ResourceExhaustedError("out of memory parsing the mount options");
  }
  LibfuseLogCapture capture;  // libfuse's own wording is not for the user
  const struct fuse_lowlevel_ops no_operations = {};
  fuse_session* session = fuse_session_new(&args, &no_operations, sizeof no_operations, nullptr);
  fuse_opt_free_args(&args);
  if (session != nullptr) {
    fuse_session_destroy(session);
    return absl::OkStatus();
  }
  if (absl::StrContains(capture.text(), "invalid parameter")) {
    return absl::InvalidArgumentError(absl::StrFormat("mount option '%s' has a bad value", option));
  }
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown mount option '%s'%s", option, Suggestion(option)));
}

// Keys of fuse_opt templates; the rest of the command line reaches
// ParseArgument as FUSE_OPT_KEY_OPT (an option word) or FUSE_OPT_KEY_NONOPT.
enum ArgumentKey { kHelp, kVersion, kUnmount, kForeground, kDebug, kPidfile };

struct ParseState {
  MountOptions* out = nullptr;
  std::vector<std::string> positional;
  bool mount_options_given = false;  // anything that only a mount uses
  absl::Status error;                // the first refusal
};

// fuse_opt_parse's callback: 0 consumes the argument, -1 stops the parse.
int ParseArgument(void* data, const char* arg_text, int key, struct fuse_args* /*outargs*/) {
  ParseState& state = *static_cast<ParseState*>(data);
  MountOptions& out = *state.out;
  const std::string arg = arg_text;
  auto refuse = [&](absl::Status status) {
    if (state.error.ok()) state.error = std::move(status);
    return -1;
  };
  switch (key) {
    case kHelp: out.help = true; return 0;
    case kVersion: out.version = true; return 0;
    case kUnmount: out.unmount = true; return 0;
    case kForeground: out.foreground = state.mount_options_given = true; return 0;
    case kDebug: out.debug = out.foreground = state.mount_options_given = true; return 0;
    case kPidfile: {
      // "--pidfile PATH" arrives as "--pidfilePATH", "--pidfile=PATH" as is.
      std::string value = arg.substr(std::string_view("--pidfile").size());
      if (!value.empty() && value[0] == '=') value.erase(0, 1);
      absl::StatusOr<std::string> path = AbsolutePath(value);
      if (!path.ok()) return refuse(absl::InvalidArgumentError("--pidfile needs a path"));
      out.pidfile = *path;
      state.mount_options_given = true;
      return 0;
    }
    case FUSE_OPT_KEY_NONOPT:
      state.positional.push_back(arg);
      return 0;
    case FUSE_OPT_KEY_OPT:
      break;
    default:
      return refuse(absl::InternalError(absl::StrFormat("unexpected argument key %d", key)));
  }
  if (arg.empty()) return 0;
  if (arg[0] == '-') {
    return refuse(absl::InvalidArgumentError(absl::StrFormat("unknown option '%s'%s", arg,
                                                             arg.size() > 2 && arg[1] != '-' && arg[1] != 'o'
                                                                 ? " (mount options go after -o)"
                                                                 : "")));
  }
  state.mount_options_given = true;
  // systemd's and the administrator's own fstab options, never meant for
  // the file system (mount(8) drops them before calling a helper).
  if (absl::StartsWith(arg, "x-") || absl::StartsWith(arg, "X-")) return 0;
  absl::Status own = ApplyOwnOption(arg, out);
  if (own.ok()) return 0;
  if (!absl::IsNotFound(own)) return refuse(std::move(own));
  absl::Status libfuse = CheckWithLibfuse(arg);
  if (!libfuse.ok()) return refuse(std::move(libfuse));
  out.fuse_options.push_back(arg);
  if (arg == "allow_root") out.allow_root = true;
  return 0;
}

std::vector<struct fuse_opt> ArgumentTemplates() {
  std::vector<struct fuse_opt> templates = {
      FUSE_OPT_KEY("-h", kHelp),       FUSE_OPT_KEY("--help", kHelp),
      FUSE_OPT_KEY("-V", kVersion),    FUSE_OPT_KEY("--version", kVersion),
      FUSE_OPT_KEY("-u", kUnmount),    FUSE_OPT_KEY("-f", kForeground),
      FUSE_OPT_KEY("-d", kDebug),      FUSE_OPT_KEY("debug", kDebug),
      FUSE_OPT_KEY("--pidfile ", kPidfile),
  };
  for (const char* ignored : kIgnoredOptions) templates.push_back(FUSE_OPT_KEY(ignored, FUSE_OPT_KEY_DISCARD));
  templates.push_back(FUSE_OPT_END);
  return templates;
}

}  // namespace

const char* UsageText() {
  return "usage: qcow2fuse [options] IMAGE MOUNTPOINT\n"
         "       qcow2fuse -u MOUNTPOINT\n"
         "       mount -t fuse.qcow2fuse [-o OPT,...] IMAGE MOUNTPOINT\n"
         "\n"
         "Shows the qcow2 disk image IMAGE as the raw file MOUNTPOINT (a regular\n"
         "file, created if missing and removed again at unmount). When MOUNTPOINT\n"
         "is a directory, it shows disk.raw (the disk), partN.raw (each partition)\n"
         "and snapshots/NAME.raw (each internal snapshot, read-only).\n"
         "\n"
         "qcow2fuse -u MOUNTPOINT unmounts the view and returns once its daemon has\n"
         "flushed the image, released its locks and exited, so that qemu-img or a\n"
         "new mount can use the image right away (fusermount3 -u does not wait).\n"
         "\n"
         "options:\n"
         "  -o ro                  read-only view\n"
         "  -o rw                  read-write view (the default)\n"
         "  -o force_share         with ro: take no image locks, like qemu-img -U\n"
         "  -o allow_other         let other users access the view (a user other\n"
         "                         than root needs user_allow_other in /etc/fuse.conf)\n"
         "  -o l2_cache_size=SIZE  L2 table cache per image (default 4M)\n"
         "  -o max_metadata_memory=SIZE\n"
         "                         memory the image and its backing chain may use\n"
         "                         for tables and caches whose size the images\n"
         "                         decide; a larger image is refused (default 256M)\n"
         "  -o data_file=PATH      the image's external data file\n"
         "  -o backing=PATH        read the image's backing file from PATH, for this\n"
         "                         mount only (the image's header is not changed)\n"
         "  -o backing_format=FMT  qcow2 or raw: the backing file's format\n"
         "  -o overlay=NEW         create the qcow2 image NEW over IMAGE and mount it:\n"
         "                         writes go to NEW, IMAGE is only read\n"
         "  -o volatile            the same with a temporary overlay in $TMPDIR (else\n"
         "                         /var/tmp) that vanishes at unmount\n"
         "  -o threads=N           requests run on N threads (default 16)\n"
         "  -o drain_timeout=S     at unmount, wait S seconds for running requests,\n"
         "                         then exit without them (default 30)\n"
         "  -o flush_interval=S    make writes durable at most S seconds after they\n"
         "                         were acknowledged, also while the view stays open\n"
         "                         (default 5; 0: only at fsync, close and unmount)\n"
         "  -o sync_ahead=SIZE     have the host sync the written data to the disk\n"
         "                         each time SIZE more was written, so that fsync,\n"
         "                         close and the periodic flush find little left\n"
         "                         (default 64M; 0: only at those)\n"
         "  -o detect_zeroes=MODE  off (default), on: all-zero writes become zero\n"
         "                         clusters; unmap: and free their space\n"
         "  -o log=FILE            also append the daemon's messages to FILE\n"
         "  -o park_workers=on|off\n"
         "                         while requests are answered from memory, only\n"
         "                         as many threads as CPUs take them, the others\n"
         "                         wait until one sleeps in the disk (default on)\n"
         "  -o prefill_runs=on|off\n"
         "                         on a read-only mount, a SEEK_HOLE that starts in\n"
         "                         data puts that run and the next in the view's\n"
         "                         page cache, ahead of cp --sparse's reads, and\n"
         "                         has the host read the runs after those\n"
         "                         (default on)\n"
         "  -o parallel_direct_writes=on|off\n"
         "                         let writes through O_DIRECT or uncached\n"
         "                         descriptors run in parallel (default on; the\n"
         "                         kernel serialises them if off)\n"
         "  -o uncached_writes=on|off\n"
         "                         descriptors opened for writing bypass the\n"
         "                         view's page cache: a write reaches the daemon\n"
         "                         in requests of up to 1 MiB, without a copy in\n"
         "                         that cache (default on)\n"
         "  -o uncached_loops=on|off\n"
         "                         descriptors opened by a program that attaches\n"
         "                         loop devices (losetup, mount...) bypass the\n"
         "                         view's page cache, read-only ones too (Linux\n"
         "                         6.15+; default off: a read-only one is cached\n"
         "                         and read ahead, which gathers the guest file\n"
         "                         system's small reads)\n"
         "  -o loop_direct_io=on|off\n"
         "                         switch a loop device over the view to direct\n"
         "                         I/O, as losetup --direct-io=on would, right\n"
         "                         after it is attached (root; default on)\n"
         "  -o splice_reads=on|off large reads of stored data go from the image file\n"
         "                         to the reader without a copy in the daemon\n"
         "                         (default on)\n"
         "  -o io_uring=on|off     requests come over io_uring where the kernel offers\n"
         "                         it (Linux 6.14+, fuse's enable_uring=Y; default on)\n"
         "  -o readahead=SIZE      how far the kernel reads ahead of a sequential\n"
         "                         reader of the view, at most 16M (default 1M; as\n"
         "                         far as on the disk under the image, at least 1M,\n"
         "                         while a loop device reads through the view's\n"
         "                         page cache; only root may raise it above the\n"
         "                         kernel's 128K)\n"
         "  -o image_readahead=SIZE\n"
         "                         how far ahead of a sequential reader of the view\n"
         "                         the host reads the image, at most 16M; 0: not\n"
         "                         at all (default: as far as the host reads ahead\n"
         "                         on the disk under the image, at least 1M)\n"
         "  -f                     stay in the foreground, log to stderr\n"
         "  -d                     foreground, with libfuse's request trace\n"
         "  --pidfile PATH         write the daemon's process id to PATH\n"
         "  -u                     unmount MOUNTPOINT and wait for its daemon to exit\n"
         "  -h, --help             this text\n"
         "  -V, --version          the version\n"
         "\n"
         "Standard mount options (fstab, mount(8)) are accepted: nodev, nosuid,\n"
         "noexec, noatime, sync, dirsync and libfuse's allow_root and auto_unmount\n"
         "apply; defaults, user, users, auto, noauto, nofail, _netdev, relatime and\n"
         "the other atime options, comment= and x-* are accepted and ignored.\n"
         "\n"
         "Messages: until the view answers, on stderr; then, without -f or -d, in\n"
         "syslog (journalctl -t qcow2fuse) and in the -o log=FILE. A request that\n"
         "fails (a refused shrink, a damaged table) is logged there with the reason.\n"
         "\n"
         "Exit status: 0 done; 1 the mount, the unmount or the final flush failed;\n"
         "2 a usage error. See qcow2fuse(1).\n";
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
  ParseState state;
  state.out = &out;
  struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
  const std::vector<struct fuse_opt> templates = ArgumentTemplates();
  int parsed;
  std::string libfuse_says;
  {
    LibfuseLogCapture capture;
    parsed = fuse_opt_parse(&args, &state, templates.data(), ParseArgument);
    libfuse_says = capture.text();
  }
  fuse_opt_free_args(&args);
  if (parsed != 0) {
    if (!state.error.ok()) return state.error;
    // fuse_opt's own refusal: "missing argument after `-o'".
    const size_t quote = libfuse_says.find('`');
    if (absl::StrContains(libfuse_says, "missing argument") && quote != std::string::npos) {
      const std::string option = libfuse_says.substr(quote + 1, libfuse_says.find('\'', quote) - quote - 1);
      return absl::InvalidArgumentError(absl::StrFormat("%s needs a value", option));
    }
    return absl::InvalidArgumentError("cannot parse the command line");
  }
  std::vector<std::string>& positional = state.positional;
  const bool mount_options_given = state.mount_options_given;
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
  if (!out.overlay.empty() || out.volatile_overlay) {
    // The new overlay is the image mounted; these options would be about
    // IMAGE, which the overlay opens as its read-only backing file.
    const char* mode = out.volatile_overlay ? "volatile" : "overlay";
    if (!out.overlay.empty() && out.volatile_overlay) {
      return absl::InvalidArgumentError("overlay= and volatile exclude each other: volatile is an overlay that vanishes");
    }
    if (out.image_options.read_only) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s makes a writable view over a read-only IMAGE; without writes, mount with -o ro alone", mode));
    }
    for (const auto& [given, name] : {std::pair{!out.image_options.data_file.empty(), "data_file"},
                                      std::pair{!out.image_options.backing_file.empty(), "backing"},
                                      std::pair{!out.image_options.backing_format.empty(), "backing_format"}}) {
      if (given) return absl::InvalidArgumentError(absl::StrFormat("%s cannot be combined with %s", name, mode));
    }
  }
  if (positional.size() != 2) {
    return absl::InvalidArgumentError(positional.size() < 2 ? "expected an IMAGE and a MOUNTPOINT"
                                                            : absl::StrFormat("unexpected argument '%s' after "
                                                                              "IMAGE and MOUNTPOINT",
                                                                              positional[2]));
  }
  if (absl::StartsWith(positional[1], "/dev/fd/")) {
    // mount.fuse3's drop_privileges hands over an open /dev/fuse instead of
    // a path; the view must be a named file for `qcow2fuse -u` and for the
    // checks against the mount table.
    return absl::InvalidArgumentError(absl::StrFormat(
        "MOUNTPOINT %s is a descriptor, not a file: drop the drop_privileges option", positional[1]));
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
