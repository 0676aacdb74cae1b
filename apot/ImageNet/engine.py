"""Train/validate loops, checkpoint init and torchrun/DDP set-up shared by the APoT ImageNet and MNIST
scripts (pytorch/examples imagenet style)."""
import time

import torch
import torch.distributed as dist

from common import interrupt
from common.checkpoint import extract_state_dict, load_checkpoint, load_model_state, restore_training_state
from common.devdata import DeviceSums
from common.device import setup_distributed as _setup_distributed
from common.errors import UserError
from common.identity import check_checkpoint, expect
from common.meters import AverageMeter, accuracy, progress
from common.runlog import epoch_label

ALPHA_KEYS = ("act_alpha", "weight_alpha")


def setting_name(bit, power):
    """Result-table setting: W4A4, W4A4-uniform, FP32."""
    if bit == 32:
        return "FP32"
    return f"W{bit}A{bit}" + ("" if power else "-uniform")


def setup_distributed(gpu=None):
    """(distributed, rank, world_size, device): common.device.setup_distributed (nccl with one GPU per
    process, gloo on CPU when there are more processes than GPUs or none)."""
    return _setup_distributed(gpu)


def load_pretrained(model, path, flag="--pretrained", ckpt=None, strict=False):
    """Model weights from a checkpoint: those under 'state_dict' or 'model' (or a flat state dict),
    `module.` stripped. For progressive initialisation (strict=False) clipping parameters (act_alpha,
    weight_alpha) missing from a (full-precision) file keep their initial values; any other mismatch
    is an error. strict=True (evaluation) allows no missing key at all."""
    what = "checkpoint" if strict else "pretrained checkpoint"
    if ckpt is None:
        ckpt = load_checkpoint(path, what=what, flag=flag)
    sd = extract_state_dict(ckpt, keys=("state_dict", "model"))
    missing, unexpected = load_model_state(model, sd, strict=strict, what=f"{what} {path}")
    bad = [k for k in missing if not k.endswith(ALPHA_KEYS)] + list(unexpected)
    if bad:
        raise UserError(f"pretrained checkpoint {path} does not match the model ({', '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}); check -a/--arch")
    return ckpt, missing


def check_run_matches(ckpt, bit, power, arch=None, flag="--resume"):
    """Checkpoints written by these scripts record bit/power/arch: refuse to resume/evaluate a different run."""
    if not isinstance(ckpt, dict):
        return
    if isinstance(ckpt.get("bit"), int) and ckpt["bit"] != bit:
        raise UserError(f"{flag} checkpoint is a {ckpt['bit']}-bit run but --bit is {bit}; pass --bit {ckpt['bit']}")
    if isinstance(ckpt.get("power"), bool) and ckpt["power"] != power:
        raise UserError(f"{flag} checkpoint was trained with --power {int(ckpt['power'])}; pass --power "
                        f"{int(ckpt['power'])}")
    if arch and isinstance(ckpt.get("arch"), str) and ckpt["arch"] != arch:
        raise UserError(f"{flag} checkpoint is a {ckpt['arch']}; pass -a {ckpt['arch']}")


def scheme(bit, power):
    return "fp32" if bit == 32 else ("apot" if power else "uniform")


def check_identity(ckpt, path, args, power, flag="--resume", any_bits=False):
    """The checkpoint at `path` must be what -a/--bit/--power ask for (its stored identity, or the published
    table by sha256; common.identity). any_bits: progressive init (--pretrained) only needs paper and model.
    Returns (identity or None, note for the record)."""
    fields = ("paper", "model") if any_bits else ("paper", "model", "bits", "scheme")
    def suggest(ident):
        out = [f"-a {ident['model']}"] if ident.get("model") not in (None, args.arch) else []
        if isinstance(ident.get("bits"), int):
            out.append(f"--bit {ident['bits']}")
        if ident.get("scheme") in ("apot", "uniform"):
            out.append(f"--power {int(ident['scheme'] == 'apot')}")
        return " ".join(out)
    return check_checkpoint(ckpt, path, expect("apot", args.arch, bits=args.bit, scheme=scheme(args.bit, power)),
                            flag=flag, fields=fields, suggest=suggest)


def check_compile_backend(backend):
    """--compile BACKEND must name a torch.compile backend (checked before any work)."""
    if backend is None:
        return
    import torch._dynamo
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UserError(f"--compile {backend}: not a torch.compile backend; use one of {', '.join(sorted(known))}")


def make_optimizer(model, args):
    """SGD over every parameter, act_alpha/weight_alpha included, in one group with --lr/--wd (the original
    ImageNet and MNIST mains; their per-alpha groups are commented out), lr x0.1 at epochs 30, 60, 90."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[30, 60, 90], gamma=0.1)


def resume(ckpt, model, optimizer, scheduler, args, power):
    """--resume: with -e only the weights (strictly); otherwise the whole training state.
    Returns (start_epoch, best_acc1)."""
    check_run_matches(ckpt, args.bit, power, args.arch)
    if args.evaluate:
        load_pretrained(model, args.resume, flag="--resume", ckpt=ckpt, strict=True)
        return args.start_epoch, 0.0
    start_epoch, best = restore_training_state(ckpt, model, optimizer, scheduler)
    if "scheduler" not in ckpt:  # a checkpoint of the original script: no scheduler state
        scheduler.last_epoch = start_epoch
    return start_epoch, float(best if best is not None else ckpt.get("best_acc1", 0.0))


def train(loader, model, criterion, optimizer, epoch, args, log, device, step, main_process=True, skip=0,
          on_interrupt=None, eta=None):
    """One epoch; logs loss/acc1/acc5/lr every --print-freq iterations. Returns (loss, top1, next step).
    skip: batches already done (resume of an interrupted epoch); on_interrupt(i, step): called after batch i
    when SIGINT/SIGTERM arrived (common.interrupt), saves a resumable checkpoint and stops."""
    batch_time, data_time = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f")
    losses, top1, top5 = AverageMeter("Loss", ":.4e"), AverageMeter("Acc@1", ":6.2f"), AverageMeter("Acc@5", ":6.2f")
    sums = DeviceSums(device, "loss", "acc1", "acc5")
    model.train()
    end = time.time()
    max_iters = getattr(args, "max_iters", None)       # smoke runs: stop the epoch after that many batches
    for i, (images, target) in enumerate(progress(loader, desc=epoch_label(epoch, getattr(args, "epochs", "?")), disable=not main_process or None)):
        if max_iters is not None and i >= max_iters:
            break
        if i < skip:
            continue
        data_time.update(time.time() - end)
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(images)
        loss = criterion(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        sums.add(images.size(0), loss=loss, acc1=acc1, acc5=acc5)     # on the device: no host sync per step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0:
            sums.read({"loss": losses, "acc1": top1, "acc5": top5})
            log.info(f"Epoch: [{epoch + 1}/{getattr(args, 'epochs', '?')}][{i}/{len(loader)}]\t{batch_time}\t{data_time}\t{losses}\t{top1}\t{top5}")
            log.scalar("train/loss", losses.val, step)
            log.scalar("train/top1", top1.val, step)
            log.scalar("train/top5", top5.val, step)
            log.scalar("train/lr", optimizer.param_groups[0]["lr"], step)
        step += 1
        if eta is not None:
            eta.batch(i, skip)
        if on_interrupt is not None and interrupt.requested():
            on_interrupt(i, step)
    sums.read({"loss": losses, "acc1": top1, "acc5": top5})
    return losses.avg, top1.avg, step


@torch.no_grad()
def validate(loader, model, criterion, device, distributed=False, desc="val"):
    """(top1 %, top5 %, mean loss, n) over the loader; summed over ranks when distributed."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)        # correct1, correct5, loss*n, n
    for images, target in progress(loader, desc=desc):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(images)
        n = target.size(0)
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        sums[:3] += torch.stack([acc1.double() * n / 100, acc5.double() * n / 100,
                                 criterion(output, target).double() * n])
        sums[3] += n                      # a scalar kernel argument: no host-to-device copy, no sync per batch
    if distributed:
        dist.all_reduce(sums)
    c1, c5, loss, n = sums.tolist()
    if n == 0:
        raise UserError("the evaluation split is empty; check --data")
    return round(c1) * 100.0 / n, round(c5) * 100.0 / n, loss / n, int(n)


def epoch_history(ckpt):
    """The per-epoch evaluations a checkpoint carries ([] for checkpoints written before they were kept)."""
    hist = ckpt.get("history") if isinstance(ckpt, dict) else None
    if not isinstance(hist, list):
        return []
    return [dict(h) for h in hist if isinstance(h, dict) and {"epoch", "train", "test"} <= set(h)]


def mnist_protocols(history, epochs):
    """The two results of an MNIST run, from its per-epoch top-1 on both splits:
    (split, value, extra) for the published protocol (the original's: the best epoch on the TRAINING split,
    the number its README reports) and for the test split at the last epoch (nothing chosen on it)."""
    if not history:
        return []
    best = max(history, key=lambda h: (h["train"], -h["epoch"]))        # the first epoch reaching the maximum
    last = history[-1]
    common = {"epochs": epochs, "epochs_evaluated": len(history),
              "curve": {"train": [h["train"] for h in history], "test": [h["test"] for h in history]}}
    return [
        ("train", best["train"], {**common, "protocol": "published",
                                  "selection": "best epoch on the training split (the original's protocol)",
                                  "best_epoch": best["epoch"], "test_at_best_epoch": best["test"]}),
        ("test", last["test"], {**common, "protocol": "test split, last epoch",
                                "selection": "last epoch (no choice made on the test split)",
                                "epoch": last["epoch"], "best_test": max(h["test"] for h in history)}),
    ]


def show_params(model):
    (model.module if hasattr(model, "module") else model).show_params()
