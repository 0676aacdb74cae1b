"""APoT nearest-level search: bucketize on exact decision boundaries vs the original's argmin.

Times forward+backward of the new-generation weight quantizer (normalise, clamp, project, STE) on a
ResNet-18-sized conv weight (512x512x3x3) and of the activation quantizer on a layer-4 input, with
`nearest_level` (bucketize) and with `nearest_level_argmin` (the original's levels x elements argmin).
The two must give identical outputs; the ratio argmin/bucketize is written to results/bench/apot_levels.csv.

    python benchmarks/bench_apot_levels.py [--repeats 5] [--threads N] [--gpu ID]
"""
import argparse
import os

import torch

from benchlib import append_rows, environment, timed

from apot.apot_levels import nearest_level, nearest_level_argmin
from apot.ImageNet.models import quant_layer as ql
from common import REPO_ROOT
from common.device import get_device
from common.errors import cli

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (median reported)")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: any GPU, else CPU)")
parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "bench", "apot_levels.csv"))


def main():
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.gpu)
    torch.manual_seed(0)
    cases = []
    for bit in (5, 4, 3):
        w = torch.randn(512, 512, 3, 3, device=device).mul_(0.05).requires_grad_()
        alpha = torch.tensor(3.0, device=device, requires_grad=True)
        quant = ql.weight_quantize_fn(w_bit=bit, power=True).to(device)
        cases.append((f"weight {tuple(w.shape)}", bit, 2 ** (bit - 1), lambda q=quant, w=w, a=alpha: q(w, a), (w, alpha)))
    x = torch.relu(torch.randn(64, 512, 7, 7, device=device)).mul_(2).requires_grad_()
    a_alpha = torch.tensor(6.0, device=device, requires_grad=True)
    act = ql.act_quantization(5, power=True).to(device)
    cases.append((f"activation {tuple(x.shape)}", 5, 32, lambda: act(x, a_alpha), (x, a_alpha)))

    rows = []
    for name, bit, n_levels, fwd, leaves in cases:
        grad = None
        results = {}
        for impl_name, impl in (("bucketize", nearest_level), ("argmin", nearest_level_argmin)):
            ql.nearest_level = impl                       # the quantizers look the search up at call time

            def step():
                for leaf in leaves:
                    leaf.grad = None
                out = fwd()
                out.backward(grad if grad is not None else torch.ones_like(out))
                return out
            results[impl_name] = (timed(step, device, args.repeats), step().detach().clone())
            grad = torch.randn_like(results[impl_name][1]) if grad is None else grad
        ql.nearest_level = nearest_level
        same = torch.equal(results["bucketize"][1], results["argmin"][1])
        t_b, t_a = results["bucketize"][0], results["argmin"][0]
        rows.append({
            **environment(device),
            "case": name + " fwd+bwd", "bit": bit, "levels": n_levels,
            "bucketize_ms": round(t_b * 1e3, 3), "argmin_ms": round(t_a * 1e3, 3),
            "ratio_argmin_over_bucketize": round(t_a / t_b, 3), "identical_output": same, "repeats": args.repeats,
        })
        print(f"{name:32s} bit {bit} ({n_levels:2d} levels): bucketize {t_b * 1e3:8.1f} ms, argmin {t_a * 1e3:8.1f} ms,"
              f" ratio {t_a / t_b:5.2f}x, identical={same}")
    append_rows(args.out, rows)


if __name__ == "__main__":
    cli(main)()
