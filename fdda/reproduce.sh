#!/usr/bin/env bash
# make reproduce-fdda: FDDA end to end for one network and bit-width, then published vs measured.
#   1. BNScenters.py  (one image per class of DATA/train -> save_ImageNet/<model>_*_Categorical_*.pickle)
#   2. main_cosine_CBNS.py (or main_cosine_CBNS_8F8L.py with F8L8=1): generator + quantized student, best
#      top-1 on DATA/val recorded to results/fdda.jsonl
#   3. test.py / test_8F8L.py on the best model.pth (recorded again), then `python -m common.compare fdda`.
# Environment: DATA (ImageNet root with train/<wnid>/ and val/<wnid>/, or a data root holding imagenet/; default
# FDDA_DATA, else $QUANTLAB_DATA, else ./data), MODEL (resnet18 | mobilenet_w1 |
# mobilenetv2_w1 | regnetx_600m, default resnet18), BITS (qw = qa, default 4), F8L8=1, EPOCHS (nEpochs, default
# the published 400; fewer epochs keep the published share of warm-up epochs, warmup_epochs = EPOCHS * 50 / 400,
# so that the student is still trained), TEACHER (pretrained weights file; default: the original's file in
# pytorchcv's store ~/.torch/models or torch.hub's checkpoints folder), ID (--id, default 0), PYTHON, TORCHRUN=N
# (N processes).
# SMOKE=1: no ImageNet and no weights needed: a generated 3-class ImageFolder, random networks at 224 px and a
# 2-epoch, 1-iteration recipe, written under runs/fdda-smoke/ (run directories in runs/fdda-smoke/runs, records
# in runs/fdda-smoke/results: shortened, never shown as a reproduction; SMOKE_DIR moves it). It checks that the
# pipeline runs, nothing else.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
MODEL=${MODEL:-resnet18}
BITS=${BITS:-4}
ID=${ID:-0}
if [ "${F8L8:-0}" = 1 ]; then TRAIN=main_cosine_CBNS_8F8L.py; TEST=test_8F8L.py; else TRAIN=main_cosine_CBNS.py; TEST=test.py; fi
LAUNCH=("$PY")
if [ -n "${TORCHRUN:-}" ]; then LAUNCH=("$PY" -m torch.distributed.run --standalone "--nproc_per_node=$TORCHRUN"); fi
# ImageNet: DATA, else FDDA_DATA, else the data root of every script ($QUANTLAB_DATA, else ./data), taken from
# where this script was started (it then works in fdda/); DATA/imagenet/ is used when DATA holds it
DATA=${DATA:-${FDDA_DATA:-${QUANTLAB_DATA:-./data}}}
case "$DATA" in /*) ;; *) DATA="$PWD/$DATA" ;; esac
if [ ! -d "$DATA/train" ] && [ -d "$DATA/imagenet/train" ]; then DATA="$DATA/imagenet"; fi
cd "$ROOT/fdda"

if [ "${SMOKE:-0}" = 1 ]; then
    OUT=${SMOKE_DIR:-$ROOT/runs/fdda-smoke}
    # a smoke output is replaced on every run, so only a folder this script made (it holds the marker file)
    # is ever removed; any other non-empty folder is refused and left as it is
    MARK=.fdda-smoke-output
    if [ -e "$OUT" ] && { [ ! -d "$OUT" ] || { [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/$MARK" ]; }; }; then
        echo "reproduce-fdda: SMOKE_DIR=$OUT exists and is not an earlier smoke output (no $MARK in it);" \
             "nothing was removed: name a new or empty folder" >&2
        exit 2
    fi
    if [ -f "$OUT/$MARK" ]; then rm -rf "$OUT"; fi
    mkdir -p "$OUT"
    echo "written by fdda/reproduce.sh SMOKE=1; the next smoke run replaces this folder" > "$OUT/$MARK"
    export RESULTS_DIR="$OUT/results" QUANTLAB_RUNS="$OUT/runs"
    "$PY" smoke_data.py "$OUT/data" --classes 3 --train 2 --val 2 --size 64 >/dev/null
    COMMON=(--dataPath "$OUT/data" --save_path "$OUT/save_ImageNet/")
    echo "== SMOKE: $MODEL W${BITS}A${BITS}${F8L8:+ F8L8} on a generated 3-class ImageFolder, random networks, 224 px"
    "$PY" BNScenters.py --dataPath "$OUT/data" --model_name "$MODEL" --teacher_path random --save_path "$OUT/save_ImageNet"
    "${LAUNCH[@]}" "$TRAIN" --model_name "$MODEL" --conf_path imagenet_config.hocon --id="$ID" "${COMMON[@]}" \
        --teacher_path random --qw "$BITS" --qa "$BITS" --nEpochs 2 --iters_per_epoch 1 --warmup_epochs 1 \
        --unfreeze_epochs 1 --correct_set_epoch 0 --test_start_epoch 0 --batchSize 2 --nThreads 0 --test_teacher false
    MODEL_PTH=$(ls -d "$OUT"/save_ImageNet/log_*/model.pth | head -1)
    "${LAUNCH[@]}" "$TEST" --conf_path imagenet_config.hocon --model_name "$MODEL" --model_path "$MODEL_PTH" \
        "${COMMON[@]}" --qw "$BITS" --qa "$BITS" --nThreads 0
    cd "$ROOT" && "$PY" -m common.compare fdda
    exit 0
fi

if [ -n "${EPOCHS:-}" ] && ! [[ "$EPOCHS" =~ ^[1-9][0-9]*$ ]]; then
    echo "reproduce-fdda: EPOCHS=$EPOCHS must be a whole number of epochs >= 1 (the published recipe: 400)" >&2
    exit 2
fi
if [ ! -d "$DATA/train" ] || [ ! -d "$DATA/val" ]; then
    echo "reproduce-fdda needs ImageNet (ILSVRC2012) as an ImageFolder: DATA=/path/with/train/<wnid>/*.JPEG and" \
         "val/<wnid>/*.JPEG (got DATA='${DATA}'); nothing is downloaded here. Run \`make reproduce-fdda DATA=/data/imagenet\`," \
         "or SMOKE=1 to check the pipeline on generated data." >&2
    exit 2
fi
WEIGHTS=${TEACHER:-$("$PY" -c "from fdda import models; print(models.default_weights_path('$MODEL'))")}
if [ ! -f "$WEIGHTS" ]; then
    echo "reproduce-fdda needs the pretrained $MODEL weights $(basename "$WEIGHTS") at $WEIGHTS (the file the original" \
         "used; nothing is downloaded here): copy it there or pass TEACHER=/path/to/file." >&2
    exit 2
fi
export FDDA_DATA="$DATA"
mkdir -p save_ImageNet
cat <<MSG
== FDDA reproduction: $MODEL W${BITS}A${BITS}$([ "${F8L8:-0}" = 1 ] && echo "-F8L8" || echo "-F${BITS}L${BITS}"), ImageNet from $DATA, teacher $WEIGHTS
   The published recipe is 400 epochs x 200 iterations of batch 16 at 224 px on one GPU (days per run);
   EPOCHS=N shortens it (recorded as shortened, never shown as a reproduction).
MSG
if [ ! -f "save_ImageNet/${MODEL}_mean_Categorical_bs_1.pickle" ]; then
    "$PY" BNScenters.py --dataPath "$DATA" --model_name "$MODEL" --teacher_path "$WEIGHTS"
else
    echo "== BNS centers exist in fdda/save_ImageNet (delete them to re-draw the calibration images)"
fi
EP=()
if [ -n "${EPOCHS:-}" ]; then
    # the student learns only after warmup_epochs (50 of the published 400): a shorter run keeps that share
    WARMUP=50
    if [ "$EPOCHS" -lt 400 ]; then WARMUP=$((EPOCHS * 50 / 400)); fi
    EP=(--nEpochs "$EPOCHS" --warmup_epochs "$WARMUP")
    echo "== EPOCHS=$EPOCHS: nEpochs $EPOCHS, warmup_epochs $WARMUP"
fi
"${LAUNCH[@]}" "$TRAIN" --model_name "$MODEL" --conf_path imagenet_config.hocon --id="$ID" --teacher_path "$WEIGHTS" \
    --qw "$BITS" --qa "$BITS" ${EP[@]+"${EP[@]}"}
MODEL_PTH=$(ls -td save_ImageNet/log_*_qw${BITS}_qa${BITS}_*/model.pth | head -1)
"${LAUNCH[@]}" "$TEST" --conf_path imagenet_config.hocon --model_name "$MODEL" --model_path "$MODEL_PTH" --qw "$BITS" --qa "$BITS"
cd "$ROOT" && "$PY" -m common.compare fdda
