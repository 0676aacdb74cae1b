"""DAMBQ on CIFAR-10: train a float CIFAR ResNet, or a quantized one with loss-aware bit-width allocation (LBA).

    python main_cifar10.py -a 'resnet20' --expr-name 'cifar10_resnet20_float'
    python main_cifar10.py -a 'resnet20' --expr-name 'cifar10_resnet20_w4a4_' --lr 5e-2 --wgt-target 4.0 \
        --act-target 4.0 --quantize --pretrained runs/dambq/cifar10_resnet20_float/latest.pth.tar
    python main_cifar10.py -a 'resnet20' --expr-name 'cifar10_resnet20_w2.0a2.0' --lr 5e-2 --wgt-target 2.0 \
        --act-target 2.0 --quantize --resume runs/dambq/cifar10_resnet20_w4a4_/latest.pth.tar -b 400

Flags are the original's (same defaults, schedule and output layout <checkpoint-dir>/<expr-name>/); --resume keeps
its meaning (load weights, start at --start-epoch); --continue continues a killed run exactly. Additions and fixes:
dambq/DEVIATIONS.md.
"""
import argparse
import itertools
import os
import re
import time

import torch
import torch.nn as nn
import torchvision.transforms as transforms

from common import REPO_ROOT
from common.checkpoint import (extract_state_dict, load_checkpoint, load_model_state, restore_training_state,
                               save_checkpoint, strip_module_prefix, training_state)
from common.data import cifar10
from common.device import get_device, seed_everything
from common.errors import UserError, run_main
from common.identity import identity
from common.meters import AverageMeter, accuracy, progress
from common.results import combine_recipes, recipe_info, record
from common.runlog import RunLog
from dambq.model import QuantTune
from dambq.model.cifar10.resnet import MODELS
from dambq.model.quant_layers import MAX_BIT

MILESTONES = [150, 225]          # MultiStepLR x0.1, hard-wired as in the original
VAL_BATCH = 128
FULL_EPOCHS = 300
NORMALIZE = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])   # the original's (ImageNet)
RUN_KEYS = ('arch', 'quantize', 'wgt_target', 'act_target', 'layerwise', 'duration', 'keep_fc_bias', 'option_a')


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 (through common.errors.run_main)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def str2bool(v):
    s = str(v).strip().lower()
    if s in ('1', 'true', 'yes', 'y', 'on'):
        return True
    if s in ('0', 'false', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/1/0), got {v!r}")


def bit_target(v):
    try:
        t = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number of bits") from None
    if not 0 < t <= MAX_BIT:
        raise argparse.ArgumentTypeError(f"average-bit target {v} is impossible: bits start at {MAX_BIT} and only "
                                         f"decrease, so choose 0 < target <= {MAX_BIT}")
    return t


parser = Parser(description='Propert ResNets for CIFAR10 in pytorch (DAMBQ)')
parser.add_argument('--arch', '-a', metavar='ARCH', default='resnet32', choices=list(MODELS),
                    help='model architecture: ' + ' | '.join(MODELS) + ' (default: resnet32)')
parser.add_argument('--data', metavar='DIR', default=os.path.join(REPO_ROOT, 'data'),
                    help='CIFAR-10 root: cifar-10-batches-py/, train/<class>/*.png + test/<class>/*.png, '
                         'or a folder holding cifar10/ (default: <repo>/data)')
parser.add_argument('--checkpoint-dir', '--save-dir', dest='checkpoint_dir', metavar='DIR',
                    default=os.path.join(REPO_ROOT, 'runs', 'dambq'),
                    help='runs go to <checkpoint-dir>/<expr-name>/ (default: <repo>/runs/dambq)')
parser.add_argument('--expr-name', default='cifar_float', help='experiment name (default: cifar_float)')
parser.add_argument('-j', '--workers', default=8, type=int, metavar='N',
                    help='data loading workers (default: 8, at most the CPU count)')
parser.add_argument('--epochs', default=FULL_EPOCHS, type=int, metavar='N', help='number of total epochs to run')
parser.add_argument('--start-epoch', default=0, type=int, metavar='N', help='manual epoch number (useful on restarts)')
parser.add_argument('-b', '--batch-size', default=512, type=int, metavar='N', help='mini-batch size (default: 512)')
parser.add_argument('--lr', '--learning-rate', default=5e-2, type=float, metavar='LR', help='initial learning rate')
parser.add_argument('--momentum', default=0.9, type=float, metavar='M', help='momentum')
parser.add_argument('--weight-decay', '--wd', default=1e-4, type=float, metavar='W',
                    help='weight decay (default: 1e-4)')
parser.add_argument('--print-freq', '-p', default=50, type=int, metavar='N', help='print frequency (default: 50)')
parser.add_argument('--resume', default='', type=str, metavar='PATH',
                    help='load this checkpoint\'s weights (after quantization when --quantize) and train from '
                         '--start-epoch, as the original; with -e: the model to evaluate')
parser.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                    help='evaluate the --resume (or --pretrained) model on the test set')
parser.add_argument('--half', dest='half', action='store_true', help='use half-precision (16-bit), CUDA only')
parser.add_argument('--save-every', dest='save_every', type=int, default=1,
                    help='write latest.pth.tar every N epochs (default: 1; the last epoch always)')
parser.add_argument('--pretrained', dest='pretrained', default=None, help='float model to start from')
parser.add_argument('--quantize', action='store_true', help='quantization-aware training with LBA')
parser.add_argument('--layerwise', default=False, type=str2bool, nargs='?', const=True,
                    help='layer-wise instead of channel-wise bits (`--layerwise` or `--layerwise true`)')
parser.add_argument('--wgt-target', default=2.0, type=bit_target, help='target average bit width for weights')
parser.add_argument('--act-target', default=2.0, type=bit_target, help='target average bit width for activations')
parser.add_argument('--duration', default=['0', '150'], nargs='+', metavar='EPOCH',
                    help='inclusive epoch window of the bit allocation: `0 150`, `0,150` or `[0,150]` (default)')
# additions
parser.add_argument('--continue', dest='continue_run', nargs='?', const='', default=None, metavar='PATH',
                    help='continue a killed run exactly (weights, optimizer, schedule, epoch, best, bits, RNG) from '
                         'PATH (default: <checkpoint-dir>/<expr-name>/latest.pth.tar)')
parser.add_argument('--seed', default=None, type=int, help='random seed (default: drawn at random and logged)')
parser.add_argument('--max-iters', default=None, type=int, metavar='N',
                    help='smoke runs: stop each training epoch after N iterations (recorded as shortened)')
parser.add_argument('--keep-fc-bias', action='store_true',
                    help='keep the classifier bias when quantizing (the original drops it)')
parser.add_argument('--pretrained-option-a', action='store_true',
                    help='build the option-A ResNet (zero-padding shortcuts, head `linear`) of '
                         'akamaster/pytorch_resnet_cifar10 to start from its FP32 checkpoint; this is NOT the '
                         'paper\'s model: no downsample convs, so 672 weight / 624 activation groups for resnet20')


def parse_duration(tokens):
    text = ' '.join(tokens)
    parts = [p for p in re.split(r'[\s,\[\]()]+', text) if p]
    try:
        d = [int(p) for p in parts]
    except ValueError:
        d = None
    if d is None or len(d) != 2 or not 0 <= d[0] < d[1]:
        raise UserError(f"--duration {text!r}: expected two increasing epoch numbers, e.g. --duration 0 150")
    return d


def parse_args(argv=None):
    args = parser.parse_args(argv)
    args.duration = parse_duration(args.duration)
    args.option_a = args.pretrained_option_a
    if args.quantize and not (args.pretrained or args.resume or args.continue_run is not None):
        raise UserError("--quantize needs a model to start from: pass --pretrained FLOAT_MODEL (W4A4) or "
                        "--resume QUANTIZED_MODEL (W2.0A2.0)")
    if args.evaluate and not (args.resume or args.pretrained):
        raise UserError("-e needs a model to evaluate: pass --resume PATH (or --pretrained PATH)")
    if args.option_a and args.arch not in ('resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
                                           'resnet1202'):
        raise UserError(f"--pretrained-option-a builds BasicBlock ResNets only, not {args.arch}")
    for flag in ('epochs', 'batch_size', 'save_every', 'print_freq'):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_iters is not None and args.max_iters < 1:
        raise UserError("--max-iters must be at least 1")
    if args.half and not torch.cuda.is_available():
        raise UserError("--half needs a CUDA device (half-precision convolutions are not supported on CPU here)")
    return args


def setting_of(args):
    """Record key: FP32, W4A4 (global 4 bits, no allocation) or W{w:.1f}A{a:.1f} (channel-wise allocation)."""
    if not args.quantize:
        return 'FP32'
    if args.wgt_target >= MAX_BIT and args.act_target >= MAX_BIT:
        return f'W{MAX_BIT}A{MAX_BIT}'
    return f'W{args.wgt_target:.1f}A{args.act_target:.1f}'


def recipe_of(args, n_train, start_recipe=None):
    """How much of the published stage this run is (common.results.recipe_info), combined with the recipe of
    the checkpoint it started from: a W2.0A2.0 run on a shortened W4A4 model is shortened too."""
    own = recipe_info({'epochs': (args.epochs, FULL_EPOCHS), 'train images': (n_train, 50000),
                       'LBA window': ('-'.join(map(str, args.duration)), '0-150')},
                      limits={'max_iters': args.max_iters})
    if not (args.pretrained or args.resume):
        return own
    return combine_recipes(own, start_recipe)


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


def is_quantized(sd):
    return any(k.endswith('bit_wgt') for k in sd)


def read_model(path, flag, want_quantized, arch):
    """A checkpoint's state dict, refusing a float one where a quantized one is needed and vice versa."""
    ckpt = load_checkpoint(path, what=f'{flag} checkpoint', flag=flag)
    sd = strip_module_prefix(extract_state_dict(ckpt))
    if is_quantized(sd) != want_quantized:
        have, need = ('quantized', 'float') if is_quantized(sd) else ('float', 'quantized')
        hint = {('--pretrained', True): 'a quantized model continues with --quantize --resume',
                ('--resume', False): 'pass --quantize to resume a quantized model',
                ('--resume', True): 'a float model starts a quantized run with --quantize --pretrained'}
        raise UserError(f"{flag} {path} is a {have} checkpoint but this run needs a {need} one; "
                        f"{hint.get((flag, is_quantized(sd)), 'check the flags')}")
    saved = ckpt.get('run', {}).get('arch') if isinstance(ckpt, dict) else None
    if saved is not None and saved != arch:
        raise UserError(f"{flag} {path} holds a {saved} but -a is {arch}")
    return ckpt, sd


def load_float(model, sd, path, option_a):
    """A float state dict into the float model; the option-A checkpoint lacks BN num_batches_tracked only."""
    if option_a:
        missing, _ = load_model_state(model, sd, strict=False, what=f'--pretrained {path}')
        bad = [k for k in missing if not k.endswith('num_batches_tracked')] + [k for k in sd if k not in
                                                                               model.state_dict()]
        if bad:
            raise UserError(f"--pretrained {path} is not an option-A CIFAR ResNet of this depth (e.g. {bad[0]})")
    else:
        load_model_state(model, sd, strict=True, what=f'--pretrained {path}')


def train(train_loader, model, criterion, optimizer, epoch, device, args, log):
    """One epoch; returns (average loss, average top-1). Host syncs only on print lines and at the end."""
    batch_time, data_time = AverageMeter(), AverageMeter()
    n_iter = len(train_loader) if not args.max_iters else min(args.max_iters, len(train_loader))
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device)
    seen = 0
    model.train()
    end = time.time()
    batches = itertools.islice(train_loader, n_iter)
    for i, (input, target) in enumerate(progress(batches, desc=f'epoch {epoch}', total=n_iter)):
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
    return loss_sum.item() / max(seen, 1), correct_sum.item() / max(seen, 1)


def validate(val_loader, model, criterion, device, args, log=print):
    losses, top1 = AverageMeter(), AverageMeter()
    model.eval()
    with torch.no_grad():
        for i, (input, target) in enumerate(progress(val_loader, desc='test', total=len(val_loader))):
            input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if args.half:
                input = input.half()
            output = model(input).float()
            losses.update(criterion(output, target).item(), input.size(0))
            top1.update(accuracy(output, target)[0].item(), input.size(0))
            if i % args.print_freq == 0:
                log(f'Test: [{i}/{len(val_loader)}]\tLoss {losses.val:.4f} ({losses.avg:.4f})\t'
                    f'Prec@1 {top1.val:.3f} ({top1.avg:.3f})')
    return top1.avg, losses.avg


def build(args, device, log=print):
    """Model (+ QuantTune when --quantize) with --pretrained/--resume loaded, as the original orders it:
    float weights before the swap, quantized weights after."""
    model = MODELS[args.arch](option_a=args.option_a)
    resume = start_recipe = None
    if args.pretrained and not (args.evaluate and args.resume):
        ckpt, sd = read_model(args.pretrained, '--pretrained', False, args.arch)
        start_recipe = ckpt.get('recipe') if isinstance(ckpt, dict) else None
        load_float(model, sd, args.pretrained, args.option_a)
        log('==> load pretrained model')
    if args.resume:
        ckpt, resume = read_model(args.resume, '--resume', args.quantize, args.arch)
        start_recipe = ckpt.get('recipe') if isinstance(ckpt, dict) else None
    model = model.to(device)
    tuner = None
    if args.quantize:
        tuner = QuantTune(model, args.wgt_target, args.act_target, layerwise=args.layerwise, duration=args.duration,
                          logger=log, keep_last_bias=args.keep_fc_bias)
    if resume is not None:
        load_model_state(model, resume, strict=True, what=f'--resume {args.resume}')
        if tuner is not None:
            tuner.load_bit_config()
        log('==> load resume model')
    if args.half:
        model.half()
    return model, tuner, start_recipe


def check_continue(args, run_dir):
    path = args.continue_run or os.path.join(run_dir, 'latest.pth.tar')
    ckpt = load_checkpoint(path, what='--continue checkpoint', flag='--continue')
    if not isinstance(ckpt, dict) or ckpt.get('paper') != 'dambq' or 'optimizer' not in ckpt:
        raise UserError(f"--continue {path} is not a DAMBQ run checkpoint written by this main_cifar10.py")
    run = ckpt.get('run', {})
    diff = [k for k in RUN_KEYS if run.get(k) != getattr(args, k)]
    if diff:
        k = diff[0]
        raise UserError(f"--continue {path} was written with {k}={run.get(k)!r} but this run has {k}="
                        f"{getattr(args, k)!r}; continue with the run's original flags")
    return path, ckpt


def main(argv=None):
    args = parse_args(argv)
    device = get_device()
    run_dir = os.path.join(args.checkpoint_dir, args.expr_name)
    latest = os.path.join(run_dir, 'latest.pth.tar')
    cont = None
    if args.continue_run is not None:
        cont = check_continue(args, run_dir)
    elif not args.evaluate and os.path.exists(latest):
        raise UserError(f"{run_dir} already holds a run (latest.pth.tar): continue it with --continue or choose "
                        f"another --expr-name/--checkpoint-dir")
    train_loader, val_loader = data_loaders(args, device)          # missing data fails before any work
    n_test = len(val_loader.dataset)
    size_note = getattr(val_loader.dataset, 'size_note', f'{n_test} test images')
    criterion = nn.CrossEntropyLoss().to(device)

    if args.evaluate:
        model, tuner, start_recipe = build(args, device)
        prec1, _ = validate(val_loader, model, criterion, device, args)
        print(f' * Prec@1 {prec1:.3f} on {size_note}')
        extra = {'mode': 'evaluate', 'checkpoint': os.path.abspath(args.resume or args.pretrained)}
        setting = 'FP32'
        if tuner is not None:
            w_bit, x_bit = tuner.compute_avg_bit()
            print(f'w_avg_bit: {w_bit}  x_avg_bit: {x_bit}')
            extra.update(w_avg_bit=w_bit, x_avg_bit=x_bit)
            setting = 'W4A4' if (w_bit, x_bit) == (4.0, 4.0) else f'W{w_bit:.1f}A{x_bit:.1f}'
        record('dambq', args.arch, 'cifar10', 'test', setting, 'top1', prec1, n_test, extra=extra,
               recipe=start_recipe)
        return prec1

    seed = seed_everything(args.seed if args.seed is not None else int.from_bytes(os.urandom(4), 'little'))
    log = RunLog(run_dir, args, seed=seed, device=device)
    log.info('==> construct logger...')
    model, tuner, start_recipe = build(args, device, log.info)
    recipe = recipe_of(args, len(train_loader.dataset), start_recipe)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group.setdefault('initial_lr', group['lr'])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=MILESTONES,
                                                     last_epoch=args.start_epoch - 1)
    if args.arch in ('resnet1202', 'resnet110'):
        for group in optimizer.param_groups:     # the original's "warm-up" that is never undone
            group['lr'] = args.lr * 0.1
    start_epoch, best_prec1, best_epoch, history = args.start_epoch, 0.0, -1, []
    if cont is not None:
        path, ckpt = cont
        start_epoch, best = restore_training_state(ckpt, model, optimizer, scheduler)
        best_prec1, best_epoch, history = float(best), int(ckpt['best_epoch']), list(ckpt['history'])
        if tuner is not None:
            tuner.load_state(ckpt['tuner'])
        log.info(f'==> continue {path} at epoch {start_epoch} (best Prec@1 {best_prec1:.3f} at epoch {best_epoch})')
    n_iter = min(args.max_iters or len(train_loader), len(train_loader))
    log.info(f"==> recipe: {(recipe or {}).get('summary', 'unknown')}")
    log.info(f'==> {args.arch} {setting_of(args)}: {len(train_loader.dataset)} train images, {n_iter} it/epoch of '
             f'{args.batch_size}, test on {size_note}, epochs {start_epoch}..{args.epochs - 1}, device {device}, '
             f'output {run_dir}')
    t_start = time.time()
    prec1 = None
    saved, epoch = (start_epoch if cont is not None else None), start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            t0 = time.time()
            log.info('current lr {:.5e}'.format(optimizer.param_groups[0]['lr']))
            if tuner is not None:
                tuner.quantize_cur = tuner.in_window(epoch)
            loss, train_prec = train(train_loader, model, criterion, optimizer, epoch, device, args, log)
            scheduler.step()
            entry = {'epoch': epoch, 'train_loss': loss, 'train_prec1': train_prec}
            if tuner is not None:
                if tuner.quantize_cur:
                    tuner.sort_and_tune(epoch)
                tuner.quantize_cur = False
                w_bit, x_bit = tuner.compute_avg_bit()
                log.info(f'epoch: {epoch}  w_avg_bit: {w_bit}  x_avg_bit: {x_bit}.')
                entry.update(w_avg_bit=w_bit, x_avg_bit=x_bit)
                log.scalar('w_avg_bit', w_bit, epoch)
                log.scalar('x_avg_bit', x_bit, epoch)
            prec1, test_loss = validate(val_loader, model, criterion, device, args, log.info)
            if prec1 > best_prec1:
                best_prec1, best_epoch = prec1, epoch
            log.info(' * Prec@1 {:.3f} , Best Prec@1 {:.3f}'.format(prec1, best_prec1))
            entry.update(prec1=prec1, test_loss=test_loss, lr=optimizer.param_groups[0]['lr'])
            history.append(entry)
            for k in ('train_loss', 'train_prec1', 'prec1', 'test_loss', 'lr'):
                log.scalar(k, entry[k], epoch)
            eta = (time.time() - t_start) / (epoch + 1 - start_epoch) * (args.epochs - epoch - 1)
            log.info(f'epoch {epoch} took {time.time() - t0:.1f} s; ETA {eta / 60:.1f} min')
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs or best_epoch == epoch:
                state = training_state(model, optimizer, scheduler, epoch=epoch + 1, best=best_prec1,
                                       best_prec1=best_prec1, best_epoch=best_epoch, history=history, paper='dambq',
                                       setting=setting_of(args), run={k: getattr(args, k) for k in RUN_KEYS},
                                       recipe=recipe, tuner=tuner.state() if tuner is not None else None,
                                       quantlab=identity('dambq', args.arch, stage=setting_of(args), recipe=recipe,
                                                         bits=32 if tuner is None else tuner.compute_avg_bit()[0],
                                                         scheme='fp32' if tuner is None else 'dambq'))
                if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                    save_checkpoint(state, latest)
                    saved = epoch + 1
                if best_epoch == epoch:
                    save_checkpoint(state, os.path.join(run_dir, 'model_best.pth.tar'))
    except KeyboardInterrupt as e:      # common.errors.run_main prints e.message and exits 130
        e.message = (f'stopped in epoch {epoch}; ' + (f'{latest} holds {saved} finished epochs: rerun with the same '
                     f'flags plus --continue' if saved else 'no epoch was saved yet'))
        raise

    if prec1 is not None:
        setting = setting_of(args)
        extra = {'mode': 'train', 'epochs': args.epochs, 'max_iters': args.max_iters, 'batch_size': args.batch_size,
                 'best_epoch': best_epoch, 'last_epoch': args.epochs - 1, 'seed': seed, 'test_set': size_note,
                 'checkpoint': os.path.abspath(latest), 'device': str(device)}
        rec = dict(recipe=recipe, seed=seed, run_dir=run_dir)
        record('dambq', args.arch, 'cifar10', 'test', setting, 'top1', prec1, n_test,
               extra=dict(extra, selection='last epoch (as the README reports)'), **rec)
        record('dambq', args.arch, 'cifar10', 'test', setting, 'top1_best', best_prec1, n_test,
               extra=dict(extra, selection=f'best epoch ({best_epoch}) on the test set'), **rec)
        if tuner is not None:
            for line in tuner.show_avg_bit():                     # final per-layer bits and clips
                log.info(line)
            w_bit, x_bit = tuner.compute_avg_bit()
            record('dambq', args.arch, 'cifar10', 'n/a', setting, 'avg_bits_wgt', w_bit, n_test, extra=extra, **rec)
            record('dambq', args.arch, 'cifar10', 'n/a', setting, 'avg_bits_act', x_bit, n_test, extra=extra, **rec)
        log.info(f'==> {setting}: last-epoch Prec@1 {prec1:.3f}, best {best_prec1:.3f} (epoch {best_epoch}) on '
                 f'{size_note}')
    log.close()
    return prec1


if __name__ == '__main__':
    run_main(main)
