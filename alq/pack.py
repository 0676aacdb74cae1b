"""A quantized network that really is small: bit-packed export/import, and the weight-storage figure
(inferred from the published numbers, not taken from the paper's text: DEVIATIONS.md, "Storage figure").

File layout (little-endian, every section byte-aligned; no pickled objects):
    b"ALQPACK1"  uint32 header length  JSON header (architecture, layer shapes/structures, FP tensor list)
    per quantized layer, groups in (d0, d1) order:
        counts   ceil(log2(M+1)) bits per group: the number of bases k_g of each group
        alphas   float32 x sum_g k_g               the coordinates, slot order kept
        bases    1 bit per weight per basis, 8 per byte (+1 -> 1, -1 -> 0), sum_g k_g * n bits
    FP tensors (biases, BN weight/bias/running statistics) as raw arrays
Masks are implied: a loaded group uses slots [:k_g]. Because the reconstruction sums the slots one by one
in order (binarynet.BinaryLayer.reconstruct_w), dropping the pruned slots changes no weight by a single
bit, so the rebuilt network gives bit-identical outputs.
"""
import json
import os
import struct

import numpy as np
import torch

from alq.binarynet import make_binary_layers, split_parameters
from common.errors import UserError

MAGIC = b"ALQPACK1"


# ---------------------------------------------------------------------------------------------------
# Weight storage. The README's results table has a "Weight Storage" column (22.7KB for LeNet5 at 0.40 bit);
# the paper's text defining it could not be read here, so the count below is INFERRED from the published
# rows and the original code, not paper-defined (DEVIATIONS.md, "Storage figure", has the arithmetic).

COORD_BITS = 32  # the original keeps every coordinate as a float32 (binarynet.py: alpha is torch.float32)
KB = 1024        # bytes; with 32-bit coordinates LeNet5's 0.40 bit / 22.7 KB is reachable only with 1024-byte KB


def storage_bits(params_bin, coord_bits=COORD_BITS):
    """Inferred weight storage in bits: each valid basis of a group of n weights costs n bits (one per weight)
    plus one coordinate of coord_bits; summed over all quantized layers, first and last included. Not counted:
    pruned slots, the number of bases of each group (the packed file's counts), biases and BN."""
    return sum(p.num_bin_filter * (p.group_size + coord_bits) for p in params_bin)


def storage_KB(params_bin):
    """The recorded `storage_KB`: storage_bits with 32-bit coordinates, in 1024-byte KB."""
    return storage_bits(params_bin) / 8 / KB


def basis_count_bits(params_bin):
    """What a decoder also needs and storage_bits leaves out: ceil(log2(M+1)) bits per group for its k_g."""
    return sum(p.num_groups * _bits_per_count(p.max_bit) for p in params_bin)


def storage_breakdown(params_bin):
    """The parts of storage_KB and the variants the published rows leave open, for a record's `extra`."""
    bases = sum(p.num_bin_filter * p.group_size for p in params_bin)
    k = sum(p.num_bin_filter for p in params_bin)
    return {"storage_definition": "inferred, not paper-defined: bases 1 bit/weight + 32-bit coordinates, "
                                  "1 KB = 1024 bytes (alq/DEVIATIONS.md, Storage figure)",
            "bases_bits": bases, "num_coordinates": k, "num_groups": sum(p.num_groups for p in params_bin),
            "bases_KB": bases / 8 / KB, "coordinates_KB": k * COORD_BITS / 8 / KB,
            "storage_KB_16bit_coordinates": storage_bits(params_bin, 16) / 8 / KB,
            "storage_kB_1000": storage_bits(params_bin) / 8 / 1000,
            "basis_counts_KB": basis_count_bits(params_bin) / 8 / KB,
            "fp32_weights_KB": sum(p.num_weight for p in params_bin) * 4 / KB}


# ---------------------------------------------------------------------------------------------------


def _bits_per_count(max_bit):
    return max(1, int(max_bit).bit_length())


def _pack_uint(values, nbits):
    v = np.asarray(values, dtype=np.int64)
    bits = ((v[:, None] >> np.arange(nbits)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_uint(buf, count, nbits):
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=count * nbits).reshape(count, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(1)


def _fp_entries(net, quantized_names):
    return [(k, v) for k, v in net.state_dict().items() if k not in quantized_names]


def export_packed(path, arch, net, params_bin):
    """Write the bit-packed model; returns the file size in bytes."""
    qnames = {p.name for p in params_bin}
    header = {"format": 1, "arch": arch, "layers": [], "fp": []}
    payload = []
    for p in params_bin:
        d0, d1, n = p.group_shape
        G, M = d0 * d1, p.max_bit
        mask = p.mask.detach().cpu().reshape(G, M)
        B = p.B.detach().cpu().reshape(G, M, n)
        alpha = p.alpha.detach().cpu().reshape(G, M)
        k = mask.sum(1)
        nb = _bits_per_count(M)
        counts = _pack_uint(k.numpy(), nb)
        alphas = alpha[mask].numpy().astype("<f4").tobytes()
        bases = np.packbits((B[mask] > 0).numpy().astype(np.uint8).reshape(-1)).tobytes()
        header["layers"].append({"name": p.name, "shape": list(p.tensor_shape), "structure": p.structure,
                                 "num_subchannel": p.num_subchannel, "max_bit": M, "groups": [d0, d1], "n": n,
                                 "valid": int(k.sum()), "bytes": [len(counts), len(alphas), len(bases)]})
        payload += [counts, alphas, bases]
    for name, t in _fp_entries(net, qnames):
        a = t.detach().cpu().contiguous().numpy()
        header["fp"].append({"name": name, "shape": list(a.shape), "dtype": a.dtype.str})
        payload.append(a.tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(head)) + head)
        for b in payload:
            f.write(b)
    os.replace(tmp, path)
    return os.path.getsize(path)


def load_packed(path, net, arch=None):
    """Rebuild `net` (already constructed, same architecture) from a packed file.
    Returns (parameters_w_bin, header). Every mismatch is one UserError line."""
    if not os.path.isfile(path):
        raise UserError(f"packed model not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != MAGIC or len(data) < 12:
        raise UserError(f"{path} is not an ALQ packed model (bad magic); write one with --export")
    (hlen,) = struct.unpack("<I", data[8:12])
    try:
        header = json.loads(data[12:12 + hlen].decode())
    except ValueError:
        raise UserError(f"{path} has a corrupt header") from None
    if arch is not None and header.get("arch") != arch:
        raise UserError(f"{path} holds a {header.get('arch')} model, not {arch}")
    names_w, params_w, _ = split_parameters(net)
    layers = header["layers"]
    if [l["name"] for l in layers] != names_w:
        raise UserError(f"{path} does not match the network: quantized layers {[l['name'] for l in layers]} "
                        f"vs {names_w}")
    params_bin = make_binary_layers(names_w, params_w, [l["structure"] for l in layers],
                                    [l["num_subchannel"] for l in layers], [l["max_bit"] for l in layers], init=False)
    off = 12 + hlen

    def take(nbytes):
        nonlocal off
        if off + nbytes > len(data):
            raise UserError(f"{path} is truncated")
        b = data[off:off + nbytes]
        off += nbytes
        return b

    for l, p in zip(layers, params_bin):
        if list(p.tensor_shape) != l["shape"]:
            raise UserError(f"{path}: layer {l['name']} has shape {l['shape']}, the network {list(p.tensor_shape)}")
        d0, d1 = l["groups"]
        n, M, G = l["n"], l["max_bit"], l["groups"][0] * l["groups"][1]
        nc, na, nb = l["bytes"]
        k = torch.from_numpy(_unpack_uint(take(nc), G, _bits_per_count(M)))
        V = int(k.sum())
        alphas = torch.from_numpy(np.frombuffer(take(na), dtype="<f4").astype(np.float32))
        bits = np.unpackbits(np.frombuffer(take(nb), dtype=np.uint8), count=V * n).reshape(V, n)
        if alphas.numel() != V:
            raise UserError(f"{path}: layer {l['name']} is corrupt ({alphas.numel()} coordinates for {V} bases)")
        mask = torch.arange(M).unsqueeze(0) < k.unsqueeze(1)  # (G, M): slots [:k_g]
        B = torch.zeros(G, M, n, dtype=torch.int8)
        B[mask] = torch.from_numpy(bits.astype(np.int8) * 2 - 1)
        alpha = torch.zeros(G, M)
        alpha[mask] = alphas
        dev = p.device
        p.B = B.reshape(d0, d1, M, n).to(dev)
        p.alpha = alpha.reshape(d0, d1, M, 1).to(dev)
        p.mask = mask.reshape(d0, d1, M, 1).to(dev)
        p.w_FP = p.reconstruct_w()
    sd = net.state_dict()
    with torch.no_grad():
        for e in header["fp"]:
            if e["name"] not in sd:
                raise UserError(f"{path}: tensor {e['name']} is not in the network")
            dt = np.dtype(e["dtype"])
            count = int(np.prod(e["shape"])) if e["shape"] else 1
            a = np.frombuffer(take(count * dt.itemsize), dtype=dt).reshape(e["shape"])
            sd[e["name"]].copy_(torch.from_numpy(a.copy()))
        for w, p in zip(params_w, params_bin):
            w.copy_(p.reconstruct_w())
    if off != len(data):
        raise UserError(f"{path} has {len(data) - off} trailing bytes; it is corrupt")
    return params_bin, header
