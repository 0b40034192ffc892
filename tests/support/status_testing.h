// gtest glue for absl::Status and absl::StatusOr.
//
// Debian 12's abseil ships no status matchers, so these few macros stand in:
//
//   ASSERT_OK(RunChecked({"qemu-img", "info", path}));
//   ASSERT_OK_AND_ASSIGN(std::string out, RunChecked({"uname", "-r"}));
//   EXPECT_OK(CompareFiles(view, raw));
//
// A failure prints the whole status message, which the helpers in this
// directory fill with the command line, stderr, offsets, and so on.

#ifndef QCOW2FUSE_TESTS_SUPPORT_STATUS_TESTING_H_
#define QCOW2FUSE_TESTS_SUPPORT_STATUS_TESTING_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace qcow2fuse::test {

inline ::testing::AssertionResult StatusIsOk(const absl::Status& status) {
  if (status.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << status.ToString();
}

template <typename T>
::testing::AssertionResult StatusIsOk(const absl::StatusOr<T>& status_or) {
  return StatusIsOk(status_or.status());
}

}  // namespace qcow2fuse::test

#define ASSERT_OK(expr) ASSERT_TRUE(::qcow2fuse::test::StatusIsOk(expr))
#define EXPECT_OK(expr) EXPECT_TRUE(::qcow2fuse::test::StatusIsOk(expr))

#define QCOW2FUSE_TEST_CONCAT_INNER_(a, b) a##b
#define QCOW2FUSE_TEST_CONCAT_(a, b) QCOW2FUSE_TEST_CONCAT_INNER_(a, b)

// `lhs = value of expr` (a StatusOr), or a fatal test failure showing the
// error. `lhs` may be a declaration.
#define ASSERT_OK_AND_ASSIGN(lhs, expr)                                     \
  ASSERT_OK_AND_ASSIGN_IMPL_(QCOW2FUSE_TEST_CONCAT_(_status_or_, __LINE__), \
                             lhs, expr)
#define ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  ASSERT_OK(tmp.status());                         \
  lhs = std::move(tmp).value()

#endif  // QCOW2FUSE_TESTS_SUPPORT_STATUS_TESTING_H_
