#include <algorithm>
#include <cstring>

#include "io/block_file.h"

namespace qcow2fuse {
namespace {

class MemFile final : public BlockFile {
 public:
  MemFile(std::string name, std::vector<uint8_t> contents)
      : name_(std::move(name)), contents_(std::move(contents)) {}

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override {
    size_t have = offset < contents_.size() ? std::min(out.size(), contents_.size() - offset) : 0;
    if (have > 0) std::memcpy(out.data(), contents_.data() + offset, have);
    std::memset(out.data() + have, 0, out.size() - have);
    co_return absl::OkStatus();
  }

  uint64_t size() const override { return contents_.size(); }
  const std::string& name() const override { return name_; }

 private:
  const std::string name_;
  const std::vector<uint8_t> contents_;
};

}  // namespace

std::unique_ptr<BlockFile> NewMemFile(std::string name, std::vector<uint8_t> contents) {
  return std::make_unique<MemFile>(std::move(name), std::move(contents));
}

}  // namespace qcow2fuse
