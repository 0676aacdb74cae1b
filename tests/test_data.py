"""common.data: real data from ../shared (skips when absent), tiny generated data in every layout,
and one clear error line (exit 2, no traceback) for missing or malformed data."""
import collections
import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common import data
from common.errors import UserError, run_main
from conftest import REPO, require_shared

FASHION_DEB = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private decode cache, so generated-data tests never touch ~/.cache/quantlab."""
    d = tmp_path / "cache"
    monkeypatch.setenv("QUANTLAB_CACHE", str(d))
    return d


def counts(targets):
    c = collections.Counter(int(t) for t in targets)
    return [c[k] for k in range(max(c) + 1)]


def pixels(img):
    return np.asarray(img)


def one_line_error(call, capsys, *needles):
    """`run_main(call)` exits 2 with one 'error: ...' line on stderr containing every needle."""
    with pytest.raises(SystemExit) as e:
        run_main(call)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def run_builder(expr):
    """Run `expr` (using `data`) under run_main in a fresh interpreter, as a paper script would."""
    code = f"from common import data; from common.errors import run_main; run_main(lambda: {expr})"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_cli_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


# ------------------------------------------------------------------------------------------------
# Real data (../shared, Debian's Fashion-MNIST)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_shared_full_with_official_class_counts():
    require_shared("data", "MNIST", "raw")
    root = require_shared("data")
    train, test = data.mnist(root, train=True), data.mnist(root, train=False)
    assert (len(train), len(test)) == (60000, 10000) and not train.is_subset and not test.is_subset
    assert counts(train.targets) == MNIST_TRAIN_COUNTS and counts(test.targets) == MNIST_TEST_COUNTS
    assert train.data.shape == (60000, 28, 28) and str(train.data.dtype) == "torch.uint8"
    assert str(train.targets.dtype) == "torch.int64"
    assert train.targets[:5].tolist() == [5, 0, 4, 1, 9] and test.targets[:5].tolist() == [7, 2, 1, 0, 4]
    img, label = test[0]
    assert img.mode == "L" and img.size == (28, 28) and label == 7 and type(label) is int
    assert np.array_equal(pixels(img), test.data[0].numpy())
    # the folder holding the idx files works as root too
    direct = data.mnist(require_shared("data", "MNIST", "raw"), train=False)
    assert np.array_equal(direct.data.numpy(), test.data.numpy())


def test_fashion_mnist_debian_package():
    if not os.path.isdir(FASHION_DEB):
        pytest.skip(f"needs {FASHION_DEB} (apt-get install -y dataset-fashion-mnist)")
    train, test = data.fashion_mnist(FASHION_DEB, train=True), data.fashion_mnist(FASHION_DEB, train=False)
    assert counts(train.targets) == [6000] * 10 and counts(test.targets) == [1000] * 10
    assert train.targets[:5].tolist() == [9, 0, 0, 3, 0] and test.targets[:5].tolist() == [9, 2, 1, 1, 6]
    assert train.classes[9] == "Ankle boot"
    img, label = train[0]
    assert img.mode == "L" and np.array_equal(pixels(img), train.data[0].numpy()) and label == 9


def test_cifar10_shared_test_subset_is_reported():
    root = require_shared("data", "cifar10")
    test = data.cifar10(root, train=False)
    assert len(test) == 1000 and test.n_official == 10000 and test.is_subset
    assert test.size_note == "1,000 of the 10,000 official CIFAR-10 test images"
    assert test.classes == list(data.CIFAR10_CLASSES)
    assert test.data.shape == (1000, 32, 32, 3) and test.data.dtype == np.uint8
    # official test order: cat ship ship airplane frog frog automobile frog cat automobile
    assert test.targets[:10] == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert counts(test.targets) == [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
    for i in (0, 3, 999):
        png = pixels(Image.open(os.path.join(root, "test", test.classes[test.targets[i]], f"{i:05d}.png")))
        img, label = test[i]
        assert img.mode == "RGB" and np.array_equal(pixels(img), png) and label == test.targets[i]


def test_cifar10_shared_train_full_and_cached():
    root = require_shared("data", "cifar10")
    train = data.cifar10(root, train=True)  # first run decodes 50,000 PNGs (~1 min), then the cache serves it
    assert len(train) == 50000 and not train.is_subset and train.size_note == "50,000 CIFAR-10 train images"
    assert counts(train.targets) == [5000] * 10
    assert train.targets[:10] == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # official training order
    png = pixels(Image.open(os.path.join(root, "train", "truck", "00001.png")))
    assert np.array_equal(train.data[1], png)
    assert any(f.startswith("cifar10-50000-") for f in os.listdir(data.cache_dir()))


# ------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST idx files


def write_idx(path, arr):
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def make_idx(d, gz, n=(7, 3), seed=0):
    """Random idx files for both splits in `d`; returns {prefix: (images, labels)}."""
    rng, out = np.random.default_rng(seed), {}
    os.makedirs(d, exist_ok=True)
    for prefix, k in zip(("train", "t10k"), n):
        x, y = rng.integers(0, 256, (k, 28, 28), dtype=np.uint8), rng.integers(0, 10, k, dtype=np.uint8)
        ext = ".gz" if gz else ""
        write_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte{ext}"), x)
        write_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte{ext}"), y)
        out[prefix] = (x, y)
    return out


@pytest.mark.parametrize("builder,sub,gz", [(data.mnist, "MNIST/raw", False), (data.mnist, "", True),
                                            (data.fashion_mnist, "FashionMNIST/raw", True),
                                            (data.fashion_mnist, "", False)])
def test_idx_layouts_round_trip(tmp_path, builder, sub, gz):
    truth = make_idx(os.path.join(tmp_path, sub), gz)
    for train, prefix in ((True, "train"), (False, "t10k")):
        x, y = truth[prefix]
        ds = builder(str(tmp_path), train=train)
        assert np.array_equal(ds.data.numpy(), x) and ds.targets.tolist() == y.tolist()
        assert ds.is_subset and len(ds) == len(x)
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.mode == "L" and np.array_equal(pixels(img), x[i]) and label == y[i]
    tf = builder(str(tmp_path), transform=lambda im: pixels(im).sum())
    assert tf[0][0] == int(truth["train"][0][0].sum())


def test_idx_malformed_files_get_one_line(tmp_path, capsys):
    make_idx(tmp_path, gz=False)
    images = os.path.join(tmp_path, "train-images-idx3-ubyte")
    raw = open(images, "rb").read()

    open(images, "wb").write(raw[:-100])
    one_line_error(lambda: data.mnist(tmp_path), capsys, images, "truncated", "--data PATH")
    open(images, "wb").write(b"\x00\x00\x0d\x03" + raw[4:])  # float idx
    one_line_error(lambda: data.mnist(tmp_path), capsys, images, "not an idx file")
    write_idx(images, np.zeros((7, 32, 32), np.uint8))
    one_line_error(lambda: data.mnist(tmp_path), capsys, images, "32x32", "expected 28x28")
    write_idx(images, np.zeros((6, 28, 28), np.uint8))
    one_line_error(lambda: data.mnist(tmp_path), capsys, "6 images", "7 labels")
    os.remove(images)
    write_idx(images + ".gz", np.zeros((7, 28, 28), np.uint8))
    gz = open(images + ".gz", "rb").read()
    open(images + ".gz", "wb").write(gz[:30])
    one_line_error(lambda: data.mnist(tmp_path), capsys, images + ".gz", "cannot be read")
    os.remove(os.path.join(tmp_path, "t10k-labels-idx1-ubyte"))
    one_line_error(lambda: data.fashion_mnist(tmp_path, train=False, flag="--dataPath"), capsys,
                   "t10k-labels-idx1-ubyte[.gz] is missing", "Fashion-MNIST", "--dataPath PATH")


# ------------------------------------------------------------------------------------------------
# CIFAR-10


def make_cifar_batches(d, per_batch=3, seed=0):
    """A miniature cifar-10-batches-py (pickled dicts of numpy arrays, like the official files)."""
    rng, out = np.random.default_rng(seed), {}
    os.makedirs(d, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({"batch_label": name, "data": x, "labels": y, "filenames": []}, f, protocol=2)
        out[name] = (x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y)
    return out


# a data root holding several datasets has CIFAR-10 under cifar10/ (the shared layout)
@pytest.mark.parametrize("sub", ["cifar-10-batches-py", "", "cifar10", "cifar10/cifar-10-batches-py"])
def test_cifar10_batches_round_trip(tmp_path, sub):
    truth = make_cifar_batches(os.path.join(tmp_path, sub))
    train, test = data.cifar10(str(tmp_path), train=True), data.cifar10(str(tmp_path), train=False)
    x = np.concatenate([truth[f"data_batch_{i}"][0] for i in range(1, 6)])
    y = sum((truth[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert np.array_equal(train.data, x) and train.targets == y and len(train) == 15
    assert np.array_equal(test.data, truth["test_batch"][0]) and test.targets == truth["test_batch"][1]
    img, label = train[4]
    assert img.mode == "RGB" and np.array_equal(pixels(img), x[4]) and label == y[4] and type(label) is int
    assert train.classes[0] == "airplane" and test.size_note == "3 of the 10,000 official CIFAR-10 test images"


def test_cifar10_batches_malformed(tmp_path, capsys):
    d = os.path.join(tmp_path, "cifar-10-batches-py")
    make_cifar_batches(d)
    open(os.path.join(d, "test_batch"), "wb").write(b"not a pickle")
    one_line_error(lambda: data.cifar10(tmp_path, train=False), capsys, os.path.join(d, "test_batch"))
    os.remove(os.path.join(d, "data_batch_3"))
    one_line_error(lambda: data.cifar10(tmp_path, flag="--data_dir"), capsys,
                   os.path.join(d, "data_batch_3") + " is missing", "--data_dir PATH")


class _Payload:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code a crafted batch file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cifar10_batch_payload_is_refused_before_it_runs(tmp_path, capsys):
    d = os.path.join(tmp_path, "cifar-10-batches-py")
    make_cifar_batches(d)
    marker = str(tmp_path / "payload-ran")
    with open(os.path.join(d, "test_batch"), "wb") as f:
        pickle.dump({"data": _Payload(marker), "labels": []}, f, protocol=2)
    one_line_error(lambda: data.cifar10(tmp_path, train=False), capsys,
                   "holds pickled Python objects a CIFAR-10 batch never contains (refused global posix.mkdir)")
    assert not os.path.exists(marker)
    # the same file through plain pickle would have run it: the refusal is what protects
    with open(os.path.join(d, "test_batch"), "rb") as f:
        pickle.load(f)
    assert os.path.isdir(marker)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_batches_of_every_pickle_protocol_load(tmp_path, protocol):
    """The allowed globals cover what numpy and Python 3 write (protocol 2 uses _codecs.encode for bytes)."""
    d = os.path.join(tmp_path, "cifar-10-batches-py")
    truth = make_cifar_batches(d)
    x = np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072)
    with open(os.path.join(d, "test_batch"), "wb") as f:
        pickle.dump({"batch_label": b"testing batch 1 of 1", "data": x, "labels": [1, 2, 3],
                     "filenames": [b"a.png", b"b.png", b"c.png"]}, f, protocol=protocol)
    test = data.cifar10(str(tmp_path), train=False)
    assert np.array_equal(test.data, x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)) and test.targets == [1, 2, 3]
    assert len(data.cifar10(str(tmp_path), train=True)) == 15 and truth


def make_cifar_folders(root, split, n=20, seed=0):
    """split/<class>/<index>.png with labels spread over the 10 CIFAR-10 classes; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.permutation(np.arange(n) % 10)
    for c in data.CIFAR10_CLASSES:
        os.makedirs(os.path.join(root, split, c), exist_ok=True)
    for i in range(n):
        Image.fromarray(x[i]).save(os.path.join(root, split, data.CIFAR10_CLASSES[y[i]], f"{i:05d}.png"))
    return x, y.tolist()


def tree(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def test_cifar10_class_folders_round_trip_and_cache(tmp_path, cache, monkeypatch):
    root = str(tmp_path / "cifar")
    x, y = make_cifar_folders(root, "train", n=20)
    xt, yt = make_cifar_folders(root, "test", n=10, seed=1)
    before = tree(root)
    train = data.cifar10(root)
    assert np.array_equal(train.data, x) and train.targets == y  # official order = number in the name
    assert train.classes == list(data.CIFAR10_CLASSES)
    img, label = train[7]
    assert img.mode == "RGB" and np.array_equal(pixels(img), x[7]) and label == y[7]
    test = data.cifar10(root, train=False)
    assert np.array_equal(test.data, xt) and test.targets == yt
    assert tree(root) == before  # nothing written under the data root
    assert len(os.listdir(cache)) == 2 and all(f.endswith(".npz") for f in os.listdir(cache))

    # second build comes from the cache: decoding would fail
    def no_decoding(*a, **k):
        raise AssertionError("decoded although cached")
    with monkeypatch.context() as m:
        m.setattr(data.Image, "open", no_decoding)
        again = data.cifar10(root)
    assert np.array_equal(again.data, x) and again.targets == y

    # changing an image invalidates the cache entry
    changed = os.path.join(root, "train", data.CIFAR10_CLASSES[y[3]], "00003.png")
    Image.fromarray(255 - x[3]).save(changed)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert np.array_equal(data.cifar10(root).data[3], 255 - x[3])

    # the same data through another path (a copy elsewhere) is served by the same cache entry: the key is content
    import shutil
    moved = str(tmp_path / "elsewhere" / "cifar")
    shutil.copytree(root, moved)
    with monkeypatch.context() as m:
        m.setattr(data.Image, "open", no_decoding)
        assert np.array_equal(data.cifar10(moved).data[3], 255 - x[3])
    assert len(os.listdir(cache)) == 3                          # two first builds + the changed image, no more

    # works with a DataLoader and a tensor transform
    to_tensor = lambda im: torch.from_numpy(pixels(im).copy()).permute(2, 0, 1)  # noqa: E731
    loader = torch.utils.data.DataLoader(data.cifar10(root, train=False, transform=to_tensor), batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 32, 32) and yb.tolist() == yt[:4]


def test_cifar10_class_folders_malformed(tmp_path, cache, capsys):
    root = str(tmp_path)
    make_cifar_folders(root, "train", n=20)
    bad = os.path.join(root, "train", "cat", "00100.png")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(bad)
    one_line_error(lambda: data.cifar10(root), capsys, bad, "28x28", "expected 32x32", "--data PATH")
    open(bad, "wb").write(b"garbage")
    one_line_error(lambda: data.cifar10(root), capsys, bad, "cannot be decoded")
    for f in os.listdir(os.path.join(root, "train", "cat")):
        os.remove(os.path.join(root, "train", "cat", f))
    one_line_error(lambda: data.cifar10(root), capsys, os.path.join(root, "train", "cat"), "no .png images")
    os.rmdir(os.path.join(root, "train", "cat"))
    one_line_error(lambda: data.cifar10(root), capsys, "9 class folders")
    one_line_error(lambda: data.cifar10(root, train=False, flag="--data_dir"), capsys,
                   f"CIFAR-10 not found under {root}: expected cifar-10-batches-py/ or train/<class>/*.png + "
                   f"test/<class>/*.png; pass --data_dir PATH")


# ------------------------------------------------------------------------------------------------
# SVHN


def test_svhn_without_scipy_names_the_package(tmp_path, monkeypatch, capsys):
    (tmp_path / "test_32x32.mat").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    one_line_error(lambda: data.svhn(tmp_path, "test"), capsys, "scipy", "pip install scipy")
    one_line_error(lambda: data.svhn(tmp_path, "train"), capsys, f"SVHN not found under {tmp_path}",
                   "train_32x32.mat")
    one_line_error(lambda: data.svhn(tmp_path, "valid"), capsys, "unknown SVHN split 'valid'")


def test_svhn_mat_round_trip(tmp_path):
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)  # the .mat stores digit 0 as 10
    sio.savemat(str(tmp_path / "train_32x32.mat"), {"X": x, "y": y})
    ds = data.svhn(tmp_path, "train")
    assert ds.targets == [0, 1, 2, 0, 9] and ds.data.shape == (5, 32, 32, 3)
    img, label = ds[3]
    assert np.array_equal(pixels(img), x[..., 3]) and label == 0


# ------------------------------------------------------------------------------------------------
# ImageNet


def save_image(path, color, size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, tuple(color)).save(path, quality=100)


def color_of(img):
    """Mean RGB of a decoded image. The tests' flat-colour JPEGs (quality 100) decode to within 1-2 levels of
    the saved colour (YCbCr rounding; the decoder's integer IDCT and colour conversion may differ between
    libjpeg builds and their SIMD paths), hence atol 2-3, below the >= 8-level steps between classes' colours."""
    return pixels(img).reshape(-1, 3).mean(0)


def test_imagenet_image_folders(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    for k, w in enumerate(wnids):
        for j in range(2):
            save_image(tmp_path / "train" / w / f"{w}_{j}.JPEG", (40 * k, 100 + j, 7))
    save_image(tmp_path / "val" / wnids[2] / "ILSVRC2012_val_00000001.JPEG", (200, 10, 30))
    save_image(tmp_path / "val" / wnids[0] / "ILSVRC2012_val_00000002.png", (1, 2, 3))
    (tmp_path / "train" / wnids[0] / "notes.txt").write_text("not an image")

    train = data.imagenet(tmp_path, "train")
    assert train.classes == wnids and train.targets == [0, 0, 1, 1, 2, 2]
    img, label = train[3]
    assert img.mode == "RGB" and img.size == (20, 16) and label == 1
    assert np.allclose(color_of(img), (40, 101, 7), atol=2)
    # a partial val/ still uses train's class indices (here: classes 0 and 2)
    val = data.imagenet(tmp_path, "val", transform=lambda im: color_of(im))
    assert val.classes == wnids and val.targets == [0, 2] and val.is_subset
    assert np.allclose(val[1][0], (200, 10, 30), atol=2) and val[1][1] == 2
    assert val.samples[0][0].endswith("ILSVRC2012_val_00000002.png")


@pytest.fixture
def flat_val(tmp_path):
    """train/<wnid>/ for 3 classes and a flat val/ of 4 images whose true wnids are returned."""
    wnids = ["n01440764", "n01443537", "n01484850"]
    for w in wnids:
        save_image(tmp_path / "train" / w / f"{w}_0.JPEG", (0, 0, 0))
    truth = [wnids[2], wnids[0], wnids[1], wnids[2]]
    for i, w in enumerate(truth):
        save_image(tmp_path / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", (60 * wnids.index(w), 0, 0))
    return tmp_path, wnids, truth


def test_imagenet_flat_val_label_files(flat_val):
    root, wnids, truth = flat_val
    want = [wnids.index(w) for w in truth]

    (root / "wnids.txt").write_text("\n".join(truth) + "\n")
    ds = data.imagenet(root, "val", val_labels=root / "wnids.txt")
    assert ds.targets == want and ds.classes == wnids
    assert np.allclose(color_of(ds[0][0]), (120, 0, 0), atol=2) and ds[0][1] == 2

    # Caffe's val.txt: '<file> <0-based sorted-wnid index>', any line order
    lines = [f"ILSVRC2012_val_{i + 1:08d}.JPEG {t}" for i, t in enumerate(want)]
    (root / "val.txt").write_text("\n".join(reversed(lines)))
    assert data.imagenet(root, "val", val_labels=root / "val.txt").targets == want

    # devkit ground truth: 1-based ILSVRC2012_IDs, which are NOT sorted order; mapped via map_clsloc.txt
    gt = root / "devkit" / "ILSVRC2012_validation_ground_truth.txt"
    os.makedirs(gt.parent)
    ids = {wnids[2]: 1, wnids[0]: 2, wnids[1]: 3}
    gt.write_text("".join(f"{ids[w]}\n" for w in truth))
    (gt.parent / "map_clsloc.txt").write_text("".join(f"{w} {i} name_{i}\n" for w, i in ids.items()))
    assert data.imagenet(root, "val", val_labels=gt).targets == want


def test_imagenet_devkit_meta_mat(flat_val):
    sio = pytest.importorskip("scipy.io")
    root, wnids, truth = flat_val
    ids = {wnids[1]: 1, wnids[2]: 2, wnids[0]: 3, "n00000001": 4}  # id 4: an inner node (has children)
    synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for k, (w, i) in enumerate(ids.items()):
        synsets[k] = (i, w, 0 if i < 4 else 3)
    d = root / "ILSVRC2012_devkit_t12" / "data"
    os.makedirs(d)
    sio.savemat(str(d / "meta.mat"), {"synsets": synsets})
    (d / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in truth))
    ds = data.imagenet(root, "val", val_labels=d / "ILSVRC2012_validation_ground_truth.txt")
    assert ds.targets == [wnids.index(w) for w in truth]


def test_imagenet_bad_inputs(flat_val, capsys):
    root, wnids, truth = flat_val
    val = os.path.join(root, "val")
    one_line_error(lambda: data.imagenet(root, "val"), capsys, val, "flat folder of 4 images", "val_labels")
    (root / "gt.txt").write_text("3\n1\n2\n3\n")
    one_line_error(lambda: data.imagenet(root, "val", val_labels=root / "gt.txt"), capsys,
                   "ILSVRC2012_ID", "meta.mat", "map_clsloc.txt")
    (root / "short.txt").write_text("n01440764\n")
    one_line_error(lambda: data.imagenet(root, "val", val_labels=root / "short.txt"), capsys,
                   "1 labels for 4 images")
    (root / "odd.txt").write_text("\n".join(truth[:3] + ["n09999999"]))
    one_line_error(lambda: data.imagenet(root, "val", val_labels=root / "odd.txt"), capsys, "n09999999")
    os.remove(os.path.join(root, "train", wnids[1], f"{wnids[1]}_0.JPEG"))
    one_line_error(lambda: data.imagenet(root, "train", flag="--dataPath"), capsys,
                   os.path.join(root, "train", wnids[1]), "holds no", "--dataPath PATH")
    one_line_error(lambda: data.imagenet(root / "nowhere", "val"), capsys,
                   f"ImageNet not found under {root / 'nowhere'}")


# ------------------------------------------------------------------------------------------------
# Office-31


def make_office(root, domain="dslr"):
    """31 classes with 3, 4 or 5 images each under root/office31/<domain>/images/<class>/."""
    sizes = {}
    for c in range(31):
        name = f"class_{c:02d}"
        sizes[name] = 3 + c % 3
        for j in range(sizes[name]):
            save_image(os.path.join(root, "office31", domain, "images", name, f"frame_{j + 1:04d}.jpg"),
                       (c * 8, j * 40, 0), size=(12, 10))
    return sizes


def test_office31_domain_and_alignq_split(tmp_path):
    sizes = make_office(tmp_path)
    ds = data.office31(tmp_path, "dslr")
    same = data.office31(tmp_path / "office31", "dslr")
    assert ds.samples == same.samples and ds.classes == sorted(sizes) and len(ds) == sum(sizes.values())
    assert ds.targets == sum(([k] * n for k, n in enumerate(sizes.values())), [])
    img, label = ds[4]  # class 1, second file
    assert label == 1 and np.allclose(color_of(img), (8, 40, 0), atol=3)
    assert ds.size_note == f"{len(ds)} of the 498 official Office-31 dslr images"

    train, test = data.office31_split(ds, test_transform=lambda im: "test-side")
    assert test[0][0] == "test-side" and train[0][0] != "test-side"
    # split.py: per class, np.random.seed(1); np.random.choice(np.arange(n), int(n * 0.8), replace=False)
    state = np.random.get_state()
    want_train = []
    for k, n in enumerate(sizes.values()):
        np.random.seed(1)
        first = sum(list(sizes.values())[:k])
        want_train += sorted(first + np.random.choice(np.arange(n), int(n * 0.8), replace=False))
    np.random.set_state(state)
    assert train.indices == want_train
    assert sorted(train.indices + test.indices) == list(range(len(ds)))
    # golden: with seed 1, a 5-image class keeps files 0,1,2,4 for training and a 3-image class 0,2
    five, three = ds.targets.index(2), ds.targets.index(0)
    assert [i - five for i in train.indices if ds.targets[i] == 2] == [0, 1, 2, 4]
    assert [i - three for i in test.indices if ds.targets[i] == 0] == [1]


def test_office31_bad_inputs(tmp_path, capsys):
    make_office(tmp_path)
    one_line_error(lambda: data.office31(tmp_path, "caltech"), capsys, "unknown Office-31 domain 'caltech'")
    one_line_error(lambda: data.office31(tmp_path, "webcam", flag="--data_dir"), capsys,
                   f"Office-31 not found under {tmp_path}", "webcam/images/<class>/*.jpg", "--data_dir PATH")
    cls = os.path.join(tmp_path, "office31", "dslr", "images", "class_30")
    for f in os.listdir(cls):
        os.remove(os.path.join(cls, f))
    one_line_error(lambda: data.office31(tmp_path, "dslr"), capsys, cls, "holds no")
    os.rmdir(cls)
    one_line_error(lambda: data.office31(tmp_path, "dslr"), capsys, "30 class folders")


# ------------------------------------------------------------------------------------------------
# As a user meets them: a fresh interpreter, run_main, exit 2, one stderr line, no traceback


def test_cli_missing_cifar10(tmp_path):
    missing = tmp_path / "data"
    assert_cli_error(run_builder(f"data.cifar10({str(missing)!r})"),
                     f"CIFAR-10 not found under {missing}", "cifar-10-batches-py/", "pass --data PATH")


def test_cli_truncated_idx(tmp_path):
    make_idx(tmp_path / "MNIST" / "raw", gz=True)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    assert_cli_error(run_builder(f"data.mnist({str(tmp_path)!r}, train=False, flag='--data_dir')"),
                     path, "--data_dir PATH")


def test_download_failure_falls_through_to_the_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"  # torchvision cannot create MNIST/raw under a file: fails with or without network
    blocker.write_text("")
    one_line_error(lambda: data.mnist(blocker, download=True), capsys,
                   f"MNIST not found under {blocker}", "automatic download failed", "pass --data PATH")


def test_failed_download_leaves_no_folder_it_made_and_a_clean_line(tmp_path, capsys, monkeypatch):
    import torchvision

    class FakeMNIST:                       # what torchvision does offline: makes <root>/MNIST/raw, then fails
        def __init__(self, root, download, train):
            os.makedirs(os.path.join(root, "MNIST", "raw"), exist_ok=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, https://b/, )")
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    root = tmp_path / "data"                              # does not exist yet
    (tmp_path / "keep").mkdir()
    err = one_line_error(lambda: data.mnist(root, download=True), capsys, f"MNIST not found under {root}",
                         "the automatic download failed: RuntimeError, the download site could not be reached")
    assert "https" not in err and ", )" not in err
    assert not root.exists() and (tmp_path / "keep").is_dir()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("x")
    one_line_error(lambda: data.mnist(existing, download=True), capsys, "automatic download failed")
    assert sorted(os.listdir(existing)) == ["notes.txt"]  # its own MNIST/raw removed, the user's file kept
