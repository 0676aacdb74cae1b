"""AlignQ's quantizers (seed era, tinganchen/AlignQ commit a75a7bd) and the ADMM correlation term.

uniform_q_k(v) = round(v * n) / n, n = 2^k - 1, round half to even, identity straight-through gradient;
k = 1 -> sign(v), k = 32 -> v.
Weights:      w_hat = 2 Phi((w - mu) / sigma) - 1, mu = mean(W), sigma = std(W) (unbiased, not detached),
              w_q = uniform_q_k(w_hat): 2^(k+1) - 1 levels j/n, j in [-n, n].
Activations:  a_hat = R (2 Phi(x) - 1) with the standard normal Phi, a_q = uniform_q_k(a_hat): 2Rn + 1 levels.
The gradient reaches w, mu, sigma and x through Phi, computed with the float operations of the original's
torch.distributions.Normal(m, s).cdf(.) * 2 - 1 (which would validate its arguments and raise on NaN on modern
torch).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable



def uniform_q(v, k):
    """uniform_q_k with the straight-through estimator written out: forward rounds, backward is identity."""
    if k == 32:
        return v
    if k == 1:
        hard = torch.sign(v)
    else:
        n = 2.0 ** k - 1
        hard = torch.round(v * n) / n          # torch.round rounds half to even
    return hard.detach() + (v - v.detach())    # value exactly `hard`, gradient exactly 1


def std_normal_cdf2m1(z):
    """2 Phi(z) - 1 of a standardised z as torch.distributions' cdf computes it: 0.5 (1 + erf(z / sqrt 2)) * 2 - 1.
    erf(z / sqrt 2) is the same function but differs in the last bit."""
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) * 2 - 1


def normal_cdf2m1(x, m, s):
    """2 Phi((x - m) / s) - 1 with the float operations of the original's `Normal(m, s).cdf(x) * 2 - 1`
    (torch.distributions standardises as (x - m) * s^-1), without its argument validation, which raises on NaN
    on modern torch."""
    return std_normal_cdf2m1((x - m) * s.reciprocal())


def weight_cdf(w):
    """w_hat = 2 Phi((w - mean(w)) / std(w)) - 1 over the whole tensor (unbiased std, gradients kept through mu
    and sigma), as the original's cdf(torch.mean(x), torch.std(x), 'w')."""
    return normal_cdf2m1(w, torch.mean(w), torch.std(w))


def act_cdf(x, act_range):
    """a_hat = (2 Phi(x) - 1) R with the fixed standard normal. The original's m = zeros(1), s = ones(1) are left
    out: `x - (+0)` and `x * 1` return x for every float (-0, inf and NaN included) and their backward passes the
    gradient through as `g` and `g * 1`, so values and gradients are the same bits, two forward passes and one
    backward pass fewer per activation."""
    return std_normal_cdf2m1(x) * act_range


class WeightQuant(nn.Module):
    """The original's weight_quantize_fn: CDF transform then uniform_q (identity at 32 bits)."""

    def __init__(self, w_bit):
        super().__init__()
        self.w_bit = w_bit

    def forward(self, w):
        if self.w_bit == 32:
            return w
        return uniform_q(weight_cdf(w), self.w_bit)

    def extra_repr(self):
        return f"w_bit={self.w_bit}"


class QConv2d(nn.Conv2d):
    """Conv2d whose weight goes through `quantize_fn` each forward (state-dict keys as nn.Conv2d).

    Evaluation without autograd reuses the quantized weight while the weight is unchanged (its version
    counter and storage are the cache key: optimizer steps and load_state_dict bump the version)."""

    def __init__(self, *args, w_bit=32, weight_quant=None, **kw):
        super().__init__(*args, **kw)
        self.w_bit = w_bit
        self.quantize_fn = weight_quant if weight_quant is not None else WeightQuant(w_bit)
        self._cache, self._cache_key = None, None

    def quantized_weight(self):
        if self.training or torch.is_grad_enabled():
            self._cache = self._cache_key = None
            return self.quantize_fn(self.weight)
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device,
               tuple(p._version for p in self.quantize_fn.parameters()))
        if key != self._cache_key:
            self._cache, self._cache_key = self.quantize_fn(self.weight), key
        return self._cache

    def forward(self, x):
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


def _standardised(x, eps):
    """(centred, std, denominator, standardised): X - mean_0 (the mean before the std, as the original's
    expression), the unbiased std_0, std_0 + eps, and their quotient."""
    centred = x - torch.mean(x, dim=0)
    std = torch.std(x, dim=0)
    den = std + eps if eps else std
    return centred, std, den, centred / den


def _standardise(x, eps):
    return _standardised(x, eps)[3]


class _Corr(torch.autograd.Function):
    """corr(x, x) of the original with one standardisation: Xt is computed once (the original computes the same
    bits twice), and the backward runs autograd's formulas for each of the original's two branches in the order
    autograd runs them, so the gradient is the same sum of the same six terms in the same order:

      Xt Yt^T / F          g <- g / F; Yt's gradient g^T Xt first, then Xt's g Yt (torch's mm backward)
      per branch (Yt, Xt)  div: gc = gz / den, gden = sum_0(-gz * (Xt / den)); std: gvar = gden / (2 std), 0
                           where std = 0; the terms, in autograd's order: (2 / (N - 1)) gvar (X - mean_0)
                           [the std's], gc [the subtraction's], sum_0(-gc) / N [the mean's]

    X - mean_0 and Xt / den are what autograd recomputes in the backward (std's and div's formulas); here they are
    the forward's tensors, the same bits. tests/test_alignq_faithful.py compares it with the original's
    expression bit for bit; the side-by-side test with the original over 20 iterations covers it in training."""

    @staticmethod
    def forward(ctx, x, eps):
        centred, std, den, z = _standardised(x, eps)
        ctx.save_for_backward(centred, std, den, z)
        return torch.matmul(z, torch.transpose(z, 0, 1)) / z.shape[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        centred, std, den, z = ctx.saved_tensors
        n = z.shape[0]
        scale = 2.0 / (n - 1) if n > 1 else math.inf     # torch's 2 / (N - correction) in double: inf at N = 1
        g = g / z.shape[1]
        gx = None
        for gz in (g.t().mm(z), g.mm(z)):        # the second standardisation's branch runs first
            gc = gz / den
            gden = ((-gz) * (z / den)).sum(0, keepdim=True).view(-1)
            gvar = (gden / (std * 2)).masked_fill_(std == 0, 0)
            for term in ((gvar.unsqueeze(0) * scale) * centred, gc,
                         (-gc).sum(0, keepdim=True).view(-1).unsqueeze(0).expand(n, -1) / n):
                gx = term if gx is None else gx + term
        return gx, None


def corr(x, eps=0.0):
    """N x N sample correlation of a flattened batch: Xt Yt^T / F, Xt = Yt = (X - mean_0) / (std_0 + eps), std
    unbiased. The values and gradients of the original's corr(x, x), which standardises twice (two autograd
    branches, whose backward sum is part of the bitwise trajectory), standardising once (_Corr)."""
    return _Corr.apply(x, eps)


class ADMM(nn.Module):
    """Correlation preservation (paper Sec. 3.3): Z (`alterD`) and Gamma (`gamma`), dim x dim, init U[0, 1).

    loss(D) = mu mean|Z| + rho/2 sqrt(mean((D - Z)^2)) + mean(Gamma |D - Z|), Z and Gamma sliced to D's size.
    `update()` (after the optimizer step) does the Frobenius group shrinkage of Z and the dual step on Gamma.
    """

    def __init__(self, dim, mu=0.2, rho=0.3):
        super().__init__()
        self.dim, self.mu, self.rho = dim, mu, rho
        self.alterD = nn.Parameter(torch.rand(dim, dim))
        self.gamma = nn.Parameter(torch.rand(dim, dim))
        self.D = None       # the last forward's discrepancy (detached), used by update()

    def forward(self, D):
        # a batch larger than dim (the original crashes) keeps the top-left dim x dim block of its correlation,
        # which is taken over the whole batch
        n = min(D.shape[0], self.dim)
        D = D[:n, :n]
        Z, G = self.alterD[:n, :n], self.gamma[:n, :n]
        self.D = D.detach()
        loss_reg = self.mu * torch.mean(torch.abs(Z))
        loss_constraint = self.rho / 2 * torch.mean((D - Z) ** 2) ** 0.5
        loss_relax = torch.mean(G * torch.abs(D - Z))
        return loss_reg + loss_constraint + loss_relax

    @torch.no_grad()
    def update(self):
        """Z <- (1 - (mu/rho)/||V||_F) V if ||V||_F > mu/rho else 0, V = D_pad + Gamma/rho; Gamma += rho (D_pad - Z)."""
        if self.D is None:
            return
        D = torch.zeros_like(self.gamma)
        n = self.D.shape[0]
        D[:n, :n] = self.D                   # a smaller (last) batch is zero-padded, as the original
        V = D + 1 / self.rho * self.gamma    # the original's float order
        norm = torch.norm(V, 2)              # Frobenius norm as the original's call; no host sync
        t = self.mu / self.rho
        # zeros (not 0 * V, which is -0 where V < 0) below the threshold, as the original's zeros_like
        self.alterD.copy_(torch.where(norm > t, (1 - t / norm) * V, torch.zeros_like(V)))
        self.gamma.add_(self.rho * (D - self.alterD))


class ActQuant(nn.Module):
    """The original's activation_quantize_fn, optionally with an ADMM correlation term.

    abit = 32: identity unless stage == 'align' (then the unrounded a_hat). With `admm`, a training forward
    with a batch of at least 2 stores `self.loss` = ADMM(corr(a_hat) - corr(x)); otherwise `self.loss` = None.
    """

    def __init__(self, a_bit, stage="second", act_range=2.0, admm_dim=0, corr_eps=0.0):
        super().__init__()
        self.a_bit, self.stage, self.act_range, self.corr_eps = a_bit, stage, act_range, corr_eps
        self.admm = ADMM(admm_dim) if admm_dim and a_bit < 32 else None
        self.loss = None
        self._order = 0

    _clock = 0    # forward order of the ADMM terms, for the original's summation order

    def forward(self, x):
        self.loss = None
        if self.a_bit == 32 and self.stage != "align":
            return x
        a_hat = act_cdf(x, self.act_range)
        q = uniform_q(a_hat, self.a_bit)     # before the ADMM term, as the original (autograd's order)
        if self.admm is not None and self.training and x.shape[0] >= 2:
            n = x.shape[0]
            x_feat, a_feat = x.view(n, -1), a_hat.view(n, -1)
            corr_x = corr(x_feat, self.corr_eps)     # the original's order: input first
            D = corr(a_feat, self.corr_eps) - corr_x
            self.loss = self.admm(D)
            ActQuant._clock += 1
            self._order = ActQuant._clock
        elif self.admm is not None and self.training:
            self.admm.D = None    # a batch of one: no correlation, and no stale D for the next update
        return q

    def extra_repr(self):
        return f"a_bit={self.a_bit}, stage={self.stage!r}, R={self.act_range}"


def admm_modules(model):
    return [m for m in model.modules() if isinstance(m, ADMM)]


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _children(module):
    for c in module.children():
        if isinstance(c, _CONTAINERS):
            yield from _children(c)
        else:
            yield c


def _tree_loss(module):
    """(sum, first forward index) of the ADMM terms under `module`: each block sums its own terms from 0 in the
    order its forward produced them, and its parent adds the block's sum as one term, as the original's
    `trans_loss = 0.; trans_loss += loss` in every block and in the network (containers are not blocks)."""
    items = []
    for c in _children(module):
        if isinstance(c, ActQuant):
            if c.loss is not None:
                items.append((c._order, c.loss))
        else:
            sub = _tree_loss(c)
            if sub is not None:
                items.append((sub[0], sub[1]))
    if not items:
        return None
    items.sort(key=lambda t: t[0])
    total = 0.
    for _, v in items:
        total = total + v
    return items[0][0], total


def admm_loss(model):
    """Sum of the ADMM terms stored by the last forward (a 0-d tensor; None when there are none), summed in the
    original's order (see _tree_loss); a model whose forward is itself an ActQuant gives its term."""
    if isinstance(model, ActQuant):
        return model.loss
    sub = _tree_loss(model)
    return None if sub is None else sub[1]


def admm_update(model):
    for m in admm_modules(model):
        m.update()


def admm_param_names(model):
    return {n for n, _ in model.named_parameters() if n.endswith(".alterD") or n.endswith(".gamma")}
