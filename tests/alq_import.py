"""Import the ALQ modules (original-style top-level names: train, binarynet, ...) without clashing with
another paper's modules of the same name in the same pytest process."""
import importlib
import os
import sys

ALQ_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alq")
NAMES = ("legacy_sort", "binarynet", "myoptimizer", "pack", "distributed", "options", "checkpoints", "train",
         "stages", "lenet5", "vgg", "resnet")


def load():
    """Return a namespace of the ALQ modules; sys.modules is left as it was."""
    saved = {n: sys.modules.pop(n) for n in NAMES if n in sys.modules}
    sys.path.insert(0, ALQ_DIR)
    try:
        mods = {n: importlib.import_module(n) for n in NAMES}
    finally:
        sys.path.remove(ALQ_DIR)
        for n in NAMES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    return type("ALQ", (), mods)


def lenet5_with_holes(A, seed, mask_seed, keep, random_alpha=False):
    """A LeNet5 and its ALQ layers (the script's default structures) with about `keep` of the mask slots left, as
    after pruning; random_alpha: arbitrary (also negative) coordinates, as after training. Seeded."""
    import torch
    torch.manual_seed(seed)
    net = A.lenet5.LeNet5()
    d = A.lenet5.DEFAULTS
    _, _, layers = A.train.initialize(net, d["structure"], d["subc"], d["max_bit"])
    g = torch.Generator().manual_seed(mask_seed)
    for layer in layers:
        layer.mask &= torch.rand(layer.mask.shape, generator=g) < keep
        layer.B = layer.B * layer.mask.to(torch.int8)
        if random_alpha:
            layer.alpha = torch.randn(layer.alpha.shape, generator=g) * layer.mask
    return net, layers
