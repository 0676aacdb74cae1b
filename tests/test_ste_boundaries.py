"""Straight-through masks at the clipping boundaries, independent of the torch release.

torch 2.14 changed the gradient of a two-sided `clamp` at its boundaries (0 there; 1 on the releases the
originals ran on). Every quantizer writes its mask explicitly, inclusive at both ends: these tests put inputs
exactly at -alpha, 0 and +alpha and check the hand-derived gradients. All values are exact binary fractions,
so the comparisons are exact.
"""
import pytest
import torch

from apot.CIFAR10.models import act_quantization as cifar_act, weight_quantization as cifar_wgt
from apot.apot_levels import build_power_value
from apot.ImageNet.models import quant_layer as ql

ALPHA = 2.0


def _grads(fn, t):
    t = torch.tensor(t, requires_grad=True)
    alpha = torch.tensor(ALPHA, requires_grad=True)
    out = fn(t, alpha)
    out.sum().backward()
    return out.detach(), t.grad, alpha.grad


def test_clamp_ste_value_and_closed_interval_mask():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], requires_grad=True)
    y = ql.clamp_ste(x, -1, 1)
    y.backward(torch.arange(1.0, 8.0))
    assert torch.equal(y.detach(), torch.tensor([-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0]))
    assert torch.equal(x.grad, torch.tensor([0.0, 2, 3, 4, 5, 6, 0]))       # 1 at both ends, 0 outside


@pytest.mark.parametrize("power", [True, False])
def test_new_generation_weight_boundaries(power):
    # t/alpha = [-1.5, -1, 0, 1, 1.5]: at |x| = 1 the weight passes its gradient and d/dalpha = q - x = 0
    t = [-3.0, -ALPHA, 0.0, ALPHA, 3.0]
    if power:
        fn = lambda t, a: ql.apot_quantization(t, a, build_power_value(3), is_weight=True)  # noqa: E731
    else:
        fn = lambda t, a: ql.uniform_quantization(t, a, 4, is_weight=True)  # noqa: E731
    out, g_t, g_a = _grads(fn, t)
    assert torch.equal(out, torch.tensor([-2.0, -2.0, 0.0, 2.0, 2.0]))
    assert torch.equal(g_t, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    # d/dalpha = sign(x) outside (-1 and +1), q - x = 0 at the boundaries and at 0
    assert g_a.item() == 0.0


@pytest.mark.parametrize("power", [True, False])
def test_new_generation_activation_boundaries(power):
    # a/alpha = [-0.5, 0, 1, 1.5]: x = 0 and x = 1 pass the gradient (post-ReLU zeros must, as on torch < 2.14)
    t = [-1.0, 0.0, ALPHA, 3.0]
    if power:
        fn = lambda t, a: ql.apot_quantization(t, a, build_power_value(4), is_weight=False)  # noqa: E731
    else:
        fn = lambda t, a: ql.uniform_quantization(t, a, 4, is_weight=False)  # noqa: E731
    out, g_t, g_a = _grads(fn, t)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 2.0, 2.0]))
    assert torch.equal(g_t, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert g_a.item() == 1.0                                  # only x = 1.5 (above): 1; q - x = 0 elsewhere


def test_post_relu_zeros_pass_gradient_through_quantconv():
    # The measured case of the issue: half of a post-ReLU 8x32x16x16 input is exactly 0.
    torch.manual_seed(0)
    conv = ql.QuantConv2d(32, 8, 3, padding=1, bit=4)
    x = torch.relu(torch.randn(8, 32, 16, 16)).requires_grad_()
    conv(x).sum().backward()
    zeros = x.detach() == 0
    assert zeros.float().mean() > 0.4
    # With the inclusive mask the input gradient at 0 is the conv's input gradient, which is non-zero
    # almost everywhere; with an exclusive mask it would be exactly 0 at every zero input.
    assert (x.grad[zeros] != 0).float().mean() > 0.9


def test_ternary_and_old_generation_boundaries():
    # 2-bit calibrated ternary: weight gradient never clipped; at |x| = 1 d/dalpha = q - x = 0
    out, g_t, g_a = _grads(lambda t, a: ql.uq_with_calibrated_graditens()(t, a), [-3.0, -ALPHA, 0.0, ALPHA, 3.0])
    assert torch.equal(out, torch.tensor([-2.0, -2.0, 0.0, 2.0, 2.0]))
    assert torch.equal(g_t, torch.ones(5)) and g_a.item() == 0.0
    # CIFAR-10 generation (custom autograd functions with written-out masks)
    out, g_t, g_a = _grads(cifar_wgt(2, build_power_value(2)), [-3.0, -ALPHA, 0.0, ALPHA, 3.0])
    assert torch.equal(g_t, torch.ones(5)) and g_a.item() == 0.0
    out, g_t, g_a = _grads(cifar_act(2, build_power_value(2)), [-1.0, 0.0, ALPHA, 3.0])
    assert torch.equal(g_t, torch.tensor([1.0, 1.0, 1.0, 0.0]))  # no lower clip; x = 1 is inside
    assert g_a.item() == 1.5                    # q - x: 0.5 at x = -0.5 (q = 0), 0 at 0 and at 1; 1 above
