"""The basis step's search (Qu et al., CVPR 2020, Sec. 3.2): for every weight, the code (row of the bit table)
whose value sum_j code_j * alpha_j is nearest to the target, ties to the lowest code index (torch.argmin).

The searches of the reference path: the original's dense form and the sorted search that gives the same codes
in O(n) memory per group. The branch-free search of the fast path (alq/fastpath.py) and the compiled one
(alq/native.py) give the same codes too (tests/test_alq_core.py, tests/test_alq_speed.py).
"""
import torch


def representable_values(alpha, bit_table):
    """The 2^M values of every group: (..., M, 1) coordinates -> (..., 2^M, 1), as the original computes them."""
    M = bit_table.size(1)
    return torch.matmul(bit_table.view((1,) * (alpha.dim() - 2) + (-1, M)).float(), alpha)


def nearest_code_dense(target, alpha, bit_table):
    """Straightforward form: materialises |target - value| for all 2^M values (..., 2^M, n); returns codes (..., n)."""
    values = representable_values(alpha, bit_table)
    return torch.argmin(torch.abs(target.unsqueeze(-2) - values), dim=-2)


def nearest_code(target, alpha, bit_table):
    """Same result as `nearest_code_dense` (same float distances, same lowest-index tie-breaking) from a
    sorted search: per group sort the 2^M values, collapse equal values to their lowest code, binary-search
    each target and compare its two neighbours. Memory O(n) per group instead of O(n * 2^M).

    A minimiser further away than the neighbours needs two distinct values whose float distances to the
    target round to the same number, which requires a gap between them of at most ulp(|t| + |v|); groups
    with a gap that small (|gap| <= 2^-22 (max|t| + max|v|)) are recomputed with the dense form.

    target (..., n) float, alpha (..., M, 1) float -> codes (..., n) int64.
    """
    lead, n = target.shape[:-1], target.shape[-1]
    C = bit_table.size(0)
    values = representable_values(alpha, bit_table).reshape(-1, C)  # (G, C)
    t = target.reshape(-1, n).contiguous()
    G = values.size(0)
    sv, perm = torch.sort(values, dim=1, stable=True)  # equal values keep ascending code order
    # collapse runs of equal values to their first entry (the lowest code); the rest go to +inf
    start = torch.ones_like(sv, dtype=torch.bool)
    start[:, 1:] = sv[:, 1:] != sv[:, :-1]
    inf = float("inf")
    uv, order = torch.sort(torch.where(start, sv, inf), dim=1, stable=True)
    ucode = torch.gather(perm, 1, order)
    nuniq = start.sum(1, keepdim=True)
    C = max(int(nuniq.max()), 2)  # pruned coordinates collapse many values: search only the unique ones
    uv, ucode = uv[:, :C].contiguous(), ucode[:, :C].contiguous()
    pos = torch.searchsorted(uv, t)  # (G, n): index of the first unique value >= t
    base = torch.arange(G, device=t.device).unsqueeze(1) * C
    lo = base + (pos - 1).clamp_min(0)
    hi = base + pos.clamp_max(C - 1)
    uvf, ucf = uv.reshape(-1), ucode.reshape(-1)
    d_lo = torch.where(pos > 0, torch.abs(t - uvf.take(lo)), inf)
    d_hi = torch.where(pos < nuniq, torch.abs(t - uvf.take(hi)), inf)
    c_lo, c_hi = ucf.take(lo), ucf.take(hi)
    code = torch.where(d_lo < d_hi, c_lo, torch.where(d_hi < d_lo, c_hi, torch.minimum(c_lo, c_hi)))
    # groups where float rounding could make a farther value tie: recompute densely
    idx = torch.arange(C - 1, device=t.device).unsqueeze(0)
    gaps = torch.where(idx + 1 < nuniq, uv[:, 1:] - uv[:, :-1], inf).amin(1)
    finite = torch.where(torch.arange(C, device=t.device).unsqueeze(0) < nuniq, uv.abs(), 0.0).amax(1)
    scale = t.abs().amax(1) + finite
    risky = (gaps <= torch.clamp(scale * 2.0 ** -22, min=2.0 ** -126)) | ~torch.isfinite(scale)
    if risky.any():
        g = risky.nonzero().view(-1)
        code[g] = torch.argmin(torch.abs(t[g].unsqueeze(1) - values[g].unsqueeze(2)), dim=1)
    return code.reshape(*lead, n)
