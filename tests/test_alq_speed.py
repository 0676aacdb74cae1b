"""ALQ fast step path (BinaryLayer.basis_step, the branch-free code search, reconstruction through codes) against
the straightforward reference path (optimize_bin_basis + speedup + slot-by-slot reconstruction, forced with
QUANTLAB_ALQ_REFERENCE=1): the same tensors bit for bit, for single searches, several optimizer steps of every
mode, and a seeded shortened LeNet5 pipeline.

Exact equality is legitimate here: both paths run in this process on this machine, perform the same float
operations in the same order (the reductions, matmuls and inverses are the very same calls) and differ only in
how they select codes and gather values, which is integer work with a single correct answer."""
import functools
import os
import random
import shutil
import subprocess
import tempfile

import pytest
import torch

import alq_import
from conftest import make_tiny_mnist

A = alq_import.load()
bn, opt_mod = A.binarynet, A.myoptimizer


def _bits(t):
    """Float tensors as their bit patterns, so -0.0 != +0.0 and NaN == NaN (bit-identical, not just equal)."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(_bits(a), _bits(b)), what


# --------------------------------------------------------------------------------------------- the search

def _targets_on_values(values, g, n):
    """Targets exactly on representable values and exactly half-way between two of them (ties)."""
    d0, d1, C = values.shape
    i = torch.randint(0, C, (d0, d1, n), generator=g)
    j = torch.randint(0, C, (d0, d1, n), generator=g)
    a, b = values.gather(-1, i), values.gather(-1, j)
    return torch.where(torch.rand(d0, d1, n, generator=g) < 0.5, a, (a + b) / 2)


def _search_cases(M):
    """(case, alpha (d0, d1, M, 1), target (d0, d1, n)) for the search tests: the shapes of trouble."""
    g = torch.Generator().manual_seed(M)
    table = bn.construct_bit_table(M)
    for case in range(8):
        d0, d1, n = 5, 3, 37
        alpha = torch.rand(d0, d1, M, 1, generator=g)
        if case == 1:  # few distinct coordinates: many equal values, exact ties
            alpha = torch.randint(0, 4, alpha.shape, generator=g).float() * 0.25
        if case == 2:  # pruned slots, a whole group without coordinates, negative ones (coordinate steps)
            alpha = (alpha - 0.3) * (torch.rand(alpha.shape, generator=g) > 0.4)
            alpha[0, 0] = 0
        if case == 3:  # a layer without any coordinate: a single value per group
            alpha.zero_()
        if case == 4 and M > 1:  # coordinates 1 ulp apart: float distances can tie (dense recomputation)
            alpha[..., 1, :] = torch.nextafter(alpha[..., 0, :], torch.tensor(2.0))
        if case == 6:  # non-finite coordinates in two groups
            alpha[0, 0, 0] = float("nan")
            alpha[1, 2, 0] = float("inf")
        if case == 7:  # subnormal values: the gap test's 2^-126 floor
            alpha = alpha * 1e-39
        values = A.search.representable_values(alpha, table).view(d0, d1, -1)
        target = torch.randn(d0, d1, n, generator=g) * (1e-39 if case == 7 else 2)
        if case in (1, 2, 4, 7):
            target = _targets_on_values(values, g, n)
        if case == 5:  # non-finite targets and targets beyond every value
            target[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
            target[1, 1, :2] = torch.tensor([1e30, -1e30])
        yield case, alpha, target


@pytest.mark.parametrize("M", [1, 2, 3, 6, 8, 9])
def test_fast_search_equals_dense_and_sorted(M):
    table = bn.construct_bit_table(M)
    for case, alpha, target in _search_cases(M):
        dense = A.search.nearest_code_dense(target, alpha, table)
        fast = A.fastpath.nearest_code_fast(target, alpha, table)
        assert fast.dtype == torch.int64
        assert torch.equal(fast, dense), (M, case)
        assert torch.equal(A.search.nearest_code(target, alpha, table), dense), (M, case)


@functools.lru_cache(maxsize=None)
def _have_cc():
    """Whether this machine can build a shared C library using math.h and stdint.h (a compiler with the C headers):
    then alq/basis_step.c must build too, and the compiled-path tests run; otherwise the eager path is all there is."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.c")
        with open(src, "w") as f:
            f.write("#include <math.h>\n#include <stdint.h>\nint64_t probe(float x) { return (int64_t)fabsf(x); }\n")
        r = subprocess.run([cc, "-O2", "-fPIC", "-shared", src, "-o", os.path.join(d, "probe.so"), "-lm"],
                           capture_output=True)
        return r.returncode == 0


@pytest.mark.skipif(not _have_cc(), reason="no C compiler: the eager search runs instead (tested above)")
@pytest.mark.parametrize("M", [1, 2, 3, 6, 8])
def test_native_search_equals_eager_and_dense(M):
    """alq/basis_step.c's search gives the eager search's codes (same dtype) and the dense argmin's, on every case."""
    table = bn.construct_bit_table(M)
    for case, alpha, target in _search_cases(M):
        d0, d1, n = target.shape
        values = A.search.representable_values(alpha, table).reshape(d0 * d1, -1)
        eager = A.fastpath._nearest_code_fast(target.reshape(-1, n), values)
        native = A.native.nearest_code_native(target.reshape(-1, n), values)
        assert native is not None and native.dtype == eager.dtype == torch.uint8
        assert torch.equal(native, eager), (M, case)
        assert torch.equal(native.long().view(d0, d1, n), A.search.nearest_code_dense(target, alpha, table)), (M, case)
    # a non-contiguous target (pixelwise groups are a transposed view) is read correctly
    t = torch.randn(37, 15).t()
    v = A.search.representable_values(torch.rand(15, M, 1), table).reshape(15, -1)
    assert torch.equal(A.native.nearest_code_native(t, v), A.fastpath._nearest_code_fast(t.contiguous(), v))


def test_native_search_applies_only_where_it_can(monkeypatch):
    """Codes wider than uint8 (M = 9), other dtypes and QUANTLAB_ALQ_NATIVE=0 leave the work to the eager search."""
    t = torch.randn(4, 10)
    assert A.native.nearest_code_native(t, torch.randn(4, 512)) is None
    assert A.native.nearest_code_native(t.double(), torch.randn(4, 64).double()) is None
    monkeypatch.setenv("QUANTLAB_ALQ_NATIVE", "0")
    assert A.native.nearest_code_native(t, torch.randn(4, 64)) is None


def test_native_build_is_cached_and_missing_compiler_falls_back(monkeypatch, tmp_path, capsys):
    """The library is built once into $QUANTLAB_CACHE (atomically, named by the source's hash) and reused; with no
    compiler there is no library and basis steps still give the reference's tensors."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    if _have_cc():
        monkeypatch.setattr(A.native, "_NATIVE", {})
        assert A.native.library() is not None
        built = list((tmp_path / "cache").iterdir())
        assert len(built) == 1 and built[0].name.startswith("alq_basis_step-") and built[0].suffix == ".so"
        mtime = built[0].stat().st_mtime_ns
        monkeypatch.setattr(A.native, "_NATIVE", {})
        assert A.native.library() is not None and built[0].stat().st_mtime_ns == mtime
    monkeypatch.setattr(A.native, "_NATIVE", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache2"))
    assert A.native.library() is None
    assert capsys.readouterr().err.count("note: ALQ's compiled basis step is not available (no C compiler") == 1
    assert A.native.nearest_code_native(torch.randn(4, 10), torch.randn(4, 64)) is None
    assert capsys.readouterr().err == ""  # said once per process
    assert not any(p.suffix == ".so" for p in (tmp_path / "cache2").iterdir())  # no half-built file left
    torch.manual_seed(0)
    w, pg, ph = torch.randn(8, 64), torch.randn(8, 64) * 1e-3, torch.rand(8, 64) + 0.1
    fast, ref = (bn.FCLayer_bin(w, 0, "subchannelwise", 1, 6) for _ in range(2))
    fast.basis_step(pg, ph)
    ref.optimize_bin_basis(pg, ph)
    ref.speedup(pg, ph)
    ref.update_w_FP()
    for k in ("B", "alpha", "w_FP"):
        assert_same(getattr(fast, k), getattr(ref, k), k)


def test_a_layer_keeps_the_path_it_was_built_with(monkeypatch):
    """QUANTLAB_ALQ_REFERENCE and QUANTLAB_ALQ_NATIVE are read when a layer is built, not at every step: a layer
    built under them keeps the reference path (no code table read) and the eager code after they change."""
    monkeypatch.setenv("QUANTLAB_ALQ_REFERENCE", "1")
    monkeypatch.setenv("QUANTLAB_ALQ_NATIVE", "0")
    torch.manual_seed(0)
    w = torch.randn(6, 128)
    ref = bn.FCLayer_bin(w, 0, "subchannelwise", 2, 6)            # n = 64 = 2^M: the fast path reads codes
    monkeypatch.setenv("QUANTLAB_ALQ_REFERENCE", "")
    monkeypatch.setenv("QUANTLAB_ALQ_NATIVE", "1")
    fast = bn.FCLayer_bin(w, 0, "subchannelwise", 2, 6)
    assert (ref.reference, ref.compiled, fast.reference, fast.compiled) == (True, False, False, True)
    assert ref._lib() is None
    read = []
    codes = bn.BinaryLayer._codes
    monkeypatch.setattr(bn.BinaryLayer, "_codes", lambda self: read.append(self) or codes(self))
    assert_same(ref.reconstruct_w(), fast.reconstruct_w())
    assert read == [fast]


# --------------------------------------------------------------------------------------------- reconstruction

def test_reconstruction_through_codes_equals_slot_by_slot():
    torch.manual_seed(0)
    layer = bn.FCLayer_bin(torch.randn(6, 128), 0, "subchannelwise", 2, 6)  # n = 64 = 2^M: codes are read
    assert layer._table_form()
    g = torch.Generator().manual_seed(1)
    layer.mask &= torch.rand(layer.mask.shape, generator=g) > 0.3
    layer.B = layer.B * layer.mask.to(torch.int8)
    layer.alpha = (torch.randn(layer.alpha.shape, generator=g) * layer.mask).contiguous()  # negative too
    layer.alpha[0, 0, 0] = -0.0
    assert_same(layer.reconstruct_w(), layer.reconstruct_w(reference=True))
    # a mask changed in place without touching B: valid slots whose B is 0 cannot be read through codes; the
    # check notices (mask version) and the fast path gives the reference's answer
    layer.mask[:, :, :] = True
    assert_same(layer.reconstruct_w(), layer.reconstruct_w(reference=True))
    assert layer._codes() is None
    # masked slots holding +-1 do not matter (their coefficient is 0)
    layer.B = torch.where(torch.rand(layer.B.shape, generator=g) < 0.5, 1, -1).to(torch.int8)
    layer.mask &= torch.rand(layer.mask.shape, generator=g) > 0.5
    assert layer._codes() is not None
    assert_same(layer.reconstruct_w(), layer.reconstruct_w(reference=True))
    # B modified in place: the cached codes are dropped
    layer.B[0, 0, :, :5] = 1
    assert_same(layer.reconstruct_w(), layer.reconstruct_w(reference=True))


# --------------------------------------------------------------------------------------------- optimizer steps

class _Net(torch.nn.Module):
    """Every structure and both reconstruction forms: pixelwise (n = 4), kernelwise (n = 9 < 2^4),
    channelwise (n = 36 >= 2^4, codes read), subchannelwise with M = 6 (n = 64, codes read) and with M = 9
    (int16 codes)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.c2 = torch.nn.Conv2d(6, 4, 3, padding=1)
        self.c3 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.f1 = torch.nn.Linear(4 * 16, 160)
        self.f2 = torch.nn.Linear(160, 10)

    def forward(self, x):
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.f2(torch.relu(self.f1(x.flatten(1))))


STRUCTURE = ["pixelwise", "kernelwise", "channelwise", "subchannelwise", "subchannelwise"]
SUBC, MAX_BIT = [0, 0, 0, 1, 1], [4, 4, 4, 6, 9]
MODES = ["basis", "basis", "coordinate", "prune", "basis", "ste", "coordinate", "ste", "prune", "basis"]


def _run_steps(monkeypatch, reference, fix_sign_flip, native=True):
    monkeypatch.setenv("QUANTLAB_ALQ_REFERENCE", "1" if reference else "")
    monkeypatch.setenv("QUANTLAB_ALQ_NATIVE", "1" if native else "0")
    torch.manual_seed(0)
    random.seed(0)  # the pruning's per-layer candidate counts
    net = _Net()
    params_w, params_b, layers = A.train.initialize(net, STRUCTURE, SUBC, MAX_BIT,
                                                    legacy_sign_flip=not fix_sign_flip)
    g = torch.Generator().manual_seed(1)
    for layer in layers:  # pruned slots and a group without coordinates
        layer.mask &= torch.rand(layer.mask.shape, generator=g) > 0.3
        layer.mask[0, 0] = False
        layer.B = layer.B * layer.mask.to(torch.int8)
        layer.alpha = layer.alpha * layer.mask
    opt_w = opt_mod.ALQ_optimizer(params_w, lr=1e-2)
    opt_b = torch.optim.Adam(params_b)
    loss_func = torch.nn.CrossEntropyLoss()
    for mode in MODES:
        x, y = torch.randn(16, 4, 4, 4, generator=g), torch.randint(0, 10, (16,), generator=g)
        net.zero_grad()
        loss_func(net(x), y).backward()
        opt_b.step()
        if mode == "prune":
            opt_w.step(layers, "coordinate", [0.2, 0.5])
        else:
            opt_w.step(layers, mode)
    out = dict(net.state_dict())
    opt_w.state_dict()  # the alpha-domain statistics of the last basis step, re-projected when first read
    for i, layer in enumerate(layers):
        out.update({f"{layer.name}.{k}": v for k, v in layer.state_dict().items() if torch.is_tensor(v)})
        out.update({f"state{i}.{k}": v for k, v in opt_w.state[params_w[i]].items() if torch.is_tensor(v)})
    return out


@pytest.mark.parametrize("native", [True, False], ids=["native-search", "eager-search"])
@pytest.mark.parametrize("fix_sign_flip", [False, True])
def test_steps_fast_equal_reference(monkeypatch, fix_sign_flip, native):
    ref = _run_steps(monkeypatch, True, fix_sign_flip)
    flipped = []  # (layer read through codes, number of bases flipped) per least-squares fit of the fast run
    least_squares = bn.BinaryLayer._least_squares

    def recording(self, *args, **kw):
        neg, flip = least_squares(self, *args, **kw)
        flipped.append((self._table_form(), int(neg.sum()) if flip else 0))
        return neg, flip
    monkeypatch.setattr(bn.BinaryLayer, "_least_squares", recording)
    compiled = []  # structure of every layer whose bases the compiled pass wrote
    fill_native = bn.BinaryLayer._fill_native

    def counting(self, *args):
        out = fill_native(self, *args)
        if out is not None:
            compiled.append(self.structure)
        return out
    monkeypatch.setattr(bn.BinaryLayer, "_fill_native", counting)
    fast = _run_steps(monkeypatch, False, fix_sign_flip, native)
    # the compiled pass ran for every structure with codes up to 8 bits (not for M = 9), or not at all
    assert set(compiled) == (set(STRUCTURE) if native and _have_cc() else set())
    assert ref.keys() == fast.keys()
    for k in ref:
        assert_same(ref[k], fast[k], k)
    # the case that needs care: a flipped basis flips a bit of the cached codes of a layer read through codes
    assert any(table and n for table, n in flipped) == fix_sign_flip


# --------------------------------------------------------------------------------------------- pipeline

def test_shortened_lenet5_pipeline_fast_equals_reference(tmp_path, monkeypatch):
    """PRETRAIN once, then ALQ + POSTTRAIN with the fast path and with the reference path (seeded, shortened):
    the final checkpoints hold the same tensors bit for bit."""
    data = make_tiny_mnist(tmp_path / "mnist", 400, 64, 4, (4, 24))
    common = ["--data", data, "--val_size", "100", "--batch_size", "64", "--R", "1", "--epoch_basis", "1",
              "--epoch_coord", "1", "--post_epochs", "1", "1", "--top_k", "0.05", "--train_limit", "192"]
    ori = str(tmp_path / "ori.pth")
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    A.lenet5.main(["--PRETRAIN", "--pretrain_epochs", "1", "--model_ori", ori, "--log_dir", str(tmp_path / "l0")]
                  + common)
    outs = {}
    for name, ref in (("fast", ""), ("reference", "1")):
        monkeypatch.setenv("QUANTLAB_ALQ_REFERENCE", ref)
        model = str(tmp_path / f"{name}.pth")
        A.lenet5.main(["--ALQ", "--POSTTRAIN", "--model_ori", ori, "--model", model, "--log_dir",
                       str(tmp_path / name)] + common)
        outs[name] = [torch.load(p, weights_only=True) for p in (model, model.replace(".pth", "_post.pth"))]
    for a, b in zip(outs["fast"], outs["reference"]):
        assert a["stage"] == b["stage"] and a["avg_bit"] == b["avg_bit"]
        for k in a["net_state_dict"]:
            assert_same(a["net_state_dict"][k], b["net_state_dict"][k], k)
        for layer, sd in a["parameters_w_bin"].items():
            for k in ("B", "alpha", "mask", "w_FP"):
                assert_same(sd[k], b["parameters_w_bin"][layer][k], f"{layer}.{k}")
        sa, sb = a["optimizer_w_state_dict"]["state"], b["optimizer_w_state_dict"]["state"]
        for i in sa:
            for k, v in sa[i].items():
                if torch.is_tensor(v):
                    assert_same(v, sb[i][k], f"state {i} {k}")
