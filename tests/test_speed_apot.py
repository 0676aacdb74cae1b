"""APoT fast quantizers: the fused autograd Functions equal the straightforward reference bit for bit
on every input and every incoming gradient, they trace without graph breaks, and the quantizer hot paths
contain no host-synchronising call (a lint: CUDA's sync debug mode cannot run on a CPU).

The references are the paths a module takes with `reference = True`: the original's Functions (`_pq`, `_uq`,
`_CalibratedTernary`) and `apot_quantization`'s autograd chain, with `nearest_level_argmin`. No tolerance
anywhere: the fast paths evaluate the same float32 operations (tests/test_fast_quant.py covers the level
sets and ordinary inputs; this file the corners: signed zeros, NaN, inf, non-finite and -0 gradients).
"""
import pytest
import torch
import torch._dynamo

from apot import apot_levels
from apot.apot_levels import LevelProjector, build_power_value, nearest_level_argmin
from apot.CIFAR10.models import quant_layer as cql
from apot.ImageNet.models import quant_layer as ql
from synclint import hot_functions, sync_calls
from test_fast_quant import _run, _same      # (module, t, alpha, g) -> (out, dt, dalpha); bitwise equality

INF, NAN = float("inf"), float("nan")


def _corner_inputs(levels, alpha, seed):
    """t with t/alpha on levels, midpoints, +-1, +-0, just outside, far out, +-inf, NaN, plus random values."""
    g = torch.Generator().manual_seed(seed)
    s = torch.sort(levels).values
    pts = torch.cat([s, (s[1:] + s[:-1]) / 2, torch.tensor([1.0, 1.0000001, 0.9999999, 1.5, 1e30, 1e-40])])
    pts = torch.cat([pts, -pts, torch.tensor([0.0, -0.0, INF, -INF, NAN, -NAN])]) * alpha
    return torch.cat([pts, torch.randn(3000, generator=g) * alpha, torch.rand(2000, generator=g) * alpha * 1.3])


def _corner_grads(n, seed):
    """Incoming gradients: random, with +-0, -0 where the mask keeps it, +-inf and NaN sprinkled in."""
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    special = torch.tensor([0.0, -0.0, INF, -INF, NAN, -0.0, 1e-40, -1e-40])
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:400]
    g[idx] = special.repeat(50)
    return g


def _check(fast, ref, t, alpha, g):
    for got, want in zip(_run(fast, t, alpha, g), _run(ref, t, alpha, g)):
        _same(got, want)


@pytest.mark.parametrize("bit", [2, 3, 5])
@pytest.mark.parametrize("grad_scale", [None, 0.25])
def test_new_generation_fused_equals_chain_on_corners(bit, grad_scale):
    """`_APoTSTE` (weights and activations) and `_CalibratedTernaryFast` (2-bit weights) against the chain."""
    for is_weight, alpha in ((True, 3.0), (False, 6.0)):
        if bit == 2 and is_weight:
            fast = ql.uq_with_calibrated_graditens(grad_scale)
            ref = ql.uq_with_calibrated_graditens(grad_scale, reference=True)
            levels = torch.tensor([0.0, 1.0])
        else:
            levels = build_power_value(bit - 1 if is_weight else bit)
            proj = LevelProjector(levels, signed=False)

            def fast(x, a, proj=proj, w=is_weight):
                return ql.apot_quantization(x, a, proj, w, grad_scale)

            def ref(x, a, levels=levels, w=is_weight):
                return ql.apot_quantization(x, a, lambda v: nearest_level_argmin(v, levels), w, grad_scale)
        t = _corner_inputs(levels, alpha, bit)
        _check(fast, ref, t, alpha, _corner_grads(t.numel(), bit))
        # finite incoming gradients: the alpha gradient is a number, not NaN, when t is finite
        t = t[torch.isfinite(t) & (t.abs() < 1e20)]
        g = torch.randn(t.shape, generator=torch.Generator().manual_seed(7))
        _check(fast, ref, t, alpha, g)
        assert torch.isfinite(_run(fast, t, alpha, g)[2])


@pytest.mark.parametrize("kind,bit", [("w", 2), ("w", 3), ("w", 5), ("a", 2), ("a", 4)])
def test_cifar_generation_fused_equals_original_functions_on_corners(kind, bit):
    """`_pq_fast` / `_uq_fast` against the original's `_pq` / `_uq` (weights at 2 bits: uniform rounding)."""
    if kind == "w":
        power = bit > 2
        make = lambda: cql.weight_quantization(bit - 1, build_power_value(bit - 1) if power else None,  # noqa: E731
                                               power)
        alpha, levels = 3.0, build_power_value(bit - 1) if power else torch.tensor([0.0, 1.0])
    else:
        make = lambda: cql.act_quantization(bit, build_power_value(bit))  # noqa: E731
        alpha, levels = 8.0, build_power_value(bit)
    fast, ref = make(), make()
    ref.reference = True
    t = _corner_inputs(levels, alpha, bit)
    _check(fast, ref, t, alpha, _corner_grads(t.numel(), bit))


def test_fast_paths_keep_channels_last_and_non_contiguous_inputs_exact():
    """Layouts other than contiguous NCHW, and an expanded incoming gradient: same values and gradients as the
    reference chain (the projector flattens in logical order; every other operation is elementwise)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 8, 5, 5, generator=g) * 4).to(memory_format=torch.channels_last)
    gy = torch.randn(4, 8, 5, 5, generator=g).to(memory_format=torch.channels_last)
    levels = build_power_value(4)
    proj = LevelProjector(levels, signed=False)
    ones = torch.ones(()).expand(4, 8, 5, 5)                  # what out.sum().backward() hands back: stride 0
    for t, grad in ((x, gy), (x.transpose(2, 3), gy.transpose(2, 3)), (x.contiguous(), ones)):
        runs = []
        for p in (proj, lambda v: nearest_level_argmin(v, levels)):
            tt = t.detach().clone().requires_grad_()
            a = torch.tensor(6.0, requires_grad=True)
            out = ql.apot_quantization(tt, a, p, False)
            out.backward(grad)
            runs.append((out.detach(), tt.grad, a.grad))
        for got, want in zip(*runs):
            torch.testing.assert_close(got.contiguous(), want.contiguous(), rtol=0, atol=0)


def test_two_bit_and_projector_trace_in_one_graph():
    """fullgraph=True fails on any graph break: the 2-bit ternary Function and a bare projector (the other
    quantizers: tests/test_fast_quant.py). aot_eager runs the traced ops one by one: the eager bits."""
    torch.manual_seed(0)
    conv = ql.QuantConv2d(4, 4, 3, padding=1, bit=2)
    proj = LevelProjector(build_power_value(5))
    x = torch.relu(torch.randn(2, 4, 5, 5))
    v = torch.cat([torch.randn(500), torch.tensor([NAN, -INF, -2.0 ** 30, -0.0])])
    torch._dynamo.reset()
    res = []
    for f, p in ((conv, proj), (torch.compile(conv, backend="aot_eager", fullgraph=True),
                                torch.compile(proj, backend="aot_eager", fullgraph=True))):
        conv.zero_grad()
        out = f(x)
        out.square().sum().backward()
        res.append([out.detach(), p(v)] + [q.grad.clone() for q in conv.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*res):
        _same(a, b)


# --------------------------------------------------------------------------------------------------------------
# lint: no host synchronisation in a quantizer's forward or backward

def _hot_functions():
    """(name, function) of every quantizer forward/backward and helper they call, in both generations."""
    return [("LevelProjector.forward", LevelProjector.forward)] + hot_functions(ql, cql, skip=("check_bit",))


_sync_calls = sync_calls


def test_quantizer_hot_paths_have_no_host_sync_calls():
    funcs = _hot_functions()
    names = {n for n, _ in funcs}
    # the list really covers the fast paths (a rename must not silently drop them from the lint)
    assert {"LevelProjector.forward", "_APoTSTE.forward", "_APoTSTE.backward", "_pq_fast.backward",
            "_uq_fast.forward", "_CalibratedTernaryFast.backward", "apot_quantization", "clamp_ste",
            "weight_quantize_fn.forward", "act_quantization.forward", "QuantConv2d.forward"} <= names
    found = {n: _sync_calls(f) for n, f in funcs}
    assert not {n: b for n, b in found.items() if b}, found


def test_lint_catches_what_it_looks_for():
    """The lint itself: each forbidden form in a sample function is reported (a lint that cannot fail is
    no test)."""
    def sample(x, levels):
        k = int(x.min())
        if bool((x > 1).any()):
            x = x[x > 0]
        return x.item() + k + torch.nonzero(x).numel() + levels.tolist()[0]
    bad = _sync_calls(sample)
    assert {"int()", "bool()", ".any()", "boolean-mask indexing", ".item()", ".nonzero()", ".tolist()"} <= set(bad)
    assert not _sync_calls(apot_levels.LevelProjector.forward)
