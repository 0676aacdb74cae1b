"""The original's SGD (`utils/optimizer.py` `SGD`) as it behaved under the torch it pinned (1.7.1).

Its step does, per parameter: `d = grad; d += wd p` (in place, into the gradient); momentum buffer
`buf = buf * m + (1 - dampening) d` (first step: `zeros * m + d`); `d = buf` (or `d + m buf` with Nesterov); then
for a quantized conv weight (the original's `idx`: names holding 'conv' and 'weight', the first one dropped)
`grad = d * approx * pdf` (a new tensor, never read again) and `p -= lr d`; for every other parameter
`grad = d` and `p -= lr d`. That last assignment makes the gradient *be* the momentum buffer, and torch 1.7's
in-place `zero_grad()` then zeroes the buffer before every backward, which accumulates the new gradient into it.
So from the second step on such a parameter gets `buf = g + wd p; buf = buf * m; buf = buf + (1 - dampening) buf`
and `p -= lr buf`: with m = 0.9 the update is 1.8 lr (g + wd p), no momentum. This class performs those float
operations in that order without relying on gradient storage (any `zero_grad` mode works): a parameter whose
buffer the original aliased re-reads its buffer as `0 + g` each step.
`standard=True` gives torch.optim.SGD's update for every parameter (same float operations as here for the
quantized weights).

Also the loops' optimizers (make_optimizer), their learning-rate schedules and the paper's gradient scaling."""
import bisect
import math

import torch
from torch.optim import Optimizer

from alignq.options import kind_of
from alignq.quant import weight_cdf


def quantized_indices(names, downsample=False):
    """The original's `idx`: positions of the names holding 'conv' and 'weight', without the first. The Office
    DANN/DSAN loops (`downsample=True`) also count 'downsample.0' (ResNet-50's shortcut convolution)."""
    return [i for i, n in enumerate(names)
            if ("conv" in n or (downsample and "downsample.0" in n)) and "weight" in n][1:]


class OriginalSGD(Optimizer):
    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 standard_idx=(), standard=False):
        """`standard_idx`: positions that behave as plain momentum SGD in the original (its quantized conv
        weights); every other parameter gets the aliased buffer. As the original's `i in idx`, a position counts
        within each parameter group (the Office loops' idx comes from the whole model's parameter list; their
        first group, the feature extractor, leads that list, and the heads' few positions hold no idx entry)."""
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov)
        super().__init__(params, defaults)
        self.standard_idx, self.standard = set(standard_idx), standard

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, m, damp, nesterov = group["weight_decay"], group["momentum"], group["dampening"], group["nesterov"]
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if state.get("aliased"):
                    # the buffer is the gradient storage: zeroed in place, then the backward added g to it
                    buf = state["momentum_buffer"]
                    buf.zero_().add_(p.grad)
                    d = buf
                else:
                    d = p.grad.clone() if m != 0 else p.grad
                if wd != 0:
                    d.add_(p, alpha=wd)
                if m != 0:
                    if "momentum_buffer" not in state:
                        buf = state["momentum_buffer"] = torch.zeros_like(p)
                        buf.mul_(m).add_(d)
                    else:
                        buf = state["momentum_buffer"]
                        buf.mul_(m).add_(d, alpha=1 - damp)
                    d = d.add(buf, alpha=m) if nesterov else buf
                p.add_(d, alpha=-group["lr"])
                # the original's `p.grad.data = d_p` for a non-quantized parameter: later steps see the buffer as
                # the gradient (only when d is the buffer itself: momentum without Nesterov)
                if (not self.standard and i not in self.standard_idx and m != 0 and not nesterov
                        and d is state["momentum_buffer"]):
                    state["aliased"] = True
        return loss


# ------------------------------------------------------------------------------------------------ the loops' optimizers


def scale_gradients(model, args):
    """--grad_scaling: the paper's intended weight-gradient scaling (dead code in the original's SGD):
    g <- g * lam * sig'(2 lam2 frac((w_hat + 0.5)(2^k - 1))) * 2 phi((w - mu) / sigma) / sigma, all quantized
    convolutions but the first."""
    n = 2 ** args.bitW - 1
    convs = [m for m in model.modules() if hasattr(m, "quantize_fn") and getattr(m, "w_bit", 32) < 32][1:]
    with torch.no_grad():
        for m in convs:
            w = m.weight
            if w.grad is None:
                continue
            w_hat = weight_cdf(w)
            sg = torch.sigmoid((((w_hat + 0.5) * n) % 1) * args.lam2 * 2)
            z = (w - w.mean()) / w.std()
            pdf = 2 * torch.exp(-0.5 * z * z) / (w.std() * math.sqrt(2 * math.pi))
            w.grad.mul_(sg * (1 - sg) * args.lam * pdf)


def cls_lr(args, epoch):
    return args.lr * args.lr_gamma ** bisect.bisect_right(args.lr_decay_steps, epoch)


def dann_lr(args, epoch):
    """lr / (1 + 10 (epoch - 1) / E)^0.75; where the base is <= 0 (epoch 0 with E <= 10: a math error or a division
    by zero in the original) epoch - 1 is taken as 0 (DEVIATIONS.md)."""
    base = 1 + 10 * (epoch - 1) / args.num_epochs
    if base <= 0:
        base = 1.0
    return args.lr / base ** 0.75


def make_optimizer(model, args, lr, admm_params):
    """SGD over the model; the ADMM Z/Gamma join it only in the domain-adaptation loops (as the original)."""
    if kind_of(args) == "cls":
        for n, p in model.named_parameters():   # Z/Gamma change only through the ADMM update here: no gradients
            if n in admm_params:
                p.requires_grad_(False)
        named = [(n, p) for n, p in model.named_parameters() if n not in admm_params]
        params = [p for _, p in named]
        if args.method == "ours" and args.bitW < 32:   # the original's own SGD (alignq/optim.py)
            return OriginalSGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                               standard_idx=quantized_indices([n for n, _ in named]), standard=args.standard_sgd)
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    heads = [getattr(model, n) for n in ("class_classifier", "classifier", "domain_classifier", "discriminator",
                                         "bottle", "cls_fc") if hasattr(model, n)]
    groups = [{"params": list(model.feature.parameters())}]
    groups += [{"params": list(h.parameters()), "lr": lr} for h in heads]
    seen = {id(p) for g in groups for p in g["params"]}
    other = [p for p in model.parameters() if id(p) not in seen]
    if other:
        groups.append({"params": other, "lr": lr})
    if args.experiment in ("dann_office", "dsan_office") and args.method == "ours" and args.bitW < 32:
        # the original's own SGD, as its Office train() (dann_digit uses torch's); its idx is taken over the
        # whole model's named parameters, Z/Gamma included, and read per group (alignq/optim.py)
        idx = quantized_indices([n for n, _ in model.named_parameters()], downsample=True)
        return OriginalSGD(groups, lr=lr / 10, momentum=args.momentum, weight_decay=args.weight_decay,
                           standard_idx=idx, standard=args.standard_sgd)
    return torch.optim.SGD(groups, lr=lr / 10, momentum=args.momentum, weight_decay=args.weight_decay)
