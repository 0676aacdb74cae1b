"""Shared fixtures. `shared` is the read-only reference folder (`../shared` or $QUANT_SHARED):
tests that need it skip cleanly when it is absent."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_path(*parts):
    root = os.environ.get("QUANT_SHARED") or os.path.join(REPO, "..", "shared")
    return os.path.normpath(os.path.join(root, *parts))


def require_shared(*parts):
    """Path inside ../shared, or skip the test when it is not there."""
    p = shared_path(*parts)
    if not os.path.exists(p):
        pytest.skip(f"needs {p} (../shared is not part of the project)")
    return p


@pytest.fixture(scope="session", autouse=True)
def _isolated_results_session(tmp_path_factory):
    """The same for module- and session-scoped fixtures (they run before the per-test fixture below)."""
    keys = ("RESULTS_DIR", "QUANTLAB_RUNS", "QUANTLAB_REFERENCE")
    saved = {k: os.environ.get(k) for k in keys + ("QUANTLAB_RESULTS",)}
    # the tests move results with the older name RESULTS_DIR; QUANTLAB_RESULTS (which would win) is unset
    os.environ.pop("QUANTLAB_RESULTS", None)
    base = tmp_path_factory.mktemp("session-results")
    for k, sub in zip(keys, ("results", "runs", "reference")):
        os.environ[k] = str(base / sub)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """Every test writes its result records, run directories and reference results into a temp dir, never
    into the repository's results/ or runs/; a run a test leaves open is closed after it."""
    monkeypatch.delenv("QUANTLAB_RESULTS", raising=False)
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("QUANTLAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("QUANTLAB_REFERENCE", str(tmp_path / "reference"))
    yield
    from common import runs
    runs.end_run()


def run_script(args, cwd, timeout=600, env=None):
    """Run `python <args>` in `cwd` like a user would; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable] + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)


def write_idx(path, arr):
    """An MNIST idx file (uint8 data) at `path`."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def make_tiny_mnist(root, n_train, n_test, band_height, cols):
    """MNIST in torchvision's layout under `root` whose class c is readable from the picture: a bright band of
    `band_height` rows starting at row 2 + 2c over columns cols[0]:cols[1], on dark noise. Returns str(root)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.randint(0, 10, n)
        x = rng.randint(0, 60, (n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 + 2 * c:2 + 2 * c + band_height, cols[0]:cols[1]] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return str(root)
