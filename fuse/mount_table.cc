#include "mount_table.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// Symlinks followed at most while resolving one path, as the kernel's own
// limit (MAXSYMLINKS).
constexpr int kMaxSymlinks = 40;

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string Unescape(absl::string_view field) {
  std::string out;
  for (size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size() &&
        std::all_of(field.begin() + i + 1, field.begin() + i + 4, [](char c) { return c >= '0' && c <= '7'; })) {
      out += static_cast<char>((field[i + 1] - '0') * 64 + (field[i + 2] - '0') * 8 + (field[i + 3] - '0'));
      i += 3;
    } else {
      out += field[i];
    }
  }
  return out;
}

// "id parent major:minor root mount_point options [optional...] - type
// source super_options"
std::optional<MountEntry> ParseLine(const std::string& line) {
  std::vector<absl::string_view> fields = absl::StrSplit(line, ' ');
  auto dash = std::find(fields.begin(), fields.end(), "-");
  if (fields.size() < 6 || dash == fields.end() || fields.end() - dash < 4) return std::nullopt;
  std::vector<absl::string_view> dev = absl::StrSplit(fields[2], ':');
  MountEntry entry;
  if (dev.size() != 2 || !absl::SimpleAtoi(dev[0], &entry.dev_major) ||
      !absl::SimpleAtoi(dev[1], &entry.dev_minor)) {
    return std::nullopt;
  }
  entry.mount_point = Unescape(fields[4]);
  entry.fs_type = Unescape(dash[1]);
  entry.source = Unescape(dash[2]);
  entry.super_options = Unescape(dash[3]);
  return entry;
}

std::string Join(const std::string& dir, const std::string& name) {
  return dir == "/" ? "/" + name : dir + "/" + name;
}

}  // namespace

std::optional<std::string> MountEntry::SuperOption(const std::string& key) const {
  for (absl::string_view option : absl::StrSplit(super_options, ',')) {
    std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(option, absl::MaxSplits('=', 1));
    if (kv.first == key) return std::string(kv.second);
  }
  return std::nullopt;
}

absl::StatusOr<std::vector<MountEntry>> ReadMountTable() {
  std::ifstream in("/proc/self/mountinfo");
  if (!in) return ErrnoStatus(errno, "cannot read /proc/self/mountinfo");
  std::vector<MountEntry> entries;
  std::string line;
  while (std::getline(in, line)) {
    if (std::optional<MountEntry> entry = ParseLine(line)) entries.push_back(*std::move(entry));
  }
  return entries;
}

absl::StatusOr<std::optional<MountEntry>> FindMount(const std::string& path) {
  absl::StatusOr<std::vector<MountEntry>> table = ReadMountTable();
  if (!table.ok()) return table.status();
  std::optional<MountEntry> found;
  // Mounts stacked on one path are listed in mount order: the last is on top.
  for (MountEntry& entry : *table) {
    if (entry.mount_point == path) found = std::move(entry);
  }
  return found;
}

absl::StatusOr<MountEntry> FindViewMount(const std::string& path) {
  absl::StatusOr<std::optional<MountEntry>> mount = FindMount(path);
  if (!mount.ok()) return mount.status();
  if (!mount->has_value() || (*mount)->fs_type != kViewFsType) {
    return absl::NotFoundError(absl::StrFormat("%s is not a qcow2fuse mount", path));
  }
  return **std::move(mount);
}

absl::StatusOr<std::string> CanonicalMountPath(const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError("empty path");
  std::string current = path;
  for (int links = 0; links <= kMaxSymlinks; ++links) {
    if (current[0] != '/') {
      char cwd[PATH_MAX];
      if (getcwd(cwd, sizeof cwd) == nullptr) return ErrnoStatus(errno, "cannot get the working directory");
      current = Join(cwd, current);
    }
    while (current.size() > 1 && current.back() == '/') current.pop_back();
    const size_t slash = current.rfind('/');
    const std::string dir = slash == 0 ? "/" : current.substr(0, slash);
    const std::string name = current.substr(slash + 1);
    if (name.empty() || name == "." || name == "..") {
      // A directory, never a view: realpath() may look at it.
      char resolved[PATH_MAX];
      if (realpath(current.c_str(), resolved) == nullptr) {
        return ErrnoStatus(errno, absl::StrFormat("cannot resolve %s", path));
      }
      return std::string(resolved);
    }
    char resolved_dir[PATH_MAX];
    if (realpath(dir.c_str(), resolved_dir) == nullptr) {
      return ErrnoStatus(errno, absl::StrFormat("cannot resolve the directory %s of %s", dir, path));
    }
    const std::string candidate = Join(resolved_dir, name);
    // readlink() of a mount point sends its daemon nothing: the kernel
    // answers EINVAL for a file that is not a symlink by itself.
    char target[PATH_MAX];
    const ssize_t n = readlink(candidate.c_str(), target, sizeof target - 1);
    if (n < 0) return candidate;  // not a symlink (or missing: fine too)
    target[n] = '\0';
    current = target[0] == '/' ? std::string(target) : Join(resolved_dir, target);
  }
  return ErrnoStatus(ELOOP, absl::StrFormat("cannot resolve %s", path));
}

}  // namespace qcow2fuse
