"""The training loops of ALQ, under the original's names (train_fullprecision, train_coordinate, train_basis,
train_basis_STE, prune, initialize, validate, test, save_model, save_model_ori): one pass over a loader with its
statistics (stoppable at a batch by a signal) in the run's context (RunContext, handed to every stage as `ctx`),
the multi-bit initialization, the bit report and the optimizers.
The stages that use them (PRETRAIN, ALQ, POSTTRAIN) and the whole run are in stages.py; the command line in
options.py, the checkpoints in checkpoints.py, several processes in distributed.py."""
import torch

from alq.binarynet import average_bitwidth, make_binary_layers, split_parameters
from alq.checkpoints import save_model, save_model_ori  # noqa: F401  (the original's train.py names)
from alq.distributed import Dist
from alq.myoptimizer import ALQ_optimizer
from alq.options import check_layer_flags, stage_flags
from common import interrupt
from common.device import get_rng_state, set_rng_state
from common.errors import UserError
from common.identity import identity
from common.meters import progress


TOPK = (1, 5)


# ---------------------------------------------------------------------------------------------------
# Data: the validation split


def split_indices(n, val_size, seed):
    """(val, train) index tensors: the original's random_split(train_full, [val_size, rest]), but seeded."""
    if not 0 < val_size < n:
        raise UserError(f"--val_size {val_size} must be between 1 and {n - 1} (the training set has {n} images)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:val_size], perm[val_size:]


def num_samples(loader):
    return loader.num_samples if hasattr(loader, "num_samples") else len(loader.dataset)


# ---------------------------------------------------------------------------------------------------
# One pass over a loader, in the context of a run (a stage's epochs can stop at a batch and resume)


def _hits(output, target):
    """Top-k hit counts of a batch, on the device (float64: exact integers)."""
    maxk = min(max(TOPK), output.size(1))
    pred = output.topk(maxk, 1, True, True).indices.t()
    hit = pred.eq(target.reshape(1, -1).expand_as(pred))
    return torch.stack([hit[:k].reshape(-1).float().sum() for k in TOPK]).double()


class EpochStats:
    """Running loss and top-k counts of one pass. One process: the mean of the batch losses, as before. Under
    torchrun each process keeps its part of every batch (loss x samples, samples), and the parts are summed over
    the processes at the end, so the figures are those of the whole batches and of the whole evaluation set.
    The sums stay on the device (float64, added in batch order: the same doubles as summing Python floats) and
    are read once, by state() or result(): no host sync per batch."""

    def __init__(self, dist):
        self.dist = dist
        self.loss, self.batches, self.total, self.correct = 0.0, 0, 0, [0.0] * len(TOPK)
        self.loss_n, self.n = [], []
        self.acc = None           # device tensor [correct top-k..., loss sum], started from the values above

    def add(self, loss, outputs, labels):
        if self.acc is None:
            self.acc = torch.tensor(self.correct + [self.loss], dtype=torch.float64, device=outputs.device)
        l = loss.detach().double().reshape(1)
        self.acc[:-1] += _hits(outputs, labels)
        self.total += labels.size(0)
        if self.dist.enabled:
            self.loss_n.append(l * labels.size(0))
            self.n.append(labels.size(0))
        else:
            self.acc[-1:] += l
        self.batches += 1

    def _read(self):
        """Bring the device sums into self.correct / self.loss (one host sync)."""
        if self.acc is not None:
            v = self.acc.tolist()
            self.correct, self.loss = v[:-1], v[-1]

    def _summed(self):
        """([loss x samples; samples] per batch (2, T), [correct top-k..., samples]), summed over the processes."""
        self._read()
        T = self.dist.max(len(self.n))
        per = torch.zeros(2, T, dtype=torch.float64)
        if self.n:
            dev = self.acc.device if self.acc is not None else "cpu"
            per[0, :len(self.n)] = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=dev).reshape(())
                                                for x in self.loss_n]).cpu()
        per[1, :len(self.n)] = torch.tensor(self.n, dtype=torch.float64)
        tot = torch.tensor(self.correct + [float(self.total)], dtype=torch.float64)
        return self.dist.sum(per), self.dist.sum(tot)

    def state(self):
        """The statistics so far, for a resumable checkpoint (under torchrun summed: a collective)."""
        if not self.dist.enabled:
            self._read()
            return {"loss": self.loss, "batches": self.batches, "total": self.total, "correct": list(self.correct)}
        per, tot = self._summed()
        return {"per_batch": per, "batches": self.batches, "total": int(tot[-1]), "correct": tot[:-1].tolist()}

    def load(self, s):
        self.batches, self.acc = int(s["batches"]), None
        if not self.dist.enabled:
            self.loss, self.total, self.correct = float(s["loss"]), int(s["total"]), [float(c) for c in s["correct"]]
        elif self.dist.main:                      # rank 0 carries the sums so far, the other processes zeros
            self.loss_n, self.n = s["per_batch"][0].tolist(), s["per_batch"][1].tolist()
            self.total, self.correct = int(s["total"]), [float(c) for c in s["correct"]]
        else:
            self.loss_n, self.n = [0.0] * s["per_batch"].size(1), [0.0] * s["per_batch"].size(1)

    def result(self):
        """{'loss', 'top1', 'top5', 'n'} (accuracies in percent); under torchrun a collective."""
        if not self.dist.enabled:
            self._read()
            return {"loss": self.loss / max(self.batches, 1), "top1": 100.0 * self.correct[0] / max(self.total, 1),
                    "top5": 100.0 * self.correct[1] / max(self.total, 1), "n": self.total}
        per, tot = self._summed()
        loss, batches = 0.0, 0
        for ln, n in zip(per[0].tolist(), per[1].tolist()):
            if n > 0:
                loss, batches = loss + ln / n, batches + 1
        total = int(tot[-1])
        return {"loss": loss / max(batches, 1), "top1": 100.0 * tot[0].item() / max(total, 1),
                "top5": 100.0 * tot[1].item() / max(total, 1), "n": total}


class RunContext:
    """The context of a pipeline run, handed to every stage as `ctx`: net factory, loaders, loss, device, log, args
    and the processes."""

    def __init__(self, args, build_net, loaders, device, log, post_coord_lr=None, arch=None, dist=None):
        self.args, self.build_net, self.device, self.log, self.arch = args, build_net, device, log, arch
        self.train_loader, self.val_loader, self.test_loader = loaders
        self.loss_func = torch.nn.CrossEntropyLoss().to(device)
        self.post_epochs, self.post_coord_lr = tuple(args.post_epochs), post_coord_lr
        self.dist = dist if dist is not None else Dist()

    def fmt(self, s):
        return f"loss {s['loss']:.4f} top1 {s['top1']:.2f} top5 {s['top5']:.2f}"

    def ident(self, stage, recipe, **extra):
        """The checkpoint identity of a stage output (common.identity); bits are filled in by save_model."""
        return identity("alq", self.arch, bits=32 if stage == "PRETRAIN" else None,
                        scheme="fp32" if stage == "PRETRAIN" else "alq", stage=stage, recipe=recipe,
                        finished=False, flags=stage_flags(self.args, stage), **extra)

    def evaluate(self, net, which):
        loader = self.val_loader if which == "val" else self.test_loader
        s = validate(net, loader, self.loss_func, self.device, desc=which, dist=self.dist)
        self.log.info(f"  {which}: {self.fmt(s)} ({s['n']} images)")
        return s

    def report_epoch(self, net, stage, what, lr, s, seconds, stage_eta, step):
        """After a stage's training epoch: its line (`what` names the epoch), the validation top-1 (returned) and
        the stage's tensorboard scalars at `step`."""
        self.log.info(f"{what} lr {lr:.3g}: train {self.fmt(s)} ({seconds:.0f}s; stage {stage_eta})")
        v = self.evaluate(net, "val")["top1"]
        self.log.scalar(f"{stage}/train/loss", s["loss"], step)
        self.log.scalar(f"{stage}/val/top1", v, step)
        return v

    def interruptible(self, path, save, resume=None):
        return Interruptible(self, path, save, resume)

    def train_kw(self, ctl):
        """run_epoch's keyword arguments for a training epoch of a stage."""
        return {"dist": self.dist, "ctl": ctl}

    def epoch_done(self, net, params_bin, where):
        """After a training epoch, under torchrun: rank 0's BN statistics everywhere, identical state asserted."""
        self.dist.settle(net, params_bin, where)

    def stage_done(self, stage):
        if self.dist.enabled:
            self.log.info(f"  {stage}: the {self.dist.world} processes held the same weights, bases, coordinates and "
                          f"masks after every epoch ({self.dist.checks} checks so far)")


class Interruptible:
    """Stop and resume a stage's training epochs at a batch: a stopped run loses no finished batch. While a signal
    is pending (common.interrupt: SIGINT/SIGTERM inside `interrupt.armed()`), the epoch stops after the current
    batch (under torchrun at the same batch in every process: the flag is all-reduced after each batch) and rank 0
    writes the stage's resume file `path` with `save(**state)`: what the stage writes after an epoch, plus the batch
    index, the RNG states that drew this epoch's sample order (`epoch_rng`) and those of now (`rng`: torch, CUDA,
    python `random` that draws the pruning counts, numpy) and the running statistics. Given such a file (`resume`),
    the stage's first epoch regenerates the same order, passes over the batches done, restores the RNG states and
    statistics and goes on, so the stage ends exactly as if it had not stopped (same machine)."""

    def __init__(self, ctx, path, save, resume=None):
        self.ctx, self.path, self.save, self.where = ctx, path, save, "epoch"
        self.resume = resume if isinstance(resume, dict) and int(resume.get("batch", 0) or 0) > 0 else None

    @property
    def mid_epoch(self):
        """True until the stopped epoch resumes: its learning rates are in the saved optimizers already."""
        return self.resume is not None

    def take(self):
        r, self.resume = self.resume, None
        return r

    def requested(self):
        """A signal is pending. One process: the host flag (no device sync). Under torchrun the flag is
        all-reduced after every batch, so that all processes stop at the same batch (the next one, as one process);
        that is one scalar collective per batch, next to the gradients' all-reduce."""
        if not self.ctx.dist.enabled:
            return interrupt.requested() is not None
        return self.ctx.dist.any(interrupt.requested() is not None)

    def stop(self, batch, of, epoch_rng, stats):
        dist = self.ctx.dist
        state = dict(batch=batch, world=dist.world, stats=stats.state(),
                     **dist.rng_fields(epoch_rng=epoch_rng, rng=get_rng_state()))
        where = f"{self.where} batch {batch}/{of}"
        if dist.main:
            self.save(**state)
            self.ctx.log.info(f"{where}: stopped by a signal, resumable checkpoint saved to {self.path}")
            self.ctx.log.flush()
        dist.barrier()                             # the file is complete before any process exits
        self._raise(f"{where}: resumable checkpoint saved to {self.path}; rerun the same command with --resume "
                    f"to continue from that batch")

    def epoch_end(self):
        """After the epoch's resume file is written: stop there if a signal came during its last batch or its
        evaluation."""
        if self.requested():
            self._raise(f"{self.where} finished and its resume file {self.path} is saved; rerun the same command "
                        f"with --resume to continue after it")

    @staticmethod
    def _raise(msg):
        try:
            interrupt.stop(msg)
        except interrupt.Interrupted as e:
            e.saved = True                        # run_pipeline passes the message on as it is
            raise


def run_epoch(net, loader, loss_func, device, step=None, train=True, desc=None, dist=None, ctl=None):
    """Forward every batch; with `step` (a callable run after backward) the parameters are updated.
    `train` sets the module mode (BN batch statistics); pruning updates in eval mode, as the original.
    `dist`: the processes of a torchrun job (statistics summed over them); `ctl`: the stage's Interruptible
    (stop after a batch with a resumable checkpoint; resume a stopped epoch at its batch).
    Returns {'loss', 'top1', 'top5', 'n'} (accuracies in percent)."""
    dist = dist if dist is not None else Dist()
    net.train(train)
    stats = EpochStats(dist)
    resume = ctl.take() if ctl is not None else None
    skip = int(resume["batch"]) if resume is not None else 0
    if resume is not None:
        set_rng_state(dist.own(resume, "epoch_rng"))   # the RNG state that drew this epoch's sample order
        stats.load(resume["stats"])
    epoch_rng = get_rng_state() if ctl is not None else None
    with torch.set_grad_enabled(step is not None):
        for b, (inputs, labels) in enumerate(progress(loader, desc=desc, total=len(loader), disable=dist.quiet)):
            if b < skip:                          # done before the stop: same batches, same draws, not rerun
                if b == skip - 1:
                    set_rng_state(dist.own(resume, "rng"))
                continue
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if step is not None:
                net.zero_grad(set_to_none=True)
            outputs = net(inputs)
            loss = loss_func(outputs, labels)
            if step is not None:
                loss.backward()
                step()
            stats.add(loss, outputs.detach(), labels)
            if ctl is not None and ctl.requested():
                ctl.stop(b + 1, len(loader), epoch_rng, stats)
    return stats.result()


def validate(net, loader, loss_func, device, desc="val", dist=None):
    return run_epoch(net, loader, loss_func, device, train=False, desc=desc, dist=dist)


test = validate


def train_fullprecision(net, loader, loss_func, optimizer, device, desc="pretrain", **kw):
    return run_epoch(net, loader, loss_func, device, step=optimizer.step, desc=desc, **kw)


def _alq_step(optimizer_w, optimizer_b, parameters_w_bin, mode, pruning_rate=None):
    def step():
        optimizer_b.step()
        optimizer_w.step(parameters_w_bin, mode, pruning_rate)
    return step


def train_coordinate(net, loader, loss_func, optimizer_w, optimizer_b, parameters_w_bin, device, desc="coord",
                     **kw):
    return run_epoch(net, loader, loss_func, device, _alq_step(optimizer_w, optimizer_b, parameters_w_bin,
                                                               "coordinate"), desc=desc, **kw)


def train_basis(net, loader, loss_func, optimizer_w, optimizer_b, parameters_w_bin, device, desc="basis", **kw):
    return run_epoch(net, loader, loss_func, device, _alq_step(optimizer_w, optimizer_b, parameters_w_bin,
                                                               "basis"), desc=desc, **kw)


def train_basis_STE(net, loader, loss_func, optimizer_w, optimizer_b, parameters_w_bin, device, desc="ste", **kw):
    return run_epoch(net, loader, loss_func, device, _alq_step(optimizer_w, optimizer_b, parameters_w_bin,
                                                               "ste"), desc=desc, **kw)


def prune(net, loader, loss_func, optimizer_w, optimizer_b, parameters_w_bin, pruning_rate, device,
          desc="prune", **kw):
    """One pruning epoch: one prune step per batch, in eval mode (BN running statistics), as the original."""
    return run_epoch(net, loader, loss_func, device,
                     _alq_step(optimizer_w, optimizer_b, parameters_w_bin, "coordinate", pruning_rate), train=False,
                     desc=desc, **kw)


# ---------------------------------------------------------------------------------------------------
# Building the multi-bit forms of the quantized parameters


def initialize(net, structure, num_subchannel, max_bit, legacy_sign_flip=True):
    """Structured sketching of every quantized weight; the net's weights become their reconstructions.
    Returns (parameters_w, parameters_b, parameters_w_bin)."""
    names_w, params_w, params_b = split_parameters(net)
    check_layer_flags(names_w, params_w, structure, num_subchannel, max_bit)
    params_bin = make_binary_layers(names_w, params_w, structure, num_subchannel, max_bit,
                                    legacy_sign_flip=legacy_sign_flip)
    with torch.no_grad():
        for p, pb in zip(params_w, params_bin):
            p.copy_(pb.reconstruct_w())
    return params_w, params_b, params_bin


def layer_bits(params_bin):
    """{'conv1': bits, ..., 'fc1': bits, ...}: each quantized layer's average bits, named in network order."""
    out, count = {}, {}
    for p in params_bin:
        kind = "fc" if p.structure == "subchannelwise" else "conv"
        count[kind] = count.get(kind, 0) + 1
        out[f"{kind}{count[kind]}"] = round(float(p.avg_bit), 4)
    return out


def bit_report(params_bin):
    """Lines: per layer #valid coordinates and bitwidth, then the network's average bitwidth."""
    lines = [f"  {p.name:<28s} {p.structure:<15s} groups {p.num_groups:>6d} x {p.group_size:<5d} "
             f"alphas {p.num_bin_filter:>7d}  bits {p.avg_bit:.4f}" for p in params_bin]
    lines.append(f"  average bitwidth: {average_bitwidth(params_bin):.4f} bits/weight")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Optimizers and learning rates


def make_alq_optimizers(params_w, params_b, args):
    optimizer_b = torch.optim.Adam(params_b, weight_decay=args.wd)
    optimizer_w = ALQ_optimizer(params_w, weight_decay=args.wd,
                                legacy_importance_index=not args.fix_importance_index,
                                legacy_tie_order=not args.stable_tie_order)
    return optimizer_w, optimizer_b


def set_lr(optimizers, lr):
    for opt in optimizers:
        opt.param_groups[0]["lr"] = lr


def scale_lr(optimizers, factor):
    for opt in optimizers:
        opt.param_groups[0]["lr"] *= factor


def lr_x02_every_30(optimizer, epoch):
    """The PRETRAIN schedule of the original's LeNet5 and VGG scripts: lr *= 0.2 at epochs 0, 30, 60, 90."""
    if epoch % 30 == 0:
        optimizer.param_groups[0]["lr"] *= 0.2
