"""The basis step's compiled code (alq/basis_step.c) through ctypes: its build and its binding.

Built on first use with the system C compiler (`$CC`, default cc) into the cache directory (common.paths:
$QUANTLAB_CACHE, else ~/.cache/quantlab), once per source text and compiler flags, atomically, so concurrent
runs share one build; loaded once per process. Where there is no compiler or the build fails, there is no library
and the eager torch code of alq/fastpath.py does the same work. QUANTLAB_ALQ_NATIVE=0 turns it off (`enabled`,
read when a layer chooses its path). The compiled functions perform the torch code's float operations in the same
order (-ffp-contract=off -fno-fast-math: no fused multiply-add, no reassociation), so they give the same tensors.
"""
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile

import torch

from common.paths import cache_dir

NATIVE_ENV = "QUANTLAB_ALQ_NATIVE"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "basis_step.c")
FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
SIGNATURES = (("alq_nearest_code", [_p, _p, _i64, _i64, _i32, _p]),
              ("alq_basis_search", [_p, _p, _p, _p, _i64, _i64, _i32, _p, _p]),
              ("alq_fill_bases", [_p, _p, _p, _p, _p, _i64, _i64, _i32, _p, _p, _p, _p]),
              ("alq_reconstruct", [_p, _p, _p, _i64, _i64, _i32, _p]),
              ("alq_shadow_step", [_p, _p, _p, _i64]))

_NATIVE = {}  # the compiled basis-step library, loaded once per process: {"lib": ctypes CDLL or None}


def enabled():
    """Whether the compiled code may run: QUANTLAB_ALQ_NATIVE is not 0 (nor set empty)."""
    return os.environ.get(NATIVE_ENV, "1") not in ("0", "")


def _build(cc, so):
    """Compile SOURCE into `so` through a temporary file in the same directory, renamed when complete."""
    os.makedirs(os.path.dirname(so), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(so))
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, SOURCE, "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library():
    """alq/basis_step.c through ctypes, or None where there is no C compiler or the build fails (said once, on
    stderr). Built and loaded once per process; `enabled` is the caller's to check."""
    if "lib" in _NATIVE:
        return _NATIVE["lib"]
    _NATIVE["lib"] = None
    cc = os.environ.get("CC", "cc")
    with open(SOURCE, "rb") as f:
        key = hashlib.sha1(f.read() + repr((cc, FLAGS)).encode()).hexdigest()[:16]
    so = os.path.join(cache_dir(), f"alq_basis_step-{key}.so")
    try:
        if not os.path.isfile(so):
            _build(cc, so)
        lib = ctypes.CDLL(so)
    except (OSError, subprocess.SubprocessError) as e:
        if isinstance(e, FileNotFoundError) and e.filename == cc:
            why = f"no C compiler {cc!r}"
        elif isinstance(e, subprocess.CalledProcessError):
            why = f"{cc} failed: " + ((e.stderr or b"").decode(errors="replace").strip().splitlines() or ["?"])[0]
        else:
            why = str(e)
        print(f"note: ALQ's compiled basis step is not available ({why}); the same computation runs in torch, "
              f"slower", file=sys.stderr)
        return None
    for name, args in SIGNATURES:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, args
    _NATIVE["lib"] = lib
    return lib


def nearest_code_native(t, values):
    """`fastpath._nearest_code_fast` for CPU float32 t (G, n), values (G, C), C <= 256, by the compiled search;
    None where it does not apply, is turned off (QUANTLAB_ALQ_NATIVE=0) or is not available. No host sync: the data
    are on the host."""
    G, C = values.shape
    if t.device.type != "cpu" or C > 256 or t.dtype != torch.float32 or values.dtype != torch.float32:
        return None
    lib = library() if enabled() else None
    if lib is None:
        return None
    t, values = t.contiguous(), values.contiguous()
    code = torch.empty(t.shape, dtype=torch.uint8)
    lib.alq_nearest_code(t.data_ptr(), values.data_ptr(), G, t.size(1), C, code.data_ptr())
    return code
