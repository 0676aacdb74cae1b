"""APoT MNIST script with the device-resident loader (default) and `--compile`: short real runs on tiny data."""
import importlib.util
import os
import re
import sys

import pytest

from conftest import make_tiny_mnist

MNIST_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "apot", "MNIST")


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """96 train / 32 test images whose class is a bright horizontal band (flip-invariant, easy to learn)."""
    return make_tiny_mnist(tmp_path_factory.mktemp("mnist"), 96, 32, 2, (2, 26))


def _train(tiny_mnist, tmp_path, monkeypatch, capsys, *extra):
    """MNIST main.py in this process (saves the interpreter start-up of a subprocess); returns its output + logs."""
    spec = importlib.util.spec_from_file_location("apot_mnist_main_fast", os.path.join(MNIST_DIR, "main.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(sys, "argv", ["main.py", "-a", "resnet10", "--bit", "4", "--data", tiny_mnist, "-b", "32",
                                      "--epochs", "1", "-p", "1", "--lr", "0.05", *extra])
    mod.main()
    out = "".join(capsys.readouterr())
    for root, _, files in os.walk(tmp_path):
        for f in files:
            if f.endswith(".log") or f == "log.txt":
                with open(os.path.join(root, f)) as fh:
                    out += fh.read()
    return out


def test_mnist_device_loader_runs_and_logs_loss_at_print_interval(tiny_mnist, tmp_path, monkeypatch, capsys):
    out = _train(tiny_mnist, tmp_path, monkeypatch, capsys, "--loader", "device")
    losses = [float(m) for m in re.findall(r"Loss ([0-9.e+-]+) \(", out)]
    # 3 iterations, printed at every one (-p 1): read from the device sums at the print interval
    assert len(losses) >= 3 and all(v > 0 for v in losses), out[-2000:]
    acc = [float(m) for m in re.findall(r"Acc@1 ([0-9.]+)", out)]
    assert acc, out[-2000:]


@pytest.mark.slow
def test_mnist_compile_flag_trains(tiny_mnist, tmp_path, monkeypatch, capsys):
    """--compile (inductor; C++ compiler on CPU): the same short run completes through the compiled model."""
    out = _train(tiny_mnist, tmp_path, monkeypatch, capsys, "--compile")
    assert re.findall(r"Loss ([0-9.e+-]+) \(", out)
