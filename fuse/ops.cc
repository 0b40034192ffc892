#include "ops.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fuse.h>  // fuse_open_out, FOPEN_*: the kernel's side of the OPEN reply
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <span>

#include "absl/strings/str_format.h"
#include "buffer_pool.h"
#include "errno_map.h"
#include "log.h"

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
// fuse_file_info::fh of an open: whether it may write.
constexpr uint64_t kReadOnlyHandle = 0;
constexpr uint64_t kWritableHandle = 1;

// Reads of at least this many bytes take their buffer from a pool (see
// buffer_pool.h); this is where malloc starts to hand out fresh mappings.
constexpr size_t kPooledReadBytes = 128u << 10;
// Free read buffers kept: enough for the kernel's readahead and a few
// readers at once, 16 MiB at most.
constexpr size_t kKeptReadBuffers = 16;

BufferPool& ReadBuffers() {
  // Never destroyed: a request's coroutine may still hold a buffer while
  // the process exits.
  static BufferPool* pool = new BufferPool(kMaxRequestBytes, kKeptReadBuffers);
  return *pool;
}

MountState& State(fuse_req_t req) { return *static_cast<MountState*>(fuse_req_userdata(req)); }

void ReplyError(fuse_req_t req, const absl::Status& status, std::string_view what) {
  const int err = StatusToErrno(status);
  Log(LogLevel::kError, absl::StrFormat("%s: %s", what, status.message()));
  fuse_reply_err(req, err);
}

Task<absl::StatusOr<struct stat>> Attributes(MountState& m) {
  struct stat st = {};
  st.st_ino = FUSE_ROOT_ID;
  st.st_mode = S_IFREG | (m.mountpoint_stat.st_mode & 07777);
  if (m.image->read_only()) st.st_mode &= ~(S_IWUSR | S_IWGRP | S_IWOTH);
  st.st_nlink = 1;
  st.st_uid = m.mountpoint_stat.st_uid;
  st.st_gid = m.mountpoint_stat.st_gid;
  st.st_size = m.image->virtual_size();
  st.st_blksize = std::min<uint64_t>(m.image->cluster_size(), uint64_t{1} << 20);
  absl::StatusOr<uint64_t> allocated = co_await m.image->AllocatedBytes();
  if (!allocated.ok()) co_return allocated.status();
  st.st_blocks = (*allocated + kStatBlockSize - 1) / kStatBlockSize;
  struct stat image_st;
  if (fstat(m.image_fd, &image_st) == 0) {
    st.st_atim = image_st.st_atim;
    st.st_mtim = image_st.st_mtim;
    st.st_ctim = image_st.st_ctim;
  }
  co_return st;
}

Task<void> GetAttr(fuse_req_t req) {
  absl::StatusOr<struct stat> st = co_await Attributes(State(req));
  if (!st.ok()) co_return ReplyError(req, st.status(), "getattr");
  fuse_reply_attr(req, &*st, kAttrTimeoutSeconds);
}

Task<void> Read(fuse_req_t req, size_t size, off_t offset) {
  Image& image = *State(req).image;
  const uint64_t disk = image.virtual_size();
  const uint64_t start = std::min<uint64_t>(offset, disk);
  // Not zero-filled first: Read fills every byte.
  const size_t n = std::min<uint64_t>(size, disk - start);
  std::optional<BufferPool::Buffer> pooled;
  std::unique_ptr<uint8_t[]> small;
  std::span<uint8_t> buf;
  if (n >= kPooledReadBytes && n <= kMaxRequestBytes) {
    pooled.emplace(ReadBuffers().Take());
    buf = pooled->first(n);
  } else {
    small.reset(new uint8_t[n]);
    buf = std::span(small.get(), n);
  }
  absl::Status status = co_await image.Read(start, buf);
  if (!status.ok()) {
    co_return ReplyError(req, status, absl::StrFormat("read of %u bytes at offset %u", buf.size(), start));
  }
  fuse_reply_buf(req, reinterpret_cast<const char*>(buf.data()), buf.size());
}

Task<void> Write(fuse_req_t req, std::span<const uint8_t> data, off_t offset) {
  Image& image = *State(req).image;
  const uint64_t disk = image.virtual_size();
  // The view is a file of fixed size, like a disk: no room past its end.
  if (offset < 0 || static_cast<uint64_t>(offset) >= disk) co_return (void)fuse_reply_err(req, ENOSPC);
  const size_t n = std::min<uint64_t>(data.size(), disk - offset);
  absl::Status status = co_await image.Write(offset, data.first(n));
  if (!status.ok()) {
    co_return ReplyError(req, status, absl::StrFormat("write of %u bytes at offset %u", n, offset));
  }
  fuse_reply_write(req, n);
}

Task<void> Fsync(fuse_req_t req) {
  absl::Status status = co_await State(req).image->Flush();
  if (!status.ok()) co_return ReplyError(req, status, "fsync");
  fuse_reply_err(req, 0);
}

// The close of a writable descriptor: what was written through the view is
// made durable before close() returns (the kernel waits for FLUSH, not for
// RELEASE). A flush that finds nothing changed costs no I/O.
Task<void> FlushOnClose(fuse_req_t req) {
  absl::Status status = co_await State(req).image->Flush();
  if (!status.ok()) co_return ReplyError(req, status, "flush at close");
  fuse_reply_err(req, 0);
}

// An open. With atomic_o_trunc the kernel leaves O_TRUNC to us. It asks to
// throw away everything, and follows the shrink rule: refused (the open
// fails, the disk untouched) while the disk holds data, as `truncate -s 0`
// is. A disk that holds none keeps its size, as a block device does: `dd
// of=VIEW` onto a fresh image must not leave a disk of 0 bytes.
Task<void> Open(fuse_req_t req, fuse_file_info fi) {
  MountState& m = State(req);
  const bool writable = (fi.flags & O_ACCMODE) != O_RDONLY;
  if ((writable || (fi.flags & O_TRUNC)) && m.image->read_only()) co_return (void)fuse_reply_err(req, EROFS);
  if (fi.flags & O_TRUNC) {
    absl::Status status = co_await m.image->CheckShrink(0);
    if (!status.ok()) {
      co_return ReplyError(req, status, "open with O_TRUNC (use conv=notrunc with dd, or 1<> in a shell)");
    }
  }
  // Nothing else changes the view of a read-only mount, so the kernel may
  // keep what it cached across opens.
  fi.keep_cache = m.image->read_only();
  // Only a descriptor that changed or may change the disk has something
  // for its close to make durable; a read-only one closes without a round
  // trip.
  const bool changes = writable || (fi.flags & O_TRUNC);
  fi.noflush = !changes;
  fi.fh = changes ? kWritableHandle : kReadOnlyHandle;
  if (!writable || !(fi.flags & O_DIRECT) || !m.direct_writes_in_parallel) {
    co_return (void)fuse_reply_open(req, &fi);
  }
  // The kernel serialises the writes of a file, O_DIRECT ones too, unless
  // the open is in direct-I/O mode and says FOPEN_PARALLEL_DIRECT_WRITES
  // (Linux 6.2+; older kernels ignore the bit). libfuse 3.14's
  // fuse_file_info has no field for it, but the reply to an OPEN is only a
  // fuse_open_out: send it whole.
  struct fuse_open_out out = {};
  out.fh = fi.fh;
  out.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES | (fi.keep_cache ? FOPEN_KEEP_CACHE : 0) |
                   (fi.noflush ? FOPEN_NOFLUSH : 0);
  fuse_reply_buf(req, reinterpret_cast<const char*>(&out), sizeof out);
}

Task<void> SetAttr(fuse_req_t req, struct stat attr, int to_set) {
  MountState& m = State(req);
  if (to_set & FUSE_SET_ATTR_SIZE) {
    if (m.image->read_only()) co_return (void)fuse_reply_err(req, EROFS);
    absl::Status status = co_await m.image->Truncate(attr.st_size);
    if (!status.ok()) {
      co_return ReplyError(req, status, absl::StrFormat("truncate to %u bytes", attr.st_size));
    }
  }
  // Owner, mode and times belong to the image file, not the view: accept
  // and ignore them, so that tools like touch and cp -p work.
  absl::StatusOr<struct stat> st = co_await Attributes(m);
  if (!st.ok()) co_return ReplyError(req, st.status(), "setattr");
  fuse_reply_attr(req, &*st, kAttrTimeoutSeconds);
}

// fallocate(2) on the view. KEEP_SIZE keeps the disk's size; without it a
// range past the end grows the disk first, as it grows a file (to a whole
// 512-byte sector, the unit of a disk's size).
Task<void> Fallocate(fuse_req_t req, int mode, off_t offset, off_t length) {
  MountState& m = State(req);
  Image& image = *m.image;
  constexpr int kKnownModes = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
  if ((mode & ~kKnownModes) != 0 || ((mode & FALLOC_FL_PUNCH_HOLE) && (mode & FALLOC_FL_ZERO_RANGE))) {
    co_return (void)fuse_reply_err(req, EOPNOTSUPP);
  }
  // As for a file, PUNCH_HOLE must come with KEEP_SIZE.
  if ((mode & FALLOC_FL_PUNCH_HOLE) && !(mode & FALLOC_FL_KEEP_SIZE)) co_return (void)fuse_reply_err(req, EOPNOTSUPP);
  if (offset < 0 || length <= 0) co_return (void)fuse_reply_err(req, EINVAL);
  if (image.read_only()) co_return (void)fuse_reply_err(req, EROFS);
  uint64_t end = static_cast<uint64_t>(offset) + static_cast<uint64_t>(length);
  if (!(mode & FALLOC_FL_KEEP_SIZE) && end > image.virtual_size()) {
    const uint64_t new_size = (end + 511) / 512 * 512;
    absl::Status grown = co_await image.Truncate(new_size);
    if (!grown.ok()) co_return ReplyError(req, grown, absl::StrFormat("fallocate: grow to %u bytes", new_size));
  }
  // What lies past the end of the disk is not there to change.
  const uint64_t disk = image.virtual_size();
  if (static_cast<uint64_t>(offset) >= disk) co_return (void)fuse_reply_err(req, 0);
  end = std::min(end, disk);
  const uint64_t n = end - offset;
  absl::Status status;
  const char* what;
  if (mode & FALLOC_FL_PUNCH_HOLE) {
    what = "punch hole";
    status = co_await image.Discard(offset, n);
  } else if (mode & FALLOC_FL_ZERO_RANGE) {
    what = "zero range";
    status = co_await image.WriteZeroes(offset, n, /*may_unmap=*/false);
  } else {
    what = "preallocation";
    status = co_await image.Preallocate(offset, n);
  }
  if (!status.ok()) co_return ReplyError(req, status, absl::StrFormat("%s of %u bytes at offset %u", what, n, offset));
  fuse_reply_err(req, 0);
}

// SEEK_DATA and SEEK_HOLE, with a regular file's semantics: ENXIO at or past
// the end, and for SEEK_DATA when no data follows; the end of the file is
// the last hole.
Task<void> Lseek(fuse_req_t req, off_t offset, int whence) {
  Image& image = *State(req).image;
  const uint64_t disk = image.virtual_size();
  if (whence != SEEK_DATA && whence != SEEK_HOLE) co_return (void)fuse_reply_err(req, EINVAL);
  if (offset < 0 || static_cast<uint64_t>(offset) >= disk) co_return (void)fuse_reply_err(req, ENXIO);
  uint64_t pos = offset;
  while (pos < disk) {
    absl::StatusOr<Extent> e = co_await image.BlockStatus(pos, disk - pos);
    if (!e.ok()) co_return ReplyError(req, e.status(), absl::StrFormat("lseek at offset %u", pos));
    const bool data = e->kind == ExtentKind::kData;
    if (data == (whence == SEEK_DATA)) {
      // Whoever looks for data reads it next (cp --sparse, qemu-img
      // convert): the host starts reading it now, in the background.
      if (data) co_await image.WillNeed(pos, e->length, kSeekDataPrefetchBytes);
      co_return (void)fuse_reply_lseek(req, pos);
    }
    pos += e->length;
  }
  if (whence == SEEK_DATA) co_return (void)fuse_reply_err(req, ENXIO);
  fuse_reply_lseek(req, disk);
}

void OnInit(void* userdata, struct fuse_conn_info* conn) {
  conn->want |= conn->capable & FUSE_CAP_ASYNC_READ;
  // O_TRUNC arrives with the OPEN (see Open), rather than as a separate
  // SETATTR after the open has already succeeded. libfuse asks for it by
  // default; say so, since Open relies on it.
  conn->want |= conn->capable & FUSE_CAP_ATOMIC_O_TRUNC;
  // Big requests: 1 MiB reads and writes instead of 128 KiB ones (libfuse
  // derives the kernel's max_pages from max_write), and enough requests in
  // flight for the scheduler's threads to keep the disk busy.
  conn->max_write = kMaxRequestBytes;
  conn->max_readahead = kMaxRequestBytes;
  conn->max_background = kMaxBackground;
  conn->congestion_threshold = kMaxBackground * 3 / 4;
  MountState& m = *static_cast<MountState*>(userdata);
  // Parallel direct writes need FUSE's direct-I/O mode (see Open). Before
  // Linux 6.9 (protocol 7.40, the "io modes") a direct-I/O write did not
  // drop the pages that buffered opens of the view had cached, so a reader
  // could see old data: there the kernel keeps serialising instead.
  m.direct_writes_in_parallel = m.parallel_direct_writes && conn->proto_minor >= kIoModesProtoMinor;
  if (m.on_ready) m.on_ready();
}

void OnGetAttr(fuse_req_t req, fuse_ino_t, struct fuse_file_info*) {
  State(req).scheduler->Start(GetAttr(req));
}

void OnSetAttr(fuse_req_t req, fuse_ino_t, struct stat* attr, int to_set, struct fuse_file_info*) {
  State(req).scheduler->Start(SetAttr(req, *attr, to_set));
}

void OnWrite(fuse_req_t req, fuse_ino_t, const char* buf, size_t size, off_t offset,
             struct fuse_file_info*) {
  // `buf` is libfuse's and dies when this callback returns. Rather than
  // copy it, the callback waits for the write: if the write must wait for
  // a lock, this thread sleeps and the other workers take other requests.
  State(req).scheduler->Run(Write(req, std::span(reinterpret_cast<const uint8_t*>(buf), size), offset));
}

void OnFsync(fuse_req_t req, fuse_ino_t, int /*datasync*/, struct fuse_file_info*) {
  // fdatasync and fsync mean the same for the view: data and the metadata
  // that finds it.
  State(req).scheduler->Start(Fsync(req));
}

void OnOpen(fuse_req_t req, fuse_ino_t, struct fuse_file_info* fi) {
  State(req).scheduler->Start(Open(req, *fi));
}

void OnRead(fuse_req_t req, fuse_ino_t, size_t size, off_t offset, struct fuse_file_info*) {
  State(req).scheduler->Start(Read(req, size, offset));
}

void OnLseek(fuse_req_t req, fuse_ino_t, off_t offset, int whence, struct fuse_file_info*) {
  State(req).scheduler->Start(Lseek(req, offset, whence));
}

void OnFallocate(fuse_req_t req, fuse_ino_t, int mode, off_t offset, off_t length, struct fuse_file_info*) {
  State(req).scheduler->Start(Fallocate(req, mode, offset, length));
}

void OnFlush(fuse_req_t req, fuse_ino_t, struct fuse_file_info* fi) {
  // FLUSH carries no open flags: the handle says how the file was opened.
  if (fi->fh != kWritableHandle) {
    fuse_reply_err(req, 0);
    return;
  }
  State(req).scheduler->Start(FlushOnClose(req));
}

void OnRelease(fuse_req_t req, fuse_ino_t, struct fuse_file_info*) { fuse_reply_err(req, 0); }

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

const fuse_lowlevel_ops& Operations() {
  static const fuse_lowlevel_ops ops = [] {
    fuse_lowlevel_ops o = {};
    o.init = OnInit;
    o.getattr = OnGetAttr;
    o.setattr = OnSetAttr;
    o.open = OnOpen;
    o.read = OnRead;
    o.write = OnWrite;
    o.fsync = OnFsync;
    o.flush = OnFlush;
    o.release = OnRelease;
    o.statfs = OnStatfs;
    o.lseek = OnLseek;
    o.fallocate = OnFallocate;
    return o;
  }();
  return ops;
}

}  // namespace qcow2fuse
