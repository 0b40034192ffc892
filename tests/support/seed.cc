#include "support/seed.h"

#include <cstdlib>
#include <iostream>
#include <random>
#include <string>

#include "absl/strings/numbers.h"
#include "gtest/gtest.h"

namespace qcow2fuse::test {

uint64_t TestSeed() {
  uint64_t seed = 0;
  const char* text = std::getenv("QCOW2FUSE_TEST_SEED");
  if (text == nullptr || !absl::SimpleAtoi(text, &seed)) {
    std::random_device device;
    seed = (uint64_t{device()} << 32) | device();
  }
  std::cout << "QCOW2FUSE_TEST_SEED=" << seed << "\n";
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  return seed;
}

}  // namespace qcow2fuse::test
