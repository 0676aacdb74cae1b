"""ALQ's fast path: the basis step fused (`FastPath.basis_step`), the reconstruction read through codes and the
branch-free code search. The same float operations in the same order as the reference path of alq/binarynet.py
(`optimize_bin_basis` + `speedup` + the slot-by-slot reconstruction), so the same tensors bit for bit
(tests/test_alq_speed.py, tests/originals/test_alq_originals.py); on the CPU the elementwise and selection work
runs in compiled code (alq/native.py) where it can.

Which path a layer takes is chosen once, when it is built (`choose_path`): the reference path where
QUANTLAB_ALQ_REFERENCE is set (not empty or 0), the compiled code unless QUANTLAB_ALQ_NATIVE=0.
"""
import os

import torch

from alq import native
from alq.search import representable_values

REFERENCE_ENV = "QUANTLAB_ALQ_REFERENCE"


def reference_mode():
    """True when QUANTLAB_ALQ_REFERENCE is set (not empty or 0): every step takes the straightforward reference
    path (`optimize_bin_basis` + `speedup` + the slot-by-slot reconstruction) instead of the fused fast path.
    Both give the same tensors bit for bit (tests/test_alq_speed.py); the switch exists to check that."""
    return os.environ.get(REFERENCE_ENV, "") not in ("", "0")


def _code_dtype(M):
    """Smallest dtype holding the codes 0 .. 2^M - 1 (uint8 up to M = 8)."""
    return torch.uint8 if M <= 8 else torch.int16 if M <= 15 else torch.int32


def _nearest_code_fast(t, values):
    """`search.nearest_code` for t (G, n) and the groups' values (G, C), C = 2^M: codes (G, n) in
    `_code_dtype(M)`.

    Same selection as `search.nearest_code` (see there for why comparing the two neighbours is exact), but
    branch-free: equal values are not removed but each sorted position carries the lowest code of its run of
    equal values, and the position p = max{q : sorted[q] < t} (or 0) comes from a fixed log2(C)-level binary
    search written as gathers and compares over many weights at once (`_search_rows`) instead of
    torch.searchsorted. On the CPU the weights go in chunks of about 2^16 so that the passes stay in cache. Host
    syncs: one `any()` per call for the (rare) groups that need the dense recomputation.
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
    # groups where float rounding could make a farther value tie: recompute densely (as `search.nearest_code`)
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


def nearest_code_fast(target, alpha, bit_table):
    """Same result as `search.nearest_code` / `search.nearest_code_dense` (codes (..., n) int64), by
    `_nearest_code_fast`."""
    lead, n = target.shape[:-1], target.shape[-1]
    values = representable_values(alpha, bit_table).reshape(-1, bit_table.size(0))
    return _nearest_code_fast(target.reshape(-1, n), values).long().reshape(*lead, n)


class FastPath:
    """The fast path's methods of `binarynet.BinaryLayer` (a mixin: it reads the layer's B, alpha, mask, w_FP,
    bit table, group shape, `Bf`, `_buffer` and `_least_squares`)."""

    def choose_path(self):
        """Choose this layer's path once, from the environment as it is now: `reference` (every step the
        reference path) and `compiled` (the compiled code may run; built on first use)."""
        self.reference = reference_mode()
        self.compiled = native.enabled()

    def _lib(self):
        """The compiled library where this layer may use it and it is available, else None."""
        return native.library() if self.compiled else None

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
        lib = self._lib() if code.device.type == "cpu" and code.dtype == torch.uint8 else None
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

    def _fill_native(self, code, grouped):
        """Set B from the uint8 codes (d0, d1, 1, n) with `alq_fill_bases` and return (None, -ph * w_FP + pg) for
        `_least_squares` (the library's B as float and B * ph are contiguous, not the original's layout that the
        matmuls must read, so `Bf` and `_least_squares` form those again). grouped: w_FP, pg, ph in group form,
        contiguous. The second is None for pixelwise groups, whose group view of a weight is not a plain reshape
        (the least squares then form it themselves, so the matmul reads the same layout)."""
        d0, d1, M, n = self.group_shape[0], self.group_shape[1], self.max_bit, self.group_shape[2]
        w, pg, ph = grouped
        plain = self.structure != "pixelwise"
        code, mask = code.contiguous(), self.mask.contiguous().view(torch.uint8)
        B = torch.empty((d0, d1, M, n), dtype=torch.int8)
        Bf, Bph = self._buffer("Bf", B.shape), self._buffer("Bph", B.shape)
        rgw = torch.empty((d0, d1, n, 1)) if plain else None
        self._lib().alq_fill_bases(code.data_ptr(), mask.data_ptr(), ph.data_ptr(), w.data_ptr(), pg.data_ptr(),
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
        lib = self._lib() if self.w_FP.device.type == "cpu" and self.w_FP.dtype == torch.float32 and M <= 8 else None
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
