"""Committed reference results: records and logs copied into results/reference/<paper>/, with every path
written relative to the repository root, so a clone on another machine reads them as its own.

    python -m common.reference add apot runs/apot/mnist-resnet10_4bit-seed1/records.jsonl --as mnist-resnet10
    python -m common.reference relativize results/reference/alq/lenet5-seed1.jsonl

Mapping (longest prefix first): <checkout>/ -> '' (so <checkout>/runs/... -> runs/...), $QUANTLAB_RUNS/ ->
runs/, <checkout>/../shared/ -> ../shared/, and any `--map FROM=TO` given. Records are otherwise unchanged:
values, seeds, commits and timestamps are the run's own.
"""
import argparse
import json
import os
import sys

from common.errors import UserError, cli
from common.paths import REPO_ROOT, RUNS_ENV, SHARED_DIR, runs_root
from common.results import read_jsonl


def default_mapping(extra=()):
    """[(absolute prefix, replacement)], longest prefix first."""
    pairs = [(REPO_ROOT + os.sep, ""), (SHARED_DIR + os.sep, "../shared/")]
    if os.environ.get(RUNS_ENV):
        pairs.append((os.path.abspath(runs_root()) + os.sep, "runs/"))
    pairs += list(extra)
    return sorted(pairs, key=lambda p: -len(p[0]))


def relative(value, mapping):
    """`value` (str, list, dict, nested) with every mapped absolute prefix replaced, wherever it occurs
    in a string (a command line holds several paths)."""
    if isinstance(value, str):
        for old, new in mapping:
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [relative(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: relative(v, mapping) for k, v in value.items()}
    return value


def absolute_paths(value):
    """Every absolute path left in a record's strings (for checks): tokens that start with '/'."""
    if isinstance(value, str):
        return [t for t in value.replace("=", " ").split() if t.startswith("/") and len(t) > 1]
    if isinstance(value, list):
        return [p for v in value for p in absolute_paths(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in absolute_paths(v)]
    return []


def _write(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.reference", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="append records to results/reference/<paper>/<name>.jsonl")
    add.add_argument("paper")
    add.add_argument("records", nargs="+", help="records.jsonl files (a run directory's, or results/<paper>.jsonl)")
    add.add_argument("--as", dest="name", required=True, help="file name under results/reference/<paper>/ (no .jsonl)")
    rel = sub.add_parser("relativize", help="rewrite committed reference files in place")
    rel.add_argument("files", nargs="+")
    for p in (add, rel):
        p.add_argument("--map", action="append", default=[], metavar="FROM=TO", help="another prefix to replace")
    args = ap.parse_args(argv)
    extra = []
    for m in args.map:
        if "=" not in m:
            raise UserError(f"--map {m}: expected FROM=TO")
        old, new = m.split("=", 1)
        extra.append((old.rstrip("/") + "/", new.rstrip("/") + "/" if new else ""))
    mapping = default_mapping(extra)
    if args.cmd == "add":
        recs = []
        for f in args.records:
            if not os.path.isfile(f):
                raise UserError(f"{f}: no such records file")
            recs += read_jsonl(f)
        recs = [relative(r, mapping) for r in recs]
        d = os.path.join(REPO_ROOT, "results", "reference", args.paper)
        os.makedirs(d, exist_ok=True)
        out = os.path.join(d, args.name + ".jsonl")
        old = read_jsonl(out)
        keys = {(r.get("run_dir"), r.get("split"), r.get("metric"), r.get("timestamp")) for r in old}
        new = [r for r in recs if (r.get("run_dir"), r.get("split"), r.get("metric"), r.get("timestamp")) not in keys]
        _write(out, old + new)
        print(f"{out}: {len(new)} records added ({len(old) + len(new)} in all)")
    else:
        for f in args.files:
            _write(f, [relative(r, mapping) for r in read_jsonl(f)])
            print(f"{f}: paths made relative")
    left = [(f, p) for f in (args.files if args.cmd == "relativize" else [out]) for r in read_jsonl(f)
            for p in absolute_paths(r)]
    if left:
        print(f"warning: absolute paths remain, e.g. {left[0][1]} in {left[0][0]}; add --map FROM=TO", file=sys.stderr)


if __name__ == "__main__":
    cli(main)()
