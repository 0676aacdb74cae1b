"""Bad AlignQ flags: one stderr line, exit 2, no traceback, nothing written (checked before any data is read)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "alignq" / "cdf_alignment" / "main.py"

CASES = [
    ["--lr_decay_steps", "[120,", "80]"],        # descending
    ["--lr_decay_steps", "[-5]"],
    ["--lr_decay_steps", "[80,"],                # unbalanced
    ["--lr_decay_steps", "[80,", "x]"],          # unparsable (already handled)
    ["--lr", "nan"], ["--lr", "inf"], ["--lr", "0"], ["--lr", "-0.1"],
    ["--max_iters", "0"],
    ["--num_epochs", "0"],                       # already handled
    ["--train_batch_size", "0"],                 # already handled
    ["--momentum", "1.5"],                       # already handled
    ["--experiment", "no-such-experiment"],      # already handled
]


@pytest.mark.parametrize("flags", CASES, ids=[" ".join(c) for c in CASES])
def test_bad_flag_one_line_exit_2(flags, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(MAIN), "--job_dir", str(tmp_path / "out"),
                        "--data_dir", str(tmp_path / "nodata")] + flags,
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == [], "nothing may be written"
