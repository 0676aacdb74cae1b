"""DMBQ layers: the multi-bit weight quantizer, the uniform activation quantizer and the 8-bit first/last layers.

Notation (paper §3, original model/quant_layers.py):
  weights of output channel c at b_c bits are projected onto the 2^4 signed sums  Σ_i s_i·ALPHA_W[b_c][i]
  (s ∈ {−1,+1}^4) after clipping to ±α_c, α_c a running (EMA) multiple CLIP_W[b_c] of mean|w_c|;
  activations of input channel c are rounded to 2^{b_c}−1 uniform steps on [0, α], α learnable (LSQ-like).

The straight-through gradients are written out (custom autograd Functions, masks inclusive at both ends), not
left to clamp/round autograd; the same backward accumulates the loss-aware quantization error of each group
(|Σ_g (x − x_q)·∂L/∂x_q| / |g|, paper Eq. 9) that LBA (quant_tune.py) ranks, when the layer's `collect` is on.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Row b: the coefficients of the b-bit basis (rows sum to 1; unused slots 0, which duplicate levels).
ALPHA_W = ((0.0, 0.0, 0.0, 0.0),
           (1.0, 0.0, 0.0, 0.0),
           (0.6123, 0.3877, 0.0, 0.0),
           (0.4557, 0.3436, 0.2007, 0.0),
           (0.3317, 0.2858, 0.2346, 0.1479))
# Clip α_c = CLIP_W[b]·mean|w_c| (fits to the weight distribution, from the original; index = bits).
CLIP_W = (0.5, 0.98, 2.6, 4.16, 5.66)
MAX_BIT = len(ALPHA_W) - 1
EPS = 1e-6
EMA_DECAY = 0.99


def build_quant_base(alpha=ALPHA_W):
    """QUANT_BASES[b, j] = Σ_i s_i·alpha[b][i] with s_i = +1 iff bit (n−1−i) of j is set (s_0 most significant,
    −1 before +1: the original's recursion order); float64 sums in index order, then float32."""
    a = np.asarray(alpha, dtype=np.float64)
    n = a.shape[1]
    if a.shape[0] != n + 1:
        raise ValueError(f"alpha must have bit_num + 1 rows, got {a.shape[0]} rows of {n}")
    table = np.zeros((n + 1, 2 ** n))
    for j in range(2 ** n):
        acc = np.zeros(n + 1)
        for i in range(n):
            acc = acc + (1 if (j >> (n - 1 - i)) & 1 else -1) * a[:, i]
        table[:, j] = acc
    return torch.tensor(table, dtype=torch.float32)


QUANT_BASES = build_quant_base()


def round_pass(x):
    """round(x) forward (exactly: round(x) − x is exact in floating point), identity gradient."""
    return (x.round() - x).detach() + x


def nearest_level(c, points, chunk=1 << 22):
    """Nearest of each row's levels: c (G, K), points (G, L) -> (G, K); ties go to the first level, as the
    original's `(c - P).abs().min(dim=1)` (documented first-index ties), in chunks of groups so that the
    G x L x K distance table stays under `chunk` elements."""
    g, k = c.shape
    step = max(1, chunk // max(1, points.shape[1] * k))
    out = []
    for i in range(0, g, step):
        ci, pi = c[i:i + step], points[i:i + step]
        idx = (ci.unsqueeze(1) - pi.unsqueeze(2)).abs_().min(dim=1)[1]
        out.append(torch.gather(pi, 1, idx))
    return out[0] if len(out) == 1 else torch.cat(out)


class _WgtQuant(torch.autograd.Function):
    """y = α·[((P(c) − c) + c)], c = clamp(w/(α+ε), −1, 1); ∂y/∂w = α/(α+ε)·1[−1 ≤ w/(α+ε) ≤ 1]."""

    @staticmethod
    def forward(ctx, w, alpha, points, err):
        c = (w / (alpha + EPS)).clamp(-1, 1)
        y = ((nearest_level(c, points) - c) + c) * alpha   # the original's STE expression, value included
        ctx.save_for_backward(w, alpha, y)
        ctx.err = err
        return y

    @staticmethod
    def backward(ctx, g):
        w, alpha, y = ctx.saved_tensors
        s = alpha + EPS
        u = w / s
        inside = ((u >= -1) & (u <= 1)).to(g.dtype)
        if ctx.err is not None:   # LBA: |Σ_{i∈c}(w − w_q)_i·∂L/∂w_q,i| / (elements per group)
            ctx.err.add_(((w - y) * g).sum(1).abs_().div_(w.shape[1]))
        return g * inside * (alpha / s), None, None, None


class _ActQuant(torch.autograd.Function):
    """y = round(clamp(u, 0, 1)·Q)·α/(Q+ε), u = x/(α+ε), on x viewed (A, G, B), Q = 2^b_g − 1 per group g.

    ∂y/∂x = 1[0 ≤ u ≤ 1]·k,  k = Q·α/((α+ε)(Q+ε));
    ∂y/∂α = r/(Q+ε) − 1[0 ≤ u ≤ 1]·Q·α·x/((Q+ε)(α+ε)²) = y/α − (∂y/∂x)·x/(α+ε),  r = round(clamp(u)·Q),
    so α's gradient is two dot products, Σ g·y/α − Σ (g·∂y/∂x)·x/(α+ε). The backward makes ~3 full-size passes
    (5 while collecting LBA errors): the mask, scaled by k, is saved from the forward as floats.
    """

    @staticmethod
    def forward(ctx, x, alpha, qmax, err):
        s = alpha + EPS
        qe = qmax + EPS
        u = x / s
        c = u.clamp(0, 1)
        dydx = torch.eq(c, u, out=u).mul_(qmax * alpha / (s * qe))   # 1[0 <= u <= 1] (inclusive) · k, over u
        y = c.mul_(qmax).round_().mul_(alpha).div_(qe)              # (round(c·Q)·α)/(Q+ε), the original's order
        ctx.save_for_backward(x, alpha, y, dydx)
        ctx.err = err
        return y

    @staticmethod
    def backward(ctx, g):
        x, alpha, y, dydx = ctx.saved_tensors
        g = g.contiguous()
        gx = g * dydx
        galpha = None
        if ctx.needs_input_grad[1]:
            galpha = (torch.dot(g.view(-1), y.view(-1)) / alpha
                      - torch.dot(gx.view(-1), x.reshape(-1)) / (alpha + EPS)).reshape(alpha.shape)
        if ctx.err is not None:   # LBA: |Σ_{n,h,w}(x − x_q)·∂L/∂x_q| / (N·H·W) per channel
            ctx.err.add_((x - y).mul_(g).sum((0, 2)).abs_().div_(x.shape[0] * x.shape[2]))
        return gx, galpha, None, None


def quantize_wgt(w, alpha, points, err=None):
    """Multi-bit weights: w (G·…) grouped along dim 0 into G = alpha.numel() groups (1 = layer-wise),
    points (G, 16) the level rows of each group's bits; `err` (G,), when given, accumulates LBA errors."""
    g = alpha.numel()
    return _WgtQuant.apply(w.reshape(g, -1), alpha.reshape(g, 1), points, err).view_as(w)


def quantize_act(x, alpha, bits, err=None):
    """Uniform unsigned activations: x (N, C, …) split into G = bits.numel() contiguous groups along dim 1
    (channels; 1 = layer-wise), one learnable α [1]; `err` (G,), when given, accumulates LBA errors."""
    g = bits.numel()
    qmax = (torch.pow(2, bits) - 1).to(x.dtype).view(1, g, 1)
    return _ActQuant.apply(x.reshape(x.shape[0], g, -1), alpha, qmax, err).view_as(x)


def quantize_8bit(x, bits=8):
    """The first/last layers' weights: mid-rise `bits` bits on ±max|x| (2^bits levels, no zero), identity STE;
    Qn = −2^(b−1)+0.5, Qp = 2^(b−1)−0.5 as the original ((x/m·Qp − Qn).round() + Qn)/Qp·m."""
    qn, qp = -2 ** (bits - 1) + 0.5, 2 ** (bits - 1) - 0.5
    m = x.detach().abs().max().clamp_min(torch.finfo(x.dtype).tiny)
    q = ((x / m * qp - qn).round() + qn) / qp * m
    return (q - x).detach() + x


class _MultiBitMixin:
    """Buffers, EMA clip, LBA bookkeeping and bit counting shared by QuantConv2d and QuantLinear."""

    def _init_quant(self, groups_wgt, groups_act, bit_wgt, bit_act, layerwise):
        if not 0 <= bit_wgt <= MAX_BIT or not 0 <= bit_act <= MAX_BIT:
            raise ValueError(f"initial bits must be in 0..{MAX_BIT}, got w{bit_wgt} a{bit_act}")
        self.layerwise = bool(layerwise)
        self.groups_wgt, self.groups_act = groups_wgt, groups_act
        self.ema_decay = EMA_DECAY
        dev = self.weight.device
        self.register_buffer('alpha_wgt', torch.full((groups_wgt,), 1.0, device=dev))
        self.register_parameter('alpha_act', nn.Parameter(torch.tensor([3.0], device=dev)))
        self.register_buffer('clip_wgt', torch.tensor(CLIP_W, device=dev))
        self.register_buffer('bit_wgt', torch.full((groups_wgt,), bit_wgt, dtype=torch.long, device=dev))
        self.register_buffer('bit_act', torch.full((groups_act,), bit_act, dtype=torch.long, device=dev))
        self.register_buffer('points_wgt', QUANT_BASES.to(dev).index_select(0, self.bit_wgt))
        # LBA error accumulators (not saved: zero at every epoch boundary) and their switch.
        self.register_buffer('w_err', torch.zeros(groups_wgt, device=dev), persistent=False)
        self.register_buffer('x_err', torch.zeros(groups_act, device=dev), persistent=False)
        self.collect = False
        self.init = False          # plain attribute, as the original: the first train forward resets alpha_wgt
        self.act_numel = None      # elements of one input sample (C·H·W), set by QuantTune's shape probe

    def update_alpha_wgt(self):
        """α_c ← CLIP_W[b_c]·mean|w_c| on the first train forward, then the EMA 0.01·new + 0.99·α_c."""
        with torch.no_grad():
            w = self.weight.reshape(self.groups_wgt, -1)
            cur = self.clip_wgt[self.bit_wgt] * w.abs().mean(1)
            if not self.init:
                self.alpha_wgt.copy_(cur)
                self.init = True
            else:
                self.alpha_wgt.copy_(cur * (1 - self.ema_decay) + self.ema_decay * self.alpha_wgt)

    def quantized_inputs(self, x):
        if self.training:
            self.update_alpha_wgt()
        on = self.collect and self.training and torch.is_grad_enabled()
        x_q = quantize_act(x, self.alpha_act, self.bit_act, self.x_err if on else None)
        w_q = quantize_wgt(self.weight, self.alpha_wgt, self.points_wgt, self.w_err if on else None)
        return x_q, w_q

    def update_quant_points(self):
        self.points_wgt = QUANT_BASES.to(self.bit_wgt.device).index_select(0, self.bit_wgt)

    def reset_err(self):
        self.w_err.zero_()
        self.x_err.zero_()

    @property
    def wgt_group_numel(self):
        return self.weight.numel() // self.groups_wgt

    @property
    def act_group_numel(self):
        if self.act_numel is None:
            raise RuntimeError("activation size unknown: build the layer through QuantTune (it probes input shapes)")
        return self.act_numel // self.groups_act

    def extra_repr(self):
        return (super().extra_repr() + f", groups_wgt={self.groups_wgt}, groups_act={self.groups_act}"
                + (", layerwise" if self.layerwise else ""))


class QuantConv2d(_MultiBitMixin, nn.Conv2d):
    """Conv2d on quantized inputs and weights; channel-wise (per output / input channel) or layer-wise bits."""

    def __init__(self, in_channels, out_channels, kernel_size, bit_wgt=4, bit_act=4, layerwise=False, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.k_size = self.kernel_size[0]
        self._init_quant(1 if layerwise else out_channels, 1 if layerwise else in_channels, bit_wgt, bit_act,
                         layerwise)

    def forward(self, x):
        x_q, w_q = self.quantized_inputs(x)
        return self._conv_forward(x_q, w_q, self.bias)


class QuantLinear(_MultiBitMixin, nn.Linear):
    """Linear on quantized inputs and weights. Weight groups: `groups_wgt` contiguous blocks of output rows
    (default one per row), activation groups: `groups_act` contiguous blocks of input features (default one
    per feature); layer-wise: one of each."""

    def __init__(self, in_features, out_features, groups_wgt=None, groups_act=None, bit_wgt=4, bit_act=4,
                 layerwise=False, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        gw = 1 if layerwise else (groups_wgt or out_features)
        ga = 1 if layerwise else (groups_act or in_features)
        if out_features % gw or in_features % ga:
            raise ValueError(f"QuantLinear({in_features}, {out_features}): groups_wgt {gw} must divide "
                             f"{out_features} and groups_act {ga} must divide {in_features}")
        self._init_quant(gw, ga, bit_wgt, bit_act, layerwise)
        self.act_numel = in_features

    def forward(self, x):
        lead = x.shape[:-1]
        x_q, w_q = self.quantized_inputs(x.reshape(-1, self.in_features))
        return F.linear(x_q, w_q, self.bias).view(*lead, self.out_features)


class FirstConv2d(nn.Conv2d):
    """The first layer: 8-bit weights (quantize_8bit), unquantized input image."""

    def __init__(self, in_channels, out_channels, kernel_size, bit_wgt=8, bit_act=8, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.bit_wgt_fixed = bit_wgt     # any width, as the original (the swap always builds 8)

    def forward(self, x):
        return self._conv_forward(x, quantize_8bit(self.weight, self.bit_wgt_fixed), self.bias)


class LastLinear(nn.Linear):
    """The last layer: 8-bit weights and 8-bit activations round(x/max|x|·255)/255·max|x| (per batch, no clamp,
    identity STE)."""

    def __init__(self, in_features, out_features, bit_wgt=8, bit_act=8, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.bit_wgt_fixed = bit_wgt     # any widths, as the original (the swap always builds 8/8)
        self.Qp_A = 2 ** bit_act - 1

    def forward(self, x):
        m = x.detach().abs().max().clamp_min(torch.finfo(x.dtype).tiny)
        x_q = (x / m * self.Qp_A).round() / self.Qp_A * m
        x_q = (x_q - x).detach() + x
        return F.linear(x_q, quantize_8bit(self.weight, self.bit_wgt_fixed), self.bias)
