"""What an FDDA checkpoint is (common.identity), and the one-line checks when one is loaded.

Every file main_cosine_CBNS.py writes (model.pth, generator.pth, checkpoint.pth) carries
ckpt["quantlab"] = fdda_identity(...): paper, script, network, weight bits, scheme ("uniform": every layer at
qw/qa; "F8L8"), stage ("train", "generator"), the run's recipe, qa, the teacher, how far the run got and the
sha256 of the BNS centers it was trained with.
"""
from common.errors import UserError
from common.runlog import epoch_label
from common.identity import IDENTITY_KEY, check_checkpoint, describe, expect, identity
from fdda.options import setting_name


def scheme_of(f8l8):
    return "F8L8" if f8l8 else "uniform"


def fdda_identity(model_name, opt, f8l8, recipe, teacher, stage, epoch, finished=None, **extra):
    done = epoch >= opt.nEpochs if finished is None else finished
    script = "fdda/main_cosine_CBNS_8F8L.py" if f8l8 else "fdda/main_cosine_CBNS.py"
    return identity("fdda", model_name, bits=opt.qw, scheme=scheme_of(f8l8), stage=stage, recipe=recipe,
                    script=script, qa=opt.qa, setting=setting_name(opt.qw, opt.qa, f8l8), teacher=teacher,
                    epoch=int(epoch), epochs=opt.nEpochs, finished=bool(done), **extra)


def legacy_identity(ckpt):
    """model.pth files that stored model_name/qw/qa/f8l8 at the top level only."""
    if isinstance(ckpt, dict) and ckpt.get("paper") == "fdda" and IDENTITY_KEY not in ckpt:
        return {"paper": "fdda", "model": ckpt.get("model_name"), "bits": ckpt.get("qw"), "qa": ckpt.get("qa"),
                "scheme": scheme_of(ckpt.get("f8l8")), "recipe": ckpt.get("recipe")}
    return None


def check_student(ckpt, path, model_name, qw, qa, f8l8, flag="--model_path", script="test.py"):
    """Stop with one line naming both when the checkpoint is not a `model_name` W{qw}A{qa} (F8L8) student.
    Returns (identity or None, note for the record)."""
    legacy = legacy_identity(ckpt)
    if legacy is not None:
        ckpt = dict(ckpt, **{IDENTITY_KEY: legacy})
    other = "test_8F8L.py" if not f8l8 else "test.py"

    def suggest(ident):
        if ident.get("scheme") not in ("uniform", "F8L8"):
            return "a quantized FDDA student (model.pth of main_cosine_CBNS.py)"
        s = other if ident.get("scheme") != scheme_of(f8l8) else script
        return f"{s} --model_name {ident.get('model')} --qw {ident.get('bits')} --qa {ident.get('qa', ident.get('bits'))}"
    ident, note = check_checkpoint(ckpt, path, expect("fdda", model_name, bits=qw, scheme=scheme_of(f8l8)),
                                   flag=flag, suggest=suggest)
    if ident is not None and ident.get("qa") is not None and ident["qa"] != qa:
        have = setting_name(ident.get("bits"), ident["qa"], ident.get("scheme") == "F8L8")
        raise UserError(f"{flag} {path} is {describe(ident)} {have} but the flags ask for "
                        f"{setting_name(qw, qa, f8l8)} (qa differs); pass {suggest(ident)} or the right checkpoint")
    return ident, note


def checkpoint_recipe(ident):
    """The recipe of a checkpoint; one of an unfinished run is a shortened recipe (never a reproduction)."""
    recipe = (ident or {}).get("recipe")
    if recipe is None or (ident or {}).get("finished", True):
        return recipe
    done, total = ident.get("epoch"), ident.get("epochs")      # done: epochs finished (1-based count)
    after = epoch_label(done - 1, total) if isinstance(done, int) and done >= 1 else f"{done} of {total} epochs"
    return dict(recipe, full=False, summary=f"{recipe.get('summary')}; unfinished run (checkpoint after {after})")
