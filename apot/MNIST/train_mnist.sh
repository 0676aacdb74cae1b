#!/usr/bin/env bash
# The APoT MNIST README's recipe, every published row, as seed distributions:
#   python main.py --arch <ARCH> --bit <BIT> --epochs 25 [--power 0] --seed <SEED>
# (batch 128, lr 0.01, wd 1e-4: main.py's defaults, as in the README). Each run is runs/apot/<name>/ with
# name mnist-<arch>_<bit>bit[_uniform]-seed<SEED> (plus -e<EPOCHS> for a shortened run, which its records
# say is shortened). A finished run (its records.jsonl exists, or its records are committed under
# results/reference/apot/) is skipped, an interrupted one is resumed from its checkpoint.pth, so rerunning
# the same command continues where it stopped.
#   ARCH    architectures (default "resnet10 resnet18")
#   BITS    bit-widths (default "2 3 4 5")      POWERS  1 = APoT, 0 = uniform (default "1 0")
#   SEEDS   seeds (default "1 2 3")             EPOCHS  epochs per run (default 25, the README's)
#   MAX_ITERS  stop every epoch after N iterations (smoke runs: name gets -i<N>, recorded as shortened)
#   JOBS    runs at a time (default 1; one per core: each run uses one torch thread when JOBS > 1)
#   DATA    MNIST root holding MNIST/raw/*-ubyte (default $QUANTLAB_DATA, else ./data)
#   PYTHON  interpreter (default python)
set -euo pipefail
cd "$(dirname "$0")"
ARCH=${ARCH:-resnet10 resnet18}
BITS=${BITS:-2 3 4 5}
POWERS=${POWERS:-1 0}
SEEDS=${SEEDS:-1 2 3}
EPOCHS=${EPOCHS:-25}
JOBS=${JOBS:-1}
PY=${PYTHON:-python}
DATA=${DATA:-${QUANTLAB_DATA:-./data}}
RUNS=${QUANTLAB_RUNS:-$(cd ../.. && pwd)/runs}
if [ "$JOBS" -gt 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}; fi

one() {  # one <arch> <bit> <power> <seed>: run, resume or skip one setting
    local arch=$1 bit=$2 power=$3 seed=$4 tag name dir
    tag="${arch}_${bit}bit"; [ "$power" = 0 ] && tag+="_uniform"
    name="mnist-${tag}-seed${seed}"; [ "$EPOCHS" != 25 ] && name+="-e${EPOCHS}"
    [ -n "${MAX_ITERS:-}" ] && name+="-i${MAX_ITERS}"
    dir="$RUNS/apot/$name"
    if [ -s "$dir/records.jsonl" ]; then echo "== $name: finished, skipped"; return 0; fi
    # a run already committed as a reference result (another machine or session made it) is not redone
    if grep -qs "\"run_dir\": \"runs/apot/$name\"" "../../results/reference/apot/mnist-$arch.jsonl"; then
        echo "== $name: in results/reference/apot/mnist-$arch.jsonl, skipped"; return 0; fi
    local cmd=("$PY" main.py --arch "$arch" --bit "$bit" --epochs "$EPOCHS" --seed "$seed" --data "$DATA")
    [ "$power" = 0 ] && cmd+=(--power 0)
    [ -n "${MAX_ITERS:-}" ] && cmd+=(--max-iters "$MAX_ITERS")
    if [ -f "$dir/checkpoint.pth" ]; then cmd+=(--resume "$dir/checkpoint.pth"); echo "== $name: resuming"
    else cmd+=(--name "$name" --overwrite); echo "== $name: starting"; fi
    "${cmd[@]}" > >(grep --line-buffered -v '^clipping threshold' >> "$dir.out") 2>&1 || {
        echo "== $name: failed (exit $?), see $dir.out"; return 1; }
    echo "== $name: done"
}

mkdir -p "$RUNS/apot"
settings=()
for seed in $SEEDS; do for arch in $ARCH; do for bit in $BITS; do for power in $POWERS; do
    settings+=("$arch $bit $power $seed")
done; done; done; done
status=0
running=0
for s in "${settings[@]}"; do
    # shellcheck disable=SC2086
    one $s & running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n || status=1; running=$((running - 1)); fi
done
while [ "$running" -gt 0 ]; do wait -n || status=1; running=$((running - 1)); done
exit $status
