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
"""
import copy
import gzip
import hashlib
import os
import pickle
import re
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from common.errors import UserError
from common.meters import progress
from common.paths import DATA_ENV, cache_dir, data_root  # noqa: F401 - the data root and cache, re-exported

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")
OFFICE31_SIZES = {"amazon": 2817, "dslr": 498, "webcam": 795}


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
# Shared helpers: error lines, locating data, optional download, class folders, decoding cache


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


def _decode(src, paths, shape):
    """Decode image files into one uint8 array N×shape (threads: PIL releases the GIL)."""
    def load(p):
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise src.bad(f"{p} cannot be decoded ({type(e).__name__})") from None
        if a.shape != shape:
            raise src.bad(f"{p} is {a.shape[1]}x{a.shape[0]}, expected {shape[1]}x{shape[0]}")
        return a

    ex = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        return np.stack(list(progress(ex.map(load, paths), desc=f"decoding {src.name}", total=len(paths))))
    finally:
        ex.shutdown(cancel_futures=True)


def _cached(tag, paths, build):
    """`build()` (a dict of arrays), cached as .npz keyed by the files' content: each file's bytes and its name
    relative to the folder all of them share (class folders give labels), so the same data reached through
    another path (a link, a copy, a moved data root) is decoded and stored once.

    The file is written atomically (temp file + rename); an unwritable cache only costs speed.
    """
    h = hashlib.sha1()
    base = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else ""
    if len(paths) == 1:
        base = os.path.dirname(base)
    for p in paths:
        with open(p, "rb") as f:
            blob = f.read()
        h.update(f"{os.path.relpath(os.path.abspath(p), base)}\0{len(blob)}\0".encode())
        h.update(hashlib.sha1(blob).digest())
    path = os.path.join(cache_dir(), f"{tag}-{len(paths)}-{h.hexdigest()[:16]}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            pass
    arrays = build()
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    return arrays


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
