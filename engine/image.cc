#include "qcow2fuse/image.h"

#include <errno.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>

#include "absl/strings/str_format.h"
#include "base/all_zero.h"
#include "base/budget.h"
#include "data/backing.h"
#include "data/qcow2_layer.h"
#include "format/create.h"
#include "format/snapshot.h"
#include "io/block_file.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {

Image::Image(std::unique_ptr<Qcow2Layer> top, ImageOptions options)
    : top_(std::move(top)),
      options_(std::move(options)),
      virtual_size_(DiskSize(*top_)),
      cluster_size_(top_->cluster_size()) {}

Image::~Image() = default;

// QEMU counts a qcow2 disk in 512-byte sectors and ignores a partial last
// sector; the view must show the same disk.
uint64_t Image::DiskSize(const Qcow2Layer& top) { return top.size() / kSectorSize * kSectorSize; }

Task<absl::StatusOr<std::unique_ptr<Image>>> Image::Open(std::string path, ImageOptions options) {
  if (options.force_share && !options.read_only) {
    co_return absl::InvalidArgumentError("force_share is only allowed for read-only opens");
  }
  // One budget for the whole chain: a 64-deep chain of hostile images must
  // not get 64 budgets.
  if (options.budget == nullptr) options.budget = std::make_shared<MemoryBudget>(options.max_metadata_memory);
  absl::StatusOr<std::unique_ptr<Qcow2Layer>> top = co_await OpenChain(path, options);
  if (!top.ok()) co_return top.status();
  co_await (*top)->StartDataCount(/*in_background=*/(*top)->L2TableBytes() > options.sync_count_limit);
  co_return std::unique_ptr<Image>(new Image(std::move(*top), std::move(options)));
}

absl::Status Image::Create(int fd, const std::string& name, const NewImageOptions& options) {
  NewImageSpec spec;
  spec.size = options.size;
  if (!std::has_single_bit(options.cluster_size)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cannot create %s: cluster size %u is not a power of two", name, options.cluster_size));
  }
  spec.cluster_bits = std::countr_zero(options.cluster_size);
  spec.backing_file = options.backing_file;
  spec.backing_format = options.backing_format;
  absl::StatusOr<NewImageLayout> layout = LayOutNewImage(spec);
  if (!layout.ok()) return Annotate(layout.status(), "cannot create " + name);
  const int own_fd = dup(fd);
  if (own_fd < 0) return ErrnoStatus(errno, "cannot create " + name);
  absl::StatusOr<std::unique_ptr<BlockFile>> file = AdoptWritablePosixFile(own_fd, name);
  if (!file.ok()) return Annotate(file.status(), "cannot create " + name);
  // The L1 table is zeros: the file's extent past the head reads so.
  absl::Status status = SyncWait((*file)->Truncate(layout->file_size));
  if (status.ok()) status = SyncWait((*file)->Write(0, layout->head));
  if (status.ok()) status = SyncWait((*file)->Flush());
  if (!status.ok()) return Annotate(status, "cannot create " + name);
  return absl::OkStatus();
}

namespace {
absl::Status CheckRange(const char* what, uint64_t offset, uint64_t length, uint64_t disk) {
  if (offset > disk || length > disk - offset) {
    return absl::OutOfRangeError(absl::StrFormat("%s of %u bytes at %u is outside the disk (%u bytes)",
                                                 what, length, offset, disk));
  }
  return absl::OkStatus();
}
}  // namespace

Task<absl::Status> Image::Read(uint64_t offset, std::span<uint8_t> out) {
  CO_RETURN_IF_ERROR(CheckRange("read", offset, out.size(), virtual_size_));
  co_return co_await top_->Read(offset, out);
}

Task<absl::StatusOr<bool>> Image::SendStored(uint64_t offset, uint64_t length,
                                             absl::FunctionRef<void(int, uint64_t)> send) {
  CO_RETURN_IF_ERROR(CheckRange("read", offset, length, virtual_size_));
  co_return co_await top_->SendStored(offset, length, send);
}

Task<void> Image::WillNeed(uint64_t offset, uint64_t length, uint64_t max_data) {
  if (offset >= virtual_size_) co_return;
  co_await top_->WillNeed(offset, std::min(length, virtual_size_ - offset), max_data);
}

Task<absl::Status> Image::Write(uint64_t offset, std::span<const uint8_t> data) {
  if (options_.read_only) co_return absl::FailedPreconditionError("the image is open read-only");
  CO_RETURN_IF_ERROR(CheckRange("write", offset, data.size(), virtual_size_));
  if (options_.detect_zeroes != DetectZeroes::kOff && IsAllZero(data)) {
    const bool unmap = options_.detect_zeroes == DetectZeroes::kUnmap;
    co_return co_await top_->WriteZeroes(offset, data.size(), unmap);
  }
  co_return co_await top_->Write(offset, data);
}

Task<absl::Status> Image::Discard(uint64_t offset, uint64_t length) {
  if (options_.read_only) co_return absl::FailedPreconditionError("the image is open read-only");
  CO_RETURN_IF_ERROR(CheckRange("discard", offset, length, virtual_size_));
  co_return co_await top_->Discard(offset, length);
}

Task<absl::Status> Image::WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) {
  if (options_.read_only) co_return absl::FailedPreconditionError("the image is open read-only");
  CO_RETURN_IF_ERROR(CheckRange("write-zeroes", offset, length, virtual_size_));
  co_return co_await top_->WriteZeroes(offset, length, may_unmap);
}

Task<absl::Status> Image::Preallocate(uint64_t offset, uint64_t length) {
  if (options_.read_only) co_return absl::FailedPreconditionError("the image is open read-only");
  CO_RETURN_IF_ERROR(CheckRange("preallocation", offset, length, virtual_size_));
  co_return co_await top_->Preallocate(offset, length);
}

ImageCounters Image::counters() const { return top_->counters(); }

Task<absl::StatusOr<std::vector<SnapshotInfo>>> Image::Snapshots() {
  absl::StatusOr<SnapshotTable> table = co_await top_->ReadSnapshotTable();
  if (!table.ok()) co_return table.status();
  std::vector<SnapshotInfo> list;
  for (uint32_t i = 0; i < table->entries.size(); ++i) {
    const SnapshotEntry& e = table->entries[i];
    list.push_back({i, e.id, e.name, (e.has_disk_size ? e.disk_size : top_->size()) / kSectorSize * kSectorSize});
  }
  co_return list;
}

Task<absl::StatusOr<std::unique_ptr<Image>>> Image::OpenSnapshot(const SnapshotInfo& snapshot) {
  absl::StatusOr<SnapshotTable> table = co_await top_->ReadSnapshotTable();
  if (!table.ok()) co_return table.status();
  const uint32_t index = snapshot.index;
  if (index >= table->entries.size() || table->entries[index].id != snapshot.id) {
    co_return absl::NotFoundError(absl::StrFormat("there is no snapshot with ID %s at %u (the image has %u)",
                                                  snapshot.id, index, table->entries.size()));
  }
  absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer =
      co_await top_->OpenSnapshot(table->entries[index], snapshot.disk_size);
  if (!layer.ok()) co_return layer.status();
  co_await (*layer)->StartDataCount(/*in_background=*/(*layer)->L2TableBytes() > options_.sync_count_limit);
  ImageOptions options = options_;
  options.read_only = true;
  co_return std::unique_ptr<Image>(new Image(std::move(*layer), std::move(options)));
}

Task<absl::Status> Image::Flush() { co_return co_await top_->Flush(); }

Task<absl::Status> Image::SyncData() { co_return co_await top_->SyncData(); }

Task<absl::Status> Image::Close() { co_return co_await top_->Close(); }

Task<absl::Status> Image::Truncate(uint64_t new_size) {
  if (options_.read_only) co_return absl::FailedPreconditionError("the image is open read-only");
  if (new_size % kSectorSize != 0) {
    co_return absl::InvalidArgumentError(absl::StrFormat(
        "a disk size must be a multiple of %u bytes, not %u", kSectorSize, new_size));
  }
  CO_RETURN_IF_ERROR(co_await top_->Truncate(new_size));
  virtual_size_ = DiskSize(*top_);
  co_return absl::OkStatus();
}

Task<absl::Status> Image::CheckShrink(uint64_t new_size) {
  if (new_size >= virtual_size_) co_return absl::OkStatus();
  co_return co_await top_->CheckShrink(new_size);
}

Task<absl::StatusOr<Extent>> Image::BlockStatus(uint64_t offset, uint64_t max_length) {
  const uint64_t disk = virtual_size_;
  if (offset >= disk) {
    co_return absl::OutOfRangeError(
        absl::StrFormat("block status at %u is outside the disk (%u bytes)", offset, disk));
  }
  max_length = std::min(max_length, disk - offset);
  absl::StatusOr<Extent> first = co_await top_->BlockStatus(offset, max_length);
  if (!first.ok()) co_return first;
  // Layers answer one L2 slice at a time; callers want whole runs.
  Extent run = *first;
  while (run.length < max_length) {
    absl::StatusOr<Extent> next = co_await top_->BlockStatus(offset + run.length, max_length - run.length);
    if (!next.ok() || next->kind != run.kind) break;
    run.length += next->length;
  }
  co_return run;
}

Task<absl::StatusOr<uint64_t>> Image::AllocatedBytes() {
  if (std::optional<uint64_t> counted = top_->DataBytes()) co_return *counted;
  co_return std::min<uint64_t>(top_->HostFileBytes(), virtual_size_);
}

std::string Image::DescribeChain() const { return top_->Describe(); }

std::vector<int> Image::FileDescriptors() const {
  std::vector<int> fds;
  top_->AppendFileDescriptors(fds);
  return fds;
}

}  // namespace qcow2fuse
