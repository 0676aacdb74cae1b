"""ALQ: stage outputs are never overwritten without --resume/--overwrite, stage inputs remember the
sha256 of what they started from, shortened/unfinished stages are recorded as such, checks before work,
`-h` without duplicated defaults. Tiny generated MNIST, in-process (ALQ stages take ~1 s each here)."""
import json
import os

import pytest

import alq_import
from common import runs
from common.errors import UserError
from test_runs_apot import tiny_mnist

A = alq_import.load()
TINY = ["--val_size", "20", "--batch_size", "32", "--pretrain_epochs", "1", "--R", "1", "--epoch_basis", "1",
        "--epoch_coord", "1", "--post_epochs", "1", "1", "--top_k", "0.05"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    data = tiny_mnist(tmp_path / "data", n_train=120, n_test=40)
    yield ["--data", data] + TINY
    runs.end_run()


def records():
    with open(os.path.join(os.environ["RESULTS_DIR"], "alq.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_pretrain_is_never_overwritten_without_a_flag(env, tmp_path):
    # measured problem 2: a new PRETRAIN silently replaced model_ori (98.01 -> 16.0)
    ori = tmp_path / "ori.pth"
    A.lenet5.main(["--PRETRAIN", "--model_ori", str(ori)] + env)
    stamp = os.path.getmtime(ori)
    with pytest.raises(UserError, match="already exists .*PRETRAIN of lenet5, finished.*pass --resume"):
        A.lenet5.main(["--PRETRAIN", "--model_ori", str(ori)] + env)
    assert os.path.getmtime(ori) == stamp
    A.lenet5.main(["--PRETRAIN", "--resume", "--model_ori", str(ori)] + env)     # finished: skipped, untouched
    assert os.path.getmtime(ori) == stamp
    A.lenet5.main(["--PRETRAIN", "--overwrite", "--model_ori", str(ori)] + env)  # explicit replacement
    assert os.path.getmtime(ori) != stamp


def test_default_paths_are_links_to_each_runs_own_files(env, tmp_path):
    A.lenet5.main(["--PRETRAIN"] + env)
    A.lenet5.main(["--PRETRAIN", "--seed", "2"] + env)                  # the documented command again
    first, second = sorted((tmp_path / "runs" / "alq").iterdir())
    assert os.path.realpath("lenet5_model_ori.pth") == str(second / "lenet5_model_ori.pth")
    assert (first / "lenet5_model_ori.pth").exists()                   # the first run's model is still there
    for d in (first, second):
        assert {"manifest.json", "log.txt", "lenet5_model_ori.pth"} <= set(os.listdir(d))
    A.lenet5.main(["--ALQ"] + env)                                       # a stage alone reads the link
    third = sorted((tmp_path / "runs" / "alq").iterdir())[-1]
    import torch
    q = torch.load("lenet5_model.pth", weights_only=True)
    assert os.path.realpath("lenet5_model.pth") == str(third / "lenet5_model.pth")
    from common.identity import sha256_file
    assert q["model_ori_sha256"] == sha256_file(second / "lenet5_model_ori.pth")
    assert {json.loads(line)["run_dir"] for line in open(third / "records.jsonl")} == {str(third)}


def test_stage_inputs_remember_the_model_ori_they_started_from(env, tmp_path, monkeypatch):
    # measured problem 2: --resume after a new PRETRAIN resumed a stage built on the old model
    env = env + ["--model_ori", str(tmp_path / "ori.pth"), "--model", str(tmp_path / "q.pth")]
    A.lenet5.main(["--PRETRAIN"] + env)
    orig = A.stages.train_coordinate

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(A.stages, "train_coordinate", killed)
    with pytest.raises(KeyboardInterrupt, match="ALQ stopped; --resume continues it from its last finished epoch"):
        A.lenet5.main(["--ALQ"] + env)
    monkeypatch.setattr(A.stages, "train_coordinate", orig)
    assert os.path.exists(tmp_path / "q.resume.pth")
    A.lenet5.main(["--PRETRAIN", "--overwrite", "--seed", "2"] + env)   # a different model_ori
    with pytest.raises(UserError, match="ALQ resume file .* built from --model_ori with sha256 .* now has"):
        A.lenet5.main(["--ALQ", "--resume"] + env)
    A.lenet5.main(["--ALQ", "--overwrite"] + env)
    with pytest.raises(UserError, match="already exists"):              # no second ALQ over the first
        A.lenet5.main(["--ALQ"] + env)
    A.lenet5.main(["--PRETRAIN", "--overwrite", "--seed", "3"] + env)
    with pytest.raises(UserError, match="finished ALQ output .* built from --model_ori"):
        A.lenet5.main(["--ALQ", "--resume"] + env)


def test_shortened_and_unfinished_stages_are_recorded_as_such(env, tmp_path):
    # measured problem 2: --ALQ quantized a 5-epoch pretrain without a word; --R 0 recorded "6.0 bits";
    # --export recorded a half-finished model as the final result
    A.lenet5.main(["--PRETRAIN", "--ALQ"] + env + ["--R", "0"])
    top1 = [r for r in records() if r["metric"] == "top1"][-1]
    assert top1["recipe"]["full"] is False and "R 0 of 4" in top1["recipe"]["summary"]
    assert "pretrain_epochs 1 of 100" in top1["recipe"]["summary"]
    assert top1["run_dir"].startswith(str(tmp_path / "runs" / "alq")) and top1["seed"] == 1
    assert os.path.exists(os.path.join(top1["run_dir"], "records.jsonl"))
    from common.compare import compare_paper
    res = compare_paper("alq", reference=[])
    assert all(e["record"] is None for e in res["rows"]) and len(res["shortened"]) == 3
    # --export of a half-finished ALQ output is recorded as shortened, never as the final result
    import torch
    q = torch.load(tmp_path / "lenet5_model.pth", weights_only=True)
    q["finished"] = False
    torch.save(q, tmp_path / "half.pth")
    A.lenet5.main(["--export", "half.alqpack", "--model", str(tmp_path / "half.pth")] + env)
    last = records()[-1]
    assert last["recipe"]["full"] is False and last["recipe"]["summary"].endswith("ALQ not finished")
    # an unfinished PRETRAIN is refused as ALQ input
    ck = torch.load(tmp_path / "lenet5_model_ori.pth", weights_only=True)
    ck["quantlab"]["finished"] = False
    torch.save(ck, tmp_path / "half_ori.pth")
    with pytest.raises(UserError, match="unfinished PRETRAIN"):
        A.lenet5.main(["--ALQ", "--model_ori", str(tmp_path / "half_ori.pth"), "--model", "q2.pth"] + env)


@pytest.mark.parametrize("argv, needle", [
    (["--ALQ", "--pr", "5"], "--pr 5.0 is out of range"),
    (["--ALQ", "--top_k", "2"], "--top_k 2.0 is out of range"),
    (["--PRETRAIN", "--model_ori", "afile/ori.pth"], "--model_ori afile/ori.pth cannot be created"),
    (["--PRETRAIN", "--log_dir", "afile/log"], "--log_dir afile/log cannot be created"),
    (["--PRETRAIN", "--model_ori", "adir"], "is a directory"),
])
def test_alq_checks_before_work(argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTLAB_RUNS", str(tmp_path / "runs"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(UserError, match=needle):
        A.lenet5.main(argv + ["--data", "nowhere"])          # data is never read first
    assert not os.path.exists(tmp_path / "runs")


def test_alq_unwritable_results_dir_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "afile" / "results"))
    with pytest.raises(UserError, match="RESULTS_DIR .*afile is a file"):
        A.lenet5.main(["--PRETRAIN", "--data", "nowhere", "--log_dir", str(tmp_path / "log")])
    assert not os.path.exists(tmp_path / "log")


def test_help_has_no_duplicated_default(capsys):
    with pytest.raises(SystemExit):
        A.lenet5.main(["-h"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and out.count("(default:") > 10
    assert "(default: --model with '_post' before the extension)" in " ".join(out.split())


def _tb_scalars(d):
    """(step, tag) of every scalar in the tfevents files of d (TFRecord framing: u64 length, u32 crc, payload,
    u32 crc)."""
    import struct
    from tensorboardX.proto.event_pb2 import Event
    out = []
    for f in sorted(os.listdir(d)):
        with open(os.path.join(d, f), "rb") as fh:
            buf = fh.read()
        i = 0
        while i + 12 <= len(buf):
            (n,) = struct.unpack("<Q", buf[i:i + 8])
            out += [(ev.step, v.tag) for ev in [Event.FromString(buf[i + 12:i + 12 + n])] for v in ev.summary.value]
            i += 12 + n + 4
    return out


def test_log_lines_count_epochs_from_one_and_tags_follow_the_scheme(env, tmp_path):
    """What people read counts epochs from 1 with the total (common.runlog.epoch_label); tensorboard tags are
    [<stage>/]<split>/<metric> and bits/avg at step = the 1-based epoch or stage step just finished; log.txt says
    where the records went."""
    argv = env + ["--pretrain_epochs", "2", "--PRETRAIN", "--ALQ", "--POSTTRAIN", "--log_dir", str(tmp_path / "log")]
    A.lenet5.main(argv)
    text = (tmp_path / "log" / "log.txt").read_text()
    said = [line.split(" lr ")[0].split(" ", 2)[2] for line in text.splitlines()
            if " lr " in line and ": train " in line]                       # log.txt lines: date time message
    assert said == ["pretrain epoch 1/2", "pretrain epoch 2/2", "ALQ r 1/1 basis epoch 1/1",
                    "ALQ r 1/1 coord epoch 1/1", "ALQ r 1/1 prune epoch 1/1", "POSTTRAIN ste epoch 1/1",
                    "POSTTRAIN coord epoch 1/1"]
    assert f"records appended to {os.path.join(os.environ['RESULTS_DIR'], 'alq.jsonl')} and " \
           f"{tmp_path / 'log' / 'records.jsonl'}" in text
    assert sorted(_tb_scalars(tmp_path / "log" / "tb")) == sorted(
        [(e, f"pretrain/{t}") for e in (1, 2) for t in ("train/loss", "val/top1")]
        + [(s, t) for s in (1, 2, 3) for t in ("alq/train/loss", "alq/val/top1", "bits/avg")]
        + [(s, f"posttrain/{t}") for s in (1, 2) for t in ("train/loss", "val/top1")])
