"""Import the ALQ modules (original-style top-level names: train, binarynet, ...) without clashing with
another paper's modules of the same name in the same pytest process."""
import importlib
import os
import sys

ALQ_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alq")
NAMES = ("legacy_sort", "binarynet", "myoptimizer", "pack", "train", "lenet5", "vgg", "resnet")


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
