"""APoT level sets Q^a(1, B) and the nearest-level projection, shared by both quantizer generations.

`build_power_value(B)` reproduces the original float32 values AND their element order (the original
takes `list(set(sums))`, so the unsorted set order decides argmin ties). `nearest_level(x, levels)`
returns exactly what the original's `argmin |x - level|` returns, without a (levels x elements) tensor.
`LevelProjector(levels)` is what the quantizers use: the same bits, tables built once per module, and no
host synchronisation or data-dependent branch per call (`nearest_level` reads the levels and may fall back
to the argmin for a few elements, which syncs).
"""
from fractions import Fraction

import numpy as np
import torch

from common.errors import UserError

# Additive bases (paper Eq. 6): each term p_i runs over {0} U {2^-e : e in exps}; the exponent lists
# are in the order the original appends them, because insertion order can decide set() order.
_ADDITIVE_EXPONENTS = {
    2: ([1, 2, 3], [], []),
    3: ([1, 2, 4], [3], []),
    4: ([1, 3, 5], [2, 4, 6], []),
    5: ([1, 3, 6], [2, 4, 7], [5]),
    6: ([1, 4, 7], [2, 5, 8], [3, 6, 9]),
}
_POT_MAX_B = 6  # PoT has 2^B - 1 powers; 2^-63 is still a normal float32


def build_power_value(B=2, additive=True):
    """Levels of Q^a(1, B) as a float32 tensor in the original's (unsorted) order, max level 1.

    additive=True: APoT with B in 2..6 (2^B levels). additive=False: PoT {0} U {2^-k}, B in 1..6.
    """
    if isinstance(B, bool) or not isinstance(B, int):
        raise UserError(f"APoT level set needs an integer bit-width B, got {B!r}")
    if additive:
        if B not in _ADDITIVE_EXPONENTS:
            raise UserError(f"additive APoT levels exist for B = 2..6 only, got B={B} "
                            f"(weights at b bits use B=b-1, activations B=b; use --bit 2..6 or 32)")
        bases = [[0.0] + [2.0 ** -e for e in exps] for exps in _ADDITIVE_EXPONENTS[B]]
    else:
        if not 1 <= B <= _POT_MAX_B:
            raise UserError(f"PoT levels exist for B = 1..{_POT_MAX_B} here, got B={B}")
        bases = [[0.0] + [2.0 ** -(k + 1) for k in range(2 ** B - 1)], [], []]
    a, b, c = ([0.0] if not base else base for base in bases)
    sums = [x + y + z for x in a for y in b for z in c]    # same nesting order as the original
    values = torch.tensor(list(set(sums)), dtype=torch.float32)
    return values.mul(1.0 / values.max())                  # float32 reciprocal, then multiply


def nearest_level_argmin(x, levels):
    """Reference: the original's `argmin_j |x - l_j|` (first index wins ties). Memory O(levels x numel)."""
    levels = levels.to(dtype=x.dtype, device=x.device)
    flat = x.reshape(-1)
    idx = (flat.unsqueeze(0) - levels.unsqueeze(1)).abs().min(dim=0)[1]
    return levels[idx].view(x.shape)


def _sorted_levels(levels):
    """Distinct levels ascending, each with the smallest original index among equal values."""
    vals, order = torch.sort(levels, stable=True)            # equal values keep original order
    keep = torch.ones_like(vals, dtype=torch.bool)
    keep[1:] = vals[1:] != vals[:-1]                          # first of each run = smallest index
    return vals[keep], order[keep]


_FLOAT = {torch.float32: (np.float32, np.int32), torch.float64: (np.float64, np.int64)}


class _FloatLine:
    """The floats of one dtype as consecutive integers (order-preserving; -0.0 and +0.0 share 0)."""

    def __init__(self, ftype, itype):
        self.ftype, self.itype = ftype, itype
        self.sign = 1 << (8 * np.dtype(itype).itemsize - 1)

    def key(self, v):
        b = int(np.array(v, dtype=self.ftype).view(self.itype))
        return b if b >= 0 else -(b & (self.sign - 1))

    def value(self, k):
        b = k if k >= 0 else (-k) | self.sign
        return np.array(b - 2 * self.sign if b >= self.sign else b, dtype=self.itype).view(self.ftype)[()]


class _LevelTable:
    """Exact decision boundaries of the argmin for one level set (in its original order) and dtype.

    Between neighbours lo < hi the argmin picks hi exactly for x >= T, a single float threshold: the
    rounded distance |x - lo| is non-decreasing and |x - hi| non-increasing in x, so "hi strictly
    nearer, or equally near and first in the original order" is an up-set of [lo, hi]. T is found by
    bisection over the floats of [lo, hi]. The table is valid only if no level beyond the two
    neighbours can tie the nearest one for x inside [min, max] (`safe`), which holds when every pair
    of adjacent gaps g, g' satisfies g, g' >= 4 ulp(g + g'); otherwise callers take the general path.
    """

    def __init__(self, levels_cpu):
        ftype, itype = _FLOAT[levels_cpu.dtype]
        vals, orig = _sorted_levels(levels_cpu)
        self.n, self.vals = vals.numel(), vals
        v, o = vals.numpy().astype(ftype), orig.tolist()
        self.safe = self.n >= 2 and self._safe(v, ftype)
        if not self.safe:
            return
        line = _FloatLine(ftype, itype)
        thresholds = []
        for i in range(self.n - 1):
            lo_v, hi_v = v[i], v[i + 1]

            def pick_hi(x):
                d_lo, d_hi = abs(x - lo_v), abs(x - hi_v)          # numpy scalars: IEEE in ftype
                return d_hi < d_lo or (d_hi == d_lo and o[i + 1] < o[i])
            lo_k, hi_k = line.key(lo_v), line.key(hi_v)             # pick_hi(lo) False, pick_hi(hi) True
            while hi_k - lo_k > 1:
                mid = lo_k + (hi_k - lo_k) // 2
                if pick_hi(line.value(mid)):
                    hi_k = mid
                else:
                    lo_k = mid
            thresholds.append(line.value(hi_k))
        top = np.nextafter(v[-1], ftype(np.inf))
        # bucketize(x, bounds, right=True): 0 below min, n+1 above max or NaN, else 1 + chosen index
        self.bounds = torch.from_numpy(np.array([v[0]] + thresholds + [top], dtype=ftype))
        self.padded = torch.cat([vals[:1], vals, vals[-1:]])
        self._on = {}

    @staticmethod
    def _safe(v, ftype):
        if not np.all(np.isfinite(v)):
            return False
        g = [Fraction(float(b)) - Fraction(float(a)) for a, b in zip(v[:-1], v[1:])]
        for g1, g2 in zip(g[:-1], g[1:]):
            ulp = Fraction(float(np.spacing(ftype(float(g1 + g2)))))
            if min(g1, g2) < 4 * ulp:
                return False
        return True

    def on(self, device):
        if device not in self._on:
            self._on[device] = (self.bounds.to(device), self.padded.to(device))
        return self._on[device]


_TABLES = {}      # (level values, dtype) -> _LevelTable, for the generic `nearest_level` only


def _table(levels):
    cpu = levels.detach().cpu()
    key = (tuple(cpu.tolist()), cpu.dtype)
    if key not in _TABLES:
        if len(_TABLES) > 256:
            _TABLES.clear()
        _TABLES[key] = _LevelTable(cpu)
    return _TABLES[key]


@torch.no_grad()
def nearest_level(x, levels):
    """Nearest level for every element of x, identical (bit for bit) to `nearest_level_argmin`.

    The levels are sorted once into exact float decision boundaries (`_LevelTable`), so each element
    costs one `torch.bucketize` and one gather, with no (levels x elements) tensor. Elements outside
    [min level, max level] (where rounded distances to several levels can tie), NaN, and level sets or
    dtypes the table does not cover go through the neighbour comparison / the reference argmin.
    Returns values without grad; callers apply the straight-through estimator.
    """
    levels = levels.to(dtype=x.dtype, device=x.device)
    if x.dtype not in _FLOAT:
        return _nearest_level_neighbours(x, levels)
    table = _table(levels)
    if not table.safe:
        return _nearest_level_neighbours(x, levels)
    bounds, padded = table.on(x.device)
    flat = x.reshape(-1)
    k = torch.bucketize(flat, bounds, right=True)
    out = padded.take(k)                                     # take: the fastest gather from a tiny table
    if flat.numel():
        kmin, kmax = torch.aminmax(k)
        if int(kmin) == 0 or int(kmax) == table.n + 1:
            sel = ((k == 0) | (k == table.n + 1)).nonzero().squeeze(1)
            out[sel] = nearest_level_argmin(flat[sel], levels)
    return out.view(x.shape)


@torch.no_grad()
def _nearest_level_neighbours(x, levels):
    """General path: compare the two neighbours' rounded distances; where a level further out ties
    (far outside the range, inf, NaN, or pathological level sets) fall back to the argmin."""
    levels = levels.to(dtype=x.dtype, device=x.device)
    vals, orig = _sorted_levels(levels)
    n = vals.numel()
    flat = x.reshape(-1)
    if n > 1:
        hi = torch.bucketize(flat, vals, right=True).clamp_(1, n - 1)
    else:
        hi = torch.zeros_like(flat, dtype=torch.long)
    lo = (hi - 1).clamp_(min=0)

    def dist(i):
        return (flat - vals[i]).abs()

    d_lo, d_hi = dist(lo), dist(hi)
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (orig[hi] < orig[lo]))
    best = torch.where(pick_hi, hi, lo)
    d_best = torch.where(pick_hi, d_hi, d_lo)
    out = vals[best]
    # a tie can extend past the neighbours only through lo-1 or hi+1 (rounding is monotone)
    wide = torch.isnan(flat)
    if n > 2:
        wide |= (dist((lo - 1).clamp(min=0)) == d_best) & (lo > 0)
        wide |= (dist((hi + 1).clamp(max=n - 1)) == d_best) & (hi < n - 1)
    if bool(wide.any()):
        sel = wide.nonzero().squeeze(1)
        out[sel] = nearest_level_argmin(flat[sel], levels)
    return out.view(x.shape)


# ---------------------------------------------------------------------------------------------
# Sync-free projection for the quantizers: per-module tables, one gather chain per element


_MANTISSA_BITS = range(4, 11)   # cells per binade: 2^m, the smallest m keeping one threshold per cell
_PROJECTOR_TABLES = {}    # level values -> cell tables (construction time only; modules hold them as buffers)


class LevelProjector(torch.nn.Module):
    """Pi onto a normalised level set (min 0, max 1): the same float32 bits as `nearest_level_argmin`,
    with no host synchronisation and no data-dependent branch (so `torch.compile` fuses it).

    Built once per level set (shared by the modules as non-persistent buffers). The float32 bit pattern
    shifted right by 23 - m (sign, exponent and the top m mantissa bits, m = 4..10 as the level set needs:
    6 for 5-bit APoT, 8 for 6-bit) indexes one of N cells directly; a cell holds at most one exact decision
    threshold T (`_LevelTable`) and the two levels either side of it, and
        Pi(x) = V[cell + N * (x < T)]        (x < T read off the sign bit of fl(x - T): integer ops, two gathers)
      - binades between the smallest threshold and 2: 2^m cells each;
      - below the smallest threshold: level 0; [2, 2^128): level 1;
      - inf and NaN: the first level of the given order (all distances inf/NaN: the argmin's first index);
      - negative x: level 0, except far out (|x| >= 2^17 or so for APoT) where fl(|x| + l) == |x| ties
        the small levels l with 0: the winner depends only on |x|'s binade and, through round-half-to-even,
        the parity of its last bit. `signed=True` adds that parity term (a second half of V, 2N more entries);
        without it the far-negative odd-parity inputs are out of the domain (the post-abs / post-clamp(0, 1)
        projections).
    Exact for every float32 input except finite x > 2 (the quantizers clamp to <= 1 first) and, unsigned,
    far-negative x. Other dtypes go through `nearest_level`. Buffers are non-persistent: no state_dict keys.
    """

    def __init__(self, levels, signed=True):
        super().__init__()
        levels = levels.detach().cpu().to(torch.float32).reshape(-1)
        vals, _ = _sorted_levels(levels)
        if vals.numel() < 2 or vals[0].item() != 0.0 or vals[-1].item() != 1.0:
            raise ValueError("LevelProjector needs a level set with min 0 and max 1 (build_power_value)")
        table = _LevelTable(levels)
        if not table.safe:
            raise ValueError("LevelProjector: level set too dense for exact decision thresholds")
        self.signed = signed
        key = (tuple(levels.tolist()), signed)              # built once per level set, shared by the modules
        if key not in _PROJECTOR_TABLES:
            _PROJECTOR_TABLES[key] = _cell_tables(vals, signed, *_projector_tables(levels, vals,
                                                                                   table.bounds[1:-1].numpy()))
        self.shift, cell_t, cell_v = _PROJECTOR_TABLES[key]
        self.cells = cell_t.numel()                         # N = 2^(32 - shift)
        self.offset = self.cells // 2                       # cell = (bits >> shift) + N/2, in 0 .. N-1
        self.parity_shift = self.cells.bit_length()         # (last bit) << log2(2N): the odd-parity half of V
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("vals", vals, persistent=False)
        self.register_buffer("cell_t", cell_t, persistent=False)
        self.register_buffer("cell_v", cell_v, persistent=False)

    def forward(self, x):
        if x.dtype != torch.float32:
            return nearest_level(x, self.levels)
        flat = x.detach().reshape(-1)
        bits = flat.view(torch.int32)
        cell = (bits >> self.shift).add_(self.offset)
        t = self.cell_t.index_select(0, cell)
        below = torch.sub(flat, t, out=t).view(torch.int32)           # sign bit set iff x < T (T > 0, finite)
        idx = below.bitwise_right_shift_(31).bitwise_and_(self.cells).add_(cell)    # cell + N * (x < T)
        if self.signed:
            idx.add_((bits & 1).bitwise_left_shift_(self.parity_shift))           # far negatives, odd last bit
        return self.cell_v.index_select(0, idx).view(x.shape)

    def extra_repr(self):
        return f"levels={self.vals.numel()}, cells={self.cells}, signed={self.signed}"


def _cell_tables(vals, signed, shift, cell_k, cell_t, parity):
    """Runtime tables from (K, T, parity): T per cell (-inf: no threshold, both halves hold the same level) and
    V = [level if x >= T | level if x < T] per cell, twice over when signed (even | odd last bit)."""
    k = cell_k.long()
    has_t = ~torch.isnan(cell_t)
    halves = [vals[k + has_t.long()], vals[k]]                 # x >= T: the upper neighbour; x < T: K
    if signed:
        k_odd = k + parity.long()                              # parity cells have no threshold
        halves += [vals[k_odd + has_t.long()], vals[k_odd]]
    t = torch.where(has_t, cell_t, torch.tensor(-float("inf")))
    return shift, t.contiguous(), torch.cat(halves).contiguous()


def _f32(bits):
    return np.asarray(bits, dtype=np.int64).astype(np.uint32).view(np.float32)


def _argmin_np(x, levels):
    """The reference argmin in float32 numpy (first index wins; NaN rows -> index 0)."""
    d = np.abs(x[:, None] - levels[None, :])
    return np.where(np.isnan(d).any(axis=1), 0, np.argmin(np.where(np.isnan(d), np.inf, d), axis=1))


def _projector_tables(levels, vals, thresholds):
    """(shift, K, T, parity delta) over every cell = float32 bits >> shift (+ offset)."""
    lv, v = levels.numpy(), vals.numpy()
    first = int(np.searchsorted(v, lv[0]))                 # sorted index of the first level in the given order
    e_lo = int(np.float32(thresholds[0]).view(np.int32)) >> 23
    for m in _MANTISSA_BITS:
        shift = 23 - m
        u = np.arange(-(1 << (31 - shift)), 1 << (31 - shift), dtype=np.int64)   # cell value = bits >> shift
        lo = u << shift
        hi = lo | ((1 << shift) - 1)
        field = (u >> m) & 0xFF
        pos = (u >= 0) & (field >= e_lo) & (field < 128)
        lo_k = np.searchsorted(thresholds, _f32(lo[pos]), side="right")
        hi_k = np.searchsorted(thresholds, _f32(hi[pos]), side="right")
        if (hi_k - lo_k).max() <= 1:
            break
    else:
        raise ValueError("LevelProjector: thresholds too close for the cell table")
    k = np.zeros(u.shape, dtype=np.int64)                  # level 0: tiny positives, moderate negatives
    t = np.full(u.shape, np.nan, dtype=np.float32)
    par = np.zeros(u.shape, dtype=np.int64)
    k[pos] = lo_k
    t[pos] = np.where(hi_k > lo_k, thresholds[np.minimum(lo_k, len(thresholds) - 1)], np.nan)
    k[(u >= 0) & (field >= 128)] = len(v) - 1              # [2, inf): the top level
    k[field == 255] = first                                # +-inf, NaN
    # negative binades: the reference at both ends of each binade, for an even and an odd last bit
    f = np.arange(255, dtype=np.int64)[:, None] << 23
    ends = (np.concatenate([f, f | 1, f | 0x7FFFFE, f | 0x7FFFFF], axis=1) | (1 << 31)).ravel()
    win = np.searchsorted(v, lv[_argmin_np(_f32(ends), lv)]).reshape(255, 4)
    bad = np.flatnonzero((win[:, 0] != win[:, 2]) | (win[:, 1] != win[:, 3]))
    if bad.size:
        raise ValueError(f"LevelProjector: negative binade {bad[0]} has no closed form")
    neg = (u < 0) & (field < 255)
    k[neg], par[neg] = win[field[neg], 0], win[field[neg], 1] - win[field[neg], 0]
    return (shift, torch.from_numpy(k.astype(np.int32)), torch.from_numpy(t),
            torch.from_numpy(par.astype(np.int32)))
