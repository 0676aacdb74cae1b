#!/usr/bin/env bash
# make reproduce-alignq: AlignQ README #1 end to end on CIFAR-10.
#   1. FP32 pretraining of ResNet-20 (the step the README asks for but the original does not ship): the README
#      command with --bitW 32 --abitW 32, which saves the best model to <OUT>/pretrained/res20_32bit/model_best.pt;
#   2. the README's 8-bit CDF-aligned ResNet-20 command verbatim (paths aside), starting from that model;
#   3. published vs measured (python -m common.compare alignq: no published rows, so "measured only").
# Environment: EPOCHS (per stage, default 200 as the README), DATA (default $QUANTLAB_DATA, else ./data;
# CIFAR-10 in DATA/cifar10 or DATA), OUT (default alignq/cdf_alignment/resnet-20-cifar-10/experiment/
# reproduce), ITERS (iterations per epoch, smoke runs only), PYTHON, RESUME=1 (continue interrupted stages;
# otherwise a new run; its predecessors stay in runs/alignq/), ALIGNQ_THREADS=N (torch CPU threads).
# A run with EPOCHS < 200 or ITERS is recorded with a shortened recipe: compare never shows it as a reproduction.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
if [ -n "${ALIGNQ_THREADS:-}" ]; then export OMP_NUM_THREADS=$ALIGNQ_THREADS MKL_NUM_THREADS=$ALIGNQ_THREADS; fi
EPOCHS=${EPOCHS:-200}
DATA=${DATA:-${QUANTLAB_DATA:-./data}}
abspath() { if [ -e "$1" ]; then (cd "$1" && pwd); else echo "$1"; fi; }
DATA=$(abspath "$DATA")
if [ -d "$DATA/cifar10" ]; then CIFAR=$DATA/cifar10; else CIFAR=$DATA; fi
ENTRY=alignq/cdf_alignment/resnet-20-cifar-10
OUT=${OUT:-$ROOT/$ENTRY/experiment/reproduce}
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
EXTRA=(--data_dir "$CIFAR" --num_epochs "$EPOCHS")
[ -n "${ITERS:-}" ] && EXTRA+=(--max_iters "$ITERS")

cat <<MSG
== AlignQ reproduction: ResNet-20 CIFAR-10, FP32 pretrain -> 8-bit CDF alignment, EPOCHS=$EPOCHS per stage
   data $CIFAR, output $OUT
   CPU cost measured on a shared 2-core machine (1 thread, load average ~10): ~25 min per FP32 epoch and ~21 min
   per 8-bit epoch (391 iterations): EPOCHS=200 needs a GPU. ITERS=N limits the iterations per epoch (smoke test).
MSG

# stage(job_dir, flags...): resume with RESUME=1, otherwise a new run (job_dir links to it; --reset removes only
# an old-layout real job_dir)
stage() {
    local job=$1; shift
    local mode=()
    if [ -f "$job/checkpoint/model_last.pt" ]; then
        if [ "${RESUME:-0}" = 1 ]; then mode=(--resume "$job/checkpoint/model_last.pt"); else mode=(--reset); fi
    fi
    (cd "$ENTRY" && "$PY" main.py "$@" --job_dir "$job" "${EXTRA[@]}" ${mode[@]+"${mode[@]}"})
}

README_FLAGS=(--method "ours" --source_dir "$OUT/pretrained" --source_file "res20_32bit/model_best.pt" --arch resnet
    --target_model "resnet20_quant" --source_model "resnet20" --train_batch_size 128 --eval_batch_size 100 --lr 0.04
    --lr_gamma 0.1 --lr_decay_steps [80, 120] --momentum 0.9 --weight_decay 0.0001 --lam 1 --lam2 4 --act_range 2
    --print_freq 200)

echo "== 1/3 FP32 pretraining (--bitW 32 --abitW 32)"
stage "$OUT/res20_32bit" "${README_FLAGS[@]}" --bitW 32 --abitW 32
echo "== 2/3 8-bit CDF alignment (README command)"
stage "$OUT/t_8bit_pre32bit" "${README_FLAGS[@]}" --bitW 8 --abitW 8
echo "== 3/3 compare"
"$PY" -m common.compare alignq
