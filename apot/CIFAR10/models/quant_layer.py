"""APoT quantizers, old (CIFAR-10) generation: Li, Dong & Wang, "Additive Powers-of-Two Quantization", ICLR 2020.

Weights: ŵ = (w − mean)/std (statistics of `weight.data`, no gradient), then q = α·Π(clamp(ŵ/α, −1, 1)),
Π the nearest level of Q^a(1, b−1) on |x| times sign(x); b = 2 is uniform ternary. Backward is
the "calibrated" gradient: ∂ŵ = g unchanged (no clipping), ∂α = Σ g·(sign(x)·1[|x|>1] + (q−x)·1[|x|≤1]).
Activations: x = a/α, q = α·Π(min(x, 1)) on Q^a(1, b) (no lower clamp: inputs are post-ReLU);
∂a = g·1[x≤1], ∂α = Σ g·(1[x>1] + (q−x)·1[x≤1]).
First conv / last fc: 8-bit w_q = round(w/max(w)·127)/127·max(w) with STE (signed max, no clamp).

Π runs through each module's `LevelProjector` (sync-free, bit-identical to the original's argmin) inside
`_pq_fast` / `_uq_fast` (the same gradients in fewer passes); setting a module's `reference = True` makes it use
the original's `_pq` / `_uq` with `nearest_level_argmin` instead (tests compare the two bit for bit).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from apot.apot_levels import LevelProjector, build_power_value, nearest_level_argmin

BITS = (2, 3, 4, 5)  # bit-widths the level sets exist for (weights use B=b−1, activations B=b)


def uniform_quant(x, b):
    """round(x·(2^b − 1))/(2^b − 1) on the normalised magnitude x."""
    n = 2 ** b - 1
    return x.mul(n).round().div(n)


def project(x, proj, b):
    """Π: `proj(x)` (nearest level, the original's argmin with its ties), or b-bit uniform rounding if None."""
    return uniform_quant(x, b) if proj is None else proj(x)


def _projection(module):
    """The module's Π: its LevelProjector, the reference argmin (`reference = True`), or None (uniform)."""
    if module.proj is None:
        return None
    if module.reference:
        levels = module.proj.levels
        return lambda x: nearest_level_argmin(x, levels)
    return module.proj


class _pq(torch.autograd.Function):
    """Weight quantizer with calibrated gradients on magnitudes in [0, 1] (`b` magnitude bits)."""

    @staticmethod
    def forward(ctx, input, alpha, proj, b):
        x = input.div(alpha)                    # ŵ/α (the original did this in place)
        x_c = x.clamp(min=-1, max=1)
        q = project(x_c.abs(), proj, b).mul(x_c.sign())
        ctx.save_for_backward(x, q)
        return q.mul(alpha)

    @staticmethod
    def backward(ctx, grad_output):
        x, q = ctx.saved_tensors
        i = (x.abs() > 1.).float()
        grad_alpha = (grad_output * (x.sign() * i + (q - x) * (1 - i))).sum()
        return grad_output.clone(), grad_alpha, None, None      # ∂ŵ = g: weights are not clipped


class _uq(torch.autograd.Function):
    """Activation quantizer (upper clip only) with calibrated gradients."""

    @staticmethod
    def forward(ctx, input, alpha, proj, b):
        x = input.div(alpha)
        q = project(x.clamp(max=1), proj, b)
        ctx.save_for_backward(x, q)
        return q.mul(alpha)

    @staticmethod
    def backward(ctx, grad_output):
        x, q = ctx.saved_tensors
        i = (x > 1.).float()
        grad_alpha = (grad_output * (i + (q - x) * (1 - i))).sum()
        return grad_output * (1 - i), grad_alpha, None, None


class _pq_fast(torch.autograd.Function):
    """`_pq` in fewer passes, the same bits: the ∂α term sign(x)·1[|x|>1] + (q−x)·1[|x|≤1] equals
    q − x·1[|x|≤1] for every x (above the clip q = sign(x) and x·0 = ±0; x = ±inf gives NaN in both forms),
    so forward saves that one tensor and backward is one product and one sum."""

    @staticmethod
    def forward(ctx, input, alpha, proj, b):
        x = input.div(alpha)
        x_c = x.clamp(min=-1, max=1)
        q = project(x_c.abs(), proj, b).mul_(x_c.sign())
        inside = torch.eq(x_c, x, out=torch.empty_like(x))              # 1[|x| <= 1] as 0./1. (NaN: 0)
        ctx.save_for_backward(torch.addcmul(q, inside, x, value=-1))     # q − 1·x: the product is exact
        return q.mul(alpha)

    @staticmethod
    def backward(ctx, grad_output):
        term, = ctx.saved_tensors
        return grad_output, (grad_output * term).sum(), None, None


class _uq_fast(torch.autograd.Function):
    """`_uq` in fewer passes, the same bits: with n = 1 − 1[x>1], ∂a = g·n and the ∂α term
    1[x>1] + (q−x)·n equals q − x·n (above the clip q = 1; x = +inf gives NaN in both forms)."""

    @staticmethod
    def forward(ctx, input, alpha, proj, b):
        x = input.div(alpha)
        q = project(x.clamp(max=1), proj, b)
        n = torch.gt(x, 1., out=torch.empty_like(x)).neg_().add_(1.)       # 1 − 1[x > 1] (NaN: 1)
        ctx.save_for_backward(torch.addcmul(q, n, x, value=-1), n)          # q − n·x, one rounding
        return q.mul(alpha)

    @staticmethod
    def backward(ctx, grad_output):
        term, n = ctx.saved_tensors
        return grad_output * n, (grad_output * term).sum(), None, None


class weight_quantization(nn.Module):
    """q(input, alpha) for normalised weights: `b` magnitude bits, levels `grids` (power) or uniform rounding."""

    def __init__(self, b, grids=None, power=True):
        super().__init__()
        self.b, self.power = b, power
        self.register_buffer('grids', grids if power else None, persistent=False)   # moves with .to(device)
        self.proj = LevelProjector(grids, signed=False) if power else None     # sees |x| only
        self.reference = False

    def forward(self, input, alpha):
        if self.reference:
            return _pq.apply(input, alpha, _projection(self), self.b)
        return _pq_fast.apply(input, alpha, self.proj, self.b)


class act_quantization(nn.Module):
    """q(input, alpha) for activations at `b` bits on `grid` (uniform rounding when power=False)."""

    def __init__(self, b, grid=None, power=True):
        super().__init__()
        self.b, self.power = b, power
        self.register_buffer('grid', grid if power else None, persistent=False)
        self.proj = LevelProjector(grid) if power else None
        self.reference = False

    def forward(self, input, alpha):
        if self.reference:
            return _uq.apply(input, alpha, _projection(self), self.b)
        return _uq_fast.apply(input, alpha, self.proj, self.b)


class weight_quantize_fn(nn.Module):
    """Normalise the weight tensor and quantize it to `w_bit` bits (sign + (w_bit−1)-bit magnitude)."""

    def __init__(self, w_bit, power=True):
        super().__init__()
        if w_bit not in BITS:
            raise ValueError(f"weight bit-width must be one of {BITS}, got {w_bit}")
        self.w_bit = w_bit - 1
        self.power = power if w_bit > 2 else False    # 2 bits: ternary {−α, 0, α} by rounding
        grids = build_power_value(self.w_bit, additive=True) if self.power else None
        self.weight_q = weight_quantization(self.w_bit, grids, self.power)
        self.register_parameter("wgt_alpha", nn.Parameter(torch.tensor(3.0)))

    def forward(self, weight):
        mean = weight.data.mean()
        std = weight.data.std()
        weight = weight.add(-mean).div(std)           # weight normalisation, no grad through the statistics
        return self.weight_q(weight, self.wgt_alpha)


class QuantConv2d(nn.Conv2d):
    """Conv2d with APoT weights and inputs; `bit` sets both (the original hard-coded 4 and swapped later)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, bit=4, power=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if bit not in BITS:
            raise ValueError(f"bit-width must be one of {BITS}, got {bit}")
        self.layer_type = 'QuantConv2d'
        self.bit = bit
        self.weight_quant = weight_quantize_fn(w_bit=self.bit, power=power)
        self.act_grid = build_power_value(self.bit, additive=True)
        self.act_alq = act_quantization(self.bit, self.act_grid, power=power)
        self.act_alpha = torch.nn.Parameter(torch.tensor(8.0))

    def forward(self, x):
        weight_q = self.weight_quant(self.weight)
        x = self.act_alq(x, self.act_alpha)
        return F.conv2d(x, weight_q, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def show_params(self):
        wgt_alpha = round(self.weight_quant.wgt_alpha.data.item(), 3)
        act_alpha = round(self.act_alpha.data.item(), 3)
        print('clipping threshold weight alpha: {:2f}, activation alpha: {:2f}'.format(wgt_alpha, act_alpha))


def signed_max_8bit(weight):
    """8-bit first/last-layer weights: round(w/max(w)·127)/127·max(w), straight-through gradient."""
    max = weight.data.max()                           # signed max, not max|w|: codes may fall below −127
    weight_q = weight.div(max).mul(127).round().div(127).mul(max)
    return (weight_q - weight).detach() + weight


class first_conv(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.layer_type = 'FConv2d'

    def forward(self, x):
        return F.conv2d(x, signed_max_8bit(self.weight), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class last_fc(nn.Linear):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias)
        self.layer_type = 'LFC'

    def forward(self, x):
        return F.linear(x, signed_max_8bit(self.weight), self.bias)
