// The files and directories a mount shows, by inode number.
//
// Single-file mode: the root inode is the one file, the whole disk.
// Directory mode (the mountpoint is a directory):
//
//   disk.raw             the whole disk, writable when the mount is
//   partN.raw            partition N of the disk's MBR or GPT, numbered as
//                        Linux numbers it; exactly its byte range
//   snapshots/NAME.raw   each internal snapshot, read-only (ID.raw when the
//                        name is empty, shared or not a file name)
//
// Every file is a View: a byte window onto an Image. A partition is a
// window onto the disk; a snapshot is a whole disk read through another L1
// table (Image::OpenSnapshot), opened at the first open of its file. The
// table is built once, at mount time: a partition table changed while
// mounted shows at the next mount, as a loop device shows it only once
// re-read.

#ifndef QCOW2FUSE_FUSE_VIEW_TABLE_H_
#define QCOW2FUSE_FUSE_VIEW_TABLE_H_

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <atomic>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"
#include "sequential_reads.h"

namespace qcow2fuse {

// One file of the mount.
class View {
 public:
  // The whole disk: its size is the disk's, and truncate and fallocate may
  // change it.
  static std::unique_ptr<View> WholeDisk(Image* disk);
  // `length` bytes of the disk from `start`: a file of fixed size; writes
  // past its end fail with ENOSPC and never touch the disk beyond it.
  static std::unique_ptr<View> Window(Image* disk, uint64_t start, uint64_t length);
  // An internal snapshot of `disk`, read-only, opened at the first open of
  // its file.
  static std::unique_ptr<View> Snapshot(Image* disk, SnapshotInfo info);

  // The image the view reads: the disk, or the snapshot, opened now if it
  // is not yet (an error if it cannot be: one the image's tables cause is
  // given again at every later call, any other is tried again).
  absl::StatusOr<Image*> image();
  // The same without opening anything: null for a snapshot not opened yet.
  Image* opened_image();
  // Where the view starts on image().
  uint64_t start() const { return start_; }
  // The view's size now. A window shrinks with a disk truncated under it.
  uint64_t size();
  bool resizable() const { return kind_ == Kind::kWholeDisk; }
  // Whether writes are allowed: a window or the disk of a writable mount.
  bool writable() const { return kind_ != Kind::kSnapshot && !disk_->read_only(); }
  // Whether the view shows bytes of the disk (not a snapshot's).
  bool on_disk() const { return kind_ != Kind::kSnapshot; }

  // Bytes of the view that hold data, for st_blocks. The whole disk and a
  // snapshot take the image's exact count; a window walks its extents again
  // only once data came or went on the disk. A snapshot whose file was
  // never opened counts as all data: a look at the directory opens nothing,
  // and a count of 0 would tell tools that the file holds no data at all
  // (GNU tar --sparse then archives zeros without reading it).
  Task<absl::StatusOr<uint64_t>> AllocatedBytes();

  // The view's readers, told sequential or not.
  SequentialReads& sequential_reads() { return sequential_reads_; }

 private:
  enum class Kind { kWholeDisk, kWindow, kSnapshot };
  View(Kind kind, Image* disk, uint64_t start, uint64_t length) : kind_(kind), disk_(disk), start_(start), length_(length) {}

  const Kind kind_;
  Image* const disk_;
  const uint64_t start_;
  const uint64_t length_;  // kWindow: the fixed length; kSnapshot: its disk size

  SequentialReads sequential_reads_;

  // kSnapshot.
  std::optional<SnapshotInfo> snapshot_;
  std::mutex open_mu_;
  // Under open_mu_: the snapshot's image, or why it could not be opened.
  absl::StatusOr<std::unique_ptr<Image>> snapshot_image_ = absl::UnavailableError("not opened yet");

  // kWindow: the last count of AllocatedBytes and the disk's state it was
  // made in, under count_mu_.
  struct CountKey {
    uint64_t disk_data;
    uint64_t bytes_written;
    uint64_t size;
    bool operator==(const CountKey&) const = default;
  };
  std::mutex count_mu_;
  std::optional<uint64_t> counted_;
  CountKey counted_key_{};
  bool counting_ = false;
};

struct Node {
  fuse_ino_t ino = 0;
  fuse_ino_t parent = 0;
  std::string name;
  std::unique_ptr<View> view;       // null for a directory
  std::vector<fuse_ino_t> children;  // a directory's, in listing order
  absl::flat_hash_map<std::string, fuse_ino_t> by_name;  // the same, by name
  // Whether the kernel has looked the file up, and so may cache its pages
  // (the root always). Never cleared: inodes are never reused.
  std::atomic<bool> looked_up{false};
  bool is_directory() const { return view == nullptr; }
};

class ViewTable {
 public:
  // The single-file mode: the root is the whole disk.
  static ViewTable SingleFile(Image* disk);
  // The directory mode, for `disk`. What cannot be shown (a damaged
  // partition table, an undecodable snapshot table) leaves those files out
  // and adds a sentence to `warnings`, for the log.
  static ViewTable Directory(Image* disk, std::vector<std::string>& warnings);

  ViewTable(ViewTable&&) = default;
  ViewTable& operator=(ViewTable&&) = default;

  // The node with inode `ino`, or null.
  Node* Find(fuse_ino_t ino);
  // The child `name` of directory `parent`, or null.
  Node* Lookup(fuse_ino_t parent, std::string_view name);
  // Subdirectories of `dir`, for its link count.
  int SubdirectoryCount(const Node& dir) const;

  // Calls `fn(ino, offset, length)` for every file other than `except`
  // that shows bytes of [start, end) of the disk and that the kernel has
  // looked up, with the range in that file's own offsets: the files whose
  // cached pages a change there makes stale (the disk and a partition
  // overlap; snapshots never change).
  void ForEachOverlap(uint64_t start, uint64_t end, fuse_ino_t except,
                      const std::function<void(fuse_ino_t, uint64_t, uint64_t)>& fn);

 private:
  ViewTable() = default;
  Node& Add(fuse_ino_t parent, std::string name, std::unique_ptr<View> view);

  // By inode number; nodes_[0] is the root (FUSE_ROOT_ID).
  std::vector<std::unique_ptr<Node>> nodes_;
  std::vector<Node*> disk_files_;  // the files that are windows onto the disk
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_FUSE_VIEW_TABLE_H_
