"""A tiny ImageNet-style ImageFolder of random images, for smoke runs and tests (nothing is downloaded).

    python smoke_data.py OUT_DIR [--classes 4] [--train 2] [--val 2] [--size 64]

Writes OUT_DIR/train/c000/*.png, OUT_DIR/val/c000/*.png ...; each class has its own mean colour.
"""
import argparse
import os

import numpy as np
from PIL import Image


def make(root, classes=4, train=2, val=2, size=64, seed=0):
    rng = np.random.RandomState(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = os.path.join(root, split, f"c{c:03d}")
            os.makedirs(d, exist_ok=True)
            base = rng.randint(0, 256, size=3)
            for i in range(n):
                img = np.clip(base + rng.randint(-60, 61, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"img{i:03d}.png"))
    return root


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--train", type=int, default=2)
    p.add_argument("--val", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    print(make(a.root, a.classes, a.train, a.val, a.size))
