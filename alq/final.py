"""The end of an ALQ run (stages.run_pipeline): the final quantized model evaluated on the test set, its records
(top-1, average bits, the inferred weight storage; results/alq.jsonl and the run's records.jsonl) next to the
paper's row, and with --export the bit-packed file, written, reloaded and checked to reproduce the network's
outputs bit for bit before the numbers are measured on the model rebuilt from it."""
import os

import torch

from alq.binarynet import average_bitwidth
from alq.checkpoints import _final_model, load_quantized
from alq.options import _SWITCHES
from alq.pack import KB, export_packed, load_packed, storage_breakdown, storage_KB
from alq.train import bit_report, layer_bits
from common import runs
from common.identity import IDENTITY_KEY
from common.results import record, results_dir


def published(arch, dataset):
    """The paper's row for this model ({metric: value}) from common/published/alq.json, or {}."""
    try:
        from common.compare_records import load_published
        rows = load_published("alq")["rows"]
    except Exception:  # noqa: BLE001 - the table is informative only
        return {}
    return {r["metric"]: r["value"] for r in rows if r["model"] == arch and r["dataset"] == dataset
            and r["setting"] == "ALQ"}


def finish_pipeline(ctx, run_dir, ran, times, dataset, split_name="test"):
    """Evaluate the final quantized model (after --export, the one rebuilt from the packed file) and record it."""
    args, log, dist, device, arch, build_net = ctx.args, ctx.log, ctx.dist, ctx.device, ctx.arch, ctx.build_net
    if ran == ["PRETRAIN"] and not args.export:
        runs.end_run()
        dist.close()
        return
    src = _final_model(args, ran)
    net = build_net().to(device)
    ck, _, _, params_bin = load_quantized(src, net, not args.fix_sign_flip)
    posttrained = str(ck.get("stage", "")).startswith("POSTTRAIN")
    setting = "ALQ" if posttrained else "ALQ-before-POSTTRAIN"
    switches = [f"--{k}" for k in _SWITCHES[1:] if getattr(args, k, False)]
    if switches:                                  # not the published behaviour: never pooled with the ALQ row
        setting += " " + " ".join(switches)
    ident = ck.get(IDENTITY_KEY) if isinstance(ck.get(IDENTITY_KEY), dict) else None
    recipe = (ident or {}).get("recipe")
    if not ck.get("finished"):                    # a half-finished stage output is never the final result
        recipe = dict(recipe or {}, full=False,
                      summary=f"{(recipe or {}).get('summary', 'recipe not recorded')}; {ck.get('stage')} not finished")
        log.info(f"note: {src} is not a finished stage output (stage {ck.get('stage')}); recorded as shortened")
    bits, skb = average_bitwidth(params_bin), storage_KB(params_bin)
    log.info(f"final quantized model {src} ({ck.get('stage')}):\n{bit_report(params_bin)}")
    extra = {"source": os.path.abspath(src), "stage": ck.get("stage"), "seed": args.seed, "KB": f"{KB} bytes",
             **storage_breakdown(params_bin), "layer_bits": layer_bits(params_bin),
             "stage_minutes": {k: round(v / 60, 2) for k, v in times.items()}}
    if dist.enabled:
        extra["world_size"] = dist.world
    packed_kb = None
    if args.export and dist.main:                 # rank 0 writes and checks the file; all evaluate the model
        size = export_packed(args.export, arch, net, params_bin)
        net2 = build_net().to(device)
        load_packed(args.export, net2, arch=arch)
        net.eval()
        net2.eval()
        x, _ = next(iter(ctx.test_loader))
        with torch.no_grad():
            same = torch.equal(net(x.to(device)), net2(x.to(device)))
        if not same:
            raise RuntimeError(f"packed model {args.export} does not reproduce the network's outputs bit for bit")
        packed_kb = size / KB
        log.info(f"exported {args.export}: {size} bytes = {packed_kb:.2f} KB on disk (inferred weight storage "
                 f"{skb:.2f} KB); reloaded outputs are bit-identical")
        net = net2  # the numbers below are measured on the model rebuilt from the packed file
        extra["packed_file"] = os.path.abspath(args.export)
    s = ctx.evaluate(net, "test")
    if not dist.main:
        dist.close()
        return
    log.info(f"RESULT {arch} {dataset} {setting}: top1 {s['top1']:.2f}%  avg bits {bits:.4f}  "
             f"storage {skb:.2f} KB" + (f"  packed file {packed_kb:.2f} KB" if packed_kb is not None else ""))
    pub = published(arch, dataset)
    if pub:
        log.info("PAPER  " + "  ".join(f"{k} {v:g}" for k, v in pub.items()) + "  (README, storage in KB)")
    n = s["n"]
    record("alq", arch, dataset, split_name, setting, "top1", s["top1"], n, extra=extra, recipe=recipe)
    record("alq", arch, dataset, "n/a", setting, "avg_bits", bits, n, extra=extra, recipe=recipe)
    record("alq", arch, dataset, "n/a", setting, "storage_KB", skb, n, extra=extra, recipe=recipe)
    if packed_kb is not None:
        record("alq", arch, dataset, "n/a", setting, "packed_KB", packed_kb, n, extra=extra, recipe=recipe)
    # record() says where on the console only; log.txt says it too
    log.detail(f"records appended to {os.path.join(results_dir(), 'alq.jsonl')} and "
               f"{os.path.join(run_dir, 'records.jsonl')}")
    runs.end_run()
    dist.close()
