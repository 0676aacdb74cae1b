"""FDDA: time of one training iteration (generator step + student KD step) per network, on random weights.

One iteration as trainer_DBNS_CBNS.py runs it after the warm-up: generator forward on batchSize images,
teacher forward with BN hooks, BNS + DBNS/CBNS losses (a second generator/teacher pass for one class),
Adam step; then the quantized student on cat(real, generated) with the KD loss and a Nesterov SGD step.
Also times the student's forward+backward quantized vs full precision (the quantizer overhead) on the same
input. Rows (median of --repeats) go to results/bench/fdda.csv, ratios within one run.

    python benchmarks/bench_fdda.py [--batch 2] [--img_size 224] [--repeats 1] [--threads N] [--gpu ID]
"""
import argparse
import copy
import os

import torch

from benchlib import append_rows, environment, timed

from common import REPO_ROOT
from common.device import get_device
from common.errors import cli
from fdda import models
from fdda.conditional_batchnorm import Generator_imagenet
from fdda.distributed import Dist
from fdda.options import Option
from fdda.trainer_DBNS_CBNS import Trainer, kd_loss

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--models", default=",".join(models.MODELS), help="comma-separated --model_name values")
parser.add_argument("--batch", type=int, default=2, help="batchSize (the recipe's is 16)")
parser.add_argument("--img_size", type=int, default=224, help="image size (resnet18/mobilenet_w1 need 224)")
parser.add_argument("--classes", type=int, default=10, help="classes of the generated calibration data")
parser.add_argument("--repeats", type=int, default=1, help="timed repetitions after one warm-up (median reported)")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: any GPU, else CPU)")
parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "bench", "fdda.csv"))


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


def main():
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.gpu)
    rows = []
    for name in args.models.split(","):
        tr, teacher, student = setup(name, args, device)
        t_iter = timed(lambda: tr.train(epoch=10), device, args.repeats)
        x = torch.randn(2 * args.batch, 3, args.img_size, args.img_size, device=device)
        y = torch.randint(0, args.classes, (2 * args.batch,), device=device)
        t_out = torch.randn(2 * args.batch, 1000, device=device)
        fp = copy.deepcopy(teacher)

        def fwd_bwd(net):
            def run():
                net.zero_grad(set_to_none=True)
                kd_loss(net(x), y, t_out, 20.0, 20.0).backward()
            return run
        t_q, t_fp = timed(fwd_bwd(student), device, args.repeats), timed(fwd_bwd(fp), device, args.repeats)
        rows.append({
            **environment(device),
            "model": name, "batch": args.batch, "img_size": args.img_size,
            "iteration_s": round(t_iter, 3), "student_q_fwd_bwd_s": round(t_q, 3),
            "student_fp_fwd_bwd_s": round(t_fp, 3), "ratio_quantized_over_fp": round(t_q / t_fp, 3),
            "repeats": args.repeats,
        })
        print(f"{name:15s} batch {args.batch} @ {args.img_size}px: iteration {t_iter:7.2f} s; student fwd+bwd "
              f"W4A4 {t_q:6.2f} s vs FP {t_fp:6.2f} s (x{t_q / t_fp:.2f})", flush=True)
    base = rows[0]["iteration_s"]
    for r in rows:
        r["iteration_ratio_to_first"] = round(r["iteration_s"] / base, 3)
    append_rows(args.out, rows)


if __name__ == "__main__":
    cli(main)()
