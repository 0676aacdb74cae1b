"""Honest results: compare pairs the best-qualified record (full recipe, full split, newest), shows
shortened runs only as such, skips a corrupt line with file:line, shows committed reference records beside
local ones, aggregates seeds, prints command + run dir; charts start at zero and draw only measured rows."""
import json
import os

import pytest

from common import compare, compare_match
from common.results import combine_recipes, read_records, recipe_info, record


@pytest.fixture(autouse=True)
def _reference(tmp_path, monkeypatch):
    ref = tmp_path / "reference"
    monkeypatch.setenv("QUANTLAB_REFERENCE", str(ref))
    return ref


FULL = recipe_info({"epochs": (300, 300)})
SHORT = recipe_info({"epochs": (1, 300)}, limits={"train_limit": 12})
W4 = dict(model="resnet20", dataset="cifar10", setting="W4A4", metric="top1")


def rec(value, split="test", n=10000, recipe=FULL, ts="2026-01-01T00:00:00", seed=None, **kw):
    return dict(W4, value=value, split=split, n_samples=n, recipe=recipe, timestamp=ts, seed=seed,
                script="apot/CIFAR10/main.py", commit="abc", command="python main.py --bit 4",
                run_dir="/runs/apot/x", **kw)


def apot_w4(result):
    return [e for e in result["rows"] if compare.key_of(e["published"]) == tuple(W4.values())]


def test_recipe_info_says_what_was_shortened():
    assert FULL["full"] is True and FULL["summary"] == "full (epochs 300)"
    assert SHORT["full"] is False and SHORT["summary"] == "shortened: epochs 1 of 300; train_limit 12"
    both = combine_recipes(FULL, SHORT)
    assert both["full"] is False and both["summary"] == "full (epochs 300) + shortened: epochs 1 of 300; train_limit 12"
    assert combine_recipes(FULL, None)["full"] is None          # an unknown stage makes the whole unknown


def test_smoke_run_never_becomes_the_reproduction():
    # measured problem 4: a 12-image smoke run recorded last showed as "W5A5 50.0" in make compare
    records = [rec(91.0, ts="2026-01-01T00:00:00"), rec(50.0, n=12, recipe=SHORT, ts="2026-02-01T00:00:00")]
    res = compare.compare_paper("apot", records=records, reference=[])
    assert {e["record"]["value"] for e in apot_w4(res)} == {91.0}
    assert [r["value"] for r in res["shortened"]] == [50.0]
    text = compare.format_text(res)
    assert "shortened runs (not reproductions" in text and "shortened: epochs 1 of 300; train_limit 12" in text
    # only a smoke run: nothing is paired, the row stays "not yet run"
    res = compare.compare_paper("apot", records=records[1:], reference=[])
    assert all(e["record"] is None for e in apot_w4(res))
    # --include-shortened pairs it, marked
    res = compare.compare_paper("apot", records=records[1:], reference=[], include_shortened=True)
    (e, *_) = apot_w4(res)
    assert e["record"]["value"] == 50.0 and any(n.startswith("SHORTENED") for n in e["notes"])


def test_best_qualified_record_full_split_then_newest():
    records = [rec(90.0, ts="2026-01-01T00:00:00"),                      # full split, older
               rec(92.5, split="test[:1000]", n=1000, ts="2026-03-01T00:00:00"),   # subset, newer
               rec(90.5, ts="2026-02-01T00:00:00"),                      # full split, newest full
               dict(rec(99.0, ts="2026-04-01T00:00:00"), recipe=None)]   # recipe not recorded, newest
    res = compare.compare_paper("apot", records=records, reference=[])
    assert {e["record"]["value"] for e in apot_w4(res)} == {90.5}


def test_corrupt_line_is_skipped_with_file_and_line(tmp_path, capsys):
    d = tmp_path / "res"
    d.mkdir()
    good = json.dumps(rec(91.0))
    (d / "apot.jsonl").write_text(good + "\n{not json\n" + good.replace("91.0", "91.5") + "\n")
    res = compare.compare_paper("apot", directory=str(d), reference=[])
    err = capsys.readouterr().err
    assert f"{d / 'apot.jsonl'}:2:" in err and "skipped" in err
    assert res["n_records"] == 2
    compare.main(["apot", "--results-dir", str(d), "--no-write"])           # the command does not abort
    assert "apot.jsonl:2:" in capsys.readouterr().err


def test_reference_and_local_side_by_side(_reference):
    (_reference / "apot").mkdir(parents=True)
    (_reference / "apot" / "cifar10.jsonl").write_text(json.dumps(rec(92.0, seed=None)) + "\n")
    res = compare.compare_paper("apot", records=[])
    (e, *_) = apot_w4(res)
    assert e["reference"]["value"] == 92.0 and e["local"] is None and e["record"]["_origin"] == "reference"
    record("apot", "resnet20", "cifar10", "test", "W4A4", "top1", 91.0, 10000, recipe=FULL)
    res = compare.compare_paper("apot")
    (e, *_) = apot_w4(res)
    assert (e["reference"]["value"], e["local"]["value"]) == (92.0, 91.0)
    assert e["delta"] == pytest.approx(91.0 - e["published"]["value"])    # delta against the local run
    text = compare.format_text(res)
    header = next(line for line in text.splitlines() if line.startswith("#   model"))
    assert header.split()[6:8] == ["reference", "local"]
    wide = compare.format_text(res, wide=True)
    assert next(line for line in wide.splitlines() if line.startswith("model")).split()[6:8] == ["reference", "local"]
    assert "(reference): python main.py --bit 4 [run: /runs/apot/x]" in text


def test_seeds_are_aggregated():
    records = [rec(v, seed=s, ts=f"2026-01-0{s}T00:00:00") for s, v in ((1, 91.0), (2, 92.0), (3, 93.0))]
    res = compare.compare_paper("apot", records=records, reference=[])
    (e, *_) = apot_w4(res)
    st = e["record"]["_seeds"]
    assert (st["n"], st["mean"], st["min"], st["max"]) == (3, 92.0, 91.0, 93.0)
    assert st["std"] == pytest.approx(1.0)         # sample std of 91, 92, 93
    assert "92.0 ±1.00 (91.0-93.0, n=3 seeds)" in compare.format_text(res, wide=True)
    assert "92.0 ±1.00 n=3" in compare.format_text(res) and "local seeds 91.0-93.0" in compare.format_text(res)
    # evaluations of one checkpoint (no run directory) are not seeds: the newest wins
    evals = [dict(r, run_dir=None) for r in records]
    (e, *_) = apot_w4(compare.compare_paper("apot", records=evals, reference=[]))
    assert "_seeds" not in e["record"] and e["record"]["value"] == 93.0


def test_record_carries_recipe_seed_run_dir(tmp_path):
    r = record("apot", "resnet20", "cifar10", "test", "W4A4", "top1", 91.0, 1000, recipe=SHORT, seed=7,
               run_dir=str(tmp_path / "run"))
    assert (r["recipe"]["full"], r["seed"], r["run_dir"]) == (False, 7, str(tmp_path / "run"))
    assert r["host"]
    copy = [json.loads(line) for line in open(tmp_path / "run" / "records.jsonl")]
    assert copy == read_records("apot")                              # the run directory keeps a copy


def test_record_says_where_it_went(capsys):
    record("apot", "resnet10", "mnist", "train", "W4A4", "top1", 99.5667, 60000, recipe=SHORT)
    out = capsys.readouterr().out.strip().splitlines()
    path = os.path.join(os.environ["RESULTS_DIR"], "apot.jsonl")
    assert out == [f"=> recorded resnet10 W4A4 top1 99.5667 (train, 60,000 samples) in "
                   f"{os.path.relpath(path) if not os.path.relpath(path).startswith('../..') else path}"]


def test_charts_show_the_gap_about_zero_and_draw_only_measured_rows(tmp_path):
    records = [rec(91.0)]
    res = compare.compare_paper("apot", records=records, reference=[])
    out = compare.plot_paper(res, str(tmp_path / "a.png"))
    # W4A4 has two published rows (92.45 README, 92.47 checkpoint: both drawn); a checkpoint row equal to its
    # README row to two decimals is the same number published twice and is drawn (or listed) once
    twins = [e for i, e in enumerate(res["rows"])
             if any(compare.same_number(q["published"], e["published"]) for q in res["rows"][:i])]
    assert len(twins) == 10 and out["bars"] == 2 and out["not_measured"] == len(res["rows"]) - 10 - 2
    (metric, (lo, hi)), = out["panels"]
    # the gaps 91.0 - 92.47 and 91.0 - 92.45 (no error bar: the full split), 25 % room, symmetric about zero
    assert metric == "top1" and hi == pytest.approx(1.25 * (92.47 - 91.0)) and lo == -hi
    # ALQ: bits and storage beside top-1, each axis symmetric about zero
    alq = [dict(model="lenet5", dataset="mnist", setting="ALQ", metric=m, value=v, split=s, n_samples=10000,
                recipe=FULL, timestamp="2026-01-01T00:00:00")
           for m, v, s in (("top1", 99.0, "test"), ("avg_bits", 0.4, "n/a"), ("storage_KB", 23.0, "n/a"))]
    out = compare.plot_paper(compare.compare_paper("alq", records=alq, reference=[]), str(tmp_path / "b.png"))
    assert [m for m, _ in out["panels"]] == ["top1", "avg_bits", "storage_KB"]
    assert all(lo == -hi and hi > 0 for _, (lo, hi) in out["panels"])
    # rows of several datasets: a panel each, with its own axis (MNIST's small gaps are not flattened by
    # a CIFAR-10 subset's wide error bar)
    mixed = [rec(91.0), dict(model="resnet10", dataset="mnist", setting="W4A4", metric="top1", value=99.70,
                             split="train", n_samples=60000, recipe=FULL, timestamp="2026-01-01T00:00:00")]
    out = compare.plot_paper(compare.compare_paper("apot", records=mixed, reference=[]), str(tmp_path / "c.png"))
    assert out["datasets"] == ["mnist", "cifar10"] or out["datasets"] == ["cifar10", "mnist"]
    spans = dict(zip(out["datasets"], [hi for _, (_, hi) in out["panels"]]))
    assert spans["mnist"] == pytest.approx(1.25 * (99.70 - 99.64)) and spans["cifar10"] > 1.0


def test_split_difference_is_marked_in_the_chart():
    r = dict(model="resnet10", dataset="mnist", setting="W4A4", metric="top1", value=98.7, split="test",
             n_samples=10000, recipe=FULL, timestamp="2026-01-01T00:00:00")
    groups, _ = compare.chart_groups(compare.compare_paper("apot", records=[r], reference=[]))
    (label, _, _, _, differs, _, dataset), *_ = groups["top1"]
    assert dataset == "mnist" and differs and "published on train, measured on test" in label


def test_paper_without_code_is_marked(monkeypatch, tmp_path):
    # compare_paper looks has_code up in its own module, common.compare_match (common.compare re-exports both)
    monkeypatch.setattr(compare_match, "has_code", lambda paper: paper != "fdda")
    res = compare.compare_paper("fdda", records=[], reference=[])
    assert "no code in this repository yet" in compare.format_text(res)
    assert "not yet run" not in compare.format_text(res)
    assert compare.plot_paper(res, str(tmp_path / "f.png"))["bars"] == 0


def test_results_md_cites_only_what_users_can_read(tmp_path):
    # measured problem 6: RESULTS.md cited material users do not have (the seed READMEs, internal notes)
    compare.main(["--results-dir", str(tmp_path)])
    md = (tmp_path / "RESULTS.md").read_text()
    for internal in ("seed README", "Seed README", "notes §", "originals-", "../shared", "reference/dambq/logs"):
        assert internal not in md, internal
    assert "README of github.com/zqu1992/ALQ" in md


def test_seed_runs_are_listed_with_their_layer_bits_and_drawn(tmp_path):
    # seeds: compare shows mean/std/min-max/n of each metric plus each run's per-layer bit split, in the
    # table and in the chart
    def alq(metric, v, seed, bits):
        return {"paper": "alq", "model": "lenet5", "dataset": "mnist", "split": "test" if metric == "top1" else "n/a",
                "setting": "ALQ", "metric": metric, "value": v, "n_samples": 10000, "seed": seed,
                "run_dir": f"/runs/alq/lenet5-seed{seed}", "timestamp": f"2026-01-0{seed}T00:00:00",
                "recipe": {"full": True, "summary": "full"}, "command": "lenet5.py", "commit": "abc",
                "extra": {"layer_bits": {"conv1": 2.0, "conv2": 0.1 * seed, "fc1": bits, "fc2": 1.0}}}
    records = [alq(m, v, s, fc1) for s, fc1, top1, bits in ((1, 0.45, 99.1, 0.52), (2, 0.40, 99.0, 0.47))
               for m, v in (("top1", top1), ("avg_bits", bits))]
    res = compare.compare_paper("alq", records=records, reference=[])
    text = compare.format_text(res)
    assert "0.495 ±0.04 n=2" in text and "local seeds 0.47-0.52" in text     # mean of 0.52/0.47, sample std 0.0354
    runs = text.split(compare.SEED_RUNS_TITLE)[1].splitlines()
    seed2 = next(line for line in runs if " local  2 " in line.replace("    ", "  ")).split()
    assert "/runs/alq/lenet5-seed2" in compare.format_text(res, wide=True)       # the run column: --wide
    assert seed2[:8] == ["lenet5", "mnist", "ALQ", "local", "2", "0.47", "99.0", "conv1"]   # metrics in published order
    assert "conv2 0.2 fc1 0.4 fc2 1" in " ".join(seed2)
    drawn = compare.plot_paper(res, str(tmp_path / "alq.png"))
    assert drawn["layer_runs"] == 2 and drawn["panels"][-1][0] == "layer_bits"
    assert all(lo == -hi for m, (lo, hi) in drawn["panels"] if m != "layer_bits")   # gaps about zero
    assert drawn["panels"][-1][1][0] == 0                            # the layers' bits from zero
