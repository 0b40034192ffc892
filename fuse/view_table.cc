#include "view_table.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "qcow2fuse/partition_table.h"

namespace qcow2fuse {

std::unique_ptr<View> View::WholeDisk(Image* disk) {
  return std::unique_ptr<View>(new View(Kind::kWholeDisk, disk, 0, 0));
}

std::unique_ptr<View> View::Window(Image* disk, uint64_t start, uint64_t length) {
  return std::unique_ptr<View>(new View(Kind::kWindow, disk, start, length));
}

std::unique_ptr<View> View::Snapshot(Image* disk, SnapshotInfo info) {
  std::unique_ptr<View> view(new View(Kind::kSnapshot, disk, 0, info.disk_size));
  view->snapshot_ = std::move(info);
  return view;
}

absl::StatusOr<Image*> View::image() {
  if (kind_ != Kind::kSnapshot) return disk_;
  std::lock_guard lock(open_mu_);
  if (snapshot_image_.ok() && *snapshot_image_ != nullptr) return snapshot_image_->get();
  // A snapshot the image's tables rule out stays refused; anything else (an
  // I/O error, the memory budget) is tried again at the next use.
  const absl::StatusCode code = snapshot_image_.status().code();
  if (code == absl::StatusCode::kDataLoss || code == absl::StatusCode::kFailedPrecondition ||
      code == absl::StatusCode::kNotFound) {
    return snapshot_image_.status();
  }
  // Reads its L1 table and starts counting its data: a short wait at the
  // first open, on this request's thread; others wait on open_mu_.
  snapshot_image_ = SyncWait(disk_->OpenSnapshot(*snapshot_));
  if (!snapshot_image_.ok()) return snapshot_image_.status();
  return snapshot_image_->get();
}

Image* View::opened_image() {
  if (kind_ != Kind::kSnapshot) return disk_;
  std::lock_guard lock(open_mu_);
  return snapshot_image_.ok() ? snapshot_image_->get() : nullptr;
}

uint64_t View::size() {
  switch (kind_) {
    case Kind::kWholeDisk:
      return disk_->virtual_size();
    case Kind::kWindow: {
      const uint64_t disk = disk_->virtual_size();
      return start_ >= disk ? 0 : std::min(length_, disk - start_);
    }
    case Kind::kSnapshot:
      break;
  }
  return length_;
}

Task<absl::StatusOr<uint64_t>> View::AllocatedBytes() {
  if (kind_ == Kind::kSnapshot) {
    Image* image = opened_image();
    if (image == nullptr) co_return size();  // counted once the file is opened
    co_return co_await image->AllocatedBytes();
  }
  if (kind_ == Kind::kWholeDisk) co_return co_await disk_->AllocatedBytes();

  // A window: its count changes only where data comes or goes on the disk,
  // and each of those changes the disk's count or its bytes written. While
  // neither moved, the last count holds; while a walk runs, a stat meanwhile
  // takes the last count, unless that is 0: a file of no blocks reads as one
  // without data (GNU tar --sparse archives zeros), so that stat walks
  // itself rather than say 0 for a window that may have data by now.
  absl::StatusOr<uint64_t> disk_data = co_await disk_->AllocatedBytes();
  if (!disk_data.ok()) co_return disk_data.status();
  const CountKey key{*disk_data, disk_->counters().data_bytes_written, size()};
  {
    std::lock_guard lock(count_mu_);
    if (counted_ && (counted_key_ == key || (counting_ && *counted_ > 0))) co_return *counted_;
    counting_ = true;
  }
  const uint64_t end = start_ + key.size;
  uint64_t data = 0;
  absl::Status status;
  for (uint64_t pos = start_; pos < end;) {
    absl::StatusOr<Extent> e = co_await disk_->BlockStatus(pos, end - pos);
    if (!e.ok()) {
      status = e.status();
      break;
    }
    if (e->kind == ExtentKind::kData) data += e->length;
    pos += e->length;
  }
  std::lock_guard lock(count_mu_);
  counting_ = false;
  if (!status.ok()) co_return status;
  counted_ = data;
  counted_key_ = key;
  co_return data;
}

ViewTable ViewTable::SingleFile(Image* disk) {
  ViewTable table;
  table.Add(0, "", View::WholeDisk(disk));
  return table;
}

namespace {

constexpr size_t kMaxFileNameBytes = 255;  // NAME_MAX

// Whether a snapshot name can be a file name as it is: not empty, no '/',
// no NUL, not "." or "..", and short enough with ".raw" after it.
bool UsableAsFileName(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos && name.size() + 4 <= kMaxFileNameBytes;
}

// The file names of the snapshots, in table order: NAME.raw, or ID.raw
// where the name is empty, shared with another snapshot or no file name;
// where that is taken too, snapshot-INDEX.raw, then with ~N appended
// until it is free. Every name is distinct.
std::vector<std::string> SnapshotFileNames(const std::vector<SnapshotInfo>& snapshots) {
  absl::flat_hash_map<std::string, int> name_uses;
  for (const SnapshotInfo& s : snapshots) ++name_uses[s.name];
  std::vector<std::string> names;
  std::set<std::string> taken;
  for (const SnapshotInfo& s : snapshots) {
    std::string name;
    if (UsableAsFileName(s.name) && name_uses[s.name] == 1 && !taken.contains(s.name + ".raw")) {
      name = s.name + ".raw";
    } else if (UsableAsFileName(s.id) && !taken.contains(s.id + ".raw")) {
      name = s.id + ".raw";
    } else {
      name = absl::StrCat("snapshot-", s.index, ".raw");
      for (int n = 1; taken.contains(name); ++n) name = absl::StrCat("snapshot-", s.index, "~", n, ".raw");
    }
    taken.insert(name);
    names.push_back(std::move(name));
  }
  return names;
}

}  // namespace

ViewTable ViewTable::Directory(Image* disk, std::vector<std::string>& warnings) {
  ViewTable table;
  const fuse_ino_t root = table.Add(0, "", nullptr).ino;
  table.Add(root, "disk.raw", View::WholeDisk(disk));

  // The partitions, read through the engine like any other bytes of the
  // disk (its backing chain included).
  const DiskReader read = [disk](uint64_t offset, std::span<uint8_t> out) {
    return SyncWait(disk->Read(offset, out));
  };
  absl::StatusOr<PartitionTable> partitions = DecodePartitionTable(disk->virtual_size(), read);
  if (!partitions.ok()) {
    warnings.push_back(absl::StrFormat("no partition files: the partition table cannot be used: %s",
                                       partitions.status().message()));
  } else {
    for (const std::string& warning : partitions->warnings) warnings.push_back("partition table: " + warning);
    for (const Partition& p : partitions->partitions) {
      table.Add(root, absl::StrCat("part", p.number, ".raw"), View::Window(disk, p.offset, p.length));
    }
  }

  const fuse_ino_t snapshots_dir = table.Add(root, "snapshots", nullptr).ino;
  absl::StatusOr<std::vector<SnapshotInfo>> snapshots = SyncWait(disk->Snapshots());
  if (!snapshots.ok()) {
    warnings.push_back(absl::StrFormat("no snapshot files: the snapshot table cannot be read: %s",
                                       snapshots.status().message()));
  } else {
    const std::vector<std::string> names = SnapshotFileNames(*snapshots);
    for (size_t i = 0; i < snapshots->size(); ++i) {
      table.Add(snapshots_dir, names[i], View::Snapshot(disk, (*snapshots)[i]));
    }
  }
  return table;
}

Node& ViewTable::Add(fuse_ino_t parent, std::string name, std::unique_ptr<View> view) {
  auto node = std::make_unique<Node>();
  node->ino = FUSE_ROOT_ID + nodes_.size();
  node->parent = parent == 0 ? node->ino : parent;
  node->name = std::move(name);
  node->view = std::move(view);
  if (node->view && node->view->on_disk()) disk_files_.push_back(node.get());
  if (parent == 0) node->looked_up = true;  // the root
  if (parent != 0) {
    Node* dir = Find(parent);
    dir->children.push_back(node->ino);
    dir->by_name[node->name] = node->ino;
  }
  nodes_.push_back(std::move(node));
  return *nodes_.back();
}

Node* ViewTable::Find(fuse_ino_t ino) {
  if (ino < FUSE_ROOT_ID || ino - FUSE_ROOT_ID >= nodes_.size()) return nullptr;
  return nodes_[ino - FUSE_ROOT_ID].get();
}

Node* ViewTable::Lookup(fuse_ino_t parent, std::string_view name) {
  Node* dir = Find(parent);
  if (dir == nullptr || !dir->is_directory()) return nullptr;
  auto it = dir->by_name.find(absl::string_view(name.data(), name.size()));
  return it == dir->by_name.end() ? nullptr : Find(it->second);
}

void ViewTable::ForEachOverlap(uint64_t start, uint64_t end, fuse_ino_t except,
                               const std::function<void(fuse_ino_t, uint64_t, uint64_t)>& fn) {
  for (Node* node : disk_files_) {
    if (node->ino == except || !node->looked_up) continue;
    View& view = *node->view;
    const uint64_t from = std::max(start, view.start());
    const uint64_t to = std::min(end, view.start() + view.size());
    if (from < to) fn(node->ino, from - view.start(), to - from);
  }
}

int ViewTable::SubdirectoryCount(const Node& dir) const {
  int count = 0;
  for (fuse_ino_t child : dir.children) count += nodes_[child - FUSE_ROOT_ID]->is_directory();
  return count;
}

}  // namespace qcow2fuse
