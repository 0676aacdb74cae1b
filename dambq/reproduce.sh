#!/usr/bin/env bash
# make reproduce-dambq: the README's three stages on CIFAR-10 ResNet-20, then `compare dambq` and a figure.
#   1. float:     main_cifar10.py -a 'resnet20' --expr-name 'cifar10_resnet20_float'            (batch 512)
#   2. W4A4:      ... --wgt-target 4.0 --act-target 4.0 --quantize --pretrained <1>/latest.pth.tar   (batch 512:
#                 98 it/epoch, as the authors' W4A4 log)
#   3. W2.0A2.0:  ... --wgt-target 2.0 --act-target 2.0 --quantize --resume <2>/latest.pth.tar -b 400 (the authors'
#                 W2.0A2.0 log shows 125 it/epoch, i.e. batch 400, not the default 512)
# Each stage records top-1 (last epoch, as the README reports, and best epoch) and the average bits; then
# `python -m common.compare dambq` and results/dambq_curves.png (this run over the authors' curves).
#
# Environment:
#   DATA=DIR       CIFAR-10 root or a folder holding cifar10/ (default $QUANTLAB_DATA, else <repo>/data)
#   EPOCHS=N       epochs per stage (default 300 = the paper). A shorter run scales the LBA window [0,150] to
#                  [0, N/2] and is recorded as "[shortened ...]", never paired with a published number.
#   DAMBQ_ITERS=N  also stop every epoch after N iterations (smoke runs; recorded as shortened)
#   RUNS=DIR       run folder (default runs/dambq); RESUME=0 refuses to reuse it (default 1: finished stages are
#                  skipped, a killed stage continues exactly with --continue)
#   DAMBQ_THREADS=N torch CPU threads (default: torch's choice); WORKERS=N data workers (default 4); PYTHON
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python}"
DATA="${DATA:-${QUANTLAB_DATA:-$ROOT/data}}"
DATA="$(cd "$DATA" 2>/dev/null && pwd || echo "$DATA")"
if [ -d "$DATA/cifar10" ]; then CIFAR="$DATA/cifar10"; else CIFAR="$DATA"; fi
EPOCHS="${EPOCHS:-300}"
RUNS="${RUNS:-$ROOT/runs/dambq}"
case "$RUNS" in /*) ;; *) RUNS="$ROOT/$RUNS" ;; esac
REF="$ROOT/../shared/reference/dambq/logs"
if [ -n "${DAMBQ_THREADS:-}" ]; then export OMP_NUM_THREADS=$DAMBQ_THREADS MKL_NUM_THREADS=$DAMBQ_THREADS; fi

COMMON=(--data "$CIFAR" --checkpoint-dir "$RUNS" --epochs "$EPOCHS" -j "${WORKERS:-4}")
NOTE="full schedule (300 epochs per stage)"
if [ "$EPOCHS" != 300 ] || [ -n "${DAMBQ_ITERS:-}" ]; then
    D1=$(( EPOCHS / 2 )); [ "$D1" -ge 1 ] || D1=1
    NOTE="SHORTENED: $EPOCHS epochs per stage${DAMBQ_ITERS:+, $DAMBQ_ITERS it/epoch}, LBA window 0..$D1"
    [ -n "${DAMBQ_ITERS:-}" ] && COMMON+=(--max-iters "$DAMBQ_ITERS")
    W2_WINDOW=(--duration 0 "$D1")
else
    W2_WINDOW=()
fi
echo "== DAMBQ reproduction: $NOTE; CIFAR-10 from $CIFAR; runs in $RUNS"
echo "   CPU cost (2-core machine, 1 thread): ~1.5 s per float and ~2 s per quantized iteration of 128 images, i.e."
echo "   ~10 min per float epoch at batch 512; the published 3 x 300 epochs need a GPU."

# stage NAME ARGS...: run it, skip it when finished, continue it exactly when killed
stage() {
    local name=$1; shift
    local ck="$RUNS/$name/latest.pth.tar" extra=()
    if [ -f "$ck" ]; then
        [ "${RESUME:-1}" = 1 ] || { echo "error: $RUNS/$name exists (RESUME=0)" >&2; exit 2; }
        local done
        done=$("$PY" -c "import torch,sys; print(torch.load(sys.argv[1], weights_only=True)['epoch'])" "$ck")
        if [ "$done" -ge "$EPOCHS" ]; then echo "== $name: finished ($done epochs), skipped"; return; fi
        echo "== $name: continuing after $done of $EPOCHS epochs"
        extra=(--continue)
    fi
    # --name NAME: the stage's run directory is $RUNS/NAME itself (the original's <checkpoint-dir>/<expr-name>),
    # so a killed stage continues there and the next stage reads its latest.pth.tar
    echo "== python main_cifar10.py $* ${COMMON[*]} --name $name ${extra[*]}"
    (cd "$HERE" && "$PY" main_cifar10.py "$@" "${COMMON[@]}" --name "$name" ${extra[@]+"${extra[@]}"})
}

start=$SECONDS
stage cifar10_resnet20_float -a 'resnet20' --expr-name 'cifar10_resnet20_float'
stage cifar10_resnet20_w4a4_ -a 'resnet20' --expr-name 'cifar10_resnet20_w4a4_' --lr 5e-2 --wgt-target 4.0 \
    --act-target 4.0 --quantize --pretrained "$RUNS/cifar10_resnet20_float/latest.pth.tar"
echo "== W2.0A2.0 uses -b 400: the authors' W2.0A2.0 log shows 125 it/epoch (W4A4: 98 = the default 512)"
stage cifar10_resnet20_w2.0a2.0 -a 'resnet20' --expr-name 'cifar10_resnet20_w2.0a2.0' --lr 5e-2 --wgt-target 2.0 \
    --act-target 2.0 --quantize --resume "$RUNS/cifar10_resnet20_w4a4_/latest.pth.tar" -b 400 \
    ${W2_WINDOW[@]+"${W2_WINDOW[@]}"}
echo "== reproduce-dambq training wall time: $(( (SECONDS - start) / 60 )) min"

cd "$ROOT"
"$PY" -m common.compare dambq
refs=()
[ -d "$REF" ] && refs=(--reference "$REF")
"$PY" "$HERE/plot_curves.py" --runs "$RUNS" ${refs[@]+"${refs[@]}"} --out "${RESULTS_DIR:-$ROOT/results}/dambq_curves.png" \
    --note "DAMBQ CIFAR-10 ResNet-20, $NOTE"
