#include "data/codec.h"

#include <libdeflate.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <climits>
#include <memory>

#include "absl/strings/str_format.h"

namespace qcow2fuse {

namespace {

// QEMU writes raw deflate (negative window bits: no zlib header or adler32
// trailer) with a 2^12 = 4 KiB window, and inflates with the same setting.
// Since a cluster is inflated in one call into one buffer, zlib looks back
// into that buffer rather than its window, so streams written with a larger
// window decode too.
constexpr int kDeflateWindowBits = -12;
// QEMU's deflate memory level: 9 is zlib's maximum (fastest, most memory).
constexpr int kDeflateMemLevel = 9;

// zlib counts in uInt. Input past the end of a stream is ignored anyway, so
// clamping it is harmless; an output that large is never a cluster.
uInt ClampToUInt(size_t n) { return static_cast<uInt>(std::min<size_t>(n, UINT_MAX)); }

// One inflate state per thread, reused across clusters: inflateInit2
// allocates a window and state on every call, which would dominate the
// cost of small clusters. Decoding never suspends, so sharing per thread
// is safe even with coroutines.
struct InflateState {
  z_stream stream{};
  bool initialized = false;
  ~InflateState() {
    if (initialized) inflateEnd(&stream);
  }
};

// Returns this thread's inflate stream, ready for a new input, or nullptr
// if zlib could not allocate it.
z_stream* ThreadInflater() {
  thread_local InflateState state;
  if (!state.initialized) {
    if (inflateInit2(&state.stream, kDeflateWindowBits) != Z_OK) return nullptr;
    state.initialized = true;
  } else if (inflateReset(&state.stream) != Z_OK) {
    return nullptr;
  }
  return &state.stream;
}

struct LibdeflateDeleter {
  void operator()(libdeflate_decompressor* d) const { libdeflate_free_decompressor(d); }
};

// This thread's libdeflate decompressor (about 32 KiB, allocated once), or
// nullptr if it could not be allocated.
libdeflate_decompressor* ThreadLibdeflate() {
  thread_local std::unique_ptr<libdeflate_decompressor, LibdeflateDeleter> decompressor(
      libdeflate_alloc_decompressor());
  return decompressor.get();
}

// zlib's streaming inflate: slower than libdeflate, but it decodes a stream
// only as far as the cluster reaches, and names what is wrong with a bad one.
absl::Status ZlibInflateCluster(std::span<const uint8_t> in, std::span<uint8_t> out) {
  if (out.size() > UINT_MAX) return absl::InvalidArgumentError("cluster too large for zlib");
  z_stream* s = ThreadInflater();
  if (s == nullptr) return absl::ResourceExhaustedError("cannot initialise zlib inflate");
  s->next_in = const_cast<Bytef*>(in.data());
  s->avail_in = ClampToUInt(in.size());
  s->next_out = out.data();
  s->avail_out = static_cast<uInt>(out.size());
  int ret = inflate(s, Z_FINISH);
  size_t produced = out.size() - s->avail_out;
  // The stream may go on past the cluster's end (the input is cut at a
  // sector boundary, not at the stream's end), so a full output is success
  // whether or not zlib saw the end of the stream.
  if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR || ret == Z_OK) && s->avail_out == 0) {
    return absl::OkStatus();
  }
  switch (ret) {
    case Z_STREAM_END:
      return absl::DataLossError(
          absl::StrFormat("deflate stream ended after %d of %d bytes", produced, out.size()));
    case Z_BUF_ERROR:
    case Z_OK:
      return absl::DataLossError(absl::StrFormat(
          "deflate stream truncated: input ran out after %d of %d bytes", produced, out.size()));
    case Z_MEM_ERROR:
      return absl::ResourceExhaustedError("zlib inflate out of memory");
    default:
      return absl::DataLossError(
          absl::StrFormat("corrupt deflate stream: %s", s->msg != nullptr ? s->msg : zError(ret)));
  }
}

// libdeflate inflates about twice as fast as zlib, but only a whole stream
// that fits the output. That is every cluster QEMU writes (one stream of
// exactly one cluster, then padding); anything else (a stream cut short by
// the end of the file after the cluster's last byte, one that goes on past
// the cluster, a damaged one) is left to zlib, which decides as before.
// libdeflate is a little more lenient than zlib about malformed Huffman
// codes (an incomplete code, a distance code with no codes at all), so a
// damaged stream of exactly that kind decodes where zlib would fail; raw
// deflate has no checksum, so most damage decodes to wrong bytes with
// either decoder anyway.
absl::Status InflateCluster(std::span<const uint8_t> in, std::span<uint8_t> out) {
  if (libdeflate_decompressor* d = ThreadLibdeflate()) {
    size_t in_used = 0;
    size_t produced = 0;
    if (libdeflate_deflate_decompress_ex(d, in.data(), in.size(), out.data(), out.size(), &in_used, &produced) ==
            LIBDEFLATE_SUCCESS &&
        produced == out.size()) {
      return absl::OkStatus();
    }
  }
  return ZlibInflateCluster(in, out);
}

struct ZstdDCtxDeleter {
  void operator()(ZSTD_DCtx* dctx) const { ZSTD_freeDCtx(dctx); }
};

// Per-thread decompression context, for the same reason as ThreadInflater.
ZSTD_DCtx* ThreadZstdDCtx() {
  thread_local std::unique_ptr<ZSTD_DCtx, ZstdDCtxDeleter> dctx;
  if (dctx == nullptr) {
    dctx.reset(ZSTD_createDCtx());
  } else if (ZSTD_isError(ZSTD_DCtx_reset(dctx.get(), ZSTD_reset_session_only))) {
    return nullptr;
  }
  return dctx.get();
}

absl::Status ZstdDecompressCluster(std::span<const uint8_t> in, std::span<uint8_t> out) {
  ZSTD_DCtx* dctx = ThreadZstdDCtx();
  if (dctx == nullptr) return absl::ResourceExhaustedError("cannot create zstd context");
  ZSTD_inBuffer input{in.data(), in.size(), 0};
  ZSTD_outBuffer output{out.data(), out.size(), 0};
  // What the last call returned: 0 once a frame is complete and flushed,
  // otherwise a hint that the current frame wants more input.
  size_t hint = 0;
  // A cluster may span several frames; the decoder moves from one to the
  // next by itself.
  while (output.pos < output.size) {
    size_t in_before = input.pos;
    size_t out_before = output.pos;
    hint = ZSTD_decompressStream(dctx, &output, &input);
    if (ZSTD_isError(hint)) {
      return absl::DataLossError(
          absl::StrFormat("corrupt zstd stream: %s", ZSTD_getErrorName(hint)));
    }
    // No progress means the input ran out (or the decoder is stuck); either
    // way, looping again would spin forever.
    if (input.pos == in_before && output.pos == out_before) {
      return absl::DataLossError(absl::StrFormat(
          "zstd stream truncated: input ran out after %d of %d bytes", output.pos, out.size()));
    }
  }
  // The output is full but the frame goes on: it holds more than a cluster,
  // which only a damaged image does. QEMU rejects this too.
  if (hint != 0) {
    return absl::DataLossError(
        absl::StrFormat("zstd frame continues past the end of the %d-byte cluster", out.size()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> DeflateCluster(std::span<const uint8_t> in) {
  if (in.size() > UINT_MAX) return absl::InvalidArgumentError("cluster too large for zlib");
  z_stream s{};
  if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, kDeflateWindowBits, kDeflateMemLevel,
                   Z_DEFAULT_STRATEGY) != Z_OK) {
    return absl::ResourceExhaustedError("cannot initialise zlib deflate");
  }
  std::vector<uint8_t> buf(deflateBound(&s, in.size()));
  s.next_in = const_cast<Bytef*>(in.data());
  s.avail_in = static_cast<uInt>(in.size());
  s.next_out = buf.data();
  s.avail_out = ClampToUInt(buf.size());
  int ret = deflate(&s, Z_FINISH);
  buf.resize(s.total_out);
  deflateEnd(&s);
  // deflateBound guarantees room, so anything but a finished stream is a
  // zlib failure.
  if (ret != Z_STREAM_END) {
    return absl::InternalError(absl::StrFormat("zlib deflate failed: %s", zError(ret)));
  }
  return buf;
}

absl::StatusOr<std::vector<uint8_t>> ZstdCompressCluster(std::span<const uint8_t> in) {
  std::unique_ptr<ZSTD_CCtx, decltype(&ZSTD_freeCCtx)> cctx(ZSTD_createCCtx(), &ZSTD_freeCCtx);
  if (cctx == nullptr) return absl::ResourceExhaustedError("cannot create zstd context");
  std::vector<uint8_t> buf(ZSTD_compressBound(in.size()));
  ZSTD_inBuffer input{in.data(), in.size(), 0};
  ZSTD_outBuffer output{buf.data(), buf.size(), 0};
  // With all input given and ZSTD_e_end, this writes one complete frame;
  // a non-zero result would mean the bound-sized buffer was too small.
  size_t ret = ZSTD_compressStream2(cctx.get(), &output, &input, ZSTD_e_end);
  if (ZSTD_isError(ret)) {
    return absl::InternalError(
        absl::StrFormat("zstd compression failed: %s", ZSTD_getErrorName(ret)));
  }
  if (ret != 0) return absl::InternalError("zstd compression did not finish the frame");
  buf.resize(output.pos);
  return buf;
}

}  // namespace

absl::Status DecompressCluster(CompressionType type, std::span<const uint8_t> in,
                               std::span<uint8_t> out) {
  switch (type) {
    case CompressionType::kDeflate:
      return InflateCluster(in, out);
    case CompressionType::kZstd:
      return ZstdDecompressCluster(in, out);
  }
  return absl::InvalidArgumentError("unknown compression type");
}

absl::StatusOr<std::vector<uint8_t>> CompressCluster(CompressionType type,
                                                     std::span<const uint8_t> in) {
  switch (type) {
    case CompressionType::kDeflate:
      return DeflateCluster(in);
    case CompressionType::kZstd:
      return ZstdCompressCluster(in);
  }
  return absl::InvalidArgumentError("unknown compression type");
}

}  // namespace qcow2fuse
