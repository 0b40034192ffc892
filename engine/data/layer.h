// Layer: one image of a backing chain, as the layer above it sees it. A
// qcow2 layer resolves what it does not hold through its own backing layer,
// so the top layer answers for the whole chain.

#ifndef QCOW2FUSE_DATA_LAYER_H_
#define QCOW2FUSE_DATA_LAYER_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse {

class Layer {
 public:
  virtual ~Layer() = default;

  // Size of the disk this layer presents.
  virtual uint64_t size() const = 0;
  // Cluster size, for st_blksize and alignment (raw files report 64 KiB).
  virtual uint64_t cluster_size() const = 0;

  // Fills `out` from `offset`; the caller keeps the range inside size().
  virtual Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) = 0;

  // Kind and length (1..max_length) of the run at `offset` < size(),
  // resolved through the backing layers.
  virtual Task<absl::StatusOr<Extent>> BlockStatus(uint64_t offset, uint64_t max_length) = 0;

  // Advice that the data in [offset, offset + length) will be read soon:
  // start reading what lies behind it in the background, the first
  // `max_data` bytes of data at most (holes and zeros cost nothing). Only
  // advice; whatever fails is ignored.
  virtual Task<void> WillNeed(uint64_t offset, uint64_t length, uint64_t max_data) = 0;

  // Bytes of L2 tables in this layer and those below it: what a walk of
  // the whole disk's block status reads.
  virtual uint64_t L2TableBytes() const = 0;

  // Lines describing this layer and those below it, for logs.
  virtual std::string Describe() const = 0;

  // Appends the descriptors of the host files of this layer and those
  // below it (image, data file, backing files), to compare with paths
  // without opening them; -1 is left out.
  virtual void AppendFileDescriptors(std::vector<int>& fds) const = 0;
};

// A layer that answers through `layer`, which stays owned elsewhere and
// must outlive it: the backing chain of an image, shared with a view of
// one of its snapshots.
class BorrowedLayer final : public Layer {
 public:
  explicit BorrowedLayer(Layer* layer) : layer_(layer) {}
  uint64_t size() const override { return layer_->size(); }
  uint64_t cluster_size() const override { return layer_->cluster_size(); }
  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override { return layer_->Read(offset, out); }
  Task<absl::StatusOr<Extent>> BlockStatus(uint64_t offset, uint64_t max_length) override {
    return layer_->BlockStatus(offset, max_length);
  }
  Task<void> WillNeed(uint64_t offset, uint64_t length, uint64_t max_data) override {
    return layer_->WillNeed(offset, length, max_data);
  }
  uint64_t L2TableBytes() const override { return layer_->L2TableBytes(); }
  std::string Describe() const override { return layer_->Describe(); }
  void AppendFileDescriptors(std::vector<int>& fds) const override { layer_->AppendFileDescriptors(fds); }

 private:
  Layer* const layer_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_DATA_LAYER_H_
