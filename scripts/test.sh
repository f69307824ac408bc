#!/usr/bin/env bash
# Every test normkit has: installs the dependencies, builds, runs the C++ and Python tests
# (ctest), the same C++ tests under ASan + UBSan, fuzzes the file readers and the API's checks
# for a bounded time, runs the C++ tests and normkit-train under ThreadSanitizer, and builds a
# consumer project against the installed CMake package.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

bash scripts/install-deps.sh

echo "== build (Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DNORMKIT_BUILD_TESTS=ON -DNORMKIT_BUILD_PYTHON=ON \
  -DNORMKIT_BUILD_APPS=ON -DNORMKIT_BUILD_BENCH=ON >/dev/null
cmake --build build -j "$jobs"

echo "== tests"
ctest --test-dir build --output-on-failure -j "$jobs"

echo "== sanitizer build (ASan + UBSan): C++ tests"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DNORMKIT_SANITIZE=ON -DNORMKIT_BUILD_PYTHON=OFF \
  -DNORMKIT_BUILD_BENCH=OFF >/dev/null
cmake --build build-asan -j "$jobs"
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build-asan --output-on-failure -j "$jobs" -LE slow

echo "== fuzzing (libFuzzer, clang, ASan + UBSan): each target 45 s from its committed corpus"
bash scripts/fuzz.sh 45

echo "== ThreadSanitizer build (clang, libomp + Archer): C++ tests and normkit-train's threads"
bash scripts/tsan.sh

echo "== installed package: find_package(normkit) from a consumer project"
rm -rf build-install build-consumer
cmake --install build --prefix "$PWD/build-install" >/dev/null
cmake -S tests/consumer -B build-consumer -DCMAKE_PREFIX_PATH="$PWD/build-install" >/dev/null
cmake --build build-consumer -j "$jobs"
./build-consumer/consumer
if [ -x build-consumer/consumer_mpi ]; then
  # As root OpenMPI wants these; oversubscribe: more ranks than cores is fine for a check.
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 \
    mpirun -n 2 ./build-consumer/consumer_mpi
fi

echo "== Python package: pip install . into a fresh virtual environment"
bash scripts/test-pip-package.sh build
echo "all tests passed"
