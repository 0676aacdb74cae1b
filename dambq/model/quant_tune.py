"""Module swap and loss-aware bit-width allocation (LBA, paper §3.3).

    tuner = QuantTune(model, wgt_target=2.0, act_target=2.0, duration=(0, 150), input_size=(3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), ...)       # after the swap: includes every alpha_act
    for epoch in range(epochs):
        tuner.quantize_cur = duration[0] <= epoch <= duration[1]   # accumulate errors during this epoch
        train(...)                                                 # an ordinary loop: errors come from backward
        if tuner.quantize_cur:
            tuner.sort_and_tune(epoch)                             # drop one bit from the least sensitive groups

The first and last layers (found by running the model once: the first and the last Conv2d/Linear to execute)
become 8-bit FirstConv2d/LastLinear; every other nn.Conv2d/nn.Linear becomes QuantConv2d/QuantLinear at 4/4 bits,
sharing the original weight (and bias) Parameters.
"""
import math

import torch
import torch.nn as nn

from common.runlog import epoch_label

from dambq.model.quant_layers import MAX_BIT, FirstConv2d, LastLinear, QuantConv2d, QuantLinear

SLACK = 0.07            # bits are only decremented while the average exceeds target + SLACK
RATIO_START = 0.01      # fraction of all groups decremented at the first epoch of the window ...
TUNE_RATIO_RANGE = 0.3  # ... growing linearly to this at its last epoch


def probe_layers(model, input_size):
    """Run `model` once (eval, no grad, zeros of shape (1, *input_size)) and return the nn.Conv2d/nn.Linear
    modules' names in execution order and each one's per-sample input shape. Modes and RNG are untouched."""
    order, shapes, hooks = [], {}, []
    modes = {m: m.training for m in model.modules()}
    for name, m in model.named_modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            def hook(mod, inputs, name=name):
                if name not in shapes:
                    order.append(name)
                    shapes[name] = tuple(inputs[0].shape[1:])
            hooks.append(m.register_forward_pre_hook(hook))
    p = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_size), dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if not order:
        raise ValueError("the model has no nn.Conv2d or nn.Linear layer to quantize")
    return order, shapes


def convert2quant_module(model, names_8bit, shapes, bit_wgt=4, bit_act=4, layerwise=False, fc_groups_wgt=None,
                         fc_groups_act=None, keep_last_bias=False, prefix=''):
    """Replace every nn.Conv2d/nn.Linear (exact type) in place; `names_8bit` get FirstConv2d/LastLinear.

    Weights and biases are shared with the float layers; only the 8-bit Linear (the classifier) drops its bias
    unless `keep_last_bias` (the original drops it, see DEVIATIONS.md)."""
    for name, child in model.named_children():
        full = prefix + name
        if type(child) is nn.Conv2d:
            kw = dict(stride=child.stride, padding=child.padding, dilation=child.dilation, groups=child.groups,
                      bias=child.bias is not None, padding_mode=child.padding_mode,
                      device=child.weight.device, dtype=child.weight.dtype)
            if full in names_8bit:
                new = FirstConv2d(child.in_channels, child.out_channels, child.kernel_size, **kw)
            else:
                new = QuantConv2d(child.in_channels, child.out_channels, child.kernel_size, bit_wgt=bit_wgt,
                                  bit_act=bit_act, layerwise=layerwise, **kw)
        elif type(child) is nn.Linear:
            kw = dict(device=child.weight.device, dtype=child.weight.dtype)
            if full in names_8bit:
                new = LastLinear(child.in_features, child.out_features,
                                 bias=keep_last_bias and child.bias is not None, **kw)
            else:
                new = QuantLinear(child.in_features, child.out_features, groups_wgt=fc_groups_wgt,
                                  groups_act=fc_groups_act, bit_wgt=bit_wgt, bit_act=bit_act, layerwise=layerwise,
                                  bias=child.bias is not None, **kw)
        else:
            convert2quant_module(child, names_8bit, shapes, bit_wgt, bit_act, layerwise, fc_groups_wgt,
                                 fc_groups_act, keep_last_bias, full + '.')
            continue
        new.weight = child.weight
        if new.bias is not None:
            new.bias = child.bias
        # the new module starts in train mode whatever the float module's mode was, as the original's
        if isinstance(new, QuantConv2d) and full in shapes:
            new.act_numel = math.prod(shapes[full])
        setattr(model, name, new)
    return model


class QuantTune:
    """Quantizes `model` in place and allocates its bits (LBA). See the module docstring for the loop.

    wgt_target / act_target: average bits to reach (decrements stop at target + 0.07); duration: the inclusive
    epoch window (d0, d1) of the allocation; input_size: one sample's shape, to find the first/last layers and
    count activation elements; names_8bit: override the first/last layer names.
    """

    def __init__(self, model, wgt_target, act_target, tune_ratio_range=TUNE_RATIO_RANGE, layerwise=False,
                 duration=(0, 10), logger=None, input_size=(3, 32, 32), names_8bit=None, keep_last_bias=False,
                 fc_groups_wgt=None, fc_groups_act=None, bit_init=MAX_BIT):
        d0, d1 = duration
        if not d1 > d0:
            raise ValueError(f"duration must be two increasing epochs, got {tuple(duration)}")
        self.model = model
        self.wgt_target = wgt_target + SLACK
        self.act_target = act_target + SLACK
        self.tune_ratio_range = tune_ratio_range
        self.duration = (d0, d1)
        self.logger = logger
        order, shapes = probe_layers(model, input_size)
        self.first_last_module_name = list(names_8bit) if names_8bit else [order[0], order[-1]]
        convert2quant_module(model, self.first_last_module_name, shapes, bit_init, bit_init, layerwise,
                             fc_groups_wgt, fc_groups_act, keep_last_bias)
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
        self.groups_wgt = sum(m.groups_wgt for _, m in self.layers)
        self.groups_act = sum(m.groups_act for _, m in self.layers)
        self._quantize_cur = False
        self.epochs = None     # the run's number of epochs, for the log line (`LBA after epoch 3/300`)
        self.load_bit_config()

    # ------------------------------------------------------------------ error accumulation switch
    @property
    def quantize_cur(self):
        """True while errors accumulate (every backward of a training forward adds to the group errors)."""
        return self._quantize_cur

    @quantize_cur.setter
    def quantize_cur(self, on):
        """Errors are only collected while an average is still above its target + 0.07: below it no bit can
        change any more (bits only decrease), so skipping them leaves every result as the original's."""
        self._quantize_cur = bool(on)
        collect = False
        if self._quantize_cur:
            w, x = self.compute_avg_bit()
            collect = w > self.wgt_target or x > self.act_target
        for _, m in self.layers:
            m.collect = collect

    def in_window(self, epoch):
        return self.duration[0] <= epoch <= self.duration[1]

    def init_err_buffer(self):
        for _, m in self.layers:
            m.reset_err()

    @property
    def w_err_total(self):
        return torch.cat([m.w_err for _, m in self.layers])

    @property
    def x_err_total(self):
        return torch.cat([m.x_err for _, m in self.layers])

    # ------------------------------------------------------------------ bits
    def group_numels(self):
        """Elements per weight group and per activation group, one entry per group (LBA order)."""
        dev = self.layers[0][1].bit_wgt.device
        w = torch.cat([torch.full((m.groups_wgt,), m.wgt_group_numel, device=dev) for _, m in self.layers])
        x = torch.cat([torch.full((m.groups_act,), m.act_group_numel, device=dev) for _, m in self.layers])
        return w, x

    def compute_avg_bit(self):
        """(weights, activations): Σ elements·bits / Σ elements over the QuantConv2d/QuantLinear layers (the
        8-bit first/last layers excluded), exact integer sums divided once."""
        w_bits = w_num = x_bits = x_num = 0
        for _, m in self.layers:
            w_bits += int(m.bit_wgt.sum()) * m.wgt_group_numel
            x_bits += int(m.bit_act.sum()) * m.act_group_numel
            w_num += m.wgt_group_numel * m.groups_wgt
            x_num += m.act_group_numel * m.groups_act
        self.w_bit_avg, self.x_bit_avg = w_bits / w_num, x_bits / x_num
        return self.w_bit_avg, self.x_bit_avg

    def load_bit_config(self):
        self.bit_wgt = torch.cat([m.bit_wgt for _, m in self.layers]).clone()
        self.bit_act = torch.cat([m.bit_act for _, m in self.layers]).clone()

    def save_bit_config(self):
        iw = ia = 0
        for _, m in self.layers:
            m.bit_wgt.copy_(self.bit_wgt[iw:iw + m.groups_wgt])
            m.bit_act.copy_(self.bit_act[ia:ia + m.groups_act])
            iw += m.groups_wgt
            ia += m.groups_act
            m.update_quant_points()

    def tune_ratio(self, epoch):
        d0, d1 = self.duration
        return (self.tune_ratio_range - RATIO_START) * (epoch - d0) / (d1 - d0) + RATIO_START

    @staticmethod
    def least_sensitive(err, k):
        """Indices of the k smallest errors, chosen by the original's own call on the same 1-D tensor (all groups
        of all layers, in layer order), so that equal errors at the boundary pick the groups the original picks:
        which of tied groups topk returns is torch's implementation detail, not the lower index."""
        return torch.topk(err, k, largest=False)[1]

    def sort_and_tune(self, epoch):
        """One LBA step: while an average exceeds its target + 0.07, the int(ratio·groups) groups with the
        smallest accumulated error (ranked across all layers) lose one bit (not below 0). Errors are reset.
        Returns {'act'/'wgt': (groups decremented, elements that lost a bit)}."""
        ratio = self.tune_ratio(epoch)
        self.load_bit_config()
        self.compute_avg_bit()
        w_numel, x_numel = self.group_numels()
        changed = {}
        for kind, avg, target, bits, err, numel in (
                ('act', self.x_bit_avg, self.act_target, self.bit_act, self.x_err_total, x_numel),
                ('wgt', self.w_bit_avg, self.wgt_target, self.bit_wgt, self.w_err_total, w_numel)):
            if avg > target:
                idx = self.least_sensitive(err, int(len(err) * ratio))
                idx = idx[bits[idx] > 0]                       # a 0-bit group stays at 0 (the original's clamp)
                bits[idx] -= 1
                changed[kind] = (len(idx), int(numel[idx].sum()))
        self.save_bit_config()
        self.init_err_buffer()
        if self.logger is not None and changed:
            when = epoch_label(epoch, self.epochs) if self.epochs else f'epoch {epoch + 1}'
            self.logger(f"LBA after {when}: ratio {ratio:.5f}; " + "; ".join(
                f"{k}: {n} groups -1 bit ({e:,} elements)" for k, (n, e) in changed.items()))
        return changed

    # ------------------------------------------------------------------ reports and run state
    def show_avg_bit(self):
        lines = []
        for name, m in self.layers:
            bw, ba = m.bit_wgt.float(), m.bit_act.float()
            lines.append(f"{name} bw_avg:{bw.mean():.2f} ba_avg:{ba.mean():.2f}  bw_min:{bw.min():.1f} "
                         f"ba_min:{ba.min():.1f} aw_min:{m.alpha_wgt.min():.3f} aa_min:{m.alpha_act.min():.3f}")
        return lines

    def bit_summary(self):
        """One line for the console: average bits and how many groups sit at each bit-width (weights, then
        activations), e.g. `weights 3.5042 avg (538 groups at 4, 229 at 3, 1 at 2), activations ...`."""
        w, x = self.compute_avg_bit()
        parts = []
        for what, avg, bits in (('weights', w, torch.cat([m.bit_wgt for _, m in self.layers])),
                                ('activations', x, torch.cat([m.bit_act for _, m in self.layers]))):
            values, counts = torch.unique(bits.long(), return_counts=True)
            hist = [f'{int(c)} at {int(v)}' for v, c in sorted(zip(values.tolist(), counts.tolist()), reverse=True)]
            hist[0] = hist[0].replace(' at ', ' groups at ', 1)
            parts.append(f'{what} {avg:.4f} avg ({", ".join(hist)})')
        return ', '.join(parts)

    def state(self, errors=False):
        """What module buffers do not hold: which layers' alpha_wgt EMA has started (for an exact continuation)
        and, with errors=True (a checkpoint in the middle of an epoch), the LBA errors accumulated so far."""
        state = {'ema_init': [bool(m.init) for _, m in self.layers]}
        if errors:
            state['w_err'] = [m.w_err.detach().clone() for _, m in self.layers]
            state['x_err'] = [m.x_err.detach().clone() for _, m in self.layers]
        return state

    def load_state(self, state):
        for (_, m), flag in zip(self.layers, state['ema_init']):
            m.init = bool(flag)
        for key in ('w_err', 'x_err'):
            for (_, m), err in zip(self.layers, state.get(key) or ()):
                getattr(m, key).copy_(err)
        self.load_bit_config()
