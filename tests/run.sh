#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what it
# needs, builds, and runs every test with ctest. Run as root (the tests
# mount FUSE file systems and loop devices).
#
#   tests/run.sh                  normal build, in build/
#   SANITIZE=address,undefined tests/run.sh   sanitizer build, in build-address-undefined/
#   SANITIZE=thread tests/run.sh              ThreadSanitizer build, in build-thread/
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/packaging/install-deps.sh"
if [[ -n "${SANITIZE:-}" ]]; then
  export BUILD_DIR=${BUILD_DIR:-$root/build-${SANITIZE//[,]/-}}
  # -O1: on two cores the suites ran 11% (AddressSanitizer) and 17%
  # (ThreadSanitizer) faster than at -O0, for a longer build (from scratch
  # under AddressSanitizer 7.5 min against 6); -g1: line tables, all that a
  # sanitizer's report needs. (The test sources of an AddressSanitizer
  # build go to -Og: tests/CMakeLists.txt.)
  "$root/packaging/build.sh" -DBUILD_TESTING=ON -DCMAKE_BUILD_TYPE=Debug -DQCOW2FUSE_SANITIZE="$SANITIZE" \
    "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g1" "-DCMAKE_C_FLAGS_DEBUG=-O1 -g1"
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
  # Shadow memory in huge pages: with 4 KiB pages the ThreadSanitizer suite
  # spent half its time in the kernel faulting shadow pages in (on a VM,
  # two of its slowest tests took 96 s together that way, 37 s without).
  export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:no_huge_pages_for_shadow=0}
  # Randomized tests run fewer operations under ThreadSanitizer, which slows
  # the engine down tenfold; the normal build runs them in full.
  if [[ "$SANITIZE" == *thread* ]]; then export QCOW2FUSE_TEST_OPS=${QCOW2FUSE_TEST_OPS:-60}; fi
else
  export BUILD_DIR=${BUILD_DIR:-$root/build}
  # BUILD_TESTING explicitly: the demo may have configured this directory without tests.
  "$root/packaging/build.sh" -DBUILD_TESTING=ON
fi
cd "$BUILD_DIR"
ctest --output-on-failure --no-tests=error --parallel "$(nproc)" --timeout 600
