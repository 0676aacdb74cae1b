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


def quantized_source(tmp_path):
    """An 8-bit ResNet-20 checkpoint (as an 8-bit run writes it) named as the FP32 source model."""
    from alignq import checkpoints, engine
    from alignq.options import parse_args
    from common.checkpoint import save_checkpoint
    args = parse_args(["--bitW", "8", "--abitW", "8"], "resnet-20-cifar-10")
    save_checkpoint(checkpoints.state_of(engine.build_model(args), args, 1, 10.0, None, None),
                    str(tmp_path / "q8" / "model_best.pt"))
    return ["--source_dir", str(tmp_path / "q8"), "--source_file", "model_best.pt", "--bitW", "8", "--abitW", "8"]


# (flags, or a function writing the files it needs and returning the flags; the stderr line must name `expect`)
SETUPS = [(quantized_source, "not an FP32 model")]


@pytest.mark.parametrize("flags,expect", [(c, None) for c in CASES] + SETUPS,
                         ids=[" ".join(c) for c in CASES] + [f.__name__ for f, _ in SETUPS])
def test_bad_flag_one_line_exit_2(flags, expect, tmp_path):
    if callable(flags):
        flags = flags(tmp_path)
    before = sorted(str(x.relative_to(tmp_path)) for x in tmp_path.rglob("*"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(MAIN), "--job_dir", str(tmp_path / "out"),
                        "--data_dir", str(tmp_path / "nodata")] + flags,
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert expect is None or expect in err[0], err
    after = sorted(str(x.relative_to(tmp_path)) for x in tmp_path.rglob("*"))
    assert after == before, "nothing may be written"
