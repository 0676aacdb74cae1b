"""common/published/*.json (the published numbers) and common.compare (`make compare`).

The seed READMEs in ../shared are parsed with a small markdown-table parser: every number they print
must be in the published data with the right key and value. The expected row counts are hard-coded as
well, so dropping a row fails even where ../shared is absent.
"""
import json
import math
import os
import re

import pytest
import torch

from conftest import REPO, require_shared, run_script
from test_layout import common_graph
from common import compare
from common.errors import UserError
from common.results import record, results_dir

PUBLISHED = os.path.join(REPO, "common", "published")


@pytest.fixture(autouse=True)
def _no_reference(tmp_path, monkeypatch):
    """The committed results/reference/ records stay out of these tests (they set their own)."""
    monkeypatch.setenv("QUANTLAB_REFERENCE", str(tmp_path / "reference"))
PAPERS = ("apot", "alq", "dambq", "alignq", "fdda")
# All rows / rows taken from the seed README's own table.
EXPECTED_ROWS = {"apot": 48, "alq": 12, "dambq": 10, "alignq": 0, "fdda": 16}  # dambq: 4 README rows + 6 from the authors' train.log
EXPECTED_SEED_ROWS = {"apot": 0, "alq": 12, "dambq": 4, "alignq": 0, "fdda": 16}

REQUIRED = {"model": str, "dataset": str, "setting": str, "metric": str, "value": (int, float),
            "split": str, "source": str}
OPTIONAL = {"as_published": str, "unit": str, "note": str}
FDDA_NAMES = {"resnet18": "resnet18", "mobilenetv1": "mobilenet_w1", "mobilenetv2": "mobilenetv2_w1",
              "regnetx600m": "regnetx_600m"}


def published(paper):
    with open(os.path.join(PUBLISHED, f"{paper}.json")) as f:
        return json.load(f)


def seed_rows(paper):
    return [r for r in published(paper)["rows"] if r["source"].startswith("seed README")]


def find(paper, **key):
    rows = [r for r in published(paper)["rows"] if all(r[k] == v for k, v in key.items())]
    assert rows, f"{paper}: no published row with {key}"
    return rows


# ----------------------------------------------------------------------------- published data

def test_published_schema():
    for paper in PAPERS:
        data = published(paper)
        assert set(data) == {"paper", "title", "venue", "notes", "rows"}, paper
        assert data["paper"] == paper and data["title"] and data["venue"] and data["notes"]
        seen = set()
        for row in data["rows"]:
            assert set(REQUIRED) <= set(row) <= set(REQUIRED) | set(OPTIONAL), (paper, row)
            for k, typ in {**REQUIRED, **OPTIONAL}.items():
                if k in row:
                    assert isinstance(row[k], typ) and not isinstance(row[k], bool), (paper, k, row)
            assert math.isfinite(row["value"])
            assert row["model"] == row["model"].lower() and " " not in row["model"]
            assert row["dataset"] in {"mnist", "cifar10", "imagenet"}, row
            # top1_best: DAMBQ's best epoch; avg_bits_wgt/_act: DAMBQ's separate weight/activation bit averages
            assert row["metric"] in {"top1", "top1_best", "avg_bits", "avg_bits_wgt", "avg_bits_act",
                                     "storage_KB"}, row
            assert re.fullmatch(r"FP32|ALQ|W\d+(\.\d+)?A\d+(\.\d+)?(-uniform|-F\dL\d)?", row["setting"]), row
            if row["metric"].startswith("top1"):
                assert 0 < row["value"] <= 100 and row["split"] in {"test", "train", "val"}, row
            else:
                assert row["split"] == "n/a", row
            ident = (compare.key_of(row), row["source"])
            assert ident not in seen, f"{paper}: duplicate row {ident}"
            seen.add(ident)


def test_published_row_counts():
    for paper in PAPERS:
        assert len(published(paper)["rows"]) == EXPECTED_ROWS[paper], paper
        assert len(seed_rows(paper)) == EXPECTED_SEED_ROWS[paper], paper
    assert "could not" in published("alignq")["notes"]  # empty on purpose, and says why


def test_published_conventions():
    # ALQ storage in KB with 1 MB = 1000 KB, said in the notes
    assert find("alq", model="vgg", metric="storage_KB")[0]["value"] == 1290.0
    assert "1 MB = 1000 KB" in published("alq")["notes"]
    # DAMBQ: paper row and repo row per setting, the repo row flagged as the last epoch
    for setting in ("W4A4", "W2.0A2.0"):
        rows = find("dambq", setting=setting, metric="top1")
        assert len(rows) == 2 and len({r["source"] for r in rows}) == 2
        repo = [r for r in rows if "This repo" in r["source"]]
        assert len(repo) == 1 and "last epoch" in repo[0]["note"]
    # APoT: MNIST numbers were measured on the training split
    assert {r["split"] for r in find("apot", dataset="mnist")} == {"train"}
    assert find("apot", model="resnet20", setting="W3A3", value=92.49)  # README
    assert find("apot", model="resnet20", setting="W3A3", value=92.51)  # checkpoint best_prec


# ----------------------------------------------------------------------------- seed READMEs

def md_tables(text):
    """Markdown tables in `text` as lists of rows of stripped cells (separator rows dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if "|" in line and not line.lstrip().startswith(("```", "$")):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


NUMBER = re.compile(r"(\d+(?:\.\d+)?)(%|KB|MB)?")


def seed_numbers(paper):
    text = open(require_shared("seeds", f"{paper}-README.md")).read()
    tables = md_tables(text)
    cells = [c for t in tables for row in t[1:] for c in row if NUMBER.fullmatch(c)]
    return tables, cells


def test_md_tables_parser():
    text = "x\nA|B\n:---:|:---:\n1|2.5KB\n\n| h | v |\n| - | - |\n| a | 70.1% |\n| --- | --- |\n"
    assert md_tables(text) == [[["A", "B"], ["1", "2.5KB"]], [["h", "v"], ["a", "70.1%"]]]


def test_every_seed_readme_number_is_published():
    for paper in PAPERS:
        _, cells = seed_numbers(paper)
        assert len(cells) == EXPECTED_SEED_ROWS[paper], (paper, cells)
        printed = {r.get("as_published") for r in seed_rows(paper)}
        for cell in cells:
            assert cell in printed, f"{paper}: seed README number {cell!r} is not in common/published"


def test_seed_readme_numbers_have_the_right_keys():
    tables, _ = seed_numbers("alq")
    (alq,) = tables
    assert alq[0] == ["Model", "Weight Bitwidth", "Weight Storage", "Top-1(%)"]
    for name, bits, storage, top1 in alq[1:]:
        m = name.lower()
        assert find("alq", model=m, metric="avg_bits")[0]["value"] == float(bits)
        num, unit = NUMBER.fullmatch(storage).groups()
        kb = float(num) * (1000 if unit == "MB" else 1)
        assert find("alq", model=m, metric="storage_KB")[0]["value"] == pytest.approx(kb)   # 1.29 * 1000: decimal
        assert find("alq", model=m, metric="top1", setting="ALQ")[0]["value"] == float(top1)

    tables, _ = seed_numbers("dambq")
    (dambq,) = tables
    settings = dambq[0][1:]
    assert settings == ["W4A4", "W2.0A2.0"]
    for label, *values in dambq[1:]:
        for setting, v in zip(settings, values):
            rows = [r for r in find("dambq", model="resnet20", dataset="cifar10", setting=setting)
                    if f"row '{label}'" in r["source"]]
            assert len(rows) == 1 and rows[0]["value"] == float(v), (label, setting)

    tables, _ = seed_numbers("fdda")
    (fdda,) = tables
    assert fdda[0][:2] == ["Model", "Bit-width"]
    for name, setting, dataset, acc in fdda[1:]:
        (row,) = find("fdda", model=FDDA_NAMES[name], setting=setting, dataset=dataset.lower())
        assert row["value"] == float(acc.rstrip("%")) and row["as_published"] == acc

    for paper in ("apot", "alignq"):  # no tables: their numbers come from elsewhere (see the notes)
        assert seed_numbers(paper) == ([], [])


def test_apot_checkpoint_rows_match_the_checkpoints():
    root = require_shared("checkpoints", "apot")
    for bit, setting in [(32, "FP32"), (4, "W4A4"), (3, "W3A3"), (2, "W2A2")]:
        ck = torch.load(os.path.join(root, "cifar10", f"res20_{bit}bit", "model_best.pth.tar"),
                        map_location="cpu", weights_only=True)
        (row,) = [r for r in find("apot", model="resnet20", setting=setting)
                  if r["source"].startswith(f"checkpoint res20_{bit}bit/")]
        assert row["value"] == pytest.approx(ck["best_prec"], abs=1e-4)   # JSON keeps 2 decimals, e.g. 92.96
    for bit in (2, 3, 4, 5):
        for suffix, setting in (("", f"W{bit}A{bit}"), ("_uniform", f"W{bit}A{bit}-uniform")):
            ck = torch.load(os.path.join(root, "mnist", f"resnet10_{bit}bit{suffix}", "model_best.pth.tar"),
                            map_location="cpu", weights_only=True)
            (row,) = [r for r in find("apot", model="resnet10", setting=setting)
                      if r["source"].startswith(f"checkpoint resnet10_{bit}bit{suffix}/")]
            # best_acc1 is a float32 tensor (99.6367 -> 99.63670349): 1e-4 covers fl32 vs the JSON's decimal
            assert row["value"] == pytest.approx(float(ck["best_acc1"]), abs=1e-4)
            assert row["split"] == "train"


# ----------------------------------------------------------------------------- compare

def test_standard_error():
    assert compare.standard_error(92.0, 1000) == pytest.approx(100 * math.sqrt(0.92 * 0.08 / 1000))
    assert 0.8 < compare.standard_error(92.0, 1000) < 0.9  # "about 0.85 points" for 1,000 CIFAR images
    assert compare.standard_error(100.0, 1000) == 0.0


def test_newest_record_wins_by_timestamp_not_file_order():
    base = dict(model="resnet20", dataset="cifar10", setting="W4A4", metric="top1", split="test",
                n_samples=10000, script="dambq/main_cifar10.py", commit="abc")
    records = [dict(base, value=92.0, timestamp="2025-01-02T00:00:00"),
               dict(base, value=91.0, timestamp="2025-01-01T00:00:00")]
    res = compare.compare_paper("dambq", records=records)
    assert {e["record"]["value"] for e in res["rows"] if e["record"]} == {92.0}


def test_records_round_trip_into_tables_and_files():
    # 'record' writes into the per-test RESULTS_DIR (conftest)
    record("dambq", "resnet20", "cifar10", "test[:1000]", "W4A4", "top1", 91.5, 1000, script="dambq/x.py")
    record("dambq", "resnet20", "cifar10", "test[:1000]", "W4A4", "top1", 92.3, 1000, script="dambq/x.py")
    record("dambq", "resnet20", "cifar10", "test", "W3A3", "top1", 90.25, 10000, script="dambq/x.py")
    record("apot", "resnet10", "mnist", "test", "W4A4", "top1", 99.5, 10000, script="apot/m.py")
    record("alq", "lenet5", "mnist", "test", "ALQ", "top1", 99.1, 10000, script="alq/lenet5.py")

    res = compare.compare_paper("dambq")
    w4 = [e for e in res["rows"] if e["published"]["setting"] == "W4A4" and e["published"]["metric"] == "top1"]
    assert [e["record"]["value"] for e in w4] == [92.3, 92.3]  # newest record, paired with both rows
    # the rows of metrics nothing recorded (best epoch, bit averages) stay unpaired
    assert all(e["record"] is None for e in res["rows"] if e["published"]["metric"] != "top1")
    assert sorted(round(e["delta"], 2) for e in w4) == [-0.41, -0.15]  # vs 92.71 (repo) and 92.45 (paper)
    assert all(e["record"] is None for e in res["rows"] if e["published"]["setting"] == "W2.0A2.0")
    se = compare.standard_error(92.3, 1000)
    assert all(f"s.e. ±{se:.2f}" in e["notes"][0] and "n=1,000 of 10,000" in e["notes"][0] for e in w4)
    assert [r["setting"] for r in res["measured_only"]] == ["W3A3"]

    text = compare.format_text(res)
    assert text.count("not yet run") == 2 + 6          # W2.0A2.0 top1 x2, and the 6 train.log rows
    for s in ("92.3", "-0.15", "-0.41", "±0.84", "measured only", "W3A3", "90.25"):
        assert s in text, s
    assert max(len(line) for line in text.splitlines()) <= 120   # the terminal view fits a terminal
    wide = compare.format_text(res, wide=True)
    assert "dambq/x.py" in wide and "dambq/x.py" not in text.split("commands and run directories")[0]

    apot = compare.format_text(compare.compare_paper("apot"))
    assert "split differs: published on 'train', measured on 'test'" in apot
    alq = compare.compare_paper("alq")
    (top1,) = [e for e in alq["rows"] if e["record"]]
    assert top1["delta"] == 0.0 and top1["notes"] == ["recipe not recorded"]  # full test set: no subset note

    compare.main([])
    out = results_dir()
    md = open(os.path.join(out, "RESULTS.md")).read()
    for paper in PAPERS:
        assert f"## {paper}:" in md and f"compare_{paper}.png" in md
        with open(os.path.join(out, f"compare_{paper}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| resnet20 | cifar10 | W4A4 | top1 | 92.45 |" in md and "| - | 92.3 | -0.15 | 1,000 |" in md
    not_run = md.count("not yet run") + md.count("no code in this repository yet")
    assert not_run == sum(EXPECTED_ROWS.values()) - 2 - 2 - 1  # dambq 2, apot 2, alq 1


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="unknown paper"):
        compare.compare_paper("resnet")

    r = run_script(["-m", "common.compare", "apot", "nosuchpaper"], cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: unknown paper 'nosuchpaper'")
    assert r.stdout == ""


def test_prefers_record_on_published_split():
    # APoT's MNIST numbers were published on the training split: a train-split record pairs with them even
    # when a newer test-split record exists; the test-split record is still listed as measured only.
    from common.compare import compare_paper
    from common.results import record
    record("apot", "resnet10", "mnist", "train", "W4A4", "top1", 99.6383, 60000)
    record("apot", "resnet10", "mnist", "test", "W4A4", "top1", 98.77, 10000)
    res = compare_paper("apot")
    rows = [r for r in res["rows"] if r["published"]["model"] == "resnet10" and r["published"]["setting"] == "W4A4"
            and r["published"]["dataset"] == "mnist"]
    assert rows and all(r["record"]["split"] == "train" and r["record"]["value"] == 99.6383 for r in rows)
    assert [m["value"] for m in res["measured_only"] if m["model"] == "resnet10"] == [98.77]


def _mnist_run(split, seed, value, n):
    return {"paper": "apot", "script": "apot/MNIST/main.py", "model": "resnet10", "dataset": "mnist",
            "split": split, "setting": "W4A4", "metric": "top1", "value": value, "n_samples": n,
            "extra": {"protocol": "published" if split == "train" else "test split, last epoch"},
            "recipe": {"full": True, "summary": "full (epochs 25)"}, "seed": seed,
            "run_dir": f"runs/apot/mnist-resnet10_4bit-seed{seed}", "timestamp": f"2026-12-07T0{seed}:00:00"}


def test_mnist_runs_pair_on_the_published_protocol_with_the_test_split_beside():
    recs = [_mnist_run("train", s, v, 60000) for s, v in ((1, 99.6), (2, 99.7), (3, 99.8))]
    recs += [_mnist_run("test", s, v, 10000) for s, v in ((1, 99.1), (2, 99.2), (3, 99.3))]
    res = compare.compare_paper("apot", records=recs, reference=[])
    rows = [e for e in res["rows"] if e["published"]["model"] == "resnet10" and e["published"]["setting"] == "W4A4"
            and e["published"]["source"].startswith("APoT MNIST")]
    assert len(rows) == 1
    e = rows[0]
    st = e["record"]["_seeds"]
    assert (st["n"], e["record"]["split"]) == (3, "train")
    assert st["mean"] == pytest.approx(99.7) and st["std"] == pytest.approx(0.1)       # sample std, n - 1
    assert e["delta"] == pytest.approx(99.7 - 99.64)
    assert any(n.startswith("test split, last epoch: 99.2 ±0.10 (99.1-99.3, n=3 seeds)")
               for n in e["notes"]), e["notes"]
    assert not [r for r in res["measured_only"] if r.get("dataset") == "mnist"]   # the test runs sit beside the row


# The report (tables, markdown, charts, the command line) reads the library; the library never imports the
# report, so a training script that reads a published table does not load it.
REPORT = {"common.compare", "common.compare_text", "common.compare_chart"}


def report_imports(root=REPO):
    """['<module> imports <report module>'] for every common module outside REPORT that imports one."""
    return sorted(f"{m} imports {r}" for m, deps in common_graph(root).items() if m not in REPORT
                  for r in sorted(deps & REPORT))


def test_the_library_never_imports_the_report():
    assert report_imports() == []
    assert {"common.compare_records", "common.compare_match"} <= set(common_graph(REPO))   # the library is seen


def test_the_report_check_sees_a_library_module_importing_the_report(tmp_path):
    tree = {"__init__.py": "", "compare_text.py": "from common.compare_match import fmt\n",
            "compare_match.py": "def fmt(v):\n    from common import compare_chart\n",   # a function-level import
            "compare_chart.py": "import common.compare_text\n"}
    os.makedirs(tmp_path / "common")
    for name, text in tree.items():
        (tmp_path / "common" / name).write_text(text)
    assert report_imports(str(tmp_path)) == ["common.compare_match imports common.compare_chart"]
