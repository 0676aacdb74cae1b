"""The clipping thresholds alpha of every quantized convolution, for the training logs.

The originals print one 'clipping threshold weight alpha: ..., activation alpha: ...' line per layer every few
epochs (`show_params`, still what `-e` prints). During training each layer's pair goes to log.txt and to
tensorboard (`alpha/<layer>/weight`, `alpha/<layer>/act`), and the console gets one line with their ranges.
"""


def clipping_thresholds(model):
    """[(layer name, weight alpha, activation alpha)] of the quantized convolutions of either generation
    (ImageNet/MNIST: `weight_alpha`; CIFAR-10: `weight_quant.wgt_alpha`)."""
    net = model.module if hasattr(model, "module") else model
    out = []
    for name, m in net.named_modules():
        act = getattr(m, "act_alpha", None)
        wgt = getattr(m, "weight_alpha", None)
        if wgt is None and hasattr(m, "weight_quant"):
            wgt = getattr(m.weight_quant, "wgt_alpha", None)
        if act is None or wgt is None or getattr(m, "_bit", None) == 32:
            continue
        out.append((name, float(wgt.detach()), float(act.detach())))
    return out


def log_clipping(model, log, step):
    """Each layer's alphas to log.txt (not the console) and tensorboard; one summary line on the console."""
    layers = clipping_thresholds(model)
    if not layers:
        return
    for name, w, a in layers:
        log.detail(f"clipping threshold {name}: weight alpha {w:.3f}, activation alpha {a:.3f}")
        log.scalar(f"alpha/{name}/weight", w, step)
        log.scalar(f"alpha/{name}/act", a, step)
    ws, acts = [w for _, w, _ in layers], [a for _, _, a in layers]
    log.info(f"clipping thresholds of {len(layers)} layers: weight alpha {min(ws):.3f}..{max(ws):.3f}, "
             f"activation alpha {min(acts):.3f}..{max(acts):.3f} (each layer in log.txt and tensorboard)")
