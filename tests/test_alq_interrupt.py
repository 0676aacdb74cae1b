"""ALQ: an interrupt (SIGINT/SIGTERM, common.interrupt) stops a stage after the current batch with a
resumable checkpoint, and `--resume` continues from that batch to the same end as the uninterrupted run.

Tiny generated MNIST (100 training images = 4 batches of 32), LeNet5, in-process. The signal is simulated by
making `interrupt.requested()` report SIGTERM at its n-th call: the stages ask once after every training batch and
once after every epoch's checkpoint. The uninterrupted and the resumed runs execute the same float operations in
the same order in the same process, so their final tensors, optimizer states, RNG states and logged epoch
statistics are compared exactly."""
import re
import shutil
import signal

import pytest
import torch

import alq_import
from common import interrupt, runs
from test_runs_alq import TINY
from test_runs_apot import tiny_mnist

A = alq_import.load()
FLAGS = TINY + ["--pretrain_epochs", "2"]
# interrupt.requested() calls: PRETRAIN 2 epochs x (4 batches + 1 after the epoch) = 1..10; ALQ basis 11..15,
# coord 16..20, prune 21..25; POSTTRAIN ste 26..30, coord 31..35
CASES = {
    "PRETRAIN epoch 2 batch 2": (7, r"PRETRAIN epoch 2/2 batch 2/4: resumable checkpoint saved to .*ori\.resume\.pth"),
    "ALQ basis batch 2": (12, r"ALQ step 1/3 \(r 1/1 basis epoch 1/1\) batch 2/4: resumable checkpoint saved to "
                              r".*q\.resume\.pth; rerun the same command with --resume"),
    "ALQ prune batch 3": (23, r"ALQ step 3/3 \(r 1/1 prune epoch 1/1\) batch 3/4: resumable"),
    "ALQ after the basis epoch": (15, r"ALQ step 1/3 \(r 1/1 basis epoch 1/1\) finished and its resume file "
                                      r".*q\.resume\.pth is saved"),
    "POSTTRAIN ste batch 3": (28, r"POSTTRAIN step 1/2 \(ste epoch 1/1\) batch 3/4: resumable"),
}
# the resume line names the epoch or step it continues, counted from 1 as the stop message counts them
RESUMED = {"PRETRAIN epoch 2 batch 2": "PRETRAIN at epoch 2/2 batch 2", "ALQ basis batch 2": "ALQ at step 1/3 batch 2",
           "ALQ prune batch 3": "ALQ at step 3/3 batch 3", "ALQ after the basis epoch": "ALQ at step 2/3",
           "POSTTRAIN ste batch 3": "POSTTRAIN at step 1/2 batch 3"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_mnist(tmp_path_factory.mktemp("mnist"), n_train=120, n_test=40)


def run(d, data, monkeypatch, *extra):
    """The whole pipeline in directory d; PRETRAIN's and POSTTRAIN's last per-epoch state is kept as <file>.last
    (their outputs are the best-validation models, the ALQ output is its last state)."""
    finish = A.stages.mark_finished

    def keep_last(path):
        shutil.copy(A.checkpoints.resume_path(path), str(path) + ".last")
        finish(path)
    monkeypatch.setattr(A.stages, "mark_finished", keep_last)
    try:
        A.lenet5.main(["--PRETRAIN", "--ALQ", "--POSTTRAIN", "--data", data, "--model_ori", str(d / "ori.pth"),
                       "--model", str(d / "q.pth"), "--log_dir", str(d / "log")] + FLAGS + list(extra))
    finally:
        runs.end_run()


def flat(obj, prefix=""):
    """Every tensor and number in a checkpoint, by path."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}{i}.").items()}
    return {prefix: obj} if isinstance(obj, (torch.Tensor, int, float)) else {}


def epoch_lines(d):
    """The per-epoch training statistics in the run's log, without timings."""
    text = (d / "log" / "log.txt").read_text()
    return re.findall(r"((?:pretrain epoch|ALQ r|POSTTRAIN \w+ epoch) .*?: train loss \S+ top1 \S+ top5 \S+)", text)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as mp:
        run(d, data, mp)
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_interrupt_saves_at_the_batch_and_resume_equals_the_uninterrupted_run(case, reference, data, tmp_path,
                                                                               monkeypatch):
    stop_at, message = CASES[case]
    calls = [0]
    asked = interrupt.requested

    def requested():
        calls[0] += 1
        return signal.SIGTERM if calls[0] == stop_at else asked()
    monkeypatch.setattr(interrupt, "requested", requested)
    with pytest.raises(interrupt.Interrupted, match=message) as stopped:
        run(tmp_path, data, monkeypatch)
    assert stopped.value.exit_code == 130 and calls[0] == stop_at       # stopped at once, nothing ran after it
    monkeypatch.setattr(interrupt, "requested", asked)
    stage = case.split()[0]
    rfile = tmp_path / {"PRETRAIN": "ori.resume.pth", "ALQ": "q.resume.pth", "POSTTRAIN": "q_post.resume.pth"}[stage]
    ck = torch.load(rfile, weights_only=True)
    batch = int(re.search(r"batch (\d)", case).group(1)) if "batch" in case else 0
    assert int(ck.get("batch", 0)) == batch and ck["quantlab"]["flags"]["batch_size"] == 32
    if batch:
        assert {"epoch_rng", "rng", "stats"} <= set(ck) and ck["stats"]["batches"] == batch
    run(tmp_path, data, monkeypatch, "--resume")
    resumed = (tmp_path / "log" / "log.txt").read_text().split("resuming ")[-1].split("\n")[0]
    assert f"batch {batch}" in resumed if batch else True
    assert resumed.startswith(RESUMED[case]), resumed
    for f in ("ori.pth", "ori.pth.last", "q.pth", "q_post.pth", "q_post.pth.last"):
        want, got = flat(torch.load(reference / f, weights_only=True)), flat(torch.load(tmp_path / f, weights_only=True))
        assert want.keys() == got.keys(), f
        differ = [k for k in want if not (torch.equal(want[k], got[k]) if torch.is_tensor(want[k])
                                          else want[k] == got[k] or want[k] != want[k])]
        assert not differ, (f, differ[:5])
    assert epoch_lines(tmp_path) == epoch_lines(reference)          # the stopped epoch's statistics too
