"""FDDA step 3: evaluate a quantized student on ImageNet val (the original's test.py; test_8F8L.py for F8L8).

    cd fdda && python test.py --conf_path imagenet_config.hocon --model_name resnet18 --model_path PathToModel

PathToModel is a model.pth (or checkpoint.pth) written by main_cosine_CBNS.py: it says what it is (network,
qw, qa, F8L8, recipe; common.identity) and evaluating it under other flags is one error line. The authors'
released state dicts (bare, keys of the quantized network) carry no bit-width, so set qw/qa as the release says;
a full-precision state dict is refused. qw/qa come from the hocon file or --qw/--qa. Activation ranges are
frozen; cur_x_* buffers are ignored, as in the original. The result is appended to results/fdda.jsonl with the
checkpoint's recipe (a checkpoint of an unfinished run is recorded as shortened).
"""
import os

import torch

from common.checkpoint import load_checkpoint, load_model_state
from common.checks import check_results_writable
from common.device import seed_everything
from common.errors import UserError, cli
from common.results import record
from fdda import distributed, models
from fdda.checkpoints import check_student, checkpoint_recipe
from fdda.dataloader import SkipUnreadable, imagenet_split, loader, test_transform
from fdda.options import Option, add_override_flags, overrides_from, require, script_parser, setting_name
from fdda.quantization_utils import freeze_model
from fdda.trainer_DBNS_CBNS import evaluate


def make_parser(f8l8):
    p = script_parser("FDDA evaluation" + (" (F8L8)" if f8l8 else ""), models.MODELS)
    p.add_argument("--model_path", type=str, default=None, help="quantized student state dict (model.pth)")
    return add_override_flags(p)


def student_state(ckpt, model_name, qw, qa, f8l8, path):
    """(state dict without cur_x_* buffers, metadata or {}, identity or None, note); a checkpoint of another
    network, bit-width or F8L8 setting, or a full-precision one, is one line naming both."""
    ident, note = check_student(ckpt, path, model_name, qw, qa, f8l8, script="test_8F8L.py" if f8l8 else "test.py")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        sd, meta = ckpt["state_dict"], ckpt                       # model.pth
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("student"), dict):
        sd, meta = ckpt["student"], ckpt                          # checkpoint.pth (the run's latest state)
    elif isinstance(ckpt, dict) and ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
        sd, meta = ckpt, {}                                       # the authors' released students
        if not any(k.endswith(".x_min") for k in sd):
            raise UserError(f"--model_path {path} is a full-precision {model_name} state dict (no activation-"
                            f"quantizer ranges) but {'test_8F8L.py' if f8l8 else 'test.py'} evaluates a quantized "
                            f"{setting_name(qw, qa, f8l8)} student; pass a model.pth written by main_cosine_CBNS.py "
                            f"or the authors' released student")
    else:
        raise UserError(f"--model_path {path} holds no student state dict (expected main_cosine_CBNS.py's model.pth "
                        f"or the authors' released model)")
    return {k: v for k, v in sd.items() if "cur_x" not in k}, meta, ident, note


def main(f8l8=False):
    args = make_parser(f8l8).parse_args()
    require(args, models.MODELS, model_path="PathToModel (a model.pth written by main_cosine_CBNS.py)")
    opt = Option.from_args(args.conf_path, overrides_from(args))
    models.check_model_name(args.model_name)
    check_results_writable()                                      # before anything is read
    models.check_input_size(args.model_name, opt.img_size, opt.nClasses)
    ckpt = load_checkpoint(args.model_path, what="student model", flag="--model_path")
    sd, meta, ident, note = student_state(ckpt, args.model_name, opt.qw, opt.qa, f8l8, args.model_path)
    val_set = SkipUnreadable(imagenet_split(opt.dataPath, "val", test_transform(opt.img_size)))
    n_out = meta.get("nClasses", opt.nClasses)
    student = models.build_student(models.build(args.model_name, n_out), args.model_name, opt.qw, opt.qa, f8l8,
                                   meta.get("clip_ste", opt.clip_ste))
    missing, _ = load_model_state(student, sd, strict=False, what=f"--model_path {args.model_path}")
    missing = [k for k in missing if "cur_x" not in k]
    if missing or len(sd) + sum("cur_x" in k for k in student.state_dict()) != len(student.state_dict()):
        raise UserError(f"--model_path {args.model_path} does not match a quantized {args.model_name}"
                        f"{' (F8L8)' if f8l8 else ''}: missing {', '.join(missing[:3]) or 'nothing'}, "
                        f"{len(sd)} tensors in the file; check --model_name")
    freeze_model(student)
    dist = distributed.setup(opt.GPU)
    seed = seed_everything(opt.manualSeed)                        # evaluation draws nothing; logged all the same
    student.to(dist.device)
    if dist.enabled:
        val_set = torch.utils.data.Subset(val_set, range(dist.rank, len(val_set), dist.world))
    if dist.main:
        print(f"=> device {dist.device}, seed {seed}, {dist.world} process(es); evaluating {args.model_path}"
              + (f" ({note})" if note else ""))
    top1, top5, n, skipped = evaluate(student, loader(val_set, opt.test_batchSize, False, opt.nThreads),
                                      dist.device, dist)
    if dist.main:
        print(f"#==>Best Result is: Top1 Error: {100 - top1:f}, Top5 Error: {100 - top5:f}")
        print(f"#==>Best Result is: Top1 Accuracy: {top1:f}, Top5 Accuracy: {top5:f} ({n} val images"
              + (f"; {skipped} unreadable, skipped)" if skipped else ")"))
        teacher = meta.get("teacher", "released model")
        extra = {"top5": top5, "model_path": os.path.abspath(args.model_path), "teacher": teacher,
                 "trained_epochs": meta.get("epoch"), "data": os.path.abspath(opt.dataPath),
                 "skipped_unreadable": skipped}
        if note:
            extra["checkpoint_note"] = note
        record("fdda", model=args.model_name, dataset="synthetic" if teacher == "random" else "imagenet",
               split="val", setting=setting_name(opt.qw, opt.qa, f8l8), metric="top1", value=top1, n_samples=n,
               recipe=checkpoint_recipe(ident), seed=seed, extra=extra)
    dist.close()


if __name__ == "__main__":
    cli(main)()
