"""torchrun / DDP plumbing for FDDA: gradient averaging and buffer broadcast on top of common.distributed.Dist
(process group, metric reduction, barrier).

The generator runs two forwards per step (the BNS batch and the FDDA class batch) before one backward,
which DistributedDataParallel's reducer does not allow, so gradients are averaged explicitly instead.
"""
import os

import torch
import torch.distributed as dist

from common.distributed import Dist as CommonDist
from common.errors import UserError


class Dist(CommonDist):
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
        self.broadcast_(list(module.buffers()) + (list(module.parameters()) if params else []))


def setup(gpu=None):
    """A Dist for this process (common.device.setup_distributed). Under torchrun (WORLD_SIZE > 1): nccl with one
    GPU per local rank when CUDA is available, gloo on CPU otherwise or with QUANTLAB_DDP_CPU=1. More local
    processes than visible GPUs is one error line (fdda/DEVIATIONS.md, "torchrun / DDP"), raised before
    common's fallback, which would move every process to the CPU with a note."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cpu_asked = os.environ.get("QUANTLAB_DDP_CPU", "") not in ("", "0")      # gloo on the CPU, GPUs or not
    if world > 1 and torch.cuda.is_available() and local_world > torch.cuda.device_count() and not cpu_asked:
        n = torch.cuda.device_count()
        raise UserError(f"torchrun started {local_world} processes on this machine but only {n} GPU(s) are "
                        f"visible: use --nproc_per_node={n}, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to "
                        f"run on CPU with gloo")
    return Dist.start(gpu)
