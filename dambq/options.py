"""main_cifar10.py's flags: the original's parser (same names, defaults and schedule) plus this project's additions,
and every check of them that can be made before anything is read (one line, exit 2), and what the flags name: the
model, the README setting (FP32, W4A4, W2.0A2.0) and the recipe of the run."""
import argparse
import os
import re
import sys

import torch

from common.checks import check_range, check_sgd_flags, str2bool
from common.data import data_root
from common.errors import UserError
from common.results import combine_recipes, recipe_info
from dambq.model.cifar10.resnet import MODELS
from dambq.model.quant_layers import MAX_BIT

FULL_EPOCHS = 300


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 (through common.errors.run_main)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


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

