"""ALQ scripts as a user runs them: documented commands, defaults, stages run separately, resume, export,
errors; tiny generated data by default, real MNIST / tiny CIFAR / tiny ImageNet runs marked slow."""
import ast
import json
import os

import numpy as np
import pytest
import torch

import alq_import
from conftest import make_tiny_mnist, require_shared, run_script

A = alq_import.load()
ALQ_DIR = alq_import.ALQ_DIR
TINY = ["--val_size", "100", "--batch_size", "64", "--pretrain_epochs", "1", "--R", "1", "--epoch_basis", "1",
        "--epoch_coord", "1", "--post_epochs", "1", "1", "--top_k", "0.05"]


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """600 train / 200 test 28x28 images whose label is readable from the picture (a bright block per class)."""
    return make_tiny_mnist(tmp_path_factory.mktemp("mnist"), 600, 200, 4, (4, 24))


def _run(args, tmp_path, cwd=ALQ_DIR, timeout=600):
    env = {"RESULTS_DIR": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    return run_script(args, cwd=cwd, timeout=timeout, env=env)


def _files(tmp_path):
    return ["--model_ori", str(tmp_path / "ori.pth"), "--model", str(tmp_path / "q.pth"),
            "--log_dir", str(tmp_path / "log")]


# --------------------------------------------------------------------------------------------- commands

def test_documented_commands_parse_verbatim_with_original_defaults(monkeypatch):
    monkeypatch.delenv("QUANTLAB_DATA", raising=False)
    a = A.lenet5.get_parser().parse_args("--PRETRAIN --ALQ --POSTTRAIN".split())
    assert (a.PRETRAIN, a.ALQ, a.POSTTRAIN) == (True, True, True)
    assert (a.data, a.val_size, a.model_ori, a.model) == \
        ("./data", 10000, "./lenet5_model_ori.pth", "./lenet5_model.pth")
    assert (a.lr, a.R, a.epoch_prune, a.epoch_basis, a.ld_basis, a.epoch_coord, a.ld_coord, a.wd) == \
        (1e-3, 4, 1, 20, 0.8, 10, 0.8, 0.0)
    assert (a.pr, a.top_k, a.subc, a.max_bit, a.batch_size) == (0.8, 0.005, [0, 0, 2, 1], [6] * 4, 128)
    assert a.structure == ["kernelwise", "kernelwise", "subchannelwise", "subchannelwise"]
    v = A.vgg.get_parser().parse_args("--PRETRAIN --ALQ --POSTTRAIN".split())
    assert (v.val_size, v.R, v.pr, v.top_k, v.subc, v.max_bit) == (5000, 5, 0.4, 0.002, [0] * 6 + [16, 2, 2], [6] * 9)
    assert v.structure == ["channelwise"] + ["pixelwise"] * 5 + ["subchannelwise"] * 3
    monkeypatch.setenv("QUANTLAB_DATA", "/data/root")        # the project's data rule (common.data.data_root)
    assert [m.get_parser().parse_args(["--ALQ"]).data for m in (A.lenet5, A.vgg, A.resnet)] == ["/data/root"] * 3
    for net, n in (("resnet18", 21), ("resnet34", 37)):
        cmd = f"--PRETRAIN --DOWNLOAD --ALQ --POSTTRAIN --net {net} --data /PATH/TO/ILSVRC12".split()
        r = A.resnet.fill_net_defaults(A.resnet.get_parser().parse_args(cmd))
        assert (r.DOWNLOAD, r.net, r.data, r.lr, r.R, r.epoch_basis, r.epoch_coord, r.ld_coord, r.pr, r.top_k,
                r.batch_size, r.val_size) == \
            (True, net, "/PATH/TO/ILSVRC12", 2e-4, 5, 10, 5, 0.6, 0.15, 5e-4, 256, 50000)
        assert r.structure == ["channelwise"] + ["pixelwise"] * (n - 2) + ["subchannelwise"]
        assert r.max_bit == [8] * n and r.subc == [0] * (n - 1) + [2]
        assert r.model_ori_urls.endswith(f"{net}-" + {"resnet18": "5c106cde.pth", "resnet34": "333f7ec4.pth"}[net])
        m = A.resnet.NETS[net]()
        assert len(A.binarynet.split_parameters(m)[0]) == n


FLAGS = ["--data", "--val_size", "--model_ori", "--model", "--lr", "--R", "--epoch_prune", "--epoch_basis",
         "--ld_basis", "--epoch_coord", "--ld_coord", "--wd", "--pr", "--top_k", "--structure", "--subc",
         "--max_bit", "--batch_size", "--PRETRAIN", "--ALQ", "--POSTTRAIN", "--export", "--resume"]


def test_help_as_a_user_runs_it(tmp_path):
    res = _run(["lenet5.py", "-h"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert all(f in res.stdout for f in FLAGS) and "(default: 0.005)" in res.stdout


@pytest.mark.parametrize("script", ["lenet5.py", "vgg.py", "resnet.py"])
def test_a_script_imports_its_modules_once_from_the_package(script, tmp_path):
    """Run from alq/ (that directory first on sys.path, as `python lenet5.py` has it), a script takes every module
    from the package alq and none a second time under its flat name (two copies of a module: two sets of globals,
    two classes of the same name)."""
    code = ("import os, runpy, sys\n"
            f"sys.argv = [{script!r}, '-h']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "here = os.path.abspath('.') + os.sep\n"
            "print(sorted(k for k, m in list(sys.modules.items())\n"
            "             if (getattr(m, '__file__', None) or '').startswith(here)))\n")
    res = _run(["-c", code], tmp_path)
    assert res.returncode == 0, res.stderr
    mods = ast.literal_eval(res.stdout.strip().splitlines()[-1])
    assert {"alq.binarynet", "alq.fastpath", "alq.native", "alq.stages", "alq.train"} <= set(mods), mods
    assert all(k == "alq" or k.startswith("alq.") for k in mods), mods


@pytest.mark.parametrize("script", ["vgg", "resnet"])
def test_help_lists_every_original_flag(script, capsys):
    with pytest.raises(SystemExit) as e:
        getattr(A, script).get_parser().parse_args(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    extra = ["--net", "--DOWNLOAD", "--model_ori_urls"] if script == "resnet" else []
    assert all(f in out for f in FLAGS + extra)


# --------------------------------------------------------------------------------------------- errors

def _one_line_error(res, *needles):
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0]


def test_missing_data_is_one_line(tmp_path):
    res = _run(["lenet5.py", "--PRETRAIN", "--data", str(tmp_path / "nowhere")] + _files(tmp_path), tmp_path)
    _one_line_error(res, "MNIST", "--data")


def test_posttrain_without_alq_output_is_a_user_error(tiny_mnist, tmp_path):
    with pytest.raises(A.train.UserError, match="quantized model not found.*--model"):
        A.lenet5.main(["--POSTTRAIN", "--data", tiny_mnist] + TINY + _files(tmp_path))


def test_wrong_layer_flags_are_user_errors(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    net = A.lenet5.LeNet5()
    torch.save({"net_state_dict": net.state_dict()}, tmp_path / "ori.pth")
    with pytest.raises(A.train.UserError, match="--max_bit needs one value per quantized layer"):
        A.lenet5.main(["--ALQ", "--data", tiny_mnist, "--max_bit", "6", "6"] + TINY + _files(tmp_path))
    with pytest.raises(A.train.UserError, match="impossible"):
        A.lenet5.main(["--ALQ", "--data", tiny_mnist, "--max_bit", "6", "6", "99", "6"] + TINY + _files(tmp_path))
    with pytest.raises(A.train.UserError, match="--subc 3 .* must be >= 1 and divide"):
        A.lenet5.main(["--ALQ", "--data", tiny_mnist, "--subc", "0", "0", "3", "1"] + TINY + _files(tmp_path))


def test_resnet_download_without_network_names_the_file(tmp_path):
    res = _run(["resnet.py", "--PRETRAIN", "--DOWNLOAD", "--data", str(tmp_path), "--model_ori_urls",
                "http://127.0.0.1:9/resnet18-5c106cde.pth"], tmp_path)
    assert res.returncode == 2
    # no ImageNet here: the data check comes first and names the layout
    assert "ImageNet" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(A.train.UserError, match="resnet18-5c106cde.pth"):
        A.resnet.download_weights("http://127.0.0.1:9/resnet18-5c106cde.pth")


# --------------------------------------------------------------------------------------------- stages

def test_stages_run_separately_and_export_is_exact(tiny_mnist, tmp_path):
    files = _files(tmp_path)
    res = _run(["lenet5.py", "--PRETRAIN", "--ALQ", "--data", tiny_mnist] + TINY + files, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    alq = torch.load(tmp_path / "q.pth", weights_only=True)  # tensors and primitives only
    assert alq["stage"] == "ALQ" and alq["finished"]
    layer = alq["parameters_w_bin"]["classifier.0.weight"]
    assert layer["B"].dtype == torch.int8 and layer["mask"].dtype == torch.bool
    bits_alq = alq["avg_bit"]
    assert bits_alq < 6.0  # one pruning epoch removed coordinates
    # POSTTRAIN alone (a new process) loads the --ALQ output
    res = _run(["lenet5.py", "--POSTTRAIN", "--data", tiny_mnist] + TINY + files, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"load quantized model {tmp_path / 'q.pth'}" in res.stdout
    post = torch.load(tmp_path / "q_post.pth", weights_only=True)
    assert post["stage"] == "POSTTRAIN" and post["avg_bit"] == pytest.approx(bits_alq)
    # export: packed file, reloaded bit-identical, records written
    res = _run(["lenet5.py", "--data", tiny_mnist, "--export", str(tmp_path / "m.alqpack")] + TINY + files, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bit-identical" in res.stdout
    recs = [json.loads(l) for l in open(tmp_path / "results" / "alq.jsonl")]
    last = {r["metric"]: r for r in recs[-4:]}
    assert set(last) == {"top1", "avg_bits", "storage_KB", "packed_KB"}
    assert all(r["setting"] == "ALQ" and r["model"] == "lenet5" and r["dataset"] == "mnist" for r in last.values())
    assert last["packed_KB"]["value"] == pytest.approx(os.path.getsize(tmp_path / "m.alqpack") / 1024)
    assert last["avg_bits"]["value"] == pytest.approx(bits_alq)
    assert last["top1"]["n_samples"] == 200


def test_killed_alq_stage_resumes_to_the_same_model(tiny_mnist, tmp_path, monkeypatch):
    """Kill the ALQ stage after its basis epochs, resume: the result equals an uninterrupted run bit for bit."""
    common = ["--data", tiny_mnist] + TINY + ["--epoch_basis", "2", "--train_limit", "128"]
    ori = str(tmp_path / "ori.pth")
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    A.lenet5.main(["--PRETRAIN", "--model_ori", ori, "--log_dir", str(tmp_path / "l0")] + common)
    full = str(tmp_path / "full.pth")
    A.lenet5.main(["--ALQ", "--model_ori", ori, "--model", full, "--log_dir", str(tmp_path / "l1")] + common)
    part = str(tmp_path / "part.pth")
    orig = A.stages.train_coordinate

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(A.stages, "train_coordinate", killed)
    with pytest.raises(KeyboardInterrupt):
        A.lenet5.main(["--ALQ", "--model_ori", ori, "--model", part, "--log_dir", str(tmp_path / "l2")] + common)
    assert os.path.exists(A.checkpoints.resume_path(part))
    monkeypatch.setattr(A.stages, "train_coordinate", orig)
    A.lenet5.main(["--ALQ", "--resume", "--model_ori", ori, "--model", part, "--log_dir", str(tmp_path / "l3")]
                  + common)
    a, b = torch.load(full, weights_only=True), torch.load(part, weights_only=True)
    # exact on CPU: uninterrupted and resumed runs are in this process (same machine, same thread count), so
    # every op takes the same path; what a GPU can promise is decided in the scripts' deterministic mode
    for k in a["net_state_dict"]:
        assert torch.equal(a["net_state_dict"][k], b["net_state_dict"][k]), k
    for name, layer in a["parameters_w_bin"].items():
        for k in ("B", "alpha", "mask"):
            assert torch.equal(layer[k], b["parameters_w_bin"][name][k])
    assert not os.path.exists(A.checkpoints.resume_path(part))
    # a finished stage is skipped by --resume
    A.lenet5.main(["--ALQ", "--resume", "--model_ori", ori, "--model", part, "--log_dir", str(tmp_path / "l3")]
                  + common)
    assert "already finished" in open(tmp_path / "l3" / "log.txt").read()


# --------------------------------------------------------------------------------------------- slow: real data

@pytest.mark.slow
def test_real_mnist_short_pipeline(tmp_path):
    data = require_shared("data")
    require_shared("data", "MNIST", "raw")
    res = _run(["lenet5.py", "--PRETRAIN", "--ALQ", "--POSTTRAIN", "--data", data, "--train_limit", "3000",
                "--pretrain_epochs", "3", "--R", "1", "--epoch_basis", "1", "--epoch_coord", "1",
                "--post_epochs", "1", "1", "--export", str(tmp_path / "m.alqpack")] + _files(tmp_path), tmp_path,
               timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    log = res.stdout
    vals = [float(l.split("top1 ")[1].split()[0]) for l in log.splitlines() if l.startswith("  val:")]
    assert vals[0] < 20 and max(vals) > 90  # random init -> trained; quantized model still accurate
    recs = [json.loads(l) for l in open(tmp_path / "results" / "alq.jsonl")]
    top1 = [r for r in recs if r["metric"] == "top1"][-1]
    assert top1["value"] > 90 and top1["n_samples"] == 10000


@pytest.mark.slow
def test_vgg_tiny_cifar_pipeline(tmp_path):
    from PIL import Image
    rng = np.random.RandomState(0)
    for split, per in (("train", 3), ("test", 1)):
        for c, name in enumerate(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck"]):
            d = tmp_path / "cifar" / split / name
            d.mkdir(parents=True)
            for i in range(per):
                Image.fromarray(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{c * 10 + i}.png")
    res = _run(["vgg.py", "--PRETRAIN", "--ALQ", "--POSTTRAIN", "--data", str(tmp_path / "cifar"), "--val_size", "10",
                "--batch_size", "8", "--pretrain_epochs", "1", "--R", "1", "--epoch_basis", "1", "--epoch_coord", "1",
                "--post_epochs", "1", "1", "--workers", "0", "--export", str(tmp_path / "v.alqpack")]
               + _files(tmp_path), tmp_path, timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bit-identical" in res.stdout and "RESULT vgg cifar10 ALQ" in res.stdout


@pytest.mark.slow
def test_resnet18_tiny_imagenet_flat_val_pipeline(tmp_path):
    from PIL import Image
    rng = np.random.RandomState(0)
    wnids = ["n01440764", "n01443537", "n01484850"]
    for w in wnids:
        d = tmp_path / "imnet" / "train" / w
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.randint(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{w}_{i}.JPEG")
    val = tmp_path / "imnet" / "val"
    val.mkdir()
    lines = []
    for i, w in enumerate(wnids):  # the README's flat val/ILSVRC2012_val_*.JPEG layout + a ground-truth file
        f = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        Image.fromarray(rng.randint(0, 255, (40, 48, 3), dtype=np.uint8)).save(val / f)
        lines.append(f"{f} {w}")
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    weights = tmp_path / "resnet18-5c106cde.pth"
    torch.save(A.resnet.NETS["resnet18"]().state_dict(), weights)
    res = _run(["resnet.py", "--PRETRAIN", "--DOWNLOAD", "--ALQ", "--POSTTRAIN", "--net", "resnet18", "--data",
                str(tmp_path / "imnet"), "--val_labels", str(tmp_path / "val.txt"), "--model_ori_urls", str(weights),
                "--val_size", "3", "--batch_size", "3", "--R", "1", "--epoch_basis", "1", "--epoch_coord", "1",
                "--post_epochs", "1", "1", "--workers", "0", "--export", str(tmp_path / "r.alqpack")]
               + _files(tmp_path), tmp_path, timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bit-identical" in res.stdout and "RESULT resnet18 imagenet ALQ" in res.stdout
