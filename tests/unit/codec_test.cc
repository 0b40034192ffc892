#include "data/codec.h"

#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace qcow2fuse {
namespace {

using Bytes = std::vector<uint8_t>;

constexpr size_t kClusterSizes[] = {512, 4096, 65536, 2 * 1024 * 1024};
constexpr size_t kCluster = 65536;
constexpr uint32_t kSeed = 20240611;

Bytes Zeros(size_t n) { return Bytes(n, 0); }

Bytes Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  Bytes b(n);
  for (uint8_t& c : b) c = static_cast<uint8_t>(rng());
  return b;
}

// Compressible but not trivial: words from a small vocabulary.
Bytes Text(size_t n) {
  static const char* const kWords[] = {"qcow2 ",    "cluster ",      "refcount ", "L2 table ",
                                       "snapshot ", "backing file ", "\n"};
  std::mt19937 rng(kSeed);
  Bytes b;
  while (b.size() < n) {
    const char* w = kWords[rng() % std::size(kWords)];
    b.insert(b.end(), w, w + std::strlen(w));
  }
  b.resize(n);
  return b;
}

Bytes Compress(CompressionType type, std::span<const uint8_t> in) {
  absl::StatusOr<Bytes> out = CompressCluster(type, in);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : Bytes();
}

Bytes Concat(Bytes a, const Bytes& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

void ExpectRoundTrip(CompressionType type, const Bytes& data) {
  Bytes compressed = Compress(type, data);
  Bytes out(data.size(), 0xAA);
  absl::Status st = DecompressCluster(type, compressed, out);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_TRUE(out == data);
}

void ExpectDataLoss(const absl::Status& st) {
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_FALSE(st.message().empty());
}

// A zlib-wrapped (RFC 1950) stream, as plain deflateInit writes it.
Bytes ZlibWrapped(const Bytes& data) {
  uLongf size = compressBound(data.size());
  Bytes out(size);
  EXPECT_EQ(compress(out.data(), &size, data.data(), data.size()), Z_OK);
  out.resize(size);
  return out;
}

TEST(CodecTest, DeflateRoundTripZeros) {
  for (size_t n : kClusterSizes) {
    SCOPED_TRACE(n);
    ExpectRoundTrip(CompressionType::kDeflate, Zeros(n));
  }
}

TEST(CodecTest, DeflateRoundTripRandom) {
  std::printf("seed %u\n", kSeed);
  for (size_t n : kClusterSizes) {
    SCOPED_TRACE(n);
    ExpectRoundTrip(CompressionType::kDeflate, Random(n, kSeed));
  }
}

TEST(CodecTest, DeflateRoundTripText) {
  for (size_t n : kClusterSizes) {
    SCOPED_TRACE(n);
    ExpectRoundTrip(CompressionType::kDeflate, Text(n));
  }
}

TEST(CodecTest, ZstdRoundTripZeros) {
  for (size_t n : kClusterSizes) {
    SCOPED_TRACE(n);
    ExpectRoundTrip(CompressionType::kZstd, Zeros(n));
  }
}

TEST(CodecTest, ZstdRoundTripRandom) {
  std::printf("seed %u\n", kSeed);
  for (size_t n : kClusterSizes) {
    SCOPED_TRACE(n);
    ExpectRoundTrip(CompressionType::kZstd, Random(n, kSeed));
  }
}

TEST(CodecTest, ZstdRoundTripText) {
  for (size_t n : kClusterSizes) {
    SCOPED_TRACE(n);
    ExpectRoundTrip(CompressionType::kZstd, Text(n));
  }
}

// The output must be what QEMU writes: raw deflate with a 4 KiB window,
// checked with zlib directly rather than through our own decoder.
TEST(CodecTest, DeflateOutputIsRawWith4KiBWindow) {
  // Random data repeated 8 KiB later: only an encoder with a window larger
  // than 4 KiB can refer back to the first copy.
  Bytes block = Random(8192, kSeed);
  Bytes data = Concat(block, block);
  Bytes compressed = Compress(CompressionType::kDeflate, data);
  EXPECT_GT(compressed.size(), data.size());
  z_stream s{};
  ASSERT_EQ(inflateInit2(&s, -12), Z_OK);
  Bytes out(data.size());
  s.next_in = compressed.data();
  s.avail_in = compressed.size();
  s.next_out = out.data();
  s.avail_out = out.size();
  EXPECT_EQ(inflate(&s, Z_FINISH), Z_STREAM_END);
  EXPECT_EQ(s.avail_in, 0u);
  inflateEnd(&s);
  EXPECT_TRUE(out == data);
}

TEST(CodecTest, ZstdOutputIsOneFrame) {
  Bytes compressed = Compress(CompressionType::kZstd, Text(kCluster));
  EXPECT_EQ(ZSTD_findFrameCompressedSize(compressed.data(), compressed.size()), compressed.size());
}

TEST(CodecTest, DeflateIgnoresTrailingGarbage) {
  Bytes data = Text(kCluster);
  Bytes in = Concat(Compress(CompressionType::kDeflate, data), Random(512, kSeed));
  Bytes out(kCluster);
  ASSERT_TRUE(DecompressCluster(CompressionType::kDeflate, in, out).ok());
  EXPECT_TRUE(out == data);
}

// Trailing garbage that is itself the start of another compressed cluster,
// as it is inside an image.
TEST(CodecTest, DeflateIgnoresFollowingCluster) {
  Bytes data = Random(kCluster, kSeed);
  Bytes in = Concat(Compress(CompressionType::kDeflate, data),
                    Compress(CompressionType::kDeflate, Text(kCluster)));
  Bytes out(kCluster);
  ASSERT_TRUE(DecompressCluster(CompressionType::kDeflate, in, out).ok());
  EXPECT_TRUE(out == data);
}

TEST(CodecTest, ZstdIgnoresTrailingBytes) {
  Bytes data = Text(kCluster);
  Bytes in = Concat(Compress(CompressionType::kZstd, data), Random(512, kSeed));
  Bytes out(kCluster);
  ASSERT_TRUE(DecompressCluster(CompressionType::kZstd, in, out).ok());
  EXPECT_TRUE(out == data);
}

TEST(CodecTest, ZstdAcceptsTwoFrames) {
  Bytes data = Text(kCluster);
  std::span<const uint8_t> all(data);
  Bytes in = Concat(Compress(CompressionType::kZstd, all.first(kCluster / 2)),
                    Compress(CompressionType::kZstd, all.subspan(kCluster / 2)));
  Bytes out(kCluster);
  ASSERT_TRUE(DecompressCluster(CompressionType::kZstd, in, out).ok());
  EXPECT_TRUE(out == data);
}

// Frames from other writers may lack the content size (so zstd decodes
// them in streaming mode) or carry a checksum after the last block; either
// way the frame must be seen as finished when the cluster is full.
TEST(CodecTest, ZstdAcceptsOtherFrameParameters) {
  Bytes data = Text(kCluster);
  for (ZSTD_cParameter param : {ZSTD_c_contentSizeFlag, ZSTD_c_checksumFlag}) {
    ZSTD_CCtx* cctx = ZSTD_createCCtx();
    ASSERT_NE(cctx, nullptr);
    ASSERT_FALSE(
        ZSTD_isError(ZSTD_CCtx_setParameter(cctx, param, param == ZSTD_c_checksumFlag ? 1 : 0)));
    // Small blocks of input, so the frame header cannot know the total.
    Bytes frame(ZSTD_compressBound(data.size()));
    ZSTD_outBuffer output{frame.data(), frame.size(), 0};
    for (size_t pos = 0; pos < data.size(); pos += 4096) {
      ZSTD_inBuffer input{data.data() + pos, 4096, 0};
      ZSTD_EndDirective end = pos + 4096 == data.size() ? ZSTD_e_end : ZSTD_e_continue;
      size_t ret = ZSTD_compressStream2(cctx, &output, &input, end);
      ASSERT_FALSE(ZSTD_isError(ret));
      if (end == ZSTD_e_end) {
        ASSERT_EQ(ret, 0u);  // The frame is complete.
      }
      ASSERT_EQ(input.pos, input.size);
    }
    ZSTD_freeCCtx(cctx);
    frame.resize(output.pos);
    if (param == ZSTD_c_contentSizeFlag) {
      EXPECT_EQ(ZSTD_getFrameContentSize(frame.data(), frame.size()), ZSTD_CONTENTSIZE_UNKNOWN);
    }
    Bytes out(kCluster);
    absl::Status st =
        DecompressCluster(CompressionType::kZstd, Concat(frame, Random(512, kSeed)), out);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_TRUE(out == data);
  }
}

TEST(CodecTest, DeflateTruncatedIsDataLoss) {
  Bytes in = Compress(CompressionType::kDeflate, Random(kCluster, kSeed));
  in.resize(in.size() / 2);
  Bytes out(kCluster);
  ExpectDataLoss(DecompressCluster(CompressionType::kDeflate, in, out));
}

TEST(CodecTest, ZstdTruncatedIsDataLoss) {
  Bytes in = Compress(CompressionType::kZstd, Random(kCluster, kSeed));
  in.resize(in.size() / 2);
  Bytes out(kCluster);
  ExpectDataLoss(DecompressCluster(CompressionType::kZstd, in, out));
}

TEST(CodecTest, EmptyInputIsDataLoss) {
  Bytes out(kCluster);
  ExpectDataLoss(DecompressCluster(CompressionType::kDeflate, {}, out));
  ExpectDataLoss(DecompressCluster(CompressionType::kZstd, {}, out));
}

TEST(CodecTest, DeflateShortStreamIsDataLoss) {
  Bytes in = Compress(CompressionType::kDeflate, Text(kCluster / 2));
  Bytes out(kCluster);
  absl::Status st = DecompressCluster(CompressionType::kDeflate, in, out);
  ExpectDataLoss(st);
  EXPECT_NE(st.message().find("ended after 32768 of 65536"), std::string::npos) << st;
}

TEST(CodecTest, ZstdShortStreamIsDataLoss) {
  Bytes in = Compress(CompressionType::kZstd, Text(kCluster / 2));
  Bytes out(kCluster);
  ExpectDataLoss(DecompressCluster(CompressionType::kZstd, in, out));
}

// QEMU's deflate decoder only asks for a full cluster; a stream that goes
// on is not checked further.
TEST(CodecTest, DeflateLongStreamFillsCluster) {
  Bytes data = Text(2 * kCluster);
  Bytes in = Compress(CompressionType::kDeflate, data);
  Bytes out(kCluster);
  ASSERT_TRUE(DecompressCluster(CompressionType::kDeflate, in, out).ok());
  EXPECT_TRUE(std::equal(out.begin(), out.end(), data.begin()));
}

// QEMU's zstd decoder, in contrast, rejects a frame unfinished at the end
// of the cluster.
TEST(CodecTest, ZstdFrameUnfinishedAtClusterEndIsDataLoss) {
  for (const Bytes& data : {Text(2 * kCluster), Random(2 * kCluster, kSeed)}) {
    Bytes in = Compress(CompressionType::kZstd, data);
    Bytes out(kCluster);
    ExpectDataLoss(DecompressCluster(CompressionType::kZstd, in, out));
  }
}

// A second frame beyond the cluster's end is trailing data, not an error.
TEST(CodecTest, ZstdSecondFrameAfterFullClusterIsIgnored) {
  Bytes data = Text(kCluster);
  Bytes in = Concat(Compress(CompressionType::kZstd, data),
                    Compress(CompressionType::kZstd, Random(kCluster, kSeed)));
  Bytes out(kCluster);
  ASSERT_TRUE(DecompressCluster(CompressionType::kZstd, in, out).ok());
  EXPECT_TRUE(out == data);
}

TEST(CodecTest, GarbageIsDataLoss) {
  std::printf("seed %u\n", kSeed);
  std::mt19937 rng(kSeed);
  for (int i = 0; i < 200; ++i) {
    size_t size = 1 + rng() % 4096;
    Bytes in = Random(size, rng());
    Bytes out(4096);
    SCOPED_TRACE(i);
    ExpectDataLoss(DecompressCluster(CompressionType::kDeflate, in, out));
    ExpectDataLoss(DecompressCluster(CompressionType::kZstd, in, out));
    // Garbage behind a valid zstd magic number reaches the frame parser.
    static constexpr uint8_t kZstdMagic[] = {0x28, 0xB5, 0x2F, 0xFD};
    in.resize(std::max(in.size(), sizeof kZstdMagic));
    std::copy(std::begin(kZstdMagic), std::end(kZstdMagic), in.begin());
    ExpectDataLoss(DecompressCluster(CompressionType::kZstd, in, out));
  }
}

TEST(CodecTest, ZlibWrappedStreamIsRejected) {
  for (const Bytes& data : {Text(kCluster), Zeros(kCluster), Random(kCluster, kSeed)}) {
    Bytes out(kCluster);
    ExpectDataLoss(DecompressCluster(CompressionType::kDeflate, ZlibWrapped(data), out));
  }
}

// A decoder reused after an error must start clean.
TEST(CodecTest, DecodesAfterError) {
  Bytes data = Text(kCluster);
  Bytes out(kCluster);
  for (CompressionType type : {CompressionType::kDeflate, CompressionType::kZstd}) {
    Bytes bad = Compress(type, data);
    bad.resize(bad.size() / 2);
    EXPECT_FALSE(DecompressCluster(type, bad, out).ok());
    ASSERT_TRUE(DecompressCluster(type, Compress(type, data), out).ok());
    EXPECT_TRUE(out == data);
  }
}

// Decoders are kept per thread; threads must not disturb each other.
TEST(CodecTest, DecodesConcurrently) {
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (uint32_t t = 0; t < 4; ++t) {
    threads.emplace_back([t, &failures] {
      for (int i = 0; i < 20; ++i) {
        for (CompressionType type : {CompressionType::kDeflate, CompressionType::kZstd}) {
          Bytes data = Random(kCluster / 2, t * 100 + i);
          data = Concat(data, Text(kCluster / 2));
          absl::StatusOr<Bytes> compressed = CompressCluster(type, data);
          Bytes out(kCluster);
          if (!compressed.ok() || !DecompressCluster(type, *compressed, out).ok() || out != data) {
            ++failures;
          }
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures, 0);
}

}  // namespace
}  // namespace qcow2fuse
