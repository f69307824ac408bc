#!/usr/bin/env bash
# The main job: the GroupNorm paper's batch-size experiment at small scale. Trains the residual CNN
# of normkit-train on Fashion-MNIST with BatchNorm and GroupNorm at batch sizes 32, 16, 8, 4 and 2
# (the same epochs for every batch size, lr = 0.1 * batch / 32) and writes the table and the
# figures (scripts/plot_sweep.py). On a fresh Debian 12 machine with 2 cores it installs what it
# needs, builds and trains in under 20 minutes.
#
#   bash scripts/run-experiment.sh [OUT_DIR]      # default OUT_DIR: runs/sweep
#
# Any further arguments go to `normkit-train sweep` and override the defaults below, e.g.
#   bash scripts/run-experiment.sh runs/quick --epochs 1 --limit-train 10000
set -euo pipefail
cd "$(dirname "$0")/.."

out=runs/sweep
if [[ $# -gt 0 && $1 != -* ]]; then
  out=$1
  shift
fi

start=$(date +%s)
bash scripts/install-deps.sh experiment

echo "== build normkit-train (Release)"
# Only the library and the trainer: the tests, the Python module and the benchmark (and the
# packages they need) are scripts/test.sh's.
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DNORMKIT_BUILD_APPS=ON -DNORMKIT_BUILD_TESTS=OFF \
  -DNORMKIT_BUILD_PYTHON=OFF -DNORMKIT_BUILD_BENCH=OFF >/dev/null
cmake --build build -j "$(nproc)" --target normkit-train
built=$(date +%s)

# The default budget, sized so the whole job fits in 20 minutes on 2 cores (measured in
# bench/train_speed.md: about 13 minutes of training): every run trains 2 epochs over all 60,000
# training images and is tested on all 10,000 test images; two runs train at a time, one thread
# each.
defaults=(--norms bn,gn --batches 32,16,8,4,2 --epochs 2)
args=()
for ((i = 0; i < ${#defaults[@]}; i += 2)); do  # an option given on the command line wins
  [[ " $* " == *" ${defaults[i]} "* || " $* " == *" ${defaults[i]}="* ]] || args+=("${defaults[i]}" "${defaults[i + 1]}")
done
echo "== sweep -> $out"
./build/bin/normkit-train sweep "${args[@]}" --out "$out" "$@"
done=$(date +%s)
echo "== figures"
/usr/bin/python3 scripts/plot_sweep.py "$out"

echo
echo "table:  $out/results.md (and $out/results.csv)"
echo "figure: $out/test_error_vs_batch.png (test error vs batch size), $out/loss_curves.png; SVG beside them"
echo "runs:   $out/runs/ (metrics JSON and log of every run)"
echo "time:   $((built - start)) s setup and build, $((done - built)) s training"
