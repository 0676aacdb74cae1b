"""main_cifar10.py's checkpoints: what they are (common.identity: paper, model, bits, stage, recipe, how far the
run got), the start models of --pretrained/--resume checked against the flags (one line naming both), the run
directory of a new run, and --continue (which checkpoint, and that it was written under the same flags)."""
import glob
import os
import re

from common import runs
from common.checkpoint import (extract_state_dict, load_checkpoint, load_model_state, save_checkpoint,
                               strip_module_prefix)
from common.checks import check_writable_dir
from common.errors import UserError
from common.identity import check_checkpoint, expect, identity
from dambq.options import model_name, setting_of

LATEST, BEST = 'latest.pth.tar', 'model_best.pth.tar'
RUN_KEYS = ('arch', 'quantize', 'wgt_target', 'act_target', 'layerwise', 'duration', 'keep_fc_bias', 'option_a')
# the flags that shape the optimisation: --continue repeats them (checked where the checkpoint stores them)
SCHEDULE_KEYS = ('epochs', 'batch_size', 'lr', 'momentum', 'weight_decay', 'max_iters')


def wanted(args, quantized=None, bits=True):
    """What the flags ask a checkpoint to be (common.identity.expect); bits=False: any bit-width."""
    q = args.quantize if quantized is None else quantized
    return expect('dambq', model_name(args), bits=(args.wgt_target if q else 32) if bits else None,
                  scheme='dambq' if q else 'fp32')


def identity_of(args, recipe, epoch, tuner):
    """ckpt['quantlab']: paper, script, model, bits (weight target; 32 = float), scheme, stage (the README stage:
    FP32, W4A4, W2.0A2.0), the run's recipe and how far it got (epoch of epochs, finished)."""
    q = tuner is not None
    w, x = tuner.compute_avg_bit() if q else (32, 32)
    return identity('dambq', model_name(args), bits=args.wgt_target if q else 32, scheme='dambq' if q else 'fp32',
                    stage=setting_of(args), recipe=recipe, script='dambq/main_cifar10.py',
                    act_bits=args.act_target if q else 32, w_avg_bit=w, x_avg_bit=x, epoch=int(epoch),
                    epochs=args.epochs, finished=epoch >= args.epochs)


def checkpoint_recipe(ckpt, ident):
    """The recipe a checkpoint was made with; a checkpoint of an unfinished run is a shortened recipe."""
    recipe = (ident or {}).get('recipe') or (ckpt.get('recipe') if isinstance(ckpt, dict) else None)
    if recipe is None or not ident or ident.get('finished', True):
        return recipe
    return dict(recipe, full=False, summary=f"{recipe.get('summary')}; unfinished run (checkpoint after "
                                            f"{ident.get('epoch')} of {ident.get('epochs')} epochs)")


def flags_for(ident, flag, evaluate=False):
    """The flags that fit a checkpoint, for the mismatch line."""
    if ident.get('scheme') == 'fp32':
        return ('--pretrained (a float model starts a quantized run with --quantize --pretrained)'
                if flag == '--resume' and not evaluate else 'no --quantize (it is a float model)')
    if flag == '--pretrained':
        return '--quantize --resume (a quantized model continues with --resume)'
    if 'bits' in ident:
        return (f"--quantize --wgt-target {ident['bits']:g} --act-target {ident.get('act_bits', ident['bits']):g}"
                + (' -a ' + str(ident['model']).replace('-optionA', ' --pretrained-option-a')
                   if ident.get('model') else ''))
    return ''


def is_quantized(sd):
    return any(k.endswith('bit_wgt') for k in sd)


def read_model(path, flag, want_quantized, args, exact=False):
    """(checkpoint, state dict, identity, note) of --pretrained/--resume: its identity must fit the flags (a float
    checkpoint where a quantized one is needed and vice versa, another model or, with exact, another setting is
    one line naming both); files without an identity are judged by their weights."""
    ckpt = load_checkpoint(path, what=f'{flag} checkpoint', flag=flag)
    fields = ('paper', 'model', 'bits', 'scheme') if exact else ('paper', 'model', 'scheme')
    ident, note = check_checkpoint(ckpt, path, wanted(args, want_quantized), flag=flag, fields=fields,
                                   suggest=lambda i: flags_for(i, flag, args.evaluate))
    sd = strip_module_prefix(extract_state_dict(ckpt))
    if is_quantized(sd) != want_quantized:
        have, need = ('quantized', 'float') if is_quantized(sd) else ('float', 'quantized')
        hint = {('--pretrained', True): 'a quantized model continues with --quantize --resume',
                ('--resume', False): 'pass --quantize to resume a quantized model',
                ('--resume', True): 'a float model starts a quantized run with --quantize --pretrained'}
        raise UserError(f"{flag} {path} is a {have} checkpoint but this run needs a {need} one; "
                        f"{hint.get((flag, is_quantized(sd)), 'check the flags')}")
    saved = ckpt.get('run', {}).get('arch') if isinstance(ckpt, dict) else None
    if saved is not None and saved != args.arch:
        raise UserError(f"{flag} {path} holds a {saved} but -a is {args.arch}")
    if exact and want_quantized and ident is not None and ident.get('act_bits') is not None \
            and abs(float(ident['act_bits']) - args.act_target) > 1e-9:
        raise UserError(f"{flag} {path} is a {ident.get('stage')} model (activation target {ident['act_bits']:g}) "
                        f"but the flags ask for {setting_of(args)}; pass {flags_for(ident, flag)}")
    return ckpt, sd, ident, note


def load_float(model, sd, path, option_a):
    """A float state dict into the float model; the option-A checkpoint lacks BN num_batches_tracked only."""
    if option_a:
        missing, _ = load_model_state(model, sd, strict=False, what=f'--pretrained {path}')
        bad = [k for k in missing if not k.endswith('num_batches_tracked')] + [k for k in sd if k not in
                                                                               model.state_dict()]
        if bad:
            raise UserError(f"--pretrained {path} is not an option-A CIFAR ResNet of this depth (e.g. {bad[0]})")
    else:
        load_model_state(model, sd, strict=True, what=f'--pretrained {path}')



def targets_of(setting):
    """'W2.0A2.0' -> '--wgt-target 2.0 --act-target 2.0'."""
    m = re.fullmatch(r'W([\d.]+)A([\d.]+)', str(setting))
    return f'--wgt-target {float(m[1])} --act-target {float(m[2])}' if m else 'the flags it was made with'


def check_resumed_bits(args, tuner, start):
    """Bits only decrease: a checkpoint below the targets would train and be recorded under a setting it never
    had (a W2.0A2.0 model resumed for W4A4). With -e the file's setting must be the flags' one."""
    w, x = tuner.compute_avg_bit()
    have = start.get('setting') or ('W4A4' if (w, x) == (4.0, 4.0) else f'W{w:.1f}A{x:.1f}')
    if args.evaluate and have != setting_of(args):
        raise UserError(f"--resume {start['path']} is a {have} model (average bits {w:.4f}/{x:.4f}) but the flags ask "
                        f"for {setting_of(args)}; evaluate it with --quantize {targets_of(have)}")
    if not args.evaluate and (w < args.wgt_target - 1e-9 or x < args.act_target - 1e-9):
        raise UserError(f"--resume {start['path']} is a {have} model (average bits {w:.4f}/{x:.4f}), below the "
                        f"targets of this {setting_of(args)} run: bits only decrease, so it would never be "
                        f"{setting_of(args)}; start from a model with more bits (e.g. W4A4) or lower the targets")


def run_root(args):
    return args.checkpoint_dir or os.path.join(runs.runs_root(), 'dambq')


def continue_path(args, root):
    """--continue [PATH]: the file, a run directory's latest.pth.tar, the --name run's, or the newest run of
    --expr-name under the run folder."""
    if args.continue_run:
        p = args.continue_run
        return os.path.join(p, LATEST) if os.path.isdir(p) else p
    if args.name:
        return os.path.join(root, args.name, LATEST)
    found = [p for p in glob.glob(os.path.join(glob.escape(root), glob.escape(args.expr_name) + '-*', LATEST))
             + [os.path.join(root, args.expr_name, LATEST)] if os.path.isfile(p)]
    if not found:
        raise UserError(f"--continue: {LATEST} not found in any run of --expr-name {args.expr_name} under {root}; "
                        f"pass --continue PATH")
    return max(found, key=os.path.getmtime)


def plan_run(args):
    """(run directory, --continue checkpoint or None), decided and checked before any data is read. A new run
    gets its own directory (common.runs.plan_run_dir); one that holds another run is refused unless --continue
    or --overwrite."""
    root = run_root(args)
    flag = '--checkpoint-dir' if args.checkpoint_dir else 'QUANTLAB_RUNS'
    check_writable_dir(root, flag)
    if args.continue_run is not None:
        path = continue_path(args, root)
        d = os.path.dirname(os.path.realpath(path))
        check_writable_dir(d, '--continue')
        return d, path
    if args.name and os.path.islink(os.path.join(root, args.name)):
        raise UserError(f"--name {args.name}: {os.path.join(root, args.name)} is the link to the latest finished "
                        f"run of that name, not a run directory; pass another --name")
    d = new_run_dir(args, root)
    if runs.holds_run(d) and not args.overwrite:
        raise UserError(f"{d} already holds a run: continue it with --continue, replace it with --overwrite, or "
                        f"pass another --name")
    return d, None


def new_run_dir(args, root):
    """A new run's directory, checked writable: <root>/<name>, or <root>/<expr-name>-<time> (-2, -3 ... when that
    exists), root being --checkpoint-dir or runs_root()/dambq. plan_run refuses a directory that holds a run with
    its own line (it names --continue), so the planner is asked with overwrite=True."""
    return runs.plan_run_dir('dambq', (args.expr_name,), name=args.name or None, overwrite=True,
                             root=root if args.checkpoint_dir else None, root_flag='--checkpoint-dir')


def check_continue(args, path):
    ckpt = load_checkpoint(path, what='--continue checkpoint', flag='--continue')
    if not isinstance(ckpt, dict) or ckpt.get('paper') != 'dambq' or 'optimizer' not in ckpt:
        raise UserError(f"--continue {path} is not a DAMBQ run checkpoint written by this main_cifar10.py")
    run = ckpt.get('run', {})
    diff = [k for k in RUN_KEYS if run.get(k) != getattr(args, k)]
    diff += [k for k in SCHEDULE_KEYS if k in run and run[k] != getattr(args, k)]  # older checkpoints: not stored
    if diff:
        k = diff[0]
        raise UserError(f"--continue {path} was written with {k}={run.get(k)!r} but this run has {k}="
                        f"{getattr(args, k)!r}; --continue repeats the run exactly: continue with the run's original "
                        f"flags, or start a new run from its weights with --resume")
    check_checkpoint(ckpt, path, wanted(args), flag='--continue', suggest=lambda i: flags_for(i, '--continue'))
    return ckpt



def finish_best(run_dir, recipe):
    """model_best.pth.tar was written mid-run: now that the run has finished, its identity says so."""
    path = os.path.join(run_dir, BEST)
    if os.path.exists(path):
        best = load_checkpoint(path, what='model_best checkpoint')
        if not best['quantlab'].get('finished'):
            best['quantlab'] = dict(best['quantlab'], finished=True, recipe=recipe)
            save_checkpoint(best, path)

