"""The quantizer FDDA inherits from ZeroQ, and the rules that put it into a full-precision model.

Asymmetric k-bit fake quantization of x over the range [m, M] (ZeroQ `asymmetric_linear_quantization_params`):

    s  = (2^k - 1) / max(M - m, 1e-8)              scale
    zp = round(s * m) + 2^(k-1)                    integral zero point (signed grid)
    q  = clamp(round(s * x - zp), -2^(k-1), 2^(k-1) - 1)
    x_hat = (q + zp) / s

`round` is round-half-to-even (torch.round), both in the zero point and in q. Weights use one (m, M) per
output channel, taken from the current weights at every forward; activations use one scalar range per
QuantAct, an exponential moving average (beta = 0.9, starting from 0) of the batch min/max while
`running_stat` is on, frozen otherwise.

Backward: the original passes the gradient straight through everywhere (no clipping mask) and gives no
gradient to m, M. That is the default (`clip_ste=False`: the mask is all ones). `clip_ste=True` zeroes the
gradient where s*x - zp rounds outside [-2^(k-1), 2^(k-1)-1]: an explicit mask, inclusive at both ends.
Nothing here synchronises with the host (no .item(), no data-dependent branch).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError

MIN_BITS, MAX_BITS = 2, 16   # 1 bit would make the signed grid {-1, 0}; > 16 loses exactness in float32


def check_bits(bits, name):
    """`bits` must be an int in [MIN_BITS, MAX_BITS]; else one UserError line naming the key."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{name} = {bits!r} is not supported: the quantizer takes integer bit-widths "
                        f"{MIN_BITS}..{MAX_BITS} (set {name} in the hocon file or pass --{name} N)")
    return bits


def _per_row(t, x):
    """Reshape a per-channel (C,) tensor to broadcast against x (C, ...); scalars ((1,) or ()) unchanged."""
    if t.dim() == 1 and t.numel() > 1:
        return t.view([-1] + [1] * (x.dim() - 1))
    return t


def asymmetric_linear_quantization_params(k, m, M):
    """(scale, zero_point) of the k-bit signed asymmetric grid covering [m, M] (tensors, elementwise)."""
    n = 2 ** k - 1
    scale = n / torch.clamp(M - m, min=1e-8)
    zero_point = torch.round(scale * m) + 2 ** (k - 1)
    return scale, zero_point


class AsymmetricQuantFunction(torch.autograd.Function):
    """x_hat = (clamp(round(s x - zp)) + zp) / s; gradient to x only (straight through, optionally masked)."""

    @staticmethod
    def forward(ctx, x, k, x_min, x_max, clip_ste=False):
        scale, zero_point = asymmetric_linear_quantization_params(k, x_min.detach(), x_max.detach())
        scale, zero_point = _per_row(scale, x), _per_row(zero_point, x)
        lo, hi = -2 ** (k - 1), 2 ** (k - 1) - 1
        # The original's ops in its order (round(scale * x - zp), clamp, (q + zp) / scale), in place on the one
        # fresh tensor x * scale (never x itself; a product is commutative bit for bit): no temporaries.
        # lo, hi are Python ints (lo < hi for k >= 2), so clamp_ equals the where-chain it replaces bit for
        # bit, NaN kept, +-inf to lo/hi, -0 kept, lo/hi kept (tests/test_fdda_core.py compares the two).
        # Forward only: clamp's gradient at the bounds never enters (backward below).
        q = (x * scale).sub_(zero_point).round_()
        if clip_ste:
            ctx.save_for_backward(((q >= lo) & (q <= hi)).to(x.dtype))
        ctx.clip_ste = clip_ste
        return q.clamp_(lo, hi).add_(zero_point).div_(scale)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.clip_ste:
            (mask,) = ctx.saved_tensors
            return grad_output * mask, None, None, None, None
        return grad_output, None, None, None, None


class QuantAct(nn.Module):
    """k-bit activation quantizer with an EMA range (x_min, x_max), updated while `running_stat` is True.

    Buffers keep the original's names (x_min, x_max, beta, beta_t, cur_x_min, cur_x_max) so the authors'
    released state dicts load; cur_x_* (the last batch's min/max) keep their (1,) shape here.
    """

    def __init__(self, activation_bit, full_precision_flag=False, running_stat=True, beta=0.9, clip_ste=False):
        super().__init__()
        self.activation_bit = activation_bit
        self.full_precision_flag = full_precision_flag
        self.running_stat = running_stat
        self.clip_ste = clip_ste
        self.register_buffer("x_min", torch.zeros(1))
        self.register_buffer("x_max", torch.zeros(1))
        self.register_buffer("beta", torch.tensor([beta]))
        self.register_buffer("beta_t", torch.ones(1))
        self.register_buffer("cur_x_min", torch.zeros(1))
        self.register_buffer("cur_x_max", torch.zeros(1))

    def extra_repr(self):
        return f"activation_bit={self.activation_bit}, full_precision_flag={self.full_precision_flag}, " \
               f"running_stat={self.running_stat}"

    def fix(self):
        """Freeze the activation range."""
        self.running_stat = False

    def unfix(self):
        """Let the activation range follow the data again (EMA)."""
        self.running_stat = True

    def forward(self, x):
        if self.running_stat:
            with torch.no_grad():
                mn, mx = torch.aminmax(x.detach())
                self.cur_x_min.copy_(mn.reshape(1))
                self.cur_x_max.copy_(mx.reshape(1))
                self.beta_t.mul_(self.beta)
                self.x_min.copy_(self.x_min * self.beta + mn * (1 - self.beta))
                self.x_max.copy_(self.x_max * self.beta + mx * (1 - self.beta))
        if self.full_precision_flag:
            return x
        return AsymmetricQuantFunction.apply(x, self.activation_bit, self.x_min, self.x_max, self.clip_ste)


class _QuantWeight(nn.Module):
    """Shared by Quant_Conv2d / Quant_Linear: per-output-channel range of the current weights."""

    def quantized_weight(self):
        if self.full_precision_flag:
            return self.weight
        # amin / amax along dim 1: the same values as the original's min(dim=1) / max(dim=1) (exact reductions;
        # the sign of a zero bound cannot change scale or zero point), without their index output: on CPU
        # ~40x faster than those or aminmax(dim=1) (a 512 x 4608 weight, 1 thread: 0.3 ms vs 12-13 ms)
        w = self.weight.detach().flatten(1)
        w_min, w_max = w.amin(dim=1), w.amax(dim=1)
        return AsymmetricQuantFunction.apply(self.weight, self.weight_bit, w_min, w_max, self.clip_ste)

    def _copy_param(self, mod):
        self.weight = nn.Parameter(mod.weight.detach().clone())
        self.bias = nn.Parameter(mod.bias.detach().clone()) if mod.bias is not None else None


class Quant_Linear(_QuantWeight):
    """nn.Linear whose weight is fake-quantized to `weight_bit` bits, one range per output row."""

    def __init__(self, weight_bit, full_precision_flag=False, clip_ste=False):
        super().__init__()
        self.weight_bit, self.full_precision_flag, self.clip_ste = weight_bit, full_precision_flag, clip_ste

    def set_param(self, linear):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._copy_param(linear)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, weight_bit={self.weight_bit}"

    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.bias)


class Quant_Conv2d(_QuantWeight):
    """nn.Conv2d whose weight is fake-quantized to `weight_bit` bits, one range per output channel."""

    def __init__(self, weight_bit, full_precision_flag=False, clip_ste=False):
        super().__init__()
        self.weight_bit, self.full_precision_flag, self.clip_ste = weight_bit, full_precision_flag, clip_ste

    def set_param(self, conv):
        for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, a, getattr(conv, a))
        self._copy_param(conv)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, " \
               f"groups={self.groups}, weight_bit={self.weight_bit}"

    def forward(self, x):
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def _under(path, prefixes):
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def quantize_model(model, qw, qa, f8l8=None, clip_ste=False):
    """A quantized copy of `model` with the original's replacement rules (main_DBNS_CBNS.py `quantize_model`):

    - nn.Conv2d -> Quant_Conv2d(qw), nn.Linear -> Quant_Linear(qw) (weights and bias copied);
    - nn.ReLU / nn.ReLU6 -> nn.Sequential(relu, QuantAct(qa)) (the activation is quantized after the ReLU);
    - everything else (BatchNorm included: not folded) is kept and searched recursively, except children
      whose attribute name contains 'norm' (as the original's `'norm' not in attr`).
    - an nn.Sequential is rebuilt from its children positionally, so its children's names become 0, 1, ...
      (pytorchcv's `features.stage1` is `features.1` in the quantized model, as in the authors' checkpoints).
    Types match exactly (subclasses are left alone), as the original's `type(m) == nn.Conv2d`.

    `f8l8` (main_cosine_CBNS_8F8L.py) is a dict with `first` (full-precision module paths: every Conv/ReLU at
    or under them is 8-bit) and `last` (activation paths quantized at 8 bits); every Linear is then 8-bit.
    The input image itself is never quantized. `model` is left untouched.
    """
    return _replace(copy.deepcopy(model), qw, qa, f8l8, clip_ste, "")


def _replace(model, qw, qa, f8l8, clip_ste, path):
    kind = type(model)
    first = f8l8 is not None and _under(path, f8l8["first"])
    if kind is nn.Conv2d:
        q = Quant_Conv2d(8 if first else qw, clip_ste=clip_ste)
        q.set_param(model)
        return q
    if kind is nn.Linear:
        q = Quant_Linear(8 if f8l8 is not None else qw, clip_ste=clip_ste)
        q.set_param(model)
        return q
    if kind in (nn.ReLU, nn.ReLU6):
        bits = 8 if first or (f8l8 is not None and path in f8l8["last"]) else qa
        return nn.Sequential(model, QuantAct(bits, clip_ste=clip_ste))
    if kind is nn.Sequential:   # rebuilt positionally, as the original: children are renamed 0, 1, 2 ...
        return nn.Sequential(*[_replace(m, qw, qa, f8l8, clip_ste, _join(path, n))
                               for n, m in model.named_children()])
    for name, child in list(model.named_children()):
        if "norm" not in name:
            setattr(model, name, _replace(child, qw, qa, f8l8, clip_ste, _join(path, name)))
    return model


def _join(path, name):
    return f"{path}.{name}" if path else name


def _act_quantizers(model):
    return [m for m in model.modules() if isinstance(m, QuantAct)]


def freeze_model(model):
    """Freeze every activation range (QuantAct.fix)."""
    for m in _act_quantizers(model):
        m.fix()
    return model


def unfreeze_model(model):
    """Let every activation range follow the data again (QuantAct.unfix)."""
    for m in _act_quantizers(model):
        m.unfix()
    return model


def quantizer_bits(model):
    """{module path: bits} of every weight and activation quantizer (for tests and logs)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (Quant_Conv2d, Quant_Linear)):
            out[name] = ("w", m.weight_bit)
        elif isinstance(m, QuantAct):
            out[name] = ("a", m.activation_bit)
    return out
