"""The ALQ modules (the package alq: alq.train, alq.binarynet, ...) as one namespace, A.train, A.binarynet, ..."""
import importlib
import os

ALQ_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alq")
NAMES = ("legacy_sort", "search", "native", "fastpath", "binarynet", "myoptimizer", "pack", "distributed", "options",
         "checkpoints", "train", "stages", "lenet5", "vgg", "resnet")


def load():
    """A namespace of the ALQ modules (the modules themselves, imported once per process)."""
    return type("ALQ", (), {n: importlib.import_module(f"alq.{n}") for n in NAMES})


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
