"""FDDA's bad input, table-driven: one line on stderr, exit 2, no traceback, checked before any work (the
`before` column: "args" = before any data is read or network built, "data" = after the ImageNet folder and
the BNS centers are read, before the teacher and student are built), and nothing written: no run directory,
no record, no save_path link, no BNS-center folder. Plus the legitimate input that is handled instead of
refused: an undecodable validation image is skipped, named once and counted in the record.
Generated 3-class ImageFolder, random mobilenetv2_w1 at 32 px, in-process."""
import json
import os
import shutil
import subprocess

import pytest
import torch

from test_fdda_scripts import CONF, FDDA, CaptureFixture, call
from test_runs_fdda import bns_centers, run_env
from fdda import BNScenters, dataloader, main_cosine_CBNS, models
from fdda import test as fdda_test
from fdda.bns import RECORD_FILE, bns_paths, check_centers, load_bns_centers
from fdda.smoke_data import make

MODEL = "mobilenetv2_w1"
TINY = ("--img_size 32 --nEpochs 2 --iters_per_epoch 1 --warmup_epochs 1 --unfreeze_epochs 1 --test_start_epoch 0 "
        "--correct_set_epoch 0 --batchSize 2 --nThreads 0 --test_teacher false --teacher_path random").split()


@pytest.fixture(scope="module")
def centers(tmp_path_factory):
    """(data root, save_ImageNet dir): BNScenters.py for a random mobilenetv2_w1 at 32 px on 3 generated
    classes, one validation image of class 1 being undecodable (BNScenters.py reads train/ only)."""
    return bns_centers(tmp_path_factory.mktemp("fdda_bad"), classes=3, val=2, broken_val=True)


@pytest.fixture
def env(centers, tmp_path, monkeypatch):
    yield from run_env(centers, tmp_path, monkeypatch, TINY)


def no_record_of_the_centers():
    os.remove(os.path.join("save_ImageNet", RECORD_FILE.format(m=MODEL)))


def other_layer_shape():
    """Old centers (no record) whose BN layer 3 statistics have another channel count than the network's."""
    no_record_of_the_centers()
    for key in ("mean", "var"):
        p = bns_paths("save_ImageNet", MODEL)[key]
        d = torch.load(p, weights_only=True)
        for c in d:
            d[c][c][3] = torch.zeros(7)
        torch.save(d, p)


def write(name, text):
    with open(name, "w") as f:
        f.write(text)


T, B, E = "train", "bns", "test"          # main_cosine_CBNS.py, BNScenters.py, test.py
CASES = [  # (script, extra argv, setup, needle, before)
    # a. warm-up of the whole run: the student would never be trained
    (T, ["--warmup_epochs", "5", "--nEpochs", "1"], None, "warmup_epochs = 5 >= nEpochs = 1: the student is trained "
                                                          "from epoch warmup_epochs + 1 on", "args"),
    (T, ["--warmup_epochs", "2", "--nEpochs", "2"], None, "pass --warmup_epochs 0 (the published 50 of 400 epochs, "
                                                          "scaled)", "args"),
    # b. an image size the network cannot take, or centers made at another size / for another network
    (T, ["--model_name", "resnet18", "--img_size", "64"], None, "img_size = 64 does not fit resnet18: its forward "
                                                                "fails on 64 x 64 images", "args"),
    (T, ["--img_size", "64"], None, "BNS centers in ./save_ImageNet/ were made from 32 px images", "data"),
    (T, [], other_layer_shape, "hold statistics of (7,) values for BN layer 3 (class 0) but mobilenetv2_w1's BN "
                               "layer 3 has 96 channels", "data"),
    (B, ["--model_name", "resnet18", "--img_size", "64", "--save_path", "new"], None,
     "--img_size 64 does not fit resnet18", "args"),
    (E, ["--model_name", "resnet18", "--img_size", "64"], None, "img_size = 64 does not fit resnet18", "args"),
    # d. already handled before; kept so
    (T, ["--lr_S", "nan"], None, "lr_S = nan is not a finite number", "args"),
    (T, ["--lr_G", "inf"], None, "lr_G = inf is not a finite number", "args"),
    (T, ["--lr_S", "-1"], None, "lr_S = -1.0 must not be negative", "args"),
    (T, ["--momentum", "1.5"], None, "momentum = 1.5 is out of range", "args"),
    (T, ["--b1", "1"], None, "b1 = 1.0 is out of range", "args"),
    (T, ["--temperature", "0"], None, "temperature = 0.0 is out of range", "args"),
    (T, ["--nEpochs", "0"], None, "nEpochs = 0 must be at least 1", "args"),
    (T, ["--qw", "1"], None, "qw = 1 is not supported", "args"),
    (T, ["--img_size", "34"], None, "img_size = 34 must be a multiple of 4", "args"),
    (T, ["--test_start_epoch", "-2"], None, "test_start_epoch = -2 must be -1", "args"),
    (T, ["--opt_type", "Adam"], None, "only \"SGD\" (Nesterov) is implemented", "args"),
    (T, ["--nGPU", "2"], None, "nGPU = 2: one GPU per process", "args"),
    (T, ["--id=-1"], None, "--id -1 is out of range", "args"),
    (T, ["--resume", "--overwrite"], None, "only one of them", "args"),
    (T, ["--model_name", "vgg16"], None, "unknown --model_name 'vgg16'", "args"),
    (T, ["--conf_path", "bad.hocon"], lambda: write("bad.hocon", "qw = [4\n"), "does not parse as HOCON", "args"),
    (T, ["--conf_path", "odd.hocon"], lambda: write("odd.hocon", "qw = 4\nfoo = 1\n"), "unknown key 'foo'", "args"),
    (T, ["--save_path", "afile/x"], lambda: write("afile", "x"), "save_path afile/x cannot be", "args"),
    (T, ["--save_path", "elsewhere"], None, "BNS-center file elsewhere/mobilenetv2_w1_mean_Categorical_bs_1.pickle "
                                            "is missing", "data"),
    (B, ["--model_name", MODEL, "--img_size", "16", "--save_path", "new"], None, "--img_size 16 is out of range",
     "args"),
    (B, ["--model_name", MODEL, "--seed", "-1", "--save_path", "new"], None, "--seed -1 is out of range", "args"),
    (B, ["--model_name", MODEL], None, "already exists (BNS centers of mobilenetv2_w1", "args"),
    (E, ["--model_name", MODEL, "--img_size", "32"], None, "student model not found: missing.pth", "args"),
]


def argv_of(script, extra, base):
    if script == T:
        return base + extra
    if script == B:
        return ["BNScenters.py", "--teacher_path", "random"] + extra
    return ["test.py", "--conf_path", CONF, "--model_path", "missing.pth"] + extra


@pytest.mark.parametrize("script, extra, setup, needle, before", CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_refused_in_one_line_before_any_work(script, extra, setup, needle, before, env, monkeypatch, capsys):
    if setup:
        setup()
    saved = sorted(os.listdir("save_ImageNet"))

    def fail(what):
        return lambda *a, **k: pytest.fail(f"{what} before the check that refuses {extra}")
    if before == "args":
        for mod in (main_cosine_CBNS, BNScenters, fdda_test):
            monkeypatch.setattr(mod, "imagenet_split", fail("data read"))
    monkeypatch.setattr(models, "build_teacher", fail("teacher built"))
    monkeypatch.setattr(models, "build_student", fail("student built"))
    main = {T: main_cosine_CBNS.main, B: BNScenters.main, E: fdda_test.main}[script]
    code, out, err = call(main, argv_of(script, extra, env), monkeypatch, capsys)
    assert code == 2, (code, out[-500:], err[-500:])
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err
    assert not os.path.exists(os.environ["QUANTLAB_RUNS"])              # no run directory
    assert not os.path.exists(os.environ["RESULTS_DIR"])                # no record
    assert sorted(os.listdir("save_ImageNet")) == saved                 # no log_... link, no new centers
    assert not os.path.exists("new")                                    # BNScenters.py made no folder


# ----------------------------------------------------------------------------- b: the centers' record

def test_the_centers_record_says_what_they_were_made_for(env):
    """check_centers reads <model>_BNScenters.json only while its sha256 are those of the four files; without
    it (the authors' pickles) the shapes are checked and the note says the image size cannot be."""
    rec = json.load(open(os.path.join("save_ImageNet", RECORD_FILE.format(m=MODEL))))
    assert (rec["model_name"], rec["img_size"]) == (MODEL, 32)
    channels = models.check_input_size(MODEL, 32)
    mean, var, _, _ = load_bns_centers("save_ImageNet", MODEL, 52)
    assert "made from 32 px images" in check_centers("save_ImageNet", MODEL, 32, channels, mean, var)
    # the record of another network (the files renamed from another model's) is refused
    p = os.path.join("save_ImageNet", RECORD_FILE.format(m=MODEL))
    json.dump(dict(rec, model_name="regnetx_600m"), open(p, "w"))
    with pytest.raises(main_cosine_CBNS.UserError, match="were made for regnetx_600m"):
        check_centers("save_ImageNet", MODEL, 32, channels, mean, var)
    # files replaced since the record was written: the record no longer describes them
    json.dump(dict(rec, sha256=dict(rec["sha256"], mean="0" * 64)), open(p, "w"))
    note = check_centers("save_ImageNet", MODEL, 64, channels, mean, var)
    assert "missing or not theirs" in note and "image size cannot be checked" in note
    no_record_of_the_centers()
    assert "missing or not theirs" in check_centers("save_ImageNet", MODEL, 64, channels, mean, var)


def test_the_input_size_check_draws_nothing():
    """check_input_size builds a throw-away network: torch's random stream is left as it was (a training run's
    draws are the original's, DEVIATIONS.md 12)."""
    torch.manual_seed(5)
    before = torch.get_rng_state()
    assert len(models.check_input_size(MODEL, 32)) == 52
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------- c: undecodable val images

def test_an_undecodable_val_image_is_skipped_named_once_and_counted(env, monkeypatch, capsys):
    """The teacher's evaluation (before training) and each epoch's evaluation meet the file: it is named once,
    left out of the accuracy and counted in the records of the run and of test.py."""
    data = os.environ["FDDA_DATA"]
    broken = os.path.join(data, "val", "c001", "broken.png")
    dataloader._REPORTED.discard(broken)                               # as in a fresh process
    argv = env + ["--nEpochs", "2", "--warmup_epochs", "1", "--test_teacher", "true", "--name", "r"]
    code, out, err = call(main_cosine_CBNS.main, argv, monkeypatch, capsys)
    assert code == 0, err
    said = out + err
    assert said.count(broken) == 1 and "cannot be decoded" in said and "skipped" in said, said
    assert "on 6 val images (1 unreadable, skipped)" in out                   # the teacher's evaluation
    assert out.count("1 unreadable image(s) skipped]") == 2                   # both epochs
    assert broken in open(os.path.join(os.environ["QUANTLAB_RUNS"], "fdda", "r", "log.txt")).read()
    (rec,) = [json.loads(line) for line in open(os.path.join(os.environ["RESULTS_DIR"], "fdda.jsonl"))]
    assert rec["n_samples"] == 6 and rec["extra"]["skipped_unreadable"] == 1
    dataloader._REPORTED.discard(broken)
    code, out, err = call(fdda_test.main, ["test.py", "--conf_path", CONF, "--model_name", MODEL, "--model_path",
                                           os.path.join(os.environ["QUANTLAB_RUNS"], "fdda", "r", "model.pth"),
                                           "--img_size", "32", "--nThreads", "0"], monkeypatch, capsys)
    assert code == 0 and err.count(broken) == 1 and "(6 val images; 1 unreadable, skipped)" in out, err
    rec = [json.loads(line) for line in open(os.path.join(os.environ["RESULTS_DIR"], "fdda.jsonl"))][-1]
    assert rec["n_samples"] == 6 and rec["extra"]["skipped_unreadable"] == 1


def test_skip_unreadable_guards_decoding_only(tmp_path):
    """Garbage, a truncated PNG and an empty file are skipped, also through DataLoader workers (the stand-in is
    picklable); a set of which nothing decodes is one error line; an error of the transform is not hidden."""
    from common.data import imagenet
    from fdda.distributed import Dist
    from fdda.trainer_DBNS_CBNS import evaluate
    data = make(str(tmp_path / "d"), classes=2, train=1, val=2, size=36)
    good = os.path.join(data, "val", "c000", "img000.png")
    raw = open(good, "rb").read()
    for name, content in (("garbage.png", b"not an image"), ("cut.png", raw[:len(raw) // 2]), ("empty.png", b"")):
        with open(os.path.join(data, "val", "c001", name), "wb") as f:
            f.write(content)
    val = dataloader.SkipUnreadable(imagenet(data, "val", dataloader.test_transform(32)))
    said = []
    for workers in (0, 1):
        dataloader._REPORTED.clear()
        top1, top5, n, skipped = evaluate(models.build(MODEL, 2).eval(), dataloader.loader(val, 3, False, workers),
                                          torch.device("cpu"), Dist(), say=said.append)
        assert (n, skipped) == (4, 3) and 0 <= top1 <= 100
    assert sorted(os.path.basename(m.split()[3]) for m in said) == sorted(["cut.png", "empty.png", "garbage.png"] * 2)
    only_bad = dataloader.SkipUnreadable(imagenet(data, "val", dataloader.test_transform(32)))
    only_bad.dataset.samples[:] = [s for s in only_bad.samples if "img" not in s[0]]
    only_bad.dataset.targets = [1, 1, 1]
    with pytest.raises(main_cosine_CBNS.UserError, match="none of the 3 validation images can be decoded"):
        evaluate(models.build(MODEL, 2).eval(), dataloader.loader(only_bad, 2, False), torch.device("cpu"), Dist(),
                 say=said.append)
    val.dataset.transform = lambda img: 1 / 0
    with pytest.raises(ZeroDivisionError):
        val[0]


# ----------------------------------------------------------------------------- a: reproduce.sh's short forms

def test_reproduce_short_forms_pass_a_warmup_that_trains_the_student(tmp_path):
    """EPOCHS=N passes warmup_epochs = N * 50 / 400 (the published share), which main_cosine_CBNS.py accepts;
    EPOCHS that is not a whole number is refused before anything runs. The script runs from a copy with a
    stand-in python that logs its arguments and stops at the training step (nothing is trained)."""
    os.makedirs(tmp_path / "fdda")
    shutil.copy(os.path.join(FDDA, "reproduce.sh"), tmp_path / "fdda" / "reproduce.sh")
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    (tmp_path / "weights.pth").write_bytes(b"")
    log = tmp_path / "argv.log"
    stub = tmp_path / "py"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in *main_cosine_CBNS*) exit 3;; esac\n')
    stub.chmod(0o755)
    env = dict(os.environ, DATA=str(tmp_path / "data"), TEACHER=str(tmp_path / "weights.pth"), PYTHON=str(stub))
    for epochs, warmup in (("1", 0), ("8", 1), ("100", 12), ("399", 49), ("400", 50), ("800", 50)):
        log.write_text("")
        r = subprocess.run(["bash", str(tmp_path / "fdda" / "reproduce.sh")], env=dict(env, EPOCHS=epochs),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 3, r.stderr
        (line,) = [x for x in log.read_text().splitlines() if "main_cosine_CBNS.py" in x]
        assert f"--nEpochs {epochs} --warmup_epochs {warmup}" in line, line
        opt = main_cosine_CBNS.Option.from_args(CONF, {"nEpochs": epochs, "warmup_epochs": warmup}, env={})
        main_cosine_CBNS.check_warmup(opt)                                # accepted: the student is trained
    shutil.rmtree(tmp_path / "fdda" / "save_ImageNet")
    for bad in ("abc", "0", "2.5", "-3"):
        r = subprocess.run(["bash", str(tmp_path / "fdda" / "reproduce.sh")],
                           env=dict(env, EPOCHS=bad, PYTHON="false"), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"EPOCHS={bad} must be a whole number" in r.stderr
    assert not (tmp_path / "fdda" / "save_ImageNet").exists()               # refused before anything was made
