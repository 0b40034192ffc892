#!/usr/bin/env bash
# Builds the fuzz targets with clang, libFuzzer, AddressSanitizer and
# UndefinedBehaviorSanitizer (in build-fuzz/), makes the seed corpus, and
# runs each target for SECONDS (default 60), two at a time. Fails if any
# target finds a crash, a leak, a timeout or an out-of-memory, and prints
# the reproducer's path; replay one with
#
#   build-fuzz/tests/fuzz/TARGET REPRODUCER
#
# and keep it as tests/fuzz/regressions/TARGET/NAME once understood (ctest
# then replays it in every build).
#
#   tests/fuzz/run.sh [SECONDS]
#
# BUILD_DIR overrides build-fuzz/. Corpora grow in BUILD_DIR/fuzz-out/
# and are reused by the next run.
set -euo pipefail
seconds=${1:-60}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD_DIR:-$root/build-fuzz}
targets=(header_fuzzer l2_entry_fuzzer read_fuzzer write_fuzzer partition_table_fuzzer)

"$root/packaging/install-deps.sh"
echo "== fuzz: building with clang in $build"
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DBUILD_TESTING=ON -DQCOW2FUSE_FUZZ=ON \
  -DQCOW2FUSE_SANITIZE=address,undefined -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOW2FUSE_WERROR=ON >/dev/null
cmake --build "$build" --target fuzz_targets --parallel "$(nproc)"

bin=$build/tests/fuzz
out=$build/fuzz-out
seeds=$out/seeds
rm -rf "$seeds"
echo "== fuzz: making the seed corpus"
"$root/tests/fuzz/make_corpus.sh" "$seeds" "$bin/fuzz_pack"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

# fuzz TARGET: runs it for $seconds; its log and any reproducer stay in $out/TARGET/.
fuzz() {
  local t=$1 dir=$out/$1
  rm -rf "$dir/artifacts"
  mkdir -p "$dir/corpus" "$dir/artifacts"
  local status=0 corpora=("$dir/corpus" "$seeds/$t")
  # Inputs that once crashed it are seeds too: near them may lie the next bug.
  if [[ -d "$root/tests/fuzz/regressions/$t" ]]; then corpora+=("$root/tests/fuzz/regressions/$t"); fi
  "$bin/$t" -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=30 \
    -print_final_stats=1 -artifact_prefix="$dir/artifacts/" "${corpora[@]}" >"$dir/log" 2>&1 || status=$?
  echo "$status" >"$dir/status"
}

echo "== fuzz: ${seconds}s per target"
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  fuzz "${targets[$i]}" &
  if ((i + 1 < ${#targets[@]})); then fuzz "${targets[$i + 1]}" & fi
  wait
done

failed=0
for t in "${targets[@]}"; do
  dir=$out/$t
  # A target that crashed prints no final stats.
  stats=$(grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$dir/log" | sed 's/^stat:://' | tr -s ' \n' '  ' || true)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$dir/log" | tail -1 || true)
  reproducers=$(find "$dir/artifacts" -type f)
  if [[ "$(cat "$dir/status")" != 0 || -n "$reproducers" ]]; then
    failed=1
    echo "FAILED $t (exit $(cat "$dir/status")): $stats$cov"
    grep -E 'ERROR|SUMMARY|fuzz invariant|libFuzzer: (deadly|out-of-memory|timeout|fuzz target)' "$dir/log" | head -20 || true
    for r in $reproducers; do echo "  reproducer: $r"; done
    echo "  log: $dir/log"
  else
    echo "ok $t: $stats$cov"
  fi
done
exit $failed
