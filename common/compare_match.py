"""Matching for `common.compare`: each published row paired with its best-qualified records, several seeds of
a setting aggregated (mean, std, min-max, n), and the number formats these aggregates are shown in.
"""
import math

from common.compare_records import (base_split, has_code, key_of, load_published, load_records, load_reference,
                                    recipe_full, recipe_text, record_notes, subset_info)


def quality(rec, index=0):
    """Sort key of a record, best last: full recipe > unknown > shortened, full split > subset, more samples,
    newer, later line."""
    full = recipe_full(rec)
    return ({True: 2, None: 1, False: 0}.get(full, 1), not subset_info(rec)[0], rec.get("n_samples") or 0,
            str(rec.get("timestamp", "")), index)


def seed_stats(group):
    """{'mean', 'std', 'min', 'max', 'n'} over several seeds of one setting (newest record per seed), or None.
    Only training runs count (records with a run directory): re-evaluating one checkpoint is not a new seed."""
    by_seed = {}
    for rec in sorted(group, key=lambda r: str(r.get("timestamp", ""))):
        if rec.get("seed") is not None and rec.get("run_dir"):
            by_seed[rec["seed"]] = rec
    vals = [r["value"] for r in by_seed.values()]
    if len(vals) < 2:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))  # sample std (n-1)
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": len(vals),
            "runs": [by_seed[k] for k in sorted(by_seed, key=str)]}


def best_record(candidates, published_split=None):
    """The best-qualified record among `candidates` (same key), preferring the published split; several
    seeds of its setting (same split, size and recipe) become `_seeds` statistics and a mean `value`."""
    if not candidates:
        return None
    if published_split:
        same = [r for r in candidates if base_split(r.get("split", "")) == base_split(published_split)]
        candidates = same or candidates
    ranked = sorted(enumerate(candidates), key=lambda ir: quality(ir[1], ir[0]))
    best = dict(ranked[-1][1])
    group = [r for r in candidates if r.get("split") == best.get("split") and r.get("n_samples") ==
             best.get("n_samples") and recipe_text(r) == recipe_text(best)]
    stats = seed_stats(group)
    if stats:
        best["_seeds"] = stats
        best["value"] = stats["mean"]
    return best


def companion(candidates, rec):
    """The same training runs measured on another split than `rec`'s (APoT MNIST: the published protocol
    on the training split, and the test split beside it), as one best_record; None when there are none.
    Only records of training runs (a run directory and a seed) of rec's origin count."""
    if rec is None or not rec.get("run_dir"):
        return None
    other = [r for r in candidates if r["_origin"] == rec["_origin"] and r.get("run_dir") and r.get("seed") is not None
             and base_split(r.get("split", "")) != base_split(rec.get("split", ""))
             and r.get("script") == rec.get("script")]
    return best_record(other)


# ----------------------------------------------------------------------------- comparison

def compare_paper(paper, records=None, directory=None, reference=None, include_shortened=False, warn=None):
    """Pair published rows with the best-qualified local and reference records.

    Returns the published table plus rows [{published, record, local, reference, delta, notes}] (`record`
    is the one the delta uses: local when there is one, else reference), `measured_only` (qualified records
    without a published row or on another split), `shortened` (records of shortened recipes, shown only as
    such) and counts.
    """
    pub = load_published(paper)
    if records is None:
        records = load_records(paper, directory, warn)
    if reference is None:
        reference = load_reference(paper, warn=warn)
    records = [r if "_origin" in r else dict(r, _origin="local") for r in records]
    reference = [r if "_origin" in r else dict(r, _origin="reference") for r in reference]
    everything = records + reference
    eligible = [r for r in everything if include_shortened or recipe_full(r) is not False]
    shortened = [] if include_shortened else [r for r in everything if recipe_full(r) is False]
    rows, used = [], set()
    for prow in pub["rows"]:
        cands = [r for r in eligible if key_of(r) == key_of(prow)]
        local = best_record([r for r in cands if r["_origin"] == "local"], prow.get("split"))
        ref = best_record([r for r in cands if r["_origin"] == "reference"], prow.get("split"))
        rec = local or ref
        for r in (local, ref):
            if r is not None:
                used.add(key_of(r) + (base_split(r.get("split", "")), r["_origin"]))
        notes = [] if rec is None else record_notes(rec, prow["split"])
        beside = companion(cands, rec)
        if beside is not None:
            used.add(key_of(beside) + (base_split(beside.get("split", "")), beside["_origin"]))
            split = base_split(beside.get("split", ""))
            how = (beside.get("extra") or {}).get("protocol") or "same runs"
            notes.append(f"{how if how.startswith(split) else f'{split} split ({how})'}: {fmt_value(beside)}")
        if rec is not None and recipe_full(rec) is None:
            notes.append("recipe not recorded")
        if rec is not None and recipe_full(rec) is False:
            notes.append(f"SHORTENED ({recipe_text(rec)}): not a reproduction")
        rows.append({"published": prow, "record": rec, "local": local, "reference": ref,
                     "delta": None if rec is None else rec["value"] - prow["value"], "notes": notes})
    groups = {}
    for r in eligible:
        groups.setdefault(key_of(r) + (base_split(r.get("split", "")), r["_origin"]), []).append(r)
    measured_only = [best_record(g) for k, g in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))
                     if k not in used]
    shortened = sorted(shortened, key=lambda r: tuple(map(str, key_of(r) + (r.get("timestamp"),))))
    return dict(pub, rows=rows, measured_only=measured_only, shortened=shortened, n_records=len(records),
                n_reference=len(reference), has_code=has_code(paper))


# ----------------------------------------------------------------------------- runs and values

def fmt(v):
    """1 to 4 decimals, trailing zeros dropped: 68.744, 92.45, 92.0, 1290.0, 99.6367."""
    if v is None:
        return "-"
    s = f"{v:.4f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def fmt_value(rec):
    """'92.3', or 'mean ±std (min-max, n=3 seeds)' when several seeds share the setting."""
    if rec is None:
        return "-"
    st = rec.get("_seeds")
    if st:
        return f"{fmt(st['mean'])} ±{st['std']:.2f} ({fmt(st['min'])}-{fmt(st['max'])}, n={st['n']} seeds)"
    return fmt(rec["value"])


def seed_runs(result):
    """The runs behind seed statistics, one row per (model, dataset, setting, origin, seed) with every metric
    of that run side by side and, where the records carry it (ALQ), each layer's bits:
    ([metrics], [{'key', 'seed', 'values': {metric: value}, 'layer_bits', 'run_dir'}])."""
    runs, metrics = {}, []
    for entry in result["rows"]:
        for origin in ("reference", "local"):
            rec = entry[origin]
            if not rec or not rec.get("_seeds"):
                continue
            for r in rec["_seeds"]["runs"]:
                k = (r.get("model"), r.get("dataset"), r.get("setting"), origin, r.get("seed"))
                row = runs.setdefault(k, {"key": k, "seed": r.get("seed"), "values": {}, "layer_bits": None,
                                          "run_dir": r.get("run_dir")})
                row["values"][r["metric"]] = r["value"]
                row["layer_bits"] = row["layer_bits"] or (r.get("extra") or {}).get("layer_bits")
                if r["metric"] not in metrics:
                    metrics.append(r["metric"])
    return metrics, [runs[k] for k in sorted(runs, key=lambda k: tuple(map(str, k)))]


def same_number(p, q):
    """Two published rows that are the same number published twice: a README row and the value its checkpoint
    stores, equal to the README's two decimals (same model/dataset/setting/metric and split)."""
    return key_of(p) == key_of(q) and p["split"] == q["split"] and abs(p["value"] - q["value"]) <= 0.005 + 1e-9
