"""What a checkpoint is: paper, script, model, bit-width, scheme and recipe stage, checked on every load.

Every checkpoint this project writes carries an identity under the key `quantlab`:

    state = training_state(net, optimizer, scheduler, epoch, best,
                           quantlab=identity("apot", "resnet20", bits=4, scheme="apot", stage="train",
                                             recipe=recipe_info(...)))

and a script that loads one under its flags checks it first:

    ckpt = load_checkpoint(path, flag="--resume")
    note = check_checkpoint(ckpt, path, expect("apot", "resnet20", bits=2, scheme="apot"), flag="--resume")

A mismatch stops with one line naming both sides. Published checkpoints that carry nothing are looked
up by sha256 in KNOWN_CHECKPOINTS; a file that carries nothing and is not in the table (a third-party
checkpoint) is accepted when its weights fit the model, and `check_checkpoint` returns a note to put in
the result record.
"""
import hashlib
import os
import sys

from common.errors import UserError
from common.paths import REPO_ROOT

IDENTITY_KEY = "quantlab"
MATCH_FIELDS = ("paper", "model", "bits", "scheme")

_APOT = "github.com/yhhhli/APoT_Quantization"
# sha256 of the APoT authors' published checkpoints (the files the original repository links from its
# README: CIFAR10/result/res20_<bit>bit/ and MNIST/result/resnet10_<bit>bit[_uniform]/ model_best.pth.tar).
# Hashes computed from the files themselves; the files are never copied into this repository.
KNOWN_CHECKPOINTS = {}
for _bits, _scheme, _sha in (
        (32, "fp32", "f2d107bcd63ce2fcfb9b6f43f367dc80003e395b378111fedc7f9244fd90bfc6"),
        (4, "apot", "4db821849e375e3c31d12c6c03563e164ddd34f8da45e0d57bee87eb1d3b4303"),
        (3, "apot", "e7864989697c13ed8bfa304ca08bbe6ca3d759f71d4734fe3f3387f7d110a004"),
        (2, "apot", "d2dc978da7dc93cb6e90edc59035ac181921aef9d93598f884d325986a3e7cd2")):
    KNOWN_CHECKPOINTS[_sha] = dict(paper="apot", model="resnet20", dataset="cifar10", bits=_bits, scheme=_scheme,
                                   source=f"{_APOT} CIFAR10 result/res20_{_bits}bit/model_best.pth.tar")
for _bits, _apot, _uniform in (
        (2, "b59ff3153fc967cc183deb0142dc608f44a6bbe6c086ff741eb6e58417e87de7",
         "6f4d2134bdb8c521c70de3c9a8e2c709b6c20ae19b898aca3da979d6304a8f02"),
        (3, "c9c58199a244c6feb5b4d2fe0e0d547a157596f4846c44640a36ed95ce70cd25",
         "13e524f7fc118daf6984c2aa9b2d61f0e6c4417c36b2ac28d4edd5e3af1f0c62"),
        (4, "5aa98902f0b9ee85a3e052acdd10b02a08b79cde86bdd8c0097533ae1d6e7add",
         "6c3e89ea3e95e842d297f4e6eb7cec6164fcd38dc7d3146ae0c08005b0bceedc"),
        (5, "13ca47c7f535261c676bf7293b44809cf30d5bfba9a0b2944118a8b1ec41f2c0",
         "cad559a8ce87c59b97408801b568d194c769b6407bbcf79aa01379bb07027602")):
    for _sha, _scheme, _suffix in ((_apot, "apot", ""), (_uniform, "uniform", "_uniform")):
        KNOWN_CHECKPOINTS[_sha] = dict(paper="apot", model="resnet10", dataset="mnist", bits=_bits, scheme=_scheme,
                                       source=f"{_APOT} MNIST result/resnet10_{_bits}bit{_suffix}/model_best.pth.tar")


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def script_name(argv0=None):
    """The running script relative to the repository root ('apot/CIFAR10/main.py')."""
    p = os.path.abspath(argv0 or sys.argv[0])
    rel = os.path.relpath(p, REPO_ROOT)
    return p if rel.startswith("..") else rel


def identity(paper, model, bits, scheme, stage, recipe=None, script=None, **extra):
    """The dict stored under ckpt['quantlab']: what the checkpoint is and how it was made.

    bits: the bit-width (int, 32 = full precision) or a float average (ALQ); scheme: 'apot', 'uniform',
    'fp32', 'alq' ...; stage: the recipe stage that wrote it ('train', 'PRETRAIN', 'ALQ', 'POSTTRAIN');
    recipe: common.results.recipe_info(...) of the run; extra: anything else (finished, sha256 of inputs).
    """
    ident = {"paper": paper, "script": script or script_name(), "model": model, "bits": bits, "scheme": scheme,
             "stage": stage}
    if recipe is not None:
        ident["recipe"] = recipe
    ident.update(extra)
    return ident


def expect(paper, model, bits=None, scheme=None):
    """What the current flags ask for (None = any)."""
    return {"paper": paper, "model": model, "bits": bits, "scheme": scheme}


def describe(ident):
    """'apot resnet20 4-bit apot (stage train, apot/CIFAR10/main.py)'."""
    bits = ident.get("bits")
    b = "" if bits is None else ("FP32" if bits == 32 else f"{bits:g}-bit" if isinstance(bits, (int, float))
                                 else f"{bits}-bit")
    parts = [str(ident.get("paper", "?")), str(ident.get("model", "?")), b]
    if ident.get("scheme") and ident.get("scheme") != "fp32":
        parts.append(str(ident["scheme"]))
    more = [f"stage {ident['stage']}"] if ident.get("stage") and ident.get("stage") != "published" else []
    if ident.get("script"):
        more.append(ident["script"])
    if ident.get("source"):
        more.append("published: " + ident["source"])
    return " ".join(p for p in parts if p) + (f" ({', '.join(more)})" if more else "")


def _legacy_identity(ckpt):
    """Checkpoints written before identities existed: APoT scripts stored arch/bit/power at top level."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("bit"), int):
        return None
    ident = {"bits": ckpt["bit"]}
    if isinstance(ckpt.get("power"), bool):
        ident["scheme"] = "fp32" if ckpt["bit"] == 32 else ("apot" if ckpt["power"] else "uniform")
    return ident


def identify(ckpt, path=None):
    """(identity or None, origin): origin is 'own' (stored in the file), 'published' (sha256 in
    KNOWN_CHECKPOINTS), 'legacy' (an older file of this project: top-level bit/power) or 'unknown'."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get(IDENTITY_KEY), dict):
        return dict(ckpt[IDENTITY_KEY]), "own"
    if path is not None and os.path.isfile(path):
        known = KNOWN_CHECKPOINTS.get(sha256_file(path))
        if known is not None:
            return dict(known, stage="published", recipe=published_recipe(known)), "published"
    legacy = _legacy_identity(ckpt)
    if legacy is not None:
        return legacy, "legacy"
    return None, "unknown"


def published_recipe(known):
    return {"full": True, "summary": f"published checkpoint ({known['source']})"}


def _same(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) < 1e-9
    return a == b


def mismatches(ident, wanted, fields=MATCH_FIELDS):
    return [f for f in fields if wanted.get(f) is not None and ident.get(f) is not None
            and not _same(ident[f], wanted[f])]


def check_checkpoint(ckpt, path, wanted, flag="--resume", fields=MATCH_FIELDS, hint="", suggest=None):
    """Stop with one line when the checkpoint at `path` is not what `wanted` (see expect()) asks for.

    suggest(identity) -> the flags that would fit the file ('--bit 4 --power 0'), named in the message.
    Returns (identity or None, note): the note says where the identity came from, for the result record
    ('published checkpoint: ...', 'unknown third-party checkpoint: ...').
    """
    ident, origin = identify(ckpt, path)
    if ident is None:
        return None, ("unknown third-party checkpoint: it records no paper/model/bit-width and its sha256 is not "
                      "in common/identity.py KNOWN_CHECKPOINTS; accepted because its weights fit the model")
    bad = mismatches(ident, wanted, fields)
    if bad:
        asked = describe({k: wanted.get(k) for k in MATCH_FIELDS})
        if suggest is not None:
            hint = suggest(ident) or hint
        raise UserError(f"{flag} {path} is {describe(ident)} but the flags ask for {asked} "
                        f"({', '.join(bad)} differ); pass {hint or 'the flags it was made with'} or the right "
                        f"checkpoint")
    if origin == "published":
        return ident, f"published checkpoint: {ident['source']}"
    if origin == "legacy":
        return ident, "checkpoint written before identities were stored (bit-width read from its 'bit' key)"
    return ident, None
