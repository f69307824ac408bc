#!/usr/bin/env bash
# Installs normkit's dependencies from Debian's packages.
#   bash scripts/install-deps.sh              # everything: build, tests, Python module, benchmark, training
#   bash scripts/install-deps.sh experiment   # only what the main job needs: the library,
#                                             # normkit-train and matplotlib for its figures
# Idempotent: packages already present are left as they are.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  libhwy-dev libopenblas-dev zlib1g-dev
  libcli11-dev nlohmann-json3-dev
  dataset-fashion-mnist
  python3-matplotlib  # the sweep's figures (scripts/plot_sweep.py)
)
if [[ ${1:-all} != experiment ]]; then
  packages+=(
    libgtest-dev libgmock-dev libbenchmark-dev
    python3-venv  # pip install . into a virtual environment (scripts/test-pip-package.sh)
    pybind11-dev libdlpack-dev python3-dev python3-numpy python3-pytest python3-torch
    python3-torchvision  # the converted ResNet-18 of normkit.torch's tests
    # the normkit_mpi component (synchronized BatchNorm), its tests under mpirun and its
    # Python module over mpi4py communicators
    openmpi-bin libopenmpi-dev python3-mpi4py
    # clang for the fuzzing and ThreadSanitizer builds: libFuzzer and the sanitizer runtimes,
    # LLVM's OpenMP runtime and its Archer tool (libarcher.so)
    clang libclang-rt-14-dev libomp-14-dev
  )
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
