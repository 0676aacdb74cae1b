"""One training/evaluation loop for every AlignQ experiment (the per-experiment main.py files call `main`).

cls (CIFAR-10 / SVHN): CE (+ ADMM terms), SGD, lr = lr * gamma^(#milestones <= epoch) set each epoch (the
original's scheduler.step(epoch)), test every epoch, best by test top-1.
dann (Office-31 / digits): zip(source, target) batches, GRL alpha from p = (epoch * iters + i) / (E * iters)
with iters the longer loader, loss = CE(class, src) + CE(domain, src -> 0) + CE(domain, tgt -> 1) (+ ADMM),
a fresh SGD each epoch (the original's own at W < 32 with --method ours; feature lr LR/10, heads LR,
LR = lr / (1 + 10 (epoch - 1) / E)^0.75), best by target hold-out top-1. dsan: the LMMD loss of alignq/dsan.py
instead of the domain classifier.
ADMM (cdf_alignment_admm/): after each optimizer step every ADMM module updates Z and Gamma.

A run: plan() checks the flags and the files, builds the model with its initial weights and the loaders, and
writes nothing but a --reset removal (a TrainingRun); run() starts the run directory and trains epoch after
epoch (train); finish() writes the last line and the record. The optimizers and schedules are alignq/optim.py,
checkpoints and the run layout alignq/checkpoints.py.
"""
import argparse
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from alignq import baselines
from alignq.checkpoints import (PAPER, Start, epoch_state, initial_weights, link_job_dir, plan_run, pretrain_target,
                                restore, resume_epoch, safe_reset, skipped, state_of)
from alignq.data import classification_loaders, domain_loaders
from alignq.models import MODELS, CDFScheme, grl_alpha
from alignq.optim import cls_lr, dann_lr, make_optimizer, scale_gradients
from alignq.options import EXPERIMENTS, check_args, kind_of, model_name, parse_args, setting_of, use_admm
from alignq.quant import admm_loss, admm_param_names, admm_update
from common import interrupt, runs
from common.checks import check_results_writable
from common.checkpoint import save_checkpoint
from common.devdata import DeviceSums
from common.device import get_device, get_rng_state, seed_everything
from common.errors import UserError, run_main
from common.meters import AverageMeter, accuracy, progress
from common.results import combine_recipes, recipe_info, record
from common.runlog import epoch_label, epoch_span


# ------------------------------------------------------------------------------------------------ setup


def build_model(args):
    """The network the flags name, with AlignQ's quantizers (--method ours) or a baseline's."""
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


# ------------------------------------------------------------------------------------------------ a run


@dataclass
class TrainingRun:
    """One run of an experiment as plan() sets it up: the flags, the model with its initial weights, the
    loaders, where it writes, and what its record says; `recipe` and `log` are set when the run starts."""
    args: argparse.Namespace
    device: torch.device
    seed: int
    model: nn.Module
    start: Start
    run_dir: str                 # None for --test_only
    reset_dir: str               # an old-layout real --job_dir that --reset removed, or None
    pretrain_target: str         # an FP32 run's copy of its best model (--source_dir/--source_file), or None
    train_loader: object
    test_loader: object
    loaders: dict                # domain adaptation: src_train, tgt_train, src_test, tgt_test; else None
    name: str                    # the record's model, dataset, split, setting, extra fields and test images
    dataset: str
    split: str
    setting: str
    extra: dict
    n_test: int
    recipe: dict = None
    log: object = None

    @property
    def kind(self):
        return kind_of(self.args)


def plan(args):
    """Everything before the run starts, checked before any data is read: the run directory, device and seed,
    the model and its initial weights, the FP32 copy's target, --reset, the loaders."""
    check_args(args)
    check_results_writable()
    run_dir, reset_dir = (None, None) if args.test_only else plan_run(args)   # nothing read or written before
    device = get_device(args.gpus[0] if torch.cuda.is_available() else None)
    seed = seed_everything(args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little"))
    kind = kind_of(args)
    model = build_model(args)
    start = initial_weights(model, args)
    target = pretrain_target(args, run_dir)
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
    extra = {"experiment": args.experiment, "method": args.method, "admm": use_admm(args)}
    if start.note:
        extra["checkpoint_note"] = start.note
    return TrainingRun(args, device, seed, model, start, run_dir, reset_dir, target, train_loader, test_loader,
                       loaders, model_name(args), dataset, split, setting_of(args), extra, n_test)


def evaluate_only(ctx):
    """--test_only: the checkpoint's top-1 on the test set (Office: target hold-out), printed and recorded."""
    path = ctx.start.path
    print(f"=> device {ctx.device}, seed {ctx.seed}; evaluating {path} on {ctx.n_test} {ctx.split} images")
    t1, t5, n = evaluate(ctx.model, ctx.test_loader, ctx.device)
    print(f"=> Test Prec@1: {t1:.3f} Prec@5: {t5:.3f} ({n} images)")
    record(PAPER, model=ctx.name, dataset=ctx.dataset, split=ctx.split, setting=ctx.setting, metric="top1", value=t1,
           n_samples=n, extra=dict(ctx.extra, mode="test_only", top5=t5, checkpoint=os.path.realpath(path)),
           recipe=ctx.start.source_recipe, seed=ctx.seed)
    return t1


def run(argv=None, experiment=None, admm=False, prog="main.py"):
    """What a main.py does: plan, then evaluate (--test_only) or start the run directory, train and finish; the
    best top-1 (--test_only: the checkpoint's)."""
    import sys
    args = parse_args(sys.argv[1:] if argv is None else argv, experiment, admm, prog)
    ctx = plan(args)
    if args.test_only:
        return evaluate_only(ctx)
    ctx.recipe = recipe_of(args, train_images(ctx.train_loader), ctx.start.source_recipe)
    ctx.log = runs.start_run(PAPER, ctx.run_dir, args, seed=ctx.seed, device=ctx.device, recipe=ctx.recipe).log
    try:
        if args.reset and not ctx.reset_dir:
            ctx.log.info(f"=> --reset: nothing to remove; earlier runs stay in {os.path.dirname(ctx.run_dir)}")
        link_job_dir(args.job_dir, ctx.run_dir, ctx.log.info)
        with open(os.path.join(ctx.run_dir, "config.txt"), "w") as f:
            f.write(time.strftime("%Y-%m-%d-%H:%M:%S") + "\n\n" + "".join(f"{k}: {v}\n" for k, v in vars(args).items()))
        best, last_top1, epoch_times = train(ctx)
        finish(ctx, best, last_top1, epoch_times)
    finally:
        runs.end_run()
    return best


def train(ctx):
    """The epochs from the start epoch on: train, evaluate, log, save checkpoint/model_last.pt (model_best.pt, and
    an FP32 run's source model, when the top-1 is the best so far); SIGINT/SIGTERM save a resumable checkpoint
    after the current batch and stop. Returns (best top-1, the last epoch's top-1 or None, epoch seconds)."""
    args, model, device, log, kind = ctx.args, ctx.model, ctx.device, ctx.log, ctx.kind
    start_epoch, best, loaders = ctx.start.epoch, ctx.start.best, ctx.loaders
    optimizer = None
    if kind == "cls":
        optimizer = make_optimizer(model, args, args.lr, admm_param_names(model))
    elif args.experiment == "dann_digit":   # one SGD over every parameter for the whole run, as the original
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    mid = None                  # an interrupted epoch's state: its batches done are skipped
    if ctx.start.resume_ckpt is not None:
        mid = restore(ctx.start.resume_ckpt, optimizer, args, start_epoch, best, log)
    dsan_loss = None
    if kind == "dsan":
        from alignq.dsan import dsan_step
        dsan_loss = dsan_step
    ckpt_last = os.path.join(ctx.run_dir, "checkpoint", "model_last.pt")
    best_path = os.path.join(ctx.run_dir, "checkpoint", "model_best.pt")
    linked = os.path.realpath(args.job_dir) == ctx.run_dir     # --resume <job_dir>/checkpoint/model_last.pt works
    resume_hint = os.path.join(args.job_dir, "checkpoint", "model_last.pt") if linked else ckpt_last
    log.info(f"=> {args.experiment} {ctx.name} {ctx.setting}; {ctx.n_test} test images; "
             f"{epoch_span(start_epoch, args.num_epochs)}; output {ctx.run_dir}"
             + (f" ({args.job_dir})" if linked else ""))
    n_iter = len(ctx.train_loader) if kind == "cls" else min(len(loaders["src_train"]), len(loaders["tgt_train"]))
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
                loss, train_top1, _, stopped = train_cls(model, ctx.train_loader, optimizer, args, device, epoch,
                                                         log, eta, resume=mid)
            else:
                loss, train_top1, _, stopped = train_domain(model, loaders, args, device, epoch, log, dsan_loss,
                                                            optimizer, eta, resume=mid)
                lr = optimizer.param_groups[0]["lr"] if optimizer is not None else dann_lr(args, epoch)
            mid = None
            if stopped is not None:       # SIGINT/SIGTERM: the epoch stopped after a batch; --resume continues it
                st = state_of(model, args, epoch, best, optimizer, ctx.recipe)
                st["rng"], st["mid_epoch"] = epoch_rng, stopped
                save_checkpoint(st, ckpt_last)
                log.flush()
                interrupt.stop(f"{epoch_label(epoch, args.num_epochs)} batch {stopped['batch']}: resumable "
                               f"checkpoint saved to {ckpt_last}; continue with --resume {resume_hint}")
            epoch_times.append(time.time() - t0)
            t1, t5, _ = evaluate(model, ctx.test_loader, device)
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
            st = state_of(model, args, epoch + 1, best, optimizer, ctx.recipe, finished=epoch + 1 == args.num_epochs)
            st["job_dir"], st["run_dir"] = os.path.abspath(args.job_dir), ctx.run_dir
            save_checkpoint(st, ckpt_last)
            if is_best:
                save_checkpoint(st, best_path)
                if ctx.pretrain_target:
                    save_checkpoint(st, ctx.pretrain_target)
                    log.info(f"=> FP32 source model saved to {ctx.pretrain_target}")
    return best, t1, epoch_times


def finish(ctx, best, last_top1, epoch_times):
    """The run's last line and, when an epoch ran, its record (the best test top-1 over the epochs, as the
    original reports)."""
    ctx.log.info(f"Best @prec1: {best:.3f}")
    if last_top1 is not None:
        record(PAPER, model=ctx.name, dataset=ctx.dataset, split=ctx.split, setting=ctx.setting,
               metric="top1", value=best, n_samples=ctx.n_test, recipe=ctx.recipe, wall_s=sum(epoch_times),
               extra=dict(ctx.extra, mode="train", selection="best epoch on the test set", last_epoch_top1=last_top1,
                          epochs=ctx.args.num_epochs, epoch_seconds=[round(t, 2) for t in epoch_times],
                          device=str(ctx.device)))


# ------------------------------------------------------------------------------------------------ epochs


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


def main(experiment=None, admm=False):
    """Entry point of the main.py scripts: bad input -> one line, exit 2."""
    return run_main(run, None, experiment, admm)
