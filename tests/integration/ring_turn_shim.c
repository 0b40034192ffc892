/* An LD_PRELOAD library for the daemon under uring_test.cc. It defines the
 * io_uring channel's test seam (fuse/ring_turn_seam.h), counts who commits
 * each reply, and forces the order the test chose (ring_turn_shim.h):
 *  - reply first: the entry's thread, back from libfuse while its request
 *    is still being served elsewhere, is held until that reply is in the
 *    entry. It must then commit the reply itself.
 *  - return first: a thread that replies to another thread's entry is held
 *    until the entry's thread is back from libfuse. The replying thread
 *    must then commit.
 * Without QCOW2FUSE_RING_TURN_CONTROL the seam does nothing.
 */

#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "ring_turn_seam.h"
#include "ring_turn_shim.h"

static struct RingTurnControl* control;

__attribute__((constructor)) static void LoadControl(void) {
  const char* path = getenv(QCOW2FUSE_RING_TURN_CONTROL_ENV);
  if (path == NULL) return;
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) return;
  void* p = mmap(NULL, sizeof(struct RingTurnControl), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return;
  struct RingTurnControl* c = p;
  if (__atomic_load_n(&c->magic, __ATOMIC_SEQ_CST) != QCOW2FUSE_RING_TURN_MAGIC) {
    munmap(p, sizeof(struct RingTurnControl));
    return;
  }
  control = c;
}

/* What has happened to each request in flight, by unique ID. A ring has a
 * few dozen entries, so requests 4096 apart are never in flight together. */
enum { kSlots = 4096 };
enum { kReturned = 1, kReplied = 2, kCommitted = 4 };
struct Slot {
  uint64_t unique;
  uint32_t events;
  int entry_thread; /* the thread ID of the request's entry */
};
static struct Slot slots[kSlots];

/* The request this thread has handed to libfuse and is not back from. */
static __thread uint64_t handing;

static void Count(uint64_t* counter) { __atomic_add_fetch(counter, 1, __ATOMIC_SEQ_CST); }

static struct Slot* SlotOf(uint64_t unique) { return &slots[unique % kSlots]; }

static uint32_t Mark(uint64_t unique, uint32_t event) {
  return __atomic_fetch_or(&SlotOf(unique)->events, event, __ATOMIC_SEQ_CST);
}

static int Has(uint64_t unique, uint32_t event) {
  const struct Slot* slot = SlotOf(unique);
  return __atomic_load_n(&slot->unique, __ATOMIC_SEQ_CST) == unique &&
         (__atomic_load_n(&slot->events, __ATOMIC_SEQ_CST) & event) != 0;
}

static int64_t NowNs(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

/* Holds the calling thread until `event` has happened to `unique`, for at
 * most 2 s: an order that cannot happen is a timeout, in the counts and in
 * the daemon's log, not a hang. */
static void Hold(uint64_t unique, uint32_t event) {
  if (Has(unique, event)) return;
  Count(&control->held);
  const struct timespec tick = {0, 20000};
  const int64_t deadline = NowNs() + 2000000000;
  while (!Has(unique, event)) {
    if (NowNs() >= deadline) {
      Count(&control->timeouts);
      /* Where the entry's thread is, for the log. */
      char path[64], where[256] = "?";
      const int tid = __atomic_load_n(&SlotOf(unique)->entry_thread, __ATOMIC_SEQ_CST);
      snprintf(path, sizeof path, "/proc/self/task/%d/syscall", tid);
      const int fd = open(path, O_RDONLY | O_CLOEXEC);
      if (fd >= 0) {
        const ssize_t n = read(fd, where, sizeof where - 1);
        where[n > 0 ? n : 0] = '\0';
        close(fd);
      }
      fprintf(stderr, "ring turn shim: request %llu: %s did not come within 2 s; entry thread %d in syscall %s",
              (unsigned long long)unique, event == kReplied ? "the reply" : "its entry's thread's return", tid, where);
      return;
    }
    nanosleep(&tick, NULL);
  }
}

static void Committed(uint64_t unique, uint64_t* by) {
  Count(by);
  if (Mark(unique, kCommitted) & kCommitted) Count(&control->double_commits);
}

void qcow2fuse_test_ring_turn(uint64_t unique, int step, int commits) {
  if (control == NULL) return;
  const uint32_t order = __atomic_load_n(&control->order, __ATOMIC_SEQ_CST);
  struct Slot* slot = SlotOf(unique);
  switch (step) {
    case kRingHanding:
      Count(&control->handed);
      __atomic_store_n(&slot->events, 0, __ATOMIC_SEQ_CST);
      __atomic_store_n(&slot->entry_thread, (int)syscall(SYS_gettid), __ATOMIC_SEQ_CST);
      __atomic_store_n(&slot->unique, unique, __ATOMIC_SEQ_CST);
      handing = unique;
      break;
    case kRingReturning:
      handing = 0;
      if (order == kOrderReplyFirst) Hold(unique, kReplied);
      break;
    case kRingReturned:
      Mark(unique, kReturned);
      if (commits) Committed(unique, &control->entry_commits);
      break;
    case kRingReplying:
      if (handing != unique) {
        Count(&control->replied_elsewhere);
        if (order == kOrderReturnFirst) Hold(unique, kReturned);
      }
      break;
    case kRingReplied:
      Mark(unique, kReplied);
      if (commits) Committed(unique, &control->replier_commits);
      break;
    default:
      break;
  }
}
