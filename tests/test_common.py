"""common/: environment, checkpoints (errors, atomicity, resume), meters, run logs, result records."""
import json
import os
import random
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.checkpoint import (load_checkpoint, load_model_state, restore_training_state, save_checkpoint,
                               strip_module_prefix, training_state)
from common.device import get_device, get_rng_state, seed_everything, set_rng_state
from common.errors import UserError
from common.meters import AverageMeter, accuracy
from common.results import FIELDS, read_records, record
from common.runlog import QuietLog, RunLog, check_tag, epoch_label, epoch_span
from conftest import REPO, run_script


def test_torchvision_compiled_op_runs():
    # The torch trap: a mismatched torch/torchvision pair fails here ("torchvision::nms does not exist").
    import torchvision
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]


def test_device_is_cpu_without_cuda():
    if torch.cuda.is_available():
        assert get_device().type == "cuda"
    else:
        assert get_device() == torch.device("cpu")
        assert get_device(gpu=0) == torch.device("cpu")


def test_accuracy_and_meter():
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    tgt = torch.tensor([1, 1, 2, 1])
    top1, top2 = accuracy(out, tgt, topk=(1, 2))
    assert top1.item() == pytest.approx(50.0) and top2.item() == pytest.approx(100.0)
    m = AverageMeter("loss")
    m.update(1.0, n=1)
    m.update(4.0, n=3)
    assert m.avg == pytest.approx(13.0 / 4) and m.val == 4.0 and m.count == 4


# --- checkpoint errors: one line, exit code 2, no traceback -------------------------------------

def _run_loader(tmp_path, body):
    head = ("import torch, torch.nn as nn\n"
            "from common.errors import run_main\n"
            "from common.checkpoint import load_checkpoint, load_model_state, extract_state_dict\n"
            "def main():\n")
    script = tmp_path / "probe.py"
    script.write_text(head + textwrap.indent(textwrap.dedent(body).strip() + "\n", "    ") + "run_main(main)\n")
    return run_script([str(script)], cwd=str(tmp_path), timeout=120)


def _assert_one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_checkpoint_exits_2(tmp_path):
    res = _run_loader(tmp_path, "load_checkpoint('nope/model.pth', what='full-precision model', flag='--init')")
    _assert_one_line_error(res, "full-precision model not found", "nope/model.pth", "--init")


def test_corrupt_checkpoint_exits_2(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"this is not a checkpoint\n" * 80)
    res = _run_loader(tmp_path, "load_checkpoint('bad.pth')")
    _assert_one_line_error(res, "bad.pth", "corrupt")


def test_truncated_checkpoint_exits_2(tmp_path):
    torch.save({"state_dict": nn.Linear(64, 64).state_dict()}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    res = _run_loader(tmp_path, "load_checkpoint('cut.pth')")
    _assert_one_line_error(res, "cut.pth", "corrupt")


class Pickled:  # a custom class: weights_only=True must refuse it
    def __init__(self):
        self.w = torch.ones(2)


def test_pickled_object_checkpoint_is_refused(tmp_path):
    torch.save({"layers": [Pickled()]}, tmp_path / "obj.pth")
    with pytest.raises(UserError, match="pickled Python objects"):
        load_checkpoint(str(tmp_path / "obj.pth"))
    res = _run_loader(tmp_path, "load_checkpoint('obj.pth')")
    _assert_one_line_error(res, "obj.pth", "weights_only")


def test_mismatched_state_dict_exits_2(tmp_path):
    torch.save({"state_dict": {"module.weight": torch.zeros(3, 5), "module.bias": torch.zeros(3)}},
               tmp_path / "lin.pth")
    res = _run_loader(tmp_path, """
        sd = extract_state_dict(load_checkpoint('lin.pth'))
        load_model_state(nn.Linear(4, 3), sd)
    """)
    _assert_one_line_error(res, "weight", "(3, 5)", "(3, 4)")
    torch.save({"state_dict": {"weight": torch.zeros(3, 4)}}, tmp_path / "lin2.pth")
    res = _run_loader(tmp_path, """
        sd = extract_state_dict(load_checkpoint('lin2.pth'))
        load_model_state(nn.Linear(4, 3), sd)
    """)
    _assert_one_line_error(res, "missing keys bias")


def test_strip_module_prefix_and_strict_load():
    lin = nn.Linear(4, 3)
    sd = {"module." + k: v.clone() + 1 for k, v in lin.state_dict().items()}
    assert set(strip_module_prefix(sd)) == {"weight", "bias"}
    other = nn.Linear(4, 3)
    load_model_state(other, sd)
    assert torch.equal(other.weight, lin.weight + 1)


# --- atomic save ----------------------------------------------------------------------------------

def test_atomic_save_survives_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"epoch": 1, "w": torch.arange(10.0)}, str(path))

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PARTIAL-GARBAGE")  # some bytes land, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "w": torch.zeros(10)}, str(path))
    monkeypatch.setattr(torch, "save", real_save)
    ck = load_checkpoint(str(path))
    assert ck["epoch"] == 1 and torch.equal(ck["w"], torch.arange(10.0))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]  # no temp file left behind


def test_atomic_save_killed_process_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"epoch": 1}, str(path))
    script = tmp_path / "die.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from common.checkpoint import save_checkpoint
        def die(obj, f, *a, **k):
            f.write(b"x" * 100); f.flush(); os._exit(9)   # hard kill mid-write
        torch.save = die
        save_checkpoint({{"epoch": 2}}, {str(path)!r})
    """))
    res = run_script([str(script)], cwd=str(tmp_path))
    assert res.returncode == 9
    assert load_checkpoint(str(path))["epoch"] == 1


# --- resume: interrupted + resumed == uninterrupted -------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def _build():
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    return model, opt, sched


def _train(model, opt, sched, start, end, data):
    x, y = data
    for _ in range(start, end):
        perm = torch.randperm(len(x))  # consumes torch RNG, as a shuffling loader would
        random.random(), np.random.rand()  # and the python/numpy generators, as augmentation would
        for i in range(0, len(x), 16):
            idx = perm[i:i + 16]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()


def test_resume_matches_uninterrupted_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))

    seed_everything(1)
    ref, opt, sched = _build()
    _train(ref, opt, sched, 0, 6, data)

    seed_everything(1)
    model, opt, sched = _build()
    _train(model, opt, sched, 0, 3, data)
    save_checkpoint(training_state(model, opt, sched, epoch=3, best=12.5), str(tmp_path / "ck.pth"))
    del model, opt, sched

    seed_everything(999)  # a new process starts from different RNG state and fresh objects
    model, opt, sched = _build()
    epoch, best = restore_training_state(load_checkpoint(str(tmp_path / "ck.pth")), model, opt, sched)
    assert (epoch, best) == (3, 12.5)
    _train(model, opt, sched, epoch, 6, data)
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_rng_state_round_trip():
    seed_everything(5)
    st = get_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(1).item())
    seed_everything(6)
    set_rng_state(st)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == a


# --- run log and result records ---------------------------------------------------------------------

def test_runlog_writes_manifest_text_and_tensorboard(tmp_path):
    log = RunLog(str(tmp_path / "run"), {"lr": 0.1, "bit": 4}, seed=3, device="cpu")
    log.info("epoch 0 done")
    log.scalar("train/loss", 1.5, 0)
    log.close()
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["args"] == {"lr": 0.1, "bit": 4} and man["seed"] == 3 and man["device"] == "cpu"
    for k in ("command", "commit", "torch", "torchvision", "cuda", "python"):
        assert k in man
    assert "epoch 0 done" in (tmp_path / "run" / "log.txt").read_text()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run" / "tb"))


def test_record_appends_json_lines(tmp_path):
    r1 = record("apot", "resnet20", "cifar10", "test", "W4A4", "top1", 91.5, 1000, extra={"note": "x"})
    record("apot", "resnet20", "cifar10", "test", "W3A3", "top1", 90.0, 1000)
    recs = read_records("apot")
    assert len(recs) == 2 and recs[0] == r1
    assert set(FIELDS) <= set(recs[0])
    assert recs[1]["setting"] == "W3A3" and recs[1]["value"] == 90.0
    assert os.path.exists(os.path.join(os.environ["RESULTS_DIR"], "apot.jsonl"))
    assert REPO not in os.environ["RESULTS_DIR"]


def test_writable_dir_check_tries_a_file(tmp_path):
    """Permission bits are not enough (root passes os.access everywhere): a directory where no file can be made is
    refused with one line before any work, and the check leaves nothing behind."""
    from common.checks import check_writable_dir
    assert check_writable_dir(tmp_path / "new" / "run", "--save-dir") == str(tmp_path / "new" / "run")
    assert list(tmp_path.iterdir()) == []
    if os.path.isdir("/proc/self"):  # a pseudo file system: os.access may say yes (as root), creating a file fails
        with pytest.raises(UserError, match=r"--save-dir /proc/self/quantlab-run is not writable \("):
            check_writable_dir("/proc/self/quantlab-run", "--save-dir")


class _Payload:  # unpickling this would run a shell command
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_payload_checkpoint_says_it_holds_python_objects_and_nothing_ran(tmp_path, how):
    """A checkpoint whose pickle calls os.system is refused with a message that says what it holds (not
    'corrupt ... re-download'), and the payload never runs."""
    import pickle
    path = tmp_path / "payload.pth"
    if how == "torch.save":
        torch.save({"state_dict": _Payload()}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"state_dict": _Payload()}, f, protocol=4)
    res = _run_loader(tmp_path, "load_checkpoint('payload.pth')")
    _assert_one_line_error(res, "payload.pth", "was not loaded")
    assert "corrupt" not in res.stderr and "re-download" not in res.stderr and "Warning" not in res.stderr
    assert ("pickled Python objects (a reference to posix.system)" in res.stderr if how == "torch.save"
            else "safe loader does not read" in res.stderr)
    assert not (tmp_path / "PWNED").exists()


# --- one tensorboard tag scheme and one epoch convention for all five papers --------------------------

@pytest.mark.parametrize("tag", ["train/loss", "val/top1", "test/top5", "train/lr", "pretrain/val/top1",
                                 "alq/train/loss", "train/kd_loss", "alpha/layer1.0.conv1/weight",
                                 "alpha/fc/act", "bits/w_avg"])
def test_tags_of_the_scheme_are_accepted(tag):
    assert check_tag(tag) == tag
    QuietLog().scalar(tag, 1.0, 0)


@pytest.mark.parametrize("tag", ["loss_train", "acc1_val", "test_acc", "prec1", "val/Top1", "val/", "train",
                                 "a/b/train/loss", "alpha/x/bias", "bits/", "w_avg_bit", "lr", "val top1"])
def test_tags_outside_the_scheme_are_refused_by_every_log(tag, tmp_path):
    with pytest.raises(ValueError, match="does not follow"):
        check_tag(tag)
    with pytest.raises(ValueError):
        QuietLog().scalar(tag, 1.0, 0)
    log = RunLog(str(tmp_path / "r"), tensorboard=False, quiet=True)
    with pytest.raises(ValueError):
        log.scalar(tag, 1.0, 0)
    log.close()


def test_every_literal_tag_in_the_papers_follows_the_scheme():
    """A static look at each `log.scalar(<literal or f-string>, ...)` of the five papers and common/: the
    literal part (f-string fields replaced by a sample name) must follow the scheme."""
    import re
    call = re.compile(r"""\.scalar\(\s*(f?)(['"])(.*?)\2""")
    seen = 0
    for paper in ("apot", "alq", "dambq", "alignq", "fdda", "common"):
        for dirpath, _, files in os.walk(os.path.join(REPO, paper)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                text = open(os.path.join(dirpath, name)).read()
                for m in call.finditer(text):
                    tag = re.sub(r"\{[^}]*\}", "x", m.group(3)) if m.group(1) else m.group(3)
                    assert check_tag(tag), (name, m.group(0))
                    seen += 1
    assert seen >= 20            # the scan found the calls (apot alone logs 15 literal tags)


def test_epochs_read_from_one_and_ranges_include_both_ends():
    assert epoch_label(0, 25) == "epoch 1/25" and epoch_label(24, 25) == "epoch 25/25"
    assert epoch_span(0, 25) == "epochs 1-25" and epoch_span(3, 5) == "epochs 4-5"
    assert epoch_span(4, 5) == "epoch 5" and epoch_span(5, 5) == "no epochs left"


def test_str2bool_reads_the_spellings_the_originals_flags_took():
    import argparse
    from common.checks import str2bool
    for v in ("true", "True", "t", "yes", "Y", "on", "1", True):
        assert str2bool(v) is True
    for v in ("false", "F", "no", "n", "off", "0", False):
        assert str2bool(v) is False
    with pytest.raises(argparse.ArgumentTypeError, match="expected a boolean"):
        str2bool("maybe")
