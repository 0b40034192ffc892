// QEMU-compatible image locking, so that qcow2fuse and QEMU processes
// (a running VM, qemu-img, qemu-io, qemu-storage-daemon) keep out of each
// other's way the same way two QEMU processes do.
//
// The protocol (QEMU's file-posix driver, unchanged since QEMU 2.10) uses
// open file description locks (fcntl F_OFD_SETLK / F_OFD_GETLK) on single
// bytes of the image file itself; the bytes are never read or written, a
// lock past the end of the file is fine. All locks taken are shared (read)
// locks, so any number of holders can lock the same byte; conflicts are
// found by testing a byte for an exclusive lock:
//
//   byte 100 + i  "holds permission i"
//   byte 200 + i  "does not let others have permission i"
//
// with QEMU's permission bits (include/block/block-common.h, BLK_PERM_*):
// 0 consistent read, 1 write, 2 write unchanged, 3 resize. (QEMU 6.1 and
// earlier also had bit 4, graph-mod, which nobody here takes or refuses;
// byte 0 belongs to libvirt's virtlockd and is not touched.)
//
// A holder first locks its bytes and then checks that no *other* open file
// description holds a conflicting byte: 200 + i for each permission i it
// wants, 100 + i for each permission i it does not share. Locking before
// checking means two processes starting at the same moment cannot both
// miss each other (at worst both fail).
//
// What QEMU 7.2 takes for a qcow2 image (observed with /proc/locks and
// strace of qemu-io / qemu-img):
//
//   read-write open (qemu-io, a VM's disk)   locks 100 101 103 201 203
//   read-only open (qemu-io -r, qemu-img check/convert source, and every
//     backing file, even under a writer)     locks 100 201 203
//   qemu-img info without -U                 locks 201 203 only (it does
//     no I/O, so it takes no consistent-read permission)
//   anything with -U / force-share           no locks, no checks
//
// that is, QEMU readers and writers both refuse to share write and resize:
// while a VM runs, qemu-img info/check without -U fail with
// 'Failed to get shared "write" lock', and while a qemu-img check runs, a
// VM cannot start.
//
// On the external data file of a qcow2 image QEMU takes the same
// permissions but shares write too (qemu-io and qemu-storage-daemon alike):
//
//   read-write open                          locks 100 101 103 203
//   read-only open, and the data file of a
//     backing image                          locks 100 203
//
// LockMode mirrors the read-write and read-only rows of both tables
// exactly, so qcow2fuse behaves like the equivalent qemu-io open.

#ifndef QCOW2FUSE_IO_IMAGE_LOCK_H_
#define QCOW2FUSE_IO_IMAGE_LOCK_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace qcow2fuse {

enum class LockMode {
  // As QEMU's read-only open: permission consistent read; shares consistent
  // read and write unchanged, refuses write and resize (bytes 100 201 203).
  // Coexists with other read-only holders (QEMU's or ours); refused while
  // anyone writes or may resize the image, or refuses consistent reads.
  kReadOnly,
  // As QEMU's read-write open: permissions consistent read, write and
  // resize (a qcow2 writer grows the file); shares consistent read and
  // write unchanged (bytes 100 101 103 201 203). Refused while any other
  // process has the image open through QEMU's block layer without
  // force-share, reader or writer.
  kReadWrite,
  // An external data file, as QEMU locks the data file of a qcow2 image
  // (observed with qemu-io and qemu-storage-daemon 7.2): the permissions of
  // the image's open, but sharing write, since the qcow2 image is what
  // guards the data. Read-only: bytes 100 203; read-write: 100 101 103 203.
  // So a data file in use by another image's QEMU writer (which holds
  // resize) refuses both, and a data file held by one of these refuses a
  // QEMU writer of another image naming it (it wants to resize).
  kDataFileReadOnly,
  kDataFileReadWrite,
};

// Takes QEMU's locks for `mode` on the open file description of `fd` (the
// image file, opened for reading by the caller), after checking that no
// other holder conflicts. `image_name_for_messages` names the image in
// errors.
//
// Errors:
//  - FailedPreconditionError with errno payload EAGAIN (see StatusErrno)
//    when the image is in use by another process, e.g.
//      "disk.qcow2 is in use: another process has it open for writing
//       (QEMU lock byte 101; QEMU says: Failed to get shared "write" lock)"
//    naming the permission and byte that conflicted.
//  - An ErrnoStatus when fcntl fails otherwise (EBADF for an fd not open
//    for reading, ENOLCK on a file system without lock support, ...).
// On any error, every QEMU lock byte (100-103, 200-203) on `fd`'s open
// file description is released.
//
// Calling it again on the same fd switches to the new mode (the bytes of
// the old mode that the new one does not use are released), like QEMU's
// permission update on reopen; a refused switch leaves no locks (above).
//
// Lifetime: the locks belong to the open file description, not to the
// process or the fd number. They last until UnlockImage() or until the
// last descriptor referring to that description is closed (dup()ed and
// fork()-inherited copies keep them alive). The caller must therefore keep
// `fd` open for as long as the image is mounted; closing it silently lets
// QEMU in. A second open() of the same file, even in this process, is
// another description and conflicts with this one like another process.
//
// To coexist with a running VM the way `qemu-img -U` does (force share),
// do not call this at all: QEMU's force-share takes no locks and checks
// none. Backing files are locked by QEMU with the read-only set even under
// a writer; lock them with kReadOnly.
absl::Status LockImage(int fd, LockMode mode,
                       absl::string_view image_name_for_messages);

// Releases every QEMU lock byte held through `fd`'s open file description
// (closing the last descriptor of it does the same).
absl::Status UnlockImage(int fd);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_IO_IMAGE_LOCK_H_
