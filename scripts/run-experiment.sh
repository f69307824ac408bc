#!/usr/bin/env bash
# The main job: the GroupNorm paper's batch-size experiment at small scale, on its protocol.
# Trains the residual CNN of normkit-train on Fashion-MNIST with K = 2 logical devices of N
# images each (N = 32, 8, 2; BatchNorm per device, GroupNorm, and SyncBN at N = 2), three seeds
# per cell, the same epochs for every N, lr = 0.1 * K * N / 32, and writes the tables (mean and
# sample standard deviation over the seeds) and the figures (scripts/plot_sweep.py). The choice
# of K, the budget and the other settings, with every setting measured, is in
# docs/experiments.md. On a fresh Debian 12 machine with 2 cores it installs what it needs,
# builds and trains in under 30 minutes, two runs at a time, with the time left on screen.
#
#   bash scripts/run-experiment.sh [OUT_DIR]      # default OUT_DIR: runs/sweep
#
# Any further arguments go to `normkit-train sweep` and override the defaults below, e.g.
#   bash scripts/run-experiment.sh runs/quick --epochs 1 --limit-train 10000 --seeds 1
# or the paper's whole grid with a longer budget (about 3.5 hours on 2 cores), in pieces if need
# be: --resume keeps the runs an interrupted sweep into the same folder finished, so the same
# command started again trains only the rest:
#   bash scripts/run-experiment.sh runs/full --norms bn,gn,syncbn --batches 32,16,8,4,2 --epochs 8 --resume
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

# The default protocol and budget (docs/experiments.md, "The main job: protocol and regime"):
# 2 devices x N images, 7 cells x 3 seeds = 21 runs of 2 epochs over all 60,000 training images,
# tested on all 10,000 test images; BN also with batch and precise statistics; two runs train
# at a time, one thread each.
defaults=(--norms bn,gn,syncbn@2 --batches 32,8,2 --devices 2 --seeds 1,2,3 --epochs 2 --lr-base 0.1)
args=()
for ((i = 0; i < ${#defaults[@]}; i += 2)); do  # an option given on the command line wins
  given=${defaults[i]}
  [[ $given == --seeds && " $* " == *" --seed"[\ =]* ]] && continue  # --seed S means --seeds S
  [[ " $* " == *" $given "* || " $* " == *" $given="* ]] || args+=("$given" "${defaults[i + 1]}")
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
