"""DAMBQ quantizers and LBA: level table, forward/backward against hand-derived values, the 8-bit first/last
layers, what resnet20 turns into, the authors' W2.0A2.0 log arithmetic, convergence, the few-lines API."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dambq.model import QUANT_BASES, FirstConv2d, LastLinear, QuantConv2d, QuantLinear, QuantTune
from dambq.model.cifar10.resnet import resnet20
from dambq.model.quant_layers import (ALPHA_W, CLIP_W, EPS, clamp_ste, lba_error_hook, nearest_level, quantize_act,
                                      quantize_wgt, round_pass)

F32 = np.float32


def f32(*terms):
    """A float64 sum in the given order, then float32: how the original's numpy table was built."""
    acc = 0.0
    for t in terms:
        acc = acc + t
    return float(F32(acc))


# ----------------------------------------------------------------------------- level table

def test_level_table_rows_and_order():
    assert QUANT_BASES.shape == (5, 16) and QUANT_BASES.dtype == torch.float32
    for row in ALPHA_W[1:]:
        assert sum(row) == pytest.approx(1.0, abs=1e-12)      # each basis row sums to 1 (max level 1)
    assert sum(ALPHA_W[0]) == 0
    a = ALPHA_W
    # index j: s_i = +1 iff bit (3 - i) of j is set, s_0 most significant (recursion order, -1 before +1)
    assert QUANT_BASES[4, 0].item() == f32(-a[4][0], -a[4][1], -a[4][2], -a[4][3]) == -1.0
    assert QUANT_BASES[4, 1].item() == f32(-a[4][0], -a[4][1], -a[4][2], a[4][3])          # -0.7042
    assert QUANT_BASES[4, 6].item() == f32(-a[4][0], a[4][1], a[4][2], -a[4][3])
    assert QUANT_BASES[4, 15].item() == 1.0
    # 2 bits: s_0 over blocks of 4, s_1 over blocks of 2 of... only a_0, a_1 non-zero -> 4 levels, each 4 times
    lv2 = [f32(-a[2][0], -a[2][1]), f32(-a[2][0], a[2][1]), f32(a[2][0], -a[2][1]), f32(a[2][0], a[2][1])]
    assert QUANT_BASES[2].tolist() == [v for v in lv2 for _ in range(4)]
    assert QUANT_BASES[0].tolist() == [0.0] * 16
    assert QUANT_BASES[1].tolist() == [-1.0] * 8 + [1.0] * 8


def test_level_table_unique_magnitudes_per_bit():
    expect = {
        0: [0.0],
        1: [1.0],
        2: [0.2246, 1.0],
        3: [0.0886, 0.3128, 0.5986, 1.0],
        4: [0.0408, 0.1326, 0.2350, 0.3366, 0.4284, 0.5308, 0.7042, 1.0],
    }
    for b, mags in expect.items():
        got = sorted(set(abs(v) for v in QUANT_BASES[b].tolist()))
        # float32 of 4-decimal sums: within 1e-6 of the decimal value (float32 spacing near 1 is 6e-8,
        # the float64 sums of the 4-decimal coefficients are exact to ~1e-16)
        assert got == pytest.approx(mags, abs=1e-6), b
        assert len(set(QUANT_BASES[b].tolist())) == (1 if b == 0 else 2 * len(mags))


def test_nearest_level_equals_argmin_reference():
    torch.manual_seed(0)
    bits = torch.tensor([4, 3, 2, 1, 0, 4])
    pts = QUANT_BASES.index_select(0, bits)
    c = torch.rand(6, 5000) * 2 - 1
    c[:, :16] = pts                      # exact levels (ties between duplicate slots)
    ref = torch.gather(pts, 1, (c.unsqueeze(1) - pts.unsqueeze(2)).abs().min(dim=1)[1])
    assert torch.equal(nearest_level(c, pts), ref)


# ----------------------------------------------------------------------------- weights

def test_quantize_wgt_forward_backward_mixed_bits():
    # channel 0: 4 bits, alpha 1; channel 1: 2 bits, alpha 2; channel 2: 0 bits, alpha 0.5
    alpha = torch.tensor([1.0, 2.0, 0.5])
    edge = (torch.tensor(1.0) + EPS).item()          # w = alpha + eps exactly: u = 1, inside (inclusive mask)
    w = torch.tensor([[-1.5, 0.5, 0.1, edge],
                      [-3.0, 1.0, 0.2, -0.5],
                      [0.5, -0.7, 0.2, 0.0]], requires_grad=True)
    pts = QUANT_BASES.index_select(0, torch.tensor([4, 2, 0]))
    err = torch.zeros(3)
    y = quantize_wgt(w, alpha.view(3, 1), pts, False)
    y.register_hook(lba_error_hook(err, w, y, (1,), 4.0))
    # nearest levels: 0.5 -> .5308 (not .4284), 0.1 -> .1326 (not .0408); 2 bits: 0.5 -> .2246, 0.1 -> .2246
    expect = torch.tensor([[-1.0, 0.5308, 0.1326, 1.0],
                           [-2.0, 2 * 0.2246, 2 * 0.2246, -2 * 0.2246],
                           [0.0, 0.0, 0.0, 0.0]])
    # the STE value ((P - c) + c)·alpha is within a few float32 ulps of P·alpha (|values| <= 2)
    assert torch.allclose(y.detach(), expect, atol=1e-6, rtol=0)
    g = torch.arange(1.0, 13.0).view(3, 4)
    y.backward(g)
    inside = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.float32)
    a = alpha.view(3, 1)
    # the original's autograd chain: (y·α)' -> clamp mask -> (w/(α+ε))', i.e. ((g·α)·mask)/(α+ε), elementwise
    # float32 operations in that order (IEEE, the same on every machine)
    assert torch.equal(w.grad, ((g * a) * inside) / (a + EPS))
    assert torch.allclose(w.grad, g * inside * (a / (a + EPS)), rtol=1e-7, atol=0)   # = g·α/(α+ε) inside
    # LBA error: |Σ_c (w - w_q)·g| / 4
    expect_err = ((w.detach() - y.detach()) * g).sum(1).abs() / 4
    assert torch.allclose(err, expect_err, rtol=1e-6, atol=0)


def test_quantize_wgt_layerwise_one_group():
    w = torch.tensor([[0.3, -0.9], [0.05, 1.7]], requires_grad=True)
    y = quantize_wgt(w, torch.tensor([1.0]), QUANT_BASES[3:4], True)
    # 3 bits: 0.3 -> .3128, -0.9 -> -1, 0.05 -> .0886, 1.7 clipped -> 1
    assert torch.allclose(y.detach(), torch.tensor([[0.3128, -1.0], [0.0886, 1.0]]), atol=1e-6, rtol=0)
    y.sum().backward()
    assert w.grad.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0], abs=1e-5)   # 1/(1+1e-6)


def test_quantize_wgt_clip_gradient_is_the_hand_derived_one():
    """A learnable clip gets autograd's gradient through w/(α+ε) and y·α (the original's expression):
    ∂L/∂α_c = Σ_i G_i·(w_q,i/α_c − ∂w_q,i/∂w_i · w_i/(α_c+ε)), ∂w_q/∂w = α/(α+ε)·1[|w/(α+ε)| ≤ 1]."""
    torch.manual_seed(0)
    bits = torch.tensor([4, 2, 1, 0])
    w = torch.randn(4, 3, 2, 2) * 0.6
    w[0, 0, 0, 0] = 5.0                                       # one clipped weight: only y/α contributes
    alpha = torch.tensor([1.1, 0.7, 0.9, 0.4]).view(4, 1, 1, 1).requires_grad_()
    G = torch.randn(4, 3, 2, 2)
    y = quantize_wgt(w, alpha, QUANT_BASES.index_select(0, bits), False)
    y.backward(G)
    wd, a, yd = w.double(), alpha.detach().double(), y.detach().double()
    dq_dw = ((wd / (a + EPS)).abs() <= 1).double() * a / (a + EPS)
    expect = (G.double() * (yd / a - dq_dw * wd / (a + EPS))).sum((1, 2, 3), keepdim=True)
    # float32 autograd against the float64 formula: 12 terms of size <= ~3 per channel, relative 1e-5
    assert torch.allclose(alpha.grad.double(), expect, rtol=1e-5, atol=1e-6)
    assert expect[3].item() != 0.0 and alpha.grad[3].item() != 0.0   # 0 bits: y = 0, the w/(α+ε) term remains

# ----------------------------------------------------------------------------- activations

def act_expected(x, alpha, bits):
    """Hand formulas in float64: y, dy/dx, dy/dalpha per element (x shape (N, C, K))."""
    x = x.double()
    q = (2.0 ** bits.double() - 1).view(1, -1, 1)
    s, qe = alpha + EPS, q + EPS
    u = x / s
    inside = ((u >= 0) & (u <= 1)).double()
    r = (u.clamp(0, 1) * q).round()
    return r * alpha / qe, inside * q * alpha / (s * qe), r / qe - inside * q * alpha * x / (qe * s * s)


def test_quantize_act_forward_backward_mixed_bits():
    bits = torch.tensor([4, 2, 0])
    x = torch.tensor([[[-1.0, 0.5], [0.2, 1.0], [0.7, -0.3]],
                      [[1.4, 3.5], [2.9, 6.0], [5.0, 0.0]]], requires_grad=True)     # (N=2, C=3, 2)
    alpha = torch.nn.Parameter(torch.tensor([3.0]))
    err = torch.zeros(3)
    y = quantize_act(x, alpha, bits.view(1, 3, 1))
    y.register_hook(lba_error_hook(err, x, y, (0, 2), 4.0))
    # 4 bits on [0, 3]: steps of 0.2 -> 0, 0.4, 1.4, 3; 2 bits: steps of 1 -> 0, 1, 3, 3; 0 bits -> 0
    assert torch.allclose(y.detach(), torch.tensor([[[0.0, 0.4], [0.0, 1.0], [0.0, 0.0]],
                                                    [[1.4, 3.0], [3.0, 3.0], [0.0, 0.0]]]), atol=1e-5, rtol=0)
    g = torch.arange(1.0, 13.0).view(2, 3, 2)
    y.backward(g)
    ey, ex, ea = act_expected(x.detach(), 3.0, bits)
    # float32 vs float64 evaluation of the same formulas: relative 1e-6 (a few ulps)
    assert torch.allclose(y.detach().double(), ey, rtol=1e-6, atol=1e-7)
    assert torch.allclose(x.grad.double(), g.double() * ex, rtol=1e-6, atol=1e-7)
    assert alpha.grad.item() == pytest.approx((g.double() * ea).sum().item(), rel=1e-5)
    # by hand, Σ g·(r/Q - x/alpha) inside, g above alpha: 4 bits 2·(2/15 - .5/3) + 7·(7/15 - 1.4/3) + 8·1;
    # 2 bits 3·(0 - .2/3) + 4·(1/3 - 1/3) + 9·(3/3 - 2.9/3) + 10·1 (float32: 1e-4 absolute)
    assert alpha.grad.item() == pytest.approx(2 * (2 / 15 - 0.5 / 3) + 8 - 3 * 0.2 / 3 + 9 * (1 - 2.9 / 3) + 10,
                                              abs=1e-4)
    assert x.grad[:, 2].abs().sum().item() == 0.0           # 0 bits: no gradient to x (Q = 0)
    assert x.grad[0, 0, 0].item() == 0.0 and x.grad[1, 0, 1].item() == 0.0     # below 0 and above alpha
    # LBA error per channel: |Σ_{n,k} (x - x_q)·g| / (N·K)
    expect_err = ((x.detach() - y.detach()) * g).sum((0, 2)).abs() / 4
    assert torch.allclose(err, expect_err, rtol=1e-6, atol=0)


def test_quantize_act_boundaries_are_inclusive():
    alpha = torch.nn.Parameter(torch.tensor([2.0]))
    s = (torch.tensor([2.0]) + EPS).item()
    x = torch.tensor([[[0.0, s]]], requires_grad=True)        # u = 0 and u = 1 exactly
    quantize_act(x, alpha, torch.tensor([3])).sum().backward()
    assert (x.grad > 0.99).all()


@pytest.mark.parametrize("lo,hi", [(0, 1), (-1, 1)])
def test_clamp_mask_from_the_output_is_the_closed_interval_for_every_float(lo, hi):
    # clamp_ste takes its straight-through mask from `clamp(x) == x`; it must be lo <= x <= hi on every float the
    # quantizers can see: both signs of zero, the ends and their neighbours, subnormals, ±inf, NaN, and
    # random values spanning the interval
    tiny = torch.finfo(torch.float32).tiny
    special = [0.0, -0.0, lo, hi, float("inf"), float("-inf"), float("nan"), tiny / 4, -tiny / 4, tiny, -tiny]
    ends = torch.tensor([float(lo), float(hi)])
    special += torch.nextafter(ends, ends + 1).tolist() + torch.nextafter(ends, ends - 1).tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(special), torch.rand(4096, generator=g) * 4 - 2]).requires_grad_()
    y = clamp_ste(x, lo, hi)
    upstream = torch.rand(x.shape, generator=g) + 1
    y.backward(upstream)
    inside = (x.detach() >= lo) & (x.detach() <= hi)
    assert torch.equal(torch.isnan(y.detach()), torch.isnan(x.detach()))
    finite = ~torch.isnan(x.detach())
    assert torch.equal(y.detach()[finite], x.detach().clamp(lo, hi)[finite])
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros(())))
    assert inside[:4].all() and not inside[4:7].any()          # ±0 and both ends pass; ±inf, NaN do not


def test_round_pass_value_and_gradient():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 3.3], requires_grad=True)
    y = round_pass(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, 3.0]           # half to even, exactly
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 5


def act_reference(x, alpha, bits):
    """The original's autograd formulation (clamp + round_pass), retained grad for the LBA error."""
    q = (2 ** bits - 1).view(1, -1, 1, 1)
    t = torch.clamp(x / (alpha + EPS), 0, 1) * q
    return round_pass(t) * alpha / (q + EPS)


def test_quantconv_matches_original_formulation_and_error():
    torch.manual_seed(0)
    conv = QuantConv2d(4, 3, 3, padding=1, bias=False)
    conv.bit_act.copy_(torch.tensor([4, 3, 2, 1]))
    conv.bit_wgt.copy_(torch.tensor([4, 2, 1]))
    conv.update_quant_points()
    conv.collect = True
    x = (torch.rand(2, 4, 5, 5) * 5 + 0.01).requires_grad_()      # both sides of alpha = 3, never 0
    out = conv(x)
    g = torch.randn_like(out)
    out.backward(g)
    # reference: same alpha_wgt (first train forward sets it), plain autograd with retained grads
    ref_conv = nn.Conv2d(4, 3, 3, padding=1, bias=False)
    ref_conv.weight = conv.weight
    x2 = x.detach().clone().requires_grad_()
    alpha = conv.alpha_act.detach().clone().requires_grad_()
    x_q = act_reference(x2, alpha, conv.bit_act)
    x_q.retain_grad()
    out2 = F.conv2d(x_q, quantize_wgt(conv.weight, conv.alpha_wgt.view(-1, 1, 1, 1), conv.points_wgt), None, 1, 1)
    out2.backward(g)
    # these inputs avoid the clamp boundaries, where torch releases disagree; float32 conv, same operands
    assert torch.allclose(out, out2, atol=1e-5, rtol=0)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    assert conv.alpha_act.grad.item() == pytest.approx(alpha.grad.item(), rel=1e-4)
    x_err = ((x2 - x_q) * x_q.grad).sum((0, 2, 3)).abs() / (2 * 25)
    assert torch.allclose(conv.x_err, x_err.detach(), rtol=1e-5, atol=1e-9)


def test_alpha_wgt_ema():
    torch.manual_seed(0)
    conv = QuantConv2d(2, 2, 1, bias=False)
    conv.bit_wgt.copy_(torch.tensor([4, 2]))
    scale = conv.weight.detach().abs().mean((1, 2, 3))
    clip = torch.tensor([5.66, 2.6])
    conv(torch.rand(1, 2, 2, 2))
    assert torch.allclose(conv.alpha_wgt, clip * scale)              # the first train forward sets it
    with torch.no_grad():
        conv.weight.mul_(2)
    conv(torch.rand(1, 2, 2, 2))
    assert torch.allclose(conv.alpha_wgt, clip * scale * 2 * 0.01 + 0.99 * clip * scale, rtol=1e-6)
    conv.eval()
    before = conv.alpha_wgt.clone()
    conv(torch.rand(1, 2, 2, 2))
    assert torch.equal(conv.alpha_wgt, before)                        # eval uses the stored buffer


# ----------------------------------------------------------------------------- 8-bit first / last layers

def test_first_conv_8bit_weights():
    conv = FirstConv2d(1, 1, (1, 4), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-1.0, 0.0, 0.3, 1.0]).view(1, 1, 1, 4))
    x = torch.ones(1, 1, 1, 4)
    # codes round(w/M·127.5 + 127.5) = 0, 128 (127.5 half-to-even), 166 (165.75), 255; (code - 127.5)/127.5·M
    wq = torch.tensor([-1.0, 0.5 / 127.5, 38.5 / 127.5, 1.0])
    out = conv(x)
    assert out.item() == pytest.approx(wq.sum().item(), abs=1e-6)
    out.backward()
    assert conv.weight.grad.flatten().tolist() == [1.0] * 4           # identity STE


def test_last_linear_8bit_acts_and_weights():
    fc = LastLinear(4, 1, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))         # max|w| = 1: codes 255 -> exactly 1
    x = torch.tensor([[0.0, 1.0, -2.0, 0.5]], requires_grad=True)
    # max|x| = 2: round(x/2·255) = 0, 128 (127.5 -> 128), -255, 64 (63.75); ×2/255
    out = fc(x)
    assert out.item() == pytest.approx((0 + 128 - 255 + 64) * 2 / 255, abs=1e-6)
    out.backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert fc.bias is None


# ----------------------------------------------------------------------------- resnet20 conversion and LBA

def quantized_resnet20(**kw):
    torch.manual_seed(0)
    model = resnet20()
    float_params = {n: p for n, p in model.named_parameters()}
    tuner = QuantTune(model, 2.0, 2.0, duration=(0, 150), **kw)
    return model, tuner, float_params


def test_resnet20_conversion():
    model, tuner, float_params = quantized_resnet20()
    assert type(model.conv1) is FirstConv2d and type(model.fc) is LastLinear and model.fc.bias is None
    quant = [n for n, m in model.named_modules() if isinstance(m, QuantConv2d)]
    assert len(quant) == 20 and sum('downsample' in n for n in quant) == 2
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    assert tuner.first_last_module_name == ['conv1', 'fc']
    assert (tuner.groups_wgt, tuner.groups_act) == (768, 672)
    wn, xn = tuner.group_numels()
    assert (int(wn.sum()), int(xn.sum())) == (269824, 208896)
    assert tuner.compute_avg_bit() == (4.0, 4.0)                      # countable before any forward
    for n, p in model.named_parameters():                            # weights shared, not copied
        if n in float_params:
            assert p is float_params[n]
    alphas = [n for n, _ in model.named_parameters() if n.endswith('alpha_act')]
    assert len(alphas) == 20
    keys = set(model.layer1[0].conv1.state_dict())
    assert keys == {'weight', 'alpha_act', 'alpha_wgt', 'clip_wgt', 'bit_wgt', 'bit_act', 'points_wgt'}


def set_errors(tuner, wgt_low, act_low):
    """Errors 1 everywhere except the listed (layer name, channel) groups, which rank lowest in list order."""
    mods = dict(tuner.layers)
    for _, m in tuner.layers:
        m.w_err.fill_(1.0)
        m.x_err.fill_(1.0)
    for rank, (name, c) in enumerate(wgt_low):
        mods[name].w_err[c] = rank * 1e-3
    for rank, (name, c) in enumerate(act_low):
        mods[name].x_err[c] = rank * 1e-3


def test_lba_arithmetic_of_the_authors_log():
    _, tuner, _ = quantized_resnet20()
    # epoch 0: int(0.01·768) = 7 weight groups = 5 of 64x9 (layer3 convs) + 32x9 + 16x9 = 3,312 elements;
    # int(0.01·672) = 6 activation channels = 5 of 32x32 (layer1 inputs) + 16x16 = 5,376 elements
    set_errors(tuner,
               [('layer3.1.conv1', c) for c in range(5)] + [('layer2.1.conv1', 0), ('layer1.0.conv1', 0)],
               [('layer1.0.conv1', c) for c in range(5)] + [('layer2.1.conv1', 0)])
    assert tuner.sort_and_tune(0) == {'act': (6, 5376), 'wgt': (7, 3312)}
    # the authors' train.log, epoch 0: w_avg_bit 3.9877253320683113, x_avg_bit 3.974264705882353
    assert tuner.compute_avg_bit() == (3.9877253320683113, 3.974264705882353)
    assert float(tuner.w_err_total.abs().sum()) == 0.0                # buffers reset
    # epoch 1: ratio 0.01 + 0.29/150 -> int(9.17) = 9 groups, 7x576 + 288 + 144 = 4,464 elements;
    # int(8.02) = 8 channels, 7x1024 + 256 = 7,424 elements
    set_errors(tuner,
               [('layer3.2.conv1', c) for c in range(7)] + [('layer2.2.conv1', 0), ('layer1.1.conv1', 0)],
               [('layer1.1.conv1', c) for c in range(7)] + [('layer2.2.conv1', 0)])
    assert tuner.sort_and_tune(1) == {'act': (8, 7424), 'wgt': (9, 4464)}
    # train.log epoch 1: w_avg_bit 3.9711812144212524, x_avg_bit 3.9387254901960786
    assert tuner.compute_avg_bit() == (3.9711812144212524, 3.9387254901960786)
    m = dict(tuner.layers)['layer3.2.conv1']
    assert m.bit_wgt[:8].tolist() == [3] * 7 + [4]
    assert torch.equal(m.points_wgt[0], QUANT_BASES[3]) and torch.equal(m.points_wgt[7], QUANT_BASES[4])


def test_lba_stops_at_target_plus_slack_and_converges():
    _, tuner, _ = quantized_resnet20()
    tuner.duration = (0, 30)
    g = torch.Generator().manual_seed(0)
    history, stopped = [], {}
    for epoch in range(0, 31):
        for _, m in tuner.layers:
            m.w_err.copy_(torch.rand(m.groups_wgt, generator=g))
            m.x_err.copy_(torch.rand(m.groups_act, generator=g))
        ratio = tuner.tune_ratio(epoch)
        before = tuner.compute_avg_bit()
        changed = tuner.sort_and_tune(epoch)
        after = tuner.compute_avg_bit()
        for i, kind in ((0, 'wgt'), (1, 'act')):
            n = (tuner.groups_wgt, tuner.groups_act)[i]
            if before[i] > 2.07:
                assert changed[kind][0] <= int(n * ratio)             # fewer only when groups sit at 0 bits
            else:
                assert kind not in changed and after[i] == before[i]
                stopped.setdefault(kind, epoch)
        history.append(after)
    assert tuner.tune_ratio(0) == 0.01 and tuner.tune_ratio(30) == pytest.approx(0.3)
    assert set(stopped) == {'wgt', 'act'}
    w, x = history[-1]
    assert 1.5 < w <= 2.07 and 1.5 < x <= 2.07


def boundary_tie(tuner):
    """Weight errors with a tie exactly at the selection boundary: int(0.01·768) = 7 groups are taken; 4 groups
    have the smallest errors (0, 1e-3, 2e-3, 3e-3), 10 groups spread over three layers share the next value 0.5,
    the rest are 1. So 3 of the 10 tied groups are taken, and which 3 is the ranking's tie order. Activations the
    same way: int(0.01·672) = 6 = 2 clear lowest + 4 of 9 tied. Returns the tied (weight, activation) indices."""
    g = torch.Generator().manual_seed(0)
    ties = []
    for total, err, low, tied in ((tuner.w_err_total, 'w_err', 4, 10), (tuner.x_err_total, 'x_err', 2, 9)):
        e = torch.ones(len(total))
        pick = torch.randperm(len(total), generator=g)[:low + tied]
        e[pick[:low]] = torch.arange(low) * 1e-3
        e[pick[low:]] = 0.5
        i = 0
        for _, m in tuner.layers:
            getattr(m, err).copy_(e[i:i + len(getattr(m, err))])
            i += len(getattr(m, err))
        ties.append(set(pick[low:].tolist()))
    return ties


def test_lba_ties_at_the_boundary_select_what_the_originals_topk_selects():
    """The original ranks with `torch.topk(self.w_err_total, w_k, largest=False)` on the 1-D error vector of all
    groups in layer order; the same call on the same tensor picks the same groups among equal errors (torch's
    tie order is its own implementation detail, so the test compares torch with torch, not with a rule)."""
    _, tuner, _ = quantized_resnet20()
    tied_w, tied_x = boundary_tie(tuner)
    w_err, x_err = tuner.w_err_total.clone(), tuner.x_err_total.clone()
    assert w_err.shape == (768,) and x_err.shape == (672,)
    # the original's expressions, on the tensors it ranks
    w_k, x_k = int(len(w_err) * 0.01), int(len(x_err) * 0.01)
    _, w_indices = torch.topk(w_err, w_k, largest=False)
    _, x_indices = torch.topk(x_err, x_k, largest=False)
    assert torch.equal(QuantTune.least_sensitive(w_err, w_k), w_indices)
    assert torch.equal(QuantTune.least_sensitive(x_err, x_k), x_indices)
    # the boundary really cuts through the tie: some tied groups are taken, some are not
    assert 0 < len(tied_w & set(w_indices.tolist())) < len(tied_w)
    assert 0 < len(tied_x & set(x_indices.tolist())) < len(tied_x)
    want_w, want_x = torch.full((768,), 4), torch.full((672,), 4)
    want_w[w_indices] -= 1
    want_x[x_indices] -= 1
    assert tuner.sort_and_tune(0) == {'act': (6, int(tuner.group_numels()[1][x_indices].sum())),
                                      'wgt': (7, int(tuner.group_numels()[0][w_indices].sum()))}
    assert torch.equal(tuner.bit_wgt.long(), want_w) and torch.equal(tuner.bit_act.long(), want_x)
    assert torch.equal(torch.cat([m.bit_wgt for _, m in tuner.layers]).long(), want_w)


def test_lba_ranks_with_topk_not_a_sort(monkeypatch):
    """sort_and_tune must take its groups from torch.topk(err, k, largest=False) itself: a stand-in topk that
    resolves ties towards the HIGHER group index (a rule no sort uses) decides which tied groups lose a bit."""
    _, tuner, _ = quantized_resnet20()
    tied_w, tied_x = boundary_tie(tuner)
    calls = []

    def topk_high_index_ties(t, k, largest=True, **kw):
        calls.append((t.shape, k, largest, kw))
        assert t.dim() == 1 and largest is False
        idx = torch.tensor(sorted(range(len(t)), key=lambda i: (float(t[i]), -i))[:k], dtype=torch.long)
        return t[idx], idx

    w_err, x_err = tuner.w_err_total.clone(), tuner.x_err_total.clone()
    monkeypatch.setattr(torch, 'topk', topk_high_index_ties)
    tuner.sort_and_tune(0)
    monkeypatch.undo()
    # activations first, as the original
    assert calls == [(torch.Size([672]), 6, False, {}), (torch.Size([768]), 7, False, {})]
    for bits, err, k, tied in ((tuner.bit_wgt, w_err, 7, tied_w), (tuner.bit_act, x_err, 6, tied_x)):
        lowered = set(torch.nonzero(bits == 3).flatten().tolist())
        clear = set(torch.nonzero(err < 0.5).flatten().tolist())
        assert clear <= lowered and len(lowered) == k
        assert lowered - clear == set(sorted(tied)[-(k - len(clear)):])


def test_zero_bit_groups_output_zero_keep_the_weight_gradient_and_stay_at_zero():
    """What the original does with a group at 0 bits (ALPHA_W[0] = 0, Q = 2^0 − 1 = 0): its weights quantize to
    exactly 0 but still get the straight-through gradient ((g·α)·mask)/(α+ε) with α = CLIP_W[0]·mean|w| = 0.5·mean|w|;
    its activations are exactly 0 with no gradient to x; LBA may pick it again, and it stays at 0 (clamp), using
    up one of the int(ratio·groups) slots."""
    conv = QuantConv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.2, -0.6, 0.5, 0.25]).view(2, 2, 1, 1))
    conv.bit_wgt.copy_(torch.tensor([0, 4]))
    conv.bit_act.copy_(torch.tensor([4, 0]))
    conv.update_quant_points()
    x = torch.tensor([[0.45, 1.2], [2.4, 0.9]]).view(2, 2, 1, 1).requires_grad_()   # (N=2, C=2, 1, 1)
    out = conv(x)
    a0, a1 = conv.alpha_wgt.tolist()
    assert a0 == pytest.approx(0.5 * (0.2 + 0.6) / 2) and a1 == pytest.approx(5.66 * (0.5 + 0.25) / 2)
    # output channel 0 (0-bit weights) is exactly 0; input channel 1 (0-bit activations) contributes nothing:
    # channel 1 = w_q[1, 0]·x_q[:, 0]; 4 bits on [0, 3] in steps of 0.2: 0.45 -> 0.4, 2.4 -> 2.4;
    # w[1, 0]/α = 0.5/2.1225 = 0.2356 -> level 0.2350
    assert out[:, 0].abs().sum().item() == 0.0
    # float32 levels and products: relative 1e-5
    assert torch.allclose(out[:, 1].flatten(), torch.tensor([0.4, 2.4]) * (0.2350 * a1), rtol=1e-5, atol=0)
    out.backward(torch.ones_like(out))
    # weight group 0, w[0, 0] = 0.2 (u = 0.2/(0.2+ε), inside): ((Σ_n x_q[n, 0])·α)/(α+ε); w[0, 1] = -0.6 clipped
    assert conv.weight.grad[0, 0].item() == pytest.approx((0.4 + 2.4) * a0 / (a0 + EPS), rel=1e-6)
    assert conv.weight.grad[0, 1].item() == 0.0
    assert x.grad[:, 1].abs().sum().item() == 0.0                # 0-bit activations pass no gradient
    assert x.grad[:, 0].abs().sum().item() > 0
    # LBA: 0-bit groups ranked lowest stay at 0 and use up slots: int(0.01·768) = 7 lowest, 3 of them at 0 bits
    _, tuner, _ = quantized_resnet20()
    m = dict(tuner.layers)['layer3.1.conv1']                      # 64 groups of 64·9 = 576 weights
    m.bit_wgt[:3] = 0
    m.update_quant_points()
    set_errors(tuner, [('layer3.1.conv1', c) for c in range(7)], [])
    assert tuner.sort_and_tune(0)['wgt'] == (4, 4 * 576)
    assert m.bit_wgt[:8].tolist() == [0, 0, 0, 3, 3, 3, 3, 4]
    assert tuner.compute_avg_bit()[0] == (4 * 269824 - 3 * 4 * 576 - 4 * 576) / 269824
    assert torch.equal(m.points_wgt[0], QUANT_BASES[0])


def test_lba_stop_rule_is_target_plus_0_07():
    """Bits drop while the average is above target + 0.07 (not the target): all groups at 2 bits plus n groups at
    3 bits. Weights: 33 of layer3.1.conv1's 576-weight groups -> 2 + 19008/269824 = 2.07045 > 2.07 (decrement);
    32 -> 2.06831 (stop). Activations: 15 of layer1's 1024-element channels -> 2 + 15360/208896 = 2.07353 >
    2.07; 14 -> 2.06863 (stop), although both are above the 2.0 target."""
    for n_w, n_x, w_moves, x_moves in ((33, 15, True, True), (32, 14, False, False), (33, 14, True, False)):
        _, tuner, _ = quantized_resnet20()
        mods = dict(tuner.layers)
        for _, m in tuner.layers:
            m.bit_wgt.fill_(2)
            m.bit_act.fill_(2)
        mods['layer3.1.conv1'].bit_wgt[:n_w] = 3
        mods['layer1.1.conv1'].bit_act[:n_x] = 3
        for _, m in tuner.layers:
            m.update_quant_points()
        before = tuner.compute_avg_bit()
        assert before == (2 + n_w * 576 / 269824, 2 + n_x * 1024 / 208896)
        assert (before[0] > 2.07, before[1] > 2.07) == (w_moves, x_moves)
        set_errors(tuner, [], [])
        changed = tuner.sort_and_tune(0)
        assert ('wgt' in changed, 'act' in changed) == (w_moves, x_moves)
        assert (tuner.compute_avg_bit()[0] < before[0]) == w_moves
        assert (tuner.compute_avg_bit()[1] < before[1]) == x_moves

def test_errors_accumulate_only_while_quantize_cur():
    model, tuner, _ = quantized_resnet20()
    x = torch.randn(4, 3, 32, 32)
    model(x).sum().backward()
    assert float(tuner.w_err_total.sum()) == 0.0
    tuner.quantize_cur = True
    model(x).sum().backward()
    one = tuner.x_err_total.clone()
    assert (one > 0).sum() > 600 and (tuner.w_err_total > 0).sum() > 700
    model(x).sum().backward()
    assert torch.allclose(tuner.x_err_total, 2 * one, rtol=1e-5)     # per-batch sums add up


def test_no_error_collection_once_targets_are_met():
    model, tuner, _ = quantized_resnet20()
    tuner.wgt_target = tuner.act_target = 4.07                       # W4A4: 4.0 <= 4.07, nothing can change
    tuner.quantize_cur = True
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert float(tuner.w_err_total.sum()) == 0.0 and float(tuner.x_err_total.sum()) == 0.0
    assert tuner.sort_and_tune(0) == {} and tuner.compute_avg_bit() == (4.0, 4.0)


def test_layerwise_mode_runs():
    torch.manual_seed(0)
    model = resnet20()
    tuner = QuantTune(model, 2.0, 2.0, layerwise=True, duration=(0, 5))
    assert (tuner.groups_wgt, tuner.groups_act) == (20, 20)
    tuner.quantize_cur = True
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    tuner.tune_ratio_range = 1.0
    tuner.sort_and_tune(5)                                           # ratio 1: every layer loses a bit
    assert tuner.compute_avg_bit() == (3.0, 3.0)


# ----------------------------------------------------------------------------- the few-lines API elsewhere

@pytest.mark.parametrize('arch,first,last,n_quant', [('resnet18', 'conv1', 'fc', 19),
                                                    ('mobilenet_v2', 'features.0.0', 'classifier.1', 51)])
def test_few_lines_api_on_torchvision(arch, first, last, n_quant):
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    w_total = sum(m.weight.numel() for m in convs[1:])
    # --- the lines from dambq/README.md
    tuner = QuantTune(model, wgt_target=2.0, act_target=2.0, duration=(0, 150), input_size=(3, 64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tuner.quantize_cur = True
    loss = F.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    tuner.sort_and_tune(0)
    # ---
    assert tuner.first_last_module_name == [first, last]
    assert sum(isinstance(m, QuantConv2d) for m in model.modules()) == n_quant
    wn, _ = tuner.group_numels()
    assert int(wn.sum()) == w_total                                  # grouped (depthwise) convs counted right
    w, x = tuner.compute_avg_bit()
    assert w < 4.0 and x < 4.0
    assert any(p is m.alpha_act for m in model.modules() if isinstance(m, QuantConv2d)
               for g in optimizer.param_groups for p in g['params'])


def test_conv_bias_is_kept_and_linear_middle_layers_quantize():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.ReLU(), nn.Conv2d(4, 6, 3, bias=True), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 5))
    biases = [model[0].bias, model[2].bias, model[5].bias]
    tuner = QuantTune(model, 2.0, 2.0, input_size=(3, 8, 8), keep_last_bias=True)
    assert type(model[0]) is FirstConv2d and type(model[2]) is QuantConv2d and type(model[5]) is QuantLinear
    assert type(model[7]) is LastLinear and model[7].bias is not None
    assert [model[0].bias, model[2].bias, model[5].bias] == biases
    assert (model[5].groups_wgt, model[5].groups_act) == (12, 96)
    tuner.quantize_cur = True
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model[2].bias.grad is not None and (model[5].x_err > 0).any()
    assert tuner.compute_avg_bit() == (4.0, 4.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (make test-gpu)')
def test_quantizers_on_cuda_match_cpu():
    torch.manual_seed(0)
    bits_a, bits_w = torch.tensor([4, 3, 2, 0]), torch.tensor([4, 2, 1])
    x = torch.rand(3, 4, 50) * 5 + 0.01
    w = torch.randn(3, 4, 3, 3)
    alpha_w = torch.tensor([1.5, 0.8, 0.3])
    pts = QUANT_BASES.index_select(0, bits_w)
    out = {}
    for dev in ('cpu', 'cuda'):
        xd = x.to(dev).requires_grad_()
        wd = w.to(dev).requires_grad_()
        a = torch.nn.Parameter(torch.tensor([3.0], device=dev))
        err = torch.zeros(4, device=dev)
        y = quantize_act(xd, a, bits_a.to(dev).view(1, 4, 1))
        y.register_hook(lba_error_hook(err, xd, y, (0, 2), 150.0))
        q = quantize_wgt(wd, alpha_w.to(dev).view(3, 1, 1, 1), pts.to(dev))
        ((y * torch.linspace(-1, 1, 50, device=dev)).sum() + (q ** 2).sum()).backward()
        out[dev] = [t.detach().cpu() for t in (y, q, xd.grad, wd.grad, a.grad, err)]
    for c, g in zip(out['cpu'], out['cuda']):
        # same float32 formulas on both devices; reductions may sum in another order (relative 1e-5)
        assert torch.allclose(c, g, rtol=1e-5, atol=1e-6)
    model = resnet20().cuda()
    tuner = QuantTune(model, 2.0, 2.0, duration=(0, 150))
    tuner.quantize_cur = True
    model(torch.randn(8, 3, 32, 32, device='cuda')).sum().backward()
    tuner.sort_and_tune(0)
    assert max(tuner.compute_avg_bit()) < 4.0 and tuner.w_err_total.device.type == 'cuda'


def test_first_last_layers_accept_other_widths_and_swap_starts_in_train_mode():
    # 2 bits on ±max|w| = ±1: Qp = 1.5, levels (k - 1.5)/1.5 for k = 0..3 -> -1, -1/3, 1/3, 1 (the original's)
    conv = FirstConv2d(1, 1, 2, bit_wgt=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, -0.5], [0.1, -1.0]]]]))
    from dambq.model.quant_layers import quantize_8bit
    q = quantize_8bit(conv.weight, 2).detach().flatten().tolist()
    assert q == pytest.approx([1.0, -1 / 3, 1 / 3, -1.0], abs=1e-7)      # float32 of thirds
    LastLinear(4, 2, bit_wgt=4, bit_act=4)(torch.rand(3, 4))             # the original accepts any widths
    model = resnet20().eval()
    QuantTune(model, 2.0, 2.0)
    assert all(m.training for m in model.modules() if isinstance(m, (QuantConv2d, FirstConv2d, LastLinear)))
