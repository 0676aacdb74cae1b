#!/usr/bin/env bash
# make reproduce-alq: the README's LeNet5 recipe on MNIST, once per seed, each in its own run directory
# (runs/alq/lenet5-seed<N>[-<variant>]/), exported bit-packed, then `compare alq` (mean, std, min-max over seeds).
#
#   DATA=/path/to/mnist-root   folder holding MNIST/raw (default $QUANTLAB_DATA, else <repo>/data,
#                              where torchvision downloads MNIST if the network allows)
#   SEEDS="1 2 3"              seeds to run (default 1); each is the whole recipe (PRETRAIN, ALQ, POSTTRAIN)
#   VARIANT=stable_tie_order   run the ALQ and POSTTRAIN stages again with --<VARIANT> (stable_tie_order,
#                              fix_importance_index, fix_sign_flip) on each seed's finished PRETRAIN model;
#                              recorded under the setting "ALQ --<VARIANT>", never pooled with the ALQ row
#   RESUME=0                   start from scratch (default 1: continue a killed run, skip finished stages)
#   ALQ_THREADS=N              torch CPU threads (default 1: on a shared 2-core machine OpenMP spinning
#                              makes 2 threads several times slower; two seeds side by side use one core each)
#   ALQ_ARGS="..."             extra lenet5.py flags (e.g. a shortened smoke run; recorded as shortened)
#   NO_COMPARE=1               skip the compare at the end (when several seeds run as separate jobs)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
DATA="${DATA:-${QUANTLAB_DATA:-$ROOT/data}}"
case "$DATA" in /*) ;; *) DATA="$PWD/$DATA" ;; esac   # relative to where it was typed: the runs start in alq/
PY="${PYTHON:-python}"
RUNS="${QUANTLAB_RUNS:-$ROOT/runs}"
export OMP_NUM_THREADS="${ALQ_THREADS:-1}" MKL_NUM_THREADS="${ALQ_THREADS:-1}"
RESUME_FLAG=(--resume)
if [ "${RESUME:-1}" != 1 ]; then RESUME_FLAG=(--overwrite); fi
case "${VARIANT:-}" in
    ""|stable_tie_order|fix_importance_index|fix_sign_flip) ;;
    *) echo "reproduce-alq: VARIANT=$VARIANT is not one of stable_tie_order, fix_importance_index, fix_sign_flip" >&2
       exit 2 ;;
esac

cd "$HERE"
for seed in ${SEEDS:-1}; do
    base="$RUNS/alq/lenet5-seed$seed"
    start=$SECONDS
    if [ -z "${VARIANT:-}" ]; then
        run="$base"
        stages=(--PRETRAIN --ALQ --POSTTRAIN)
        inputs=(--model_ori "$run/lenet5_model_ori.pth" --model "$run/lenet5_model.pth")
    else
        run="$base-$VARIANT"
        stages=(--ALQ --POSTTRAIN --"$VARIANT")
        inputs=(--model_ori "$base/lenet5_model_ori.pth" --model "$run/lenet5_model.pth")
        [ -f "$base/lenet5_model_ori.pth" ] || { echo "reproduce-alq: VARIANT needs the finished PRETRAIN of seed $seed ($base/lenet5_model_ori.pth): run SEEDS=$seed first" >&2; exit 2; }
    fi
    mkdir -p "$run"
    rm -f "$run/lenet5_alq.alqpack"                 # the export is re-made from the final model every time
    cmd=("$PY" lenet5.py "${stages[@]}" --data "$DATA" --seed "$seed" --log_dir "$run" "${inputs[@]}"
         --export "$run/lenet5_alq.alqpack" "${RESUME_FLAG[@]}" ${ALQ_ARGS:-})
    echo "== seed $seed: ${cmd[*]}"
    "${cmd[@]}"
    echo "== seed $seed done in $(( (SECONDS - start) / 60 )) min: $run (log.txt, records.jsonl)"
done
cd "$ROOT"
if [ "${NO_COMPARE:-0}" != 1 ]; then "$PY" -m common.compare alq; fi
