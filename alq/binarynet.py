"""Multi-bit form of a weight tensor for ALQ (Qu et al., CVPR 2020, Sec. 3).

Each weight tensor is cut into groups of n weights (structured sketching, Sec. 3.4) and every group g
is represented as  w_g ~= sum_j mask_j * alpha_j * b_j  with binary bases b_j in {-1,+1}^n and
coordinates alpha_j (Eq. 2).  Storage layout per layer (d0, d1 index the groups, M = max_bit):

    B     (d0, d1, M, n) int8   binary bases, 0 in pruned slots
    alpha (d0, d1, M, 1) float  coordinates
    mask  (d0, d1, M, 1) bool   which slots are in use; a layer's bitwidth is  #valid alpha / #groups

Group structures (as in the original code):
    kernelwise      conv: (K, C_in, M, kh*kw)   one group per 2-D kernel
    pixelwise       conv: (K, kh*kw, M, C_in)   the input-channel vector at one spatial tap
    channelwise     conv: (K, 1, M, C_in*kh*kw) one group per output channel
    subchannelwise  fc:   (out, S, M, in/S)     S consecutive slices of each row
"""
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile

import torch

REL_NORM_THRES = 1e-6
STRUCTURES = ("channelwise", "kernelwise", "pixelwise", "subchannelwise")


def reference_mode():
    """True when QUANTLAB_ALQ_REFERENCE is set (not empty or 0): every step takes the straightforward reference
    path (`optimize_bin_basis` + `speedup` + the slot-by-slot reconstruction) instead of the fused fast path.
    Both give the same tensors bit for bit (tests/test_alq_speed.py); the switch exists to check that."""
    return os.environ.get("QUANTLAB_ALQ_REFERENCE", "") not in ("", "0")


def construct_bit_table(bit, device=None):
    """All 2^bit sign patterns: row i, column j is +1 if bit j of i is set else -1 (row 0 is all -1)."""
    i = torch.arange(2 ** bit).unsqueeze(1)
    j = torch.arange(bit).unsqueeze(0)
    table = torch.where((i >> j) & 1 == 1, 1, -1).to(torch.int8)
    return table if device is None else table.to(device)


def binarize(input_t):
    """sign() with sign(0) = +1, flattened (the greedy init's b_i = sign(r))."""
    out = torch.ones(input_t.nelement())
    out[input_t.reshape(-1) < 0] = -1
    return out


# ---------------------------------------------------------------------------------------------------
# Greedy multi-bit initialisation (Sec. 3.4, "structured sketching"): b_i = sign(residual), then refit all
# coordinates by least squares, until the relative residual drops below REL_NORM_THRES.


def _solve_normal(B_, w):
    """alpha = (B^T B)^-1 B^T w for a batch of small systems; singular ones fall back to the pseudo-inverse."""
    BtB = B_.transpose(1, 2) @ B_
    inv, info = torch.linalg.inv_ex(BtB)
    bad = info != 0
    if bad.any():
        inv[bad] = torch.linalg.pinv(BtB[bad])
    return inv @ (B_.transpose(1, 2) @ w)


def transform_bin_basis_groups(W, max_dim, rel_norm_thres=REL_NORM_THRES):
    """Greedy init of G groups at once. W: (G, n) float32.

    Returns B (G, M, n) int8, alpha (G, M) float32 and dim (G,) int64 with M = max_dim: the valid
    coordinates are non-negative, sorted ascending and fill slots [:dim]; slots [dim:] are zero.
    Per group this is exactly the original `transform_bin_basis` (an all-zero group gets dim 0).
    """
    W = W.detach().float().cpu()
    G, n = W.shape
    m = min(n, max_dim)
    B = torch.zeros(G, n, m)
    alpha = torch.zeros(G, m)
    res = W.clone()
    ori = W.pow(2).sum(1)
    active = ori > 0
    for i in range(m):
        rel = res.pow(2).sum(1) / ori.clamp_min(torch.finfo(torch.float32).tiny)
        active &= ~(rel < rel_norm_thres)
        idx = active.nonzero().view(-1)
        if idx.numel() == 0:
            break
        B[idx, :, i] = torch.where(res[idx] < 0, -1.0, 1.0)
        B_ = B[idx, :, :i + 1]
        a = _solve_normal(B_, W[idx].unsqueeze(-1))
        res[idx] = W[idx] - (B_ @ a).squeeze(-1)
        alpha[idx, :i + 1] = a.squeeze(-1)
    # negative coordinates: |alpha| and flip the basis; zero coordinates are dropped; sort ascending
    neg = alpha < 0
    alpha = alpha.abs()
    B = torch.where(neg.unsqueeze(1), -B, B)
    valid = alpha != 0
    key = torch.where(valid, alpha, torch.full_like(alpha, float("inf")))
    order = torch.sort(key, dim=1, stable=True).indices
    alpha = torch.gather(alpha, 1, order)
    valid = torch.gather(valid, 1, order)
    B = torch.gather(B, 2, order.unsqueeze(1).expand(G, n, m))
    dim = valid.sum(1)
    alpha = alpha * valid
    B = B * valid.unsqueeze(1)
    out_B = torch.zeros(G, max_dim, n, dtype=torch.int8)
    out_a = torch.zeros(G, max_dim)
    out_B[:, :m] = B.transpose(1, 2).to(torch.int8)
    out_a[:, :m] = alpha
    return out_B, out_a, dim


def transform_bin_basis(w_vec, max_dim, rel_norm_thres=REL_NORM_THRES):
    """Original single-group API: (B (n, dim) int8, alpha (dim,), dim); ([], [], 0) for an all-zero group."""
    B, a, dim = transform_bin_basis_groups(w_vec.reshape(1, -1), max_dim, rel_norm_thres)
    d = int(dim[0])
    if d == 0:
        return [], [], 0
    return B[0, :d].t().contiguous(), a[0, :d], d


# ---------------------------------------------------------------------------------------------------
# The basis step's search: for every weight, the code (row of the bit table) whose value
# sum_j code_j * alpha_j is nearest to the target, ties to the lowest code index (torch.argmin).


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


def _code_dtype(M):
    """Smallest dtype holding the codes 0 .. 2^M - 1 (uint8 up to M = 8)."""
    return torch.uint8 if M <= 8 else torch.int16 if M <= 15 else torch.int32


def _nearest_code_fast(t, values):
    """`nearest_code` for t (G, n) and the groups' values (G, C), C = 2^M: codes (G, n) in `_code_dtype(M)`.

    Same selection as `nearest_code` (see there for why comparing the two neighbours is exact), but branch-free:
    equal values are not removed but each sorted position carries the lowest code of its run of equal values,
    and the position p = max{q : sorted[q] < t} (or 0) comes from a fixed log2(C)-level binary search written
    as gathers and compares over many weights at once (`_search_rows`) instead of torch.searchsorted. On the
    CPU the weights go in chunks of about 2^16 so that the passes stay in cache. Host syncs: one `any()` per call
    for the (rare) groups that need the dense recomputation.
    """
    G, C = values.shape
    n = t.size(1)
    dev = t.device
    inf = float("inf")
    sv, perm = torch.sort(values, dim=1, stable=True)  # equal values keep ascending code order
    new = torch.ones_like(sv, dtype=torch.bool)
    new[:, 1:] = sv[:, 1:] != sv[:, :-1]
    first = torch.where(new, torch.arange(C, device=dev), 0).cummax(1).values  # where each run of equal values starts
    low = torch.gather(perm, 1, first)  # the lowest code with that value
    W = C + 1  # one +inf column after the values, so position p + 1 always exists
    U = sv.new_full((G, W), inf)
    U[:, :C] = sv
    code_t = torch.zeros((G, W), dtype=_code_dtype(C.bit_length() - 1), device=dev)
    code_t[:, :C] = low
    hi_wins_tie = torch.zeros((G, W), dtype=torch.bool, device=dev)  # sorted[p], sorted[p+1] equally far
    hi_wins_tie[:, :C - 1] = low[:, 1:] < low[:, :-1]
    code = torch.empty((G, n), dtype=code_t.dtype, device=dev)
    rows = G if dev.type == "cuda" else max(1, 2 ** 16 // n)
    for g0 in range(0, G, rows):
        g1 = min(G, g0 + rows)
        code[g0:g1] = _search_rows(U, code_t, hi_wins_tie, t[g0:g1], g0)
    # groups where float rounding could make a farther value tie: recompute densely (as `nearest_code`)
    gaps = torch.where(new[:, 1:], sv[:, 1:] - sv[:, :-1], inf).amin(1)
    t_min, t_max = torch.aminmax(t, dim=1)
    scale = torch.maximum(t_min.abs(), t_max.abs()) + torch.maximum(sv[:, 0].abs(), sv[:, -1].abs())
    risky = (gaps <= torch.clamp(scale * 2.0 ** -22, min=2.0 ** -126)) | ~torch.isfinite(scale)
    if risky.any():
        g = risky.nonzero().view(-1)
        code[g] = torch.argmin(torch.abs(t[g].unsqueeze(1) - values[g].unsqueeze(2)), dim=1).to(code.dtype)
    return code


def _search_rows(U, code_t, hi_wins_tie, t, g0):
    """Codes of the targets t (rows, n) of groups g0, g0 + 1, ...: p = max{q : U[q] < t} (or 0) by binary search
    (idx += s where U[idx + s] < t, s = C/2 ... 1), then U[p + 1] if it is nearer (or as near with a lower code)."""
    G, W = U.shape
    rows = t.size(0)
    idt = torch.int32 if G * W < 2 ** 31 else torch.int64
    Uf, tf = U.view(-1), t.reshape(-1)
    s = (W - 1) // 2
    base = torch.arange(g0, g0 + rows, device=t.device, dtype=idt).unsqueeze(1) * W
    idx = torch.add(base, U[g0:g0 + rows, s:s + 1] < t, alpha=s).view(-1)  # first level: one pivot per group
    s //= 2
    while s >= 1:
        idx.add_(Uf[s:].index_select(0, idx) < tf, alpha=s)
        s //= 2
    d_lo = tf - Uf.index_select(0, idx)  # negative only when t is below every value (then p = 0 is right)
    d_hi = Uf[1:].index_select(0, idx) - tf  # U[p + 1] >= t
    pick_hi = d_hi < d_lo
    pick_hi |= (d_hi == d_lo).logical_and_(hi_wins_tie.view(-1).index_select(0, idx))
    return code_t.view(-1).index_select(0, idx.add_(pick_hi)).view_as(t)


_NATIVE = {}  # the compiled basis-step library, loaded once per process: {"lib": ctypes CDLL or None}


def _native_lib():
    """alq/basis_step.c through ctypes, or None where there is no C compiler (`$CC`, default cc) or it fails.
    Built once per source text into $QUANTLAB_CACHE (default ~/.cache/quantlab), atomically, so concurrent runs
    share one build. Without it the eager torch code does the same work. QUANTLAB_ALQ_NATIVE=0 turns it off
    (checked by the callers, at every call)."""
    if "lib" in _NATIVE:
        return _NATIVE["lib"]
    _NATIVE["lib"] = None
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "basis_step.c")
    flags = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
    cc = os.environ.get("CC", "cc")
    with open(src, "rb") as f:
        key = hashlib.sha1(f.read() + repr((cc, flags)).encode()).hexdigest()[:16]
    cache = os.environ.get("QUANTLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "quantlab")
    so = os.path.join(cache, f"alq_basis_step-{key}.so")
    try:
        if not os.path.isfile(so):
            os.makedirs(cache, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            try:
                subprocess.run([cc, *flags, src, "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
                os.replace(tmp, so)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(so)
    except (OSError, subprocess.SubprocessError) as e:
        if isinstance(e, FileNotFoundError) and e.filename == cc:
            why = f"no C compiler {cc!r}"
        elif isinstance(e, subprocess.CalledProcessError):
            why = f"{cc} failed: " + ((e.stderr or b"").decode(errors="replace").strip().splitlines() or ["?"])[0]
        else:
            why = str(e)
        print(f"note: ALQ's compiled basis step is not available ({why}); the same computation runs in torch, "
              f"slower", file=sys.stderr)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    for name, args in (("alq_nearest_code", [p, p, i64, i64, i32, p]),
                       ("alq_basis_search", [p, p, p, p, i64, i64, i32, p, p]),
                       ("alq_fill_bases", [p, p, p, p, p, i64, i64, i32, p, p, p, p]),
                       ("alq_reconstruct", [p, p, p, i64, i64, i32, p]),
                       ("alq_shadow_step", [p, p, p, i64])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, args
    _NATIVE["lib"] = lib
    return lib


def _native():
    """The compiled library where it may run (QUANTLAB_ALQ_NATIVE not 0), else None."""
    return _native_lib() if os.environ.get("QUANTLAB_ALQ_NATIVE", "1") not in ("0", "") else None


def nearest_code_native(t, values):
    """`_nearest_code_fast` for CPU float32 t (G, n), values (G, C), C <= 256, by the compiled search
    (alq/basis_step.c); None where it does not apply or is not available. No host sync: the data are on the host."""
    G, C = values.shape
    if t.device.type != "cpu" or C > 256 or t.dtype != torch.float32 or values.dtype != torch.float32:
        return None
    lib = _native()
    if lib is None:
        return None
    t, values = t.contiguous(), values.contiguous()
    code = torch.empty(t.shape, dtype=torch.uint8)
    lib.alq_nearest_code(t.data_ptr(), values.data_ptr(), G, t.size(1), C, code.data_ptr())
    return code


def nearest_code_fast(target, alpha, bit_table):
    """Same result as `nearest_code` / `nearest_code_dense` (codes (..., n) int64), by `_nearest_code_fast`."""
    lead, n = target.shape[:-1], target.shape[-1]
    values = representable_values(alpha, bit_table).reshape(-1, bit_table.size(0))
    return _nearest_code_fast(target.reshape(-1, n), values).long().reshape(*lead, n)


# ---------------------------------------------------------------------------------------------------


class BinaryLayer:
    """Multi-bit form of one weight tensor (plain object, not an nn.Module, as in the original).

    ind_layer: index of the layer among the quantized weights; w_FP: in ALQ the current reconstruction,
    in post-training (STE) the maintained full-precision shadow weight.
    `legacy_sign_flip` reproduces the original's lost basis flip in the basis/STE steps (see DEVIATIONS.md).
    """

    def __init__(self, w_ori, ind_layer, structure, max_bit, num_subchannel=0, name=None, init=True,
                 legacy_sign_flip=True):
        if structure not in STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}")
        self.name = name
        self.tensor_shape = tuple(w_ori.shape)
        self.layer_type = "fc" if len(self.tensor_shape) == 2 else "conv"
        if (self.layer_type == "fc") != (structure == "subchannelwise"):
            raise ValueError(f"structure {structure!r} does not fit a {self.layer_type} weight of shape "
                             f"{self.tensor_shape}")
        self.structure = structure
        self.max_bit = int(max_bit)
        self.num_subchannel = int(num_subchannel)
        self.ind_layer = ind_layer
        self.legacy_sign_flip = legacy_sign_flip
        self.device = w_ori.device
        self.w_FP = w_ori.detach().clone()
        self.bit_table = construct_bit_table(self.max_bit, self.device)
        self.group_shape = self._group_shape()
        if init:
            self.B, self.alpha, self.mask = self.structured_sketch()

    # B is kept as int8; its float copy (for the matmuls) and its codes (for the reconstruction) are cached until B
    # is set again or modified in place (tensor version counter)
    @property
    def B(self):
        return self._B

    @B.setter
    def B(self, value):
        self._B, self._Bf, self._code = value, None, None

    @property
    def Bf(self):
        """B as float32, (d0, d1, M, n) laid out as (d0, d1, n, M) in memory (strides (.., 1, M)): the layout of the
        original's B after a basis step (a transposed view of the bit table's rows), which its matmuls read. The
        layout picks the BLAS routine and so the summation order of B diag(h) B^T: with a contiguous B these
        products differ from the original's in the last bit. The conversion is written into a buffer the layer
        keeps (fresh memory for a tensor this size costs more than the conversion itself), so a Bf read before B
        changes is overwritten later."""
        if self._Bf is None or self._Bf[1] != self._B._version:  # B modified in place: convert again
            d0, d1, M, n = self._B.shape
            buf = self._buffer("BfT", (d0, d1, n, M)).transpose(2, 3)
            self._Bf = (buf.copy_(self._B), self._B._version)
        return self._Bf[0]

    def _buffer(self, name, shape):
        """A float32 scratch tensor of this shape on the layer's device, kept between steps."""
        bufs = self.__dict__.setdefault("_buffers", {})
        buf = bufs.get(name)
        if buf is None or buf.shape != shape or buf.device != self._B.device:
            buf = bufs[name] = torch.empty(shape, device=self._B.device)
        return buf

    # --- grouping -----------------------------------------------------------------------------------
    def _group_shape(self):
        s = self.tensor_shape
        if self.structure == "subchannelwise":
            if self.num_subchannel < 1 or s[1] % self.num_subchannel:
                raise ValueError(f"--subc {self.num_subchannel} must be >= 1 and divide the {s[1]} inputs "
                                 f"of layer {self.name}")
            return s[0], self.num_subchannel, s[1] // self.num_subchannel
        if self.structure == "kernelwise":
            return s[0], s[1], s[2] * s[3]
        if self.structure == "pixelwise":
            return s[0], s[2] * s[3], s[1]
        return s[0], 1, s[1] * s[2] * s[3]  # channelwise

    def to_groups(self, t):
        """Weight-shaped tensor -> (d0, d1, n)."""
        s = self.tensor_shape
        if self.structure == "pixelwise":
            return t.reshape(s[0], s[1], -1).transpose(1, 2)
        return t.reshape(self.group_shape)

    def from_groups(self, g):
        """(d0, d1, n) -> weight-shaped tensor."""
        s = self.tensor_shape
        if self.structure == "pixelwise":
            return g.transpose(1, 2).reshape(s)
        return g.reshape(s)

    @property
    def num_groups(self):
        return self.group_shape[0] * self.group_shape[1]

    @property
    def group_size(self):
        return self.group_shape[2]

    @property
    def num_weight(self):
        return int(torch.Size(self.tensor_shape).numel())

    @property
    def num_bin_filter(self):
        """Number of valid coordinates (binary filters) in this layer."""
        return int(self.mask.sum())

    @property
    def avg_bit(self):
        return self.num_bin_filter / self.num_groups

    # --- init ---------------------------------------------------------------------------------------
    def structured_sketch(self):
        d0, d1, n = self.group_shape
        W = self.to_groups(self.w_FP.float().cpu()).reshape(d0 * d1, n)
        B, a, dim = transform_bin_basis_groups(W, self.max_bit)
        mask = torch.arange(self.max_bit).unsqueeze(0) < dim.unsqueeze(1)
        return (B.reshape(d0, d1, self.max_bit, n).to(self.device),
                a.reshape(d0, d1, self.max_bit, 1).to(self.device),
                mask.reshape(d0, d1, self.max_bit, 1).to(self.device))

    # --- reconstruction -----------------------------------------------------------------------------
    def reconstruct_w(self, reference=None):
        """w_hat = sum_j B_j * alpha_j * mask_j, summed slot by slot in a fixed order (so a model rebuilt from
        only its valid slots, as the packed export does, is bit-identical); -0.0 is normalised to +0.0.

        Fast path (unless `reference` or QUANTLAB_ALQ_REFERENCE): the same sum is formed once per code of a
        group (2^M values) and every weight reads its code's value; same float operations, same result."""
        code = None if (reference_mode() if reference is None else reference) else self._codes()
        if code is not None:
            return self._reconstruct_from_code(code)
        coef = self.alpha * self.mask.float()
        Bf = self.Bf
        acc = torch.zeros(self.group_shape, device=Bf.device)
        for j in range(self.max_bit):
            acc = acc + Bf[:, :, j, :] * coef[:, :, j, :]
        return self.from_groups(acc + 0.0)

    def _table_form(self):
        """Whether a weight's column of B is worth reading through its code: codes fit uint8 and a group's 2^M
        values are no more than its n weights."""
        return self.max_bit <= 8 and 2 ** self.max_bit <= self.group_size

    def _codes(self):
        """(d0, d1, n) uint8 codes of the columns of B (bit j set where B_j > 0), or None where the table form does
        not apply: shapes (`_table_form`) or a valid slot of B not +-1 (a code has two states per slot; masked
        slots do not matter, their coefficient is 0). Cached with B; rechecked when the mask was modified."""
        if not self._table_form():
            return None
        if self._code is None or not self._code_current(self._code[1]):
            code = None
            if bool(((self._B.abs() == 1) | ~self.mask).all()):  # one host sync per change of B or mask
                code = torch.zeros(self.group_shape, dtype=torch.uint8, device=self._B.device)
                for j in range(self.max_bit):
                    code.bitwise_or_((self._B[:, :, j, :] > 0).to(torch.uint8) << j)
            self._code = (code, self._code_key())
        return self._code[0]

    def _code_key(self):
        return self.mask, self.mask._version, self._B._version

    def _code_current(self, key):
        """Whether codes cached under `key` still describe B: same mask object, neither modified in place."""
        return key[0] is self.mask and key[1:] == self._code_key()[1:]

    def _reconstruct_from_code(self, code):
        """`reconstruct_w` through codes (d0, d1, n): the value of every code of a group is summed with the
        reference's operations in the reference's order, then gathered. The terms B_j alpha_j mask_j are
        -coef_j / +coef_j for bit j of the code clear / set (0 in masked slots: the sign of a zero term never
        shows, the sum starts at +0); the sums over slots 0..j are shared by the codes that agree in bits 0..j."""
        d0, d1, n = self.group_shape
        G, M, C = d0 * d1, self.max_bit, 2 ** self.max_bit
        maskf = self.mask.float().view(G, M)
        coef = self.alpha.view(G, M) * maskf
        minus, plus = -maskf * coef, maskf * coef  # B_j * coef_j with B_j = -1, +1
        lib = _native() if code.device.type == "cpu" and code.dtype == torch.uint8 else None
        if lib is not None:  # the same sums and reads in compiled code
            w = torch.empty((d0, d1, n))
            code, minus, plus = code.contiguous(), minus.contiguous(), plus.contiguous()  # alive during the call
            lib.alq_reconstruct(code.data_ptr(), minus.data_ptr(), plus.data_ptr(), G, n, M, w.data_ptr())
            return self.from_groups(w)
        acc = torch.zeros((G, 1), device=coef.device)
        for j in range(M):  # column c holds the sum for the codes c (mod 2^(j+1))
            acc = torch.cat([acc + minus[:, j:j + 1], acc + plus[:, j:j + 1]], dim=1)
        acc = acc + 0.0
        base = torch.arange(G, device=code.device, dtype=torch.int32).view(d0, d1, 1) * C
        return self.from_groups(acc.view(-1).index_select(0, (base + code).view(-1)).view(d0, d1, n))

    def update_w_FP(self, w_FP_new=None):
        """STE: w_FP += w_FP_new (the shadow step); otherwise w_FP <- reconstruction."""
        if w_FP_new is not None:
            self.w_FP.add_(w_FP_new)
        else:
            self.w_FP = self.reconstruct_w()

    # --- projections of w-domain quantities into the alpha domain (Sec. 3.2) ---------------------------
    def construct_grad_alpha(self, grad_w):
        """dL/dalpha = B g (masked)."""
        return torch.matmul(self.Bf, self.to_groups(grad_w).unsqueeze(-1)) * self.mask.float()

    def construct_hessian_alpha(self, diag_hessian_w):
        """diag(B diag(h) B^T) (masked), formed as the original does: the full M x M product, then its diagonal
        (a group sum of h on valid slots, summed in the matmul's order)."""
        Bf = self.Bf
        H = torch.matmul(Bf * self.to_groups(diag_hessian_w).unsqueeze(-2), Bf.transpose(2, 3))
        return torch.diagonal(H, dim1=-2, dim2=-1).unsqueeze(-1) * self.mask.float()

    # --- pruning (Sec. 3.3) -------------------------------------------------------------------------
    def sort_importance_bin_filter(self, grad_alpha, diag_hessian_alpha, num_top, legacy_index=True):
        """The num_top valid coordinates of least importance, rows [layer, index among valid, delta],
        delta = -g_alpha * alpha + alpha^2 * h_alpha / 2 (Eq. 9: modelled loss increase of pruning alpha).

        legacy_index reproduces the original's cross-layer value: delta read from the *full* tensor at the
        index among valid entries (see DEVIATIONS.md); the per-layer selection is the same either way.
        """
        delta = -grad_alpha * self.alpha + 0.5 * torch.pow(self.alpha, 2) * diag_hessian_alpha
        valid = delta[self.mask].view(-1)
        sorted_ind = torch.argsort(valid, stable=True)[:num_top]
        vals = delta.view(-1)[sorted_ind] if legacy_index else valid[sorted_ind]
        layer = torch.full_like(vals, float(self.ind_layer))
        return torch.stack([layer, sorted_ind.to(vals.dtype), vals], dim=1).float().cpu()

    def prune_alpha(self, ind_prune):
        """Set mask to 0 at the given indices among the valid coordinates."""
        before = self.num_bin_filter
        flat = self.mask.view(-1)
        flat[flat.nonzero().view(-1)[ind_prune.to(flat.device)]] = False
        self.B = self.B * self.mask.to(torch.int8)
        self.alpha *= self.mask.float()
        if before - self.num_bin_filter != ind_prune.numel():
            raise RuntimeError(f"wrong pruning in layer {self.name}: asked {ind_prune.numel()}, "
                               f"removed {before - self.num_bin_filter}")
        return True

    # --- the basis step (Sec. 3.2, Alg. 1 lines on B) ---------------------------------------------------
    def optimize_bin_basis(self, pseudo_grad, pseudo_hessian, dense=False):
        """Each weight takes the code whose value is nearest to target = w_FP - pg/ph (alpha fixed)."""
        target = self.to_groups(self.w_FP - pseudo_grad / pseudo_hessian)  # (d0, d1, n)
        search = nearest_code_dense if dense else nearest_code
        code = search(target, self.alpha, self.bit_table)  # (d0, d1, n)
        self.B = self.bit_table[code].transpose(2, 3).contiguous() * self.mask.to(torch.int8)
        return True

    def speedup(self, pseudo_grad, pseudo_hessian, flip=None):
        """Weighted least squares for alpha with B fixed:
        alpha = -(B diag(ph) B^T + diag(1 + 1e-6 - mask))^-1 B (-ph * w_FP + pg); negative alpha -> |alpha|.

        flip: also flip the basis of a negated coordinate. The original loses that flip in the basis/STE steps
        (B is a non-contiguous view there, except when n == 1 or M == 1); legacy_sign_flip reproduces it.
        """
        neg, flip = self._least_squares(pseudo_grad, pseudo_hessian, flip)
        if flip:
            self.B = torch.where(neg, -self.B, self.B)
        return True

    def _least_squares(self, pseudo_grad, pseudo_hessian, flip=None, filled=None):
        """`speedup` up to the basis flip: sets alpha; returns (neg (d0, d1, M, 1), whether to flip those bases).
        filled: (B * ph, -ph * w_FP + pg or None) as `_fill_native` wrote them (the same values)."""
        Bf = self.Bf
        Bph, revised_grad_w = filled or (None, None)
        if revised_grad_w is None:
            revised_grad_w = self.to_groups(-pseudo_hessian * self.w_FP + pseudo_grad).unsqueeze(-1)
        if Bph is None:  # in Bf's layout (the original's), which the matmul reads
            Bph = Bf * self.to_groups(pseudo_hessian).unsqueeze(-2)
        revised_hessian = torch.matmul(Bph, Bf.transpose(2, 3))
        revised_hessian = revised_hessian + torch.diag_embed(1 + 1e-6 - self.mask.float().squeeze(-1))
        inv, info = torch.linalg.inv_ex(revised_hessian)  # torch.inverse, without raising on a singular system
        bad = info != 0
        if bad.any():  # identical bases in a group make H singular (the original crashes): pseudo-inverse there
            inv[bad] = torch.linalg.pinv(revised_hessian[bad])
        alpha = -torch.matmul(inv, torch.matmul(Bf, revised_grad_w))
        alpha *= self.mask.float()
        neg = alpha < 0
        self.alpha = torch.where(neg, -alpha, alpha)  # = alpha[neg] *= -1 (exact), without a host sync
        if flip is None:
            flip = not self.legacy_sign_flip or self.max_bit == 1 or self.group_size == 1
        return neg, flip

    def _fill_native(self, code, grouped):
        """Set B from the uint8 codes (d0, d1, 1, n) with `alq_fill_bases` and return (None, -ph * w_FP + pg) for
        `_least_squares` (the library's B as float and B * ph are contiguous, not the original's layout that the
        matmuls must read, so `Bf` and `_least_squares` form those again). grouped: w_FP, pg, ph in group form, contiguous. The second
        is None for pixelwise groups, whose group view of a weight is not a plain reshape (the least squares then
        form it as before, so the matmul reads the same layout)."""
        d0, d1, M, n = self.group_shape[0], self.group_shape[1], self.max_bit, self.group_shape[2]
        w, pg, ph = grouped
        plain = self.structure != "pixelwise"
        code, mask = code.contiguous(), self.mask.contiguous().view(torch.uint8)
        B = torch.empty((d0, d1, M, n), dtype=torch.int8)
        Bf, Bph = self._buffer("Bf", B.shape), self._buffer("Bph", B.shape)
        rgw = torch.empty((d0, d1, n, 1)) if plain else None
        _native().alq_fill_bases(code.data_ptr(), mask.data_ptr(), ph.data_ptr(), w.data_ptr(), pg.data_ptr(),
                                 d0 * d1, n, M, B.data_ptr(), Bf.data_ptr(), Bph.data_ptr(),
                                 rgw.data_ptr() if plain else None)
        self.B = B  # B as float and B * ph are formed again in the original's layout (Bf, _least_squares)
        return None, rgw

    def basis_step(self, pseudo_grad, pseudo_hessian, ste=False):
        """One basis step fused: `optimize_bin_basis`, `speedup`, then w_FP <- reconstruction (ste: w_FP -= pg/ph,
        the shadow step). Same tensors bit for bit as those calls (tests/test_alq_speed.py), faster: on the CPU
        the targets, codes, bases, reconstruction and shadow step in compiled code (alq/basis_step.c), elsewhere
        the search of `_nearest_code_fast`, B written from the codes with integer ops and the reconstruction read
        from the codes. Returns the weight for the network (the reconstruction)."""
        d0, d1, n = self.group_shape
        M = self.max_bit
        values = representable_values(self.alpha, self.bit_table).reshape(d0 * d1, -1)
        lib = _native() if self.w_FP.device.type == "cpu" and self.w_FP.dtype == torch.float32 and M <= 8 else None
        grouped = None
        if lib is not None:  # target = w_FP - pg / ph and its codes in one compiled pass
            grouped = [self.to_groups(t).contiguous() for t in (self.w_FP, pseudo_grad, pseudo_hessian)]
            values = values.contiguous()
            target, code = torch.empty((d0, d1, n)), torch.empty((d0, d1, n), dtype=torch.uint8)
            lib.alq_basis_search(*(t.data_ptr() for t in grouped), values.data_ptr(), d0 * d1, n, 2 ** M,
                                 target.data_ptr(), code.data_ptr())
        else:
            target = self.to_groups(self.w_FP - pseudo_grad / pseudo_hessian)
            code = _nearest_code_fast(target.reshape(d0 * d1, n), values)
        code = code.view(d0, d1, 1, n)
        # B (and, compiled, its float form, B * ph and -ph * w_FP + pg in the same pass)
        filled = self._fill_native(code, grouped) if grouped is not None else None
        if filled is None and M <= 8:  # B_j = +1 where bit j of the code is set, -1 where not, 0 in masked slots
            m8 = self.mask.to(torch.int8)
            shifts = torch.arange(M, dtype=torch.int8, device=code.device).view(M, 1)
            self.B = (code.view(torch.int8) >> shifts).bitwise_and_(1).mul_(m8 * 2).sub_(m8)
        elif filled is None:
            self.B = self.bit_table[code.squeeze(2).long()].transpose(2, 3).contiguous() * self.mask.to(torch.int8)
        neg, flip = self._least_squares(pseudo_grad, pseudo_hessian, filled=filled)
        code = code.view(d0, d1, n)
        if flip:
            self.B = torch.where(neg, -self.B, self.B)
            bits = (neg.view(d0, d1, M).to(torch.int64) << torch.arange(M, device=code.device)).sum(-1)
            code = code ^ bits.to(code.dtype).unsqueeze(-1)  # a flipped basis flips that bit of every code
        if self._table_form():
            self._code = (code, self._code_key())
            w = self._reconstruct_from_code(code)
        else:
            w = self.reconstruct_w(reference=True)
        if ste and lib is not None and self.w_FP.is_contiguous():  # w_FP += -pg / ph, same operations compiled
            pg, ph = pseudo_grad.contiguous(), pseudo_hessian.contiguous()
            lib.alq_shadow_step(self.w_FP.data_ptr(), pg.data_ptr(), ph.data_ptr(), self.w_FP.numel())
        elif ste:
            self.w_FP.add_(-pseudo_grad / pseudo_hessian)
        else:
            self.w_FP = w
        return w

    # --- checkpoint form: tensors and primitives only ---------------------------------------------------
    def state_dict(self):
        return {"B": self.B.cpu(), "alpha": self.alpha.cpu(), "mask": self.mask.cpu(), "w_FP": self.w_FP.cpu(),
                "structure": self.structure, "max_bit": self.max_bit, "num_subchannel": self.num_subchannel,
                "ind_layer": int(self.ind_layer), "tensor_shape": list(self.tensor_shape)}

    def load_state_dict(self, sd):
        exp_B = tuple(self.group_shape[:2]) + (self.max_bit, self.group_shape[2])
        if tuple(sd["B"].shape) != exp_B or sd["structure"] != self.structure:
            raise ValueError(f"layer {self.name}: checkpoint has structure {sd['structure']} with B of shape "
                             f"{tuple(sd['B'].shape)}, expected {self.structure} with {exp_B}")
        self.B = sd["B"].to(self.device, torch.int8)
        self.alpha = sd["alpha"].to(self.device, torch.float32)
        self.mask = sd["mask"].to(self.device, torch.bool)
        self.w_FP = sd["w_FP"].to(self.device, torch.float32)


class ConvLayer_bin(BinaryLayer):
    """Multi-bit form of a conv weight (kernelwise / pixelwise / channelwise)."""

    def __init__(self, w_ori, ind_layer, structure, max_bit, **kw):
        super().__init__(w_ori, ind_layer, structure, max_bit, **kw)


class FCLayer_bin(BinaryLayer):
    """Multi-bit form of a fully connected weight (subchannelwise, num_subchannel groups per row)."""

    def __init__(self, w_ori, ind_layer, structure, num_subchannel, max_bit, **kw):
        super().__init__(w_ori, ind_layer, structure, max_bit, num_subchannel=num_subchannel, **kw)


def average_bitwidth(params_bin):
    """Bits per weight over all quantized weights (first and last layers included), as the original:
    sum_l avg_bit_l * numel_l / sum_l numel_l."""
    bits = sum(p.num_bin_filter * p.group_size for p in params_bin)
    return bits / sum(p.num_weight for p in params_bin)


def split_parameters(net):
    """(names_w, parameters_w, parameters_b): weights with dim > 1 are quantized, the rest (biases, BN) stay FP."""
    names_w, params_w, params_b = [], [], []
    for name, p in net.named_parameters():
        if "weight" in name and p.dim() > 1:
            names_w.append(name)
            params_w.append(p)
        else:
            params_b.append(p)
    return names_w, params_w, params_b


def make_binary_layers(names_w, params_w, structure, subc, max_bit, init=True, legacy_sign_flip=True):
    layers = []
    for i, (name, p) in enumerate(zip(names_w, params_w)):
        kw = dict(name=name, init=init, legacy_sign_flip=legacy_sign_flip)
        if p.dim() == 2:
            layers.append(FCLayer_bin(p.data, i, structure[i], subc[i], max_bit[i], **kw))
        else:
            layers.append(ConvLayer_bin(p.data, i, structure[i], max_bit[i], **kw))
    return layers
