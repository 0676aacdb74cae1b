#!/usr/bin/env bash
# Prepares what `make test-gpu` and `apot/gpu_check.sh` need on a GPU machine that has torch/torchvision/pytest
# but no network: wheels of the pure-Python packages it lacks (.whl/), MNIST gzipped (.gpudata/data/MNIST/raw,
# 11 MB) and a CIFAR-10 subset packed as cifar-10-batches-py (the first 5,000 training images in the official
# order as 5 batches of 1,000, and the first 1,000 test images; 18 MB). Both folders are git-ignored
# locally (.git/info/exclude); see README "GPU checks" for the commands to run there.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${QUANT_SHARED:-../shared}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpudata/' .git/info/exclude 2>/dev/null || echo '/.gpudata/' >> .git/info/exclude
mkdir -p .whl .gpudata/data/MNIST/raw
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl tensorboardX pyhocon pytorchcv
for f in "$SHARED"/data/MNIST/raw/*-ubyte; do
  [ -e ".gpudata/data/MNIST/raw/$(basename "$f").gz" ] || gzip -c "$f" > ".gpudata/data/MNIST/raw/$(basename "$f").gz"
done
CIFAR=.gpudata/data/cifar-10-batches-py
if ! [ -e "$CIFAR/test_batch" ]; then
  PYBIN=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
  PYTHONPATH=$PWD "$PYBIN" - "$SHARED/data/cifar10" "$CIFAR" <<'PY'
import os, pickle, sys
import numpy as np
from common.data import cifar10
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
def pack(ds, lo, hi, name):      # NHWC uint8 -> the python batch layout (N x 3072, channel planes)
    x = np.asarray(ds.data[lo:hi]).transpose(0, 3, 1, 2).reshape(hi - lo, -1)
    with open(os.path.join(dst, name), "wb") as f:
        pickle.dump({"data": np.ascontiguousarray(x), "labels": list(ds.targets[lo:hi])}, f)
train, test = cifar10(src, train=True), cifar10(src, train=False)
for i in range(5):
    pack(train, 1000 * i, 1000 * (i + 1), f"data_batch_{i + 1}")
pack(test, 0, 1000, "test_batch")
PY
fi
du -sh .whl .gpudata
