"""The AlignQ runs (alignq/engine.py, alignq/checkpoints.py, every cdf_alignment*/ main.py): checks before any
data is read, the device, seed and whole-run estimate printed at start, evaluation records that carry the seed,
and the run layout (each run in runs/alignq/<job_dir basename>-<time>/, --job_dir a link to the latest). Tiny
generated CIFAR-10, in-process."""
import json
import os
import shutil

import pytest
import torch

from alignq import checkpoints, engine
from common import interrupt
from common.errors import UserError
from test_alignq_scripts import make_cifar


def records():
    with open(os.path.join(os.environ["RESULTS_DIR"], "alignq.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("flags, needle", [
    (["--print_freq", "0"], "--print_freq 0 is out of range"),          # was a ZeroDivisionError in epoch 0
    (["--momentum", "-1"], "--momentum -1.0 is out of range"),          # was torch's ValueError traceback
    (["--weight_decay", "-1"], "--weight_decay -1.0 is out of range"),
    (["--workers", "-1"], "--workers -1 is out of range"),              # was DataLoader's ValueError
    (["--max_iters", "-1"], "--max_iters -1 is out of range"),          # was accepted: 1 batch per epoch
    (["--seed", "-3"], "--seed -3 is out of range"),
])
def test_bad_values_stop_before_any_data_is_read(flags, needle, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "classification_loaders", lambda *a, **k: pytest.fail("data read before the checks"))
    job = tmp_path / "job"
    with pytest.raises(UserError, match=needle):
        engine.run(["--job_dir", str(job), "--no-pretrained", "--bitW", "4", "--abitW", "4"] + flags,
                   "resnet-20-cifar-10")
    assert not job.exists()


def test_start_lines_and_evaluation_records_carry_device_and_seed(tmp_path, capsys):
    data = make_cifar(tmp_path / "data")
    argv = ["--data_dir", str(data), "--job_dir", str(tmp_path / "job"), "--bitW", "4", "--abitW", "4",
            "--no-pretrained", "--num_epochs", "1", "--train_batch_size", "16", "--eval_batch_size", "10",
            "--workers", "0", "--seed", "5"]
    engine.run(argv, "resnet-20-cifar-10")
    out = capsys.readouterr().out
    assert "=> device cpu, seed 5, run directory" in out
    assert "=> whole-run estimate:" in out and "for 5 training batches" in out    # 80 images / 16, one epoch
    engine.run(argv + ["--test_only", "--seed", "7"], "resnet-20-cifar-10")
    out = capsys.readouterr().out
    assert "=> device cpu, seed 7; evaluating" in out
    train, test = records()
    assert train["seed"] == 5 and test["seed"] == 7                             # the evaluation's was null
    # the run's own file, not the --job_dir link (which moves to the next run)
    assert test["extra"]["checkpoint"] == os.path.realpath(tmp_path / "job" / "checkpoint" / "model_best.pt")
    assert test["extra"]["checkpoint"].startswith(os.path.join(os.environ["QUANTLAB_RUNS"], "alignq", "job-"))
    assert (test["split"], test["n_samples"]) == ("test[:20]", 20) and test["recipe"]["full"] is False


def test_tensorboard_tags_and_epoch_lines(tmp_path, monkeypatch):
    """The project's tag scheme at step = the 1-based epoch just finished; log lines count epochs from 1."""
    from common.runlog import RunLog
    data = make_cifar(tmp_path / "data")
    scalars, lines = [], []
    monkeypatch.setattr(RunLog, "scalar", lambda self, tag, v, step: scalars.append((tag, step)))
    info = RunLog.info
    monkeypatch.setattr(RunLog, "info", lambda self, msg, *a, **k: lines.append(msg) or info(self, msg, *a, **k))
    argv = ["--data_dir", str(data), "--job_dir", str(tmp_path / "job"), "--bitW", "4", "--abitW", "4",
            "--no-pretrained", "--num_epochs", "2", "--train_batch_size", "40", "--eval_batch_size", "10",
            "--workers", "0", "--seed", "0", "--print_freq", "1"]
    engine.run(argv, "resnet-20-cifar-10")
    tags = ["train/loss", "train/top1", "val/top1", "val/top5", "train/lr"]
    assert scalars == [(t, e) for e in (1, 2) for t in tags]
    assert any("epochs 1-2;" in m for m in lines) and any(m.startswith("epoch 2/2: lr") for m in lines)
    assert any(m.startswith("epoch 1/2 (1/2): Train_loss") for m in lines)


# ------------------------------------------------------------------------------------------------ run layout


def run_dirs():
    root = os.path.join(os.environ["QUANTLAB_RUNS"], "alignq")
    return sorted(os.path.join(root, d) for d in os.listdir(root)) if os.path.isdir(root) else []


def tiny(tmp_path, job="job", epochs=1):
    data = tmp_path / "data"
    if not data.exists():
        make_cifar(data)
    return ["--data_dir", str(data), "--job_dir", str(tmp_path / job), "--bitW", "4", "--abitW", "4",
            "--no-pretrained", "--num_epochs", str(epochs), "--train_batch_size", "16", "--eval_batch_size", "10",
            "--workers", "0", "--seed", "0", "--print_freq", "100"]


def test_two_runs_with_the_same_job_dir_both_survive(tmp_path):
    """The README uses one --job_dir for two experiments: the second run no longer refuses or destroys the first."""
    argv = tiny(tmp_path)
    engine.run(argv, "resnet-20-cifar-10")
    first = run_dirs()
    job = tmp_path / "job"
    assert len(first) == 1 and os.path.basename(first[0]).startswith("job-")       # basename + time stamp
    assert os.path.islink(job) and not os.path.isabs(os.readlink(job))               # a relative link
    assert os.path.realpath(job) == first[0]
    engine.run(argv + ["--reset"], "resnet-20-cifar-10")     # --reset through the link removes nothing
    both = run_dirs()
    assert len(both) == 2 and first[0] in both
    newer = [d for d in both if d != first[0]][0]
    assert os.path.realpath(job) == newer                    # the link points at the newer run
    for d in both:                                           # each a whole run of its own
        for f in ("manifest.json", "config.txt", "log.txt", "checkpoint/model_best.pt", "checkpoint/model_last.pt"):
            assert os.path.isfile(os.path.join(d, f)), (d, f)
        ck = torch.load(os.path.join(d, "checkpoint", "model_best.pt"), weights_only=True)
        assert ck["run_dir"] == d and ck["job_dir"] == str(job)
    # --test_only defaults to the best model of the run the link points at
    engine.run(argv + ["--test_only"], "resnet-20-cifar-10")
    assert records()[-1]["extra"]["checkpoint"] == os.path.join(newer, "checkpoint", "model_best.pt")


def test_killed_run_resumes_through_the_link(tmp_path, monkeypatch):
    argv = tiny(tmp_path, epochs=2)
    monkeypatch.setattr(interrupt, "requested", lambda: 2)                  # as if SIGINT arrived in epoch 0
    last = os.path.join(str(tmp_path / "job"), "checkpoint", "model_last.pt")
    with pytest.raises(interrupt.Interrupted) as e:
        engine.run(argv, "resnet-20-cifar-10")
    assert f"--resume {last}" in str(e.value)                 # the documented path, made when the run started
    (d,) = run_dirs()
    assert os.path.realpath(tmp_path / "job") == d and torch.load(last, weights_only=True)["epoch"] == 0
    monkeypatch.setattr(interrupt, "requested", lambda: None)
    engine.run(argv + ["--resume", last], "resnet-20-cifar-10")
    assert run_dirs() == [d]                                  # continued in the run's own directory
    assert torch.load(os.path.join(d, "checkpoint", "model_last.pt"), weights_only=True)["epoch"] == 2
    with open(os.path.join(d, "log.txt")) as f:
        assert "=> resumed" in f.read()
    # a second --job_dir continuing that run: the run stays where it is, the new path links to it
    engine.run(tiny(tmp_path, job="other", epochs=3) + ["--resume", last], "resnet-20-cifar-10")
    assert run_dirs() == [d] and os.path.realpath(tmp_path / "other") == d
    # a loose checkpoint file (not inside a run directory) starts a run directory of its own from it
    shutil.copy(last, tmp_path / "loose.pt")
    engine.run(tiny(tmp_path, job="from_loose", epochs=4) + ["--resume", str(tmp_path / "loose.pt")],
               "resnet-20-cifar-10")
    new = [r for r in run_dirs() if r != d]
    assert len(new) == 1 and os.path.basename(new[0]).startswith("from_loose-")
    assert os.path.realpath(tmp_path / "from_loose") == new[0]
    assert torch.load(os.path.join(new[0], "checkpoint", "model_last.pt"), weights_only=True)["epoch"] == 4


def test_name_flag(tmp_path):
    argv = tiny(tmp_path) + ["--name", "r20w4"]
    engine.run(argv, "resnet-20-cifar-10")
    d = os.path.join(os.environ["QUANTLAB_RUNS"], "alignq", "r20w4")
    assert run_dirs() == [d] and os.path.realpath(tmp_path / "job") == d
    with pytest.raises(UserError, match="already holds a run; continue it with --resume .*r20w4"):
        engine.run(argv, "resnet-20-cifar-10")
    os.remove(tmp_path / "job")                               # --test_only --name finds the run without the link
    engine.run(argv + ["--test_only"], "resnet-20-cifar-10")
    assert records()[-1]["extra"]["checkpoint"] == os.path.join(d, "checkpoint", "model_best.pt")
    for bad in ("a/b", ".."):
        with pytest.raises(UserError, match="plain directory name"):
            engine.run(tiny(tmp_path) + ["--name", bad], "resnet-20-cifar-10")


def old_layout_run(tmp_path):
    """A --job_dir written by a version before runs/alignq/: the run's files in the real directory itself."""
    argv = tiny(tmp_path, epochs=2)
    engine.run(argv[:argv.index("--num_epochs") + 1] + ["1"] + argv[argv.index("--num_epochs") + 2:],
               "resnet-20-cifar-10")
    (d,) = run_dirs()
    os.remove(tmp_path / "job")
    shutil.move(d, tmp_path / "job")
    return argv, str(tmp_path / "job")


def test_old_real_job_dir_keeps_the_old_rules(tmp_path):
    argv, job = old_layout_run(tmp_path)
    last = os.path.join(job, "checkpoint", "model_last.pt")
    with pytest.raises(UserError, match=f"already holds a run written before runs/alignq/; continue it with "
                                        f"--resume {last}"):
        engine.run(argv, "resnet-20-cifar-10")
    engine.run(argv + ["--resume", last], "resnet-20-cifar-10")           # continues in place
    assert run_dirs() == [] and not os.path.islink(job)
    assert torch.load(last, weights_only=True)["epoch"] == 2
    engine.run(argv + ["--test_only"], "resnet-20-cifar-10")              # evaluates it in place
    assert records()[-1]["extra"]["checkpoint"] == os.path.realpath(os.path.join(job, "checkpoint", "model_best.pt"))
    engine.run(argv + ["--reset"], "resnet-20-cifar-10")                  # --reset: removed, then a new-layout run
    (d,) = run_dirs()
    assert os.path.islink(job) and os.path.realpath(job) == d


def test_job_dir_that_is_not_a_run(tmp_path):
    other = tmp_path / "job"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="directory of other files"):
        engine.run(tiny(tmp_path), "resnet-20-cifar-10")
    assert (other / "notes.txt").read_text() == "mine" and run_dirs() == []
    os.remove(other / "notes.txt")                            # an empty directory becomes the link
    engine.run(tiny(tmp_path), "resnet-20-cifar-10")
    assert os.path.islink(other) and os.path.realpath(other) == run_dirs()[0]


def test_resume_refuses_changed_optimisation_flags_and_refine(tmp_path):
    """--resume restores the optimizer and schedule: another --lr (or momentum, decay, milestones, batch) would be
    silently ignored, so it is refused before the run goes on; --resume with --refine contradict each other."""
    argv = tiny(tmp_path, epochs=1)
    engine.run(argv, "resnet-20-cifar-10")
    last = os.path.join(str(tmp_path / "job"), "checkpoint", "model_last.pt")
    assert set(torch.load(last, weights_only=True)["flags"]) == set(checkpoints.RESUME_FLAGS)
    before = sorted(os.listdir(run_dirs()[0]))
    with pytest.raises(UserError, match=r"was trained with --lr .* but this run has --lr 0.123; .*\(--refine\)"):
        engine.run(argv + ["--lr", "0.123", "--resume", last], "resnet-20-cifar-10")
    with pytest.raises(UserError, match="--lr_decay_steps"):
        engine.run(argv + ["--lr_decay_steps", "[7, 9]", "--resume", last], "resnet-20-cifar-10")
    assert sorted(os.listdir(run_dirs()[0])) == before and len(run_dirs()) == 1
    with pytest.raises(UserError, match="--resume .* and --refine .* contradict"):
        engine.run(argv + ["--resume", last, "--refine", last], "resnet-20-cifar-10")


def _tensors(obj, prefix=""):
    """Every tensor (and number) of a checkpoint subtree by its path: model, optimizer state (momentum buffers
    and OriginalSGD's aliasing flags), RNG."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def _same(a, b):
    """Paths whose values differ between two checkpoints (torch.equal for tensors: bit for bit)."""
    ta, tb = _tensors({k: a[k] for k in ("state_dict_t", "optimizer_t", "rng", "epoch", "best_prec1")}), \
        _tensors({k: b[k] for k in ("state_dict_t", "optimizer_t", "rng", "epoch", "best_prec1")})
    assert ta.keys() == tb.keys()
    def eq(x, y):              # the RNG's "no cached gauss" is NaN, equal to itself here
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        return x == y or (x != x and y != y)
    return [k for k in ta if not eq(ta[k], tb[k])]


def _interrupted_then_resumed(tmp_path, monkeypatch, base, experiment, admm, after, where):
    """The uninterrupted run ("whole"), then one stopped after `after` computed batches ("cut") and resumed:
    both final checkpoints and test-accuracy records."""
    from common import interrupt as intr
    monkeypatch.setattr(intr, "requested", lambda: None)
    engine.run(base + ["--job_dir", str(tmp_path / "whole")], experiment, admm=admm)
    pending = iter([None] * (after - 1) + [2])
    monkeypatch.setattr(intr, "requested", lambda: next(pending, None))
    with pytest.raises(intr.Interrupted, match=where):
        engine.run(base + ["--job_dir", str(tmp_path / "cut")], experiment, admm=admm)
    last = str(tmp_path / "cut" / "checkpoint" / "model_last.pt")
    mid = torch.load(last, weights_only=True)
    assert mid["mid_epoch"]["batch"] > 0
    monkeypatch.setattr(intr, "requested", lambda: None)
    engine.run(base + ["--job_dir", str(tmp_path / "cut"), "--resume", last], experiment, admm=admm)
    with open(tmp_path / "cut" / "log.txt") as f:
        assert f"after batch {mid['mid_epoch']['batch']}" in f.read()
    a = torch.load(tmp_path / "whole" / "checkpoint" / "model_last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)

    def summary(job):           # the last epoch's line: train loss/top1 from the epoch's (restored) partial sums
        with open(tmp_path / job / "log.txt") as f:
            line = [ln for ln in f if "train loss" in ln][-1]
        return line[line.index("train loss"):line.index(" (")]
    assert summary("whole") == summary("cut")
    return a, b, [(r["value"], r["extra"]["last_epoch_top1"]) for r in records()]


@pytest.mark.parametrize("after, where", [(14, "epoch 2/2 batch 4"), (3, "epoch 1/2 batch 3")])
def test_cls_resume_mid_epoch_is_exact(tmp_path, monkeypatch, after, where):
    """ResNet-20 W4A4 with ADMM (cdf_alignment_admm/, Z/Gamma updated every step), 10 batches an epoch: killed
    after a batch of epoch 2 (or 1) and resumed, it ends with every tensor of the uninterrupted run, bit for bit:
    model with Z/Gamma, OriginalSGD's momentum buffers, RNG; the accuracy records agree too. The checkpoint holds
    the RNG as the epoch began (same order and flips), the batches done (drawn again, not computed) and the
    epoch's partial sums."""
    make_cifar(tmp_path / "data")
    base = ["--data_dir", str(tmp_path / "data"), "--bitW", "4", "--abitW", "4", "--no-pretrained",
            "--num_epochs", "2", "--train_batch_size", "8", "--eval_batch_size", "10", "--workers", "0",
            "--seed", "1", "--print_freq", "100"]
    a, b, recs = _interrupted_then_resumed(tmp_path, monkeypatch, base, "resnet-20-cifar-10", True, after, where)
    assert a["epoch"] == b["epoch"] == 2 and "mid_epoch" not in b
    assert any(k.endswith("alterD") for k in a["state_dict_t"]) and a["optimizer_t"]["state"]
    assert all(torch.isfinite(v).all() for v in a["state_dict_t"].values())    # NaN != NaN would hide nothing
    assert _same(a, b) == []
    whole, cut = recs
    assert whole == cut


def test_office_dann_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    """Office DANN + ADMM (the optimizer rebuilt every epoch, its state saved with the interrupted epoch), 2 steps
    an epoch: killed after step 1 of epoch 2 and resumed, bit for bit as the uninterrupted run."""
    from test_alignq_domain import make_office
    make_office(tmp_path / "data", domains=("dslr", "webcam"))
    base = ["--data_dir", str(tmp_path / "data"), "--bitW", "8", "--abitW", "8", "--no-pretrained",
            "--num_epochs", "2", "--max_iters", "2", "--train_batch_size", "4", "--eval_batch_size", "8",
            "--img_size", "32", "--workers", "0", "--seed", "1", "--src_data", "dslr", "--tgt_data", "webcam"]
    a, b, recs = _interrupted_then_resumed(tmp_path, monkeypatch, base, "dann_office", True, 3, "epoch 2/2 batch 1")
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in a["state_dict_t"].values())    # NaN != NaN would hide nothing
    assert _same(a, b) == []
    whole, cut = recs
    assert whole == cut
