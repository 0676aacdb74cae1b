"""APoT on MNIST (ResNet-10/14/18/34, 1-channel), pytorch/examples style.

    python main.py --arch resnet18 --bit 5 --epochs 25              # APoT
    python main.py --arch resnet18 --bit 5 --epochs 25 --power 0    # uniform
    python main.py -a resnet10 --bit 4 -e --resume result/resnet10_4bit/model_best.pth.tar

Trains from scratch at the target bit-width; each run writes runs/apot/mnist-<arch>_<bit>bit[_uniform]-<time>/
(or runs/apot/<--name>/), and result/<arch>_<bit>bit[_uniform] links to the latest finished run.
The original validated on the TRAINING split and its README reports the best epoch there. Every epoch here
is evaluated on both splits, and a finished run records both protocols: the published one (best epoch on
the training split) and the test split's accuracy at the last epoch (no choice made on the test split).
--val-split picks the split that chooses model_best.pth.tar and that -e evaluates (default test; see
apot/DEVIATIONS.md).
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.utils.data
import torchvision.transforms as transforms

from apot.alphas import log_clipping
from apot.ImageNet import engine
from apot.MNIST import models
from common import data as cdata
from common import interrupt, runs
from common.checks import check_resume_flags, check_results_writable, check_sgd_flags, resume_flags
from common.checkpoint import load_checkpoint, save_checkpoint, training_state
from common.devdata import DeviceLoader
from common.device import get_rng_state, seed_everything
from common.errors import UserError, cli
from common.identity import identity
from common.results import combine_recipes, recipe_info, record
from common.runlog import epoch_label

parser = argparse.ArgumentParser(description="APoT MNIST Training")
parser.add_argument("-a", "--arch", metavar="ARCH", default="resnet18", choices=models.ARCHS,
                    help="model architecture: " + " | ".join(models.ARCHS) + " (default: resnet18)")
parser.add_argument("-j", "--workers", default=2, type=int, metavar="N", help="data loading workers (default: 2)")
parser.add_argument("--loader", default="device", choices=("device", "torchvision"),
                    help="device: uint8 MNIST on the training device, flipped and normalised per batch there "
                         "(common/devdata.py, same distribution); torchvision: the per-image DataLoader pipeline")
parser.add_argument("--compile", action="store_true", help="train and validate through torch.compile(model)")
parser.add_argument("--epochs", default=50, type=int, metavar="N",
                    help="number of total epochs to run (default: 50, the original's; its README's recipe: 25)")
parser.add_argument("--start-epoch", default=0, type=int, metavar="N", help="manual epoch number")
parser.add_argument("-b", "--batch-size", default=128, type=int, metavar="N", help="mini-batch size (default: 128)")
parser.add_argument("--bit", default=5, type=int, help="the bit-width of the quantized network (32: full precision)")
parser.add_argument("--data", metavar="DATA_PATH", default=cdata.data_root(),
                    help="MNIST root: <DATA>/MNIST/raw/*-ubyte (default: $QUANTLAB_DATA, else ./data)")
parser.add_argument("--lr", "--learning-rate", default=0.01, type=float, metavar="LR", help="initial learning rate",
                    dest="lr")
parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum")
parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, metavar="W", help="weight decay (default: 1e-4)",
                    dest="weight_decay")
parser.add_argument("-p", "--print-freq", default=100, type=int, metavar="N", help="print frequency (default: 100)")
parser.add_argument("--resume", default="", type=str, metavar="PATH",
                    help="checkpoint to resume from (or to evaluate with -e)")
parser.add_argument("-e", "--evaluate", dest="evaluate", action="store_true", help="evaluate model on validation set")
parser.add_argument("--pretrained", default="", type=str, metavar="PATH", help="initialise from a checkpoint")
parser.add_argument("--power", default=1, type=int, choices=(0, 1),
                    help="whether to use uniform (0) or (A)PoT quantization (1), (default: 1)")
parser.add_argument("--gpu", default=None, type=int, help="GPU id to use")
parser.add_argument("--seed", default=None, type=int, help="seed for initializing training")
parser.add_argument("--val-split", default="test", choices=("test", "train"),
                    help="split for -e and for choosing model_best (both are evaluated every epoch); the original "
                         "used 'train' (default: test)")
parser.add_argument("--name", default="", help="run name under runs/apot/ (default: flags + time stamp)")
parser.add_argument("--overwrite", action="store_true", help="replace the run already named --name")
parser.add_argument("--max-iters", default=None, type=int, metavar="N",
                    help="stop every epoch after N training iterations (smoke runs; recorded as shortened)")


README_EPOCHS = 25          # the MNIST README's recipe (batch 128, lr 0.01, wd 1e-4, 25 epochs)


def check_args(args):
    """Every range and output directory, before any data is read (one line, exit 2)."""
    check_sgd_flags(args, wd_flag="--wd")
    if args.max_iters is not None and args.max_iters < 1:
        raise UserError(f"--max-iters {args.max_iters}: needs at least 1 iteration per epoch")
    check_results_writable()


def main():
    args = parser.parse_args()
    power = bool(args.power)
    models.check_bit(args.bit, power)
    if args.evaluate and not (args.resume or args.pretrained):
        raise UserError("-e needs a trained model: pass --resume PATH (or --pretrained PATH)")
    check_args(args)
    tag = f"{args.arch}_{args.bit}bit" + ("" if power else "_uniform")
    fdir = None if args.evaluate else runs.plan_run_dir("apot", (f"mnist-{tag}",), name=args.name,
                                                        resume=args.resume, overwrite=args.overwrite, flag="--name")
    ckpt = load_checkpoint(args.resume, what="checkpoint", flag="--resume") if args.resume else None
    ident, note = engine.check_identity(ckpt, args.resume, args, power) if ckpt is not None else (None, None)
    if ckpt is not None and not args.evaluate:
        check_resume_flags(ckpt, args, args.resume)
    _, _, _, device = engine.setup_distributed(args.gpu)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    seed_everything(seed, deterministic=args.seed is not None)

    normalize = transforms.Normalize(mean=[0.131], std=[0.308])

    def eval_loader(split):
        # CenterCrop(28)/RandomCrop(28) of the original are no-ops on 28x28 MNIST; the horizontal flip is kept
        ds = cdata.mnist(args.data, train=split == "train",
                         transform=transforms.Compose([transforms.ToTensor(), normalize]))
        if args.loader == "device":
            return ds, DeviceLoader(ds, args.batch_size, device, [0.131], [0.308])
        return ds, torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                                               num_workers=args.workers)

    val_set, val_loader = eval_loader(args.val_split)
    print(f"=> creating model '{args.arch}' (bit {args.bit}, {'APoT' if power else 'uniform'})")
    model = models.__dict__[args.arch](bit=args.bit, power=power)
    init_recipe = (ident or {}).get("init_recipe")
    if args.pretrained:
        print(f"=> loading pre-trained model from {args.pretrained}")
        pre = load_checkpoint(args.pretrained, what="pretrained checkpoint", flag="--pretrained")
        pre_ident, pre_note = engine.check_identity(pre, args.pretrained, args, power, flag="--pretrained",
                                                    any_bits=not args.evaluate)
        init_recipe = (pre_ident or {}).get("recipe")
        if args.evaluate and not args.resume:
            ident, note = pre_ident, pre_note
        engine.load_pretrained(model, args.pretrained, ckpt=pre, strict=args.evaluate and not args.resume)
    model.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer, scheduler = engine.make_optimizer(model, args)
    print("Total params: %.2fM" % (sum(p.numel() for p in model.parameters()) / 1e+6))

    best_acc1, start_epoch, skip, history, prior_wall = 0.0, args.start_epoch, 0, [], 0.0
    if args.resume:
        start_epoch, best_acc1 = engine.resume(ckpt, model, optimizer, scheduler, args, power)
        skip = int(ckpt.get("batch", 0)) if not args.evaluate else 0
        history = engine.epoch_history(ckpt)
        prior_wall = float(ckpt.get("wall_s", 0.0))
        print(f"=> loaded checkpoint '{args.resume}' (epoch {int(ckpt.get('epoch', 0))})")

    setting = engine.setting_name(args.bit, power)
    if args.evaluate:
        print(f"=> device {device}, seed {seed}")
        t0 = time.time()
        acc1, acc5, loss, n = engine.validate(val_loader, model, criterion, device, desc=args.val_split)
        print(f" * Acc@1 {acc1:.2f} ({args.val_split} split, {n} images)")
        model.show_params()
        extra = {"checkpoint": args.resume or args.pretrained, "loss": loss}
        if note:
            extra["checkpoint_note"] = note
        record("apot", model=args.arch, dataset="mnist", split=args.val_split, setting=setting, metric="top1",
               value=acc1, n_samples=n, extra=extra, recipe=(ident or {}).get("recipe"), seed=seed,
               wall_s=time.time() - t0)
        return

    train_set = cdata.mnist(args.data, train=True, transform=transforms.Compose([
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
    if args.loader == "device":
        train_loader = DeviceLoader(train_set, args.batch_size, device, [0.131], [0.308], shuffle=True, flip=True)
    else:
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                                   num_workers=args.workers)
    fwd = torch.compile(model) if args.compile else model      # checkpoints keep the model's own keys
    recipe = combine_recipes(recipe_info({"epochs": (args.epochs, README_EPOCHS),
                                          "train images": (len(train_set), 60000)},
                                         limits={"max_iters": args.max_iters}),
                             *([init_recipe] if init_recipe or args.pretrained else []))
    qident = identity("apot", args.arch, bits=args.bit, scheme=engine.scheme(args.bit, power), stage="train",
                      recipe=recipe, run_dir=os.path.abspath(fdir), init_recipe=init_recipe)
    log = runs.start_run("apot", fdir, args, seed=seed, device=device, recipe=recipe,
                         overwrite=args.overwrite).log
    eta = runs.ETA(args.epochs, start_epoch, min(len(train_loader), args.max_iters or len(train_loader)),
                   say=log.info)

    other = "train" if args.val_split == "test" else "test"
    eval_loaders = {args.val_split: val_loader, other: eval_loader(other)[1]}

    def state_at(epoch, **extra):
        return training_state(model, optimizer, scheduler, epoch, best_acc1, arch=args.arch, bit=args.bit,
                              power=power, best_acc1=best_acc1, val_split=args.val_split, quantlab=qident,
                              history=history, flags=resume_flags(args), wall_s=prior_wall + time.time() - t_run, **extra)

    def on_interrupt(i, step):                    # SIGINT/SIGTERM: save at this batch, atomically, then stop
        # the RNG as the epoch began: a resume draws the same order and flips and skips the batches done
        state = state_at(epoch, batch=i + 1, interrupted=True, rng=epoch_rng)
        interrupt.save_and_stop(os.path.join(fdir, "checkpoint.pth"), state, log, f"{epoch_label(epoch, args.epochs)} batch {i + 1}")

    step = start_epoch * len(train_loader) + skip
    t_run = time.time()
    with interrupt.armed():
        for epoch in range(start_epoch, args.epochs):
            epoch_rng = get_rng_state()
            _, _, step = engine.train(train_loader, fwd, criterion, optimizer, epoch, args, log, device, step,
                                      skip=skip if epoch == start_epoch else 0, eta=eta,
                                      on_interrupt=on_interrupt)
            evals = {split: engine.validate(eval_loaders[split], fwd, criterion, device, desc=split)
                     for split in ("train", "test")}
            acc1, acc5, loss, n = evals[args.val_split]
            scheduler.step()
            # val/: the split the protocol evaluates (the training split, as the original); test/: the test split
            log.scalar("val/loss", loss, step)
            log.scalar("val/top1", acc1, step)
            log.scalar("val/top5", acc5, step)
            log.scalar("test/top1", evals["test"][0], step)
            log.scalar("test/loss", evals["test"][2], step)
            log.flush()
            log_clipping(model, log, step)
            history.append({"epoch": epoch, "train": evals["train"][0], "test": evals["test"][0]})
            # the first epoch of a run always writes model_best (an epoch at 0 % must not leave it missing)
            is_best = acc1 > best_acc1 or not os.path.exists(os.path.join(fdir, "model_best.pth.tar"))
            best_acc1 = max(acc1, best_acc1)
            log.info(f" * {epoch_label(epoch, args.epochs)} Acc@1 {evals['train'][0]:.2f} (train split) {evals['test'][0]:.2f} "
                     f"(test split); best on {args.val_split}: {best_acc1:.2f}; {eta.line(epoch + 1)}")
            state = state_at(epoch + 1)
            save_checkpoint(state, os.path.join(fdir, "checkpoint.pth"))
            if is_best:
                save_checkpoint(state, os.path.join(fdir, "model_best.pth.tar"))
    if args.epochs > start_epoch:
        sizes = {"train": len(train_set), "test": len(eval_loaders["test"].dataset)}
        for split, value, extra in engine.mnist_protocols(history, args.epochs):
            record("apot", model=args.arch, dataset="mnist", split=split, setting=setting, metric="top1",
                   value=value, n_samples=sizes[split], extra=extra, recipe=recipe, seed=seed,
                   wall_s=prior_wall + time.time() - t_run)
    runs.link_latest(fdir, os.path.join("result", tag), say=log.info)
    runs.end_run()


if __name__ == "__main__":
    cli(main)()
