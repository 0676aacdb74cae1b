"""DAMBQ: one ResNet-20 training step (forward, backward, SGD step, LBA error bookkeeping) against the FP32 step.

Four variants, timed interleaved in one process (step by step, so that other load hits all alike; median of
--steps), peak memory measured in a fresh subprocess per variant:
  fp32      the float CIFAR ResNet-20;
  dambq     dambq.model (the original's expressions through autograd, clamp's gradient custom, LBA errors from
            gradient hooks in the same backward), W2.0A2.0 while bits are still allocated (the most expensive step);
  dambq-w4a4  the same at W4A4 (targets met: no errors to accumulate);
  original  the same layers written as the original does it: autograd clamp/round, a levels x elements argmin,
            retained x_q/w_q gradients and stored residuals, the errors summed after optimizer.step().
Rows (step ms, ratio to fp32, peak memory) go to results/bench/dambq.csv, tagged with the environment.

    python benchmarks/bench_dambq.py [--batch 128] [--steps 5] [--threads N] [--gpu ID]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchlib import append_rows, environment

from common import REPO_ROOT
from common.device import get_device
from common.errors import cli

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument('--batch', type=int, default=128, help='batch size (the authors trained with 512)')
parser.add_argument('--steps', type=int, default=7, help='timed steps per variant (median reported)')
parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
parser.add_argument('--gpu', type=int, default=None, help='GPU id (default: any GPU, else CPU)')
parser.add_argument('--variant', default=None, help=argparse.SUPPRESS)    # internal: one variant's memory, JSON
parser.add_argument('--out', default=os.path.join(REPO_ROOT, 'results', 'bench', 'dambq.csv'))


def original_style(model):
    """Rebind every QuantConv2d to the original's formulation; returns the per-step error bookkeeping."""
    from dambq.model import QuantConv2d
    from dambq.model.quant_layers import EPS, round_pass

    def fwd(self, x):
        if self.training:
            self.update_alpha_wgt()
        q = (2 ** self.bit_act - 1).view(1, -1, 1, 1)
        x_q = round_pass(torch.clamp(x / (self.alpha_act + EPS), 0, 1) * q) * self.alpha_act / (q + EPS)
        c = torch.clamp(self.weight / (self.alpha_wgt.view(-1, 1, 1, 1) + EPS), -1, 1)
        flat = c.view(c.shape[0], 1, -1)
        idx = (flat - self.points_wgt.view(c.shape[0], -1, 1)).abs().min(dim=1)[1]
        hard = torch.gather(self.points_wgt, 1, idx).view_as(c)
        w_q = ((hard - c).detach() + c) * self.alpha_wgt.view(-1, 1, 1, 1)
        if self.training:
            x_q.retain_grad()
            w_q.retain_grad()
            self.x_res, self.w_res, self.x_q, self.w_q = x - x_q, self.weight - w_q, x_q, w_q
        return self._conv_forward(x_q, w_q, self.bias)

    layers = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    for m in layers:
        m.forward = fwd.__get__(m)

    def residuals():
        with torch.no_grad():
            for m in layers:
                m.w_err += m.w_res.mul(m.w_q.grad).sum((1, 2, 3)).abs() / (m.w_res.numel() / m.groups_wgt)
                m.x_err += m.x_res.mul(m.x_q.grad).sum((0, 2, 3)).abs() / (m.x_res.numel() / m.groups_act)
    return residuals


def build_variant(name, device, batch):
    """A step function for one variant, on its own model, optimizer and batch."""
    from dambq.model import QuantTune
    from dambq.model.cifar10.resnet import resnet20
    torch.manual_seed(0)
    model = resnet20().to(device)
    after_step = None
    if name != 'fp32':
        target = 4.0 if name == 'dambq-w4a4' else 2.0
        tuner = QuantTune(model, target, target, duration=(0, 150))
        if name == 'original':
            after_step = original_style(model)
        else:
            tuner.quantize_cur = True
    opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    crit = torch.nn.CrossEntropyLoss()

    def step():
        loss = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    return step


def peak_memory(name, args):
    """Peak memory of one variant's training steps, in this (fresh) process: CUDA allocator peak or RSS growth."""
    device = get_device(args.gpu)
    base = reset_peak_rss()
    step = build_variant(name, device, args.batch)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    step()
    step()
    if device.type == 'cuda':
        return {'peak_MiB': torch.cuda.max_memory_allocated(device) / 2 ** 20, 'memory': 'cuda max_memory_allocated'}
    return {'peak_MiB': (status_kib('VmHWM') - base) / 1024,
            'memory': 'cpu peak RSS (VmHWM) above the RSS before the model was built'}


def status_kib(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ':'))


def reset_peak_rss():
    """Reset the kernel's peak-RSS counter (Linux: 5 > /proc/self/clear_refs); returns the current RSS in KiB."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    return status_kib('VmRSS')


def main():
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(peak_memory(args.variant, args)))
        return
    device = get_device(args.gpu)
    names = ('fp32', 'dambq', 'dambq-w4a4', 'original')
    steps = {n: build_variant(n, device, args.batch) for n in names}
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for n in names:
        steps[n]()                                          # warm-up
    for _ in range(args.steps):                             # interleaved: load changes hit every variant alike
        for n in names:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    rows = []
    for n in names:
        cmd = [sys.executable, os.path.abspath(__file__), '--variant', n, '--batch', str(args.batch)] + \
              (['--threads', str(args.threads)] if args.threads else []) + \
              (['--gpu', str(args.gpu)] if args.gpu is not None else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        mem = json.loads(out.strip().splitlines()[-1])
        rows.append({**environment(device), 'model': 'resnet20', 'batch': args.batch,
                     'steps': args.steps, 'variant': n,
                     'step_ms': round(statistics.median(wall[n]) * 1e3, 2),
                     'ratio_to_fp32': round(statistics.median(wall[n]) / statistics.median(wall['fp32']), 3),
                     'cpu_ratio_to_fp32': round(statistics.median(cpu[n]) / statistics.median(cpu['fp32']), 3),
                     'peak_MiB': round(mem['peak_MiB'], 1), 'memory': mem['memory']})
    for r in rows:
        print(f"{r['variant']:9s} step {r['step_ms']:9.1f} ms  x{r['ratio_to_fp32']:.2f} of fp32 (CPU time "
              f"x{r['cpu_ratio_to_fp32']:.2f})  peak {r['peak_MiB']:8.1f} MiB ({r['memory']})")
    append_rows(args.out, rows)


if __name__ == '__main__':
    cli(main)()
