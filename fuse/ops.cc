#include "ops.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fuse.h>  // fuse_open_out, FOPEN_*: the kernel's side of the OPEN reply
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <memory>
#include <optional>
#include <span>

#include "absl/strings/str_format.h"
#include "buffer_pool.h"
#include "errno_map.h"
#include "log.h"
#include "opener.h"
#include "qcow2fuse/status.h"
#include "spliced_reply.h"
#include "uring_channel.h"

namespace qcow2fuse {
namespace {

// The kernel may cache the attributes of the view this long: the disk size
// only changes when we change it.
constexpr double kAttrTimeoutSeconds = 1.0;
constexpr off_t kStatBlockSize = 512;  // st_blocks unit
constexpr unsigned kMaxRequestBytes = 1u << 20;
constexpr unsigned kMaxBackground = 64;
// The FUSE protocol minor of Linux 6.9, whose inode io modes keep direct
// and buffered opens of one file coherent.
constexpr unsigned kIoModesProtoMinor = 40;
// How much of a data run found by SEEK_DATA is read ahead on the host.
constexpr uint64_t kSeekDataPrefetchBytes = 4u << 20;
// fuse_file_info::fh of an open: whether it may write, and whether it is a
// loop device's that reads through the view's page cache (its release
// lowers the readahead that its open raised, see readahead.h).
constexpr uint64_t kWritableHandle = 1;
constexpr uint64_t kLoopReaderHandle = 2;

// Reads of at least this many bytes take their buffer from a pool (see
// buffer_pool.h); this is where malloc starts to hand out fresh mappings.
constexpr size_t kPooledReadBytes = 128u << 10;
// Free read buffers kept: enough for the kernel's readahead and a few
// readers at once, 16 MiB at most.
constexpr size_t kKeptReadBuffers = 16;

// Reads of at least this many bytes whose data lies in one run of the image
// file are spliced (spliced_reply.h); below it a copy costs less than the
// extra system calls.
constexpr size_t kSplicedReadBytes = 64u << 10;

BufferPool& ReadBuffers() {
  // Never destroyed: a request's coroutine may still hold a buffer while
  // the process exits.
  static BufferPool* pool = new BufferPool(kMaxRequestBytes, kKeptReadBuffers);
  return *pool;
}

MountState& State(fuse_req_t req) { return *static_cast<MountState*>(fuse_req_userdata(req)); }

// The file `ino` names. Inode numbers come from our own replies, so an
// unknown one (or a directory where a file belongs) is the kernel's
// confusion, answered with an error rather than trusted.
View* FileView(fuse_req_t req, fuse_ino_t ino) {
  Node* node = State(req).views->Find(ino);
  return node == nullptr ? nullptr : node->view.get();
}

void ReplyError(fuse_req_t req, const absl::Status& status, std::string_view what) {
  const int err = StatusToErrno(status);
  Log(LogLevel::kError, absl::StrFormat("%s: %s", what, status.message()));
  fuse_reply_err(req, err);
}

// The attributes of `node`. Owner and permissions come from the
// mountpoint; a file of a directory mount drops the execute bits its
// directory has, and a file that cannot be written drops the write bits.
Task<absl::StatusOr<struct stat>> Attributes(MountState& m, Node& node) {
  struct stat st = {};
  st.st_ino = node.ino;
  st.st_uid = m.mountpoint_stat.st_uid;
  st.st_gid = m.mountpoint_stat.st_gid;
  const mode_t permissions = m.mountpoint_stat.st_mode & 07777;
  if (node.is_directory()) {
    st.st_mode = S_IFDIR | permissions;
    st.st_nlink = 2 + m.views->SubdirectoryCount(node);
    st.st_blksize = 4096;
  } else {
    View& view = *node.view;
    st.st_mode = S_IFREG | (permissions & (S_ISDIR(m.mountpoint_stat.st_mode) ? 06666 : 07777));
    if (!view.writable()) st.st_mode &= ~(S_IWUSR | S_IWGRP | S_IWOTH);
    st.st_nlink = 1;
    st.st_size = view.size();
    // Every view is of the one image file, and has its cluster size.
    st.st_blksize = std::min<uint64_t>(m.disk->cluster_size(), uint64_t{1} << 20);
    absl::StatusOr<uint64_t> allocated = co_await view.AllocatedBytes();
    if (!allocated.ok()) co_return allocated.status();
    st.st_blocks = (*allocated + kStatBlockSize - 1) / kStatBlockSize;
  }
  auto later = [](const timespec& a, const timespec& b) {
    return a.tv_sec != b.tv_sec ? a.tv_sec > b.tv_sec : a.tv_nsec > b.tv_nsec;
  };
  for (const int fd : m.chain_fds) {  // the image file first: its atime is the view's
    struct stat file_st;
    if (fstat(fd, &file_st) != 0) continue;
    if (fd == m.image_fd) st.st_atim = file_st.st_atim;
    if (later(file_st.st_mtim, st.st_mtim)) st.st_mtim = file_st.st_mtim;
    if (later(file_st.st_ctim, st.st_ctim)) st.st_ctim = file_st.st_ctim;
  }
  co_return st;
}

Task<void> GetAttr(fuse_req_t req, Node& node) {
  absl::StatusOr<struct stat> st = co_await Attributes(State(req), node);
  if (!st.ok()) co_return ReplyError(req, st.status(), "getattr");
  fuse_reply_attr(req, &*st, kAttrTimeoutSeconds);
}

// After a read of [start, start + length) of `view` was answered: where it
// continues a sequential reader's, the host starts reading the image ahead
// of it (sequential_reads.h). Only advice, so nothing to report.
Task<void> ReadAhead(MountState& m, View& view, Image& image, uint64_t start, uint64_t length) {
  const SequentialReads::Range ahead =
      view.sequential_reads().Read(start, length, view.size(), m.image_readahead);
  if (ahead.length > 0) co_await image.WillNeed(view.start() + ahead.offset, ahead.length, ahead.length);
}

// `reply_space`: where the reply may be built in place, or empty
// (UringChannel::ReplySpace).
Task<void> Read(fuse_req_t req, View& view, size_t size, off_t offset, std::span<uint8_t> reply_space) {
  absl::StatusOr<Image*> opened = view.image();
  if (!opened.ok()) co_return ReplyError(req, opened.status(), "read");
  Image& image = **opened;
  const uint64_t disk = view.size();
  const uint64_t start = std::min<uint64_t>(offset, disk);
  // Not zero-filled first: Read fills every byte.
  const size_t n = std::min<uint64_t>(size, disk - start);
  MountState& m = State(req);  // `req` is gone once answered
  if (m.spliced_reads && n >= kSplicedReadBytes && n <= MaxSplicedReply()) {
    absl::StatusOr<bool> sent = false;
    absl::StatusOr<bool> stored = co_await image.SendStored(
        view.start() + start, n, [&](int fd, uint64_t file_offset) { sent = ReplySpliced(req, fd, file_offset, n); });
    if (stored.ok() && !sent.ok()) stored = sent.status();
    if (!stored.ok()) {
      co_return ReplyError(req, stored.status(), absl::StrFormat("read of %u bytes at offset %u", n, start));
    }
    if (*sent) co_return co_await ReadAhead(m, view, image, start, n);
  }
  std::optional<BufferPool::Buffer> pooled;
  std::unique_ptr<uint8_t[]> small;
  std::span<uint8_t> buf;
  if (n <= reply_space.size()) {
    buf = reply_space.first(n);
  } else if (n >= kPooledReadBytes && n <= kMaxRequestBytes) {
    pooled.emplace(ReadBuffers().Take());
    buf = pooled->first(n);
  } else {
    small.reset(new uint8_t[n]);
    buf = std::span(small.get(), n);
  }
  absl::Status status = co_await image.Read(view.start() + start, buf);
  if (!status.ok()) {
    co_return ReplyError(req, status, absl::StrFormat("read of %u bytes at offset %u", buf.size(), start));
  }
  fuse_reply_buf(req, reinterpret_cast<const char*>(buf.data()), buf.size());
  co_await ReadAhead(m, view, image, start, n);
}

// After a change to [start, start + length) of the disk through file
// `ino`, answered already: the other files that show those bytes (disk.raw
// and a partition) are to drop what the kernel cached of them, so that a
// read through either sees the change (invalidator.h says why not here).
void InvalidateOthers(MountState& m, fuse_ino_t ino, uint64_t start, uint64_t length) {
  if (m.invalidator == nullptr) return;
  m.views->ForEachOverlap(start, start + length, ino, [&](fuse_ino_t other, uint64_t offset, uint64_t n) {
    m.invalidator->Post(other, offset, n);
  });
}

Task<void> Write(fuse_req_t req, fuse_ino_t ino, View& view, std::span<const uint8_t> data, off_t offset) {
  if (!view.writable()) co_return (void)fuse_reply_err(req, EROFS);
  Image& image = *view.image().value();  // a writable view is never a snapshot
  const uint64_t disk = view.size();
  // The view is a file of fixed size, like a disk or a partition: no room
  // past its end.
  if (offset < 0 || static_cast<uint64_t>(offset) >= disk) co_return (void)fuse_reply_err(req, ENOSPC);
  const size_t n = std::min<uint64_t>(data.size(), disk - offset);
  absl::Status status = co_await image.Write(view.start() + offset, data.first(n));
  if (!status.ok()) {
    co_return ReplyError(req, status, absl::StrFormat("write of %u bytes at offset %u", n, offset));
  }
  MountState& m = State(req);  // `req` is gone once answered
  fuse_reply_write(req, n);
  InvalidateOthers(m, ino, view.start() + offset, n);
  if (m.sync_ahead != nullptr) m.sync_ahead->Wrote(n);
}

Task<void> Fsync(fuse_req_t req) {
  // Every writable view is a window onto the one disk.
  absl::Status status = co_await State(req).disk->Flush();
  if (!status.ok()) co_return ReplyError(req, status, "fsync");
  fuse_reply_err(req, 0);
}

// The close of a writable descriptor: what was written through the view is
// made durable before close() returns (the kernel waits for FLUSH, not for
// RELEASE). A flush that finds nothing changed costs no I/O.
Task<void> FlushOnClose(fuse_req_t req) {
  absl::Status status = co_await State(req).disk->Flush();
  if (!status.ok()) co_return ReplyError(req, status, "flush at close");
  fuse_reply_err(req, 0);
}

// An open. With atomic_o_trunc the kernel leaves O_TRUNC to us. It asks to
// throw away everything, and follows the shrink rule: refused (the open
// fails, the disk untouched) while the disk holds data, as `truncate -s 0`
// is. A disk that holds none keeps its size, as a block device does: `dd
// of=VIEW` onto a fresh image must not leave a disk of 0 bytes.
// Whether [start, end) of `image` holds no data.
Task<absl::StatusOr<bool>> HoldsNoData(Image& image, uint64_t start, uint64_t end) {
  for (uint64_t pos = start; pos < end;) {
    absl::StatusOr<Extent> e = co_await image.BlockStatus(pos, end - pos);
    if (!e.ok()) co_return e.status();
    if (e->kind == ExtentKind::kData) co_return false;
    pos += e->length;
  }
  co_return true;
}

Task<void> Open(fuse_req_t req, View& view, fuse_file_info fi) {
  MountState& m = State(req);
  const bool writable = (fi.flags & O_ACCMODE) != O_RDONLY;
  if ((writable || (fi.flags & O_TRUNC)) && !view.writable()) co_return (void)fuse_reply_err(req, EROFS);
  absl::StatusOr<Image*> image = view.image();
  if (!image.ok()) co_return ReplyError(req, image.status(), "open");
  if (fi.flags & O_TRUNC) {
    constexpr char kWhat[] = "open with O_TRUNC (use conv=notrunc with dd, or 1<> in a shell)";
    if (view.resizable()) {
      absl::Status status = co_await (*image)->CheckShrink(0);
      if (!status.ok()) co_return ReplyError(req, status, kWhat);
    } else {
      // A partition cannot shrink at all; as for the disk, truncating one
      // that holds nothing keeps it as it is.
      absl::StatusOr<bool> empty = co_await HoldsNoData(**image, view.start(), view.start() + view.size());
      if (!empty.ok()) co_return ReplyError(req, empty.status(), kWhat);
      if (!*empty) {
        co_return ReplyError(req, ErrnoStatus(EPERM, "the partition holds data and its size is fixed"), kWhat);
      }
    }
  }
  // Nothing else changes a read-only view, so the kernel may keep what it
  // cached across opens.
  fi.keep_cache = !view.writable();
  // Only a descriptor that changed or may change the disk has something
  // for its close to make durable; a read-only one closes without a round
  // trip.
  const bool changes = writable || (fi.flags & O_TRUNC);
  fi.noflush = !changes;
  fi.fh = changes ? kWritableHandle : 0;
  // Direct-I/O mode: the descriptor's reads and writes go to the daemon as
  // they are, not through the view's page cache. For a writer that saves
  // a copy into pages that hold the same bytes as the image file's page
  // cache, and its writes arrive in requests of up to 1 MiB whatever the
  // alignment of its buffer. The price: its reads are not read ahead. (A
  // shared mapping of it needs FUSE_DIRECT_IO_ALLOW_MMAP, which
  // init_flags.h adds to INIT.) An O_DIRECT writer asked for it anyway.
  const bool o_direct_writer = writable && (fi.flags & O_DIRECT) && m.direct_writes_in_parallel;
  bool direct_io = o_direct_writer || (writable && m.writers_uncached);
  // A loop device's descriptor (opener.h). Under -o uncached_loops, read-
  // only or not, it bypasses the view's page cache; otherwise it is as any
  // other, read-only ones cached and read ahead, writers not, unless the
  // loop driver goes a page at a time: then a page per round trip would be
  // far slower than the cache, also for a writer. Where the daemon leaves
  // loop devices buffered (-o loop_direct_io=off), one that goes through
  // the cache has the mount read ahead as far as a raw file on the image's
  // disk would be (readahead.h). One opened with O_DIRECT (`losetup
  // --direct-io=on`) bypasses the cache anyway, in asynchronous requests
  // that its loop driver sends in parallel at any kernel, so it is left as
  // any other: nothing is gained by changing its mode.
  if (!(fi.flags & O_DIRECT)) {
    const pid_t pid = fuse_req_ctx(req)->pid;
    if (const std::string name = ProcessName(pid); AttachesLoopDevices(name)) {
      // Its device, once bound, is switched to direct I/O (loop_direct_io.h).
      if (m.loop_direct_io != nullptr) m.loop_direct_io->Watch();
      if (m.loops_uncached) {
        direct_io = true;
      } else if (m.loops_by_page) {
        direct_io = false;
      }
      if (direct_io) {
        Log(LogLevel::kInfo, absl::StrFormat("%s (pid %d) opened the view for a loop device: its reads and writes "
                                             "bypass the view's page cache (-o %s)",
                                             name, pid, m.loops_uncached ? "uncached_loops" : "uncached_writes"));
      } else if (m.loop_readahead != nullptr) {
        // Before the answer: the kernel gives the file the mount's
        // readahead once the open has succeeded.
        if (absl::Status raised = m.loop_readahead->Opened(); raised.ok()) {
          fi.fh |= kLoopReaderHandle;
          Log(LogLevel::kInfo,
              absl::StrFormat("%s (pid %d) opened the view for a loop device: the view reads ahead %u KiB "
                              "until the loop devices reading through its page cache are gone",
                              name, pid, m.loop_readahead->raised() >> 10));
        } else {
          Log(LogLevel::kWarning, absl::StrFormat("%s (pid %d) opened the view for a loop device, but its readahead "
                                                  "stays as it was: %s",
                                                  name, pid, raised.message()));
        }
      }
    }
  }
  if (!direct_io) {
    // ENOENT: the opener was interrupted, and no RELEASE will follow.
    if (fuse_reply_open(req, &fi) == -ENOENT && (fi.fh & kLoopReaderHandle)) (void)m.loop_readahead->Released();
    co_return;
  }
  // The kernel serialises the writes of a file unless the open is in
  // direct-I/O mode and says FOPEN_PARALLEL_DIRECT_WRITES (Linux 6.2+;
  // older kernels ignore the bit). libfuse 3.14's fuse_file_info has no
  // field for it, but the reply to an OPEN is only a fuse_open_out: send
  // it whole.
  struct fuse_open_out out = {};
  out.fh = fi.fh;
  out.open_flags = FOPEN_DIRECT_IO | (m.direct_writes_in_parallel ? FOPEN_PARALLEL_DIRECT_WRITES : 0) |
                   (fi.keep_cache ? FOPEN_KEEP_CACHE : 0) | (fi.noflush ? FOPEN_NOFLUSH : 0);
  fuse_reply_buf(req, reinterpret_cast<const char*>(&out), sizeof out);
}

Task<void> SetAttr(fuse_req_t req, Node& node, struct stat attr, int to_set) {
  MountState& m = State(req);
  if (to_set & FUSE_SET_ATTR_SIZE) {
    if (node.is_directory()) co_return (void)fuse_reply_err(req, EISDIR);
    View& view = *node.view;
    if (!view.writable()) co_return (void)fuse_reply_err(req, EROFS);
    if (!view.resizable()) {
      // A partition's size is the partition table's: only "no change" is
      // accepted.
      if (attr.st_size < 0 || static_cast<uint64_t>(attr.st_size) != view.size()) {
        co_return (void)fuse_reply_err(req, EPERM);
      }
    } else {
      absl::Status status = co_await m.disk->Truncate(attr.st_size);
      if (!status.ok()) {
        co_return ReplyError(req, status, absl::StrFormat("truncate to %u bytes", attr.st_size));
      }
    }
  }
  // Owner, mode and times belong to the image file, not the view: accept
  // and ignore them, so that tools like touch and cp -p work.
  absl::StatusOr<struct stat> st = co_await Attributes(m, node);
  if (!st.ok()) co_return ReplyError(req, st.status(), "setattr");
  fuse_reply_attr(req, &*st, kAttrTimeoutSeconds);
}

// fallocate(2) on the view. KEEP_SIZE keeps the disk's size; without it a
// range past the end grows the disk first, as it grows a file (to a whole
// 512-byte sector, the unit of a disk's size).
Task<void> Fallocate(fuse_req_t req, fuse_ino_t ino, View& view, int mode, off_t offset, off_t length) {
  constexpr int kKnownModes = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
  if ((mode & ~kKnownModes) != 0 || ((mode & FALLOC_FL_PUNCH_HOLE) && (mode & FALLOC_FL_ZERO_RANGE))) {
    co_return (void)fuse_reply_err(req, EOPNOTSUPP);
  }
  // As for a file, PUNCH_HOLE must come with KEEP_SIZE.
  if ((mode & FALLOC_FL_PUNCH_HOLE) && !(mode & FALLOC_FL_KEEP_SIZE)) co_return (void)fuse_reply_err(req, EOPNOTSUPP);
  if (offset < 0 || length <= 0) co_return (void)fuse_reply_err(req, EINVAL);
  if (!view.writable()) co_return (void)fuse_reply_err(req, EROFS);
  Image& image = *view.image().value();  // a writable view is never a snapshot
  uint64_t end = static_cast<uint64_t>(offset) + static_cast<uint64_t>(length);
  if (!(mode & FALLOC_FL_KEEP_SIZE) && end > view.size()) {
    // A partition cannot grow: no room past its end, as for a write.
    if (!view.resizable()) co_return (void)fuse_reply_err(req, ENOSPC);
    const uint64_t new_size = (end + 511) / 512 * 512;
    absl::Status grown = co_await image.Truncate(new_size);
    if (!grown.ok()) co_return ReplyError(req, grown, absl::StrFormat("fallocate: grow to %u bytes", new_size));
  }
  // What lies past the end of the view is not there to change.
  const uint64_t size = view.size();
  if (static_cast<uint64_t>(offset) >= size) co_return (void)fuse_reply_err(req, 0);
  end = std::min(end, size);
  const uint64_t n = end - offset;
  const uint64_t at = view.start() + offset;
  absl::Status status;
  const char* what;
  if (mode & FALLOC_FL_PUNCH_HOLE) {
    what = "punch hole";
    status = co_await image.Discard(at, n);
  } else if (mode & FALLOC_FL_ZERO_RANGE) {
    what = "zero range";
    status = co_await image.WriteZeroes(at, n, /*may_unmap=*/false);
  } else {
    what = "preallocation";
    status = co_await image.Preallocate(at, n);
  }
  if (!status.ok()) co_return ReplyError(req, status, absl::StrFormat("%s of %u bytes at offset %u", what, n, offset));
  MountState& m = State(req);  // `req` is gone once answered
  fuse_reply_err(req, 0);
  InvalidateOthers(m, ino, at, n);
}

// SEEK_DATA and SEEK_HOLE, with a regular file's semantics: ENXIO at or past
// the end, and for SEEK_DATA when no data follows; the end of the file is
// the last hole.
Task<void> Lseek(fuse_req_t req, fuse_ino_t ino, View& view, off_t offset, int whence) {
  absl::StatusOr<Image*> opened = view.image();
  if (!opened.ok()) co_return ReplyError(req, opened.status(), "lseek");
  Image& image = **opened;
  const uint64_t size = view.size();
  if (whence != SEEK_DATA && whence != SEEK_HOLE) co_return (void)fuse_reply_err(req, EINVAL);
  if (offset < 0 || static_cast<uint64_t>(offset) >= size) co_return (void)fuse_reply_err(req, ENXIO);
  // Positions in the view; the disk's are start() further on.
  uint64_t pos = offset;
  while (pos < size) {
    // SEEK_DATA needs a run of data only as far as the advice below reads:
    // its end may lie a terabyte of L2 tables away. A run of anything else
    // is then looked at again, whole.
    const uint64_t look = whence == SEEK_DATA ? std::min(size - pos, kSeekDataPrefetchBytes) : size - pos;
    absl::StatusOr<Extent> e = co_await image.BlockStatus(view.start() + pos, look);
    if (e.ok() && e->kind != ExtentKind::kData && e->length == look && look < size - pos) {
      e = co_await image.BlockStatus(view.start() + pos, size - pos);
    }
    if (!e.ok()) co_return ReplyError(req, e.status(), absl::StrFormat("lseek at offset %u", pos));
    const bool data = e->kind == ExtentKind::kData;
    if (data == (whence == SEEK_DATA)) {
      // Whoever looks for data reads it next (cp --sparse, qemu-img
      // convert): the host starts reading it now, in the background.
      if (data) co_await image.WillNeed(view.start() + pos, e->length, kSeekDataPrefetchBytes);
      break;
    }
    pos += e->length;
  }
  if (whence == SEEK_DATA) {
    if (pos == size) co_return (void)fuse_reply_err(req, ENXIO);
    co_return (void)fuse_reply_lseek(req, pos);
  }
  // Whoever asks where the data it stands on ends reads that data next:
  // where no byte of the view can change, it finds the run, and then the
  // next one, in the view's page cache (prefill.h).
  Prefill* prefill = State(req).prefill;
  if (prefill == nullptr || view.writable() || pos == static_cast<uint64_t>(offset)) {
    co_return (void)fuse_reply_lseek(req, pos);
  }
  co_await prefill->Run(ino, view, image, offset, pos);
  fuse_reply_lseek(req, pos);
  co_await prefill->Next(ino, view, image, pos);
}

Task<void> Lookup(fuse_req_t req, Node& node) {
  absl::StatusOr<struct stat> st = co_await Attributes(State(req), node);
  if (!st.ok()) co_return ReplyError(req, st.status(), absl::StrFormat("lookup of %s", node.name));
  // From now on the kernel may cache the file's pages (ForEachOverlap).
  node.looked_up = true;
  fuse_entry_param entry = {};
  entry.ino = node.ino;
  entry.attr = *st;
  entry.attr_timeout = kAttrTimeoutSeconds;
  entry.entry_timeout = kAttrTimeoutSeconds;
  fuse_reply_entry(req, &entry);
}

void OnInit(void* userdata, struct fuse_conn_info* conn) {
  conn->want |= conn->capable & FUSE_CAP_ASYNC_READ;
  // O_TRUNC arrives with the OPEN (see Open), rather than as a separate
  // SETATTR after the open has already succeeded. libfuse asks for it by
  // default; say so, since Open relies on it.
  conn->want |= conn->capable & FUSE_CAP_ATOMIC_O_TRUNC;
  // Big requests: 1 MiB reads and writes instead of 128 KiB ones (libfuse
  // derives the kernel's max_pages from max_write; reads may be capped
  // lower by max_read, see MaxReadRequest), and enough requests in flight
  // for the scheduler's threads to keep the disk busy.
  conn->max_write = kMaxRequestBytes;
  MountState& m = *static_cast<MountState*>(userdata);
  // libfuse refuses an INIT whose max_read differs from the mount's.
  conn->max_read = m.max_read;
  // The kernel keeps the smaller of this and the mount's readahead, which
  // the daemon has raised already (readahead.h).
  conn->max_readahead = static_cast<unsigned>(std::max<uint64_t>(kMaxRequestBytes, m.readahead));
  conn->max_background = kMaxBackground;
  conn->congestion_threshold = kMaxBackground * 3 / 4;
  // Parallel direct writes, uncached writers and loop devices' descriptors
  // need FUSE's direct-I/O mode (see Open). Before Linux 6.9 (protocol
  // 7.40, the "io modes") a direct-I/O write did not drop the pages that
  // buffered opens of the view had cached, so a reader could see old data:
  // there writes keep the kernel's usual path, one at a time. A loop
  // device's descriptor is better off in that mode only from Linux 6.15,
  // whose loop driver reads a whole request at a time (opener.h).
  m.direct_writes_in_parallel = m.parallel_direct_writes && conn->proto_minor >= kIoModesProtoMinor;
  m.writers_uncached = m.uncached_writes && conn->proto_minor >= kIoModesProtoMinor;
  m.loops_uncached = m.uncached_loops && conn->proto_minor >= kIoModesProtoMinor && !m.loops_by_page;
  // Spliced replies need the kernel's and libfuse's consent, and a pipe
  // that holds at least a reply of kSplicedReadBytes.
  m.spliced_reads = m.splice_reads && (conn->capable & FUSE_CAP_SPLICE_WRITE) != 0 &&
                    MaxSplicedReply() >= kSplicedReadBytes;
  if (m.spliced_reads) conn->want |= FUSE_CAP_SPLICE_WRITE;
  if (m.on_ready) m.on_ready();
}

void OnLookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Node* node = State(req).views->Lookup(parent, name);
  if (node == nullptr) return (void)fuse_reply_err(req, ENOENT);
  State(req).scheduler->Start(Lookup(req, *node));
}

void OnGetAttr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info*) {
  Node* node = State(req).views->Find(ino);
  if (node == nullptr) return (void)fuse_reply_err(req, ENOENT);
  State(req).scheduler->Start(GetAttr(req, *node));
}

void OnSetAttr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, struct fuse_file_info*) {
  Node* node = State(req).views->Find(ino);
  if (node == nullptr) return (void)fuse_reply_err(req, ENOENT);
  State(req).scheduler->Start(SetAttr(req, *node, *attr, to_set));
}

void OnWrite(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t offset,
             struct fuse_file_info*) {
  View* view = FileView(req, ino);
  if (view == nullptr) return (void)fuse_reply_err(req, EISDIR);
  // `buf` is libfuse's and dies when this callback returns. Rather than
  // copy it, the callback waits for the write: if the write must wait for
  // a lock, this thread sleeps and the other workers take other requests.
  WorkerGate* gate = State(req).gate;  // `req` is gone once answered
  State(req).scheduler->Run(Write(req, ino, *view, std::span(reinterpret_cast<const uint8_t*>(buf), size), offset));
  if (gate != nullptr) gate->Leave();
}

void OnFsync(fuse_req_t req, fuse_ino_t, int /*datasync*/, struct fuse_file_info*) {
  // fdatasync and fsync mean the same for the view: data and the metadata
  // that finds it.
  State(req).scheduler->Start(Fsync(req));
}

void OnOpen(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  View* view = FileView(req, ino);
  if (view == nullptr) return (void)fuse_reply_err(req, EISDIR);
  State(req).scheduler->Start(Open(req, *view, *fi));
}

void OnRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, struct fuse_file_info*) {
  View* view = FileView(req, ino);
  if (view == nullptr) return (void)fuse_reply_err(req, EISDIR);
  WorkerGate* gate = State(req).gate;  // `req` is gone once answered
  State(req).scheduler->Start(Read(req, *view, size, offset, UringChannel::ReplySpace()));
  if (gate != nullptr) gate->Leave();
}

void OnLseek(fuse_req_t req, fuse_ino_t ino, off_t offset, int whence, struct fuse_file_info*) {
  View* view = FileView(req, ino);
  if (view == nullptr) return (void)fuse_reply_err(req, EISDIR);
  State(req).scheduler->Start(Lseek(req, ino, *view, offset, whence));
}

void OnFallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length, struct fuse_file_info*) {
  View* view = FileView(req, ino);
  if (view == nullptr) return (void)fuse_reply_err(req, EISDIR);
  State(req).scheduler->Start(Fallocate(req, ino, *view, mode, offset, length));
}

// A directory listing: ".", "..", then the children, each entry once; the
// offset of an entry is its position plus one, where the next call goes on.
void OnReadDir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, struct fuse_file_info*) {
  ViewTable& views = *State(req).views;
  Node* dir = views.Find(ino);
  if (dir == nullptr) return (void)fuse_reply_err(req, ENOENT);
  if (!dir->is_directory()) return (void)fuse_reply_err(req, ENOTDIR);
  std::vector<char> buf(size);
  size_t used = 0;
  const size_t count = dir->children.size() + 2;
  for (size_t i = offset < 0 ? 0 : offset; i < count; ++i) {
    const Node& entry = i == 0 ? *dir : i == 1 ? *views.Find(dir->parent) : *views.Find(dir->children[i - 2]);
    const char* name = i == 0 ? "." : i == 1 ? ".." : entry.name.c_str();
    struct stat st = {};
    st.st_ino = entry.ino;
    st.st_mode = entry.is_directory() ? S_IFDIR : S_IFREG;
    const size_t n = fuse_add_direntry(req, buf.data() + used, size - used, name, &st, i + 1);
    if (n > size - used) break;
    used += n;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void OnFlush(fuse_req_t req, fuse_ino_t, struct fuse_file_info* fi) {
  // FLUSH carries no open flags: the handle says how the file was opened.
  if ((fi->fh & kWritableHandle) == 0) {
    fuse_reply_err(req, 0);
    return;
  }
  State(req).scheduler->Start(FlushOnClose(req));
}

void OnRelease(fuse_req_t req, fuse_ino_t, struct fuse_file_info* fi) {
  if (fi->fh & kLoopReaderHandle) {
    if (absl::Status lowered = State(req).loop_readahead->Released(); !lowered.ok()) {
      Log(LogLevel::kWarning, absl::StrFormat("the view's readahead stays raised after a loop device went: %s",
                                              lowered.message()));
    }
  }
  fuse_reply_err(req, 0);
}

// The files of a mount are the disk's: none can be made, removed or
// renamed (without these, the kernel would answer ENOSYS, "Function not
// implemented").
void OnMknod(fuse_req_t req, fuse_ino_t, const char*, mode_t, dev_t) { fuse_reply_err(req, EPERM); }
void OnMkdir(fuse_req_t req, fuse_ino_t, const char*, mode_t) { fuse_reply_err(req, EPERM); }
void OnRemove(fuse_req_t req, fuse_ino_t, const char*) { fuse_reply_err(req, EPERM); }
void OnSymlink(fuse_req_t req, const char*, fuse_ino_t, const char*) { fuse_reply_err(req, EPERM); }
void OnRename(fuse_req_t req, fuse_ino_t, const char*, fuse_ino_t, const char*, unsigned int) {
  fuse_reply_err(req, EPERM);
}
void OnLink(fuse_req_t req, fuse_ino_t, fuse_ino_t, const char*) { fuse_reply_err(req, EPERM); }
void OnCreate(fuse_req_t req, fuse_ino_t, const char*, mode_t, struct fuse_file_info*) { fuse_reply_err(req, EPERM); }

void OnStatfs(fuse_req_t req, fuse_ino_t) {
  // The space that matters is that of the filesystem holding the image.
  struct statvfs st;
  if (fstatvfs(State(req).image_fd, &st) != 0) {
    fuse_reply_err(req, errno);
    return;
  }
  fuse_reply_statfs(req, &st);
}

}  // namespace

unsigned MaxReadRequest(bool splice_reads) {
  const size_t spliced = MaxSplicedReply();
  if (!splice_reads || spliced >= kMaxRequestBytes || spliced < kSplicedReadBytes) return 0;
  return static_cast<unsigned>(std::bit_floor(spliced));
}

const fuse_lowlevel_ops& Operations() {
  static const fuse_lowlevel_ops ops = [] {
    fuse_lowlevel_ops o = {};
    o.init = OnInit;
    o.lookup = OnLookup;
    o.getattr = OnGetAttr;
    o.setattr = OnSetAttr;
    o.open = OnOpen;
    o.read = OnRead;
    o.write = OnWrite;
    o.fsync = OnFsync;
    o.flush = OnFlush;
    o.release = OnRelease;
    o.readdir = OnReadDir;
    o.mknod = OnMknod;
    o.mkdir = OnMkdir;
    o.unlink = OnRemove;
    o.rmdir = OnRemove;
    o.symlink = OnSymlink;
    o.rename = OnRename;
    o.link = OnLink;
    o.create = OnCreate;
    o.statfs = OnStatfs;
    o.lseek = OnLseek;
    o.fallocate = OnFallocate;
    return o;
  }();
  return ops;
}

}  // namespace qcow2fuse
