"""This process among those of a torchrun job: `Dist`, the collectives every paper's scripts share.

`Dist.start()` joins the job (common.device.setup_distributed: nccl with a GPU per process, gloo on the CPU
otherwise); `Dist()` is a single-process run, for which every collective returns its input and the rest are
no-ops. Tensors travel on this process's device (nccl takes CUDA tensors only). A paper subclasses it for what
its training scheme adds (ALQ: sharded loaders and the state check; FDDA: explicit gradient averaging)."""
import torch

from common.device import setup_distributed
from common.errors import UserError


class Dist:
    """`enabled`: a process group exists; `rank` of `world` processes on `device`; rank 0 is `main`, the one
    that writes checkpoints, logs and records."""

    def __init__(self, enabled=False, rank=0, world=1, device=None):
        self.enabled, self.rank, self.world = enabled, rank, world
        self.device = device if device is not None else torch.device("cpu")
        self.main = rank == 0

    @classmethod
    def start(cls, gpu=None):
        """This process's Dist: the torchrun job's when WORLD_SIZE > 1, else the single device of `gpu`."""
        return cls(*setup_distributed(gpu))

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))

    # --- reductions -----------------------------------------------------------------------------------------
    def sum(self, t):
        """`t` summed over the processes (a new tensor where `t` was)."""
        if not self.enabled:
            return t
        d = t.to(self.device, copy=True)
        torch.distributed.all_reduce(d)
        return d.to(t.device)

    def sum_values(self, values):
        """The numbers `values` (a list), each summed over the processes in float64; `values` itself, as a
        list, for a single process."""
        if not self.enabled:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max(self, v):
        """The largest of the integers `v` of the processes."""
        if not self.enabled:
            return v
        t = torch.tensor([int(v)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag):
        """True in every process when `flag` is true in one."""
        return bool(self.max(bool(flag)))

    # --- rank 0's data everywhere ----------------------------------------------------------------------------
    def broadcast(self, t):
        """Rank 0's `t`, in every process (a new tensor where `t` was)."""
        if not self.enabled:
            return t
        d = t.to(self.device, copy=True)
        torch.distributed.broadcast(d, 0)
        return d.to(t.device)

    def broadcast_(self, tensors):
        """Overwrite each of `tensors` (buffers, parameters: on this process's device) with rank 0's, in place."""
        if not self.enabled:
            return
        for t in tensors:
            torch.distributed.broadcast(t.data, 0)

    def gather(self, obj):
        """[every process's picklable `obj`], by rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

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
