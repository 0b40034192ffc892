#include "support/temp_dir.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <filesystem>
#include <iostream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "support/mount.h"

namespace qcow2fuse::test {
namespace {

std::string TempRoot() {
  const char* tmpdir = getenv("TMPDIR");
  return (tmpdir != nullptr && *tmpdir != '\0') ? tmpdir : "/tmp";
}

bool KeepRequested() {
  const char* keep = getenv("QCOW2FUSE_KEEP_TEMP");
  return keep != nullptr && *keep != '\0' && std::string(keep) != "0";
}

// Mount points at or below `dir`, which removal must not walk into.
std::vector<std::string> MountsUnder(const std::string& dir) {
  std::vector<std::string> mounts;
  absl::StatusOr<std::vector<MountEntry>> entries = ReadMountInfo();
  if (!entries.ok()) return mounts;
  for (const MountEntry& entry : *entries) {
    if (entry.mount_point == dir ||
        absl::StartsWith(entry.mount_point, dir + "/")) {
      mounts.push_back(entry.mount_point);
    }
  }
  return mounts;
}

}  // namespace

absl::StatusOr<TempDir> TempDir::Create(absl::string_view label) {
  std::string pattern =
      absl::StrCat(TempRoot(), "/qcow2fuse-", label, "-XXXXXX");
  if (mkdtemp(pattern.data()) == nullptr) {
    return absl::InternalError(
        absl::StrCat("mkdtemp ", pattern, ": ", strerror(errno)));
  }
  std::error_code error;
  std::filesystem::path canonical = std::filesystem::canonical(pattern, error);
  return TempDir(error ? pattern : canonical.string());
}

TempDir::TempDir(TempDir&& other) noexcept : path_(std::move(other.path_)) {
  other.path_.clear();
}

TempDir& TempDir::operator=(TempDir&& other) noexcept {
  if (this != &other) {
    Remove();
    path_ = std::move(other.path_);
    other.path_.clear();
  }
  return *this;
}

TempDir::~TempDir() { Remove(); }

std::string TempDir::Join(absl::string_view name) const {
  return absl::StrCat(path_, "/", name);
}

void TempDir::Remove() {
  if (path_.empty()) return;
  if (KeepRequested()) {
    std::cerr << "QCOW2FUSE_KEEP_TEMP: keeping " << path_ << "\n";
  } else if (std::vector<std::string> mounts = MountsUnder(path_);
             !mounts.empty()) {
    std::cerr << "TempDir: not removing " << path_
              << ", still mounted: " << mounts.front() << "\n";
  } else {
    std::error_code error;
    std::filesystem::remove_all(path_, error);
    if (error) {
      std::cerr << "TempDir: removing " << path_ << ": " << error.message()
                << "\n";
    }
  }
  path_.clear();
}

}  // namespace qcow2fuse::test
