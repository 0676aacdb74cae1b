"""The dataset classes of `common.data` and the helpers every builder shares: one error line per problem
(`_Source`), locating the data (with an optional torchvision download), ImageFolder-style class scans.
"""
import os

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------------------------------
# Datasets


class ImageDataset(Dataset):
    """Items are `(transform(PIL image), int label)`; subclasses say how to get image i."""

    def __init__(self, name, split, root, classes, targets, transform, n_official):
        self.name, self.split, self.root = name, split, root
        self.classes, self.targets, self.transform = classes, targets, transform
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.n_official = n_official

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.image(i)
        return (self.transform(img) if self.transform is not None else img), int(self.targets[i])

    @property
    def is_subset(self):
        return len(self) < self.n_official

    @property
    def size_note(self):
        """'1,000 of the 10,000 official CIFAR-10 test images' (or '10,000 MNIST test images')."""
        if self.is_subset:
            return f"{len(self):,} of the {self.n_official:,} official {self.name} {self.split} images"
        return f"{len(self):,} {self.name} {self.split} images"

    def __repr__(self):
        return f"{type(self).__name__}({self.size_note}, root={self.root!r})"


class ArrayDataset(ImageDataset):
    """Images held in memory: `.data` is N×H×W (grey) or N×H×W×3 (RGB) uint8, numpy or torch."""

    def __init__(self, data, **kw):
        super().__init__(**kw)
        self.data = data

    def image(self, i):
        return Image.fromarray(np.asarray(self.data[i]))


class FolderDataset(ImageDataset):
    """Images read from disk on access (PIL, RGB): `.samples` is a list of (path, label) like ImageFolder."""

    def __init__(self, samples, **kw):
        super().__init__(targets=[label for _, label in samples], **kw)
        self.samples = self.imgs = samples

    def image(self, i):
        with open(self.samples[i][0], "rb") as f:
            return Image.open(f).convert("RGB")


# ---------------------------------------------------------------------------------------------
# Shared helpers: error lines, locating data, optional download, class folders


class _Source:
    """What a builder looks for, so every error line says the same things in the same order."""

    def __init__(self, name, root, layouts, flag):
        self.name, self.root, self.layouts, self.flag = name, root, layouts, flag

    def missing(self, note=""):
        return UserError(f"{self.name} not found under {self.root}{note}: expected {self.layouts}; "
                         f"pass {self.flag} PATH")

    def bad(self, problem):
        return UserError(f"{self.name} under {self.root} is unusable: {problem}; expected {self.layouts}; "
                         f"pass {self.flag} PATH to a complete copy")


def _root(root):
    return os.path.expanduser(os.fspath(root))


def _locate(src, find, download=None):
    """`find()` (None when absent); with `download` (a callable), try it once before giving up."""
    found, note = find(), ""
    if found is None and download is not None:
        made = []
        try:
            download(made)
        except Exception as e:  # noqa: BLE001 - no network, read-only root...: report it in the line
            reason = "the download site could not be reached" if isinstance(e, (OSError, RuntimeError)) else str(e)
            note = f" (the automatic download failed: {type(e).__name__}, {' '.join(reason.split())[:80]})"
            for d in reversed(made):          # only the folders the attempt created, and only while empty
                if os.path.isdir(d) and not os.listdir(d):
                    os.rmdir(d)
        found = find()
    if found is None:
        raise src.missing(note)
    return found


def _tv_download(name, download, **kw):
    """A callable asking torchvision to download dataset `name` (e.g. 'MNIST'), or None."""
    if not download:
        return None

    def run(made):
        import torchvision
        # the folders torchvision may create (<root>/<name>/raw), noted before it runs so that a failed
        # attempt leaves nothing behind that was not there
        root = _root(kw["root"])
        for d in (root, os.path.join(root, name), os.path.join(root, name, "raw")):
            if not os.path.exists(d):
                made.append(d)
        getattr(torchvision.datasets, name)(download=True, **kw)
    return run


def _first_file(*paths):
    return next((p for p in paths if os.path.isfile(p)), None)


def _subdirs(d):
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def _images_in(d, exts):
    return sorted(e.name for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(exts))


def _scan_classes(src, d, exts=IMG_EXTENSIONS, classes=None):
    """ImageFolder scan of `d`: (classes, [(path, label)]), classes sorted unless given.

    A class folder without images, or one not in the given `classes`, is an error.
    """
    names = _subdirs(d)
    if not names:
        raise src.bad(f"{d} has no class folders")
    classes = classes or names
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in names:
        if c not in index:
            raise src.bad(f"class folder {os.path.join(d, c)} is not one of the {len(classes)} training classes")
        files = _images_in(os.path.join(d, c), exts)
        if not files:
            raise src.bad(f"class folder {os.path.join(d, c)} holds no {'/'.join(exts)} images")
        samples += [(os.path.join(d, c, f), index[c]) for f in files]
    return classes, samples
