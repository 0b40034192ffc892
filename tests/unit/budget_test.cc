// base/budget: the memory budget of one open image, and the way Image::Open
// shares one budget among the layers of a chain and refuses an image whose
// structures do not fit, naming the structure, its size and the option.

#include "base/budget.h"

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "qcow2fuse/image.h"
#include "qcow2fuse/task.h"
#include "support/qemu.h"
#include "support/status_testing.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

TEST(MemoryBudgetTest, TakesUpToTheLimit) {
  MemoryBudget budget(100);
  EXPECT_EQ(budget.limit(), 100u);
  ASSERT_OK(budget.Take(60, "a"));
  EXPECT_FALSE(budget.Take(41, "b").ok());
  EXPECT_EQ(budget.used(), 60u) << "a refused take takes nothing";
  ASSERT_OK(budget.Take(40, "c"));
  EXPECT_EQ(budget.used(), 100u);
  EXPECT_EQ(budget.available(), 0u);
  ASSERT_OK(budget.Take(0, "nothing"));
  budget.Give(50);
  EXPECT_EQ(budget.used(), 50u);
  EXPECT_EQ(budget.available(), 50u);
}

TEST(MemoryBudgetTest, HugeRequestsDoNotWrapAround) {
  MemoryBudget budget(uint64_t{1} << 30);
  ASSERT_OK(budget.Take(1, "a byte"));
  EXPECT_FALSE(budget.Take(std::numeric_limits<uint64_t>::max(), "everything").ok());
  EXPECT_EQ(budget.used(), 1u);
  MemoryBudget unlimited(std::numeric_limits<uint64_t>::max());
  ASSERT_OK(unlimited.Take(std::numeric_limits<uint64_t>::max(), "everything"));
}

// The refusal a user sees: one line, the structure, its size, the budget
// and the option that raises it.
TEST(MemoryBudgetTest, RefusalNamesStructureSizeBudgetAndOption) {
  MemoryBudget budget(uint64_t{256} << 20);
  ASSERT_OK(budget.Take(uint64_t{250} << 20, "the L1 tables of the chain"));
  absl::Status refused = budget.Take(uint64_t{32} << 20, "the L1 table of base.qcow2");
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  const std::string message(refused.message());
  EXPECT_FALSE(absl::StrContains(message, "\n")) << message;
  for (const char* part : {"the L1 table of base.qcow2", "32 MiB", "6 MiB", "256 MiB",
                           "-o max_metadata_memory=SIZE"}) {
    EXPECT_TRUE(absl::StrContains(message, part)) << "no '" << part << "' in: " << message;
  }
}

TEST(MemoryBudgetTest, FormatSize) {
  EXPECT_EQ(FormatSize(0), "0 bytes");
  EXPECT_EQ(FormatSize(1000), "1000 bytes");
  EXPECT_EQ(FormatSize(1024), "1 KiB");
  EXPECT_EQ(FormatSize(1536), "1.5 KiB");
  EXPECT_EQ(FormatSize(uint64_t{32} << 20), "32 MiB");
  EXPECT_EQ(FormatSize(uint64_t{24} << 30), "24 GiB");
  EXPECT_EQ(FormatSize(uint64_t{1} << 40), "1 TiB");
  EXPECT_EQ(FormatSize(std::numeric_limits<uint64_t>::max()), "16.0 EiB");
}

// Layers take and give from several threads at once (caches of a chain
// read in parallel): the limit holds exactly.
TEST(MemoryBudgetTest, ConcurrentTakesNeverExceedTheLimit) {
  constexpr uint64_t kLimit = 5000;
  MemoryBudget budget(kLimit);
  std::atomic<uint64_t> granted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 4000; ++i) {
        if (budget.Take(1, "a byte").ok()) {
          granted.fetch_add(1);
          if (i % 3 == 0) {  // give some back, as evictions do
            budget.Give(1);
            granted.fetch_sub(1);
          }
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(budget.used(), granted.load());
  EXPECT_LE(budget.used(), kLimit);
  EXPECT_EQ(budget.used(), kLimit) << "16000 takes, a third given back: the budget should be full";
}

TEST(MemoryBudgetTest, ChargeGivesBackWhenItGoes) {
  MemoryBudget budget(1000);
  {
    BudgetCharge charge;
    ASSERT_OK(charge.Take(&budget, 300, "a table"));
    ASSERT_OK(charge.Take(&budget, 200, "another"));
    EXPECT_EQ(charge.bytes(), 500u);
    EXPECT_FALSE(charge.Take(&budget, 600, "too much").ok());
    EXPECT_EQ(budget.used(), 500u);
    BudgetCharge moved = std::move(charge);
    EXPECT_EQ(charge.bytes(), 0u);
    EXPECT_EQ(budget.used(), 500u);
    moved.Reset();
    EXPECT_EQ(budget.used(), 0u);
    ASSERT_OK(moved.Take(&budget, 100, "again"));
  }
  EXPECT_EQ(budget.used(), 0u);
  {
    BudgetCharge kept;
    ASSERT_OK(kept.Take(&budget, 100, "as long as the image"));
    kept.Keep();
  }
  EXPECT_EQ(budget.used(), 100u) << "Keep() leaves the bytes taken";
  BudgetCharge none;
  ASSERT_OK(none.Take(nullptr, std::numeric_limits<uint64_t>::max(), "no budget"));
  budget.TakeExisting(2000);
  EXPECT_EQ(budget.used(), 2100u) << "memory that exists is counted past the limit";
  EXPECT_EQ(budget.available(), 0u);
}

// --- Image::Open -------------------------------------------------------------

class ImageBudgetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<TempDir> dir = TempDir::Create("budget");
    ASSERT_OK(dir);
    dir_ = std::make_unique<TempDir>(std::move(*dir));
  }
  std::string Path(const std::string& name) const { return dir_->Join(name); }

  static ImageOptions WithBudget(std::shared_ptr<MemoryBudget> budget) {
    ImageOptions o;
    o.budget = std::move(budget);
    return o;
  }

  std::unique_ptr<TempDir> dir_;
};

// 2 MiB clusters: the first cluster, header extensions included, is read
// whole; a budget of 1 MiB cannot hold it.
TEST_F(ImageBudgetTest, ImageBeyondTheBudgetIsRefusedNamingTheStructure) {
  const std::string image = Path("big-clusters.qcow2");
  ASSERT_OK(CreateImage(image, "qcow2", 64 * kMiB, {"cluster_size=2M"}));
  ImageOptions small;
  small.max_metadata_memory = 1 * kMiB;
  absl::StatusOr<std::unique_ptr<Image>> refused = SyncWait(Image::Open(image, small));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  const std::string message(refused.status().message());
  EXPECT_FALSE(absl::StrContains(message, "\n")) << message;
  for (const std::string& part : {std::string("first cluster of ") + image, std::string("2 MiB"),
                                 std::string("max_metadata_memory")}) {
    EXPECT_TRUE(absl::StrContains(message, part)) << "no '" << part << "' in: " << message;
  }
  EXPECT_OK(SyncWait(Image::Open(image, ImageOptions{})).status());
}

// One budget for the whole chain: a chain of three images holds three times
// what one holds, and a budget with room for one image and a bit more
// refuses the chain. Were every layer given a budget of its own, the chain
// would open.
TEST_F(ImageBudgetTest, TheChainSharesOneBudget) {
  // A large disk gives every image an L1 table of 64 KiB.
  constexpr uint64_t kDisk = uint64_t{4} << 40;
  ASSERT_OK(CreateImage(Path("base.qcow2"), "qcow2", kDisk));
  ASSERT_OK(CreateImage(Path("mid.qcow2"), "qcow2", kDisk, {"backing_file=base.qcow2", "backing_fmt=qcow2"}));
  ASSERT_OK(CreateImage(Path("top.qcow2"), "qcow2", kDisk, {"backing_file=mid.qcow2", "backing_fmt=qcow2"}));

  auto one = std::make_shared<MemoryBudget>(uint64_t{1} << 30);
  uint64_t one_held = 0;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> image,
                         SyncWait(Image::Open(Path("base.qcow2"), WithBudget(one))));
    one_held = one->used();
  }
  const uint64_t one_peak = one->peak();
  ASSERT_GT(one_held, 0u);
  auto three = std::make_shared<MemoryBudget>(uint64_t{1} << 30);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Image> chain,
                         SyncWait(Image::Open(Path("top.qcow2"), WithBudget(three))));
    EXPECT_GE(three->used(), 3 * one_held - one_held / 4)
        << "one image holds " << one_held << " bytes; the chain should hold three times that";
  }

  // Room for one image's peak and a second image: not for the peak of the
  // third while two are held.
  ImageOptions tight;
  tight.max_metadata_memory = one_peak + one_held;
  ASSERT_OK(SyncWait(Image::Open(Path("base.qcow2"), tight)).status());
  absl::StatusOr<std::unique_ptr<Image>> refused = SyncWait(Image::Open(Path("top.qcow2"), tight));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "max_metadata_memory")) << refused.status();
}

}  // namespace
}  // namespace qcow2fuse::test
