/* An LD_PRELOAD library that makes the qcow2fuse daemon's host I/O on its
 * image fail where a test chooses: the Nth pwrite with EIO, ENOSPC or a
 * short count, the Nth fallocate or ftruncate, the Nth fdatasync or fsync,
 * the Nth splice out of it (a read answered by splicing, spliced_reply.h),
 * or every call that needs space while the test says the disk is full.
 * fault_mount_test.cc drives it through the control block of fault_shim.h.
 *
 * Only calls on the image count: each intercepted call compares the
 * descriptor's device and inode (fstat) with those of QCOW2FUSE_FAULT_FILE,
 * taken when the library is loaded. Anything else, and everything when the
 * two environment variables are not set, goes straight to the next
 * definition (libc, or a sanitizer's interceptor). Every variant the
 * daemon could reach is wrapped, so that a counting run (kFaultNone) shows
 * which calls it really makes.
 *
 * A short write returns half the count, as a disk that fills up mid-write
 * does; PosixFile then retries the rest, and that retry, on the same
 * thread, fails with the chosen errno.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fault_shim.h"

static struct FaultControl* control;
static dev_t image_dev;
static ino_t image_ino;
/* The errno the retry of a short write gets, per thread; 0: none. */
static __thread int retry_error;

__attribute__((constructor)) static void LoadControl(void) {
  const char* file = getenv(QCOW2FUSE_FAULT_FILE_ENV);
  const char* path = getenv(QCOW2FUSE_FAULT_CONTROL_ENV);
  if (file == NULL || path == NULL) return;
  struct stat st;
  if (stat(file, &st) != 0) return;
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) return;
  void* p = mmap(NULL, sizeof(struct FaultControl), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return;
  struct FaultControl* c = p;
  if (__atomic_load_n(&c->magic, __ATOMIC_SEQ_CST) != QCOW2FUSE_FAULT_MAGIC) {
    munmap(p, sizeof(struct FaultControl));
    return;
  }
  image_dev = st.st_dev;
  image_ino = st.st_ino;
  control = c;
}

static void* Next(const char* name) { return dlsym(RTLD_NEXT, name); }

/* Resolves the next definition of `name` once, into `slot`. */
#define NEXT(slot, name)                                             \
  do {                                                               \
    if (__atomic_load_n(&(slot), __ATOMIC_ACQUIRE) == NULL) {        \
      __atomic_store_n(&(slot), Next(name), __ATOMIC_RELEASE);       \
    }                                                                \
  } while (0)

/* Whether `fd` is the image; its stat in *st. */
static int IsImage(int fd, struct stat* st) {
  if (control == NULL) return 0;
  int saved = errno;
  int ok = fstat(fd, st) == 0 && st->st_dev == image_dev && st->st_ino == image_ino;
  errno = saved;
  return ok;
}

enum Verdict { kPass, kFail, kShort };

static uint64_t Load64(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static uint32_t Load32(const uint32_t* p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }

/* Counts one call of `kind` on the image and decides it. */
static enum Verdict Decide(enum FaultCall kind, int needs_space, int* error) {
  const uint64_t n = __atomic_add_fetch(&control->calls[kind], 1, __ATOMIC_SEQ_CST);
  if (Load32(&control->fired)) __atomic_add_fetch(&control->after[kind], 1, __ATOMIC_SEQ_CST);
  const uint32_t mode = Load32(&control->mode);
  enum Verdict verdict = kPass;
  if (mode != kFaultNone && Load32(&control->call) == (uint32_t)kind && n == Load64(&control->nth)) {
    __atomic_store_n(&control->fired, 1, __ATOMIC_SEQ_CST);
    if (mode == kFaultPause) {
      const struct timespec tick = {0, 1000000};
      while (Load32(&control->mode) == kFaultPause) nanosleep(&tick, NULL);
    } else if (mode == kFaultFull) {
      __atomic_store_n(&control->full, 1, __ATOMIC_SEQ_CST);
    } else {
      verdict = mode == kFaultShort && kind == kFaultPwrite ? kShort : kFail;
      *error = __atomic_load_n(&control->error, __ATOMIC_SEQ_CST);
    }
  }
  if (verdict == kPass && needs_space && Load32(&control->full)) {
    verdict = kFail;
    *error = ENOSPC;
  }
  if (verdict == kPass && retry_error != 0) {
    verdict = kFail;
    *error = retry_error;
  }
  if (kind == kFaultPwrite) retry_error = 0;
  if (verdict != kPass) __atomic_add_fetch(&control->failed, 1, __ATOMIC_SEQ_CST);
  return verdict;
}

/* --- pwrite and its variants ------------------------------------------------- */

typedef ssize_t (*PwriteFn)(int, const void*, size_t, off_t);
typedef ssize_t (*Pwrite64Fn)(int, const void*, size_t, off64_t);
typedef ssize_t (*PwritevFn)(int, const struct iovec*, int, off_t);
typedef ssize_t (*Pwritev64Fn)(int, const struct iovec*, int, off64_t);
typedef ssize_t (*Pwritev2Fn)(int, const struct iovec*, int, off_t, int);
typedef ssize_t (*Pwritev64v2Fn)(int, const struct iovec*, int, off64_t, int);

static PwriteFn next_pwrite;
static Pwrite64Fn next_pwrite64;
static PwritevFn next_pwritev;
static Pwritev64Fn next_pwritev64;
static Pwritev2Fn next_pwritev2;
static Pwritev64v2Fn next_pwritev64v2;

/* The decision for a pwrite of `count` bytes: -1 with errno set to fail
 * it, 0 to pass it on whole, or the shorter count to pass on. */
static ssize_t DecidePwrite(int fd, size_t count, size_t* pass) {
  struct stat st;
  *pass = count;
  if (!IsImage(fd, &st)) return 0;
  int error = 0;
  switch (Decide(kFaultPwrite, 1, &error)) {
    case kPass:
      return 0;
    case kShort:
      if (count / 2 > 0) {
        *pass = count / 2;
        retry_error = error;
        return 0;
      }
      /* Too small to split: it fails whole. */
      /* fall through */
    case kFail:
      errno = error;
      return -1;
  }
  return 0;
}

ssize_t pwrite(int fd, const void* buf, size_t count, off_t offset) {
  NEXT(next_pwrite, "pwrite");
  size_t pass;
  if (DecidePwrite(fd, count, &pass) < 0) return -1;
  return next_pwrite(fd, buf, pass, offset);
}

ssize_t pwrite64(int fd, const void* buf, size_t count, off64_t offset) {
  NEXT(next_pwrite64, "pwrite64");
  size_t pass;
  if (DecidePwrite(fd, count, &pass) < 0) return -1;
  return next_pwrite64(fd, buf, pass, offset);
}

/* Vectored writes fail whole; a short one writes nothing more than the
 * first half of the first buffer. */
static ssize_t DecidePwritev(int fd, const struct iovec* iov, int iovcnt, struct iovec* first, int* cnt) {
  size_t total = 0;
  for (int i = 0; i < iovcnt; ++i) total += iov[i].iov_len;
  size_t pass;
  *cnt = iovcnt;
  if (DecidePwrite(fd, total, &pass) < 0) return -1;
  if (pass < total && iovcnt > 0) {
    *first = iov[0];
    if (first->iov_len > pass) first->iov_len = pass;
    *cnt = 1;
  }
  return 0;
}

ssize_t pwritev(int fd, const struct iovec* iov, int iovcnt, off_t offset) {
  NEXT(next_pwritev, "pwritev");
  struct iovec first;
  int cnt;
  if (DecidePwritev(fd, iov, iovcnt, &first, &cnt) < 0) return -1;
  return next_pwritev(fd, cnt < iovcnt ? &first : iov, cnt, offset);
}

ssize_t pwritev64(int fd, const struct iovec* iov, int iovcnt, off64_t offset) {
  NEXT(next_pwritev64, "pwritev64");
  struct iovec first;
  int cnt;
  if (DecidePwritev(fd, iov, iovcnt, &first, &cnt) < 0) return -1;
  return next_pwritev64(fd, cnt < iovcnt ? &first : iov, cnt, offset);
}

ssize_t pwritev2(int fd, const struct iovec* iov, int iovcnt, off_t offset, int flags) {
  NEXT(next_pwritev2, "pwritev2");
  struct iovec first;
  int cnt;
  if (DecidePwritev(fd, iov, iovcnt, &first, &cnt) < 0) return -1;
  return next_pwritev2(fd, cnt < iovcnt ? &first : iov, cnt, offset, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec* iov, int iovcnt, off64_t offset, int flags) {
  NEXT(next_pwritev64v2, "pwritev64v2");
  struct iovec first;
  int cnt;
  if (DecidePwritev(fd, iov, iovcnt, &first, &cnt) < 0) return -1;
  return next_pwritev64v2(fd, cnt < iovcnt ? &first : iov, cnt, offset, flags);
}

/* --- fallocate, ftruncate, fdatasync, fsync ----------------------------------- */

typedef int (*FallocateFn)(int, int, off_t, off_t);
typedef int (*Fallocate64Fn)(int, int, off64_t, off64_t);
typedef int (*FtruncateFn)(int, off_t);
typedef int (*Ftruncate64Fn)(int, off64_t);
typedef int (*SyncFn)(int);

static FallocateFn next_fallocate;
static Fallocate64Fn next_fallocate64;
static FtruncateFn next_ftruncate;
static Ftruncate64Fn next_ftruncate64;
static SyncFn next_fdatasync;
static SyncFn next_fsync;

/* -1 with errno set if the call on `fd` of `kind` is to fail. */
static int DecideCall(int fd, enum FaultCall kind, int needs_space) {
  struct stat st;
  if (!IsImage(fd, &st)) return 0;
  int error = 0;
  if (Decide(kind, needs_space, &error) == kPass) return 0;
  errno = error;
  return -1;
}

int fallocate(int fd, int mode, off_t offset, off_t len) {
  NEXT(next_fallocate, "fallocate");
  if (DecideCall(fd, kFaultFallocate, !(mode & FALLOC_FL_PUNCH_HOLE)) < 0) return -1;
  return next_fallocate(fd, mode, offset, len);
}

int fallocate64(int fd, int mode, off64_t offset, off64_t len) {
  NEXT(next_fallocate64, "fallocate64");
  if (DecideCall(fd, kFaultFallocate, !(mode & FALLOC_FL_PUNCH_HOLE)) < 0) return -1;
  return next_fallocate64(fd, mode, offset, len);
}

int ftruncate(int fd, off_t length) {
  NEXT(next_ftruncate, "ftruncate");
  struct stat st;
  const int grows = IsImage(fd, &st) && st.st_size < length;
  if (DecideCall(fd, kFaultTruncate, grows) < 0) return -1;
  return next_ftruncate(fd, length);
}

int ftruncate64(int fd, off64_t length) {
  NEXT(next_ftruncate64, "ftruncate64");
  struct stat st;
  const int grows = IsImage(fd, &st) && st.st_size < length;
  if (DecideCall(fd, kFaultTruncate, grows) < 0) return -1;
  return next_ftruncate64(fd, length);
}

int fdatasync(int fd) {
  NEXT(next_fdatasync, "fdatasync");
  if (DecideCall(fd, kFaultSync, 0) < 0) return -1;
  return next_fdatasync(fd);
}

int fsync(int fd) {
  NEXT(next_fsync, "fsync");
  if (DecideCall(fd, kFaultSync, 0) < 0) return -1;
  return next_fsync(fd);
}

/* --- splice ------------------------------------------------------------------ */

typedef ssize_t (*SpliceFn)(int, loff_t*, int, loff_t*, size_t, unsigned int);

static SpliceFn next_splice;

ssize_t splice(int fd_in, loff_t* off_in, int fd_out, loff_t* off_out, size_t len, unsigned int flags) {
  NEXT(next_splice, "splice");
  if (DecideCall(fd_in, kFaultSplice, 0) < 0) return -1;
  return next_splice(fd_in, off_in, fd_out, off_out, len, flags);
}
