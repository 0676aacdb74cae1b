"""Result records: one JSON line per evaluation in `results/<paper>.jsonl` (`QUANTLAB_RESULTS` moves it; the
older name `RESULTS_DIR` is still accepted).

    record("apot", model="resnet20", dataset="cifar10", split="test[:1000]", setting="W4A4",
           metric="top1", value=92.1, n_samples=1000)

Keys must match the published table's (model, dataset, setting, metric) for `make compare`
to pair them; see common/published/<paper>.json.
"""
import json
import os
import platform
import sys
import time

from common import runs
from common.paths import REPO_ROOT, RESULTS_ENV, results_dir, results_env  # noqa: F401  (re-exported)
from common.runlog import command_line, cpu_name, git_commit

FIELDS = ("paper", "script", "model", "dataset", "split", "setting", "metric", "value", "n_samples",
          "extra", "command", "commit", "timestamp", "recipe", "seed", "run_dir", "host")


def recipe_info(steps=None, limits=None, note=None):
    """How much of the published recipe a run used, for records and checkpoint identities.

    steps: {name: (used, published)}, e.g. {"epochs": (args.epochs, 300)}; limits: {name: value} of
    smoke-test limits (None/False = not used), e.g. {"train_limit": 128}. The recipe is full when every
    step equals the published one and no limit is set.
        recipe_info({"epochs": (2, 300)})  ->  {"full": False, "summary": "shortened: epochs 2 of 300", ...}
    """
    steps = {k: v for k, v in (steps or {}).items()}
    limits = {k: v for k, v in (limits or {}).items() if v is not None and v is not False}
    diffs = [f"{k} {used} of {pub}" for k, (used, pub) in steps.items() if used != pub]
    lims = [f"{k} {v}" for k, v in limits.items()]
    full = not diffs and not lims
    if full:
        summary = "full" + (f" ({', '.join(f'{k} {u}' for k, (u, _) in steps.items())})" if steps else "")
    else:
        summary = "shortened: " + "; ".join(diffs + lims)
    if note:
        summary += f"; {note}"
    return {"full": full, "summary": summary, "steps": {k: u for k, (u, _) in steps.items()},
            "published_steps": {k: p for k, (_, p) in steps.items()}, "limits": limits}


def combine_recipes(*recipes):
    """The recipe of a result that went through several stages (e.g. a 5-epoch PRETRAIN, then ALQ):
    full only when every known stage is; None entries (unknown) make it unknown (full None)."""
    known = [r for r in recipes if r]
    if not known:
        return None
    if len(recipes) == 1:
        return recipes[0]
    full = all(r.get("full") is True for r in known) if len(known) == len(recipes) else (
        False if any(r.get("full") is False for r in known) else None)
    summary = " + ".join(r.get("summary", "?") for r in known)
    if full is None:
        summary += " + unknown"
    return {"full": full, "summary": summary, "stages": known}


def host_info():
    return f"{platform.node()} ({cpu_name()})"


def record(paper, model, dataset, split, setting, metric, value, n_samples, extra=None, script=None,
           recipe=None, seed=None, run_dir=None, wall_s=None):
    """Append one evaluation to results/<paper>.jsonl (and to <run_dir>/records.jsonl) and return it.

    recipe: recipe_info(...) of the run (or of the evaluated checkpoint); seed and run_dir default to the
    current run's (common.runs.start_run); records without a recipe show as 'recipe not recorded'.
    """
    cur = runs.current()
    if cur is not None:
        run_dir = run_dir or cur.dir
        seed = cur.seed if seed is None else seed
        recipe = recipe if recipe is not None else cur.recipe
    rec = {
        "paper": paper,
        "script": script or os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT),
        "model": model, "dataset": dataset, "split": split, "setting": setting,
        "metric": metric, "value": float(value), "n_samples": int(n_samples),
        "extra": extra or {},
        "command": command_line(), "commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "recipe": recipe, "seed": seed,
        "run_dir": os.path.abspath(run_dir) if run_dir else None,
        "host": host_info(),
    }
    if wall_s is not None:
        rec["wall_s"] = round(float(wall_s), 1)
    line = json.dumps(rec) + "\n"
    d = results_dir()
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{paper}.jsonl"), "a") as f:
        f.write(line)
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "records.jsonl"), "a") as f:
            f.write(line)
    where = os.path.join(d, f"{paper}.jsonl")
    shown = os.path.relpath(where) if not os.path.relpath(where).startswith("../..") else where
    print(f"=> recorded {model} {setting} {metric} {float(value):g} ({split}, {int(n_samples):,} samples) in {shown}",
          flush=True)
    return rec


def read_records(paper, directory=None, warn=None):
    """All records of a paper, oldest first (missing file -> []).

    A line that is not a JSON object is skipped with `warning: <file>:<line>: ...` on stderr (or passed to
    `warn(msg)`), so one corrupt line never hides the others.
    """
    return read_jsonl(os.path.join(directory or results_dir(), f"{paper}.jsonl"), warn)


def read_jsonl(path, warn=None):
    if not os.path.exists(path):
        return []
    out = []
    with open(path, errors="replace") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and isinstance(rec.get("value"), (int, float))
            except ValueError:
                ok = False
            if not ok:
                msg = f"warning: {path}:{i}: not a valid record (JSON object with a numeric 'value'), skipped"
                (warn or (lambda m: print(m, file=sys.stderr)))(msg)
                continue
            out.append(rec)
    return out
