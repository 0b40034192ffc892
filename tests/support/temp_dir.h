// A scratch directory per test, so tests can run in parallel (ctest -j)
// without sharing any path.
//
//   ASSERT_OK_AND_ASSIGN(TempDir dir, TempDir::Create("interop"));
//   std::string image = dir.Join("disk.qcow2");
//
// The directory is made with mkdtemp under $TMPDIR (or /tmp) and removed
// recursively when the TempDir goes away. Set QCOW2FUSE_KEEP_TEMP=1 to keep
// it for a post-mortem; its path is then printed.
//
// Removal refuses to run while anything is still mounted inside the
// directory: deleting through a mount would at best fail half way and at
// worst delete another file system's contents. Declare a TempDir before the
// guards that mount things inside it, so it is destroyed after them.

#ifndef QCOW2FUSE_TESTS_SUPPORT_TEMP_DIR_H_
#define QCOW2FUSE_TESTS_SUPPORT_TEMP_DIR_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qcow2fuse::test {

class TempDir {
 public:
  // Makes $TMPDIR/qcow2fuse-<label>-XXXXXX. The path is canonical (no
  // symlinks), as /proc/self/mountinfo spells mount points that way.
  static absl::StatusOr<TempDir> Create(absl::string_view label);

  TempDir(TempDir&& other) noexcept;
  TempDir& operator=(TempDir&& other) noexcept;
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir();

  const std::string& path() const { return path_; }

  // path() + "/" + name.
  std::string Join(absl::string_view name) const;

 private:
  explicit TempDir(std::string path) : path_(std::move(path)) {}
  void Remove();

  std::string path_;  // Empty once moved from.
};

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_SUPPORT_TEMP_DIR_H_
