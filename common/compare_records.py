"""The data `common.compare` reads: the published tables (`common/published/<paper>.json`) and the records
measured here (committed reference records and local ones), with what each record says about how it was
measured (recipe, split, sample count and the standard error of a subset).

This module and common.compare_match hold no tables and no plotting: the report modules (compare_text,
compare_chart, compare) import them, never the reverse, so a training script may read a published table
(load_published) without loading the report.
"""
import json
import math
import os
import re

from common import REPO_ROOT
from common.errors import UserError
from common.paths import reference_dir
from common.results import read_jsonl, read_records

PAPERS = ("apot", "alq", "dambq", "alignq", "fdda")
PUBLISHED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published")
ROW_FIELDS = ("model", "dataset", "setting", "metric", "value", "split", "source")
KEY_FIELDS = ("model", "dataset", "setting", "metric")

# Size of each full official evaluation split: a record with fewer samples is a subset.
FULL_SPLIT_SIZE = {
    ("cifar10", "test"): 10000, ("cifar10", "train"): 50000,
    ("mnist", "test"): 10000, ("mnist", "train"): 60000,
    ("fashion_mnist", "test"): 10000, ("fashion_mnist", "train"): 60000,
    ("imagenet", "val"): 50000, ("svhn", "test"): 26032,
}

# ----------------------------------------------------------------------------- published tables and records

def check_paper(paper):
    if paper not in PAPERS:
        raise UserError(f"unknown paper '{paper}'; choose from: {', '.join(PAPERS)}")


def load_published(paper):
    """The published table of `paper`: {'paper', 'title', 'venue', 'notes', 'rows'}."""
    check_paper(paper)
    path = os.path.join(PUBLISHED_DIR, f"{paper}.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; restore it from git")
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix the file")
    if isinstance(data, list):  # a bare list of rows is accepted too
        data = {"paper": paper, "rows": data}
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise UserError(f"{path} has no 'rows' list; see common/published/alq.json for the format")
    for i, row in enumerate(rows):
        missing = [k for k in ROW_FIELDS if k not in row]
        if missing or not isinstance(row["value"], (int, float)):
            raise UserError(f"{path} row {i} lacks {missing or 'a numeric value'}; every row needs "
                            f"{', '.join(ROW_FIELDS)}")
    return {"paper": paper, "title": data.get("title", paper), "venue": data.get("venue", ""),
            "notes": data.get("notes", ""), "rows": rows}


def key_of(row):
    return tuple(row.get(k) for k in KEY_FIELDS)


def has_code(paper):
    """Whether the paper's directory exists in this checkout (a paper without code is marked as such)."""
    return os.path.isdir(os.path.join(REPO_ROOT, paper))


def latest_by_key(records, extra=()):
    """Newest record per (model, dataset, setting, metric) [+ extra fields]; ties go to the later line."""
    latest = {}
    for i, rec in enumerate(records):
        k = key_of(rec) + tuple(rec.get(f) for f in extra)
        order = (rec.get("timestamp", ""), i)
        if k not in latest or order >= latest[k][0]:
            latest[k] = (order, rec)
    return {k: rec for k, (_, rec) in latest.items()}


def load_records(paper, directory=None, warn=None):
    """Local records (results/<paper>.jsonl); corrupt lines are skipped with a file:line warning."""
    return [dict(r, _origin="local") for r in read_records(paper, directory, warn)]


def load_reference(paper, directory=None, warn=None):
    """Committed reference records: every results/reference/<paper>/*.jsonl, oldest file first."""
    d = os.path.join(directory or reference_dir(), paper)
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".jsonl"):
            out += [dict(r, _origin="reference") for r in read_jsonl(os.path.join(d, name), warn)]
    return out


def recipe_full(rec):
    """True (full recipe), False (shortened) or None (not recorded: records written before recipes)."""
    r = rec.get("recipe")
    return r.get("full") if isinstance(r, dict) else None


def recipe_text(rec):
    r = rec.get("recipe")
    if not isinstance(r, dict):
        return "recipe not recorded"
    text = str(r.get("summary") or ("full" if r.get("full") else "shortened"))
    return "published checkpoint" if text.startswith("published checkpoint (") else text


# ----------------------------------------------------------------------------- statistics

def is_accuracy(metric):
    return str(metric).startswith("top")


def base_split(split):
    """'test[:1000]', 'test-subset' -> 'test'."""
    return re.split(r"[\[\s(:_\-]", str(split).strip().lower())[0]


def standard_error(percent, n):
    """Binomial standard error of an accuracy given in percent, in percentage points."""
    p = min(max(percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def subset_info(rec):
    """(is_subset, full_size) of a record: fewer samples than the official split, or split says so."""
    split = str(rec.get("split", ""))
    full = FULL_SPLIT_SIZE.get((rec.get("dataset"), base_split(split)))
    n = rec.get("n_samples") or 0
    subset = "subset" in split.lower() or "[" in split or (full is not None and 0 < n < full)
    return subset, full


def record_notes(rec, published_split=None):
    """Notes about how a record was measured: subset size and standard error, split mismatch."""
    notes = []
    if not is_accuracy(rec.get("metric")):
        return notes
    subset, full = subset_info(rec)
    n = rec.get("n_samples") or 0
    if subset and n > 0:
        of = f" of {full:,}" if full else ""
        se = standard_error(rec["value"], n)
        notes.append(f"subset: n={n:,}{of}, s.e. ±{se:.2f} pts")
    if published_split and published_split != "n/a" and \
            base_split(published_split) != base_split(rec.get("split", "")):
        notes.append(f"split differs: published on '{published_split}', measured on '{rec.get('split')}'")
    return notes
