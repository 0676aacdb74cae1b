"""AlignQ's quantizers (seed era, tinganchen/AlignQ commit a75a7bd) and the ADMM correlation term.

uniform_q_k(v) = round(v * n) / n, n = 2^k - 1, round half to even, identity straight-through gradient;
k = 1 -> sign(v), k = 32 -> v.
Weights:      w_hat = 2 Phi((w - mu) / sigma) - 1, mu = mean(W), sigma = std(W) (unbiased, not detached),
              w_q = uniform_q_k(w_hat): 2^(k+1) - 1 levels j/n, j in [-n, n].
Activations:  a_hat = R (2 Phi(x) - 1) with the standard normal Phi, a_q = uniform_q_k(a_hat): 2Rn + 1 levels.
The gradient reaches w, mu, sigma and x analytically through Phi, written with torch.erf (2 Phi(z) - 1 =
erf(z / sqrt 2); autograd gives 2 phi(z) dz); torch.distributions.Normal would validate its arguments and raise
on NaN on modern torch.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SQRT1_2 = 1.0 / math.sqrt(2.0)


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


def weight_cdf(w):
    """w_hat = 2 Phi((w - mean(w)) / std(w)) - 1 = erf((w - mu) / (sigma sqrt 2)) over the whole tensor (unbiased
    std, gradients kept through mu and sigma)."""
    return torch.erf((w - w.mean()) * (SQRT1_2 / w.std()))


def act_cdf(x, act_range):
    """a_hat = R (2 Phi(x) - 1) = R erf(x / sqrt 2) with the fixed standard normal."""
    return act_range * torch.erf(x * SQRT1_2)


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


def corr(x, eps=0.0):
    """N x N sample correlation of a flattened batch: Xt Xt^T / F, Xt = (X - mean_0) / (std_0 + eps), std unbiased."""
    xt = (x - x.mean(dim=0)) / (x.std(dim=0) + eps)
    return xt @ xt.t() / xt.shape[1]


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
        n = min(D.shape[0], self.dim)        # a batch larger than dim (not in the original) uses its first dim rows
        D = D[:n, :n]
        Z, G = self.alterD[:n, :n], self.gamma[:n, :n]
        self.D = D.detach()
        loss_reg = self.mu * Z.abs().mean()
        loss_constraint = self.rho / 2 * ((D - Z) ** 2).mean().sqrt()
        loss_relax = (G * (D - Z).abs()).mean()
        return loss_reg + loss_constraint + loss_relax

    @torch.no_grad()
    def update(self):
        """Z <- (1 - (mu/rho)/||V||_F) V if ||V||_F > mu/rho else 0, V = D_pad + Gamma/rho; Gamma += rho (D_pad - Z)."""
        if self.D is None:
            return
        D = torch.zeros_like(self.gamma)
        n = self.D.shape[0]
        D[:n, :n] = self.D                   # a smaller (last) batch is zero-padded, as the original
        V = D + self.gamma / self.rho
        norm = torch.linalg.vector_norm(V)   # Frobenius norm, no host sync
        t = self.mu / self.rho
        scale = torch.where(norm > t, 1.0 - t / norm, torch.zeros_like(norm))
        self.alterD.copy_(scale * V)
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

    def forward(self, x):
        self.loss = None
        if self.a_bit == 32 and self.stage != "align":
            return x
        a_hat = act_cdf(x, self.act_range)
        if self.admm is not None and self.training and x.shape[0] >= 2:
            n = x.shape[0]
            D = corr(a_hat.reshape(n, -1), self.corr_eps) - corr(x.reshape(n, -1), self.corr_eps)
            self.loss = self.admm(D)
        return uniform_q(a_hat, self.a_bit)

    def extra_repr(self):
        return f"a_bit={self.a_bit}, stage={self.stage!r}, R={self.act_range}"


def admm_modules(model):
    return [m for m in model.modules() if isinstance(m, ADMM)]


def admm_loss(model):
    """Sum of the ADMM terms stored by the last forward (a 0-d tensor; 0 when there are none)."""
    losses = [m.loss for m in model.modules() if isinstance(m, ActQuant) and m.loss is not None]
    return torch.stack(losses).sum() if losses else None


def admm_update(model):
    for m in admm_modules(model):
        m.update()


def admm_param_names(model):
    return {n for n, _ in model.named_parameters() if n.endswith(".alterD") or n.endswith(".gamma")}
