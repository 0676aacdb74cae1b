#!/usr/bin/env bash
# make reproduce-apot: APoT end to end.
#   1. evaluate the authors' published checkpoints (CKPT, default ../shared/checkpoints/apot, if present):
#      CIFAR-10 ResNet-20 32/4/3/2-bit on the CIFAR-10 test images under DATA, MNIST ResNet-10 2-5-bit
#      APoT and uniform on MNIST;
#   2. train the MNIST README's recipe for every published row (MNIST/train_mnist.sh: ResNet-10/18, 2-5 bit,
#      APoT and uniform, 25 epochs, one run per seed; SEEDS= (default "1 2 3"), ARCH= (default "resnet10
#      resnet18"), BITS=, POWERS=, JOBS= runs at a time; EPOCHS= shortens it, recorded as shortened).
#      Finished runs are skipped and interrupted ones resumed, so rerunning continues; SKIP_MNIST=1 skips it;
#   3. train the CIFAR-10 ResNet-20 progressive recipe 32 -> 4 -> 3 -> 2 bits (CIFAR10/train_res20.sh,
#      EPOCHS per stage, default 300 as published), whose results are recorded last so `compare` shows them;
#   4. print published vs measured (python -m common.compare apot).
# Environment: EPOCHS, DATA (default $QUANTLAB_DATA, else ./data), CKPT (the published checkpoints,
# see apot/README.md), OUT (training output, default runs/apot/reproduce-res20-<time>/ holding one run directory
# per stage), PYTHON, RESUME=1 (continue the newest reproduction's interrupted stages), SKIP_TRAIN=1, SKIP_CKPT=1,
# SMOKE=1 (a check that the pipeline runs, ~2-3 min on a 2-core CPU: the 4-bit CIFAR-10 checkpoint, one
# ResNet-10 2-bit MNIST run and the four CIFAR-10 stages, 1 epoch of MAX_ITERS (default 5) iterations each,
# in a new runs/apot-smoke-<time>/ folder; recorded as shortened, never shown as a reproduction),
# APOT_THREADS=N (torch CPU threads; unset = torch's default. On a shared 2-core machine 1 is often faster,
# because OpenMP threads spin while another job holds the other core).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
if [ -n "${APOT_THREADS:-}" ]; then export OMP_NUM_THREADS=$APOT_THREADS MKL_NUM_THREADS=$APOT_THREADS; fi
RUNS=${QUANTLAB_RUNS:-$ROOT/runs}
CKPT_BITS="32 4 3 2" MNIST_CKPTS=1
if [ "${SMOKE:-0}" = 1 ]; then
    EPOCHS=1 CKPT_BITS=4 MNIST_CKPTS=0
    export MAX_ITERS=${MAX_ITERS:-5} ARCH=${ARCH:-resnet10} BITS=${BITS:-2} POWERS=${POWERS:-1} SEEDS=${SEEDS:-1}
    RUNS="$RUNS/apot-smoke-$(date +%Y%m%d-%H%M%S)"
    export QUANTLAB_RUNS=$RUNS
    echo "== SMOKE: 1 epoch of $MAX_ITERS iterations per stage, output $RUNS (recorded as shortened)"
fi
MNIST_EPOCHS=${EPOCHS:-25}
EPOCHS=${EPOCHS:-300}
DATA=${DATA:-${QUANTLAB_DATA:-./data}}
CKPT=${CKPT:-../shared/checkpoints/apot}
abspath() { if [ -e "$1" ]; then (cd "$1" && pwd); else echo "$1"; fi; }
DATA=$(abspath "$DATA")
CKPT=$(abspath "$CKPT")
# CIFAR-10 under DATA/cifar10 (the shared layout) or DATA itself (torchvision's cifar-10-batches-py)
if [ -d "$DATA/cifar10" ]; then CIFAR=$DATA/cifar10; else CIFAR=$DATA; fi
# Each reproduction trains into its own folder (no run overwrites another); RESUME=1 continues the newest.
if [ -z "${OUT:-}" ]; then
    last=$(ls -d "$RUNS"/apot/reproduce-res20-* 2>/dev/null | tail -1 || true)
    if [ "${RESUME:-0}" = 1 ] && [ -n "$last" ]; then OUT=$last
    else OUT="$RUNS/apot/reproduce-res20-$(date +%Y%m%d-%H%M%S)"; fi
fi
case "$OUT" in /*) ;; *) OUT="$ROOT/apot/CIFAR10/$OUT" ;; esac

cat <<MSG
== APoT reproduction: EPOCHS=$EPOCHS per stage, CIFAR-10 from $CIFAR, MNIST from $DATA, checkpoints from $CKPT
   Expected time on CPU (measured with APOT_THREADS=1 on a 2-core machine, the other core busy): ~10-30 s per
   CIFAR checkpoint (1,000 test images; ~5 min each on the full 10,000), ~1-2 min per MNIST checkpoint;
   training ResNet-20 ~0.7 s per full-precision and ~1.3-1.6 s per quantized iteration (391 per epoch),
   i.e. ~5 and ~9 min per epoch, so EPOCHS=1 takes ~35 min and EPOCHS=300 about a week:
   use a GPU (a few seconds per epoch) for the published recipe.
MSG

if [ "${SKIP_CKPT:-0}" != 1 ] && [ -d "$CKPT" ]; then
    for bit in $CKPT_BITS; do
        f="$CKPT/cifar10/res20_${bit}bit/model_best.pth.tar"
        [ -f "$f" ] || { echo "skip: $f not found"; continue; }
        echo "== published CIFAR-10 res20 ${bit}-bit checkpoint"
        (cd apot/CIFAR10 && "$PY" main.py -a res20 --bit "$bit" -e --resume "$f" --data "$CIFAR" | grep -v '^clipping threshold')
    done
    for bit in $([ "$MNIST_CKPTS" = 1 ] && echo 2 3 4 5); do
        for kind in "" _uniform; do
            f="$CKPT/mnist/resnet10_${bit}bit${kind}/model_best.pth.tar"
            [ -f "$f" ] || { echo "skip: $f not found"; continue; }
            power=(); [ -n "$kind" ] && power=(--power 0)
            echo "== published MNIST resnet10 ${bit}-bit${kind} checkpoint"
            (cd apot/MNIST && "$PY" main.py -a resnet10 --bit "$bit" -e --resume "$f" --data "$DATA" ${power[@]+"${power[@]}"})
        done
    done
elif [ "${SKIP_CKPT:-0}" != 1 ]; then
    echo "== no published checkpoints at $CKPT: skipping their evaluation (apot/README.md says where to get them; set CKPT=...)"
fi

if [ "${SKIP_TRAIN:-0}" != 1 ] && [ "${SKIP_MNIST:-0}" != 1 ]; then
    echo "== MNIST README recipe: ${ARCH:-resnet10 resnet18}, bits ${BITS:-2 3 4 5}, power ${POWERS:-1 0}, seeds ${SEEDS:-1 2 3}, $MNIST_EPOCHS epochs"
    echo "   (~12 min per ResNet-10 and ~20 min per ResNet-18 run on one CPU core; output under ${RUNS}/apot/mnist-*)"
    EPOCHS=$MNIST_EPOCHS DATA=$DATA PYTHON=$PY bash apot/MNIST/train_mnist.sh
fi

if [ "${SKIP_TRAIN:-0}" != 1 ]; then
    EPOCHS=$EPOCHS DATA=$CIFAR OUT=$OUT PYTHON=$PY bash apot/CIFAR10/train_res20.sh
fi

"$PY" -m common.compare apot
