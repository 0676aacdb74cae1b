"""FDDA step 2: train the generator (BNS + DBNS/CBNS) and the quantized student (KD), evaluate on ImageNet val.

    cd fdda && python main_cosine_CBNS.py --model_name resnet18 --conf_path imagenet_config.hocon --id=0
    python main_cosine_CBNS_8F8L.py ...                     # F8L8: 8-bit first layer, last activation, Linear
    torchrun --nproc_per_node=N main_cosine_CBNS.py ...     # DDP (batchSize per process; gloo on CPU)

Any hocon key can be overridden (`--qw 5 --qa 5 --dataPath DIR --nEpochs 2`); FDDA_DATA sets dataPath.
The run writes save_path/log_<...>_<experimentID><id>_repeat[_N]/ (a new _N suffix when it exists; --resume
continues the unsuffixed one): log.txt (the original's train_test.log), tensorboard events (tb/), manifest.json,
checkpoint.pth (every epoch), model.pth + generator.pth (best top-1). The best top-1 is appended to results/fdda.jsonl.
"""
import os
import shutil
import sys
import time

import torch

if __package__ in (None, ""):                        # run as `python main_cosine_CBNS.py` from fdda/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.checkpoint import load_checkpoint, load_model_state, save_checkpoint  # noqa: E402
from common.device import get_rng_state, seed_everything, set_rng_state  # noqa: E402
from common.errors import UserError, cli  # noqa: E402
from common.identity import IDENTITY_KEY, identity  # noqa: E402
from common.results import record  # noqa: E402
from common.runlog import RunLog  # noqa: E402
from fdda import distributed, models  # noqa: E402
from fdda.bns import LIST_FILE, correct_set, load_bns_centers  # noqa: E402
from fdda.conditional_batchnorm import Generator_imagenet  # noqa: E402
from fdda.dataloader import CalibrationSet, imagenet_split, loader, test_transform  # noqa: E402
from fdda.options import Option, add_override_flags, overrides_from, require, script_parser, setting_name  # noqa: E402
from fdda.quantization_utils import freeze_model, unfreeze_model  # noqa: E402
from fdda.trainer_DBNS_CBNS import Trainer  # noqa: E402


def make_parser(f8l8):
    p = script_parser("FDDA training" + (" (F8L8)" if f8l8 else ""), models.MODELS)
    p.add_argument("--id", type=int, default=0, help="experiment id: seed = id + 3, run dir tag (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in the existing run directory")
    p.add_argument("--teacher_path", default=None,
                   help="pretrained weights file (default: the original's file in its store); 'random' = random "
                        "initialisation (smoke runs: recorded as dataset 'synthetic', never as a reproduction)")
    return add_override_flags(p)


class Quiet:
    def info(self, msg):
        pass

    def scalar(self, *a):
        pass

    def close(self):
        pass


def run_directory(opt, resume):
    """save_path/<original name>: a fresh run takes the first free _N suffix, --resume the unsuffixed one."""
    base = os.path.join(opt.save_path, opt.run_dir_name())
    if resume:
        ckpt = os.path.join(base, "checkpoint.pth")
        if not os.path.isfile(ckpt):
            raise UserError(f"--resume: no {ckpt} to continue (start without --resume)")
        return base
    d, n = base, 1
    while os.path.exists(d):
        d, n = f"{base}_{n}", n + 1
    return d


def main(f8l8=False):
    args = make_parser(f8l8).parse_args()
    require(args, models.MODELS)
    opt = Option.from_args(args.conf_path, overrides_from(args))
    if args.manualSeed is None:
        opt.manualSeed = args.id + 3                                  # the original's seed
    opt.experimentID = opt.experimentID + "{:0>2d}_repeat".format(args.id)
    spec = models.check_model_name(args.model_name)
    L = spec.bn_layers
    start_layer = models.dbns_start_layer(L)
    setting = setting_name(opt.qw, opt.qa, f8l8)

    # ---- every check that can fail on user input, before any work
    val_set = imagenet_split(opt.dataPath, "val", test_transform(opt.img_size))
    true_mean, true_var, path_label, teacher_output = load_bns_centers(opt.save_path, args.model_name, L)
    n_classes = len(true_mean)
    if n_classes > opt.nClasses or teacher_output.shape[1] != opt.nClasses:
        raise UserError(f"the BNS centers in {opt.save_path} cover {n_classes} classes with a "
                        f"{teacher_output.shape[1]}-way teacher, but nClasses = {opt.nClasses}; set nClasses to "
                        f"{teacher_output.shape[1]} or re-create the centers")
    if len(val_set.classes) != n_classes:
        raise UserError(f"{opt.dataPath} has {len(val_set.classes)} classes but the BNS centers in {opt.save_path} "
                        f"were made on {n_classes}: re-run BNScenters.py on this dataset")
    teacher, source = models.build_teacher(args.model_name, args.teacher_path, opt.nClasses, opt.manualSeed)
    run_dir = run_directory(opt, args.resume)
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pth"), what="resume checkpoint") if args.resume \
        else None
    if ckpt is not None:
        for key, want in (("model_name", args.model_name), ("qw", opt.qw), ("qa", opt.qa), ("f8l8", f8l8)):
            if ckpt.get(key) != want:
                raise UserError(f"--resume: {run_dir} is a run with {key} = {ckpt.get(key)!r}, not {want!r}; "
                                f"resume with the same flags and script")

    dist = distributed.setup(opt.GPU)
    device = dist.device
    seed_everything(opt.manualSeed)
    generator = Generator_imagenet(n_classes, opt.latent_dim, opt.img_size, opt.channels, opt.ccbn_eps)
    student = models.build_student(teacher, args.model_name, opt.qw, opt.qa, f8l8, opt.clip_ste)
    teacher.to(device)
    student.to(device)
    generator.to(device)
    dist.broadcast_module(student)
    dist.broadcast_module(generator)
    seed_everything(opt.manualSeed + 1000 * dist.rank)               # each rank draws its own batches
    calib = CalibrationSet(path_label, opt.img_size)
    calib_loader = loader(calib, min(opt.batchSize, len(calib)), shuffle=True, drop_last=True)
    if dist.enabled:
        val_set = torch.utils.data.Subset(val_set, range(dist.rank, len(val_set), dist.world))
    val_loader = loader(val_set, opt.test_batchSize, shuffle=False, workers=opt.nThreads)

    log = RunLog(run_dir, dict(opt.as_dict(), model_name=args.model_name, f8l8=f8l8, teacher=source,
                               world_size=dist.world), seed=opt.manualSeed, device=device) if dist.main else Quiet()
    if dist.main and not args.resume:        # the config and the calibration set this run used, for replay
        for src in (args.conf_path, os.path.join(opt.save_path, LIST_FILE.format(m=args.model_name)),
                    os.path.join(opt.save_path, f"{args.model_name}_BNScenters.json")):
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(run_dir, os.path.basename(src)))
    log.info(f"FDDA {args.model_name} {setting} (teacher: {source}), {n_classes} classes, L = {L} BN layers, "
             f"DBNS/CBNS from layer {start_layer}; correct set {len(correct_set(teacher_output))}/{n_classes}; "
             f"{dist.world} process(es) on {device}; run dir {run_dir}")
    short = opt.shortened()
    recipe = opt.recipe(source)
    if short:
        log.info(f"shortened recipe (not a reproduction): {short}")
    trainer = Trainer(student, teacher, generator, opt, true_mean, true_var, correct_set(teacher_output), n_classes,
                      L, start_layer, device, dist, calib_loader, val_loader, log)

    start_epoch, best_top1, best_top5, best_epoch = 0, 0.0, 0.0, -1
    if ckpt is not None:
        load_model_state(student, ckpt["student"], what="resume checkpoint (student)")
        load_model_state(generator, ckpt["generator"], what="resume checkpoint (generator)")
        trainer.load_state_dict(ckpt["trainer"])
        start_epoch, best_top1, best_top5, best_epoch = ckpt["epoch"], ckpt["best_top1"], ckpt["best_top5"], \
            ckpt["best_epoch"]
        if dist.enabled:             # rank 0's RNG state must not be shared: a fresh stream per rank and epoch
            seed_everything(opt.manualSeed + 1000 * dist.rank + 7919 * start_epoch)
        else:
            set_rng_state(ckpt["rng"][0])
        log.info(f"resumed from {run_dir}/checkpoint.pth at epoch {start_epoch + 1}")
    elif opt.test_teacher:
        t1, t5, n = trainer.test_teacher()
        log.info(f"Teacher network: [acc: {t1:.4f}%] top5 {t5:.4f}% on {n} val images")

    t_start, n_val = time.time(), None
    for epoch in range(start_epoch, opt.nEpochs):
        freeze_model(student)
        if epoch < opt.unfreeze_epochs:
            unfreeze_model(student)                  # calibrate activation ranges (EMA) in the early epochs
        t0 = time.time()
        m = trainer.train(epoch)
        freeze_model(student)
        line = (f"[Epoch {epoch + 1}/{opt.nEpochs}] [acc: {m['fp_acc']:.4f}%] [G loss: {m['loss_G']:f}] "
                f"[One-hot loss: {m['one_hot']:f}] [BNS_loss:{m['BNS']:f}] [D_BNS_loss:{m['D_BNS']:f}] "
                f"[loss_one_hot_BNScenters:{m['one_hot_BNScenters']:f}] [C_BNS_loss:{m['C_BNS']:f}] "
                f"[S loss: {m['loss_S']:f}]")
        for k, v in m.items():
            log.scalar(f"train/{k}", v, epoch + 1)
        improved = False
        if epoch >= opt.test_start_epoch:
            top1, top5, n_val = trainer.test()
            line += f" [val top1: {top1:.4f}% top5: {top5:.4f}%]"
            log.scalar("val/top1", top1, epoch + 1)
            log.scalar("val/top5", top5, epoch + 1)
            if top1 >= best_top1 or best_epoch < 0:
                best_top1, best_top5, best_epoch, improved = top1, top5, epoch, True
        dt = time.time() - t0
        eta = (time.time() - t_start) / (epoch + 1 - start_epoch) * (opt.nEpochs - epoch - 1)
        log.info(f"{line} ({dt:.1f}s, ETA {eta / 60:.1f} min)")
        if best_epoch >= 0:
            log.info(f"#==>Best Result is: Top1 Accuracy: {best_top1:f}, Top5 Accuracy: {best_top5:f} "
                     f"(epoch {best_epoch + 1})")
        if dist.main:
            meta = {"paper": "fdda", "model_name": args.model_name, "qw": opt.qw, "qa": opt.qa, "f8l8": f8l8,
                    "nClasses": opt.nClasses, "teacher": source, "clip_ste": opt.clip_ste,
                    "shortened": bool(short), "recipe": recipe,
                    IDENTITY_KEY: identity("fdda", args.model_name, opt.qw, "F8L8" if f8l8 else "uniform",
                                           "train", recipe=recipe, qa=opt.qa)}
            if improved:
                save_checkpoint(dict(meta, state_dict=student.state_dict(), epoch=epoch + 1, top1=best_top1),
                                os.path.join(run_dir, "model.pth"))
                save_checkpoint(generator.state_dict(), os.path.join(run_dir, "generator.pth"))
            save_checkpoint(dict(meta, student=student.state_dict(), generator=generator.state_dict(),
                                 trainer=trainer.state_dict(), epoch=epoch + 1, best_top1=best_top1,
                                 best_top5=best_top5, best_epoch=best_epoch, world_size=dist.world,
                                 rng=[get_rng_state()]), os.path.join(run_dir, "checkpoint.pth"))
        dist.barrier()
    if dist.main and best_epoch >= 0 and n_val:
        record("fdda", model=args.model_name, dataset="imagenet" if source != "random" else "synthetic",
               split="val", setting=setting, metric="top1", value=best_top1, recipe=recipe, seed=opt.manualSeed,
               run_dir=run_dir,
               n_samples=n_val, extra={"top5": best_top5, "best_epoch": best_epoch + 1, "teacher": source,
                                       "selection": "best epoch on val (as the published numbers)",
                                       "world_size": dist.world})
    log.info(f"Running Time is: {time.time() - t_start:.1f}s; model: {os.path.join(run_dir, 'model.pth')}")
    log.close()
    dist.close()


if __name__ == "__main__":
    cli(main)()
