"""FDDA quantizer golden values, derived by hand (float32 arithmetic, no BLAS or convolution involved).

x_hat = (clamp(round(s x - zp), -2^(k-1), 2^(k-1)-1) + zp) / s,  s = (2^k - 1) / max(M - m, 1e-8),
zp = round(s m) + 2^(k-1). The original (ZeroQ's quant_utils) rounds with torch.round, which is documented as
round half to even; the project uses torch.round too, so ties go to the even integer on both sides.
"""
import torch

from fdda.quantization_utils import AsymmetricQuantFunction, asymmetric_linear_quantization_params


def q(x, k, m, M):
    t = lambda v: torch.tensor([v], dtype=torch.float32)   # noqa: E731
    return AsymmetricQuantFunction.apply(torch.tensor(x, dtype=torch.float32), k, t(m), t(M))


def test_rounding_ties_half_to_even():
    # k = 4, [0, 15]: s = 1, zp = 0 + 8. s x - zp for x = 0.5, 1.5, 2.5, 3.5 is -7.5, -6.5, -5.5, -4.5:
    # half to even gives -8, -6, -6, -4 -> x_hat 0, 2, 2, 4 (half up, floor(v + 0.5), would give 1, 2, 3, 4)
    assert q([0.5, 1.5, 2.5, 3.5], 4, 0.0, 15.0).tolist() == [0.0, 2.0, 2.0, 4.0]
    # zero point tie: [-0.5, 14.5]: s = 1, round(-0.5) = -0 (even) -> zp = 8; x = -0.5 -> round(-8.5) = -8 -> 0
    s, zp = asymmetric_linear_quantization_params(4, torch.tensor([-0.5]), torch.tensor([14.5]))
    assert s.tolist() == [1.0] and zp.tolist() == [8.0]
    assert q([-0.5], 4, -0.5, 14.5).tolist() == [0.0]


def test_w5a5_grid():
    # k = 5, [-1, 1]: s = 31 / 2 = 15.5, zp = round(-15.5) + 16 = -16 + 16 = 0 (tie to even -16);
    # 0.3 -> round(4.65) = 5; 2 -> 31 clamped to 15; -2 -> -31 clamped to -16; 0.5 -> round(7.75) = 8
    s, zp = asymmetric_linear_quantization_params(5, torch.tensor([-1.0]), torch.tensor([1.0]))
    assert s.tolist() == [15.5] and zp.tolist() == [0.0]
    want = (torch.tensor([5.0, 15.0, -16.0, 8.0]) / 15.5).tolist()
    assert q([0.3, 2.0, -2.0, 0.5], 5, -1.0, 1.0).tolist() == want


def test_degenerate_range_min_equals_max():
    # M - m = 0 -> clamped to 1e-8: s = 15 / 1e-8 = 1.5e9 (float32); m = M = 0.5: zp = 7.5e8 + 8 rounds to 7.5e8
    # in float32 (ulp 64 there), so every x maps to zp / s = 0.5 = m: finite, no NaN, the range's value
    out = q([0.5, 0.6, 0.4, -3.0, 100.0], 4, 0.5, 0.5)
    assert out.tolist() == [0.5] * 5
    # m = M = 0: zp = 8; x <= 0 -> q = -8 -> 0; x = 1 -> 1.5e9 - 8 clamped to 7 -> 15 / s (about 1e-8)
    s, _ = asymmetric_linear_quantization_params(4, torch.tensor([0.0]), torch.tensor([0.0]))
    assert q([0.0, -1.0, 1.0], 4, 0.0, 0.0).tolist() == [0.0, 0.0, (torch.tensor([15.0]) / s).item()]
