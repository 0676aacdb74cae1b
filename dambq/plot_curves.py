"""Per-epoch test accuracy and average bits of DAMBQ runs, drawn over the authors' curves.

    python plot_curves.py --runs ../runs/dambq --reference ../../shared/reference/dambq/logs --out curves.png

Reads the logs main_cifar10.py writes (<runs>/<expr-name>/log.txt) and the authors' train.log files
(<reference>/cifar10_resnet20_{w4a4,w2.0a2.0}/train.log), which share the format of the lines used here:
`Epoch: [e][i/n]`, `epoch: e  w_avg_bit: W  x_avg_bit: X.` and ` * Prec@1 P[ , Best Prec@1 B]` (the W4A4 log has
no Best part). A restarted run (the authors' W2.0A2.0 log begins with an aborted start; a --continue'd run
repeats the killed epoch) keeps the last value written for each epoch.
"""
import argparse
import os
import re

from common.errors import UserError, run_main

EPOCH_RE = re.compile(r'Epoch: \[(\d+)\]\[')
BITS_RE = re.compile(r'epoch: (\d+)\s+w_avg_bit: ([0-9.]+)\s+x_avg_bit: ([0-9.]+?)\.?\s*$')
PREC_RE = re.compile(r'\* Prec@1 ([0-9.]+)')
STAGES = (('float', 'cifar10_resnet20_float', None),
          ('W4A4', 'cifar10_resnet20_w4a4_', 'cifar10_resnet20_w4a4'),
          ('W2.0A2.0', 'cifar10_resnet20_w2.0a2.0', 'cifar10_resnet20_w2.0a2.0'))


def parse_log(path):
    """{epoch: {'prec1': P, 'w_avg_bit': W, 'x_avg_bit': X}} from a DAMBQ training log (keys present if logged)."""
    rows, cur = {}, None
    with open(path, errors='replace') as f:
        for line in f:
            m = EPOCH_RE.search(line)
            if m:
                cur = int(m.group(1))
                continue
            m = BITS_RE.search(line)
            if m:
                cur = int(m.group(1))
                rows.setdefault(cur, {}).update(w_avg_bit=float(m.group(2)), x_avg_bit=float(m.group(3)))
                continue
            m = PREC_RE.search(line)
            if m and cur is not None:
                rows.setdefault(cur, {})['prec1'] = float(m.group(1))
    return rows


def summary(rows):
    """Last-epoch and best accuracy, and the epochs at which the average bits last changed."""
    acc = {e: r['prec1'] for e, r in rows.items() if 'prec1' in r}
    out = {}
    if acc:
        last = max(acc)
        best = max(acc, key=lambda e: (acc[e], -e))
        out.update(last_epoch=last, last_prec1=acc[last], best_epoch=best, best_prec1=acc[best])
    for k in ('w_avg_bit', 'x_avg_bit'):
        seq = sorted((e, r[k]) for e, r in rows.items() if k in r)
        if seq:
            changed = [e for (e, v), (_, prev) in zip(seq[1:], seq[:-1]) if v != prev]
            out[k] = seq[-1][1]
            out[k + '_frozen_at'] = changed[-1] if changed else seq[0][0]
    return out


def summary_line(s):
    """summary() as people read it, epochs counted from 1 (the logs' epoch e is epoch e + 1):
    `last epoch 300: top-1 92.13, best 92.32 (epoch 235); bits: weights 2.0085 (final from epoch 38), ...`."""
    parts = []
    if 'last_epoch' in s:
        parts.append(f"last epoch {s['last_epoch'] + 1}: top-1 {s['last_prec1']:.2f}, best {s['best_prec1']:.2f} "
                     f"(epoch {s['best_epoch'] + 1})")
    bits = [f"{what} {s[k]:.4f} (final from epoch {s[k + '_frozen_at'] + 1})"
            for what, k in (('weights', 'w_avg_bit'), ('activations', 'x_avg_bit')) if k in s]
    if bits:
        parts.append('bits: ' + ', '.join(bits))
    return '; '.join(parts) or 'no epoch logged'


def plot(ours, theirs, path, note=''):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_acc, ax_bit) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {'float': 'tab:gray', 'W4A4': 'tab:blue', 'W2.0A2.0': 'tab:red'}
    for label, rows in theirs.items():
        e = sorted(k for k in rows if 'prec1' in rows[k])
        ax_acc.plot(e, [rows[k]['prec1'] for k in e], color=colors[label], alpha=0.35, lw=1,
                    label=f'{label} authors (10,000 test images)')
    for label, (rows, size) in ours.items():
        e = sorted(k for k in rows if 'prec1' in rows[k])
        ax_acc.plot(e, [rows[k]['prec1'] for k in e], color=colors[label], marker='o', ms=3, lw=1.5,
                    label=f'{label} this run ({size})')
    for label, rows in list(theirs.items()) + [(k, v[0]) for k, v in ours.items()]:
        mine = label in ours and rows is ours[label][0]
        for key, ls, what in (('w_avg_bit', '-', 'weights'), ('x_avg_bit', '--', 'activations')):
            e = sorted(k for k in rows if key in rows[k])
            if e:
                ax_bit.plot(e, [rows[k][key] for k in e], ls=ls, color=colors[label], alpha=1 if mine else 0.35,
                            marker='o' if mine else None, ms=3,
                            label=f"{label} {'this run' if mine else 'authors'}: {what}")
    ax_acc.set(xlabel='epoch', ylabel='top-1 test accuracy (%)', title='CIFAR-10 ResNet-20: accuracy per epoch')
    ax_bit.set(xlabel='epoch', ylabel='average bits', title='average bits (LBA)')
    ax_acc.legend(fontsize=7)
    ax_bit.legend(fontsize=7)
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', required=True, help='the --checkpoint-dir of the runs (holds <expr-name>/log.txt)')
    p.add_argument('--reference', default=None, help="folder of the authors' logs (skipped when absent)")
    p.add_argument('--out', required=True, help='PNG to write')
    p.add_argument('--note', default='', help='a title line (e.g. that the runs were shortened)')
    p.add_argument('--print-dicts', action='store_true',
                   help='also print each summary as a Python dict (0-based epochs of the logs), for scripts')
    args = p.parse_args(argv)
    ours, theirs = {}, {}

    def say(whose, label, s):
        print(f'{whose:9s} {label:9s} {summary_line(s)}')
        if args.print_dicts:
            print(f'{whose:9s} {label:9s} {s}')

    for label, run, ref in STAGES:
        log = os.path.join(args.runs, run, 'log.txt')
        if os.path.isfile(log):
            rows = parse_log(log)
            size = next((m.group(1) for m in re.finditer(r'test on (.+?) images', open(log).read())), 'test set')
            ours[label] = (rows, f'{size} images')
            say('this run', label, summary(rows))
        if ref and args.reference:
            path = os.path.join(args.reference, ref, 'train.log')
            if os.path.isfile(path):
                theirs[label] = parse_log(path)
                say('authors', label, summary(theirs[label]))
    if not ours and not theirs:
        raise UserError(f"no logs found under {args.runs} (nor {args.reference}); run main_cifar10.py first")
    print(f'-> {plot(ours, theirs, args.out, args.note)}')


if __name__ == '__main__':
    run_main(main)
