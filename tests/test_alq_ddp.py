"""ALQ under torchrun (DistributedDataParallel; here 2 CPU processes with gloo) on a tiny generated
ImageFolder through resnet.py: both processes hold the same masks, coordinates, bases and bits; the 2-process run
equals a 1-process run with the same total batch up to float rounding; a killed 2-process run resumes exactly.

Run as a script, this file is one process of such a job: resnet.py with a tiny ResNet (every layer kind of ResNet-18
with 8-16 channels) and deterministic 16-pixel transforms (so that, with no random augmentation, the 1- and 2-process
runs draw the same sample orders from the global RNG), plus test hooks chosen by environment variables.
The processes are two fresh interpreters started with torchrun's environment variables (never forks of pytest: a
fork after the OpenMP pool started can hang); the torchrun launcher itself runs in the slow test.
"""
import functools
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

N_LAYERS = 7                      # quantized layers of TinyResNet: conv1, 2 + 3 block convs, the 1x1 shortcut, fc


class Block(torch.nn.Module):
    """torchvision's BasicBlock (3x3, 3x3, 1x1 shortcut conv when the shape changes)."""

    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = (torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(torch.nn.Module):
    """GroupNorm by default: per-sample normalisation, so a batch split over processes computes what one process
    computes (BatchNorm's batch statistics per process differ by design, as with the original's DataParallel)."""

    def __init__(self, norm="group", num_classes=3):
        super().__init__()
        norm = (lambda c: torch.nn.GroupNorm(2, c)) if norm == "group" else torch.nn.BatchNorm2d
        self.conv1 = torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = norm(8)
        self.layer1 = Block(8, 8, 1, norm)
        self.layer2 = Block(8, 16, 2, norm)
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def tiny_transforms():
    from torchvision import transforms
    tf = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.25] * 3)])
    return tf, tf


def patch_resnet(resnet, norm="group"):
    resnet.NETS["resnet18"] = functools.partial(TinyResNet, norm)
    resnet.data_transforms = tiny_transforms


def flags(root, out):
    return ["--data", str(root), "--val_size", "6", "--batch_size", "6", "--workers", "0", "--pretrain_epochs", "2",
            "--R", "1", "--epoch_basis", "1", "--epoch_coord", "1", "--post_epochs", "1", "1", "--top_k", "0.2",
            "--pr", "0.5", "--structure", "channelwise"] + ["pixelwise"] * (N_LAYERS - 2) + [
            "subchannelwise", "--subc"] + ["0"] * (N_LAYERS - 1) + ["2", "--max_bit"] + ["3"] * N_LAYERS + [
            "--PRETRAIN", "--ALQ", "--POSTTRAIN", "--model_ori", str(out / "ori.pth"), "--model", str(out / "q.pth"),
            "--log_dir", str(out / "log")]


def rank_main(argv):
    """One process of a 2-process job: resnet.py with the tiny net. Hooks: ALQ_TEST_DUMP=dir writes this process's
    ALQ and POSTTRAIN end state there; ALQ_TEST_STOP=n makes rank 0 send itself SIGTERM during its n-th ALQ
    update (a batch of the ALQ stage); ALQ_TEST_NORM=batch uses BatchNorm."""
    from alq import resnet, stages, train
    from common.errors import run_main
    rank = int(os.environ["RANK"])
    patch_resnet(resnet, os.environ.get("ALQ_TEST_NORM", "group"))
    dump = os.environ.get("ALQ_TEST_DUMP")
    if dump:
        def dumped(stage, fn):
            def run(st):
                net, params_bin = fn(st)
                torch.save({"net": net.state_dict(), "bin": {p.name: p.state_dict() for p in params_bin}},
                           os.path.join(dump, f"rank{rank}-{stage}.pt"))
                return net, params_bin
            return run
        stages.alq, stages.posttrain = dumped("ALQ", stages.alq), dumped("POSTTRAIN", stages.posttrain)
    stop = int(os.environ.get("ALQ_TEST_STOP", "0"))
    if stop and rank == 0:
        make_step, calls = train._alq_step, [0]

        def stepper(*a, **k):
            step = make_step(*a, **k)

            def counted():
                step()
                calls[0] += 1
                if calls[0] == stop:
                    os.kill(os.getpid(), signal.SIGTERM)
            return counted
        train._alq_step = stepper
    sys.argv = ["resnet.py"] + argv
    run_main(resnet.main)


if __name__ == "__main__":
    rank_main(sys.argv[1:])
    sys.exit(0)

import alq_import  # noqa: E402  (the in-process tests only)

A = alq_import.load()


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """3 classes, 8 train + 2 val images each (20x24 PNG: class colour plus noise)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("inet")
    rng = np.random.RandomState(0)
    for split, n in (("train", 8), ("val", 2)):
        for c, wnid in enumerate(("n01", "n02", "n03")):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.randint(0, 120, (20, 24, 3))
                a[..., c] += 120
                Image.fromarray(a.astype(np.uint8)).save(d / f"{wnid}_{i}.png")
    return root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, cwd, world=2, timeout=900, **hooks):
    """Start `world` processes of this script with torchrun's variables (CPU, gloo); (exit codes, outputs).
    The timeout is generous: each process needs ~8 s of CPU, but on a shared machine imports alone took minutes."""
    port, procs, files = free_port(), [], []
    for rank in range(world):
        env = dict(os.environ, WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", RESULTS_DIR=str(cwd / "results"),
                   QUANTLAB_RUNS=str(cwd / "runs"), **{k: str(v) for k, v in hooks.items()})
        files.append(open(cwd / f"rank{rank}.out", "w"))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv, cwd=cwd, env=env,
                                      stdout=files[-1], stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in files:
            f.close()
    return codes, [(cwd / f"rank{r}.out").read_text() for r in range(world)]


def tensors(path):
    ck = torch.load(path, weights_only=True)
    out = {f"net.{k}": v for k, v in (ck["net_state_dict"] if "net_state_dict" in ck else ck["net"]).items()}
    for name, layer in (ck["parameters_w_bin"] if "parameters_w_bin" in ck else ck["bin"]).items():
        out.update({f"{name}.{k}": v for k, v in layer.items() if torch.is_tensor(v)})
    return out


def net_tensors(path):
    return torch.load(path, weights_only=True)["net_state_dict"]


def assert_same(a, b, what):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {diff[:5]}"


@pytest.fixture(scope="module")
def two_process_run(imagefolder, tmp_path_factory):
    """The uninterrupted 2-process run (module scope: the later tests compare against it)."""
    out = tmp_path_factory.mktemp("ddp")
    codes, logs = launch(flags(imagefolder, out), out, ALQ_TEST_DUMP=out)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return out, logs


def test_two_processes_hold_the_same_state(two_process_run):
    out, (log0, log1) = two_process_run
    assert "=> 2 processes (DistributedDataParallel, gloo on cpu): --batch_size 6 in all, 3 per process" in log0
    assert "RESULT resnet18 imagenet ALQ" in log0 and "RESULT" not in log1           # rank 0 logs and records
    assert "the 2 processes held the same weights, bases, coordinates and masks after every epoch (7 checks" in log0
    for stage in ("ALQ", "POSTTRAIN"):        # every tensor of the ALQ state, bit for bit, in both processes
        assert_same(tensors(out / f"rank0-{stage}.pt"), tensors(out / f"rank1-{stage}.pt"), stage)
    q = tensors(out / "q.pth")
    assert 0 < int(sum(q[k].sum() for k in q if k.endswith(".mask"))) < int(sum(q[k].numel() for k in q
                                                                                 if k.endswith(".mask")))
    # evaluation is summed over the processes: every image once
    assert "  test: " in log0 and "(6 images)" in log0


def test_two_processes_equal_one_process(two_process_run, imagefolder, tmp_path, monkeypatch):
    out, _ = two_process_run
    monkeypatch.setitem(A.resnet.NETS, "resnet18", functools.partial(TinyResNet, "group"))
    monkeypatch.setattr(A.resnet, "data_transforms", tiny_transforms)
    monkeypatch.chdir(tmp_path)
    A.resnet.main(flags(imagefolder, tmp_path))
    for f in ("ori.pth", "q.pth", "q_post.pth"):
        one, two = (net_tensors(d / f) if f == "ori.pth" else tensors(d / f) for d in (tmp_path, out))
        assert one.keys() == two.keys()
        for k in one:
            if one[k].dtype in (torch.bool, torch.int8, torch.int64):    # masks, bases: the same discrete choices
                # identical here; on another CPU the other summation order could tip a near-tie code or pruning
                # choice, so allow at most 1 % of the entries to differ (a real sharding bug changes far more)
                same = (one[k] == two[k]).float().mean().item()
                assert same >= 0.99, (f, k, same)
            else:
                # the gradients are summed in another order (per process, then averaged): rounding, amplified by
                # the AMSGrad steps' division by sqrt(v) (a step moves a weight by about lr = 2e-4 at most, so
                # rounding changes it by a small fraction of that). Measured: max |difference| 5.5e-6 (ALQ and
                # POSTTRAIN outputs), 9e-8 (PRETRAIN); tolerance atol 1e-4 = half a step.
                assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-4), (f, k, (one[k] - two[k]).abs().max())


def test_a_killed_two_process_run_resumes_exactly(two_process_run, imagefolder, tmp_path):
    out, _ = two_process_run
    argv = flags(imagefolder, tmp_path)
    codes, logs = launch(argv, tmp_path, ALQ_TEST_STOP=2)     # rank 0 gets SIGTERM in its 2nd ALQ update
    assert codes == [143, 130], logs[0][-3000:] + logs[1][-3000:]   # rank 1 stops with it, told by the all-reduce
    for log in logs:
        assert "ALQ step 1/3 (r 1/1 basis epoch 1/1) batch 2/3: resumable checkpoint saved to" in log
    ck = torch.load(tmp_path / "q.resume.pth", weights_only=True)
    assert ck["batch"] == 2 and ck["world"] == 2 and ck["next"] == 0 and len(ck["rng_ranks"]) == 2
    assert ck["stats"]["per_batch"][1].tolist() == [6.0, 6.0]        # both processes' halves of 2 batches
    codes, logs = launch(argv + ["--resume"], tmp_path, ALQ_TEST_DUMP=tmp_path)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "PRETRAIN: already finished" in logs[0] and "resuming ALQ at step 1/3 batch 2" in logs[0]
    for f in ("q.pth", "q_post.pth"):   # same processes, same order of every operation: exactly the same model
        assert_same(tensors(out / f), tensors(tmp_path / f), f)
    for stage in ("ALQ", "POSTTRAIN"):
        assert_same(tensors(out / f"rank1-{stage}.pt"), tensors(tmp_path / f"rank1-{stage}.pt"), stage)


def test_resume_under_another_number_of_processes_is_refused(tmp_path):
    ck = {"batch": 2, "world": 2}
    with pytest.raises(A.train.UserError, match=r"stopped inside an epoch of a run with 2 process\(es\), this one has "
                                                r"1; resume it with torchrun --nproc_per_node=2"):
        A.checkpoints.check_resume_world(ck, A.distributed.Dist(), tmp_path / "q.resume.pth")
    A.checkpoints.check_resume_world({"world": 2}, A.distributed.Dist(), "x")     # after a whole epoch: any number


def test_batch_size_must_divide_among_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(A.train.UserError, match="--batch_size 6 is the total batch of the 4 processes and must be a "
                                                "multiple of 4; pass --batch_size 4"):
        A.resnet.main(["--ALQ", "--batch_size", "6", "--data", "nowhere"])
    assert not (tmp_path / "runs").exists()


class Loopback(A.distributed.Dist):
    """One process playing rank `rank` of `world` without a process group: collectives see only this process
    (rank 0's data is this process's, or `rank0(t)`)."""

    def __init__(self, rank, world, rank0=None):
        super().__init__(True, rank, world)
        self.rank0 = rank0

    def broadcast(self, t):
        return t if self.rank0 is None else self.rank0(t)

    def max(self, v):
        return int(v)


def test_the_processes_shares_make_up_the_single_process_batches():
    from torch.utils.data import DataLoader
    n, batch = 23, 12
    torch.manual_seed(5)
    single = [b.tolist() for b in DataLoader(range(n), batch_size=batch, shuffle=True)]
    for world in (2, 3, 4):
        train, test = [], []
        for rank in range(world):
            torch.manual_seed(5)                  # every process at the same point of the same stream
            sampler = A.distributed.ShardSampler(n, Loopback(rank, world), shuffle=True)
            train.append([b.tolist() for b in DataLoader(range(n), batch_size=batch // world, sampler=sampler)])
            test.append(list(A.distributed.ShardSampler(n, Loopback(rank, world), shuffle=False)))
        assert all(len(t) == len(single) for t in train)          # the same number of steps in every process
        for t, want in enumerate(single):
            got = sorted(i for share in train for i in share[t])
            pad = single[0][:(world - n % world) % world] if t == len(single) - 1 else []
            assert got == sorted(want + pad), (world, t)          # the last batch padded as DistributedSampler
        assert sorted(i for share in test for i in share) == list(range(n))      # evaluation: each image once
    loader = A.distributed.TensorLoader(torch.arange(n), torch.arange(n), batch, shuffle=True)   # lenet5's loader
    torch.manual_seed(5)
    whole = [x.tolist() for x, _ in loader]
    loader.dist = Loopback(1, 2)
    torch.manual_seed(5)
    assert [x.tolist() for x, _ in loader] == [b[1::2] for b in whole[:-1]] + [(whole[-1] + whole[0][:1])[1::2]]


def test_diverged_processes_stop_with_one_line():
    net = TinyResNet()
    names, params_w, _ = A.binarynet.split_parameters(net)
    params_bin = A.binarynet.make_binary_layers(names, params_w, ["channelwise"] + ["pixelwise"] * 5 +
                                                ["subchannelwise"], [0] * 6 + [2], [2] * N_LAYERS)
    Loopback(1, 2).check_sync(net, params_bin, "ALQ step 1/3")          # the same state everywhere: passes
    rows = [f"net.{k}" for k, _ in net.named_parameters()] + [f"{p.name}.{k}" for p in params_bin
                                                              for k in ("mask", "B", "alpha", "w_FP")]

    def other_mask(t):                                    # rank 0 pruned another coordinate of layer2.conv1
        t = t.clone()
        t[rows.index("layer2.conv1.weight.mask"), 1] += 1
        return t
    with pytest.raises(RuntimeError, match=r"after ALQ step 1/3 the 2 processes no longer hold the same ALQ state "
                                           r"\(rank 1 differs from rank 0 first in layer2.conv1.weight.mask\)"):
        Loopback(1, 2, rank0=other_mask).check_sync(net, params_bin, "ALQ step 1/3")


@pytest.mark.slow
def test_torchrun_batchnorm(imagefolder, tmp_path):
    """The torchrun launcher itself, BatchNorm (per-process batch statistics, rank 0's running statistics)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ALQ_TEST_NORM="batch",
               ALQ_TEST_DUMP=str(tmp_path), RESULTS_DIR=str(tmp_path / "results"), QUANTLAB_RUNS=str(tmp_path / "r"))
    # `--` before the script: torchrun's parser takes --pr for an abbreviation of its --print-completion
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--",
                        os.path.abspath(__file__)] + flags(imagefolder, tmp_path), cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("RESULT resnet18 imagenet ALQ") == 1
    for stage in ("ALQ", "POSTTRAIN"):           # BN running statistics included: rank 0's everywhere
        a, b = tensors(tmp_path / f"rank0-{stage}.pt"), tensors(tmp_path / f"rank1-{stage}.pt")
        assert any(k.endswith("running_mean") for k in a)
        assert_same(a, b, stage)
