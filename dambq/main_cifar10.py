"""DAMBQ on CIFAR-10: train a float CIFAR ResNet, or a quantized one with loss-aware bit-width allocation (LBA).

    python main_cifar10.py -a 'resnet20' --expr-name 'cifar10_resnet20_float'
    python main_cifar10.py -a 'resnet20' --expr-name 'cifar10_resnet20_w4a4_' --lr 5e-2 --wgt-target 4.0 \
        --act-target 4.0 --quantize --pretrained ../runs/dambq/cifar10_resnet20_float/latest.pth.tar
    python main_cifar10.py -a 'resnet20' --expr-name 'cifar10_resnet20_w2.0a2.0' --lr 5e-2 --wgt-target 2.0 \
        --act-target 2.0 --quantize --resume ../runs/dambq/cifar10_resnet20_w4a4_/latest.pth.tar -b 400

Flags are the original's (same defaults and schedule); --resume keeps its meaning (load weights, start at
--start-epoch). Each run writes its own directory runs/dambq/<expr-name>-<time>/ (or --name), and
runs/dambq/<expr-name> (the original's <checkpoint-dir>/<expr-name>/) links to the latest finished one.
--continue continues a killed run exactly, also from inside an epoch (SIGINT/SIGTERM save after the current
batch). Every checkpoint says what it is (common.identity); loading one under other flags is one line. Additions
and fixes: dambq/DEVIATIONS.md.

The flags and their checks are in options.py, the checkpoints (identity, start models, run directory,
--continue) in checkpoints.py, the training run (schedule, epoch loop, saving, interrupts, records) in engine.py;
main(), train() and validate() are here, as in the original.
"""
import itertools
import os
import time

import torch
import torch.nn as nn
import torchvision.transforms as transforms

from common import interrupt, runs
from common.checkpoint import load_model_state
from common.checks import check_results_writable
from common.data import cifar10
from common.devdata import DeviceSums
from common.device import get_device, seed_everything
from common.errors import run_main
from common.meters import AverageMeter, accuracy, progress
from common.results import record
from common.runlog import epoch_label
from dambq.checkpoints import (BEST, LATEST, check_continue, check_resumed_bits, checkpoint_recipe, load_float,
                               plan_run, read_model)
from dambq.engine import MILESTONES, TrainingRun, report_bits  # noqa: F401  (MILESTONES: the side-by-side test)
from dambq.model import QuantTune
from dambq.model.cifar10.resnet import MODELS
from dambq.options import model_name, parse_args, recipe_of, setting_of

VAL_BATCH = 128
NORMALIZE = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])   # the original's (ImageNet)


def cifar_root(path):
    """--data may be the CIFAR-10 root itself or a folder holding cifar10/ (the shared data layout)."""
    inner = os.path.join(path, 'cifar10')
    own = any(os.path.exists(os.path.join(path, n)) for n in ('train', 'test', 'cifar-10-batches-py', 'data_batch_1'))
    return inner if not own and os.path.isdir(inner) else path


def data_loaders(args, device):
    root = cifar_root(args.data)
    workers = max(0, min(args.workers, os.cpu_count() or 1))
    pin = device.type == 'cuda'
    val_set = cifar10(root, train=False, transform=transforms.Compose([transforms.ToTensor(), NORMALIZE]))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=VAL_BATCH, shuffle=False, num_workers=workers,
                                             pin_memory=pin)
    if args.evaluate:
        return None, val_loader
    train_set = cifar10(root, train=True, transform=transforms.Compose([
        transforms.RandomHorizontalFlip(), transforms.RandomCrop(32, 4), transforms.ToTensor(), NORMALIZE]))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                               num_workers=workers, pin_memory=pin)
    return train_loader, val_loader



def build(args, device, log=print):
    """Model (+ QuantTune when --quantize) with --pretrained/--resume loaded and checked, as the original orders
    it: float weights before the swap, quantized weights after. Returns (model, tuner, start) where start holds
    the recipe and note of the checkpoint the run starts from (or evaluates)."""
    model = MODELS[args.arch](option_a=args.option_a)
    resume, start = None, {'recipe': None, 'note': None, 'path': None}
    if args.pretrained and not (args.evaluate and args.resume):
        ckpt, sd, ident, note = read_model(args.pretrained, '--pretrained', False, args, exact=args.evaluate)
        start = {'recipe': checkpoint_recipe(ckpt, ident), 'note': note, 'path': args.pretrained}
        load_float(model, sd, args.pretrained, args.option_a)
        log('==> load pretrained model')
    if args.resume:
        ckpt, resume, ident, note = read_model(args.resume, '--resume', args.quantize, args, exact=args.evaluate)
        start = {'recipe': checkpoint_recipe(ckpt, ident), 'note': note, 'path': args.resume, 'ident': ident,
                 'setting': (ident or {}).get('stage') or (ckpt.get('setting') if isinstance(ckpt, dict) else None)}
    model = model.to(device)
    tuner = None
    if args.quantize:
        tuner = QuantTune(model, args.wgt_target, args.act_target, layerwise=args.layerwise, duration=args.duration,
                          logger=log, keep_last_bias=args.keep_fc_bias)
    if resume is not None:
        load_model_state(model, resume, strict=True, what=f'--resume {args.resume}')
        if tuner is not None:
            tuner.load_bit_config()
            check_resumed_bits(args, tuner, start)
        log('==> load resume model')
    if args.half:
        model.half()
    return model, tuner, start


def main(argv=None):
    args = parse_args(argv)
    check_results_writable()                       # checks before work: nothing is read or written before
    run_dir, cont_path = (None, None) if args.evaluate else plan_run(args)
    ckpt = check_continue(args, cont_path) if cont_path else None
    seed = args.seed if args.seed is not None else (ckpt or {}).get('seed')
    seed = seed_everything(seed if seed is not None else int.from_bytes(os.urandom(4), 'little'))
    device = get_device()
    said = []                                      # build's lines, logged once the run is open
    model, tuner, start = build(args, device, said.append)   # checkpoint mismatches stop here, before the data
    train_loader, val_loader = data_loaders(args, device)    # missing data: one line
    criterion = nn.CrossEntropyLoss().to(device)
    if args.evaluate:
        for line in said:
            print(line)
        return evaluate(args, model, tuner, start, val_loader, criterion, device, seed)

    recipe = recipe_of(args, len(train_loader.dataset), start['recipe'])
    if args.overwrite:                             # --overwrite: the old run's checkpoints go too
        for f in (LATEST, BEST):
            if os.path.exists(os.path.join(run_dir, f)):
                os.remove(os.path.join(run_dir, f))
    run = runs.start_run('dambq', run_dir, args, seed=seed, device=device, recipe=recipe, overwrite=args.overwrite)
    try:
        return TrainingRun(args, run, model, tuner, start, (train_loader, val_loader), criterion, device,
                           steps=(train, validate), cont=(cont_path, ckpt) if ckpt is not None else None,
                           said=said).run()
    finally:
        runs.end_run()                             # text log and tensorboard closed, also on SIGINT/SIGTERM


def evaluate(args, model, tuner, start, val_loader, criterion, device, seed):
    n_test = len(val_loader.dataset)
    size_note = getattr(val_loader.dataset, 'size_note', f'{n_test} test images')
    print(f'=> device {device}, seed {seed}; evaluating {start["path"]} on {size_note}')
    prec1, _ = validate(val_loader, model, criterion, device, args)
    print(f' * Prec@1 {prec1:.3f} on {size_note}')
    extra = {'mode': 'evaluate', 'checkpoint': os.path.abspath(start['path']), 'test_set': size_note}
    if start['note']:
        extra['checkpoint_note'] = start['note']
    if tuner is not None:
        w_bit, x_bit = tuner.compute_avg_bit()
        print(f'w_avg_bit: {w_bit}  x_avg_bit: {x_bit}')
        report_bits(args, tuner, print)
        extra.update(w_avg_bit=w_bit, x_avg_bit=x_bit)
    record('dambq', model_name(args), 'cifar10', 'test', setting_of(args), 'top1', prec1, n_test, extra=extra,
           recipe=start['recipe'], seed=seed)
    return prec1


def train(train_loader, model, criterion, optimizer, epoch, device, args, log, skip=0, sums=None,
          on_interrupt=None, eta=None):
    """One epoch; returns (average loss, average top-1). Host syncs only on print lines and at the end.

    skip: batches of this epoch already trained (a run continued from a checkpoint inside the epoch, with the
    RNG of the epoch's start): they are drawn again, so that the data order and augmentation of the rest are
    the uninterrupted run's, but not trained on; sums: that checkpoint's running (loss, correct, seen).
    on_interrupt(i, sums): after batch i when SIGINT/SIGTERM arrived (common.interrupt)."""
    batch_time, data_time = AverageMeter(), AverageMeter()
    n_iter = len(train_loader) if not args.max_iters else min(args.max_iters, len(train_loader))
    if sums is None:
        sums = (torch.zeros((), device=device), torch.zeros((), device=device), 0)
    loss_sum, correct_sum, seen = sums[0].to(device), sums[1].to(device), int(sums[2])
    model.train()
    end = time.time()
    batches = itertools.islice(train_loader, n_iter)
    for i, (input, target) in enumerate(progress(batches, desc=epoch_label(epoch, args.epochs), total=n_iter)):
        if i < skip:
            continue
        data_time.update(time.time() - end)
        input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if args.half:
            input = input.half()
        output = model(input)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()          # LBA errors accumulate here (quant layers' backward) while tuner.quantize_cur
        optimizer.step()
        n = input.size(0)
        prec1 = accuracy(output.detach().float(), target)[0]
        loss_sum += loss.detach().float() * n
        correct_sum += prec1 * n
        seen += n
        batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0:
            log.info(f'Epoch: [{epoch}][{i}/{n_iter}]\tTime {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                     f'Data {data_time.val:.3f} ({data_time.avg:.3f})\tLoss {loss.item():.4f} '
                     f'({loss_sum.item() / seen:.4f})\tPrec@1 {prec1.item():.3f} ({correct_sum.item() / seen:.3f})')
        if eta is not None:
            eta.batch(i, skip)
        if on_interrupt is not None and interrupt.requested():
            on_interrupt(i, (loss_sum, correct_sum, seen))
    return loss_sum.item() / max(seen, 1), correct_sum.item() / max(seen, 1)


def validate(val_loader, model, criterion, device, args, log=print):
    losses, top1 = AverageMeter(), AverageMeter()
    sums, meters = DeviceSums(device, 'loss', 'top1'), {'loss': losses, 'top1': top1}
    model.eval()
    with torch.no_grad():
        for i, (input, target) in enumerate(progress(val_loader, desc='test', total=len(val_loader))):
            input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if args.half:
                input = input.half()
            output = model(input).float()
            sums.add(input.size(0), loss=criterion(output, target), top1=accuracy(output, target)[0])
            if i % args.print_freq == 0:    # the only host syncs: print lines and the end
                sums.read(meters)
                log(f'Test: [{i}/{len(val_loader)}]\tLoss {losses.val:.4f} ({losses.avg:.4f})\t'
                    f'Prec@1 {top1.val:.3f} ({top1.avg:.3f})')
    sums.read(meters)
    return top1.avg, losses.avg


if __name__ == '__main__':
    run_main(main)
