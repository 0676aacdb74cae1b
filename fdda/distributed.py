"""torchrun / DDP plumbing for FDDA: process group, gradient averaging, buffer broadcast, metric reduction.

The generator runs two forwards per step (the BNS batch and the FDDA class batch) before one backward,
which DistributedDataParallel's reducer does not allow, so gradients are averaged explicitly instead.
"""
import os

import torch
import torch.distributed as dist

from common.device import get_device
from common.errors import UserError


class Dist:
    def __init__(self, enabled=False, rank=0, world=1, device=None):
        self.enabled, self.rank, self.world, self.device = enabled, rank, world, device
        self.main = rank == 0

    def average_gradients(self, params):
        """All-reduce the .grad of `params` (one flat buffer) and divide by the world size."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_module(self, module, params=True):
        """Make every rank hold rank 0's buffers (and parameters)."""
        if not self.enabled:
            return
        tensors = list(module.buffers()) + (list(module.parameters()) if params else [])
        for t in tensors:
            dist.broadcast(t.data, 0)

    def sum(self, values):
        """Sum a list of numbers over ranks."""
        if not self.enabled:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup(gpu=None):
    """A Dist for this process. Under torchrun (WORLD_SIZE > 1): nccl with one GPU per local rank when CUDA is
    available, gloo on CPU otherwise; more local processes than visible GPUs is one error line."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=get_device(gpu))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local_world > n:
            raise UserError(f"torchrun started {local_world} processes on this machine but only {n} GPU(s) are "
                            f"visible: use --nproc_per_node={n}, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to "
                            f"run on CPU with gloo")
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend)
    return Dist(True, dist.get_rank(), world, device)
