#!/usr/bin/env bash
# FP32 source models the README's quantized commands load (the original ships neither model nor script):
#   bash alignq/pretrain.sh resnet-20-cifar-10   -> alignq/cdf_alignment/resnet-20-cifar-10/pretrained/res20_32bit/model_best.pt
#   bash alignq/pretrain.sh dann_office          -> alignq/cdf_alignment_admm/dann_office/pretrained/dslr_webcam/dw_32bit/model_best.pt
# Each is the README command of that experiment with --bitW 32 --abitW 32 (same recipe otherwise).
# Environment: EPOCHS (default 200, the README's), DATA (default $QUANTLAB_DATA, else ./data),
# IMAGENET_WEIGHTS (dann_office: torchvision's resnet50-0676ba61.pth; without it the backbone starts from
# scratch only if NO_PRETRAINED=1), RESUME=1 (continue the latest run; otherwise a new run in runs/alignq/, the earlier one stays), ITERS (iterations per epoch, smoke runs only), PYTHON.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
EXP=${1:-resnet-20-cifar-10}
EPOCHS=${EPOCHS:-200}
DATA=${DATA:-${QUANTLAB_DATA:-./data}}
DATA=$(cd "$DATA" 2>/dev/null && pwd || echo "$DATA")
EXTRA=(--num_epochs "$EPOCHS" --bitW 32 --abitW 32)
[ -n "${ITERS:-}" ] && EXTRA+=(--max_iters "$ITERS")
case "$EXP" in
    resnet-20-cifar-10)
        DIR=alignq/cdf_alignment/resnet-20-cifar-10; JOB=experiment/ours/resnet/t_32bit_pretrain
        if [ -d "$DATA/cifar10" ]; then EXTRA+=(--data_dir "$DATA/cifar10"); else EXTRA+=(--data_dir "$DATA"); fi
        FLAGS=(--method "ours" --source_dir "pretrained" --source_file "res20_32bit/model_best.pt" --arch resnet
               --target_model "resnet20_quant" --source_model "resnet20" --train_batch_size 128 --eval_batch_size 100
               --lr 0.04 --lr_gamma 0.1 --lr_decay_steps [80, 120] --momentum 0.9 --weight_decay 0.0001 --lam 1
               --lam2 4 --act_range 2 --print_freq 200) ;;
    dann_office)
        DIR=alignq/cdf_alignment_admm/dann_office; JOB=experiment/ours/resnet/t_32bit_pretrain
        EXTRA+=(--data_dir "$DATA")
        [ -n "${IMAGENET_WEIGHTS:-}" ] && EXTRA+=(--imagenet_weights "$IMAGENET_WEIGHTS")
        [ "${NO_PRETRAINED:-0}" = 1 ] && EXTRA+=(--no-pretrained)
        FLAGS=(--src_data "dslr" --tgt_data "webcam" --train_split "True" --method "ours" --source_dir "pretrained"
               --source_file "dslr_webcam/dw_32bit/model_best.pt" --arch resnet --model "resnet50_dann"
               --train_batch_size 28 --eval_batch_size 28 --lr 0.001 --lr_gamma 0.1 --lr_decay_steps [80, 120]
               --momentum 0.9 --weight_decay 0.0005 --lam 1 --lam2 4 --act_range 2 --print_freq 10) ;;
    *) echo "error: unknown experiment '$EXP'; choose resnet-20-cifar-10 or dann_office" >&2; exit 2 ;;
esac
MODE=()   # an earlier run of this script: continue it with RESUME=1, else a new run (--reset removes only an
          # old-layout real directory)
if [ -f "$DIR/$JOB/checkpoint/model_last.pt" ]; then
    if [ "${RESUME:-0}" = 1 ]; then MODE=(--resume "$JOB/checkpoint/model_last.pt"); else MODE=(--reset); fi
fi
echo "== AlignQ FP32 pretraining: $EXP, EPOCHS=$EPOCHS, output $DIR/$JOB"
cd "$DIR" && "$PY" main.py "${FLAGS[@]}" --job_dir "$JOB" "${EXTRA[@]}" ${MODE[@]+"${MODE[@]}"}
