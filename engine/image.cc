#include "qcow2fuse/image.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "data/backing.h"
#include "data/layer.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {

Image::Image(std::unique_ptr<Layer> top, ImageOptions options)
    : top_(std::move(top)),
      options_(std::move(options)),
      virtual_size_(top_->size()),
      cluster_size_(top_->cluster_size()) {}

Image::~Image() = default;

Task<absl::StatusOr<std::unique_ptr<Image>>> Image::Open(std::string path, ImageOptions options) {
  if (!options.read_only) {
    co_return absl::UnimplementedError("writing is not supported yet; open the image read-only");
  }
  absl::StatusOr<std::unique_ptr<Layer>> top = co_await OpenChain(path, options);
  if (!top.ok()) co_return top.status();
  co_return std::unique_ptr<Image>(new Image(std::move(*top), std::move(options)));
}

Task<absl::Status> Image::Read(uint64_t offset, std::span<uint8_t> out) {
  if (offset > virtual_size_ || out.size() > virtual_size_ - offset) {
    co_return absl::OutOfRangeError(absl::StrFormat(
        "read of %u bytes at %u is outside the disk (%u bytes)", out.size(), offset, virtual_size_));
  }
  co_return co_await top_->Read(offset, out);
}

Task<absl::StatusOr<Extent>> Image::BlockStatus(uint64_t offset, uint64_t max_length) {
  if (offset >= virtual_size_) {
    co_return absl::OutOfRangeError(
        absl::StrFormat("block status at %u is outside the disk (%u bytes)", offset, virtual_size_));
  }
  max_length = std::min(max_length, virtual_size_ - offset);
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
  if (allocated_bytes_) co_return *allocated_bytes_;
  uint64_t total = 0;
  for (uint64_t offset = 0; offset < virtual_size_;) {
    absl::StatusOr<Extent> e = co_await BlockStatus(offset, virtual_size_ - offset);
    if (!e.ok()) {
      // A damaged entry must not make the whole view unusable (getattr
      // needs this count): count its cluster as data and go on.
      const uint64_t next_cluster = (offset / cluster_size_ + 1) * cluster_size_;
      e = Extent{ExtentKind::kData, std::min(next_cluster, virtual_size_) - offset};
    }
    if (e->kind == ExtentKind::kData) total += e->length;
    offset += e->length;
  }
  allocated_bytes_ = total;
  co_return total;
}

std::string Image::DescribeChain() const { return top_->Describe(); }

}  // namespace qcow2fuse
