// RawLayer: a raw file used as a backing file. Its holes (SEEK_HOLE) are
// reported as zero runs, so SEEK_DATA through the chain stays exact.

#ifndef QCOW2FUSE_DATA_RAW_LAYER_H_
#define QCOW2FUSE_DATA_RAW_LAYER_H_

#include <memory>

#include "data/layer.h"
#include "io/block_file.h"

namespace qcow2fuse {

std::unique_ptr<Layer> NewRawLayer(std::unique_ptr<BlockFile> file);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_DATA_RAW_LAYER_H_
