"""Checkpoints: atomic save, `weights_only=True` load, `module.` stripping, clear one-line errors.

A checkpoint is a dict of tensors and primitives (no pickled objects), so every file this
project writes loads with `torch.load(..., weights_only=True)`.
"""
import os
import pickle
import re
import tempfile
import warnings

import torch

from common.device import get_rng_state, set_rng_state
from common.errors import UserError


def save_checkpoint(state, path):
    """Write `state` to `path` atomically: a temp file in the same directory, fsync, then rename.

    A crash mid-write leaves the previous file at `path` untouched.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint gets the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path, map_location="cpu", what="checkpoint", flag=None):
    """Load a checkpoint with `weights_only=True`; every failure becomes one UserError line.

    `what` names the file in messages ("full-precision model"), `flag` the CLI flag that sets it.
    """
    path = os.fspath(path)
    hint = f" (pass the right file with {flag})" if flag else ""
    if not os.path.exists(path):
        raise UserError(f"{what} not found: {path}{hint}")
    if os.path.isdir(path):
        raise UserError(f"{what} path is a directory, expected a file: {path}{hint}")
    try:
        with warnings.catch_warnings():       # torch's note on the pickle protocol of a refused file is noise here
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the file is the user's to fix
        text = str(e)
        first = (text.strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
            # torch's refusal: the pickle names a Python object (code could run) or uses an opcode its safe
            # unpickler does not read; nothing of the file was executed
            g = re.search(r"GLOBAL ([\w.]+)", text)
            op = next((l.strip() for l in text.splitlines() if l.strip().startswith("Unsupported")), "")
            held = (f"holds pickled Python objects (a reference to {g.group(1)})" if g else
                    f"is a pickle that the safe loader does not read ({op or first[:80]})")
            raise UserError(f"{what} {path} {held}, so it was not loaded: only tensors and plain containers are "
                            f"read (weights_only=True) and nothing in it ran; re-save it as a dict of tensors{hint}") \
                from None
        raise UserError(f"{what} {path} is corrupt or truncated ({type(e).__name__}: {first[:120]}); "
                        f"re-download or re-create it{hint}") from None


def strip_module_prefix(state_dict):
    """Drop the `module.` prefix DataParallel/DistributedDataParallel adds to every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def extract_state_dict(ckpt, keys=("state_dict", "model", "net_state_dict")):
    """The model weights inside a checkpoint dict (or the dict itself if it is already a state dict)."""
    if isinstance(ckpt, dict):
        for k in keys:
            if k in ckpt and isinstance(ckpt[k], dict):
                return ckpt[k]
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt
    raise UserError(f"checkpoint holds no model weights (looked for keys {', '.join(keys)})")


def load_model_state(model, state_dict, strict=True, what="checkpoint"):
    """`model.load_state_dict` with `module.` stripped; a mismatch is one line naming the keys.

    Returns (missing, unexpected) when strict=False.
    """
    sd = strip_module_prefix(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in sd if k in own and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]

    def few(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    if shape:
        k = shape[0]
        raise UserError(f"{what} does not match the model: {len(shape)} tensor(s) have the wrong shape, e.g. {k} "
                        f"is {tuple(sd[k].shape)} in the file but {tuple(own[k].shape)} in the model; "
                        f"check the architecture/bit-width flags")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {few(unexpected)}")
        raise UserError(f"{what} does not match the model: {'; '.join(parts)}; check the architecture/bit-width flags")
    model.load_state_dict(sd, strict=False)
    return missing, unexpected


def training_state(model, optimizer=None, scheduler=None, epoch=0, best=None, **extra):
    """Everything a killed run needs to continue: weights, optimizer, scheduler, next epoch, best metric, RNG."""
    m = model.module if hasattr(model, "module") else model
    state = {"epoch": int(epoch), "state_dict": m.state_dict(), "rng": get_rng_state()}
    if best is not None:
        state["best"] = float(best)
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state.update(extra)
    return state


def restore_training_state(ckpt, model, optimizer=None, scheduler=None, restore_rng=True):
    """Inverse of training_state: loads weights (strictly), optimizer, scheduler and RNG.

    Returns (epoch, best) where `epoch` is the epoch to start from.
    """
    m = model.module if hasattr(model, "module") else model
    load_model_state(m, extract_state_dict(ckpt), strict=True, what="resume checkpoint")
    if optimizer is not None and "optimizer" in ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"resume checkpoint's optimizer state does not match this run ({e}); "
                            f"resume with the same flags as the original run") from None
    if scheduler is not None and "scheduler" in ckpt:
        scheduler.load_state_dict(ckpt["scheduler"])
    if restore_rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return int(ckpt.get("epoch", 0)), ckpt.get("best")
