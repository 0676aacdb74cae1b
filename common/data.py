"""Dataset builders shared by the five papers: MNIST, Fashion-MNIST, CIFAR-10, SVHN, ImageNet, Office-31.

Each builder takes the folder the paper's data flag names and a transform (transforms stay in the
papers) and returns a torch Dataset whose items are `(transform(PIL image), int label)`. Missing or
malformed data raises `common.errors.UserError` with one line naming the dataset, the path, the
accepted layouts and the flag to pass (`flag="--data"` by default; `--data_dir`, `--dataPath` ...).

Nothing is ever written under the data root (it may be read-only) except by `download=True`, which
asks torchvision to download there. CIFAR-10 class-folder PNGs are decoded once and cached as .npz in
`$QUANTLAB_CACHE` (default `~/.cache/quantlab`).

Every dataset reports its size against the official one: `len(ds)`, `ds.n_official`, `ds.is_subset`
and `ds.size_note` (e.g. "1,000 of the 10,000 official CIFAR-10 test images").

This module holds the folder datasets read on access (ImageNet, Office-31) and re-exports the rest, so every
builder is imported from here: common.data_arrays builds the in-memory ones (MNIST, Fashion-MNIST, CIFAR-10,
SVHN), common.data_base holds the dataset classes and the helpers the builders share, common.data_cache the
decoding cache.
"""
import copy
import os

import numpy as np
from PIL import Image  # noqa: F401 - PIL's module, also read as common.data.Image (the tests patch Image.open)
from torch.utils.data import Subset

from common.data_arrays import (  # noqa: F401 - re-exported: the builders of in-memory datasets
    CIFAR10_CLASSES, CIFAR_PICKLE_GLOBALS, FASHION_CLASSES, cifar10, fashion_mnist, load_cifar_pickle, mnist, svhn)
from common.data_base import (  # noqa: F401 - ArrayDataset and ImageDataset re-exported
    IMG_EXTENSIONS, ArrayDataset, FolderDataset, ImageDataset, _images_in, _locate, _root, _scan_classes, _Source,
    _subdirs)
from common.errors import UserError
from common.paths import DATA_ENV, cache_dir, data_root  # noqa: F401 - the data root and cache, re-exported

OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")
OFFICE31_SIZES = {"amazon": 2817, "dslr": 498, "webcam": 795}


# ---------------------------------------------------------------------------------------------
# ImageNet


def _ilsvrc_ids(src, labels_path):
    """ILSVRC2012_ID -> wnid from the devkit file next to `labels_path`: map_clsloc.txt or meta.mat."""
    d = os.path.dirname(os.path.abspath(labels_path))
    clsloc, meta = os.path.join(d, "map_clsloc.txt"), os.path.join(d, "meta.mat")
    if os.path.isfile(clsloc):  # lines "n02119789 1 kit_fox"
        with open(clsloc) as f:
            return {int(p[1]): p[0] for p in (line.split() for line in f) if len(p) >= 2}
    if os.path.isfile(meta):
        try:
            from scipy.io import loadmat
        except ImportError:
            raise UserError(f"ImageNet: reading {meta} needs the Python package scipy, which is not installed; "
                            f"install it (`pip install scipy`) or put map_clsloc.txt next to {labels_path}") from None
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    raise src.bad(f"{labels_path} holds bare integers, i.e. 1-based ILSVRC2012_IDs (not sorted-wnid indices), "
                  f"but neither the devkit's meta.mat nor map_clsloc.txt is next to it to map them to wnids")


def _flat_val_labels(src, labels_path, files, classes):
    """Labels (indices into the returned classes) for the flat val `files`; formats: see `imagenet`."""
    if not os.path.isfile(labels_path):
        raise src.bad(f"val labels file {labels_path} does not exist")
    with open(labels_path) as f:
        rows = [line.split() for line in f if line.strip()]
    if rows and all(len(r) == 1 for r in rows):
        if len(rows) != len(files):
            raise src.bad(f"{labels_path} has {len(rows)} labels for {len(files)} images")
        values, by_index = [r[0] for r in rows], False
    elif rows and all(len(r) == 2 for r in rows):
        by_name = {os.path.basename(r[0]): r[1] for r in rows}
        unlabeled = [f for f in files if f not in by_name]
        if unlabeled:
            raise src.bad(f"{labels_path} has no label for {unlabeled[0]} ({len(unlabeled)} images unlabeled)")
        values, by_index = [by_name[f] for f in files], True
    else:
        raise src.bad(f"{labels_path} must hold one label per line or '<file> <label>' lines")
    if all(v.isdigit() for v in values):
        if by_index:  # Caffe's val.txt: 0-based indices in sorted-wnid order
            labels = [int(v) for v in values]
            if classes and max(labels) >= len(classes):
                raise src.bad(f"{labels_path} has class index {max(labels)} but there are {len(classes)} classes")
            return classes or [str(i) for i in range(max(labels) + 1)], labels
        ids = _ilsvrc_ids(src, labels_path)
        if any(int(v) not in ids for v in values):
            raise src.bad(f"{labels_path} has ILSVRC2012_IDs missing from the devkit map")
        values, classes = [ids[int(v)] for v in values], classes or sorted(ids.values())
    classes = classes or sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise src.bad(f"{labels_path} names {unknown[0]}, which is not a class folder in train/")
    return classes, [index[v] for v in values]


def imagenet(root, split="train", transform=None, val_labels=None, flag="--data"):
    """ImageNet as ImageFolder: `<root>/train/<wnid>/*.JPEG`, `<root>/val/<wnid>/*.JPEG` (PIL loading), or the
    same under `<root>/imagenet/`.

    Labels are indices into the sorted wnids of `train/` when it exists (so a partial val/ still
    matches a 1000-way model), else of the split's own folders.

    A flat `val/ILSVRC2012_val_*.JPEG` folder needs `val_labels=FILE`, labelling the images in sorted
    file-name order. Accepted FILE contents (blank lines ignored):
      - one wnid per line (`n01751748`), or `<file name> <wnid>` lines;
      - `<file name> <index>` lines, index 0-based in sorted-wnid order (Caffe's val.txt);
      - one integer per line = the devkit's ILSVRC2012_validation_ground_truth.txt, i.e. 1-based
        ILSVRC2012_IDs, which are NOT sorted-wnid indices: they are mapped through the devkit's
        `meta.mat` (needs scipy) or `map_clsloc.txt` lying next to FILE.
    """
    if split not in ("train", "val"):
        raise UserError(f"unknown ImageNet split {split!r}: choose train or val")
    root = _root(root)
    if not os.path.isdir(os.path.join(root, split)) and os.path.isdir(os.path.join(root, "imagenet", split)):
        root = os.path.join(root, "imagenet")        # a data root holding several datasets
    d = os.path.join(root, split)
    src = _Source("ImageNet", root, "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (ImageFolder), "
                                    "or a flat val/*.JPEG plus a val labels file", flag)
    if not os.path.isdir(d):
        raise src.missing()
    train_dir = os.path.join(root, "train")
    classes = _subdirs(train_dir) if split == "val" and os.path.isdir(train_dir) else None
    if _subdirs(d):
        classes, samples = _scan_classes(src, d, classes=classes)
    else:
        files = _images_in(d, IMG_EXTENSIONS)
        if not files:
            raise src.bad(f"{d} holds neither <wnid>/ class folders nor images")
        if val_labels is None:
            raise src.bad(f"{d} is a flat folder of {len(files)} images without class folders; sort them into "
                          f"val/<wnid>/ folders or give the ground-truth file (val_labels=FILE, see common/data.py)")
        classes, labels = _flat_val_labels(src, os.fspath(val_labels), files, classes)
        samples = [(os.path.join(d, f), t) for f, t in zip(files, labels)]
    return FolderDataset(samples, name="ImageNet", split=split, root=root, classes=classes, transform=transform,
                         n_official=1281167 if split == "train" else 50000)


# ---------------------------------------------------------------------------------------------
# Office-31


def office31(root, domain, transform=None, flag="--data"):
    """Office-31 domain `amazon|dslr|webcam` from `<root>/<domain>/images/<class>/*.jpg`
    (or `<root>/office31/<domain>/images/...`); 31 classes in sorted order, files sorted by name."""
    if domain not in OFFICE31_DOMAINS:
        raise UserError(f"unknown Office-31 domain {domain!r}: choose amazon, dslr or webcam")
    root = _root(root)
    src = _Source("Office-31", root, f"{domain}/images/<class>/*.jpg (31 classes)", flag)
    d = _locate(src, lambda: next((p for p in (os.path.join(root, domain, "images"),
                                               os.path.join(root, "office31", domain, "images"))
                                   if os.path.isdir(p)), None))
    classes, samples = _scan_classes(src, d)
    if len(classes) != 31:
        raise src.bad(f"{d} has {len(classes)} class folders, Office-31 has 31")
    return FolderDataset(samples, name="Office-31", split=domain, root=root, classes=classes,
                         transform=transform, n_official=OFFICE31_SIZES[domain])


def office31_split(dataset, train_fraction=0.8, seed=1, test_transform=None):
    """AlignQ's split.py 80/20 per-class split: (train_subset, test_subset).

    For each class (files in sorted order) NumPy is re-seeded with `seed` (split.py's default is 1)
    and `int(n * train_fraction)` of the class's n files are drawn for training; the rest are test.
    `test_transform`, when given, replaces the transform on the test side (the original applies a
    different one to its test folder).
    """
    targets = np.asarray(dataset.targets)
    train, test = [], []
    for c in range(len(dataset.classes)):
        idx = np.flatnonzero(targets == c)
        chosen = np.zeros(len(idx), dtype=bool)
        chosen[np.random.RandomState(seed).choice(len(idx), int(len(idx) * train_fraction), replace=False)] = True
        train += idx[chosen].tolist()
        test += idx[~chosen].tolist()
    test_set = dataset
    if test_transform is not None:
        test_set = copy.copy(dataset)
        test_set.transform = test_transform
    return Subset(dataset, train), Subset(test_set, test)
