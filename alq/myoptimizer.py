"""The ALQ optimizer (Qu et al., CVPR 2020, Sec. 3.2-3.3 and Alg. 1).

AMSGrad statistics give the loss-aware quadratic model used by every step (Eq. 6-7, as in the original
code, PyTorch-1.3 Adam algebra with eps added before dividing by sqrt(1 - beta2^t)):

    m = b1 m + (1-b1) g,   v = b2 v + (1-b2) g^2,   vmax = max(vmax, v)
    pg = lr / (1 - b1^t) * m                          pseudo-gradient (already times lr)
    ph = (sqrt(vmax) + eps) / sqrt(1 - b2^t)          pseudo diagonal Hessian
    L(w + d) - L(w) ~= pg^T d + d^T diag(ph) d / 2

Modes of `step(params_bin, mode, pruning_rate=None)`:
    'coordinate'  alpha -= pg_alpha / ph_alpha with the statistics kept in the alpha domain (g_alpha = B g);
                  with pruning_rate=[top_k, M_p] it prunes instead (Sec. 3.3) and leaves alpha alone
    'basis'       target = w_hat - pg/ph; choose every weight's code; weighted least squares for alpha;
                  the alpha-domain statistics are re-projected from the w domain
    'ste'         as 'basis', but the target comes from a full-precision shadow w_FP, which then moves by -pg/ph
"""
import math
import random

import torch
from torch.optim.optimizer import Optimizer

from alq.legacy_sort import legacy_argsort


class ALQ_optimizer(Optimizer):
    """params: the quantized weight tensors (same order as the BinaryLayer list given to step)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 legacy_importance_index=True, legacy_tie_order=True):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.legacy_importance_index = legacy_importance_index
        self.legacy_tie_order = legacy_tie_order  # PyTorch 1.3's CPU quicksort order among equal deltas
        self._reproject = {}  # param -> its BinaryLayer, where the alpha-domain statistics are due (_alpha_state)

    def _alpha_state(self, p):
        """Bring the alpha-domain statistics of p up to date. A basis/STE step re-projects them from the w domain
        (m_alpha = B m, v_alpha and vmax_alpha = group sums of v and vmax, an approximation of the original);
        that is done here, when they are first read (a coordinate step, state_dict), not at every basis/STE step:
        the values are the same, as B, the mask and the w-domain statistics only change in steps, and every
        basis/STE step replaces the previous re-projection entirely."""
        p_bin = self._reproject.pop(p, None)
        if p_bin is not None:
            state = self.state[p]
            state["exp_avg_alpha"] = p_bin.construct_grad_alpha(state["exp_avg"])
            state["exp_avg_sq_alpha"] = p_bin.construct_hessian_alpha(state["exp_avg_sq"])
            state["max_exp_avg_sq_alpha"] = p_bin.construct_hessian_alpha(state["max_exp_avg_sq"])

    def state_dict(self):
        for p in list(self._reproject):
            self._alpha_state(p)
        return super().state_dict()

    def load_state_dict(self, state_dict):
        self._reproject.clear()
        super().load_state_dict(state_dict)

    @staticmethod
    def _amsgrad(state, suffix, grad, group, out=None):
        """Update (m, v, vmax, t) named with `suffix`; return (pseudo_grad, pseudo_hessian), written into the
        tensors `out` when given (scratch kept between steps: the same values, no fresh memory), or None when
        out is False (the statistics alone move on)."""
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg" + suffix], state["exp_avg_sq" + suffix]
        max_exp_avg_sq = state["max_exp_avg_sq" + suffix]
        state["step" + suffix] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        torch.max(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        if out is False:
            return None
        pg_out, ph_out = out or (None, None)
        denom = torch.sqrt(max_exp_avg_sq, out=ph_out).add_(group["eps"])
        bias_correction1 = 1 - beta1 ** state["step" + suffix]
        bias_correction2 = 1 - beta2 ** state["step" + suffix]
        pseudo_grad = torch.mul(exp_avg, group["lr"] / bias_correction1, out=pg_out)
        pseudo_hessian = denom.div_(math.sqrt(bias_correction2))
        return pseudo_grad, pseudo_hessian

    def _scratch(self, p):
        """Two tensors shaped like p for its pseudo-gradient and pseudo-Hessian, used within one step."""
        bufs = self.__dict__.setdefault("_scratch_bufs", {})
        if p not in bufs or bufs[p][0].shape != p.shape or bufs[p][0].device != p.device:
            bufs[p] = (torch.empty_like(p), torch.empty_like(p))
        return bufs[p]

    @staticmethod
    def _copy_to_param(p, w):
        with torch.no_grad():
            p.copy_(w)

    @torch.no_grad()
    def step(self, params_bin, mode, pruning_rate=None, closure=None):
        if mode not in ("coordinate", "basis", "ste"):
            raise ValueError(f"unknown ALQ step mode {mode!r}")
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            importance = []
            for p_bin, p in zip(params_bin, group["params"]):
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step_alpha"] = 0
                    state["exp_avg_alpha"] = torch.zeros_like(p_bin.alpha)
                    state["exp_avg_sq_alpha"] = torch.zeros_like(p_bin.alpha)
                    state["max_exp_avg_sq_alpha"] = torch.zeros_like(p_bin.alpha)
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["max_exp_avg_sq"] = torch.zeros_like(p)

                if mode == "coordinate":
                    self._alpha_state(p)  # before the w-domain statistics move on
                    grad_alpha = p_bin.construct_grad_alpha(grad)
                    self._amsgrad(state, "", grad, group, out=False)  # the w-domain statistics keep running
                    if group["weight_decay"] != 0:  # L2 on the coordinates, the only place wd acts
                        grad_alpha = grad_alpha.add(p_bin.alpha, alpha=group["weight_decay"])
                    pg_alpha, ph_alpha = self._amsgrad(state, "_alpha", grad_alpha, group)
                    if pruning_rate is not None:
                        # n_l = num_alpha_l * top_k, rounded up with probability equal to its fraction
                        float_tmp = p_bin.num_bin_filter * pruning_rate[0]
                        int_tmp = int(float_tmp)
                        if random.random() < float_tmp - int_tmp:
                            int_tmp += 1
                        importance.append(p_bin.sort_importance_bin_filter(
                            pg_alpha, ph_alpha, int_tmp, legacy_index=self.legacy_importance_index))
                    else:
                        p_bin.alpha.add_(-pg_alpha / ph_alpha)
                        p_bin.update_w_FP()
                        self._copy_to_param(p, p_bin.w_FP)

                else:  # 'basis' or 'ste'
                    pg, ph = self._amsgrad(state, "", grad, group, out=self._scratch(p))
                    if p_bin.reference:  # the straightforward form; basis_step gives the same tensors
                        p_bin.optimize_bin_basis(pg, ph)
                        p_bin.speedup(pg, ph)
                        if mode == "basis":
                            p_bin.update_w_FP()
                            self._copy_to_param(p, p_bin.w_FP)
                        else:
                            p_bin.update_w_FP(-pg / ph)
                            self._copy_to_param(p, p_bin.reconstruct_w())
                    else:
                        self._copy_to_param(p, p_bin.basis_step(pg, ph, ste=mode == "ste"))
                    # alpha-domain statistics re-projected from the w domain, when next read (_alpha_state)
                    state["step_alpha"] += 1
                    self._reproject[p] = p_bin

            if pruning_rate is not None:
                self._prune(params_bin, group, importance, pruning_rate[1])
        return loss

    def _prune(self, params_bin, group, importance, M_p):
        """Rank the candidates of all layers by delta; prune the first int(#candidates * M_p)."""
        importance = [t for t in importance if t.numel()]
        if not importance:
            return
        importance_list = torch.cat(importance, 0)
        if self.legacy_tie_order:  # the original's torch.argsort on a CPU tensor in PyTorch 1.3 (legacy_sort.py)
            sorted_ind = legacy_argsort(importance_list[:, -1])
        else:  # equal deltas keep layer order, then each layer's own ranking
            sorted_ind = torch.argsort(importance_list[:, -1], stable=True)
        num_prune = int(sorted_ind.numel() * M_p)
        list_prune = importance_list[sorted_ind[:num_prune], :]
        for i, (p_bin, p) in enumerate(zip(params_bin, group["params"])):
            ind = torch.sort(list_prune[list_prune[:, 0] == p_bin.ind_layer, 1])[0].to(torch.int64)
            p_bin.prune_alpha(ind)
            p_bin.update_w_FP()
            self._copy_to_param(p, p_bin.w_FP)
