"""Checks before work: argument ranges and output directories, one UserError line each, before any data
is read or any model is built.

    check_range("-b/--batch-size", args.batch_size, lo=1)
    check_range("--lr", args.lr, lo=0)
    check_range("--pr", args.pr, lo=0, hi=1)
    check_writable_dir(save_dir, "--save-dir")
    check_writable_file(args.model_ori, "--model_ori")
    check_results_writable()          # QUANTLAB_RESULTS / results/
"""
import argparse
import math
import os
import tempfile

from common.errors import UserError
from common.paths import results_dir, results_env


def str2bool(v):
    """An argparse type for the originals' `type=str2bool` flags: true/false, yes/no, t/f, y/n, on/off, 1/0."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "t", "yes", "y", "on", "1"):
        return True
    if s in ("false", "f", "no", "n", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {v!r}")


def check_range(flag, value, lo=None, hi=None, lo_open=False, hi_open=False):
    """`value` within [lo, hi] (open ends with lo_open/hi_open); None means unbounded. Returns value."""
    if value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag} {value} is not a finite number")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise UserError(f"{flag} {value} is out of range; it must be in {rng}")
    return value


def check_sgd_flags(args, wd_flag="--wd"):
    """The pytorch/examples-style flags (-b, --lr, --momentum, weight decay, -p, -j and, when training,
    --epochs and --start-epoch) of a namespace that has them."""
    check_range("-b/--batch-size", args.batch_size, lo=1)
    check_range("--lr", args.lr, lo=0)
    check_range("--momentum", args.momentum, lo=0, hi=1)
    check_range(wd_flag, args.weight_decay, lo=0)
    check_range("-p/--print-freq", args.print_freq, lo=1)
    check_range("-j/--workers", args.workers, lo=0)
    if not getattr(args, "evaluate", False):
        check_range("--epochs", args.epochs, lo=1)
        check_range("--start-epoch", args.start_epoch, lo=0, hi=args.epochs - 1)


def _existing_ancestor(path):
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_writable_dir(path, flag):
    """`path` is (or can be created as) a writable directory: not a file, not under a file, permissions."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, expected a directory; pass another {flag}")
    base = _existing_ancestor(path)
    if not os.path.isdir(base):
        raise UserError(f"{flag} {path} cannot be created: {base} is a file; pass another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} is not writable (no write permission on {base}); pass another {flag}")
    try:  # permissions do not tell everything (root passes os.access; /proc, read-only mounts): try a file
        fd, probe = tempfile.mkstemp(prefix=".quantlab-write-check-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable ({e.strerror} in {base}); pass another {flag}") from None
    return path


def check_writable_file(path, flag):
    """The file `path` can be written (its directory is writable or creatable; it is not a directory)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory, expected a file path; pass another {flag}")
    d = os.path.dirname(os.path.abspath(path))
    base = _existing_ancestor(d)
    if not os.path.isdir(base):
        raise UserError(f"{flag} {path} cannot be created: {base} is a file; pass another {flag}")
    check_writable_dir(d, flag)
    if os.path.exists(path) and not os.access(path, os.W_OK) and not os.access(d, os.W_OK):
        raise UserError(f"{flag} {path} is not writable; pass another {flag}")
    return path


def check_results_writable():
    """The results directory (QUANTLAB_RESULTS, RESULTS_DIR or results/) accepts records: checked before any work."""
    d = results_dir()
    flag = results_env()[0] or "results directory"
    check_writable_dir(d, flag)
    return d


# The flags that shape the optimisation of the APoT-style scripts: a resumed run restores its optimizer and
# schedule, so a changed value would be silently ignored. --epochs may grow (a run extended).
SGD_RESUME_FLAGS = {"lr": "--lr", "momentum": "--momentum", "weight_decay": "--wd", "batch_size": "-b"}


def resume_flags(args, flags=SGD_RESUME_FLAGS):
    """{dest: value} of `flags` for a checkpoint's 'flags' entry."""
    return {k: getattr(args, k) for k in flags}


def check_resume_flags(ckpt, args, path, flags=SGD_RESUME_FLAGS, flag="--resume", restart="--pretrained/--init"):
    """Refuse to resume a run under other optimisation flags than it was trained with (those its checkpoint
    stores in 'flags'; a checkpoint without them, e.g. the original's, is not checked)."""
    stored = ckpt.get("flags") if isinstance(ckpt, dict) else None
    if not isinstance(stored, dict):
        return
    for k, name in flags.items():
        if k in stored and stored[k] != getattr(args, k):
            raise UserError(f"{flag} {path} was trained with {name} {stored[k]} but this run has {name} "
                            f"{getattr(args, k)}; resume with the run's own flags, or start a new run from its "
                            f"weights ({restart})")
