"""ALQ training steps against the plain step: LeNet5, batch 128, coordinate / basis / STE steps, fast vs reference.

One training step = zero_grad, forward, backward, parameter update, on random MNIST-shaped input. `plain` updates
the full-precision LeNet5 with SGD (the PRETRAIN recipe); the ALQ steps run Adam on the biases and
`ALQ_optimizer.step(mode)` on the quantized weights after initialisation with the script's default structures and
max_bit (lenet5.DEFAULTS). `fast` is the default path, `reference` the straightforward one
(QUANTLAB_ALQ_REFERENCE=1), `eager-search` the fast path with the eager instead of the compiled code search
(QUANTLAB_ALQ_NATIVE=0); all give identical tensors (tests/test_alq_speed.py). Every case has its own copy
of the model, and the cases are timed round-robin in a shuffled order, so a load change on a shared machine hits all
of them alike and no case always follows the same one; the time of a step is its thread CPU time (wall time next
to it). Ratios are to the plain step of the same run.
Rows go to results/bench/alq_steps.csv.

    python benchmarks/bench_alq_steps.py [--rounds 15] [--threads 1] [--batch 128]
"""
import argparse
import copy
import os
import random
import statistics
import time

import torch

from benchlib import append_rows, environment

from alq import lenet5, native
from alq.binarynet import split_parameters
from alq.myoptimizer import ALQ_optimizer
from alq.train import initialize
from common import REPO_ROOT
from common.device import get_device
from common.errors import cli


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rounds", type=int, default=15, help="round-robin rounds; each times every case once (median)")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
parser.add_argument("--batch", type=int, default=128, help="batch size (default 128: LeNet5's)")
parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "bench", "alq_steps.csv"))


def main():
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = get_device()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    loss_func = torch.nn.CrossEntropyLoss()
    net0 = lenet5.LeNet5().to(device)

    def make_plain():
        net = copy.deepcopy(net0)
        sgd = torch.optim.SGD(net.parameters(), lr=5e-2, momentum=0.5)
        return net, sgd.step

    d = lenet5.DEFAULTS
    qnet0 = copy.deepcopy(net0)
    layers0 = initialize(qnet0, d["structure"], d["subc"], d["max_bit"])[2]

    def make_alq(mode, path):
        net = copy.deepcopy(qnet0)
        _, params_w, params_b = split_parameters(net)
        layers = copy.deepcopy(layers0)  # the same initialisation for every case
        for layer in layers:  # the path the layer would choose when built under that environment
            layer.reference, layer.compiled = path
        opt_w, opt_b = ALQ_optimizer(params_w, lr=1e-3), torch.optim.Adam(params_b)

        def update():
            opt_b.step()
            opt_w.step(layers, mode)
        return net, update

    # path -> (reference, compiled): QUANTLAB_ALQ_REFERENCE=1, QUANTLAB_ALQ_NATIVE=0 for "eager-search" (the fast
    # step without the compiled search)
    paths = {"fast": (False, True), "eager-search": (False, False), "reference": (True, True)}
    cases = {"plain": make_plain()}
    for mode in ("coordinate", "basis", "ste"):
        for path in ("fast", "eager-search", "reference") if mode != "coordinate" else ("fast", "reference"):
            cases[f"{mode} {path}"] = make_alq(mode, paths[path])

    def run(case):
        net, update = cases[case]
        net.zero_grad(set_to_none=True)
        loss_func(net(x), y).backward()
        update()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    cpu, wall = {c: [] for c in cases}, {c: [] for c in cases}
    for c in cases:  # warm-up (first step of each mode also creates the optimizer state)
        run(c)
    for r in range(args.rounds):
        order = list(cases)
        random.Random(r).shuffle(order)  # each case follows a different one every round (cache effects average out)
        for c in order:
            sync()
            t0, c0 = time.perf_counter(), time.thread_time()
            run(c)
            sync()
            cpu[c].append(time.thread_time() - c0)
            wall[c].append(time.perf_counter() - t0)
    compiled = "compiled" if native.library() is not None else "unavailable"
    med_cpu = {c: statistics.median(v) for c, v in cpu.items()}
    med_wall = {c: statistics.median(v) for c, v in wall.items()}
    env = environment(device)
    rows = []
    for c in cases:
        step, _, path = c.partition(" ")
        r_cpu, r_wall = med_cpu[c] / med_cpu["plain"], med_wall[c] / med_wall["plain"]
        rows.append({**env, "model": "lenet5", "batch": args.batch, "step": step, "path": path or "-",
                     "cpu_ms": round(med_cpu[c] * 1e3, 2), "wall_ms": round(med_wall[c] * 1e3, 2),
                     "ratio_to_plain_cpu": round(r_cpu, 3), "ratio_to_plain_wall": round(r_wall, 3),
                     "rounds": args.rounds, "compiled_search": compiled})
        print(f"{c:22s} cpu {med_cpu[c] * 1e3:8.1f} ms ({r_cpu:4.2f}x plain)   wall {med_wall[c] * 1e3:8.1f} ms "
              f"({r_wall:4.2f}x plain)")
    for mode in ("coordinate", "basis", "ste"):
        f, r = med_cpu[f"{mode} fast"], med_cpu[f"{mode} reference"]
        print(f"{mode:10s} fast is {r / f:4.2f}x faster than reference (cpu)")
    for mode in ("basis", "ste"):
        f, e = med_cpu[f"{mode} fast"], med_cpu[f"{mode} eager-search"]
        print(f"{mode:10s} compiled search ({compiled}): step {e / f:4.2f}x faster than with the eager search (cpu)")
    append_rows(args.out, rows)


if __name__ == "__main__":
    cli(main)()
