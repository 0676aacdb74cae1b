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
"""
import argparse
import glob
import itertools
import os
import re
import sys
import time

import torch
import torch.nn as nn
import torchvision.transforms as transforms

from common import interrupt, runs
from common.checkpoint import (extract_state_dict, load_checkpoint, load_model_state, restore_training_state,
                               save_checkpoint, strip_module_prefix, training_state)
from common.checks import check_range, check_results_writable, check_sgd_flags, check_writable_dir
from common.data import cifar10, data_root
from common.devdata import DeviceSums
from common.device import get_device, get_rng_state, seed_everything
from common.errors import UserError, run_main
from common.identity import check_checkpoint, expect, identity
from common.meters import AverageMeter, accuracy, progress
from common.results import combine_recipes, recipe_info, record
from common.runlog import epoch_label, epoch_span
from dambq.model import QuantTune
from dambq.model.cifar10.resnet import MODELS
from dambq.model.quant_layers import MAX_BIT

MILESTONES = [150, 225]          # MultiStepLR x0.1, hard-wired as in the original
VAL_BATCH = 128
LATEST, BEST = 'latest.pth.tar', 'model_best.pth.tar'
FULL_EPOCHS = 300
NORMALIZE = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])   # the original's (ImageNet)
RUN_KEYS = ('arch', 'quantize', 'wgt_target', 'act_target', 'layerwise', 'duration', 'keep_fc_bias', 'option_a')
# the flags that shape the optimisation: --continue repeats them (checked where the checkpoint stores them)
SCHEDULE_KEYS = ('epochs', 'batch_size', 'lr', 'momentum', 'weight_decay', 'max_iters')
# tensorboard tag of each per-epoch history entry (the checkpoint's history keeps its keys for --continue);
# the step is the 1-based number of the epoch just finished (common.runlog)
TB_TAGS = {'train_loss': 'train/loss', 'train_prec1': 'train/top1', 'prec1': 'val/top1', 'test_loss': 'val/loss',
           'lr': 'train/lr'}


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
parser.add_argument('--data', metavar='DIR', default=None,
                    help='CIFAR-10 root: cifar-10-batches-py/, train/<class>/*.png + test/<class>/*.png, '
                         'or a folder holding cifar10/ (default: $QUANTLAB_DATA, else ./data)')
parser.add_argument('--checkpoint-dir', '--save-dir', dest='checkpoint_dir', metavar='DIR', default=None,
                    help='folder of the runs (default: <repo>/runs/dambq, or $QUANTLAB_RUNS/dambq): a run writes '
                         '<checkpoint-dir>/<expr-name>-<time>/ (or <checkpoint-dir>/<name>/ with --name), and when '
                         'it finishes <checkpoint-dir>/<expr-name> links to it')
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
                    help='continue a killed run exactly (weights, optimizer, schedule, epoch and batch, best, bits, '
                         'RNG) from PATH (a latest.pth.tar or its run directory; default: the --name run, else the '
                         'newest run of --expr-name)')
parser.add_argument('--name', default='', help='run directory <checkpoint-dir>/<name> (default: <expr-name>-<time>)')
parser.add_argument('--overwrite', action='store_true', help='replace the run already in <checkpoint-dir>/<name>')
parser.add_argument('--seed', default=None, type=int, help='random seed (default: drawn at random and logged)')
parser.add_argument('--max-iters', default=None, type=int, metavar='N',
                    help='smoke runs: stop each training epoch after N iterations (recorded as shortened)')
parser.add_argument('--keep-fc-bias', action='store_true',
                    help='keep the classifier bias when quantizing (the original drops it)')
parser.add_argument('--print-bits', action='store_true',
                    help='at the end, print the per-layer bits and clips of every quantized layer (always written '
                         'to log.txt; the console gets one summary line)')
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
    """The flags, with every range checked (one line, exit 2) before anything is read."""
    args = parser.parse_args(argv)
    if args.data is None:                          # read when the run starts, not when the module is imported
        args.data = data_root()
    args.duration = parse_duration(args.duration)
    args.option_a = args.pretrained_option_a
    if args.quantize and not (args.pretrained or args.resume or args.continue_run is not None):
        raise UserError("--quantize needs a model to start from: pass --pretrained FLOAT_MODEL (W4A4) or "
                        "--resume QUANTIZED_MODEL (W2.0A2.0)")
    if args.evaluate and not (args.resume or args.pretrained):
        raise UserError("-e needs a model to evaluate: pass --resume PATH (or --pretrained PATH)")
    if args.evaluate and args.quantize and not args.resume:
        raise UserError("-e --quantize evaluates a quantized checkpoint: pass it with --resume PATH (--pretrained is "
                        "a float model; evaluate it without --quantize)")
    if args.option_a and args.arch not in ('resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
                                           'resnet1202'):
        raise UserError(f"--pretrained-option-a builds BasicBlock ResNets only, not {args.arch}")
    check_sgd_flags(args, wd_flag='--weight-decay')   # -b, --lr, --momentum, wd, -p, -j, --epochs, --start-epoch
    check_range('--save-every', args.save_every, lo=1)
    check_range('--max-iters', args.max_iters, lo=1)
    check_range('--seed', args.seed, lo=0, hi=2 ** 32 - 1)
    if args.name and (os.sep in args.name or args.name in ('.', '..')):
        raise UserError(f"--name {args.name!r} must be a plain directory name (it goes under --checkpoint-dir)")
    if args.overwrite and args.continue_run is not None:
        raise UserError("--overwrite replaces a run and --continue continues one: pass only one of them")
    if args.continue_run and args.resume:
        raise UserError(f"--continue {args.continue_run} continues that run from its own checkpoint (its start model "
                        f"is in it) and --resume {args.resume} starts a new run: pass only one of them")
    given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)]
    targets = [f for f in ("--wgt-target", "--act-target") if f in given]
    if targets and not args.quantize:
        raise UserError(f"{' and '.join(targets)} set the quantized bit targets, but without --quantize the run "
                        f"trains and records the float model: add --quantize")
    if args.print_bits and not args.quantize:
        raise UserError("--print-bits prints the per-layer bits of a quantized model, but without --quantize there "
                        "are none: add --quantize")
    if args.half and not torch.cuda.is_available():
        raise UserError("--half needs a CUDA device (half-precision convolutions are not supported on CPU here)")
    return args


def model_name(args):
    """Record and identity key: the option-A network is another model than the paper's."""
    return f'{args.arch}-optionA' if args.option_a else args.arch


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


def wanted(args, quantized=None, bits=True):
    """What the flags ask a checkpoint to be (common.identity.expect); bits=False: any bit-width."""
    q = args.quantize if quantized is None else quantized
    return expect('dambq', model_name(args), bits=(args.wgt_target if q else 32) if bits else None,
                  scheme='dambq' if q else 'fp32')


def identity_of(args, recipe, epoch, tuner):
    """ckpt['quantlab']: paper, script, model, bits (weight target; 32 = float), scheme, stage (the README stage:
    FP32, W4A4, W2.0A2.0), the run's recipe and how far it got (epoch of epochs, finished)."""
    q = tuner is not None
    w, x = tuner.compute_avg_bit() if q else (32, 32)
    return identity('dambq', model_name(args), bits=args.wgt_target if q else 32, scheme='dambq' if q else 'fp32',
                    stage=setting_of(args), recipe=recipe, script='dambq/main_cifar10.py',
                    act_bits=args.act_target if q else 32, w_avg_bit=w, x_avg_bit=x, epoch=int(epoch),
                    epochs=args.epochs, finished=epoch >= args.epochs)


def checkpoint_recipe(ckpt, ident):
    """The recipe a checkpoint was made with; a checkpoint of an unfinished run is a shortened recipe."""
    recipe = (ident or {}).get('recipe') or (ckpt.get('recipe') if isinstance(ckpt, dict) else None)
    if recipe is None or not ident or ident.get('finished', True):
        return recipe
    return dict(recipe, full=False, summary=f"{recipe.get('summary')}; unfinished run (checkpoint after "
                                            f"{ident.get('epoch')} of {ident.get('epochs')} epochs)")


def flags_for(ident, flag, evaluate=False):
    """The flags that fit a checkpoint, for the mismatch line."""
    if ident.get('scheme') == 'fp32':
        return ('--pretrained (a float model starts a quantized run with --quantize --pretrained)'
                if flag == '--resume' and not evaluate else 'no --quantize (it is a float model)')
    if flag == '--pretrained':
        return '--quantize --resume (a quantized model continues with --resume)'
    if 'bits' in ident:
        return (f"--quantize --wgt-target {ident['bits']:g} --act-target {ident.get('act_bits', ident['bits']):g}"
                + (' -a ' + str(ident['model']).replace('-optionA', ' --pretrained-option-a')
                   if ident.get('model') else ''))
    return ''


def is_quantized(sd):
    return any(k.endswith('bit_wgt') for k in sd)


def read_model(path, flag, want_quantized, args, exact=False):
    """(checkpoint, state dict, identity, note) of --pretrained/--resume: its identity must fit the flags (a float
    checkpoint where a quantized one is needed and vice versa, another model or, with exact, another setting is
    one line naming both); files without an identity are judged by their weights."""
    ckpt = load_checkpoint(path, what=f'{flag} checkpoint', flag=flag)
    fields = ('paper', 'model', 'bits', 'scheme') if exact else ('paper', 'model', 'scheme')
    ident, note = check_checkpoint(ckpt, path, wanted(args, want_quantized), flag=flag, fields=fields,
                                   suggest=lambda i: flags_for(i, flag, args.evaluate))
    sd = strip_module_prefix(extract_state_dict(ckpt))
    if is_quantized(sd) != want_quantized:
        have, need = ('quantized', 'float') if is_quantized(sd) else ('float', 'quantized')
        hint = {('--pretrained', True): 'a quantized model continues with --quantize --resume',
                ('--resume', False): 'pass --quantize to resume a quantized model',
                ('--resume', True): 'a float model starts a quantized run with --quantize --pretrained'}
        raise UserError(f"{flag} {path} is a {have} checkpoint but this run needs a {need} one; "
                        f"{hint.get((flag, is_quantized(sd)), 'check the flags')}")
    saved = ckpt.get('run', {}).get('arch') if isinstance(ckpt, dict) else None
    if saved is not None and saved != args.arch:
        raise UserError(f"{flag} {path} holds a {saved} but -a is {args.arch}")
    if exact and want_quantized and ident is not None and ident.get('act_bits') is not None \
            and abs(float(ident['act_bits']) - args.act_target) > 1e-9:
        raise UserError(f"{flag} {path} is a {ident.get('stage')} model (activation target {ident['act_bits']:g}) "
                        f"but the flags ask for {setting_of(args)}; pass {flags_for(ident, flag)}")
    return ckpt, sd, ident, note


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


def targets_of(setting):
    """'W2.0A2.0' -> '--wgt-target 2.0 --act-target 2.0'."""
    m = re.fullmatch(r'W([\d.]+)A([\d.]+)', str(setting))
    return f'--wgt-target {float(m[1])} --act-target {float(m[2])}' if m else 'the flags it was made with'


def check_resumed_bits(args, tuner, start):
    """Bits only decrease: a checkpoint below the targets would train and be recorded under a setting it never
    had (a W2.0A2.0 model resumed for W4A4). With -e the file's setting must be the flags' one."""
    w, x = tuner.compute_avg_bit()
    have = start.get('setting') or ('W4A4' if (w, x) == (4.0, 4.0) else f'W{w:.1f}A{x:.1f}')
    if args.evaluate and have != setting_of(args):
        raise UserError(f"--resume {start['path']} is a {have} model (average bits {w:.4f}/{x:.4f}) but the flags ask "
                        f"for {setting_of(args)}; evaluate it with --quantize {targets_of(have)}")
    if not args.evaluate and (w < args.wgt_target - 1e-9 or x < args.act_target - 1e-9):
        raise UserError(f"--resume {start['path']} is a {have} model (average bits {w:.4f}/{x:.4f}), below the "
                        f"targets of this {setting_of(args)} run: bits only decrease, so it would never be "
                        f"{setting_of(args)}; start from a model with more bits (e.g. W4A4) or lower the targets")


def run_root(args):
    return args.checkpoint_dir or os.path.join(runs.runs_root(), 'dambq')


def continue_path(args, root):
    """--continue [PATH]: the file, a run directory's latest.pth.tar, the --name run's, or the newest run of
    --expr-name under the run folder."""
    if args.continue_run:
        p = args.continue_run
        return os.path.join(p, LATEST) if os.path.isdir(p) else p
    if args.name:
        return os.path.join(root, args.name, LATEST)
    found = [p for p in glob.glob(os.path.join(glob.escape(root), glob.escape(args.expr_name) + '-*', LATEST))
             + [os.path.join(root, args.expr_name, LATEST)] if os.path.isfile(p)]
    if not found:
        raise UserError(f"--continue: {LATEST} not found in any run of --expr-name {args.expr_name} under {root}; "
                        f"pass --continue PATH")
    return max(found, key=os.path.getmtime)


def plan_run(args):
    """(run directory, --continue checkpoint or None), decided and checked before any data is read. A new run
    gets its own directory; one that holds another run is refused unless --continue or --overwrite."""
    root = run_root(args)
    flag = '--checkpoint-dir' if args.checkpoint_dir else 'QUANTLAB_RUNS'
    check_writable_dir(root, flag)
    if args.continue_run is not None:
        path = continue_path(args, root)
        d = os.path.dirname(os.path.realpath(path))
        check_writable_dir(d, '--continue')
        return d, path
    if args.name:
        d = os.path.join(root, args.name)
        if os.path.islink(d):
            raise UserError(f"--name {args.name}: {d} is the link to the latest finished run of that name, not a "
                            f"run directory; pass another --name")
    else:
        d = base = os.path.join(root, runs.run_name(args.expr_name))
        k = 1
        while os.path.lexists(d):                  # two runs started in the same second
            k += 1
            d = f'{base}-{k}'
    check_writable_dir(d, '--name' if args.name else flag)
    if runs.holds_run(d) and not args.overwrite:
        raise UserError(f"{d} already holds a run: continue it with --continue, replace it with --overwrite, or "
                        f"pass another --name")
    return d, None


def check_continue(args, path):
    ckpt = load_checkpoint(path, what='--continue checkpoint', flag='--continue')
    if not isinstance(ckpt, dict) or ckpt.get('paper') != 'dambq' or 'optimizer' not in ckpt:
        raise UserError(f"--continue {path} is not a DAMBQ run checkpoint written by this main_cifar10.py")
    run = ckpt.get('run', {})
    diff = [k for k in RUN_KEYS if run.get(k) != getattr(args, k)]
    diff += [k for k in SCHEDULE_KEYS if k in run and run[k] != getattr(args, k)]  # older checkpoints: not stored
    if diff:
        k = diff[0]
        raise UserError(f"--continue {path} was written with {k}={run.get(k)!r} but this run has {k}="
                        f"{getattr(args, k)!r}; --continue repeats the run exactly: continue with the run's original "
                        f"flags, or start a new run from its weights with --resume")
    check_checkpoint(ckpt, path, wanted(args), flag='--continue', suggest=lambda i: flags_for(i, '--continue'))
    return ckpt


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

    n_test = len(val_loader.dataset)
    size_note = getattr(val_loader.dataset, 'size_note', f'{n_test} test images')
    recipe = recipe_of(args, len(train_loader.dataset), start['recipe'])
    if args.overwrite:                             # --overwrite: the old run's checkpoints go too
        for f in (LATEST, BEST):
            if os.path.exists(os.path.join(run_dir, f)):
                os.remove(os.path.join(run_dir, f))
    log = runs.start_run('dambq', run_dir, args, seed=seed, device=device, recipe=recipe,
                         overwrite=args.overwrite).log
    try:
        return train_run(args, model, tuner, start, ckpt, cont_path, run_dir, train_loader, val_loader, criterion,
                         device, seed, recipe, log, said, size_note)
    finally:
        runs.end_run()                             # text log and tensorboard closed, also on SIGINT/SIGTERM


def train_run(args, model, tuner, start, ckpt, cont_path, run_dir, train_loader, val_loader, criterion, device,
              seed, recipe, log, said, size_note):
    latest = os.path.join(run_dir, LATEST)
    n_test = len(val_loader.dataset)
    log.info('==> construct logger...')
    for line in said:
        log.info(line)
    if tuner is not None:
        tuner.logger = log.info
        tuner.epochs = args.epochs                 # its LBA lines name the epoch as `epoch 3/300`
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group.setdefault('initial_lr', group['lr'])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=MILESTONES,
                                                     last_epoch=args.start_epoch - 1)
    if args.arch in ('resnet1202', 'resnet110'):
        for group in optimizer.param_groups:     # the original's "warm-up" that is never undone
            group['lr'] = args.lr * 0.1
    start_epoch, best_prec1, best_epoch, history, skip, sums = args.start_epoch, 0.0, -1, [], 0, None
    if ckpt is not None:
        start_epoch, best = restore_training_state(ckpt, model, optimizer, scheduler)
        best_prec1, best_epoch, history = float(best), int(ckpt['best_epoch']), list(ckpt['history'])
        if tuner is not None:
            tuner.load_state(ckpt['tuner'])
        skip = int(ckpt.get('batch', 0))          # a checkpoint inside epoch `start_epoch`, after `skip` batches
        if skip:
            p = ckpt['partial']
            sums = (p['loss_sum'], p['correct_sum'], p['seen'])
        best_at = f'at {epoch_label(best_epoch, args.epochs)}' if best_epoch >= 0 else 'none yet'
        log.info(f'==> continue {cont_path} at {epoch_label(start_epoch, args.epochs)}'
                 + (f' batch {skip + 1}' if skip else '') + f' (best Prec@1 {best_prec1:.3f} {best_at})')
    n_iter = min(args.max_iters or len(train_loader), len(train_loader))
    log.info(f'==> {args.arch} {setting_of(args)}: {len(train_loader.dataset)} train images, {n_iter} it/epoch of '
             f'{args.batch_size}, test on {size_note}, {epoch_span(start_epoch, args.epochs)} of {args.epochs}, '
             f'output {run_dir}')
    eta = runs.ETA(args.epochs, start_epoch, n_iter, say=log.info)

    def state_at(epoch, errors=False, **extra):
        return training_state(model, optimizer, scheduler, epoch=epoch, best=best_prec1, best_prec1=best_prec1,
                              best_epoch=best_epoch, history=history, paper='dambq', setting=setting_of(args),
                              run={k: getattr(args, k) for k in RUN_KEYS + SCHEDULE_KEYS}, recipe=recipe, seed=seed,
                              tuner=tuner.state(errors) if tuner is not None else None,
                              quantlab=identity_of(args, recipe, epoch, tuner), **extra)

    stopped = {}

    def on_interrupt(i, sums_now):                # SIGINT/SIGTERM: save after this batch, atomically, then stop
        loss_sum, correct_sum, seen = sums_now
        state = state_at(epoch, batch=i + 1, rng=epoch_rng, interrupted=True,
                         partial={'loss_sum': loss_sum.detach().cpu(), 'correct_sum': correct_sum.detach().cpu(),
                                  'seen': seen}, errors=True)
        save_checkpoint(state, latest)
        log.flush()
        stopped['at'] = f'{epoch_label(epoch, args.epochs)} batch {i + 1}'
        interrupt.stop(stopped['at'])

    prec1, saved, epoch = None, (start_epoch if ckpt is not None else None), start_epoch
    try:
        with interrupt.armed():
            for epoch in range(start_epoch, args.epochs):
                epoch_rng = get_rng_state()       # a checkpoint inside this epoch replays its data from here
                log.info('current lr {:.5e}'.format(optimizer.param_groups[0]['lr']))
                if tuner is not None:
                    tuner.quantize_cur = tuner.in_window(epoch)
                first = epoch == start_epoch
                loss, train_prec = train(train_loader, model, criterion, optimizer, epoch, device, args, log,
                                         skip=skip if first else 0, sums=sums if first else None,
                                         on_interrupt=on_interrupt, eta=eta)
                scheduler.step()
                entry = {'epoch': epoch, 'train_loss': loss, 'train_prec1': train_prec}
                if tuner is not None:
                    if tuner.quantize_cur:
                        tuner.sort_and_tune(epoch)
                    tuner.quantize_cur = False
                    w_bit, x_bit = tuner.compute_avg_bit()
                    log.info(f'epoch: {epoch}  w_avg_bit: {w_bit}  x_avg_bit: {x_bit}.')
                    entry.update(w_avg_bit=w_bit, x_avg_bit=x_bit)
                    log.scalar('bits/w_avg', w_bit, epoch + 1)
                    log.scalar('bits/x_avg', x_bit, epoch + 1)
                prec1, test_loss = validate(val_loader, model, criterion, device, args, log.info)
                if prec1 > best_prec1:
                    best_prec1, best_epoch = prec1, epoch
                log.info(' * Prec@1 {:.3f} , Best Prec@1 {:.3f}'.format(prec1, best_prec1))
                entry.update(prec1=prec1, test_loss=test_loss, lr=optimizer.param_groups[0]['lr'])
                history.append(entry)
                for k, tag in TB_TAGS.items():
                    log.scalar(tag, entry[k], epoch + 1)
                log.flush()
                log.info(f'=> {epoch_label(epoch, args.epochs)}: Prec@1 {prec1:.3f} (best {best_prec1:.3f}); '
                         f'{eta.line(epoch + 1)}')
                stop = interrupt.requested()          # a signal during the test pass: stop after this epoch
                if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs or best_epoch == epoch or stop:
                    state = state_at(epoch + 1)
                    if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs or stop:
                        save_checkpoint(state, latest)
                        saved = epoch + 1
                    if best_epoch == epoch:
                        save_checkpoint(state, os.path.join(run_dir, BEST))
                if stop:
                    stopped['at'] = f'after {epoch_label(epoch, args.epochs)}'
                    interrupt.stop(stopped['at'])
    except KeyboardInterrupt as e:      # common.errors.run_main prints e.message and exits 130/143
        if stopped:
            e.message = (f"{stopped['at']}: resumable checkpoint saved to {latest}; rerun with the same flags plus "
                         f"--continue")
        else:
            e.message = (f'stopped in {epoch_label(epoch, args.epochs)}; '
                         + (f'{latest} holds {saved} finished epochs: rerun with the same flags plus --continue'
                            if saved else 'no epoch was saved yet'))
        raise

    if prec1 is not None:
        setting = setting_of(args)
        finish_best(run_dir, recipe)
        extra = {'mode': 'train', 'epochs': args.epochs, 'max_iters': args.max_iters, 'batch_size': args.batch_size,
                 'best_epoch': best_epoch, 'last_epoch': args.epochs - 1, 'test_set': size_note,
                 'checkpoint': os.path.abspath(latest), 'device': str(device)}
        if start['note']:
            extra['checkpoint_note'] = start['note']
        name = model_name(args)
        record('dambq', name, 'cifar10', 'test', setting, 'top1', prec1, n_test,
               extra=dict(extra, selection='last epoch (as the README reports)'))
        record('dambq', name, 'cifar10', 'test', setting, 'top1_best', best_prec1, n_test,
               extra=dict(extra, selection=f'best epoch ({epoch_label(best_epoch, args.epochs)}) on the test set'))
        if tuner is not None:
            report_bits(args, tuner, log.info, log.detail)
            w_bit, x_bit = tuner.compute_avg_bit()
            record('dambq', name, 'cifar10', 'n/a', setting, 'avg_bits_wgt', w_bit, n_test, extra=extra)
            record('dambq', name, 'cifar10', 'n/a', setting, 'avg_bits_act', x_bit, n_test, extra=extra)
        log.info(f'==> {setting}: last-epoch Prec@1 {prec1:.3f}, best {best_prec1:.3f} '
                 f'({epoch_label(best_epoch, args.epochs)}) on {size_note}')
    documented = os.path.join(run_root(args), args.expr_name)
    if os.path.abspath(documented) != os.path.abspath(run_dir):
        runs.link_latest(run_dir, documented, say=log.info)    # <checkpoint-dir>/<expr-name>/latest.pth.tar works
    return prec1


def report_bits(args, tuner, say, detail=None):
    """The final bits: one summary line; the per-layer table (bits and clips of every layer) goes to log.txt
    (`detail`) and, with --print-bits, to the console too."""
    table = say if args.print_bits else detail
    if table is not None:
        for line in tuner.show_avg_bit():
            table(line)
    where = '' if args.print_bits else (' (per-layer table in log.txt; --print-bits prints it)' if detail else
                                        ' (--print-bits prints the per-layer table)')
    say(f'==> final bits: {tuner.bit_summary()}{where}')


def finish_best(run_dir, recipe):
    """model_best.pth.tar was written mid-run: now that the run has finished, its identity says so."""
    path = os.path.join(run_dir, BEST)
    if os.path.exists(path):
        best = load_checkpoint(path, what='model_best checkpoint')
        if not best['quantlab'].get('finished'):
            best['quantlab'] = dict(best['quantlab'], finished=True, recipe=recipe)
            save_checkpoint(best, path)


if __name__ == '__main__':
    run_main(main)
