"""main_cifar10.py's training run: SGD with the original's schedule, the epoch loop around main_cifar10.train and
validate with the LBA re-allocation after each epoch in the window, latest/best checkpoints, --continue's restored
state, SIGINT/SIGTERM (save after the current batch, or after the epoch when it arrives during the test pass)
and, once the run has finished, its records."""
import os

import torch

from common import interrupt, runs
from common.checkpoint import restore_training_state, save_checkpoint, training_state
from common.results import record
from common.runlog import epoch_label, epoch_span
from dambq.checkpoints import BEST, LATEST, RUN_KEYS, SCHEDULE_KEYS, finish_best, identity_of, run_root
from common.device import get_rng_state
from dambq.options import model_name, setting_of

MILESTONES = [150, 225]          # MultiStepLR x0.1, hard-wired as in the original
# tensorboard tag of each per-epoch history entry (the checkpoint's history keeps its keys for --continue);
# the step is the 1-based number of the epoch just finished (common.runlog)
TB_TAGS = {'train_loss': 'train/loss', 'train_prec1': 'train/top1', 'prec1': 'val/top1', 'test_loss': 'val/loss',
           'lr': 'train/lr'}


class TrainingRun:
    """One training run in its directory: main() opens the run (`run`, the common.runs.Run with its directory, seed,
    recipe and log), then TrainingRun(...).run() trains from --start-epoch, or from where --continue's checkpoint
    stopped, to --epochs and returns the last epoch's Prec@1 (None when no epoch was left to train).

    start: build()'s start model (its note goes into the records); data: (train loader, test loader);
    steps: (train, validate) of main_cifar10 (one epoch, one test pass); cont: (path, checkpoint) of --continue, or
    None; said: build()'s lines, logged first."""

    def __init__(self, args, run, model, tuner, start, data, criterion, device, steps, cont=None, said=()):
        self.args, self.model, self.tuner, self.start, self.said = args, model, tuner, start, said
        self.run_dir, self.log, self.seed, self.recipe = run.dir, run.log, run.seed, run.recipe
        self.train_loader, self.val_loader = data
        self.criterion, self.device = criterion, device
        self.train_epoch, self.validate = steps
        self.cont_path, self.ckpt = cont if cont is not None else (None, None)
        self.latest = os.path.join(self.run_dir, LATEST)
        self.size_note = getattr(self.val_loader.dataset, 'size_note', f'{len(self.val_loader.dataset)} test images')
        self.stopped_at = None         # where SIGINT/SIGTERM stopped the run after saving, for the exit message

    def run(self):
        args, log, tuner = self.args, self.log, self.tuner
        log.info('==> construct logger...')
        for line in self.said:
            log.info(line)
        if tuner is not None:
            tuner.logger = log.info
            tuner.epochs = args.epochs                 # its LBA lines name the epoch as `epoch 3/300`
        self.optimizer = torch.optim.SGD(self.model.parameters(), args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay)
        for group in self.optimizer.param_groups:
            group.setdefault('initial_lr', group['lr'])
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=MILESTONES,
                                                              last_epoch=args.start_epoch - 1)
        if args.arch in ('resnet1202', 'resnet110'):
            for group in self.optimizer.param_groups:     # the original's "warm-up" that is never undone
                group['lr'] = args.lr * 0.1
        self.best_prec1, self.best_epoch, self.history = 0.0, -1, []
        start_epoch, skip, sums = self.restore() if self.ckpt is not None else (args.start_epoch, 0, None)
        n_iter = min(args.max_iters or len(self.train_loader), len(self.train_loader))
        log.info(f'==> {args.arch} {setting_of(args)}: {len(self.train_loader.dataset)} train images, {n_iter} '
                 f'it/epoch of {args.batch_size}, test on {self.size_note}, {epoch_span(start_epoch, args.epochs)} '
                 f'of {args.epochs}, output {self.run_dir}')
        self.eta = runs.ETA(args.epochs, start_epoch, n_iter, say=log.info)
        prec1 = None
        self.saved, self.epoch = (start_epoch if self.ckpt is not None else None), start_epoch
        try:
            with interrupt.armed():
                for epoch in range(start_epoch, args.epochs):
                    first = epoch == start_epoch
                    prec1 = self.one_epoch(epoch, skip if first else 0, sums if first else None)
        except KeyboardInterrupt as e:      # common.errors.run_main prints e.message and exits 130/143
            if self.stopped_at:
                e.message = (f"{self.stopped_at}: resumable checkpoint saved to {self.latest}; rerun with the same "
                             f"flags plus --continue")
            else:
                e.message = (f'stopped in {epoch_label(self.epoch, args.epochs)}; '
                             + (f'{self.latest} holds {self.saved} finished epochs: rerun with the same flags plus '
                                f'--continue' if self.saved else 'no epoch was saved yet'))
            raise
        if prec1 is not None:
            self.finish(prec1)
        documented = os.path.join(run_root(args), args.expr_name)
        if os.path.abspath(documented) != os.path.abspath(self.run_dir):
            runs.link_latest(self.run_dir, documented, say=log.info)   # <checkpoint-dir>/<expr-name>/latest.pth.tar
        return prec1

    def restore(self):
        """--continue: weights, optimizer, schedule, best, history and bits from the checkpoint; returns (epoch to
        start, batches of it already trained, their running sums)."""
        ckpt, args = self.ckpt, self.args
        start_epoch, best = restore_training_state(ckpt, self.model, self.optimizer, self.scheduler)
        self.best_prec1, self.best_epoch, self.history = float(best), int(ckpt['best_epoch']), list(ckpt['history'])
        if self.tuner is not None:
            self.tuner.load_state(ckpt['tuner'])
        skip, sums = int(ckpt.get('batch', 0)), None   # a checkpoint inside epoch `start_epoch`, after `skip` batches
        if skip:
            p = ckpt['partial']
            sums = (p['loss_sum'], p['correct_sum'], p['seen'])
        best_at = f'at {epoch_label(self.best_epoch, args.epochs)}' if self.best_epoch >= 0 else 'none yet'
        self.log.info(f'==> continue {self.cont_path} at {epoch_label(start_epoch, args.epochs)}'
                      + (f' batch {skip + 1}' if skip else '') + f' (best Prec@1 {self.best_prec1:.3f} {best_at})')
        return start_epoch, skip, sums

    def one_epoch(self, epoch, skip, sums):
        """Train, re-allocate bits (in the LBA window), test, log and save epoch `epoch`; returns its Prec@1."""
        args, log, tuner, optimizer = self.args, self.log, self.tuner, self.optimizer
        self.epoch = epoch
        self.epoch_rng = get_rng_state()              # a checkpoint inside this epoch replays its data from here
        log.info('current lr {:.5e}'.format(optimizer.param_groups[0]['lr']))
        if tuner is not None:
            tuner.quantize_cur = tuner.in_window(epoch)
        loss, train_prec = self.train_epoch(self.train_loader, self.model, self.criterion, optimizer, epoch,
                                            self.device, args, log, skip=skip, sums=sums,
                                            on_interrupt=self.on_interrupt, eta=self.eta)
        self.scheduler.step()
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
        prec1, test_loss = self.validate(self.val_loader, self.model, self.criterion, self.device, args, log.info)
        if prec1 > self.best_prec1:
            self.best_prec1, self.best_epoch = prec1, epoch
        log.info(' * Prec@1 {:.3f} , Best Prec@1 {:.3f}'.format(prec1, self.best_prec1))
        entry.update(prec1=prec1, test_loss=test_loss, lr=optimizer.param_groups[0]['lr'])
        self.history.append(entry)
        for k, tag in TB_TAGS.items():
            log.scalar(tag, entry[k], epoch + 1)
        log.flush()
        log.info(f'=> {epoch_label(epoch, args.epochs)}: Prec@1 {prec1:.3f} (best {self.best_prec1:.3f}); '
                 f'{self.eta.line(epoch + 1)}')
        stop = interrupt.requested()          # a signal during the test pass: stop after this epoch
        periodic = (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs
        if periodic or self.best_epoch == epoch or stop:
            state = self.state_at(epoch + 1)
            if periodic or stop:
                save_checkpoint(state, self.latest)
                self.saved = epoch + 1
            if self.best_epoch == epoch:
                save_checkpoint(state, os.path.join(self.run_dir, BEST))
        if stop:
            self.stopped_at = f'after {epoch_label(epoch, args.epochs)}'
            interrupt.stop(self.stopped_at)
        return prec1

    def state_at(self, epoch, errors=False, **extra):
        args, tuner = self.args, self.tuner
        return training_state(self.model, self.optimizer, self.scheduler, epoch=epoch, best=self.best_prec1,
                              best_prec1=self.best_prec1, best_epoch=self.best_epoch, history=self.history,
                              paper='dambq', setting=setting_of(args),
                              run={k: getattr(args, k) for k in RUN_KEYS + SCHEDULE_KEYS}, recipe=self.recipe,
                              seed=self.seed, tuner=tuner.state(errors) if tuner is not None else None,
                              quantlab=identity_of(args, self.recipe, epoch, tuner), **extra)

    def on_interrupt(self, i, sums_now):          # SIGINT/SIGTERM: save after this batch, atomically, then stop
        loss_sum, correct_sum, seen = sums_now
        state = self.state_at(self.epoch, batch=i + 1, rng=self.epoch_rng, interrupted=True,
                              partial={'loss_sum': loss_sum.detach().cpu(), 'correct_sum': correct_sum.detach().cpu(),
                                       'seen': seen}, errors=True)
        save_checkpoint(state, self.latest)
        self.log.flush()
        self.stopped_at = f'{epoch_label(self.epoch, self.args.epochs)} batch {i + 1}'
        interrupt.stop(self.stopped_at)

    def finish(self, prec1):
        """The finished run: model_best's identity, the records (last and best epoch, average bits), the bits."""
        args, log, tuner, best_prec1, best_epoch = self.args, self.log, self.tuner, self.best_prec1, self.best_epoch
        n_test = len(self.val_loader.dataset)
        setting = setting_of(args)
        finish_best(self.run_dir, self.recipe)
        extra = {'mode': 'train', 'epochs': args.epochs, 'max_iters': args.max_iters, 'batch_size': args.batch_size,
                 'best_epoch': best_epoch, 'last_epoch': args.epochs - 1, 'test_set': self.size_note,
                 'checkpoint': os.path.abspath(self.latest), 'device': str(self.device)}
        if self.start['note']:
            extra['checkpoint_note'] = self.start['note']
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
                 f'({epoch_label(best_epoch, args.epochs)}) on {self.size_note}')


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
