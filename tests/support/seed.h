// Seeds for randomized tests. A random test that fails must say how to
// fail the same way again:
//
//   std::mt19937_64 rng(TestSeed());
//
// and QCOW2FUSE_TEST_SEED=N in the environment replays seed N.

#ifndef QCOW2FUSE_TESTS_SUPPORT_SEED_H_
#define QCOW2FUSE_TESTS_SUPPORT_SEED_H_

#include <cstdint>

namespace qcow2fuse::test {

// $QCOW2FUSE_TEST_SEED if set, else a fresh 64-bit seed. Prints
// "QCOW2FUSE_TEST_SEED=N" and records N as the running test's "seed"
// property (in ctest's XML report).
uint64_t TestSeed();

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_SUPPORT_SEED_H_
