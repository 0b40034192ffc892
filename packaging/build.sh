#!/usr/bin/env bash
# Configures and builds qcow2fuse into BUILD_DIR (default: build/).
# Extra arguments go to cmake, e.g. -DQCOW2FUSE_SANITIZE=address,undefined.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build_dir=${BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build_dir" -G Ninja -DQCOW2FUSE_WERROR=ON "$@" >/dev/null
cmake --build "$build_dir" --parallel "$(nproc)"
