#include "overlay.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {
namespace {

// What the overlay of IMAGE must be: IMAGE's disk size and cluster size,
// IMAGE as backing file. IMAGE is opened as the mount will open it
// (read-only, the whole chain), so a bad IMAGE is refused before anything
// is created.
absl::StatusOr<NewImageOptions> OverlayOf(const MountOptions& options) {
  ImageOptions read_only = options.image_options;
  read_only.read_only = true;
  absl::StatusOr<std::unique_ptr<Image>> base = SyncWait(Image::Open(options.image, read_only));
  if (!base.ok()) return base.status();
  NewImageOptions overlay;
  overlay.size = (*base)->virtual_size();
  overlay.cluster_size = (*base)->cluster_size();
  overlay.backing_file = options.image;
  overlay.backing_format = "qcow2";
  return overlay;
}

std::string DirectoryOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Whether open(O_TMPFILE) failed because the file system cannot make
// unnamed files (rather than for a reason a named file would share).
bool NoTmpfileSupport(int error) { return error == EOPNOTSUPP || error == EISDIR || error == EINVAL; }

absl::StatusOr<Overlay> MakeNamed(const std::string& target, const NewImageOptions& spec) {
  struct stat st;
  if (lstat(target.c_str(), &st) == 0) {
    return absl::AlreadyExistsError(absl::StrFormat(
        "cannot create the overlay %s: it exists (overlay= makes a new image; to mount that one, give it as IMAGE)",
        target));
  }
  // Written whole as an unnamed file, then linked under its name: a crash
  // never leaves a partial image called `target`.
  int fd = open(DirectoryOf(target).c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
  const bool unnamed = fd >= 0;
  if (!unnamed) {
    if (!NoTmpfileSupport(errno)) return ErrnoStatus(errno, absl::StrFormat("cannot create the overlay %s", target));
    fd = open(target.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) return ErrnoStatus(errno, absl::StrFormat("cannot create the overlay %s", target));
  }
  absl::Status made = Image::Create(fd, target, spec);
  if (made.ok() && unnamed) {
    // linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; the /proc link
    // does not.
    const std::string self = absl::StrCat("/proc/self/fd/", fd);
    if (linkat(AT_FDCWD, self.c_str(), AT_FDCWD, target.c_str(), AT_SYMLINK_FOLLOW) != 0) {
      made = ErrnoStatus(errno, absl::StrFormat("cannot create the overlay %s", target));
    }
  }
  close(fd);
  if (!made.ok()) {
    if (!unnamed) unlink(target.c_str());
    return made;
  }
  // The new name is durable with its directory.
  const int dir = open(DirectoryOf(target).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    fsync(dir);
    close(dir);
  }
  return Overlay::Named(target);
}

absl::StatusOr<Overlay> MakeVolatile(const NewImageOptions& spec) {
  const char* tmpdir = getenv("TMPDIR");
  const std::string dir = tmpdir != nullptr && *tmpdir != '\0' ? tmpdir : "/var/tmp";
  const std::string what = absl::StrFormat("the volatile overlay in %s", dir);
  int fd = open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (!NoTmpfileSupport(errno)) return ErrnoStatus(errno, "cannot create " + what);
    // A named file, unlinked at once: only the descriptor keeps it.
    std::string name = dir + "/qcow2fuse-volatile-XXXXXX";
    fd = mkostemp(name.data(), O_CLOEXEC);
    if (fd < 0) return ErrnoStatus(errno, "cannot create " + what);
    unlink(name.c_str());
  }
  absl::Status made = Image::Create(fd, what, spec);
  if (!made.ok()) {
    close(fd);
    return made;
  }
  return Overlay::Unnamed(fd);
}

}  // namespace

absl::StatusOr<Overlay> Overlay::Make(const MountOptions& options) {
  absl::StatusOr<NewImageOptions> spec = OverlayOf(options);
  if (!spec.ok()) return spec.status();
  if (options.volatile_overlay) return MakeVolatile(*spec);
  return MakeNamed(options.overlay, *spec);
}

Overlay Overlay::Named(std::string path) { return Overlay(std::move(path), -1); }

Overlay Overlay::Unnamed(int fd) { return Overlay(absl::StrCat("/proc/self/fd/", fd), fd); }

Overlay::Overlay(Overlay&& other) noexcept
    : path_(std::move(other.path_)),
      keep_fd_(std::exchange(other.keep_fd_, -1)),
      keep_(std::exchange(other.keep_, true)) {}

Overlay::~Overlay() {
  if (keep_fd_ >= 0) {
    close(keep_fd_);
  } else if (!keep_) {
    unlink(path_.c_str());
  }
}

}  // namespace qcow2fuse
