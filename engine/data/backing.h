// Opening a backing chain: the top image and, recursively, the images its
// headers name as backing files.
//
// A relative backing file name is resolved against the directory of the
// image that names it, as QEMU does. The backing format extension decides
// how a backing file is read; without it the file is probed (qcow2 magic,
// else raw). A chain that comes back to an image already in it is refused
// as a loop, and so is one deeper than kMaxBackingDepth.

#ifndef QCOW2FUSE_DATA_BACKING_H_
#define QCOW2FUSE_DATA_BACKING_H_

#include <memory>
#include <string>

#include "data/layer.h"
#include "data/qcow2_layer.h"
#include "qcow2fuse/image.h"

namespace qcow2fuse {

inline constexpr int kMaxBackingDepth = 64;

// Opens the qcow2 image at `path` as the top of its chain: writable unless
// options.read_only; the images below it always read-only.
Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> OpenChain(const std::string& path,
                                                            const ImageOptions& options);

// The path of `name` as seen from the image at `image_path`.
std::string ResolveRelativeTo(const std::string& image_path, const std::string& name);

}  // namespace qcow2fuse

#endif  // QCOW2FUSE_DATA_BACKING_H_
