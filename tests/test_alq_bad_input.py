"""ALQ's bad input, table-driven: one line, exit 2, before any work, and no run directory left behind (neither
runs/alq/... nor the --log_dir with its manifest.json / log.txt). Under torchrun every process meets the same
refusal before init_process_group: rank 0 prints it, the others exit 2 silently.
(`--R 0` is legitimate: the ALQ stage then stops after the greedy initialisation, recorded as shortened;
tests/test_runs_alq.py checks that.)"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_runs_apot import tiny_mnist

ALQ = os.path.join(REPO, "alq")


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, QUANTLAB_RUNS=str(tmp_path / "runs"), RESULTS_DIR=str(tmp_path / "res"),
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def bare_tensor(d):
    p = d / "bare.pth"
    torch.save(torch.zeros(3), p)
    return p


def alq_stage_file(d):
    p = d / "alq_stage.pth"
    torch.save({"net_state_dict": {}, "stage": "ALQ", "quantlab": {"paper": "alq", "stage": "ALQ"}}, p)
    return p


CASES = [
    (["--PRETRAIN", "--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--PRETRAIN", "--pr", "1.5"], "--pr 1.5 is out of range"),
    (["--max_bit", "6", "6", "6", "6"], "nothing to do: pass --PRETRAIN, --ALQ, --POSTTRAIN and/or --export PATH"),
    (["--PRETRAIN", "--model_ori", "{tmp}/afile/ori.pth"], "--model_ori {tmp}/afile/ori.pth"),
    (["--PRETRAIN", "--model_ori", "{bare}"], "already exists (not a checkpoint of this script)"),
    (["--PRETRAIN", "--ALQ", "--max_bit", "0"], "--max_bit needs one value per quantized layer"),
    (["--PRETRAIN", "--ALQ", "--max_bit", "0", "0", "0", "0"], "--max_bit 0 for features.0.weight is impossible"),
    (["--PRETRAIN", "--lr", "nan"], "--lr nan is not a finite number"),
    (["--PRETRAIN", "--val_size", "30"], "--val_size 30 must be between 1 and"),
    (["--PRETRAIN", "--data", "{tmp}/nothing-here"], "MNIST not found under"),
    (["--ALQ", "--model_ori", "{bare}"], "is not a checkpoint of this script"),
    (["--ALQ", "--model_ori", "{alqfile}"], "is a ALQ output; --model_ori takes the PRETRAIN output"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_refused_in_one_line_before_any_run_exists(argv, needle, tmp_path, env):
    data = tiny_mnist(tmp_path / "data", n_train=20, n_test=10)
    subs = {"tmp": str(tmp_path), "bare": str(bare_tensor(tmp_path)), "alqfile": str(alq_stage_file(tmp_path))}
    (tmp_path / "afile").write_text("x")
    argv = [a.format(**subs) for a in argv] + ["--log_dir", str(tmp_path / "log")]
    needle = needle.format(**subs)
    if "--data" not in argv:
        argv += ["--data", data]
    r = subprocess.run([sys.executable, "lenet5.py"] + argv, cwd=ALQ, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stdout[-800:] + r.stderr[-800:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert r.stderr.startswith("error: ")
    assert not os.path.exists(tmp_path / "runs"), os.listdir(tmp_path / "runs")      # no run directory at all
    assert not os.path.exists(tmp_path / "log"), os.listdir(tmp_path / "log")        # no manifest.json, log.txt
    assert not os.path.exists(tmp_path / "res")                                   # no record
    assert not os.path.exists(tmp_path / "nothing-here")                          # no empty data folder either


def test_without_data_the_default_folder_is_left_as_it_was(tmp_path, monkeypatch):
    """`cd alq && python lenet5.py --PRETRAIN` without MNIST: torchvision's download is tried (here it fails at
    once, as without network) and the ./data/MNIST/raw/ it made is removed again; one line names --data."""
    import torchvision.datasets.mnist as tv_mnist
    from urllib.error import URLError
    import alq_import
    A = alq_import.load()

    def offline(url, *a, **k):
        raise URLError("no network in this test")
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    monkeypatch.delenv("QUANTLAB_DATA", raising=False)    # the default root is then ./data
    cwd = tmp_path / "alq"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(A.train.UserError, match=r"MNIST not found under \./data \(the automatic download failed: "
                                                r"RuntimeError, the download site could not be reached\).*pass --data"):
        A.lenet5.main(["--PRETRAIN", "--log_dir", str(tmp_path / "log")])
    assert os.listdir(cwd) == [] and not os.path.exists(tmp_path / "log")
    assert not os.path.exists(tmp_path / "runs")


def rank_run(tmp_path, env, rank, argv):
    """lenet5.py as process `rank` of 2 under torchrun's environment, without torchrun and without a rendezvous
    (no MASTER_ADDR: a process that got as far as init_process_group would fail with a traceback)."""
    e = dict(env, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    e.pop("MASTER_ADDR", None)
    e.pop("MASTER_PORT", None)
    return subprocess.run([sys.executable, "lenet5.py"] + argv, cwd=ALQ, env=e, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("argv,needle", [
    (["--PRETRAIN", "--batch_size", "5"], "--batch_size 5 is the total batch of the 2 processes and must be a "
                                          "multiple of 2; pass --batch_size 4"),
    (["--PRETRAIN", "--lr", "nan"], "--lr nan is not a finite number"),
    (["--ALQ", "--max_bit", "0"], "--max_bit needs one value per quantized layer"),
], ids=["batch_size", "lr", "max_bit"])
def test_under_torchrun_rank_zero_says_it_once_before_any_process_group(argv, needle, tmp_path, env):
    data = tiny_mnist(tmp_path / "data", n_train=20, n_test=10)
    argv = argv + ["--data", data, "--log_dir", str(tmp_path / "log")]
    r0, r1 = rank_run(tmp_path, env, 0, argv), rank_run(tmp_path, env, 1, argv)
    assert (r0.returncode, r1.returncode) == (2, 2), r0.stderr[-800:] + r1.stderr[-800:]
    assert r0.stderr.startswith("error: ") and r0.stderr.count("\n") == 1 and needle in r0.stderr, r0.stderr
    assert r1.stderr == "" and r1.stdout == "" and r0.stdout == ""
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "log")


@pytest.mark.slow
def test_under_the_real_torchrun_the_line_is_printed_once(tmp_path, env):
    """The launcher itself (2 CPU processes): one error line from the script, no traceback of the script's code
    and no run directory. torchrun then adds its own ChildFailedError report and exits 1; that report is the
    launcher's, which a worker cannot silence (alq/DEVIATIONS.md)."""
    data = tiny_mnist(tmp_path / "data", n_train=20, n_test=10)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--",
                        "lenet5.py", "--PRETRAIN", "--batch_size", "5", "--data", data, "--log_dir",
                        str(tmp_path / "log")], cwd=ALQ, env=dict(env, CUDA_VISIBLE_DEVICES=""),
                       capture_output=True, text=True, timeout=300)
    said = r.stdout + r.stderr
    assert r.returncode != 0 and said.count("error: --batch_size 5 is the total batch of the 2 processes") == 1, said
    assert "exitcode  : 2" in said and 'File "' + ALQ not in said and "train.py" not in said
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "log")
