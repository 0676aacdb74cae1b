"""One training/evaluation loop for every AlignQ experiment (the per-experiment main.py files call `run`).

cls (CIFAR-10 / SVHN): CE (+ ADMM terms), SGD, lr = lr * gamma^(#milestones <= epoch) set each epoch (the
original's scheduler.step(epoch)), test every epoch, best by test top-1.
dann (Office-31 / digits): zip(source, target) batches, GRL alpha from p = (epoch * iters + i) / (E * iters)
with iters the longer loader, loss = CE(class, src) + CE(domain, src -> 0) + CE(domain, tgt -> 1) (+ ADMM),
a fresh SGD each epoch (the original's own at W < 32 with --method ours; feature lr LR/10, heads LR,
LR = lr / (1 + 10 (epoch - 1) / E)^0.75), best by target hold-out top-1. dsan: the LMMD loss of alignq/dsan.py
instead of the domain classifier.
ADMM (cdf_alignment_admm/): after each optimizer step every ADMM module updates Z and Gamma.
"""
import bisect
import math
import os
import shutil
import time

import torch
import torch.nn as nn

from alignq import baselines
from alignq.data import classification_loaders, domain_loaders
from alignq.models import MODELS, CDFScheme, grl_alpha
from alignq.options import EXPERIMENTS, parse_args
from alignq.optim import OriginalSGD, quantized_indices
from alignq.quant import admm_loss, admm_param_names, admm_update, weight_cdf
from common import interrupt, runs
from common.checks import check_resume_flags, check_results_writable, check_writable_dir, check_writable_file
from common.checkpoint import load_checkpoint, save_checkpoint
from common.data import OFFICE31_DOMAINS
from common.devdata import DeviceSums
from common.device import get_device, get_rng_state, seed_everything, set_rng_state
from common.errors import UserError, run_main
from common.identity import check_checkpoint, describe, expect, identify, identity
from common.meters import AverageMeter, accuracy, progress
from common.results import combine_recipes, recipe_info, record
from common.runlog import epoch_label, epoch_span

PAPER = "alignq"
IMAGENET_FILES = ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth")   # torchvision's IMAGENET1K_V1 (new, old name)


# ------------------------------------------------------------------------------------------------ setup


def kind_of(args):
    return EXPERIMENTS[args.experiment]["kind"]


def model_name(args):
    return args.target_model if kind_of(args) == "cls" else args.model


def is_fp32(args):
    return args.bitW == 32 and args.abitW == 32


def use_admm(args):
    return bool(args.admm) and args.method == "ours" and args.abitW < 32


def build_model(args):
    name = model_name(args)
    if name == "resnet50_dsan":
        from alignq.dsan import resnet50_dsan

        def builder(scheme, num_classes=31):
            return resnet50_dsan(scheme, num_classes, args.bottle_neck)
    elif name in MODELS:
        builder = MODELS[name]
    else:
        raise UserError(f"unknown model {name!r} for {args.experiment}; choose one of {', '.join(MODELS)}")
    if args.method == "ours":
        scheme = CDFScheme(args.bitW, args.abitW, args.stage, args.act_range,
                           admm_dim=args.train_batch_size if use_admm(args) else 0, corr_eps=args.corr_eps)
    else:
        scheme = baselines.scheme(args.method, args.bitW, args.abitW)
    if args.dataset == "office31":
        return builder(scheme, num_classes=31)
    return builder(scheme)


def source_candidates(args):
    """Where the FP32 source model may be: source_dir/source_file, then the original's source_dir/ours/source_file
    (source_dir/<method>/source_file for the baselines)."""
    sub = "ours" if args.method == "ours" else args.method
    return [os.path.join(args.source_dir, args.source_file), os.path.join(args.source_dir, sub, args.source_file)]


def pretrain_hint(args):
    script = (f"; `bash alignq/pretrain.sh {args.experiment}` runs the README's recipe"
              if args.experiment in ("resnet-20-cifar-10", "dann_office") else "")
    return (f"create it by running this command with --bitW 32 --abitW 32 (FP32 pretraining{script}), "
            f"or pass --no-pretrained")


def is_quant_param(key):
    """Tensors an FP32 source model does not have: ADMM Z/Gamma and the baselines' step sizes."""
    return key.endswith((".alterD", ".gamma", ".alpha", ".alpha_w", "wgt_alpha", "act_alpha", "quantizer.s"))


def load_weights(model, path, what, expect_model=None):
    """By-name load of `state_dict_t` (the original's key) like the original; a file of another architecture
    (shape mismatch, or the model's conv/BN/linear tensors missing) is an error."""
    ckpt = load_checkpoint(path, what=what)
    sd = ckpt.get("state_dict_t") if isinstance(ckpt, dict) else None
    if sd is None and isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt
    if not isinstance(sd, dict):
        raise UserError(f"{what} {path} holds no 'state_dict_t' weights")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    has = (ckpt.get("quantlab") or {}).get("model") or ckpt.get("model")
    if expect_model and has not in (None, expect_model):
        raise UserError(f"{what} {path} is a {has} model but this run builds {expect_model}; "
                        f"pass the matching checkpoint")
    own = model.state_dict()
    bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd and not is_quant_param(k) and not k.endswith("num_batches_tracked")]
    if bad or missing:
        k = (bad or missing)[0]
        raise UserError(f"{what} {path} does not match this {expect_model or 'model'} ({len(bad)} shape mismatches, "
                        f"{len(missing)} missing tensors, e.g. {k}); it is a checkpoint of another architecture")
    own.update({k: v for k, v in sd.items() if k in own})
    model.load_state_dict(own)
    return ckpt


def check_fp32_source(ckpt, path):
    """The source model of a quantized run must be a full-precision one: a checkpoint that records a bit-width
    below 32 or a quantization scheme (an 8-bit run's model_best.pt, say) is refused; --refine starts from one."""
    ident, _ = identify(ckpt)     # what the file records (check_checkpoint then also looks up its sha256)
    if ident is None:
        return
    bits, scheme = ident.get("bits"), ident.get("scheme")
    if (bits is not None and bits != 32) or (scheme is not None and scheme != "fp32"):
        raise UserError(f"--source_dir/--source_file {path} is {describe(ident)}, not an FP32 model: pass the FP32 "
                        f"source model (--bitW 32 --abitW 32 writes it), or --refine {path} to start from it")


def imagenet_weights(args):
    """The local torchvision ResNet-50 ImageNet file (--imagenet_weights, else pretrained/ or the torch hub cache)."""
    if args.imagenet_weights:
        if not os.path.isfile(args.imagenet_weights):
            raise UserError(f"--imagenet_weights {args.imagenet_weights} does not exist")
        return args.imagenet_weights
    hub = os.path.join(os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch")),
                       "hub", "checkpoints")
    for d in (args.source_dir, hub):
        for f in IMAGENET_FILES:
            if os.path.isfile(os.path.join(d, f)):
                return os.path.join(d, f)
    raise UserError(f"the DANN/DSAN ResNet-50 starts from ImageNet weights: torchvision's {IMAGENET_FILES[0]} "
                    f"(IMAGENET1K_V1) was not found in {args.source_dir} or {hub}; pass --imagenet_weights FILE "
                    f"or --no-pretrained to start from scratch")


def load_imagenet(model, path):
    sd = load_checkpoint(path, what="ImageNet weights")
    feat = model.feature.state_dict()
    bad = [k for k in feat if k in sd and tuple(sd[k].shape) != tuple(feat[k].shape)]
    missing = [k for k in feat if k not in sd and not is_quant_param(k) and not k.endswith("num_batches_tracked")]
    if bad or missing:
        raise UserError(f"ImageNet weights {path} do not match ResNet-50 (e.g. {(bad or missing)[0]}); "
                        f"pass torchvision's {IMAGENET_FILES[0]}")
    feat.update({k: v for k, v in sd.items() if k in feat})
    model.feature.load_state_dict(feat)


def safe_reset(job_dir):
    """--reset: remove job_dir only if it is a run directory this project wrote (config.txt or checkpoint/);
    never through a link (a link made by plan_run points at a run under runs/alignq/, which stays)."""
    if os.path.islink(job_dir):
        return
    d = os.path.realpath(job_dir)
    cwd = os.path.realpath(os.getcwd())
    if not os.path.exists(d):
        return
    if d in ("/", os.path.realpath(os.path.expanduser("~"))) or cwd == d or cwd.startswith(d + os.sep):
        raise UserError(f"--reset refuses to remove {job_dir}: it is /, your home or contains the working directory")
    if not os.path.isdir(d) or not any(os.path.exists(os.path.join(d, m)) for m in ("config.txt", "checkpoint")):
        raise UserError(f"--reset refuses to remove {job_dir}: it does not look like an AlignQ run directory "
                        f"(no config.txt or checkpoint/)")
    shutil.rmtree(d)


# ------------------------------------------------------------------------------------------------ run layout


def is_real_dir(path):
    return os.path.isdir(path) and not os.path.islink(path)


def holds_old_run(job_dir):
    """A real --job_dir (not the link plan_run makes) holding a run: one written before runs/alignq/."""
    return is_real_dir(job_dir) and (runs.holds_run(job_dir) or any(
        os.path.exists(os.path.join(job_dir, m)) for m in ("config.txt", "checkpoint")))


def resume_run_dir(path):
    """The run directory of a --resume checkpoint, through links: the folder holding its checkpoint/ when that
    is a run (manifest.json or config.txt) and writable; None for a loose file."""
    d = os.path.dirname(os.path.realpath(path))
    if os.path.basename(d) != "checkpoint":
        return None
    d = os.path.dirname(d)
    if any(os.path.exists(os.path.join(d, m)) for m in ("manifest.json", "config.txt")) and os.access(d, os.W_OK):
        return d
    return None


def job_name(args):
    """The run's name stem: the basename of --job_dir (experiment/ours/resnet/t_8bit_pre32bit -> t_8bit_pre32bit)."""
    base = os.path.basename(os.path.normpath(args.job_dir))
    return base if base not in ("", ".", "..", os.sep) else args.experiment


def plan_run(args):
    """(run directory, old --job_dir for --reset to remove or None), decided and checked before any work.

    A new run writes runs/alignq/<job_dir basename>-<time>/ (or runs/alignq/<--name>/) and --job_dir becomes a
    link to it; a --resume checkpoint inside a run directory continues there. A real --job_dir holding a run of
    an older version keeps the old rules: continue it with --resume, or remove it with --reset."""
    job = args.job_dir
    check_writable_dir(job, "--job_dir")
    if args.name is not None and (not args.name or os.sep in args.name or args.name in (".", "..")):
        raise UserError(f"--name {args.name!r} must be a plain directory name (it goes under runs/alignq/)")
    cont = resume_run_dir(args.resume) if args.resume else None
    old = holds_old_run(job) and cont != os.path.realpath(job)
    if old and not args.reset:
        last = os.path.join(job, "checkpoint", "model_last.pt")
        raise UserError(f"{job} already holds a run written before runs/alignq/; continue it with --resume {last}, "
                        f"remove it with --reset, or pass another --job_dir")
    if is_real_dir(job) and not holds_old_run(job) and os.listdir(job):
        raise UserError(f"--job_dir {job} is a directory of other files, not an AlignQ run (it becomes a link to the "
                        f"run under runs/alignq/); pass another --job_dir")
    if cont is not None:
        check_writable_dir(cont, "--resume")
        return cont, (job if old else None)
    if args.name:
        d = os.path.join(runs.runs_root(), PAPER, args.name)
        if runs.holds_run(d) or os.path.exists(os.path.join(d, "checkpoint")):
            raise UserError(f"{d} already holds a run; continue it with --resume "
                            f"{os.path.join(d, 'checkpoint', 'model_last.pt')}, or pass another --name")
    d = runs.plan_run_dir(PAPER, (job_name(args),), name=args.name or None, flag="--job_dir")
    return os.path.realpath(d), (job if old else None)


def link_job_dir(job_dir, run_dir, say):
    """--job_dir (the README's output path) -> the run directory, as a relative link made when the run starts,
    so that --resume <job_dir>/checkpoint/model_last.pt and --test_only find this run. An old real --job_dir
    that this run continues is left as it is."""
    if os.path.realpath(job_dir) == run_dir:
        return
    if is_real_dir(job_dir) and not os.listdir(job_dir):
        os.rmdir(job_dir)
    runs.link_latest(run_dir, job_dir, say=say)


def same_job(ck, args, run_dir):
    """An existing FP32 source model written by this --job_dir (a run of the same documented path, this run
    or an older one) or by this run directory; such a file may be replaced by the new best model."""
    job = str(ck.get("job_dir", "")) if isinstance(ck, dict) else ""
    rd = str(ck.get("run_dir", "")) if isinstance(ck, dict) else ""
    return bool(job) and (os.path.abspath(job) == os.path.abspath(args.job_dir)
                          or os.path.realpath(job) == os.path.realpath(args.job_dir)) \
        or bool(rd) and os.path.realpath(rd) == run_dir


def check_args(args):
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


# ------------------------------------------------------------------------------------------------ steps


def scale_gradients(model, args):
    """--grad_scaling: the paper's intended weight-gradient scaling (dead code in the original's SGD):
    g <- g * lam * sig'(2 lam2 frac((w_hat + 0.5)(2^k - 1))) * 2 phi((w - mu) / sigma) / sigma, all quantized
    convolutions but the first."""
    n = 2 ** args.bitW - 1
    convs = [m for m in model.modules() if hasattr(m, "quantize_fn") and getattr(m, "w_bit", 32) < 32][1:]
    with torch.no_grad():
        for m in convs:
            w = m.weight
            if w.grad is None:
                continue
            w_hat = weight_cdf(w)
            sg = torch.sigmoid((((w_hat + 0.5) * n) % 1) * args.lam2 * 2)
            z = (w - w.mean()) / w.std()
            pdf = 2 * torch.exp(-0.5 * z * z) / (w.std() * math.sqrt(2 * math.pi))
            w.grad.mul_(sg * (1 - sg) * args.lam * pdf)


def cls_lr(args, epoch):
    return args.lr * args.lr_gamma ** bisect.bisect_right(args.lr_decay_steps, epoch)


def dann_lr(args, epoch):
    """lr / (1 + 10 (epoch - 1) / E)^0.75; where the base is <= 0 (epoch 0 with E <= 10: a math error or a division
    by zero in the original) epoch - 1 is taken as 0 (DEVIATIONS.md)."""
    base = 1 + 10 * (epoch - 1) / args.num_epochs
    if base <= 0:
        base = 1.0
    return args.lr / base ** 0.75


def make_optimizer(model, args, lr, admm_params):
    """SGD over the model; the ADMM Z/Gamma join it only in the domain-adaptation loops (as the original)."""
    if kind_of(args) == "cls":
        for n, p in model.named_parameters():   # Z/Gamma change only through the ADMM update here: no gradients
            if n in admm_params:
                p.requires_grad_(False)
        named = [(n, p) for n, p in model.named_parameters() if n not in admm_params]
        params = [p for _, p in named]
        if args.method == "ours" and args.bitW < 32:   # the original's own SGD (alignq/optim.py)
            return OriginalSGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                               standard_idx=quantized_indices([n for n, _ in named]), standard=args.standard_sgd)
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    heads = [getattr(model, n) for n in ("class_classifier", "classifier", "domain_classifier", "discriminator",
                                         "bottle", "cls_fc") if hasattr(model, n)]
    groups = [{"params": list(model.feature.parameters())}]
    groups += [{"params": list(h.parameters()), "lr": lr} for h in heads]
    seen = {id(p) for g in groups for p in g["params"]}
    other = [p for p in model.parameters() if id(p) not in seen]
    if other:
        groups.append({"params": other, "lr": lr})
    if args.experiment in ("dann_office", "dsan_office") and args.method == "ours" and args.bitW < 32:
        # the original's own SGD, as its Office train() (dann_digit uses torch's); its idx is taken over the
        # whole model's named parameters, Z/Gamma included, and read per group (alignq/optim.py)
        idx = quantized_indices([n for n, _ in model.named_parameters()], downsample=True)
        return OriginalSGD(groups, lr=lr / 10, momentum=args.momentum, weight_decay=args.weight_decay,
                           standard_idx=idx, standard=args.standard_sgd)
    return torch.optim.SGD(groups, lr=lr / 10, momentum=args.momentum, weight_decay=args.weight_decay)


def sgd_step(model, optimizer, args, admm_on, loss, logits, y, sums, history, admm=None):
    """Backward, (optional paper gradient scaling), SGD step, ADMM Z/Gamma update; loss and top-1 into `sums`
    (common.devdata.DeviceSums: no host sync per step; read at print lines and at the epoch's end)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_scaling and args.method == "ours" and args.bitW < 32:
        scale_gradients(model, args)
    optimizer.step()
    if admm_on:
        admm_update(model)
    lv = loss.detach()
    history.append(lv)
    sums.add(y.size(0), loss=lv, top1=accuracy(logits.detach(), y)[0],
             admm=lv.new_zeros(()) if admm is None else admm.detach())


def resume_epoch(resume, sums, history):
    """Restore an interrupted epoch's partial sums and loss history; the number of batches already done."""
    if not resume:
        return 0
    sums.total = resume["sums_total"].to(sums.total.device)
    sums.last = resume["sums_last"].to(sums.last.device)
    history.extend(resume["history"].unbind(0))
    return int(resume["batch"])


def skipped(i, skip, resume):
    """True for a batch an interrupted epoch already did: drawn from the loader (the sampler's order, the
    transforms' and workers' draws stay those of the uninterrupted run) but not computed. After the last such
    batch the RNG becomes the one saved right after it, so what the model draws (dropout) continues as well."""
    if i > skip:
        return False
    if i == skip:
        set_rng_state(resume["rng_batch"])
    return True


def epoch_state(sums, history, done):
    """What a resumed epoch needs besides weights and optimizer: batches done, partial sums, loss history and the
    RNG right after the last batch done (`rng` in the checkpoint is the RNG as the epoch began)."""
    return {"batch": int(done), "sums_total": sums.total.detach().cpu().clone(),
            "sums_last": sums.last.detach().cpu().clone(),
            "history": torch.stack(history).detach().cpu() if history else torch.zeros(0),
            "rng_batch": get_rng_state()}


def read_epoch(sums, history, meters):
    """The epoch's meters and per-step loss history as floats: one host sync."""
    sums.read(meters)
    return torch.stack(history).tolist() if history else []


def train_cls(model, loader, optimizer, args, device, epoch, log, eta=None, resume=None):
    """One epoch; (loss, top1, history, stopped): `stopped` is the epoch_state() when SIGINT/SIGTERM ended it
    after a batch, else None. `resume`: such a state, whose batches are skipped."""
    losses, trans, top1 = AverageMeter("loss"), AverageMeter("admm"), AverageMeter("top1")
    criterion = nn.CrossEntropyLoss()
    model.train()
    admm_on = use_admm(args)
    n_iter = len(loader) if not args.max_iters else min(len(loader), args.max_iters)
    bar = progress(loader, desc=epoch_label(epoch, args.num_epochs), total=n_iter)
    history, sums = [], DeviceSums(device, "loss", "top1", "admm")
    meters = {"loss": losses, "top1": top1, "admm": trans}
    skip, stopped = resume_epoch(resume, sums, history), None
    for i, (x, y) in enumerate(bar, 1):
        if skipped(i, skip, resume):
            if i >= n_iter:
                break
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss = criterion(out, y)
        extra = admm_loss(model) if admm_on else None
        total = loss if extra is None else loss + extra
        sgd_step(model, optimizer, args, admm_on, total, out, y, sums, history, admm=extra)
        if eta is not None:
            eta.batch(i - 1, skip)
        if i % args.print_freq == 0:
            sums.read(meters)
            bar.set_postfix(loss=f"{losses.avg:.4f}", top1=f"{top1.avg:.2f}")
            log.info(f"{epoch_label(epoch, args.num_epochs)} ({i}/{n_iter}): Train_loss {losses.val:.4f} "
                     f"({losses.avg:.4f})"
                     + (f" Transform_loss {trans.val:.4f} ({trans.avg:.4f})" if admm_on else "")
                     + f" Prec@1 {top1.avg:.3f}")
        if interrupt.requested():
            stopped = epoch_state(sums, history, i)
            break
        if i >= n_iter:
            break
    history = read_epoch(sums, history, meters)
    return losses.avg, top1.avg, history, stopped


def train_domain(model, loaders, args, device, epoch, log, dsan_loss=None, optimizer=None, eta=None, resume=None):
    """One DANN/DSAN epoch. Office-31: the optimizer is rebuilt here every epoch (momentum restarts) at
    dann_lr(epoch), p runs over the longer loader. Digits (`optimizer` given, kept across epochs): lr set every
    iteration to lr / (1 + alpha p)^0.75 (alpha = --alpha), p over the shorter loader, GRL without the 1e-6.
    Returns (loss, top1, history, stopped) as train_cls; an Office `stopped` also holds the epoch's optimizer
    state (`epoch_optimizer_t`), which a `resume` restores."""
    digit = optimizer is not None
    lr = dann_lr(args, epoch)
    admm_on = use_admm(args)
    if not digit:
        optimizer = make_optimizer(model, args, lr, admm_param_names(model))
        if resume and resume.get("epoch_optimizer_t"):
            optimizer.load_state_dict(resume["epoch_optimizer_t"])
    criterion = nn.CrossEntropyLoss()
    model.train()
    src, tgt = loaders["src_train"], loaders["tgt_train"]
    n_steps = min(len(src), len(tgt))
    num_iter = n_steps if digit else max(len(src), len(tgt))   # Office: p over the longer loader, zip the shorter
    if args.max_iters:
        n_steps = min(n_steps, args.max_iters)
    losses, top1 = AverageMeter("loss"), AverageMeter("top1")
    history, sums, meters = [], DeviceSums(device, "loss", "top1"), {"loss": losses, "top1": top1}
    bar = progress(zip(src, tgt), desc=epoch_label(epoch, args.num_epochs), total=n_steps)
    skip, stopped = resume_epoch(resume, sums, history), None
    for i, ((xs, ys), (xt, _)) in enumerate(bar, 1):
        if skipped(i, skip, resume):
            if i >= n_steps:
                break
            continue
        p = (num_iter * epoch + i) / args.num_epochs / num_iter
        alpha = grl_alpha(p, eps=0.0 if digit else 1e-6)
        if digit:
            lr = args.lr / (1 + args.alpha * p) ** 0.75
            for g in optimizer.param_groups:
                g["lr"] = lr
        xs, ys, xt = xs.to(device), ys.to(device), xt.to(device)
        if dsan_loss is None:
            cls_s, dom_s = model(xs, alpha)
            extra_s = admm_loss(model) if admm_on else None
            _, dom_t = model(xt, alpha)
            extra_t = admm_loss(model) if admm_on else None
            loss = criterion(cls_s, ys)
            if not args.src_only_flag:
                loss = loss + criterion(dom_s, torch.zeros_like(ys)) + \
                    criterion(dom_t, torch.ones(len(xt), dtype=torch.long, device=device))
        else:
            b = min(len(xs), len(xt))      # DSAN pairs samples: a shorter last batch on either side is cut to b
            xs, ys, xt = xs[:b], ys[:b], xt[:b]
            cls_s, loss_mmd, extra_s, extra_t = dsan_loss(model, xs, ys, xt, p, admm_on, args.param)
            loss = criterion(cls_s, ys) + (0 if args.src_only_flag else loss_mmd)
        if not args.src_only_flag:
            for e in (extra_s, extra_t):
                if e is not None:
                    loss = loss + e
        sgd_step(model, optimizer, args, admm_on, loss, cls_s, ys, sums, history)
        if eta is not None:
            eta.batch(i - 1, skip)
        if i % args.print_freq == 0:
            sums.read(meters)
            log.info(f"{epoch_label(epoch, args.num_epochs)} ({i}/{n_steps}): loss {losses.val:.4f} "
                     f"({losses.avg:.4f}) alpha {alpha:.3f} "
                     f"lr {lr:.2e} src Prec@1 {top1.avg:.3f}")
        if interrupt.requested():
            stopped = epoch_state(sums, history, i)
            if not digit:
                stopped["epoch_optimizer_t"] = optimizer.state_dict()
            break
        if i >= n_steps:
            break
    history = read_epoch(sums, history, meters)
    return losses.avg, top1.avg, history, stopped


def evaluate(model, loader, device, domain=False):
    """(top1, top5, n) on a loader; domain models are evaluated on their class head."""
    model.eval()
    top1, top5 = AverageMeter(), AverageMeter()
    sums = DeviceSums(device, "top1", "top5")
    with torch.no_grad():
        for x, y in progress(loader, desc="test", total=len(loader)):
            x, y = x.to(device), y.to(device)
            out = model(x)
            if isinstance(out, tuple):
                out = out[0]
            p1, p5 = accuracy(out, y, topk=(1, 5))
            sums.add(x.size(0), top1=p1, top5=p5)
    sums.read({"top1": top1, "top5": top5})           # one host sync per evaluation
    return top1.avg, top5.avg, top1.count


# ------------------------------------------------------------------------------------------------ main


def scheme_name(args):
    if is_fp32(args):
        return "fp32"
    if args.method != "ours":
        return args.method
    return "alignq+admm" if use_admm(args) else "alignq"


def bits_of(args):
    return args.bitW if args.bitW == args.abitW else f"W{args.bitW}A{args.abitW}"


def wanted(args):
    return expect(PAPER, model_name(args), bits=bits_of(args), scheme=scheme_name(args))


# The flags that shape the optimisation and its schedule: a resumed run restores its optimizer and epoch, so
# another value would be silently ignored (or mix two schedules); --resume refuses a change. --num_epochs may
# change: the lr milestones are epochs, so a longer run continues the same schedule (a run extended).
RESUME_FLAGS = {"lr": "--lr", "momentum": "--momentum",
                "weight_decay": "--weight_decay", "train_batch_size": "--train_batch_size",
                "lr_decay_steps": "--lr_decay_steps", "lr_gamma": "--lr_gamma"}


def state_of(model, args, epoch, best, optimizer, recipe, finished=False):
    """The original's checkpoint keys (state_dict_t, optimizer_t, epoch, best_prec1) plus what it is."""
    ident = identity(PAPER, model_name(args), bits=bits_of(args), scheme=scheme_name(args),
                     stage="pretrain" if is_fp32(args) else "train", recipe=recipe, experiment=args.experiment,
                     finished=finished)
    return {"quantlab": ident, "state_dict_t": model.state_dict(), "epoch": int(epoch), "best_prec1": float(best),
            "optimizer_t": optimizer.state_dict() if optimizer is not None else None, "rng": get_rng_state(),
            "flags": {k: getattr(args, k) for k in RESUME_FLAGS}}


def recipe_of(args, n_train, source_recipe=None):
    """Epochs against the experiment's published default, train images against the official count, and
    --max_iters as a smoke-test limit; a quantized run inherits its FP32 source's recipe."""
    steps = {"epochs": (args.num_epochs, EXPERIMENTS[args.experiment]["num_epochs"])}
    if n_train is not None:
        steps["train images"] = n_train
    r = recipe_info(steps, limits={"max_iters": args.max_iters or None})
    return combine_recipes(source_recipe, r) if source_recipe is not None else r


def train_images(loader):
    """(images used, official count) of a train loader (a Subset counts its parent's official size x 0.8)."""
    ds = loader.dataset
    n_official = getattr(ds, "n_official", None)
    if n_official is None and hasattr(ds, "dataset"):
        n_official = int(getattr(ds.dataset, "n_official", len(ds)) * 0.8)
    return len(ds), n_official or len(ds)


def run(argv=None, experiment=None, admm=False, prog="main.py"):
    import sys
    args = parse_args(sys.argv[1:] if argv is None else argv, experiment, admm, prog)
    check_args(args)
    check_results_writable()
    run_dir, reset_dir = (None, None) if args.test_only else plan_run(args)   # nothing read or written before
    device = get_device(args.gpus[0] if torch.cuda.is_available() else None)
    seed = seed_everything(args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little"))
    kind = kind_of(args)
    model = build_model(args)
    name = model_name(args)
    fp32 = is_fp32(args)

    # ---- initial weights: a checkpoint to evaluate/resume/refine, the FP32 source model, or ImageNet
    start_epoch, best, resume_ckpt, source_recipe, note = 0, 0.0, None, None, None
    if args.test_only:
        job = os.path.join(runs.runs_root(), PAPER, args.name) if args.name else args.job_dir
        path = args.resume or args.refine or os.path.join(job, "checkpoint", "model_best.pt")
        ck = load_weights(model, path, "checkpoint to evaluate", name)
        ident, note = check_checkpoint(ck, path, wanted(args), flag="--test_only checkpoint",
                                       suggest=lambda i: f"the flags it was trained with ({describe(i)})")
        source_recipe = (ident or {}).get("recipe")
    elif args.resume:
        resume_ckpt = load_weights(model, args.resume, "--resume checkpoint", name)
        check_checkpoint(resume_ckpt, args.resume, wanted(args), flag="--resume")
        check_resume_flags(resume_ckpt, args, args.resume, flags=RESUME_FLAGS, restart="--refine")
        start_epoch, best = int(resume_ckpt.get("epoch", 0)), float(resume_ckpt.get("best_prec1", 0.0))
        source_recipe = ((resume_ckpt.get("quantlab") or {}).get("recipe") or {}).get("stages", [None])[0]
    elif args.refine:
        ck = load_weights(model, args.refine, "--refine checkpoint", name)
        ident, note = check_checkpoint(ck, args.refine, wanted(args), flag="--refine", fields=("paper", "model"))
        source_recipe = (ident or {}).get("recipe")
    elif args.pretrained and not fp32:
        cands = source_candidates(args)
        path = next((c for c in cands if os.path.isfile(c)), None)
        if path is None:
            raise UserError(f"FP32 source model not found: looked for {' and '.join(cands)}; {pretrain_hint(args)}")
        ck = load_weights(model, path, "FP32 source model", name)
        check_fp32_source(ck, path)
        ident, note = check_checkpoint(ck, path, wanted(args), flag="--source_file", fields=("paper", "model"))
        source_recipe = (ident or {}).get("recipe")
        print(f"=> loaded the FP32 source model {path}")
    elif args.pretrained and fp32 and name.startswith("resnet50"):
        load_imagenet(model, imagenet_weights(args))
    pretrain_target = None
    if fp32 and not args.test_only:
        pretrain_target = source_candidates(args)[0]
        check_writable_file(pretrain_target, "--source_dir/--source_file")
        if os.path.exists(pretrain_target):      # only an earlier run of this --job_dir may be replaced
            ck = load_checkpoint(pretrain_target, what="existing FP32 model")
            if not same_job(ck, args, run_dir):
                raise UserError(f"the FP32 model {pretrain_target} already exists (written by another run); remove "
                                f"it or pass another --source_dir/--source_file")
    if reset_dir:                           # --reset: an old-layout real --job_dir goes (runs/alignq/ never)
        safe_reset(reset_dir)

    model = model.to(device)
    if kind == "cls":
        train_loader, test_loader = classification_loaders(args, device, test_only=args.test_only)
        loaders = None
    else:
        loaders = domain_loaders(args, device)
        train_loader, test_loader = loaders["src_train"], loaders["tgt_test"]
    n_test = len(test_loader.dataset)
    dataset = args.dataset if kind == "cls" else f"{args.src_data}->{args.tgt_data}"
    split = "test" if kind == "cls" else "target holdout"
    if kind == "cls" and getattr(test_loader.dataset, "is_subset", False):
        split = f"test[:{n_test}]"
    setting = setting_of(args)
    extra = {"experiment": args.experiment, "method": args.method, "admm": use_admm(args)}
    if note:
        extra["checkpoint_note"] = note

    if args.test_only:
        print(f"=> device {device}, seed {seed}; evaluating {path} on {n_test} {split} images")
        t1, t5, n = evaluate(model, test_loader, device)
        print(f"=> Test Prec@1: {t1:.3f} Prec@5: {t5:.3f} ({n} images)")
        record(PAPER, model=name, dataset=dataset, split=split, setting=setting, metric="top1", value=t1,
               n_samples=n, extra=dict(extra, mode="test_only", top5=t5, checkpoint=os.path.realpath(path)),
               recipe=source_recipe, seed=seed)
        return t1

    recipe = recipe_of(args, train_images(train_loader), source_recipe)
    run_ = runs.start_run(PAPER, run_dir, args, seed=seed, device=device, recipe=recipe)
    log = run_.log
    try:
        if args.reset and not reset_dir:
            log.info(f"=> --reset: nothing to remove; earlier runs stay in {os.path.dirname(run_dir)}")
        link_job_dir(args.job_dir, run_dir, log.info)
        with open(os.path.join(run_dir, "config.txt"), "w") as f:
            f.write(time.strftime("%Y-%m-%d-%H:%M:%S") + "\n\n" + "".join(f"{k}: {v}\n" for k, v in vars(args).items()))
        best = _train(model, args, run_dir, device, kind, train_loader, test_loader, loaders, log, start_epoch, best,
                      resume_ckpt, recipe, pretrain_target, dict(name=name, dataset=dataset, split=split,
                                                                  setting=setting, extra=extra, n_test=n_test))
    finally:
        runs.end_run()
    return best


def _train(model, args, run_dir, device, kind, train_loader, test_loader, loaders, log, start_epoch, best, resume_ckpt,
           recipe, pretrain_target, rec):
    optimizer = None
    if kind == "cls":
        optimizer = make_optimizer(model, args, args.lr, admm_param_names(model))
    elif args.experiment == "dann_digit":   # one SGD over every parameter for the whole run, as the original
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    mid = None                  # an interrupted epoch's state: its batches done are skipped
    if resume_ckpt is not None:
        if optimizer is not None and resume_ckpt.get("optimizer_t"):
            optimizer.load_state_dict(resume_ckpt["optimizer_t"])
        if "rng" in resume_ckpt:       # mid-epoch: the RNG as that epoch began, so it draws the same order again
            set_rng_state(resume_ckpt["rng"])
        at = epoch_label(start_epoch, args.num_epochs) if start_epoch < args.num_epochs else "the end"
        if resume_ckpt.get("mid_epoch"):
            mid = resume_ckpt["mid_epoch"]
            at += f" after batch {mid['batch']}"
        log.info(f"=> resumed {args.resume} at {at} (best {best:.3f})")
        if not mid and "job_dir" not in resume_ckpt and start_epoch < args.num_epochs:
            log.info(f"=> {args.resume} was saved by an interrupt before checkpoints held the batch position: "
                     f"{epoch_label(start_epoch, args.num_epochs)} restarts from its first batch")
    dsan_loss = None
    if kind == "dsan":
        from alignq.dsan import dsan_step
        dsan_loss = dsan_step
    ckpt_last = os.path.join(run_dir, "checkpoint", "model_last.pt")
    best_path = os.path.join(run_dir, "checkpoint", "model_best.pt")
    linked = os.path.realpath(args.job_dir) == run_dir     # --resume <job_dir>/checkpoint/model_last.pt works
    resume_hint = os.path.join(args.job_dir, "checkpoint", "model_last.pt") if linked else ckpt_last
    log.info(f"=> {args.experiment} {rec['name']} {rec['setting']}; {rec['n_test']} test images; "
             f"{epoch_span(start_epoch, args.num_epochs)}; output {run_dir}" + (f" ({args.job_dir})" if linked else ""))
    n_iter = len(train_loader) if kind == "cls" else min(len(loaders["src_train"]), len(loaders["tgt_train"]))
    eta = runs.ETA(args.num_epochs, start_epoch, min(n_iter, args.max_iters or n_iter), say=log.info)
    epoch_times, t1 = [], None
    with interrupt.armed():
        for epoch in range(start_epoch, args.num_epochs):
            t0 = time.time()
            epoch_rng = get_rng_state()     # as the epoch began (a resumed one: restored above)
            if kind == "cls":
                lr = cls_lr(args, epoch)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss, train_top1, _, stopped = train_cls(model, train_loader, optimizer, args, device, epoch, log,
                                                         eta, resume=mid)
            else:
                loss, train_top1, _, stopped = train_domain(model, loaders, args, device, epoch, log, dsan_loss,
                                                            optimizer, eta, resume=mid)
                lr = optimizer.param_groups[0]["lr"] if optimizer is not None else dann_lr(args, epoch)
            mid = None
            if stopped is not None:       # SIGINT/SIGTERM: the epoch stopped after a batch; --resume continues it
                st = state_of(model, args, epoch, best, optimizer, recipe)
                st["rng"], st["mid_epoch"] = epoch_rng, stopped
                save_checkpoint(st, ckpt_last)
                log.flush()
                interrupt.stop(f"{epoch_label(epoch, args.num_epochs)} batch {stopped['batch']}: resumable "
                               f"checkpoint saved to {ckpt_last}; continue with --resume {resume_hint}")
            epoch_times.append(time.time() - t0)
            t1, t5, _ = evaluate(model, test_loader, device)
            msg = f"{epoch_label(epoch, args.num_epochs)}: lr {lr:.2e} train loss {loss:.4f} top1 {train_top1:.2f}; " \
                  f"test Prec@1 {t1:.3f} Prec@5 {t5:.3f}"
            if kind != "cls":
                s1, _, _ = evaluate(model, loaders["src_test"], device)
                msg += f"; source Prec@1 {s1:.3f}"
                log.scalar("val/src_top1", s1, epoch + 1)
            log.info(msg + f" ({epoch_times[-1]:.1f} s; {eta.line(epoch + 1)})")
            for k, v in (("train/loss", loss), ("train/top1", train_top1), ("val/top1", t1), ("val/top5", t5),
                         ("train/lr", lr)):
                log.scalar(k, v, epoch + 1)      # step: the 1-based number of the epoch just finished
            log.flush()
            is_best = t1 > best or not os.path.exists(best_path)
            best = max(best, t1)
            st = state_of(model, args, epoch + 1, best, optimizer, recipe, finished=epoch + 1 == args.num_epochs)
            st["job_dir"], st["run_dir"] = os.path.abspath(args.job_dir), run_dir
            save_checkpoint(st, ckpt_last)
            if is_best:
                save_checkpoint(st, best_path)
                if pretrain_target:
                    save_checkpoint(st, pretrain_target)
                    log.info(f"=> FP32 source model saved to {pretrain_target}")
    log.info(f"Best @prec1: {best:.3f}")
    if t1 is not None:
        record(PAPER, model=rec["name"], dataset=rec["dataset"], split=rec["split"], setting=rec["setting"],
               metric="top1", value=best, n_samples=rec["n_test"], recipe=recipe, wall_s=sum(epoch_times),
               extra=dict(rec["extra"], mode="train", selection="best epoch on the test set", last_epoch_top1=t1,
                          epochs=args.num_epochs, epoch_seconds=[round(t, 2) for t in epoch_times],
                          device=str(device)))
    return best


def main(experiment=None, admm=False):
    """Entry point of the main.py scripts: bad input -> one line, exit 2."""
    return run_main(run, None, experiment, admm)
