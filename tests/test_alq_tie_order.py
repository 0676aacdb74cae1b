"""ALQ cross-layer pruning rank: the original's tie order (PyTorch 1.3 CPU quicksort, alq/legacy_sort.py) behind
--stable_tie_order, and the original's order as the default."""
import random

import pytest
import torch

import alq_import

A = alq_import.load()
bn, opt_mod, train = A.binarynet, A.myoptimizer, A.train

ls = A.legacy_sort


def _stable(keys):
    return torch.argsort(torch.tensor(keys, dtype=torch.float64), stable=True).tolist()


# --------------------------------------------------------------------------------------------- the sort itself

@pytest.mark.parametrize("n", [0, 1, 2, 11, 12, 13, 23, 24, 100, 1000, 3001])
def test_distinct_keys_sort_as_any_sort(n):
    g = torch.Generator().manual_seed(n)
    keys = torch.randperm(max(n, 1), generator=g)[:n].double().mul(0.37).sub(11.0).tolist()  # distinct
    assert ls.th13_argsort(keys) == _stable(keys)


def test_eleven_keys_or_fewer_keep_the_stable_order():
    # 11 keys skip the quicksort (R - L = 10 <= M_SMALL) and the insertion pass only moves past smaller keys
    for keys in ([0.0] * 11, [1.0, 0.0, 1.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]):
        assert ls.th13_argsort(keys) == _stable(keys)


def test_tied_keys_come_out_sorted_and_as_a_permutation():
    rng = random.Random(3)
    for n in list(range(40)) + [100, 257, 1000]:
        keys = [rng.choice([-1.0, 0.0, -0.0, 0.5, 2.0]) for _ in range(n)]
        order = ls.th13_argsort(keys)
        assert sorted(order) == list(range(n))
        assert all(keys[a] <= keys[b] for a, b in zip(order, order[1:]))


def test_nan_goes_last_as_in_torch():
    keys = [0.5, float("nan"), -1.0, 3.0, 0.0, 2.0, float("-inf"), 1.0, float("inf"), -2.0, 4.0, 0.25, 7.0]
    assert ls.th13_argsort(keys) == torch.argsort(torch.tensor(keys), stable=True).tolist()
    order = ls.th13_argsort([float("nan"), 1.0] * 7)
    assert sorted(order[:7]) == [1, 3, 5, 7, 9, 11, 13]  # every 1.0 before every NaN


# Golden permutations, traced by hand through THTensor_(quicksortascend) (PyTorch 1.3,
# aten/src/TH/generic/THTensorMoreMath.cpp). Notation: position:index, one partition per paragraph.

def test_golden_twelve_equal_keys():
    # 12 zeros, L=0 R=11: mid 5 swapped to 1 -> [0,5,2,3,...,1(at 5),...,11]; the three compares swap nothing
    # (all equal); pivot 0. Both scans stop on every key equal to the pivot, so they swap (2,10) (3,9) (4,8)
    # (5,7), meet at 6 (swap with itself), cross (i=7, j=5); pivot swapped to 5:
    # [7,5,10,9,8,0,6,1,4,3,2,11]. Parts [0,4] and [7,11] are both small, the stack is empty: done; the
    # insertion pass moves nothing (no key is greater than its right neighbour).
    assert ls.th13_argsort([0.0] * 12) == [7, 5, 10, 9, 8, 0, 6, 1, 4, 3, 2, 11]
    assert _stable([0.0] * 12) == list(range(12))


def test_golden_mixed_keys_with_ties():
    keys = [3, 0, 0, 1, 0, 0, 0, 2, 0, -1, 0, 0, 1]
    # L=0 R=12: mid 6 swapped to 1. key[1]=0 > key[12]=1? no. key[0]=3 > key[12]=1? yes: swap 0,12 (0:12, 12:0).
    # key[1]=0 > key[0]=1? no. Pivot 1 (index 12).
    # i stops at 3 (index 3, key 1 = pivot), j at 11 (key 0): swap -> 3:11, 11:3.
    # i stops at 7 (index 7, key 2), j at 10 (key 0): swap -> 7:10, 10:7.
    # i stops at 10 (key 2), j at 9 (index 9, key -1): crossed. Pivot swapped to 9 -> 0:9, 9:12.
    # array: [9,6,2,11,4,5,1,10,8,12,7,3,0]; parts [0,8] (9 keys) and [10,12] (3 keys): done.
    # insertion pass from the right: position 10 (index 7, key 2) > position 11 (index 3, key 1): index 7 moves
    # right past it and stops before index 0 (key 3). Nothing else is out of order.
    expect = [9, 6, 2, 11, 4, 5, 1, 10, 8, 12, 3, 7, 0]
    assert ls.th13_argsort(keys) == expect
    stable = _stable(keys)
    assert stable == [9, 1, 2, 4, 5, 6, 8, 10, 11, 3, 12, 7, 0]
    assert set(expect[:5]) != set(stable[:5])  # a cut of 5 inside the zeros takes other candidates


def test_golden_twentythree_equal_keys_use_the_stack():
    # L=0 R=22: mid 11 swapped to 1; the scans swap (2,21) (3,20) ... (11,12) and cross at i=12, j=11; pivot
    # to 11: [12,11,21,20,19,18,17,16,15,14,13,0,1,10,9,8,7,6,5,4,3,2,22]. Parts [0,10] and [12,22] hold 11
    # keys each (> M_SMALL): the right one is pushed (sizes equal -> "else" branch) and [0,10] goes on.
    # [0,10]: mid 5 swapped to 1 -> [12,18,21,20,19,11,17,16,15,14,13]; swaps (2,9) (3,8) (4,7) (5,6), cross
    # at i=6, j=5, pivot to 5 -> [17,18,14,15,16,12,11,19,20,21,13]; parts of 5 and 5 keys: pop [12,22].
    # [12,22] = [1,10,9,8,7,6,5,4,3,2,22]: mid 17 swapped to 13 -> [1,6,9,8,7,10,5,4,3,2,22]; swaps (14,21)
    # (15,20) (16,19) (17,18), cross at i=18, j=17, pivot to 17 -> [5,6,2,3,4,1,10,7,8,9,22]; stack empty: done.
    expect = [17, 18, 14, 15, 16, 12, 11, 19, 20, 21, 13, 0, 5, 6, 2, 3, 4, 1, 10, 7, 8, 9, 22]
    assert ls.th13_argsort([0.0] * 23) == expect


def test_legacy_argsort_on_a_tensor_column():
    t = torch.tensor([[0.0, 5.0, 0.0]] * 12)  # a strided column, as _prune passes importance_list[:, -1]
    out = ls.legacy_argsort(t[:, 2])
    assert out.dtype == torch.int64 and out.tolist() == [7, 5, 10, 9, 8, 0, 6, 1, 4, 3, 2, 11]
    with pytest.raises(ValueError):
        ls.legacy_argsort(t)


# --------------------------------------------------------------------------------------------- in the optimizer

def _equal_delta_layers():
    """Two FC layers of 2 groups x 4 slots with every alpha 0.5 and a zero gradient: all 16 deltas are
    0.5^2 * ph / 2 with the same ph = eps / sqrt(1 - 0.999), one tie block."""
    ws, layers = [], []
    for k in range(2):
        w = torch.zeros(2, 3)
        layer = bn.FCLayer_bin(w, k, "subchannelwise", 1, 4, name=f"fc{k}", init=False)
        layer.B = torch.tensor([1, -1, 1]).repeat(2, 1, 4, 1).to(torch.int8)
        layer.alpha = torch.full((2, 1, 4, 1), 0.5)
        layer.mask = torch.ones(2, 1, 4, 1, dtype=torch.bool)
        p = torch.nn.Parameter(layer.reconstruct_w())
        p.grad = torch.zeros_like(p)
        ws.append(p)
        layers.append(layer)
    return ws, layers


def _pruned_slots(legacy):
    ws, layers = _equal_delta_layers()
    opt = opt_mod.ALQ_optimizer(ws, lr=1e-3, legacy_tie_order=legacy)
    random.seed(0)  # top_k 1.0: every alpha is a candidate, no fraction to draw
    opt.step(layers, "coordinate", [1.0, 0.25])  # prune int(16 * 0.25) = 4
    return [(~l.mask).view(-1).nonzero().view(-1).tolist() for l in layers]


def test_flag_changes_which_tied_candidates_are_pruned():
    # rows 0-7 are fc0's slots 0-7, rows 8-15 fc1's (each layer's within-layer order is 0..7)
    assert _pruned_slots(legacy=False) == [[0, 1, 2, 3], []]  # stable: the first layer's first four
    # legacy, 16 equal keys by hand: mid 7 to 1, scans swap (2,14) (3,13) ... (7,9), meet at 8, cross at i=9,
    # j=7, pivot to 7 -> [9,7,14,13,12,11,10,0,8,1,6,5,4,3,2,15]; parts of 7 and 7 keys: done. The first four
    # rows are fc1 slot 1, fc0 slot 7, fc1 slots 6 and 5.
    assert ls.th13_argsort([1.0] * 16) == [9, 7, 14, 13, 12, 11, 10, 0, 8, 1, 6, 5, 4, 3, 2, 15]
    assert _pruned_slots(legacy=True) == [[7], [1, 5, 6]]


def test_flag_parses_and_reaches_the_optimizer():
    parser = A.lenet5.get_parser()
    default = parser.parse_args("--PRETRAIN --ALQ --POSTTRAIN".split())
    stable = parser.parse_args("--ALQ --stable_tie_order".split())
    assert default.stable_tie_order is False and stable.stable_tie_order is True
    w = [torch.nn.Parameter(torch.zeros(2, 2))]
    b = [torch.nn.Parameter(torch.zeros(2))]
    assert train.make_alq_optimizers(w, b, default)[0].legacy_tie_order is True     # the original's order
    assert train.make_alq_optimizers(w, b, stable)[0].legacy_tie_order is False
    assert opt_mod.ALQ_optimizer(w).legacy_tie_order is True
