#!/usr/bin/env bash
# APoT progressive recipe for CIFAR-10 ResNet-20 (the original train_res20.sh): full precision first,
# then 4, 3 and 2 bits, each initialised from the previous stage's best model.
#   EPOCHS  epochs per stage (default 300, as published; the lr drops at epochs 150 and 225 only fire
#           when EPOCHS > 150 / 225)
#   DATA    CIFAR-10 root: cifar-10-batches-py/ or train|test/<class>/*.png (default $QUANTLAB_DATA, else ./data)
#   OUT     where the four result/<arch>_<bit>bit folders go (default result, as the original)
#   GPUS    -id value (default 0,1 as the original; harmless on one GPU or on CPU)
#   MAX_ITERS  stop every epoch after N iterations (smoke runs; recorded as shortened)
#   RESUME  =1: continue each stage from its checkpoint.pth.tar when one exists (after an interruption)
set -euo pipefail
cd "$(dirname "$0")"
EPOCHS=${EPOCHS:-300}
DATA=${DATA:-${QUANTLAB_DATA:-./data}}
OUT=${OUT:-result}
PY=${PYTHON:-python}

stage() {  # stage <bit> <flags...>
    local bit=$1; shift
    local dir="$OUT/res20_${bit}bit" resume=() limit=()
    [ -n "${MAX_ITERS:-}" ] && limit=(--max-iters "$MAX_ITERS")
    if [ "${RESUME:-0}" = 1 ] && [ -f "$dir/checkpoint.pth.tar" ]; then resume=(--resume "$dir/checkpoint.pth.tar"); fi
    echo "== res20 ${bit}-bit: $* (epochs $EPOCHS, output $dir)"
    "$PY" main.py --arch res20 --bit "$bit" -id "${GPUS:-0,1}" --epochs "$EPOCHS" --data "$DATA" --save-dir "$dir" \
        "$@" ${limit[@]+"${limit[@]}"} ${resume[@]+"${resume[@]}"}
}

stage 32 --wd 5e-4
stage 4 --wd 1e-4 --lr 4e-2 --init "$OUT/res20_32bit/model_best.pth.tar"
stage 3 --wd 1e-4 --lr 4e-2 --init "$OUT/res20_4bit/model_best.pth.tar"
stage 2 --wd 3e-5 --lr 4e-2 --init "$OUT/res20_3bit/model_best.pth.tar"
