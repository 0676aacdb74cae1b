#!/usr/bin/env bash
# make reproduce-alq: the README's LeNet5 recipe on MNIST, then the bit-packed export and `compare alq`.
#
#   DATA=/path/to/mnist-root   folder holding MNIST/raw (default ../shared/data if present, else ./data,
#                              where torchvision downloads MNIST if the network allows)
#   RESUME=0                   start from scratch (default 1: continue a killed run, skip finished stages)
#   ALQ_THREADS=N              torch CPU threads (default 1: on a shared 2-core machine OpenMP spinning
#                              makes 2 threads several times slower; raise it on a machine of your own)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
if [ -z "${DATA:-}" ]; then
    if [ -d "$ROOT/../shared/data" ]; then DATA="$(cd "$ROOT/../shared/data" && pwd)"; else DATA="$ROOT/data"; fi
fi
PY="${PYTHON:-python}"
export OMP_NUM_THREADS="${ALQ_THREADS:-1}" MKL_NUM_THREADS="${ALQ_THREADS:-1}"
RESUME_FLAG=(--overwrite)           # RESUME=0: start from scratch, replacing the previous stage outputs
if [ "${RESUME:-1}" = 1 ]; then RESUME_FLAG=(--resume); fi

cd "$HERE"
start=$SECONDS
echo "== python lenet5.py --PRETRAIN --ALQ --POSTTRAIN --data $DATA ${RESUME_FLAG[*]}"
"$PY" lenet5.py --PRETRAIN --ALQ --POSTTRAIN --data "$DATA" "${RESUME_FLAG[@]}"
echo "== export: python lenet5.py --data $DATA --export lenet5_alq.alqpack --overwrite"
"$PY" lenet5.py --data "$DATA" --export lenet5_alq.alqpack --overwrite       # re-packed from the final model
echo "== reproduce-alq wall time: $(( (SECONDS - start) / 60 )) min (stage times: runs/alq/lenet5-*/log.txt)"
cd "$ROOT"
"$PY" -m common.compare alq
