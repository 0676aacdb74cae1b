"""Run safety on FDDA (main_cosine_CBNS.py, test.py, BNScenters.py): checkpoint identity and one-line mismatches,
one run layout (runs/fdda/<name>/, the original's save_path/log_... linking the latest finished run), checks
before any data is read, honest records, and an interrupt inside an epoch that --resume continues exactly.
Generated 4-class ImageFolder, random mobilenetv2_w1 at 32 px, in-process."""
import json
import os
import shutil

import pytest
import torch

from common import interrupt, runs
from common.checkpoint import save_checkpoint
from common.errors import UserError
from test_fdda_scripts import CONF, FDDA, CaptureFixture, call
from fdda import BNScenters, main_cosine_CBNS, models
from fdda import test as fdda_test
from fdda.bns import bns_paths
from fdda.smoke_data import make

MODEL = "mobilenetv2_w1"
# 4 classes, calibration batches of 2 (two per pass over the calibration set), 2 epochs of 3 iterations, the
# student trained in the second: the calibration iterator runs out and is re-made inside that epoch
TINY = ("--img_size 32 --nEpochs 2 --iters_per_epoch 3 --warmup_epochs 1 --unfreeze_epochs 1 --test_start_epoch 0 "
        "--correct_set_epoch 0 --batchSize 2 --nThreads 0 --test_teacher false --teacher_path random").split()
LINK = "save_ImageNet/log_imagenet_bs2_lr0.1000_TELCNN_baseline_optSGD_qw4_qa4_epoch2_imganet_4bit_00_repeat"


@pytest.fixture(scope="module")
def centers(tmp_path_factory):
    """(data root, save_ImageNet dir): BNScenters.py for a random mobilenetv2_w1 on 4 generated classes."""
    return bns_centers(tmp_path_factory.mktemp("fdda_runs"), classes=4, val=1)


def bns_centers(root, classes, val, broken_val=False):
    """BNScenters.py for a random MODEL on `classes` generated classes (train 1, `val` images each, 36 px; with
    broken_val, one undecodable val image in class 1, which BNScenters.py never reads); (data, save_ImageNet)."""
    data = make(str(root / "data"), classes=classes, train=1, val=val, size=36)
    if broken_val:
        with open(os.path.join(data, "val", "c001", "broken.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n but the rest is not a PNG")
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(root)
        code, _, err = call(BNScenters.main, ["BNScenters.py", "--model_name", MODEL, "--teacher_path", "random",
                                              "--img_size", "32", "--dataPath", data], mp, CaptureFixture())
    finally:
        mp.undo()
    assert code == 0, err
    return data, str(root / "save_ImageNet")


def run_env(centers, tmp_path, monkeypatch, tiny):
    """In tmp_path with a copy of the centers' save_ImageNet: yields main_cosine_CBNS.py's argv for MODEL with
    the `tiny` flags; the run is closed after the test."""
    data, save = centers
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FDDA_DATA", data)
    shutil.copytree(save, "save_ImageNet")
    yield [os.path.join(FDDA, "main_cosine_CBNS.py"), "--model_name", MODEL, "--conf_path", CONF, "--id=0"] + tiny
    runs.end_run()


@pytest.fixture
def env(centers, tmp_path, monkeypatch):
    yield from run_env(centers, tmp_path, monkeypatch, TINY)


def train(argv, monkeypatch, capsys, f8l8=False):
    return call(main_cosine_CBNS.main, argv, monkeypatch, capsys, f8l8)


def run_dir(name):
    return os.path.join(os.environ["QUANTLAB_RUNS"], "fdda", name)


def records():
    with open(os.path.join(os.environ["RESULTS_DIR"], "fdda.jsonl")) as f:
        return [json.loads(line) for line in f]


def evaluate(path, monkeypatch, capsys, *extra, f8l8=False):
    return call(fdda_test.main, [os.path.join(FDDA, "test.py"), "--conf_path", CONF, "--model_name", MODEL,
                                 "--model_path", path, "--img_size", "32", "--nThreads", "0", *extra],
                monkeypatch, capsys, f8l8)


# ----------------------------------------------------------------------------- identity and mismatches

def test_checkpoints_carry_identity_and_mismatches_stop_with_one_line(env, monkeypatch, capsys):
    """Also: --resume refuses another recipe, bit-width, or re-created BNS centers (stale input)."""
    code, out, err = train(env + ["--name", "a"], monkeypatch, capsys)
    assert code == 0, err
    d = run_dir("a")
    sha = main_cosine_CBNS.bns_sha256("save_ImageNet", MODEL)
    for f, stage in (("model.pth", "train"), ("generator.pth", "generator"), ("checkpoint.pth", "train")):
        q = torch.load(os.path.join(d, f), weights_only=True)["quantlab"]
        assert (q["paper"], q["script"], q["model"], q["bits"], q["qa"], q["scheme"], q["stage"]) == \
            ("fdda", "fdda/main_cosine_CBNS.py", MODEL, 4, 4, "uniform", stage), f
        assert q["finished"] is True and q["recipe"]["full"] is False and q["bns_sha256"] == sha
    model = os.path.join(d, "model.pth")
    # test.py under other flags: one line naming the file's network/bits and the flags', and what fits
    for extra, f8l8, needles in ((["--qa", "5"], False, ["W4A4-F4L4 but the flags ask for W4A5-F4L5",
                                                           "--qw 4 --qa 4"]),
                                 (["--qw", "5", "--qa", "5"], False, ["4-bit uniform", "ask for fdda "
                                                                      "mobilenetv2_w1 5-bit uniform", "bits differ"]),
                                 ([], True, ["ask for fdda mobilenetv2_w1 4-bit F8L8", "pass test.py --model_name"])):
        code, _, err = evaluate(model, monkeypatch, capsys, *extra, f8l8=f8l8)
        assert code == 2 and err.count("\n") == 1, err
        for n in needles:
            assert n in err, (n, err)
    # a full-precision state dict where a quantized student is needed (the teacher's weights, say)
    torch.save(models.build(MODEL, 1000).state_dict(), "fp.pth")
    code, _, err = evaluate("fp.pth", monkeypatch, capsys)
    assert code == 2 and "is a full-precision mobilenetv2_w1 state dict" in err and err.count("\n") == 1, err
    # and a quantized student where the full-precision teacher is needed
    code, _, err = train(env + ["--name", "b", "--teacher_path", model], monkeypatch, capsys)
    assert code == 2 and "is fdda mobilenetv2_w1 4-bit uniform" in err and "ask for fdda mobilenetv2_w1 FP32" in err
    assert not os.path.exists(run_dir("b"))
    # the run's latest state (checkpoint.pth) evaluates too, with the run's recipe
    code, out, err = evaluate(os.path.join(d, "checkpoint.pth"), monkeypatch, capsys)
    assert code == 0 and "Top1 Accuracy" in out, err
    r = records()[-1]
    assert r["recipe"]["full"] is False and "nEpochs 2 of 400" in r["recipe"]["summary"]
    assert isinstance(r["seed"], int) and (r["split"], r["n_samples"]) == ("val", 4)
    # --resume of that run under another recipe or bit-width, or after its BNS centers were re-created
    code, _, err = train(env + ["--name", "a", "--resume", "--batchSize", "1"], monkeypatch, capsys)
    assert code == 2 and "was written with batchSize = 2 but this run has batchSize = 1" in err, err
    code, _, err = train(env + ["--name", "a", "--resume", "--qw", "5"], monkeypatch, capsys)
    assert code == 2 and "ask for fdda mobilenetv2_w1 5-bit" in err, err
    mean = bns_paths("save_ImageNet", MODEL)["mean"]             # as BNScenters.py --overwrite would
    m = torch.load(mean, weights_only=True)
    m[0][0][0] = m[0][0][0] + 1
    save_checkpoint(m, mean)
    code, _, err = train(env + ["--name", "a", "--resume"], monkeypatch, capsys)
    assert code == 2 and "save_ImageNet/ changed since this run started" in err, err


# ----------------------------------------------------------------------------- checks before work

@pytest.mark.parametrize("extra, needle", [
    (["--lr_S", "-1"], "lr_S = -1.0 must not be negative"), (["--momentum", "1.5"], "momentum = 1.5 is out of range"),
    (["--b1", "1"], "b1 = 1.0 is out of range"), (["--temperature", "0"], "temperature = 0.0 is out of range"),
    (["--nEpochs", "0"], "nEpochs = 0 must be at least 1"), (["--id=-1"], "--id -1 is out of range"),
    (["--resume", "--overwrite"], "only one of them"), (["--save_path", "afile/x"], "save_path afile/x cannot be"),
])
def test_bad_values_stop_before_any_data_is_read(extra, needle, env, monkeypatch, capsys):
    open("afile", "w").write("x")
    monkeypatch.setattr(main_cosine_CBNS, "imagenet_split", lambda *a: pytest.fail("data read before the checks"))
    code, _, err = train(env + extra, monkeypatch, capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not os.path.exists(os.environ["QUANTLAB_RUNS"])              # nothing made, nothing trained


def test_unwritable_outputs_stop_before_any_data_is_read(env, monkeypatch, capsys):
    open("afile", "w").write("x")
    monkeypatch.setattr(main_cosine_CBNS, "imagenet_split", lambda *a: pytest.fail("data read before the checks"))
    monkeypatch.setattr(BNScenters, "imagenet_split", lambda *a: pytest.fail("data read before the checks"))
    monkeypatch.setattr(fdda_test, "imagenet_split", lambda *a: pytest.fail("data read before the checks"))
    monkeypatch.setenv("QUANTLAB_RUNS", "afile/runs")
    code, _, err = train(env, monkeypatch, capsys)
    assert code == 2 and "QUANTLAB_RUNS" in err and "afile is a file" in err, err
    monkeypatch.setenv("RESULTS_DIR", "afile/results")
    for main, argv in ((main_cosine_CBNS.main, env),
                       (fdda_test.main, ["test.py", "--conf_path", CONF, "--model_name", MODEL, "--model_path", "x"])):
        code, _, err = call(main, argv, monkeypatch, capsys)
        assert code == 2 and "RESULTS_DIR" in err and "afile is a file" in err, err
    for extra, needle in ((["--save_path", "afile/s"], "--save_path afile/s cannot be created"),
                          (["--nClasses", "0"], "--nClasses 0 is out of range"),
                          (["--seed", "-1"], "--seed -1 is out of range")):
        code, _, err = call(BNScenters.main, ["BNScenters.py", "--model_name", MODEL, "--overwrite"] + extra,
                            monkeypatch, capsys)
        assert code == 2 and needle in err, err


# ----------------------------------------------------------------------------- run layout, records

def test_runs_never_overwrite_each_other_and_the_original_path_links_the_latest(env, monkeypatch, capsys):
    short = env + ["--nEpochs", "1", "--iters_per_epoch", "1", "--warmup_epochs", "0"]
    link = LINK.replace("_epoch2_", "_epoch1_")
    code, out, err = train(short, monkeypatch, capsys)          # the documented command: an auto-named run
    assert code == 0, err
    (auto,) = os.listdir(os.path.join(os.environ["QUANTLAB_RUNS"], "fdda"))
    assert auto.startswith(f"{MODEL}-W4A4-F4L4-id0-") and os.path.realpath(link) == run_dir(auto)
    code, _, err = train(short + ["--name", "a"], monkeypatch, capsys)
    assert code == 0, err
    assert os.path.realpath(link) == run_dir("a")                 # the original's path: the latest finished run
    for d in (auto, "a"):
        files = set(os.listdir(run_dir(d)))
        assert {"manifest.json", "log.txt", "checkpoint.pth", "model.pth", "generator.pth", "records.jsonl",
                "imagenet_config.hocon", "tb"} <= files
        assert len(os.listdir(os.path.join(run_dir(d), "tb"))) == 1          # one event file per run
    rec = [json.loads(line) for line in open(os.path.join(run_dir(auto), "records.jsonl"))]
    assert len(rec) == 1 and rec[0]["run_dir"] == run_dir(auto) and rec[0]["seed"] == 3
    assert (rec[0]["split"], rec[0]["n_samples"], rec[0]["dataset"]) == ("val", 4, "synthetic")
    assert rec[0]["recipe"]["full"] is False and "nEpochs 1 of 400" in rec[0]["recipe"]["summary"]
    # --name: a second run there is refused before any work, --overwrite replaces it
    stamp = os.path.getmtime(os.path.join(run_dir("a"), "model.pth"))
    code, _, err = train(short + ["--name", "a"], monkeypatch, capsys)
    assert code == 2 and "already holds a run; pass --resume" in err
    assert os.path.getmtime(os.path.join(run_dir("a"), "model.pth")) == stamp
    code, _, err = train(short + ["--name", "a", "--overwrite"], monkeypatch, capsys)
    assert code == 0 and len(os.listdir(os.path.join(run_dir("a"), "tb"))) == 1, err
    assert "invocations" not in json.load(open(os.path.join(run_dir("a"), "manifest.json")))


# ----------------------------------------------------------------------------- interrupt and exact resume

def test_interrupt_inside_an_epoch_saves_and_resume_is_exact(env, monkeypatch, capsys):
    """A signal during the first iteration of the student epoch: checkpoint.pth holds epoch 1 iteration 1 (with
    the calibration iterator's place); --resume finishes the run and student, generator, optimizers and the
    recorded top-1 equal an uninterrupted run's. Same process, same machine, same thread count: every operation
    repeats bit for bit, so exact equality is the right test here (never across machines)."""
    code, out, err = train(env + ["--name", "whole"], monkeypatch, capsys)
    assert code == 0, err
    assert "=> device" in out and "seed 3, run directory" in out and "=> whole-run estimate" in out
    assert "[epoch 2/2]" in out and "ETA" in out                   # per-epoch lines with output redirected
    whole = torch.load(os.path.join(run_dir("whole"), "checkpoint.pth"), weights_only=True)

    calls = {"n": 0}

    def requested():      # checked after every iteration and after every epoch: 3 + 1 in epoch 1, then this
        calls["n"] += 1
        return 15 if calls["n"] == 5 else None
    monkeypatch.setattr(interrupt, "requested", requested)
    code, out, err = train(env + ["--name", "cut"], monkeypatch, capsys)
    assert code == 130 and "epoch 2/2 iteration 1: resumable checkpoint saved" in err and "--resume" in err, err
    ck_path = os.path.join(run_dir("cut"), "checkpoint.pth")
    cut = torch.load(ck_path, weights_only=True)
    assert (cut["epoch"], cut["batch"], cut["interrupted"]) == (1, 1, True)
    assert cut["trainer"]["iterator"]["drawn"] == 1 and cut["quantlab"]["finished"] is False
    assert not [f for f in os.listdir(run_dir("cut")) if f.endswith(".tmp")]     # written atomically
    # the best model so far is an unfinished run's: evaluated, it is recorded as shortened
    code, _, err = evaluate(os.path.join(run_dir("cut"), "model.pth"), monkeypatch, capsys)
    assert code == 0 and "unfinished run (checkpoint after epoch 1/2)" in records()[-1]["recipe"]["summary"]

    monkeypatch.setattr(interrupt, "requested", lambda: None)
    code, out, err = train(env + ["--name", "cut", "--resume"], monkeypatch, capsys)
    assert code == 0 and "at epoch 2/2 iteration 2" in out and "[epoch 1/2]" not in out, err
    done = torch.load(ck_path, weights_only=True)
    assert done["epoch"] == 2 and "batch" not in done
    for part in ("student", "generator"):
        for k, v in whole[part].items():
            assert torch.equal(v, done[part][k]), (part, k)
    for opt in ("optimizer_S", "optimizer_G"):
        for k, st in whole["trainer"][opt]["state"].items():
            for name, t in st.items():
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(done["trainer"][opt]["state"][k][name]))
    assert done["trainer"]["step"] == whole["trainer"]["step"] == 6
    trained = [r for r in records() if r["run_dir"]]
    assert [r["value"] for r in trained if r["run_dir"] == run_dir("cut")] == \
        [r["value"] for r in trained if r["run_dir"] == run_dir("whole")]
    assert os.path.realpath(LINK) == run_dir("cut")             # the finished continuation is the latest run
    man = json.load(open(os.path.join(run_dir("cut"), "manifest.json")))
    assert len(man["invocations"]) == 1 and man["seed"] == 3


def test_unknown_resume_says_what_to_pass(env, monkeypatch, capsys):
    code, _, err = train(env + ["--resume"], monkeypatch, capsys)
    assert code == 2 and "--resume: no checkpoint.pth of a mobilenetv2_w1-W4A4-F4L4-id0 run" in err, err
    with pytest.raises(UserError, match="not found"):
        main_cosine_CBNS.plan_run(main_cosine_CBNS.make_parser(False).parse_args(
            ["--model_name", MODEL, "--resume", "nowhere.pth"]), None, "W4A4-F4L4")
