#include "qcow2fuse/image.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"
#include "base/all_zero.h"
#include "data/backing.h"
#include "data/qcow2_layer.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {

Image::Image(std::unique_ptr<Qcow2Layer> top, ImageOptions options)
    : top_(std::move(top)),
      options_(std::move(options)),
      virtual_size_(DiskSize(*top_)),
      cluster_size_(top_->cluster_size()) {}

Image::~Image() {
  closing_ = true;
  std::thread counter;
  {
    std::lock_guard lock(allocated_mu_);
    counter = std::move(counter_);
  }
  if (counter.joinable()) counter.join();
}

// QEMU counts a qcow2 disk in 512-byte sectors and ignores a partial last
// sector; the view must show the same disk.
uint64_t Image::DiskSize(const Qcow2Layer& top) { return top.size() / kSectorSize * kSectorSize; }

Task<absl::StatusOr<std::unique_ptr<Image>>> Image::Open(std::string path, ImageOptions options) {
  if (options.force_share && !options.read_only) {
    co_return absl::InvalidArgumentError("force_share is only allowed for read-only opens");
  }
  absl::StatusOr<std::unique_ptr<Qcow2Layer>> top = co_await OpenChain(path, options);
  if (!top.ok()) co_return top.status();
  co_return std::unique_ptr<Image>(new Image(std::move(*top), std::move(options)));
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

Task<void> Image::WillNeed(uint64_t offset, uint64_t length, uint64_t max_data) {
  if (offset >= virtual_size_) co_return;
  co_await top_->WillNeed(offset, std::min(length, virtual_size_ - offset), max_data);
}

Task<absl::Status> Image::Write(uint64_t offset, std::span<const uint8_t> data) {
  if (options_.read_only) co_return absl::FailedPreconditionError("the image is open read-only");
  CO_RETURN_IF_ERROR(CheckRange("write", offset, data.size(), virtual_size_));
  InvalidateAllocatedBytes();
  if (options_.detect_zeroes != DetectZeroes::kOff && IsAllZero(data)) {
    const bool unmap = options_.detect_zeroes == DetectZeroes::kUnmap;
    co_return Changed(co_await top_->WriteZeroes(offset, data.size(), unmap));
  }
  co_return Changed(co_await top_->Write(offset, data));
}

Task<absl::Status> Image::Discard(uint64_t offset, uint64_t length) {
  if (options_.read_only) co_return absl::FailedPreconditionError("the image is open read-only");
  CO_RETURN_IF_ERROR(CheckRange("discard", offset, length, virtual_size_));
  InvalidateAllocatedBytes();
  co_return Changed(co_await top_->Discard(offset, length));
}

Task<absl::Status> Image::WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) {
  if (options_.read_only) co_return absl::FailedPreconditionError("the image is open read-only");
  CO_RETURN_IF_ERROR(CheckRange("write-zeroes", offset, length, virtual_size_));
  InvalidateAllocatedBytes();
  co_return Changed(co_await top_->WriteZeroes(offset, length, may_unmap));
}

Task<absl::Status> Image::Preallocate(uint64_t offset, uint64_t length) {
  if (options_.read_only) co_return absl::FailedPreconditionError("the image is open read-only");
  CO_RETURN_IF_ERROR(CheckRange("preallocation", offset, length, virtual_size_));
  InvalidateAllocatedBytes();
  co_return Changed(co_await top_->Preallocate(offset, length));
}

void Image::InvalidateAllocatedBytes() { changes_.fetch_add(1); }

absl::Status Image::Changed(absl::Status status) {
  // Also after the change: a count taken while it ran may have missed it.
  InvalidateAllocatedBytes();
  return status;
}

ImageCounters Image::counters() const { return top_->counters(); }

Task<absl::Status> Image::Flush() { co_return co_await top_->Flush(); }

Task<absl::Status> Image::Truncate(uint64_t new_size) {
  if (options_.read_only) co_return absl::FailedPreconditionError("the image is open read-only");
  if (new_size % kSectorSize != 0) {
    co_return absl::InvalidArgumentError(absl::StrFormat(
        "a disk size must be a multiple of %u bytes, not %u", kSectorSize, new_size));
  }
  InvalidateAllocatedBytes();
  CO_RETURN_IF_ERROR(Changed(co_await top_->Truncate(new_size)));
  virtual_size_ = DiskSize(*top_);
  co_return absl::OkStatus();
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
  const uint64_t generation = changes_.load();
  {
    std::lock_guard lock(allocated_mu_);
    if (allocated_bytes_ && allocated_generation_ == generation) co_return *allocated_bytes_;
  }
  if (top_->L2TableBytes() <= options_.sync_count_limit) {
    absl::StatusOr<uint64_t> total = co_await CountAllocatedBytes();
    if (total.ok()) KeepCount(generation, *total);
    co_return total;
  }
  MaybeStartBackgroundCount();
  std::lock_guard lock(allocated_mu_);
  if (allocated_bytes_) co_return *allocated_bytes_;
  co_return std::min<uint64_t>(top_->HostFileBytes(), virtual_size_);
}

Task<absl::StatusOr<uint64_t>> Image::CountAllocatedBytes() {
  const uint64_t disk = virtual_size_;
  uint64_t total = 0;
  for (uint64_t offset = 0; offset < disk;) {
    if (closing_) co_return absl::CancelledError("the image is closing");
    absl::StatusOr<Extent> e = co_await BlockStatus(offset, disk - offset);
    if (!e.ok()) {
      // A damaged entry must not make the whole view unusable (getattr
      // needs this count): count its cluster as data and go on.
      const uint64_t next_cluster = (offset / cluster_size_ + 1) * cluster_size_;
      e = Extent{ExtentKind::kData, std::min(next_cluster, disk) - offset};
    }
    if (e->kind == ExtentKind::kData) total += e->length;
    offset += e->length;
  }
  co_return total;
}

void Image::KeepCount(uint64_t generation, uint64_t total) {
  // A change that began meanwhile has moved changes_ past `generation`, so
  // the count is stale; it is still the best answer until the next one.
  std::lock_guard lock(allocated_mu_);
  allocated_bytes_ = total;
  allocated_generation_ = generation;
}

void Image::MaybeStartBackgroundCount() {
  std::lock_guard lock(allocated_mu_);
  if (counting_ || closing_ || std::chrono::steady_clock::now() < next_count_) return;
  if (counter_.joinable()) counter_.join();  // finished: counting_ is false
  counting_ = true;
  counter_ = std::thread([this] { BackgroundCount(); });
}

void Image::BackgroundCount() {
  const auto started = std::chrono::steady_clock::now();
  const uint64_t generation = changes_.load();
  absl::StatusOr<uint64_t> total = SyncWait(CountAllocatedBytes());
  if (total.ok()) KeepCount(generation, *total);
  const auto finished = std::chrono::steady_clock::now();
  std::lock_guard lock(allocated_mu_);
  counting_ = false;
  next_count_ = finished + 4 * (finished - started);
}

std::string Image::DescribeChain() const { return top_->Describe(); }

}  // namespace qcow2fuse
