"""APoT ImageNet training/evaluation (pytorch/examples imagenet style).

    python main.py -a resnet18 --bit 5 --data /path/to/imagenet
    python main.py -a resnet18 --bit 4 --pretrained checkpoint/res18_5best.pth.tar     # progressive init
    torchrun --nproc_per_node=8 main.py -a resnet18 --bit 4 ...                        # DDP (-b is the total)

Fresh runs start from torchvision's full-precision weights (local file, see --fp-init), as the original's
`pretrained=True`. Each run writes runs/apot/imagenet-res18_<bit>-<time>/ (manifest, log, tensorboard,
res18_<bit>checkpoint.pth.tar, res18_<bit>best.pth.tar); when it finishes, checkpoint/res18_<bit>best.pth.tar
and .../res18_<bit>checkpoint.pth.tar link to its files, so the README's --pretrained paths keep working.
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.utils.data
import torchvision.transforms as transforms

from apot.ImageNet import engine, models
from apot.ImageNet.models.resnet import load_torchvision_weights
from common import data as cdata
from apot.alphas import log_clipping
from common import interrupt, runs
from common.checks import (check_resume_flags, check_results_writable, check_sgd_flags, check_writable_dir,
                           resume_flags)
from common.checkpoint import load_checkpoint, save_checkpoint, training_state
from common.device import get_rng_state, seed_everything
from common.errors import UserError, cli
from common.identity import identity
from common.results import combine_recipes, recipe_info, record
from common.runlog import QuietLog, epoch_label

ARCHS = ("resnet18", "resnet34", "resnet50")

parser = argparse.ArgumentParser(description="APoT ImageNet Training")
parser.add_argument("-a", "--arch", metavar="ARCH", default="resnet18", choices=ARCHS,
                    help="model architecture: " + " | ".join(ARCHS) + " (default: resnet18)")
parser.add_argument("-j", "--workers", default=4, type=int, metavar="N", help="data loading workers (default: 4)")
parser.add_argument("--epochs", default=120, type=int, metavar="N", help="number of total epochs to run")
parser.add_argument("--start-epoch", default=0, type=int, metavar="N", help="manual epoch number")
parser.add_argument("-b", "--batch-size", default=1024, type=int, metavar="N",
                    help="mini-batch size (default: 1024), the total over all processes under torchrun")
parser.add_argument("--bit", default=5, type=int, help="the bit-width of the quantized network (32: full precision)")
parser.add_argument("--data", metavar="DATA_PATH", default=cdata.data_root(),
                    help="path to imagenet data with train/ and val/, or a root holding imagenet/ "
                         "(default: $QUANTLAB_DATA, else ./data)")
parser.add_argument("--lr", "--learning-rate", default=0.01, type=float, metavar="LR", help="initial learning rate",
                    dest="lr")
parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum")
parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, metavar="W", help="weight decay (default: 1e-4)",
                    dest="weight_decay")
parser.add_argument("-p", "--print-freq", default=30, type=int, metavar="N", help="print frequency (default: 30)")
parser.add_argument("--resume", default="", type=str, metavar="PATH",
                    help="checkpoint to resume from (model, optimizer, scheduler, epoch, best, RNG)")
parser.add_argument("-e", "--evaluate", dest="evaluate", action="store_true", help="evaluate model on validation set")
parser.add_argument("--pretrained", default="", type=str, metavar="PATH",
                    help="progressive init from a higher-bit checkpoint ('state_dict' or 'model' key)")
parser.add_argument("--fp-init", default="auto", metavar="PATH|auto|none",
                    help="full-precision init for fresh runs: a torchvision state dict; 'auto' looks in "
                         "$TORCH_HOME/hub/checkpoints (the original's pretrained=True); 'none' = random init")
parser.add_argument("--power", default=1, type=int, choices=(0, 1),
                    help="(A)PoT (1) or uniform (0) quantization (default: 1)")
parser.add_argument("--seed", default=None, type=int, help="seed for initializing training")
parser.add_argument("--gpu", default=None, type=int, help="GPU id to use")
parser.add_argument("--checkpoint-dir", default="checkpoint",
                    help="where links to the finished run's checkpoints go, as the original's file names "
                         "(default: checkpoint); the files themselves are in the run directory")
parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="train and validate through torch.compile(model) (backend: inductor unless named, "
                         "e.g. aot_eager); checkpoints keep the model's own keys")
parser.add_argument("--name", default="", help="run name under runs/apot/ (default: flags + time stamp)")
parser.add_argument("--overwrite", action="store_true", help="replace the run already named --name")


def check_args(args):
    """Every range and output directory, before any data is read (one line, exit 2)."""
    check_sgd_flags(args, wd_flag="--wd")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)     # torchrun: -b is the total over all processes
    if world > 1 and args.batch_size % world:
        raise UserError(f"-b {args.batch_size} is the total batch over all {world} processes and must be a multiple "
                        f"of {world}; use -b {max(world, args.batch_size // world * world)}")
    engine.check_compile_backend(args.compile)
    if not args.evaluate:
        check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")
    check_results_writable()


def run_tag(args):
    """res18_5, res34_4uniform_ ... as in the original's res18_4best.pth.tar."""
    return f"res{args.arch[len('resnet'):]}_{args.bit}" + ("" if args.power else "uniform_")


def build_data(args, distributed, rank, world):
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    input_size = 224
    val_set = cdata.imagenet(args.data, "val", transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(input_size), transforms.ToTensor(), normalize]))
    if distributed:                     # every rank scores a disjoint slice; counts are all-reduced
        val_set = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.workers, pin_memory=torch.cuda.is_available())
    if args.evaluate:
        return None, None, val_loader
    train_set = cdata.imagenet(args.data, "train", transforms.Compose([
        transforms.Resize(256), transforms.RandomCrop(input_size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize]))
    sampler = torch.utils.data.DistributedSampler(train_set, seed=args.seed or 0) if distributed else None
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None,
                                               sampler=sampler, num_workers=args.workers,
                                               pin_memory=torch.cuda.is_available())
    return sampler, train_loader, val_loader


def main():
    args = parser.parse_args()
    power = bool(args.power)
    models.check_bit(args.bit, power)
    check_args(args)
    tag = run_tag(args)
    first_rank = int(os.environ.get("RANK", "0")) == 0
    fdir = None
    if not args.evaluate and first_rank:          # decided and checked before any work; never another run's
        fdir = runs.plan_run_dir("apot", (f"imagenet-{tag}",), name=args.name, resume=args.resume,
                                 overwrite=args.overwrite, flag="--name")
    ckpt = load_checkpoint(args.resume, what="resume checkpoint", flag="--resume") if args.resume else None
    ident, note = engine.check_identity(ckpt, args.resume, args, power) if ckpt is not None else (None, None)
    if ckpt is not None and not args.evaluate:
        check_resume_flags(ckpt, args, args.resume)
    run_flags = resume_flags(args)                # -b as given: the total batch, before it is split over processes
    init_recipe = (ident or {}).get("init_recipe")
    pre = None
    if args.pretrained:                           # checked before any data is read, like --resume
        pre = load_checkpoint(args.pretrained, what="pretrained checkpoint", flag="--pretrained")
        pre_ident, pre_note = engine.check_identity(pre, args.pretrained, args, power, flag="--pretrained",
                                                    any_bits=not args.evaluate or bool(args.resume))
        init_recipe = (pre_ident or {}).get("recipe")
        if args.evaluate and not args.resume:     # evaluated as it is: its identity and recipe are the result's
            ident, note = pre_ident, pre_note
        elif not args.resume:
            note = note or pre_note
    distributed, rank, world, device = engine.setup_distributed(args.gpu)
    main_process = rank == 0
    if distributed:
        args.batch_size = args.batch_size // world          # -b is the total batch over all processes
        args.workers = (args.workers + world - 1) // world
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    seed_everything(seed, deterministic=args.seed is not None)
    sampler, train_loader, val_loader = build_data(args, distributed, rank, world)   # fail fast on bad --data
    say = print if main_process else (lambda *a, **k: None)

    say(f"=> creating model '{args.arch}' (bit {args.bit}, {'APoT' if power else 'uniform'})")
    model = models.__dict__[args.arch](bit=args.bit, power=power)
    if args.pretrained:
        say(f"=> loading pre-trained model from {args.pretrained}")
        engine.load_pretrained(model, args.pretrained, ckpt=pre)
        if main_process:
            model.show_params()
    elif not args.resume and args.fp_init != "none":
        load_torchvision_weights(model, args.arch, None if args.fp_init == "auto" else args.fp_init)
        say(f"=> full-precision init from torchvision {args.arch} weights")
    model.to(device)

    criterion = nn.CrossEntropyLoss().to(device)
    optimizer, scheduler = engine.make_optimizer(model, args)
    say("Total params: %.2fM" % (sum(p.numel() for p in model.parameters()) / 1e+6))

    best_acc1, start_epoch, skip = 0.0, args.start_epoch, 0
    if args.resume:
        start_epoch, best_acc1 = engine.resume(ckpt, model, optimizer, scheduler, args, power)
        skip = int(ckpt.get("batch", 0)) if not args.evaluate else 0
        say(f"=> loaded checkpoint '{args.resume}' (epoch {ckpt.get('epoch', '?')})")

    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.seed is None

    fwd = torch.compile(model, backend=args.compile) if args.compile else model   # after DDP: one graph per rank
    setting = engine.setting_name(args.bit, power)
    if args.evaluate:
        say(f"=> device {device}, seed {seed}")
        acc1, acc5, loss, n = engine.validate(val_loader, fwd, criterion, device, distributed)
        say(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
        if main_process:
            engine.show_params(model)
            extra = {"top5": acc5, "loss": loss, "checkpoint": args.resume or args.pretrained or "fp-init"}
            if note:
                extra["checkpoint_note"] = note
            recipe = (ident or {}).get("recipe")
            if not (args.resume or args.pretrained):     # no trained model: never a reproduction
                recipe = recipe_info({"epochs": (0, parser.get_default("epochs"))},
                                     note=("random" if args.fp_init == "none" else "full-precision")
                                     + " init evaluated without quantization-aware training")
            record("apot", model=args.arch, dataset="imagenet", split="val", setting=setting, metric="top1",
                   value=acc1, n_samples=n, extra=extra, recipe=recipe, seed=seed)
        return

    recipe = combine_recipes(recipe_info({"epochs": (args.epochs, parser.get_default("epochs")),
                                          "train images": (len(train_loader.dataset), 1281167)}),
                             *([init_recipe] if init_recipe or args.pretrained else []))
    qident = identity("apot", args.arch, bits=args.bit, scheme=engine.scheme(args.bit, power), stage="train",
                      recipe=recipe, init_recipe=init_recipe,
                      **({"run_dir": os.path.abspath(fdir)} if fdir else {}))  # fdir: the writing process's
    log = runs.start_run("apot", fdir, args, seed=seed, device=device, recipe=recipe, overwrite=args.overwrite).log \
        if main_process else QuietLog()
    eta = runs.ETA(args.epochs, start_epoch, len(train_loader), say=log.info)

    def state_at(epoch, **extra):
        return training_state(model, optimizer, scheduler, epoch, best_acc1, arch=args.arch, bit=args.bit,
                              power=power, best_acc1=best_acc1, quantlab=qident, flags=run_flags, **extra)

    def on_interrupt(i, step):                    # SIGINT/SIGTERM: save at this batch, atomically, then stop
        # the RNG as the epoch began: a resume draws the same order and augmentation and skips the batches done
        state = state_at(epoch, batch=i + 1, interrupted=True, rng=epoch_rng)
        path = os.path.join(fdir, tag + "checkpoint.pth.tar")
        interrupt.save_and_stop(path, state, log, f"{epoch_label(epoch, args.epochs)} batch {i + 1}")

    step = start_epoch * len(train_loader) + skip
    with interrupt.armed():
        for epoch in range(start_epoch, args.epochs):
            epoch_rng = get_rng_state()
            if sampler is not None:
                sampler.set_epoch(epoch)
            _, _, step = engine.train(train_loader, fwd, criterion, optimizer, epoch, args, log, device, step,
                                      main_process, skip=skip if epoch == start_epoch else 0, eta=eta,
                                      on_interrupt=None if distributed else on_interrupt)
            acc1, acc5, loss, n_val = engine.validate(val_loader, fwd, criterion, device, distributed)
            scheduler.step()
            log.scalar("val/loss", loss, step)
            log.scalar("val/top1", acc1, step)
            log.scalar("val/top5", acc5, step)
            # the first epoch of a run always writes the best file (an epoch at 0 % must not leave it missing)
            is_best = acc1 > best_acc1 or not os.path.exists(os.path.join(fdir, tag + "best.pth.tar"))
            best_acc1 = max(acc1, best_acc1)
            log.info(f" * {epoch_label(epoch, args.epochs)} Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} best_acc: {best_acc1:.3f}; "
                     f"{eta.line(epoch + 1)}")
            if main_process:
                log_clipping(model, log, step)
                log.flush()
                state = state_at(epoch + 1)
                save_checkpoint(state, os.path.join(fdir, tag + "checkpoint.pth.tar"))
                if is_best:
                    save_checkpoint(state, os.path.join(fdir, tag + "best.pth.tar"))
    if main_process and args.epochs > start_epoch:
        record("apot", model=args.arch, dataset="imagenet", split="val", setting=setting, metric="top1",
               value=best_acc1, n_samples=n_val,
               extra={"selection": "best epoch on val (as the published numbers)", "epochs": args.epochs},
               recipe=recipe, seed=seed)
    if main_process:                              # checkpoint/res18_5best.pth.tar -> the finished run's file
        for f in sorted(os.listdir(fdir)):
            if f.startswith(tag) and f.endswith(".pth.tar"):
                runs.link_latest(os.path.join(fdir, f), os.path.join(args.checkpoint_dir, f), say=log.info)
        runs.end_run()
    log.close()
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli(main)()
