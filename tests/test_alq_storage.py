"""ALQ weight storage (alq/pack.py): exact bit counts of hand-built multi-bit layers, agreement with the sections
of the real bit-packed file, and the arithmetic that decides which storage convention the published rows allow
(the numbers quoted in alq/DEVIATIONS.md, "Storage figure", are the golden values asserted here)."""
import argparse
import json
import math
import os

import pytest
import torch

import alq_import

A = alq_import.load()
bn, pack, train = A.binarynet, A.pack, A.train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set_masks(layer, masks, n):
    """Give a layer (built with init=False) the masks `masks` (d0, d1, M) and +1 bases / unit coordinates."""
    m = torch.tensor(masks, dtype=torch.bool).unsqueeze(-1)
    layer.mask = m
    layer.alpha = m.float()
    layer.B = torch.ones(m.shape[:3] + (n,), dtype=torch.int8) * m.to(torch.int8)


def _hand_built_layers():
    # conv (2,1,2,2) kernelwise: 2 groups of n=4, M=3; group 0 uses slots 0,1, group 1 only slot 2 (a hole)
    conv = bn.ConvLayer_bin(torch.zeros(2, 1, 2, 2), 0, "kernelwise", 3, name="c", init=False)
    _set_masks(conv, [[[1, 1, 0]], [[0, 0, 1]]], 4)
    # fc (3,6) in 2 subchannels: 6 groups of n=3, M=2, with 2,0 / 1,1 / 0,2 bases
    fc = bn.FCLayer_bin(torch.zeros(3, 6), 1, "subchannelwise", 2, 2, name="f", init=False)
    _set_masks(fc, [[[1, 1], [0, 0]], [[1, 0], [0, 1]], [[0, 0], [1, 1]]], 3)
    return [conv, fc]


def test_storage_of_hand_built_layers_is_exact():
    layers = _hand_built_layers()
    assert [l.num_bin_filter for l in layers] == [3, 6]
    # bases: 3 bases x 4 weights + 6 bases x 3 weights = 30 bits; 9 coordinates
    assert pack.storage_bits(layers) == 30 + 9 * 32 == 318
    assert pack.storage_bits(layers, coord_bits=16) == 30 + 9 * 16 == 174
    assert pack.KB == 1024 and pack.COORD_BITS == 32
    assert pack.storage_KB(layers) == 318 / 8 / 1024
    # k_g needs ceil(log2(M+1)) bits per group: 2 groups x 2 bits (M=3) + 6 groups x 2 bits (M=2)
    assert pack.basis_count_bits(layers) == 2 * 2 + 6 * 2 == 16
    b = pack.storage_breakdown(layers)
    assert (b["bases_bits"], b["num_coordinates"], b["num_groups"]) == (30, 9, 8)
    assert b["bases_KB"] == 30 / 8 / 1024 and b["coordinates_KB"] == 9 * 4 / 1024
    assert b["bases_KB"] + b["coordinates_KB"] == pack.storage_KB(layers)
    assert b["storage_KB_16bit_coordinates"] == 174 / 8 / 1024
    assert b["storage_kB_1000"] == 318 / 8 / 1000
    assert b["basis_counts_KB"] == 16 / 8 / 1024
    assert b["fp32_weights_KB"] == (8 + 18) * 4 / 1024
    assert "inferred" in b["storage_definition"] and "not paper-defined" in b["storage_definition"]
    json.dumps(b)  # it goes into a record's `extra`


def test_storage_is_what_the_packed_file_spends_on_bases_and_coordinates(tmp_path):
    net, layers = alq_import.lenet5_with_holes(A, seed=3, mask_seed=1, keep=0.2)  # holes, as after pruning
    path = str(tmp_path / "m.alqpack")
    size = pack.export_packed(path, "lenet5", net, layers)
    with open(path, "rb") as f:
        hlen = int.from_bytes(f.read(12)[8:12], "little")
        header = json.loads(f.read(hlen))
    spent, counts_bytes = 0, 0
    for l, h in zip(layers, header["layers"]):
        counts, alphas, bases = h["bytes"]
        assert alphas * 8 == l.num_bin_filter * 32                       # float32 coordinates
        assert bases == math.ceil(l.num_bin_filter * l.group_size / 8)   # 1 bit per weight per basis
        assert counts == math.ceil(l.num_groups * 3 / 8)                 # M = 6 -> 3 bits per group
        spent += 8 * (alphas + bases)
        counts_bytes += counts
    # the packed sections hold exactly the storage figure, plus < 1 byte of padding per layer
    assert pack.storage_bits(layers) <= spent < pack.storage_bits(layers) + 8 * len(layers)
    # packed_KB = that + the basis counts + the FP32 biases + the header
    fp_bytes = sum(p.numel() * 4 for n, p in net.state_dict().items() if n not in {l.name for l in layers})
    assert fp_bytes == (20 + 50 + 500 + 10) * 4
    assert size == 12 + hlen + counts_bytes + spent // 8 + fp_bytes


# --------------------------------------------------------------------------------------------- published rows
# A published row gives the average bitwidth (bases only, as the original computes it) and the storage, each
# rounded to its printed digits. For a storage convention (coordinate bits c, bytes per KB/MB) the row then
# needs a coordinate count C with  bits*N + c*C = storage*unit*8.  The network allows only C between C_min
# (bits in the fewest, largest groups) and C_max (bits in the most, smallest groups), with at most max_bit
# bases per group. A convention whose needed C falls outside [C_min, C_max] cannot have produced the row.

UNITS = {"KB": {"1000": 1000, "1024": 1024},
         "MB": {"10^6": 10 ** 6, "2^20": 2 ** 20, "1000x1024": 1000 * 1024}}


def _interval(printed):
    """'0.40' -> (0.395, 0.405): the values that print so."""
    digits = len(printed.split(".")[1]) if "." in printed else 0
    v, h = float(printed), 0.5 * 10 ** -digits
    return v - h, v + h


def _published():
    with open(os.path.join(ROOT, "common", "published", "alq.json")) as f:
        rows = json.load(f)["rows"]
    out = {}
    for r in rows:
        if r["metric"] in ("avg_bits", "storage_KB"):
            out.setdefault(r["model"], {})[r["metric"]] = r["as_published"]
    return out


def _layers(model):
    """The quantized layers of each published network with the scripts' default structures (init=False)."""
    if model == "lenet5":
        net, d = A.lenet5.LeNet5(), A.lenet5.DEFAULTS
        structure, subc, max_bit = d["structure"], d["subc"], d["max_bit"]
    elif model == "vgg":
        net, d = A.vgg.VGG_small(), A.vgg.DEFAULTS
        structure, subc, max_bit = d["structure"], d["subc"], d["max_bit"]
    else:
        net = A.resnet.NETS[model]()
        a = A.resnet.fill_net_defaults(argparse.Namespace(net=model, structure=None, max_bit=None, subc=None,
                                                          model_ori_urls=None))
        structure, subc, max_bit = a.structure, a.subc, a.max_bit
    names, params, _ = bn.split_parameters(net)
    return bn.make_binary_layers(names, params, structure, subc, max_bit, init=False)


def _items(layers):
    """Every basis slot the network has, as its cost in bits (= its group size), largest first."""
    return sorted((l.group_size for l in layers for _ in range(l.num_groups * l.max_bit)), reverse=True)


def _c_min(items, bits):
    """Fewest bases whose bits reach `bits` (the largest groups first)."""
    total = 0
    for c, n in enumerate(items, 1):
        total += n
        if total >= bits:
            return c
    return math.inf


def _c_max(items, bits):
    """Most bases whose bits stay within `bits` (the smallest groups first)."""
    total = 0
    for c, n in enumerate(reversed(items)):
        total += n
        if total > bits:
            return c
    return len(items)


@pytest.fixture(scope="module")
def rows():
    out = {}
    for model, pub in _published().items():
        layers = _layers(model)
        items = _items(layers)
        N = sum(l.num_weight for l in layers)
        b_lo, b_hi = _interval(pub["avg_bits"])
        s_lo, s_hi = _interval(pub["storage_KB"][:-2])
        unit = pub["storage_KB"][-2:]
        need = {}
        for uname, u in UNITS[unit].items():
            for c in (32, 16):
                need[c, uname] = (max(0, math.ceil((s_lo * u * 8 - b_hi * N) / c)),
                                  math.floor((s_hi * u * 8 - b_lo * N) / c))
        out[model] = dict(layers=layers, N=N, G=sum(l.num_groups for l in layers), unit=unit, need=need,
                          c_min=_c_min(items, b_lo * N), c_max=_c_max(items, b_hi * N), items=items)
    return out


def _possible(r, key):
    lo, hi = r["need"][key]
    return lo <= hi and lo <= r["c_max"] and hi >= r["c_min"]


def test_published_networks_have_the_expected_sizes(rows):
    # quantized weights and groups with the original's default structures (first and last layers included)
    assert {m: (r["N"], r["G"]) for m, r in rows.items()} == {
        "lenet5": (430_500, 2_030), "vgg": (14_022_016, 33_556),
        "resnet18": (11_678_912, 37_520), "resnet34": (21_779_648, 70_928)}


def test_coordinates_each_published_row_needs(rows):
    # golden: the intervals quoted in alq/DEVIATIONS.md
    assert rows["lenet5"]["c_min"] == 411                     # 60 FC2 bases x 500 + 351 FC1 bases x 400 bits
    assert rows["lenet5"]["need"][32, "1000"] == (214, 373)
    assert rows["lenet5"]["need"][32, "1024"] == (350, 510)
    assert rows["lenet5"]["need"][16, "1000"] == (428, 747)
    assert rows["lenet5"]["need"][16, "1024"] == (700, 1020)
    assert rows["vgg"]["c_max"] == 47_479
    assert rows["vgg"]["need"][32, "10^6"] == (29_855, 36_736)
    assert rows["vgg"]["need"][32, "2^20"] == (45_461, 52_463)
    assert rows["vgg"]["need"][16, "10^6"] == (59_710, 73_473)
    assert rows["resnet18"]["c_max"] == 137_255
    assert rows["resnet18"]["need"][32, "10^6"] == (126_994, 133_142)
    assert rows["resnet18"]["need"][16, "10^6"] == (253_987, 266_285)
    assert rows["resnet34"]["c_max"] == 241_708
    assert rows["resnet34"]["need"][32, "10^6"] == (226_619, 235_925)


def test_which_conventions_each_published_row_allows(rows):
    verdict = {m: {k: _possible(r, k) for k in r["need"]} for m, r in rows.items()}
    assert verdict["lenet5"] == {(32, "1000"): False, (16, "1000"): True, (32, "1024"): True, (16, "1024"): True}
    assert verdict["vgg"] == {(32, "10^6"): True, (16, "10^6"): False, (32, "2^20"): True, (16, "2^20"): False,
                              (32, "1000x1024"): True, (16, "1000x1024"): False}
    for m in ("resnet18", "resnet34"):
        assert verdict[m] == {(32, "10^6"): True, (16, "10^6"): False, (32, "2^20"): False, (16, "2^20"): False,
                              (32, "1000x1024"): False, (16, "1000x1024"): False}
    # no single convention (coordinate bits, with KB and MB taken consistently) allows all four rows
    for c in (32, 16):
        for kb, mb in (("1000", "10^6"), ("1024", "2^20"), ("1024", "1000x1024")):
            assert not all(_possible(r, (c, kb if r["unit"] == "KB" else mb)) for r in rows.values())
    # the ResNet rows need almost every basis slot the bitwidth allows: >= 92% of C_max
    for m in ("resnet18", "resnet34"):
        assert rows[m]["need"][32, "10^6"][0] / rows[m]["c_max"] > 0.92


def test_lenet5_row_with_32bit_coordinates_leaves_the_conv_layers_almost_empty(rows):
    r = rows["lenet5"]
    lo, hi = r["need"][32, "1024"]
    b_lo = _interval("0.40")[0] * r["N"]
    conv_n = 25
    fc = sorted((l.group_size for l in r["layers"] if l.layer_type == "fc"
                 for _ in range(l.num_groups * l.max_bit)), reverse=True)
    # most conv bases c such that c conv bases plus the (hi - c) largest FC bases still reach the bitwidth
    c_conv = max(c for c in range(hi + 1) if sum(fc[:hi - c]) + conv_n * c >= b_lo)
    assert c_conv == 106  # <= 2,650 bits for the 25,500 conv weights: <= 0.104 bit/weight in conv1+conv2
    # the per-group basis counts (3 bits x 2,030 groups) would not fit beside 32-bit coordinates either way
    counts = pack.basis_count_bits(r["layers"])
    assert counts == 6_090
    biases = (20 + 50 + 500 + 10) * 32  # FP32 biases, 2,320 bytes
    for uname in ("1000", "1024"):
        u = UNITS["KB"][uname]
        assert math.floor((22.75 * u * 8 - counts - b_lo) / 32) < r["c_min"]
        assert 22.75 * u * 8 - biases - b_lo < 0


def test_worked_example_in_deviations():
    bases = 0.40 * 430_500 / 8
    assert bases == 21_525 and round(22.7 * 1024) == 23_245
    assert (23_245 - bases) / 4 == 430                  # coordinates at the printed values, 1024-byte KB
    assert (22_700 - bases) / 4 == pytest.approx(294, abs=0.5)
    assert 1290 / (1.29e6 / 1024) - 1 == pytest.approx(0.024, abs=0.0005)  # MB = 1000 KB vs 10^6 bytes
