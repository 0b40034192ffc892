// A BlockFile decorator that makes a failed Flush final.
//
// When fdatasync fails, the kernel may already have dropped the dirty pages
// it could not write and marked them clean: a second fdatasync then
// succeeds although those writes never reached the disk. An engine that
// retried would tell the user "durable" for data that is gone, and would go
// on to write L2 tables whose refcounts and data may not be on disk,
// breaking the order the flush protocol relies on. So the first failed
// Flush latches: every later Flush fails with it, naming the original
// error, until the file is opened again (a remount). Reads and writes go on
// as before; only the promise of durability is withdrawn.

#ifndef QCOW2FUSE_IO_LATCHED_FILE_H_
#define QCOW2FUSE_IO_LATCHED_FILE_H_

#include <memory>

#include "io/block_file.h"

namespace qcow2fuse {

// Wraps `inner`; everything but Flush is passed through unchanged.
std::unique_ptr<BlockFile> LatchFlushErrors(std::unique_ptr<BlockFile> inner);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_IO_LATCHED_FILE_H_
