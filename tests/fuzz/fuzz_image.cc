#include "fuzz_image.h"

#include <errno.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_format.h"
#include "base/all_zero.h"
#include "base/budget.h"
#include "base/endian.h"
#include "format/spec.h"
#include "qcow2fuse/status.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse::fuzz {

void Fail(const std::string& message) {
  std::fprintf(stderr, "fuzz invariant broken: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

int Verbose() {
  static const int verbose = [] {
    const char* text = std::getenv("QCOW2FUSE_FUZZ_VERBOSE");
    return text == nullptr ? 0 : std::max(1, std::atoi(text));
  }();
  return verbose;
}

// --- SparseStore --------------------------------------------------------------

uint64_t SparseStore::size() const {
  std::lock_guard lock(mu_);
  return size_;
}

void SparseStore::Read(uint64_t offset, std::span<uint8_t> out) const {
  if (out.empty()) return;  // out.data() may be null
  std::memset(out.data(), 0, out.size());
  std::lock_guard lock(mu_);
  if (offset >= size_) return;
  const uint64_t end = offset + std::min<uint64_t>(out.size(), size_ - offset);
  for (auto it = pages_.lower_bound(offset >> kPageBits); it != pages_.end(); ++it) {
    const uint64_t page_start = it->first << kPageBits;
    if (page_start >= end) break;
    const uint64_t from = std::max(offset, page_start);
    const uint64_t to = std::min(end, page_start + kPageSize);
    std::memcpy(out.data() + (from - offset), it->second.get() + (from - page_start), to - from);
  }
}

uint8_t* SparseStore::PageLocked(uint64_t index) {
  auto it = pages_.find(index);
  if (it != pages_.end()) return it->second.get();
  if ((pages_.size() + 1) * kPageSize > kMaxStoredBytes) return nullptr;
  auto page = std::make_unique<uint8_t[]>(kPageSize);  // zeroed
  uint8_t* p = page.get();
  pages_.emplace(index, std::move(page));
  return p;
}

absl::Status SparseStore::Write(uint64_t offset, std::span<const uint8_t> data) {
  if (data.empty()) return absl::OkStatus();
  if (offset > kMaxFileSize || data.size() > kMaxFileSize - offset) {
    return ErrnoStatus(EFBIG, absl::StrFormat("write of %u bytes at %#x", data.size(), offset));
  }
  std::lock_guard lock(mu_);
  uint64_t pos = offset;
  const uint64_t end = offset + data.size();
  while (pos < end) {
    uint8_t* page = PageLocked(pos >> kPageBits);
    if (page == nullptr) {
      // Like a full disk, a prefix may have been written.
      size_ = std::max(size_, pos);
      return ErrnoStatus(ENOSPC, absl::StrFormat("write of %u bytes at %#x", data.size(), offset));
    }
    const uint64_t in_page = pos & (kPageSize - 1);
    const uint64_t n = std::min(end - pos, kPageSize - in_page);
    std::memcpy(page + in_page, data.data() + (pos - offset), n);
    pos += n;
  }
  size_ = std::max(size_, end);
  return absl::OkStatus();
}

absl::Status SparseStore::Discard(uint64_t offset, uint64_t length) {
  std::lock_guard lock(mu_);
  if (offset >= size_) return absl::OkStatus();
  const uint64_t end = offset + std::min(length, size_ - offset);
  for (auto it = pages_.lower_bound(offset >> kPageBits); it != pages_.end();) {
    const uint64_t page_start = it->first << kPageBits;
    if (page_start >= end) break;
    const uint64_t from = std::max(offset, page_start);
    const uint64_t to = std::min(end, page_start + kPageSize);
    if (from == page_start && to == page_start + kPageSize) {
      it = pages_.erase(it);
    } else {
      std::memset(it->second.get() + (from - page_start), 0, to - from);
      ++it;
    }
  }
  return absl::OkStatus();
}

absl::Status SparseStore::Truncate(uint64_t size) {
  if (size > kMaxFileSize) return ErrnoStatus(EFBIG, absl::StrFormat("truncate to %u bytes", size));
  std::lock_guard lock(mu_);
  const uint64_t first_gone = (size + kPageSize - 1) >> kPageBits;
  pages_.erase(pages_.lower_bound(first_gone), pages_.end());
  if (size & (kPageSize - 1)) {
    auto it = pages_.find(size >> kPageBits);
    if (it != pages_.end()) {
      const uint64_t in_page = size & (kPageSize - 1);
      std::memset(it->second.get() + in_page, 0, kPageSize - in_page);
    }
  }
  size_ = size;
  return absl::OkStatus();
}

std::shared_ptr<SparseStore> SparseStore::Clone() const {
  std::lock_guard lock(mu_);
  auto copy = std::make_shared<SparseStore>(size_);
  for (const auto& [index, page] : pages_) {
    auto p = std::make_unique<uint8_t[]>(kPageSize);
    std::memcpy(p.get(), page.get(), kPageSize);
    copy->pages_.emplace(index, std::move(p));
  }
  return copy;
}

namespace {

class SparseFile final : public BlockFile {
 public:
  SparseFile(std::string name, std::shared_ptr<SparseStore> store, bool writable)
      : name_(std::move(name)), store_(std::move(store)), writable_(writable) {}

  Task<absl::Status> Read(uint64_t offset, std::span<uint8_t> out) override {
    store_->Read(offset, out);
    co_return absl::OkStatus();
  }
  uint64_t size() const override { return store_->size(); }
  bool writable() const override { return writable_; }
  Task<absl::Status> Write(uint64_t offset, std::span<const uint8_t> data) override {
    if (!writable_) co_return RefuseReadOnly("write " + name_);
    FUZZ_LOG_AT(2, "  %s: write %#x +%u", name_, offset, data.size());
    absl::Status st = store_->Write(offset, data);
    co_return st.ok() ? st : Annotate(st, name_);
  }
  Task<absl::Status> Discard(uint64_t offset, uint64_t length) override {
    if (!writable_) co_return RefuseReadOnly("discard " + name_);
    FUZZ_LOG_AT(2, "  %s: discard %#x +%u", name_, offset, length);
    co_return store_->Discard(offset, length);
  }
  Task<absl::Status> Truncate(uint64_t size) override {
    if (!writable_) co_return RefuseReadOnly("truncate " + name_);
    FUZZ_LOG_AT(2, "  %s: truncate to %u", name_, size);
    absl::Status st = store_->Truncate(size);
    co_return st.ok() ? st : Annotate(st, name_);
  }
  const std::string& name() const override { return name_; }

 private:
  const std::string name_;
  const std::shared_ptr<SparseStore> store_;
  const bool writable_;
};

}  // namespace

std::unique_ptr<BlockFile> NewSparseFile(std::string name, std::shared_ptr<SparseStore> store,
                                         bool writable) {
  return std::make_unique<SparseFile>(std::move(name), std::move(store), writable);
}

// --- The packed input -------------------------------------------------------

uint64_t Reader::Take(int width) {
  uint64_t value = 0;
  for (int i = 0; i < width; ++i) {
    value <<= 8;
    if (!bytes_.empty()) {
      value |= bytes_[0];
      bytes_ = bytes_.subspan(1);
    }
  }
  return value;
}

std::span<const uint8_t> Reader::TakeBytes(uint64_t length) {
  std::span<const uint8_t> taken = bytes_.first(std::min<uint64_t>(length, bytes_.size()));
  bytes_ = bytes_.subspan(taken.size());
  return taken;
}

namespace {

constexpr uint64_t kDataFileChunk = uint64_t{1} << 63;
// Runs of zeros shorter than this stay inside a chunk when packing: a
// chunk header costs 12 bytes.
constexpr size_t kPackBlock = 512;

void PutBE(std::vector<uint8_t>& out, uint64_t value, int width) {
  for (int i = width - 1; i >= 0; --i) out.push_back(static_cast<uint8_t>(value >> (8 * i)));
}

// Appends the chunks of `file` to `out`, returns how many.
uint64_t PackChunks(std::span<const uint8_t> file, uint64_t flag, std::vector<uint8_t>& out) {
  uint64_t chunks = 0;
  size_t pos = 0;
  auto zero_block = [&](size_t at) { return IsAllZero(file.subspan(at, std::min(kPackBlock, file.size() - at))); };
  while (pos < file.size()) {
    if (zero_block(pos)) {
      pos += kPackBlock;
      continue;
    }
    size_t end = pos;
    while (end < file.size() && !zero_block(end)) end += kPackBlock;
    end = std::min(end, file.size());
    // Trailing zeros of the last block need not be stored.
    while (end > pos && file[end - 1] == 0) --end;
    PutBE(out, flag | pos, 8);
    PutBE(out, end - pos, 4);
    out.insert(out.end(), file.begin() + pos, file.begin() + end);
    ++chunks;
    pos = (end + kPackBlock - 1) / kPackBlock * kPackBlock;
  }
  return chunks;
}

}  // namespace

PackedImage Unpack(std::span<const uint8_t> input) {
  PackedImage packed;
  if (input.size() >= 4 && LoadBE32(input.data()) == spec::kMagic) {
    packed.image = std::make_shared<SparseStore>(input.size());
    (void)packed.image->Write(0, input);
    packed.data_file = std::make_shared<SparseStore>(0);
    return packed;
  }
  Reader r(input);
  const uint64_t image_size = std::min(r.Take(8), kMaxFileSize);
  const uint64_t data_size = std::min(r.Take(8), kMaxFileSize);
  packed.image = std::make_shared<SparseStore>(image_size);
  packed.data_file = std::make_shared<SparseStore>(data_size);
  for (uint64_t n = r.Take(2); n > 0 && !r.empty(); --n) {
    const uint64_t where = r.Take(8);
    const uint64_t length = r.Take(4);
    std::span<const uint8_t> bytes = r.TakeBytes(length);
    SparseStore& store = (where & kDataFileChunk) ? *packed.data_file : *packed.image;
    const uint64_t offset = where & ~kDataFileChunk;
    const uint64_t size = store.size();
    if (offset >= size) continue;
    bytes = bytes.first(std::min<uint64_t>(bytes.size(), size - offset));
    // A store past kMaxStoredBytes drops the rest: the input is then
    // larger than any the fuzzer makes.
    (void)store.Write(offset, bytes);
  }
  packed.tail = r.rest();
  return packed;
}

std::vector<uint8_t> Pack(std::span<const uint8_t> image, std::span<const uint8_t> data_file,
                          std::span<const uint8_t> tail) {
  std::vector<uint8_t> chunks;
  uint64_t count = PackChunks(image, 0, chunks) + PackChunks(data_file, kDataFileChunk, chunks);
  std::vector<uint8_t> out;
  if (count > 0xffff) return out;
  PutBE(out, image.size(), 8);
  PutBE(out, data_file.size(), 8);
  PutBE(out, count, 2);
  out.insert(out.end(), chunks.begin(), chunks.end());
  out.insert(out.end(), tail.begin(), tail.end());
  return out;
}

// --- Opening ------------------------------------------------------------------

absl::StatusOr<Header> ReadHeader(const SparseStore& store) {
  std::vector<uint8_t> bytes(std::min(kHeaderReadSize, store.size()));
  store.Read(0, bytes);
  return DecodeHeader(bytes, store.size());
}

absl::StatusOr<std::unique_ptr<Qcow2Layer>> OpenLayer(const std::shared_ptr<SparseStore>& image,
                                                      const std::shared_ptr<SparseStore>& data_file,
                                                      bool writable, ImageOptions options) {
  absl::StatusOr<Header> header = ReadHeader(*image);
  if (!header.ok()) return header.status();
  if (header->crypt_method != spec::kCryptNone) {
    return absl::UnimplementedError("encrypted images are not supported");
  }
  if ((header->incompatible_features & spec::kIncompatCorrupt) && writable) {
    return absl::FailedPreconditionError("the image is marked corrupt");
  }
  options.read_only = !writable;
  if (options.budget == nullptr) {
    options.budget = std::make_shared<MemoryBudget>(options.max_metadata_memory);
  }
  std::unique_ptr<BlockFile> data;
  if (header->has_data_file()) data = NewSparseFile("data.raw", data_file, writable);
  return SyncWait(Qcow2Layer::Open(NewSparseFile("fuzz.qcow2", image, writable), std::move(*header),
                                   std::move(data), nullptr, options));
}

void CountIfSmall(Qcow2Layer& layer, const ImageOptions& options) {
  if (layer.L2TableBytes() <= options.sync_count_limit) {
    SyncWait(layer.StartDataCount(/*in_background=*/false));
  }
}

}  // namespace qcow2fuse::fuzz
