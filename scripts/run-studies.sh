#!/usr/bin/env bash
# The two studies of docs/experiments.md, beside the main job's batch-size sweep:
#   1. BatchNorm vs no normalization over a range of learning rates (does BN train where the
#      plain network diverges or crawls?), with loss curves;
#   2. GroupNorm's group count G = 1 (LayerNorm) ... 16, and InstanceNorm (G = C in every layer),
#      at batch 32;
#   3. InstanceNorm at batch 2, beside the main job's BN and GN at batch 2.
# Each is one `normkit-train sweep` (a grid of norms x groups x base learning rates x batch sizes),
# writing results.md, results.csv and every run's metrics into its folder, then
# scripts/plot_sweep.py draws its figures there.
#
#   bash scripts/run-studies.sh [OUT_DIR]      # default OUT_DIR: runs/studies
#
# About 17 minutes on 2 cores (two runs at a time, one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-runs/studies}

bash scripts/install-deps.sh experiment
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DNORMKIT_BUILD_APPS=ON -DNORMKIT_BUILD_TESTS=OFF \
  -DNORMKIT_BUILD_PYTHON=OFF -DNORMKIT_BUILD_BENCH=OFF >/dev/null
cmake --build build -j "$(nproc)" --target normkit-train

echo "== learning rate: BN vs none -> $out/learning-rate"
./build/bin/normkit-train sweep --norms bn,none --lr-base 0.02,0.1,0.5,2 --batches 32 --epochs 1 \
  --out "$out/learning-rate"
/usr/bin/python3 scripts/plot_sweep.py "$out/learning-rate"

echo "== GroupNorm groups -> $out/groups"
./build/bin/normkit-train sweep --norms gn,in --groups 1,2,4,8,16 --batches 32 --epochs 2 \
  --out "$out/groups"
/usr/bin/python3 scripts/plot_sweep.py "$out/groups"

echo "== InstanceNorm at batch 2 -> $out/instance-norm-batch-2"
./build/bin/normkit-train sweep --norms in --batches 2 --epochs 2 --out "$out/instance-norm-batch-2"
/usr/bin/python3 scripts/plot_sweep.py "$out/instance-norm-batch-2"
