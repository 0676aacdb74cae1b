"""AlignQ's checkpoints: the original's keys (state_dict_t, optimizer_t, epoch, best_prec1) and what a file is
(common.identity), the weights a run starts from (a checkpoint to evaluate, resume or refine, the FP32 source
model, torchvision's ImageNet ResNet-50), and where a run writes them: runs/alignq/<job_dir basename>-<time>/
with --job_dir a link to it, and a real --job_dir of an older version continued or removed (--reset)."""
import os
import shutil
from dataclasses import dataclass

import torch

from alignq.options import is_fp32, model_name, use_admm
from common import runs
from common.checkpoint import load_checkpoint
from common.checks import check_resume_flags, check_writable_dir, check_writable_file
from common.device import get_rng_state, set_rng_state
from common.errors import UserError
from common.identity import check_checkpoint, describe, expect, identify, identity
from common.runlog import epoch_label

PAPER = "alignq"
IMAGENET_FILES = ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth")   # torchvision's IMAGENET1K_V1 (new, old name)


# ------------------------------------------------------------------------------------------------ weights


def source_candidates(args):
    """Where the FP32 source model may be: source_dir/source_file, then the original's source_dir/ours/source_file
    (source_dir/<method>/source_file for the baselines)."""
    sub = "ours" if args.method == "ours" else args.method
    return [os.path.join(args.source_dir, args.source_file), os.path.join(args.source_dir, sub, args.source_file)]


def pretrain_hint(args):
    script = (f"; `bash alignq/pretrain.sh {args.experiment}` runs the README's recipe"
              if args.experiment in ("resnet-20-cifar-10", "dann_office") else "")
    return (f"create it by running this command with --bitW 32 --abitW 32 (FP32 pretraining{script}), "
            f"or pass --no-pretrained")


def is_quant_param(key):
    """Tensors an FP32 source model does not have: ADMM Z/Gamma and the baselines' step sizes."""
    return key.endswith((".alterD", ".gamma", ".alpha", ".alpha_w", "wgt_alpha", "act_alpha", "quantizer.s"))


def load_weights(model, path, what, expect_model=None):
    """By-name load of `state_dict_t` (the original's key) like the original; a file of another architecture
    (shape mismatch, or the model's conv/BN/linear tensors missing) is an error."""
    ckpt = load_checkpoint(path, what=what)
    sd = ckpt.get("state_dict_t") if isinstance(ckpt, dict) else None
    if sd is None and isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt
    if not isinstance(sd, dict):
        raise UserError(f"{what} {path} holds no 'state_dict_t' weights")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    has = (ckpt.get("quantlab") or {}).get("model") or ckpt.get("model")
    if expect_model and has not in (None, expect_model):
        raise UserError(f"{what} {path} is a {has} model but this run builds {expect_model}; "
                        f"pass the matching checkpoint")
    own = model.state_dict()
    bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd and not is_quant_param(k) and not k.endswith("num_batches_tracked")]
    if bad or missing:
        k = (bad or missing)[0]
        raise UserError(f"{what} {path} does not match this {expect_model or 'model'} ({len(bad)} shape mismatches, "
                        f"{len(missing)} missing tensors, e.g. {k}); it is a checkpoint of another architecture")
    own.update({k: v for k, v in sd.items() if k in own})
    model.load_state_dict(own)
    return ckpt


def check_fp32_source(ckpt, path):
    """The source model of a quantized run must be a full-precision one: a checkpoint that records a bit-width
    below 32 or a quantization scheme (an 8-bit run's model_best.pt, say) is refused; --refine starts from one."""
    ident, _ = identify(ckpt)     # what the file records (check_checkpoint then also looks up its sha256)
    if ident is None:
        return
    bits, scheme = ident.get("bits"), ident.get("scheme")
    if (bits is not None and bits != 32) or (scheme is not None and scheme != "fp32"):
        raise UserError(f"--source_dir/--source_file {path} is {describe(ident)}, not an FP32 model: pass the FP32 "
                        f"source model (--bitW 32 --abitW 32 writes it), or --refine {path} to start from it")


def imagenet_weights(args):
    """The local torchvision ResNet-50 ImageNet file (--imagenet_weights, else pretrained/ or the torch hub cache)."""
    if args.imagenet_weights:
        if not os.path.isfile(args.imagenet_weights):
            raise UserError(f"--imagenet_weights {args.imagenet_weights} does not exist")
        return args.imagenet_weights
    hub = os.path.join(os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch")),
                       "hub", "checkpoints")
    for d in (args.source_dir, hub):
        for f in IMAGENET_FILES:
            if os.path.isfile(os.path.join(d, f)):
                return os.path.join(d, f)
    raise UserError(f"the DANN/DSAN ResNet-50 starts from ImageNet weights: torchvision's {IMAGENET_FILES[0]} "
                    f"(IMAGENET1K_V1) was not found in {args.source_dir} or {hub}; pass --imagenet_weights FILE "
                    f"or --no-pretrained to start from scratch")


def load_imagenet(model, path):
    sd = load_checkpoint(path, what="ImageNet weights")
    feat = model.feature.state_dict()
    bad = [k for k in feat if k in sd and tuple(sd[k].shape) != tuple(feat[k].shape)]
    missing = [k for k in feat if k not in sd and not is_quant_param(k) and not k.endswith("num_batches_tracked")]
    if bad or missing:
        raise UserError(f"ImageNet weights {path} do not match ResNet-50 (e.g. {(bad or missing)[0]}); "
                        f"pass torchvision's {IMAGENET_FILES[0]}")
    feat.update({k: v for k, v in sd.items() if k in feat})
    model.feature.load_state_dict(feat)


@dataclass
class Start:
    """Where a run starts: its first epoch and best top-1 (a resumed run's), the --resume checkpoint, the recipe
    of the weights it starts from, the checkpoint note of common.identity, and the file --test_only evaluates."""
    epoch: int = 0
    best: float = 0.0
    resume_ckpt: dict = None
    source_recipe: dict = None
    note: str = None
    path: str = None


def initial_weights(model, args):
    """Load what the flags name into `model`: a checkpoint to evaluate (--test_only), to resume or to refine, the
    FP32 source model, or ImageNet weights for an FP32 ResNet-50; each checked against what this run builds."""
    name, fp32, s = model_name(args), is_fp32(args), Start()
    if args.test_only:
        job = os.path.join(runs.runs_root(), PAPER, args.name) if args.name else args.job_dir
        s.path = args.resume or args.refine or os.path.join(job, "checkpoint", "model_best.pt")
        ck = load_weights(model, s.path, "checkpoint to evaluate", name)
        ident, s.note = check_checkpoint(ck, s.path, wanted(args), flag="--test_only checkpoint",
                                         suggest=lambda i: f"the flags it was trained with ({describe(i)})")
        s.source_recipe = (ident or {}).get("recipe")
    elif args.resume:
        s.resume_ckpt = ck = load_weights(model, args.resume, "--resume checkpoint", name)
        check_checkpoint(ck, args.resume, wanted(args), flag="--resume")
        check_resume_flags(ck, args, args.resume, flags=RESUME_FLAGS, restart="--refine")
        s.epoch, s.best = int(ck.get("epoch", 0)), float(ck.get("best_prec1", 0.0))
        s.source_recipe = ((ck.get("quantlab") or {}).get("recipe") or {}).get("stages", [None])[0]
    elif args.refine:
        ck = load_weights(model, args.refine, "--refine checkpoint", name)
        ident, s.note = check_checkpoint(ck, args.refine, wanted(args), flag="--refine", fields=("paper", "model"))
        s.source_recipe = (ident or {}).get("recipe")
    elif args.pretrained and not fp32:
        cands = source_candidates(args)
        path = next((c for c in cands if os.path.isfile(c)), None)
        if path is None:
            raise UserError(f"FP32 source model not found: looked for {' and '.join(cands)}; {pretrain_hint(args)}")
        ck = load_weights(model, path, "FP32 source model", name)
        check_fp32_source(ck, path)
        ident, s.note = check_checkpoint(ck, path, wanted(args), flag="--source_file", fields=("paper", "model"))
        s.source_recipe = (ident or {}).get("recipe")
        print(f"=> loaded the FP32 source model {path}")
    elif args.pretrained and fp32 and name.startswith("resnet50"):
        load_imagenet(model, imagenet_weights(args))
    return s


def pretrain_target(args, run_dir):
    """Where an FP32 training run saves its best model for the quantized runs (--source_dir/--source_file); an
    existing file there is replaced only when an earlier run of this --job_dir wrote it. None for other runs."""
    if not is_fp32(args) or args.test_only:
        return None
    target = source_candidates(args)[0]
    check_writable_file(target, "--source_dir/--source_file")
    if os.path.exists(target):
        ck = load_checkpoint(target, what="existing FP32 model")
        if not same_job(ck, args, run_dir):
            raise UserError(f"the FP32 model {target} already exists (written by another run); remove "
                            f"it or pass another --source_dir/--source_file")
    return target


# ------------------------------------------------------------------------------------------------ run layout


def safe_reset(job_dir):
    """--reset: remove job_dir only if it is a run directory this project wrote (config.txt or checkpoint/);
    never through a link (a link made by plan_run points at a run under runs/alignq/, which stays)."""
    if os.path.islink(job_dir):
        return
    d = os.path.realpath(job_dir)
    cwd = os.path.realpath(os.getcwd())
    if not os.path.exists(d):
        return
    if d in ("/", os.path.realpath(os.path.expanduser("~"))) or cwd == d or cwd.startswith(d + os.sep):
        raise UserError(f"--reset refuses to remove {job_dir}: it is /, your home or contains the working directory")
    if not os.path.isdir(d) or not any(os.path.exists(os.path.join(d, m)) for m in ("config.txt", "checkpoint")):
        raise UserError(f"--reset refuses to remove {job_dir}: it does not look like an AlignQ run directory "
                        f"(no config.txt or checkpoint/)")
    shutil.rmtree(d)



def is_real_dir(path):
    return os.path.isdir(path) and not os.path.islink(path)


def holds_old_run(job_dir):
    """A real --job_dir (not the link plan_run makes) holding a run: one written before runs/alignq/."""
    return is_real_dir(job_dir) and (runs.holds_run(job_dir) or any(
        os.path.exists(os.path.join(job_dir, m)) for m in ("config.txt", "checkpoint")))


def resume_run_dir(path):
    """The run directory of a --resume checkpoint, through links: the folder holding its checkpoint/ when that
    is a run (manifest.json or config.txt) and writable; None for a loose file."""
    d = os.path.dirname(os.path.realpath(path))
    if os.path.basename(d) != "checkpoint":
        return None
    d = os.path.dirname(d)
    if any(os.path.exists(os.path.join(d, m)) for m in ("manifest.json", "config.txt")) and os.access(d, os.W_OK):
        return d
    return None


def job_name(args):
    """The run's name stem: the basename of --job_dir (experiment/ours/resnet/t_8bit_pre32bit -> t_8bit_pre32bit)."""
    base = os.path.basename(os.path.normpath(args.job_dir))
    return base if base not in ("", ".", "..", os.sep) else args.experiment


def plan_run(args):
    """(run directory, old --job_dir for --reset to remove or None), decided and checked before any work.

    A new run writes runs/alignq/<job_dir basename>-<time>/ (or runs/alignq/<--name>/) and --job_dir becomes a
    link to it; a --resume checkpoint inside a run directory continues there. A real --job_dir holding a run of
    an older version keeps the old rules: continue it with --resume, or remove it with --reset."""
    job = args.job_dir
    check_writable_dir(job, "--job_dir")
    if args.name is not None and (not args.name or os.sep in args.name or args.name in (".", "..")):
        raise UserError(f"--name {args.name!r} must be a plain directory name (it goes under runs/alignq/)")
    cont = resume_run_dir(args.resume) if args.resume else None
    old = holds_old_run(job) and cont != os.path.realpath(job)
    if old and not args.reset:
        last = os.path.join(job, "checkpoint", "model_last.pt")
        raise UserError(f"{job} already holds a run written before runs/alignq/; continue it with --resume {last}, "
                        f"remove it with --reset, or pass another --job_dir")
    if is_real_dir(job) and not holds_old_run(job) and os.listdir(job):
        raise UserError(f"--job_dir {job} is a directory of other files, not an AlignQ run (it becomes a link to the "
                        f"run under runs/alignq/); pass another --job_dir")
    if cont is not None:
        check_writable_dir(cont, "--resume")
        return cont, (job if old else None)
    if args.name:
        d = os.path.join(runs.runs_root(), PAPER, args.name)
        if runs.holds_run(d) or os.path.exists(os.path.join(d, "checkpoint")):
            raise UserError(f"{d} already holds a run; continue it with --resume "
                            f"{os.path.join(d, 'checkpoint', 'model_last.pt')}, or pass another --name")
    d = runs.plan_run_dir(PAPER, (job_name(args),), name=args.name or None, flag="--job_dir")
    return os.path.realpath(d), (job if old else None)


def link_job_dir(job_dir, run_dir, say):
    """--job_dir (the README's output path) -> the run directory, as a relative link made when the run starts,
    so that --resume <job_dir>/checkpoint/model_last.pt and --test_only find this run. An old real --job_dir
    that this run continues is left as it is."""
    if os.path.realpath(job_dir) == run_dir:
        return
    if is_real_dir(job_dir) and not os.listdir(job_dir):
        os.rmdir(job_dir)
    runs.link_latest(run_dir, job_dir, say=say)


def same_job(ck, args, run_dir):
    """An existing FP32 source model written by this --job_dir (a run of the same documented path, this run
    or an older one) or by this run directory; such a file may be replaced by the new best model."""
    job = str(ck.get("job_dir", "")) if isinstance(ck, dict) else ""
    rd = str(ck.get("run_dir", "")) if isinstance(ck, dict) else ""
    return bool(job) and (os.path.abspath(job) == os.path.abspath(args.job_dir)
                          or os.path.realpath(job) == os.path.realpath(args.job_dir)) \
        or bool(rd) and os.path.realpath(rd) == run_dir


# ------------------------------------------------------------------------------------------------ what a checkpoint is


def scheme_name(args):
    if is_fp32(args):
        return "fp32"
    if args.method != "ours":
        return args.method
    return "alignq+admm" if use_admm(args) else "alignq"


def bits_of(args):
    return args.bitW if args.bitW == args.abitW else f"W{args.bitW}A{args.abitW}"


def wanted(args):
    return expect(PAPER, model_name(args), bits=bits_of(args), scheme=scheme_name(args))


# The flags that shape the optimisation and its schedule: a resumed run restores its optimizer and epoch, so
# another value would be silently ignored (or mix two schedules); --resume refuses a change. --num_epochs may
# change: the lr milestones are epochs, so a longer run continues the same schedule (a run extended).
RESUME_FLAGS = {"lr": "--lr", "momentum": "--momentum",
                "weight_decay": "--weight_decay", "train_batch_size": "--train_batch_size",
                "lr_decay_steps": "--lr_decay_steps", "lr_gamma": "--lr_gamma"}


def state_of(model, args, epoch, best, optimizer, recipe, finished=False):
    """The original's checkpoint keys (state_dict_t, optimizer_t, epoch, best_prec1) plus what it is."""
    ident = identity(PAPER, model_name(args), bits=bits_of(args), scheme=scheme_name(args),
                     stage="pretrain" if is_fp32(args) else "train", recipe=recipe, experiment=args.experiment,
                     finished=finished)
    return {"quantlab": ident, "state_dict_t": model.state_dict(), "epoch": int(epoch), "best_prec1": float(best),
            "optimizer_t": optimizer.state_dict() if optimizer is not None else None, "rng": get_rng_state(),
            "flags": {k: getattr(args, k) for k in RESUME_FLAGS}}


def restore(resume_ckpt, optimizer, args, start_epoch, best, log):
    """Continue a --resume checkpoint: the optimizer state, the RNG (as its epoch began, so that an interrupted
    epoch draws the same order again) and the line saying where; returns the interrupted epoch's state
    (`mid_epoch`: its batches done are skipped) or None."""
    if optimizer is not None and resume_ckpt.get("optimizer_t"):
        optimizer.load_state_dict(resume_ckpt["optimizer_t"])
    if "rng" in resume_ckpt:
        set_rng_state(resume_ckpt["rng"])
    mid = None
    at = epoch_label(start_epoch, args.num_epochs) if start_epoch < args.num_epochs else "the end"
    if resume_ckpt.get("mid_epoch"):
        mid = resume_ckpt["mid_epoch"]
        at += f" after batch {mid['batch']}"
    log.info(f"=> resumed {args.resume} at {at} (best {best:.3f})")
    if not mid and "job_dir" not in resume_ckpt and start_epoch < args.num_epochs:
        log.info(f"=> {args.resume} was saved by an interrupt before checkpoints held the batch position: "
                 f"{epoch_label(start_epoch, args.num_epochs)} restarts from its first batch")
    return mid


def resume_epoch(resume, sums, history):
    """Restore an interrupted epoch's partial sums and loss history; the number of batches already done."""
    if not resume:
        return 0
    sums.total = resume["sums_total"].to(sums.total.device)
    sums.last = resume["sums_last"].to(sums.last.device)
    history.extend(resume["history"].unbind(0))
    return int(resume["batch"])


def skipped(i, skip, resume):
    """True for a batch an interrupted epoch already did: drawn from the loader (the sampler's order, the
    transforms' and workers' draws stay those of the uninterrupted run) but not computed. After the last such
    batch the RNG becomes the one saved right after it, so what the model draws (dropout) continues as well."""
    if i > skip:
        return False
    if i == skip:
        set_rng_state(resume["rng_batch"])
    return True


def epoch_state(sums, history, done):
    """What a resumed epoch needs besides weights and optimizer: batches done, partial sums, loss history and the
    RNG right after the last batch done (`rng` in the checkpoint is the RNG as the epoch began)."""
    return {"batch": int(done), "sums_total": sums.total.detach().cpu().clone(),
            "sums_last": sums.last.detach().cpu().clone(),
            "history": torch.stack(history).detach().cpu() if history else torch.zeros(0),
            "rng_batch": get_rng_state()}
