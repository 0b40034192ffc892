// Forced interleavings of requests that change the same clusters.
//
// Each test parks one request in the middle of its data write (GatedFile),
// starts a conflicting request, checks that it waits, releases the first,
// and then checks that the image is what one serial order gives and that
// `qemu-img check` finds it consistent. Without the cluster locks of
// Qcow2Layer, the discard in DiscardWaitsForCopyOnWrite would free the
// compressed cluster and the write would free it a second time when it
// links its copy: the refcount would go below zero.
//
// Two tests park a request where no cluster lock is in play, to check the
// caches and the flush around it: WriteIntoEvictedL2Slice lets the L2 slice
// of a parked write be written back and evicted, and
// FlushDoesNotWaitForWriteInFlight runs a flush while a write is parked.

#include <unistd.h>

#include <algorithm>
#include <map>
#include <memory>
#include <vector>

#include "absl/strings/str_format.h"
#include "base/endian.h"
#include "data/qcow2_layer.h"
#include "format/header.h"
#include "format/l2_entry.h"
#include "format/spec.h"
#include "gated_file.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "meta/table_cache.h"
#include "meta/zero_ranges.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"
#include "sched/range_lock.h"
#include "support/command.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kCluster = 65536;
constexpr uint64_t kDisk = 16 * kCluster;

class InterleaveTest : public ::testing::Test {
 protected:
  // Makes the image (`qemu_io` commands applied) and opens it read-write
  // through a GatedFile.
  void Open(const std::vector<std::string>& qemu_io, const std::string& create_options = "",
            uint64_t disk = kDisk, uint64_t l2_cache_size = ImageOptions().l2_cache_size) {
    absl::StatusOr<TempDir> dir = TempDir::Create("interleave");
    ASSERT_OK(dir.status());
    dir_ = std::make_unique<TempDir>(std::move(*dir));
    path_ = dir_->Join("a.qcow2");
    std::vector<std::string> create = {"create", "-q", "-f", "qcow2", "-o",
                                       "cluster_size=64k" + create_options, path_, std::to_string(disk)};
    ASSERT_OK(QemuImg(create).status());
    if (!qemu_io.empty()) {
      ASSERT_OK(QemuIo(path_, "qcow2", qemu_io));
    }

    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path_, /*writable=*/true);
    ASSERT_OK(file.status());
    std::vector<uint8_t> head(std::min<uint64_t>(kCluster, (*file)->size()));
    ASSERT_OK(SyncWait((*file)->Read(0, head)));
    absl::StatusOr<Header> header = DecodeHeader(head, (*file)->size());
    ASSERT_OK(header.status());
    auto gated = std::make_unique<GatedFile>(std::move(*file));
    gated_ = gated.get();
    ImageOptions options;
    options.read_only = false;
    options.l2_cache_size = l2_cache_size;
    auto layer = SyncWait(Qcow2Layer::Open(std::move(gated), *header, nullptr, nullptr, options));
    ASSERT_OK(layer.status());
    layer_ = std::move(*layer);
  }

  // A test that failed with a write still parked lets it finish, so its
  // coroutine does not outlive the layer it runs in.
  void TearDown() override {
    if (layer_ != nullptr && gated_->holding()) gated_->Release();
  }

  std::vector<uint8_t> ReadDisk(uint64_t offset, uint64_t length) {
    std::vector<uint8_t> out(length);
    EXPECT_OK(SyncWait(layer_->Read(offset, out)));
    return out;
  }

  // Flushes, closes, and has QEMU judge the image.
  void CloseAndCheck() {
    ASSERT_OK(SyncWait(layer_->Flush()));
    layer_.reset();
    EXPECT_OK(CheckImage(path_));
  }

  // The image as another process sees it now: the file, read past every
  // cache of the layer under test (which takes no image locks, so a
  // read-only open sharing everything is allowed while it is open).
  std::unique_ptr<Image> OpenFresh() {
    ImageOptions options;
    options.force_share = true;
    absl::StatusOr<std::unique_ptr<Image>> image = SyncWait(Image::Open(path_, options));
    EXPECT_OK(image.status());
    return image.ok() ? std::move(*image) : nullptr;
  }

  // The L2 entry of the cluster holding `guest_offset`, decoded from the
  // file itself; an empty entry where the file has no L2 table for it.
  L2Entry EntryInFile(uint64_t guest_offset) {
    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path_, /*writable=*/false);
    EXPECT_OK(file.status());
    if (!file.ok()) return {};
    std::vector<uint8_t> head(std::min<uint64_t>(kCluster, (*file)->size()));
    EXPECT_OK(SyncWait((*file)->Read(0, head)));
    absl::StatusOr<Header> header = DecodeHeader(head, (*file)->size());
    EXPECT_OK(header.status());
    if (!header.ok()) return {};
    const uint64_t cluster = guest_offset >> header->cluster_bits;
    uint8_t raw[spec::kL2EntrySize];
    EXPECT_OK(SyncWait((*file)->Read(header->l1_table_offset + cluster / header->l2_entries() * spec::kL2EntrySize, raw)));
    const uint64_t l2 = L1EntryL2Offset(LoadBE64(raw));
    if (l2 == 0) return {};
    EXPECT_OK(SyncWait((*file)->Read(l2 + cluster % header->l2_entries() * spec::kL2EntrySize, raw)));
    return DecodeL2Entry(raw, L2Format{.extended_l2 = false, .external_data_file = false,
                                       .cluster_bits = header->cluster_bits});
  }

  // The data cluster `entry` points to, read from the file.
  std::vector<uint8_t> HostCluster(const L2Entry& entry) {
    std::vector<uint8_t> out(kCluster);
    absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path_, /*writable=*/false);
    EXPECT_OK(file.status());
    if (file.ok()) {
      EXPECT_OK(SyncWait((*file)->Read(L2EntryHostOffset(entry), out)));
    }
    return out;
  }

  static std::span<const uint8_t> Fill(std::vector<uint8_t>& buffer, uint8_t byte, size_t n) {
    buffer.assign(n, byte);
    return buffer;
  }

  std::unique_ptr<TempDir> dir_;
  std::string path_;
  GatedFile* gated_ = nullptr;
  std::unique_ptr<Qcow2Layer> layer_;
};

bool IsClusterWrite(uint64_t, size_t length) { return length == kCluster; }

// Matches the data write of a request whose bytes are all `byte` (and no
// table write is): the gate parks exactly it, whatever size the engine
// gives it.
GatedFile::DataMatch CarriesOnly(uint8_t byte) {
  return [byte](uint64_t, std::span<const uint8_t> data) {
    return !data.empty() && std::all_of(data.begin(), data.end(), [byte](uint8_t b) { return b == byte; });
  };
}

TEST_F(InterleaveTest, DiscardWaitsForCopyOnWrite) {
  Open({"write -c -P 0x11 0 64k"});
  gated_->HoldNextWrite(IsClusterWrite);
  std::vector<uint8_t> data;
  Started write(layer_->Write(4096, Fill(data, 0x22, 4096)));
  ASSERT_TRUE(gated_->holding()) << "the copy-on-write did not reach its data write";
  Started discard(layer_->Discard(0, kCluster));
  EXPECT_FALSE(discard.done()) << "the discard ran while a write into its cluster was in flight";
  gated_->Release();
  ASSERT_TRUE(write.done());
  ASSERT_TRUE(discard.done());
  EXPECT_OK(write.status());
  EXPECT_OK(discard.status());
  // The serial order write, then discard.
  EXPECT_EQ(ReadDisk(0, kCluster), std::vector<uint8_t>(kCluster, 0));
  CloseAndCheck();
}

TEST_F(InterleaveTest, WriteWaitsForPartialDiscard) {
  Open({"write -c -P 0x11 0 64k"});
  gated_->HoldNextWrite(IsClusterWrite);
  // A discard of part of a compressed cluster copies it with zeros in place.
  Started discard(layer_->Discard(0, 4096));
  ASSERT_TRUE(gated_->holding());
  std::vector<uint8_t> data;
  Started write(layer_->Write(8192, Fill(data, 0x33, 4096)));
  EXPECT_FALSE(write.done());
  gated_->Release();
  ASSERT_TRUE(discard.done());
  ASSERT_TRUE(write.done());
  EXPECT_OK(discard.status());
  EXPECT_OK(write.status());
  std::vector<uint8_t> expect(kCluster, 0x11);
  std::fill(expect.begin(), expect.begin() + 4096, 0);
  std::fill(expect.begin() + 8192, expect.begin() + 12288, 0x33);
  EXPECT_EQ(ReadDisk(0, kCluster), expect);
  CloseAndCheck();
}

TEST_F(InterleaveTest, TwoPartialWritesIntoOneUnallocatedCluster) {
  Open({});
  // The new cluster lies past the end of the file, so its data write is
  // the guest's 4 KiB alone (no cluster of zeros around it).
  gated_->HoldNextWriteOf(CarriesOnly(0x44));
  std::vector<uint8_t> a, b;
  Started first(layer_->Write(0, Fill(a, 0x44, 4096)));
  ASSERT_TRUE(gated_->holding()) << "the write did not reach its data write";
  Started second(layer_->Write(32768, Fill(b, 0x55, 4096)));
  EXPECT_FALSE(second.done()) << "both writes would allocate a copy and one would be lost";
  gated_->Release();
  ASSERT_TRUE(first.done() && second.done());
  EXPECT_OK(first.status());
  EXPECT_OK(second.status());
  std::vector<uint8_t> expect(kCluster, 0);
  std::fill(expect.begin(), expect.begin() + 4096, 0x44);
  std::fill(expect.begin() + 32768, expect.begin() + 36864, 0x55);
  EXPECT_EQ(ReadDisk(0, kCluster), expect);
  CloseAndCheck();
}

TEST_F(InterleaveTest, RequestsOnOtherClustersDoNotWait) {
  Open({"write -c -P 0x11 0 64k"});
  gated_->HoldNextWrite(IsClusterWrite);
  std::vector<uint8_t> a, b;
  Started cow(layer_->Write(0, Fill(a, 0x66, 512)));
  ASSERT_TRUE(gated_->holding());
  Started other(layer_->Write(5 * kCluster, Fill(b, 0x77, 512)));
  Started discard(layer_->Discard(8 * kCluster, 2 * kCluster));
  Started read_zero(layer_->WriteZeroes(12 * kCluster, kCluster, /*may_unmap=*/true));
  EXPECT_TRUE(other.done());
  EXPECT_TRUE(discard.done());
  EXPECT_TRUE(read_zero.done());
  // Reads take no lock: the compressed data is still there to read.
  EXPECT_EQ(ReadDisk(kCluster - 512, 512), std::vector<uint8_t>(512, 0x11));
  gated_->Release();
  ASSERT_TRUE(cow.done());
  EXPECT_OK(cow.status());
  EXPECT_EQ(ReadDisk(0, 512), std::vector<uint8_t>(512, 0x66));
  EXPECT_EQ(ReadDisk(5 * kCluster, 512), std::vector<uint8_t>(512, 0x77));
  CloseAndCheck();
}

// The guest bytes the serial order of a test's writes gives, cluster by
// cluster (each write stays inside one cluster). Clusters never written
// read as zeros: these images have no backing file.
class DiskModel {
 public:
  void Write(uint64_t offset, std::span<const uint8_t> data) {
    const uint64_t cluster = offset / kCluster * kCluster;
    ASSERT_LE(offset + data.size(), cluster + kCluster) << "the model keeps each write in one cluster";
    std::vector<uint8_t>& bytes = clusters_[cluster];
    bytes.resize(kCluster, 0);
    std::copy(data.begin(), data.end(), bytes.begin() + (offset - cluster));
  }

  // Compares every written cluster with `image`, and checks that no other
  // cluster holds data, so all of the disk is compared.
  void Expect(Image& image) const {
    for (const auto& [cluster, bytes] : clusters_) {
      std::vector<uint8_t> got(kCluster);
      ASSERT_OK(SyncWait(image.Read(cluster, got)));
      EXPECT_EQ(got, bytes) << "guest cluster at " << cluster;
    }
    absl::StatusOr<uint64_t> allocated = SyncWait(image.AllocatedBytes());
    ASSERT_OK(allocated.status());
    EXPECT_EQ(*allocated, clusters_.size() * kCluster) << "data where no write went";
  }

 private:
  std::map<uint64_t, std::vector<uint8_t>> clusters_;
};

// An entry that links a data cluster of its own, as a completed write leaves it.
void ExpectLinked(const L2Entry& entry, const char* what) {
  EXPECT_NE(L2EntryHostOffset(entry), 0u) << what << " has no host cluster in the file";
  EXPECT_NE(entry.descriptor & spec::kOflagCopied, 0u) << what << " lacks the COPIED flag";
  EXPECT_EQ(entry.descriptor & spec::kOflagCompressed, 0u) << what;
}


// A write parked in its data write holds no reference to its L2 slice: the
// table cache pins nothing for a writer (readers hold a slice only while
// they decode it), so the slice can be written back and evicted under it.
// Here the smallest L2 cache the engine allows fills with writes to other
// slices; over capacity, one of them flushes, which writes back the slice
// (dirty with the entries of a write before and a write during the parked
// one) and evicts it. The parked write must read it back from the file and
// store its entry beside the others. Were a dirty slice evicted, or the
// entry stored into a table the cache had dropped, an entry would be lost.
TEST_F(InterleaveTest, WriteIntoEvictedL2Slice) {
  const uint32_t slice_bytes = L2SliceSize(kCluster);
  const uint64_t slice_span = slice_bytes / spec::kL2EntrySize * kCluster;  // guest bytes per slice
  // A TableCache raises any smaller capacity to this many slices.
  const uint64_t min_slices = TableCache(nullptr, slice_bytes, 0).capacity();
  // Twice the cache: the first flush over capacity evicts the coldest clean
  // slice, and the writes after it leave no room for it to come back.
  const uint64_t other_slices = 2 * min_slices;
  // Slice 0 for the three writes that share one, then one slice per other
  // write; with 64 KiB clusters an L2 table is 16 slices, so they span
  // several L2 tables, created as they go.
  Open({}, "", (1 + other_slices) * slice_span, min_slices * slice_bytes);
  if (HasFatalFailure()) return;

  // Three clusters mapped by slice 0: before, parked, during.
  constexpr uint64_t kBefore = 0, kParked = kCluster, kDuring = 2 * kCluster;
  constexpr uint8_t kBeforeByte = 0xb0, kParkedByte = 0xa0, kDuringByte = 0xc0;
  DiskModel model;
  std::vector<uint8_t> before, parked, during, other;

  Started first(layer_->Write(kBefore, Fill(before, kBeforeByte, kCluster)));
  ASSERT_TRUE(first.done());
  ASSERT_OK(first.status());
  model.Write(kBefore, before);

  gated_->HoldNextWriteOf(CarriesOnly(kParkedByte));
  Started write(layer_->Write(kParked, Fill(parked, kParkedByte, kCluster)));
  ASSERT_TRUE(gated_->holding()) << "the write did not reach its data write";
  model.Write(kParked, parked);

  // Started, not SyncWait: a request that waited for the parked one would
  // hang SyncWait; here it fails the test instead.
  Started meanwhile(layer_->Write(kDuring, Fill(during, kDuringByte, kCluster)));
  ASSERT_TRUE(meanwhile.done()) << "a write to another cluster of the slice waited for the parked one";
  ASSERT_OK(meanwhile.status());
  model.Write(kDuring, during);

  for (uint64_t s = 1; s <= other_slices; ++s) {
    const uint64_t offset = s * slice_span;
    const uint8_t byte = static_cast<uint8_t>(s);  // a pattern per slice (fewer than 256 of them)
    Started evict(layer_->Write(offset, Fill(other, byte, kCluster)));
    ASSERT_TRUE(evict.done()) << "the write to slice " << s << " waited for the parked write";
    ASSERT_OK(evict.status());
    model.Write(offset, other);
  }

  // The cache had to flush to make room: slice 0 went to the file with the
  // entries stored so far, and without the parked write's.
  ExpectLinked(EntryInFile(kBefore), "the entry written before");
  ExpectLinked(EntryInFile(kDuring), "the entry written meanwhile");
  EXPECT_EQ(EntryInFile(kParked).descriptor, 0u) << "the parked write's entry is in the file before its data";

  const uint64_t slice_reads = layer_->counters().l2_slice_reads;
  gated_->Release();
  ASSERT_TRUE(write.done());
  ASSERT_OK(write.status());
  // Storing the entry missed the cache: slice 0 had been evicted while the
  // write was parked. Otherwise the test forced no eviction and proves
  // nothing (the cache would pin slices, or be bigger than thought).
  EXPECT_GT(layer_->counters().l2_slice_reads, slice_reads)
      << "slice 0 was still cached when the parked write stored its entry";

  CloseAndCheck();
  const L2Entry entry = EntryInFile(kParked);
  ExpectLinked(entry, "the parked write's entry");
  EXPECT_EQ(HostCluster(entry), parked);
  ExpectLinked(EntryInFile(kBefore), "the entry written before");
  ExpectLinked(EntryInFile(kDuring), "the entry written meanwhile");
  std::unique_ptr<Image> fresh = OpenFresh();
  ASSERT_NE(fresh, nullptr);
  model.Expect(*fresh);
}

// "Flush waits for every write that completed before it, and nothing else"
// (Image::Flush, which is Qcow2Layer::Flush). A write parked in its data
// write holds its cluster lock and no other, so a flush must finish while
// it is parked, and must have made durable the write that completed
// before it: its data and L2 entry are in the file, followed by a barrier.
// The parked write's cluster, allocated but not yet linked, may meanwhile
// leak on disk (the crash guarantee) and nothing worse.
//
// Everything runs on this thread, so a flush that waited for the parked
// write would show as not done, never as a hang.
TEST_F(InterleaveTest, FlushDoesNotWaitForWriteInFlight) {
  Open({});
  if (HasFatalFailure()) return;
  // Two clusters mapped by one L2 slice: the flush writes back the slice
  // the parked write changes later.
  constexpr uint64_t kCompleted = kCluster, kParked = 2 * kCluster;
  constexpr uint8_t kCompletedByte = 0xd1, kParkedByte = 0xd2;
  // Writes whose clusters the flush may leave leaked on disk: the parked one.
  constexpr uint64_t kWritesInFlight = 1;
  DiskModel model;
  std::vector<uint8_t> completed, parked;

  Started first(layer_->Write(kCompleted, Fill(completed, kCompletedByte, kCluster)));
  ASSERT_TRUE(first.done());
  ASSERT_OK(first.status());
  model.Write(kCompleted, completed);

  gated_->HoldNextWriteOf(CarriesOnly(kParkedByte));
  Started write(layer_->Write(kParked, Fill(parked, kParkedByte, kCluster)));
  ASSERT_TRUE(gated_->holding()) << "the write did not reach its data write";

  Started flush(layer_->Flush());
  EXPECT_TRUE(flush.done()) << "the flush waits for a write still in flight";
  EXPECT_TRUE(gated_->holding());
  if (flush.done()) {
    EXPECT_OK(flush.status());
    EXPECT_EQ(gated_->writes_since_flush(), 0u) << "the flush returned before a barrier covered all it wrote";
    const L2Entry entry = EntryInFile(kCompleted);
    ExpectLinked(entry, "the completed write's entry");
    EXPECT_EQ(HostCluster(entry), completed);
    EXPECT_EQ(EntryInFile(kParked).descriptor, 0u) << "the parked write's entry is in the file before its data";
    // The completed write, and nothing of the parked one.
    if (std::unique_ptr<Image> fresh = OpenFresh()) model.Expect(*fresh);
    // The file as a crash now would leave it.
    absl::StatusOr<QemuCheckReport> check = QemuCheck(path_);
    EXPECT_OK(check.status());
    if (check.ok()) {
      EXPECT_EQ(check->corruptions, 0u) << check->output;
      EXPECT_EQ(check->check_errors, 0u) << check->output;
      EXPECT_LE(check->leaks, kWritesInFlight) << check->output;
    }
  }

  gated_->Release();
  ASSERT_TRUE(write.done());
  ASSERT_OK(write.status());
  model.Write(kParked, parked);
  ASSERT_TRUE(flush.done()) << "the flush did not finish even after the parked write did";
  EXPECT_OK(flush.status());
  Started second(layer_->Flush());
  ASSERT_TRUE(second.done());
  ASSERT_OK(second.status());
  EXPECT_EQ(gated_->writes_since_flush(), 0u);
  ExpectLinked(EntryInFile(kCompleted), "the completed write's entry");
  const L2Entry entry = EntryInFile(kParked);
  ExpectLinked(entry, "the parked write's entry");
  EXPECT_EQ(HostCluster(entry), parked);

  CloseAndCheck();
  std::unique_ptr<Image> fresh = OpenFresh();
  ASSERT_NE(fresh, nullptr);
  model.Expect(*fresh);
}

TEST(RangeLockTest, OverlappingRequestsWaitInArrivalOrder) {
  RangeLock lock;
  std::vector<int> order;
  auto take = [&](uint64_t first, uint64_t last, int id, RangeLock::Guard* keep) -> Task<absl::Status> {
    RangeLock::Guard guard = co_await lock.Lock(first, last);
    order.push_back(id);
    if (keep != nullptr) *keep = std::move(guard);
    co_return absl::OkStatus();
  };
  RangeLock::Guard held;
  Started a(take(0, 9, 1, &held));  // holds 0..9
  Started b(take(5, 5, 2, nullptr));   // waits for a
  Started c(take(20, 30, 3, nullptr)); // disjoint: goes at once
  Started d(take(9, 20, 4, nullptr));  // waits for a (and arrived after b)
  EXPECT_TRUE(a.done());
  EXPECT_FALSE(b.done());
  EXPECT_TRUE(c.done());
  EXPECT_FALSE(d.done());
  EXPECT_EQ(lock.held(), 1u);
  EXPECT_EQ(lock.waiting(), 2u);
  held.Release();
  EXPECT_TRUE(b.done());
  EXPECT_TRUE(d.done());
  EXPECT_EQ(order, (std::vector<int>{1, 3, 2, 4}));
  EXPECT_EQ(lock.held() + lock.waiting(), 0u);
}

TEST(ZeroRangesTest, AddMergesAndRemoveSplits) {
  ZeroRanges z;
  z.Add(0, 100);
  z.Add(100, 200);  // adjacent: one run
  z.Add(300, 400);
  EXPECT_EQ(z.runs(), 2u);
  EXPECT_EQ(z.ZeroRunAt(50), 150u);
  EXPECT_EQ(z.ZeroRunAt(200), 0u);
  EXPECT_TRUE(z.Contains(300, 400));
  EXPECT_FALSE(z.Contains(150, 350));
  z.Remove(120, 130);
  EXPECT_EQ(z.ZeroRunAt(50), 70u);
  EXPECT_EQ(z.ZeroRunAt(130), 70u);
  z.Remove(0, 1000);
  EXPECT_EQ(z.runs(), 0u);
  z.Add(10, 20);
  z.Add(5, 30);  // swallows
  EXPECT_EQ(z.runs(), 1u);
  EXPECT_EQ(z.ZeroRunAt(5), 25u);
}

// --- Reads beside frees: no recycled clusters -----------------------------------

// A read that has mapped a host cluster reads it after its mapping is gone:
// here cluster 0 is discarded and the discard flushed while the read waits
// between its L2 lookup and its host read. The freed host cluster must not
// be handed to another write before that read is done, or the read returns
// another offset's data.
TEST_F(InterleaveTest, ReadParkedBeforeItsHostReadKeepsItsCluster) {
  Open({"write -P 0x11 0 64k", "write -P 0x22 64k 64k"});
  const uint64_t host0 = L2EntryHostOffset(EntryInFile(0));
  ASSERT_NE(host0, 0u);
  // L2 slices are 4 KiB: the only 64 KiB read is the data read of cluster 0.
  gated_->HoldNextRead([](uint64_t, size_t n) { return n == kCluster; });
  std::vector<uint8_t> got(kCluster);
  Started read(layer_->Read(0, got));
  ASSERT_TRUE(gated_->holding_read()) << "the read did not reach its host read";

  ASSERT_OK(SyncWait(layer_->Discard(0, kCluster)));
  ASSERT_OK(SyncWait(layer_->Flush()));
  std::vector<uint8_t> other;
  ASSERT_OK(SyncWait(layer_->Write(5 * kCluster, Fill(other, 0x55, kCluster))));
  ASSERT_OK(SyncWait(layer_->Flush()));
  EXPECT_NE(L2EntryHostOffset(EntryInFile(5 * kCluster)), host0)
      << "the host cluster of a read in flight was given to another write";

  gated_->ReleaseRead();
  ASSERT_TRUE(read.done());
  EXPECT_OK(read.status());
  EXPECT_EQ(got, std::vector<uint8_t>(kCluster, 0x11)) << "the read returned another offset's data";
  // With the read done, the next flush frees the old cluster: no leak.
  CloseAndCheck();
}

// A spliced reply (SendStored) reads its bytes from the file descriptor
// inside `send`: until that returns, its host clusters must not go to
// another write, as for a read parked before its host read above. Here the
// discard, the flush that would free the clusters and the write that would
// take them all run inside `send`.
TEST_F(InterleaveTest, SendStoredKeepsItsClustersUntilSendReturns) {
  Open({"write -P 0x11 0 128k", "write -P 0x22 128k 64k"});
  const uint64_t host0 = L2EntryHostOffset(EntryInFile(0));
  ASSERT_NE(host0, 0u);
  std::vector<uint8_t> got(2 * kCluster);
  uint64_t taken = 0;
  absl::StatusOr<bool> sent = SyncWait(layer_->SendStored(0, 2 * kCluster, [&](int fd, uint64_t file_offset) {
    EXPECT_EQ(file_offset, host0);
    ASSERT_OK(SyncWait(layer_->Discard(0, 2 * kCluster)));
    ASSERT_OK(SyncWait(layer_->Flush()));
    std::vector<uint8_t> other;
    ASSERT_OK(SyncWait(layer_->Write(5 * kCluster, Fill(other, 0x55, 2 * kCluster))));
    ASSERT_OK(SyncWait(layer_->Flush()));
    taken = L2EntryHostOffset(EntryInFile(5 * kCluster));
    EXPECT_EQ(pread(fd, got.data(), got.size(), file_offset), static_cast<ssize_t>(got.size()));
  }));
  ASSERT_OK(sent.status());
  EXPECT_TRUE(*sent);
  EXPECT_NE(taken, 0u);
  EXPECT_TRUE(taken + 2 * kCluster <= host0 || taken >= host0 + 2 * kCluster)
      << "the host clusters of a reply being sent were given to another write";
  EXPECT_EQ(got, std::vector<uint8_t>(2 * kCluster, 0x11)) << "the reply would carry another offset's data";
  CloseAndCheck();
}

// SendStored hands over only a range that is one run of plain bytes in the
// file; anything else is left to Read, and `send` is not called.
TEST_F(InterleaveTest, SendStoredTakesOnlyOneContiguousRunOfData) {
  // Clusters 0-1 data, 2 a zero cluster, 3 unallocated, 4 and 5 data
  // written in reverse order, so not one run in the file, 6 compressed.
  Open({"write -P 0x11 0 128k", "write -z 128k 64k", "write -P 0x55 320k 64k", "write -P 0x44 256k 64k",
        "write -c -P 0x66 384k 64k"});
  struct Case {
    uint64_t offset;
    uint64_t length;
    bool sent;
  };
  for (const Case& c : std::vector<Case>{{0, 2 * kCluster, true},
                                         {4096, kCluster, true},
                                         {0, 3 * kCluster, false},             // runs into the zero cluster
                                         {2 * kCluster, kCluster, false},      // zeros
                                         {3 * kCluster, kCluster, false},      // unallocated
                                         {4 * kCluster, 2 * kCluster, false},  // two runs in the file
                                         {4 * kCluster, kCluster, true},
                                         {5 * kCluster, kCluster, true},
                                         {6 * kCluster, kCluster, false}}) {  // compressed
    SCOPED_TRACE(absl::StrFormat("[%u, +%u)", c.offset, c.length));
    bool called = false;
    std::vector<uint8_t> got(c.length);
    absl::StatusOr<bool> sent = SyncWait(layer_->SendStored(c.offset, c.length, [&](int fd, uint64_t file_offset) {
      called = true;
      EXPECT_EQ(pread(fd, got.data(), got.size(), file_offset), static_cast<ssize_t>(got.size()));
    }));
    ASSERT_OK(sent.status());
    EXPECT_EQ(*sent, c.sent);
    EXPECT_EQ(called, c.sent);
    if (c.sent) {
      EXPECT_EQ(got, ReadDisk(c.offset, c.length));
    }
  }
  // Image::SendStored checks the range as Read does.
  std::unique_ptr<Image> image = OpenFresh();
  ASSERT_NE(image, nullptr);
  auto never = [](int, uint64_t) { ADD_FAILURE() << "send called"; };
  EXPECT_EQ(SyncWait(image->SendStored(kDisk - kCluster, 2 * kCluster, never)).status().code(),
            absl::StatusCode::kOutOfRange);
  absl::StatusOr<bool> whole = SyncWait(image->SendStored(0, 2 * kCluster, [](int, uint64_t) {}));
  ASSERT_OK(whole.status());
  EXPECT_TRUE(*whole);
}

// A cache fill is slow; meanwhile a write changes an entry of the same L2
// slice, a flush writes the slice back and other reads evict it. The fill
// must not then install the slice as it was before the write: later reads
// would miss the write, and the next change would write the old entries
// back to disk.
TEST_F(InterleaveTest, StaleCacheFillIsNotInstalled) {
  constexpr uint64_t kSliceSpan = 512 * kCluster;  // guest bytes one 4 KiB L2 slice maps
  constexpr int kSlices = 20;                      // more than the smallest cache holds (16)
  std::vector<std::string> setup;
  for (int i = 0; i < kSlices; ++i) setup.push_back("write -P 0x01 " + std::to_string(i * kSliceSpan) + " 512");
  Open(setup, "", kSlices * kSliceSpan, /*l2_cache_size=*/0);
  // The cache is cold: the reader's first read is its L2 slice, which
  // returns what the file held before the write.
  gated_->HoldNextReadResult([](uint64_t, size_t n) { return n == 4096; });
  std::vector<uint8_t> got(4096);
  Started reader(layer_->Read(kCluster, got));
  ASSERT_TRUE(gated_->holding_read()) << "the read did not reach its L2 slice fill";

  std::vector<uint8_t> data;
  ASSERT_OK(SyncWait(layer_->Write(kCluster, Fill(data, 0x77, 4096))));
  ASSERT_OK(SyncWait(layer_->Flush()));
  const uint64_t misses = layer_->counters().l2_slice_reads;
  for (int i = 1; i < kSlices; ++i) ReadDisk(i * kSliceSpan, 512);
  EXPECT_GE(layer_->counters().l2_slice_reads, misses + kSlices - 1) << "the other slices were not read";

  gated_->ReleaseRead();
  ASSERT_TRUE(reader.done());
  EXPECT_OK(reader.status());  // zeros or the write: either order is fine
  EXPECT_EQ(ReadDisk(kCluster, 4096), std::vector<uint8_t>(4096, 0x77)) << "an old L2 slice was installed";
  // The next change of the slice must keep the write's entry on disk.
  ASSERT_OK(SyncWait(layer_->Write(2 * kCluster, Fill(data, 0x78, 4096))));
  ASSERT_OK(SyncWait(layer_->Flush()));
  ExpectLinked(EntryInFile(kCluster), "the written cluster's entry");
  CloseAndCheck();
}

// A discard in an L2 range with no table knows the range reads as zeros,
// but it holds only its own clusters: a write to another cluster of the
// range may be creating the table right then. Parked while writing that
// table, the write must still read back once it completes.
TEST_F(InterleaveTest, DiscardBesideTableCreationDoesNotHideTheWrite) {
  // A version 2 image shrunk and grown again: the clusters past the shrink
  // are no longer recorded as known zero (version 2 has no zero clusters,
  // so growing records nothing), and the discard looks at the L1 entry.
  Open({}, ",compat=0.10");
  ASSERT_OK(SyncWait(layer_->Truncate(kCluster)));
  ASSERT_OK(SyncWait(layer_->Truncate(kDisk)));
  // The write's data (4 KiB past the end of the file) goes first; the next
  // cluster-sized write is its new L2 table.
  gated_->HoldNextWrite(IsClusterWrite);
  std::vector<uint8_t> data;
  Started write(layer_->Write(3 * kCluster, Fill(data, 0x44, 4096)));
  ASSERT_TRUE(gated_->holding()) << "the write did not reach its L2 table";
  Started discard(layer_->Discard(8 * kCluster, kCluster));
  EXPECT_TRUE(discard.done()) << "a discard of another cluster waited";
  gated_->Release();
  ASSERT_TRUE(write.done());
  EXPECT_OK(write.status());
  EXPECT_OK(discard.status());
  EXPECT_EQ(ReadDisk(3 * kCluster, 4096), std::vector<uint8_t>(4096, 0x44))
      << "the discard marked the write's cluster as known to be zero";
  CloseAndCheck();
}

// A removal that cuts through several runs keeps both cut ends (btree
// insertions invalidate iterators: the ends are put back after the loop).
TEST(ZeroRangesTest, RemoveAcrossSeveralRuns) {
  ZeroRanges z;
  z.Add(0, 10);
  z.Add(20, 30);
  z.Add(40, 50);
  z.Remove(5, 45);
  EXPECT_EQ(z.runs(), 2u);
  EXPECT_EQ(z.ZeroRunAt(0), 5u);
  EXPECT_EQ(z.ZeroRunAt(25), 0u);
  EXPECT_EQ(z.ZeroRunAt(45), 5u);
}

}  // namespace
}  // namespace qcow2fuse::test
