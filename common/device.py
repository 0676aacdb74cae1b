"""Device choice and seeding. Nothing here (or anywhere) hard-codes a GPU."""
import os
import random

import numpy as np
import torch

from common.errors import UserError


def get_device(gpu=None):
    """`cuda[:gpu]` when CUDA is available, else `cpu`.

    `gpu` is the paper scripts' `--gpu` flag; asking for a GPU that is not there is an error.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if gpu is None:
        return torch.device("cuda")
    gpu = int(gpu)
    if gpu >= torch.cuda.device_count():
        raise UserError(f"--gpu {gpu} requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
                        f"pass --gpu 0..{torch.cuda.device_count() - 1} or omit it")
    return torch.device(f"cuda:{gpu}")


def seed_everything(seed, deterministic=False):
    """Seed python, numpy and torch (CPU and CUDA). Returns the seed.

    deterministic=True is the scripts' mode for a given --seed: a killed run resumed from its checkpoint
    (which restores every RNG, CUDA's included) then repeats the uninterrupted run bit for bit on the same
    machine. On CUDA that needs cuBLAS's fixed workspace (set before the first cuBLAS call: the scripts call
    this at start-up), deterministic cuDNN kernels without autotuning, and torch's deterministic algorithms.
    An op that has no deterministic CUDA kernel warns once (warn_only) instead of stopping a long run; such
    a warning means the run is reproducible only up to float rounding.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    return seed


def ddp_device(local_rank, local_world, n_gpus, force_cpu=False):
    """(backend, device, note) for one process of a torchrun job.

    One GPU per process with nccl when every local process has its own GPU. With more local processes than
    GPUs (or none, or QUANTLAB_DDP_CPU=1) every process runs on the CPU with gloo: all ranks decide alike from
    the same environment, and no rank ever addresses a GPU that does not exist (a device-side assert)."""
    if n_gpus > 0 and local_world <= n_gpus and not force_cpu:
        return "nccl", torch.device(f"cuda:{local_rank}"), None
    if n_gpus > 0 and force_cpu:
        note = "QUANTLAB_DDP_CPU=1: every process runs on the CPU with gloo"
    elif n_gpus > 0:
        note = (f"{local_world} processes per node but only {n_gpus} GPU(s): every process runs on the CPU "
                f"with gloo (use --nproc_per_node={n_gpus} to train on the GPUs)")
    else:
        note = None
    return "gloo", torch.device("cpu"), note


def setup_distributed(gpu=None):
    """(distributed, rank, world_size, device). Distributed when launched by torchrun (WORLD_SIZE > 1), see
    `ddp_device`; otherwise the single device of `get_device(gpu)`. Rank 0 prints the fallback note."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, 0, 1, get_device(gpu)
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend, device, note = ddp_device(local_rank, local_world, n_gpus,
                                       os.environ.get("QUANTLAB_DDP_CPU", "") not in ("", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    if note and dist.get_rank() == 0:
        print(f"note: {note}", flush=True)
    return True, dist.get_rank(), world, device


def get_rng_state():
    """All RNG states (python, numpy, torch CPU, CUDA) as a checkpoint-safe dict (tensors/primitives only)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python_version": py[0],
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": py[2] if py[2] is not None else float("nan"),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Inverse of get_rng_state."""
    gauss = state["python_gauss"]
    gauss = None if gauss != gauss else gauss  # NaN marks "no cached gauss"
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()), gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
