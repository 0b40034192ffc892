/* The control block of the ring turn shim (ring_turn_shim.c), shared by
 * the shim in the daemon and uring_test.cc, which maps the same file
 * (QCOW2FUSE_RING_TURN_CONTROL): the test sets the order before the
 * mount and reads the counts after it. Every field is read and written
 * with atomic operations on both sides.
 */

#ifndef QCOW2FUSE_TESTS_INTEGRATION_RING_TURN_SHIM_H_
#define QCOW2FUSE_TESTS_INTEGRATION_RING_TURN_SHIM_H_

#include <stdint.h>

#define QCOW2FUSE_RING_TURN_CONTROL_ENV "QCOW2FUSE_RING_TURN_CONTROL"
#define QCOW2FUSE_RING_TURN_MAGIC 0x52545348u /* "RTSH" */

enum RingTurnOrder {
  kOrderNatural = 0,    /* hold nobody: count only */
  kOrderReplyFirst = 1, /* the entry's thread, back from libfuse, waits
                           until the reply made on another thread is in */
  kOrderReturnFirst = 2 /* a thread replying to another thread's entry
                           waits until that thread is back from libfuse */
};

struct RingTurnControl {
  uint32_t magic; /* QCOW2FUSE_RING_TURN_MAGIC */
  uint32_t order; /* enum RingTurnOrder */
  uint64_t handed;            /* requests handed to libfuse from ring entries */
  uint64_t replied_elsewhere; /* replies made on another thread than the entry's */
  uint64_t held;              /* threads held until the other event came */
  uint64_t timeouts;          /* holds given up after 2 s: the other event never came */
  uint64_t entry_commits;     /* replies committed by the entry's thread */
  uint64_t replier_commits;   /* replies committed by the thread that made them */
  uint64_t double_commits;    /* requests both threads committed: never */
};

#endif /* QCOW2FUSE_TESTS_INTEGRATION_RING_TURN_SHIM_H_ */
