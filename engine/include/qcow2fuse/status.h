// Status conventions shared by the engine and its callers.
//
// Every engine error is an absl::Status. Corruption of the image is
// absl::DataLossError with context (which table, which index, which host
// offset). Where a system call fails, the raw errno travels with the status
// as a payload, because abseil folds several errno values into one code
// (EIO becomes kUnknown, ENOSPC and ENOMEM share kResourceExhausted) and the
// FUSE front end must answer the kernel with the real one.
//
// Debian 12's abseil has no RETURN_IF_ERROR family, so it is defined here,
// with co_return variants for coroutines. Its absl::string_view and
// absl::optional are its own types, not aliases of the std ones, which is
// why absl::string_view appears in these signatures.

#ifndef QCOW2FUSE_STATUS_H_
#define QCOW2FUSE_STATUS_H_

#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qcow2fuse {

// Builds a status from a failed system call: the code abseil chooses for
// `error_number`, the message "context: strerror", and the errno payload.
absl::Status ErrnoStatus(int error_number, absl::string_view context);

// `status` with `error_number` attached as the errno a front end should
// report for it.
absl::Status WithErrno(absl::Status status, int error_number);

// The errno attached by ErrnoStatus or WithErrno, if any.
std::optional<int> StatusErrno(const absl::Status& status);

// `status` marked as met in a backing file: damage found there is that
// read-only file's, and must not mark the image above it corrupt.
absl::Status FromBackingFile(absl::Status status);
bool IsFromBackingFile(const absl::Status& status);

// Returns `status` with "context: " put in front of its message, keeping
// its code and payloads.
absl::Status Annotate(const absl::Status& status, absl::string_view context);

}  // namespace qcow2fuse

#define QCOW2FUSE_CONCAT_INNER_(a, b) a##b
#define QCOW2FUSE_CONCAT_(a, b) QCOW2FUSE_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (a Status) is not OK.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    if (absl::Status _st = (expr); !_st.ok()) return _st; \
  } while (0)

// The same, for a coroutine.
#define CO_RETURN_IF_ERROR(expr)                          \
  do {                                                    \
    if (absl::Status _st = (expr); !_st.ok()) co_return _st; \
  } while (0)

// `lhs = value of expr` (a StatusOr), or return its error.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(QCOW2FUSE_CONCAT_(_statusor_, __LINE__), lhs, expr, return)
#define CO_ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(QCOW2FUSE_CONCAT_(_statusor_, __LINE__), lhs, expr, co_return)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr, ret) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) ret std::move(tmp).status();       \
  lhs = std::move(tmp).value()

#endif  // QCOW2FUSE_STATUS_H_
