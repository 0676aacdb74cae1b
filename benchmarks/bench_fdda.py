"""FDDA: time of one training iteration (generator step + student KD step) per network, on random weights.

One iteration as trainer_DBNS_CBNS.py runs it after the warm-up: generator forward on batchSize images,
teacher forward with BN hooks, BNS + DBNS/CBNS losses (a second generator/teacher pass for one class),
Adam step; then the quantized student on cat(real, generated) with the KD loss and a Nesterov SGD step.

Then the student's KD forward+backward on 2 x batch images, interleaved (every repetition runs each variant
once, in a rotating order, so that load from other processes hits them alike):
  q     the project's W4A4 student (fdda.quantization_utils, in-place quantizer);
  ref   the same network with the project's quantizer swapped for `reference_quantizer()` below: the
        original's algorithm as the original runs it (separate min and max passes for the ranges, out-of-place
        round/clamp/dequantize), written for this benchmark;
  orig  the same network built from the authors' own quant_modules.py, imported at run time when
        $QUANTLAB_ORIGINALS names a folder holding the FDDA checkout (skipped with one line otherwise);
  fp    the full-precision network (the teacher's copy).
Before timing, each of ref / orig runs once from the q run's starting state and must give bitwise the same
loss, gradients and activation ranges (columns *_bitwise_equal), so the ratios compare equal work.
Ratios are medians of the per-repetition ratios. Rows go to results/bench/fdda.csv (tagged with the
environment and the 1-minute load average).

    python benchmarks/bench_fdda.py [--models resnet18] [--batch 2] [--img_size 224] [--repeats 1]
                                    [--iter_repeats N] [--threads N] [--gpu ID]
"""
import argparse
import contextlib
import copy
import importlib
import os
import statistics
import sys
import time

import torch

from benchlib import append_rows, environment, timed

from common import REPO_ROOT
from common.device import get_device
from common.errors import UserError, cli
from fdda import models
from fdda.conditional_batchnorm import Generator_imagenet
from fdda.distributed import Dist
from fdda.options import Option
from fdda.quantization_utils import quant_modules as qm
from fdda.trainer_DBNS_CBNS import Trainer, kd_loss

ORIGINALS = "QUANTLAB_ORIGINALS"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--models", default=",".join(models.MODELS), help="comma-separated --model_name values")
parser.add_argument("--batch", type=int, default=2, help="batchSize (the recipe's is 16); the student sees 2x")
parser.add_argument("--img_size", type=int, default=224, help="image size (resnet18/mobilenet_w1 need 224)")
parser.add_argument("--classes", type=int, default=10, help="classes of the generated calibration data")
parser.add_argument("--repeats", type=int, default=1, help="timed repetitions after one warm-up (median reported)")
parser.add_argument("--iter_repeats", type=int, default=None,
                    help="repetitions of the whole-iteration timing (default: --repeats; 0 skips it)")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: any GPU, else CPU)")
parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "bench", "fdda.csv"))


class RefQuantFunction(torch.autograd.Function):
    """The original's linear quantize / clamp / dequantize, each step a new tensor; straight-through backward."""

    @staticmethod
    def forward(ctx, x, k, x_min, x_max, clip_ste=False):
        n = 2 ** k - 1
        scale = n / torch.clamp(x_max - x_min, min=1e-8)
        zero_point = torch.round(scale * x_min) + 2 ** (k - 1)
        if x.dim() == 4:            # per-channel (weights) or (1,) (activations) against N/C x ... tensors
            scale, zero_point = scale.view(-1, 1, 1, 1), zero_point.view(-1, 1, 1, 1)
        elif x.dim() == 2:
            scale, zero_point = scale.view(-1, 1), zero_point.view(-1, 1)
        q = torch.round(scale * x - zero_point)
        q = torch.clamp(q, -2 ** (k - 1), 2 ** (k - 1) - 1)
        return (q + zero_point) / scale

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None


def _ref_weight(self):
    """Per-output-channel range as the original takes it at every forward: a min pass and a max pass."""
    if self.full_precision_flag:
        return self.weight
    w = self.weight.detach().contiguous().view(self.weight.shape[0], -1)
    return RefQuantFunction.apply(self.weight, self.weight_bit, w.min(dim=1).values, w.max(dim=1).values)


def _ref_act(self, x):
    """The original's QuantAct forward: batch min, batch max, EMA as new tensors assigned to the buffers."""
    if self.running_stat:
        mn, mx = x.detach().min(), x.detach().max()
        self.cur_x_min, self.cur_x_max = mn.reshape(1), mx.reshape(1)
        self.beta_t = self.beta_t * self.beta
        self.x_min = self.x_min * self.beta + mn * (1 - self.beta)
        self.x_max = self.x_max * self.beta + mx * (1 - self.beta)
    if self.full_precision_flag:
        return x
    return RefQuantFunction.apply(x, self.activation_bit, self.x_min, self.x_max)


@contextlib.contextmanager
def reference_quantizer():
    """Within the block every project quantizer runs the reference forward above (class-level swap)."""
    saved = qm.QuantAct.forward, qm._QuantWeight.quantized_weight
    qm.QuantAct.forward, qm._QuantWeight.quantized_weight = _ref_act, _ref_weight
    try:
        yield
    finally:
        qm.QuantAct.forward, qm._QuantWeight.quantized_weight = saved


def original_quant_modules():
    """The authors' quantization_utils/quant_modules.py from $QUANTLAB_ORIGINALS/FDDA, or None (one line why)."""
    base = os.environ.get(ORIGINALS)
    root = os.path.join(base, "FDDA") if base else None
    if not root or not os.path.isfile(os.path.join(root, "quantization_utils", "quant_modules.py")):
        print(f"original: skipped ({ORIGINALS} does not name a folder with the FDDA checkout)")
        return None
    # quantization_utils has no __init__.py (a namespace package): imported from the checkout's root
    sys.path.insert(0, root)
    try:
        return importlib.import_module("quantization_utils.quant_modules")
    finally:
        sys.path.remove(root)


def original_student(student, om):
    """A copy of `student` whose quantizers are the original's classes (same bits, weights and ranges)."""
    net = copy.deepcopy(student)
    for name, m in list(net.named_modules()):
        if isinstance(m, (qm.Quant_Conv2d, qm.Quant_Linear)):
            new = (om.Quant_Conv2d if isinstance(m, qm.Quant_Conv2d) else om.Quant_Linear)(m.weight_bit)
            new.set_param(m)
        elif isinstance(m, qm.QuantAct):
            new = om.QuantAct(m.activation_bit, running_stat=m.running_stat)
            new.load_state_dict(m.state_dict())
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, new.train(m.training))
    return net


def setup(name, args, device):
    torch.manual_seed(0)
    spec = models.MODELS[name]
    teacher = models.build(name, 1000).eval().to(device)
    student = models.build_student(teacher, name, 4, 4).to(device)
    opt = Option.from_args(None, {"batchSize": args.batch, "img_size": args.img_size, "iters_per_epoch": 1,
                                  "warmup_epochs": 0, "correct_set_epoch": 0}, env={})
    gen = Generator_imagenet(args.classes, opt.latent_dim, opt.img_size).to(device)
    # BNS centers of the right shapes from one teacher pass (values do not matter for timing)
    from fdda.bns import BNStats
    probe = BNStats(teacher)
    with torch.no_grad():
        teacher(torch.randn(1, 3, args.img_size, args.img_size, device=device))
    centers = {c: [m.detach() for m in probe.mean] for c in range(args.classes)}
    cvar = {c: [v.detach() for v in probe.var] for c in range(args.classes)}
    probe.remove()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    real = [(images, ["x"] * args.batch, torch.randint(0, args.classes, (args.batch,)))]
    tr = Trainer(student, teacher, gen, opt, centers, cvar, set(range(args.classes)), args.classes, spec.bn_layers,
                 models.dbns_start_layer(spec.bn_layers), device, Dist(device=device), real)
    return tr, teacher, student


def fwd_bwd(net, x, y, t_out, swap=contextlib.nullcontext):
    """One KD forward+backward of `net` (as the student step computes it); the loss."""
    def run():
        with swap():
            net.zero_grad(set_to_none=True)
            loss = kd_loss(net(x), y, t_out, 20.0, 20.0)
            loss.backward()
        return loss.detach()
    return run


def _bits(t):
    """A copy of t's raw bits (a copy: the state is restored after each run)."""
    t = t.detach().reshape(-1).clone()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _record(net, loss):
    """Loss, every gradient and every activation range of `net`, as raw bits."""
    out = {"loss": _bits(loss)}
    out.update({"grad." + k: _bits(p.grad) for k, p in net.named_parameters() if p.grad is not None})
    out.update({k: _bits(v) for k, v in net.state_dict().items() if k.endswith(("x_min", "x_max"))})
    return out


def bitwise_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_equal_work(student, variants, x, y, t_out):
    """{variant: True/False}: each of `variants` ({name: (net, swap)}), run once from the state `student`
    has now, gives bitwise the loss, gradients and ranges the project's student gives. `student` is restored."""
    state = copy.deepcopy(student.state_dict())
    want = _record(student, fwd_bwd(student, x, y, t_out)())
    student.load_state_dict(state)
    same = {}
    for name, (net, swap) in variants.items():
        if net is student:
            got = _record(net, fwd_bwd(net, x, y, t_out, swap)())
            student.load_state_dict(state)
        else:
            work = copy.deepcopy(net)
            got = _record(work, fwd_bwd(work, x, y, t_out, swap)())
        same[name] = bitwise_equal(want, got)
    student.zero_grad(set_to_none=True)
    return same


def interleaved(runs, device, repeats):
    """{name: [seconds per repetition]}: one warm-up round, then `repeats` rounds each running every entry of
    `runs` once, the starting entry rotating from round to round."""
    names = list(runs)
    times = {n: [] for n in names}
    for r in range(repeats + 1):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            runs[n]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r:
                times[n].append(time.perf_counter() - t0)
    return times


def paired_ratio(times, a, b):
    """Median over repetitions of time(a) / time(b) within the same repetition."""
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def check_args(args):
    for name in args.models.split(","):
        if name not in models.MODELS:
            raise UserError(f"--models: unknown network {name!r}: choose from {', '.join(models.MODELS)}")
    for key, low in (("batch", 1), ("repeats", 1), ("classes", 1), ("iter_repeats", 0), ("threads", 1)):
        v = getattr(args, key)
        if v is not None and v < low:
            raise UserError(f"--{key} {v} must be at least {low}")
    for name in args.models.split(","):
        models.check_input_size(name, args.img_size, flag="--img_size")


def main(argv=None):
    args = parser.parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.gpu)
    om = original_quant_modules()
    iter_repeats = args.repeats if args.iter_repeats is None else args.iter_repeats
    rows = []
    for name in args.models.split(","):
        tr, teacher, student = setup(name, args, device)
        t_iter = timed(lambda: tr.train(epoch=10), device, iter_repeats) if iter_repeats else None
        x = torch.randn(2 * args.batch, 3, args.img_size, args.img_size, device=device)
        y = torch.randint(0, args.classes, (2 * args.batch,), device=device)
        t_out = torch.randn(2 * args.batch, 1000, device=device)
        # a clean copy: the trainer's BN-statistics hooks on the teacher would be timed with a deepcopy
        fp = models.build(name, 1000).to(device).train(student.training)
        fp.load_state_dict(teacher.state_dict())
        nets = {"q": (student, contextlib.nullcontext), "ref": (student, reference_quantizer)}
        if om is not None:
            nets["orig"] = (original_student(student, om), contextlib.nullcontext)
        same = check_equal_work(student, {k: v for k, v in nets.items() if k != "q"}, x, y, t_out)
        runs = {k: fwd_bwd(net, x, y, t_out, swap) for k, (net, swap) in nets.items()}
        runs["fp"] = fwd_bwd(fp, x, y, t_out)
        times = interleaved(runs, device, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        has_orig = "orig" in times
        row = {
            **environment(device), "load_avg_1min": round(os.getloadavg()[0], 2),
            "model": name, "batch": args.batch, "img_size": args.img_size,
            "iteration_s": "" if t_iter is None else round(t_iter, 3),
            "student_q_fwd_bwd_s": round(med["q"], 3), "student_fp_fwd_bwd_s": round(med["fp"], 3),
            "ratio_quantized_over_fp": round(paired_ratio(times, "q", "fp"), 3),
            "student_ref_fwd_bwd_s": round(med["ref"], 3),
            "ratio_fast_over_reference": round(paired_ratio(times, "q", "ref"), 3),
            "reference_bitwise_equal": same["ref"],
            "student_orig_fwd_bwd_s": round(med["orig"], 3) if has_orig else "",
            "ratio_project_over_original": round(paired_ratio(times, "q", "orig"), 3) if has_orig else "",
            "original_bitwise_equal": same["orig"] if has_orig else "",
            "repeats": args.repeats,
        }
        rows.append(row)
        it = "skipped" if t_iter is None else f"{t_iter:7.2f} s"
        print(f"{name} batch {args.batch} ({2 * args.batch} student images) @ {args.img_size}px, load "
              f"{row['load_avg_1min']}: iteration {it}", flush=True)
        print(f"  {'student fwd+bwd':24s} {'median s':>9s} {'ratio':>7s}  bitwise equal to q")
        print(f"  {'q   (project, W4A4)':24s} {med['q']:9.3f}")
        print(f"  {'ref (original algorithm)':24s} {med['ref']:9.3f} {row['ratio_fast_over_reference']:7.3f}  "
              f"{same['ref']}   (q / ref)")
        if has_orig:
            print(f"  {'orig (authors code)':24s} {med['orig']:9.3f} {row['ratio_project_over_original']:7.3f}  "
                  f"{same['orig']}   (q / orig)")
        print(f"  {'fp  (full precision)':24s} {med['fp']:9.3f} {row['ratio_quantized_over_fp']:7.3f}        "
              f"(q / fp)", flush=True)
    base = rows[0]["iteration_s"]
    for r in rows:
        r["iteration_ratio_to_first"] = round(r["iteration_s"] / base, 3) if base else ""
    append_rows(args.out, rows)


if __name__ == "__main__":
    cli(main)()
