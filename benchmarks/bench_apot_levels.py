"""APoT quantizers at ResNet-18 layer-4 sizes: this project's fast path vs its straightforward reference.

Times forward+backward of the new-generation weight quantizer (normalise, clamp, project, STE) on a
512x512x3x3 conv weight at 3, 4 and 5 bits, and of the 5-bit activation quantizer on a 64x512x7x7 input,
with the modules' default path (LevelProjector + the fused `_APoTSTE` / `_CalibratedTernaryFast` Functions)
and with `reference = True` (autograd chain, the original's levels x elements argmin). The two must give
identical outputs and gradients (bits); ratio = reference / fast goes to results/bench/apot_levels.csv.
(bench_apot_fast.py has the same comparison on the issue's tensors, plus the original's own code path.)

    python benchmarks/bench_apot_levels.py [--repeats 3] [--threads 1] [--gpu ID] [--clock auto|cpu|wall]
"""
import argparse
import os

import torch

from bench_apot_fast import interleaved, make_clock, write_rows
from benchlib import environment

from apot.ImageNet.models import quant_layer as ql
from common import REPO_ROOT
from common.device import get_device
from common.errors import cli

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (median reported)")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: any GPU, else CPU)")
parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                    help="auto: thread CPU time on a CPU with one thread, else wall time")
parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "bench", "apot_levels.csv"))


def main():
    args = parser.parse_args()
    device = get_device(args.gpu)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    clock, once = make_clock(device, args.clock)
    g = torch.Generator().manual_seed(0)
    cases = []
    for bit in (5, 4, 3):
        w = (torch.randn(512, 512, 3, 3, generator=g) * 0.05).to(device)
        cases.append((f"weight {tuple(w.shape)}", bit, 2 ** (bit - 1), lambda b=bit: ql.weight_quantize_fn(b), w,
                      torch.tensor(3.0)))
    x = (torch.relu(torch.randn(64, 512, 7, 7, generator=g)) * 2).to(device)
    cases.append((f"activation {tuple(x.shape)}", 5, 32, lambda: ql.act_quantization(5), x, torch.tensor(6.0)))

    rows = []
    for name, bit, n_levels, make, t0, alpha0 in cases:
        grad = torch.randn(t0.shape, generator=g).to(device)
        steps, outs = {}, {}
        for impl in ("fast", "reference"):
            quant = make().to(device)
            quant.reference = impl == "reference"
            t, alpha = t0.clone().requires_grad_(), alpha0.to(device).requires_grad_()

            def step(quant=quant, t=t, alpha=alpha):
                t.grad = alpha.grad = None
                out = quant(t, alpha)
                out.backward(grad)
                return torch.cat([out.detach().reshape(-1), t.grad.reshape(-1), alpha.grad.reshape(1)])
            outs[impl], steps[impl] = step(), step
        med = interleaved(steps, args.repeats, once)
        same = torch.equal(outs["fast"].view(torch.int32), outs["reference"].view(torch.int32))
        t_f, t_r = med["fast"], med["reference"]
        rows.append({**environment(device), "clock": clock, "case": name + " fwd+bwd", "bit": bit,
                     "levels": n_levels, "fast_ms": round(t_f * 1e3, 3), "reference_ms": round(t_r * 1e3, 3),
                     "ratio_reference_over_fast": round(t_r / t_f, 3), "identical": same, "repeats": args.repeats})
        print(f"{name:32s} bit {bit} ({n_levels:2d} levels): fast {t_f * 1e3:8.1f} ms, reference {t_r * 1e3:8.1f} ms,"
              f" ratio {t_r / t_f:5.2f}x, identical={same} ({clock})", flush=True)
    write_rows(args.out, rows)


if __name__ == "__main__":
    cli(main)()
