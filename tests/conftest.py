"""Shared fixtures. `shared` is the read-only reference folder (`../shared` or $QUANT_SHARED):
tests that need it skip cleanly when it is absent."""
import os
import subprocess
import sys

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


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """Every test writes its result records, run directories and reference results into a temp dir, never
    into the repository's results/ or runs/; a run a test leaves open is closed after it."""
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
