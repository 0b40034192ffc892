// HeaderWriter: a header switch that fails never leaves a field half
// changed. The faults come from FaultFile: a short write lands half the
// bytes; a full disk refuses the write that would put the old ones back.

#include "meta/header_writer.h"

#include <errno.h>

#include <memory>

#include "absl/strings/match.h"
#include "fault_file.h"
#include "gtest/gtest.h"
#include "io/block_file.h"
#include "qcow2_builder.h"  // Bytes, Pattern
#include "qcow2fuse/status.h"
#include "support/status_testing.h"

namespace qcow2fuse::test {
namespace {

constexpr uint64_t kAt = 48;  // where the refcount table's fields lie

Bytes Slice(const Bytes& b, uint64_t at, size_t n) { return Bytes(b.begin() + at, b.begin() + at + n); }

TEST(HeaderWriterTest, SwitchWritesTheNewBytesAndABarrier) {
  const Bytes image = Pattern(512, 1);
  std::unique_ptr<BlockFile> mem = NewMemFile("header.qcow2", image);
  auto state = std::make_shared<FaultState>(Fault{});
  FaultFile file(*mem, state);
  HeaderWriter writer(&file);
  const Bytes now = Pattern(12, 2);
  ASSERT_OK(SyncWait(writer.Switch(kAt, now, Slice(image, kAt, 12))));
  ASSERT_OK_AND_ASSIGN(Bytes after, MemFileContents(*mem));
  EXPECT_EQ(Slice(after, kAt, 12), now);
  EXPECT_EQ(state->calls(HostOp::kFlush), 1u);
  EXPECT_FALSE(writer.unsettled());
}

// A switch that meets `fault` fails with `error` and leaves the old bytes,
// with nothing left to settle.
void ExpectUndone(Fault fault, int error) {
  const Bytes image = Pattern(512, 1);
  std::unique_ptr<BlockFile> mem = NewMemFile("header.qcow2", image);
  auto state = std::make_shared<FaultState>(fault);
  FaultFile file(*mem, state);
  HeaderWriter writer(&file);
  const absl::Status s = SyncWait(writer.Switch(kAt, Pattern(12, 2), Slice(image, kAt, 12)));
  EXPECT_EQ(StatusErrno(s), error) << s;
  EXPECT_TRUE(state->fired());
  ASSERT_OK_AND_ASSIGN(Bytes after, MemFileContents(*mem));
  EXPECT_EQ(after, image) << "the header keeps some of the new bytes";
  EXPECT_FALSE(writer.unsettled());
}

// Half the bytes land, then ENOSPC: the old bytes are written back at once.
TEST(HeaderWriterTest, AShortWriteIsUndone) {
  ExpectUndone(Fault{.mode = Fault::kShort, .op = HostOp::kWrite, .nth = 1, .error = ENOSPC}, ENOSPC);
}

// A failed barrier: the new bytes may or may not be on the disk, and the
// caller keeps its old state, so the old bytes go back.
TEST(HeaderWriterTest, AFailedBarrierIsUndone) {
  ExpectUndone(Fault{.mode = Fault::kOnce, .op = HostOp::kFlush, .nth = 1, .error = EIO}, EIO);
}

// The short write fills the disk, so the undo fails too: the old bytes
// are kept, every Settle (each flush of the image) fails naming the
// half-written header until the disk has room, then puts them back.
TEST(HeaderWriterTest, AnUndoThatFailsIsRetriedBySettle) {
  const Bytes image = Pattern(512, 1);
  std::unique_ptr<BlockFile> mem = NewMemFile("header.qcow2", image);
  // Outer: the first write is short. Inner: from its second write (the
  // undo) on, the disk is full.
  auto inner_state = std::make_shared<FaultState>(
      Fault{.mode = Fault::kDiskFull, .op = HostOp::kSpace, .nth = 2, .error = ENOSPC});
  FaultFile inner(*mem, inner_state);
  auto outer_state = std::make_shared<FaultState>(
      Fault{.mode = Fault::kShort, .op = HostOp::kWrite, .nth = 1, .error = ENOSPC});
  FaultFile file(inner, outer_state);
  HeaderWriter writer(&file);

  const absl::Status s = SyncWait(writer.Switch(kAt, Pattern(12, 2), Slice(image, kAt, 12)));
  EXPECT_EQ(StatusErrno(s), ENOSPC) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "half-written")) << s;
  EXPECT_TRUE(writer.unsettled());
  ASSERT_OK_AND_ASSIGN(Bytes half, MemFileContents(*mem));
  EXPECT_NE(half, image) << "the short write should have landed half";

  const absl::Status settle = SyncWait(writer.Settle());
  EXPECT_EQ(StatusErrno(settle), ENOSPC) << settle;
  EXPECT_TRUE(absl::StrContains(settle.message(), "half-written")) << settle;
  // A later switch settles first, and fails while it cannot.
  EXPECT_FALSE(SyncWait(writer.Switch(kAt, Pattern(12, 3), Slice(image, kAt, 12))).ok());

  inner_state->ClearDiskFull();
  ASSERT_OK(SyncWait(writer.Settle()));
  EXPECT_FALSE(writer.unsettled());
  ASSERT_OK_AND_ASSIGN(Bytes after, MemFileContents(*mem));
  EXPECT_EQ(after, image);
}

}  // namespace
}  // namespace qcow2fuse::test
