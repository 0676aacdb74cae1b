"""APoT level sets (exact values and original order) and the bucketize nearest-level search."""
from fractions import Fraction as F

import pytest
import torch

from apot.apot_levels import _nearest_level_neighbours, _table, build_power_value, nearest_level, nearest_level_argmin
from common.errors import UserError

# Normalised level sets Q^a(1, B) derived by hand from the additive bases (notes §3.3): sums / max.
HAND = {
    2: [F(0), F(1, 4), F(1, 2), F(1)],
    3: [F(k, 10) for k in (0, 1, 2, 3, 4, 6, 8, 10)],                     # max 5/8
    4: [F(0), F(1, 48), F(1, 24), F(1, 16), F(1, 12), F(1, 8), F(1, 6), F(3, 16), F(1, 4), F(1, 3),
        F(3, 8), F(1, 2), F(2, 3), F(11, 16), F(3, 4), F(1)],               # max 3/4
}


def _additive_sums(a, b=(0,), c=(0,)):
    s = sorted({F(x) + F(y) + F(z) for x in a for y in b for z in c})
    return [v / s[-1] for v in s]


HAND[5] = _additive_sums([0, F(1, 2), F(1, 8), F(1, 64)], [0, F(1, 4), F(1, 16), F(1, 128)], [0, F(1, 32)])
HAND[6] = _additive_sums([0, F(1, 2), F(1, 16), F(1, 128)], [0, F(1, 4), F(1, 32), F(1, 256)],
                         [0, F(1, 8), F(1, 64), F(1, 512)])

# Element order of the original (list(set(...)) of the sums), recorded by running the original
# yhhhli/APoT_Quantization ImageNet/models/quant_layer.py build_power_value on CPython 3 / torch 2.x.
ORIGINAL_ORDER_B3 = [0.0, 0.2, 0.4, 0.8, 1.0, 0.6, 0.1, 0.3]
ORIGINAL_ORDER_B4_X48 = [0, 16, 32, 4, 1, 48, 36, 33, 8, 24, 12, 9, 2, 18, 6, 3]


@pytest.mark.parametrize("B", [2, 3, 4, 5, 6])
def test_additive_level_values(B):
    got = sorted(build_power_value(B, additive=True).tolist())
    assert len(got) == 2 ** B
    want = HAND[B]
    assert len(want) == 2 ** B
    for g, w in zip(got, want):
        assert abs(g - float(w)) <= 2 ** -23, (B, g, w)     # float32 rounding of the 1/max multiply
    assert got[0] == 0.0 and got[-1] == 1.0


def test_b5_matches_the_notes_two_decimals():
    notes = [0, .01, .02, .03, .04, .05, .06, .07, .08, .10, .12, .14, .16, .17, .20, .21, .24, .28, .32, .34,
             .36, .38, .48, .52, .64, .65, .68, .69, .72, .76, .96, 1]
    got = sorted(build_power_value(5).tolist())
    assert [round(v, 2) for v in got] == notes


@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 6])
def test_pot_levels(B):
    got = sorted(build_power_value(B, additive=False).tolist())
    want = [0.0] + sorted(2.0 ** -k for k in range(2 ** B - 1))
    assert got == want                                           # powers of two are exact in float32


def test_original_order_and_exact_float32():
    assert build_power_value(3).tolist() == [float(torch.tensor(v, dtype=torch.float32)) for v in ORIGINAL_ORDER_B3]
    b4 = build_power_value(4)
    # un-normalised sums are k/64 with max 48/64; the original multiplies by fl32(1/0.75)
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(0.75, dtype=torch.float32)
    want = torch.tensor([k / 64 for k in ORIGINAL_ORDER_B4_X48], dtype=torch.float32) * inv
    assert torch.equal(b4.view(torch.int32), want.view(torch.int32))
    assert b4.dtype == torch.float32


@pytest.mark.parametrize("B,additive", [(1, True), (7, True), (0, True), (0, False), (7, False), (2.0, True)])
def test_unsupported_B_is_a_user_error(B, additive):
    with pytest.raises(UserError) as e:
        build_power_value(B, additive)
    assert "\n" not in str(e.value)


def _same_bits(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    ia = a.view(torch.int32) if a.dtype == torch.float32 else a.view(torch.int64)
    ib = b.view(torch.int32) if b.dtype == torch.float32 else b.view(torch.int64)
    bad = (ia != ib).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} mismatches, first at {bad[0].tolist()}"


def _adversarial(levels):
    """Exact levels, float32/float64 midpoints and their float32 neighbours, +-0, far outside, inf."""
    s = torch.sort(levels).values
    mids32 = (s[1:] + s[:-1]) / 2
    mids64 = ((s[1:].double() + s[:-1].double()) / 2).float()
    pts = torch.cat([s, -s, mids32, mids64, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 2.0, -2.0, 1e5, -1e5,
                                                          1e30, -1e30, float("inf"), -float("inf")])])
    up = torch.nextafter(pts, torch.full_like(pts, float("inf")))
    down = torch.nextafter(pts, torch.full_like(pts, -float("inf")))
    up2 = torch.nextafter(up, torch.full_like(pts, float("inf")))
    down2 = torch.nextafter(down, torch.full_like(pts, -float("inf")))
    return torch.cat([pts, up, down, up2, down2])


LEVEL_SETS = [(B, True) for B in range(2, 7)] + [(B, False) for B in range(1, 7)]


@pytest.mark.parametrize("B,additive", LEVEL_SETS)
def test_nearest_level_matches_argmin(B, additive):
    levels = build_power_value(B, additive)
    g = torch.Generator().manual_seed(B * 10 + additive)
    xs = [torch.rand(20000, generator=g), torch.randn(3, 50, 70, generator=g) * 0.6,
          torch.rand(5000, generator=g) * 2 - 1, torch.rand(4000, generator=g) * 3e-3, _adversarial(levels)]
    assert _table(levels).safe                      # the bucketize table covers every APoT/PoT set
    for x in xs:
        for xx in (x, x.abs(), x.double()):
            ref = nearest_level_argmin(xx, levels)
            _same_bits(nearest_level(xx, levels), ref)
            _same_bits(_nearest_level_neighbours(xx, levels), ref)     # general path (unsafe sets, fp16)


@pytest.mark.parametrize("seed", range(6))
def test_tie_break_follows_the_given_order(seed):
    """Levels permuted: an exact midpoint goes to whichever neighbour comes first in the given order."""
    g = torch.Generator().manual_seed(seed)
    base = build_power_value(4)
    levels = base[torch.randperm(base.numel(), generator=g)]
    x = _adversarial(levels)
    _same_bits(nearest_level(x, levels), nearest_level_argmin(x, levels))


def test_tie_break_small_hand_cases():
    x = torch.tensor([0.5, 0.25, 0.75, -0.0])
    assert nearest_level(x, torch.tensor([1.0, 0.0, 0.5])).tolist() == [0.5, 0.0, 1.0, 0.0]
    assert nearest_level(x, torch.tensor([0.0, 1.0])).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert nearest_level(x, torch.tensor([1.0, 0.0])).tolist() == [1.0, 0.0, 1.0, 0.0]
    # duplicate levels and far-out values where several rounded distances tie
    lv = torch.tensor([0.5, 2.0 ** -30, 0.0, 2.0 ** -30, 1.0])
    far = torch.tensor([-3.0, -1e8, 7.0, float("inf"), float("nan"), 2.0 ** -31])
    _same_bits(nearest_level(far, lv), nearest_level_argmin(far, lv))
    assert nearest_level(torch.tensor([-3.0]), lv).item() == 2.0 ** -30    # fl(3 + 2^-30) == 3: index 1 wins
    # inside the range too: |0.25 - 2^-30| rounds to 0.25 = |0.25 - 0| = |0.25 - 0.5|: a three-way tie,
    # won by 0, which is not a neighbour of 0.25
    assert not _table(lv).safe
    assert nearest_level(torch.tensor([0.25]), lv).item() == 0.5
    lv2 = torch.tensor([0.0, 0.5, 2.0 ** -30, 1.0])
    assert nearest_level(torch.tensor([0.25]), lv2).item() == 0.0
    inside = _adversarial(lv)
    _same_bits(nearest_level(inside, lv), nearest_level_argmin(inside, lv))


def test_nan_and_dtypes():
    levels = build_power_value(3)[torch.tensor([6, 0, 1, 2, 3, 4, 5, 7])]   # 0.1 first
    x = torch.tensor([float("nan"), 0.05, 0.5])
    _same_bits(nearest_level(x, levels), nearest_level_argmin(x, levels))
    x64 = torch.rand(1000, dtype=torch.float64)
    _same_bits(nearest_level(x64, levels), nearest_level_argmin(x64, levels))
    assert nearest_level(torch.empty(0, 3), levels).shape == (0, 3)
    xh = torch.rand(3000).half()
    assert torch.equal(nearest_level(xh, levels), nearest_level_argmin(xh, levels))


def test_no_grad_and_shape():
    x = torch.randn(4, 3, 5, requires_grad=True)
    q = nearest_level(x.clamp(-1, 1).abs(), build_power_value(4))
    assert q.shape == x.shape and not q.requires_grad
