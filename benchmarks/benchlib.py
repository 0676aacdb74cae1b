"""What every benchmark shares: a median wall time with device synchronisation, the environment tag of a CSV row,
and appending rows to a CSV file (header written once). Imported by the bench_*.py scripts, which `make bench` runs."""
import csv
import os
import statistics
import time

import torch

from common.runlog import cpu_name


def timed(fn, device, repeats, warmup=1):
    """Median seconds of `repeats` calls of fn() after `warmup` untimed calls; waits for the GPU around each."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if times else 0.0


def environment(device):
    """The columns that say where a row was measured."""
    return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads()}


def append_rows(path, rows):
    """Append dict rows to a CSV file (header from the first row when the file is new); prints the path."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"-> {path}")
