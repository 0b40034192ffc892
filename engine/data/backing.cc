#include "data/backing.h"

#include <stdlib.h>

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "base/endian.h"
#include "data/qcow2_layer.h"
#include "data/raw_layer.h"
#include "format/header.h"
#include "format/spec.h"
#include "io/block_file.h"
#include "io/image_lock.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

enum class Format { kProbe, kQcow2, kRaw };

absl::StatusOr<Format> ParseFormat(const std::string& name) {
  if (name.empty()) return Format::kProbe;
  if (name == "qcow2") return Format::kQcow2;
  if (name == "raw") return Format::kRaw;
  return absl::UnimplementedError(
      absl::StrFormat("backing file format '%s' is not supported (only qcow2 and raw)", name));
}


Task<absl::StatusOr<std::unique_ptr<BlockFile>>> OpenDataFile(const std::string& image_path,
                                                              const Header& header,
                                                              const ImageOptions& options,
                                                              bool is_top) {
  // Only the top image's data file can be named on the command line, and
  // only the top image is written.
  std::string path = is_top ? options.data_file : "";
  if (path.empty()) {
    if (header.data_file.empty()) {
      co_return absl::InvalidArgumentError(
          "the image keeps its data in an external data file but does not record its name; "
          "name it with -o data_file=PATH");
    }
    path = ResolveRelativeTo(image_path, header.data_file);
  }
  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path, is_top && !options.read_only);
  if (!file.ok()) co_return Annotate(file.status(), "external data file");
  co_return file;
}

// Opens the images of one chain, top first. It remembers the real path of
// each image opened, so that a chain coming back to one of them is reported
// as a loop, and so that errors say which image named the failing one.
class ChainOpener {
 public:
  explicit ChainOpener(const ImageOptions& options) : options_(options) {}

  // The top image: always qcow2, writable unless the options say read-only.
  Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> OpenTop(const std::string& path) {
    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenFile(path, path, !options_.read_only);
    if (!file.ok()) co_return file.status();
    co_return co_await OpenQcow2(path, path, std::move(*file));
  }

 private:
  // A backing file, read-only, in the given format.
  Task<absl::StatusOr<std::unique_ptr<Layer>>> OpenBacking(const std::string& path, Format format) {
    const std::string where = absl::StrFormat("%s (backing file of %s)", path, chain_.back().path);
    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenFile(path, where, false);
    if (!file.ok()) co_return file.status();
    if (format == Format::kProbe) {
      uint8_t magic[4];
      CO_RETURN_IF_ERROR(co_await (*file)->Read(0, magic));
      format = (*file)->size() >= sizeof magic && LoadBE32(magic) == spec::kMagic ? Format::kQcow2
                                                                                   : Format::kRaw;
    }
    if (format == Format::kRaw) co_return NewRawLayer(std::move(*file));
    absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer = co_await OpenQcow2(path, where, std::move(*file));
    if (!layer.ok()) co_return layer.status();
    co_return std::unique_ptr<Layer>(std::move(*layer));
  }

  // Opens the next file of the chain, refusing a chain that loops or is too deep.
  absl::StatusOr<std::unique_ptr<BlockFile>> OpenFile(const std::string& path,
                                                      const std::string& where, bool writable) {
    if (chain_.size() >= kMaxBackingDepth) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s: the backing chain is deeper than %d images", where, kMaxBackingDepth));
    }
    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path, writable);
    if (!file.ok()) return Annotate(file.status(), where);
    // QEMU's byte-range locks: while we write, QEMU may not; while we read,
    // nobody may write underneath us (unless the user said force_share).
    if (!options_.force_share) {
      absl::Status locked = LockImage((*file)->fd(), writable ? LockMode::kReadWrite : LockMode::kReadOnly, path);
      if (!locked.ok()) return Annotate(locked, where);
    }
    char* real = realpath(path.c_str(), nullptr);
    const std::string real_path = real ? real : path;
    free(real);
    for (const Opened& o : chain_) {
      if (o.real_path == real_path) {
        return absl::FailedPreconditionError(
            absl::StrFormat("%s: the backing chain loops back to %s", where, o.path));
      }
    }
    chain_.push_back({path, real_path});
    return file;
  }

  // Errors of this image itself are prefixed with `where`; errors of the
  // images below it already say where they are.
  Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> OpenQcow2(const std::string& path,
                                                              const std::string& where,
                                                              std::unique_ptr<BlockFile> file) {
    std::vector<uint8_t> bytes(std::min(kHeaderReadSize, file->size()));
    CO_RETURN_IF_ERROR(co_await file->Read(0, bytes));
    absl::StatusOr<Header> header = DecodeHeader(bytes, file->size());
    if (!header.ok()) co_return Annotate(header.status(), where);

    if (header->crypt_method != spec::kCryptNone) {
      co_return absl::UnimplementedError(absl::StrFormat(
          "%s: the image is encrypted (%s); encrypted images are not supported", where,
          header->crypt_method == spec::kCryptAes ? "legacy AES" : "LUKS"));
    }
    if ((header->incompatible_features & spec::kIncompatCorrupt) && !options_.read_only) {
      co_return absl::FailedPreconditionError(absl::StrFormat(
          "%s: the image is marked corrupt; it can only be opened read-only (repair it with "
          "qemu-img check -r)",
          where));
    }

    std::unique_ptr<BlockFile> data_file;
    if (header->has_data_file()) {
      absl::StatusOr<std::unique_ptr<BlockFile>> opened =
          co_await OpenDataFile(path, *header, options_, chain_.size() == 1);
      if (!opened.ok()) co_return Annotate(opened.status(), where);
      data_file = std::move(*opened);
    }

    std::unique_ptr<Layer> backing;
    if (!header->backing_file.empty()) {
      if (absl::StrContains(header->backing_file, ":") &&
          !absl::StrContains(header->backing_file, "/")) {
        co_return absl::UnimplementedError(absl::StrFormat(
            "%s: backing file '%s' names a protocol; only local files are supported", where,
            header->backing_file));
      }
      absl::StatusOr<Format> format = ParseFormat(header->backing_format);
      if (!format.ok()) co_return Annotate(format.status(), where);
      absl::StatusOr<std::unique_ptr<Layer>> opened =
          co_await OpenBacking(ResolveRelativeTo(path, header->backing_file), *format);
      if (!opened.ok()) co_return opened.status();
      backing = std::move(*opened);
    }

    absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer = co_await Qcow2Layer::Open(
        std::move(file), std::move(*header), std::move(data_file), std::move(backing), options_);
    if (!layer.ok()) co_return Annotate(layer.status(), where);
    co_return layer;
  }

  struct Opened {
    std::string path;       // as named
    std::string real_path;  // symlinks and relative parts resolved
  };
  const ImageOptions& options_;
  std::vector<Opened> chain_;
};

}  // namespace

std::string ResolveRelativeTo(const std::string& image_path, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  const size_t slash = image_path.rfind('/');
  if (slash == std::string::npos) return name;
  return image_path.substr(0, slash + 1) + name;
}

Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> OpenChain(const std::string& path,
                                                            const ImageOptions& options) {
  ChainOpener opener(options);
  co_return co_await opener.OpenTop(path);
}

}  // namespace qcow2fuse
