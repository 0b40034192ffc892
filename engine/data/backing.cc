#include "data/backing.h"

#include <errno.h>
#include <sys/stat.h>

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "base/budget.h"
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


// What a path names, for the refusal of anything but a regular file or a
// block device. Checked before open(): opening a FIFO for reading waits
// for a writer, so a hostile image naming one would hang the mount.
const char* FileTypeName(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

absl::Status CheckFileType(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return ErrnoStatus(errno, absl::StrFormat("cannot open %s", path));
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s is %s; only a regular file or a block device can be used", path, FileTypeName(st.st_mode)));
  }
  return absl::OkStatus();
}

// Which file an open descriptor is: names can differ (symlinks, hard
// links, relative paths) for one file. Two device nodes of one block
// device are one file too.
struct FileId {
  dev_t dev = 0;
  ino_t ino = 0;
  bool block_device = false;
  bool operator==(const FileId&) const = default;
};

absl::StatusOr<FileId> IdentifyFile(const BlockFile& file) {
  struct stat st;
  if (fstat(file.fd(), &st) != 0) return ErrnoStatus(errno, absl::StrFormat("stat %s", file.name()));
  if (S_ISBLK(st.st_mode)) return FileId{st.st_rdev, 0, true};
  return FileId{st.st_dev, st.st_ino, false};
}

// What the decoded header of an image keeps in memory for as long as the
// image is open (names, the feature name table, unknown extensions): it
// grows with the extension area, up to about twice a 2 MiB cluster.
uint64_t HeaderMemory(const Header& h) {
  auto string_bytes = [](const std::string& s) -> uint64_t { return s.capacity() + 1; };
  uint64_t bytes = sizeof(Header) + string_bytes(h.backing_file) + string_bytes(h.backing_format) +
                   string_bytes(h.data_file);
  bytes += h.feature_names.capacity() * sizeof(FeatureName);
  for (const FeatureName& f : h.feature_names) bytes += string_bytes(f.name);
  bytes += h.unknown_extensions.capacity() * sizeof(uint32_t);
  return bytes;
}

// Opens the images of one chain, top first, and their external data files.
// It remembers which file each one is (device and inode), so that a chain
// coming back to one of its images is reported as a loop, a data file that
// is the image itself or another file of the chain is refused (a write of
// guest data would land on metadata), and errors say which image named
// the failing file.
class ChainOpener {
 public:
  explicit ChainOpener(const ImageOptions& options) : options_(options) {
    // One budget for every layer, made here when Image::Open did not.
    if (options_.budget == nullptr) {
      options_.budget = std::make_shared<MemoryBudget>(options_.max_metadata_memory);
    }
  }

  // The top image: always qcow2, writable unless the options say read-only.
  Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> OpenTop(const std::string& path) {
    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenImageFile(path, path, !options_.read_only);
    if (!file.ok()) co_return file.status();
    absl::StatusOr<std::unique_ptr<Qcow2Layer>> top = co_await OpenQcow2(path, path, std::move(*file));
    if (!top.ok()) co_return top.status();
    // The decoded headers live as long as the image; the budget, made for
    // this image, goes with it.
    for (BudgetCharge& charge : header_charges_) charge.Keep();
    co_return top;
  }

 private:
  // A backing file, read-only, in the given format.
  Task<absl::StatusOr<std::unique_ptr<Layer>>> OpenBacking(const std::string& path, Format format) {
    const std::string where = absl::StrFormat("%s (backing file of %s)", path, images_.back());
    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenImageFile(path, where, false);
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

  // Opens the next image of the chain, refusing a chain that loops or is
  // too deep, and takes QEMU's locks on it.
  absl::StatusOr<std::unique_ptr<BlockFile>> OpenImageFile(const std::string& path,
                                                           const std::string& where, bool writable) {
    if (images_.size() >= kMaxBackingDepth) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s: the backing chain is deeper than %d images", where, kMaxBackingDepth));
    }
    // These errors name the path; the top image needs no more than that.
    auto at = [&](const absl::Status& s) { return where == path ? s : Annotate(s, where); };
    if (absl::Status type = CheckFileType(path); !type.ok()) return at(type);
    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path, writable);
    if (!file.ok()) return at(file.status());
    absl::StatusOr<FileId> id = IdentifyFile(**file);
    if (!id.ok()) return Annotate(id.status(), where);
    if (const Opened* seen = Find(*id)) {
      if (seen->data_file_of.empty()) {
        return absl::FailedPreconditionError(
            absl::StrFormat("%s: the backing chain loops back to %s", where, seen->path));
      }
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s: it is the external data file of %s; a file of the backing chain cannot also hold "
          "an image's data",
          where, seen->data_file_of));
    }
    // QEMU's byte-range locks: while we write, QEMU may not; while we read,
    // nobody may write underneath us (unless the user said force_share).
    if (!options_.force_share) {
      absl::Status locked =
          LockImage((*file)->fd(), writable ? LockMode::kReadWrite : LockMode::kReadOnly, path);
      if (!locked.ok()) return at(locked);
    }
    opened_.push_back({path, "", *id});
    images_.push_back(path);
    return file;
  }

  // The external data file of the image at `image_path` (the last one
  // opened): the file -o data_file names for the top image, else the one
  // its header names. Written only for a writable top image. It must be a
  // file of its own: writing guest data into the image itself or into a
  // backing file destroys metadata (QEMU refuses both too).
  absl::StatusOr<std::unique_ptr<BlockFile>> OpenDataFile(const std::string& image_path,
                                                          const Header& header) {
    const bool is_top = images_.size() == 1;
    std::string path = is_top ? options_.data_file : "";
    if (path.empty()) {
      if (header.data_file.empty()) {
        return absl::InvalidArgumentError(
            "the image keeps its data in an external data file but does not record its name; "
            "name it with -o data_file=PATH");
      }
      path = ResolveRelativeTo(image_path, header.data_file);
    }
    const std::string what = absl::StrFormat("external data file %s", path);
    const bool writable = is_top && !options_.read_only;
    if (absl::Status type = CheckFileType(path); !type.ok()) return Annotate(type, "external data file");
    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path, writable);
    if (!file.ok()) return Annotate(file.status(), "external data file");
    absl::StatusOr<FileId> id = IdentifyFile(**file);
    if (!id.ok()) return Annotate(id.status(), "external data file");
    if (const Opened* seen = Find(*id)) {
      if (seen->path == image_path && seen->data_file_of.empty()) {
        return absl::FailedPreconditionError(absl::StrFormat("the %s is the image itself", what));
      }
      if (seen->data_file_of.empty()) {
        return absl::FailedPreconditionError(
            absl::StrFormat("the %s is %s, an image of the backing chain", what, seen->path));
      }
      return absl::FailedPreconditionError(
          absl::StrFormat("the %s is also the external data file of %s", what, seen->data_file_of));
    }
    // QEMU locks the data file too, with the image's permissions, but it
    // lets others write it (the qcow2 image is what it guards).
    if (!options_.force_share) {
      absl::Status locked = LockImage(
          (*file)->fd(), writable ? LockMode::kDataFileReadWrite : LockMode::kDataFileReadOnly, path);
      if (!locked.ok()) return Annotate(locked, "external data file");
    }
    opened_.push_back({path, image_path, *id});
    return file;
  }

  // Reads and decodes the header of `file`. Only the first cluster is read
  // (the header and its extensions lie there), and those bytes are charged
  // to the budget while they exist; the decoded header is charged for as
  // long as the image is open.
  Task<absl::StatusOr<Header>> ReadHeader(BlockFile& file, const std::string& where) {
    uint8_t cluster_bits[4] = {};
    CO_RETURN_IF_ERROR(co_await file.Read(spec::kOffClusterBits, cluster_bits));
    // An out-of-range value is read as the largest: DecodeHeader names it.
    uint64_t size = kHeaderReadSize;
    const uint32_t bits = LoadBE32(cluster_bits);
    if (bits >= spec::kMinClusterBits && bits <= spec::kMaxClusterBits) size = uint64_t{1} << bits;
    size = std::min(size, file.size());
    BudgetCharge read_charge;
    CO_RETURN_IF_ERROR(read_charge.Take(options_.budget.get(), size,
                                        absl::StrFormat("the first cluster of %s", where)));
    std::vector<uint8_t> bytes(size);
    CO_RETURN_IF_ERROR(co_await file.Read(0, bytes));
    absl::StatusOr<Header> header = DecodeHeader(bytes, file.size());
    if (!header.ok()) co_return Annotate(header.status(), where);
    BudgetCharge& kept = header_charges_.emplace_back();
    CO_RETURN_IF_ERROR(kept.Take(options_.budget.get(), HeaderMemory(*header),
                                 absl::StrFormat("the header extensions of %s", where)));
    co_return header;
  }

  // Errors of this image itself are prefixed with `where`; errors of the
  // images below it already say where they are.
  Task<absl::StatusOr<std::unique_ptr<Qcow2Layer>>> OpenQcow2(const std::string& path,
                                                              const std::string& where,
                                                              std::unique_ptr<BlockFile> file) {
    absl::StatusOr<Header> header = co_await ReadHeader(*file, where);
    if (!header.ok()) co_return header.status();

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
      absl::StatusOr<std::unique_ptr<BlockFile>> opened = OpenDataFile(path, *header);
      if (!opened.ok()) co_return Annotate(opened.status(), where);
      data_file = std::move(*opened);
    }

    // The options may name the top image's backing file and format for
    // this open (-o backing=, -o backing_format=) in place of the header's.
    const bool is_top = images_.size() == 1;
    std::string backing_path;
    if (is_top && !options_.backing_file.empty()) {
      backing_path = options_.backing_file;
    } else if (!header->backing_file.empty()) {
      if (absl::StrContains(header->backing_file, ":") &&
          !absl::StrContains(header->backing_file, "/")) {
        co_return absl::UnimplementedError(absl::StrFormat(
            "%s: backing file '%s' names a protocol; only local files are supported (name a "
            "file with -o backing=PATH)",
            where, header->backing_file));
      }
      backing_path = ResolveRelativeTo(path, header->backing_file);
    }
    std::unique_ptr<Layer> backing;
    if (!backing_path.empty()) {
      const std::string& format_name =
          is_top && !options_.backing_format.empty() ? options_.backing_format : header->backing_format;
      absl::StatusOr<Format> format = ParseFormat(format_name);
      if (!format.ok()) co_return Annotate(format.status(), where);
      absl::StatusOr<std::unique_ptr<Layer>> opened = co_await OpenBacking(backing_path, *format);
      if (!opened.ok()) co_return opened.status();
      backing = std::move(*opened);
    }

    absl::StatusOr<std::unique_ptr<Qcow2Layer>> layer = co_await Qcow2Layer::Open(
        std::move(file), std::move(*header), std::move(data_file), std::move(backing), options_);
    if (!layer.ok()) co_return Annotate(layer.status(), where);
    co_return layer;
  }

  struct Opened {
    std::string path;          // as named
    std::string data_file_of;  // the image it is the data file of; empty for an image
    FileId id;
  };
  const Opened* Find(const FileId& id) const {
    for (const Opened& o : opened_) {
      if (o.id == id) return &o;
    }
    return nullptr;
  }

  ImageOptions options_;
  std::vector<Opened> opened_;       // images and data files, in the order opened
  std::vector<std::string> images_;  // the images, top first
  std::vector<BudgetCharge> header_charges_;
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
