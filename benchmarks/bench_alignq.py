"""AlignQ training-step cost: 8-bit CDF-aligned ResNet-20 vs FP32, and the ADMM correlation term on top.

Times one SGD step (forward, backward, optimizer step; for ADMM also the Z/Gamma update) of the CIFAR-10
ResNet-20 at batch 128 on random 32x32 inputs: FP32, W8A8 (CDF alignment) and W8A8 + ADMM, and the eval-mode
forward with and without the cached quantized weights. Ratios within one run go to results/bench/alignq.csv.

    python benchmarks/bench_alignq.py [--repeats 5] [--batch 128] [--threads N] [--gpu ID]
"""
import argparse
import os

import torch

from benchlib import append_rows, environment, timed
import torch.nn as nn

from alignq.models import MODELS, CDFScheme
from alignq.quant import QConv2d, admm_loss, admm_update
from common import REPO_ROOT
from common.device import get_device
from common.errors import cli

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (median reported)")
parser.add_argument("--batch", type=int, default=128, help="batch size (the README's 128)")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: any GPU, else CPU)")
parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "bench", "alignq.csv"))


def train_step(bits, admm, batch, device):
    model = MODELS["resnet20_quant"](CDFScheme(bits, bits, admm_dim=batch if admm else 0)).to(device).train()
    for n, p in model.named_parameters():   # as the CIFAR loop: Z/Gamma move only by the ADMM update
        if n.endswith((".alterD", ".gamma")):
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    ce = nn.CrossEntropyLoss()

    def step():
        loss = ce(model(x), y)
        if admm:
            loss = loss + admm_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if admm:
            admm_update(model)
    return step


def eval_forward(cached, batch, device):
    model = MODELS["resnet20_quant"](CDFScheme(8, 8)).to(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)

    def fwd():
        with torch.no_grad():
            if not cached:
                for m in model.modules():
                    if isinstance(m, QConv2d):
                        m._cache_key = None
            model(x)
    return fwd


def main():
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.gpu)
    torch.manual_seed(0)
    t = {
        "fp32": timed(train_step(32, False, args.batch, device), device, args.repeats),
        "w8a8": timed(train_step(8, False, args.batch, device), device, args.repeats),
        "w8a8_admm": timed(train_step(8, True, args.batch, device), device, args.repeats),
        "eval_uncached": timed(eval_forward(False, args.batch, device), device, args.repeats),
        "eval_cached": timed(eval_forward(True, args.batch, device), device, args.repeats),
    }
    row = {**environment(device),
           "case": f"resnet20 cifar10 batch {args.batch} train step",
           **{f"{k}_ms": round(v * 1e3, 2) for k, v in t.items()},
           "ratio_w8a8_over_fp32": round(t["w8a8"] / t["fp32"], 3),
           "ratio_admm_over_w8a8": round(t["w8a8_admm"] / t["w8a8"], 3),
           "ratio_eval_uncached_over_cached": round(t["eval_uncached"] / t["eval_cached"], 3),
           "repeats": args.repeats}
    for k, v in t.items():
        print(f"{k:14s} {v * 1e3:9.1f} ms")
    print(f"8-bit / FP32 step {row['ratio_w8a8_over_fp32']}x, ADMM / 8-bit step {row['ratio_admm_over_w8a8']}x, "
          f"eval uncached / cached {row['ratio_eval_uncached_over_cached']}x")
    append_rows(args.out, [row])


if __name__ == "__main__":
    cli(main)()
