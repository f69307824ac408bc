#!/usr/bin/env bash
# The studies of the papers' other claims (docs/studies.md), beside the main job's batch-size
# sweep, each with seeds 1, 2, 3 and in a folder of its own under OUT_DIR,
# in this order (the fine-tuning study first: detection's reason for frozen BN):
#   finetune/        pretrain BN and GN at batch 32 on classes 0-4 (2 epochs), fine-tune at
#                    batch 2 on classes 5-9 with BN, frozen BN and GN (2 epochs)
#   init/            BN vs none over initial weight scales 0.1 ... 10 (batch 32, 1 epoch);
#                    init-lr0.02/: none again at lr 0.02
#   regularization/  BN vs none, with and without dropout 0.5 and weight decay 5e-4, with the
#                    train/test gap on 10,000 training images (batch 32, 2 epochs);
#                    regularization-lr0.02/: none again at lr 0.02
#   learning-rate/   BN vs none over base learning rates 0.02 ... 2 (batch 32, 1 epoch)
#   groups/          GroupNorm's G = 1 (LayerNorm) ... 16 and InstanceNorm (batch 32, 2 epochs)
#   instance-norm-batch-2/  InstanceNorm at batch 2 (2 epochs), beside the main job's BN and GN
# Each sweep writes results.md, results.csv, summary.csv and every run's metrics into its folder,
# and scripts/plot_sweep.py draws its figures there; the fine-tuning study writes results.md and
# results.csv (scripts/finetune_study.py).
#
#   bash scripts/run-studies.sh [OUT_DIR] [--quick] [--data DIR]    # OUT_DIR: runs/studies
#
# --quick: every study on 2,000 training and 500 test images, 1 epoch, seed 1 (a check that
# everything runs, in minutes; its numbers mean nothing). --data: another MNIST-format folder.
# With NORMKIT_TRAIN set to a built normkit-train, nothing is installed or built.
# It prints its estimated time first: the full studies take hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

out=runs/studies
quick=0
data=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) quick=1 ;;
    --data)
      [[ $# -ge 2 ]] || { echo "run-studies.sh: --data needs a folder" >&2; exit 2; }
      data=(--data "$2")
      shift ;;
    -*) echo "run-studies.sh: unknown option $1 (OUT_DIR, --quick, --data DIR)" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done

# The budget. Fashion-MNIST has 60,000 training images, 30,000 of classes 0-4 and of 5-9.
if ((quick)); then
  seeds=1 limits=(--limit-train 2000 --limit-test 500)
  train_images=2000 half_images=2000 eval_train=1000
  short=1 long=1
else
  seeds=1,2,3 limits=()
  train_images=60000 half_images=30000 eval_train=10000
  short=1 long=2
fi
n_seeds=$(tr ',' '\n' <<<"$seeds" | wc -l)
# Training images of each study: runs x epochs x images per epoch.
images_init=$((3 * 5 * n_seeds * short * train_images))
images_regularization=$((3 * 2 * 2 * n_seeds * long * train_images))
images_finetune=$((n_seeds * (2 + 3) * long * half_images))
images_lr=$((2 * 4 * n_seeds * short * train_images))
images_groups=$(((5 + 1) * n_seeds * long * train_images))
images_in2=$((n_seeds * long * train_images))
total=$((images_init + images_regularization + images_finetune + images_lr + images_groups + images_in2))
# About 900 training images/s per single-thread run, two runs at a time (evaluation not counted).
seconds=$((total / 900 / 2))
printf '== estimated time: %d training images in all, about %d h %02d min %02d s at ~900 images/s per run, two at a time (plus evaluation, data loading and figures)\n' \
  "$total" $((seconds / 3600)) $((seconds % 3600 / 60)) $((seconds % 60))

train=${NORMKIT_TRAIN:-}
if [[ -z $train ]]; then
  bash scripts/install-deps.sh experiment
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DNORMKIT_BUILD_APPS=ON -DNORMKIT_BUILD_TESTS=OFF \
    -DNORMKIT_BUILD_PYTHON=OFF -DNORMKIT_BUILD_BENCH=OFF >/dev/null
  cmake --build build -j "$(nproc)" --target normkit-train
  train=./build/bin/normkit-train
fi

sweep() {  # sweep NAME ARGS...: one sweep into $out/NAME, then its figures
  local name=$1
  shift
  echo "== $name -> $out/$name"
  "$train" sweep "$@" --seeds "$seeds" --jobs 2 --quiet "${limits[@]}" "${data[@]}" --out "$out/$name"
  /usr/bin/python3 scripts/plot_sweep.py "$out/$name"
}

echo "== finetune -> $out/finetune"
/usr/bin/python3 scripts/finetune_study.py --out "$out/finetune" --seeds "$seeds" --jobs 2 \
  --pretrain-epochs "$long" --finetune-epochs "$long" --train "$train" -- "${limits[@]}" "${data[@]}"
sweep init --norms bn,none --init-scale 0.1,0.3,1,3,10 --batches 32 --epochs "$short"
# The plain network trains only at small rates (the learning-rate study): at lr 0.1 it fails at
# every init scale and regularization, so it is also run at 0.02, the rate where it trains.
sweep init-lr0.02 --norms none --init-scale 0.1,0.3,1,3,10 --lr-base 0.02 --batches 32 --epochs "$short"
sweep regularization --norms bn,none --dropout 0,0.5 --weight-decay 0,5e-4 --batches 32 \
  --eval-train-images "$eval_train" --epochs "$long"
sweep regularization-lr0.02 --norms none --dropout 0,0.5 --weight-decay 0,5e-4 --lr-base 0.02 \
  --batches 32 --eval-train-images "$eval_train" --epochs "$long"
sweep learning-rate --norms bn,none --lr-base 0.02,0.1,0.5,2 --batches 32 --epochs "$short"
sweep groups --norms gn,in --groups 1,2,4,8,16 --batches 32 --epochs "$long"
sweep instance-norm-batch-2 --norms in --batches 2 --epochs "$long"

echo
echo "tables:  $out/*/results.md (and results.csv)"
echo "figures: $out/*/*.png (SVG beside them)"
