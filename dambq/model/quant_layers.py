"""DMBQ layers: the multi-bit weight quantizer, the uniform activation quantizer and the 8-bit first/last layers.

Notation (paper §3, original model/quant_layers.py):
  weights of output channel c at b_c bits are projected onto the 2^4 signed sums  Σ_i s_i·ALPHA_W[b_c][i]
  (s ∈ {−1,+1}^4) after clipping to ±α_c, α_c a running (EMA) multiple CLIP_W[b_c] of mean|w_c|;
  activations of input channel c are rounded to 2^{b_c}−1 uniform steps on [0, α], α learnable (LSQ-like).

Both quantizers are the original's expressions in the original's order, differentiated by autograd, so that
training is bitwise the original's; the only custom gradient is clamp's (`_ClampSTE`: passed on the closed
interval, as on the torch the original ran on). While a layer's `collect` is on, gradient hooks on x_q and w_q
accumulate the loss-aware quantization error of each group (|Σ_g (x − x_q)·∂L/∂x_q| / |g|, paper Eq. 9) that
LBA (quant_tune.py) ranks, with the original's compute_residual operations.
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


class _ClampSTE(torch.autograd.Function):
    """clamp(x, lo, hi) whose gradient is passed where lo ≤ x ≤ hi (both ends included) and is +0 outside:
    clamp's gradient on the torch the original ran on. torch ≥ 2.14 gives 0 at the two ends, which matters here:
    post-ReLU inputs are exactly 0 in large numbers, and w = ±(α+ε) can occur."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        out = x.clamp(lo, hi)
        # `out == x` is lo <= x <= hi for every float (±0, ±inf, NaN, subnormals): clamp returns x exactly inside
        # and an end that differs from x outside; one pass over memory instead of the three of `>=`, `<=`, `&`
        ctx.save_for_backward(out == x)
        return out

    @staticmethod
    def backward(ctx, g):
        inside, = ctx.saved_tensors
        return torch.where(inside, g, torch.zeros((), dtype=g.dtype, device=g.device)), None, None


def clamp_ste(x, lo, hi):
    return _ClampSTE.apply(x, lo, hi)


def quantize_wgt(data, clip_scale, proj_set, layerwise=False):
    """Multi-bit weights, the original's expression and order: c = clamp(w/(α+ε), −1, 1), y = ((P(c) − c) + c)·α,
    with autograd's gradients (∂y/∂w = ((g·α)·1[|c| ≤ 1])/(α+ε); α gets one too when it requires grad).

    data (G, …) holds G groups along dim 0 (channel-wise: one per row of proj_set) or any shape when layerwise
    (proj_set one row); clip_scale broadcasts against data (the original passes alpha_wgt.view(-1, 1, 1, 1));
    proj_set (G, 16) the level rows of each group's bits."""
    x = clamp_ste(data / (clip_scale + EPS), -1, 1)
    rows = proj_set.shape[0]
    if layerwise and rows != 1:
        raise ValueError(f"layer-wise weights need one level row, got {rows}")
    if not layerwise and data.shape[0] != rows:
        raise ValueError(f"channel-wise weights need one level row per group: {data.shape[0]} groups, {rows} rows")
    xhard = nearest_level(x.detach().reshape(rows, -1), proj_set).view(x.shape)
    y = (xhard - x).detach() + x
    return y * clip_scale


def quantize_act(data, clip_scale, bitwidth):
    """Uniform unsigned activations, the original's expression and order: Q = 2^b − 1 (integer),
    y = (round(clamp(x/(α+ε), 0, 1)·Q)·α)/(Q+ε), round with an identity gradient, autograd for x and α.
    bitwidth (integer) and clip_scale broadcast against data (the original: views (1, C, 1, 1) and (1, 1, 1, 1))."""
    quant_scale = 2 ** bitwidth - 1
    x = clamp_ste(data / (clip_scale + EPS), 0, 1) * quant_scale
    y = round_pass(x)
    return y * clip_scale / (quant_scale + EPS)


def lba_error_hook(err, data, quantized, dims, numel):
    """A gradient hook for `quantized` that adds |Σ_dims (data − quantized)·∂L/∂quantized| / numel to `err`
    (paper Eq. 9): the original's compute_residual (residual from the forward, retained gradient), with the
    same operations in the same order, evaluated in backward instead of after optimizer.step()."""
    data, quantized = data.detach(), quantized.detach()

    def hook(grad):
        res = data - quantized
        err.add_(res.mul(grad).sum(dim=dims).abs().div(numel).view(-1))
    return hook


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

    def collect_errors(self, x, x_q, w, w_q):
        """While `collect` is on (training, with grad): LBA error hooks on x_q (x viewed (N, G_act, …)) and w_q
        (w viewed (G_wgt, …)), summing over everything but the group dimension (over everything layer-wise)."""
        if not (self.collect and self.training and torch.is_grad_enabled()):
            return
        for err, data, q, groups, dims in (
                (self.x_err, x, x_q, self.groups_act, (0,) + tuple(range(2, x.dim()))),
                (self.w_err, w, w_q, self.groups_wgt, tuple(range(1, w.dim())))):
            if q.requires_grad:
                q.register_hook(lba_error_hook(err, data, q, None if self.layerwise else dims,
                                               data.numel() / groups))

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
        if self.training:
            self.update_alpha_wgt()
        x_q = quantize_act(x, self.alpha_act.view(1, -1, 1, 1), self.bit_act.view(1, -1, 1, 1))
        w_q = quantize_wgt(self.weight, self.alpha_wgt.view(-1, 1, 1, 1), self.points_wgt, self.layerwise)
        self.collect_errors(x, x_q, self.weight, w_q)
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
        x = x.reshape(-1, self.in_features)
        if self.training:
            self.update_alpha_wgt()
        x_r = x.view(x.shape[0], self.groups_act, -1)
        w_r = self.weight.view(self.groups_wgt, -1, self.in_features)
        x_q = quantize_act(x_r, self.alpha_act, self.bit_act.view(1, -1, 1))
        w_q = quantize_wgt(w_r, self.alpha_wgt.view(-1, 1, 1), self.points_wgt, self.layerwise)
        self.collect_errors(x_r, x_q, w_r, w_q)
        return F.linear(x_q.view_as(x), w_q.view_as(self.weight), self.bias).view(*lead, self.out_features)


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
