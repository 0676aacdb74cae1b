"""Run logging: a plain text log, a tensorboardX writer and a manifest saved next to every run.

    log = RunLog("result/res20_4bit", args)   # writes manifest.json, opens log.txt and tensorboard
    log.info("epoch 1 top1 91.2")
    log.scalar("val/top1", 91.2, step)

One tensorboard tag scheme for all five papers (RunLog.scalar refuses any other tag):
    [<stage>/]<split>/<metric>   split: train | val | test; metric: loss, top1, top5, lr, or a
                                 paper's own loss term (kd_loss, ...); stage names one of a run's
                                 stages (ALQ: pretrain, alq, posttrain)
    alpha/<layer>/<weight|act>   learned clipping thresholds (APoT)
    bits/<name>                  bit allocation (DAMBQ: bits/w_avg, bits/x_avg)
`val` is the evaluation the paper's protocol reports (APoT MNIST: its training split, as the
original did); `test` is a held-out split shown beside it.

One epoch convention for what people read: epochs count from 1 and a range includes both ends
(`epoch_label`, `epoch_span`), whatever 0-based counter a script keeps for the original's sake.
"""
import json
import os
import platform
import re
import subprocess
import sys
import time

from common.paths import REPO_ROOT


def git_commit():
    """The repo's HEAD commit (with `-dirty` when the tree has changes), or `unknown`."""
    try:
        sha = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name():
    """The CPU model (for tagging benchmark rows), or `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line():
    """The command as the user typed it (script path plus arguments)."""
    return " ".join([os.path.basename(sys.executable)] + sys.argv)


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def manifest(args=None, seed=None, device=None):
    """What is needed to rerun: command, resolved arguments, commit, library versions, device, seed."""
    import torch  # imported here so that `common.results` (and `make compare`) start fast
    try:
        import torchvision
        tv = torchvision.__version__
    except Exception:  # noqa: BLE001 - the manifest must never fail a run
        tv = "unavailable"
    if args is not None and not isinstance(args, dict):
        args = vars(args)
    return {
        "command": command_line(),
        "cwd": os.getcwd(),
        "args": _jsonable(args or {}),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": tv,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"),
        "seed": seed,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_manifest(run_dir, man):
    """manifest.json keeps the run's first invocation; a later one (resume, next stage) is appended to
    its 'invocations' list instead of replacing it. Written atomically."""
    path = os.path.join(run_dir, "manifest.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                first = json.load(f)
        except ValueError:
            first = None
        if isinstance(first, dict):
            first.setdefault("invocations", []).append(man)
            man = first
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(man, f, indent=2)
    os.replace(tmp, path)


TAG = re.compile(r"^(?:[a-z][a-z0-9_]*/)?(?:train|val|test)/[a-z][a-z0-9_]*$"
                 r"|^alpha/[A-Za-z0-9_.]+/(?:weight|act)$|^bits/[a-z][a-z0-9_]*$")


def check_tag(tag):
    """`tag` itself when it follows the scheme above, else ValueError (a programming error, not user input)."""
    if not isinstance(tag, str) or not TAG.match(tag):
        raise ValueError(f"tensorboard tag {tag!r} does not follow [<stage>/]<train|val|test>/<metric>, "
                         "alpha/<layer>/<weight|act> or bits/<name> (common/runlog.py)")
    return tag


def epoch_label(epoch, total):
    """`epoch 3/25` for the 0-based `epoch` 2 of `total`."""
    return f"epoch {epoch + 1}/{total}"


def epoch_span(start, end):
    """The 0-based half-open range [start, end) as people read it: `epochs 3-25` (both ends included)."""
    if end <= start:
        return "no epochs left"
    if end - start == 1:
        return f"epoch {end}"
    return f"epochs {start + 1}-{end}"


class RunLog:
    """Text log + tensorboardX + manifest.json in `run_dir`. `tensorboard=False` skips the writer.

    The tensorboard event file is created at the first scalar (a call that fails before logging leaves
    none), flushed by flush() (call it once per epoch) and closed by close(), which also runs at exit
    (normal exit, sys.exit, or the KeyboardInterrupt common.interrupt raises for SIGINT/SIGTERM).
    """

    def __init__(self, run_dir, args=None, seed=None, device=None, tensorboard=True, quiet=False, extra=None):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        man = manifest(args, seed, device)
        man.update(extra or {})
        write_manifest(run_dir, man)
        self._text = open(os.path.join(run_dir, "log.txt"), "a", buffering=1)
        self.quiet = quiet
        self.writer = None
        self._tensorboard = tensorboard
        self._closed = False
        import atexit
        atexit.register(self.close)

    def info(self, msg):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        if not self._closed:
            self._text.write(line + "\n")
        if not self.quiet:
            print(msg, flush=True)

    def detail(self, msg):
        """A line for log.txt only (per-layer values the console would drown in)."""
        if not self._closed:
            self._text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def scalar(self, tag, value, step):
        check_tag(tag)
        if self._tensorboard and self.writer is None and not self._closed:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(self.run_dir, "tb"))
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self.writer is not None:
            self.writer.close()
        self._text.close()


class QuietLog:
    """RunLog's interface doing nothing: the log of torchrun processes other than rank 0."""

    def info(self, msg):
        pass

    def detail(self, msg):
        pass

    def scalar(self, tag, value, step):
        check_tag(tag)

    def flush(self):
        pass

    def close(self):
        pass
