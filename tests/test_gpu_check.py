"""benchmarks/gpu_check.py (make bench-gpu) runs end to end on the CPU: every paper's benchmark at its smallest,
the short real APoT MNIST run, and a summary table with one line per benchmark row."""
import os
import subprocess
import sys

from conftest import REPO
from test_runs_apot import tiny_mnist


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    data = tiny_mnist(tmp_path / "data", n_train=40, n_test=20)
    out = tmp_path / "check"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--device", "cpu",
                          "--quick", "--out", str(out), "--data", data], capture_output=True, text=True, env=env,
                         timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for paper in ("apot", "alq", "dambq", "alignq", "fdda"):
        assert f"| {paper} |" in summary, summary
    for name in ("apot_fast", "apot_levels", "alq_steps", "dambq", "alignq", "fdda"):
        assert (out / f"{name}.csv").stat().st_size > 0, name
    # the ratio columns reached the table, and every row says it ran on the CPU
    assert "ratio_to_fp32" in summary and "ratio_w8a8_over_fp32" in summary and "ratio_quantized_over_fp" in summary
    assert "MNIST ResNet-10 W4A4 real run" in summary and "not run" not in summary
    assert "cuda" not in (out / "dambq.csv").read_text()
    assert not list((out / "results").glob("*.jsonl")) or all(
        "max_iters 20" in p.read_text() for p in (out / "results").glob("apot.jsonl"))


def test_gpu_check_refuses_an_unknown_paper(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--papers", "apot,xyz",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 2 and res.stderr.strip() == "gpu_check: unknown paper(s) xyz"
