#include "io/latched_file.h"

#include <mutex>

#include "absl/strings/str_cat.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

class LatchedFile final : public BlockFile {
 public:
  explicit LatchedFile(std::unique_ptr<BlockFile> inner) : inner_(std::move(inner)) {}

  Task<absl::Status> Flush() override {
    if (absl::Status failed = Failure(); !failed.ok()) co_return failed;
    absl::Status status = co_await inner_->Flush();
    if (!status.ok()) {
      std::lock_guard lock(mu_);
      if (failure_.ok()) {
        failure_ = Annotate(status, absl::StrCat("an earlier flush of ", inner_->name(),
                                                 " failed, so writes since the last good flush may "
                                                 "be lost; unmount and check the image"));
      }
    }
    co_return status;
  }

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override { return inner_->Read(offset, out); }
  uint64_t size() const override { return inner_->size(); }
  bool writable() const override { return inner_->writable(); }
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override {
    return inner_->Write(offset, data);
  }
  Task<absl::Status> Discard(uint64_t offset, uint64_t length) override { return inner_->Discard(offset, length); }
  Task<absl::Status> Allocate(uint64_t offset, uint64_t length) override { return inner_->Allocate(offset, length); }
  Task<absl::Status> Truncate(uint64_t size) override { return inner_->Truncate(size); }
  absl::StatusOr<uint64_t> NextData(uint64_t offset) override { return inner_->NextData(offset); }
  absl::StatusOr<uint64_t> NextHole(uint64_t offset) override { return inner_->NextHole(offset); }
  void WillNeed(uint64_t offset, uint64_t length) override { inner_->WillNeed(offset, length); }
  int fd() const override { return inner_->fd(); }
  const std::string& name() const override { return inner_->name(); }

 private:
  absl::Status Failure() const {
    std::lock_guard lock(mu_);
    return failure_;
  }

  const std::unique_ptr<BlockFile> inner_;
  mutable std::mutex mu_;
  absl::Status failure_;  // under mu_: the first failed flush, annotated
};

}  // namespace

std::unique_ptr<BlockFile> LatchFlushErrors(std::unique_ptr<BlockFile> inner) {
  return std::make_unique<LatchedFile>(std::move(inner));
}

}  // namespace qcow2fuse
