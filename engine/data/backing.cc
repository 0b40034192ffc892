#include "data/backing.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "base/endian.h"
#include "data/qcow2_layer.h"
#include "data/raw_layer.h"
#include "format/header.h"
#include "format/spec.h"
#include "io/block_file.h"
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

Task<absl::StatusOr<std::unique_ptr<Layer>>> OpenLayer(const std::string& path, Format format,
                                                       const ImageOptions& options, int depth);

Task<absl::StatusOr<std::unique_ptr<BlockFile>>> OpenDataFile(const std::string& image_path,
                                                              const Header& header,
                                                              const ImageOptions& options,
                                                              int depth) {
  // Only the top image's data file can be named on the command line.
  std::string path = depth == 0 ? options.data_file : "";
  if (path.empty()) {
    if (header.data_file.empty()) {
      co_return absl::InvalidArgumentError(
          "the image keeps its data in an external data file but does not record its name; "
          "name it with -o data_file=PATH");
    }
    path = ResolveRelativeTo(image_path, header.data_file);
  }
  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path);
  if (!file.ok()) co_return Annotate(file.status(), "external data file");
  co_return file;
}

Task<absl::StatusOr<std::unique_ptr<Layer>>> OpenQcow2(const std::string& path,
                                                       std::unique_ptr<BlockFile> file,
                                                       const ImageOptions& options, int depth) {
  std::vector<uint8_t> bytes(std::min(kHeaderReadSize, file->size()));
  CO_RETURN_IF_ERROR(co_await file->Read(0, bytes));
  absl::StatusOr<Header> header = DecodeHeader(bytes, file->size());
  if (!header.ok()) co_return header.status();

  if (header->crypt_method != spec::kCryptNone) {
    co_return absl::UnimplementedError(absl::StrFormat(
        "the image is encrypted (%s); encrypted images are not supported",
        header->crypt_method == spec::kCryptAes ? "legacy AES" : "LUKS"));
  }
  if ((header->incompatible_features & spec::kIncompatCorrupt) && !options.read_only) {
    co_return absl::FailedPreconditionError(
        "the image is marked corrupt; it can only be opened read-only (repair it with qemu-img check -r)");
  }

  std::unique_ptr<BlockFile> data_file;
  if (header->has_data_file()) {
    absl::StatusOr<std::unique_ptr<BlockFile>> opened = co_await OpenDataFile(path, *header, options, depth);
    if (!opened.ok()) co_return opened.status();
    data_file = std::move(*opened);
  }

  std::unique_ptr<Layer> backing;
  if (!header->backing_file.empty()) {
    if (depth + 1 >= kMaxBackingDepth) {
      co_return absl::FailedPreconditionError(absl::StrFormat(
          "backing chain is deeper than %d images (does it loop?)", kMaxBackingDepth));
    }
    if (absl::StrContains(header->backing_file, ":") && !absl::StrContains(header->backing_file, "/")) {
      co_return absl::UnimplementedError(absl::StrFormat(
          "backing file '%s' names a protocol; only local files are supported", header->backing_file));
    }
    absl::StatusOr<Format> format = ParseFormat(header->backing_format);
    if (!format.ok()) co_return format.status();
    const std::string backing_path = ResolveRelativeTo(path, header->backing_file);
    absl::StatusOr<std::unique_ptr<Layer>> opened =
        co_await OpenLayer(backing_path, *format, options, depth + 1);
    if (!opened.ok()) co_return Annotate(opened.status(), absl::StrFormat("backing file %s", backing_path));
    backing = std::move(*opened);
  }

  absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer = co_await Qcow2Layer::Open(
      std::move(file), std::move(*header), std::move(data_file), std::move(backing), options);
  if (!layer.ok()) co_return layer.status();
  co_return std::unique_ptr<Layer>(std::move(*layer));
}

Task<absl::StatusOr<std::unique_ptr<Layer>>> OpenLayer(const std::string& path, Format format,
                                                       const ImageOptions& options, int depth) {
  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path);
  if (!file.ok()) co_return file.status();
  if (format == Format::kProbe) {
    uint8_t magic[4];
    CO_RETURN_IF_ERROR(co_await (*file)->Read(0, magic));
    format = (*file)->size() >= sizeof magic && LoadBE32(magic) == spec::kMagic ? Format::kQcow2
                                                                                 : Format::kRaw;
  }
  if (format == Format::kRaw) co_return NewRawLayer(std::move(*file));
  co_return co_await OpenQcow2(path, std::move(*file), options, depth);
}

}  // namespace

std::string ResolveRelativeTo(const std::string& image_path, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  const size_t slash = image_path.rfind('/');
  if (slash == std::string::npos) return name;
  return image_path.substr(0, slash + 1) + name;
}

Task<absl::StatusOr<std::unique_ptr<Layer>>> OpenChain(const std::string& path,
                                                       const ImageOptions& options) {
  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path);
  if (!file.ok()) co_return file.status();
  co_return co_await OpenQcow2(path, std::move(*file), options, 0);
}

}  // namespace qcow2fuse
