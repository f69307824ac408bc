#!/usr/bin/env bash
# ThreadSanitizer: the C++ tests and normkit-train built with clang -fsanitize=thread (-O1 -g)
# against LLVM's OpenMP runtime, then the tests (without the slow label) and short
# multi-threaded training runs of every norm.
#
# libomp is not instrumented, so TSan alone cannot see the ordering its barriers, reductions,
# locks and tasks give and would report every parallel region as a race. Its Archer tool
# (libarcher.so beside libomp, loaded through OMP_TOOL_LIBRARIES) tells TSan about exactly that
# ordering through the OpenMP tools interface; no report is suppressed. (GCC's libgomp has no
# such interface, which is why this build needs clang.)
#
# Without MPI: OpenMPI is not instrumented and starts threads of its own that TSan cannot order;
# the MPI code runs in the Release and ASan test runs. The trainer's device threads (one per
# logical device, meeting at every synchronized BatchNorm) run here all the same.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${NORMKIT_JOBS:-$(nproc)}

CC=clang CXX=clang++ cmake -S . -B build-tsan \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DNORMKIT_TSAN=ON -DNORMKIT_BUILD_TESTS=ON \
  -DNORMKIT_BUILD_APPS=ON -DNORMKIT_BUILD_PYTHON=OFF -DNORMKIT_BUILD_BENCH=OFF \
  -DNORMKIT_BUILD_MPI=OFF -DNORMKIT_TRAIN_MPI=OFF >/dev/null
cmake --build build-tsan -j "$jobs"

libomp=$(ldd build-tsan/bin/normkit-train | awk '$1 ~ /^libomp/ { print $3; exit }')
archer=$(dirname "${libomp:-/nonexistent}")/libarcher.so
if [ ! -f "$archer" ]; then
  echo "libarcher.so not found beside libomp (${libomp:-not linked}); install libomp-14-dev" >&2
  exit 1
fi
export OMP_TOOL_LIBRARIES=$archer
# Space-separated: Archer reads ignore_noninstrumented_modules from here too.
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ignore_noninstrumented_modules=1"
export OMP_WAIT_POLICY=passive OPENBLAS_NUM_THREADS=1

echo "-- normkit-train under TSan: one short run per norm, 3 threads"
data=${NORMKIT_TSAN_DATA:-/usr/share/datasets/fashion-mnist}
out=build-tsan/train-runs
rm -rf "$out" && mkdir -p "$out"
for norm in bn gn ln in none; do
  ARCHER_OPTIONS=verbose=1 ./build-tsan/bin/normkit-train run --norm "$norm" --groups 2 \
    --batch 16 --threads 3 --epochs 1 --widths 4,8,8 --limit-train 160 --limit-test 64 \
    --data "$data" --quiet --checkpoint "$out/$norm.safetensors" --metrics-out "$out/$norm.json" \
    >"$out/$norm.log" 2>&1 || { cat "$out/$norm.log"; exit 1; }
  # Without Archer, TSan would not see OpenMP's ordering and nothing here would mean anything.
  grep -q "Archer detected OpenMP application with TSan" "$out/$norm.log" ||
    { echo "Archer did not load ($archer)" >&2; cat "$out/$norm.log"; exit 1; }
done

echo "-- C++ tests under TSan"
# Left out: Alignment.* (placement in memory, not threads; its 16 MiB outputs take ten minutes
# under TSan).
OMP_NUM_THREADS=3 ctest --test-dir build-tsan --output-on-failure -j "$jobs" -LE slow \
  -E '^Alignment\.'
echo "no data races"
