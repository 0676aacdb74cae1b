"""The builders of `common.data` whose images are decoded into memory (ArrayDataset): MNIST and Fashion-MNIST
(idx files), CIFAR-10 (python batches or class-folder PNGs, cached) and SVHN (.mat).
"""
import gzip
import os
import pickle
import re
import struct

import numpy as np
import torch

from common.data_base import ArrayDataset, _first_file, _locate, _root, _scan_classes, _Source, _tv_download
from common.data_cache import _cached, _decode
from common.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (idx files)


def _read_idx(src, path, dims):
    """An idx file of unsigned bytes (plain or .gz) as an array whose trailing dims must equal `dims`."""
    ndim = len(dims) + 1
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise src.bad(f"{path} cannot be read ({type(e).__name__})") from None
    head = 4 + 4 * ndim
    if len(raw) < head or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise src.bad(f"{path} is not an idx file of {ndim}-d unsigned bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:head])
    if len(raw) - head != int(np.prod(shape)):
        raise src.bad(f"{path} is truncated or padded: header says {'x'.join(map(str, shape))} bytes, "
                      f"file holds {len(raw) - head}")
    if tuple(shape[1:]) != dims:
        raise src.bad(f"{path} holds {'x'.join(map(str, shape[1:]))} items, expected {'x'.join(map(str, dims))}")
    return np.frombuffer(bytearray(raw[head:]), dtype=np.uint8).reshape(shape)


def _idx_dataset(name, folder, classes, root, train, transform, download, flag):
    root = _root(root)
    prefix = "train" if train else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    src = _Source(name, root, f"{folder}/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz] (torchvision) "
                              f"or those files directly in the folder", flag)

    def find():
        for d in (os.path.join(root, folder, "raw"), os.path.join(root, "raw"), root):
            found = [_first_file(os.path.join(d, n), os.path.join(d, n + ".gz")) for n in names]
            if found[0] and found[1]:
                return found
            if found[0] or found[1]:
                missing = names[found.index(None)]
                raise src.bad(f"{missing}[.gz] is missing next to {found[0] or found[1]}")
        return None

    img_path, lbl_path = _locate(src, find, _tv_download(folder, download, root=root, train=train))
    data, targets = _read_idx(src, img_path, (28, 28)), _read_idx(src, lbl_path, ())
    if len(data) != len(targets):
        raise src.bad(f"{img_path} holds {len(data)} images but {lbl_path} {len(targets)} labels")
    if targets.max(initial=0) >= 10:
        raise src.bad(f"{lbl_path} has labels outside 0..9")
    return ArrayDataset(torch.from_numpy(data), name=name, split="train" if train else "test", root=root,
                        classes=classes, targets=torch.from_numpy(targets.astype(np.int64)),
                        transform=transform, n_official=60000 if train else 10000)


def mnist(root, train=True, transform=None, download=False, flag="--data"):
    """MNIST from `<root>/MNIST/raw/*-ubyte[.gz]` (torchvision) or idx files directly in `root`.

    `.data` is a uint8 N×28×28 tensor, `.targets` an int64 tensor; items are (transform(PIL 'L'), label).
    """
    return _idx_dataset("MNIST", "MNIST", [str(i) for i in range(10)], root, train, transform, download, flag)


def fashion_mnist(root, train=True, transform=None, download=False, flag="--data"):
    """Fashion-MNIST, same layouts as `mnist` with folder `FashionMNIST` (Debian: /usr/share/datasets/fashion-mnist)."""
    return _idx_dataset("Fashion-MNIST", "FashionMNIST", FASHION_CLASSES, root, train, transform, download, flag)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


# What a CIFAR-10 python batch holds: a dict of str/bytes/lists and one uint8 numpy array. Pickle can name
# any callable; these are the only ones such a file needs (numpy's array reconstruction under its 1.x and
# 2.x module names, protocol 5's _frombuffer, and _codecs.encode, which Python 3 uses for the bytes of
# protocol-2 pickles). Each only builds data.
CIFAR_PICKLE_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct",)}
CIFAR_PICKLE_GLOBALS |= {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
CIFAR_PICKLE_GLOBALS |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR-10 batch contains and refuses every other global before
    it is called, so a crafted file cannot run code (as weights_only=True does for checkpoints)."""

    def find_class(self, module, name):
        if (module, name) in CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load_cifar_pickle(path):
    """One CIFAR-10 python batch through `_CifarUnpickler` (latin1, as torchvision reads the Python 2 files)."""
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="latin1").load()


def _cifar_batches(src, d, train):
    """torchvision's cifar-10-batches-py: pickled dicts with 'data' (N×3072 uint8) and 'labels'."""
    data, targets = [], []
    for n in ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]):
        p = os.path.join(d, n)
        if not os.path.isfile(p):
            raise src.bad(f"{p} is missing")
        try:
            entry = load_cifar_pickle(p)
            x, y = np.asarray(entry["data"]), np.asarray(entry["labels"], dtype=np.int64)
            x = x.reshape(-1, 3, 32, 32) if x.dtype == np.uint8 else None
        except pickle.UnpicklingError as e:
            if str(e).startswith("refused global"):
                raise src.bad(f"{p} holds pickled Python objects a CIFAR-10 batch never contains ({e}); "
                              f"it was not loaded and nothing in it ran") from None
            raise src.bad(f"{p} is not a CIFAR-10 python batch (UnpicklingError)") from None
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the pickle, say which file
            raise src.bad(f"{p} is not a CIFAR-10 python batch ({type(e).__name__})") from None
        if x is None or len(x) != len(y) or y.min(initial=0) < 0 or y.max(initial=0) >= 10:
            raise src.bad(f"{p} is not a CIFAR-10 python batch (expected N×3072 uint8 'data', N labels in 0..9)")
        data.append(x)
        targets.append(y)
    data = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))  # NCHW -> NHWC like torchvision
    return data, np.concatenate(targets), list(CIFAR10_CLASSES)


def _official_order(sample):
    """Sort key: the number in the file name (its index in the official order), then class and name."""
    path, label = sample
    nums = re.findall(r"\d+", os.path.basename(path))
    return (int(nums[-1]) if nums else -1, label, path)


def _cifar_folders(src, d):
    """Class-folder PNGs `d/<class>/<index>.png`, decoded once into memory (cached)."""
    classes, samples = _scan_classes(src, d, exts=(".png",))
    if len(classes) != 10:
        raise src.bad(f"{d} has {len(classes)} class folders, CIFAR-10 has 10")
    samples.sort(key=_official_order)
    paths = [p for p, _ in samples]
    arrays = _cached("cifar10", paths, lambda: {"data": _decode(src, paths, (32, 32, 3)),
                                                "targets": np.array([t for _, t in samples], dtype=np.int64)})
    return arrays["data"], arrays["targets"], classes


def cifar10(root, train=True, transform=None, download=False, flag="--data"):
    """CIFAR-10 from `cifar-10-batches-py/` (under `root` or `root` itself) or `root/{train,test}/<class>/*.png`,
    either of them also under `root/cifar10/` (a data root holding several datasets).

    Class folders are indexed in sorted order (= airplane..truck) and images ordered by the number in
    their name (the official order). `.data` is a uint8 N×32×32×3 numpy array, `.targets` a list of ints.
    """
    root, split = _root(root), "train" if train else "test"
    src = _Source("CIFAR-10", root, "cifar-10-batches-py/ or train/<class>/*.png + test/<class>/*.png", flag)

    def find():
        for base in (root, os.path.join(root, "cifar10")):
            for d in (os.path.join(base, "cifar-10-batches-py"), base):
                if any(os.path.isfile(os.path.join(d, n)) for n in ("data_batch_1", "test_batch", "batches.meta")):
                    return "batches", d
            if os.path.isdir(os.path.join(base, split)):
                return "folders", os.path.join(base, split)
        return None

    kind, d = _locate(src, find, _tv_download("CIFAR10", download, root=root, train=train))
    data, targets, classes = _cifar_batches(src, d, train) if kind == "batches" else _cifar_folders(src, d)
    return ArrayDataset(data, name="CIFAR-10", split=split, root=root, classes=classes, targets=targets.tolist(),
                        transform=transform, n_official=50000 if train else 10000)


# ---------------------------------------------------------------------------------------------
# SVHN


def svhn(root, split="train", transform=None, download=False, flag="--data"):
    """SVHN from torchvision's `<root>/{train,test,extra}_32x32.mat` (needs scipy to read .mat).

    `.data` is a uint8 N×32×32×3 numpy array (NHWC, unlike torchvision's NCHW), `.targets` a list of
    ints with the .mat's label 10 mapped to digit 0, as torchvision does.
    """
    sizes = {"train": 73257, "test": 26032, "extra": 531131}
    if split not in sizes:
        raise UserError(f"unknown SVHN split {split!r}: choose train, test or extra")
    root, fname = _root(root), f"{split}_32x32.mat"
    src = _Source("SVHN", root, f"{fname} (torchvision layout)", flag)
    path = _locate(src, lambda: _first_file(os.path.join(root, fname)),
                   _tv_download("SVHN", download, root=root, split=split))
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError(f"SVHN: reading {path} needs the Python package scipy, which is not installed; "
                        f"install it with `pip install scipy`") from None
    try:
        mat = loadmat(path)
        x, y = mat["X"], mat["y"].reshape(-1).astype(np.int64)
    except Exception as e:  # noqa: BLE001
        raise src.bad(f"{path} cannot be read as SVHN .mat ({type(e).__name__})") from None
    if x.dtype != np.uint8 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or y.min(initial=1) < 0 \
            or y.max(initial=0) > 10:
        raise src.bad(f"{path} must hold X 32x32x3xN uint8 and N labels in 0..10")
    return ArrayDataset(np.ascontiguousarray(x.transpose(3, 0, 1, 2)), name="SVHN", split=split, root=root,
                        classes=[str(i) for i in range(10)], targets=(y % 10).tolist(), transform=transform,
                        n_official=sizes[split])
