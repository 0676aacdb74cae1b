"""AlignQ quantizer, ADMM correlation term and quantizer placement (alignq/quant.py, alignq/models.py)."""
import math

import pytest
import torch

from alignq.models import CDFScheme, MODELS, grl_alpha, GradReverse
from alignq.quant import ADMM, ActQuant, WeightQuant, act_cdf, corr, uniform_q, weight_cdf


def normal_quantiles(n, dtype=torch.float64):
    """x_i = Phi^-1((i + 0.5) / n): a tensor whose standard-normal CDF is a uniform grid."""
    u = (torch.arange(n, dtype=dtype) + 0.5) / n
    return math.sqrt(2.0) * torch.erfinv(2 * u - 1)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_weight_levels_are_the_2k1_minus_1_grid(k):
    n = 2 ** k - 1
    w = normal_quantiles(200_000) * 0.05 + 0.01          # any mean/scale: the CDF transform removes them
    q = WeightQuant(k)(w.float())
    levels = torch.unique(q.double())
    assert len(levels) == 2 ** (k + 1) - 1               # 8-bit: 511
    j = torch.arange(-n, n + 1, dtype=torch.float64) / n
    assert torch.allclose(levels, j, atol=1e-6)          # float32 j/n vs float64 j/n: 1 ulp at 1.0 is 6e-8


@pytest.mark.parametrize("k,R,count", [(8, 2.0, 1021), (4, 2.0, 61), (2, 1.0, 7), (8, 1.0, 511)])
def test_activation_levels(k, R, count):
    x = normal_quantiles(400_000).float()
    q = ActQuant(k, act_range=R)(x)
    levels = torch.unique(q.double())
    assert len(levels) == count                          # 2Rn + 1, e.g. 1,021 at 8 bits and R = 2
    n = 2 ** k - 1
    assert torch.allclose(levels * n, torch.round(levels * n), atol=1e-4)   # all on the j/n grid


def test_one_bit_is_sign_and_32_bit_is_identity():
    v = torch.tensor([-0.7, -1e-10, 1e-10, 0.3, 0.9])
    assert torch.equal(uniform_q(v, 1), torch.sign(v))        # exactly +-1 (no v + (1 - v) rounding)
    w = torch.randn(50)
    assert torch.equal(WeightQuant(32)(w), w)
    assert torch.equal(ActQuant(32, stage="second")(w), w)
    assert torch.allclose(ActQuant(32, stage="align", act_range=2.0)(w), act_cdf(w, 2.0))   # 'align': a_hat only


def test_rounding_is_half_to_even():
    # 3 bits: n = 7; v*n = 0.5, 1.5, 2.5, -0.5 -> 0, 2, 2, -0 (half to even), as torch.round in the original
    v = torch.tensor([0.5, 1.5, 2.5, -0.5], dtype=torch.float64) / 7
    assert torch.equal(uniform_q(v, 3) * 7, torch.tensor([0.0, 2.0, 2.0, -0.0], dtype=torch.float64))


def test_weight_gradient_matches_hand_derived_formula_through_mu_and_sigma():
    torch.manual_seed(0)
    w = (torch.randn(40, dtype=torch.float64) * 0.3 + 0.1).requires_grad_()
    c = torch.randn(40, dtype=torch.float64)
    (uniform_q(weight_cdf(w), 4) * c).sum().backward()   # STE: gradient of the unrounded transform
    x = w.detach()
    N, mu, sigma = len(x), x.mean(), x.std()
    z = (x - mu) / sigma
    phi2c = c * 2 * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)        # c_j 2 phi(z_j)
    # dz_j/dw_i = (delta_ij - 1/N) / sigma - z_j (w_i - mu) / ((N - 1) sigma^2)
    expect = phi2c / sigma - phi2c.sum() / (N * sigma) - (phi2c * z).sum() * (x - mu) / ((N - 1) * sigma ** 2)
    assert torch.allclose(w.grad, expect, rtol=1e-10, atol=1e-12)        # float64 formula vs float64 autograd
    # and against autograd of the original's torch.distributions form
    w2 = x.clone().requires_grad_()
    normal = torch.distributions.Normal(w2.mean(), w2.std(), validate_args=False)
    ((2 * normal.cdf(w2) - 1) * c).sum().backward()
    assert torch.allclose(w.grad, w2.grad, rtol=1e-10, atol=1e-12)


def test_activation_gradient_is_2R_phi():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64, requires_grad=True)
    ActQuant(8, act_range=2.0)(x).sum().backward()
    expect = 2 * 2.0 * torch.exp(-x.detach() ** 2 / 2) / math.sqrt(2 * math.pi)
    assert torch.allclose(x.grad, expect, rtol=1e-12, atol=1e-15)         # exact up to float64 rounding


def test_nan_input_does_not_raise():
    # torch.distributions.Normal validates its arguments on modern torch; the erf form just propagates NaN
    out = ActQuant(8)(torch.tensor([float("nan"), 0.0]))
    assert torch.isnan(out[0]) and out[1] == 0


def test_corr_hand_computed():
    X = torch.tensor([[0.0, 0.0], [2.0, 4.0]])   # mean (1, 2), unbiased std (sqrt2, 2 sqrt2) -> rows -+1/sqrt2
    assert torch.allclose(corr(X), torch.tensor([[0.5, -0.5], [-0.5, 0.5]]), atol=1e-6)


def _admm(dim, Z, G):
    m = ADMM(dim)
    with torch.no_grad():
        m.alterD.copy_(torch.tensor(Z, dtype=torch.float32))
        m.gamma.copy_(torch.tensor(G, dtype=torch.float32))
    return m


def test_admm_loss_and_update_hand_computed():
    m = _admm(2, [[0.5, 0.0], [0.0, 0.5]], [[0.1, 0.2], [0.3, 0.4]])
    D = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    # mu mean|Z| = 0.2 * 0.25; rho/2 sqrt(mean((D-Z)^2)) = 0.15 * 0.5; mean(G |D-Z|) = 0.5 * 1.0 / 4
    assert m(D).item() == pytest.approx(0.05 + 0.075 + 0.125, abs=1e-6)
    m.update()
    V = [[1 + 0.1 / 0.3, 0.5 + 0.2 / 0.3], [0.5 + 0.3 / 0.3, 1 + 0.4 / 0.3]]
    norm = math.sqrt(sum(v * v for row in V for v in row))            # sqrt(390) / 6
    scale = 1 - (0.2 / 0.3) / norm
    Z = [[scale * v for v in row] for row in V]
    G = [[g + 0.3 * (d - z) for g, d, z in zip(gr, dr, zr)]
         for gr, dr, zr in zip([[0.1, 0.2], [0.3, 0.4]], [[1.0, 0.5], [0.5, 1.0]], Z)]
    assert torch.allclose(m.alterD, torch.tensor(Z), atol=1e-6)         # float32 arithmetic on O(1) numbers
    assert torch.allclose(m.gamma, torch.tensor(G), atol=1e-6)


def test_admm_small_batch_is_padded_and_small_V_shrinks_to_zero():
    m = _admm(3, [[0.0] * 3] * 3, [[0.0] * 3] * 3)
    D = torch.full((2, 2), 0.1)                      # a last batch of 2 with dim 3: loss on the 2 x 2 slice
    loss = m(D)
    assert loss.item() == pytest.approx(0.15 * 0.1, abs=1e-7)
    m.update()                                        # ||V||_F = 0.2 <= mu/rho = 2/3 -> Z = 0
    assert torch.equal(m.alterD, torch.zeros(3, 3))
    expect = torch.zeros(3, 3)
    expect[:2, :2] = 0.3 * 0.1                        # Gamma += rho (D_pad - 0)
    assert torch.allclose(m.gamma, expect, atol=1e-7)
    big = torch.ones(5, 5)                            # a larger batch than dim uses its first dim rows: no crash
    assert torch.isfinite(m(big))


def test_admm_only_in_training_and_batches_of_two_or_more():
    q = ActQuant(8, admm_dim=4)
    q.train()
    q(torch.randn(4, 3, 2, 2))
    assert q.loss is not None and q.loss.requires_grad
    q(torch.randn(1, 3, 2, 2))                       # a batch of one has no sample correlation
    assert q.loss is None
    q.eval()
    q(torch.randn(10, 3, 2, 2))                      # eval batch larger than dim: no ADMM term, no crash
    assert q.loss is None


def test_grl_sign_and_schedule():
    x = torch.ones(3, requires_grad=True)
    GradReverse.apply(x, 0.25).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.25))
    assert grl_alpha(0.0) == pytest.approx(2 / (2 + 1e-6) - 1, abs=1e-12)
    assert grl_alpha(1.0) == pytest.approx(2 / (1 + math.exp(-10) + 1e-6) - 1, abs=1e-12)
    assert grl_alpha(0.3) < grl_alpha(0.6) < 1


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_resnet_placement():
    from alignq.quant import QConv2d
    m = MODELS["resnet20_quant"](CDFScheme(8, 8))
    # 1 stem + 9 blocks x 2 + 2 shortcut convs; activations: stem + 9 x 2 + 2 shortcut quantizers
    assert _count(m, QConv2d) == 21 and _count(m, ActQuant) == 21
    assert isinstance(m.logit, torch.nn.Linear) and not isinstance(m.logit, QConv2d)
    m56 = MODELS["resnet56_quant"](CDFScheme(8, 8, admm_dim=4))
    assert _count(m56, QConv2d) == 57 and _count(m56, ADMM) == 57
    # ResNet-50 DANN: ADMM only on act_q3 of the 16 bottlenecks
    r50 = MODELS["resnet50_dann"](CDFScheme(8, 8, admm_dim=4), num_classes=31)
    assert _count(r50, ADMM) == 16 and _count(r50, ActQuant) == 1 + 16 * 3
    assert _count(r50, QConv2d) == 53
    # MobileNetV2 (the original's mobilenetV2.py): stem + 17 blocks x 3 + a conv shortcut on each of the 14
    # stride-1 blocks + the 1x1 head conv; a quantizer after every BN of those convs
    mb = MODELS["mobile_v2"](CDFScheme(8, 8))
    assert _count(mb, QConv2d) == 67 and _count(mb, ActQuant) == 67
    # DenseNet-40 (densenet.py): stem + 36 dense layers + 2 transitions; quantizers before each of the 38
    # non-stem convs (BN -> act_q -> ReLU -> conv) and after the final BN
    dn = MODELS["densenet_40_quant"](CDFScheme(8, 8))
    assert _count(dn, QConv2d) == 39 and _count(dn, ActQuant) == 39
    assert dn.fc.in_features == 24 + 36 * 12                                    # compression rate 1


def test_block_order_matches_the_original():
    """out = ReLU(act_q1(bn1(conv1(ReLU(act_q0(bn0(conv0 x)))))) + x): checked against the formula by hand."""
    torch.manual_seed(0)
    m = MODELS["resnet20_quant"](CDFScheme(8, 8)).eval()
    blk = m.layers[0]
    x = torch.randn(2, 16, 8, 8)
    q = lambda t: uniform_q(act_cdf(t, 2.0), 8)  # noqa: E731
    conv = lambda c, t: torch.nn.functional.conv2d(t, uniform_q(weight_cdf(c.weight), 8), None, 1, 1)  # noqa: E731
    expect = torch.relu(q(blk.bn1(conv(blk.conv1, torch.relu(q(blk.bn0(conv(blk.conv0, x))))))) + x)
    assert torch.allclose(blk(x), expect, atol=1e-6)


def test_eval_weight_cache_equals_fresh_quantization_and_follows_updates():
    from alignq.quant import QConv2d
    torch.manual_seed(0)
    conv = QConv2d(3, 4, 3, w_bit=4, bias=False).eval()
    x = torch.randn(2, 3, 5, 5)
    fresh = lambda: torch.nn.functional.conv2d(x, uniform_q(weight_cdf(conv.weight), 4))  # noqa: E731
    with torch.no_grad():
        assert torch.equal(conv(x), fresh())
        first = conv._cache
        assert torch.equal(conv(x), fresh()) and conv._cache is first        # reused while the weight is unchanged
        conv.weight.mul_(1.5).add_(0.1)                                      # an in-place update (optimizer step)
        assert torch.equal(conv(x), fresh()) and conv._cache is not first
    conv.load_state_dict({"weight": torch.randn(4, 3, 3, 3)})
    with torch.no_grad():
        assert torch.equal(conv(x), fresh())
