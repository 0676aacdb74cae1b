"""The --method baselines of AlignQ's comparison tables, as the original's cdf_alignment_admm/resnet-20-cifar-10
model/quantization_{uniform,dorefa,llsq,apot,lsq,bwn}.py implement them (seed era).

Placement (`order`): uniform, dorefa, llsq, bwn quantize activations after the ReLU ('after', the original's
resnet_after.py); apot and lsq quantize a convolution's input inside the convolution ('none', resnet_none.py).
Straight-through estimators and clipping masks are written out (inclusive at both ends).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from alignq.quant import QConv2d, uniform_q
from common.errors import UserError


def ste(hard, soft):
    """Forward exactly `hard`, gradient of `soft`."""
    return hard.detach() + (soft - soft.detach())


def clip_ste(x, lo, hi):
    """clamp(x, lo, hi) with gradient 1 on [lo, hi] (both ends inclusive) and 0 outside."""
    mask = ((x >= lo) & (x <= hi)).to(x.dtype)
    return x.clamp(lo, hi).detach() + (x - x.detach()) * mask


# ------------------------------------------------------------------------------- uniform, dorefa, bwn


class UniformWeight(nn.Module):
    """uniform: round(w n)/n on the raw weights (1 bit: sign(w / E) E, E = mean|w| detached)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, w):
        if self.k == 32:
            return w
        if self.k == 1:
            E = w.abs().mean().detach()
            return uniform_q(w / E, 1) * E
        return uniform_q(w, self.k)


class DorefaWeight(UniformWeight):
    """DoReFa: w' = tanh(w) / (2 max|tanh w|) + 1/2, w_q = max|tanh w| (2 uniform_q(w') - 1)."""

    def forward(self, w):
        if self.k in (1, 32):
            return super().forward(w)
        t = torch.tanh(w)
        m = t.abs().max().detach()
        return m * (2 * uniform_q(t / 2 / m + 0.5, self.k) - 1)


class BWNWeight(UniformWeight):
    """BWN: mean|w| (detached) * sign(w), straight-through."""

    def forward(self, w):
        if self.k == 32:
            return w
        return w.abs().mean().detach() * ste(torch.sign(w), w)


class ClampAct(nn.Module):
    """uniform_q(clamp(x, 0, 1)) (identity at 32 bits). The original's clamp passes no gradient outside [0, 1]."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x if self.k == 32 else uniform_q(clip_ste(x, 0.0, 1.0), self.k)


# ------------------------------------------------------------------------------- LLSQ


def quan_alpha(alpha, bits=16):
    """The original's quan_fn_alpha: alpha on a 16-bit fixed-point grid scaled to max(alpha) (no gradient path)."""
    q_code = bits - torch.ceil(torch.log2(alpha.max()) + 1 - 1e-5)
    return torch.clamp(torch.round(alpha * 2 ** q_code), -2 ** (bits - 1), 2 ** (bits - 1) - 1) / 2 ** q_code


class _LLSQRound(torch.autograd.Function):
    """round(x / alpha) clamped to [lo, hi], times alpha. Backward: STE for x (zeroed outside the range for
    activations), and for alpha -alpha^2 * d with d in {-1, 0, 1} the better of alpha/2, alpha, 2 alpha (squared error,
    per output channel for weights)."""

    @staticmethod
    def forward(ctx, x, alpha, lo, hi, mask_input):
        ctx.save_for_backward(x, alpha)
        ctx.lo, ctx.hi, ctx.mask_input = lo, hi, mask_input
        return torch.clamp(torch.round(x / alpha), lo, hi) * alpha

    @staticmethod
    def backward(ctx, g):
        x, alpha = ctx.saved_tensors
        lo, hi = ctx.lo, ctx.hi
        dims = tuple(range(1, x.dim())) if alpha.numel() > 1 else tuple(range(x.dim()))
        errs = []
        for a in (alpha / 2, alpha, alpha * 2):
            q = torch.clamp(torch.round(x / a), lo, hi) * a
            errs.append(((x - q) ** 2).sum(dim=dims))
        d = torch.argmin(torch.stack(errs), dim=0).to(alpha.dtype) - 1
        g_alpha = -(alpha ** 2) * d.reshape(alpha.shape)
        gx = g
        if ctx.mask_input:
            gx = g * ((x >= lo * alpha) & (x <= hi * alpha)).to(g.dtype)
        return gx, g_alpha, None, None, None


class LLSQWeight(nn.Module):
    """Per-output-channel alpha (init Kaiming normal as the original), 2^k signed levels."""

    def __init__(self, k, out_channels):
        super().__init__()
        self.k = k
        self.alpha_w = nn.Parameter(torch.empty(out_channels, 1, 1, 1))
        nn.init.kaiming_normal_(self.alpha_w, mode="fan_out", nonlinearity="relu")
        with torch.no_grad():
            self.alpha_w.abs_().add_(1e-3)   # a negative/zero step would flip or kill the weights (DEVIATIONS.md)

    def forward(self, w):
        if self.k == 32:
            return w
        p = 2 ** (self.k - 1)
        return _LLSQRound.apply(w, quan_alpha(self.alpha_w).detach() + (self.alpha_w - self.alpha_w.detach()),
                                -p, p - 1, False)


class LLSQAct(nn.Module):
    """Unsigned activations: round(x / alpha) clamped to [0, 2^(k-1) - 1] (the original's unsigned range)."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.alpha = nn.Parameter(torch.rand(1) + 1e-3)

    def forward(self, x):
        if self.k == 32:
            return x
        a = quan_alpha(self.alpha).detach() + (self.alpha - self.alpha.detach())
        return _LLSQRound.apply(x, a, 0, 2 ** (self.k - 1) - 1, True)


# ------------------------------------------------------------------------------- APoT (the AlignQ repo's copy)


def apot_grid(B, additive=True):
    """build_power_value: sums of one element from each base set, normalised to max 1 (B = 2..6)."""
    a, b, c = [0.0], [0.0], [0.0]
    if additive:
        if B == 2:
            a += [2.0 ** (-i - 1) for i in range(3)]
        elif B == 3:
            a += [0.5, 0.25, 2.0 ** -4]
            b += [2.0 ** -3]
        elif B == 4:
            a += [2.0 ** (-2 * i - 1) for i in range(3)]
            b += [2.0 ** (-2 * i - 2) for i in range(3)]
        elif B == 5:
            a += [0.5, 2.0 ** -3, 2.0 ** -6]
            b += [0.25, 2.0 ** -4, 2.0 ** -7]
            c += [2.0 ** -5]
        elif B == 6:
            a += [2.0 ** (-3 * i - 1) for i in range(3)]
            b += [2.0 ** (-3 * i - 2) for i in range(3)]
            c += [2.0 ** (-3 * i - 3) for i in range(3)]
    else:
        a += [2.0 ** (-i - 1) for i in range(2 ** B - 1)]
    values = torch.tensor(sorted({x + y + z for x in a for y in b for z in c}))
    return values / values.max()


def _nearest(x, grid):
    idx = torch.argmin((x.reshape(-1, 1) - grid.to(x).reshape(1, -1)).abs(), dim=1)
    return grid.to(x)[idx].reshape(x.shape)


class _APoTWeightFn(torch.autograd.Function):
    """w/alpha clipped to [-1, 1], projected to +-grid (or uniform), times alpha; grad w: identity (not clipped),
    grad alpha: sum g (sign(x) [|x| > 1] + (q - x) [|x| <= 1]) as the original."""

    @staticmethod
    def forward(ctx, w, alpha, grid, power, b):
        x = w / alpha
        xc = x.clamp(-1, 1)
        q = (_nearest(xc.abs(), grid) if power else torch.round(xc.abs() * (2 ** b - 1)) / (2 ** b - 1)) * xc.sign()
        ctx.save_for_backward(x, q)
        return q * alpha

    @staticmethod
    def backward(ctx, g):
        x, q = ctx.saved_tensors
        out = (x.abs() > 1).to(g.dtype)
        return g, (g * (x.sign() * out + (q - x) * (1 - out))).sum(), None, None, None


class _APoTActFn(torch.autograd.Function):
    """x/alpha clipped above at 1, projected to the grid, times alpha; grad x zero above 1."""

    @staticmethod
    def forward(ctx, x, alpha, grid):
        y = x / alpha
        q = _nearest(y.clamp(max=1), grid)
        ctx.save_for_backward(y, q)
        return q * alpha

    @staticmethod
    def backward(ctx, g):
        y, q = ctx.saved_tensors
        out = (y > 1).to(g.dtype)
        return g * (1 - out), (g * (out + (q - y) * (1 - out))).sum(), None


class APoTConv2d(nn.Conv2d):
    """The repo's APoT QuantConv2d: weights normalised by (detached) mean/std, APoT grid of w_bit - 1 bits (uniform
    at <= 2 bits), the input quantized on the w_bit-bit APoT grid with act_alpha (the original uses w_bit for both)."""

    def __init__(self, *args, w_bit=4, **kw):
        super().__init__(*args, **kw)
        self.w_bit = w_bit
        self.wgt_alpha = nn.Parameter(torch.tensor(3.0))
        self.act_alpha = nn.Parameter(torch.tensor(8.0))
        self.register_buffer("wgrid", apot_grid(w_bit - 1), persistent=False)
        self.register_buffer("agrid", apot_grid(w_bit), persistent=False)

    def forward(self, x):
        w = self.weight
        wn = (w - w.detach().mean()) / w.detach().std()
        wq = _APoTWeightFn.apply(wn, self.wgt_alpha, self.wgrid, self.w_bit > 2, self.w_bit - 1)
        xq = _APoTActFn.apply(x, self.act_alpha, self.agrid)
        return F.conv2d(xq, wq, self.bias, self.stride, self.padding, self.dilation, self.groups)


# ------------------------------------------------------------------------------- LSQ


class LSQQuantizer(nn.Module):
    """x_hat = round(clamp(x / s', Qn, Qp)) s', s' = s with its gradient scaled by 1 / sqrt(numel Qp)."""

    def __init__(self, bits, is_activation):
        super().__init__()
        self.bits = bits
        self.Qn, self.Qp = (0, 2 ** bits - 1) if is_activation else (-2 ** (bits - 1), 2 ** (bits - 1) - 1)
        self.s = nn.Parameter(torch.tensor([1.0]))

    def init_step_size(self, x):
        with torch.no_grad():
            self.s.copy_(x.detach().abs().mean() * 2 / self.Qp ** 0.5)

    def forward(self, x):
        scale = 1.0 / (x.numel() * self.Qp) ** 0.5
        s = ste(self.s, self.s * scale)           # grad_scale
        y = clip_ste(x / s, self.Qn, self.Qp)
        return ste(torch.round(y), y) * s


class LSQConv2d(nn.Conv2d):
    """The repo's LSQ_Conv2D: quantizes its weight (signed, step initialised from the weight at construction)
    and its input (unsigned, step 1.0)."""

    def __init__(self, *args, w_bit=4, a_bit=4, **kw):
        super().__init__(*args, **kw)
        self.w_bit = w_bit
        self.weight_quantizer = LSQQuantizer(w_bit, False)
        self.weight_quantizer.init_step_size(self.weight)
        self.act_quantizer = LSQQuantizer(a_bit, True)

    def forward(self, x):
        return F.conv2d(self.act_quantizer(x), self.weight_quantizer(self.weight), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


# ------------------------------------------------------------------------------- schemes


class BaselineScheme:
    def __init__(self, method, wbit, abit):
        self.method, self.wbit, self.abit = method, wbit, abit
        self.order = "none" if method in ("apot", "lsq") else "after"

    def conv(self, *args, **kw):
        m, k = self.method, self.wbit
        if m == "apot":
            return APoTConv2d(*args, w_bit=k, **kw)
        if m == "lsq":
            return LSQConv2d(*args, w_bit=k, a_bit=self.abit, **kw)
        out_channels = args[1] if len(args) > 1 else kw["out_channels"]
        wq = {"uniform": UniformWeight, "dorefa": DorefaWeight, "bwn": BWNWeight}.get(m)
        return QConv2d(*args, w_bit=k, weight_quant=wq(k) if wq else LLSQWeight(k, out_channels), **kw)

    def act(self, admm=True):
        if self.order == "none":
            return nn.Identity()
        return LLSQAct(self.abit) if self.method == "llsq" else ClampAct(self.abit)


def check_bits(method, wbit, abit):
    """The original's asserts: <= 8 bits (or 32) for uniform/dorefa/llsq/bwn, 2..5 for apot (its grids)."""
    if method == "apot" and not (2 <= wbit <= 5):
        raise UserError(f"--method apot supports --bitW 2..5 (its power-of-two grids; activations use --bitW too), "
                        f"got {wbit}")
    if method in ("uniform", "dorefa", "llsq", "bwn") and not (wbit <= 8 or wbit == 32) or \
            method in ("uniform", "dorefa", "llsq", "bwn") and not (abit <= 8 or abit == 32):
        raise UserError(f"--method {method} supports 1..8 or 32 bits, got --bitW {wbit} --abitW {abit}")
    if method == "lsq" and (wbit == 32 or abit == 32 or wbit < 2):
        raise UserError(f"--method lsq needs --bitW 2..31 and --abitW 1..31, got {wbit}/{abit}")


def scheme(method, wbit, abit):
    check_bits(method, wbit, abit)
    return BaselineScheme(method, wbit, abit)
