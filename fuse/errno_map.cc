#include "errno_map.h"

#include <errno.h>

#include "qcow2fuse/status.h"

namespace qcow2fuse {

int StatusToErrno(const absl::Status& status) {
  if (status.ok()) return 0;
  if (std::optional<int> err = StatusErrno(status)) return *err;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument: return EINVAL;
    case absl::StatusCode::kOutOfRange: return EINVAL;
    case absl::StatusCode::kNotFound: return ENOENT;
    case absl::StatusCode::kPermissionDenied: return EACCES;
    case absl::StatusCode::kUnimplemented: return EOPNOTSUPP;
    case absl::StatusCode::kResourceExhausted: return ENOMEM;
    case absl::StatusCode::kUnavailable: return EAGAIN;
    default: return EIO;  // kDataLoss, kInternal, kUnknown, ...
  }
}

}  // namespace qcow2fuse
