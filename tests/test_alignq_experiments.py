"""The other AlignQ experiments end to end on generated data: SVHN (.mat) ResNet-20 / MobileNetV2, DenseNet-40 and
ResNet-56 ADMM on a generated CIFAR-10, the short-form entry, --refine, --grad_scaling and --stage align."""
import os

import numpy as np
import pytest
import torch

from alignq import engine, optim
from alignq.options import parse_args
from alignq.quant import weight_cdf
from conftest import REPO, run_script
from test_alignq_scripts import make_cifar


def make_svhn(root, n=12):
    from scipy.io import savemat
    rng = np.random.RandomState(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        savemat(root / f"{split}_32x32.mat", {"X": rng.randint(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                              "y": rng.randint(1, 11, (n, 1)).astype(np.uint8)})
    return root


def base(tmp_path, data, bs=4):
    return ["--data_dir", str(data), "--job_dir", str(tmp_path / "job"), "--num_epochs", "1", "--max_iters", "2",
            "--train_batch_size", str(bs), "--eval_batch_size", "6", "--workers", "0", "--seed", "0",
            "--no-pretrained", "--print_freq", "1"]


@pytest.mark.parametrize("experiment,flags", [
    ("resnet-20-svhn", ["--bitW", "4", "--abitW", "4"]),
    pytest.param("mobilenet-v2-svhn", ["--bitW", "8", "--abitW", "8"], marks=pytest.mark.slow),
])
def test_svhn_experiments(tmp_path, experiment, flags):
    pytest.importorskip("scipy")
    data = make_svhn(tmp_path / "data" / "svhn")
    best = engine.run(base(tmp_path, data.parent) + flags, experiment)
    assert 0 <= best <= 100
    assert torch.load(tmp_path / "job" / "checkpoint" / "model_best.pt", weights_only=True)["quantlab"]["bits"] \
        == int(flags[1])


@pytest.mark.slow
def test_densenet_cifar(tmp_path):
    data = make_cifar(tmp_path / "data", n_train=4, n_test=6)
    assert 0 <= engine.run(base(tmp_path, data) + ["--bitW", "4", "--abitW", "4"], "dense-cifar-10") <= 100


@pytest.mark.parametrize("target,experiment,n_admm", [
    ("resnet20_quant", "resnet-20-cifar-10", 21),
    pytest.param("resnet56_quant", "resnet-56-cifar-10", 57, marks=pytest.mark.slow),
])
def test_short_form_admm_refine_and_options(tmp_path, target, experiment, n_admm):
    data = make_cifar(tmp_path / "data", n_train=4, n_test=6)
    r = run_script(["main.py", "--target_model", target, "--bitW", "4", "--abitW", "4"]
                   + base(tmp_path, data), cwd=f"{REPO}/alignq/cdf_alignment_admm",
                   env={"RESULTS_DIR": str(tmp_path / "res")})
    assert r.returncode == 0, r.stderr
    # the entry point writes runs/alignq/job-<time>/ and --job_dir links to it
    run_dir = os.path.realpath(tmp_path / "job")
    assert os.path.islink(tmp_path / "job") and os.path.dirname(run_dir) == os.path.join(
        os.environ["QUANTLAB_RUNS"], "alignq") and os.path.basename(run_dir).startswith("job-")
    ck = torch.load(tmp_path / "job" / "checkpoint" / "model_best.pt", weights_only=True)
    ident = ck["quantlab"]
    assert (ident["experiment"], ident["model"], ident["scheme"]) == (experiment, target, "alignq+admm")
    assert sum(k.endswith("alterD") for k in ck["state_dict_t"]) == n_admm
    # --refine starts from those weights (ADMM Z/Gamma included) with the paper's gradient scaling and stage 'align'
    argv = base(tmp_path, data)
    argv[argv.index("--job_dir") + 1] = str(tmp_path / "job2")
    best = engine.run(argv + ["--target_model", target, "--bitW", "4", "--abitW", "32", "--stage", "align",
                              "--refine", str(tmp_path / "job" / "checkpoint" / "model_best.pt"),
                              "--grad_scaling"], None)
    assert 0 <= best <= 100


def test_grad_scaling_multiplies_by_the_papers_factor():
    a = parse_args(["--bitW", "2", "--abitW", "2", "--grad_scaling"], "resnet-20-cifar-10")
    m = engine.build_model(a)
    convs = [c for c in m.modules() if hasattr(c, "quantize_fn")]
    for c in convs:
        c.weight.grad = torch.ones_like(c.weight)
    optim.scale_gradients(m, a)
    assert torch.equal(convs[0].weight.grad, torch.ones_like(convs[0].weight))   # the first conv is left alone
    w = convs[1].weight.detach()
    z = (w - w.mean()) / w.std()
    w_hat = weight_cdf(w)   # same float32 w_hat: frac() below jumps at the grid points, tested separately
    s = torch.sigmoid((((w_hat + 0.5) * 3) % 1) * 4 * 2)
    expect = s * (1 - s) * 1.0 * 2 * torch.exp(-z * z / 2) / (w.std() * (2 * np.pi) ** 0.5)
    assert torch.allclose(convs[1].weight.grad, expect, rtol=1e-5, atol=1e-7)    # float32, same formula
