#!/usr/bin/env bash
# APoT speed check on a GPU machine, in one call. Prepare here with `bash .ci/prepare-gpu.sh`
# (wheels in .whl/, MNIST gzipped and a packed 5,000-image CIFAR-10 subset in .gpudata/), carry both, then run
# there from the repository root:
#     bash apot/gpu_check.sh [bench] [train]          (both when none is named)
#   bench  benchmarks/bench_apot_fast.py and bench_apot_levels.py on the GPU: quantizer fwd+bwd fast / reference /
#          original code path / compiled, the MNIST epoch (469 iterations), ResNet-20 and ResNet-18 steps 2-5 bit
#          vs float (eager; ResNet-20 also compiled) -> results/bench/apot_fast.csv, apot_levels.csv
#   train  short real runs, wall time each: MNIST ResNet-10 4 bit, 1 epoch (device loader, eager and --compile);
#          CIFAR-10 ResNet-20 4 bit, 2 epochs on the packed subset (eager and --compile)
# Everything it writes (CSV rows, logs, run directories) is copied to $OUT when that is set (the device runner's
# output folder). PY (default python3) is the interpreter with torch and torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=${SITE:-/tmp/quantlab-site}
if [ -d .whl ] && ! [ -d "$SITE" ]; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
LOGS=${OUT:-results}/gpu_check
mkdir -p "$LOGS"
export QUANTLAB_RUNS="$LOGS/runs" RESULTS_DIR="$LOGS/results"
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(bench train)
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" \
  | tee "$LOGS/device.txt"

timed() {  # timed <name> <command...>: run, log, and print the wall time
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" > "$LOGS/$name.log" 2>&1 || { echo "!! $name failed (exit $?), tail of $LOGS/$name.log:"; tail -20 "$LOGS/$name.log"; }
  echo "== $name: $((SECONDS - t0)) s"
  grep -E "Loss|Acc@1|Prec|epoch|ms" "$LOGS/$name.log" | tail -4 || true
}

for stage in "${STAGES[@]}"; do
  case $stage in
    bench)
      timed bench_apot_fast "$PY" benchmarks/bench_apot_fast.py --out "$LOGS/apot_fast.csv"
      timed bench_apot_levels "$PY" benchmarks/bench_apot_levels.py --out "$LOGS/apot_levels.csv"
      cat "$LOGS/bench_apot_fast.log" ;;
    train)
      DATA=${DATA:-$PWD/.gpudata/data}                 # MNIST/raw/*.gz + cifar-10-batches-py/
      for extra in "" "--compile"; do
        tag=${extra:+-compile}
        timed "mnist-resnet10-4bit$tag" bash -c "cd apot/MNIST && $PY main.py -a resnet10 --bit 4 --epochs 1 \
          --data '$DATA' --name gpu-mnist$tag --overwrite $extra"
        timed "cifar10-res20-4bit$tag" bash -c "cd apot/CIFAR10 && $PY main.py --arch res20 --bit 4 --epochs 2 \
          --data '$DATA' --name gpu-cifar$tag --overwrite --lr 0.04 --wd 1e-4 $extra"
      done ;;
    *) echo "unknown stage $stage (bench, train)"; exit 2 ;;
  esac
done
