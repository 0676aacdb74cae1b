"""APoT on MNIST (ResNet-10/14/18/34, 1-channel), pytorch/examples style.

    python main.py --arch resnet18 --bit 5 --epochs 25              # APoT
    python main.py --arch resnet18 --bit 5 --epochs 25 --power 0    # uniform
    python main.py -a resnet10 --bit 4 -e --resume result/resnet10_4bit/model_best.pth.tar

Trains from scratch at the target bit-width; output in result/<arch>_<bit>bit[_uniform]/.
The original validated on the TRAINING split; here validation uses the test split unless
--val-split train (see apot/DEVIATIONS.md).
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.utils.data
import torchvision.transforms as transforms

from apot.ImageNet import engine
from apot.MNIST import models
from common import data as cdata
from common.checkpoint import load_checkpoint, save_checkpoint, training_state
from common.device import seed_everything
from common.errors import UserError, cli
from common.results import record
from common.runlog import RunLog

parser = argparse.ArgumentParser(description="APoT MNIST Training")
parser.add_argument("-a", "--arch", metavar="ARCH", default="resnet18", choices=models.ARCHS,
                    help="model architecture: " + " | ".join(models.ARCHS) + " (default: resnet18)")
parser.add_argument("-j", "--workers", default=2, type=int, metavar="N", help="data loading workers (default: 2)")
parser.add_argument("--epochs", default=50, type=int, metavar="N", help="number of total epochs to run")
parser.add_argument("--start-epoch", default=0, type=int, metavar="N", help="manual epoch number")
parser.add_argument("-b", "--batch-size", default=128, type=int, metavar="N", help="mini-batch size (default: 128)")
parser.add_argument("--bit", default=5, type=int, help="the bit-width of the quantized network (32: full precision)")
parser.add_argument("--data", metavar="DATA_PATH", default="./data/",
                    help="MNIST root: <DATA>/MNIST/raw/*-ubyte (default: ./data/)")
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
                    help="split for -e and per-epoch validation; the original used 'train' (default: test)")


def main():
    args = parser.parse_args()
    power = bool(args.power)
    models.check_bit(args.bit, power)
    if args.evaluate and not (args.resume or args.pretrained):
        raise UserError("-e needs a trained model: pass --resume PATH (or --pretrained PATH)")
    ckpt = load_checkpoint(args.resume, what="checkpoint", flag="--resume") if args.resume else None
    _, _, _, device = engine.setup_distributed(args.gpu)
    if args.seed is not None:
        seed_everything(args.seed, deterministic=True)

    normalize = transforms.Normalize(mean=[0.131], std=[0.308])
    # CenterCrop(28)/RandomCrop(28) of the original are no-ops on 28x28 MNIST; the horizontal flip is kept
    val_set = cdata.mnist(args.data, train=args.val_split == "train",
                          transform=transforms.Compose([transforms.ToTensor(), normalize]))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.workers)
    print(f"=> creating model '{args.arch}' (bit {args.bit}, {'APoT' if power else 'uniform'})")
    model = models.__dict__[args.arch](bit=args.bit, power=power)
    if args.pretrained:
        print(f"=> loading pre-trained model from {args.pretrained}")
        engine.load_pretrained(model, args.pretrained)
    model.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer, scheduler = engine.make_optimizer(model, args)
    print("Total params: %.2fM" % (sum(p.numel() for p in model.parameters()) / 1e+6))

    best_acc1, start_epoch = 0.0, args.start_epoch
    if args.resume:
        start_epoch, best_acc1 = engine.resume(ckpt, model, optimizer, scheduler, args, power)
        print(f"=> loaded checkpoint '{args.resume}' (epoch {int(ckpt.get('epoch', 0))})")

    setting = engine.setting_name(args.bit, power)
    if args.evaluate:
        acc1, acc5, loss, n = engine.validate(val_loader, model, criterion, device, desc=args.val_split)
        print(f" * Acc@1 {acc1:.2f} ({args.val_split} split, {n} images)")
        model.show_params()
        record("apot", model=args.arch, dataset="mnist", split=args.val_split, setting=setting, metric="top1",
               value=acc1, n_samples=n, extra={"checkpoint": args.resume or args.pretrained, "loss": loss})
        return

    train_set = cdata.mnist(args.data, train=True, transform=transforms.Compose([
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                               num_workers=args.workers)
    fdir = os.path.join("result", f"{args.arch}_{args.bit}bit" + ("" if power else "_uniform"))
    log = RunLog(fdir, args, seed=args.seed, device=device)
    step = start_epoch * len(train_loader)
    for epoch in range(start_epoch, args.epochs):
        if epoch % 5 == 1:
            model.show_params()
        _, _, step = engine.train(train_loader, model, criterion, optimizer, epoch, args, log, device, step)
        acc1, acc5, loss, n = engine.validate(val_loader, model, criterion, device, desc=args.val_split)
        scheduler.step()
        log.scalar("loss_val", loss, step)
        log.scalar("acc1_val", acc1, step)
        log.scalar("acc5_val", acc5, step)
        is_best = acc1 > best_acc1
        best_acc1 = max(acc1, best_acc1)
        log.info(f" * Epoch {epoch} Acc@1 {acc1:.2f} ({args.val_split}) best_acc:{best_acc1:.2f}")
        state = training_state(model, optimizer, scheduler, epoch + 1, best_acc1, arch=args.arch, bit=args.bit,
                               power=power, best_acc1=best_acc1, val_split=args.val_split)
        save_checkpoint(state, os.path.join(fdir, "checkpoint.pth"))
        if is_best:
            save_checkpoint(state, os.path.join(fdir, "model_best.pth.tar"))
    if args.epochs > start_epoch:
        record("apot", model=args.arch, dataset="mnist", split=args.val_split, setting=setting, metric="top1",
               value=best_acc1, n_samples=len(val_set),
               extra={"selection": "best epoch on the validation split", "epochs": args.epochs})
    log.close()


if __name__ == "__main__":
    cli(main)()
