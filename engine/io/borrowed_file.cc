#include "io/block_file.h"

namespace qcow2fuse {
namespace {

// Reads through a file that another owner keeps open, and refuses every
// change (BlockFile's defaults): a snapshot of an image reads its file
// while the image may be writing it.
class BorrowedFile final : public BlockFile {
 public:
  explicit BorrowedFile(BlockFile* file) : file_(file) {}

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override { return file_->Read(offset, out); }
  uint64_t size() const override { return file_->size(); }
  absl::StatusOr<uint64_t> NextData(uint64_t offset) override { return file_->NextData(offset); }
  absl::StatusOr<uint64_t> NextHole(uint64_t offset) override { return file_->NextHole(offset); }
  void WillNeed(uint64_t offset, uint64_t length) override { file_->WillNeed(offset, length); }
  int fd() const override { return file_->fd(); }
  const std::string& name() const override { return file_->name(); }

 private:
  BlockFile* const file_;
};

}  // namespace

std::unique_ptr<BlockFile> BorrowReadOnly(BlockFile* file) { return std::make_unique<BorrowedFile>(file); }

}  // namespace qcow2fuse
