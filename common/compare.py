"""Published vs reproduced numbers: `python -m common.compare [paper ...]` (what `make compare` runs).

Every row of `common/published/<paper>.json` is paired with the newest record in
`results/<paper>.jsonl` (written by `common.results.record`) that has the same
(model, dataset, setting, metric). The script prints one table per paper and writes
`results/RESULTS.md` (all papers) and one bar chart per paper, `results/compare_<paper>.png`.
`RESULTS_DIR` (or `--results-dir`) moves both the records it reads and the files it writes.

    python -m common.compare              # all five papers
    python -m common.compare apot dambq   # print two papers (RESULTS.md still covers all five)
"""
import argparse
import json
import math
import os
import re
import sys
import time

from common.errors import UserError, run_main
from common.results import read_records, results_dir

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


def latest_by_key(records, extra=()):
    """Newest record per (model, dataset, setting, metric) [+ extra fields]; ties go to the later line."""
    latest = {}
    for i, rec in enumerate(records):
        k = key_of(rec) + tuple(rec.get(f) for f in extra)
        order = (rec.get("timestamp", ""), i)
        if k not in latest or order >= latest[k][0]:
            latest[k] = (order, rec)
    return {k: rec for k, (_, rec) in latest.items()}


def load_records(paper, directory=None):
    try:
        return read_records(paper, directory)
    except ValueError as e:
        where = os.path.join(directory or results_dir(), f"{paper}.jsonl")
        raise UserError(f"{where} has a line that is not valid JSON ({e}); fix or delete that line")


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

def compare_paper(paper, records=None, directory=None):
    """Pair published rows with the newest records. Returns a dict used by the printers/plotter."""
    pub = load_published(paper)
    if records is None:
        records = load_records(paper, directory)
    latest = latest_by_key(records)
    # Prefer a record measured on the published split (APoT MNIST was published on 'train').
    by_split = latest_by_key([dict(r, _split=base_split(r.get("split", ""))) for r in records], extra=("_split",))
    rows, used = [], set()
    for prow in pub["rows"]:
        rec = by_split.get(key_of(prow) + (base_split(prow.get("split", "")),)) or latest.get(key_of(prow))
        if rec is not None:
            used.add(key_of(rec) + (base_split(rec.get("split", "")),))
            rec = {k: v for k, v in rec.items() if k != "_split"}
        rows.append({
            "published": prow,
            "record": rec,
            "delta": None if rec is None else rec["value"] - prow["value"],
            "notes": [] if rec is None else record_notes(rec, prow["split"]),
        })
    published_keys = {key_of(r) for r in pub["rows"]}
    measured_only = [{k: v for k, v in rec.items() if k != "_split"}
                     for k, rec in sorted(by_split.items(), key=lambda kv: tuple(map(str, kv[0])))
                     if k[:-1] not in published_keys or k not in used]
    return dict(pub, rows=rows, measured_only=measured_only, n_records=len(records))


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


def short_source(source):
    """'seed README, Results table, row 'Original' (...)' -> "seed README 'Original'"."""
    short = source.split(",")[0].strip()
    row = re.search(r"row '([^']+)'", source)
    return f"{short} '{row.group(1)}'" if row else short


def run_of(rec):
    commit = str(rec.get("commit", "unknown"))
    return f"{rec.get('script', '?')} @ {commit} {rec.get('timestamp', '')}".strip()


def footnotes_of(result):
    """Published-row notes, deduplicated: ({note: number}, [(number, note)])."""
    numbers = {}
    for entry in result["rows"]:
        note = entry["published"].get("note")
        if note and note not in numbers:
            numbers[note] = len(numbers) + 1
    return numbers, [(i, n) for n, i in numbers.items()]


COMPARE_HEADER = ("model", "dataset", "setting", "metric", "published", "source", "reproduced", "delta",
                  "n_samples", "split (pub/meas)", "run", "notes")
MEASURED_HEADER = ("model", "dataset", "setting", "metric", "value", "n_samples", "split", "run", "notes")


def table_cells(result):
    """Rows of cells for the comparison table and the measured-only table."""
    numbers, _ = footnotes_of(result)
    paired = []
    for entry in result["rows"]:
        p, rec = entry["published"], entry["record"]
        notes = list(entry["notes"])
        if p.get("note"):
            notes.append(f"see [{numbers[p['note']]}]")
        if rec is None:
            measured = ("not yet run", "-", "-", p["split"], "-")
        else:
            measured = (fmt(rec["value"]), fmt_delta(entry["delta"]), f"{rec.get('n_samples', 0):,}",
                        f"{p['split']} / {rec.get('split', '?')}", run_of(rec))
        paired.append((p["model"], p["dataset"], p["setting"], p["metric"], fmt_published(p),
                        short_source(p["source"])) + measured + ("; ".join(notes),))
    measured_only = [(r.get("model"), r.get("dataset"), r.get("setting"), r.get("metric"), fmt(r.get("value")),
                      f"{r.get('n_samples', 0):,}", r.get("split", "?"), run_of(r),
                      "; ".join(record_notes(r)))
                     for r in result["measured_only"]]
    return paired, measured_only


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


def format_text(result):
    paired, measured_only = table_cells(result)
    done = sum(1 for e in result["rows"] if e["record"] is not None)
    out = [f"== {result['paper']}: {result['title']} ({result['venue']})",
           f"   {len(result['rows'])} published rows, {done} reproduced, {result['n_records']} records"]
    if paired:
        out.append(text_table(COMPARE_HEADER, paired))
    else:
        out.append("(no published numbers; see the notes in common/published/%s.json)" % result["paper"])
    for i, note in footnotes_of(result)[1]:
        out.append(f"[{i}] {note}")
    if measured_only:
        out += ["", "measured only (no published counterpart):", text_table(MEASURED_HEADER, measured_only)]
    return "\n".join(out) + "\n"


def format_markdown(results):
    out = ["# quantlab: published vs reproduced", "",
           f"Generated by `python -m common.compare` on {time.strftime('%Y-%m-%d %H:%M:%S')} from "
           "`common/published/<paper>.json` and `results/<paper>.jsonl` (newest record per "
           "model/dataset/setting/metric). delta = reproduced - published. "
           "Runs on fewer samples than the official split (CIFAR-10 test 10,000; MNIST test 10,000; "
           "ImageNet val 50,000) show the binomial standard error sqrt(p(1-p)/n) in points.", ""]
    for result in results:
        paired, measured_only = table_cells(result)
        out += [f"## {result['paper']}: {result['title']} ({result['venue']})", ""]
        if result["notes"]:
            out += [result["notes"], ""]
        out += [md_table(COMPARE_HEADER, paired) if paired else "_No published numbers._", ""]
        notes = footnotes_of(result)[1]
        if notes:
            out += [f"[{i}] {note}  " for i, note in notes] + [""]
        out += ["**Measured only** (no published counterpart):", ""]
        out += [md_table(MEASURED_HEADER, measured_only) if measured_only else "_none_", ""]
        out += [f"![{result['paper']} top-1: published vs reproduced](compare_{result['paper']}.png)", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- chart

def _se_of(rec):
    if rec is None or not (rec.get("n_samples") or 0) > 0 or not subset_info(rec)[0]:
        return None
    return standard_error(rec["value"], rec["n_samples"])


def plot_paper(result, path):
    """Horizontal grouped bars, published vs reproduced, for the top-1 rows; a placeholder when none."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key_of(e["published"]) for e in result["rows"]]
    groups = []  # (label, published, reproduced, standard error or None)
    for entry, k in zip(result["rows"], keys):
        p, rec = entry["published"], entry["record"]
        if not is_accuracy(p["metric"]):
            continue
        label = f"{p['model']} {p['setting']} {p['dataset']}"
        if keys.count(k) > 1:
            label += f" [{short_source(p['source'])}]"
        groups.append((label, p["value"], None if rec is None else rec["value"], _se_of(rec)))
    for rec in result["measured_only"]:
        if is_accuracy(rec.get("metric")):
            groups.append((f"{rec.get('model')} {rec.get('setting')} {rec.get('dataset')} (measured only)",
                           None, rec["value"], _se_of(rec)))

    title = f"{result['paper']}: top-1 (%), published vs reproduced"
    if not groups:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{result['paper']}: no top-1 numbers to plot yet", ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return 0

    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.42 * len(groups)))
    values = [v for g in groups for v in g[1:3] if v is not None]
    lo = max(0.0, 5 * math.floor((min(values) - 3) / 5))
    hi = min(100.0, max(values) + 2)
    ys = range(len(groups))
    for y, (label, pub, rep, se) in zip(ys, groups):
        if pub is not None:
            ax.barh(y - 0.2, pub - lo, 0.4, left=lo, color="tab:blue")
            ax.text(pub, y - 0.2, f" {fmt(pub)}", va="center", fontsize=7)
        if rep is not None:
            ax.barh(y + 0.2, rep - lo, 0.4, left=lo, color="tab:orange",
                    xerr=se, error_kw={"elinewidth": 1, "capsize": 2})
            ax.text(rep + (se or 0), y + 0.2, f" {fmt(rep)}", va="center", fontsize=7)
        else:
            ax.text(lo, y + 0.2, " not yet run", va="center", fontsize=7, color="gray")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([g[0] for g in groups], fontsize=8)
    ax.set_ylim(len(groups) - 0.4, -0.6)  # first row on top
    ax.set_xlim(lo, hi + 0.08 * (hi - lo))
    ax.set_xlabel("top-1 accuracy (%); error bar = 1 binomial s.e. for subset runs")
    ax.set_title(title, loc="left", fontsize=10)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:blue"),
                       plt.Rectangle((0, 0), 1, 1, color="tab:orange")],
              labels=["published", "reproduced"], loc="lower right", bbox_to_anchor=(1, 1),
              ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(groups)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description="Compare published numbers with reproduced results.")
    parser.add_argument("papers", nargs="*", metavar="paper", help=f"any of {', '.join(PAPERS)} (default: all)")
    parser.add_argument("--results-dir", default=None,
                        help="where results/<paper>.jsonl live and RESULTS.md and charts go "
                             "(default: $RESULTS_DIR or results/)")
    parser.add_argument("--no-write", action="store_true", help="only print; do not write RESULTS.md or charts")
    args = parser.parse_args(argv)
    for p in args.papers:
        check_paper(p)
    directory = args.results_dir or results_dir()

    results = {p: compare_paper(p, directory=directory) for p in PAPERS}
    for p in args.papers or PAPERS:
        print(format_text(results[p]))
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
