/* The control block of the fault shim (fault_shim.c), shared by the shim
 * in the daemon and the test that drives it.
 *
 * The shim is an LD_PRELOAD library for the qcow2fuse daemon under test.
 * It counts the calls that change one file (the image, named by
 * QCOW2FUSE_FAULT_FILE and recognised by device and inode, whatever
 * descriptor reaches it), and the splices that read it, and fails the one
 * the test chose. The test makes the control file (QCOW2FUSE_FAULT_CONTROL),
 * a FaultControl, and maps it too: it sets the fault before the mount,
 * reads the counts while the daemon runs, and can fill or empty the disk at
 * any time. Every field is read and written with atomic operations on both
 * sides.
 *
 * C, so that the shim needs no C++ runtime in the daemon it is loaded in.
 */

#ifndef QCOW2FUSE_TESTS_CLI_FAULT_SHIM_H_
#define QCOW2FUSE_TESTS_CLI_FAULT_SHIM_H_

#include <stdint.h>

#define QCOW2FUSE_FAULT_FILE_ENV "QCOW2FUSE_FAULT_FILE"
#define QCOW2FUSE_FAULT_CONTROL_ENV "QCOW2FUSE_FAULT_CONTROL"
#define QCOW2FUSE_FAULT_MAGIC 0x51464653u /* "QFFS" */

/* The calls counted, on the image only. */
enum FaultCall {
  kFaultPwrite = 0,    /* pwrite, pwrite64, pwritev, pwritev64, pwritev2, pwritev64v2 */
  kFaultFallocate = 1, /* fallocate, fallocate64: reserving (mode 0) and punching */
  kFaultSync = 2,      /* fdatasync, fsync */
  kFaultTruncate = 3,  /* ftruncate, ftruncate64 */
  kFaultSplice = 4,    /* splice out of the image: a spliced read's reply */
  kFaultCallKinds = 5
};

enum FaultMode {
  kFaultNone = 0,  /* count only */
  kFaultOnce = 1,  /* call `nth` of kind `call` fails with `error` */
  kFaultShort = 2, /* pwrite `nth` writes half and returns that count; the
                      same thread's next pwrite of the image (the retry of
                      the rest) fails with `error` */
  kFaultFull = 3,  /* from call `nth` of kind `call` on, `full` is set */
  kFaultPause = 4  /* call `nth` of kind `call` waits until the test sets
                      another mode, then goes on: a request parked in the
                      middle of its host I/O */
};

struct FaultControl {
  uint32_t magic;   /* QCOW2FUSE_FAULT_MAGIC */
  uint32_t mode;    /* enum FaultMode */
  uint32_t call;    /* enum FaultCall */
  int32_t error;    /* errno of the failure */
  uint64_t nth;     /* from 1 */
  /* Nonzero: the disk is full, every pwrite and every reserving fallocate
     of the image fails with ENOSPC. Set by the test or by kFaultFull;
     cleared by the test. */
  uint32_t full;
  uint32_t fired;   /* 1 once call `nth` came */
  uint64_t calls[kFaultCallKinds];  /* calls of each kind so far */
  uint64_t after[kFaultCallKinds];  /* of those, calls after it fired */
  uint64_t failed;                  /* calls the shim failed */
};

#endif /* QCOW2FUSE_TESTS_CLI_FAULT_SHIM_H_ */
