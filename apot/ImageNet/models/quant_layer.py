"""APoT quantized layers, new generation (ImageNet/MNIST, since May 2020; notes §3.3).

QuantConv2d(bit, power, additive, grad_scale) owns two scalar parameters, `act_alpha` (6.0) and
`weight_alpha` (3.0); its state_dict keys are exactly `weight`, (`bias`,) `act_alpha`, `weight_alpha`.
The helper modules `weight_quant` and `act_alq` hold only non-persistent level buffers (no keys).

Weights (bit b): normalise w^ = (w - mean)/std over the whole tensor (unbiased std, gradient flows
through the statistics), then
  power, b > 2 : alpha * Pi_{+-Q^a(1, b-1)}(clamp(w^/alpha, -1, 1))          (apot_quantization, STE)
  b == 2       : alpha * round(clamp(w^/alpha, -1, 1)), calibrated gradient (uq_with_calibrated_graditens)
  uniform, b>2 : alpha * round(clamp(w^/alpha, -1, 1) * (2^(b-1)-1)) / (2^(b-1)-1)  (STE)
Activations (bit b, post-ReLU): alpha * Pi_{Q^a(1, b)}(clamp(a/alpha, 0, 1)), or uniform with 2^b-1 steps.
Pi runs through each module's `LevelProjector` (sync-free, bit-identical to the original's argmin) inside the
fused `_APoTSTE` / `_CalibratedTernaryFast` Functions (the chain's exact float32 operations in fewer passes); a
module's `reference = True` switches it to the autograd chain with `nearest_level_argmin` (tests compare the two
bit for bit).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from apot.apot_levels import LevelProjector, build_power_value, nearest_level, nearest_level_argmin
from common.errors import UserError

__all__ = ["build_power_value", "clamp_ste", "gradient_scale", "apot_quantization", "uq_with_calibrated_graditens",
           "uq_with_calibrated_gradients", "uniform_quantization", "weight_quantize_fn", "act_quantization",
           "QuantConv2d", "first_conv", "last_fc", "check_bit"]


def check_bit(bit, power=True):
    """Bit-widths the quantizers support; anything else is a UserError."""
    ok = (2 <= bit <= 6) if power else (2 <= bit <= 16)
    if isinstance(bit, bool) or not isinstance(bit, int) or not (ok or bit == 32):
        kind = "APoT (power)" if power else "uniform"
        raise UserError(f"--bit {bit} is not supported for {kind} quantization; use "
                        f"{'2..6' if power else '2..16'} or 32 (full precision)")


def clamp_ste(x, lo, hi):
    """clamp(x, lo, hi) whose gradient is 1 on the closed interval [lo, hi] and 0 outside.

    This is clamp's gradient on the torch releases the original ran on (inclusive at both ends); torch 2.14
    gives 0 at the boundaries of a two-sided clamp, so the mask is written out to keep the quantizer's
    gradient independent of the torch release. Value: exactly clamp(x) (inside, x + 0; outside, 0 + clamp).
    """
    inside = (x >= lo) & (x <= hi)
    passed = torch.where(inside, x, torch.zeros_like(x))
    return passed + (x.clamp(lo, hi) - passed).detach()


def gradient_scale(x, scale):
    """Value x, gradient scaled by `scale`."""
    y_grad = x * scale
    return (x - y_grad).detach() + y_grad


def _projection(proj_set):
    """Pi as a function: a level tensor goes through `nearest_level`; a LevelProjector (any callable) as is."""
    if isinstance(proj_set, torch.Tensor):
        return lambda x: nearest_level(x, proj_set)
    return proj_set


def _module_projection(module):
    if module.reference:
        return lambda x: nearest_level_argmin(x, module.grid)
    return module.proj


def apot_quantization(tensor, alpha, proj_set, is_weight=True, grad_scale=None):
    """alpha * nearest level of clamp(tensor/alpha) in proj_set (signed for weights), with the STE.

    proj_set: the level tensor, or a projection x -> nearest level (a module's LevelProjector: no host sync).

    Gradients by autograd: d/dtensor = 1 inside the closed clamp range, 0 outside (`clamp_ste`);
    d/dalpha = q - x inside, sign(x) above the range (weights) or 1 above / 0 below (activations).
    With a LevelProjector on float32 and a scalar alpha this runs as `_APoTSTE` (the same bits, fewer passes).
    """
    if grad_scale:
        alpha = gradient_scale(alpha, grad_scale)
    if (isinstance(proj_set, LevelProjector) and tensor.dtype == torch.float32 and alpha.dtype == torch.float32
            and alpha.dim() == 0):
        return _APoTSTE.apply(tensor, alpha, proj_set, is_weight)
    project = _projection(proj_set)
    data = tensor / alpha
    if is_weight:
        data = clamp_ste(data, -1, 1)
        hard = project(data.abs()).mul(data.sign())
    else:
        data = clamp_ste(data, 0, 1)
        hard = project(data)
    data_q = (hard - data).detach() + data
    return data_q * alpha


def _sum_to_scalar(t):
    """What autograd does with the gradient of a 0-dim operand broadcast over t (`at::sum_to`)."""
    return t.sum(dim=tuple(range(t.dim())), keepdim=True).view(())


class _APoTSTE(torch.autograd.Function):
    """`apot_quantization`'s chain (divide, `clamp_ste`, project, STE, scale) as one Function: the float32
    operations autograd runs on that chain, minus the identities, with no `torch.where` (which costs as much
    as ten elementwise passes on a CPU). Bit for bit the chain's values and gradients (tests/test_fast_quant.py):
      d  = clamp(x, lo, 1), x = tensor/alpha   clamp_ste's value (its -0 -> +0 never reaches dq or a gradient)
      dq = (Pi(d) - d) + d                       the STE value, rounded as the chain rounds it
      dtensor = where(lo <= x <= 1, g*alpha, +0) / alpha        WhereBackward, DivBackward0
      dalpha  = sum(g*dq) - sum(where(...) * (x/alpha))        MulBackward0 + DivBackward0 (-g*((t/a)/a))
    The mask lo <= x <= 1 is d == x (NaN: outside), applied to the float bits as an int32 product (x 1 keeps
    them, x 0 gives +0, NaN included); 1.0f >> 29 is 1.
    """

    @staticmethod
    def forward(ctx, tensor, alpha, proj, is_weight):
        x = tensor / alpha
        d = x.clamp(-1.0 if is_weight else 0.0, 1.0)
        inside = torch.eq(d, x, out=torch.empty_like(x)).view(torch.int32).bitwise_right_shift_(29)  # 1./0. -> 1/0
        hard = proj(d.abs()).copysign_(d) if is_weight else proj(d)   # = Pi(|d|)*sign(d) wherever dq is not NaN
        dq = hard.sub_(d).add_(d)
        ctx.save_for_backward(x, dq, inside, alpha)
        return dq * alpha

    @staticmethod
    def backward(ctx, grad):
        x, dq, inside, alpha = ctx.saved_tensors
        gx = (grad * alpha).view(torch.int32).mul_(inside).view(torch.float32)
        grad_tensor = gx / alpha if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = _sum_to_scalar(grad * dq) - _sum_to_scalar(gx.mul_(x / alpha))
        return grad_tensor, grad_alpha, None, None


class _CalibratedTernary(torch.autograd.Function):
    """round(clamp(x/alpha, -1, 1)) * alpha; the weight gradient is passed through unclipped ("calibrated")."""

    @staticmethod
    def forward(ctx, tensor, alpha, grad_scale):
        x = tensor / alpha
        x_q = x.clamp(min=-1, max=1).round()
        ctx.save_for_backward(x, x_q)
        ctx.grad_scale = grad_scale
        return x_q.mul(alpha)

    @staticmethod
    def backward(ctx, grad_output):
        x, x_q = ctx.saved_tensors
        outside = (x.abs() > 1.).float()
        grad_alpha = (grad_output * (x.sign() * outside + (x_q - x) * (1 - outside))).sum()
        if ctx.grad_scale:
            grad_alpha = grad_alpha * ctx.grad_scale
        return grad_output.clone(), grad_alpha, None


class _CalibratedTernaryFast(torch.autograd.Function):
    """`_CalibratedTernary` in fewer passes, the same bits: the alpha term sign(x)*1[|x|>1] + (x_q-x)*1[|x|<=1]
    equals x_q - x*1[|x|<=1] for every x (above the clip x_q = sign(x) and x*0 = +-0; x = +-inf: NaN in both)."""

    @staticmethod
    def forward(ctx, tensor, alpha, grad_scale):
        x = tensor / alpha
        x_c = x.clamp(min=-1, max=1)
        x_q = x_c.round()
        inside = torch.eq(x_c, x, out=torch.empty_like(x))                   # 1[|x| <= 1] as 0./1. (NaN: 0)
        ctx.save_for_backward(torch.addcmul(x_q, inside, x, value=-1))        # x_q - 1*x: the product is exact
        ctx.grad_scale = grad_scale
        return x_q.mul_(alpha)

    @staticmethod
    def backward(ctx, grad_output):
        term, = ctx.saved_tensors
        grad_alpha = (grad_output * term).sum()
        if ctx.grad_scale:
            grad_alpha = grad_alpha * ctx.grad_scale
        return grad_output, grad_alpha, None


def uq_with_calibrated_graditens(grad_scale=None, reference=False):
    """The original's (misspelt) name: returns f(weight, alpha) for 2-bit ternary weights."""
    fn = _CalibratedTernary if reference else _CalibratedTernaryFast

    def quantize(tensor, alpha):
        return fn.apply(tensor, alpha, grad_scale)
    return quantize


uq_with_calibrated_gradients = uq_with_calibrated_graditens


def uniform_quantization(tensor, alpha, bit, is_weight=True, grad_scale=None):
    """Uniform levels with the STE: 2^(b-1)-1 steps per sign for weights, 2^b-1 for activations."""
    if grad_scale:
        alpha = gradient_scale(alpha, grad_scale)
    data = tensor / alpha
    steps = 2 ** (bit - 1) - 1 if is_weight else 2 ** bit - 1
    data = clamp_ste(data, -1, 1) if is_weight else clamp_ste(data, 0, 1)
    data = data * steps
    data_q = (data.round() - data).detach() + data
    return data_q / steps * alpha


class weight_quantize_fn(nn.Module):
    """Normalise then quantize a weight tensor: `weight_quant(weight, alpha)`. No parameters of its own
    (alpha is the owning QuantConv2d's `weight_alpha`), so it adds no state_dict keys."""

    def __init__(self, w_bit, power=True, additive=True, grad_scale=None):
        super().__init__()
        check_bit(w_bit, power)
        self.w_bit, self.power, self.grad_scale = w_bit, power, grad_scale
        grid = build_power_value(w_bit - 1, additive) if power and 2 < w_bit < 32 else torch.empty(0)
        self.register_buffer("grid", grid, persistent=False)
        self.proj = LevelProjector(grid, signed=False) if grid.numel() else None    # sees [0, 1] only
        self.reference = False

    def forward(self, weight, alpha):
        if self.w_bit == 32:
            return weight
        weight = weight.add(-weight.mean()).div(weight.std())     # normalisation, grad through mean/std
        if self.w_bit == 2:
            return uq_with_calibrated_graditens(self.grad_scale, self.reference)(weight, alpha)
        if self.power:
            return apot_quantization(weight, alpha, _module_projection(self), True, self.grad_scale)
        return uniform_quantization(weight, alpha, self.w_bit, True, self.grad_scale)

    def extra_repr(self):
        return f"w_bit={self.w_bit}, power={self.power}"


class act_quantization(nn.Module):
    """Quantize post-ReLU activations: `act_alq(x, alpha)` (APoT levels `grid`, or uniform)."""

    def __init__(self, b, grid=None, power=True, grad_scale=None):
        super().__init__()
        check_bit(b, power)
        self.b, self.power, self.grad_scale = b, power, grad_scale
        if grid is None:
            grid = build_power_value(b, additive=True) if power and b != 32 else torch.empty(0)
        self.register_buffer("grid", grid, persistent=False)
        self.proj = LevelProjector(grid, signed=False) if grid.numel() else None    # sees [0, 1] only
        self.reference = False

    def forward(self, x, alpha):
        if self.b == 32:
            return x
        if self.power:
            return apot_quantization(x, alpha, _module_projection(self), False, self.grad_scale)
        return uniform_quantization(x, alpha, self.b, False, self.grad_scale)

    def extra_repr(self):
        return f"b={self.b}, power={self.power}"


class QuantConv2d(nn.Conv2d):
    """Conv2d with APoT (power=True) or uniform weights and input activations; bit=32 is a plain conv.

    Attributes as in the paper README: `bit`, `weight_quant`, `act_grid`, `act_alq`, `act_alpha`,
    plus `weight_alpha`. Setting `bit`, `power` or `additive` rebuilds the quantizers.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, bit=5, power=True, additive=True, grad_scale=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.layer_type = "QuantConv2d"
        self._bit, self._power, self._additive, self.grad_scale = bit, power, additive, grad_scale
        self._build()
        self.act_alpha = nn.Parameter(torch.tensor(6.0))
        self.weight_alpha = nn.Parameter(torch.tensor(3.0))

    def _build(self):
        check_bit(self._bit, self._power)
        dev = self.weight.device
        if self._power and self._bit != 32:
            act_grid = build_power_value(self._bit, additive=self._additive).to(dev)
        else:
            act_grid = torch.empty(0, device=dev)
        self.register_buffer("act_grid", act_grid, persistent=False)
        self.weight_quant = weight_quantize_fn(w_bit=self._bit, power=self._power, additive=self._additive,
                                               grad_scale=self.grad_scale).to(dev)
        self.act_alq = act_quantization(self._bit, self.act_grid, power=self._power,
                                        grad_scale=self.grad_scale).to(dev)

    def _setter(name):
        def get(self):
            return getattr(self, "_" + name)

        def set_(self, value):
            setattr(self, "_" + name, value)
            self._build()
        return property(get, set_)

    bit = _setter("bit")
    power = _setter("power")
    additive = _setter("additive")
    del _setter

    @property
    def proj_set_weight(self):
        return self.weight_quant.grid

    @property
    def proj_set_act(self):
        return self.act_grid

    def forward(self, x):
        if self._bit == 32:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        weight = self.weight_quant(self.weight, self.weight_alpha)
        x = self.act_alq(x, self.act_alpha)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def show_params(self):
        if self._bit != 32:
            wgt_alpha = round(self.weight_alpha.data.item(), 3)
            act_alpha = round(self.act_alpha.data.item(), 3)
            print("clipping threshold weight alpha: {:2f}, activation alpha: {:2f}".format(wgt_alpha, act_alpha))


def _int8_signed_max(weight):
    """8-bit weights scaled by the signed max (not max|w|) and not clamped; straight-through."""
    w_max = weight.data.max()
    weight_q = weight.div(w_max).mul(127).round().div(127).mul(w_max)
    return (weight_q - weight).detach() + weight


class first_conv(nn.Conv2d):
    """First layer: 8-bit weights (signed max), full-precision input."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.layer_type = "FConv2d"

    def forward(self, x):
        return F.conv2d(x, _int8_signed_max(self.weight), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class last_fc(nn.Linear):
    """Last layer: 8-bit weights (signed max), full-precision input, bias kept."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias)
        self.layer_type = "LFC"

    def forward(self, x):
        return F.linear(x, _int8_signed_max(self.weight), self.bias)
