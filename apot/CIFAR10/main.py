"""APoT on CIFAR-10 (old quantizer generation): train or evaluate a CIFAR ResNet at --bit bits.

    python main.py --arch res20 --bit 32 --wd 5e-4                       # full-precision model first
    python main.py --bit 4 --init PATH-TO-FULL-PRECISION-MODEL           # then progressive initialisation
    python main.py --bit 4 -e --resume result/res20_4bit/model_best.pth.tar

Flags follow the original CIFAR10/main.py; --resume really resumes (weights, optimizer, schedule, epoch,
best, RNG) and --data/--seed/--workers/--save-dir are additions (see apot/DEVIATIONS.md).
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torchvision.transforms as transforms

from apot.CIFAR10.models import MODELS
from apot.alphas import log_clipping
from common import interrupt, runs
from common.checks import (check_resume_flags, check_results_writable, check_sgd_flags, check_writable_dir,
                           resume_flags)
from common.checkpoint import (extract_state_dict, load_checkpoint, load_model_state, restore_training_state,
                               save_checkpoint, strip_module_prefix, training_state)
from common.data import cifar10, data_root
from common.devdata import DeviceSums
from common.device import get_device, get_rng_state, seed_everything
from common.errors import UserError, run_main
from common.identity import check_checkpoint, expect, identity
from common.meters import AverageMeter, accuracy, progress
from common.results import combine_recipes, recipe_info, record
from common.runlog import epoch_label, epoch_span

BITS = (2, 3, 4, 5, 32)
MILESTONES = [150, 225]            # ×0.1 for every parameter group (the original's adjust_learning_rate)
ALPHA_KEYS = ('act_alpha', 'wgt_alpha')

parser = argparse.ArgumentParser(description='PyTorch Cifar10 Training')
parser.add_argument('--epochs', default=300, type=int, metavar='N', help='number of total epochs to run')
parser.add_argument('-a', '--arch', metavar='ARCH', default='res20', help='|'.join(MODELS) + ' (default: res20)')
parser.add_argument('--start-epoch', default=0, type=int, metavar='N', help='manual epoch number (useful on restarts)')
parser.add_argument('-b', '--batch-size', default=128, type=int, metavar='N',
                    help='mini-batch size (default: 128), only used for train')
parser.add_argument('--lr', '--learning-rate', default=0.1, type=float, metavar='LR', help='initial learning rate')
parser.add_argument('--momentum', default=0.9, type=float, metavar='M', help='momentum')
parser.add_argument('--weight-decay', '--wd', default=1e-4, type=float, metavar='W', help='weight decay (default: 1e-4)')
parser.add_argument('--print-freq', '-p', default=100, type=int, metavar='N', help='print frequency (default: 100)')
parser.add_argument('--resume', default='', type=str, metavar='PATH',
                    help='checkpoint to resume training from (with -e: the checkpoint to evaluate)')
parser.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                    help='evaluate the --resume/--init model on the test set, then show the clipping parameters')
parser.add_argument('-ct', '--cifar-type', default='10', type=int, metavar='CT',
                    help='10 for cifar10 (accepted for compatibility; only CIFAR-10 is supported)')
parser.add_argument('--init', help='initialize from a pre-trained full-precision or higher-bit model', type=str,
                    default='')
parser.add_argument('-id', '--device', default=None, type=str,
                    help='gpu device(s), e.g. 0 or 0,1 (sets CUDA_VISIBLE_DEVICES; default 0 unless it is set)')
parser.add_argument('--bit', default=4, type=int, help='the bit-width of the quantized network (2-5, 32 = float)')
parser.add_argument('--data', default=data_root(), metavar='DIR',
                    help='CIFAR-10 root: cifar-10-batches-py/ or train/<class>/*.png + test/<class>/*.png, or '
                         'those under cifar10/ (default: $QUANTLAB_DATA, else ./data)')
parser.add_argument('--seed', default=None, type=int, help='random seed (default: drawn at random and logged)')
parser.add_argument('-j', '--workers', default=2, type=int, metavar='N', help='data loading workers (default: 2)')
parser.add_argument('--loader', default='device', choices=('device', 'torchvision'),
                    help='device: uint8 CIFAR-10 on the training device, crop/flip/normalise per batch there '
                         '(common/devdata.py, same distribution); torchvision: the original per-image '
                         'DataLoader pipeline (default: device)')
parser.add_argument('--compile', action='store_true', help='train and test through torch.compile(model)')
parser.add_argument('--save-dir', default='', metavar='DIR',
                    help='run directory (default: runs/apot/cifar10-<arch>_<bit>bit-<time>/, linked from '
                         'result/<arch>_<bit>bit when the run finishes)')
parser.add_argument('--name', default='', help='run name under runs/apot/ (default: flags + time stamp)')
parser.add_argument('--overwrite', action='store_true', help='replace the run already in --save-dir/--name')
parser.add_argument('--max-iters', default=None, type=int, metavar='N',
                    help='stop every epoch after N training iterations (smoke runs; recorded as shortened)')
PUBLISHED_EPOCHS = 300             # the original train_res20.sh: 300 epochs per stage


def check_args(args):
    """Every range and output directory, before any data is read (one line, exit 2)."""
    if args.arch not in MODELS:
        raise UserError(f"unknown architecture '{args.arch}'; choose one of {', '.join(MODELS)}")
    if args.bit not in BITS:
        raise UserError(f"--bit {args.bit} is not supported; use 2, 3, 4, 5 or 32 (full precision)")
    check_sgd_flags(args, wd_flag='--weight-decay')
    if args.max_iters is not None and args.max_iters < 1:
        raise UserError(f"--max-iters {args.max_iters}: needs at least 1 iteration per epoch")
    check_results_writable()


def expected(args):
    """What the flags ask a checkpoint to be."""
    return expect('apot', MODELS[args.arch][1], bits=args.bit, scheme='fp32' if args.bit == 32 else 'apot')


def build_model(args):
    """The CIFAR ResNet for --arch/--bit; 32 bits keeps plain convs inside the blocks."""
    if args.arch not in MODELS:
        raise UserError(f"unknown architecture '{args.arch}'; choose one of {', '.join(MODELS)}")
    if args.bit not in BITS:
        raise UserError(f"--bit {args.bit} is not supported; use 2, 3, 4, 5 or 32 (full precision)")
    builder, _ = MODELS[args.arch]
    if args.bit == 32:
        return builder(float=True)
    return builder(float=False, bit=args.bit)


def param_groups(model):
    """One group per parameter, as the original: fixed lr/wd for the clipping parameters α."""
    groups = []
    for name, p in model.named_parameters():
        if 'act_alpha' in name:
            groups.append({'params': [p], 'lr': 1e-1, 'weight_decay': 1e-4})
        elif 'wgt_alpha' in name:
            groups.append({'params': [p], 'lr': 2e-2, 'weight_decay': 1e-4})
        else:
            groups.append({'params': [p]})
    return groups


def load_init(model, path):
    """--init: load a full-precision or higher-bit model; only the α keys may be missing or extra."""
    sd = strip_module_prefix(extract_state_dict(load_checkpoint(path, what='--init model', flag='--init')))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in missing + unexpected if not k.endswith(ALPHA_KEYS)]
    if bad:
        raise UserError(f"--init model {path} does not match --arch/--bit: {len(bad)} non-clipping key(s) differ, "
                        f"e.g. {bad[0]}; pass a checkpoint of the same architecture")
    load_model_state(model, sd, strict=False, what=f'--init model {path}')
    return missing


def device_loaders(args, device):
    """--loader device: the same batches as data_loaders() (crop 4 px padding, flip, normalise) made on `device`."""
    from common.devdata import DeviceLoader
    mean, std = [0.491, 0.482, 0.447], [0.247, 0.243, 0.262]
    testloader = DeviceLoader(cifar10(args.data, train=False), 100, device, mean, std)
    if args.evaluate:
        return None, testloader
    trainloader = DeviceLoader(cifar10(args.data, train=True), args.batch_size, device, mean, std, shuffle=True,
                               crop_pad=4, flip=True)
    return trainloader, testloader


def data_loaders(args, device):
    if getattr(args, 'loader', 'torchvision') == 'device':
        return device_loaders(args, device)
    normalize = transforms.Normalize(mean=[0.491, 0.482, 0.447], std=[0.247, 0.243, 0.262])
    pin = device.type == 'cuda'
    test_dataset = cifar10(args.data, train=False, transform=transforms.Compose([transforms.ToTensor(), normalize]))
    testloader = torch.utils.data.DataLoader(test_dataset, batch_size=100, shuffle=False,
                                             num_workers=args.workers, pin_memory=pin)
    if args.evaluate:
        return None, testloader
    train_dataset = cifar10(args.data, train=True, transform=transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ]))
    trainloader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True,
                                              num_workers=args.workers, pin_memory=pin)
    return trainloader, testloader


def train(trainloader, model, criterion, optimizer, epoch, device, print_freq=100, log=None, skip=0,
          on_interrupt=None, eta=None, max_iters=None, epochs=None):
    """One epoch of SGD; returns (average loss, average top-1, list of per-iteration losses).

    skip: batches of this epoch already done (resume of an interrupted epoch); on_interrupt(i): after batch i,
    when SIGINT/SIGTERM arrived, save a resumable checkpoint and stop (common.interrupt); max_iters: stop the
    epoch after that many batches (smoke runs); epochs: the run's total, for what people read."""
    batch_time, data_time = AverageMeter('Time', ':.3f'), AverageMeter('Data', ':.3f')
    losses, top1 = AverageMeter('Loss', ':.4f'), AverageMeter('Prec', ':.3f')
    history = []
    sums = DeviceSums(device, 'loss', 'prec')
    model.train()
    end = time.time()
    bar = progress(trainloader, desc=epoch_label(epoch, epochs) if epochs else f'epoch {epoch + 1}', total=len(trainloader))
    for i, (input, target) in enumerate(bar):
        if max_iters is not None and i >= max_iters:
            break
        if i < skip:
            continue
        data_time.update(time.time() - end)
        input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)

        output = model(input)
        loss = criterion(output, target)
        prec = accuracy(output, target)[0]
        sums.add(input.size(0), loss=loss, prec=prec)     # on the device: no host sync per step
        history.append(loss.detach())

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        batch_time.update(time.time() - end)
        end = time.time()
        if i % print_freq == 0:
            sums.read({'loss': losses, 'prec': top1})
            bar.set_postfix(loss=f'{losses.avg:.4f}', prec=f'{top1.avg:.2f}')
        if log is not None and i % print_freq == 0:
            log.info(f'Epoch: [{epoch + 1}/{epochs or "?"}][{i}/{len(trainloader)}]\t{batch_time}\t{data_time}\t{losses}\t{top1}')
        if eta is not None:
            eta.batch(i, skip)
        if on_interrupt is not None and interrupt.requested():
            on_interrupt(i)
    sums.read({'loss': losses, 'prec': top1})
    return losses.avg, top1.avg, torch.stack(history).tolist() if history else []


def validate(val_loader, model, criterion, device, print_freq=100, log=print):
    """Top-1 (percent) and loss on the test set."""
    batch_time, losses, top1 = AverageMeter('Time', ':.3f'), AverageMeter('Loss', ':.4f'), AverageMeter('Prec', ':.3f')
    sums = DeviceSums(device, 'loss', 'prec')
    model.eval()
    end = time.time()
    with torch.no_grad():
        for i, (input, target) in enumerate(progress(val_loader, desc='test', total=len(val_loader))):
            input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
            output = model(input)
            loss = criterion(output, target)
            prec = accuracy(output, target)[0]
            sums.add(input.size(0), loss=loss, prec=prec)
            batch_time.update(time.time() - end)
            end = time.time()
            if i % print_freq == 0:
                sums.read({'loss': losses, 'prec': top1})
                log(f'Test: [{i}/{len(val_loader)}]\t{batch_time}\t{losses}\t{top1}')
    sums.read({'loss': losses, 'prec': top1})
    log(f' * Prec {top1.avg:.3f}% ')
    return top1.avg, losses.avg


def record_result(args, prec, n_samples, extra, recipe=None, seed=None, wall_s=None):
    _, model_name = MODELS[args.arch]
    return record('apot', model=model_name, dataset='cifar10', split='test',
                  setting='FP32' if args.bit == 32 else f'W{args.bit}A{args.bit}', metric='top1', value=prec,
                  n_samples=n_samples, extra=extra, recipe=recipe, seed=seed, wall_s=wall_s)


def main(argv=None):
    args = parser.parse_args(argv)
    if args.cifar_type != 10:
        raise UserError(f"-ct {args.cifar_type}: only CIFAR-10 is supported (the original ignores this flag too)")
    if args.device is not None or 'CUDA_VISIBLE_DEVICES' not in os.environ:
        os.environ['CUDA_VISIBLE_DEVICES'] = args.device or '0'     # as the original (-id 0,1)
    if args.evaluate and not (args.resume or args.init):
        raise UserError("-e needs a model to evaluate: pass --resume PATH (or --init PATH)")
    check_args(args)
    fdir = None
    if not args.evaluate:                        # decided and checked before any work; never another run's
        fdir = runs.plan_run_dir('apot', (f'cifar10-{args.arch}_{args.bit}bit',), name=args.name,
                                 save_dir=args.save_dir, resume=args.resume, overwrite=args.overwrite)
    elif args.save_dir:
        check_writable_dir(args.save_dir, '--save-dir')
    # --seed: deterministic mode (a resumed run repeats the uninterrupted one exactly, on CUDA too)
    seed = seed_everything(args.seed if args.seed is not None else int.from_bytes(os.urandom(4), 'little'),
                           deterministic=args.seed is not None)
    model = build_model(args)
    device = get_device()

    init_recipe, ckpt_note = None, None
    if args.init:
        # evaluated as it is (-e without --resume): the file must be the --bit model; an initialisation: any bits
        fields = ('paper', 'model', 'bits', 'scheme') if args.evaluate and not args.resume else ('paper', 'model')
        init_ident, ckpt_note = check_checkpoint(load_checkpoint(args.init, what='--init model', flag='--init'),
                                                 args.init, expected(args), flag='--init', fields=fields,
                                                 suggest=lambda i: f"--bit {i['bits']}" if 'bits' in i else '')
        init_recipe = (init_ident or {}).get('recipe')
        missing = load_init(model, args.init)
        print(f"=> initialised from {args.init}" + (f" ({len(missing)} clipping parameters keep their defaults)"
                                                     if missing else ""))
    model = model.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(param_groups(model), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, MILESTONES, gamma=0.1)
    scheduler.last_epoch = args.start_epoch      # like the original: milestones before --start-epoch never fire
    best_prec, start_epoch, skip = 0.0, args.start_epoch, 0

    eval_recipe = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, what='checkpoint', flag='--resume')
        ident, ckpt_note = check_checkpoint(ckpt, args.resume, expected(args), flag='--resume',
                                            suggest=lambda i: f"--bit {i['bits']}" if 'bits' in i else '')
        eval_recipe = (ident or {}).get('recipe')
        init_recipe = (ident or {}).get('init_recipe', init_recipe)
        if not args.evaluate:
            check_resume_flags(ckpt, args, args.resume)
        if args.evaluate:
            load_model_state(model, extract_state_dict(ckpt), strict=True, what=f'checkpoint {args.resume}')
        else:
            start_epoch, best = restore_training_state(ckpt, model, optimizer, scheduler)
            best_prec = float(best if best is not None else ckpt.get('best_prec', 0.0))
            skip = int(ckpt.get('batch', 0))         # an epoch interrupted after `batch` batches
            if 'scheduler' not in ckpt:              # a checkpoint of the original main.py
                scheduler.last_epoch = start_epoch
            print(f"=> resumed {args.resume} at {epoch_label(start_epoch, args.epochs)}" + (f" batch {skip}" if skip else "")
                  + f" (best {best_prec:.3f})")
    elif args.evaluate and args.init:
        eval_recipe = init_recipe
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = args.seed is None      # autotuning picks kernels run by run
        if torch.cuda.device_count() > 1:
            model = nn.DataParallel(model)
    net = model.module if isinstance(model, nn.DataParallel) else model
    fwd = torch.compile(model) if args.compile else model      # checkpoints keep net's own keys

    trainloader, testloader = data_loaders(args, device)
    n_test = len(testloader.dataset)
    print(f"=> CIFAR-10 test set: {getattr(testloader.dataset, 'size_note', n_test)}")

    if args.evaluate:
        print(f"=> device {device}, seed {seed}")
        t0 = time.time()
        prec, _ = validate(testloader, model, criterion, device, args.print_freq)
        wall = time.time() - t0
        net.show_params()
        ckpt_path = args.resume or args.init
        extra = {'checkpoint': os.path.abspath(ckpt_path), 'mode': 'evaluate'}
        if ckpt_note:
            extra['checkpoint_note'] = ckpt_note
        record_result(args, prec, n_test, extra, recipe=eval_recipe, seed=seed, wall_s=wall)
        return prec

    n_train = len(trainloader.dataset)
    recipe = combine_recipes(recipe_info({'epochs': (args.epochs, PUBLISHED_EPOCHS), 'train images': (n_train, 50000)},
                                         limits={'max_iters': args.max_iters}),
                             *([init_recipe] if args.init or init_recipe else []))
    ident = identity('apot', MODELS[args.arch][1], bits=args.bit, scheme=expected(args)['scheme'], stage='train',
                     recipe=recipe, run_dir=os.path.abspath(fdir), init_recipe=init_recipe)
    run = runs.start_run('apot', fdir, args, seed=seed, device=device, recipe=recipe, overwrite=args.overwrite)
    log = run.log
    log.info(f"=> {args.arch} {args.bit}-bit, {n_train} train / {n_test} test images, "
             f"{epoch_span(start_epoch, args.epochs)} of {args.epochs}, output {fdir}")
    eta = runs.ETA(args.epochs, start_epoch, min(len(trainloader), args.max_iters or len(trainloader)), say=log.info)

    def state_at(epoch, **extra):
        return training_state(net, optimizer, scheduler, epoch=epoch, best=best_prec, best_prec=best_prec,
                              arch=args.arch, bit=args.bit, quantlab=ident, flags=resume_flags(args), **extra)

    def on_interrupt(i):                          # SIGINT/SIGTERM: save at this batch, atomically, then stop
        # the RNG as the epoch began: a resume draws the same order and augmentation and skips the batches done
        state = state_at(epoch, batch=i + 1, interrupted=True, rng=epoch_rng)
        interrupt.save_and_stop(os.path.join(fdir, 'checkpoint.pth.tar'), state, log, f"{epoch_label(epoch, args.epochs)} batch {i + 1}")

    prec = None
    with interrupt.armed():
        for epoch in range(start_epoch, args.epochs):
            epoch_rng = get_rng_state()
            loss, train_prec, _ = train(trainloader, fwd, criterion, optimizer, epoch, device, args.print_freq,
                                        log, skip=skip if epoch == start_epoch else 0, on_interrupt=on_interrupt,
                                        eta=eta, max_iters=args.max_iters, epochs=args.epochs)
            prec, test_loss = validate(testloader, fwd, criterion, device, args.print_freq, log.info)
            scheduler.step()
            log.scalar('val/top1', prec, epoch + 1)
            log.scalar('val/loss', test_loss, epoch + 1)
            log.scalar('train/loss', loss, epoch + 1)
            log.scalar('train/top1', train_prec, epoch + 1)
            log.scalar('train/lr', optimizer.param_groups[0]['lr'], epoch + 1)
            log_clipping(net, log, epoch)
            log.flush()

            # the first epoch of a run always writes model_best (an epoch at 0 % must not leave it missing)
            is_best = prec > best_prec or not os.path.exists(os.path.join(fdir, 'model_best.pth.tar'))
            best_prec = max(prec, best_prec)
            log.info(f'best acc: {best_prec:1f}')
            log.info(f'=> epoch {epoch + 1}/{args.epochs}: test {prec:.3f} best {best_prec:.3f}; '
                     f'{eta.line(epoch + 1)}')
            state = state_at(epoch + 1)
            save_checkpoint(state, os.path.join(fdir, 'checkpoint.pth.tar'))
            if is_best:
                save_checkpoint(state, os.path.join(fdir, 'model_best.pth.tar'))
    if prec is not None:
        # the original reports the best test accuracy over all epochs (model_best.pth.tar)
        best_path = os.path.abspath(os.path.join(fdir, 'model_best.pth.tar'))
        record_result(args, best_prec, n_test, {'mode': 'train', 'selection': 'best epoch on the test set',
                                                'last_epoch_top1': prec, 'epochs': args.epochs,
                                                'checkpoint': best_path}, recipe=recipe, seed=seed)
    if not args.save_dir:                         # the original's result/<arch>_<bit>bit -> the finished run
        runs.link_latest(fdir, os.path.join('result', f'{args.arch}_{args.bit}bit'), say=log.info)
    runs.end_run()
    return best_prec


if __name__ == '__main__':
    run_main(main)
