// fuzz_pack: turns image files into fuzz inputs, and packed inputs back
// into image files. make_corpus.sh uses it to build the seed corpus from
// images QEMU made; a crash found on a packed input is unpacked to look at
// it with qemu-img.
//
//   fuzz_pack -o OUT [-d DATA_FILE] [-x TAIL_HEX] IMAGE   packed image (read/write targets)
//   fuzz_pack -H -o OUT IMAGE                             header_fuzzer input
//   fuzz_pack -L -o OUT IMAGE                             l2_entry_fuzzer input
//   fuzz_pack -u -o IMAGE [-d DATA_FILE] PACKED           unpack (sparse files)

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "base/all_zero.h"
#include "base/endian.h"
#include "format/header.h"
#include "format/spec.h"
#include "fuzz_image.h"

namespace qcow2fuse::fuzz {
namespace {

using Bytes = std::vector<uint8_t>;

int Usage() {
  std::fprintf(stderr,
               "usage: fuzz_pack -o OUT [-d DATA_FILE] [-x TAIL_HEX] IMAGE\n"
               "       fuzz_pack -H -o OUT IMAGE\n"
               "       fuzz_pack -L -o OUT IMAGE\n"
               "       fuzz_pack -u -o IMAGE [-d DATA_FILE] PACKED\n");
  return 2;
}

bool ReadAll(const std::string& path, Bytes& out) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return false;
  out.resize(static_cast<size_t>(in.tellg()));
  in.seekg(0);
  return static_cast<bool>(in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size())));
}

bool WriteAll(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return static_cast<bool>(out);
}

void PutBE(Bytes& out, uint64_t value, int width) {
  for (int i = width - 1; i >= 0; --i) out.push_back(static_cast<uint8_t>(value >> (8 * i)));
}

// The first cluster, without its trailing zeros, after the file size.
Bytes HeaderSeed(const Bytes& image) {
  Bytes out;
  PutBE(out, image.size(), 8);
  size_t n = std::min<size_t>(image.size(), 64 << 10);
  if (image.size() >= 24) n = std::min<size_t>(n, size_t{1} << std::min<uint32_t>(LoadBE32(&image[20]), 21));
  while (n > 0 && image[n - 1] == 0) --n;
  out.insert(out.end(), image.begin(), image.begin() + n);
  return out;
}

// The format byte, cluster_bits, then the non-zero entries of the image's
// L2 tables (up to 4 KiB of them).
bool L2Seed(const Bytes& image, Bytes& out) {
  absl::StatusOr<Header> h = DecodeHeader(image, image.size());
  if (!h.ok()) return false;
  const uint32_t entry = h->l2_entry_size();
  const uint32_t bits = h->cluster_bits;
  out.push_back((h->has_extended_l2() ? 1 : 0) | (h->has_data_file() ? 2 : 0));
  out.push_back(static_cast<uint8_t>(h->has_extended_l2() ? bits - 14 : bits - 9));
  for (uint32_t i = 0; i < h->l1_size && out.size() < 4096; ++i) {
    const uint64_t l2 = LoadBE64(&image[h->l1_table_offset + 8 * i]) & spec::kL1OffsetMask;
    if (l2 == 0 || l2 + h->cluster_size() > image.size()) continue;
    for (uint64_t at = l2; at < l2 + h->cluster_size() && out.size() < 4096; at += entry) {
      if (!IsAllZero(std::span(image).subspan(at, entry))) {
        out.insert(out.end(), image.begin() + at, image.begin() + at + entry);
      }
    }
  }
  return true;
}

bool WriteSparse(const std::string& path, const SparseStore& store) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return false;
  bool ok = ftruncate(fd, static_cast<off_t>(store.size())) == 0;
  Bytes block(1 << 20);
  for (uint64_t pos = 0; ok && pos < store.size(); pos += block.size()) {
    const uint64_t n = std::min<uint64_t>(block.size(), store.size() - pos);
    store.Read(pos, std::span(block).first(n));
    if (!IsAllZero(std::span(block).first(n))) {
      ok = pwrite(fd, block.data(), n, static_cast<off_t>(pos)) == static_cast<ssize_t>(n);
    }
  }
  return close(fd) == 0 && ok;
}

int Main(int argc, char** argv) {
  std::string out, data_path, tail_hex;
  char mode = 'p';
  int opt;
  while ((opt = getopt(argc, argv, "HLuo:d:x:")) != -1) {
    switch (opt) {
      case 'H': case 'L': case 'u': mode = static_cast<char>(opt); break;
      case 'o': out = optarg; break;
      case 'd': data_path = optarg; break;
      case 'x': tail_hex = optarg; break;
      default: return Usage();
    }
  }
  if (out.empty() || optind + 1 != argc) return Usage();
  Bytes input;
  if (!ReadAll(argv[optind], input)) {
    std::fprintf(stderr, "fuzz_pack: cannot read %s\n", argv[optind]);
    return 1;
  }
  if (mode == 'u') {
    PackedImage packed = Unpack(input);
    bool ok = WriteSparse(out, *packed.image);
    if (!data_path.empty()) ok = ok && WriteSparse(data_path, *packed.data_file);
    if (!ok) std::fprintf(stderr, "fuzz_pack: cannot write %s\n", out.c_str());
    return ok ? 0 : 1;
  }
  Bytes result;
  if (mode == 'H') {
    result = HeaderSeed(input);
  } else if (mode == 'L') {
    if (!L2Seed(input, result)) {
      std::fprintf(stderr, "fuzz_pack: %s: not an image the engine opens\n", argv[optind]);
      return 1;
    }
  } else {
    Bytes data;
    if (!data_path.empty() && !ReadAll(data_path, data)) {
      std::fprintf(stderr, "fuzz_pack: cannot read %s\n", data_path.c_str());
      return 1;
    }
    const std::string tail = absl::HexStringToBytes(tail_hex);
    result = Pack(input, data, Bytes(tail.begin(), tail.end()));
    if (result.empty()) {
      std::fprintf(stderr, "fuzz_pack: %s has too many chunks to pack\n", argv[optind]);
      return 1;
    }
  }
  if (!WriteAll(out, result)) {
    std::fprintf(stderr, "fuzz_pack: cannot write %s\n", out.c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace qcow2fuse::fuzz

int main(int argc, char** argv) { return qcow2fuse::fuzz::Main(argc, argv); }
