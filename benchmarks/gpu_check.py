"""One speed check for all five papers, in one call (`make bench-gpu`): every paper's benchmark on the GPU (or
on the CPU with --device cpu, which is how a test runs it end to end), then a short real APoT MNIST run, and
one summary table of the ratios that matter (quantized / float step, fast / reference).

    python benchmarks/gpu_check.py [--device auto|cpu] [--quick] [--out DIR] [--data MNIST_ROOT]

Sized for one H100 in under 8 minutes; --quick shrinks every case to seconds (a smoke run, not a measurement).
The benchmark CSVs, their logs and summary.md land in --out (default results/gpu_check/, or $OUT/gpu_check/
on the device runner).
"""
import argparse
import csv
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# (paper, script, full arguments, --quick arguments, the CSV columns that are ratios worth a summary line)
BENCHES = [
    ("apot", "bench_apot_fast.py", [], ["--quick", "--repeats", "1", "--no-compile"], ["ratio"]),
    ("apot", "bench_apot_levels.py", [], ["--repeats", "1"], ["ratio_reference_over_fast"]),
    ("alq", "bench_alq_steps.py", [], ["--rounds", "1"], ["ratio_to_plain_wall"]),
    ("dambq", "bench_dambq.py", [], ["--batch", "8", "--steps", "1"], ["ratio_to_fp32"]),
    ("alignq", "bench_alignq.py", [], ["--batch", "8", "--repeats", "1"],
     ["ratio_w8a8_over_fp32", "ratio_admm_over_w8a8"]),
    ("fdda", "bench_fdda.py", ["--models", "resnet18,mobilenetv2_w1"], ["--models", "resnet18", "--batch", "1"],
     ["ratio_quantized_over_fp"]),
]
LABELS = ("case", "model", "kind", "variant", "step", "impl", "bit", "path")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                    help="auto: the GPU when there is one; cpu: hide every GPU from the benchmarks")
parser.add_argument("--quick", action="store_true", help="every case at its smallest (seconds each; a smoke run)")
parser.add_argument("--out", default=None, help="output folder (default $OUT/gpu_check or results/gpu_check)")
parser.add_argument("--data", default=None,
                    help="MNIST root for the short real run (default $QUANTLAB_DATA; skipped when it has no MNIST)")
parser.add_argument("--papers", default="apot,alq,dambq,alignq,fdda", help="comma-separated papers to check")


def summary_lines(paper, csv_path, columns):
    """'paper  label  column=value' lines of the ratio columns of every row of one benchmark's CSV."""
    if not os.path.isfile(csv_path):
        return [f"| {paper} | {os.path.basename(csv_path)} | no rows written | |"]
    out = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            label = " ".join(row[k] for k in LABELS if row.get(k))
            vals = ", ".join(f"{c} {row[c]}" for c in columns if row.get(c))
            if vals:
                out.append(f"| {paper} | {label} | {vals} | {row.get('device_name', '')} |")
    return out


def main():
    args = parser.parse_args()
    out = os.path.abspath(args.out or os.path.join(os.environ.get("OUT") or os.path.join(REPO, "results"),
                                                   "gpu_check"))
    papers = [p for p in args.papers.split(",") if p]
    unknown = sorted(set(papers) - {b[0] for b in BENCHES})
    if unknown:
        print(f"gpu_check: unknown paper(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               QUANTLAB_RUNS=os.path.join(out, "runs"), QUANTLAB_RESULTS=os.path.join(out, "results"))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    table = ["| paper | case | ratios | device |", "|---|---|---|---|"]
    status = 0
    for paper, script, full, quick, columns in BENCHES:
        if paper not in papers:
            continue
        csv_path = os.path.join(out, script.replace("bench_", "").replace(".py", ".csv"))
        cmd = [sys.executable, os.path.join(HERE, script), "--out", csv_path] + (quick if args.quick else full)
        t0 = time.time()
        with open(csv_path.replace(".csv", ".log"), "w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
        print(f"== {paper}: {script} exit {rc}, {time.time() - t0:.0f} s -> {csv_path}", flush=True)
        status = status or rc
        table += summary_lines(paper, csv_path, columns)
    data = args.data or os.environ.get("QUANTLAB_DATA") or ""
    if "apot" in papers and os.path.isdir(os.path.join(data, "MNIST")):
        cmd = [sys.executable, "main.py", "-a", "resnet10", "--bit", "4", "--epochs", "1", "--seed", "1",
               "--data", data, "--name", f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"] + \
              (["--max-iters", "20"] if args.quick else [])
        t0 = time.time()
        with open(os.path.join(out, "apot_mnist_run.log"), "w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=os.path.join(REPO, "apot", "MNIST")).returncode
        wall = time.time() - t0
        print(f"== apot: MNIST ResNet-10 4-bit, 1 epoch{' (20 iterations)' if args.quick else ''}: exit {rc}, "
              f"{wall:.0f} s", flush=True)
        status = status or rc
        table.append(f"| apot | MNIST ResNet-10 W4A4 real run, 1 epoch{' of 20 iterations' if args.quick else ''} "
                     f"(train + both evaluations) | wall {wall:.1f} s | |")
    else:
        table.append("| apot | MNIST real run | not run: no MNIST under --data / $QUANTLAB_DATA | |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(("quick (smoke) run: not a measurement\n\n" if args.quick else "") + "\n".join(table) + "\n")
    print("\n".join(table))
    print(f"-> {os.path.join(out, 'summary.md')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
