"""Result records: one JSON line per evaluation in `results/<paper>.jsonl` (`RESULTS_DIR` overrides).

    record("apot", model="resnet20", dataset="cifar10", split="test[:1000]", setting="W4A4",
           metric="top1", value=92.1, n_samples=1000)

Keys must match the published table's (model, dataset, setting, metric) for `make compare`
to pair them; see common/published/<paper>.json.
"""
import json
import os
import sys
import time

from common import REPO_ROOT
from common.runlog import command_line, git_commit

FIELDS = ("paper", "script", "model", "dataset", "split", "setting", "metric", "value", "n_samples",
          "extra", "command", "commit", "timestamp")


def results_dir():
    return os.environ.get("RESULTS_DIR") or os.path.join(REPO_ROOT, "results")


def record(paper, model, dataset, split, setting, metric, value, n_samples, extra=None, script=None):
    """Append one evaluation to results/<paper>.jsonl and return the record."""
    rec = {
        "paper": paper,
        "script": script or os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT),
        "model": model, "dataset": dataset, "split": split, "setting": setting,
        "metric": metric, "value": float(value), "n_samples": int(n_samples),
        "extra": extra or {},
        "command": command_line(), "commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    d = results_dir()
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{paper}.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def read_records(paper, directory=None):
    """All records of a paper, oldest first (missing file -> [])."""
    path = os.path.join(directory or results_dir(), f"{paper}.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
