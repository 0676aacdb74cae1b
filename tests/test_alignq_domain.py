"""AlignQ domain adaptation (DANN, DSAN, ADMM) on a generated Office-31, DANN digits on real MNIST -> generated
MNIST-M, the Office-31 split, the DANN learning-rate fix, and the baseline quantizers' level sets."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from alignq import checkpoints, engine, optim
from alignq.baselines import (APoTConv2d, BWNWeight, ClampAct, DorefaWeight, LLSQAct, LLSQWeight, LSQQuantizer,
                              UniformWeight, apot_grid, scheme)
from alignq.data import mnist_m
from alignq.models import MODELS
from alignq.options import parse_args
from common.data import office31, office31_split
from common.errors import UserError
from conftest import shared_path

CLASSES = [f"c{i:02d}" for i in range(31)]


def make_office(root, per_class=2, size=20, domains=("dslr", "webcam", "amazon")):
    rng = np.random.RandomState(0)
    for d in domains:
        for c in CLASSES:
            p = root / "office31" / d / "images" / c
            p.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(p / f"frame_{i:04d}.jpg")
    return root


def make_mnistm(root, n_train=40, n_test=20):
    d = root / "MNISTM" / "processed"
    d.mkdir(parents=True)
    rng = np.random.RandomState(1)
    for name, n in (("train", n_train), ("test", n_test)):
        torch.save((torch.from_numpy(rng.randint(0, 256, (n, 28, 28, 3), dtype=np.uint8)),
                    torch.from_numpy(rng.randint(0, 10, n))), d / f"mnist_m_{name}.pt")
    return root


def test_office_split_is_deterministic_and_80_20(tmp_path):
    make_office(tmp_path, per_class=5, domains=("dslr",))
    ds = office31(tmp_path, "dslr")
    a_train, a_test = office31_split(ds)
    b_train, b_test = office31_split(office31(tmp_path, "dslr"))
    assert a_train.indices == b_train.indices and a_test.indices == b_test.indices
    assert len(a_train) == 31 * 4 and len(a_test) == 31            # int(5 * 0.8) = 4 per class
    assert not set(a_train.indices) & set(a_test.indices)


def test_dann_lr_fix():
    a = parse_args(["--num_epochs", "100"], "dann_office")
    assert optim.dann_lr(a, 5) == pytest.approx(a.lr / (1 + 10 * 4 / 100) ** 0.75, rel=1e-12)
    assert optim.dann_lr(a, 0) == pytest.approx(a.lr / (1 - 10 / 100) ** 0.75, rel=1e-12)   # the original at E > 10
    for E in (1, 5, 10):           # math error (E < 10) / division by zero (E = 10) in the original: lr itself
        a = parse_args(["--num_epochs", str(E)], "dann_office")
        assert optim.dann_lr(a, 0) == a.lr and math.isfinite(optim.dann_lr(a, E - 1))


@pytest.mark.parametrize("experiment,admm,extra", [
    ("dann_office", True, []),
    pytest.param("dsan_office", False, [], marks=pytest.mark.slow),
    pytest.param("dsan_office", True, ["--abitW", "4"], marks=pytest.mark.slow),
    pytest.param("dann_office", False, ["--method", "dorefa", "--bitW", "4"], marks=pytest.mark.slow),
])
def test_office_runs_end_to_end(tmp_path, experiment, admm, extra):
    make_office(tmp_path / "data")
    argv = ["--data_dir", str(tmp_path / "data"), "--job_dir", str(tmp_path / "job"), "--bitW", "8", "--abitW", "8",
            "--no-pretrained", "--num_epochs", "1", "--max_iters", "2", "--train_batch_size", "4",
            "--eval_batch_size", "8", "--img_size", "32", "--workers", "0", "--seed", "0",
            "--src_data", "dslr", "--tgt_data", "webcam"] + extra
    best = engine.run(argv, experiment, admm=admm)
    assert 0 <= best <= 100
    assert os.path.islink(tmp_path / "job") and os.path.realpath(tmp_path / "job").startswith(
        os.path.join(os.environ["QUANTLAB_RUNS"], "alignq", "job-"))          # the run is under runs/alignq/
    ck = torch.load(tmp_path / "job" / "checkpoint" / "model_best.pt", weights_only=True)
    ident = ck["quantlab"]
    method = extra[extra.index("--method") + 1] if "--method" in extra else None
    assert ident["scheme"] == (method or ("alignq+admm" if admm else "alignq"))
    assert ident["model"] == ("resnet50_dann" if experiment == "dann_office" else "resnet50_dsan")
    if admm:   # Z / Gamma moved away from their U[0,1) init by the ADMM update
        z = [v for k, v in ck["state_dict_t"].items() if k.endswith("alterD")]
        assert len(z) == 16 and z[0].shape == (4, 4)


def test_imagenet_weights_missing_is_a_clear_error(tmp_path):
    make_office(tmp_path / "data", domains=("dslr", "webcam"))
    with pytest.raises(UserError, match="resnet50-0676ba61.pth"):
        engine.run(["--data_dir", str(tmp_path / "data"), "--job_dir", str(tmp_path / "j"), "--bitW", "32",
                    "--abitW", "32", "--source_dir", str(tmp_path / "pre")], "dann_office", admm=False)


@pytest.mark.slow
def test_dann_digit_mnist_to_mnistm(tmp_path):
    mnist_root = shared_path("data")
    if not os.path.isdir(os.path.join(mnist_root, "MNIST")):
        pytest.skip(f"needs {mnist_root}/MNIST (../shared is not part of the project)")
    data = tmp_path / "data"
    make_mnistm(data)
    os.symlink(os.path.join(mnist_root, "MNIST"), data / "MNIST")
    assert len(mnist_m(str(data), train=True)) == 40
    best = engine.run(["--data_dir", str(data), "--job_dir", str(tmp_path / "job"), "--bitW", "4", "--abitW", "4",
                       "--no-pretrained", "--num_epochs", "1", "--max_iters", "3", "--workers", "0", "--seed", "0",
                       "--eval_batch_size", "500"], "dann_digit")
    assert 0 <= best <= 100


# ------------------------------------------------------------------------------------ baselines: level sets


def dense(lo, hi, n=20001):
    return torch.linspace(lo, hi, n)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_uniform_and_dorefa_weight_levels(k):
    n = 2 ** k - 1
    assert len(torch.unique(UniformWeight(k)(dense(-1, 1)))) == 2 * n + 1          # j/n, j in [-n, n]
    w = dense(-0.3, 0.3)
    q = DorefaWeight(k)(w)
    m = torch.tanh(w).abs().max()
    levels = torch.unique(q)
    assert len(levels) == n + 1                                                       # m (2 j / n - 1), j in [0, n]
    assert torch.allclose(levels, m * (2 * torch.arange(n + 1) / n - 1), atol=1e-6)


def test_bwn_and_clamp_act_levels():
    w = torch.randn(1000)
    assert torch.allclose(torch.unique(BWNWeight(1)(w)).abs(), w.abs().mean().expand(2))
    q = ClampAct(4)(dense(-1, 2))
    assert torch.allclose(torch.unique(q), torch.arange(16) / 15)                    # 2^k levels on [0, 1]


@pytest.mark.parametrize("k", [2, 4])
def test_lsq_levels(k):
    wq = LSQQuantizer(k, False)
    assert len(torch.unique(wq(dense(-10, 10)).detach())) == 2 ** k                  # Qn..Qp times s = 1
    aq = LSQQuantizer(k, True)
    assert torch.equal(torch.unique(aq(dense(-3, 30)).detach()), torch.arange(2 ** k, dtype=torch.float32))


def test_llsq_levels():
    q = LLSQWeight(3, 2)
    with torch.no_grad():
        q.alpha_w.fill_(0.25)
    out = q(dense(-5, 5, 20000).reshape(2, -1, 1, 1)).detach()
    # 2^k signed levels j * alpha_q; the original's 16-bit alpha grid clamps max(alpha) to (2^15 - 1) / 2^17
    assert torch.equal(torch.unique(out), torch.arange(-4, 4) * (32767 / 2 ** 17))
    a = LLSQAct(3)
    with torch.no_grad():
        a.alpha.fill_(0.5)
    # unsigned: 2^(k-1) levels; 0.5 = 2^-1 gives q_code 16, 0.5 * 2^16 = 32768 -> clamped to 32767 as well
    assert torch.equal(torch.unique(a(dense(-2, 9)).detach()), torch.arange(4) * (32767 / 2 ** 16))


@pytest.mark.parametrize("k,count", [(3, 7), (4, 15), (5, 31)])
def test_apot_levels(k, count):
    conv = APoTConv2d(1, 1, 1, w_bit=k, bias=False)
    g = apot_grid(k - 1)
    assert len(g) == (count + 1) // 2 and g.max() == 1                             # B = k - 1 bits, + sign
    wq = torch.unique(torch.cat([g, -g]))
    assert len(wq) == count
    assert torch.allclose(apot_grid(2), torch.tensor([0, 0.125, 0.25, 0.5]) / 0.5)  # the original's B = 2 grid
    assert conv.wgrid.shape == g.shape


def test_baseline_schemes_build_and_check_bits():
    for m in ("uniform", "dorefa", "llsq", "apot", "lsq", "bwn"):
        net = MODELS["resnet20_quant"](scheme(m, 4, 4))
        out = net(torch.randn(2, 3, 32, 32))
        out.sum().backward()
        assert torch.isfinite(out).all()
    with pytest.raises(UserError, match="apot supports"):
        scheme("apot", 8, 8)


def test_imagenet_weights_load_by_torchvision_names(tmp_path):
    import torchvision
    tv = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(tv.state_dict(), path)
    a = parse_args(["--bitW", "32", "--abitW", "32", "--imagenet_weights", str(path)], "dann_office")
    model = engine.build_model(a)
    checkpoints.load_imagenet(model, checkpoints.imagenet_weights(a))
    assert torch.equal(model.feature.layer3[2].conv2.weight, tv.layer3[2].conv2.weight)
    assert torch.equal(model.feature.layer4[0].downsample[1].running_var, tv.layer4[0].downsample[1].running_var)
    torch.save({"conv1.weight": torch.zeros(3)}, path)          # not a ResNet-50 file
    with pytest.raises(UserError, match="do not match ResNet-50"):
        checkpoints.load_imagenet(model, str(path))


@pytest.mark.slow
def test_dann_fp32_pretrain_then_quantized_admm(tmp_path):
    make_office(tmp_path / "data", domains=("dslr", "webcam"))
    common = ["--data_dir", str(tmp_path / "data"), "--source_dir", str(tmp_path / "pre"), "--num_epochs", "1",
              "--max_iters", "1", "--train_batch_size", "4", "--eval_batch_size", "8", "--img_size", "32",
              "--workers", "0", "--seed", "0"]
    engine.run(common + ["--bitW", "32", "--abitW", "32", "--no-pretrained", "--job_dir", str(tmp_path / "fp")],
               "dann_office", admm=True)
    src = tmp_path / "pre" / "dslr_webcam" / "dw_32bit" / "model_best.pt"
    assert torch.load(src, weights_only=True)["quantlab"]["scheme"] == "fp32"
    engine.run(common + ["--bitW", "8", "--abitW", "8", "--job_dir", str(tmp_path / "q")], "dann_office", admm=True)
    assert torch.load(tmp_path / "q" / "checkpoint" / "model_best.pt", weights_only=True)["quantlab"]["scheme"] \
        == "alignq+admm"


def test_lmmd_zero_for_identical_domains_and_positive_for_shifted_ones():
    from alignq.dsan import lmmd
    torch.manual_seed(0)
    f = torch.randn(8, 5)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    probs = torch.nn.functional.one_hot(y, 31).float()         # target predicted exactly as the source labels
    assert abs(lmmd(f, f.clone(), y, probs).item()) < 1e-5      # same features, same classes: kernel sums cancel
    assert lmmd(f, f + 3.0, y, probs).item() > 0.1              # a shifted target domain: positive discrepancy
    other = torch.nn.functional.one_hot(torch.full((8,), 7), 31).float()
    assert lmmd(f, f + 3.0, y, other).item() == 0.0             # no class shared by both sides: 0, as the original
