// The command line of qcow2fuse.
//
//   qcow2fuse [-f] [-d] [-o OPT[,OPT...]] [--pidfile PATH] IMAGE MOUNTPOINT
//   qcow2fuse -u MOUNTPOINT
//
// mount(8) runs us as mount.fuse3 does: `qcow2fuse IMAGE MOUNTPOINT -o
// rw,nodev,...`, with the standard mount options of the fstab line mixed
// into ours. libfuse parses the command line (fuse_opt_parse) and judges
// the mount options that are not ours: those it applies (nodev, noexec,
// allow_root, ...) are handed to the session, those only mount(8), the
// kernel's atime handling or systemd read (relatime, nofail, x-*, ...) are
// accepted and dropped, and anything else is refused by name.

#ifndef QCOW2FUSE_FUSE_OPTIONS_H_
#define QCOW2FUSE_FUSE_OPTIONS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "qcow2fuse/image.h"
#include "readahead.h"

namespace qcow2fuse {

// -o sync_ahead's default: see sync_ahead.h.
constexpr uint64_t kDefaultSyncAhead = 64u << 20;

struct MountOptions {
  std::string image;       // absolute path
  std::string mountpoint;  // absolute path
  bool foreground = false;
  bool debug = false;  // libfuse's request trace; implies foreground
  bool allow_other = false;
  std::string pidfile;
  // -o log=FILE: messages of the running daemon are appended here too.
  std::string log_file;
  // Mount options that are not ours, for libfuse and the kernel ("nodev",
  // "noexec", "allow_root", ...), each checked by libfuse already.
  std::vector<std::string> fuse_options;
  // allow_root is among them: root may open the view.
  bool allow_root = false;
  // Threads receiving and running requests; each blocks in file I/O, so
  // this is also how many requests reach the disk at once.
  int threads = 16;
  // How long a stop (unmount, SIGTERM) waits for requests still running
  // before the daemon gives up on them and exits anyway.
  int drain_timeout_seconds = 30;
  // A written byte is flushed at most this long after its write was
  // acknowledged, also while the view stays open; 0: only at fsync, close
  // and unmount.
  int flush_interval_seconds = 5;
  // -o overlay=NEW: a new qcow2 image NEW over IMAGE is created and
  // mounted; IMAGE is only read. Absolute path.
  std::string overlay;
  // -o volatile: the same with an unlinked temporary overlay, gone at
  // unmount.
  bool volatile_overlay = false;
  // -o parallel_direct_writes: writes through a descriptor in direct-I/O
  // mode (O_DIRECT, or any writer under uncached_writes) reach the daemon
  // in parallel.
  bool parallel_direct_writes = true;
  // -o park_workers: only as many workers as CPUs take requests from
  // /dev/fuse while the others are not needed (worker_gate.h).
  bool park_workers = true;
  // -o prefill_runs: a SEEK_HOLE from data of a view that cannot change
  // puts that run of data, and the next, in the view's page cache
  // (prefill.h).
  bool prefill_runs = true;
  // -o uncached_writes: descriptors opened for writing bypass the kernel's
  // page cache of the view (FUSE's direct-I/O mode).
  bool uncached_writes = true;
  // -o uncached_loops: descriptors opened by a program that attaches loop
  // devices bypass it too, read-only ones included (opener.h).
  bool uncached_loops = false;
  // -o loop_direct_io: loop devices attached over a view are switched to
  // direct I/O (loop_direct_io.h).
  bool loop_direct_io = true;
  // -o splice_reads: large reads of data clusters are spliced from the
  // image file to the reader (spliced_reply.h).
  bool splice_reads = true;
  // -o io_uring: requests come over io_uring where the kernel offers it
  // (uring_channel.h).
  bool io_uring = true;
  // -o readahead=SIZE: how far the kernel reads ahead of a sequential
  // reader of the view (readahead.h). Only root may set it; `readahead_set`
  // says the user asked, so that failing to is worth a warning. Unset, it
  // is kMinDefaultReadahead, deeper while a loop device reads through the
  // view's page cache.
  uint64_t readahead = 0;
  bool readahead_set = false;
  // -o image_readahead=SIZE: how far ahead of a sequential reader of a
  // view the host reads the image (sequential_reads.h). Unset, it is as
  // far as on the disk that holds the image (ImageDiskReadahead).
  uint64_t image_readahead = 0;
  bool image_readahead_set = false;
  // -o sync_ahead=SIZE: the host syncs the image's data each time SIZE
  // bytes have been written since it last began to (sync_ahead.h); 0: off.
  uint64_t sync_ahead = kDefaultSyncAhead;
  // -u: unmount `mountpoint` and wait for its daemon, instead of mounting.
  bool unmount = false;
  bool help = false;
  bool version = false;
  ImageOptions image_options;
};

// Parses argv. An error is a usage error, one line naming the argument
// (and, for a misspelt option, the one meant).
absl::StatusOr<MountOptions> ParseCommandLine(int argc, char** argv);

// The --help text.
const char* UsageText();

// Parses "4096", "64K", "8M", "1G" (powers of 1024).
absl::StatusOr<uint64_t> ParseByteSize(const std::string& text);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_OPTIONS_H_
