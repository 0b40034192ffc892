// Qcow2Layer: the read path of one qcow2 image. It maps guest offsets to
// host clusters through the L1 table (held in memory) and L2 slices (in an
// L2Cache), reads data from the image or its external data file, inflates
// compressed clusters, and sends what the image does not hold to its
// backing layer.

#ifndef QCOW2FUSE_DATA_QCOW2_LAYER_H_
#define QCOW2FUSE_DATA_QCOW2_LAYER_H_

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "data/codec.h"
#include "data/layer.h"
#include "format/header.h"
#include "format/l2_entry.h"
#include "io/block_file.h"
#include "meta/l2_cache.h"
#include "qcow2fuse/image.h"

namespace qcow2fuse {

class Qcow2Layer final : public Layer {
 public:
  // Opens the image in `file`, whose header has been decoded. `backing` is
  // the layer below it, or null. `data_file` is its external data file, or
  // null when the image holds its own data.
  static Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> Open(std::unique_ptr<BlockFile> file,
                                                                 Header header,
                                                                 std::unique_ptr<BlockFile> data_file,
                                                                 std::unique_ptr<Layer> backing,
                                                                 const ImageOptions& options);

  uint64_t size() const override { return header_.size; }
  uint64_t cluster_size() const override { return header_.cluster_size(); }
  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override;
  Task<absl::StatusOr<Extent>> BlockStatus(uint64_t offset, uint64_t max_length) override;
  std::string Describe() const override;

  const Header& header() const { return header_; }

  // A run of guest bytes that one L2 entry type covers, from Map().
  struct Mapping {
    SubclusterType type;
    uint64_t length;
    uint64_t host_offset;             // kNormal: host offset of the run's first byte
    CompressedDescriptor compressed;  // kCompressed: the cluster's descriptor
  };
  // Maps the run starting at `offset`, at most `max_length` bytes, that has
  // one type (and, for data, contiguous host offsets). A run never crosses
  // an L2 slice, and a compressed run never crosses its cluster.
  Task<absl::StatusOr<Mapping>> Map(uint64_t offset, uint64_t max_length);

 private:
  Qcow2Layer(std::unique_ptr<BlockFile> file, Header header, std::unique_ptr<BlockFile> data_file,
             std::unique_ptr<Layer> backing, const ImageOptions& options);

  Task<absl::Status> ReadBacking(uint64_t offset, std::span<uint8_t> out);
  Task<absl::Status> ReadCompressed(uint64_t offset, const CompressedDescriptor& descriptor,
                                    std::span<uint8_t> out);
  Task<absl::StatusOr<std::shared_ptr<const std::vector<uint8_t>>>> Decompress(
      const CompressedDescriptor& descriptor);

  const std::unique_ptr<BlockFile> file_;
  const Header header_;
  const std::unique_ptr<BlockFile> external_data_file_;
  BlockFile* const data_file_;  // external_data_file_ or file_
  const std::unique_ptr<Layer> backing_;
  const L2Format format_;
  const CompressionType compression_;
  std::vector<uint64_t> l1_;
  L2Cache l2_cache_;

  // The last few inflated clusters: FUSE reads 128 KiB to 1 MiB at a time,
  // so one compressed 2 MiB cluster would otherwise be inflated many times.
  struct Inflated {
    uint64_t host_offset;
    std::shared_ptr<const std::vector<uint8_t>> data;
  };
  std::mutex inflated_mu_;
  std::list<Inflated> inflated_;
};

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_DATA_QCOW2_LAYER_H_
