"""FDDA scripts: documented commands, the BNScenters -> train -> test pipeline on a generated ImageFolder,
torchrun (2 CPU processes, gloo) and every bad input (exit 2, one line, before any work)."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from common.errors import run_main
from conftest import REPO, run_script
from fdda import BNScenters, main_cosine_CBNS, models
from fdda import test as fdda_test
from fdda.bns import bns_paths
from fdda.options import overrides_from
from fdda.smoke_data import make

FDDA = os.path.join(REPO, "fdda")
CONF = os.path.join(FDDA, "imagenet_config.hocon")
ENV = {"OMP_NUM_THREADS": "1", "FDDA_DATA": ""}
# a short recipe on 32 px images (mobilenetv2_w1 ends in a global mean pool, so any size >= 32 works)
TINY = ("--img_size 32 --nEpochs 2 --iters_per_epoch 2 --warmup_epochs 1 --unfreeze_epochs 1 --test_start_epoch 0 "
        "--correct_set_epoch 0 --batchSize 4 --nThreads 0 --test_teacher false --teacher_path random").split()

README_COMMANDS = [  # the seed README's commands, verbatim but for the model-name alternatives
    "python BNScenters.py --dataPath PathToImageNetDataset --model_name resnet18",
    "python main_cosine_CBNS.py --model_name resnet18 --conf_path imagenet_config.hocon --id=0",
    "python main_cosine_CBNS_8F8L.py --model_name mobilenet_w1 --conf_path imagenet_config.hocon --id=0",
    "python test.py --conf_path imagenet_config.hocon --model_name regnetx_600m --model_path PathToModel",
    "python test_8F8L.py --conf_path imagenet_config.hocon --model_name mobilenetv2_w1 --model_path PathToModel",
]


def call(main, argv, monkeypatch, capsys, *args):
    """Run a script's main in-process as `python <argv>`; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", argv)
    code = 0
    try:
        run_main(main, *args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make(str(tmp_path_factory.mktemp("fdda") / "data"), classes=3, train=2, val=2, size=40)


@pytest.fixture(scope="module")
def centers(data, tmp_path_factory):
    """BNScenters.py (in-process) for a random mobilenetv2_w1 on the generated data: its save_ImageNet dir."""
    d = tmp_path_factory.mktemp("centers")
    mp, cap = pytest.MonkeyPatch(), CaptureFixture()
    try:
        mp.chdir(d)
        mp.setenv("FDDA_DATA", data)                       # dataPath from the environment
        code, out, err = call(BNScenters.main, ["BNScenters.py", "--model_name", "mobilenetv2_w1", "--teacher_path",
                                                "random", "--img_size", "32"], mp, cap)
    finally:
        mp.undo()
    assert code == 0, err
    return str(d / "save_ImageNet")


class CaptureFixture:
    """Minimal capsys stand-in for module-scoped fixtures (output is simply discarded)."""

    def readouterr(self):
        class R:
            out = err = ""
        return R()


def test_documented_commands_parse():
    for cmd in README_COMMANDS:
        argv = shlex.split(cmd)[2:]
        if "BNScenters" in cmd:
            a = BNScenters.parser.parse_args(argv)
            assert (a.dataPath, a.model_name) == ("PathToImageNetDataset", "resnet18")
        elif "main_" in cmd:
            a = main_cosine_CBNS.make_parser("8F8L" in cmd).parse_args(argv)
            assert a.conf_path == "imagenet_config.hocon" and a.id == 0 and overrides_from(a) == {}
        else:
            a = fdda_test.make_parser("8F8L" in cmd).parse_args(argv)
            assert a.model_path == "PathToModel" and a.model_name in models.MODELS


def test_documented_command_verbatim_says_what_is_missing(tmp_path):
    # CUDA_VISIBLE_DEVICES=0 python BNScenters.py ... on a machine without ImageNet: one line, exit 2
    r = run_script(["BNScenters.py", "--dataPath", "PathToImageNetDataset", "--model_name", "resnet18"], cwd=FDDA,
                   env=dict(ENV, CUDA_VISIBLE_DEVICES="0"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "ImageNet not found under PathToImageNetDataset" in r.stderr
    assert "Traceback" not in r.stderr


def test_pipeline_end_to_end(data, centers, tmp_path, monkeypatch, capsys):
    """BNScenters -> main_cosine_CBNS (2 epochs) -> test.py, on 3 generated classes with a random network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FDDA_DATA", data)
    shutil.copytree(centers, "save_ImageNet")
    files = bns_paths("./save_ImageNet", "mobilenetv2_w1")
    mean = torch.load(files["mean"], weights_only=True)
    assert sorted(mean) == [0, 1, 2] and list(mean[1]) == [1] and len(mean[1][1]) == 52
    assert mean[2][2][0].shape == (32,)                       # BN 0 of mobilenetv2: 32 channels
    pl = torch.load(files["path_label"], weights_only=True)
    assert pl[1][1][0][0].startswith(os.path.join(data, "train", "c001"))
    listed = open("save_ImageNet/mobilenetv2_w1_calibration_images.txt").read().splitlines()
    assert [l.split("\t")[0] for l in listed] == ["0", "1", "2"]
    # replaying the list gives the same centers
    code, _, err = call(BNScenters.main, ["BNScenters.py", "--model_name", "mobilenetv2_w1", "--teacher_path",
                                          "random", "--img_size", "32", "--save_path", "replay", "--calib_list",
                                          "save_ImageNet/mobilenetv2_w1_calibration_images.txt"], monkeypatch, capsys)
    assert code == 0, err
    again = torch.load(bns_paths("replay", "mobilenetv2_w1")["var"], weights_only=True)
    # same images, same network, same batch: equal on CPU; the tolerance only covers GPU algorithm choices
    assert torch.allclose(again[2][2][30], torch.load(files["var"], weights_only=True)[2][2][30], rtol=1e-5)

    argv = [os.path.join(FDDA, "main_cosine_CBNS.py"), "--model_name", "mobilenetv2_w1", "--conf_path", CONF,
            "--id=0"] + TINY
    code, out, err = call(main_cosine_CBNS.main, argv, monkeypatch, capsys)
    assert code == 0, err
    assert "[epoch 2/2]" in out and "DBNS/CBNS from layer 24" in out
    run = "save_ImageNet/log_imagenet_bs4_lr0.1000_TELCNN_baseline_optSGD_qw4_qa4_epoch2_imganet_4bit_00_repeat"
    assert sorted(f for f in os.listdir(run) if not f.startswith("tb")) == \
        ["checkpoint.pth", "generator.pth", "imagenet_config.hocon", "log.txt", "manifest.json",
         "mobilenetv2_w1_BNScenters.json", "mobilenetv2_w1_calibration_images.txt", "model.pth", "records.jsonl"]
    assert os.listdir(os.path.join(run, "tb"))                  # tensorboardX events
    ckpt = torch.load(os.path.join(run, "model.pth"), weights_only=True)
    assert (ckpt["model_name"], ckpt["qw"], ckpt["qa"], ckpt["f8l8"]) == ("mobilenetv2_w1", 4, 4, False)
    # the original's run directory is a link to the finished run, which has its own directory under runs/fdda/
    assert os.path.islink(run)
    assert os.path.realpath(run).startswith(os.path.join(os.environ["QUANTLAB_RUNS"], "fdda",
                                                         "mobilenetv2_w1-W4A4-F4L4-id0-"))

    code, out, err = call(fdda_test.main, [os.path.join(FDDA, "test.py"), "--conf_path", CONF, "--model_name",
                                           "mobilenetv2_w1", "--model_path", os.path.join(run, "model.pth"),
                                           "--img_size", "32", "--nThreads", "0"], monkeypatch, capsys)
    assert code == 0, err
    assert "Top1 Accuracy" in out and "(6 val images)" in out
    recs = [json.loads(l) for l in open(os.path.join(os.environ["RESULTS_DIR"], "fdda.jsonl"))]
    assert {r_["script"] for r_ in recs} == {"fdda/main_cosine_CBNS.py", "fdda/test.py"}
    last = recs[-1]
    assert (last["model"], last["dataset"], last["setting"], last["n_samples"]) == \
        ("mobilenetv2_w1", "synthetic", "W4A4-F4L4", 6)
    assert last["recipe"]["full"] is False                      # a smoke run is never a reproduction
    # the student evaluated by test.py equals the one the trainer saved: same top-1 as its best epoch
    trained = [r_ for r_ in recs if r_["script"] == "fdda/main_cosine_CBNS.py"][0]
    assert last["value"] == trained["value"]

    # bad inputs of test.py, in-process: other model / bit-width / F8L8, not a checkpoint
    base = ["test.py", "--conf_path", CONF, "--model_path", os.path.join(run, "model.pth"), "--img_size", "32"]
    for extra, f8l8, match in ((["--model_name", "regnetx_600m"], False, "(model differ); pass test.py --model_name "
                                                                         "mobilenetv2_w1 --qw 4 --qa 4"),
                               (["--model_name", "mobilenetv2_w1", "--qw", "5"], False, "4-bit uniform (stage train"),
                               (["--model_name", "mobilenetv2_w1"], True, "(scheme differ); pass test.py")):
        code, out, err = call(fdda_test.main, base + extra, monkeypatch, capsys, f8l8)
        assert code == 2 and match in err and err.count("\n") == 1, err
    # --resume continues the unsuffixed run: pretend it was killed after epoch 1
    state = torch.load(os.path.join(run, "checkpoint.pth"), weights_only=True)
    torch.save(dict(state, epoch=1), os.path.join(run, "checkpoint.pth"))
    code, out, err = call(main_cosine_CBNS.main, argv + ["--resume"], monkeypatch, capsys)
    assert code == 0 and "at epoch 2/2" in out and "[epoch 2/2]" in out and "[epoch 1/2]" not in out, err
    assert len(os.listdir(os.path.join(os.environ["QUANTLAB_RUNS"], "fdda"))) == 1      # no new run directory
    # BNScenters refuses to replace the centers runs were made with
    code, out, err = call(BNScenters.main, ["BNScenters.py", "--model_name", "mobilenetv2_w1"], monkeypatch, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    # the authors' released students are bare state dicts (0-d cur_x_* buffers): accepted, recipe unknown
    bare = {k: (v.reshape(()) if "cur_x" in k else v) for k, v in ckpt["state_dict"].items()}
    torch.save(bare, "released.pth")
    code, out, err = call(fdda_test.main, [os.path.join(FDDA, "test.py"), "--conf_path", CONF, "--model_name",
                                           "mobilenetv2_w1", "--model_path", "released.pth", "--img_size", "32",
                                           "--nThreads", "0"], monkeypatch, capsys)
    assert code == 0 and "Top1 Accuracy: " + format(last["value"], "f") in out, err
    open("junk.pth", "w").write("not a checkpoint")
    code, out, err = call(fdda_test.main, base[:3] + ["--model_path", "junk.pth", "--model_name", "mobilenetv2_w1"],
                          monkeypatch, capsys)
    # common.checkpoint names the file and why the safe loader refuses it
    assert code == 2 and "student model junk.pth" in err and err.count("\n") == 1, err


def test_f8l8_train_and_test(data, centers, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FDDA_DATA", data)
    shutil.copytree(centers, "save_ImageNet")
    argv = [os.path.join(FDDA, "main_cosine_CBNS_8F8L.py"), "--model_name", "mobilenetv2_w1", "--conf_path", CONF,
            "--id=2", "--qw", "5", "--qa", "5"] + TINY + ["--nEpochs", "1", "--warmup_epochs", "0"]
    code, out, err = call(main_cosine_CBNS.main, argv, monkeypatch, capsys, True)
    assert code == 0 and "W5A5-F8L8" in out, err
    run = "save_ImageNet/log_imagenet_bs4_lr0.1000_TELCNN_baseline_optSGD_qw5_qa5_epoch1_imganet_4bit_02_repeat"
    sd = torch.load(os.path.join(run, "model.pth"), weights_only=True)["state_dict"]
    assert sd["features.0.2.1.x_min"].shape == (1,)
    code, out, err = call(fdda_test.main, [os.path.join(FDDA, "test_8F8L.py"), "--conf_path", CONF, "--model_name",
                                           "mobilenetv2_w1", "--model_path", os.path.join(run, "model.pth"),
                                           "--qw", "5", "--qa", "5", "--img_size", "32", "--nThreads", "0"],
                          monkeypatch, capsys, True)
    assert code == 0 and "Top1 Accuracy" in out, err
    rec = [json.loads(l) for l in open(os.path.join(os.environ["RESULTS_DIR"], "fdda.jsonl"))][-1]
    assert (rec["setting"], rec["script"]) == ("W5A5-F8L8", "fdda/test_8F8L.py")


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    from common.errors import UserError
    from fdda import distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="started 4 processes on this machine but only 2 GPU"):
        distributed.setup()


@pytest.mark.parametrize("world,force_cpu,backend,device", [("2", "", "nccl", "cuda:1"), ("2", "1", "gloo", "cpu"),
                                                          ("4", "1", "gloo", "cpu")])
def test_setup_under_torchrun(monkeypatch, world, force_cpu, backend, device):
    """Rank 1 on a 2-GPU machine (simulated): nccl on its own GPU, or gloo on the CPU with QUANTLAB_DDP_CPU=1, also
    with more processes than GPUs."""
    import torch.distributed as dist
    from fdda import distributed
    got = {}
    for k, v in dict(WORLD_SIZE=world, LOCAL_WORLD_SIZE=world, LOCAL_RANK="1", QUANTLAB_DDP_CPU=force_cpu).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: got.setdefault("set_device", str(d)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: got.setdefault("backend", backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    d = distributed.setup()
    assert (d.enabled, d.rank, d.world, d.main, str(d.device)) == (True, 1, int(world), False, device)
    assert got == ({"backend": "nccl", "set_device": "cuda:1"} if backend == "nccl" else {"backend": "gloo"})


def test_single_process_collectives_return_their_input(monkeypatch):
    from fdda import distributed
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = distributed.setup()
    assert (d.enabled, d.rank, d.world, d.main) == (False, 0, 1, True)
    got = d.sum_values([3, 2.5])                  # evaluate's counts stay ints in its record
    assert got == [3, 2.5] and type(got[0]) is int
    net = torch.nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    grad, weight = net.weight.grad.clone(), net.weight.detach().clone()
    d.average_gradients(list(net.parameters()))
    d.broadcast_module(net)
    assert torch.equal(net.weight.grad, grad) and torch.equal(net.weight, weight)


def test_reproduce_says_what_it_needs(tmp_path):
    r = subprocess.run(["bash", os.path.join(FDDA, "reproduce.sh")], env=dict(os.environ, DATA=str(tmp_path)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs ImageNet (ILSVRC2012) as an ImageFolder" in r.stderr
    assert f"got DATA='{tmp_path}'" in r.stderr and "SMOKE=1" in r.stderr


@pytest.mark.slow
def test_reproduce_smoke_224px(tmp_path):
    """make reproduce-fdda SMOKE=1: generated data, random resnet18 at 224 px, BNScenters -> train -> test."""
    env = dict(os.environ, SMOKE="1", SMOKE_DIR=str(tmp_path / "smoke"), OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", os.path.join(FDDA, "reproduce.sh")], env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[epoch 2/2]" in r.stdout and "shortened" in r.stdout
    recs = [json.loads(l) for l in open(tmp_path / "smoke" / "results" / "fdda.jsonl")]
    assert [x["script"] for x in recs] == ["fdda/main_cosine_CBNS.py", "fdda/test.py"]
    assert all(x["dataset"] == "synthetic" and x["recipe"]["full"] is False for x in recs)


def test_bad_inputs_one_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FDDA_DATA", raising=False)
    monkeypatch.delenv("QUANTLAB_DATA", raising=False)
    notfolder = tmp_path / "flat"
    (notfolder / "train").mkdir(parents=True)
    (notfolder / "train" / "x.png").write_bytes(b"")
    (notfolder / "val").mkdir()
    bad_conf = tmp_path / "bad.hocon"
    bad_conf.write_text("qw = [4\n")
    main = ["main_cosine_CBNS.py", "--conf_path", CONF, "--id=0", "--dataPath", data]    # 224 px: resnet18's size
    cases = [
        (BNScenters.main, ["BNScenters.py", "--model_name", "resnet18"], "ImageNet not found"),   # ./data
        (BNScenters.main, ["BNScenters.py", "--model_name", "resnet18", "--dataPath", str(tmp_path / "none")],
         "ImageNet not found"),
        (BNScenters.main, ["BNScenters.py", "--model_name", "resnet18", "--dataPath", str(notfolder)],
         "is a flat folder of 1 images without class folders"),
        (BNScenters.main, ["BNScenters.py", "--model_name", "resnet50", "--dataPath", data], "unknown --model_name"),
        (BNScenters.main, ["BNScenters.py", "--model_name", "resnet18", "--dataPath", data],
         "expected resnet18-0982-0126861b.pth at"),
        (main_cosine_CBNS.main, main + ["--model_name", "resnet18"],
         "BNS-center file ./save_ImageNet/resnet18_mean_Categorical_bs_1.pickle is missing"),
        (main_cosine_CBNS.main, main + ["--model_name", "vgg16"], "unknown --model_name 'vgg16'"),
        (main_cosine_CBNS.main, main + ["--model_name", "resnet18", "--qw", "1"], "qw = 1 is not supported"),
        (main_cosine_CBNS.main, main + ["--model_name", "resnet18", "--qa", "32"], "qa = 32 is not supported"),
        (main_cosine_CBNS.main, ["main_cosine_CBNS.py", "--conf_path", str(bad_conf), "--model_name", "resnet18"],
         "does not parse as HOCON"),
        (main_cosine_CBNS.main, ["main_cosine_CBNS.py", "--conf_path", "nope.hocon", "--model_name", "resnet18"],
         "config file not found"),
        (main_cosine_CBNS.main, main[:4] + ["--model_name", "resnet18"],
         "ImageNet not found under ./data"),
        (fdda_test.main, ["test.py", "--conf_path", CONF, "--model_name", "resnet18", "--dataPath", data,
                          "--model_path", "missing.pth"], "student model not found: missing.pth"),
    ]
    for fn, argv, match in cases:
        code, out, err = call(fn, argv, monkeypatch, capsys)
        assert code == 2 and match in err and err.count("\n") == 1, (argv, err)
    assert not os.path.exists("save_ImageNet")                  # nothing was created before the checks


def test_bns_centers_of_another_network(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("save_ImageNet")
    code, _, err = call(BNScenters.main, ["BNScenters.py", "--model_name", "mobilenetv2_w1", "--teacher_path",
                                          "random", "--img_size", "32", "--dataPath", data], monkeypatch, capsys)
    assert code == 0, err
    for key, p in bns_paths("save_ImageNet", "mobilenetv2_w1").items():   # pretend they are regnet's
        os.rename(p, bns_paths("save_ImageNet", "regnetx_600m")[key])
    code, _, err = call(main_cosine_CBNS.main, ["x", "--conf_path", CONF, "--model_name", "regnetx_600m",
                                                "--dataPath", data] + TINY, monkeypatch, capsys)
    assert code == 2 and "hold 52 BN layers per class but regnetx_600m has 53" in err


def test_ddp_two_processes_gloo(data, centers, tmp_path):
    """The training script in 2 processes with torchrun's environment variables (gloo): averaged gradients,
    broadcast buffers, split evaluation. Two fresh interpreters, not forks: a fork of a process whose OpenMP
    pool is already running can hang in its first parallel region (seen with 2 threads under xdist).
    The real torchrun launcher is exercised by the slow test below."""
    import socket
    shutil.copytree(centers, tmp_path / "save_ImageNet")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, os.path.join(FDDA, "main_cosine_CBNS.py"), "--model_name", "mobilenetv2_w1",
            "--conf_path", CONF, "--id=1"] + TINY
    procs, outs = [], []
    for rank in range(2):
        env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FDDA_DATA=data, OMP_NUM_THREADS="1",
                   CUDA_VISIBLE_DEVICES="")                       # gloo on CPU even where a GPU exists
        out = open(tmp_path / f"rank{rank}.out", "w")
        outs.append(out)
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for out in outs:
            out.close()
    out0, out1 = (open(tmp_path / f"rank{r}.out").read() for r in range(2))
    assert codes == [0, 0], out0[-2000:] + out1[-2000:]
    assert "2 process(es) on cpu" in out0 and "[epoch 2/2]" in out0 and "[epoch" not in out1  # rank 0 logs only
    recs = [json.loads(l) for l in open(os.path.join(os.environ["RESULTS_DIR"], "fdda.jsonl"))]
    assert len(recs) == 1 and recs[0]["n_samples"] == 6 and recs[0]["extra"]["world_size"] == 2


@pytest.mark.slow
def test_torchrun_two_processes(data, centers, tmp_path):
    """torchrun --nproc_per_node=2, CPU (gloo): DDP training and DDP evaluation."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FDDA_DATA=data, CUDA_VISIBLE_DEVICES="")
    shutil.copytree(centers, tmp_path / "save_ImageNet")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(FDDA, "main_cosine_CBNS.py"), "--model_name", "mobilenetv2_w1", "--conf_path",
                        CONF, "--id=1"] + TINY, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) on cpu" in r.stdout and r.stdout.count("[epoch 2/2]") == 1      # rank 0 logs only
    recs = [json.loads(l) for l in open(os.path.join(os.environ["RESULTS_DIR"], "fdda.jsonl"))]
    assert recs[-1]["n_samples"] == 6 and recs[-1]["extra"]["world_size"] == 2            # all val images once
