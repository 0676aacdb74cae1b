"""AverageMeter, top-k accuracy and a tqdm progress display, as in pytorch/examples imagenet."""
import sys

import torch
from tqdm import tqdm


class AverageMeter:
    """Keeps the latest value, sum, count and running average of a quantity."""

    def __init__(self, name="", fmt=":f"):
        self.name, self.fmt = name, fmt
        self.reset()

    def reset(self):
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        val = float(val)
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self):
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent for a batch of logits (reshape, not view: works on modern torch)."""
    with torch.no_grad():
        maxk = min(max(topk), output.size(1))
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.reshape(1, -1).expand_as(pred.t()))
        return [correct[:min(k, maxk)].reshape(-1).float().sum().mul_(100.0 / batch_size) for k in topk]


def progress(iterable, desc=None, total=None, leave=False, **kw):
    """A tqdm bar on stderr; silent when stderr is not a terminal (logs stay clean)."""
    return tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr,
                disable=None if "disable" not in kw else kw.pop("disable"), dynamic_ncols=True, **kw)
