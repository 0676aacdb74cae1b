"""FDDA options: the hocon file (pyhocon), the FDDA_DATA environment variable and `--<key> value` overrides.

    opt = Option.from_args(conf_path="imagenet_config.hocon", overrides={"qw": 5})

Every key of the original's imagenet_config.hocon is known here with its default (DEFAULTS, which mirrors
the shipped file; a test keeps them equal), including the ones the original hid in code. An unknown key, a
value of the wrong type or a file that does not parse is one UserError line.
"""
import argparse
import math
import os

from common import data as cdata
from common.checks import check_range
from common.errors import UserError
from fdda.quantization_utils import check_bits

DATA_ENV = "FDDA_DATA"

DEFAULTS = {
    "save_path": "./save_ImageNet/", "dataPath": "/path/to/ILSVRC2012/", "dataset": "imagenet",
    "manualSeed": 1, "GPU": 0, "nGPU": 1, "tenCrop": False, "nThreads": 8,
    "nEpochs": 400, "batchSize": 16, "momentum": 0.9, "weightDecay": 1e-4, "opt_type": "SGD",
    "warmup_epochs": 50, "lr_S": 0.000001, "lr": 0.1, "experimentID": "imganet_4bit_", "nClasses": 1000,
    "qw": 4, "qa": 4, "temperature": 20.0, "alpha": 20.0, "latent_dim": 100, "img_size": 224, "channels": 3,
    "lr_G": 0.001, "lrPolicy_G": "multi_step", "step_G": [100, 200, 300], "decayRate_G": 0.1,
    "b1": 0.5, "b2": 0.999, "use_FDDA": True, "D_BNSLoss_weight": 0.9, "C_BNSLoss_weight": 0.01, "FDDA_iter": 1,
    "BNLoss_weight": 0.2,
    "iters_per_epoch": 200, "unfreeze_epochs": 4, "correct_set_epoch": 4, "test_start_epoch": -1,
    "test_teacher": True, "test_batchSize": 32, "cosine_epochs": 100, "dbns_mean_std": 0.5, "dbns_var_std": 1.0,
    "ccbn_eps": 0.8, "clip_ste": False,
}
# the recipe behind the published numbers; a run that changes any of these is recorded as shortened
RECIPE_KEYS = ("nEpochs", "batchSize", "warmup_epochs", "lr_S", "iters_per_epoch", "unfreeze_epochs",
               "correct_set_epoch", "img_size", "step_G", "lr_G", "cosine_epochs", "use_FDDA", "BNLoss_weight",
               "D_BNSLoss_weight", "C_BNSLoss_weight", "FDDA_iter", "temperature", "alpha", "latent_dim")
POSITIVE = ("nEpochs", "batchSize", "iters_per_epoch", "FDDA_iter", "latent_dim", "img_size", "channels",
            "test_batchSize", "cosine_epochs", "nClasses")


def _coerce(key, value, where):
    want = DEFAULTS[key]
    try:
        if isinstance(want, bool):
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.strip().lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(want, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if isinstance(want, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(want, list):
            if isinstance(value, str):
                value = [v for v in value.replace("[", " ").replace("]", " ").replace(",", " ").split()]
            return [int(v) if float(v).is_integer() else float(v) for v in value]
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{key} = {value!r} ({where}) is not a valid {type(want).__name__}; "
                        f"the default is {want!r}") from None


class Option:
    """Attribute access to the resolved settings (opt.qw, opt.dataPath ...); `opt.sources[key]` says where
    each value came from ('default', the hocon path, 'environment FDDA_DATA' or 'command line')."""

    def __init__(self, values, sources, conf_path=None):
        self.__dict__.update(values)
        self.sources = sources
        self.conf_path = conf_path

    def as_dict(self):
        return {k: getattr(self, k) for k in DEFAULTS}

    def shortened(self):
        """Recipe keys that differ from the published recipe (empty for a faithful run)."""
        return {k: getattr(self, k) for k in RECIPE_KEYS if getattr(self, k) != DEFAULTS[k]}

    def recipe(self, teacher_source):
        """common.results.recipe_info of this run: full only with the published constants and a pretrained
        teacher (a random teacher is a smoke run)."""
        from common.results import recipe_info
        return recipe_info({k: (getattr(self, k), DEFAULTS[k]) for k in RECIPE_KEYS},
                           {"teacher": "random (smoke run)" if teacher_source == "random" else None})

    @classmethod
    def from_args(cls, conf_path=None, overrides=None, env=None):
        env = os.environ if env is None else env
        values, sources = dict(DEFAULTS), {k: "default" for k in DEFAULTS}
        # DEFAULTS mirror the shipped file (its placeholder dataPath); a file without the key gets every script's
        # default data root instead (common.data.data_root, read from `env`)
        values["dataPath"] = env.get(cdata.DATA_ENV) or "./data"
        sources["dataPath"] = f"default (${cdata.DATA_ENV}, else ./data)"
        if conf_path is not None:
            for k, v in parse_hocon(conf_path).items():
                if k == "dataPath" and v == DEFAULTS["dataPath"]:
                    # the original's placeholder, not a path anyone has: the data root rule applies instead
                    sources[k] = f"{sources[k]}; {conf_path} holds the placeholder {v}"
                    continue
                values[k], sources[k] = _coerce(k, v, conf_path), conf_path
        if env.get(DATA_ENV):
            values["dataPath"], sources["dataPath"] = env[DATA_ENV], f"environment {DATA_ENV}"
        for k, v in (overrides or {}).items():
            if v is not None:
                values[k], sources[k] = _coerce(k, v, "command line"), "command line"
        opt = cls(values, sources, conf_path)
        opt.validate()
        return opt

    def validate(self):
        check_bits(self.qw, "qw")
        check_bits(self.qa, "qa")
        for k in POSITIVE:
            if getattr(self, k) < 1:
                raise UserError(f"{k} = {getattr(self, k)} must be at least 1")
        for k in ("warmup_epochs", "unfreeze_epochs", "correct_set_epoch", "nThreads",
                  "manualSeed", "GPU", "lr_S", "lr_G", "lr", "weightDecay", "BNLoss_weight", "D_BNSLoss_weight",
                  "C_BNSLoss_weight", "alpha", "dbns_mean_std", "dbns_var_std"):
            v = getattr(self, k)
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{k} = {v} is not a finite number")
            if v < 0:
                raise UserError(f"{k} = {v} must not be negative")

        if self.test_start_epoch < -1:
            raise UserError(f"test_start_epoch = {self.test_start_epoch} must be -1 (the original: from epoch "
                            f"warmup_epochs - 1 on) or an epoch >= 0")
        for k, lo, hi in (("momentum", 0, 1), ("b1", 0, 1), ("b2", 0, 1), ("decayRate_G", 0, 1)):
            check_range(k + " =", getattr(self, k), lo=lo, hi=hi, hi_open=k in ("b1", "b2"))
        for k in ("temperature", "ccbn_eps"):
            check_range(k + " =", getattr(self, k), lo=0, lo_open=True)
        if self.dataset != "imagenet":
            raise UserError(f"dataset = {self.dataset!r}: the FDDA recipe supports only \"imagenet\" "
                            f"(an ImageNet-style ImageFolder under dataPath)")
        if self.opt_type != "SGD":
            raise UserError(f"opt_type = {self.opt_type!r}: only \"SGD\" (Nesterov) is implemented, as published")
        if self.lrPolicy_G != "multi_step":
            raise UserError(f"lrPolicy_G = {self.lrPolicy_G!r}: only \"multi_step\" is implemented, as published")
        if self.tenCrop:
            raise UserError("tenCrop = true is not supported: the published numbers use one center crop")
        if self.nGPU != 1:
            raise UserError(f"nGPU = {self.nGPU}: one GPU per process; for several GPUs launch "
                            f"`torchrun --nproc_per_node=N main_cosine_CBNS.py ...`")
        if self.img_size % 4:
            raise UserError(f"img_size = {self.img_size} must be a multiple of 4 (the generator upsamples x4)")

    def run_dir_name(self):
        """The original's run directory name (set_save_path), lr being the hidden default 0.1."""
        return (f"log_{self.dataset}_bs{self.batchSize:d}_lr{self.lr:.4f}_TELCNN_baseline_opt{self.opt_type}"
                f"_qw{self.qw:d}_qa{self.qa:d}_epoch{self.nEpochs}_{self.experimentID}")


def parse_hocon(conf_path):
    """The keys of a hocon file as a plain dict; a missing file, a parse error or an unknown key is one line."""
    if conf_path is None or not os.path.isfile(conf_path):
        raise UserError(f"config file not found: {conf_path} (pass --conf_path imagenet_config.hocon, "
                        f"run from fdda/)")
    from pyhocon import ConfigFactory
    try:
        conf = ConfigFactory.parse_file(conf_path)
    except Exception as e:  # noqa: BLE001 - pyhocon raises several exception types for bad syntax
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{conf_path} does not parse as HOCON ({type(e).__name__}: {first[:160]})") from None
    values = conf.as_plain_ordered_dict()
    unknown = [k for k in values if k not in DEFAULTS]
    if unknown:
        raise UserError(f"{conf_path}: unknown key {unknown[0]!r} (known keys: see fdda/imagenet_config.hocon)")
    return dict(values)


def script_parser(description, model_names):
    """The flags main_cosine_CBNS.py and test.py share (--conf_path, --model_name)."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    p.add_argument("--conf_path", type=str, default=None, help="hocon config (imagenet_config.hocon)")
    p.add_argument("--model_name", type=str, default=None, help=" | ".join(model_names))
    return p


def require(args, model_names, **more):
    """One line for a missing --conf_path / --model_name / other required flag (`more`: flag -> hint)."""
    if not args.conf_path:
        raise UserError("pass --conf_path imagenet_config.hocon")
    if not args.model_name:
        raise UserError(f"pass --model_name ({' | '.join(model_names)})")
    for flag, hint in more.items():
        if not getattr(args, flag):
            raise UserError(f"pass --{flag} {hint}")


def add_override_flags(parser):
    """`--<key> VALUE` for every config key (strings; converted and checked by Option.from_args)."""
    g = parser.add_argument_group("config overrides (any key of the hocon file)")
    for k, v in DEFAULTS.items():
        g.add_argument(f"--{k}", default=None, metavar=type(v).__name__.upper(), help=f"(hocon default {v!r})")
    return parser


def overrides_from(args):
    return {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}


def setting_name(qw, qa, f8l8):
    """Result-table setting: W4A4-F4L4 (all layers at qw/qa) or W4A4-F8L8 (first layer, last activation and
    every Linear at 8 bits)."""
    return f"W{qw}A{qa}-" + ("F8L8" if f8l8 else f"F{qw}L{qa}")
