#include "io/image_lock.h"

#include <errno.h>
#include <fcntl.h>

#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// Offsets of the two byte ranges (see image_lock.h).
constexpr off_t kHoldsPermBase = 100;
constexpr off_t kRefusesShareBase = 200;

// QEMU's permission bits, by bit number.
enum Perm : int {
  kConsistentRead = 0,
  kWrite = 1,
  kWriteUnchanged = 2,
  kResize = 3,
  kNumPerms = 4,
};

constexpr unsigned Bit(Perm p) { return 1u << p; }
constexpr unsigned kAllPerms = (1u << kNumPerms) - 1;

struct PermNames {
  const char* qemu;        // as QEMU prints it in its lock errors
  const char* holding;     // "another process has it open for ..."
  const char* refusing;    // "... and does not share ..."
};

constexpr PermNames kPermNames[kNumPerms] = {
    {"consistent read", "reading", "consistent reads"},
    {"write", "writing", "write access"},
    {"write unchanged", "unchanging writes", "unchanging writes"},
    {"resize", "resizing", "resizing"},
};

// The permissions a mode takes and the ones it lets others have, as QEMU
// 7.2 requests them on a qcow2 image's file for the equivalent open.
struct PermSet {
  unsigned perm;
  unsigned shared;
};

PermSet PermsFor(LockMode mode) {
  constexpr unsigned kShared = Bit(kConsistentRead) | Bit(kWriteUnchanged);
  switch (mode) {
    case LockMode::kReadOnly:
      return {Bit(kConsistentRead), kShared};
    case LockMode::kReadWrite:
      return {Bit(kConsistentRead) | Bit(kWrite) | Bit(kResize), kShared};
    case LockMode::kDataFileReadOnly:
      return {Bit(kConsistentRead), kShared | Bit(kWrite)};
    case LockMode::kDataFileReadWrite:
      return {Bit(kConsistentRead) | Bit(kWrite) | Bit(kResize), kShared | Bit(kWrite)};
  }
  return {0, kAllPerms};
}

// Whether holders of `set` keep a lock on `byte` (one of the eight).
bool LocksByte(PermSet set, off_t byte) {
  if (byte < kRefusesShareBase) return (set.perm >> (byte - kHoldsPermBase)) & 1;
  return !((set.shared >> (byte - kRefusesShareBase)) & 1);
}

// F_OFD_SETLK of `type` (F_RDLCK or F_UNLCK) on one byte. Returns 0 or errno.
int SetByte(int fd, off_t byte, short type) {
  struct flock fl = {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  while (fcntl(fd, F_OFD_SETLK, &fl) != 0) {
    if (errno != EINTR) return errno;
  }
  return 0;
}

// Whether another open file description holds any lock on `byte`: tests
// for an exclusive lock, which any lock but our own would block.
absl::StatusOr<bool> ByteHeldByOthers(int fd, off_t byte, absl::string_view image) {
  struct flock fl = {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  fl.l_pid = 0;  // must be 0 for F_OFD_GETLK
  while (fcntl(fd, F_OFD_GETLK, &fl) != 0) {
    if (errno != EINTR) {
      return ErrnoStatus(errno, absl::StrFormat("test QEMU lock byte %d of %s", byte, image));
    }
  }
  return fl.l_type != F_UNLCK;
}

// `status` with the errno payload of ErrnoStatus(error_number).
absl::Status WithErrno(absl::Status status, int error_number) {
  ErrnoStatus(error_number, "").ForEachPayload(
      [&](absl::string_view url, const absl::Cord& payload) { status.SetPayload(url, payload); });
  return status;
}

absl::Status InUse(absl::string_view image, absl::string_view what) {
  return WithErrno(absl::FailedPreconditionError(absl::StrCat(image, " is in use: ", what)),
                   EAGAIN);
}

// Releases all eight QEMU lock bytes; best effort (unlocking cannot
// conflict), returns the first error.
absl::Status ReleaseAll(int fd) {
  absl::Status first;
  for (int i = 0; i < kNumPerms; ++i) {
    for (off_t base : {kHoldsPermBase, kRefusesShareBase}) {
      if (int err = SetByte(fd, base + i, F_UNLCK); err != 0 && first.ok()) {
        first = ErrnoStatus(err, absl::StrFormat("unlock QEMU lock byte %d", base + i));
      }
    }
  }
  return first;
}

// Locks the bytes of `set` (leaving any others alone), then checks for
// conflicts as QEMU does: first "refuses to share" bytes of the permissions
// we want, then "holds" bytes of the permissions we do not share.
absl::Status LockAndCheck(int fd, PermSet set, absl::string_view image) {
  for (int i = 0; i < kNumPerms; ++i) {
    for (off_t byte : {kHoldsPermBase + i, kRefusesShareBase + i}) {
      if (!LocksByte(set, byte)) continue;
      int err = SetByte(fd, byte, F_RDLCK);
      if (err == EAGAIN || err == EACCES) {
        // Not something QEMU does: somebody holds an exclusive lock there.
        return InUse(image, absl::StrFormat(
                                "another process holds an exclusive lock on QEMU lock byte %d",
                                byte));
      }
      if (err != 0) {
        return ErrnoStatus(err, absl::StrFormat("lock QEMU lock byte %d of %s", byte, image));
      }
    }
  }
  for (int i = 0; i < kNumPerms; ++i) {
    if (!((set.perm >> i) & 1)) continue;
    const off_t byte = kRefusesShareBase + i;
    ASSIGN_OR_RETURN(bool held, ByteHeldByOthers(fd, byte, image));
    if (held) {
      return InUse(image,
                   absl::StrFormat("another process has it open and does not share %s "
                                   "(QEMU lock byte %d; QEMU says: Failed to get \"%s\" lock)",
                                   kPermNames[i].refusing, byte, kPermNames[i].qemu));
    }
  }
  for (int i = 0; i < kNumPerms; ++i) {
    if ((set.shared >> i) & 1) continue;
    const off_t byte = kHoldsPermBase + i;
    ASSIGN_OR_RETURN(bool held, ByteHeldByOthers(fd, byte, image));
    if (held) {
      return InUse(image,
                   absl::StrFormat("another process has it open for %s "
                                   "(QEMU lock byte %d; QEMU says: Failed to get shared \"%s\" "
                                   "lock)",
                                   kPermNames[i].holding, byte, kPermNames[i].qemu));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LockImage(int fd, LockMode mode, absl::string_view image_name_for_messages) {
  const PermSet set = PermsFor(mode);
  if (absl::Status status = LockAndCheck(fd, set, image_name_for_messages); !status.ok()) {
    ReleaseAll(fd).IgnoreError();  // the error that matters is `status`
    return status;
  }
  // Drop bytes a previous mode held that this one does not (a downgrade).
  for (int i = 0; i < kNumPerms; ++i) {
    for (off_t byte : {kHoldsPermBase + i, kRefusesShareBase + i}) {
      if (LocksByte(set, byte)) continue;
      if (int err = SetByte(fd, byte, F_UNLCK); err != 0) {
        absl::Status status = ErrnoStatus(
            err, absl::StrFormat("unlock QEMU lock byte %d of %s", byte, image_name_for_messages));
        ReleaseAll(fd).IgnoreError();
        return status;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status UnlockImage(int fd) { return ReleaseAll(fd); }

}  // namespace qcow2fuse
