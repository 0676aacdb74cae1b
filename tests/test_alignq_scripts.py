"""AlignQ entry points: verbatim README commands, bad input, FP32 pretrain -> 8-bit -> test_only/resume on a
generated CIFAR-10, short real CIFAR-10 runs whose loss falls."""
import os
import pickle
import shlex

import numpy as np
import pytest
import torch

from alignq import checkpoints, engine, optim
from alignq.models import CDFScheme, MODELS
from alignq.options import parse_args
from common.errors import UserError
from conftest import REPO, run_script, shared_path

R20 = os.path.join(REPO, "alignq", "cdf_alignment", "resnet-20-cifar-10")
README_R20 = ('--job_dir "experiment/ours/resnet/t_8bit_pre32bit" --method "ours" --source_dir "pretrained" '
              '--source_file "res20_32bit/model_best.pt" --arch resnet --bitW 8 --abitW 8 --target_model '
              '"resnet20_quant" --source_model "resnet20" --num_epochs 200 --train_batch_size 128 --eval_batch_size 100 '
              '--lr 0.04 --lr_gamma 0.1 --lr_decay_steps [80, 120] --momentum 0.9 --weight_decay 0.0001 --lam 1 '
              '--lam2 4 --act_range 2 --print_freq 200')
README_DANN = ('--src_data "dslr" --tgt_data "webcam" --train_split "True" --job_dir '
               '"experiment/ours/resnet/t_8bit_pre32bit" --method "ours" --source_dir "pretrained" --source_file '
               '"dslr_webcam/dw_32bit/model_best.pt" --arch resnet --bitW 8 --abitW 8 --model "resnet50_dann" '
               '--num_epochs 200 --train_batch_size 28 --eval_batch_size 28 --lr 0.001 --lr_gamma 0.1 '
               '--lr_decay_steps [80, 120] --momentum 0.9 --weight_decay 0.0005 --lam 1 --lam2 4 --act_range 2 '
               '--print_freq 10')


def test_readme_commands_parse_verbatim():
    a = parse_args(shlex.split(README_R20), "resnet-20-cifar-10")
    assert a.lr_decay_steps == [80, 120] and a.bitW == 8 and a.abitW == 8 and a.arch == "resnet"
    assert (a.source_dir, a.source_file, a.target_model, a.act_range) == \
        ("pretrained", "res20_32bit/model_best.pt", "resnet20_quant", 2.0)
    assert a.pretrained is True and a.num_epochs == 200 and a.weight_decay == 1e-4 and a.lr == 0.04
    assert checkpoints.source_candidates(a) == ["pretrained/res20_32bit/model_best.pt",
                                           "pretrained/ours/res20_32bit/model_best.pt"]
    d = parse_args(shlex.split(README_DANN), "dann_office", admm=True)
    assert d.train_split is True and (d.src_data, d.tgt_data) == ("dslr", "webcam") and d.admm is True
    assert d.lr_decay_steps == [80, 120] and d.model == "resnet50_dann" and d.train_batch_size == 28
    # the short form picks the experiment from the flags
    assert parse_args(shlex.split(README_R20)).experiment == "resnet-20-cifar-10"
    assert parse_args(shlex.split(README_DANN)).experiment == "dann_office"


def test_per_experiment_defaults_and_bool_flags():
    assert parse_args([], "resnet-20-cifar-10").lr_decay_steps == [80, 150]
    s = parse_args([], "resnet-20-svhn")
    assert (s.lr, s.lr_decay_steps) == (0.001, [80, 150])
    m = parse_args([], "mobilenet-v2-svhn")
    assert (m.num_epochs, m.lr_decay_steps) == (100, [30, 60, 90])
    assert parse_args(["--no-pretrained"], "resnet-20-cifar-10").pretrained is False
    assert parse_args(["--train_split", "False"], "dann_office").train_split is False
    assert parse_args(["--lr_decay_steps", "80", "120"], "resnet-20-cifar-10").lr_decay_steps == [80, 120]
    d = parse_args(["--bottle_neck", "False", "--param", "0.5", "--dataset_root", "/x"], "dsan_office")
    assert (d.bottle_neck, d.param, d.data_dir) == (False, 0.5, "/x")


@pytest.mark.parametrize("experiment", ["resnet-20-cifar-10", "dann_office", "dann_digit"])
def test_data_dir_default_is_the_project_data_root(monkeypatch, experiment):
    """$QUANTLAB_DATA, else ./data (common.data.data_root); no fallback to ../shared/data."""
    from alignq.data import default_data_dir
    monkeypatch.delenv("QUANTLAB_DATA", raising=False)
    assert parse_args([], experiment).data_dir == "./data" == default_data_dir()
    monkeypatch.setenv("QUANTLAB_DATA", "/somewhere/data")
    assert parse_args([], experiment).data_dir == "/somewhere/data" == default_data_dir()
    assert parse_args(["--data_dir", "/x"], experiment).data_dir == "/x"


@pytest.mark.parametrize("flags", [["--bitW", "0"], ["--bitW", "33"], ["--abitW", "abc"], ["--lr_decay_steps", "[x]"]])
def test_bad_flags_are_one_line_user_errors(flags):
    with pytest.raises(UserError) as e:
        parse_args(flags, "resnet-20-cifar-10")
    assert "\n" not in str(e.value)


def test_bad_input_exits_2_with_one_line(tmp_path):
    r = run_script(["main.py", "--job_dir", str(tmp_path / "j"), "--source_dir", str(tmp_path / "pre")], cwd=R20)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "FP32 source model not found" in r.stderr and "--bitW 32 --abitW 32" in r.stderr
    assert "res20_32bit/model_best.pt" in r.stderr


def test_unknown_office_domain(tmp_path):
    with pytest.raises(UserError, match="not one of the office31 domains"):
        engine.run(["--src_data", "dslrr", "--job_dir", str(tmp_path)], "dann_office")


def test_source_of_another_architecture_is_rejected(tmp_path):
    src = tmp_path / "pre" / "res20_32bit" / "model_best.pt"
    src.parent.mkdir(parents=True)
    torch.save({"state_dict_t": MODELS["resnet56_quant"](CDFScheme(32, 32)).state_dict()}, src)
    with pytest.raises(UserError, match="another architecture"):
        engine.run(["--bitW", "8", "--abitW", "8", "--source_dir", str(tmp_path / "pre"),
                    "--job_dir", str(tmp_path / "j")], "resnet-20-cifar-10")
    torch.save({"state_dict_t": {}, "model": "mobile_v2"}, src)
    with pytest.raises(UserError, match="mobile_v2 model"):
        engine.run(["--bitW", "8", "--abitW", "8", "--source_dir", str(tmp_path / "pre"),
                    "--job_dir", str(tmp_path / "j")], "resnet-20-cifar-10")


def make_cifar(root, n_train=16, n_test=20, seed=0):
    """A tiny CIFAR-10 in torchvision's cifar-10-batches-py layout (5 train batches + test batch)."""
    rng = np.random.RandomState(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.randint(0, 10, n).tolist()}, f)
    return root


def test_pretrain_quantize_evaluate_resume_reset(tmp_path):
    data = make_cifar(tmp_path / "data")
    common = ["--data_dir", str(data), "--source_dir", str(tmp_path / "pretrained"), "--train_batch_size", "16",
              "--eval_batch_size", "10", "--workers", "0", "--seed", "0", "--print_freq", "100"]
    job32 = str(tmp_path / "exp" / "fp32")
    engine.run(["--bitW", "32", "--abitW", "32", "--num_epochs", "1", "--job_dir", job32] + common,
               "resnet-20-cifar-10")
    src = tmp_path / "pretrained" / "res20_32bit" / "model_best.pt"
    ck = torch.load(src, weights_only=True)
    ident = ck["quantlab"]
    assert (ident["paper"], ident["model"], ident["bits"], ident["scheme"]) == ("alignq", "resnet20_quant", 32, "fp32")
    assert ident["recipe"]["full"] is False       # 1 of 200 epochs on 80 of 50,000 images
    # the README command (data/output paths aside) finds it and trains 8-bit; then --test_only and --resume
    job8 = str(tmp_path / "exp" / "t_8bit_pre32bit")
    argv = shlex.split(README_R20.replace("experiment/ours/resnet/t_8bit_pre32bit", job8)
                       .replace('--source_dir "pretrained"', "")) + common
    argv[argv.index("--num_epochs") + 1] = "1"
    engine.run(argv, "resnet-20-cifar-10")
    best = os.path.join(job8, "checkpoint", "model_best.pt")
    assert torch.load(best, weights_only=True)["quantlab"]["bits"] == 8
    assert engine.run(argv + ["--test_only"], "resnet-20-cifar-10") >= 0
    first = os.path.realpath(job8)
    engine.run(argv, "resnet-20-cifar-10")                 # the same command again: a new run, the first stays
    second = os.path.realpath(job8)
    assert second != first and os.path.isfile(os.path.join(first, "checkpoint", "model_best.pt"))
    argv2 = list(argv)
    argv2[argv2.index("--num_epochs") + 1] = "2"
    engine.run(argv2 + ["--resume", os.path.join(job8, "checkpoint", "model_last.pt")], "resnet-20-cifar-10")
    assert torch.load(os.path.join(second, "checkpoint", "model_last.pt"), weights_only=True)["epoch"] == 2
    with pytest.raises(UserError, match="bits differ"):   # a checkpoint under other flags
        engine.run(argv2 + ["--resume", os.path.join(job8, "checkpoint", "model_last.pt"), "--bitW", "4"],
                   "resnet-20-cifar-10")
    engine.run(argv + ["--reset"], "resnet-20-cifar-10")  # --reset through the link: a third run, nothing removed
    assert os.path.isdir(first) and os.path.isdir(second) and os.path.realpath(job8) not in (first, second)
    # the FP32 source model: a new run of the same --job_dir replaces it (its first run keeps its own copy);
    # a run of another --job_dir may not
    fp32_first = os.path.realpath(job32)
    engine.run(["--bitW", "32", "--abitW", "32", "--num_epochs", "1", "--job_dir", job32] + common,
               "resnet-20-cifar-10")
    assert torch.load(src, weights_only=True)["run_dir"] == os.path.realpath(job32) != fp32_first
    assert os.path.isfile(os.path.join(fp32_first, "checkpoint", "model_best.pt"))
    with pytest.raises(UserError, match="already exists \\(written by another run\\)"):
        engine.run(["--bitW", "32", "--abitW", "32", "--num_epochs", "1", "--job_dir", str(tmp_path / "exp" / "x")]
                   + common, "resnet-20-cifar-10")
    with pytest.raises(UserError, match="refuses"):
        checkpoints.safe_reset(str(tmp_path / "data"))        # not a run directory: never removed
    assert (tmp_path / "data" / "cifar-10-batches-py").is_dir()
    from common.results import read_records
    recs = read_records("alignq", str(tmp_path / "results"))
    assert any(r["setting"] == "W8A8" and r["recipe"]["full"] is False for r in recs)


def real_cifar_batches(n_per_class=20, seed=0):
    """A fixed set of real CIFAR-10 training images (first files of each class folder), normalised."""
    from PIL import Image
    root = shared_path("data", "cifar10", "train")
    if not os.path.isdir(root):
        pytest.skip(f"needs {root} (../shared is not part of the project)")
    from alignq.data import CIFAR_NORM
    xs, ys = [], []
    for label, c in enumerate(sorted(os.listdir(root))):
        for f in sorted(os.listdir(os.path.join(root, c)))[:n_per_class]:
            with Image.open(os.path.join(root, c, f)) as im:
                xs.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255)
            ys.append(label)
    x, y = CIFAR_NORM(torch.stack(xs)), torch.tensor(ys)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


@pytest.mark.parametrize("bits", [32, 8])
def test_real_cifar_loss_falls(bits):
    torch.manual_seed(0)
    x, y = real_cifar_batches()
    args = parse_args(["--bitW", str(bits), "--abitW", str(bits), ], "resnet-20-cifar-10")
    model = engine.build_model(args)
    opt = optim.make_optimizer(model, args, 0.04, set())
    loader = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 200, 50)]
    args.print_freq = 10 ** 6

    class Log:
        info = staticmethod(lambda m: None)
    history = []
    for epoch in range(4):
        history += engine.train_cls(model, loader, opt, args, torch.device("cpu"), epoch, Log)[2]
    first, last = np.mean(history[:4]), np.mean(history[-4:])
    assert np.isfinite(history).all()
    # 16 SGD steps on 200 images: the first epoch averages ~2.4; the fourth 0.25-0.4 lower (seeds 0-2, both
    # bit-widths); a net that does not learn stays within ~0.05 (batch-to-batch noise of the 4-batch means)
    assert last < first - 0.15, history


def test_interrupt_saves_a_resumable_checkpoint(tmp_path, monkeypatch):
    """SIGINT/SIGTERM during an epoch: stop after the batch, save model_last.pt at that epoch, --resume redoes it."""
    from common import interrupt
    data = make_cifar(tmp_path / "data")
    argv = ["--data_dir", str(data), "--job_dir", str(tmp_path / "job"), "--bitW", "4", "--abitW", "4",
            "--no-pretrained", "--num_epochs", "2", "--train_batch_size", "16", "--eval_batch_size", "10",
            "--workers", "0", "--seed", "0"]
    calls = []
    monkeypatch.setattr(interrupt, "requested", lambda: calls.append(1) or 2)     # as if SIGINT arrived
    with pytest.raises(interrupt.Interrupted, match="--resume"):
        engine.run(argv, "resnet-20-cifar-10")
    assert len(calls) >= 1
    last = tmp_path / "job" / "checkpoint" / "model_last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    monkeypatch.setattr(interrupt, "requested", lambda: None)
    engine.run(argv + ["--resume", str(last)], "resnet-20-cifar-10")
    assert torch.load(last, weights_only=True)["epoch"] == 2
