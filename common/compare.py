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

This module is the command line and what it writes (RESULTS.md, results.csv, the README summary); the work
is in common.compare_records (published tables and records), common.compare_match (pairing, seed
statistics), common.compare_text (terminal and markdown tables) and common.compare_chart (the charts). The
first two hold no reporting and import none of the others.
"""
import argparse
import csv
import io
import os
import sys

from common import REPO_ROOT
from common.compare_chart import plot_paper
from common.compare_match import compare_paper
from common.compare_records import PAPERS, check_paper, load_reference, recipe_text
from common.compare_text import format_markdown, format_text, short_source
from common.errors import UserError, run_main
from common.paths import REFERENCE_DIR
from common.results import results_dir

# Every name of the four modules behind this one stays importable from common.compare (papers and tests read
# them here).
from common.compare_chart import CHART_METRICS, CHART_UNITS, chart_groups, layer_rows  # noqa: F401 - re-exported
from common.compare_match import (  # noqa: F401 - re-exported
    best_record, companion, fmt, fmt_value, quality, same_number, seed_runs, seed_stats)
from common.compare_records import (  # noqa: F401 - re-exported
    FULL_SPLIT_SIZE, KEY_FIELDS, PUBLISHED_DIR, ROW_FIELDS, base_split, has_code, is_accuracy, key_of,
    latest_by_key, load_published, load_records, recipe_full, record_notes, standard_error, subset_info)
from common.compare_text import (  # noqa: F401 - re-exported
    COMPACT_HEADER, COMPACT_MEASURED, COMPARE_HEADER, MEASURED_HEADER, PAPER_REPOS, SEED_RUNS_TITLE, commands_of,
    compact_cells, fmt_delta, fmt_published, fmt_value_short, footnotes_of, format_wide, how_run, md_table,
    not_run_text, readable, run_of, seed_run_cells, short_split, table_cells, text_table)
from common.paths import reference_dir  # noqa: F401 - also read as common.compare.reference_dir

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
