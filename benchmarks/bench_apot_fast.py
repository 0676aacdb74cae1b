"""APoT fast path: quantizer fwd+bwd (fast / reference / original code path / compiled) and training-step ratios.

Rows (results/bench/apot_fast.csv, one per measurement, tagged with torch version, device, threads and clock):
  quantizer  weight 256x256x3x3 + activation 32x256x14x14, forward+backward, both quantizer generations
             (CIFAR-10 `_pq/_uq`, ImageNet/MNIST `apot_quantization`), bits 3-5; impls:
               original  - a minimal re-implementation of yhhhli/APoT_Quantization's code path (argmin over a
                           levels x elements tensor, autograd clamp), written here as the baseline
               reference - this project with `reference = True` (the straightforward chain, nearest_level_argmin)
               bucketize - this project before the LevelProjector (exact-threshold bucketize, host syncs; --impls)
               fast      - this project's default path (LevelProjector + fused autograd Functions), eager
               compiled  - the fast path under torch.compile (default on CUDA; on a CPU with --compile), bit 4
             ratio = original / impl (same tensors, one run); `identical`: same bits (outputs, input gradients
             and, eager, alpha gradients) as `reference` (the original's own clamp gradient differs at the clip
             boundaries on torch >= 2.14, see tests/test_ste_boundaries.py: not the bit-for-bit yardstick).
  epoch      ResNet-10 MNIST epoch through common/devdata.py's loader (469 iterations on CUDA, 10 on a CPU):
             the loader alone vs the training epoch (is data ever the bottleneck?), 4 bit vs float.
  step       one SGD step (batch 128, synthetic data, median, settings interleaved): CIFAR ResNet-20 float vs
             2-5 bit eager, the original code path (`reference = True`: argmin projection, the original's
             autograd Functions) at 4 bit (every bit with --all), and compiled float / 4 bit; on CUDA also
             ResNet-18 224 px (ImageNet generation; compiled with --all). ratio = step / float step, same mode.
Clock: on a CPU with one thread the thread's CPU time (time.thread_time: what the work costs, unaffected by
other processes taking the cores, which on a shared machine makes wall time meaningless), else wall time
with the GPU synchronised around each call. Every implementation / setting is timed interleaved, round by
round, so drift hits all alike.

    python benchmarks/bench_apot_fast.py [--threads 1] [--repeats N] [--gpu ID] [--compile | --no-compile]
                                         [--all] [--quick] [--only quantizer|epoch|step] [--impls a,b,...]
"""
import argparse
import os
import statistics
import time

import torch

from benchlib import append_rows, environment
import torch.nn.functional as F

from apot.apot_levels import build_power_value, nearest_level
from apot.CIFAR10.models import quant_layer as cql
from apot.CIFAR10.models import resnet20_cifar
from apot.ImageNet.models import quant_layer as ql
from common import REPO_ROOT
from common.device import get_device
from common.errors import UserError, cli

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (median; default 3 CPU, 20 CUDA)")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as in the issue)")
parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: any GPU, else CPU)")
parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="torch.compile rows (default on CUDA; inductor's C++ codegen takes minutes on a CPU)")
parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
parser.add_argument("--quick", action="store_true", help="bit 4 only, fewer rows (a smoke run)")
parser.add_argument("--all", action="store_true", help="original-path and compiled step rows for every bit-width")
parser.add_argument("--impls", default=None, help="quantizer implementations, comma-separated (default: "
                                                  "original,reference,fast[,compiled]; also: bucketize)")
parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                    help="auto: thread CPU time on a CPU with one thread, else wall time")
parser.add_argument("--only", choices=("quantizer", "epoch", "step"), default=None, help="one kind of rows only")
parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "bench", "apot_fast.csv"))

IMPLS = ("original", "reference", "bucketize", "fast", "compiled")


# --- clock, rows ------------------------------------------------------------------------------------------------

def make_clock(device, choice):
    """(name, f(fn) -> seconds of one call of fn)."""
    if choice == "cpu" or (choice == "auto" and device.type == "cpu" and torch.get_num_threads() == 1):
        def once(fn):
            t0 = time.thread_time()
            fn()
            return time.thread_time() - t0
        return "thread cpu", once

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def once(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    return "wall", once


def interleaved(fns, repeats, once):
    """{key: median seconds}: one call of each fn per round, `repeats` rounds (load drift hits all alike)."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(once(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def row(args, device, **fields):
    return {**environment(device), "clock": args.clock_name, **fields}


def write_rows(path, rows):
    """benchlib.append_rows, except that a file written with other columns (an older version of this
    script) is kept aside as <name>.<mtime>.csv instead of receiving misaligned rows."""
    if rows and os.path.exists(path):
        with open(path) as f:
            header = f.readline().strip().split(",")
        if header != list(rows[0]):
            stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(os.path.getmtime(path)))
            os.replace(path, f"{path[:-4]}.{stamp}.csv")
            print(f"(columns changed: the previous rows are in {path[:-4]}.{stamp}.csv)")
    append_rows(path, rows)


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
            # a compilation per generation and bit (about 20 s each on a GPU): bit 4 only unless --all
            run = [i for i in impls if i != "compiled" or args.all or bit == 4 or len(bits) == 1]
            for impl in run:
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
                                      a.grad.reshape(-1), wa.grad.reshape(1), aa.grad.reshape(1)])
                outs[impl] = step()
                if impl == "compiled":
                    step()                                       # a second call: compiled backward, warm caches
                steps[impl] = step
            med = interleaved(steps, args.repeats, args.once)
            base = run[0]
            for impl in run:
                n = -2 if impl == "compiled" else None       # compiled: alpha sums may be reordered
                same = "" if impl in ("original", "reference") or "reference" not in outs else torch.equal(
                    outs[impl][:n].view(torch.int32), outs["reference"][:n].view(torch.int32))
                rows.append(row(args, device, kind="quantizer", case=f"{gen} W256x256x3x3+A32x256x14x14 fwd+bwd",
                                bit=bit, impl=impl, ms=round(med[impl] * 1e3, 3), baseline=base,
                                ratio=round(med[base] / med[impl], 3), identical=same))
                print(f"quantizer {gen:8s} bit {bit} {impl:9s} {med[impl] * 1e3:9.2f} ms  {base}/{impl} = "
                      f"{med[base] / med[impl]:5.2f}x  identical={same}", flush=True)
            del steps, outs
    return rows


def bench_steps(args, device, bits, compile_modes):
    rows = []
    cases = [("resnet20 cifar 32px", lambda bit: resnet20_cifar(float=bit == 32, **({} if bit == 32 else {"bit": bit})),
              (3, 32, 32))]
    if device.type == "cuda":
        from apot.ImageNet.models import resnet18
        cases.append(("resnet18 imagenet 224px", lambda bit: resnet18(bit=bit), (3, 224, 224)))
    one = len(bits) == 1
    for name, build, shape in cases:
        for compiled in compile_modes:
            if compiled and "resnet18" in name and not args.all:
                continue                                  # the issue's compile row is ResNet-20's
            mode = "compiled" if compiled else "eager"
            # (bit, original code path?): compiling takes minutes per model on a CPU (about one on a GPU), and the
            # original path is the slow one: float and 4 bit unless --all
            settings = [(32, False)] + [(b, False) for b in bits if not compiled or args.all or b == 4 or one]
            if not compiled:
                settings += [(b, True) for b in bits if args.all or b == 4 or one]
            steps = {}
            for bit, original in settings:
                torch.manual_seed(0)
                model = build(bit).to(device).train()
                for m in model.modules():
                    if hasattr(m, "reference"):
                        m.reference = original                   # the original's Functions and argmin
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
                x = torch.randn(128, *shape, device=device)
                y = torch.randint(0, 10 if "cifar" in name else 1000, (128,), device=device)
                fwd = torch.compile(model) if compiled else model

                def step(opt=opt, fwd=fwd, x=x, y=y):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(fwd(x), y).backward()
                    opt.step()
                for _ in range(3 if compiled else 1):             # compile / warm up
                    step()
                steps[bit, original] = step
            med = interleaved(steps, args.repeats, args.once)
            float_t = med[32, False]
            for (bit, original), t in med.items():
                impl = "original code path" if original else mode
                rows.append(row(args, device, kind="step", case=f"{name} batch 128 SGD step", bit=bit, impl=impl,
                                ms=round(t * 1e3, 3), baseline=f"float {mode}", ratio=round(t / float_t, 3),
                                identical=""))
                print(f"step {name} {impl:18s} bit {bit:2d} {t * 1e3:9.1f} ms  = {t / float_t:5.2f}x float",
                      flush=True)
            del steps
            torch._dynamo.reset()
    return rows


def bench_mnist_epoch(args, device):
    """ResNet-10 MNIST epoch (469 iterations of 128; 10 on a CPU) through the device-resident loader:
    the loader alone, then full SGD steps (float, 4 bit); ratio = loader time / float epoch time."""
    from types import SimpleNamespace

    from apot.MNIST import models as mnist_models
    from common.devdata import DeviceLoader
    n_iter = 469 if device.type == "cuda" else 10
    g = torch.Generator().manual_seed(0)
    ds = SimpleNamespace(data=torch.randint(0, 256, (n_iter * 128, 28, 28), generator=g, dtype=torch.uint8),
                         targets=torch.randint(0, 10, (n_iter * 128,), generator=g))
    loader = DeviceLoader(ds, 128, device, [0.131], [0.308], shuffle=True, flip=True)

    def epoch(step=None):
        def run():
            for x, y in loader:
                if step is not None:
                    step(x, y)
        return args.once(run)
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
            rows.append(row(args, device, kind="epoch", case=f"resnet10 mnist {n_iter} iterations of 128", bit=bit,
                            impl=impl, ms=round(ms * 1e3, 3), baseline=base, ratio=round(ratio, 3), identical=""))
        print(f"mnist resnet10 bit {bit:2d}: epoch {t:7.2f} s ({t / n_iter * 1e3:.1f} ms/it), loader alone "
              f"{t_data:6.3f} s = {t_data / t:.3f} of it", flush=True)
    return rows


def main():
    args = parser.parse_args()
    device = get_device(args.gpu)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (20 if device.type == "cuda" else 3)
    args.clock_name, args.once = make_clock(device, args.clock)
    compile_rows = device.type == "cuda" if args.compile is None else args.compile
    bits = (4,) if args.quick else (3, 4, 5)
    impls = args.impls.split(",") if args.impls else ["original", "reference", "fast"] + (
        ["compiled"] if compile_rows else [])
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise UserError(f"--impls {','.join(bad)}: choose from {','.join(IMPLS)}")
    print(f"device {device} ({environment(device)['device_name']}), {torch.get_num_threads()} threads, "
          f"clock: {args.clock_name}, {args.repeats} interleaved rounds", flush=True)
    rows = bench_quantizers(args, device, bits, impls) if args.only in (None, "quantizer") else []
    if args.only in (None, "epoch"):
        rows += bench_mnist_epoch(args, device)
    if args.only in (None, "step"):
        rows += bench_steps(args, device, (4,) if args.quick else (2, 3, 4, 5),
                            [False] + ([True] if compile_rows else []))
    write_rows(args.out, rows)


if __name__ == "__main__":
    cli(main)()
