"""Short real runs of each paper's main script on CUDA (`make test-gpu`; marker `gpu`, never run by CI).

Each test skips without a GPU. Sized for one H100 in well under 5 minutes together; the MNIST data comes
from $QUANT_SHARED/data (the gzipped idx files travel to a GPU machine; see README "GPU checks").
The rest of the suite also runs under `make test-gpu`, so the resume-equals-uninterrupted tests of APoT and
ALQ run on CUDA there (deterministic mode, see common/device.py).
"""
import json
import os

import pytest
import torch

from conftest import REPO, require_shared, run_script

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)")]


def _records(paper):
    path = os.path.join(os.environ["RESULTS_DIR"], f"{paper}.jsonl")
    return [json.loads(line) for line in open(path)]


def test_apot_mnist_one_epoch_on_cuda(tmp_path):
    root = require_shared("data")
    r = run_script(["main.py", "-a", "resnet10", "--bit", "4", "--epochs", "1", "--data", root, "-b", "256",
                    "-j", "4", "--seed", "1", "--checkpoint-dir", str(tmp_path / "ck")],
                   cwd=os.path.join(REPO, "apot", "MNIST"), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = _records("apot")[-1]
    assert rec["n_samples"] == 10000
    assert rec["value"] > 90.0, rec          # one epoch of 4-bit resnet10 on MNIST: ~98 % (CPU runs agree)


def test_alq_lenet5_pipeline_on_cuda(tmp_path):
    root = require_shared("data")
    args = ["lenet5.py", "--PRETRAIN", "--ALQ", "--POSTTRAIN", "--data", root, "--val_size", "1000",
            "--pretrain_epochs", "2", "--R", "1", "--epoch_basis", "1", "--epoch_coord", "1", "--post_epochs",
            "1", "1", "--model_ori", str(tmp_path / "ori.pth"), "--model", str(tmp_path / "alq.pth"),
            "--log_dir", str(tmp_path / "log")]
    r = run_script(args, cwd=os.path.join(REPO, "alq"), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    final = [x for x in _records("alq") if x["metric"] == "top1"][-1]
    assert final["n_samples"] == 10000 and final["value"] > 90.0, final
