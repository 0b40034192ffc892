#include "integration/image_builder.h"

#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "support/file_util.h"
#include "support/qemu.h"

namespace qcow2fuse::test {
namespace {

// Lengths of the `write -s` source files: odd, and far from powers of two.
constexpr size_t kSourceLengths[] = {65521, 300007, 1048583};

}  // namespace

ImageBuilder::ImageBuilder(std::string dir, uint64_t seed)
    : dir_(std::move(dir)), rng_(seed) {}

std::string ImageBuilder::Path(absl::string_view name) const {
  return absl::StrCat(dir_, "/", name);
}

void ImageBuilder::Record(absl::Status status) {
  if (status_.ok() && !status.ok()) status_ = std::move(status);
}

void ImageBuilder::Create(absl::string_view name, uint64_t size,
                          const std::vector<std::string>& options,
                          absl::string_view format) {
  if (!status_.ok()) return;
  Record(CreateImage(Path(name), format, size, options));
}

void ImageBuilder::Io(absl::string_view name,
                      const std::vector<std::string>& commands,
                      absl::string_view format) {
  if (!status_.ok()) return;
  Record(QemuIo(Path(name), format, commands));
}

void ImageBuilder::QemuImg(const std::vector<std::string>& args) {
  if (!status_.ok()) return;
  Record(test::QemuImg(args).status());
}

void ImageBuilder::Convert(absl::string_view src, absl::string_view src_format,
                           absl::string_view dst, absl::string_view dst_format,
                           const std::vector<std::string>& extra) {
  if (!status_.ok()) return;
  Record(ConvertImage(Path(src), src_format, Path(dst), dst_format, extra));
}

void ImageBuilder::WriteRaw(absl::string_view name, uint64_t offset,
                            absl::string_view data) {
  if (!status_.ok()) return;
  Record(WriteFileAt(Path(name), offset, data));
}

void ImageBuilder::SetDirtyBit(absl::string_view name) {
  if (!status_.ok()) return;
  absl::StatusOr<ScopedFd> fd = OpenReadOnly(Path(name));
  if (!fd.ok()) return Record(fd.status());
  // Byte 79 holds the least significant bits of the big-endian field.
  char last = 0;
  if (pread(fd->get(), &last, 1, 79) != 1) {
    return Record(absl::InternalError(absl::StrCat(name, ": short header")));
  }
  last |= 0x01;
  Record(WriteFileAt(Path(name), 79, absl::string_view(&last, 1)));
}

void ImageBuilder::Check(absl::string_view name, bool allow_leaks) {
  if (!status_.ok()) return;
  Record(CheckImage(Path(name), allow_leaks));
}

uint64_t ImageBuilder::Uniform(uint64_t low, uint64_t high) {
  return std::uniform_int_distribution<uint64_t>(low, high)(rng_);
}

std::string ImageBuilder::RandomBytes(size_t length) {
  std::string bytes(length, '\0');
  for (char& c : bytes) c = static_cast<char>(rng_() & 0xff);
  return bytes;
}

std::string ImageBuilder::RandomPattern() {
  return absl::StrFormat("0x%02x", Uniform(1, 255));
}

const std::string& ImageBuilder::SourceFile() {
  if (source_files_.empty()) {
    for (size_t length : kSourceLengths) {
      std::string name = absl::StrCat("source-", length, ".bin");
      Record(WriteFileAt(Path(name), 0, RandomBytes(length)));
      source_files_.push_back(Path(name));
    }
  }
  return source_files_[Uniform(0, source_files_.size() - 1)];
}

std::string ImageBuilder::RandomWrite(uint64_t offset, uint64_t length,
                                      bool compressed) {
  return absl::StrCat(compressed ? "write -c -s " : "write -s ", SourceFile(),
                      " ", offset, " ", length);
}

std::vector<std::string> ImageBuilder::ScatteredWrites(int count,
                                                       uint64_t limit,
                                                       uint64_t max_length) {
  std::vector<std::string> commands;
  for (int i = 0; i < count; ++i) {
    uint64_t length = Uniform(1, std::min(max_length, limit));
    uint64_t offset = Uniform(0, limit - length);
    if (Uniform(0, 1) == 0) {
      commands.push_back(
          absl::StrCat("write -P ", RandomPattern(), " ", offset, " ", length));
    } else {
      commands.push_back(RandomWrite(offset, length));
    }
  }
  return commands;
}

}  // namespace qcow2fuse::test
