"""The command line shared by lenet5.py, vgg.py and resnet.py (per-script defaults passed in) and its checks,
all made before any work: values, layer flags against the network, stage inputs and outputs; and the flags that
shape each stage's result (stored in its checkpoints, compared on --resume)."""
import argparse
import os

from alq.binarynet import STRUCTURES, split_parameters
from common.checkpoint import load_checkpoint
from common.checks import check_range, check_results_writable, check_writable_dir, check_writable_file
from common.data import data_root
from common.errors import UserError
from common.identity import IDENTITY_KEY
from common.results import recipe_info


# ---------------------------------------------------------------------------------------------------
# Command line shared by the three scripts (per-script defaults passed in)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' only where the help does not already say its default and X is not None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def alq_argparser(description, defaults, dataset_help):
    """Every flag of the original scripts, with the script's defaults, plus this project's additions."""
    d = defaults
    p = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--data", type=str, default=data_root(),
                   help=dataset_help + " (default: $QUANTLAB_DATA, else ./data)")
    p.add_argument("--val_size", type=int, default=d["val_size"],
                   help="the number of training samples held out for validation")
    p.add_argument("--model_ori", type=str, default=d["model_ori"],
                   help="the file of the original full precision model")
    p.add_argument("--model", type=str, default=d["model"], help="the file of the quantized model (--ALQ output)")
    p.add_argument("--PRETRAIN", action="store_true", help="train the original full precision model")
    p.add_argument("--ALQ", action="store_true", help="adaptive loss-aware quantize the model")
    p.add_argument("--POSTTRAIN", action="store_true", help="posttrain the final quantized model (loads --model)")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate")
    p.add_argument("--R", type=int, default=d["R"], help="the number of outer iterations, also the number of pruning")
    p.add_argument("--epoch_prune", type=int, default=1, help="the number of epochs for pruning")
    p.add_argument("--epoch_basis", type=int, default=d["epoch_basis"],
                   help="the number of epochs for optimizing bases")
    p.add_argument("--ld_basis", type=float, default=0.8, help="learning rate decay factor for optimizing bases")
    p.add_argument("--epoch_coord", type=int, default=d["epoch_coord"],
                   help="the number of epochs for optimizing coordinates")
    p.add_argument("--ld_coord", type=float, default=d["ld_coord"],
                   help="learning rate decay factor for optimizing coordinates")
    p.add_argument("--wd", type=float, default=0.0, help="weight decay (on the coordinates and the FP parameters)")
    p.add_argument("--pr", type=float, default=d["pr"], help="the pruning ratio of alpha")
    p.add_argument("--top_k", type=float, default=d["top_k"],
                   help="the ratio of selected alpha in each layer for resorting")
    p.add_argument("--structure", type=str, nargs="+", choices=list(STRUCTURES), default=d.get("structure"),
                   help="the structure-wise used in each layer")
    p.add_argument("--subc", type=int, nargs="+", default=d.get("subc"),
                   help="number of subchannels when using subchannelwise")
    p.add_argument("--max_bit", type=int, nargs="+", default=d.get("max_bit"),
                   help="the maximum bitwidth used in initialization")
    p.add_argument("--batch_size", type=int, default=d["batch_size"],
                   help="the number of training samples in each batch")
    g = p.add_argument_group("quantlab additions")
    g.add_argument("--model_post", type=str, default=None,
                   help="where POSTTRAIN keeps its best model (default: --model with '_post' before the extension)")
    g.add_argument("--export", type=str, default=None, metavar="PATH",
                   help="write the quantized model bit-packed to PATH (after the stages run, else from the newest "
                        "of --model_post/--model), reload it, check it is bit-identical and evaluate it")
    g.add_argument("--resume", action="store_true",
                   help="continue a killed stage from its last finished epoch (<file>.resume.pth) and skip "
                        "stages already finished")
    g.add_argument("--seed", type=int, default=1, help="seed of the validation split, shuffling and pruning draws")
    g.add_argument("--workers", type=int, default=min(d["workers"], os.cpu_count() or 1),
                   help="data loading worker processes (image folders only)")
    g.add_argument("--fix_sign_flip", action="store_true",
                   help="apply the basis sign flip the original loses in basis/STE steps (DEVIATIONS.md)")
    g.add_argument("--fix_importance_index", action="store_true",
                   help="rank pruning candidates across layers by their true importance (DEVIATIONS.md)")
    g.add_argument("--stable_tie_order", action="store_true",
                   help="rank equal pruning deltas stably (layer order) instead of in the order the original's "
                        "PyTorch 1.3 CPU sort gave them (DEVIATIONS.md)")
    g.add_argument("--val_no_aug", action="store_true",
                   help="validate without the training augmentation (the original validates with it)")
    g.add_argument("--log_dir", type=str, default=None,
                   help="run directory: manifest, log, tensorboard, record copies (default: runs/alq/<model>-<time>/, "
                        "with --resume the newest of those)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing stage outputs (--model_ori/--model/--model_post/--export); without it a "
                        "stage never overwrites a file, and --resume continues or skips it")
    g.add_argument("--pretrain_epochs", type=int, default=d["pretrain_epochs"],
                   help="PRETRAIN epochs (the original's fixed recipe)")
    g.add_argument("--post_epochs", type=int, nargs=2, default=d["post_epochs"], metavar=("STE", "COORD"),
                   help="POSTTRAIN epochs of STE basis steps and of coordinate steps (the original's fixed recipe)")
    g.add_argument("--train_limit", type=int, default=None, metavar="N",
                   help="use only the first N training images after the validation split (smoke tests)")
    # the published recipe (the original's fixed values): a record says which of these a run shortened
    p.set_defaults(recipe_defaults={k: d[k] for k in ("R", "epoch_basis", "epoch_coord", "pretrain_epochs",
                                                      "post_epochs")},
                   documented_paths={"model_ori": d["model_ori"], "model": d["model"]})
    return p


def model_post_path(args):
    if args.model_post:
        return args.model_post
    root, ext = os.path.splitext(args.model)
    return root + "_post" + (ext or ".pth")


def launched_rank():
    """This process's rank under torchrun (its RANK variable), 0 otherwise; known before any process group."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def said_by_rank_zero(fn):
    """fn(), whose UserError every torchrun process meets alike (same flags, files and WORLD_SIZE): rank 0 prints
    it (common.errors.run_main: one line, exit 2) and the other processes exit 2 without a word, so that the
    error is one line, not one per process."""
    try:
        return fn()
    except UserError:
        if launched_rank() > 0:
            raise SystemExit(2) from None
        raise


def check_args(args):
    for flag in ("lr", "ld_basis", "ld_coord", "top_k", "pr"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be non-negative, got {getattr(args, flag)}")
    for flag in ("R", "epoch_prune", "epoch_basis", "epoch_coord"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.pretrain_epochs < 0 or min(args.post_epochs) < 0:
        raise UserError("--pretrain_epochs and --post_epochs must be >= 0")
    if args.train_limit is not None and args.train_limit < 1:
        raise UserError(f"--train_limit must be >= 1, got {args.train_limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    world = int(os.environ.get("WORLD_SIZE") or 1)    # torchrun: --batch_size is the total over the processes
    if args.batch_size % world:
        raise UserError(f"--batch_size {args.batch_size} is the total batch of the {world} processes and must be a "
                        f"multiple of {world}; pass --batch_size {max(world, args.batch_size // world * world)}")
    check_range("--pr", args.pr, lo=0, hi=1)
    check_range("--top_k", args.top_k, lo=0, hi=1)
    check_range("--val_size", args.val_size, lo=1)
    check_range("--lr", args.lr, lo=0)                   # also refuses NaN and inf
    check_range("--workers", args.workers, lo=0)
    check_range("--ld_basis", args.ld_basis, lo=0, hi=1)
    check_range("--ld_coord", args.ld_coord, lo=0, hi=1)


# ---------------------------------------------------------------------------------------------------
# Which parameters are quantized: the layer flags against the network


def check_layer_flags(names_w, params_w, structure, subc, max_bit):
    L = len(params_w)
    for flag, v in (("--structure", structure), ("--subc", subc), ("--max_bit", max_bit)):
        if v is None or len(v) != L:
            raise UserError(f"{flag} needs one value per quantized layer: this network has {L} "
                            f"({', '.join(names_w)}), got {0 if v is None else len(v)}")
    for i, (name, p) in enumerate(zip(names_w, params_w)):
        if not 1 <= max_bit[i] <= 16:
            raise UserError(f"--max_bit {max_bit[i]} for {name} is impossible; use 1..16 bits")
        if p.dim() == 2:
            if structure[i] != "subchannelwise":
                raise UserError(f"{name} is fully connected and needs --structure subchannelwise, got {structure[i]}")
            if subc[i] < 1 or p.shape[1] % subc[i]:
                raise UserError(f"--subc {subc[i]} for {name} must be >= 1 and divide its {p.shape[1]} inputs")
        elif structure[i] not in STRUCTURES[:3]:
            raise UserError(f"{name} is a convolution and needs kernelwise, pixelwise or channelwise, "
                            f"got {structure[i]}")


def check_inputs(args, build_net):
    """Before any run directory exists: the layer flags fit the network, and the stage inputs that already
    exist (--model_ori for --ALQ, --model for --POSTTRAIN, when the stage before is not run) are this
    script's files of the right stage. The stages check them again when they load them."""
    if args.ALQ:
        names_w, params_w, _ = split_parameters(build_net())
        check_layer_flags(names_w, params_w, args.structure, args.subc, args.max_bit)
    for on, before, path, flag, what, stage in ((args.ALQ, args.PRETRAIN, args.model_ori, "--model_ori",
                                                 "full-precision model", "PRETRAIN"),
                                                (args.POSTTRAIN, args.ALQ, args.model, "--model", "quantized model",
                                                 "ALQ")):
        if not on or before or not path or not os.path.exists(path):
            continue                              # made by the stage before, or missing: the stage says so
        ck = load_checkpoint(path, what=what, flag=flag)
        if not isinstance(ck, dict) or "net_state_dict" not in ck:
            raise UserError(f"{flag} {path} is not a checkpoint of this script (no 'net_state_dict'); pass the "
                            f"{stage} output")
        ident = ck.get(IDENTITY_KEY) if isinstance(ck.get(IDENTITY_KEY), dict) else {}
        got = str(ident.get("stage") or ck.get("stage") or "")
        if got and not got.startswith(stage):
            raise UserError(f"{flag} {path} is a {got} output; {flag} takes the {stage} output")


def check_outputs(args):
    """Before any work: every file a stage will write is writable, and none is another run's output unless
    --resume (continue or skip that stage) or --overwrite says so; the log and results dirs are writable."""
    outs = (("--model_ori", args.PRETRAIN, args.model_ori), ("--model", args.ALQ, args.model),
            ("--model_post", args.POSTTRAIN, model_post_path(args)), ("--export", bool(args.export), args.export))
    for flag, on, path in outs:
        if not on:
            continue
        check_writable_file(path, flag)
        if os.path.exists(path) and not args.overwrite and not (args.resume and flag != "--export"):
            raise UserError(f"{flag} {path} already exists ({describe_file(path)}); pass --resume to continue or "
                            f"skip that stage, --overwrite to replace it, or another {flag}")
    if args.log_dir:
        check_writable_dir(args.log_dir, "--log_dir")
    check_results_writable()


def describe_file(path):
    try:
        ck = load_checkpoint(path)
    except UserError:
        return "not a readable checkpoint"
    if not isinstance(ck, dict):
        return "not a checkpoint of this script"
    ident = ck.get(IDENTITY_KEY)
    if not isinstance(ident, dict):
        return f"stage {ck.get('stage', 'PRETRAIN' if 'optimizer_state_dict' in ck else '?')}"
    return f"{ident.get('stage')} of {ident.get('model')}, {'finished' if ident.get('finished') else 'unfinished'}, " \
           f"recipe {(ident.get('recipe') or {}).get('summary', 'not recorded')}"


def stage_recipe(args, stage):
    """recipe_info of one stage: its epochs against the published (default) values, and the smoke limits."""
    d = getattr(args, "recipe_defaults", None) or {}
    steps = {"PRETRAIN": ("pretrain_epochs",), "ALQ": ("R", "epoch_basis", "epoch_coord"),
             "POSTTRAIN": ("post_epochs",)}[stage]
    used = {k: (list(getattr(args, k)) if k == "post_epochs" else getattr(args, k)) for k in steps}
    pub = {k: (list(d[k]) if k == "post_epochs" else d[k]) for k in steps if k in d}
    extra = {"epoch_prune": (args.epoch_prune, 1)} if stage == "ALQ" else {}
    return recipe_info({**{k: (used[k], pub.get(k, used[k])) for k in steps}, **extra},
                       limits={"train_limit": args.train_limit})


# The flags that shape a stage's result. A stage output or resume file stores them; --resume refuses to continue
# or skip a stage that was made with other values (it would report the old model under the new flags).
_DATA_FLAGS = ("seed", "val_size", "batch_size", "train_limit", "val_no_aug")
STAGE_FLAGS = {
    "PRETRAIN": _DATA_FLAGS + ("pretrain_epochs",),
    "ALQ": _DATA_FLAGS + ("lr", "R", "epoch_prune", "epoch_basis", "ld_basis", "epoch_coord", "ld_coord", "wd",
                          "pr", "top_k", "structure", "subc", "max_bit", "fix_sign_flip", "fix_importance_index",
                          "stable_tie_order"),
    "POSTTRAIN": _DATA_FLAGS + ("lr", "wd", "post_epochs", "fix_sign_flip"),
}


_SWITCHES = ("val_no_aug", "fix_sign_flip", "fix_importance_index", "stable_tie_order")   # store_true flags


def stage_flags(args, stage):
    """{flag: value} of the flags that shape `stage` (lists for nargs flags, so they survive a checkpoint)."""
    out = {}
    for k in STAGE_FLAGS[stage]:
        v = getattr(args, k, None)
        out[k] = bool(v) if k in _SWITCHES else list(v) if isinstance(v, (list, tuple)) else v
    return out
