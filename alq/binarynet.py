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
import torch

from alq.fastpath import FastPath
from alq.search import nearest_code, nearest_code_dense

REL_NORM_THRES = 1e-6
STRUCTURES = ("channelwise", "kernelwise", "pixelwise", "subchannelwise")


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


class BinaryLayer(FastPath):
    """Multi-bit form of one weight tensor (plain object, not an nn.Module, as in the original).

    ind_layer: index of the layer among the quantized weights; w_FP: in ALQ the current reconstruction,
    in post-training (STE) the maintained full-precision shadow weight.
    `legacy_sign_flip` reproduces the original's lost basis flip in the basis/STE steps (see DEVIATIONS.md).
    The methods here are the reference path; the fused basis step and the reconstruction through codes are
    FastPath's (alq/fastpath.py), and the layer chooses between the two when it is built (`choose_path`).
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
        self.choose_path()
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

        Fast path unless `reference` is true (None: the layer's path, `self.reference`): the same sum is formed once
        per code of a group (2^M values) and every weight reads its code's value; same float operations, same
        result."""
        code = None if (self.reference if reference is None else reference) else self._codes()
        if code is not None:
            return self._reconstruct_from_code(code)
        coef = self.alpha * self.mask.float()
        Bf = self.Bf
        acc = torch.zeros(self.group_shape, device=Bf.device)
        for j in range(self.max_bit):
            acc = acc + Bf[:, :, j, :] * coef[:, :, j, :]
        return self.from_groups(acc + 0.0)

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
