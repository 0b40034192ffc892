/* The test seam of the io_uring channel (uring_channel.cc).
 *
 * Which thread commits a ring entry's reply depends on the order of two
 * events: the entry's thread coming back from libfuse, and the reply being
 * made, on that thread or on another (CommitTurn). On its own a test meets
 * the rarer order only by chance. So where a library loaded into the daemon
 * (LD_PRELOAD) defines QCOW2FUSE_RING_TURN_SYMBOL, the channel calls it at
 * each step below, and the library may hold the calling thread there until
 * the other event has come: tests/integration/ring_turn_shim.c forces
 * either order that way through a real mount.
 *
 * The daemon looks the symbol up once; where no library defines it, each
 * step costs a test of a null pointer. C, for the shim.
 */

#ifndef QCOW2FUSE_FUSE_RING_TURN_SEAM_H_
#define QCOW2FUSE_FUSE_RING_TURN_SEAM_H_

#include <stdint.h>

#define QCOW2FUSE_RING_TURN_SYMBOL "qcow2fuse_test_ring_turn"

enum RingTurnStep {
  kRingHanding = 0,   /* the entry's thread hands request `unique` to libfuse */
  kRingReturning = 1, /* it is back from libfuse, and about to take its turn */
  kRingReturned = 2,  /* it took its turn; `commits`: it commits the reply */
  kRingReplying = 3,  /* the reply is in the entry, its thread about to take its turn */
  kRingReplied = 4    /* that thread took its turn; `commits`: it commits the reply */
};

/* void qcow2fuse_test_ring_turn(uint64_t unique, int step, int commits); */
typedef void (*RingTurnHook)(uint64_t unique, int step, int commits);

#endif /* QCOW2FUSE_FUSE_RING_TURN_SEAM_H_ */
