"""CPU tests that stand in for the GPU-only failures of the "make test on every machine" issue.

- Deterministic mode: with --seed every script turns on what exact resumption needs on CUDA (cuBLAS workspace,
  deterministic cuDNN without autotuning, torch's deterministic algorithms); without it an H100 resumed run
  differed from the uninterrupted one.
- torchrun with more processes than GPUs: every process falls back to gloo on the CPU (never cuda:<rank> for
  a GPU that does not exist, which crashed rank 1 with a device-side assert).
"""
import importlib.util
import os

import pytest
import torch

from common import device as cdev
from conftest import REPO


@pytest.fixture
def restore_determinism():
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


def test_deterministic_mode_sets_everything_exact_resume_needs(restore_determinism, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    cdev.seed_everything(3, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")


def test_rng_state_includes_cuda_when_present(monkeypatch):
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(4, dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: calls.setdefault("cuda", s))
    state = cdev.get_rng_state()
    assert "cuda" in state
    cdev.set_rng_state(state)
    assert "cuda" in calls


class _Stop(Exception):
    pass


def _spy_seed(monkeypatch, module):
    seen = {}

    def spy(seed, deterministic=False):
        seen["deterministic"] = deterministic
        raise _Stop
    monkeypatch.setattr(module, "seed_everything", spy)
    return seen


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("seed,expected", [(["--seed", "5"], True), ([], False)])
def test_apot_cifar_seed_means_deterministic(monkeypatch, seed, expected):
    mod = _load("apot/CIFAR10/main.py", "apot_cifar_main_portability")
    seen = _spy_seed(monkeypatch, mod)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    with pytest.raises(_Stop):
        mod.main(["--bit", "4"] + seed)
    assert seen["deterministic"] is expected


def test_alq_pipeline_is_deterministic(monkeypatch, tmp_path):
    import alq_import
    A = alq_import.load()
    seen = _spy_seed(monkeypatch, A.stages)
    with pytest.raises(_Stop):
        A.lenet5.main(["--PRETRAIN", "--data", str(tmp_path), "--model_ori", str(tmp_path / "o.pth"),
                       "--log_dir", str(tmp_path / "log")])
    assert seen["deterministic"] is True


@pytest.mark.parametrize("local_rank,local_world,n_gpus,force,backend,dev", [
    (1, 2, 1, False, "gloo", "cpu"),      # the H100 case: two processes, one GPU -> both on CPU
    (0, 2, 1, False, "gloo", "cpu"),      # rank 0 decides the same, so the group has one backend
    (1, 2, 2, False, "nccl", "cuda:1"),
    (0, 1, 8, False, "nccl", "cuda:0"),
    (3, 4, 0, False, "gloo", "cpu"),
    (0, 2, 2, True, "gloo", "cpu"),       # QUANTLAB_DDP_CPU=1
])
def test_ddp_device_never_addresses_a_missing_gpu(local_rank, local_world, n_gpus, force, backend, dev):
    b, d, note = cdev.ddp_device(local_rank, local_world, n_gpus, force)
    assert (b, str(d)) == (backend, dev)
    assert (note is not None) == (n_gpus > 0 and b == "gloo")
    if d.type == "cuda":
        assert d.index < n_gpus


def test_setup_distributed_more_processes_than_gpus_uses_gloo(monkeypatch, capsys):
    """Simulates torchrun --nproc_per_node=2 on a one-GPU machine (rank 1) without a GPU."""
    import torch.distributed as dist
    got = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("QUANTLAB_DDP_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: got.setdefault("set_device", d))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: got.setdefault("backend", backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    distributed, rank, world, device = cdev.setup_distributed()
    assert (distributed, rank, world, str(device)) == (True, 1, 2, "cpu")
    assert got == {"backend": "gloo"}                         # torch.cuda.set_device never called


def test_apot_engine_uses_the_common_fallback():
    from apot.ImageNet import engine
    assert engine._setup_distributed is cdev.setup_distributed
