"""Charts of `common.compare`: one PNG per paper (matplotlib, imported only when a chart is drawn) showing
the gap between each measured row and its published number.
"""
import textwrap

from common.compare_match import same_number, seed_runs
from common.compare_records import is_accuracy, key_of, standard_error, subset_info
from common.compare_text import readable, short_source


def _se_of(rec):
    if rec is None:
        return None
    if rec.get("_seeds"):
        return rec["_seeds"]["std"]
    if not (rec.get("n_samples") or 0) > 0 or not subset_info(rec)[0] or not is_accuracy(rec.get("metric")):
        return None
    return standard_error(rec["value"], rec["n_samples"])


CHART_METRICS = (("top1", "top-1 accuracy (points)"), ("avg_bits", "average bits per weight"),
                 ("storage_KB", "weight storage (KB)"))
CHART_UNITS = {"top1": " pts", "avg_bits": " bit", "storage_KB": " KB"}


def chart_groups(result):
    """Per metric: [(label, published, measured, error, split differs, seed values, dataset)] for the rows that have a
    measurement, and the labels of the published rows not measured yet. The same number published twice (a
    README row and the value its checkpoint stores, equal to two decimals) is drawn once, as the terminal
    table shows it once."""
    per_metric, missing, shown = {}, [], []
    for entry in result["rows"]:
        p, rec = entry["published"], entry["record"]
        if any(same_number(q, p) for q in shown):
            continue
        shown.append(p)
        if rec is None:
            missing.append(f"{p['model']} {p['setting']} {p['dataset']}")
            continue
        differs = any(n.startswith("split differs") for n in entry["notes"])
        label = f"{p['model']} {p['setting']} {p['dataset']}"
        if any(key_of(q["published"]) == key_of(p) and not same_number(q["published"], p) for q in result["rows"]):
            # the same setting published twice with other numbers: say which row this is
            label += f" [{readable(result['paper'], short_source(p['source']))[:40]}]"
        if differs:
            label += f"\n(published on {p['split']}, measured on {rec.get('split')})"
        seeds = [r["value"] for r in (rec.get("_seeds") or {}).get("runs", [])]
        per_metric.setdefault(p["metric"], []).append((label, p["value"], rec["value"], _se_of(rec), differs,
                                                       seeds, p["dataset"]))
    return per_metric, missing


def layer_rows(result):
    """[(label, {layer: bits})] of every run behind a paired row whose records carry per-layer bits (ALQ)."""
    _, rows = seed_runs(result)
    out = [(f"{r['key'][0]} {r['key'][2]} seed {r['seed']} ({r['key'][3]})", r["layer_bits"]) for r in rows
           if r["layer_bits"]]
    if not out:                                   # one run per setting: its paired record
        seen = set()
        for e in result["rows"]:
            rec = e["record"]
            bits = (rec or {}).get("extra", {}).get("layer_bits") if rec else None
            k = rec and (rec.get("model"), rec.get("setting"), rec.get("seed"), rec.get("_origin"))
            if bits and k not in seen:
                seen.add(k)
                out.append((f"{k[0]} {k[1]} seed {k[2]} ({k[3]})", bits))
    return out


def plot_paper(result, path):
    """One panel per metric (top-1, and ALQ's bits and storage beside it) showing the GAP of each measured
    row: measured - published, with its uncertainty (1 standard error for a test subset, ±1 std over seeds,
    each seed a dot) against a zero line, on an axis symmetric about zero; a hollow marker where the split
    differs from the published one. Only rows with a measurement; the count of the others in the title.
    Returns {'bars': measured rows drawn, 'panels': [(metric, (xmin, xmax))], 'not_measured': count}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_metric, missing = chart_groups(result)
    not_measured = len(missing)
    panels = [(m, label) for m, label in CHART_METRICS if per_metric.get(m)]
    layers = layer_rows(result) if panels else []
    if layers:
        panels.append(("layer_bits", "bits per weight of each layer, per run"))
    if not panels:
        fig, ax = plt.subplots(figsize=(7, 1.6))
        ax.axis("off")
        why = (f"{result['paper']}: no code in this repository yet" if not result.get("has_code", True)
               else f"{result['paper']}: no measurement yet ({not_measured} published rows)")
        ax.text(0.5, 0.5, why, ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return {"bars": 0, "panels": [], "not_measured": not_measured}
    # one row of panels per dataset, each with its own symmetric axis: a shared axis would let the widest gap
    # (a 1,000-image subset's) flatten the others (MNIST's 0.05-point gaps) to zero
    datasets = list(dict.fromkeys(g[6] for m, _ in panels if m in per_metric for g in per_metric[m]))
    rows_of = {d: max([sum(1 for g in per_metric[m] if g[6] == d) for m, _ in panels if m in per_metric] + [1])
               for d in datasets}
    if layers:
        rows_of[datasets[0]] = max(rows_of[datasets[0]], len(layers) if len(datasets) == 1 else 1)
    n = sum(rows_of.values()) + (max(0, len(layers) - sum(rows_of.values())) if layers else 0)
    # the rows not measured yet are listed under the plot, not drawn
    listed = textwrap.fill("not measured yet: " + ", ".join(missing), 150) if missing else ""
    foot = 0.45 + 0.14 * (listed.count("\n") + 1 if listed else 0)
    height = 1.35 + foot + 0.5 * n + 0.55 * (len(datasets) - 1)
    fig = plt.figure(figsize=(5.5 * len(panels) + 3.5, height))
    grid = fig.add_gridspec(len(datasets), len(panels), height_ratios=[rows_of[d] + 0.6 for d in datasets])
    drawn = []
    for col, (metric, xlabel) in enumerate(panels):
        if metric == "layer_bits":
            ax = fig.add_subplot(grid[:, col])
            _plot_layers(ax, layers, xlabel)
            drawn.append((metric, tuple(ax.get_xlim())))
            continue
        for row, dataset in enumerate(datasets):
            groups = [g for g in per_metric[metric] if g[6] == dataset]
            if not groups:
                continue
            ax = fig.add_subplot(grid[row, col])
            _plot_gaps(ax, groups, metric, xlabel + (f" ({dataset})" if len(datasets) > 1 else ""))
            drawn.append((metric, tuple(ax.get_xlim())))
    handles = [plt.Line2D([], [], color="tab:blue"), plt.Line2D([], [], marker="o", color="tab:orange", ls=""),
               plt.Line2D([], [], marker="o", color="tab:orange", mfc="white", ls="")]
    labels = ["published (zero gap)", "measured", "measured on another split than published"]
    rest = f"; {not_measured} more published rows not measured yet (listed below)" if not_measured else ""
    fig.suptitle(f"{result['paper']}: measured minus published{rest}", x=0.01, ha="left", fontsize=10)
    fig.legend(handles=handles, labels=labels, loc="lower center", ncol=3, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, (foot - 0.4) / height))
    if listed:
        fig.text(0.01, 0.08 / height, listed, ha="left", va="bottom", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, foot / height, 1, 1 - 0.45 / height))   # title, legend and list in fixed inches
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"bars": sum(len(per_metric.get(m, [])) for m, _ in panels), "panels": drawn,
            "not_measured": not_measured, "layer_runs": len(layers), "datasets": datasets}


def _plot_gaps(ax, groups, metric, xlabel):
    """One panel: each row's gap with its error bar and seed dots, about a zero line, on a symmetric axis."""
    unit = CHART_UNITS.get(metric, "")
    reach = max(max([abs(g[2] - g[1]) + (g[3] or 0)] + [abs(v - g[1]) for v in g[5]]) for g in groups)
    reach = max(reach * 1.25, 1e-3)
    for y, (label, pub, rep, err, differs, seeds, _) in enumerate(groups):
        gap = rep - pub
        ax.errorbar([gap], [y], xerr=None if err is None else [[err], [err]], fmt="o",
                    color="tab:orange", mfc="white" if differs else "tab:orange", capsize=3, markersize=6)
        if seeds:                             # each seed's run as a dot
            ax.plot([v - pub for v in seeds], [y + 0.18] * len(seeds), "k.", markersize=4)
        ax.text(reach, y, f" {pub:.2f} -> {rep:.2f} ({gap:+.2f}{unit})", va="center", fontsize=7)
    ax.axvline(0.0, color="tab:blue", linewidth=1)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([g[0] for g in groups], fontsize=7)
    ax.set_ylim(len(groups) - 0.4, -0.6)
    ax.set_xlim(-reach, reach)                # symmetric: a gap reads the same to either side
    seeded = any(g[5] for g in groups)
    ax.set_xlabel(f"measured - published, {xlabel}" + ("; error bar = 1 s.e. of the test subset"
                                                         if any(g[3] for g in groups) and not seeded else "")
                  + ("; several seeds: mean, ±1 std, dots = runs" if seeded else ""), fontsize=8)


def _plot_layers(ax, layers, xlabel):
    """Grouped horizontal bars: one group per run, one bar per layer, axis from zero."""
    names = list(dict.fromkeys(n for _, bits in layers for n in bits))
    h = 0.8 / max(len(names), 1)
    for y, (label, bits) in enumerate(layers):
        for i, name in enumerate(names):
            v = bits.get(name)
            if v is not None:
                ax.barh(y - 0.4 + h * (i + 0.5), v, h, color=f"C{i + 2}", label=name if y == 0 else None)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([label for label, _ in layers], fontsize=7)
    ax.set_ylim(len(layers) - 0.4, -0.6)
    ax.set_xlim(0, max(v for _, bits in layers for v in bits.values()) * 1.12)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
