"""ALQ's bad input, table-driven: one line, exit 2, before any work, and no run directory left behind.
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
    argv = [a.format(**subs) for a in argv]
    if "--data" not in argv:
        argv += ["--data", data]
    r = subprocess.run([sys.executable, "lenet5.py"] + argv, cwd=ALQ, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stdout[-800:] + r.stderr[-800:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "runs"), os.listdir(tmp_path / "runs")      # no run directory at all
    assert not os.path.exists(tmp_path / "nothing-here")                          # no empty data folder either
