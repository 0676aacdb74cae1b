"""Checkpoints of the stages (tensors and primitives only: load with weights_only=True): saving and loading the
full-precision and the quantized models, their identity (stage, flags, the input they started from), the resume
files of a killed or stopped stage, and where a run puts its stage outputs."""
import os

from alq.binarynet import average_bitwidth, make_binary_layers, split_parameters
from alq.options import model_post_path, stage_flags
from common import runs
from common.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from common.errors import UserError
from common.identity import IDENTITY_KEY, sha256_file


# ---------------------------------------------------------------------------------------------------
# Checkpoints: tensors and primitives only (load with weights_only=True)


def resume_path(path):
    root, ext = os.path.splitext(path)
    return root + ".resume" + (ext or ".pth")


def save_model_ori(file_name, net, optimizer, **extra):
    state = {"net_state_dict": net.state_dict(), "optimizer_state_dict": optimizer.state_dict()}
    state.update(extra)
    save_checkpoint(state, file_name)


def save_model(file_name, net, optimizer_w, optimizer_b, parameters_w_bin, stage, **extra):
    state = {"net_state_dict": net.state_dict(),
             "optimizer_w_state_dict": optimizer_w.state_dict(),
             "optimizer_b_state_dict": optimizer_b.state_dict(),
             "parameters_w_bin": {p.name: p.state_dict() for p in parameters_w_bin},
             "stage": stage, "avg_bit": average_bitwidth(parameters_w_bin)}
    state.update(extra)
    if isinstance(state.get(IDENTITY_KEY), dict):
        state[IDENTITY_KEY] = dict(state[IDENTITY_KEY], bits=round(state["avg_bit"], 4),
                                   finished=bool(extra.get("finished", False)))
    save_checkpoint(state, file_name)


def load_net_state(net, ckpt, path, flag):
    if not isinstance(ckpt, dict) or "net_state_dict" not in ckpt:
        raise UserError(f"{path} has no 'net_state_dict'; it is not a checkpoint of this script ({flag})")
    load_model_state(net, ckpt["net_state_dict"], strict=True, what=f"checkpoint {path}")


def load_quantized(path, net, legacy_sign_flip=True, what="quantized model", flag="--model"):
    """Rebuild (ckpt, parameters_w, parameters_b, parameters_w_bin) from a file written by save_model."""
    ckpt = load_checkpoint(path, what=what, flag=flag)
    load_net_state(net, ckpt, path, flag)
    names_w, params_w, params_b = split_parameters(net)
    stored = ckpt.get("parameters_w_bin")
    if not isinstance(stored, dict) or sorted(stored) != sorted(names_w):
        raise UserError(f"{path} holds no multi-bit layers for this network (expected {', '.join(names_w)}); "
                        f"pass the file written by --ALQ with {flag}")
    structure = [stored[n]["structure"] for n in names_w]
    subc = [int(stored[n]["num_subchannel"]) for n in names_w]
    max_bit = [int(stored[n]["max_bit"]) for n in names_w]
    params_bin = make_binary_layers(names_w, params_w, structure, subc, max_bit, init=False,
                                    legacy_sign_flip=legacy_sign_flip)
    for n, pb in zip(names_w, params_bin):
        try:
            pb.load_state_dict(stored[n])
        except (KeyError, ValueError) as e:
            raise UserError(f"{path}: multi-bit layer {n} does not match the network ({e})") from None
    return ckpt, params_w, params_b, params_bin


def load_optimizers(ckpt, optimizer_w, optimizer_b, path):
    try:
        optimizer_w.load_state_dict(ckpt["optimizer_w_state_dict"])
        optimizer_b.load_state_dict(ckpt["optimizer_b_state_dict"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: optimizer state does not match this network ({e})") from None


def mark_finished(path):
    """Tag a stage's output as complete, so that --resume skips the stage."""
    ck = load_checkpoint(path)
    ck["finished"] = True
    if isinstance(ck.get(IDENTITY_KEY), dict):
        ck[IDENTITY_KEY]["finished"] = True
    save_checkpoint(ck, path)


def is_finished(path):
    if not os.path.exists(path):
        return False
    try:
        return bool(load_checkpoint(path).get("finished", False))
    except UserError:
        return False


# ---------------------------------------------------------------------------------------------------
# Identity: a stage output or resume file is only reused under the same flags and inputs


def check_stage_flags(ck, args, stage, path, log=None):
    """Stop with one line when `path` (a stage output or resume file) was made with other shaping flags."""
    ident = ck.get(IDENTITY_KEY) if isinstance(ck, dict) else None
    stored = ident.get("flags") if isinstance(ident, dict) else None
    if not isinstance(stored, dict):
        if log is not None:
            log.info(f"note: {path} records no flags (written by an older version); its {stage} flags are not checked")
        return
    now = stage_flags(args, stage)
    diff = [k for k in now if k in stored and stored[k] != now[k]]
    if diff:
        was = ", ".join(f"--{k} {_show(stored[k])}" for k in diff)
        asked = ", ".join(f"--{k} {_show(now[k])}" for k in diff)
        raise UserError(f"{path} ({stage}) was made with {was}, but this command asks for {asked}; --resume "
                        f"never reuses it under other flags: pass --overwrite to redo the stage, or another --log_dir")


def _show(v):
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def identity_of(path):
    """The identity stored in a checkpoint file (None for files written before identities)."""
    ck = load_checkpoint(path)
    ident = ck.get(IDENTITY_KEY) if isinstance(ck, dict) else None
    return ident if isinstance(ident, dict) else None


def check_stage_input(ck, key, input_path, flag, what):
    """A stage's resume file / output remembers the sha256 of the input it started from: refuse a changed one."""
    want = ck.get(key) if isinstance(ck, dict) else None
    if not want or not os.path.exists(input_path):
        return
    have = sha256_file(input_path)
    if have != want:
        raise UserError(f"{what} was built from {flag} with sha256 {want[:12]}, but {input_path} now has sha256 "
                        f"{have[:12]} (it was re-created since); rerun that stage without --resume (with "
                        f"--overwrite) or restore the original {flag}")


def check_resume_world(ck, dist, path):
    """A stage stopped inside an epoch continues under the same number of processes (each process's RNG states
    and its share of the batch are in the file)."""
    was = int(ck.get("world", 1) or 1)
    if int(ck.get("batch", 0) or 0) > 0 and was != dist.world:
        raise UserError(f"{path} stopped inside an epoch of a run with {was} process(es), this one has {dist.world}; "
                        f"resume it with {'python' if was == 1 else f'torchrun --nproc_per_node={was}'} and the same "
                        f"flags, or rerun the stage with --overwrite")


def _at_batch(ck):
    return f" batch {int(ck['batch'])}" if int(ck.get("batch", 0) or 0) > 0 else ""


# ---------------------------------------------------------------------------------------------------
# Where a run puts its stage outputs, and which is the final quantized model


def _final_model(args, ran):
    post = model_post_path(args)
    if "POSTTRAIN" in ran:
        return post
    if "ALQ" in ran:
        return args.model
    cands = [p for p in (post, args.model) if os.path.exists(p)]
    if not cands:
        raise UserError(f"no quantized model to export: neither {post} nor {args.model} exists; run --ALQ first")
    return max(cands, key=os.path.getmtime)


def place_outputs(args, run_dir):
    """Stage outputs at the documented default paths (./lenet5_model_ori.pth ...) are written into the run
    directory instead, and the documented path becomes a link to the finished file, so a new run never
    replaces another's model and `--ALQ` / `--POSTTRAIN` / `--export` run alone still read the latest one.
    Explicit paths are used as given. With --resume a stage finished in an earlier run (its documented link)
    is kept as is. Returns {stage: documented path to link}."""
    doc = getattr(args, "documented_paths", None) or {}
    default_model = args.model == doc.get("model")
    post_doc = model_post_path(args) if args.model_post is None and default_model else None
    links = {}
    for stage, attr, on, documented in (("PRETRAIN", "model_ori", args.PRETRAIN,
                                         doc.get("model_ori") if args.model_ori == doc.get("model_ori") else None),
                                        ("ALQ", "model", args.ALQ, doc.get("model") if default_model else None),
                                        ("POSTTRAIN", "model_post", args.POSTTRAIN, post_doc)):
        if not on or documented is None:
            continue
        mine = os.path.join(run_dir, os.path.basename(documented))
        if args.resume and not os.path.exists(mine) and not os.path.exists(resume_path(mine)) \
                and is_finished(documented):
            setattr(args, attr, documented)       # finished in an earlier run: skipped below
            continue
        setattr(args, attr, mine)
        links[stage] = documented
    return links


def alq_run_dir(arch, resume):
    """runs/alq/<arch>-<time>/ for a new run; with --resume the newest runs/alq/<arch>-*/ (the killed run's)."""
    root = os.path.join(runs.runs_root(), "alq")
    if resume and os.path.isdir(root):
        mine = sorted(d for d in os.listdir(root) if d.startswith(arch + "-") and os.path.isdir(os.path.join(root, d)))
        if mine:
            return os.path.join(root, mine[-1])
    return runs.plan_run_dir("alq", (arch,))
