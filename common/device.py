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
    """Seed python, numpy and torch (CPU and CUDA). Returns the seed."""
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
    return seed


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
