"""The environment variables that move things: one rule each, and the older names still accepted."""
import os
import subprocess
import sys

import pytest

from common import REPO_ROOT, data, results
from common.checks import check_results_writable
from common.errors import UserError


def test_quantlab_results_wins_and_results_dir_still_works(tmp_path, monkeypatch):
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "old"))
    assert results.results_dir() == str(tmp_path / "old")
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "new"))
    assert results.results_dir() == str(tmp_path / "new")
    results.record("apot", "resnet10", "mnist", "test", "W4A4", "top1", 99.0, 10)
    assert os.path.isfile(tmp_path / "new" / "apot.jsonl") and not os.path.exists(tmp_path / "old")
    monkeypatch.delenv("RESULTS_DIR")
    monkeypatch.delenv("QUANTLAB_RESULTS")
    assert results.results_dir() == os.path.join(REPO_ROOT, "results")


def test_unwritable_results_names_the_variable_used(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "afile" / "results"))
    with pytest.raises(UserError, match="QUANTLAB_RESULTS .*afile is a file"):
        check_results_writable()


def test_data_root_rule(monkeypatch):
    monkeypatch.delenv("QUANTLAB_DATA", raising=False)
    assert data.data_root() == "./data"
    monkeypatch.setenv("QUANTLAB_DATA", "/somewhere/data")
    assert data.data_root() == "/somewhere/data"


@pytest.mark.parametrize("script", ["apot/CIFAR10/main.py", "apot/MNIST/main.py", "apot/ImageNet/main.py"])
def test_scripts_default_data_is_quantlab_data(script, tmp_path):
    """The --data default a script parses is $QUANTLAB_DATA (its --help says so, the parser uses it)."""
    code = ("import runpy, sys; sys.argv = ['x']; import importlib.util as u; "
            f"spec = u.spec_from_file_location('m', {os.path.join(REPO_ROOT, script)!r}); m = u.module_from_spec(spec); "
            "spec.loader.exec_module(m); print(m.parser.parse_args([]).data)")
    env = dict(os.environ, QUANTLAB_DATA=str(tmp_path / "root"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.join(REPO_ROOT, script)))
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.strip() == str(tmp_path / "root")


def test_makefile_data_default_follows_quantlab_data(tmp_path):
    env = dict(os.environ, QUANTLAB_DATA=str(tmp_path / "root"))
    env.pop("DATA", None)
    out = subprocess.run(["make", "-s", "-f", os.path.join(REPO_ROOT, "Makefile"), "--eval", "show: ; @echo $(DATA)",
                          "show"], env=env, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.stdout.strip() == str(tmp_path / "root"), out.stderr
    env.pop("QUANTLAB_DATA")
    out = subprocess.run(["make", "-s", "--eval", "show: ; @echo $(DATA)", "show"], env=env, capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=60)
    assert out.stdout.strip() == os.path.join(REPO_ROOT, "data"), out.stderr
