"""DSAN (Zhu et al.) on the AlignQ ResNet-50, as the original's cdf_alignment[_admm]/dsan_office: bottleneck
Linear(2048, 256) -> cls_fc(256, 31), loss = CE + param * lambda(p) * LMMD(source, target), lambda(p) the
DANN schedule 2 / (1 + exp(-10 p) + 1e-6) - 1 and param = --param (default 0.3, the original's)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from alignq.models import ResNet50, grl_alpha
from alignq.quant import admm_loss

PARAM = 0.3


class DSAN(nn.Module):
    def __init__(self, feature, num_classes=31, bottle_neck=True):
        super().__init__()
        self.feature = feature
        self.bottle = nn.Linear(2048, 256) if bottle_neck else nn.Identity()
        self.cls_fc = nn.Linear(256 if bottle_neck else 2048, num_classes)

    def embed(self, x):
        return self.bottle(self.feature(x))

    def forward(self, x, alpha=None):
        return self.cls_fc(self.embed(x))


def resnet50_dsan(s, num_classes=31, bottle_neck=True):
    return DSAN(ResNet50(s), num_classes, bottle_neck)


def gaussian_kernel(source, target, kernel_mul=2.0, kernel_num=5):
    """Sum of 5 Gaussian kernels, bandwidths mean pairwise distance * 2^(i - 2) (no gradient to the bandwidth)."""
    total = torch.cat([source, target], dim=0)
    n = total.shape[0]
    d2 = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    bandwidth = d2.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    return sum(torch.exp(-d2 / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))


def lmmd(source, target, s_label, t_prob, num_classes=31):
    """Local MMD with class weights: source one-hot and target soft labels, each normalised by its class sum
    (empty classes: sum 100), restricted to classes present in the source labels and the target argmax."""
    b = source.shape[0]
    s_vec = F.one_hot(s_label, num_classes).to(source.dtype)
    s_sum = s_vec.sum(0, keepdim=True)
    s_vec = s_vec / torch.where(s_sum == 0, torch.full_like(s_sum, 100.0), s_sum)
    t_vec = t_prob.detach()
    t_sum = t_vec.sum(0, keepdim=True)
    t_vec = t_vec / torch.where(t_sum == 0, torch.full_like(t_sum, 100.0), t_sum)
    present = (F.one_hot(s_label, num_classes).sum(0) > 0) & (F.one_hot(t_prob.argmax(1), num_classes).sum(0) > 0)
    m = present.to(source.dtype)
    count = m.sum().clamp(min=1)          # no common class: all weights 0, loss 0 (as the original)
    w_ss = (s_vec * m) @ s_vec.t() / count
    w_tt = (t_vec * m) @ t_vec.t() / count
    w_st = (s_vec * m) @ t_vec.t() / count
    k = gaussian_kernel(source, target)
    loss = (w_ss * k[:b, :b] + w_tt * k[b:, b:] - 2 * w_st * k[:b, b:]).sum()
    return torch.nan_to_num(loss, nan=0.0)   # the original returns 0 when a kernel is NaN


def dsan_step(model, xs, ys, xt, p, admm_on, param=PARAM):
    """Forward of one DSAN iteration: (source logits, param * lambda(p) * LMMD, ADMM src, ADMM tgt)."""
    b = min(len(xs), len(xt))             # a shorter last batch on either side: pair the first b samples
    xs, ys, xt = xs[:b], ys[:b], xt[:b]
    fs = model.embed(xs)
    extra_s = admm_loss(model) if admm_on else None
    ft = model.embed(xt)
    extra_t = admm_loss(model) if admm_on else None
    s_pred = model.cls_fc(fs)
    loss = lmmd(fs, ft, ys, F.softmax(model.cls_fc(ft), dim=1), s_pred.shape[1])
    return s_pred, param * grl_alpha(p) * loss, extra_s, extra_t
