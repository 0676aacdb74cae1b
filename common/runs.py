"""One run layout: every training run writes into its own directory, never into another run's.

    runs/<paper>/<name>/            ($QUANTLAB_RUNS/<paper>/<name>/ when set)
        manifest.json               command, args, commit, versions, device, seed (+ later invocations)
        log.txt                     the text log
        tb/events.out.tfevents.*    one tensorboard event file per invocation that logged a scalar
        *.pth / *.pth.tar           checkpoints (mode 0644 under the usual umask)
        records.jsonl               a copy of the result records this run appended to results/<paper>.jsonl

`name` is `--name` or the flags' short form plus a time stamp (`cifar10-res20_4bit-20260101-120000`).
A script decides its directory before any work (plan_run_dir), then opens it (start_run), and when the
run finished, points the original's documented path at it (link_latest), e.g. result/res20_4bit ->
runs/apot/cifar10-res20_4bit-.../, so `--init result/res20_4bit/model_best.pth.tar` keeps working.
"""
import os
import time

from common.checks import check_writable_dir
from common.errors import UserError
from common.paths import runs_root
from common.runlog import RunLog

_CURRENT = None


class Run:
    """The run in progress: its directory, seed, recipe (record() picks these up) and RunLog."""

    def __init__(self, paper, dir, seed=None, recipe=None, log=None):
        self.paper, self.dir, self.seed, self.recipe, self.log = paper, dir, seed, recipe, log

    def path(self, *names):
        return os.path.join(self.dir, *names)


def current():
    """The Run started by start_run in this process, or None."""
    return _CURRENT


def run_name(*parts):
    return "-".join([str(p) for p in parts if p] + [time.strftime("%Y%m%d-%H%M%S")])


def holds_run(d):
    """True when `d` already holds (part of) a run: a manifest or a checkpoint."""
    if not os.path.isdir(d):
        return False
    return any(f == "manifest.json" or ".pth" in f for f in os.listdir(d))


def plan_run_dir(paper, name_parts=(), name=None, save_dir=None, resume=None, overwrite=False,
                 flag="--save-dir", root=None, root_flag=None):
    """The directory of this run, decided and checked before any work.

    save_dir (an explicit flag) wins, then an explicit name (runs/<paper>/<name>: a resumed run continued in
    a new directory), then the directory of the --resume checkpoint when it is a run directory of this
    project, else a new runs/<paper>/<name parts + time>. A directory that holds a run is refused unless it
    is the one the --resume checkpoint belongs to or `overwrite` (the explicit --overwrite flag) is given.
    root (named by the flag `root_flag`): the folder of this paper's runs instead of runs/<paper>/ (DAMBQ's
    --checkpoint-dir).
    """
    base_dir = root or os.path.join(runs_root(), paper)
    resume_dir = os.path.dirname(os.path.realpath(resume)) if resume else None   # links: the run's own dir
    if save_dir:
        d = save_dir
    elif resume_dir and not name and os.path.exists(os.path.join(resume_dir, "manifest.json")) \
            and os.access(resume_dir, os.W_OK):
        d = resume_dir
    elif name:
        d = os.path.join(base_dir, name)
        flag = "--name"
    else:
        d = base = os.path.join(base_dir, run_name(*name_parts))
        k = 1
        while os.path.lexists(d):                 # two runs started in the same second
            k += 1
            d = f"{base}-{k}"
        flag = (root_flag or "--root") if root else "QUANTLAB_RUNS"
    check_writable_dir(d, flag)
    if holds_run(d) and not overwrite and not (resume and os.path.realpath(d) == resume_dir):
        if resume:
            raise UserError(f"{d} already holds another run than the one {resume} belongs to; continue into a "
                            f"new {flag if flag != 'QUANTLAB_RUNS' else '--name'} or pass --overwrite to replace it")
        raise UserError(f"{d} already holds a run; pass --resume <its checkpoint> to continue it, --overwrite "
                        f"to replace it, or another {'--name' if flag == 'QUANTLAB_RUNS' else flag}")
    return d


def clear_for_overwrite(d):
    """--overwrite: drop the old run's manifest, tensorboard events and record copy (checkpoints are
    replaced as the new run writes them)."""
    for f in ("manifest.json", "records.jsonl"):
        if os.path.exists(os.path.join(d, f)):
            os.remove(os.path.join(d, f))
    tb = os.path.join(d, "tb")
    if os.path.isdir(tb):
        for f in os.listdir(tb):
            if f.startswith("events.out.tfevents"):
                os.remove(os.path.join(tb, f))


def start_run(paper, run_dir, args=None, seed=None, device=None, recipe=None, eta_s=None, say=print,
              tensorboard=True, overwrite=False):
    """Open the run: RunLog (manifest, log.txt, lazy tensorboard) and the start lines every script prints:
    device, seed, run directory, recipe and the whole-run ETA when known. Returns the Run."""
    global _CURRENT
    if overwrite:
        clear_for_overwrite(run_dir)
    log = RunLog(run_dir, args, seed=seed, device=device, tensorboard=tensorboard,
                 extra={"recipe": recipe} if recipe else None)
    _CURRENT = Run(paper, run_dir, seed, recipe, log)
    log.info(f"=> device {device}, seed {seed}, run directory {run_dir}")
    if recipe:
        log.info(f"=> recipe: {recipe.get('summary')}")
    if eta_s is not None:
        log.info(f"=> estimated whole-run time: {format_seconds(eta_s)}")
    return _CURRENT


def end_run():
    global _CURRENT
    if _CURRENT is not None and _CURRENT.log is not None:
        _CURRENT.log.close()
    _CURRENT = None


def format_seconds(s):
    s = int(max(s, 0))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


class ETA:
    """Whole-run time estimates: `eta.batch(i, skip)` inside the first epoch says once, after 10 batches,
    how long the whole run will take; `eta.line(epochs_done)` is the per-epoch 'ETA 1h02m' text."""

    def __init__(self, total_steps, done=0, batches_per_epoch=None, say=print):
        self.total, self.start_done, self.t0 = max(int(total_steps), 1), int(done), time.time()
        self.bpe, self.say, self._said = batches_per_epoch, say, False

    def batch(self, i, skip=0):
        if self._said or not self.bpe:
            return
        did = i + 1 - skip
        if did < min(10, self.bpe - skip):
            return
        self._said = True
        left = (self.total - self.start_done) * self.bpe - skip
        est = (time.time() - self.t0) / did * left
        self.say(f"=> whole-run estimate: {format_seconds(est)} for {left} training batches "
                 f"(from the first {did}; evaluation not included)")

    def line(self, done):
        elapsed = time.time() - self.t0
        did = done - self.start_done
        if did <= 0:
            return f"{done}/{self.total} epochs"
        left = elapsed / did * (self.total - done)
        return f"{done}/{self.total} epochs, elapsed {format_seconds(elapsed)}, ETA {format_seconds(left)}"


def link_latest(target, link, say=print):
    """Point the original's documented path `link` at `target` (a finished run's file or directory), as a
    relative symlink replaced atomically. A real file/directory at `link` is left alone (and said so).
    Returns True when the link now points at target."""
    target, link = os.path.abspath(target), os.path.abspath(link)
    if os.path.lexists(link) and not os.path.islink(link):
        say(f"=> note: {link} exists and is not a link made by quantlab; left unchanged (the run is in "
            f"{target})")
        return False
    os.makedirs(os.path.dirname(link), exist_ok=True)
    rel = os.path.relpath(target, os.path.dirname(link))
    tmp = f"{link}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(rel, tmp)
    os.replace(tmp, link)
    say(f"=> {link} -> {target}")
    return True
