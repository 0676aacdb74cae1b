"""APoT fast path: quantizer fwd+bwd (fast / reference / original code path / compiled) and training-step ratios.

Rows (results/bench/apot_fast.csv, one per measurement, tagged with torch version, device and threads):
  quantizer  weight 256x256x3x3 + activation 32x256x14x14, forward+backward, both quantizer generations
             (CIFAR-10 `_pq/_uq`, ImageNet/MNIST `apot_quantization`), bits 3-5; impls:
               original  - a minimal re-implementation of yhhhli/APoT_Quantization's code path (argmin over a
                           levels x elements tensor), written here as the baseline
               reference - this project with `reference = True` (nearest_level_argmin)
               bucketize - this project before this change (exact-threshold bucketize, host syncs)
               fast      - this project's LevelProjector path (default), eager
               compiled  - the fast path under torch.compile (--no-compile skips it)
             ratio = original / impl (same tensors, one run); `identical`: same bits (outputs and input
             gradients) as `reference` (the original's own clamp gradient differs at the clip boundaries on
             torch >= 2.14, see tests/test_ste_boundaries.py, so it is not the bit-for-bit yardstick).
  epoch      ResNet-10 MNIST epoch through common/devdata.py's loader (469 iterations on CUDA, 20 on a CPU):
             the loader alone vs the training epoch (is data ever the bottleneck?), 4 bit vs float.
  step       one SGD step (batch 128, synthetic data, median, settings interleaved): CIFAR ResNet-20 float vs
             2-5 bit, eager and compiled; on CUDA also ResNet-18 224 px (ImageNet generation).
             ratio = step / float step.

    python benchmarks/bench_apot_fast.py [--threads 1] [--repeats N] [--gpu ID] [--no-compile] [--quick]
"""
import argparse
import os
import statistics
import time

import torch

from benchlib import append_rows, environment, timed
import torch.nn.functional as F

from apot.apot_levels import build_power_value, nearest_level
from apot.CIFAR10.models import quant_layer as cql
from apot.CIFAR10.models import resnet20_cifar
from apot.ImageNet.models import quant_layer as ql
from common import REPO_ROOT
from common.device import get_device
from common.errors import cli

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (median; default 5 CPU, 20 CUDA)")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as in the issue)")
parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: any GPU, else CPU)")
parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
parser.add_argument("--quick", action="store_true", help="bit 4 only, fewer rows (a smoke run)")
parser.add_argument("--compile-all", action="store_true", help="compiled step rows for every bit-width")
parser.add_argument("--only", choices=("quantizer", "epoch", "step"), default=None, help="one kind of rows only")
parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "bench", "apot_fast.csv"))


# --- the original's code path, re-implemented minimally as the measured baseline ------------------------------

def _argmin_levels(x, levels):
    flat = x.reshape(-1)
    idx = (flat.unsqueeze(0) - levels.unsqueeze(1)).abs().min(dim=0)[1]
    return levels[idx].view(x.shape)


class _OrigWeight(torch.autograd.Function):          # CIFAR-10 generation, weights
    @staticmethod
    def forward(ctx, w, alpha, levels):
        w = w.div(alpha)
        c = w.clamp(min=-1, max=1)
        q = _argmin_levels(c.abs(), levels).mul(c.sign())
        ctx.save_for_backward(w, q)
        return q.mul(alpha)

    @staticmethod
    def backward(ctx, g):
        w, q = ctx.saved_tensors
        i = (w.abs() > 1.).float()
        return g.clone(), (g * (w.sign() * i + (q - w) * (1 - i))).sum(), None


class _OrigAct(torch.autograd.Function):             # CIFAR-10 generation, activations
    @staticmethod
    def forward(ctx, a, alpha, levels):
        a = a.div(alpha)
        q = _argmin_levels(a.clamp(max=1), levels)
        ctx.save_for_backward(a, q)
        return q.mul(alpha)

    @staticmethod
    def backward(ctx, g):
        a, q = ctx.saved_tensors
        i = (a > 1.).float()
        return g * (1 - i), (g * (i + (q - a) * (1 - i))).sum(), None


def _orig_new_generation(t, alpha, levels, is_weight):
    data = t / alpha
    data = data.clamp(-1, 1) if is_weight else data.clamp(0, 1)
    hard = _argmin_levels(data.abs(), levels).mul(data.sign()) if is_weight else _argmin_levels(data, levels)
    return ((hard - data).detach() + data) * alpha


class _Bucketize(torch.nn.Module):
    def __init__(self, levels):
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return nearest_level(x, self.levels)


def quantizer_pair(gen, bit, impl, device):
    """f(w, a, w_alpha, a_alpha) -> (quantized weight, quantized activation) for one implementation."""
    if impl == "original":
        wl = build_power_value(bit - 1).to(device)
        al = build_power_value(bit).to(device)
        if gen == "cifar":
            return lambda w, a, wa, aa: (_OrigWeight.apply(w, wa, wl), _OrigAct.apply(a, aa, al))
        return lambda w, a, wa, aa: (_orig_new_generation(w, wa, wl, True), _orig_new_generation(a, aa, al, False))
    if gen == "cifar":
        wq, aq = cql.weight_quantization(bit - 1, build_power_value(bit - 1)), cql.act_quantization(
            bit, build_power_value(bit))
    else:
        wq, aq = ql.weight_quantize_fn(bit), ql.act_quantization(bit)
    wq, aq = wq.to(device), aq.to(device)
    wq.reference = aq.reference = impl == "reference"
    if impl == "bucketize":                      # this project before the LevelProjector (host syncs per call)
        wq.proj, aq.proj = _Bucketize(wq.proj.levels), _Bucketize(aq.proj.levels)
    if gen == "cifar":
        fn = lambda w, a, wa, aa: (wq(w, wa), aq(a, aa))  # noqa: E731
    else:   # the projection chain alone (weight normalisation is outside it in both generations)
        fn = lambda w, a, wa, aa: (ql.apot_quantization(w, wa, ql._module_projection(wq), True),  # noqa: E731
                                   ql.apot_quantization(a, aa, ql._module_projection(aq), False))
    return torch.compile(fn) if impl == "compiled" else fn


def bench_quantizers(args, device, bits, impls):
    rows = []
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(256, 256, 3, 3, generator=g) * 0.6).to(device)       # already normalised weights
    a0 = (torch.relu(torch.randn(32, 256, 14, 14, generator=g)) * 3).to(device)
    gw, ga = torch.randn(w0.shape, generator=g).to(device), torch.randn(a0.shape, generator=g).to(device)
    for gen in ("cifar", "imagenet"):
        for bit in bits:
            steps, outs = {}, {}
            for impl in impls:
                fn = quantizer_pair(gen, bit, impl, device)
                w, a = w0.clone().requires_grad_(), a0.clone().requires_grad_()
                wa = torch.tensor(3.0, device=device, requires_grad=True)
                aa = torch.tensor(8.0 if gen == "cifar" else 6.0, device=device, requires_grad=True)

                def step(fn=fn, w=w, a=a, wa=wa, aa=aa):
                    for leaf in (w, a, wa, aa):
                        leaf.grad = None
                    qw, qa = fn(w, a, wa, aa)
                    torch.autograd.backward([qw, qa], [gw, ga])
                    return torch.cat([qw.detach().reshape(-1), qa.detach().reshape(-1), w.grad.reshape(-1),
                                      a.grad.reshape(-1)])
                timed(step, device, 0, warmup=2 if impl == "compiled" else 1)
                steps[impl], outs[impl] = step, step()
            # interleaved: one call of each implementation per round, so load drift hits them alike
            times = {impl: [] for impl in impls}
            for _ in range(args.repeats):
                for impl in impls:
                    times[impl].append(timed(steps[impl], device, 1, warmup=0))
            base_t = statistics.median(times[impls[0]])
            for impl in impls:
                t = statistics.median(times[impl])
                same = "" if impl in ("original", "reference") else torch.equal(
                    outs[impl].view(torch.int32), outs["reference"].view(torch.int32))
                rows.append({**environment(device), "kind": "quantizer",
                             "case": f"{gen} W256x256x3x3+A32x256x14x14 fwd+bwd", "bit": bit, "impl": impl,
                             "ms": round(t * 1e3, 3), "baseline": impls[0],
                             "ratio": round(base_t / t, 3), "identical": same})
                print(f"quantizer {gen:8s} bit {bit} {impl:9s} {t * 1e3:9.2f} ms  {impls[0]}/{impl} = "
                      f"{base_t / t:5.2f}x  identical={same}", flush=True)
            del steps, outs
    return rows


def bench_steps(args, device, bits, compile_modes):
    rows = []
    cases = [("resnet20 cifar 32px", lambda bit: resnet20_cifar(float=bit == 32, **({} if bit == 32 else {"bit": bit})),
              (3, 32, 32))]
    if device.type == "cuda":
        from apot.ImageNet.models import resnet18
        cases.append(("resnet18 imagenet 224px", lambda bit: resnet18(bit=bit), (3, 224, 224)))
    for name, build, shape in cases:
        for compiled in compile_modes:
            mode = "compiled" if compiled else "eager"
            # compiling takes minutes per model on a CPU (about one on a GPU): float and 4 bit unless --compile-all
            settings = [32] + [b for b in bits if not compiled or args.compile_all or b == 4 or len(bits) == 1]
            steps = {}
            for bit in settings:
                torch.manual_seed(0)
                model = build(bit).to(device).train()
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
                x = torch.randn(128, *shape, device=device)
                y = torch.randint(0, 10 if "cifar" in name else 1000, (128,), device=device)
                fwd = torch.compile(model) if compiled else model

                def step(opt=opt, fwd=fwd, x=x, y=y):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(fwd(x), y).backward()
                    opt.step()
                timed(step, device, 0, warmup=3 if compiled else 1)     # compile / warm up
                steps[bit] = step
            # interleaved: one step of each setting per round, so load drift hits every setting alike
            times = {bit: [] for bit in settings}
            for _ in range(args.repeats):
                for bit in settings:
                    times[bit].append(timed(steps[bit], device, 1, warmup=0))
            float_t = statistics.median(times[32])
            for bit in settings:
                t = statistics.median(times[bit])
                rows.append({**environment(device), "kind": "step",
                             "case": f"{name} batch 128 SGD step", "bit": bit, "impl": mode,
                             "ms": round(t * 1e3, 3), "baseline": f"float {mode}",
                             "ratio": round(t / float_t, 3), "identical": ""})
                print(f"step {name} {mode:8s} bit {bit:2d} {t * 1e3:9.1f} ms  = {t / float_t:5.2f}x float",
                      flush=True)
            del steps
            torch._dynamo.reset()
    return rows


def bench_mnist_epoch(args, device):
    """ResNet-10 MNIST epoch (469 iterations of 128; 20 on a CPU) through the device-resident loader:
    the loader alone, then full SGD steps (float, 4 bit); ratio = loader time / float epoch time."""
    from types import SimpleNamespace

    from apot.MNIST import models as mnist_models
    from common.devdata import DeviceLoader
    n_iter = 469 if device.type == "cuda" else 20
    g = torch.Generator().manual_seed(0)
    ds = SimpleNamespace(data=torch.randint(0, 256, (n_iter * 128, 28, 28), generator=g, dtype=torch.uint8),
                         targets=torch.randint(0, 10, (n_iter * 128,), generator=g))
    loader = DeviceLoader(ds, 128, device, [0.131], [0.308], shuffle=True, flip=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def epoch(step=None):
        sync()
        t0 = time.perf_counter()
        for x, y in loader:
            if step is not None:
                step(x, y)
        sync()
        return time.perf_counter() - t0
    epoch()
    t_data = epoch()
    rows, float_t = [], None
    for bit in (32, 4):
        torch.manual_seed(0)
        model = mnist_models.resnet10(bit=bit).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step(x, y, model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        step(*next(iter(loader)))
        t = epoch(step)
        float_t = t if bit == 32 else float_t
        for impl, ms, base, ratio in (("device loader only", t_data, f"bit {bit} epoch", t_data / t),
                                      ("eager epoch", t, "float epoch", t / float_t)):
            rows.append({**environment(device), "kind": "epoch",
                         "case": f"resnet10 mnist {n_iter} iterations of 128", "bit": bit, "impl": impl,
                         "ms": round(ms * 1e3, 3), "baseline": base, "ratio": round(ratio, 3), "identical": ""})
        print(f"mnist resnet10 bit {bit:2d}: epoch {t:7.2f} s ({t / n_iter * 1e3:.1f} ms/it), loader alone "
              f"{t_data:6.3f} s = {t_data / t:.3f} of it", flush=True)
    return rows


def main():
    args = parser.parse_args()
    device = get_device(args.gpu)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (20 if device.type == "cuda" else 5)
    bits = (4,) if args.quick else (3, 4, 5)
    impls = ["original", "reference", "bucketize", "fast"] + ([] if args.no_compile else ["compiled"])
    rows = bench_quantizers(args, device, bits, impls) if args.only in (None, "quantizer") else []
    if args.only in (None, "epoch"):
        rows += bench_mnist_epoch(args, device)
    if args.only in (None, "step"):
        rows += bench_steps(args, device, (4,) if args.quick else (2, 3, 4, 5),
                            [False] + ([] if args.no_compile else [True]))
    append_rows(args.out, rows)


if __name__ == "__main__":
    cli(main)()
