"""AlignQ's faithful-default pieces, hand-derived (any CPU; no BLAS or convolution sums involved):
the original's SGD with its aliased momentum buffer, the original's CDF expression, the 1-bit and 32-bit
quantizer paths, and the ADMM loss summed over a network in the original's order."""
import math

import pytest
import torch
import torch.nn as nn

from alignq.optim import OriginalSGD, quantized_indices
from alignq.quant import ADMM, ActQuant, WeightQuant, act_cdf, admm_loss, corr, normal_cdf2m1, weight_cdf

# binary fractions: every intermediate below is exact in float32, so the expected values are exact
P0, G, WD, LR, M = 1.0, 0.5, 0.25, 0.125, 0.75


def run_sgd(steps, standard_idx=(), standard=False, set_to_none=True):
    p = nn.Parameter(torch.tensor([P0]))
    opt = OriginalSGD([p], lr=LR, momentum=M, weight_decay=WD, standard_idx=standard_idx, standard=standard)
    values = [p.item()]
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        (G * p).sum().backward()                # gradient exactly G
        opt.step()
        values.append(p.item())
    return values


def expected(steps, aliased):
    p, buf, out = P0, None, [P0]
    for k in range(steps):
        d = G + WD * p
        if buf is None:
            buf = d
        elif aliased:
            buf = M * d + M * d                 # the buffer is the gradient: buf = m d; buf += buf
        else:
            buf = M * buf + d
        p = p - LR * buf
        out.append(p)
    return out


def test_original_sgd_aliased_buffer_drops_momentum():
    """A non-quantized parameter: from step 2 on the update is 2 m lr (g + wd p), no momentum (ratios 1, 2m, 2m)."""
    for set_to_none in (True, False):
        got = run_sgd(4, set_to_none=set_to_none)
        assert got == expected(4, aliased=True)
        ratios = [(got[k] - got[k + 1]) / (LR * (G + WD * got[k])) for k in range(4)]
        assert ratios == [1.0, 2 * M, 2 * M, 2 * M]


def test_original_sgd_ratio_with_m09():
    """m = 0.9 (the scripts' default): ratios 1.0, 1.8, 1.8 up to float32's 0.9 (1.8 = 2 fl(0.9), relative 4e-8)."""
    p = nn.Parameter(torch.tensor([0.0]))
    opt = OriginalSGD([p], lr=1.0, momentum=0.9)
    steps = []
    for _ in range(3):
        opt.zero_grad()
        p.sum().backward()                       # g = 1, wd = 0: the update is the buffer itself
        before = p.item()
        opt.step()
        steps.append(before - p.item())
    f09 = torch.tensor(0.9).item()
    assert steps == [1.0, 2 * f09, 2 * f09]


def test_original_sgd_quantized_and_standard_are_momentum_sgd():
    assert run_sgd(4, standard_idx=[0]) == expected(4, aliased=False)
    assert run_sgd(4, standard=True) == expected(4, aliased=False)
    p = nn.Parameter(torch.tensor([P0]))
    ref = torch.optim.SGD([p], lr=LR, momentum=M, weight_decay=WD)
    vals = [P0]
    for _ in range(4):
        ref.zero_grad()
        (G * p).sum().backward()
        ref.step()
        vals.append(p.item())
    assert vals == expected(4, aliased=False)


def test_quantized_indices_is_the_originals_idx():
    names = ["conv0.weight", "bn.weight", "layers.0.conv0.weight", "layers.0.bn0.bias", "layers.3.skip_conv.weight",
             "logit.weight"]
    assert quantized_indices(names) == [2, 4]


def test_cdf_is_the_originals_expression():
    """Same values and gradients as torch.distributions.Normal(m, s).cdf(x) * 2 - 1, bit for bit (elementwise)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4096, generator=g) * 0.05).requires_grad_()
    ref = torch.distributions.Normal(torch.mean(w), torch.std(w)).cdf(w) * 2 - 1
    mine = weight_cdf(w)
    assert torch.equal(ref, mine)
    gr, = torch.autograd.grad(ref.sum(), w)
    gm, = torch.autograd.grad(mine.sum(), w)
    assert torch.equal(gr, gm)
    x = torch.randn(4096, generator=g) * 3
    ref_a = (torch.distributions.Normal(torch.zeros(1), torch.ones(1)).cdf(x) * 2 - 1) * 2.0
    assert torch.equal(act_cdf(x, 2.0), ref_a)
    # erf(z / sqrt 2) is the same function but not the same bits somewhere in this sample
    assert not torch.equal(torch.erf(x / math.sqrt(2)) * 2.0, ref_a)


def original_act_cdf(x, act_range):
    """The original's activation expression written out: Normal(zeros(1), ones(1)).cdf(x) * 2 - 1, then * R."""
    m, s = x.new_zeros(1), x.new_ones(1)
    return (0.5 * (1 + torch.erf((x - m) * s.reciprocal() / math.sqrt(2))) * 2 - 1) * act_range


def special_values(dtype):
    info = torch.finfo(dtype)
    return torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, info.tiny, -info.tiny, info.tiny / 4,
                         -info.tiny / 4, info.max, -info.max, info.eps, 1.0, -1.0, 5.0, -5.0, 40.0, -40.0],
                        dtype=dtype)


def bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_act_cdf_without_zero_mean_and_unit_scale_is_the_same_bits(dtype):
    """act_cdf leaves out the original's `- zeros(1)` and `* ones(1).reciprocal()`: every value and every
    gradient has the original's bits (signed zeros, infinities, NaN, subnormals included; NaN compared by bits
    too), for special gradients as well as random ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100_000, generator=g, dtype=dtype) * 3, special_values(dtype)])
    gout = torch.cat([torch.randn(100_000, generator=g, dtype=dtype), special_values(dtype).flip(0)])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = act_cdf(xa, 2.0), original_act_cdf(xb, 2.0)
    assert torch.equal(bits(ya), bits(yb))
    ya.backward(gout)
    yb.backward(gout)
    assert torch.equal(bits(xa.grad), bits(xb.grad))
    assert bool(torch.isnan(xa.grad).any()) and bool((bits(xa.grad) == bits(torch.tensor(-0.0, dtype=dtype))).any())


def test_act_quant_with_admm_gradients_are_the_originals_bits(monkeypatch):
    """Through the whole activation quantizer with its ADMM term (the input's gradient is the sum of the CDF
    branch and the two correlation branches): the same loss and input gradient bits as with the original's
    expression."""
    from alignq import quant
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 4, 5, 5, generator=g) * 2
    c = torch.randn(8, 4, 5, 5, generator=g)

    def run():
        torch.manual_seed(2)
        q = ActQuant(4, admm_dim=8).train()
        x = x0.clone().requires_grad_()
        out = q(x)
        loss = (out * c).sum() + q.loss
        loss.backward()
        return loss.detach(), x.grad
    mine = run()
    monkeypatch.setattr(quant, "act_cdf", original_act_cdf)
    ref = run()
    assert torch.equal(bits(mine[0]), bits(ref[0])) and torch.equal(bits(mine[1]), bits(ref[1]))


def original_corr(x, y, eps=0.0):
    """The original's corr(x, y) (called as corr(x, x)), with the project's optional eps in the denominator."""
    x_std = (x - torch.mean(x, dim=0)) / (torch.std(x, dim=0) + eps if eps else torch.std(x, dim=0))
    y_std = (y - torch.mean(y, dim=0)) / (torch.std(y, dim=0) + eps if eps else torch.std(y, dim=0))
    return torch.matmul(x_std, torch.transpose(y_std, 0, 1)) / x_std.shape[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 300), (3, 50), (2, 40), (32, 2048)])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_corr_standardising_once_is_the_originals_bits(dtype, shape, eps):
    """corr standardises once and runs both of the original's backward branches itself: the same value and
    input-gradient bits as autograd through the original's corr(x, x) (a constant column included: std 0, NaN
    without eps, the std backward's zero mask). Both sides make the same matmul calls on the same shapes, so
    this holds for any BLAS; summing the six gradient terms in another order changes bits on these inputs."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(*shape, generator=g, dtype=dtype) * 2 + 0.3
    x0[:, 1] = 1.5
    gc = torch.randn(shape[0], shape[0], generator=g, dtype=dtype)
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    ca, cb = corr(xa, eps), original_corr(xb, xb, eps)
    assert torch.equal(bits(ca), bits(cb))
    (ca * gc).sum().backward()
    (cb * gc).sum().backward()
    assert torch.equal(bits(xa.grad), bits(xb.grad))
    assert bool(torch.isnan(xa.grad).any()) == (eps == 0.0)


def test_one_and_32_bit_paths():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(WeightQuant(1)(w), torch.tensor([-1.0, -1.0, 1.0, 1.0]))   # sign(w - mean)
    assert WeightQuant(32)(w) is w
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    assert torch.equal(ActQuant(1)(x), torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]))  # sign(R erf(x / sqrt 2))
    assert ActQuant(32)(x) is x
    a = ActQuant(32, stage="align")(x)               # unrounded R (2 Phi(x) - 1): 0 at 0, |a| < R
    assert a[2] == 0 and bool((a.abs() < 2).all())
    # odd up to the rounding of 1 + erf (<= 2^-24 relative of a value < 2, so <= 2^-23), times 2 R = 4, both sides
    assert (a + a.flip(0)).abs().max().item() <= 2.0 ** -21
    assert abs(a[4].item() - 2 * math.erf(3 / math.sqrt(2))) < 1e-6   # float32 rounding of a value near 2


def test_admm_loss_hand_value():
    m = ADMM(2)
    with torch.no_grad():
        m.alterD.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
        m.gamma.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    D = torch.tensor([[1.0, 0.25], [0.25, 1.0]])
    # mu mean|Z| = 0.2 * 0.25; (D - Z)^2 mean = (0.25 + 0.0625 * 2 + 0.25) / 4; relax = mean(G |D - Z|) = 0.5 / 4
    want = 0.2 * 0.25 + 0.3 / 2 * math.sqrt(0.625 / 4) + 0.125
    assert abs(m(D).item() - want) < 1e-7        # float32 rounding of three terms near 0.23
    with torch.no_grad():
        m.update()                               # V = D + Gamma / rho, ||V|| > mu / rho: shrink
    V = D + (1 / 0.3) * torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(m.alterD, (1 - (0.2 / 0.3) / V.norm()) * V, rtol=1e-6, atol=0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.act_q0, self.act_q1, self.act_skip_q = ActQuant(8), ActQuant(8), ActQuant(8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.act_q0 = ActQuant(8)
        self.layers = nn.ModuleList([Block()])


def test_admm_loss_sums_in_the_originals_order():
    """Each block sums its terms from 0 in forward order (skip first), the network adds the block's sum as one
    term: top + ((skip + q0) + q1). With 1, 2^-24, 2^-24, 0 that is 1 + 2^-23 in float32; one flat left-to-right
    sum in module order would round to 1 (or 1 + 2^-23 only by the grouping)."""
    net = Net()
    tiny = 2.0 ** -24
    vals = {net.act_q0: (1, 1.0), net.layers[0].act_skip_q: (2, tiny), net.layers[0].act_q0: (3, tiny),
            net.layers[0].act_q1: (4, 0.0)}
    for q, (order, v) in vals.items():
        q.loss, q._order = torch.tensor(v), order
    total = admm_loss(net)
    assert total.dtype == torch.float32 and total.item() == 1.0 + 2 * tiny
    flat = torch.tensor(0.0)
    for q in net.modules():
        if isinstance(q, ActQuant):
            flat = flat + q.loss
    assert flat.item() == 1.0                      # the grouping is what the test pins


# ---- the Office DANN/DSAN loops: the original's SGD over three parameter groups, its idx read per group

OFFICE_NAMES = {   # a miniature of the Office models' parameter names, in their registration order
    "dann_office": ["feature.conv1.weight", "feature.bn1.weight", "feature.layer1.0.conv1.weight",
                    "feature.layer1.0.downsample.0.weight", "feature.layer1.0.downsample.1.weight",
                    "feature.layer1.0.act_q3.admm.alterD", "class_classifier.c_fc3.weight",
                    "class_classifier.c_fc3.bias", "domain_classifier.d_fc2.weight", "domain_classifier.d_fc2.bias"],
    "dsan_office": ["feature.conv1.weight", "feature.bn1.weight", "feature.layer1.0.conv1.weight",
                    "feature.layer1.0.downsample.0.weight", "feature.layer1.0.downsample.1.weight",
                    "bottle.weight", "bottle.bias", "cls_fc.weight", "cls_fc.bias"],
}
OFFICE_MOMENTUM = {"feature.layer1.0.conv1.weight", "feature.layer1.0.downsample.0.weight"}   # the original's idx


def office_model(names):
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, nn.Parameter(torch.tensor([P0])))
    return root


def office_run(experiment, flags, steps=4, base_lr=1.25):
    """`steps` steps of the loop's optimizer (lr 1.25: heads 1.25, feature 1.25 / 10 = 0.125, both exact) on
    the loss G * sum(p), every parameter's values after each step."""
    from alignq import optim
    from alignq.options import parse_args
    args = parse_args(["--momentum", str(M), "--weight_decay", str(WD)] + flags, experiment)
    model = office_model(OFFICE_NAMES[experiment])
    opt = optim.make_optimizer(model, args, base_lr, set())
    values = {n: [p.item()] for n, p in model.named_parameters()}
    for _ in range(steps):
        opt.zero_grad()
        (G * sum(p.sum() for p in model.parameters())).backward()
        opt.step()
        for n, p in model.named_parameters():
            values[n].append(p.item())
    return opt, values


def expected_lr(steps, aliased, lr):
    p, buf, out = P0, None, [P0]
    for _ in range(steps):
        d = G + WD * p
        buf = d if buf is None else (M * d + M * d if aliased else M * buf + d)
        p = p - lr * buf
        out.append(p)
    return out


@pytest.mark.parametrize("experiment", ["dann_office", "dsan_office"])
def test_office_loops_use_the_originals_sgd(experiment):
    """W8 `--method ours`: every parameter outside the original's idx (the first conv, BN, Z/Gamma, the heads)
    moves from step 2 on by 2 m lr (g + wd p), no momentum; the quantized conv weights, the shortcut's
    (`downsample.0`) included, by momentum SGD. `--standard_sgd`: momentum SGD everywhere."""
    for flags, standard in (([], False), (["--standard_sgd"], True)):
        _, got = office_run(experiment, ["--bitW", "8", "--abitW", "8"] + flags)
        for name, vals in got.items():
            lr = 0.125 if name.startswith("feature.") else 1.25
            assert vals == expected_lr(4, not standard and name not in OFFICE_MOMENTUM, lr), (flags, name)


@pytest.mark.parametrize("experiment,flags", [
    ("dann_office", ["--bitW", "32", "--abitW", "32"]),       # FP32 pretraining (the original crashes there)
    ("dann_office", ["--method", "dorefa", "--bitW", "4"]),
    ("dsan_office", ["--bitW", "32", "--abitW", "32"]),
    ("dsan_office", ["--method", "lsq", "--bitW", "4"]),
])
def test_office_loops_keep_torch_sgd_where_the_original_does(experiment, flags):
    opt, got = office_run(experiment, flags)
    assert type(opt) is torch.optim.SGD
    assert got["feature.bn1.weight"] == expected_lr(4, False, 0.125)


def test_office_idx_on_resnet50():
    """On the real ResNet-50 DANN: idx = every convolution weight of the feature extractor (52 of ResNet-50's 53,
    the 4 shortcut convolutions included) but the first, and no head parameter."""
    from alignq import engine
    from alignq.options import parse_args
    model = engine.build_model(parse_args(["--bitW", "8", "--abitW", "8", "--no-pretrained"], "dann_office"))
    names = [n for n, _ in model.named_parameters()]
    idx = quantized_indices(names, downsample=True)
    convs = [n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and [names[i] for i in idx] == convs[1:]
    n_feature = len(list(model.feature.parameters()))
    assert names[:n_feature] == [n for n in names if n.startswith("feature.")]   # group 0 positions = global ones
    assert max(len(list(model.class_classifier.parameters())), len(list(model.domain_classifier.parameters()))) \
        <= min(idx)
