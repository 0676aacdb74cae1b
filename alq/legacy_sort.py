"""PyTorch 1.3's CPU sort, written out so its order among equal keys can be reproduced on any torch.

The original ranks the pruning candidates of all layers with `torch.argsort(importance_list[:, -1])`, and that
list is a CPU tensor (built by `torch.tensor([...])` without a device). In PyTorch 1.3 a CPU argsort is
`at::legacy::cpu::_th_sort` -> `THTensor_(sort)` -> `THTensor_(quicksortascend)` in
aten/src/TH/generic/THTensorMoreMath.cpp (pytorch/pytorch; the routine dates from 2013 and reads the same in the
1.3-era file, with its BUILD_NAMEDTENSOR guards, and in a later one). Its scheme, reimplemented from that reading:

  * a key `x` goes after `y` when `x > y`, or when `x` is NaN and `y` is not (NaNs last, equal among themselves);
  * iterative quicksort (M_SMALL = 10): the whole array is partitioned when it holds 12 keys or more, after
    that every part of 11 keys or more; partitioning a range [L, R]:
    the middle key ((L + R) >> 1) is swapped to L + 1; three compare-and-swaps order (L + 1, R), (L, R),
    (L + 1, L) so that key[L + 1] <= key[L] <= key[R]; the pivot is key[L];
    Sedgewick-style partition: i runs up from L + 2 while pivot > key[i], j runs down from R - 1 while
    key[j] > pivot (both stop on keys equal to the pivot, and swap them), until j < i; the pivot is swapped to j;
    left part [L, j - 1], right part [i, R]; parts of at most 10 keys are left alone; when both are larger the
    larger is pushed on a stack and the smaller continues; when both are small the stack is popped;
  * one right-to-left insertion pass over the whole array finishes the small parts (it moves a key right past
    strictly smaller keys only).

Equal keys are therefore scrambled by the swaps of the partition: from 12 keys up the result is not the stable
order (11 keys or fewer go straight to the insertion pass, which is stable).
"""
import torch

M_SMALL = 10  # as in THTensorMoreMath.cpp: parts of up to this many keys are left to the insertion pass


def _comparable(keys):
    """Python keys for which `a > b` is the original's GT_OR_NAN(a, b): NaN above everything, NaNs equal."""
    keys = [float(k) for k in keys]
    if any(k != k for k in keys):
        return [(1, 0.0) if k != k else (0, k) for k in keys]
    return keys


def th13_argsort(keys):
    """Indices that sort `keys` ascending, in exactly the order PyTorch 1.3's CPU `torch.argsort` returns."""
    a = _comparable(keys)
    n = len(a)
    ix = list(range(n))
    stack = []
    lo, hi = 0, n - 1
    done = hi <= M_SMALL
    while not done:
        # median of three: the middle key goes to lo + 1, then key[lo + 1] <= key[lo] <= key[hi]
        mid = (lo + hi) >> 1
        a[mid], a[lo + 1] = a[lo + 1], a[mid]
        ix[mid], ix[lo + 1] = ix[lo + 1], ix[mid]
        for p, q in ((lo + 1, hi), (lo, hi), (lo + 1, lo)):
            if a[p] > a[q]:
                a[p], a[q] = a[q], a[p]
                ix[p], ix[q] = ix[q], ix[p]
        pivot = a[lo]
        i, j = lo + 1, hi
        while True:  # key[hi] >= pivot and key[lo + 1] <= pivot are the sentinels of the two scans
            i += 1
            while pivot > a[i]:
                i += 1
            j -= 1
            while a[j] > pivot:
                j -= 1
            if j < i:
                break
            a[i], a[j] = a[j], a[i]
            ix[i], ix[j] = ix[j], ix[i]
        a[lo], a[j] = a[j], a[lo]
        ix[lo], ix[j] = ix[j], ix[lo]
        n_left, n_right = j - lo, hi - i + 1  # parts [lo, j - 1] and [i, hi]
        if n_left <= M_SMALL and n_right <= M_SMALL:
            if stack:
                lo, hi = stack.pop()
            else:
                done = True
        elif n_left <= M_SMALL or n_right <= M_SMALL:  # go on with the large part
            if n_left > n_right:
                hi = j - 1
            else:
                lo = i
        elif n_left > n_right:  # push the larger part, go on with the smaller
            stack.append((lo, j - 1))
            lo = i
        else:
            stack.append((i, hi))
            hi = j - 1
    # insertion pass from the right: a key moves right past the keys strictly smaller than it
    for i in range(n - 2, -1, -1):
        if a[i] > a[i + 1]:
            key, idx = a[i], ix[i]
            j = i + 1
            while j < n and key > a[j]:
                a[j - 1], ix[j - 1] = a[j], ix[j]
                j += 1
            a[j - 1], ix[j - 1] = key, idx
    return ix


def legacy_argsort(values):
    """`th13_argsort` of a 1-D tensor, as an int64 tensor on the input's device."""
    if values.dim() != 1:
        raise ValueError(f"legacy_argsort sorts a 1-D tensor, got shape {tuple(values.shape)}")
    order = th13_argsort(values.detach().cpu().tolist())
    return torch.tensor(order, dtype=torch.int64, device=values.device)
