"""The committed reference results (results/reference/<paper>/) are what `make compare` shows on a fresh clone:
every line is a record written by common.results.record with what identifies it, training runs are full
recipes with a seed and a committed log, and compare pairs them with the published rows."""
import json
import os

import pytest

from common import REPO_ROOT
from common import compare

REF = os.path.join(REPO_ROOT, "results", "reference")
FIELDS = ("paper", "script", "model", "dataset", "split", "setting", "metric", "value", "n_samples", "command",
          "commit", "timestamp", "recipe")


def _files():
    out = []
    for paper in sorted(os.listdir(REF)):
        d = os.path.join(REF, paper)
        if os.path.isdir(d):
            out += [os.path.join(paper, f) for f in sorted(os.listdir(d)) if f.endswith(".jsonl")]
    return out


@pytest.mark.parametrize("name", _files())
def test_reference_records_are_complete(name):
    paper = name.split(os.sep)[0]
    with open(os.path.join(REF, name)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert rows
    for r in rows:
        missing = [k for k in FIELDS if r.get(k) in (None, "")]
        assert not missing, (name, r.get("metric"), missing)
        assert r["paper"] == paper
    if paper == "alq":     # training runs: full recipe, a seed, the run's log next to it
        for r in rows:
            assert r["recipe"]["full"] is True and r["seed"] is not None and r["run_dir"], name
        stem = os.path.splitext(os.path.basename(name))[0]
        assert os.path.isfile(os.path.join(REF, paper, "log", stem + ".log"))
        assert {r["metric"] for r in rows} >= {"top1", "avg_bits", "storage_KB", "packed_KB"}


def test_alq_reference_seeds_pair_with_the_published_lenet5_row():
    ref = compare.load_reference("alq", directory=REF)
    runs = {r["seed"] for r in ref if r["setting"] == "ALQ" and r["metric"] == "avg_bits"}
    if not runs:
        pytest.skip("no ALQ reference run committed")
    result = compare.compare_paper("alq", records=[], reference=ref)
    row = next(e for e in result["rows"] if e["published"]["model"] == "lenet5"
               and e["published"]["metric"] == "avg_bits")
    rec = row["reference"]
    assert rec is not None and row["local"] is None
    if len(runs) > 1:
        assert rec["_seeds"]["n"] == len(runs)


def test_committed_reference_records_hold_no_absolute_paths():
    """A clone elsewhere reads them as its own: every path is relative to the repository root."""
    from common.reference import absolute_paths
    from common.results import read_jsonl
    ref = REF
    files = [os.path.join(d, f) for d, _, fs in os.walk(ref) for f in fs if f.endswith(".jsonl")]
    assert files
    bad = [(f, p) for f in files for r in read_jsonl(f) for p in absolute_paths(r)]
    assert bad == []


def test_reference_paths_are_made_relative(tmp_path, monkeypatch):
    from common import REPO_ROOT
    from common.reference import default_mapping, relative, absolute_paths
    monkeypatch.setenv("QUANTLAB_RUNS", str(tmp_path / "runs"))
    rec = {"run_dir": str(tmp_path / "runs" / "apot" / "x"),
           "command": f"python main.py --data {os.path.normpath(os.path.join(REPO_ROOT, '..', 'shared'))}/data "
                      f"--resume {REPO_ROOT}/runs/apot/x/checkpoint.pth", "extra": {"source": [f"{REPO_ROOT}/a.pth"]}}
    out = relative(rec, default_mapping())
    assert out == {"run_dir": "runs/apot/x",
                   "command": "python main.py --data ../shared/data --resume runs/apot/x/checkpoint.pth",
                   "extra": {"source": ["a.pth"]}}
    assert absolute_paths(out) == [] and absolute_paths(rec) != []


def test_committed_results_table_is_current():
    """results/reference/RESULTS.md is what `make reference-table` makes from the committed records (a fresh
    clone shows it without running anything); after adding reference records, regenerate it."""
    with open(compare.REFERENCE_TABLE) as f:
        committed = f.read()
    assert committed == compare.reference_table(), "run `make reference-table` and commit results/reference/RESULTS.md"


def test_committed_results_csv_and_charts_are_current():
    """results/reference/results.csv is what `make reference-table` makes now, and every paper has its gap chart
    beside RESULTS.md (the charts are regenerated with it; a PNG is not compared byte for byte, because
    matplotlib's rendering differs between releases and fonts)."""
    d = os.path.dirname(compare.REFERENCE_TABLE)
    results = compare.reference_results()
    with open(os.path.join(d, "results.csv")) as f:
        assert f.read() == compare.results_csv(results), "run `make reference-table` and commit results/reference/"
    with open(compare.REFERENCE_TABLE) as f:
        md = f.read()
    for p in compare.PAPERS:
        png = os.path.join(d, f"compare_{p}.png")
        assert f"](compare_{p}.png)" in md and os.path.getsize(png) < 300_000, p


def test_readme_summary_is_current():
    """The README's reference summary (rows published / measured per paper) is what `make reference-table`
    writes from the committed records now."""
    with open(compare.README) as f:
        text = f.read()
    assert text == compare.readme_with_summary(text, compare.reference_results()), \
        "run `make reference-table` and commit README.md"
    assert "| apot | 48 |" in text
