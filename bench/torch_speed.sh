#!/usr/bin/env bash
# normkit.torch's speed against torch 2.x (docs/torch.md, "Speed"): the op benchmark, the
# per-call overhead and the whole-model steps (ResNet-50 training at batch 32 and 2, the
# Stable-Diffusion-style GroupNorm + SiLU + conv stack in inference and training), both memory
# formats, 2 threads. Run it on a quiet machine: nothing else may share the cores.
#
#   bash bench/torch_speed.sh PYTHON OUT_DIR
#
# PYTHON: an interpreter with torch 2.x, torchvision and normkit installed (`pip install .`);
# it runs from /tmp so that the installed normkit is imported, not this checkout's.
set -uo pipefail
[[ $# -eq 2 ]] || { echo "usage: bash bench/torch_speed.sh PYTHON OUT_DIR" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
py=$1
mkdir -p "$2"
out=$(cd "$2" && pwd)
cd /tmp
export OMP_NUM_THREADS=2
load() { cut -d' ' -f1 /proc/loadavg; }
{
  date -u; echo "load $(load)"; lscpu | grep -E "Model name|^CPU\(s\)|L2|L3"
  "$py" -c "import torch, torchvision, numpy; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__)"
} > "$out/machine.txt" 2>&1
echo "== op benchmark $(date +%T), load $(load)"
"$py" "$repo/bench/python_bench.py" --build-dir /nonexistent --threads 2 --reps 7 \
  --csv "$out/python_bench.csv" > "$out/python_bench.txt" 2>&1
echo "== per-call overhead $(date +%T), load $(load)"
"$py" "$repo/bench/python_overhead.py" --repeat 21 --number 2000 > "$out/python_overhead.txt" 2>&1
for format in channels_first channels_last; do
  for batch in 32 2; do
    echo "== resnet50 training, batch $batch, $format $(date +%T), load $(load)"
    "$py" "$repo/bench/torch_models.py" --model resnet50 --batch "$batch" --size 224 --mode train \
      --memory-format "$format" --reps 5 --csv "$out/models.csv" >> "$out/models.txt" 2>&1
  done
  for mode in infer train; do
    echo "== sd stack $mode, $format $(date +%T), load $(load)"
    "$py" "$repo/bench/torch_models.py" --model sd --batch 1 --size 64 --mode "$mode" \
      --memory-format "$format" --reps 5 --csv "$out/models.csv" >> "$out/models.txt" 2>&1
  done
done
echo "== done $(date +%T), load $(load)"
