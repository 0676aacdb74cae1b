"""Histogram of one layer's normalised full-precision weights with its quantization levels overlaid.

    python visualize.py --checkpoint checkpoint/res18_5best.pth.tar --out weight_visual.png
    python visualize.py --checkpoint ../MNIST/result/resnet10_4bit/model_best.pth.tar --layer layer2.0.conv1

Reads any APoT checkpoint without building the model: new-generation keys (`<layer>.weight_alpha`,
ImageNet/MNIST) or old ones (`<layer>.weight_quant.wgt_alpha`, CIFAR10), a flat or nested state dict,
with or without the `module.` prefix. The weights are normalised as the quantizer does,
w^ = (w - mean(w)) / std(w); the levels drawn are alpha * (+-Q^a(1, b-1)) for b > 2 (APoT), the ternary
{-alpha, 0, alpha} for b = 2, or alpha * k / (2^(b-1) - 1) for uniform quantization.
"""
import argparse
import os
import re

import matplotlib
import torch

from apot.apot_levels import build_power_value
from common.checks import check_writable_file
from common.checkpoint import extract_state_dict, load_checkpoint, strip_module_prefix
from common.errors import UserError, cli

matplotlib.use("Agg")                    # no display: files only; pyplot must come after the backend is chosen
import matplotlib.pyplot as plt  # noqa: E402

ALPHA_SUFFIXES = (".weight_alpha", ".weight_quant.wgt_alpha")

parser = argparse.ArgumentParser(description="APoT weight histogram with quantization levels")
parser.add_argument("--checkpoint", default="checkpoint/res18_5best.pth.tar", metavar="PATH",
                    help="any APoT checkpoint (default: checkpoint/res18_5best.pth.tar)")
parser.add_argument("--layer", default=None, help="quantized conv to draw, e.g. layer2.0.conv1 (default: a middle one)")
parser.add_argument("--bit", default=None, type=int,
                    help="weight bit-width (default: the checkpoint's 'bit', else '<b>bit' in the path)")
parser.add_argument("--power", default=None, type=int, choices=(0, 1),
                    help="APoT (1) or uniform (0) levels (default: the checkpoint's, else 0 iff 'uniform' in the path)")
parser.add_argument("--bins", default=200, type=int, help="histogram bins (default: 200)")
parser.add_argument("--out", default="weight_visual.png", help="output PNG (default: weight_visual.png)")


def quantized_layers(state_dict):
    """{layer name: (weight, alpha)} for every conv with a weight clipping parameter, in file order."""
    layers = {}
    for key, alpha in state_dict.items():
        for suffix in ALPHA_SUFFIXES:
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                w = state_dict.get(name + ".weight")
                if isinstance(w, torch.Tensor) and w.dim() == 4:
                    layers[name] = (w.float(), float(alpha))
    return layers


def weight_levels(bit, power, alpha):
    """The values alpha * level a normalised weight can take at `bit` bits (sorted)."""
    if bit == 2:
        levels = torch.tensor([-1.0, 0.0, 1.0])
    elif power:
        pos = build_power_value(bit - 1, additive=True)
        levels = torch.cat([-pos, pos])
    else:
        steps = 2 ** (bit - 1) - 1
        levels = torch.arange(-steps, steps + 1, dtype=torch.float32) / steps
    return torch.unique(levels * alpha)


def infer(args, ckpt):
    bit, power = args.bit, args.power
    if bit is None and isinstance(ckpt, dict) and isinstance(ckpt.get("bit"), int):
        bit = ckpt["bit"]
    if bit is None:
        m = re.search(r"(\d+)bit", os.path.basename(os.path.dirname(args.checkpoint)) + os.path.basename(args.checkpoint))
        m = m or re.search(r"_(\d+)(?:uniform_)?(?:best|checkpoint)", os.path.basename(args.checkpoint))
        bit = int(m.group(1)) if m else None
    if bit is None:
        raise UserError(f"cannot tell the bit-width of {args.checkpoint}; pass --bit")
    if power is None:
        power = ckpt.get("power") if isinstance(ckpt, dict) and isinstance(ckpt.get("power"), bool) else None
        power = int("uniform" not in args.checkpoint) if power is None else int(power)
    if not 2 <= bit <= 6 and not (bit <= 16 and not power):
        raise UserError(f"--bit {bit}: no quantized weights to draw (use 2..6, or up to 16 with --power 0)")
    return bit, bool(power)


def main():
    args = parser.parse_args()
    check_writable_file(args.out, "--out")                 # before the checkpoint is read
    ckpt = load_checkpoint(args.checkpoint, what="checkpoint", flag="--checkpoint")
    sd = strip_module_prefix(extract_state_dict(ckpt))
    layers = quantized_layers(sd)
    if not layers:
        raise UserError(f"{args.checkpoint} has no quantized conv layers (no *.weight_alpha or "
                        f"*.weight_quant.wgt_alpha keys); is it a full-precision checkpoint?")
    names = list(layers)
    name = args.layer or names[len(names) // 2]
    if name not in layers:
        raise UserError(f"no quantized layer {name!r} in {args.checkpoint}; choose one of "
                        f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
    bit, power = infer(args, ckpt)
    w, alpha = layers[name]
    w_hat = (w - w.mean()) / w.std()                      # the quantizer's normalisation (unbiased std)
    levels = weight_levels(bit, power, alpha)

    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    ax.hist(w_hat.flatten().numpy(), bins=args.bins, color="#4c72b0", alpha=0.75, label="normalised weights")
    for i, v in enumerate(levels.tolist()):
        ax.axvline(v, color="#dd5555", lw=0.8, label="levels" if i == 0 else None)
    for s in (-abs(alpha), abs(alpha)):
        ax.axvline(s, color="black", ls="--", lw=1.0, label="clipping ±alpha" if s < 0 else None)
    kind = "APoT" if power and bit > 2 else ("ternary" if bit == 2 else "uniform")
    ax.set_title(f"{name}: {tuple(w.shape)}, {bit}-bit {kind} weights, alpha = {alpha:.3f}")
    ax.set_xlabel("normalised weight")
    ax.set_ylabel("count")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    print(f"{name} ({bit}-bit {kind}, alpha {alpha:.3f}, {levels.numel()} levels) -> {args.out}")


if __name__ == "__main__":
    cli(main)()
