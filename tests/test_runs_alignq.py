"""Issue 9 on AlignQ (alignq/engine.py, every cdf_alignment*/ main.py): checks before any data is read, the
device, seed and whole-run estimate printed at start, and evaluation records that carry the seed. Tiny
generated CIFAR-10, in-process."""
import json
import os

import pytest

from alignq import engine
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
    assert test["extra"]["checkpoint"] == str(tmp_path / "job" / "checkpoint" / "model_best.pt")
    assert (test["split"], test["n_samples"]) == ("test[:20]", 20) and test["recipe"]["full"] is False
