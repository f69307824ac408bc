#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang with ASan + UBSan) and runs each for a bounded
# time, starting from its committed corpus (fuzz/corpus/<name>). New inputs go to
# build-fuzz/corpus/<name>, never into the sources; a crash leaves its input in
# build-fuzz/artifacts/<name>/ and fails the script.
#   bash scripts/fuzz.sh                  # every target, 45 s each
#   bash scripts/fuzz.sh 900 idx api      # 15 minutes each, only these targets
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-45}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(idx safetensors api)
jobs=${NORMKIT_JOBS:-$(nproc)}

CC=clang CXX=clang++ cmake -S . -B build-fuzz \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DNORMKIT_BUILD_FUZZERS=ON -DNORMKIT_BUILD_APPS=ON \
  -DNORMKIT_BUILD_TESTS=OFF -DNORMKIT_BUILD_PYTHON=OFF -DNORMKIT_BUILD_BENCH=OFF >/dev/null
cmake --build build-fuzz -j "$jobs" --target "${targets[@]/#/fuzz_}"

# The IDX target writes each input to a file: a memory-backed directory keeps that cheap.
scratch_base=${TMPDIR:-/tmp}
[ -d /dev/shm ] && [ -w /dev/shm ] && scratch_base=/dev/shm
scratch=$(mktemp -d "$scratch_base/normkit-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

for t in "${targets[@]}"; do
  mkdir -p "build-fuzz/corpus/$t" "build-fuzz/artifacts/$t"
  dict=()
  [ -f "fuzz/$t.dict" ] && dict=(-dict="fuzz/$t.dict")
  echo "-- fuzz_$t: ${seconds}s"
  TMPDIR=$scratch "./build-fuzz/bin/fuzz_$t" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" \
    -artifact_prefix="build-fuzz/artifacts/$t/" "build-fuzz/corpus/$t" "fuzz/corpus/$t" \
    2>"build-fuzz/fuzz_$t.log" || { tail -n 60 "build-fuzz/fuzz_$t.log"; exit 1; }
  grep -E "^stat::number_of_executed_units|^Done" "build-fuzz/fuzz_$t.log" || true
done
