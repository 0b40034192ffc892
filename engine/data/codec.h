// Compression of clusters, as qcow2 stores them ("Compressed Clusters
// Descriptor" in the spec; the algorithm is the header's compression_type).
//
// deflate: QEMU writes raw deflate streams (no zlib header or trailer) with a
// 4 KiB window. zstd: one or more plain zstd frames, no length prefix.
//
// The compressed input of a cluster is only known to 512-byte precision, so
// `in` may run past the end of the stream into the next cluster's bytes, and
// may be cut short where the image file ends. A decoder stops as soon as it
// has produced exactly one cluster.

#ifndef QCOW2FUSE_DATA_CODEC_H_
#define QCOW2FUSE_DATA_CODEC_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcow2fuse {

enum class CompressionType : uint8_t { kDeflate, kZstd };

// Decompresses one cluster from `in` into all of `out` (cluster_size bytes).
// Returns DataLossError if the stream is malformed or does not produce
// exactly out.size() bytes.
absl::Status DecompressCluster(CompressionType type, std::span<const uint8_t> in,
                               std::span<uint8_t> out);

// Compresses one cluster as QEMU would. Returns the compressed bytes; the
// caller decides whether they are small enough to be worth storing.
absl::StatusOr<std::vector<uint8_t>> CompressCluster(CompressionType type,
                                                     std::span<const uint8_t> in);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_DATA_CODEC_H_
