"""DAMBQ runs (dambq/main_cifar10.py): checkpoint identity and one-line mismatches, one run layout with
links from the original's <checkpoint-dir>/<expr-name>, checks before any data is read, honest records, and an
interrupt inside an epoch that --continue resumes exactly. Tiny generated CIFAR-10, in-process."""
import glob
import json
import os
import signal
import stat

import pytest
import torch

import dambq.main_cifar10 as dm
from common import interrupt, runs
from common.checkpoint import save_checkpoint, training_state
from common.errors import UserError, run_main
from common.identity import identity
from dambq.model import QuantTune
from dambq.model.cifar10.resnet import resnet20
from test_dambq_main import tiny_cifar  # noqa: F401  (fixture: 10 classes x 4 train / 2 test PNGs)


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_cifar):  # noqa: F811
    monkeypatch.setenv('QUANTLAB_RUNS', str(tmp_path / 'runs'))
    monkeypatch.chdir(tmp_path)
    yield ['-a', 'resnet20', '--data', tiny_cifar, '-b', '8', '-j', '0', '-p', '1', '--seed', '0']
    runs.end_run()


def records():
    with open(os.path.join(os.environ['RESULTS_DIR'], 'dambq.jsonl')) as f:
        return [json.loads(line) for line in f]


def quantized_checkpoint(path, wgt, act, lower=0, with_identity=True):
    """A resnet20 swapped to DAMBQ layers, `lower` weight/activation groups of the first QuantConv2d one bit
    below 4, saved like main_cifar10.py does (identity of a W{wgt}A{act} run) or bare."""
    m = resnet20()
    tuner = QuantTune(m, wgt, act)
    layer = tuner.layers[0][1]
    layer.bit_wgt[:lower] = 3
    layer.bit_act[:lower] = 3
    ident = identity('dambq', 'resnet20', bits=wgt, scheme='dambq', stage='W4A4' if wgt == act == 4 else
                     f'W{wgt:.1f}A{act:.1f}', script='dambq/main_cifar10.py', act_bits=act, epoch=1, epochs=1,
                     finished=True,
        recipe={'full': False, 'summary': 'shortened: test'})
    state = training_state(m, epoch=1, best=0.0, **({'quantlab': ident} if with_identity else {}))
    save_checkpoint(state, path)
    return str(path)


def float_checkpoint(path, **ident):
    m = resnet20()
    extra = {'quantlab': identity(scheme='fp32', bits=32, stage='FP32', script='x', **ident)} if ident else {}
    save_checkpoint(training_state(m, epoch=1, best=0.0, **extra), path)
    return str(path)


def expect_error(argv, *words):
    with pytest.raises(UserError) as e:
        dm.main(argv)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    return str(e.value)


# ----------------------------------------------------------------------------- checkpoint identity

def test_checkpoints_carry_identity_and_mismatches_stop_with_one_line(env, tmp_path, monkeypatch):
    # a float run: latest and best carry paper, script, model, bits/scheme, stage, recipe, and whether it finished
    dm.main(env + ['--expr-name', 'fp', '--name', 'fp', '--epochs', '1', '--max-iters', '1'])
    run = tmp_path / 'runs' / 'dambq' / 'fp'
    for f in ('latest.pth.tar', 'model_best.pth.tar'):
        q = torch.load(run / f, weights_only=True)['quantlab']
        assert (q['paper'], q['script'], q['model'], q['bits'], q['scheme'], q['stage']) == \
            ('dambq', 'dambq/main_cifar10.py', 'resnet20', 32, 'fp32', 'FP32'), f
        assert q['finished'] is True and 'epochs 1 of 300' in q['recipe']['summary']
    fp = str(run / 'latest.pth.tar')
    w4 = quantized_checkpoint(tmp_path / 'w4.pth.tar', 4.0, 4.0)
    w2 = quantized_checkpoint(tmp_path / 'w2.pth.tar', 2.0, 2.0, lower=16)
    apot = float_checkpoint(tmp_path / 'apot.pth.tar', paper='apot', model='resnet20')

    # every case stops on the checkpoint, before the data (which does not exist) is read
    monkeypatch.setattr(dm, 'data_loaders', lambda *a: pytest.fail('data read before the checkpoint check'))
    q = ['-a', 'resnet20', '--quantize', '--data', 'nowhere', '-j', '0']
    # a W4A4 checkpoint evaluated under the README's W2.0A2.0 flags: names both, says which flags fit
    msg = expect_error(q + ['-e', '--resume', w4], '4-bit dambq (stage W4A4', 'ask for dambq resnet20 2-bit',
                       '--wgt-target 4 --act-target 4')
    assert '\n' not in msg
    expect_error(q + ['-e', '--resume', w4, '--wgt-target', '4.0', '--act-target', '2.0'],
                 'is a W4A4 model (activation target 4)', 'ask for W4.0A2.0')
    # a model whose bits are already below the targets cannot become W4A4 (bits only decrease)
    expect_error(q + ['--resume', w2, '--wgt-target', '4.0', '--act-target', '4.0'], 'bits only decrease',
                 'would never be W4A4')
    # a float checkpoint where a quantized one is needed, and the reverse
    expect_error(q + ['-e', '--resume', fp], 'is dambq resnet20 FP32', 'scheme', 'no --quantize')
    expect_error(q + ['--resume', fp], 'is dambq resnet20 FP32', 'pass --pretrained')
    expect_error(['-a', 'resnet20', '--data', 'nowhere', '-e', '--resume', w4], 'is dambq resnet20 4-bit dambq',
                 'ask for dambq resnet20 FP32')
    expect_error(q + ['--pretrained', w4], 'is dambq resnet20 4-bit dambq', '--quantize --resume')
    # another paper's checkpoint, and another architecture
    expect_error(q + ['--pretrained', apot], 'is apot resnet20 FP32', 'paper differ')
    expect_error(q + ['-a', 'resnet32', '--pretrained', fp], 'is dambq resnet20 FP32', 'model differ')
    # -e --quantize --pretrained would have recorded an untrained quantization of a float model as W4A4
    expect_error(q + ['-e', '--pretrained', fp], '-e --quantize evaluates a quantized checkpoint')
    # files without an identity (older or third-party) are judged by what they hold
    bare = quantized_checkpoint(tmp_path / 'bare.pth.tar', 4.0, 4.0, with_identity=False)
    expect_error(q + ['-e', '--resume', bare], 'is a W4A4 model (average bits 4.0000/4.0000)',
                 'ask for W2.0A2.0', '--quantize --wgt-target 4.0 --act-target 4.0')


def test_evaluation_records_the_checkpoints_recipe_seed_and_note(env, tmp_path):
    w4 = quantized_checkpoint(tmp_path / 'w4.pth.tar', 4.0, 4.0)
    bare = quantized_checkpoint(tmp_path / 'bare.pth.tar', 4.0, 4.0, with_identity=False)
    ev = env[:-2] + ['--quantize', '-e', '--wgt-target', '4', '--act-target', '4']
    dm.main(ev + ['--resume', w4])
    dm.main(ev + ['--resume', bare])
    own, third = records()
    assert own['setting'] == third['setting'] == 'W4A4' and own['split'] == 'test' and own['n_samples'] == 20
    assert own['recipe']['summary'] == 'shortened: test' and own['run_dir'] is None
    assert isinstance(own['seed'], int) and isinstance(third['seed'], int)       # seed always set and recorded
    assert third['recipe'] is None and third['extra']['checkpoint_note'].startswith('unknown third-party')


# ----------------------------------------------------------------------------- checks before work

@pytest.mark.parametrize('argv, needle', [
    (['-b', '0'], '-b/--batch-size 0'), (['--lr', '-0.1'], '--lr -0.1'), (['--momentum', '1.5'], '--momentum 1.5'),
    (['--wd', '-1'], '--weight-decay -1'), (['-j', '-1'], '-j/--workers -1'), (['-p', '0'], '-p/--print-freq 0'),
    (['--epochs', '0'], '--epochs 0'), (['--start-epoch', '3', '--epochs', '3'], '--start-epoch 3'),
    (['--save-every', '0'], '--save-every 0'), (['--max-iters', '0'], '--max-iters 0'), (['--seed', '-1'], '--seed -1'),
    (['--name', 'a/b'], 'plain directory name'), (['--continue', '--overwrite'], 'only one of them'),
    (['--checkpoint-dir', 'afile/runs'], '--checkpoint-dir afile/runs cannot be created: '),
])
def test_bad_flags_stop_before_any_data_is_read(argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'afile').write_text('x')
    monkeypatch.setattr(dm, 'data_loaders', lambda *a: pytest.fail('data read before the checks'))
    monkeypatch.setattr(dm, 'build', lambda *a: pytest.fail('model built before the checks'))
    with pytest.raises(UserError, match=needle.replace('(', r'\(').replace('+', r'\+')):
        dm.main(argv + ['--data', 'nowhere'])
    assert not os.path.exists(tmp_path / 'runs')                   # no run directory was made


def test_unwritable_results_dir_stops_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / 'afile').write_text('x')
    monkeypatch.setenv('RESULTS_DIR', str(tmp_path / 'afile' / 'results'))
    monkeypatch.setattr(dm, 'data_loaders', lambda *a: pytest.fail('data read before the checks'))
    with pytest.raises(SystemExit) as e:
        run_main(dm.main, ['--data', 'nowhere'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'RESULTS_DIR' in err and 'afile is a file' in err


# ----------------------------------------------------------------------------- run layout, no overwrite

def test_runs_never_overwrite_each_other_and_the_documented_path_links_the_latest(env, tmp_path):
    base = env + ['--expr-name', 'cifar10_resnet20_float', '--epochs', '1', '--max-iters', '1']
    root = tmp_path / 'runs' / 'dambq'
    dm.main(base)
    dm.main(base)                                   # the documented command twice: two runs, nothing replaced
    first, second = sorted(glob.glob(str(root / 'cifar10_resnet20_float-*')))
    assert os.path.realpath(root / 'cifar10_resnet20_float') == second
    assert os.path.exists(root / 'cifar10_resnet20_float' / 'latest.pth.tar')     # the README's input path
    for d in (first, second):
        assert {'manifest.json', 'log.txt', 'latest.pth.tar', 'model_best.pth.tar', 'records.jsonl', 'tb'} <= \
            set(os.listdir(d))
        assert len(os.listdir(os.path.join(d, 'tb'))) == 1                          # one event file per run
    # --name: a second run there is refused (exit 2, files untouched); --overwrite replaces it
    dm.main(base + ['--name', 'a'])
    stamps = {f: os.path.getmtime(root / 'a' / f) for f in ('latest.pth.tar', 'manifest.json')}
    with pytest.raises(UserError, match='already holds a run: continue it with --continue, replace it with '
                                        '--overwrite'):
        dm.main(base + ['--name', 'a'])
    assert stamps == {f: os.path.getmtime(root / 'a' / f) for f in stamps}
    with pytest.raises(UserError, match='is the link to the latest finished run'):
        dm.main(base + ['--name', 'cifar10_resnet20_float', '--overwrite'])
    old = os.umask(0o022)
    try:
        dm.main(base + ['--name', 'a', '--overwrite'])
    finally:
        os.umask(old)
    assert len(os.listdir(root / 'a' / 'tb')) == 1 and 'invocations' not in json.load(open(root / 'a' /
                                                                                            'manifest.json'))
    assert stat.S_IMODE(os.stat(root / 'a' / 'latest.pth.tar').st_mode) == 0o644
    # records: recipe (shortened, and how), data (split, size), seed and run directory
    recs = [json.loads(line) for line in open(root / 'a' / 'records.jsonl')]
    assert [r['metric'] for r in recs] == ['top1', 'top1_best']
    r = recs[0]
    assert r['run_dir'] == str(root / 'a') and r['seed'] == 0 and (r['split'], r['n_samples']) == ('test', 20)
    assert r['recipe']['full'] is False
    assert r['recipe']['summary'] == 'shortened: epochs 1 of 300; train images 40 of 50000; max_iters 1'


@pytest.mark.parametrize('where', ['QUANTLAB_RUNS', '--checkpoint-dir'])
def test_runs_started_in_the_same_second_get_their_own_directories(where, tmp_path, monkeypatch):
    """The run directory is planned by common.runs.plan_run_dir, also under --checkpoint-dir (another folder than
    runs_root()/dambq): a second run of the same --expr-name in the same second gets <name>-<time>-2, a third -3;
    --name is taken as given and refused when it holds a run."""
    from dambq.checkpoints import plan_run
    monkeypatch.setenv('QUANTLAB_RUNS', str(tmp_path / 'qruns'))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs.time, 'strftime', lambda fmt, *a: '20260101-120000')
    flags, root = ((['--checkpoint-dir', 'cd'], 'cd') if where == '--checkpoint-dir' else
                   ([], str(tmp_path / 'qruns' / 'dambq')))
    argv = ['--expr-name', 'e'] + flags
    made = []
    for _ in range(3):
        d, cont = plan_run(dm.parse_args(argv))
        assert cont is None and not os.path.exists(d)
        os.makedirs(d)
        open(os.path.join(d, 'manifest.json'), 'w').close()
        made.append(d)
    stamp = os.path.join(root, 'e-20260101-120000')
    assert made == [stamp, f'{stamp}-2', f'{stamp}-3']
    assert plan_run(dm.parse_args(argv + ['--name', 'n'])) == (os.path.join(root, 'n'), None)
    with pytest.raises(UserError, match=r'e-20260101-120000 already holds a run: continue it with --continue'):
        plan_run(dm.parse_args(argv + ['--name', 'e-20260101-120000']))


# ----------------------------------------------------------------------------- interrupt and exact resume

def test_sigterm_inside_the_first_epoch_saves_and_continue_is_exact(env, tmp_path, monkeypatch, capsys):
    """SIGTERM during batch 2 of epoch 0 of a W2.0A2.0 run (LBA errors accumulating, random crops and flips,
    shuffled batches): the checkpoint holds epoch 0 batch 2, --continue finishes the run, and weights, bits,
    optimizer and history equal an uninterrupted run's. Same process, same machine, same thread count: every
    operation repeats bit for bit, so exact equality is the right test (never across machines)."""
    fp = float_checkpoint(tmp_path / 'fp.pth.tar')        # no identity: a third-party start model, noted
    w2 = env + ['--quantize', '--pretrained', fp, '--epochs', '2', '--max-iters', '3', '--duration', '0', '1']
    dm.main(w2 + ['--name', 'whole'])
    whole = torch.load(tmp_path / 'runs' / 'dambq' / 'whole' / 'latest.pth.tar', weights_only=True)
    capsys.readouterr()

    real_progress = dm.progress

    def signalled(iterable, desc=None, total=None):      # a real SIGTERM while batch 2 (index 1) trains
        for i, item in enumerate(real_progress(iterable, desc=desc, total=total)):
            if desc == 'epoch 1/2' and i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield item
    monkeypatch.setattr(dm, 'progress', signalled)
    with pytest.raises(SystemExit) as e:
        run_main(dm.main, w2 + ['--name', 'cut'])
    err = capsys.readouterr().err
    assert e.value.code == 128 + signal.SIGTERM
    assert 'interrupted: epoch 1/2 batch 2: resumable checkpoint saved to' in err and '--continue' in err
    run = tmp_path / 'runs' / 'dambq' / 'cut'
    cut = torch.load(run / 'latest.pth.tar', weights_only=True)
    assert (cut['epoch'], cut['batch'], cut['interrupted']) == (0, 2, True)
    assert cut['quantlab']['finished'] is False and cut['quantlab']['stage'] == 'W2.0A2.0'
    assert any(e.abs().sum() > 0 for e in cut['tuner']['w_err'])       # the LBA errors of batches 1-2 kept
    assert not [f for f in os.listdir(run) if f.endswith('.tmp')]        # written atomically
    assert not os.path.exists(run / 'tb') or all(os.path.getsize(f) > 0 for f in glob.glob(str(run / 'tb' / '*')))
    # an unfinished checkpoint is recorded as shortened when evaluated, whatever its recipe
    dm.main(env[:-2] + ['--quantize', '-e', '--resume', str(run / 'latest.pth.tar')])
    assert 'unfinished run (checkpoint after 0 of 2 epochs)' in records()[-1]['recipe']['summary']

    monkeypatch.setattr(dm, 'progress', real_progress)
    for flag, value, key in (('--lr', '0.1', 'lr'), ('--epochs', '3', 'epochs'), ('-b', '4', 'batch_size')):
        with pytest.raises(UserError, match=f"was written with {key}=.* repeats the run exactly"):
            dm.main(w2 + ['--name', 'cut', '--continue', flag, value])           # a later flag wins in argparse
    dm.main(w2 + ['--name', 'cut', '--continue'])
    out = capsys.readouterr().out
    assert 'continue' in out and 'at epoch 1/2 batch 3' in out and 'Epoch: [0][0/3]' not in out
    done = torch.load(run / 'latest.pth.tar', weights_only=True)
    assert done['epoch'] == 2 and 'batch' not in done
    for k, v in whole['state_dict'].items():
        assert torch.equal(v, done['state_dict'][k]), k
    assert done['history'] == whole['history'] and done['tuner'] == whole['tuner']
    assert done['best_prec1'] == whole['best_prec1']
    for k, st in whole['optimizer']['state'].items():
        assert torch.equal(st['momentum_buffer'], done['optimizer']['state'][k]['momentum_buffer']), k
    assert len(os.listdir(run / 'tb')) == 1           # the interrupted call logged no scalar: one event file
    assert json.load(open(run / 'manifest.json'))['invocations']             # the continuation is appended


def test_final_bits_are_one_console_line_and_the_per_layer_table_is_behind_print_bits(env, tmp_path, capsys):
    """At the end of a quantized run the console gets one summary line (average bits and groups per bit-width,
    the numbers of the checkpoint); the 20 per-layer lines go to log.txt, and to the console with --print-bits."""
    fp = float_checkpoint(tmp_path / 'fp.pth.tar')
    w2 = env + ['--quantize', '--pretrained', fp, '--epochs', '1', '--max-iters', '1', '--duration', '0', '1']
    tables = {}
    for name, extra in (('quiet', []), ('loud', ['--print-bits'])):
        dm.main(w2 + ['--name', name] + extra)
        out = capsys.readouterr().out.splitlines()
        run = tmp_path / 'runs' / 'dambq' / name
        logged = [line.split(' ', 2)[2] for line in (run / 'log.txt').read_text().splitlines() if ' bw_avg:' in line]
        shown = [line for line in out if ' bw_avg:' in line]
        assert len(logged) == 20 and logged[0].startswith('layer1.0.conv1 bw_avg:4.00 ba_avg:')
        assert shown == (logged if extra else [])
        [summary] = [line for line in out if line.startswith('==> final bits: ')]
        assert summary.endswith('(per-layer table in log.txt; --print-bits prints it)') != bool(extra)
        assert not [line for line in out if line.startswith('{') or "': " in line]       # no raw dict dumps
        sd = torch.load(run / 'latest.pth.tar', weights_only=True)['state_dict']
        for what, key, avg in (('weights', 'bit_wgt', 'avg_bits_wgt'), ('activations', 'bit_act', 'avg_bits_act')):
            bits = torch.cat([v for k, v in sd.items() if k.endswith(key) and not k.startswith(('conv1.', 'fc.'))])
            values, counts = torch.unique(bits.long(), return_counts=True)
            hist = ', '.join(f'{c} at {v}' for v, c in sorted(zip(values.tolist(), counts.tolist()), reverse=True))
            value = [r['value'] for r in records() if r['metric'] == avg][-1]
            assert f"{what} {value:.4f} avg ({hist.replace(' at ', ' groups at ', 1)})" in summary
        tables[name] = logged
    assert [t.split(' aw_min')[0] for t in tables['quiet']] == [t.split(' aw_min')[0] for t in tables['loud']]
    # the evaluation of a quantized checkpoint: its record line, the averages, the summary, the table on request
    dm.main(env[:-2] + ['--quantize', '-e', '--resume', str(tmp_path / 'runs' / 'dambq' / 'loud' / 'latest.pth.tar'),
                        '--print-bits'])
    out = capsys.readouterr().out
    assert out.count(' bw_avg:') == 20 and '==> final bits: weights ' in out
    [shown] = [line.rsplit(' in ', 1)[1] for line in out.splitlines() if line.startswith('=> recorded resnet20 '
                                                                                        'W2.0A2.0 top1 ')]
    assert os.path.samefile(shown, os.path.join(os.environ['RESULTS_DIR'], 'dambq.jsonl'))


def test_tensorboard_tags_and_steps(env, tmp_path, monkeypatch, capsys):
    """The project's tag scheme, step = the 1-based epoch just finished; the bits only for a quantized run; the
    LBA lines count epochs from 1 too."""
    from common.runlog import RunLog
    seen, real = [], RunLog.scalar

    def spy(self, tag, value, step):
        seen.append((tag, step))
        return real(self, tag, value, step)
    monkeypatch.setattr(RunLog, 'scalar', spy)
    fp = float_checkpoint(tmp_path / 'fp.pth.tar')
    per_epoch = ['train/loss', 'train/top1', 'val/top1', 'val/loss', 'train/lr']
    quantized = (['--quantize', '--pretrained', fp], ['bits/w_avg', 'bits/x_avg'] + per_epoch)
    for extra, tags in (([], per_epoch), quantized):
        seen.clear()
        dm.main(env + ['--epochs', '2', '--max-iters', '1', '--name', f'tb{len(extra)}'] + extra)
        assert seen == [(t, e) for e in (1, 2) for t in tags]
    out = capsys.readouterr().out
    assert 'LBA after epoch 1/2: ratio 0.01000; act: 6 groups -1 bit' in out and 'LBA after epoch 2/2: ratio ' in out


def test_start_lines_and_per_epoch_lines_when_redirected(env, capsys):
    dm.main(env + ['--epochs', '2', '--max-iters', '2', '--name', 'p'])
    out = capsys.readouterr().out                      # captured: not a terminal, no progress bar
    run = os.path.join(os.environ['QUANTLAB_RUNS'], 'dambq', 'p')
    assert f'=> device {dm.get_device()}, seed 0, run directory {run}' in out
    assert '=> recipe: shortened: epochs 2 of 300' in out and '=> whole-run estimate:' in out
    assert '=> epoch 1/2: Prec@1' in out and '=> epoch 2/2: Prec@1' in out and 'ETA' in out
    assert ', epochs 1-2 of 2, output ' in out and 'epochs 0..' not in out


def test_interrupt_during_evaluation_stops_after_the_epoch(env, monkeypatch, capsys):
    pending = {'n': 0}

    def requested():            # the signal arrives after the last training batch, during the test pass
        pending['n'] += 1
        return signal.SIGINT if pending['n'] > 2 else None
    monkeypatch.setattr(interrupt, 'requested', requested)
    with pytest.raises(SystemExit) as e:
        run_main(dm.main, env + ['--epochs', '3', '--max-iters', '2', '--name', 'v'])
    assert e.value.code == 130 and 'after epoch 1/3: resumable checkpoint saved' in capsys.readouterr().err
    ck = torch.load(os.path.join(os.environ['QUANTLAB_RUNS'], 'dambq', 'v', 'latest.pth.tar'), weights_only=True)
    assert ck['epoch'] == 1 and 'batch' not in ck
