"""Decoding image files once: `_decode` turns many image files into one uint8 array (threads) and `_cached`
keeps such arrays as .npz in `$QUANTLAB_CACHE` (default `~/.cache/quantlab`), keyed by the files' content.
"""
import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from common.meters import progress
from common.paths import cache_dir


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
