#include <algorithm>
#include <cstring>
#include <mutex>

#include "io/block_file.h"

namespace qcow2fuse {
namespace {

class MemFile final : public BlockFile {
 public:
  MemFile(std::string name, std::vector<uint8_t> contents)
      : name_(std::move(name)), contents_(std::move(contents)) {}

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override {
    {
      std::lock_guard lock(mu_);
      size_t have =
          offset < contents_.size() ? std::min<uint64_t>(out.size(), contents_.size() - offset) : 0;
      if (have > 0) std::memcpy(out.data(), contents_.data() + offset, have);
      // An empty span may have no buffer at all: memset(nullptr, 0, 0) is
      // undefined behaviour.
      if (out.size() > have) std::memset(out.data() + have, 0, out.size() - have);
    }
    co_return absl::OkStatus();
  }

  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override {
    // A vector cannot hold what a real file could, and the tests never need
    // more than memory: refuse sizes that would overflow rather than wrap.
    if (offset > contents_.max_size() || data.size() > contents_.max_size() - offset) {
      co_return absl::OutOfRangeError("write " + name_ + " at offset " + std::to_string(offset) +
                                      ", " + std::to_string(data.size()) +
                                      " bytes: too large for a memory file");
    }
    if (!data.empty()) {  // like pwrite, an empty write does not extend the file
      std::lock_guard lock(mu_);
      if (contents_.size() < offset + data.size()) contents_.resize(offset + data.size());
      std::memcpy(contents_.data() + offset, data.data(), data.size());
    }
    co_return absl::OkStatus();
  }

  Task<absl::Status> Flush() override { co_return absl::OkStatus(); }

  // Zeroes the range, as a punched hole reads.
  Task<absl::Status> Discard(uint64_t offset, uint64_t length) override {
    {
      std::lock_guard lock(mu_);
      if (offset < contents_.size()) {
        length = std::min<uint64_t>(length, contents_.size() - offset);
        std::memset(contents_.data() + offset, 0, length);
      }
    }
    co_return absl::OkStatus();
  }

  Task<absl::Status> Truncate(uint64_t size) override {
    if (size > contents_.max_size()) {
      co_return absl::OutOfRangeError("truncate " + name_ + " to " + std::to_string(size) +
                                      " bytes: too large for a memory file");
    }
    {
      std::lock_guard lock(mu_);
      contents_.resize(size);
    }
    co_return absl::OkStatus();
  }

  uint64_t size() const override {
    std::lock_guard lock(mu_);
    return contents_.size();
  }
  bool writable() const override { return true; }
  const std::string& name() const override { return name_; }

  std::vector<uint8_t> Contents() const {
    std::lock_guard lock(mu_);
    return contents_;
  }

 private:
  const std::string name_;
  mutable std::mutex mu_;
  std::vector<uint8_t> contents_;  // guarded by mu_
};

}  // namespace

std::unique_ptr<BlockFile> NewMemFile(std::string name, std::vector<uint8_t> contents) {
  return std::make_unique<MemFile>(std::move(name), std::move(contents));
}

absl::StatusOr<std::vector<uint8_t>> MemFileContents(const BlockFile& file) {
  const auto* mem = dynamic_cast<const MemFile*>(&file);
  if (mem == nullptr) {
    return absl::InvalidArgumentError(file.name() + " is not a memory file");
  }
  return mem->Contents();
}

}  // namespace qcow2fuse
