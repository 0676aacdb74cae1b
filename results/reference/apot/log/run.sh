#!/bin/bash
# How published_checkpoints.jsonl and the logs here were made (2026-11-26, 1 CPU thread):
# every published APoT checkpoint evaluated with the documented -e command. Run from anywhere;
# SHARED = folder holding checkpoints/apot/ and data/ (see apot/README.md); OUT = where to write.
set -e
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
OUT=${OUT:-/tmp/apot_reference}
mkdir -p "$OUT/logs"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RESULTS_DIR=$OUT/results
cd "$ROOT/apot/CIFAR10"
for bit in 32 4 3 2; do
  python main.py -a res20 --bit $bit -e --resume "$SHARED/checkpoints/apot/cifar10/res20_${bit}bit/model_best.pth.tar" \
      --data "$SHARED/data/cifar10" -j 0 > "$OUT/logs/cifar10_res20_${bit}bit.log" 2>&1
done
cd "$ROOT/apot/MNIST"
for bit in 2 3 4 5; do for kind in "" _uniform; do
  power=1; [ -n "$kind" ] && power=0
  python main.py -a resnet10 --bit $bit --power $power -e \
      --resume "$SHARED/checkpoints/apot/mnist/resnet10_${bit}bit${kind}/model_best.pth.tar" --data "$SHARED/data" -j 0 \
      > "$OUT/logs/mnist_resnet10_${bit}bit${kind}.log" 2>&1
done; done
