"""FDDA step 2: train the generator (BNS + DBNS/CBNS) and the quantized student (KD), evaluate on ImageNet val.

    cd fdda && python main_cosine_CBNS.py --model_name resnet18 --conf_path imagenet_config.hocon --id=0
    python main_cosine_CBNS_8F8L.py ...                     # F8L8: 8-bit first layer, last activation, Linear
    torchrun --nproc_per_node=N main_cosine_CBNS.py ...     # DDP (batchSize per process; gloo on CPU)

Any hocon key can be overridden (`--qw 5 --qa 5 --dataPath DIR --nEpochs 2`); FDDA_DATA sets dataPath.
Each run writes its own directory runs/fdda/<model>-<setting>-id<id>-<time>/ (or --name): log.txt (the
original's train_test.log), tensorboard events (tb/), manifest.json, checkpoint.pth (every epoch, and at the
next iteration after SIGINT/SIGTERM), model.pth + generator.pth (best top-1), records.jsonl. When it finishes, the
original's save_path/log_<...>_<experimentID><id>_repeat links to it. --resume [PATH] continues a run exactly.
The best top-1 is appended to results/fdda.jsonl.
"""
import glob
import os
import random
import shutil
import time

import torch

from common import interrupt, runs
from common.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from common.checks import check_range, check_results_writable, check_writable_dir
from common.device import get_rng_state, seed_everything, set_rng_state
from common.errors import UserError, cli
from common.identity import IDENTITY_KEY, sha256_file
from common.results import record
from common.runlog import QuietLog, epoch_label
from fdda import distributed, models
from fdda.bns import LIST_FILE, RECORD_FILE, bns_paths, check_centers, correct_set, load_bns_centers
from fdda.checkpoints import check_student, fdda_identity
from fdda.conditional_batchnorm import Generator_imagenet
from fdda.dataloader import CalibrationSet, SkipUnreadable, imagenet_split, loader, test_transform
from fdda.options import DEFAULTS, Option, add_override_flags, overrides_from, require, script_parser, setting_name
from fdda.quantization_utils import freeze_model, unfreeze_model
from fdda.trainer_DBNS_CBNS import Trainer

CKPT = "checkpoint.pth"
# the original built its generator before seeding, from an unseeded RNG (a new per-process seed on current
# torch): here it is drawn from this fixed seed, so runs repeat; the draws after manualSeed are unchanged
TORCH_START_SEED = 67280421310721
# options a --resume must share with the run it continues (the rest: paths, workers, evaluation only)
# tensorboard metric of each per-epoch training term (the trainer keeps the original's names: the console line
# and resumable checkpoints use them); metric names of the scheme are lowercase (common/runlog.py)
TB_TRAIN = {"loss_G": "loss_g", "one_hot": "one_hot", "BNS": "bns", "D_BNS": "d_bns",
            "one_hot_BNScenters": "one_hot_bnscenters", "C_BNS": "c_bns", "loss_S": "loss_s", "fp_acc": "fp_acc",
            "lr_G": "lr_g", "lr_S": "lr_s"}
FREE_ON_RESUME = ("dataPath", "save_path", "nThreads", "GPU", "nGPU", "test_batchSize", "test_teacher",
                  "test_start_epoch")


def make_parser(f8l8):
    p = script_parser("FDDA training" + (" (F8L8)" if f8l8 else ""), models.MODELS)
    p.add_argument("--id", type=int, default=0, help="experiment id: seed = id + 3, run dir tag (default 0)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a killed run exactly from its checkpoint.pth (PATH: the file or its run "
                        "directory; default: the --name run, else the newest run of these flags)")
    p.add_argument("--name", default="", help="run directory runs/fdda/<name> (default: "
                                             "<model>-<setting>-id<id>-<time stamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in runs/fdda/<name>")
    p.add_argument("--teacher_path", default=None,
                   help="pretrained weights file (default: the original's file in its store); 'random' = random "
                        "initialisation (smoke runs: recorded as dataset 'synthetic', never as a reproduction)")
    return add_override_flags(p)


def run_name(args, setting):
    return f"{args.model_name}-{setting}-id{args.id}"


def resume_path(args, root, name, opt):
    """--resume [PATH]: the file, a run directory's checkpoint.pth, the --name run's, or the newest run of these
    flags (runs/fdda/<name>-*, or the original's save_path/log_... directory)."""
    if args.resume:
        return os.path.join(args.resume, CKPT) if os.path.isdir(args.resume) else args.resume
    if args.name:
        return os.path.join(root, args.name, CKPT)
    found = [p for p in glob.glob(os.path.join(glob.escape(root), glob.escape(name) + "-*", CKPT))
             + [os.path.join(opt.save_path, opt.run_dir_name(), CKPT)] if os.path.isfile(p)]
    if not found:
        raise UserError(f"--resume: no {CKPT} of a {name} run under {root} (start without --resume, or pass "
                        f"--resume PATH)")
    return max(found, key=os.path.getmtime)


def plan_run(args, opt, setting):
    """(run directory, --resume checkpoint or None), decided and checked before any data is read; a new run
    never reuses another's directory (common.runs)."""
    name = run_name(args, setting)
    if args.resume is not None:
        path = resume_path(args, os.path.join(runs.runs_root(), "fdda"), name, opt)
        if not os.path.isfile(path):
            raise UserError(f"--resume: {path} not found (start without --resume, or pass --resume PATH)")
        d = os.path.dirname(os.path.realpath(path))
        check_writable_dir(d, "--resume")
        return d, path
    return runs.plan_run_dir("fdda", (name,), name=args.name, overwrite=args.overwrite), None


def bns_sha256(save_path, model_name):
    """One sha256 over the four BNS-center files: a resumed run must use the centers it started with."""
    return sha256_of_text("".join(sha256_file(p) for p in bns_paths(save_path, model_name).values()))


def sha256_of_text(text):
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()


def check_resume(ckpt, path, args, opt, f8l8, bns):
    """The run a --resume continues must be this one: same network, bits, F8L8, recipe and BNS centers."""
    check_student(ckpt, path, args.model_name, opt.qw, opt.qa, f8l8, flag="--resume",
                  script="main_cosine_CBNS_8F8L.py" if f8l8 else "main_cosine_CBNS.py")
    if "student" not in ckpt:
        raise UserError(f"--resume {path} is not a run checkpoint (checkpoint.pth of main_cosine_CBNS.py)")
    saved = ckpt.get("options") or {}
    for k, v in opt.as_dict().items():
        if k in saved and k not in FREE_ON_RESUME and saved[k] != v:
            raise UserError(f"--resume {path} was written with {k} = {saved[k]!r} but this run has {k} = {v!r}; "
                            f"resume with the run's flags")
    was = ckpt.get(IDENTITY_KEY, {}).get("bns_sha256")
    if was and was != bns:
        raise UserError(f"--resume {path}: the BNS centers in {opt.save_path} changed since this run started "
                        f"(sha256 {was[:12]}..., now {bns[:12]}...; re-created by BNScenters.py?); start a new run")


def check_warmup(opt):
    """The student learns from epoch warmup_epochs on (0-based): warmup_epochs >= nEpochs would train only the
    generator and still write, evaluate and record an untrained student."""
    if opt.warmup_epochs >= opt.nEpochs:
        fit = opt.nEpochs * DEFAULTS["warmup_epochs"] // DEFAULTS["nEpochs"]
        raise UserError(f"warmup_epochs = {opt.warmup_epochs} >= nEpochs = {opt.nEpochs}: the student is trained "
                        f"from epoch warmup_epochs + 1 on, so this run would never train it; pass --warmup_epochs "
                        f"{fit} (the published 50 of 400 epochs, scaled) or a larger --nEpochs")


def main(f8l8=False):
    args = make_parser(f8l8).parse_args()
    require(args, models.MODELS)
    opt = Option.from_args(args.conf_path, overrides_from(args))      # every hocon value's range: one line
    check_range("--id", args.id, lo=0)
    check_warmup(opt)
    if args.overwrite and args.resume is not None:
        raise UserError("--overwrite replaces a run and --resume continues one: pass only one of them")
    if args.manualSeed is None:
        opt.manualSeed = args.id + 3                                  # the original's seed
    opt.experimentID = opt.experimentID + "{:0>2d}_repeat".format(args.id)
    spec = models.check_model_name(args.model_name)
    L = spec.bn_layers
    start_layer = models.dbns_start_layer(L)
    setting = setting_name(opt.qw, opt.qa, f8l8)

    # ---- every check that can fail on user input, before any work: outputs first, then inputs
    check_results_writable()
    run_dir, ckpt_path = plan_run(args, opt, setting)
    check_writable_dir(opt.save_path, "save_path")                   # its log_... link to the finished run
    channels = models.check_input_size(args.model_name, opt.img_size, opt.nClasses)
    val_set = SkipUnreadable(imagenet_split(opt.dataPath, "val", test_transform(opt.img_size)))
    true_mean, true_var, path_label, teacher_output = load_bns_centers(opt.save_path, args.model_name, L)
    centers_note = check_centers(opt.save_path, args.model_name, opt.img_size, channels, true_mean, true_var)
    n_classes = len(true_mean)
    if n_classes > opt.nClasses or teacher_output.shape[1] != opt.nClasses:
        raise UserError(f"the BNS centers in {opt.save_path} cover {n_classes} classes with a "
                        f"{teacher_output.shape[1]}-way teacher, but nClasses = {opt.nClasses}; set nClasses to "
                        f"{teacher_output.shape[1]} or re-create the centers")
    if len(val_set.classes) != n_classes:
        raise UserError(f"{opt.dataPath} has {len(val_set.classes)} classes but the BNS centers in {opt.save_path} "
                        f"were made on {n_classes}: re-run BNScenters.py on this dataset")
    bns = bns_sha256(opt.save_path, args.model_name)
    ckpt = None
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path, what="resume checkpoint", flag="--resume")
        check_resume(ckpt, ckpt_path, args, opt, f8l8, bns)
    # the original's order of random draws: the generator is built before manualSeed is set, then torch is seeded, then two networks are built (teacher and the student's float copy;
    # their random initialisations are drawn and overwritten by the pretrained weights), then one
    # random.randint(0, 0) (batch_index). Python's random and numpy are seeded too (the original never seeded
    # them: its class draws were not reproducible); that changes no torch draw.
    torch.manual_seed(TORCH_START_SEED)      # the original: unseeded here (see TORCH_START_SEED)
    generator = Generator_imagenet(n_classes, opt.latent_dim, opt.img_size, opt.channels, opt.ccbn_eps)
    dist = distributed.setup(opt.GPU)
    device = dist.device
    seed_everything(opt.manualSeed)
    teacher, source = models.build_teacher(args.model_name, args.teacher_path, opt.nClasses, opt.manualSeed)
    models.build(args.model_name, opt.nClasses)                      # the original's second network: its draws
    random.randint(0, 0)                                             # the original's batch_index draw
    student = models.build_student(teacher, args.model_name, opt.qw, opt.qa, f8l8, opt.clip_ste)
    teacher.to(device)
    student.to(device)
    generator.to(device)
    dist.broadcast_module(student)
    dist.broadcast_module(generator)
    if dist.enabled:                 # each rank draws its own batches (one process: the original's streams)
        seed_everything(opt.manualSeed + 1000 * dist.rank)
    calib = CalibrationSet(path_label, opt.img_size)
    calib_loader = loader(calib, min(opt.batchSize, len(calib)), shuffle=True, drop_last=True)
    if dist.enabled:
        val_set = torch.utils.data.Subset(val_set, range(dist.rank, len(val_set), dist.world))
    val_loader = loader(val_set, opt.test_batchSize, shuffle=False, workers=opt.nThreads)

    recipe = opt.recipe(source)
    if dist.main:
        log = runs.start_run("fdda", run_dir, dict(opt.as_dict(), model_name=args.model_name, f8l8=f8l8,
                                                   teacher=source, world_size=dist.world, resume=ckpt_path),
                             seed=opt.manualSeed, device=device, recipe=recipe, overwrite=args.overwrite).log
    else:
        log = QuietLog()
    try:
        train_run(args, opt, f8l8, setting, spec, start_layer, run_dir, ckpt, ckpt_path, bns, dist, device, log,
                  recipe, source, teacher, student, generator, true_mean, true_var, teacher_output, n_classes,
                  calib_loader, val_loader, centers_note)
    finally:
        runs.end_run()                   # text log and tensorboard closed, also on SIGINT/SIGTERM
        dist.close()


def train_run(args, opt, f8l8, setting, spec, start_layer, run_dir, ckpt, ckpt_path, bns, dist, device, log, recipe,
              source, teacher, student, generator, true_mean, true_var, teacher_output, n_classes, calib_loader,
              val_loader, centers_note=""):
    L = spec.bn_layers
    if dist.main and ckpt is None:       # the config and the calibration set this run used, for replay
        for src in (args.conf_path, os.path.join(opt.save_path, LIST_FILE.format(m=args.model_name)),
                    os.path.join(opt.save_path, RECORD_FILE.format(m=args.model_name))):
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(run_dir, os.path.basename(src)))
    log.info(f"FDDA {args.model_name} {setting} (teacher: {source}), {n_classes} classes, L = {L} BN layers, "
             f"DBNS/CBNS from layer {start_layer}; correct set {len(correct_set(teacher_output))}/{n_classes}; "
             f"{dist.world} process(es) on {device}; run dir {run_dir}")
    if centers_note:
        log.info(centers_note)
    short = opt.shortened()
    if short:
        log.info(f"shortened recipe (not a reproduction): {short}")
    trainer = Trainer(student, teacher, generator, opt, true_mean, true_var, correct_set(teacher_output), n_classes,
                      L, start_layer, device, dist, calib_loader, val_loader, log)

    start_epoch, skip, sums, best_top1, best_top5, best_epoch = 0, 0, None, 0.0, 0.0, -1
    if ckpt is not None:
        load_model_state(student, ckpt["student"], what="resume checkpoint (student)")
        load_model_state(generator, ckpt["generator"], what="resume checkpoint (generator)")
        trainer.load_state_dict(ckpt["trainer"])
        start_epoch, best_top1, best_top5, best_epoch = ckpt["epoch"], ckpt["best_top1"], ckpt["best_top5"], \
            ckpt["best_epoch"]
        skip = int(ckpt.get("batch", 0))         # a checkpoint inside epoch `start_epoch`, after `skip` iterations
        if dist.enabled:             # rank 0's RNG state must not be shared: a fresh stream per rank and epoch
            seed_everything(opt.manualSeed + 1000 * dist.rank + 7919 * start_epoch + 104729 * skip)
        else:
            set_rng_state(ckpt["rng"][0])
            if skip:                 # the calibration order of the interrupted epoch, where it was
                trainer.restore_iterator(ckpt["trainer"].get("iterator"))
        if skip:
            sums = ckpt["partial"]
        log.info(f"resumed from {ckpt_path} at {epoch_label(start_epoch, opt.nEpochs)}"
                 + (f" iteration {skip + 1}" if skip else ""))
    elif opt.test_teacher:
        t1, t5, n, gone = trainer.test_teacher()
        log.info(f"Teacher network: [acc: {t1:.4f}%] top5 {t5:.4f}% on {n} val images"
                 + (f" ({gone} unreadable, skipped)" if gone else ""))

    def meta(epoch, finished=None):
        return {"paper": "fdda", "model_name": args.model_name, "qw": opt.qw, "qa": opt.qa, "f8l8": f8l8,
                "nClasses": opt.nClasses, "teacher": source, "clip_ste": opt.clip_ste,
                "shortened": bool(short), "recipe": recipe, "options": opt.as_dict(),
                IDENTITY_KEY: fdda_identity(args.model_name, opt, f8l8, recipe, source, "train", epoch,
                                            finished=finished, bns_sha256=bns)}

    ckpt_file = os.path.join(run_dir, CKPT)

    def run_state(epoch, **extra):
        return dict(meta(epoch), student=student.state_dict(), generator=generator.state_dict(),
                    best_top1=best_top1, best_top5=best_top5, best_epoch=best_epoch, world_size=dist.world,
                    epoch=epoch, **extra)

    stopped = {}

    def on_interrupt(i, sums_now):               # SIGINT/SIGTERM: save after this iteration, atomically, stop
        if dist.main:
            save_checkpoint(run_state(epoch, batch=i + 1, interrupted=True, rng=[get_rng_state()],
                                      trainer=trainer.state_dict(iterator=True),
                                      partial={k: v.detach().cpu() for k, v in sums_now.items()}), ckpt_file)
            log.flush()
        stopped["at"] = f"{epoch_label(epoch, opt.nEpochs)} iteration {i + 1}"
        interrupt.stop(stopped["at"])

    # the original evaluated when epoch > warmup_epochs - 2; test_start_epoch >= 0 overrides that
    test_from = opt.test_start_epoch if opt.test_start_epoch >= 0 else opt.warmup_epochs - 1
    eta = runs.ETA(opt.nEpochs, start_epoch, opt.iters_per_epoch, say=log.info)
    t_start, n_val, n_skipped, epoch = time.time(), None, 0, start_epoch
    try:
        with interrupt.armed():
            for epoch in range(start_epoch, opt.nEpochs):
                freeze_model(student)
                if epoch < opt.unfreeze_epochs:
                    unfreeze_model(student)          # calibrate activation ranges (EMA) in the early epochs
                t0 = time.time()
                first = epoch == start_epoch
                m = trainer.train(epoch, start=skip if first else 0, sums=sums if first else None,
                                  on_interrupt=on_interrupt, eta=eta)
                freeze_model(student)
                line = (f"[{epoch_label(epoch, opt.nEpochs)}] [acc: {m['fp_acc']:.4f}%] [G loss: {m['loss_G']:f}] "
                        f"[One-hot loss: {m['one_hot']:f}] [BNS_loss:{m['BNS']:f}] [D_BNS_loss:{m['D_BNS']:f}] "
                        f"[loss_one_hot_BNScenters:{m['one_hot_BNScenters']:f}] [C_BNS_loss:{m['C_BNS']:f}] "
                        f"[S loss: {m['loss_S']:f}]")
                for k, v in m.items():
                    log.scalar(f"train/{TB_TRAIN[k]}", v, epoch + 1)
                improved = False
                if epoch >= test_from:
                    top1, top5, n_val, n_skipped = trainer.test()
                    line += f" [val top1: {top1:.4f}% top5: {top5:.4f}%" + \
                        (f", {n_skipped} unreadable image(s) skipped]" if n_skipped else "]")
                    log.scalar("val/top1", top1, epoch + 1)
                    log.scalar("val/top5", top5, epoch + 1)
                    if top1 >= best_top1 or best_epoch < 0:
                        best_top1, best_top5, best_epoch, improved = top1, top5, epoch, True
                log.flush()
                log.info(f"{line} ({time.time() - t0:.1f}s; {eta.line(epoch + 1)})")
                if best_epoch >= 0:
                    log.info(f"#==>Best Result is: Top1 Accuracy: {best_top1:f}, Top5 Accuracy: {best_top5:f} "
                             f"({epoch_label(best_epoch, opt.nEpochs)})")
                if dist.main:
                    if improved:
                        save_checkpoint(dict(meta(epoch + 1), state_dict=student.state_dict(), epoch=epoch + 1,
                                             top1=best_top1), os.path.join(run_dir, "model.pth"))
                        save_checkpoint({"state_dict": generator.state_dict(),
                                         IDENTITY_KEY: fdda_identity(args.model_name, opt, f8l8, recipe, source,
                                                                     "generator", epoch + 1, bns_sha256=bns)},
                                        os.path.join(run_dir, "generator.pth"))
                    save_checkpoint(run_state(epoch + 1, trainer=trainer.state_dict(), rng=[get_rng_state()]),
                                    ckpt_file)
                dist.barrier()
                if trainer.stop_requested():         # a signal during evaluation: stop after this epoch
                    stopped["at"] = f"after {epoch_label(epoch, opt.nEpochs)}"
                    interrupt.stop(stopped["at"])
    except KeyboardInterrupt as e:                   # common.errors.run_main prints e.message, exits 130/143
        e.message = (f"{stopped['at']}: resumable checkpoint saved to {ckpt_file}; continue with the same flags "
                     f"and --resume {ckpt_file}" if stopped else
                     f"stopped in {epoch_label(epoch, opt.nEpochs)}; --resume {ckpt_file} continues from the last finished epoch")
        raise
    if dist.main and best_epoch >= 0:
        finish_model(os.path.join(run_dir, "model.pth"), recipe)
    if dist.main and best_epoch >= 0 and n_val:
        record("fdda", model=args.model_name, dataset="imagenet" if source != "random" else "synthetic",
               split="val", setting=setting, metric="top1", value=best_top1, recipe=recipe, seed=opt.manualSeed,
               n_samples=n_val, extra={"top5": best_top5, "best_epoch": best_epoch + 1, "teacher": source,
                                       "selection": "best epoch on val (as the published numbers)",
                                       "world_size": dist.world, "data": os.path.abspath(opt.dataPath),
                                       "skipped_unreadable": n_skipped,
                                       "checkpoint": os.path.abspath(os.path.join(run_dir, "model.pth"))})
    log.info(f"Running Time is: {time.time() - t_start:.1f}s; model: {os.path.join(run_dir, 'model.pth')}")
    if dist.main:                    # the original's save_path/log_... -> this finished run
        runs.link_latest(run_dir, os.path.join(opt.save_path, opt.run_dir_name()), say=log.info)


def finish_model(path, recipe):
    """model.pth was written mid-run (best epoch so far): now that the run has finished, its identity says so."""
    if os.path.exists(path):
        ck = load_checkpoint(path, what="model.pth")
        if not ck[IDENTITY_KEY].get("finished"):
            ck[IDENTITY_KEY] = dict(ck[IDENTITY_KEY], finished=True, recipe=recipe)
            save_checkpoint(ck, path)


if __name__ == "__main__":
    cli(main)()
