"""Several processes (torchrun --nproc_per_node=N): DistributedDataParallel where the original used DataParallel.
`Dist` is this process among them (a no-op for a single process), `ShardSampler` and `TensorLoader.dist` give each
process its share of every batch, `_checksum` lets `Dist.check_sync` assert that all hold the same ALQ state.
`TensorLoader` (MNIST/CIFAR as in-memory tensors) lives here because `Dist.shard` hands it its share."""
import copy
import math

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler

from common.distributed import Dist as CommonDist


# ---------------------------------------------------------------------------------------------------
# Data: an in-memory batch iterator (MNIST/CIFAR as tensors; no per-sample PIL work)


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


# ---------------------------------------------------------------------------------------------------
# Several processes (torchrun --nproc_per_node=N): DistributedDataParallel where the original used DataParallel


class Dist(CommonDist):
    """This process among those of a torchrun job (common.distributed.Dist: the process group and its
    collectives); `Dist()` is a single-process run, for which every method is a no-op.

    Every process holds the whole ALQ state (bases, coordinates, masks, both optimizers) and updates it from the
    same all-reduced gradients (DistributedDataParallel averages every parameter's gradient, the quantized
    weights' included, before the step) and the same seeded pruning draws, so the state stays identical in every
    process; `check_sync` asserts it after every epoch. Rank 0 alone writes checkpoints, logs and records."""

    def __init__(self, enabled=False, rank=0, world=1, device=None):
        super().__init__(enabled, rank, world, device)
        self.checks = 0

    @property
    def quiet(self):
        """Progress bars: only rank 0's."""
        return True if not self.main else None

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
        self.broadcast_(net.buffers())
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
