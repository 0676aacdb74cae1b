"""Command line of every AlignQ experiment: the original options files' flags and per-experiment defaults.

The README's command lines parse verbatim and mean what they say (the original's parser rejects them):
`--arch resnet` is accepted, `--lr_decay_steps [80, 120]` (split by the shell into "[80," "120]") gives
milestones [80, 120], `--train_split "True"` sets a boolean, `--source_dir "pretrained"` works without a
trailing slash. Additions: --data_dir everywhere, --no-pretrained, --experiment, --seed, --workers,
--grad_scaling, --corr_eps, --imagenet_weights, --max_iters, --name (see alignq/DEVIATIONS.md).
"""
import argparse
import math
import os
import re

from alignq import baselines
from common.checks import check_range, str2bool
from common.data import OFFICE31_DOMAINS, data_root
from common.errors import UserError

# Per experiment: kind (cls: one labelled dataset; dann/dsan: source -> target), dataset, model flag, defaults
# read from the original's utils/options*.py of that directory (seed era).
_CLS = dict(kind="cls", lr=0.04, lr_decay_steps=[80, 150], num_epochs=200, train_batch_size=128,
            eval_batch_size=100, momentum=0.9, weight_decay=1e-4, print_freq=200, stage="second", act_range=2.0)
_OFFICE = dict(kind="dann", dataset="office31", model="resnet50_dann", src_data="dslr", tgt_data="webcam",
               stage="aligned", bitW=5, abitW=5, num_epochs=100, train_batch_size=28, eval_batch_size=28, lr=0.04,
               lr_decay_steps=[30, 60, 80], momentum=0.9, weight_decay=5e-4, print_freq=10, act_range=2.0, alpha=0.0,
               source_file="dslr_webcam/dw_32bit/model_best.pt", img_size=224)
EXPERIMENTS = {
    "resnet-20-cifar-10": dict(_CLS, dataset="cifar10", target_model="resnet20_quant", bitW=2, abitW=2,
                               source_file="res20_32bit/model_best.pt"),
    "resnet-56-cifar-10": dict(_CLS, dataset="cifar10", target_model="resnet56_quant", bitW=4, abitW=4,
                               lr_decay_steps=[80, 120], source_file="res56_32bit/model_best.pt"),
    "resnet-20-svhn": dict(_CLS, dataset="svhn", target_model="resnet20_quant", bitW=8, abitW=8, lr=0.001,
                           source_file="res20_32bit/model_best.pt"),
    "mobilenet-v2-svhn": dict(_CLS, dataset="svhn", target_model="mobile_v2", bitW=8, abitW=8, num_epochs=100,
                              lr_decay_steps=[30, 60, 90], train_batch_size=100, eval_batch_size=112,
                              weight_decay=2e-4, stage="no_align", source_file="mobilev2.pt"),
    "dense-cifar-10": dict(_CLS, dataset="cifar10", target_model="densenet_40_quant", bitW=4, abitW=4,
                           lr_decay_steps=[80, 120], source_file="dense_32bit/densenet_40.pt.tar"),
    "dann_office": dict(_OFFICE),
    "dsan_office": dict(_OFFICE, kind="dsan", model="resnet50_dsan", src_data="amazon", tgt_data="webcam",
                        stage="align", bitW=4, abitW=4, num_epochs=200, train_batch_size=32, eval_batch_size=32,
                        lr=0.01, source_file="amazon_webcam/aw_32bit/model_best.pt"),
    "dann_digit": dict(kind="dann", dataset="digits", model="MNISTmodel_quant", src_data="mnist", tgt_data="mnistm",
                       stage="org", bitW=1, abitW=1, num_epochs=100, train_batch_size=64, eval_batch_size=100,
                       momentum=0.0, lr=0.0002, lr_decay_steps=[80, 120, 180, 225], weight_decay=0.0,
                       print_freq=600, act_range=2.0, alpha=10.0, source_file="mnist_mnistm_32bit/model_best.pt",
                       img_size=28),
}
# cdf_alignment_admm/ holds ADMM variants of these (same defaults, ADMM on)
ADMM_EXPERIMENTS = ("resnet-20-cifar-10", "resnet-56-cifar-10", "dann_office", "dsan_office")
METHODS = ("ours", "uniform", "dorefa", "llsq", "apot", "lsq", "bwn")


def bits(v):
    try:
        b = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer bit-width 1..32, got {v!r}") from None
    if not 1 <= b <= 32:
        raise argparse.ArgumentTypeError(f"bit-width must be 1..32, got {b}")
    return b


def milestones(tokens):
    """'[80, 120]' / '[80,' '120]' / '80 120' / '80,120' -> [80, 120]."""
    text = " ".join(str(t) for t in (tokens if isinstance(tokens, (list, tuple)) else [tokens]))
    parts = [p for p in re.split(r"[\s,\[\]]+", text) if p]
    bad = UserError(f"--lr_decay_steps: expected ascending positive epochs like [80, 120], got {text!r}")
    if text.count("[") != text.count("]") or text.count("[") > 1 or not parts:
        raise bad
    try:
        steps = [int(p) for p in parts]
    except ValueError:
        raise bad from None
    if any(m < 1 for m in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise bad
    return steps


class _Parser(argparse.ArgumentParser):
    def error(self, message):       # one line, exit 2 (argparse would print the whole usage)
        raise UserError(f"{self.prog}: {message}")


def build_parser(experiment, admm=False, prog="main.py"):
    d = EXPERIMENTS[experiment]
    p = _Parser(prog=prog, description=f"AlignQ {'CDF + ADMM' if admm else 'CDF alignment'}: {experiment}")
    b = lambda *a, **k: p.add_argument(*a, **k)  # noqa: E731
    opt_bool = dict(type=str2bool, nargs="?", const=True)
    b("--experiment", default=experiment, choices=sorted(EXPERIMENTS), help="which experiment (short-form entry)")
    b("--gpus", type=int, nargs="+", default=[0], help="GPU ids (the first is used; CPU when CUDA is absent)")
    b("--dataset", default=d["dataset"], help="dataset of the experiment (informational, as the original)")
    b("--data_dir", default=None, help="data root (default $QUANTLAB_DATA, else ./data)")
    b("--job_dir", default=f"experiment/ours/t_{experiment}/",
      help="the run's documented path: a link to its directory runs/alignq/<basename>-<time>/ (config.txt, log.txt, "
           "checkpoint/, tb/), made when the run starts")
    b("--name", default=None, help="run directory runs/alignq/<name>/ (default: the --job_dir basename + time stamp)")
    b("--pretrained", default=True, **opt_bool, help="load the FP32 source model (default True)")
    b("--no-pretrained", dest="pretrained", action="store_false", help="start from scratch (and no ImageNet weights)")
    b("--stage", default=d["stage"], help="'align': 32-bit activations still pass the CDF transform")
    b("--method", default="ours", choices=METHODS, help="AlignQ ('ours') or a baseline quantizer")
    b("--arch", default="resnet", help="accepted for the README's commands (the model is --target_model/--model)")
    b("--source_dir", default="pretrained/", help="directory of the FP32 source model")
    b("--source_file", default=d["source_file"], help="source model file under --source_dir (or --source_dir/ours/)")
    b("--reset", action="store_true", help="remove a real --job_dir holding a run of an older version (written "
      "before runs/alignq/) first; a new run never replaces another, so otherwise nothing is removed")
    b("--resume", default=None,
      help="continue from a checkpoint (job_dir/checkpoint/model_last.pt) in its own run directory")
    b("--refine", default=None, help="start from this checkpoint's weights (fine-tuning)")
    b("--bitW", type=bits, default=d["bitW"], help="weight bits (32 = full precision)")
    b("--abitW", type=bits, default=d["abitW"], help="activation bits (32 = full precision)")
    b("--source_model", default="resnet_20", help="unused, as in the original")
    b("--num_epochs", type=int, default=d["num_epochs"])
    b("--train_batch_size", type=int, default=d["train_batch_size"])
    b("--eval_batch_size", type=int, default=d["eval_batch_size"])
    b("--momentum", type=float, default=d["momentum"])
    b("--lr", type=float, default=d["lr"])
    b("--lr_gamma", type=float, default=0.1)
    b("--lr_decay_step", type=int, default=30, help="unused by the CDF loops, as in the original")
    b("--lr_decay_steps", nargs="+", default=d["lr_decay_steps"], help="milestones, e.g. [80, 120]")
    b("--mask_step", type=int, default=200, help="unused, as in the original")
    b("--weight_decay", type=float, default=d["weight_decay"])
    b("--random", action="store_true", help="unused, as in the original")
    b("--keep_grad", action="store_true", help="unused, as in the original")
    b("--lam", type=float, default=1.0, help="slope of the step approximation (inert unless --grad_scaling)")
    b("--lam2", type=float, default=4.0, help="sigmoid scale (inert unless --grad_scaling)")
    b("--act_range", type=float, default=d["act_range"], help="R in a_hat = R (2 Phi(x) - 1)")
    b("--print_freq", type=int, default=d["print_freq"])
    b("--test_only", action="store_true", help="evaluate --resume/--refine (or job_dir's best model) and exit")
    b("--target_model", default=d.get("target_model"), help="network (cls experiments)")
    b("--model", default=d.get("model"), help="network (domain adaptation experiments)")
    b("--img_size", type=int, default=d.get("img_size", 32), help="Office-31 crop size (default 224); else unused")
    b("--tau", type=float, default=0.3, help="unused, as in the original (its TAU = 0.3)")
    # domain adaptation
    b("--src_data", default=d.get("src_data"))
    b("--tgt_data", default=d.get("tgt_data"))
    b("--train_split", default=True, **opt_bool, help="80/20 per-class split of Office-31 (default True)")
    b("--src_split", default=True, **opt_bool)
    b("--tgt_split", default=True, **opt_bool)
    b("--bit_range", type=int, nargs="*", default=None, help="unused, as in the original")
    b("--alpha", type=float, default=d.get("alpha", 0.0), help="unused by the loops (GRL uses the schedule)")
    b("--src_only_flag", default=False, **opt_bool, help="train on the source classification loss only")
    b("--imagenet_weights", default=None, help="torchvision ResNet-50 ImageNet file for the DANN/DSAN backbone")
    b("--param", type=float, default=0.3, help="DSAN: weight of the LMMD loss (times the lambda(p) schedule)")
    b("--bottle_neck", default=True, **opt_bool, help="DSAN: Linear(2048, 256) bottleneck before cls_fc")
    b("--dataset_root", default=None, help="digits: accepted as --data_dir (the original's MNIST root flag)")
    b("--src_data_dir", default=None, help="digits/Office: accepted; --data_dir is the root of both domains")
    b("--tgt_data_dir", default=None, help="digits/Office: accepted; --data_dir is the root of both domains")
    # additions
    b("--admm", default=admm, **opt_bool, help="ADMM correlation preservation (default on under cdf_alignment_admm/)")
    b("--corr_eps", type=float, default=None, help="epsilon added to the correlation std (default 0; 1e-5 DANN)")
    b("--standard_sgd", action="store_true",
      help="standard momentum SGD for every parameter (the original's SGD, the default, drops the momentum of "
           "the non-quantized parameters from the second step: alignq/DEVIATIONS.md)")
    b("--grad_scaling", action="store_true", help="the paper's lam/lam2 gradient scaling (the original's is dead code)")
    b("--seed", type=int, default=None)
    b("--workers", type=int, default=2)
    b("--max_iters", type=int, default=None, help="stop each epoch after N iterations (smoke runs; not a reproduction)")
    return p


def infer_experiment(argv):
    """The short form `cdf_alignment/main.py`: the experiment follows from --experiment, the model and the data."""
    def val(flag):
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return None
    if val("--experiment"):
        return val("--experiment")
    model, target, dataset, src = val("--model"), val("--target_model"), val("--dataset"), val("--src_data")
    if model == "MNISTmodel_quant" or src in ("mnist", "mnistm", "svhn", "syndigit"):
        return "dann_digit"
    if model and "dsan" in model:
        return "dsan_office"
    if model or src or val("--tgt_data"):
        return "dann_office"
    if target == "mobile_v2":
        return "mobilenet-v2-svhn"
    if target == "densenet_40_quant":
        return "dense-cifar-10"
    if dataset == "svhn":
        return "resnet-20-svhn"
    if target == "resnet56_quant":
        return "resnet-56-cifar-10"
    return "resnet-20-cifar-10"


def parse_args(argv, experiment=None, admm=False, prog="main.py"):
    experiment = experiment or infer_experiment(list(argv))
    if experiment not in EXPERIMENTS:
        raise UserError(f"unknown --experiment {experiment!r}; choose one of {', '.join(sorted(EXPERIMENTS))}")
    args = build_parser(experiment, admm, prog).parse_args(list(argv))
    if args.experiment != experiment:     # an explicit --experiment in a per-experiment directory
        args = build_parser(args.experiment, admm, prog).parse_args(list(argv))
    args.lr_decay_steps = milestones(args.lr_decay_steps)
    if args.resume and args.refine:
        raise UserError("--resume (continue a run) and --refine (start a new run from a checkpoint's weights) "
                        "contradict each other: pass one of them")
    if args.data_dir is None:       # the project's one data rule: $QUANTLAB_DATA, else ./data
        args.data_dir = args.dataset_root if args.dataset_root is not None else data_root()
    kind = EXPERIMENTS[args.experiment]["kind"]
    if args.corr_eps is None:
        args.corr_eps = 1e-5 if kind in ("dann", "dsan") else 0.0   # the original's DANN corr has +1e-5, CIFAR none
    for name in ("num_epochs", "train_batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not math.isfinite(args.lr) or args.lr <= 0 or not args.act_range > 0:
        raise UserError(f"--lr must be a finite number > 0 and --act_range > 0, got {args.lr} and {args.act_range}")
    if args.max_iters is not None and args.max_iters < 1:
        raise UserError(f"--max_iters {args.max_iters} is out of range: at least 1 iteration per epoch")
    for flag, lo, hi in (("momentum", 0, 1), ("weight_decay", 0, None), ("lr_gamma", 0, None), ("print_freq", 1, None),
                         ("workers", 0, None), ("corr_eps", 0, None), ("param", 0, None),
                         ("img_size", 1, None), ("seed", 0, 2 ** 32 - 1)):
        check_range(f"--{flag}", getattr(args, flag), lo=lo, hi=hi)     # before any data is read: one line
    return args


# ------------------------------------------------------------------------------------------------ what the flags say


def kind_of(args):
    return EXPERIMENTS[args.experiment]["kind"]


def model_name(args):
    return args.target_model if kind_of(args) == "cls" else args.model


def is_fp32(args):
    return args.bitW == 32 and args.abitW == 32


def use_admm(args):
    return bool(args.admm) and args.method == "ours" and args.abitW < 32


def check_args(args):
    """The checks that need more than one flag's value or the file system: the domains, a baseline's
    bit-widths, the --resume/--refine files (before any work, as parse_args')."""
    kind = kind_of(args)
    if kind != "cls":
        for side in ("src_data", "tgt_data"):
            dom = getattr(args, side)
            allowed = OFFICE31_DOMAINS if args.dataset == "office31" else ("mnist", "mnistm")
            if dom not in allowed:
                raise UserError(f"--{side} {dom!r} is not one of the {args.dataset} domains: choose "
                                f"{', '.join(allowed)}")
    if args.method != "ours":
        baselines.check_bits(args.method, args.bitW, args.abitW)
    if args.resume and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such checkpoint")
    if args.refine and not os.path.isfile(args.refine):
        raise UserError(f"--refine {args.refine}: no such checkpoint")


def setting_of(args):
    """'FP32', 'W8A8', 'W8A8 ADMM', 'W4A4 dorefa' (shortened runs are told apart by their recipe)."""
    s = "FP32" if is_fp32(args) else f"W{args.bitW}A{args.abitW}"
    if args.method != "ours":
        s += f" {args.method}"
    elif use_admm(args):
        s += " ADMM"
    return s
