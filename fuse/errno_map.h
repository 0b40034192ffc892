// The one place that turns engine statuses into errno values for the kernel.

#ifndef QCOW2FUSE_FUSE_ERRNO_MAP_H_
#define QCOW2FUSE_FUSE_ERRNO_MAP_H_

#include "absl/status/status.h"

namespace qcow2fuse {

// The errno a failed system call attached, else one chosen by status code:
// corruption and unknown failures are EIO.
int StatusToErrno(const absl::Status& status);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_ERRNO_MAP_H_
