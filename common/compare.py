"""Published vs reproduced numbers: `python -m common.compare [paper ...]` (what `make compare` runs).

Every row of `common/published/<paper>.json` is paired with the best-qualified record of the same
(model, dataset, setting, metric), preferring the published split: a full recipe before an unknown one,
the full evaluation split before a subset, more samples, then the newest. Records of shortened runs
(recipe.full false: fewer epochs, smoke-test limits) are never paired by default; they are listed as
such (`--include-shortened` pairs them, marked). Several seeds of the same setting are aggregated
(mean, std, min-max, n).

Two sources of records, shown side by side:
  reference   results/reference/<paper>/*.jsonl, committed: what this project measured (full recipes,
              published-checkpoint evaluations), with command, commit, machine, seed and wall time;
  local       results/<paper>.jsonl (ignored by git; `QUANTLAB_RESULTS` or `--results-dir` moves it), written
              by common.results.record on this machine.
A line that is not a valid record is skipped with a warning naming file:line.

The script prints one table per paper and writes `results/RESULTS.md` (all papers) and one chart per
paper, `results/compare_<paper>.png` (axes from zero, measured rows only).

    python -m common.compare              # all five papers
    python -m common.compare apot dambq   # print two papers (RESULTS.md still covers all five)
"""
import argparse
import csv
import io
import json
import math
import os
import re
import sys
import textwrap
import time

from common import REPO_ROOT
from common.errors import UserError, run_main
from common.paths import REFERENCE_DIR, reference_dir  # noqa: F401 - also read as common.compare.reference_dir
from common.results import read_jsonl, read_records, results_dir

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


# ----------------------------------------------------------------------------- data

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


def quality(rec, index=0):
    """Sort key of a record, best last: full recipe > unknown > shortened, full split > subset, more samples,
    newer, later line."""
    full = recipe_full(rec)
    return ({True: 2, None: 1, False: 0}.get(full, 1), not subset_info(rec)[0], rec.get("n_samples") or 0,
            str(rec.get("timestamp", "")), index)


def seed_stats(group):
    """{'mean', 'std', 'min', 'max', 'n'} over several seeds of one setting (newest record per seed), or None.
    Only training runs count (records with a run directory): re-evaluating one checkpoint is not a new seed."""
    by_seed = {}
    for rec in sorted(group, key=lambda r: str(r.get("timestamp", ""))):
        if rec.get("seed") is not None and rec.get("run_dir"):
            by_seed[rec["seed"]] = rec
    vals = [r["value"] for r in by_seed.values()]
    if len(vals) < 2:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))  # sample std (n-1)
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": len(vals),
            "runs": [by_seed[k] for k in sorted(by_seed, key=str)]}


def best_record(candidates, published_split=None):
    """The best-qualified record among `candidates` (same key), preferring the published split; several
    seeds of its setting (same split, size and recipe) become `_seeds` statistics and a mean `value`."""
    if not candidates:
        return None
    if published_split:
        same = [r for r in candidates if base_split(r.get("split", "")) == base_split(published_split)]
        candidates = same or candidates
    ranked = sorted(enumerate(candidates), key=lambda ir: quality(ir[1], ir[0]))
    best = dict(ranked[-1][1])
    group = [r for r in candidates if r.get("split") == best.get("split") and r.get("n_samples") ==
             best.get("n_samples") and recipe_text(r) == recipe_text(best)]
    stats = seed_stats(group)
    if stats:
        best["_seeds"] = stats
        best["value"] = stats["mean"]
    return best


def companion(candidates, rec):
    """The same training runs measured on another split than `rec`'s (APoT MNIST: the published protocol
    on the training split, and the test split beside it), as one best_record; None when there are none.
    Only records of training runs (a run directory and a seed) of rec's origin count."""
    if rec is None or not rec.get("run_dir"):
        return None
    other = [r for r in candidates if r["_origin"] == rec["_origin"] and r.get("run_dir") and r.get("seed") is not None
             and base_split(r.get("split", "")) != base_split(rec.get("split", ""))
             and r.get("script") == rec.get("script")]
    return best_record(other)


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


# ----------------------------------------------------------------------------- comparison

def compare_paper(paper, records=None, directory=None, reference=None, include_shortened=False, warn=None):
    """Pair published rows with the best-qualified local and reference records.

    Returns the published table plus rows [{published, record, local, reference, delta, notes}] (`record`
    is the one the delta uses: local when there is one, else reference), `measured_only` (qualified records
    without a published row or on another split), `shortened` (records of shortened recipes, shown only as
    such) and counts.
    """
    pub = load_published(paper)
    if records is None:
        records = load_records(paper, directory, warn)
    if reference is None:
        reference = load_reference(paper, warn=warn)
    records = [r if "_origin" in r else dict(r, _origin="local") for r in records]
    reference = [r if "_origin" in r else dict(r, _origin="reference") for r in reference]
    everything = records + reference
    eligible = [r for r in everything if include_shortened or recipe_full(r) is not False]
    shortened = [] if include_shortened else [r for r in everything if recipe_full(r) is False]
    rows, used = [], set()
    for prow in pub["rows"]:
        cands = [r for r in eligible if key_of(r) == key_of(prow)]
        local = best_record([r for r in cands if r["_origin"] == "local"], prow.get("split"))
        ref = best_record([r for r in cands if r["_origin"] == "reference"], prow.get("split"))
        rec = local or ref
        for r in (local, ref):
            if r is not None:
                used.add(key_of(r) + (base_split(r.get("split", "")), r["_origin"]))
        notes = [] if rec is None else record_notes(rec, prow["split"])
        beside = companion(cands, rec)
        if beside is not None:
            used.add(key_of(beside) + (base_split(beside.get("split", "")), beside["_origin"]))
            split = base_split(beside.get("split", ""))
            how = (beside.get("extra") or {}).get("protocol") or "same runs"
            notes.append(f"{how if how.startswith(split) else f'{split} split ({how})'}: {fmt_value(beside)}")
        if rec is not None and recipe_full(rec) is None:
            notes.append("recipe not recorded")
        if rec is not None and recipe_full(rec) is False:
            notes.append(f"SHORTENED ({recipe_text(rec)}): not a reproduction")
        rows.append({"published": prow, "record": rec, "local": local, "reference": ref,
                     "delta": None if rec is None else rec["value"] - prow["value"], "notes": notes})
    groups = {}
    for r in eligible:
        groups.setdefault(key_of(r) + (base_split(r.get("split", "")), r["_origin"]), []).append(r)
    measured_only = [best_record(g) for k, g in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))
                     if k not in used]
    shortened = sorted(shortened, key=lambda r: tuple(map(str, key_of(r) + (r.get("timestamp"),))))
    return dict(pub, rows=rows, measured_only=measured_only, shortened=shortened, n_records=len(records),
                n_reference=len(reference), has_code=has_code(paper))


# ----------------------------------------------------------------------------- formatting

def fmt(v):
    """1 to 4 decimals, trailing zeros dropped: 68.744, 92.45, 92.0, 1290.0, 99.6367."""
    if v is None:
        return "-"
    s = f"{v:.4f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def fmt_published(row):
    """The value as the source printed it ('71.30') when that is the same number, else fmt(value)."""
    printed = str(row.get("as_published", ""))
    try:
        if float(printed) == row["value"]:
            return printed
    except ValueError:
        pass
    return fmt(row["value"])


def fmt_delta(d):
    return "-" if d is None else f"{d:+.2f}"


PAPER_REPOS = {"apot": "github.com/yhhhli/APoT_Quantization", "alq": "github.com/zqu1992/ALQ",
               "dambq": "github.com/sijeh/DAMBQV2", "alignq": "github.com/tinganchen/AlignQ",
               "fdda": "github.com/zysxmu/FDDA"}


def readable(paper, text):
    """Cite only what a user can read: 'seed README' is the paper repository's README; references to this
    project's internal notes and reference folders are dropped."""
    repo = PAPER_REPOS.get(paper, "the paper's repository")
    text = re.sub(r"\s*\((?:see )?(?:the )?notes[^)]*\)", "", str(text), flags=re.I)
    text = re.sub(r"\s*\([^)]*(?:originals-|reference/)[^)]*\)", "", text)
    text = re.sub(r"[Ss]eed README", f"README of {repo}", text)
    return re.sub(r"reference/\w+/logs", f"the authors' logs in {repo}", text)


def short_source(source):
    """'seed README, Results table, row 'Original' (...)' -> "seed README 'Original'"."""
    short = source.split(",")[0].strip()
    row = re.search(r"row '([^']+)'", source)
    return f"{short} '{row.group(1)}'" if row else short


def run_of(rec):
    commit = str(rec.get("commit", "unknown"))
    return f"{rec.get('script', '?')} @ {commit} {rec.get('timestamp', '')}".strip()


def fmt_value(rec):
    """'92.3', or 'mean ±std (min-max, n=3 seeds)' when several seeds share the setting."""
    if rec is None:
        return "-"
    st = rec.get("_seeds")
    if st:
        return f"{fmt(st['mean'])} ±{st['std']:.2f} ({fmt(st['min'])}-{fmt(st['max'])}, n={st['n']} seeds)"
    return fmt(rec["value"])


def how_run(rec):
    """The command and run directory of a record (evaluations of a checkpoint have no run directory)."""
    run_dir = rec.get("run_dir") or (rec.get("extra") or {}).get("checkpoint") or "-"
    return f"{rec.get('command', '?')} [run: {run_dir}]"


def footnotes_of(result):
    """Published-row notes, deduplicated: ({note: number}, [(number, note)])."""
    numbers = {}
    for entry in result["rows"]:
        note = entry["published"].get("note")
        if note and note not in numbers:
            numbers[note] = len(numbers) + 1
    return numbers, [(i, n) for n, i in numbers.items()]


COMPARE_HEADER = ("model", "dataset", "setting", "metric", "published", "source", "reference", "local", "delta",
                  "n_samples", "split (pub/meas)", "recipe", "run", "notes")
MEASURED_HEADER = ("model", "dataset", "setting", "metric", "value", "from", "n_samples", "split", "recipe", "run",
                   "notes")


def not_run_text(result):
    return "not yet run" if result.get("has_code", True) else "no code in this repository yet"


def table_cells(result):
    """Rows of cells for the comparison table, the measured-only table and the shortened-runs table."""
    numbers, _ = footnotes_of(result)
    paired = []
    for entry in result["rows"]:
        p, rec = entry["published"], entry["record"]
        notes = list(entry["notes"])
        if p.get("note"):
            notes.append(f"see [{numbers[p['note']]}]")
        if rec is None:
            measured = (not_run_text(result), "-", "-", "-", p["split"], "-", "-")
        else:
            measured = (fmt_value(entry["reference"]), fmt_value(entry["local"]), fmt_delta(entry["delta"]),
                        f"{rec.get('n_samples', 0):,}", f"{p['split']} / {rec.get('split', '?')}", recipe_text(rec),
                        run_of(rec))
        paired.append((p["model"], p["dataset"], p["setting"], p["metric"], fmt_published(p),
                       readable(result["paper"], short_source(p["source"]))) + measured + ("; ".join(notes),))

    def measured_row(r):
        return (r.get("model"), r.get("dataset"), r.get("setting"), r.get("metric"), fmt_value(r),
                r.get("_origin", "local"), f"{r.get('n_samples', 0):,}", r.get("split", "?"), recipe_text(r),
                run_of(r), "; ".join(record_notes(r)))
    return paired, [measured_row(r) for r in result["measured_only"]], \
        [measured_row(r) for r in result.get("shortened", [])]


def seed_runs(result):
    """The runs behind seed statistics, one row per (model, dataset, setting, origin, seed) with every metric
    of that run side by side and, where the records carry it (ALQ), each layer's bits:
    ([metrics], [{'key', 'seed', 'values': {metric: value}, 'layer_bits', 'run_dir'}])."""
    runs, metrics = {}, []
    for entry in result["rows"]:
        for origin in ("reference", "local"):
            rec = entry[origin]
            if not rec or not rec.get("_seeds"):
                continue
            for r in rec["_seeds"]["runs"]:
                k = (r.get("model"), r.get("dataset"), r.get("setting"), origin, r.get("seed"))
                row = runs.setdefault(k, {"key": k, "seed": r.get("seed"), "values": {}, "layer_bits": None,
                                          "run_dir": r.get("run_dir")})
                row["values"][r["metric"]] = r["value"]
                row["layer_bits"] = row["layer_bits"] or (r.get("extra") or {}).get("layer_bits")
                if r["metric"] not in metrics:
                    metrics.append(r["metric"])
    return metrics, [runs[k] for k in sorted(runs, key=lambda k: tuple(map(str, k)))]


SEED_RUNS_TITLE = "runs behind the seed statistics (mean ±std above):"


def seed_run_cells(result):
    metrics, rows = seed_runs(result)
    if not rows:
        return None, []
    header = ("model", "dataset", "setting", "from", "seed") + tuple(metrics) + ("bits per layer", "run")
    cells = [row["key"][:4] + (row["seed"],) + tuple(fmt(row["values"].get(m)) for m in metrics)
             + (" ".join(f"{n} {b:g}" for n, b in (row["layer_bits"] or {}).items()) or "-", row["run_dir"])
             for row in rows]
    return header, cells


def text_table(header, rows):
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def commands_of(result):
    """One line per paired row: the command and run directory behind the number."""
    out = []
    for entry in result["rows"]:
        for origin in ("reference", "local"):
            rec = entry[origin]
            if rec is not None:
                p = entry["published"]
                out.append(f"{p['model']} {p['dataset']} {p['setting']} {p['metric']} ({origin}): {how_run(rec)}")
    return list(dict.fromkeys(out))


def _runs_text(result):
    """The lines under a table: each row's command and run directory, then the runs behind seed statistics."""
    out = []
    cmds = commands_of(result)
    if cmds:
        # wrapped, so the default output fits a 120-column terminal (--wide prints each on one line)
        out += ["", "commands and run directories:"] + [
            textwrap.fill(c, 118, initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False,
                          break_long_words=True) for c in cmds]
    header, cells = seed_run_cells(result)
    if cells:
        # the terminal view leaves out the run column (the commands above name each run) to fit 120 columns
        out += ["", SEED_RUNS_TITLE, text_table(header[:-1], [c[:-1] for c in cells])]
    return out


def fmt_value_short(rec):
    """'92.3', or 'mean ±std n=3' for seed statistics (the range is in the row's note and the seed table)."""
    if rec is None:
        return "-"
    st = rec.get("_seeds")
    return f"{fmt(st['mean'])} ±{st['std']:.2f} n={st['n']}" if st else fmt(rec["value"])


COMPACT_HEADER = ("#", "model", "dataset", "setting", "metric", "published", "reference", "local", "delta", "n",
                  "split")
COMPACT_MEASURED = ("model", "dataset", "setting", "metric", "value", "from", "n", "split", "recipe")


def short_split(published, measured):
    return published if measured in (None, published) else f"{published}/{measured}"


def same_number(p, q):
    """Two published rows that are the same number published twice: a README row and the value its checkpoint
    stores, equal to the README's two decimals (same model/dataset/setting/metric and split)."""
    return key_of(p) == key_of(q) and p["split"] == q["split"] and abs(p["value"] - q["value"]) <= 0.005 + 1e-9


def compact_cells(result):
    """The terminal view: one short row per published row, its notes numbered below the table (recipe,
    command and run directory are in the lists after it; --wide prints the full table)."""
    numbers, _ = footnotes_of(result)
    rows, notes, shown = [], [], []
    for entry in result["rows"]:
        p, rec = entry["published"], entry["record"]
        # the same number published twice (a README row and the value its checkpoint stores, equal to the
        # README's two decimals): one row
        twin = next((k for k, q in shown if same_number(q, p)), None)
        if twin is not None:
            notes[twin] += f"; also {readable(result['paper'], short_source(p['source']))}: {fmt_published(p)}"
            continue
        i = len(rows) + 1
        row_notes = list(entry["notes"])
        for origin in ("reference", "local"):
            st = (entry[origin] or {}).get("_seeds")
            if st:
                row_notes.append(f"{origin} seeds {fmt(st['min'])}-{fmt(st['max'])}")
        if p.get("note"):
            row_notes.append(f"see [{numbers[p['note']]}]")
        if rec is None:
            rows.append((i, p["model"], p["dataset"], p["setting"], p["metric"], fmt_published(p),
                         not_run_text(result), "-", "-", "-", p["split"]))
        else:
            n = rec.get("n_samples") or 0
            rows.append((i, p["model"], p["dataset"], p["setting"], p["metric"], fmt_published(p),
                         fmt_value_short(entry["reference"]), fmt_value_short(entry["local"]),
                         fmt_delta(entry["delta"]), f"{n:,}" if n else "-", short_split(p["split"], rec.get("split"))))
        shown.append((len(notes), p))
        notes.append(f"#{i}: " + "; ".join(row_notes) if row_notes else "")
    return rows, [textwrap.fill(n, 110, initial_indent="  ", subsequent_indent="      ") for n in notes if n]


def format_text(result, wide=False):
    if wide:
        return format_wide(result)
    rows, notes = compact_cells(result)
    done = sum(1 for e in result["rows"] if e["record"] is not None)
    out = [f"== {result['paper']}: {result['title']} ({result['venue']})"
           + ("" if result.get("has_code", True) else "  [no code in this repository yet]"),
           f"   {len(result['rows'])} published rows, {done} measured, {result['n_records']} local records, "
           f"{result.get('n_reference', 0)} reference records",
           "   delta = measured (local, else reference) - published; --wide adds source, recipe and run columns"]
    if rows:
        out.append(text_table(COMPACT_HEADER, rows))
    else:
        out.append("(no published numbers; see the notes in common/published/%s.json)" % result["paper"])
    out += notes
    out += [textwrap.fill(f"[{i}] {readable(result['paper'], note)}", 110, subsequent_indent="    ")
            for i, note in footnotes_of(result)[1]]
    out += _runs_text(result)

    def measured(records):
        """The table of `records`, the recipe column cut to what is left of 120 columns."""
        cells = [(r.get("model"), r.get("dataset"), r.get("setting"), r.get("metric"), fmt_value_short(r),
                  r.get("_origin", "local"), f"{r.get('n_samples', 0):,}", r.get("split", "?")) for r in records]
        room = 120 - 2 - len(text_table(COMPACT_MEASURED[:-1], cells).splitlines()[1])
        return text_table(COMPACT_MEASURED, [c + (textwrap.shorten(recipe_text(r), max(room, 20), placeholder=" ..."),)
                                             for c, r in zip(cells, records)])
    if result["measured_only"]:
        out += ["", "measured only (no published counterpart):", measured(result["measured_only"])]
    if result.get("shortened"):
        out += ["", "shortened runs (not reproductions; --include-shortened pairs them):",
                measured(result["shortened"])]
    return "\n".join(out) + "\n"


def format_wide(result):
    paired, measured_only, shortened = table_cells(result)
    done = sum(1 for e in result["rows"] if e["record"] is not None)
    out = [f"== {result['paper']}: {result['title']} ({result['venue']})"
           + ("" if result.get("has_code", True) else "  [no code in this repository yet]"),
           f"   {len(result['rows'])} published rows, {done} measured, {result['n_records']} local records, "
           f"{result.get('n_reference', 0)} reference records"]
    if paired:
        out.append(text_table(COMPARE_HEADER, paired))
    else:
        out.append("(no published numbers; see the notes in common/published/%s.json)" % result["paper"])
    for i, note in footnotes_of(result)[1]:
        out.append(f"[{i}] {readable(result['paper'], note)}")
    out += _runs_text(result)
    if measured_only:
        out += ["", "measured only (no published counterpart):", text_table(MEASURED_HEADER, measured_only)]
    if shortened:
        out += ["", "shortened runs (not reproductions; --include-shortened pairs them):",
                text_table(MEASURED_HEADER, shortened)]
    return "\n".join(out) + "\n"


def format_markdown(results, reference_only=False, charts=True):
    made = ("`python -m common.compare --reference-table` (`make reference-table`) from "
            "`common/published/<paper>.json` and the committed reference records `results/reference/<paper>/` "
            "only (regenerate it after adding reference records; a test checks it is current) "
            if reference_only else
            f"`python -m common.compare` on {time.strftime('%Y-%m-%d %H:%M:%S')} from "
            "`common/published/<paper>.json`, the committed reference records `results/reference/<paper>/` and "
            "the local records `results/<paper>.jsonl` ")
    out = ["# quantlab: published vs reproduced", "",
           f"Generated by {made}(best-qualified record per model/dataset/setting/metric: "
           "full recipe, full split, newest; shortened runs are listed separately and never paired). "
           "delta = measured (local, else reference) - published. "
           "Runs on fewer samples than the official split (CIFAR-10 test 10,000; MNIST test 10,000; "
           "ImageNet val 50,000) show the binomial standard error sqrt(p(1-p)/n) in points.", ""]
    for result in results:
        paired, measured_only, shortened = table_cells(result)
        out += [f"## {result['paper']}: {result['title']} ({result['venue']})", ""]
        if not result.get("has_code", True):
            out += [f"_No code for {result['paper']} in this repository yet._", ""]
        if result["notes"]:
            out += [readable(result["paper"], result["notes"]), ""]
        out += [md_table(COMPARE_HEADER, paired) if paired else "_No published numbers._", ""]
        notes = footnotes_of(result)[1]
        if notes:
            out += [f"[{i}] {readable(result['paper'], note)}  " for i, note in notes] + [""]
        cmds = commands_of(result)
        if cmds:
            out += ["Commands and run directories:", ""] + [f"- `{c}`" for c in cmds] + [""]
        header, cells = seed_run_cells(result)
        if cells:
            out += [f"**{SEED_RUNS_TITLE[0].upper()}{SEED_RUNS_TITLE[1:-1]}:**", "", md_table(header, cells), ""]
        out += ["**Measured only** (no published counterpart):", ""]
        out += [md_table(MEASURED_HEADER, measured_only) if measured_only else "_none_", ""]
        if shortened:
            out += ["**Shortened runs** (not reproductions):", "", md_table(MEASURED_HEADER, shortened), ""]
        if charts:
            out += [f"![{result['paper']}: published vs measured](compare_{result['paper']}.png)", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- chart

def _se_of(rec):
    if rec is None:
        return None
    if rec.get("_seeds"):
        return rec["_seeds"]["std"]
    if not (rec.get("n_samples") or 0) > 0 or not subset_info(rec)[0] or not is_accuracy(rec.get("metric")):
        return None
    return standard_error(rec["value"], rec["n_samples"])


CHART_METRICS = (("top1", "top-1 accuracy (points)"), ("avg_bits", "average bits per weight"),
                 ("storage_KB", "weight storage (KB)"))
CHART_UNITS = {"top1": " pts", "avg_bits": " bit", "storage_KB": " KB"}


def chart_groups(result):
    """Per metric: [(label, published, measured, error, split differs, seed values, dataset)] for the rows that have a
    measurement, and the labels of the published rows not measured yet. The same number published twice (a
    README row and the value its checkpoint stores, equal to two decimals) is drawn once, as the terminal
    table shows it once."""
    per_metric, missing, shown = {}, [], []
    for entry in result["rows"]:
        p, rec = entry["published"], entry["record"]
        if any(same_number(q, p) for q in shown):
            continue
        shown.append(p)
        if rec is None:
            missing.append(f"{p['model']} {p['setting']} {p['dataset']}")
            continue
        differs = any(n.startswith("split differs") for n in entry["notes"])
        label = f"{p['model']} {p['setting']} {p['dataset']}"
        if any(key_of(q["published"]) == key_of(p) and not same_number(q["published"], p) for q in result["rows"]):
            # the same setting published twice with other numbers: say which row this is
            label += f" [{readable(result['paper'], short_source(p['source']))[:40]}]"
        if differs:
            label += f"\n(published on {p['split']}, measured on {rec.get('split')})"
        seeds = [r["value"] for r in (rec.get("_seeds") or {}).get("runs", [])]
        per_metric.setdefault(p["metric"], []).append((label, p["value"], rec["value"], _se_of(rec), differs,
                                                       seeds, p["dataset"]))
    return per_metric, missing


def layer_rows(result):
    """[(label, {layer: bits})] of every run behind a paired row whose records carry per-layer bits (ALQ)."""
    _, rows = seed_runs(result)
    out = [(f"{r['key'][0]} {r['key'][2]} seed {r['seed']} ({r['key'][3]})", r["layer_bits"]) for r in rows
           if r["layer_bits"]]
    if not out:                                   # one run per setting: its paired record
        seen = set()
        for e in result["rows"]:
            rec = e["record"]
            bits = (rec or {}).get("extra", {}).get("layer_bits") if rec else None
            k = rec and (rec.get("model"), rec.get("setting"), rec.get("seed"), rec.get("_origin"))
            if bits and k not in seen:
                seen.add(k)
                out.append((f"{k[0]} {k[1]} seed {k[2]} ({k[3]})", bits))
    return out


def plot_paper(result, path):
    """One panel per metric (top-1, and ALQ's bits and storage beside it) showing the GAP of each measured
    row: measured - published, with its uncertainty (1 standard error for a test subset, ±1 std over seeds,
    each seed a dot) against a zero line, on an axis symmetric about zero; a hollow marker where the split
    differs from the published one. Only rows with a measurement; the count of the others in the title.
    Returns {'bars': measured rows drawn, 'panels': [(metric, (xmin, xmax))], 'not_measured': count}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_metric, missing = chart_groups(result)
    not_measured = len(missing)
    panels = [(m, label) for m, label in CHART_METRICS if per_metric.get(m)]
    layers = layer_rows(result) if panels else []
    if layers:
        panels.append(("layer_bits", "bits per weight of each layer, per run"))
    if not panels:
        fig, ax = plt.subplots(figsize=(7, 1.6))
        ax.axis("off")
        why = (f"{result['paper']}: no code in this repository yet" if not result.get("has_code", True)
               else f"{result['paper']}: no measurement yet ({not_measured} published rows)")
        ax.text(0.5, 0.5, why, ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return {"bars": 0, "panels": [], "not_measured": not_measured}
    # one row of panels per dataset, each with its own symmetric axis: a shared axis would let the widest gap
    # (a 1,000-image subset's) flatten the others (MNIST's 0.05-point gaps) to zero
    datasets = list(dict.fromkeys(g[6] for m, _ in panels if m in per_metric for g in per_metric[m]))
    rows_of = {d: max([sum(1 for g in per_metric[m] if g[6] == d) for m, _ in panels if m in per_metric] + [1])
               for d in datasets}
    if layers:
        rows_of[datasets[0]] = max(rows_of[datasets[0]], len(layers) if len(datasets) == 1 else 1)
    n = sum(rows_of.values()) + (max(0, len(layers) - sum(rows_of.values())) if layers else 0)
    # the rows not measured yet are listed under the plot, not drawn
    listed = textwrap.fill("not measured yet: " + ", ".join(missing), 150) if missing else ""
    foot = 0.45 + 0.14 * (listed.count("\n") + 1 if listed else 0)
    height = 1.35 + foot + 0.5 * n + 0.55 * (len(datasets) - 1)
    fig = plt.figure(figsize=(5.5 * len(panels) + 3.5, height))
    grid = fig.add_gridspec(len(datasets), len(panels), height_ratios=[rows_of[d] + 0.6 for d in datasets])
    drawn = []
    for col, (metric, xlabel) in enumerate(panels):
        if metric == "layer_bits":
            ax = fig.add_subplot(grid[:, col])
            _plot_layers(ax, layers, xlabel)
            drawn.append((metric, tuple(ax.get_xlim())))
            continue
        for row, dataset in enumerate(datasets):
            groups = [g for g in per_metric[metric] if g[6] == dataset]
            if not groups:
                continue
            ax = fig.add_subplot(grid[row, col])
            _plot_gaps(ax, groups, metric, xlabel + (f" ({dataset})" if len(datasets) > 1 else ""))
            drawn.append((metric, tuple(ax.get_xlim())))
    handles = [plt.Line2D([], [], color="tab:blue"), plt.Line2D([], [], marker="o", color="tab:orange", ls=""),
               plt.Line2D([], [], marker="o", color="tab:orange", mfc="white", ls="")]
    labels = ["published (zero gap)", "measured", "measured on another split than published"]
    rest = f"; {not_measured} more published rows not measured yet (listed below)" if not_measured else ""
    fig.suptitle(f"{result['paper']}: measured minus published{rest}", x=0.01, ha="left", fontsize=10)
    fig.legend(handles=handles, labels=labels, loc="lower center", ncol=3, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, (foot - 0.4) / height))
    if listed:
        fig.text(0.01, 0.08 / height, listed, ha="left", va="bottom", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, foot / height, 1, 1 - 0.45 / height))   # title, legend and list in fixed inches
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"bars": sum(len(per_metric.get(m, [])) for m, _ in panels), "panels": drawn,
            "not_measured": not_measured, "layer_runs": len(layers), "datasets": datasets}


def _plot_gaps(ax, groups, metric, xlabel):
    """One panel: each row's gap with its error bar and seed dots, about a zero line, on a symmetric axis."""
    unit = CHART_UNITS.get(metric, "")
    reach = max(max([abs(g[2] - g[1]) + (g[3] or 0)] + [abs(v - g[1]) for v in g[5]]) for g in groups)
    reach = max(reach * 1.25, 1e-3)
    for y, (label, pub, rep, err, differs, seeds, _) in enumerate(groups):
        gap = rep - pub
        ax.errorbar([gap], [y], xerr=None if err is None else [[err], [err]], fmt="o",
                    color="tab:orange", mfc="white" if differs else "tab:orange", capsize=3, markersize=6)
        if seeds:                             # each seed's run as a dot
            ax.plot([v - pub for v in seeds], [y + 0.18] * len(seeds), "k.", markersize=4)
        ax.text(reach, y, f" {pub:.2f} -> {rep:.2f} ({gap:+.2f}{unit})", va="center", fontsize=7)
    ax.axvline(0.0, color="tab:blue", linewidth=1)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([g[0] for g in groups], fontsize=7)
    ax.set_ylim(len(groups) - 0.4, -0.6)
    ax.set_xlim(-reach, reach)                # symmetric: a gap reads the same to either side
    seeded = any(g[5] for g in groups)
    ax.set_xlabel(f"measured - published, {xlabel}" + ("; error bar = 1 s.e. of the test subset"
                                                         if any(g[3] for g in groups) and not seeded else "")
                  + ("; several seeds: mean, ±1 std, dots = runs" if seeded else ""), fontsize=8)


def _plot_layers(ax, layers, xlabel):
    """Grouped horizontal bars: one group per run, one bar per layer, axis from zero."""
    names = list(dict.fromkeys(n for _, bits in layers for n in bits))
    h = 0.8 / max(len(names), 1)
    for y, (label, bits) in enumerate(layers):
        for i, name in enumerate(names):
            v = bits.get(name)
            if v is not None:
                ax.barh(y - 0.4 + h * (i + 0.5), v, h, color=f"C{i + 2}", label=name if y == 0 else None)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([label for label, _ in layers], fontsize=7)
    ax.set_ylim(len(layers) - 0.4, -0.6)
    ax.set_xlim(0, max(v for _, bits in layers for v in bits.values()) * 1.12)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


# ----------------------------------------------------------------------------- main

REFERENCE_TABLE = os.path.join(REPO_ROOT, "results", "reference", "RESULTS.md")
CSV_HEADER = ("paper", "model", "dataset", "setting", "metric", "published", "published_split", "source",
              "measured", "std", "n_seeds", "min", "max", "n_samples", "measured_split", "delta", "recipe", "notes")


def reference_results():
    """compare_paper of every paper over the committed reference records alone (no local records)."""
    return [compare_paper(p, records=[], reference=load_reference(p, REFERENCE_DIR)) for p in PAPERS]


def reference_table(results=None):
    """The markdown of the committed reference results alone: what a fresh clone shows without running."""
    return format_markdown(results or reference_results(), reference_only=True)


def results_csv(results):
    """One CSV line per published row: published value, measured mean (± std, n seeds, range), delta."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    num = lambda v: "" if v is None else f"{v:.4f}".rstrip("0").rstrip(".")   # noqa: E731
    for result in results:
        for entry in result["rows"]:
            p, rec = entry["published"], entry["record"]
            st = (rec or {}).get("_seeds") or {}
            w.writerow((result["paper"], p["model"], p["dataset"], p["setting"], p["metric"], num(p["value"]),
                        p.get("split", ""), short_source(p["source"]),
                        num(rec["value"]) if rec else "", num(st.get("std")), st.get("n", 1 if rec else 0),
                        num(st.get("min")), num(st.get("max")), (rec or {}).get("n_samples", ""),
                        (rec or {}).get("split", ""), num(entry["delta"]), recipe_text(rec) if rec else "not run",
                        "; ".join(entry["notes"])))
    return buf.getvalue()


README = os.path.join(REPO_ROOT, "README.md")
SUMMARY_MARKS = ("<!-- reference summary: written by make reference-table -->", "<!-- end of reference summary -->")


def summary_table(results):
    """Markdown: per paper, the published rows, how many have a committed reference measurement, of what, and
    with how many seeds (the README's five-line summary, regenerated with RESULTS.md)."""
    out = ["| paper | published rows | with a reference measurement | measured (model dataset: rows) | seeds per row |",
           "|---|---|---|---|---|"]
    for result in results:
        rows = result["rows"]
        done = [e for e in rows if e["record"] is not None]
        what = {}
        for e in done:
            k = f"{e['published']['model']} {e['published']['dataset']}"
            what[k] = what.get(k, 0) + 1
        seeds = sorted({(e["record"].get("_seeds") or {}).get("n", 1) for e in done})
        out.append(f"| {result['paper']} | {len(rows)} | {len(done)} | "
                   + (", ".join(f"{k}: {n}" for k, n in what.items()) or "none yet") + " | "
                   + ("-" if not seeds else f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}") + " |")
    return "\n".join(out)


def readme_with_summary(text, results):
    """`text` (the README) with the block between SUMMARY_MARKS replaced by summary_table(results)."""
    start, end = SUMMARY_MARKS
    if start not in text or end not in text:
        raise UserError(f"README.md lacks the reference summary markers {start} ... {end}")
    head, rest = text.split(start, 1)
    return head + start + "\n" + summary_table(results) + "\n" + end + rest.split(end, 1)[1]


def write_reference(md_path=REFERENCE_TABLE):
    """results/reference/RESULTS.md, results.csv and compare_<paper>.png from the committed records only."""
    results = reference_results()
    d = os.path.dirname(os.path.abspath(md_path))
    with open(md_path, "w") as f:
        f.write(reference_table(results))
    with open(os.path.join(d, "results.csv"), "w") as f:
        f.write(results_csv(results))
    for result in results:
        plot_paper(result, os.path.join(d, f"compare_{result['paper']}.png"))
    if md_path == REFERENCE_TABLE:
        with open(README) as f:
            text = f.read()
        with open(README, "w") as f:
            f.write(readme_with_summary(text, results))
    return d


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compare published numbers with reproduced results.")
    parser.add_argument("papers", nargs="*", metavar="paper", help=f"any of {', '.join(PAPERS)} (default: all)")
    parser.add_argument("--results-dir", default=None,
                        help="where results/<paper>.jsonl live and RESULTS.md and charts go "
                             "(default: $QUANTLAB_RESULTS or results/)")
    parser.add_argument("--no-write", action="store_true", help="only print; do not write RESULTS.md or charts")
    parser.add_argument("--include-shortened", action="store_true",
                        help="also pair records of shortened recipes (smoke runs), marked SHORTENED")
    parser.add_argument("--reference-table", metavar="PATH", nargs="?", const=REFERENCE_TABLE,
                        help="write only the committed reference results as markdown (default "
                             "results/reference/RESULTS.md) and stop")
    parser.add_argument("--wide", action="store_true",
                        help="the full table in the terminal (source, recipe, run and notes columns), as RESULTS.md")
    args = parser.parse_args(argv)
    for p in args.papers:
        check_paper(p)
    directory = args.results_dir or results_dir()
    if args.reference_table:
        d = write_reference(args.reference_table)
        print(f"wrote {args.reference_table}, results.csv and compare_<paper>.png in {d}")
        return

    results = {p: compare_paper(p, directory=directory, include_shortened=args.include_shortened)
               for p in PAPERS}
    for p in args.papers or PAPERS:
        print(format_text(results[p], wide=args.wide))
    if args.no_write:
        return
    os.makedirs(directory, exist_ok=True)
    md_path = os.path.join(directory, "RESULTS.md")
    with open(md_path, "w") as f:
        f.write(format_markdown([results[p] for p in PAPERS]))
    for p in PAPERS:
        plot_paper(results[p], os.path.join(directory, f"compare_{p}.png"))
    print(f"wrote {md_path} and compare_<paper>.png for {', '.join(PAPERS)} in {directory}")


if __name__ == "__main__":
    try:
        run_main(main)
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
