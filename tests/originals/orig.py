"""Import the authors' own code from $QUANTLAB_ORIGINALS at test time, for side-by-side trajectories.

Nothing of the originals is stored in this repository: each test names the checkout it needs (the folder
names and pinned commits are in tests/originals/README.md), the files are read from there, and the only
changes are small string replacements, each asserted to match exactly as often as expected (so a different
checkout fails loudly instead of being silently half-patched). Two kinds of patch exist: what a CPU needs
(`.cuda()`), and what the torch the original pinned did differently from the torch that runs the test
(clamp's gradient at its ends, in-place `zero_grad`); each patch says which.
"""
import importlib.abc
import importlib.util
import os
import sys

import pytest
import torch

ENV = "QUANTLAB_ORIGINALS"


def checkout(name):
    """$QUANTLAB_ORIGINALS/<name>, or skip the test with one line saying how to get it."""
    base = os.environ.get(ENV)
    if not base:
        pytest.skip(f"{ENV} is not set: the side-by-side tests need checkouts of the original repositories "
                    f"(tests/originals/README.md)")
    path = os.path.join(base, name)
    if not os.path.isdir(path):
        pytest.skip(f"{path} not found: check out the original there (tests/originals/README.md)")
    return path


def patch(source, old, new, count=1):
    """source with `old` replaced by `new`; exactly `count` occurrences must exist."""
    n = source.count(old)
    assert n == count, f"patch expects {count} x {old!r} in the original, found {n}: is the checkout pinned?"
    return source.replace(old, new)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root, top, patches, inject):
        self.root, self.top, self.patches, self.inject = root, top, patches, inject

    def _file(self, fullname):
        parts = fullname.split(".")
        base = os.path.join(self.root, *parts)
        if os.path.isdir(base):
            return os.path.join(base, "__init__.py"), True
        return base + ".py", False

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.top:
            return None
        f, is_pkg = self._file(fullname)
        if not os.path.isfile(f):
            return None
        spec = importlib.util.spec_from_loader(fullname, self, origin=f, is_package=is_pkg)
        if is_pkg:
            spec.submodule_search_locations = [os.path.dirname(f)]
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        f, _ = self._file(module.__name__)
        with open(f) as fh:
            src = fh.read()
        rel = os.path.relpath(f, self.root)
        for old, new, count in self.patches.get(rel, ()):
            src = patch(src, old, new, count)
        module.__file__ = f
        module.__dict__.update(self.inject.get(rel, {}))
        exec(compile(src, f, "exec"), module.__dict__)


def load(root, module, patches=None, inject=None, extra_top=()):
    """Import `module` (e.g. 'main' or 'models') from the folder `root` of an original, with `patches`
    ({relative file: [(old, new, count)]}) applied and names from `inject` ({file: {name: value}}) set
    before the file runs. The original's top-level names (`models`, `utils`, ...) are imported privately:
    whatever sys.modules held under those names before is put back, so several originals (and this project)
    can be loaded in one process. Returns the module."""
    top = {module.split(".")[0], *extra_top}
    top |= {n[:-3] if n.endswith(".py") else n for n in os.listdir(root)
            if n.endswith(".py") or os.path.isfile(os.path.join(root, n, "__init__.py"))}
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in top}
    for k in saved:
        del sys.modules[k]
    finder = _Finder(root, top, patches or {}, inject or {})
    sys.meta_path.insert(0, finder)
    try:
        mod = importlib.import_module(module)
    finally:
        sys.meta_path.remove(finder)
        for k in [k for k in sys.modules if k.split(".")[0] in top]:
            del sys.modules[k]
        sys.modules.update(saved)
    return mod


def old_clamp(x, lo=None, hi=None, min=None, max=None):
    """Tensor.clamp as torch <= 2.13 differentiated it: gradient 1 on the closed interval (both ends
    included), 0 outside. torch 2.14 gives 0 at the ends of a two-sided clamp; the originals ran on 1.x."""
    lo = min if lo is None else lo
    hi = max if hi is None else hi
    inside = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        inside &= x >= lo
    if hi is not None:
        inside &= x <= hi
    passed = torch.where(inside, x, torch.zeros_like(x))
    return passed + (x.clamp(lo, hi) - passed).detach()


def params_equal(a, b):
    """Names of the entries of two state dicts that differ in any bit (NaN compares by bits too)."""
    assert list(a) == list(b), "state dict keys differ"
    return [k for k in a if not torch.equal(a[k].view(-1).view(torch.uint8) if a[k].is_floating_point()
                                            else a[k], b[k].view(-1).view(torch.uint8)
                                            if b[k].is_floating_point() else b[k])]


def mnist_batches(n, batch, mean, std, seed=0):
    """n learnable MNIST-shaped batches normalised with the script's (mean, std): class c is a bright band
    at rows 2c..2c+3 on dark noise, so the loss falls within a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 10, (batch,), generator=g)
        x = torch.randint(0, 60, (batch, 1, 28, 28), generator=g).float()
        for i, c in enumerate(y.tolist()):
            x[i, 0, 2 * c:2 * c + 3, 4:24] = 255
        out.append(((x / 255 - mean) / std, y))
    return out


class RecordingLoss(torch.nn.CrossEntropyLoss):
    """CrossEntropyLoss that keeps every loss value it returns (each side calls it once per step)."""

    def __init__(self):
        super().__init__()
        self.values = []

    def forward(self, output, target):
        loss = super().forward(output, target)
        self.values.append(loss.detach().clone())
        return loss


def cifar_batches(n, batch, seed=1):
    """CIFAR-shaped learnable batches: class c brightens channel c % 3 in a band of rows 3c..3c+2."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 10, (batch,), generator=g)
        x = torch.randn(batch, 3, 32, 32, generator=g) * 0.5
        for i, c in enumerate(y.tolist()):
            x[i, c % 3, 3 * c:3 * c + 3] += 2.0
        out.append((x, y))
    return out
