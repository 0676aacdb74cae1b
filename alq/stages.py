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

from alq.binarynet import average_bitwidth
from alq.checkpoints import (_at_batch, alq_run_dir, check_resume_world, check_stage_flags, check_stage_input,
                             is_finished, load_net_state, load_optimizers, load_quantized, mark_finished,
                             place_outputs, resume_path, save_model, save_model_ori)
from alq.distributed import Dist
from alq.final import finish_pipeline
from alq.options import check_args, check_inputs, check_outputs, model_post_path, said_by_rank_zero, stage_recipe
from alq.train import (RunContext, bit_report, initialize, make_alq_optimizers, num_samples, prune, scale_lr, set_lr,
                       train_basis, train_basis_STE, train_coordinate, train_fullprecision)
from common import interrupt, runs
from common.checkpoint import load_checkpoint
from common.checks import check_writable_dir
from common.device import get_rng_state, seed_everything, set_rng_state
from common.errors import UserError
from common.identity import IDENTITY_KEY, sha256_file
from common.results import combine_recipes
from common.runlog import QuietLog, epoch_label


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


class QuantizedStage:
    """What an ALQ or POSTTRAIN stage runs with. Its state (weights, multi-bit layers, both optimizers, best
    validation top-1, identity, the sha256 of the input it started from) comes from its resume file under --resume
    (checked against this run's flags and that input; written after every step, or at the batch where a signal
    stopped it), else from the stage's `begin()`; then the network as trained (wrapped under torchrun), the
    stop-and-resume control and the ETA of its steps. Both resume files are `save_resume`'s."""

    def __init__(self, ctx, net, stage, rpath, n_steps, source, legacy_flip, begin):
        """source: (the checkpoint key of the input's sha256, the input file, its flag); begin() -> (params_w,
        params_b, params_bin, optimizer_w, optimizer_b, best_acc, identity, the input's sha256)."""
        self.ctx, self.net, self.stage, self.rpath, self.n_steps = ctx, net, stage, rpath, n_steps
        self.sha_key, self.rck, self.step = source[0], None, 0
        state = self._resume(source, legacy_flip) if ctx.args.resume and os.path.exists(rpath) else begin()
        (self.params_w, self.params_b, self.params_bin, self.optimizer_w, self.optimizer_b, self.best_acc, self.ident,
         self.sha) = state
        self.start, self.opts = self.step, (self.optimizer_w, self.optimizer_b)
        self.fwd = ctx.dist.wrap(net)
        self.ctl = ctx.interruptible(rpath, lambda **kw: self.save_resume(self.step, **kw), self.rck)
        self.eta = runs.ETA(n_steps, self.start)

    def _resume(self, source, legacy_flip):
        """Continue the killed stage from its resume file (weights, both optimizers, RNG)."""
        ctx, rpath, stage, dist = self.ctx, self.rpath, self.stage, self.ctx.dist
        self.rck = load_checkpoint(rpath, what=f"{stage} resume file")
        check_stage_flags(self.rck, ctx.args, stage, rpath, ctx.log)
        check_stage_input(self.rck, *source, f"the {stage} resume file {rpath}")
        sha, ident = self.rck.get(self.sha_key), self.rck.get(IDENTITY_KEY) or ctx.ident(stage, None)
        ck, params_w, params_b, params_bin = load_quantized(rpath, self.net, legacy_flip, what=f"{stage} resume file")
        check_resume_world(ck, dist, rpath)
        optimizer_w, optimizer_b = make_alq_optimizers(params_w, params_b, ctx.args)
        load_optimizers(ck, optimizer_w, optimizer_b, rpath)
        self.step, best_acc = int(ck["next"]), float(ck["best_acc"])
        set_rng_state(dist.own(ck, "rng"))
        n = self.n_steps
        at = f"at step {self.step + 1}/{n}" if self.step < n else f"after its last step ({n})"
        ctx.log.info(f"resuming {stage} {at}{_at_batch(ck)}")
        return params_w, params_b, params_bin, optimizer_w, optimizer_b, best_acc, ident, sha

    def at(self, i, where):
        """Step i (from 0) starts; `where` names it in the line of a stop."""
        self.step, self.ctl.where = i, where

    def save_resume(self, next_step, **kw):
        save_model(self.rpath, self.net, self.optimizer_w, self.optimizer_b, self.params_bin,
                   stage=f"{self.stage}-resume", next=next_step, best_acc=self.best_acc, quantlab=self.ident,
                   **{self.sha_key: self.sha}, **kw)

    def step_done(self, step):
        """After step `step` (counted from 1): its resume file (rank 0; the RNG states of now), then stop there if
        a signal came."""
        rng = self.ctx.dist.rng_fields(rng=get_rng_state())
        if self.ctx.dist.main:
            self.save_resume(step, **rng)
        self.ctl.epoch_end()

    def finish(self, save_output):
        """The last step is done: rank 0 writes the stage's output (`save_output()`) and removes the resume file."""
        if self.ctx.dist.main:
            save_output()
            if os.path.exists(self.rpath):
                os.remove(self.rpath)
        self.ctx.stage_done(self.stage)


def alq(ctx):
    """Init by structured sketching, then R rounds of basis / coordinate / pruning epochs; saves --model."""
    args, log, device, dist = ctx.args, ctx.log, ctx.device, ctx.dist
    legacy_flip = not args.fix_sign_flip
    net = ctx.build_net().to(device)
    sched = alq_schedule(args)
    num_batches = math.ceil(num_samples(ctx.train_loader) / args.batch_size)
    # M_p: fraction of the candidates pruned per step so that ~pr of the alphas go per pruning (Sec. 3.3)
    M_p = (args.pr / args.top_k) / (args.epoch_prune * num_batches) if args.top_k > 0 else 0.0

    def begin():
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
        return params_w, params_b, params_bin, optimizer_w, optimizer_b, best_acc, ident, ori_sha
    st = QuantizedStage(ctx, net, "ALQ", resume_path(args.model), len(sched),
                        ("model_ori_sha256", args.model_ori, "--model_ori"), legacy_flip, begin)
    optimizer_w, optimizer_b, params_bin = st.optimizer_w, st.optimizer_b, st.params_bin
    with interrupt.armed():
        for i in range(st.start, len(sched)):
            r, phase, e = sched[i]
            if not st.ctl.mid_epoch:              # (a resumed epoch's learning rates are in its optimizers)
                if i == 0 or sched[i - 1][0] != r:  # every outer iteration restarts at --lr
                    set_lr(st.opts, args.lr)
                if phase != "prune":
                    scale_lr(st.opts, args.ld_basis if phase == "basis" else args.ld_coord)
            n_phase = {"basis": args.epoch_basis, "coord": args.epoch_coord, "prune": args.epoch_prune}[phase]
            st.at(i, f"ALQ step {i + 1}/{len(sched)} (r {r + 1}/{args.R} {phase} {epoch_label(e, n_phase)})")
            t0 = time.time()
            kw = dict(desc=f"r{r + 1} {phase} {e + 1}/{n_phase}", **ctx.train_kw(st.ctl))
            if phase == "basis":
                s = train_basis(st.fwd, ctx.train_loader, ctx.loss_func, optimizer_w, optimizer_b, params_bin, device,
                                **kw)
            elif phase == "coord":
                s = train_coordinate(st.fwd, ctx.train_loader, ctx.loss_func, optimizer_w, optimizer_b, params_bin,
                                     device, **kw)
            else:
                s = prune(st.fwd, ctx.train_loader, ctx.loss_func, optimizer_w, optimizer_b, params_bin,
                          [args.top_k, M_p], device, **kw)
            ctx.epoch_done(net, params_bin, st.ctl.where)
            step = i + 1
            v = ctx.report_epoch(net, "alq", f"ALQ r {r + 1}/{args.R} {phase} {epoch_label(e, n_phase)}",
                                 optimizer_w.param_groups[0]['lr'], s, time.time() - t0, st.eta.line(i + 1), step)
            log.scalar("bits/avg", average_bitwidth(params_bin), step)
            log.flush()
            if phase == "prune":
                st.best_acc = v  # the original resets best_acc after every pruning
                log.info(bit_report(params_bin))
                ctx.evaluate(net, "test")
                if dist.main:
                    save_model(args.model, net, optimizer_w, optimizer_b, params_bin, stage="ALQ", round=r,
                               quantlab=st.ident, model_ori_sha256=st.sha)
            elif v > st.best_acc:
                st.best_acc = v
            st.step_done(step)
    st.finish(lambda: save_model(args.model, net, optimizer_w, optimizer_b, params_bin, stage="ALQ", finished=True,
                                 quantlab=st.ident, model_ori_sha256=st.sha))
    return net, params_bin


def posttrain(ctx):
    """STE basis steps with a full-precision shadow, then coordinate steps; keeps the best-validation model in
    --model_post. Loads the quantized model (--model) written by --ALQ, so it can run on its own."""
    args, log, device, dist = ctx.args, ctx.log, ctx.device, ctx.dist
    legacy_flip = not args.fix_sign_flip
    net = ctx.build_net().to(device)
    out = model_post_path(args)
    ste_epochs, coord_epochs = ctx.post_epochs
    sched = [("ste", e) for e in range(ste_epochs)] + [("coord", e) for e in range(coord_epochs)]

    def begin():
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
        return params_w, params_b, params_bin, optimizer_w, optimizer_b, best_acc, ident, model_sha
    st = QuantizedStage(ctx, net, "POSTTRAIN", resume_path(out), len(sched), ("model_sha256", args.model, "--model"),
                        legacy_flip, begin)
    optimizer_w, optimizer_b, params_bin = st.optimizer_w, st.optimizer_b, st.params_bin
    with interrupt.armed():
        for i in range(st.start, len(sched)):
            phase, e = sched[i]
            if not st.ctl.mid_epoch:              # (a resumed epoch's learning rates are in its optimizers)
                if phase == "coord" and e == 0 and ctx.post_coord_lr is not None:
                    set_lr(st.opts, ctx.post_coord_lr)
                scale_lr(st.opts, 0.95 if phase == "ste" else 0.9)
            n_phase = ste_epochs if phase == "ste" else coord_epochs
            st.at(i, f"POSTTRAIN step {i + 1}/{len(sched)} ({phase} {epoch_label(e, n_phase)})")
            t0 = time.time()
            kw = dict(desc=f"ste {e + 1}/{n_phase}" if phase == "ste" else f"post coord {e + 1}/{n_phase}",
                      **ctx.train_kw(st.ctl))
            train = train_basis_STE if phase == "ste" else train_coordinate
            s = train(st.fwd, ctx.train_loader, ctx.loss_func, optimizer_w, optimizer_b, params_bin, device, **kw)
            ctx.epoch_done(net, params_bin, st.ctl.where)
            v = ctx.report_epoch(net, "posttrain", f"POSTTRAIN {phase} {epoch_label(e, n_phase)}",
                                 optimizer_w.param_groups[0]['lr'], s, time.time() - t0, st.eta.line(i + 1), i + 1)
            log.flush()
            if v > st.best_acc:
                st.best_acc = v
                if dist.main:
                    save_model(out, net, optimizer_w, optimizer_b, params_bin, stage="POSTTRAIN", epoch=i + 1,
                               val_top1=v, quantlab=st.ident, model_sha256=st.sha)
            st.step_done(i + 1)
    st.finish(lambda: mark_finished(out))
    return net, params_bin


# ---------------------------------------------------------------------------------------------------
# The whole run: checks and plan, the stages, then the final quantized model (alq/final.py)


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
