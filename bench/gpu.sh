#!/usr/bin/env bash
# The GPU run, in one script: under 8 minutes on one H200 (BUDGET seconds, default 450).
#
#   bash bench/gpu.sh DATA [RESULTS_DIR]
#
# DATA is a CIFAR-10 folder with train/<class>/*.jpg and test/<class>/*.jpg (e.g. ../shared/data/cifar10);
# tables go to RESULTS_DIR (default bench/results): train_speed_gpu.md and accuracy_gpu.md.
#
# 1. Speed: one Co-Reg epoch of preact_resnet18 on 50,000 CIFAR-sized images (the folder's images repeated
#    to reach that count) through `coreg train`, against its compute floor (the same forward and backward
#    passes replayed on pre-made tensors), bf16 autocast and channels-last as `coreg train` uses on a GPU
#    (bench/train_speed.py). Goal: at most 5 s per Co-Reg epoch.
# 2. Accuracy: Co-Reg with preact_resnet18 on the CIFAR-10 images with synthetic candidate sets drawn to
#    match the paper's CIFAR-10 CLIP annotation (AAAI Table 2: 1.39 candidates per image, so
#    q = 0.39 / 9 = 0.043; eta = 4.79 %), for as many epochs as fit in what is left of BUDGET after step 1
#    (bench/accuracy.py --device gpu), then prints the table. Warm-up, ramp-up and the representation-loss
#    start scale with the epochs as in bench/accuracy.py's CPU defaults (5, 5 and 2 of 30).
#
# Environment: BUDGET (seconds, default 450), SETTING (default synthetic:q=0.043,eta=0.048), METHODS
# (default coreg), TRAIN_PER_CLASS (default: all, at most 5000), OVERHEAD (seconds kept for annotating,
# decoding and evaluating in step 2, default 100), THREADS (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ ! -d "$1/train" ] || [ ! -d "$1/test" ]; then
    echo "usage: bash bench/gpu.sh DATA [RESULTS_DIR]  (DATA: a CIFAR-10 folder with train/ and test/)" >&2
    exit 2
fi
DATA=$(cd "$1" && pwd)  # absolute: bench/accuracy.py symlinks the images from its work folder
RESULTS=${2:-bench/results}
mkdir -p "$RESULTS"
BUDGET=${BUDGET:-450}
OVERHEAD=${OVERHEAD:-100}
THREADS=${THREADS:-8}
SETTING=${SETTING:-synthetic:q=0.043,eta=0.048}
METHODS=${METHODS:-coreg}
START=$(date +%s)
export HF_HUB_OFFLINE=1

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device visible')"

shopt -s nullglob
classes=("$DATA"/train/*/)
first_class=$(basename "${classes[0]}")
train_files=("$DATA/train/$first_class"/*)
test_files=("$DATA/test/$first_class"/*)
per_class=${#train_files[@]}
test_per_class=${#test_files[@]}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-$(( per_class < 5000 ? per_class : 5000 ))}

# --- 1. one Co-Reg epoch on 50,000 images vs its floor -------------------------------------------------
speed_log=$(mktemp)
timeout $(( BUDGET / 2 )) python bench/train_speed.py "$DATA" --arch preact_resnet18 --n 50000 --batch-size 256 \
    --repeats 2 --threads "$THREADS" --out "$RESULTS/train_speed_gpu.md" | tee "$speed_log"
epoch_s=$(sed -n 's/.*seconds per Co-Reg epoch on this GPU (median): \([0-9.]*\).*/\1/p' "$speed_log" | tail -n 1)
if [ -z "$epoch_s" ]; then
    echo "bench/gpu.sh: bench/train_speed.py printed no epoch time" >&2
    exit 1
fi

# --- 2. accuracy for as many epochs as fit ------------------------------------------------------------
elapsed=$(( $(date +%s) - START ))
left=$(( BUDGET - elapsed ))
# Epoch time scales with the training rows (50,000 in step 1); a 50 % margin for the warm-up epochs
# larger batches and the per-epoch test pass.
plan=$(python -c '
import sys
epoch_s, left, overhead, per_class = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
n_methods = len([m for m in sys.argv[5].split(",") if m])
per_epoch = 1.5 * epoch_s * (10 * per_class) / 50_000 + 0.3  # + fixed per-epoch work (GMM, test pass)
epochs = max(2, min(800, int((left - overhead) / max(per_epoch, 1e-3) / n_methods)))
print(epochs, max(1, round(epochs * 5 / 30)), max(1, round(epochs * 2 / 30)))
' "$epoch_s" "$left" "$OVERHEAD" "$TRAIN_PER_CLASS" "$METHODS")
read -r epochs warmup start_cont <<< "$plan"
echo "bench/gpu.sh: ${elapsed}s used, ${left}s left: ${epochs} epochs (warm-up ${warmup}) on $(( 10 * TRAIN_PER_CLASS )) images"
timeout $(( left > 30 ? left - 10 : 20 )) python bench/accuracy.py --data "$DATA" --device gpu --arch preact_resnet18 --jobs 1 \
    --settings "$SETTING" --methods "$METHODS" --seeds 0 \
    --train-per-class "$TRAIN_PER_CLASS" --test-per-class "$test_per_class" --pool-per-class 0 \
    --epochs "$epochs" --warmup "$warmup" --rampup "$warmup" --start-cont "$start_cont" \
    --batch-size 256 --queue-size 8192 --threads "$THREADS" \
    --work "/tmp/coreg-gpu-accuracy-$TRAIN_PER_CLASS-$epochs" --out "$RESULTS/accuracy_gpu.md"
cat "$RESULTS/accuracy_gpu.md"
echo "bench/gpu.sh: done in $(( $(date +%s) - START ))s (budget ${BUDGET}s)"
