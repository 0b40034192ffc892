#include "data/raw_layer.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// What a raw file reports as its cluster size: only a hint for st_blksize.
constexpr uint64_t kRawClusterSize = 64 * 1024;

class RawLayer final : public Layer {
 public:
  explicit RawLayer(std::unique_ptr<BlockFile> file) : file_(std::move(file)) {}

  uint64_t size() const override { return file_->size(); }
  uint64_t cluster_size() const override { return kRawClusterSize; }

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override {
    return file_->Read(offset, out);
  }

  Task<absl::StatusOr<Extent>> BlockStatus(uint64_t offset, uint64_t max_length) override {
    absl::StatusOr<uint64_t> data = file_->NextData(offset);
    if (!data.ok()) co_return data.status();
    if (*data > offset) {
      co_return Extent{ExtentKind::kZero, std::min(*data - offset, max_length)};
    }
    absl::StatusOr<uint64_t> hole = file_->NextHole(offset);
    if (!hole.ok()) co_return hole.status();
    co_return Extent{ExtentKind::kData, std::clamp<uint64_t>(*hole - offset, 1, max_length)};
  }

  Task<void> WillNeed(uint64_t offset, uint64_t length, uint64_t max_data) override {
    file_->WillNeed(offset, std::min(length, max_data));
    co_return;
  }

  uint64_t L2TableBytes() const override { return 0; }

  void AppendFileDescriptors(std::vector<int>& fds) const override {
    if (file_->fd() >= 0) fds.push_back(file_->fd());
  }

  std::string Describe() const override {
    return absl::StrFormat("raw file %s (%u bytes)", file_->name(), file_->size());
  }

 private:
  const std::unique_ptr<BlockFile> file_;
};

}  // namespace

std::unique_ptr<Layer> NewRawLayer(std::unique_ptr<BlockFile> file) {
  return std::make_unique<RawLayer>(std::move(file));
}

}  // namespace qcow2fuse
