"""Training loops and the three stages of the ALQ pipeline (PRETRAIN, ALQ, POSTTRAIN), shared by
lenet5.py, vgg.py and resnet.py, which only define the network, the data and their defaults.

Stage recipe (Qu et al., CVPR 2020, Alg. 1 and Sec. 4; schedule as in the original scripts):
  ALQ        init (structured sketching), then R times: epoch_basis epochs of basis steps (lr *= ld_basis
             before each), epoch_coord epochs of coordinate steps (lr *= ld_coord), epoch_prune epochs of
             pruning; the quantized model is saved after every pruning.
  POSTTRAIN  basis steps by STE with a full-precision shadow (lr = lr*0.95^(e+1)), then 20 epochs of
             coordinate steps (x0.9 per epoch); the best-validation model is kept.
"""
import argparse
import copy
import hashlib
import math
import os
import signal
import time

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler

from binarynet import STRUCTURES, average_bitwidth, make_binary_layers, split_parameters
from common import interrupt, runs
from common.checks import check_range, check_results_writable, check_writable_dir, check_writable_file
from common.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from common.data import data_root
from common.device import get_rng_state, seed_everything, set_rng_state, setup_distributed
from common.errors import UserError
from common.identity import IDENTITY_KEY, identity, sha256_file
from common.meters import progress
from common.runlog import QuietLog, epoch_label
from common.results import combine_recipes, recipe_info, record, results_dir
from myoptimizer import ALQ_optimizer
from pack import KB, export_packed, load_packed, storage_breakdown, storage_KB

TOPK = (1, 5)


# ---------------------------------------------------------------------------------------------------
# Data: an in-memory batch iterator (MNIST/CIFAR as tensors; no per-sample PIL work) and the split


class TensorLoader:
    """Batches of in-memory tensors. `images` (N, ...) uint8/float, `targets` (N,) int64; `transform` maps a
    batch of images to network input (e.g. ToTensor+Normalize, vectorised). Shuffles with the global torch
    RNG (seeded), keeps the last partial batch like DataLoader(drop_last=False). Under torchrun `Dist.shard`
    sets `dist`: this process then reads its share of every batch (`Dist.share`)."""

    def __init__(self, images, targets, batch_size, shuffle=False, transform=None):
        self.images, self.targets = images, torch.as_tensor(targets)
        self.batch_size, self.shuffle, self.transform = batch_size, shuffle, transform
        self.dist = None

    def _per_process(self):
        return self.batch_size if self.dist is None else self.batch_size // self.dist.world

    def __len__(self):
        n = len(self.targets) if self.dist is None else self.dist.share_len(len(self.targets), self.shuffle)
        return math.ceil(n / self._per_process())

    def __iter__(self):
        n = len(self.targets)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        if self.dist is not None:
            order = self.dist.share(order, self.shuffle)
        bs = self._per_process()
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            x = self.images[idx]
            yield (self.transform(x) if self.transform is not None else x), self.targets[idx]

    @property
    def num_samples(self):
        return len(self.targets)


def split_indices(n, val_size, seed):
    """(val, train) index tensors: the original's random_split(train_full, [val_size, rest]), but seeded."""
    if not 0 < val_size < n:
        raise UserError(f"--val_size {val_size} must be between 1 and {n - 1} (the training set has {n} images)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:val_size], perm[val_size:]


def num_samples(loader):
    return loader.num_samples if hasattr(loader, "num_samples") else len(loader.dataset)


# ---------------------------------------------------------------------------------------------------
# Several processes (torchrun --nproc_per_node=N): DistributedDataParallel where the original used DataParallel


class Dist:
    """This process among those of a torchrun job (common.device.setup_distributed: nccl with a GPU per process,
    gloo on the CPU otherwise); `Dist()` is a single-process run, for which every method is a no-op.

    Every process holds the whole ALQ state (bases, coordinates, masks, both optimizers) and updates it from the
    same all-reduced gradients (DistributedDataParallel averages every parameter's gradient, the quantized
    weights' included, before the step) and the same seeded pruning draws, so the state stays identical in every
    process; `check_sync` asserts it after every epoch. Rank 0 alone writes checkpoints, logs and records."""

    def __init__(self, enabled=False, rank=0, world=1, device=None):
        self.enabled, self.rank, self.world = enabled, rank, world
        self.device = device if device is not None else torch.device("cpu")
        self.main = rank == 0
        self.checks = 0

    @classmethod
    def start(cls):
        return cls(*setup_distributed())

    @property
    def quiet(self):
        """Progress bars: only rank 0's."""
        return True if not self.main else None

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # --- collectives (tensors travel on this process's device: nccl takes CUDA tensors only) ----------------
    def sum(self, t):
        """`t` summed over the processes (a new tensor where `t` was)."""
        if not self.enabled:
            return t
        d = t.to(self.device, copy=True)
        torch.distributed.all_reduce(d)
        return d.to(t.device)

    def broadcast(self, t):
        """Rank 0's `t`, in every process."""
        if not self.enabled:
            return t
        d = t.to(self.device, copy=True)
        torch.distributed.broadcast(d, 0)
        return d.to(t.device)

    def max(self, v):
        if not self.enabled:
            return v
        t = torch.tensor([int(v)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag):
        return bool(self.max(bool(flag)))

    def gather(self, obj):
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))

    def from_main(self, fn):
        """fn() run by rank 0 alone (the run directory, the output checks): its result in every process; its
        UserError stops all of them, printed by rank 0 alone (the others exit 2 without a word)."""
        if not self.enabled:
            return fn()
        box = [None, None]
        if self.main:
            try:
                box[0] = fn()
            except UserError as e:
                box[1] = str(e)
        torch.distributed.broadcast_object_list(box, 0)
        if box[1] is not None:
            if self.main:
                raise UserError(box[1])
            raise SystemExit(2)
        return box[0]

    def main_first(self, fn):
        """fn() in rank 0 first (a download, a cache), then in the other processes."""
        if not self.enabled:
            return fn()
        out = []
        self.from_main(lambda: out.append(fn()))
        return out[0] if self.main else fn()

    # --- data ---------------------------------------------------------------------------------------------
    def share_len(self, n, shuffle):
        return -(-n // self.world) if shuffle else len(range(self.rank, n, self.world))

    def share(self, order, shuffle):
        """This process's share of an epoch's sample order. Training (shuffle): rank 0's order, padded with its
        first indices to a multiple of the processes (as DistributedSampler) and dealt out round robin, so that
        batch t of all processes together is batch t of a single process with the same --batch_size.
        Evaluation: every sample exactly once (no padding; the counts are summed)."""
        if not shuffle:
            return order[self.rank::self.world]
        order = self.broadcast(order)             # the same order everywhere, however each process drew its own
        total = self.share_len(len(order), True) * self.world
        if total > len(order):
            order = order.repeat(-(-total // len(order)))[:total]
        return order[self.rank:total:self.world]

    def shard(self, loader):
        """The loader this process reads: its share of every batch; --batch_size and --workers are totals over
        the processes (the original's DataParallel split each batch of --batch_size over the GPUs)."""
        if not self.enabled:
            return loader
        if isinstance(loader, TensorLoader):
            mine = copy.copy(loader)
            mine.dist = self
            return mine
        shuffle = isinstance(loader.sampler, RandomSampler)
        return DataLoader(loader.dataset, batch_size=loader.batch_size // self.world,
                          sampler=ShardSampler(len(loader.dataset), self, shuffle),
                          num_workers=-(-loader.num_workers // self.world), pin_memory=loader.pin_memory,
                          collate_fn=loader.collate_fn, drop_last=loader.drop_last)

    # --- model and state ----------------------------------------------------------------------------------
    def wrap(self, net):
        """The module to train through: DistributedDataParallel (gradients averaged over the processes during
        backward; BN buffers sent from rank 0 before each forward), or `net` itself."""
        if not self.enabled:
            return net
        return torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def settle(self, net, params_bin=(), where="epoch"):
        """After a training epoch: every process takes rank 0's BN running statistics (each updated its own from
        its share of the last batch; DataParallel kept those of the first GPU's replica), then check_sync."""
        if not self.enabled:
            return
        for b in net.buffers():
            torch.distributed.broadcast(b, 0)
        self.check_sync(net, params_bin, where)

    def check_sync(self, net, params_bin=(), where="epoch"):
        """Stop every process when they no longer hold the same weights, bases, coordinates and masks: two
        float64 sums per tensor (one weighted by position), compared with rank 0's."""
        if not self.enabled:
            return
        named = [("net." + k, p) for k, p in net.named_parameters()]
        named += [(f"{pb.name}.{k}", getattr(pb, k)) for pb in params_bin for k in ("mask", "B", "alpha", "w_FP")]
        mine = torch.stack([_checksum(t) for _, t in named])
        ref = self.broadcast(mine)
        differs = ~((ref == mine) | (ref.isnan() & mine.isnan())).all(1)
        if self.any(differs.any()):
            first = named[int(differs.nonzero()[0, 0])][0] if differs.any() else None
            raise RuntimeError(f"after {where} the {self.world} processes no longer hold the same ALQ state ("
                               + (f"rank {self.rank} differs from rank 0 first in {first}" if first else
                                  f"rank {self.rank} agrees with rank 0, another rank does not")
                               + "): the all-reduced gradients or the seeded draws differed between processes")
        self.checks += 1

    def rng_fields(self, **states):
        """Checkpoint fields for the RNG `states` of this process: {key: rank 0's} plus, under torchrun,
        {key_ranks: every process's} (a collective), so that each process resumes its own streams."""
        if not self.enabled:
            return dict(states)
        everyone = self.gather(states)
        out = dict(everyone[0])
        out.update({k + "_ranks": [e[k] for e in everyone] for k in states})
        return out

    def own(self, ck, key):
        """This process's RNG state `key` of a checkpoint written with rng_fields."""
        ranks = ck.get(key + "_ranks")
        if self.enabled and isinstance(ranks, list) and len(ranks) == self.world:
            return ranks[self.rank]
        return ck[key]


def _checksum(t, chunk=1 << 22):
    v = t.detach().reshape(-1)
    s = torch.zeros(2, dtype=torch.float64, device=v.device)
    for i in range(0, v.numel(), chunk):
        c = v[i:i + chunk].double()
        w = torch.arange(i, i + c.numel(), dtype=torch.float64, device=c.device).remainder_(1009).add_(1)
        s += torch.stack([c.sum(), (c * w).sum()])
    return s


class ShardSampler(Sampler):
    """`Dist.share` as a DataLoader sampler. Training: the order a single process's DataLoader(shuffle=True) draws
    (a RandomSampler seeded from the global torch RNG at the same point of the stream), rank 0's everywhere."""

    def __init__(self, n, dist, shuffle):
        self.n, self.dist, self.shuffle = n, dist, shuffle

    def __len__(self):
        return self.dist.share_len(self.n, self.shuffle)

    def __iter__(self):
        order = (torch.tensor(list(RandomSampler(range(self.n))), dtype=torch.int64) if self.shuffle
                 else torch.arange(self.n))
        return iter(self.dist.share(order, self.shuffle).tolist())


# ---------------------------------------------------------------------------------------------------
# One pass over a loader


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


class Interruptible:
    """Stop and resume a stage's training epochs at a batch (issue 9). While a signal is pending
    (common.interrupt: SIGINT/SIGTERM inside `interrupt.armed()`), the epoch stops after the current batch (under
    torchrun at the same batch in every process: the flag is all-reduced after each batch) and rank 0 writes the
    stage's resume file `path` with `save(**state)`: what the stage writes after an epoch, plus the batch index,
    the RNG states that drew this epoch's sample order (`epoch_rng`) and those of now (`rng`: torch, CUDA, python
    `random` that draws the pruning counts, numpy) and the running statistics. Given such a file (`resume`), the
    stage's first epoch regenerates the same order, passes over the batches done, restores the RNG states and
    statistics and goes on, so the stage ends exactly as if it had not stopped (same machine)."""

    def __init__(self, st, path, save, resume=None):
        self.st, self.path, self.save, self.where = st, path, save, "epoch"
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
        all-reduced after every batch, so that all processes stop at the same batch (issue 9: at the next batch);
        that is one scalar collective per batch, next to the gradients' all-reduce."""
        if not self.st.dist.enabled:
            return interrupt.requested() is not None
        return self.st.dist.any(interrupt.requested() is not None)

    def stop(self, batch, of, epoch_rng, stats):
        dist = self.st.dist
        state = dict(batch=batch, world=dist.world, stats=stats.state(),
                     **dist.rng_fields(epoch_rng=epoch_rng, rng=get_rng_state()))
        where = f"{self.where} batch {batch}/{of}"
        if dist.main:
            self.save(**state)
            self.st.log.info(f"{where}: stopped by a signal, resumable checkpoint saved to {self.path}")
            self.st.log.flush()
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
# Which parameters are quantized, and building their multi-bit forms


def check_layer_flags(names_w, params_w, structure, subc, max_bit):
    L = len(params_w)
    for flag, v in (("--structure", structure), ("--subc", subc), ("--max_bit", max_bit)):
        if v is None or len(v) != L:
            raise UserError(f"{flag} needs one value per quantized layer: this network has {L} "
                            f"({', '.join(names_w)}), got {0 if v is None else len(v)}")
    for i, (name, p) in enumerate(zip(names_w, params_w)):
        if not 1 <= max_bit[i] <= 16:
            raise UserError(f"--max_bit {max_bit[i]} for {name} is impossible; use 1..16 bits")
        if p.dim() == 2:
            if structure[i] != "subchannelwise":
                raise UserError(f"{name} is fully connected and needs --structure subchannelwise, got {structure[i]}")
            if subc[i] < 1 or p.shape[1] % subc[i]:
                raise UserError(f"--subc {subc[i]} for {name} must be >= 1 and divide its {p.shape[1]} inputs")
        elif structure[i] not in STRUCTURES[:3]:
            raise UserError(f"{name} is a convolution and needs kernelwise, pixelwise or channelwise, "
                            f"got {structure[i]}")


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
# Checkpoints: tensors and primitives only (load with weights_only=True)


def resume_path(path):
    root, ext = os.path.splitext(path)
    return root + ".resume" + (ext or ".pth")


def save_model_ori(file_name, net, optimizer, **extra):
    state = {"net_state_dict": net.state_dict(), "optimizer_state_dict": optimizer.state_dict()}
    state.update(extra)
    save_checkpoint(state, file_name)


def save_model(file_name, net, optimizer_w, optimizer_b, parameters_w_bin, stage, **extra):
    state = {"net_state_dict": net.state_dict(),
             "optimizer_w_state_dict": optimizer_w.state_dict(),
             "optimizer_b_state_dict": optimizer_b.state_dict(),
             "parameters_w_bin": {p.name: p.state_dict() for p in parameters_w_bin},
             "stage": stage, "avg_bit": average_bitwidth(parameters_w_bin)}
    state.update(extra)
    if isinstance(state.get(IDENTITY_KEY), dict):
        state[IDENTITY_KEY] = dict(state[IDENTITY_KEY], bits=round(state["avg_bit"], 4),
                                   finished=bool(extra.get("finished", False)))
    save_checkpoint(state, file_name)


def load_net_state(net, ckpt, path, flag):
    if not isinstance(ckpt, dict) or "net_state_dict" not in ckpt:
        raise UserError(f"{path} has no 'net_state_dict'; it is not a checkpoint of this script ({flag})")
    load_model_state(net, ckpt["net_state_dict"], strict=True, what=f"checkpoint {path}")


def load_quantized(path, net, legacy_sign_flip=True, what="quantized model", flag="--model"):
    """Rebuild (ckpt, parameters_w, parameters_b, parameters_w_bin) from a file written by save_model."""
    ckpt = load_checkpoint(path, what=what, flag=flag)
    load_net_state(net, ckpt, path, flag)
    names_w, params_w, params_b = split_parameters(net)
    stored = ckpt.get("parameters_w_bin")
    if not isinstance(stored, dict) or sorted(stored) != sorted(names_w):
        raise UserError(f"{path} holds no multi-bit layers for this network (expected {', '.join(names_w)}); "
                        f"pass the file written by --ALQ with {flag}")
    structure = [stored[n]["structure"] for n in names_w]
    subc = [int(stored[n]["num_subchannel"]) for n in names_w]
    max_bit = [int(stored[n]["max_bit"]) for n in names_w]
    params_bin = make_binary_layers(names_w, params_w, structure, subc, max_bit, init=False,
                                    legacy_sign_flip=legacy_sign_flip)
    for n, pb in zip(names_w, params_bin):
        try:
            pb.load_state_dict(stored[n])
        except (KeyError, ValueError) as e:
            raise UserError(f"{path}: multi-bit layer {n} does not match the network ({e})") from None
    return ckpt, params_w, params_b, params_bin


def make_alq_optimizers(params_w, params_b, args):
    optimizer_b = torch.optim.Adam(params_b, weight_decay=args.wd)
    optimizer_w = ALQ_optimizer(params_w, weight_decay=args.wd,
                                legacy_importance_index=not args.fix_importance_index,
                                legacy_tie_order=not args.stable_tie_order)
    return optimizer_w, optimizer_b


def load_optimizers(ckpt, optimizer_w, optimizer_b, path):
    try:
        optimizer_w.load_state_dict(ckpt["optimizer_w_state_dict"])
        optimizer_b.load_state_dict(ckpt["optimizer_b_state_dict"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: optimizer state does not match this network ({e})") from None


def set_lr(optimizers, lr):
    for opt in optimizers:
        opt.param_groups[0]["lr"] = lr


def scale_lr(optimizers, factor):
    for opt in optimizers:
        opt.param_groups[0]["lr"] *= factor


# ---------------------------------------------------------------------------------------------------
# Command line shared by the three scripts (per-script defaults passed in)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' only where the help does not already say its default and X is not None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def alq_argparser(description, defaults, dataset_help):
    """Every flag of the original scripts, with the script's defaults, plus this project's additions."""
    d = defaults
    p = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--data", type=str, default=data_root(),
                   help=dataset_help + " (default: $QUANTLAB_DATA, else ./data)")
    p.add_argument("--val_size", type=int, default=d["val_size"],
                   help="the number of training samples held out for validation")
    p.add_argument("--model_ori", type=str, default=d["model_ori"],
                   help="the file of the original full precision model")
    p.add_argument("--model", type=str, default=d["model"], help="the file of the quantized model (--ALQ output)")
    p.add_argument("--PRETRAIN", action="store_true", help="train the original full precision model")
    p.add_argument("--ALQ", action="store_true", help="adaptive loss-aware quantize the model")
    p.add_argument("--POSTTRAIN", action="store_true", help="posttrain the final quantized model (loads --model)")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate")
    p.add_argument("--R", type=int, default=d["R"], help="the number of outer iterations, also the number of pruning")
    p.add_argument("--epoch_prune", type=int, default=1, help="the number of epochs for pruning")
    p.add_argument("--epoch_basis", type=int, default=d["epoch_basis"],
                   help="the number of epochs for optimizing bases")
    p.add_argument("--ld_basis", type=float, default=0.8, help="learning rate decay factor for optimizing bases")
    p.add_argument("--epoch_coord", type=int, default=d["epoch_coord"],
                   help="the number of epochs for optimizing coordinates")
    p.add_argument("--ld_coord", type=float, default=d["ld_coord"],
                   help="learning rate decay factor for optimizing coordinates")
    p.add_argument("--wd", type=float, default=0.0, help="weight decay (on the coordinates and the FP parameters)")
    p.add_argument("--pr", type=float, default=d["pr"], help="the pruning ratio of alpha")
    p.add_argument("--top_k", type=float, default=d["top_k"],
                   help="the ratio of selected alpha in each layer for resorting")
    p.add_argument("--structure", type=str, nargs="+", choices=list(STRUCTURES), default=d.get("structure"),
                   help="the structure-wise used in each layer")
    p.add_argument("--subc", type=int, nargs="+", default=d.get("subc"),
                   help="number of subchannels when using subchannelwise")
    p.add_argument("--max_bit", type=int, nargs="+", default=d.get("max_bit"),
                   help="the maximum bitwidth used in initialization")
    p.add_argument("--batch_size", type=int, default=d["batch_size"],
                   help="the number of training samples in each batch")
    g = p.add_argument_group("quantlab additions")
    g.add_argument("--model_post", type=str, default=None,
                   help="where POSTTRAIN keeps its best model (default: --model with '_post' before the extension)")
    g.add_argument("--export", type=str, default=None, metavar="PATH",
                   help="write the quantized model bit-packed to PATH (after the stages run, else from the newest "
                        "of --model_post/--model), reload it, check it is bit-identical and evaluate it")
    g.add_argument("--resume", action="store_true",
                   help="continue a killed stage from its last finished epoch (<file>.resume.pth) and skip "
                        "stages already finished")
    g.add_argument("--seed", type=int, default=1, help="seed of the validation split, shuffling and pruning draws")
    g.add_argument("--workers", type=int, default=min(d["workers"], os.cpu_count() or 1),
                   help="data loading worker processes (image folders only)")
    g.add_argument("--fix_sign_flip", action="store_true",
                   help="apply the basis sign flip the original loses in basis/STE steps (DEVIATIONS.md)")
    g.add_argument("--fix_importance_index", action="store_true",
                   help="rank pruning candidates across layers by their true importance (DEVIATIONS.md)")
    g.add_argument("--stable_tie_order", action="store_true",
                   help="rank equal pruning deltas stably (layer order) instead of in the order the original's "
                        "PyTorch 1.3 CPU sort gave them (DEVIATIONS.md)")
    g.add_argument("--val_no_aug", action="store_true",
                   help="validate without the training augmentation (the original validates with it)")
    g.add_argument("--log_dir", type=str, default=None,
                   help="run directory: manifest, log, tensorboard, record copies (default: runs/alq/<model>-<time>/, "
                        "with --resume the newest of those)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing stage outputs (--model_ori/--model/--model_post/--export); without it a "
                        "stage never overwrites a file, and --resume continues or skips it")
    g.add_argument("--pretrain_epochs", type=int, default=d["pretrain_epochs"],
                   help="PRETRAIN epochs (the original's fixed recipe)")
    g.add_argument("--post_epochs", type=int, nargs=2, default=d["post_epochs"], metavar=("STE", "COORD"),
                   help="POSTTRAIN epochs of STE basis steps and of coordinate steps (the original's fixed recipe)")
    g.add_argument("--train_limit", type=int, default=None, metavar="N",
                   help="use only the first N training images after the validation split (smoke tests)")
    # the published recipe (the original's fixed values): a record says which of these a run shortened
    p.set_defaults(recipe_defaults={k: d[k] for k in ("R", "epoch_basis", "epoch_coord", "pretrain_epochs",
                                                      "post_epochs")},
                   documented_paths={"model_ori": d["model_ori"], "model": d["model"]})
    return p


def model_post_path(args):
    if args.model_post:
        return args.model_post
    root, ext = os.path.splitext(args.model)
    return root + "_post" + (ext or ".pth")


def launched_rank():
    """This process's rank under torchrun (its RANK variable), 0 otherwise; known before any process group."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def said_by_rank_zero(fn):
    """fn(), whose UserError every torchrun process meets alike (same flags, files and WORLD_SIZE): rank 0 prints
    it (common.errors.run_main: one line, exit 2) and the other processes exit 2 without a word, so that the
    error is one line, not one per process."""
    try:
        return fn()
    except UserError:
        if launched_rank() > 0:
            raise SystemExit(2) from None
        raise


def check_args(args):
    for flag in ("lr", "ld_basis", "ld_coord", "top_k", "pr"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be non-negative, got {getattr(args, flag)}")
    for flag in ("R", "epoch_prune", "epoch_basis", "epoch_coord"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.pretrain_epochs < 0 or min(args.post_epochs) < 0:
        raise UserError("--pretrain_epochs and --post_epochs must be >= 0")
    if args.train_limit is not None and args.train_limit < 1:
        raise UserError(f"--train_limit must be >= 1, got {args.train_limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    world = int(os.environ.get("WORLD_SIZE") or 1)    # torchrun: --batch_size is the total over the processes
    if args.batch_size % world:
        raise UserError(f"--batch_size {args.batch_size} is the total batch of the {world} processes and must be a "
                        f"multiple of {world}; pass --batch_size {max(world, args.batch_size // world * world)}")
    check_range("--pr", args.pr, lo=0, hi=1)
    check_range("--top_k", args.top_k, lo=0, hi=1)
    check_range("--val_size", args.val_size, lo=1)
    check_range("--lr", args.lr, lo=0)                   # also refuses NaN and inf
    check_range("--workers", args.workers, lo=0)
    check_range("--ld_basis", args.ld_basis, lo=0, hi=1)
    check_range("--ld_coord", args.ld_coord, lo=0, hi=1)


def check_inputs(args, build_net):
    """Before any run directory exists: the layer flags fit the network, and the stage inputs that already
    exist (--model_ori for --ALQ, --model for --POSTTRAIN, when the stage before is not run) are this
    script's files of the right stage. The stages check them again when they load them."""
    if args.ALQ:
        names_w, params_w, _ = split_parameters(build_net())
        check_layer_flags(names_w, params_w, args.structure, args.subc, args.max_bit)
    for on, before, path, flag, what, stage in ((args.ALQ, args.PRETRAIN, args.model_ori, "--model_ori",
                                                 "full-precision model", "PRETRAIN"),
                                                (args.POSTTRAIN, args.ALQ, args.model, "--model", "quantized model",
                                                 "ALQ")):
        if not on or before or not path or not os.path.exists(path):
            continue                              # made by the stage before, or missing: the stage says so
        ck = load_checkpoint(path, what=what, flag=flag)
        if not isinstance(ck, dict) or "net_state_dict" not in ck:
            raise UserError(f"{flag} {path} is not a checkpoint of this script (no 'net_state_dict'); pass the "
                            f"{stage} output")
        ident = ck.get(IDENTITY_KEY) if isinstance(ck.get(IDENTITY_KEY), dict) else {}
        got = str(ident.get("stage") or ck.get("stage") or "")
        if got and not got.startswith(stage):
            raise UserError(f"{flag} {path} is a {got} output; {flag} takes the {stage} output")


def check_outputs(args):
    """Before any work: every file a stage will write is writable, and none is another run's output unless
    --resume (continue or skip that stage) or --overwrite says so; the log and results dirs are writable."""
    outs = (("--model_ori", args.PRETRAIN, args.model_ori), ("--model", args.ALQ, args.model),
            ("--model_post", args.POSTTRAIN, model_post_path(args)), ("--export", bool(args.export), args.export))
    for flag, on, path in outs:
        if not on:
            continue
        check_writable_file(path, flag)
        if os.path.exists(path) and not args.overwrite and not (args.resume and flag != "--export"):
            raise UserError(f"{flag} {path} already exists ({describe_file(path)}); pass --resume to continue or "
                            f"skip that stage, --overwrite to replace it, or another {flag}")
    if args.log_dir:
        check_writable_dir(args.log_dir, "--log_dir")
    check_results_writable()


def describe_file(path):
    try:
        ck = load_checkpoint(path)
    except UserError:
        return "not a readable checkpoint"
    if not isinstance(ck, dict):
        return "not a checkpoint of this script"
    ident = ck.get(IDENTITY_KEY)
    if not isinstance(ident, dict):
        return f"stage {ck.get('stage', 'PRETRAIN' if 'optimizer_state_dict' in ck else '?')}"
    return f"{ident.get('stage')} of {ident.get('model')}, {'finished' if ident.get('finished') else 'unfinished'}, " \
           f"recipe {(ident.get('recipe') or {}).get('summary', 'not recorded')}"


def stage_recipe(args, stage):
    """recipe_info of one stage: its epochs against the published (default) values, and the smoke limits."""
    d = getattr(args, "recipe_defaults", None) or {}
    steps = {"PRETRAIN": ("pretrain_epochs",), "ALQ": ("R", "epoch_basis", "epoch_coord"),
             "POSTTRAIN": ("post_epochs",)}[stage]
    used = {k: (list(getattr(args, k)) if k == "post_epochs" else getattr(args, k)) for k in steps}
    pub = {k: (list(d[k]) if k == "post_epochs" else d[k]) for k in steps if k in d}
    extra = {"epoch_prune": (args.epoch_prune, 1)} if stage == "ALQ" else {}
    return recipe_info({**{k: (used[k], pub.get(k, used[k])) for k in steps}, **extra},
                       limits={"train_limit": args.train_limit})


# Each stage starts from its own seed, derived from (--seed, stage name): a stage gives the same result whether
# the earlier stages ran in the same process, in another invocation, or were resumed after a kill.
STAGES = ("PRETRAIN", "ALQ", "POSTTRAIN")


def stage_seed(seed, stage):
    """A 31-bit seed from sha256('<seed>/<stage>'), e.g. stage_seed(1, 'ALQ')."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}".encode()).digest()[:4], "little") & 0x7FFFFFFF


# The flags that shape a stage's result. A stage output or resume file stores them; --resume refuses to continue
# or skip a stage that was made with other values (it would report the old model under the new flags).
_DATA_FLAGS = ("seed", "val_size", "batch_size", "train_limit", "val_no_aug")
STAGE_FLAGS = {
    "PRETRAIN": _DATA_FLAGS + ("pretrain_epochs",),
    "ALQ": _DATA_FLAGS + ("lr", "R", "epoch_prune", "epoch_basis", "ld_basis", "epoch_coord", "ld_coord", "wd",
                          "pr", "top_k", "structure", "subc", "max_bit", "fix_sign_flip", "fix_importance_index",
                          "stable_tie_order"),
    "POSTTRAIN": _DATA_FLAGS + ("lr", "wd", "post_epochs", "fix_sign_flip"),
}


_SWITCHES = ("val_no_aug", "fix_sign_flip", "fix_importance_index", "stable_tie_order")   # store_true flags


def stage_flags(args, stage):
    """{flag: value} of the flags that shape `stage` (lists for nargs flags, so they survive a checkpoint)."""
    out = {}
    for k in STAGE_FLAGS[stage]:
        v = getattr(args, k, None)
        out[k] = bool(v) if k in _SWITCHES else list(v) if isinstance(v, (list, tuple)) else v
    return out


def check_stage_flags(ck, args, stage, path, log=None):
    """Stop with one line when `path` (a stage output or resume file) was made with other shaping flags."""
    ident = ck.get(IDENTITY_KEY) if isinstance(ck, dict) else None
    stored = ident.get("flags") if isinstance(ident, dict) else None
    if not isinstance(stored, dict):
        if log is not None:
            log.info(f"note: {path} records no flags (written by an older version); its {stage} flags are not checked")
        return
    now = stage_flags(args, stage)
    diff = [k for k in now if k in stored and stored[k] != now[k]]
    if diff:
        was = ", ".join(f"--{k} {_show(stored[k])}" for k in diff)
        asked = ", ".join(f"--{k} {_show(now[k])}" for k in diff)
        raise UserError(f"{path} ({stage}) was made with {was}, but this command asks for {asked}; --resume "
                        f"never reuses it under other flags: pass --overwrite to redo the stage, or another --log_dir")


def _show(v):
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def identity_of(path):
    """The identity stored in a checkpoint file (None for files written before identities)."""
    ck = load_checkpoint(path)
    ident = ck.get(IDENTITY_KEY) if isinstance(ck, dict) else None
    return ident if isinstance(ident, dict) else None


def check_stage_input(ck, key, input_path, flag, what):
    """A stage's resume file / output remembers the sha256 of the input it started from: refuse a changed one."""
    want = ck.get(key) if isinstance(ck, dict) else None
    if not want or not os.path.exists(input_path):
        return
    have = sha256_file(input_path)
    if have != want:
        raise UserError(f"{what} was built from {flag} with sha256 {want[:12]}, but {input_path} now has sha256 "
                        f"{have[:12]} (it was re-created since); rerun that stage without --resume (with "
                        f"--overwrite) or restore the original {flag}")


# ---------------------------------------------------------------------------------------------------
# The stages


class Stage:
    """Shared context of a pipeline run: net factory, loaders, loss, device, log, args and the processes."""

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


def check_resume_world(ck, dist, path):
    """A stage stopped inside an epoch continues under the same number of processes (each process's RNG states
    and its share of the batch are in the file)."""
    was = int(ck.get("world", 1) or 1)
    if int(ck.get("batch", 0) or 0) > 0 and was != dist.world:
        raise UserError(f"{path} stopped inside an epoch of a run with {was} process(es), this one has {dist.world}; "
                        f"resume it with {'python' if was == 1 else f'torchrun --nproc_per_node={was}'} and the same "
                        f"flags, or rerun the stage with --overwrite")


def _at_batch(ck):
    return f" batch {int(ck['batch'])}" if int(ck.get("batch", 0) or 0) > 0 else ""


def pretrain(st, make_optimizer, lr_schedule, epochs):
    """Train the FP model; keep the best-validation one in --model_ori (and a resume file per epoch, or at the
    batch where a signal stopped it)."""
    args, log, dist = st.args, st.log, st.dist
    net = st.build_net().to(st.device)
    optimizer = make_optimizer(net)
    rpath, start = resume_path(args.model_ori), 0
    best_acc, ck = None, None
    if args.resume and os.path.exists(rpath):
        ck = load_checkpoint(rpath, what="pretrain resume file")
        check_stage_flags(ck, args, "PRETRAIN", rpath, log)
        check_resume_world(ck, dist, rpath)
        load_net_state(net, ck, rpath, "--model_ori")
        optimizer.load_state_dict(ck["optimizer_state_dict"])
        start, best_acc = int(ck["epoch"]), float(ck["best_acc"])
        set_rng_state(dist.own(ck, "rng"))
        at = f"at {epoch_label(start, epochs)}" if start < epochs else f"after its last epoch ({epochs})"
        log.info(f"resuming PRETRAIN {at}{_at_batch(ck)} (best val {best_acc:.2f})")
    ident = st.ident("PRETRAIN", stage_recipe(args, "PRETRAIN"))
    if best_acc is None:
        best_acc = st.evaluate(net, "val")["top1"]
        if dist.main:
            save_model_ori(args.model_ori, net, optimizer, epoch=0, val_top1=best_acc, quantlab=ident)
    fwd = dist.wrap(net)
    ctl = st.interruptible(rpath, lambda **kw: save_model_ori(rpath, net, optimizer, epoch=epoch, best_acc=best_acc,
                                                              quantlab=ident, **kw), ck)
    eta = runs.ETA(epochs, start)
    with interrupt.armed():
        for epoch in range(start, epochs):
            if not ctl.mid_epoch:
                lr_schedule(optimizer, epoch)
            ctl.where = f"PRETRAIN {epoch_label(epoch, epochs)}"
            t0 = time.time()
            s = train_fullprecision(fwd, st.train_loader, st.loss_func, optimizer, st.device,
                                    desc=f"pretrain {epoch + 1}/{epochs}", **st.train_kw(ctl))
            st.epoch_done(net, (), ctl.where)
            log.info(f"pretrain {epoch_label(epoch, epochs)} lr {optimizer.param_groups[0]['lr']:.3g}: "
                     f"train {st.fmt(s)} ({time.time() - t0:.0f}s; stage {eta.line(epoch + 1)})")
            v = st.evaluate(net, "val")["top1"]
            log.scalar("pretrain/train/loss", s["loss"], epoch + 1)
            log.scalar("pretrain/val/top1", v, epoch + 1)
            log.flush()
            if v > best_acc:
                best_acc = v
                if dist.main:
                    save_model_ori(args.model_ori, net, optimizer, epoch=epoch + 1, val_top1=v, quantlab=ident)
            rng = dist.rng_fields(rng=get_rng_state())
            if dist.main:
                save_model_ori(rpath, net, optimizer, epoch=epoch + 1, best_acc=best_acc, quantlab=ident, **rng)
            ctl.epoch_end()
    if dist.main:
        mark_finished(args.model_ori)
        if os.path.exists(rpath):
            os.remove(rpath)
    st.stage_done("PRETRAIN")
    return best_acc


def mark_finished(path):
    """Tag a stage's output as complete, so that --resume skips the stage."""
    ck = load_checkpoint(path)
    ck["finished"] = True
    if isinstance(ck.get(IDENTITY_KEY), dict):
        ck[IDENTITY_KEY]["finished"] = True
    save_checkpoint(ck, path)


def is_finished(path):
    if not os.path.exists(path):
        return False
    try:
        return bool(load_checkpoint(path).get("finished", False))
    except UserError:
        return False


def alq_schedule(args):
    """The ALQ stage as a flat list of (r, phase, epoch-in-phase); resume continues at an index."""
    sched = []
    for r in range(args.R):
        sched += [(r, "basis", e) for e in range(args.epoch_basis)]
        sched += [(r, "coord", e) for e in range(args.epoch_coord)]
        sched += [(r, "prune", e) for e in range(args.epoch_prune)]
    return sched


def resume_stage(rpath, net, args, legacy_flip, stage, num_steps, log, dist=None):
    """Continue a killed ALQ / POSTTRAIN stage from its resume file (weights, both optimizers, RNG; written after
    an epoch or at the batch where a signal stopped it)."""
    dist = dist if dist is not None else Dist()
    ck, params_w, params_b, params_bin = load_quantized(rpath, net, legacy_flip, what=f"{stage} resume file")
    check_resume_world(ck, dist, rpath)
    optimizer_w, optimizer_b = make_alq_optimizers(params_w, params_b, args)
    load_optimizers(ck, optimizer_w, optimizer_b, rpath)
    start, best_acc = int(ck["next"]), float(ck["best_acc"])
    set_rng_state(dist.own(ck, "rng"))
    at = f"at step {start + 1}/{num_steps}" if start < num_steps else f"after its last step ({num_steps})"
    log.info(f"resuming {stage} {at}{_at_batch(ck)}")
    return params_w, params_b, params_bin, optimizer_w, optimizer_b, start, best_acc


def alq(st):
    """Init by structured sketching, then R rounds of basis / coordinate / pruning epochs; saves --model."""
    args, log, device, dist = st.args, st.log, st.device, st.dist
    legacy_flip = not args.fix_sign_flip
    net = st.build_net().to(device)
    rpath = resume_path(args.model)
    sched = alq_schedule(args)
    num_batches = math.ceil(num_samples(st.train_loader) / args.batch_size)
    # M_p: fraction of the candidates pruned per step so that ~pr of the alphas go per pruning (Sec. 3.3)
    M_p = (args.pr / args.top_k) / (args.epoch_prune * num_batches) if args.top_k > 0 else 0.0
    rck = None
    if args.resume and os.path.exists(rpath):
        rck = load_checkpoint(rpath, what="ALQ resume file")
        check_stage_flags(rck, args, "ALQ", rpath, log)
        check_stage_input(rck, "model_ori_sha256", args.model_ori, "--model_ori", f"the ALQ resume file {rpath}")
        ori_sha, ident = rck.get("model_ori_sha256"), rck.get(IDENTITY_KEY) or st.ident("ALQ", None)
        params_w, params_b, params_bin, optimizer_w, optimizer_b, start, best_acc = \
            resume_stage(rpath, net, args, legacy_flip, "ALQ", len(sched), log, dist)
    else:
        ck = load_checkpoint(args.model_ori, what="full-precision model", flag="--model_ori")
        ori = ck.get(IDENTITY_KEY) if isinstance(ck.get(IDENTITY_KEY), dict) else None
        if ori is not None and not ori.get("finished"):
            raise UserError(f"--model_ori {args.model_ori} is an unfinished PRETRAIN (epoch {ck.get('epoch', '?')}); "
                            f"finish it with --PRETRAIN --resume, or pass a finished full-precision model")
        if ori is not None and (ori.get("recipe") or {}).get("full") is False:
            log.info(f"note: --model_ori comes from a shortened PRETRAIN ({ori['recipe']['summary']}); the result "
                     f"is recorded as shortened")
        elif ori is None:
            log.info("note: --model_ori records no recipe (an older or third-party file); the result says so")
        ori_sha = sha256_file(args.model_ori)
        ident = st.ident("ALQ", combine_recipes((ori or {}).get("recipe"), stage_recipe(args, "ALQ")),
                         model_ori_sha256=ori_sha)
        load_net_state(net, ck, args.model_ori, "--model_ori")
        log.info("initialization (structured sketching)...")
        t0 = time.time()
        params_w, params_b, params_bin = initialize(net, args.structure, args.subc, args.max_bit, legacy_flip)
        log.info(f"  done in {time.time() - t0:.1f}s\n{bit_report(params_bin)}")
        optimizer_w, optimizer_b = make_alq_optimizers(params_w, params_b, args)
        best_acc = st.evaluate(net, "val")["top1"]
        st.evaluate(net, "test")
        if dist.main:
            save_model(args.model, net, optimizer_w, optimizer_b, params_bin, stage="ALQ-init", quantlab=ident,
                       model_ori_sha256=ori_sha)
        start = 0
    opts = (optimizer_w, optimizer_b)
    fwd = dist.wrap(net)
    ctl = st.interruptible(rpath, lambda **kw: save_model(rpath, net, optimizer_w, optimizer_b, params_bin,
                                                          stage="ALQ-resume", next=i, best_acc=best_acc,
                                                          quantlab=ident, model_ori_sha256=ori_sha, **kw), rck)
    eta = runs.ETA(len(sched), start)
    with interrupt.armed():
        for i in range(start, len(sched)):
            r, phase, e = sched[i]
            if not ctl.mid_epoch:                 # (a resumed epoch's learning rates are in its optimizers)
                if i == 0 or sched[i - 1][0] != r:  # every outer iteration restarts at --lr
                    set_lr(opts, args.lr)
                if phase != "prune":
                    scale_lr(opts, args.ld_basis if phase == "basis" else args.ld_coord)
            n_phase = {"basis": args.epoch_basis, "coord": args.epoch_coord, "prune": args.epoch_prune}[phase]
            ctl.where = f"ALQ step {i + 1}/{len(sched)} (r {r + 1}/{args.R} {phase} {epoch_label(e, n_phase)})"
            t0 = time.time()
            kw = dict(desc=f"r{r + 1} {phase} {e + 1}/{n_phase}", **st.train_kw(ctl))
            if phase == "basis":
                s = train_basis(fwd, st.train_loader, st.loss_func, optimizer_w, optimizer_b, params_bin, device, **kw)
            elif phase == "coord":
                s = train_coordinate(fwd, st.train_loader, st.loss_func, optimizer_w, optimizer_b, params_bin, device,
                                     **kw)
            else:
                s = prune(fwd, st.train_loader, st.loss_func, optimizer_w, optimizer_b, params_bin, [args.top_k, M_p],
                          device, **kw)
            st.epoch_done(net, params_bin, ctl.where)
            log.info(f"ALQ r {r + 1}/{args.R} {phase} {epoch_label(e, n_phase)} "
                     f"lr {optimizer_w.param_groups[0]['lr']:.3g}: train {st.fmt(s)} "
                     f"({time.time() - t0:.0f}s; stage {eta.line(i + 1)})")
            v = st.evaluate(net, "val")["top1"]
            step = i + 1
            log.scalar("alq/train/loss", s["loss"], step)
            log.scalar("alq/val/top1", v, step)
            log.scalar("bits/avg", average_bitwidth(params_bin), step)
            log.flush()
            if phase == "prune":
                best_acc = v  # the original resets best_acc after every pruning
                log.info(bit_report(params_bin))
                st.evaluate(net, "test")
                if dist.main:
                    save_model(args.model, net, optimizer_w, optimizer_b, params_bin, stage="ALQ", round=r,
                               quantlab=ident, model_ori_sha256=ori_sha)
            elif v > best_acc:
                best_acc = v
            rng = dist.rng_fields(rng=get_rng_state())
            if dist.main:
                save_model(rpath, net, optimizer_w, optimizer_b, params_bin, stage="ALQ-resume", next=step,
                           best_acc=best_acc, quantlab=ident, model_ori_sha256=ori_sha, **rng)
            ctl.epoch_end()
    if dist.main:
        save_model(args.model, net, optimizer_w, optimizer_b, params_bin, stage="ALQ", finished=True, quantlab=ident,
                   model_ori_sha256=ori_sha)
        if os.path.exists(rpath):
            os.remove(rpath)
    st.stage_done("ALQ")
    return net, params_bin


def posttrain(st):
    """STE basis steps with a full-precision shadow, then coordinate steps; keeps the best-validation model in
    --model_post. Loads the quantized model (--model) written by --ALQ, so it can run on its own."""
    args, log, device, dist = st.args, st.log, st.device, st.dist
    legacy_flip = not args.fix_sign_flip
    net = st.build_net().to(device)
    out = model_post_path(args)
    rpath = resume_path(out)
    ste_epochs, coord_epochs = st.post_epochs
    sched = [("ste", e) for e in range(ste_epochs)] + [("coord", e) for e in range(coord_epochs)]
    rck = None
    if args.resume and os.path.exists(rpath):
        rck = load_checkpoint(rpath, what="POSTTRAIN resume file")
        check_stage_flags(rck, args, "POSTTRAIN", rpath, log)
        check_stage_input(rck, "model_sha256", args.model, "--model", f"the POSTTRAIN resume file {rpath}")
        model_sha, ident = rck.get("model_sha256"), rck.get(IDENTITY_KEY) or st.ident("POSTTRAIN", None)
        params_w, params_b, params_bin, optimizer_w, optimizer_b, start, best_acc = \
            resume_stage(rpath, net, args, legacy_flip, "POSTTRAIN", len(sched), log, dist)
    else:
        log.info(f"load quantized model {args.model} ...")
        ck, params_w, params_b, params_bin = load_quantized(args.model, net, legacy_flip)
        src = ck.get(IDENTITY_KEY) if isinstance(ck.get(IDENTITY_KEY), dict) else None
        src_recipe = (src or {}).get("recipe")
        if src is not None and not src.get("finished"):
            src_recipe = dict(src_recipe or {}, full=False,
                              summary=f"{(src_recipe or {}).get('summary', '?')}; ALQ stage not finished")
        model_sha = sha256_file(args.model)
        ident = st.ident("POSTTRAIN", combine_recipes(src_recipe, stage_recipe(args, "POSTTRAIN")),
                         model_sha256=model_sha)
        if str(ck.get("stage", "")).startswith("ALQ-init"):
            log.info("  note: this is the model right after initialization (the ALQ stage did not finish)")
        optimizer_w, optimizer_b = make_alq_optimizers(params_w, params_b, args)
        load_optimizers(ck, optimizer_w, optimizer_b, args.model)
        with torch.no_grad():  # the net holds the reconstruction; STE's shadow starts from it (w_FP)
            for p, pb in zip(params_w, params_bin):
                p.copy_(pb.reconstruct_w())
        log.info(bit_report(params_bin))
        best_acc = st.evaluate(net, "val")["top1"]
        st.evaluate(net, "test")
        set_lr((optimizer_w, optimizer_b), args.lr)
        if dist.main:
            save_model(out, net, optimizer_w, optimizer_b, params_bin, stage="POSTTRAIN", epoch=0,
                       val_top1=best_acc, quantlab=ident, model_sha256=model_sha)
        start = 0
    opts = (optimizer_w, optimizer_b)
    fwd = dist.wrap(net)
    ctl = st.interruptible(rpath, lambda **kw: save_model(rpath, net, optimizer_w, optimizer_b, params_bin,
                                                          stage="POSTTRAIN-resume", next=i, best_acc=best_acc,
                                                          quantlab=ident, model_sha256=model_sha, **kw), rck)
    eta = runs.ETA(len(sched), start)
    with interrupt.armed():
        for i in range(start, len(sched)):
            phase, e = sched[i]
            if not ctl.mid_epoch:                 # (a resumed epoch's learning rates are in its optimizers)
                if phase == "coord" and e == 0 and st.post_coord_lr is not None:
                    set_lr(opts, st.post_coord_lr)
                scale_lr(opts, 0.95 if phase == "ste" else 0.9)
            n_phase = ste_epochs if phase == "ste" else coord_epochs
            ctl.where = f"POSTTRAIN step {i + 1}/{len(sched)} ({phase} {epoch_label(e, n_phase)})"
            t0 = time.time()
            kw = dict(desc=f"ste {e + 1}/{n_phase}" if phase == "ste" else f"post coord {e + 1}/{n_phase}",
                      **st.train_kw(ctl))
            train = train_basis_STE if phase == "ste" else train_coordinate
            s = train(fwd, st.train_loader, st.loss_func, optimizer_w, optimizer_b, params_bin, device, **kw)
            st.epoch_done(net, params_bin, ctl.where)
            log.info(f"POSTTRAIN {phase} {epoch_label(e, n_phase)} lr {optimizer_w.param_groups[0]['lr']:.3g}: "
                     f"train {st.fmt(s)} ({time.time() - t0:.0f}s; stage {eta.line(i + 1)})")
            v = st.evaluate(net, "val")["top1"]
            log.scalar("posttrain/train/loss", s["loss"], i + 1)
            log.scalar("posttrain/val/top1", v, i + 1)
            log.flush()
            if v > best_acc:
                best_acc = v
                if dist.main:
                    save_model(out, net, optimizer_w, optimizer_b, params_bin, stage="POSTTRAIN", epoch=i + 1,
                               val_top1=v, quantlab=ident, model_sha256=model_sha)
            rng = dist.rng_fields(rng=get_rng_state())
            if dist.main:
                save_model(rpath, net, optimizer_w, optimizer_b, params_bin, stage="POSTTRAIN-resume", next=i + 1,
                           best_acc=best_acc, quantlab=ident, model_sha256=model_sha, **rng)
            ctl.epoch_end()
    if dist.main:
        mark_finished(out)
        if os.path.exists(rpath):
            os.remove(rpath)
    st.stage_done("POSTTRAIN")
    return net, params_bin


# ---------------------------------------------------------------------------------------------------
# The whole run: stages, then evaluation of the final quantized model, result records and export


def _final_model(args, ran):
    post = model_post_path(args)
    if "POSTTRAIN" in ran:
        return post
    if "ALQ" in ran:
        return args.model
    cands = [p for p in (post, args.model) if os.path.exists(p)]
    if not cands:
        raise UserError(f"no quantized model to export: neither {post} nor {args.model} exists; run --ALQ first")
    return max(cands, key=os.path.getmtime)


def place_outputs(args, run_dir):
    """Stage outputs at the documented default paths (./lenet5_model_ori.pth ...) are written into the run
    directory instead, and the documented path becomes a link to the finished file, so a new run never
    replaces another's model and `--ALQ` / `--POSTTRAIN` / `--export` run alone still read the latest one.
    Explicit paths are used as given. With --resume a stage finished in an earlier run (its documented link)
    is kept as is. Returns {stage: documented path to link}."""
    doc = getattr(args, "documented_paths", None) or {}
    default_model = args.model == doc.get("model")
    post_doc = model_post_path(args) if args.model_post is None and default_model else None
    links = {}
    for stage, attr, on, documented in (("PRETRAIN", "model_ori", args.PRETRAIN,
                                         doc.get("model_ori") if args.model_ori == doc.get("model_ori") else None),
                                        ("ALQ", "model", args.ALQ, doc.get("model") if default_model else None),
                                        ("POSTTRAIN", "model_post", args.POSTTRAIN, post_doc)):
        if not on or documented is None:
            continue
        mine = os.path.join(run_dir, os.path.basename(documented))
        if args.resume and not os.path.exists(mine) and not os.path.exists(resume_path(mine)) \
                and is_finished(documented):
            setattr(args, attr, documented)       # finished in an earlier run: skipped below
            continue
        setattr(args, attr, mine)
        links[stage] = documented
    return links


def alq_run_dir(arch, resume):
    """runs/alq/<arch>-<time>/ for a new run; with --resume the newest runs/alq/<arch>-*/ (the killed run's)."""
    root = os.path.join(runs.runs_root(), "alq")
    if resume and os.path.isdir(root):
        mine = sorted(d for d in os.listdir(root) if d.startswith(arch + "-") and os.path.isdir(os.path.join(root, d)))
        if mine:
            return os.path.join(root, mine[-1])
    return runs.plan_run_dir("alq", (arch,))


def published(arch, dataset):
    """The paper's row for this model ({metric: value}) from common/published/alq.json, or {}."""
    try:
        from common.compare import load_published
        rows = load_published("alq")["rows"]
    except Exception:  # noqa: BLE001 - the table is informative only
        return {}
    return {r["metric"]: r["value"] for r in rows if r["model"] == arch and r["dataset"] == dataset
            and r["setting"] == "ALQ"}


def run_pipeline(args, arch, dataset, build_net, make_loaders, pretrain_recipe, post_coord_lr=None,
                 split_name="test"):
    """PRETRAIN / ALQ / POSTTRAIN as asked, then evaluate and record the final quantized model; --export packs it.

    pretrain_recipe(st) runs the script's own full-precision training; make_loaders(args) -> (train, val, test).
    """
    def check():                                  # the same flags and files in every process of torchrun
        check_args(args)
        if not (args.PRETRAIN or args.ALQ or args.POSTTRAIN or args.export):
            raise UserError("nothing to do: pass --PRETRAIN, --ALQ, --POSTTRAIN and/or --export PATH")
        check_inputs(args, build_net)
    said_by_rank_zero(check)                      # before init_process_group: no process group, no work yet
    dist = Dist.start()                           # one process, or torchrun's (DistributedDataParallel)

    def plan():                                   # rank 0 decides and checks the outputs; every process follows
        run_dir = args.log_dir or alq_run_dir(arch, args.resume)
        check_writable_dir(run_dir, "--log_dir" if args.log_dir else "QUANTLAB_RUNS")
        links = place_outputs(args, run_dir)
        check_outputs(args)
        return run_dir, links, {k: getattr(args, k) for k in ("model_ori", "model", "model_post")}
    run_dir, links, paths = dist.from_main(plan)
    for k, v in paths.items():
        setattr(args, k, v)
    seed_everything(args.seed, deterministic=True)      # resumed stages repeat uninterrupted ones (CUDA too)
    device = dist.device
    # the data are read before the run directory is opened: missing or corrupt data leave no run behind
    loaders = tuple(dist.shard(loader) for loader in dist.main_first(lambda: make_loaders(args)))
    log = runs.start_run("alq", run_dir, args, seed=args.seed, device=device).log if dist.main else QuietLog()
    if dist.enabled:
        log.info(f"=> {dist.world} processes (DistributedDataParallel, {'nccl' if device.type == 'cuda' else 'gloo'}"
                 f" on {device.type}): --batch_size {args.batch_size} in all, {args.batch_size // dist.world} per "
                 f"process; --workers {args.workers} in all")
    interrupt.install()                           # SIGTERM stops like Ctrl-C: logs closed, resume file kept
    st = Stage(args, build_net, loaders, device, log, post_coord_lr, arch=arch, dist=dist)
    inputs = {"ALQ": ("model_ori_sha256", args.model_ori, "--model_ori"),
              "POSTTRAIN": ("model_sha256", args.model, "--model")}
    ran, times = [], {}
    for name, flag, fn, out in (("PRETRAIN", args.PRETRAIN, pretrain_recipe, args.model_ori),
                                ("ALQ", args.ALQ, alq, args.model),
                                ("POSTTRAIN", args.POSTTRAIN, posttrain, model_post_path(args))):
        if flag and name in links:
            log.info(f"== {name} output: {out} (linked from {links[name]} when the stage finishes)")
        if flag and args.resume and is_finished(out):
            check_stage_flags(load_checkpoint(out), args, name, out, log)
            if name in inputs:                    # a finished stage built on an input re-created since is stale
                check_stage_input(load_checkpoint(out), *inputs[name][:2], inputs[name][2],
                                  f"the finished {name} output {out}")
            log.info(f"== {name}: already finished ({out}), skipped (--resume) ==")
            ran.append(name)
        elif flag:
            log.info(f"== {name} (seed {stage_seed(args.seed, name)} from --seed {args.seed}) ==")
            seed_everything(stage_seed(args.seed, name), deterministic=True)
            t0 = time.time()
            try:
                fn(st)
            except KeyboardInterrupt as e:        # SIGINT/SIGTERM (common.interrupt): say what --resume continues
                if getattr(e, "saved", False):    # the stage saved where it stopped and says so
                    raise
                rp = resume_path(out)
                msg = (f"{name} stopped; --resume continues it from its last finished epoch ({rp})"
                       if os.path.exists(rp) else f"{name} stopped in its first epoch; --resume restarts that stage")
                raise interrupt.Interrupted(msg, getattr(e, "signum", signal.SIGINT)) from None
            dist.barrier()                        # rank 0's stage output is written before any process reads it
            times[name] = time.time() - t0
            ran.append(name)
            log.info(f"== {name} done in {times[name] / 60:.1f} min ==")
            if name in links and dist.main:       # the original's documented path -> this run's file
                runs.link_latest(out, links[name], say=log.info)
    if ran == ["PRETRAIN"] and not args.export:
        runs.end_run()
        dist.close()
        return
    src = _final_model(args, ran)
    net = build_net().to(device)
    ck, _, _, params_bin = load_quantized(src, net, not args.fix_sign_flip)
    posttrained = str(ck.get("stage", "")).startswith("POSTTRAIN")
    setting = "ALQ" if posttrained else "ALQ-before-POSTTRAIN"
    switches = [f"--{k}" for k in _SWITCHES[1:] if getattr(args, k, False)]
    if switches:                                  # not the published behaviour: never pooled with the ALQ row
        setting += " " + " ".join(switches)
    ident = ck.get(IDENTITY_KEY) if isinstance(ck.get(IDENTITY_KEY), dict) else None
    recipe = (ident or {}).get("recipe")
    if not ck.get("finished"):                    # a half-finished stage output is never the final result
        recipe = dict(recipe or {}, full=False,
                      summary=f"{(recipe or {}).get('summary', 'recipe not recorded')}; {ck.get('stage')} not finished")
        log.info(f"note: {src} is not a finished stage output (stage {ck.get('stage')}); recorded as shortened")
    bits, skb = average_bitwidth(params_bin), storage_KB(params_bin)
    log.info(f"final quantized model {src} ({ck.get('stage')}):\n{bit_report(params_bin)}")
    extra = {"source": os.path.abspath(src), "stage": ck.get("stage"), "seed": args.seed, "KB": f"{KB} bytes",
             **storage_breakdown(params_bin), "layer_bits": layer_bits(params_bin),
             "stage_minutes": {k: round(v / 60, 2) for k, v in times.items()}}
    if dist.enabled:
        extra["world_size"] = dist.world
    packed_kb = None
    if args.export and dist.main:                 # rank 0 writes and checks the file; all evaluate the model
        size = export_packed(args.export, arch, net, params_bin)
        net2 = build_net().to(device)
        load_packed(args.export, net2, arch=arch)
        net.eval()
        net2.eval()
        x, _ = next(iter(st.test_loader))
        with torch.no_grad():
            same = torch.equal(net(x.to(device)), net2(x.to(device)))
        if not same:
            raise RuntimeError(f"packed model {args.export} does not reproduce the network's outputs bit for bit")
        packed_kb = size / KB
        log.info(f"exported {args.export}: {size} bytes = {packed_kb:.2f} KB on disk (inferred weight storage "
                 f"{skb:.2f} KB); reloaded outputs are bit-identical")
        net = net2  # the numbers below are measured on the model rebuilt from the packed file
        extra["packed_file"] = os.path.abspath(args.export)
    s = st.evaluate(net, "test")
    if not dist.main:
        dist.close()
        return
    log.info(f"RESULT {arch} {dataset} {setting}: top1 {s['top1']:.2f}%  avg bits {bits:.4f}  "
             f"storage {skb:.2f} KB" + (f"  packed file {packed_kb:.2f} KB" if packed_kb is not None else ""))
    pub = published(arch, dataset)
    if pub:
        log.info("PAPER  " + "  ".join(f"{k} {v:g}" for k, v in pub.items()) + "  (README, storage in KB)")
    n = s["n"]
    record("alq", arch, dataset, split_name, setting, "top1", s["top1"], n, extra=extra, recipe=recipe)
    record("alq", arch, dataset, "n/a", setting, "avg_bits", bits, n, extra=extra, recipe=recipe)
    record("alq", arch, dataset, "n/a", setting, "storage_KB", skb, n, extra=extra, recipe=recipe)
    if packed_kb is not None:
        record("alq", arch, dataset, "n/a", setting, "packed_KB", packed_kb, n, extra=extra, recipe=recipe)
    # record() says where on the console only; log.txt says it too
    log.detail(f"records appended to {os.path.join(results_dir(), 'alq.jsonl')} and "
               f"{os.path.join(run_dir, 'records.jsonl')}")
    runs.end_run()
    dist.close()
