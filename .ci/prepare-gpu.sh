#!/usr/bin/env bash
# Prepares what `make test-gpu` needs on a GPU machine that has torch/torchvision/pytest but no network:
# wheels of the pure-Python packages it lacks (.whl/) and MNIST gzipped (.gpudata/data/MNIST/raw, 11 MB).
# Both folders are git-ignored locally (.git/info/exclude); see README "GPU checks" for the command to run there.
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
du -sh .whl .gpudata
