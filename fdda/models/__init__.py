"""The four FDDA networks (`--model_name`), their pretrained-weight files, BN-layer counts and F8L8 paths.

resnet18, mobilenet_w1 and regnetx_600m come from the `pytorchcv` package (model modules are imported
directly, so nothing is downloaded when a network is built); mobilenetv2_w1 is BRECQ's MobileNetV2
(fdda/models/mobilenetv2.py). Pretrained weights are never downloaded: they are read from the file the
original would have used (pytorchcv's model store `~/.torch/models`, or torch.hub's checkpoint folder for
BRECQ), or from `--teacher_path`.
"""
import hashlib
import os
from dataclasses import dataclass

import torch.nn as nn

from common.checkpoint import extract_state_dict, load_checkpoint, load_model_state
from common.errors import UserError
from common.identity import check_checkpoint, expect


@dataclass(frozen=True)
class Spec:
    build: str            # "module:function" (pytorchcv) or our own builder
    weights: str          # the pretrained file the original used
    sha1: str             # its full SHA-1 (pytorchcv store) or "" (BRECQ publishes none)
    store: str            # "pytorchcv" (~/.torch/models) or "torchhub" ($TORCH_HOME/hub/checkpoints)
    bn_layers: int        # number of BatchNorm2d layers (the paper's L), asserted against the built model
    f8l8_first: tuple     # F8L8: every Conv/ReLU at or under these full-precision paths is 8-bit
    f8l8_last: tuple      # F8L8: these activations are 8-bit


MODELS = {
    # The original vendored pytorchcv v0.0.153 and its resnet18 weights (file tag 0982: top-5 error 9.82%), not the
    # file current pytorchcv fetches (resnet18-0896-77a56f15): the teacher must be the original's.
    "resnet18": Spec("pytorchcv.models.resnet:resnet18", "resnet18-0982-0126861b.pth",
                     "0126861b4cd7f7b14196b1e01827da688f8bab6d", "pytorchcv", 20,
                     ("features.init_block",), ("features.stage4.unit2.activ",)),
    "mobilenet_w1": Spec("pytorchcv.models.mobilenet:mobilenet_w1", "mobilenet_w1-0895-7e1d739f.pth",
                         "7e1d739f0fd4b95c16eef077c5dc0a5bb1da8ad5", "pytorchcv", 27,
                         ("features.init_block.conv", "features.init_block.activ"),
                         ("features.stage5.unit2.pw_conv.activ",)),
    "mobilenetv2_w1": Spec("fdda.models.mobilenetv2:mobilenetv2", "mobilenetv2.pth.tar", "", "torchhub", 52,
                           ("features.0.0", "features.0.2"), ("features.18.2",)),
    # the original's model_provider aliased regnetx_600m to pytorchcv's regnetx006
    "regnetx_600m": Spec("pytorchcv.models.regnet:regnetx006", "regnetx006-0791-30ca597a.pth",
                         "30ca597ae0506cb588a7fd8d2fecc4be8402b0cf", "pytorchcv", 53,
                         ("features.init_block.conv", "features.init_block.activ"),
                         ("features.stage4.unit7.activ",)),
}


def check_model_name(name):
    if name not in MODELS:
        raise UserError(f"unknown --model_name {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name]


def dbns_start_layer(bn_layers):
    """First BN layer whose statistics enter DBNS/CBNS: floor((L + 1) / 2) - 2 (trainer_DBNS_CBNS.py)."""
    return (bn_layers + 1) // 2 - 2


def f8l8_rule(name):
    spec = check_model_name(name)
    return {"first": spec.f8l8_first, "last": spec.f8l8_last}


def bn_count(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def build(name, num_classes=1000):
    """The full-precision network, randomly initialised; its BN count is asserted to be the paper's L."""
    import importlib
    spec = check_model_name(name)
    module, fn = spec.build.split(":")
    ctor = getattr(importlib.import_module(module), fn)
    model = ctor(n_class=num_classes) if name == "mobilenetv2_w1" else ctor(num_classes=num_classes)
    n = bn_count(model)
    if n != spec.bn_layers:
        raise UserError(f"{name} built by {spec.build} has {n} BatchNorm2d layers, the FDDA recipe expects "
                        f"{spec.bn_layers}; the installed pytorchcv does not build the original network")
    return model


def check_input_size(name, img_size, num_classes=1000, flag="img_size ="):
    """The channel counts of `name`'s BN layers in execution order, found by one forward of a 1 x 3 x img_size
    x img_size zero image (a throw-away random network; torch's random state is restored, so no later draw
    changes). A size the network cannot take is one line: resnet18 and mobilenet_w1 end in a fixed 7x7 average
    pool followed by the classifier, so only inputs whose last feature map is 7x7 (about 193..224 px) work."""
    import torch
    with torch.random.fork_rng(devices=[]):
        model = build(name, num_classes).eval()
    channels = []
    hooks = [m.register_forward_hook(lambda mod, i, o: channels.append(mod.num_features))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
    except RuntimeError as e:
        why = " ".join(str(e).split())[:140]
        raise UserError(f"{flag} {img_size} does not fit {name}: its forward fails on {img_size} x {img_size} "
                        f"images (RuntimeError: {why}); the published size 224 fits every FDDA network") from None
    finally:
        for h in hooks:
            h.remove()
    return channels


def default_weights_path(name):
    """Where the original would have found the pretrained file (no download ever happens here)."""
    spec = check_model_name(name)
    if spec.store == "pytorchcv":
        root = os.environ.get("PYTORCHCV_HOME") or os.path.join("~", ".torch", "models")
        return os.path.join(os.path.expanduser(root), spec.weights)
    import torch.hub
    return os.path.join(torch.hub.get_dir(), "checkpoints", spec.weights)


def _sha1(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_pretrained(model, name, path=None, flag="--teacher_path"):
    """Load the pretrained weights into `model`; one line naming the exact file when it is missing or wrong."""
    spec = check_model_name(name)
    path = path or default_weights_path(name)
    if not os.path.isfile(path):
        where = ("pytorchcv's store ~/.torch/models (or $PYTORCHCV_HOME)" if spec.store == "pytorchcv"
                 else "torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints)")
        raise UserError(f"pretrained {name} weights not found: expected {spec.weights} at {path} ({where}); "
                        f"nothing is downloaded here: copy the file there or pass {flag} FILE "
                        f"({flag} random builds a randomly initialised network for smoke runs)")
    if spec.sha1 and os.path.basename(path) == spec.weights and not _sha1(path).startswith(spec.sha1):
        raise UserError(f"{path} does not have the SHA-1 {spec.sha1} of pytorchcv's {spec.weights}; "
                        f"the file is damaged or another release's: re-download it")
    ckpt = load_checkpoint(path, what=f"pretrained {name} weights", flag=flag)
    # a file of this project says what it is: the teacher must be full precision (the weights check below
    # would also fail, but without saying why)
    check_checkpoint(ckpt, path, expect("fdda", name, bits=32, scheme="fp32"), flag=flag, fields=("bits", "scheme"),
                     hint="the full-precision weights")
    load_model_state(model, extract_state_dict(ckpt, keys=("model", "state_dict")), strict=True,
                     what=f"pretrained {name} weights {path}")
    return path


def build_student(fp_model, name, qw, qa, f8l8=False, clip_ste=False):
    """The quantized copy of a full-precision network (F8L8 rule of `name` when f8l8)."""
    from fdda.quantization_utils import quantize_model
    return quantize_model(fp_model, qw, qa, f8l8_rule(name) if f8l8 else None, clip_ste=clip_ste)


def build_teacher(name, teacher_path, num_classes, seed=0):
    """Full-precision teacher in eval mode and where its weights came from: the pretrained file, or
    `random` (a seeded random initialisation, for smoke runs only)."""
    import torch
    if teacher_path == "random":
        torch.manual_seed(seed)
        return build(name, num_classes).eval(), "random"
    model = build(name, num_classes)
    return model.eval(), load_pretrained(model, name, teacher_path)
