#!/usr/bin/env bash
# Optional: installs the benchmark's anchors, PyTorch 2.x and oneDNN (with its GroupNorm
# primitive), from PyPI into a Python virtual environment. The core build never needs it.
#
#   bash scripts/setup-anchors.sh [VENV]     # default VENV: ../venv-anchors next to the repository
#
# Then:
#   cmake -S . -B build-bench-anchors -DNORMKIT_BENCH_ANCHORS=ON [-DNORMKIT_ANCHORS_PREFIX=VENV]
#   cmake --build build-bench-anchors --target normkit-bench
#   VENV/bin/python bench/python_bench.py     # the Python comparison, torch 2.x from the venv
#
# What comes from where:
# - torch (PyPI's Linux wheel is a CUDA build; it runs on CPU-only machines). Its wheel carries
#   libtorch and the ATen headers under torch/include and torch/lib; the benchmark links only
#   libtorch_cpu and libc10 (which still load libcudart and libcupti, from the nvidia-* wheels).
#   The full dependency set (about 7 GB with CUDA's libraries) is installed so that
#   `import torch` works too.
# - onednn-devel: headers and libdnnl (oneDNN 3.x; a SYCL-runtime build threading with TBB,
#   whose CPU device is found through the OpenCL CPU driver in intel-opencl-rt);
#   tbb-devel: TBB's headers, to set oneDNN's thread count.
# The venv sees the system's site-packages (Debian's NumPy, which normkit's module is built with).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-$(cd .. && pwd)/venv-anchors}"
python="${PYTHON:-/usr/bin/python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv"
  "$python" -m venv --system-site-packages "$venv"
fi
# tbb-devel's version follows the tbb that onednn pulls in.
"$venv/bin/python" -m pip install --quiet "torch>=2,<3" onednn-devel
tbb_version=$("$venv/bin/python" -m pip show tbb | sed -n 's/^Version: //p')
"$venv/bin/python" -m pip install --quiet "tbb-devel==${tbb_version}"

echo "installed into $venv:"
"$venv/bin/python" -m pip show torch onednn-devel tbb-devel | grep -E '^(Name|Version):' | paste - -
"$venv/bin/python" - <<'EOF'
import torch
print(f"import torch: {torch.__version__}, {torch.get_num_threads()} threads, "
      f"CUDA available: {torch.cuda.is_available()}")
EOF
grep -h '#define DNNL_VERSION_\(MAJOR\|MINOR\|PATCH\) ' "$venv/include/oneapi/dnnl/dnnl_version.h" |
  awk '{v = v (v ? "." : "") $3} END {print "oneDNN headers: " v}'
echo "configure with: -DNORMKIT_BENCH_ANCHORS=ON -DNORMKIT_ANCHORS_PREFIX=$venv"
