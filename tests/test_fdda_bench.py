"""benchmarks/bench_fdda.py end to end in a tiny configuration (random mobilenetv2_w1 at 32 px, batch 2, one
repetition), in-process: the CSV row carries the environment tag and every timing / ratio column, and the
reference variant (the original's algorithm, out of place) gives bitwise the project student's loss, gradients
and activation ranges, so the fast / reference ratio compares equal work. Equality is checked within one
process on one network: both variants feed identical tensors to the same convolutions, so no summation order or
thread count enters. Mutating the reference (no clamp, a one-sided weight range, a different EMA) must be
detected by the same check."""
import csv
import os

import pytest
import torch

from conftest import REPO
from tests.originals import orig

TINY = ["--models", "mobilenetv2_w1", "--img_size", "32", "--batch", "2", "--repeats", "1"]
COLUMNS = ["timestamp", "torch", "device", "device_name", "threads", "load_avg_1min", "model", "batch", "img_size",
           "iteration_s", "student_q_fwd_bwd_s", "student_fp_fwd_bwd_s", "ratio_quantized_over_fp",
           "student_ref_fwd_bwd_s", "ratio_fast_over_reference", "reference_bitwise_equal",
           "student_orig_fwd_bwd_s", "ratio_project_over_original", "original_bitwise_equal", "repeats",
           "iteration_ratio_to_first"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import bench_fdda
    threads = torch.get_num_threads()
    yield bench_fdda
    torch.set_num_threads(threads)


def _run(bench, tmp_path, extra=()):
    out = tmp_path / "fdda.csv"
    bench.main(TINY + ["--out", str(out), *extra])
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    return rows[0]


def test_bench_tiny_end_to_end(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(orig.ENV, raising=False)
    row = _run(bench, tmp_path)
    assert list(row) == COLUMNS
    assert (row["model"], row["batch"], row["img_size"], row["repeats"]) == ("mobilenetv2_w1", "2", "32", "1")
    assert row["reference_bitwise_equal"] == "True"
    for k in ("iteration_s", "student_q_fwd_bwd_s", "student_fp_fwd_bwd_s", "student_ref_fwd_bwd_s",
              "ratio_quantized_over_fp", "ratio_fast_over_reference"):
        assert float(row[k]) > 0, k
    assert float(row["iteration_ratio_to_first"]) == 1.0
    # no original checkout: its columns stay empty and one line says why
    assert row["student_orig_fwd_bwd_s"] == row["ratio_project_over_original"] == row["original_bitwise_equal"] == ""
    text = capsys.readouterr().out
    assert text.count("original: skipped") == 1
    for label in ("q   (project, W4A4)", "ref (original algorithm)", "fp  (full precision)", "(q / ref)", "(q / fp)"):
        assert label in text


def test_bench_skips_iteration_timing(bench, tmp_path, monkeypatch):
    monkeypatch.delenv(orig.ENV, raising=False)
    row = _run(bench, tmp_path, ["--iter_repeats", "0"])
    assert row["iteration_s"] == row["iteration_ratio_to_first"] == ""
    assert row["reference_bitwise_equal"] == "True"


def _no_clamp(bench):
    class NoClamp(bench.RefQuantFunction):
        @staticmethod
        def forward(ctx, x, k, x_min, x_max, clip_ste=False):
            n = 2 ** k - 1
            scale = n / torch.clamp(x_max - x_min, min=1e-8)
            zero_point = torch.round(scale * x_min) + 2 ** (k - 1)
            shape = [-1] + [1] * (x.dim() - 1)
            scale, zero_point = scale.view(shape), zero_point.view(shape)
            return (torch.round(scale * x - zero_point) + zero_point) / scale
    return "RefQuantFunction", NoClamp


def _min_only_range(bench):
    def weight(self):
        w = self.weight.detach().contiguous().view(self.weight.shape[0], -1)
        return bench.RefQuantFunction.apply(self.weight, self.weight_bit, w.min(dim=1).values, w.abs().max(dim=1).values)
    return "_ref_weight", weight


def _ema_beta(bench):
    inner = bench._ref_act

    def act(self, x):
        self.beta.fill_(0.8)
        return inner(self, x)
    return "_ref_act", act


@pytest.mark.parametrize("mutation", [_no_clamp, _min_only_range, _ema_beta])
def test_reference_mutations_detected(bench, mutation, monkeypatch):
    """The equality check is not vacuous: each mutated reference differs from the project's student."""
    setup_args = bench.parser.parse_args(TINY)
    _, _, student = bench.setup("mobilenetv2_w1", setup_args, torch.device("cpu"))
    torch.manual_seed(1)
    x, y, t_out = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), torch.randn(4, 1000)
    variants = {"ref": (student, bench.reference_quantizer)}
    assert bench.check_equal_work(student, variants, x, y, t_out) == {"ref": True}
    monkeypatch.setattr(bench, *mutation(bench))
    assert bench.check_equal_work(student, variants, x, y, t_out) == {"ref": False}


def test_bench_original_variant_equal(bench, tmp_path, capsys):
    """With the authors' checkout ($QUANTLAB_ORIGINALS/FDDA) the original's quant modules run the same work."""
    orig.checkout("FDDA")
    row = _run(bench, tmp_path, ["--iter_repeats", "0"])
    assert row["original_bitwise_equal"] == row["reference_bitwise_equal"] == "True"
    assert float(row["student_orig_fwd_bwd_s"]) > 0 and float(row["ratio_project_over_original"]) > 0
    assert "(q / orig)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [(["--models", "resnet18,nope"], "unknown network 'nope'"),
                                       (["--repeats", "0"], "--repeats 0 must be at least 1"),
                                       (["--models", "resnet18", "--img_size", "32"], "does not fit resnet18")])
def test_bench_bad_input(bench, argv, msg, tmp_path):
    out = tmp_path / "fdda.csv"
    with pytest.raises(bench.UserError, match=msg):
        bench.main(argv + ["--out", str(out)])
    assert not out.exists()
