"""The three stages of the ALQ pipeline (PRETRAIN, ALQ, POSTTRAIN), shared by
lenet5.py, vgg.py and resnet.py, which only define the network, the data and their defaults.

Stage recipe (Qu et al., CVPR 2020, Alg. 1 and Sec. 4; schedule as in the original scripts):
  ALQ        init (structured sketching), then R times: epoch_basis epochs of basis steps (lr *= ld_basis
             before each), epoch_coord epochs of coordinate steps (lr *= ld_coord), epoch_prune epochs of
             pruning; the quantized model is saved after every pruning.
  POSTTRAIN  basis steps by STE with a full-precision shadow (lr = lr*0.95^(e+1)), then 20 epochs of
             coordinate steps (x0.9 per epoch); the best-validation model is kept.
"""
import hashlib
import math
import os
import signal
import time

import torch

from binarynet import average_bitwidth
from checkpoints import (_at_batch, _final_model, alq_run_dir, check_resume_world, check_stage_flags,
                         check_stage_input, is_finished, load_net_state, load_optimizers, load_quantized,
                         mark_finished, place_outputs, resume_path, save_model, save_model_ori)
from common import interrupt, runs
from common.checks import check_writable_dir
from common.checkpoint import load_checkpoint
from common.device import get_rng_state, seed_everything, set_rng_state
from common.errors import UserError
from common.identity import IDENTITY_KEY, sha256_file
from common.runlog import QuietLog, epoch_label
from common.results import combine_recipes, record, results_dir
from distributed import Dist
from options import (_SWITCHES, check_args, check_inputs, check_outputs, model_post_path, said_by_rank_zero,
                     stage_recipe)
from pack import KB, export_packed, load_packed, storage_breakdown, storage_KB
from train import (RunContext, bit_report, initialize, layer_bits, make_alq_optimizers, num_samples, prune,
                   scale_lr, set_lr, train_basis, train_basis_STE, train_coordinate, train_fullprecision)


# ---------------------------------------------------------------------------------------------------
# The stages


# Each stage starts from its own seed, derived from (--seed, stage name): a stage gives the same result whether
# the earlier stages ran in the same process, in another invocation, or were resumed after a kill.
STAGES = ("PRETRAIN", "ALQ", "POSTTRAIN")


def stage_seed(seed, stage):
    """A 31-bit seed from sha256('<seed>/<stage>'), e.g. stage_seed(1, 'ALQ')."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def pretrain(ctx, make_optimizer, lr_schedule, epochs):
    """Train the FP model; keep the best-validation one in --model_ori (and a resume file per epoch, or at the
    batch where a signal stopped it)."""
    args, log, dist = ctx.args, ctx.log, ctx.dist
    net = ctx.build_net().to(ctx.device)
    optimizer = make_optimizer(net)
    rpath, start = resume_path(args.model_ori), 0
    best_acc, ck = None, None
    if args.resume and os.path.exists(rpath):
        ck = load_checkpoint(rpath, what="pretrain resume file")
        check_stage_flags(ck, args, "PRETRAIN", rpath, log)
        check_resume_world(ck, dist, rpath)
        load_net_state(net, ck, rpath, "--model_ori")
        optimizer.load_state_dict(ck["optimizer_state_dict"])
        start, best_acc = int(ck["epoch"]), float(ck["best_acc"])
        set_rng_state(dist.own(ck, "rng"))
        at = f"at {epoch_label(start, epochs)}" if start < epochs else f"after its last epoch ({epochs})"
        log.info(f"resuming PRETRAIN {at}{_at_batch(ck)} (best val {best_acc:.2f})")
    ident = ctx.ident("PRETRAIN", stage_recipe(args, "PRETRAIN"))
    if best_acc is None:
        best_acc = ctx.evaluate(net, "val")["top1"]
        if dist.main:
            save_model_ori(args.model_ori, net, optimizer, epoch=0, val_top1=best_acc, quantlab=ident)
    fwd = dist.wrap(net)
    ctl = ctx.interruptible(rpath, lambda **kw: save_model_ori(rpath, net, optimizer, epoch=epoch, best_acc=best_acc,
                                                               quantlab=ident, **kw), ck)
    eta = runs.ETA(epochs, start)
    with interrupt.armed():
        for epoch in range(start, epochs):
            if not ctl.mid_epoch:
                lr_schedule(optimizer, epoch)
            ctl.where = f"PRETRAIN {epoch_label(epoch, epochs)}"
            t0 = time.time()
            s = train_fullprecision(fwd, ctx.train_loader, ctx.loss_func, optimizer, ctx.device,
                                    desc=f"pretrain {epoch + 1}/{epochs}", **ctx.train_kw(ctl))
            ctx.epoch_done(net, (), ctl.where)
            v = ctx.report_epoch(net, "pretrain", f"pretrain {epoch_label(epoch, epochs)}",
                                 optimizer.param_groups[0]['lr'], s, time.time() - t0, eta.line(epoch + 1), epoch + 1)
            log.flush()
            if v > best_acc:
                best_acc = v
                if dist.main:
                    save_model_ori(args.model_ori, net, optimizer, epoch=epoch + 1, val_top1=v, quantlab=ident)
            rng = dist.rng_fields(rng=get_rng_state())
            if dist.main:
                save_model_ori(rpath, net, optimizer, epoch=epoch + 1, best_acc=best_acc, quantlab=ident, **rng)
            ctl.epoch_end()
    if dist.main:
        mark_finished(args.model_ori)
        if os.path.exists(rpath):
            os.remove(rpath)
    ctx.stage_done("PRETRAIN")
    return best_acc


def alq_schedule(args):
    """The ALQ stage as a flat list of (r, phase, epoch-in-phase); resume continues at an index."""
    sched = []
    for r in range(args.R):
        sched += [(r, "basis", e) for e in range(args.epoch_basis)]
        sched += [(r, "coord", e) for e in range(args.epoch_coord)]
        sched += [(r, "prune", e) for e in range(args.epoch_prune)]
    return sched


def resume_stage(rpath, net, args, legacy_flip, stage, num_steps, log, dist=None):
    """Continue a killed ALQ / POSTTRAIN stage from its resume file (weights, both optimizers, RNG; written after
    an epoch or at the batch where a signal stopped it)."""
    dist = dist if dist is not None else Dist()
    ck, params_w, params_b, params_bin = load_quantized(rpath, net, legacy_flip, what=f"{stage} resume file")
    check_resume_world(ck, dist, rpath)
    optimizer_w, optimizer_b = make_alq_optimizers(params_w, params_b, args)
    load_optimizers(ck, optimizer_w, optimizer_b, rpath)
    start, best_acc = int(ck["next"]), float(ck["best_acc"])
    set_rng_state(dist.own(ck, "rng"))
    at = f"at step {start + 1}/{num_steps}" if start < num_steps else f"after its last step ({num_steps})"
    log.info(f"resuming {stage} {at}{_at_batch(ck)}")
    return params_w, params_b, params_bin, optimizer_w, optimizer_b, start, best_acc


def resume_checked(ctx, rpath, net, stage, sha_key, source, source_flag, n_steps, legacy_flip):
    """A killed stage's resume file, checked against this run's flags and the input file the stage started from,
    then restored: (checkpoint, the input's sha256, the identity, resume_stage's state)."""
    rck = load_checkpoint(rpath, what=f"{stage} resume file")
    check_stage_flags(rck, ctx.args, stage, rpath, ctx.log)
    check_stage_input(rck, sha_key, source, source_flag, f"the {stage} resume file {rpath}")
    sha, ident = rck.get(sha_key), rck.get(IDENTITY_KEY) or ctx.ident(stage, None)
    return rck, sha, ident, resume_stage(rpath, net, ctx.args, legacy_flip, stage, n_steps, ctx.log, ctx.dist)


def alq(ctx):
    """Init by structured sketching, then R rounds of basis / coordinate / pruning epochs; saves --model."""
    args, log, device, dist = ctx.args, ctx.log, ctx.device, ctx.dist
    legacy_flip = not args.fix_sign_flip
    net = ctx.build_net().to(device)
    rpath = resume_path(args.model)
    sched = alq_schedule(args)
    num_batches = math.ceil(num_samples(ctx.train_loader) / args.batch_size)
    # M_p: fraction of the candidates pruned per step so that ~pr of the alphas go per pruning (Sec. 3.3)
    M_p = (args.pr / args.top_k) / (args.epoch_prune * num_batches) if args.top_k > 0 else 0.0
    rck = None
    if args.resume and os.path.exists(rpath):
        rck, ori_sha, ident, (params_w, params_b, params_bin, optimizer_w, optimizer_b, start, best_acc) = \
            resume_checked(ctx, rpath, net, "ALQ", "model_ori_sha256", args.model_ori, "--model_ori", len(sched),
                           legacy_flip)
    else:
        ck = load_checkpoint(args.model_ori, what="full-precision model", flag="--model_ori")
        ori = ck.get(IDENTITY_KEY) if isinstance(ck.get(IDENTITY_KEY), dict) else None
        if ori is not None and not ori.get("finished"):
            raise UserError(f"--model_ori {args.model_ori} is an unfinished PRETRAIN (epoch {ck.get('epoch', '?')}); "
                            f"finish it with --PRETRAIN --resume, or pass a finished full-precision model")
        if ori is not None and (ori.get("recipe") or {}).get("full") is False:
            log.info(f"note: --model_ori comes from a shortened PRETRAIN ({ori['recipe']['summary']}); the result "
                     f"is recorded as shortened")
        elif ori is None:
            log.info("note: --model_ori records no recipe (an older or third-party file); the result says so")
        ori_sha = sha256_file(args.model_ori)
        ident = ctx.ident("ALQ", combine_recipes((ori or {}).get("recipe"), stage_recipe(args, "ALQ")),
                          model_ori_sha256=ori_sha)
        load_net_state(net, ck, args.model_ori, "--model_ori")
        log.info("initialization (structured sketching)...")
        t0 = time.time()
        params_w, params_b, params_bin = initialize(net, args.structure, args.subc, args.max_bit, legacy_flip)
        log.info(f"  done in {time.time() - t0:.1f}s\n{bit_report(params_bin)}")
        optimizer_w, optimizer_b = make_alq_optimizers(params_w, params_b, args)
        best_acc = ctx.evaluate(net, "val")["top1"]
        ctx.evaluate(net, "test")
        if dist.main:
            save_model(args.model, net, optimizer_w, optimizer_b, params_bin, stage="ALQ-init", quantlab=ident,
                       model_ori_sha256=ori_sha)
        start = 0
    opts = (optimizer_w, optimizer_b)
    fwd = dist.wrap(net)
    ctl = ctx.interruptible(rpath, lambda **kw: save_model(rpath, net, optimizer_w, optimizer_b, params_bin,
                                                           stage="ALQ-resume", next=i, best_acc=best_acc,
                                                           quantlab=ident, model_ori_sha256=ori_sha, **kw), rck)
    eta = runs.ETA(len(sched), start)
    with interrupt.armed():
        for i in range(start, len(sched)):
            r, phase, e = sched[i]
            if not ctl.mid_epoch:                 # (a resumed epoch's learning rates are in its optimizers)
                if i == 0 or sched[i - 1][0] != r:  # every outer iteration restarts at --lr
                    set_lr(opts, args.lr)
                if phase != "prune":
                    scale_lr(opts, args.ld_basis if phase == "basis" else args.ld_coord)
            n_phase = {"basis": args.epoch_basis, "coord": args.epoch_coord, "prune": args.epoch_prune}[phase]
            ctl.where = f"ALQ step {i + 1}/{len(sched)} (r {r + 1}/{args.R} {phase} {epoch_label(e, n_phase)})"
            t0 = time.time()
            kw = dict(desc=f"r{r + 1} {phase} {e + 1}/{n_phase}", **ctx.train_kw(ctl))
            if phase == "basis":
                s = train_basis(fwd, ctx.train_loader, ctx.loss_func, optimizer_w, optimizer_b, params_bin, device,
                                **kw)
            elif phase == "coord":
                s = train_coordinate(fwd, ctx.train_loader, ctx.loss_func, optimizer_w, optimizer_b, params_bin, device,
                                     **kw)
            else:
                s = prune(fwd, ctx.train_loader, ctx.loss_func, optimizer_w, optimizer_b, params_bin, [args.top_k, M_p],
                          device, **kw)
            ctx.epoch_done(net, params_bin, ctl.where)
            step = i + 1
            v = ctx.report_epoch(net, "alq", f"ALQ r {r + 1}/{args.R} {phase} {epoch_label(e, n_phase)}",
                                 optimizer_w.param_groups[0]['lr'], s, time.time() - t0, eta.line(i + 1), step)
            log.scalar("bits/avg", average_bitwidth(params_bin), step)
            log.flush()
            if phase == "prune":
                best_acc = v  # the original resets best_acc after every pruning
                log.info(bit_report(params_bin))
                ctx.evaluate(net, "test")
                if dist.main:
                    save_model(args.model, net, optimizer_w, optimizer_b, params_bin, stage="ALQ", round=r,
                               quantlab=ident, model_ori_sha256=ori_sha)
            elif v > best_acc:
                best_acc = v
            rng = dist.rng_fields(rng=get_rng_state())
            if dist.main:
                save_model(rpath, net, optimizer_w, optimizer_b, params_bin, stage="ALQ-resume", next=step,
                           best_acc=best_acc, quantlab=ident, model_ori_sha256=ori_sha, **rng)
            ctl.epoch_end()
    if dist.main:
        save_model(args.model, net, optimizer_w, optimizer_b, params_bin, stage="ALQ", finished=True, quantlab=ident,
                   model_ori_sha256=ori_sha)
        if os.path.exists(rpath):
            os.remove(rpath)
    ctx.stage_done("ALQ")
    return net, params_bin


def posttrain(ctx):
    """STE basis steps with a full-precision shadow, then coordinate steps; keeps the best-validation model in
    --model_post. Loads the quantized model (--model) written by --ALQ, so it can run on its own."""
    args, log, device, dist = ctx.args, ctx.log, ctx.device, ctx.dist
    legacy_flip = not args.fix_sign_flip
    net = ctx.build_net().to(device)
    out = model_post_path(args)
    rpath = resume_path(out)
    ste_epochs, coord_epochs = ctx.post_epochs
    sched = [("ste", e) for e in range(ste_epochs)] + [("coord", e) for e in range(coord_epochs)]
    rck = None
    if args.resume and os.path.exists(rpath):
        rck, model_sha, ident, (params_w, params_b, params_bin, optimizer_w, optimizer_b, start, best_acc) = \
            resume_checked(ctx, rpath, net, "POSTTRAIN", "model_sha256", args.model, "--model", len(sched),
                           legacy_flip)
    else:
        log.info(f"load quantized model {args.model} ...")
        ck, params_w, params_b, params_bin = load_quantized(args.model, net, legacy_flip)
        src = ck.get(IDENTITY_KEY) if isinstance(ck.get(IDENTITY_KEY), dict) else None
        src_recipe = (src or {}).get("recipe")
        if src is not None and not src.get("finished"):
            src_recipe = dict(src_recipe or {}, full=False,
                              summary=f"{(src_recipe or {}).get('summary', '?')}; ALQ stage not finished")
        model_sha = sha256_file(args.model)
        ident = ctx.ident("POSTTRAIN", combine_recipes(src_recipe, stage_recipe(args, "POSTTRAIN")),
                          model_sha256=model_sha)
        if str(ck.get("stage", "")).startswith("ALQ-init"):
            log.info("  note: this is the model right after initialization (the ALQ stage did not finish)")
        optimizer_w, optimizer_b = make_alq_optimizers(params_w, params_b, args)
        load_optimizers(ck, optimizer_w, optimizer_b, args.model)
        with torch.no_grad():  # the net holds the reconstruction; STE's shadow starts from it (w_FP)
            for p, pb in zip(params_w, params_bin):
                p.copy_(pb.reconstruct_w())
        log.info(bit_report(params_bin))
        best_acc = ctx.evaluate(net, "val")["top1"]
        ctx.evaluate(net, "test")
        set_lr((optimizer_w, optimizer_b), args.lr)
        if dist.main:
            save_model(out, net, optimizer_w, optimizer_b, params_bin, stage="POSTTRAIN", epoch=0,
                       val_top1=best_acc, quantlab=ident, model_sha256=model_sha)
        start = 0
    opts = (optimizer_w, optimizer_b)
    fwd = dist.wrap(net)
    ctl = ctx.interruptible(rpath, lambda **kw: save_model(rpath, net, optimizer_w, optimizer_b, params_bin,
                                                           stage="POSTTRAIN-resume", next=i, best_acc=best_acc,
                                                           quantlab=ident, model_sha256=model_sha, **kw), rck)
    eta = runs.ETA(len(sched), start)
    with interrupt.armed():
        for i in range(start, len(sched)):
            phase, e = sched[i]
            if not ctl.mid_epoch:                 # (a resumed epoch's learning rates are in its optimizers)
                if phase == "coord" and e == 0 and ctx.post_coord_lr is not None:
                    set_lr(opts, ctx.post_coord_lr)
                scale_lr(opts, 0.95 if phase == "ste" else 0.9)
            n_phase = ste_epochs if phase == "ste" else coord_epochs
            ctl.where = f"POSTTRAIN step {i + 1}/{len(sched)} ({phase} {epoch_label(e, n_phase)})"
            t0 = time.time()
            kw = dict(desc=f"ste {e + 1}/{n_phase}" if phase == "ste" else f"post coord {e + 1}/{n_phase}",
                      **ctx.train_kw(ctl))
            train = train_basis_STE if phase == "ste" else train_coordinate
            s = train(fwd, ctx.train_loader, ctx.loss_func, optimizer_w, optimizer_b, params_bin, device, **kw)
            ctx.epoch_done(net, params_bin, ctl.where)
            v = ctx.report_epoch(net, "posttrain", f"POSTTRAIN {phase} {epoch_label(e, n_phase)}",
                                 optimizer_w.param_groups[0]['lr'], s, time.time() - t0, eta.line(i + 1), i + 1)
            log.flush()
            if v > best_acc:
                best_acc = v
                if dist.main:
                    save_model(out, net, optimizer_w, optimizer_b, params_bin, stage="POSTTRAIN", epoch=i + 1,
                               val_top1=v, quantlab=ident, model_sha256=model_sha)
            rng = dist.rng_fields(rng=get_rng_state())
            if dist.main:
                save_model(rpath, net, optimizer_w, optimizer_b, params_bin, stage="POSTTRAIN-resume", next=i + 1,
                           best_acc=best_acc, quantlab=ident, model_sha256=model_sha, **rng)
            ctl.epoch_end()
    if dist.main:
        mark_finished(out)
        if os.path.exists(rpath):
            os.remove(rpath)
    ctx.stage_done("POSTTRAIN")
    return net, params_bin


# ---------------------------------------------------------------------------------------------------
# The whole run: stages, then evaluation of the final quantized model, result records and export


def published(arch, dataset):
    """The paper's row for this model ({metric: value}) from common/published/alq.json, or {}."""
    try:
        from common.compare import load_published
        rows = load_published("alq")["rows"]
    except Exception:  # noqa: BLE001 - the table is informative only
        return {}
    return {r["metric"]: r["value"] for r in rows if r["model"] == arch and r["dataset"] == dataset
            and r["setting"] == "ALQ"}


def run_pipeline(args, arch, dataset, build_net, make_loaders, pretrain_recipe, post_coord_lr=None,
                 split_name="test"):
    """PRETRAIN / ALQ / POSTTRAIN as asked, then evaluate and record the final quantized model; --export packs it.

    pretrain_recipe(ctx) runs the script's own full-precision training; make_loaders(args) -> (train, val, test).
    """
    ctx, run_dir, links = plan_pipeline(args, arch, build_net, make_loaders, post_coord_lr)
    ran, times = run_stages(ctx, links, pretrain_recipe)
    finish_pipeline(ctx, run_dir, ran, times, dataset, split_name)


def plan_pipeline(args, arch, build_net, make_loaders, post_coord_lr=None):
    """Checks, processes, run directory, seeds, data and log, in this order: (ctx, run directory, {stage: the
    documented path its output is linked from})."""
    def check():                                  # the same flags and files in every process of torchrun
        check_args(args)
        if not (args.PRETRAIN or args.ALQ or args.POSTTRAIN or args.export):
            raise UserError("nothing to do: pass --PRETRAIN, --ALQ, --POSTTRAIN and/or --export PATH")
        check_inputs(args, build_net)
    said_by_rank_zero(check)                      # before init_process_group: no process group, no work yet
    dist = Dist.start()                           # one process, or torchrun's (DistributedDataParallel)

    def plan():                                   # rank 0 decides and checks the outputs; every process follows
        run_dir = args.log_dir or alq_run_dir(arch, args.resume)
        check_writable_dir(run_dir, "--log_dir" if args.log_dir else "QUANTLAB_RUNS")
        links = place_outputs(args, run_dir)
        check_outputs(args)
        return run_dir, links, {k: getattr(args, k) for k in ("model_ori", "model", "model_post")}
    run_dir, links, paths = dist.from_main(plan)
    for k, v in paths.items():
        setattr(args, k, v)
    seed_everything(args.seed, deterministic=True)      # resumed stages repeat uninterrupted ones (CUDA too)
    device = dist.device
    # the data are read before the run directory is opened: missing or corrupt data leave no run behind
    loaders = tuple(dist.shard(loader) for loader in dist.main_first(lambda: make_loaders(args)))
    log = runs.start_run("alq", run_dir, args, seed=args.seed, device=device).log if dist.main else QuietLog()
    if dist.enabled:
        log.info(f"=> {dist.world} processes (DistributedDataParallel, {'nccl' if device.type == 'cuda' else 'gloo'}"
                 f" on {device.type}): --batch_size {args.batch_size} in all, {args.batch_size // dist.world} per "
                 f"process; --workers {args.workers} in all")
    interrupt.install()                           # SIGTERM stops like Ctrl-C: logs closed, resume file kept
    ctx = RunContext(args, build_net, loaders, device, log, post_coord_lr, arch=arch, dist=dist)
    return ctx, run_dir, links


def run_stages(ctx, links, pretrain_recipe):
    """The stages asked for, in order (a finished one skipped under --resume): (stages done, {stage: seconds})."""
    args, log, dist = ctx.args, ctx.log, ctx.dist
    inputs = {"ALQ": ("model_ori_sha256", args.model_ori, "--model_ori"),
              "POSTTRAIN": ("model_sha256", args.model, "--model")}
    ran, times = [], {}
    for name, flag, fn, out in (("PRETRAIN", args.PRETRAIN, pretrain_recipe, args.model_ori),
                                ("ALQ", args.ALQ, alq, args.model),
                                ("POSTTRAIN", args.POSTTRAIN, posttrain, model_post_path(args))):
        if flag and name in links:
            log.info(f"== {name} output: {out} (linked from {links[name]} when the stage finishes)")
        if flag and args.resume and is_finished(out):
            check_stage_flags(load_checkpoint(out), args, name, out, log)
            if name in inputs:                    # a finished stage built on an input re-created since is stale
                check_stage_input(load_checkpoint(out), *inputs[name][:2], inputs[name][2],
                                  f"the finished {name} output {out}")
            log.info(f"== {name}: already finished ({out}), skipped (--resume) ==")
            ran.append(name)
        elif flag:
            log.info(f"== {name} (seed {stage_seed(args.seed, name)} from --seed {args.seed}) ==")
            seed_everything(stage_seed(args.seed, name), deterministic=True)
            t0 = time.time()
            try:
                fn(ctx)
            except KeyboardInterrupt as e:        # SIGINT/SIGTERM (common.interrupt): say what --resume continues
                if getattr(e, "saved", False):    # the stage saved where it stopped and says so
                    raise
                rp = resume_path(out)
                msg = (f"{name} stopped; --resume continues it from its last finished epoch ({rp})"
                       if os.path.exists(rp) else f"{name} stopped in its first epoch; --resume restarts that stage")
                raise interrupt.Interrupted(msg, getattr(e, "signum", signal.SIGINT)) from None
            dist.barrier()                        # rank 0's stage output is written before any process reads it
            times[name] = time.time() - t0
            ran.append(name)
            log.info(f"== {name} done in {times[name] / 60:.1f} min ==")
            if name in links and dist.main:       # the original's documented path -> this run's file
                runs.link_latest(out, links[name], say=log.info)
    return ran, times


def finish_pipeline(ctx, run_dir, ran, times, dataset, split_name="test"):
    """Evaluate the final quantized model (after --export, the one rebuilt from the packed file) and record it."""
    args, log, dist, device, arch, build_net = ctx.args, ctx.log, ctx.dist, ctx.device, ctx.arch, ctx.build_net
    if ran == ["PRETRAIN"] and not args.export:
        runs.end_run()
        dist.close()
        return
    src = _final_model(args, ran)
    net = build_net().to(device)
    ck, _, _, params_bin = load_quantized(src, net, not args.fix_sign_flip)
    posttrained = str(ck.get("stage", "")).startswith("POSTTRAIN")
    setting = "ALQ" if posttrained else "ALQ-before-POSTTRAIN"
    switches = [f"--{k}" for k in _SWITCHES[1:] if getattr(args, k, False)]
    if switches:                                  # not the published behaviour: never pooled with the ALQ row
        setting += " " + " ".join(switches)
    ident = ck.get(IDENTITY_KEY) if isinstance(ck.get(IDENTITY_KEY), dict) else None
    recipe = (ident or {}).get("recipe")
    if not ck.get("finished"):                    # a half-finished stage output is never the final result
        recipe = dict(recipe or {}, full=False,
                      summary=f"{(recipe or {}).get('summary', 'recipe not recorded')}; {ck.get('stage')} not finished")
        log.info(f"note: {src} is not a finished stage output (stage {ck.get('stage')}); recorded as shortened")
    bits, skb = average_bitwidth(params_bin), storage_KB(params_bin)
    log.info(f"final quantized model {src} ({ck.get('stage')}):\n{bit_report(params_bin)}")
    extra = {"source": os.path.abspath(src), "stage": ck.get("stage"), "seed": args.seed, "KB": f"{KB} bytes",
             **storage_breakdown(params_bin), "layer_bits": layer_bits(params_bin),
             "stage_minutes": {k: round(v / 60, 2) for k, v in times.items()}}
    if dist.enabled:
        extra["world_size"] = dist.world
    packed_kb = None
    if args.export and dist.main:                 # rank 0 writes and checks the file; all evaluate the model
        size = export_packed(args.export, arch, net, params_bin)
        net2 = build_net().to(device)
        load_packed(args.export, net2, arch=arch)
        net.eval()
        net2.eval()
        x, _ = next(iter(ctx.test_loader))
        with torch.no_grad():
            same = torch.equal(net(x.to(device)), net2(x.to(device)))
        if not same:
            raise RuntimeError(f"packed model {args.export} does not reproduce the network's outputs bit for bit")
        packed_kb = size / KB
        log.info(f"exported {args.export}: {size} bytes = {packed_kb:.2f} KB on disk (inferred weight storage "
                 f"{skb:.2f} KB); reloaded outputs are bit-identical")
        net = net2  # the numbers below are measured on the model rebuilt from the packed file
        extra["packed_file"] = os.path.abspath(args.export)
    s = ctx.evaluate(net, "test")
    if not dist.main:
        dist.close()
        return
    log.info(f"RESULT {arch} {dataset} {setting}: top1 {s['top1']:.2f}%  avg bits {bits:.4f}  "
             f"storage {skb:.2f} KB" + (f"  packed file {packed_kb:.2f} KB" if packed_kb is not None else ""))
    pub = published(arch, dataset)
    if pub:
        log.info("PAPER  " + "  ".join(f"{k} {v:g}" for k, v in pub.items()) + "  (README, storage in KB)")
    n = s["n"]
    record("alq", arch, dataset, split_name, setting, "top1", s["top1"], n, extra=extra, recipe=recipe)
    record("alq", arch, dataset, "n/a", setting, "avg_bits", bits, n, extra=extra, recipe=recipe)
    record("alq", arch, dataset, "n/a", setting, "storage_KB", skb, n, extra=extra, recipe=recipe)
    if packed_kb is not None:
        record("alq", arch, dataset, "n/a", setting, "packed_KB", packed_kb, n, extra=extra, recipe=recipe)
    # record() says where on the console only; log.txt says it too
    log.detail(f"records appended to {os.path.join(results_dir(), 'alq.jsonl')} and "
               f"{os.path.join(run_dir, 'records.jsonl')}")
    runs.end_run()
    dist.close()
