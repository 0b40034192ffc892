// Overlays made at mount time: -o overlay=NEW and -o volatile.
//
// Both create a new, empty qcow2 image whose backing file is IMAGE (its
// absolute path, format qcow2) with IMAGE's disk size and cluster size, and
// the mount then serves that image read-write. IMAGE is opened only as a
// backing file, read-only and with QEMU's shared read lock, so it may be
// mounted read-only elsewhere at the same time and is never changed.
//
// overlay=NEW: NEW must not exist. It is written in full as an unnamed file
// in NEW's directory and only then linked under its name, so a crash never
// leaves a partial image called NEW. It stays after unmount: a qcow2 image
// like any other (`qemu-img commit` merges it into IMAGE). A mount that
// fails after creating it removes it again.
//
// volatile: the overlay is an unnamed file in $TMPDIR, else /var/tmp, open
// only through the descriptor this process holds: nothing of it is left
// on disk when the daemon exits, however it exits.

#ifndef QCOW2FUSE_FUSE_OVERLAY_H_
#define QCOW2FUSE_FUSE_OVERLAY_H_

#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "options.h"

namespace qcow2fuse {

// A made overlay: the path to open it by, and, for a volatile one, the
// descriptor that keeps it (closed by the destructor).
class Overlay {
 public:
  // Creates the overlay `options` ask for (overlay= or volatile) over
  // options.image. Errors are one line naming the file.
  static absl::StatusOr<Overlay> Make(const MountOptions& options);
  // An overlay file by its name; an unnamed one kept by `fd` (taken over).
  static Overlay Named(std::string path);
  static Overlay Unnamed(int fd);

  Overlay(Overlay&& other) noexcept;
  Overlay& operator=(Overlay&&) = delete;
  ~Overlay();

  // A named overlay is removed again when this is destroyed, unless Keep()
  // was called: a mount that fails after making it leaves nothing behind.
  void Keep() { keep_ = true; }

  // What Image::Open should open: NEW, or /proc/self/fd/N of the unnamed
  // volatile file.
  const std::string& path() const { return path_; }

 private:
  Overlay(std::string path, int keep_fd) : path_(std::move(path)), keep_fd_(keep_fd) {}
  std::string path_;
  int keep_fd_ = -1;
  bool keep_ = false;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_OVERLAY_H_
