"""ALQ basis step: sorted searches vs the straightforward (weights x 2^M) argmin.

One basis step's code search (BinaryLayer.optimize_bin_basis: every weight takes the code of the nearest of its
group's 2^M representable values) on the LeNet5 FC layer (500x800, 2 subchannels, M=6) and on a ResNet-18 3x3
layer (layer4, 512x512x3x3, pixelwise, M=8), with the sorted search (`nearest_code`) and the straightforward form
that materialises |target - value| for all 2^M values (`nearest_code_dense`, as the original does), and with the
branch-free search the training steps use (`nearest_code_fast`: a fixed binary search by gathers). All must choose
identical codes. Each case runs in its own subprocess so that its peak memory (Linux VmHWM, reset just
before the step; torch.cuda.max_memory_allocated on a GPU) is its own. Rows go to results/bench/alq_basis.csv.

    python benchmarks/bench_alq_basis.py [--repeats 3] [--threads N] [--skip-dense-resnet]
"""
import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from common import REPO_ROOT
from common.runlog import cpu_name

CASES = {"lenet5_fc1": dict(shape=(500, 800), structure="subchannelwise", subc=2, max_bit=6),
         "resnet18_layer4_3x3": dict(shape=(512, 512, 3, 3), structure="pixelwise", subc=0, max_bit=8)}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (median reported)")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
parser.add_argument("--skip-dense-resnet", action="store_true",
                    help="skip the straightforward form on the ResNet layer (about 2.4 GB)")
parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "bench", "alq_basis.csv"))
parser.add_argument("--case", help=argparse.SUPPRESS)
parser.add_argument("--method", help=argparse.SUPPRESS)


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def run_case(name, method, repeats, threads):
    """In the subprocess: build the layer, time `repeats` code searches, measure the peak of one."""
    from alq import binarynet as bn, fastpath, search
    from common.device import get_device
    torch.set_num_threads(threads)
    dev = get_device()
    c = CASES[name]
    torch.manual_seed(0)
    w = torch.randn(c["shape"]) * 0.05
    layer = (bn.FCLayer_bin(w, 0, c["structure"], c["subc"], c["max_bit"]) if len(c["shape"]) == 2
             else bn.ConvLayer_bin(w, 0, c["structure"], c["max_bit"]))
    for attr in ("B", "alpha", "mask", "w_FP", "bit_table"):
        setattr(layer, attr, getattr(layer, attr).to(dev))
    # a state after some pruning: about a third of the coordinates removed
    g = torch.Generator().manual_seed(1)
    layer.mask &= (torch.rand(layer.mask.shape, generator=g) > 0.33).to(dev)
    layer.alpha = layer.alpha * layer.mask
    target = layer.to_groups(layer.w_FP + torch.randn(w.shape, generator=g).to(dev) * 1e-3)
    find = {"fast": fastpath.nearest_code_fast, "sorted": search.nearest_code,
            "dense": search.nearest_code_dense}[method]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
    code = find(target, layer.alpha, layer.bit_table)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        code = find(target, layer.alpha, layer.bit_table)
        sync()
        times.append(time.perf_counter() - t0)
    del code
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        code = find(target, layer.alpha, layer.bit_table)
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _status("VmRSS")
        ok = _reset_peak()
        code = find(target, layer.alpha, layer.bit_table)
        peak = _status("VmHWM") - base if ok else None
    print(json.dumps({"seconds": statistics.median(times), "peak_bytes": peak, "device": str(dev),
                      "codes": int(code.sum()), "weights": int(w.numel()), "M": c["max_bit"]}))


def main():
    args = parser.parse_args()
    if args.case:
        return run_case(args.case, args.method, args.repeats, args.threads)
    rows = []
    for name in CASES:
        res = {}
        for method in ("fast", "sorted", "dense"):
            if method == "dense" and name.startswith("resnet") and args.skip_dense_resnet:
                continue
            p = subprocess.run([sys.executable, __file__, "--case", name, "--method", method, "--repeats",
                                str(args.repeats), "--threads", str(args.threads)], capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{name} {method}: failed\n{p.stderr[-1500:]}")
                continue
            res[method] = json.loads(p.stdout.strip().splitlines()[-1])
        assert len({r["codes"] for r in res.values()}) <= 1, f"{name}: the searches disagree"
        for method, r in res.items():
            rows.append({"case": name, "method": method, "weights": r["weights"], "M": r["M"],
                         "seconds": f"{r['seconds']:.5f}", "peak_MB": "" if r["peak_bytes"] is None
                         else f"{r['peak_bytes'] / 2 ** 20:.1f}", "device": r["device"]})
        d = res.get("dense")
        for method in ("fast", "sorted"):
            s = res.get(method)
            if s is None or d is None:
                continue
            mem = (f"{d['peak_bytes'] / max(s['peak_bytes'], 1):.1f}x less memory"
                   if s["peak_bytes"] and d["peak_bytes"] else "")
            print(f"{name}: {method} {s['seconds'] * 1e3:.1f} ms, dense {d['seconds'] * 1e3:.1f} ms "
                  f"({d['seconds'] / s['seconds']:.1f}x faster); peak {(s['peak_bytes'] or 0) / 2 ** 20:.1f} MB vs "
                  f"{(d['peak_bytes'] or 0) / 2 ** 20:.1f} MB ({mem})")
    env = {"torch": torch.__version__, "threads": args.threads, "cpu": cpu_name(), "host": platform.node(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]) + list(env)) if rows else None
        if wr:
            if new:
                wr.writeheader()
            for r in rows:
                wr.writerow({**r, **env})
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
