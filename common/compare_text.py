"""Text of `common.compare`: the terminal tables (compact by default, fitting 120 columns; `--wide` the full
one) and the markdown of RESULTS.md.
"""
import re
import textwrap
import time

from common.compare_match import fmt, fmt_value, same_number, seed_runs
from common.compare_records import recipe_text, record_notes


def fmt_published(row):
    """The value as the source printed it ('71.30') when that is the same number, else fmt(value)."""
    printed = str(row.get("as_published", ""))
    try:
        if float(printed) == row["value"]:
            return printed
    except ValueError:
        pass
    return fmt(row["value"])


def fmt_delta(d):
    return "-" if d is None else f"{d:+.2f}"


PAPER_REPOS = {"apot": "github.com/yhhhli/APoT_Quantization", "alq": "github.com/zqu1992/ALQ",
               "dambq": "github.com/sijeh/DAMBQV2", "alignq": "github.com/tinganchen/AlignQ",
               "fdda": "github.com/zysxmu/FDDA"}


def readable(paper, text):
    """Cite only what a user can read: 'seed README' is the paper repository's README; references to this
    project's internal notes and reference folders are dropped."""
    repo = PAPER_REPOS.get(paper, "the paper's repository")
    text = re.sub(r"\s*\((?:see )?(?:the )?notes[^)]*\)", "", str(text), flags=re.I)
    text = re.sub(r"\s*\([^)]*(?:originals-|reference/)[^)]*\)", "", text)
    text = re.sub(r"[Ss]eed README", f"README of {repo}", text)
    return re.sub(r"reference/\w+/logs", f"the authors' logs in {repo}", text)


def short_source(source):
    """'seed README, Results table, row 'Original' (...)' -> "seed README 'Original'"."""
    short = source.split(",")[0].strip()
    row = re.search(r"row '([^']+)'", source)
    return f"{short} '{row.group(1)}'" if row else short


def run_of(rec):
    commit = str(rec.get("commit", "unknown"))
    return f"{rec.get('script', '?')} @ {commit} {rec.get('timestamp', '')}".strip()


def how_run(rec):
    """The command and run directory of a record (evaluations of a checkpoint have no run directory)."""
    run_dir = rec.get("run_dir") or (rec.get("extra") or {}).get("checkpoint") or "-"
    return f"{rec.get('command', '?')} [run: {run_dir}]"


def footnotes_of(result):
    """Published-row notes, deduplicated: ({note: number}, [(number, note)])."""
    numbers = {}
    for entry in result["rows"]:
        note = entry["published"].get("note")
        if note and note not in numbers:
            numbers[note] = len(numbers) + 1
    return numbers, [(i, n) for n, i in numbers.items()]


COMPARE_HEADER = ("model", "dataset", "setting", "metric", "published", "source", "reference", "local", "delta",
                  "n_samples", "split (pub/meas)", "recipe", "run", "notes")
MEASURED_HEADER = ("model", "dataset", "setting", "metric", "value", "from", "n_samples", "split", "recipe", "run",
                   "notes")


def not_run_text(result):
    return "not yet run" if result.get("has_code", True) else "no code in this repository yet"


def table_cells(result):
    """Rows of cells for the comparison table, the measured-only table and the shortened-runs table."""
    numbers, _ = footnotes_of(result)
    paired = []
    for entry in result["rows"]:
        p, rec = entry["published"], entry["record"]
        notes = list(entry["notes"])
        if p.get("note"):
            notes.append(f"see [{numbers[p['note']]}]")
        if rec is None:
            measured = (not_run_text(result), "-", "-", "-", p["split"], "-", "-")
        else:
            measured = (fmt_value(entry["reference"]), fmt_value(entry["local"]), fmt_delta(entry["delta"]),
                        f"{rec.get('n_samples', 0):,}", f"{p['split']} / {rec.get('split', '?')}", recipe_text(rec),
                        run_of(rec))
        paired.append((p["model"], p["dataset"], p["setting"], p["metric"], fmt_published(p),
                       readable(result["paper"], short_source(p["source"]))) + measured + ("; ".join(notes),))

    def measured_row(r):
        return (r.get("model"), r.get("dataset"), r.get("setting"), r.get("metric"), fmt_value(r),
                r.get("_origin", "local"), f"{r.get('n_samples', 0):,}", r.get("split", "?"), recipe_text(r),
                run_of(r), "; ".join(record_notes(r)))
    return paired, [measured_row(r) for r in result["measured_only"]], \
        [measured_row(r) for r in result.get("shortened", [])]


SEED_RUNS_TITLE = "runs behind the seed statistics (mean ±std above):"


def seed_run_cells(result):
    metrics, rows = seed_runs(result)
    if not rows:
        return None, []
    header = ("model", "dataset", "setting", "from", "seed") + tuple(metrics) + ("bits per layer", "run")
    cells = [row["key"][:4] + (row["seed"],) + tuple(fmt(row["values"].get(m)) for m in metrics)
             + (" ".join(f"{n} {b:g}" for n, b in (row["layer_bits"] or {}).items()) or "-", row["run_dir"])
             for row in rows]
    return header, cells


def text_table(header, rows):
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def commands_of(result):
    """One line per paired row: the command and run directory behind the number."""
    out = []
    for entry in result["rows"]:
        for origin in ("reference", "local"):
            rec = entry[origin]
            if rec is not None:
                p = entry["published"]
                out.append(f"{p['model']} {p['dataset']} {p['setting']} {p['metric']} ({origin}): {how_run(rec)}")
    return list(dict.fromkeys(out))


def _runs_text(result):
    """The lines under a table: each row's command and run directory, then the runs behind seed statistics."""
    out = []
    cmds = commands_of(result)
    if cmds:
        # wrapped, so the default output fits a 120-column terminal (--wide prints each on one line)
        out += ["", "commands and run directories:"] + [
            textwrap.fill(c, 118, initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False,
                          break_long_words=True) for c in cmds]
    header, cells = seed_run_cells(result)
    if cells:
        # the terminal view leaves out the run column (the commands above name each run) to fit 120 columns
        out += ["", SEED_RUNS_TITLE, text_table(header[:-1], [c[:-1] for c in cells])]
    return out


def fmt_value_short(rec):
    """'92.3', or 'mean ±std n=3' for seed statistics (the range is in the row's note and the seed table)."""
    if rec is None:
        return "-"
    st = rec.get("_seeds")
    return f"{fmt(st['mean'])} ±{st['std']:.2f} n={st['n']}" if st else fmt(rec["value"])


COMPACT_HEADER = ("#", "model", "dataset", "setting", "metric", "published", "reference", "local", "delta", "n",
                  "split")
COMPACT_MEASURED = ("model", "dataset", "setting", "metric", "value", "from", "n", "split", "recipe")


def short_split(published, measured):
    return published if measured in (None, published) else f"{published}/{measured}"


def compact_cells(result):
    """The terminal view: one short row per published row, its notes numbered below the table (recipe,
    command and run directory are in the lists after it; --wide prints the full table)."""
    numbers, _ = footnotes_of(result)
    rows, notes, shown = [], [], []
    for entry in result["rows"]:
        p, rec = entry["published"], entry["record"]
        # the same number published twice (a README row and the value its checkpoint stores, equal to the
        # README's two decimals): one row
        twin = next((k for k, q in shown if same_number(q, p)), None)
        if twin is not None:
            notes[twin] += f"; also {readable(result['paper'], short_source(p['source']))}: {fmt_published(p)}"
            continue
        i = len(rows) + 1
        row_notes = list(entry["notes"])
        for origin in ("reference", "local"):
            st = (entry[origin] or {}).get("_seeds")
            if st:
                row_notes.append(f"{origin} seeds {fmt(st['min'])}-{fmt(st['max'])}")
        if p.get("note"):
            row_notes.append(f"see [{numbers[p['note']]}]")
        if rec is None:
            rows.append((i, p["model"], p["dataset"], p["setting"], p["metric"], fmt_published(p),
                         not_run_text(result), "-", "-", "-", p["split"]))
        else:
            n = rec.get("n_samples") or 0
            rows.append((i, p["model"], p["dataset"], p["setting"], p["metric"], fmt_published(p),
                         fmt_value_short(entry["reference"]), fmt_value_short(entry["local"]),
                         fmt_delta(entry["delta"]), f"{n:,}" if n else "-", short_split(p["split"], rec.get("split"))))
        shown.append((len(notes), p))
        notes.append(f"#{i}: " + "; ".join(row_notes) if row_notes else "")
    return rows, [textwrap.fill(n, 110, initial_indent="  ", subsequent_indent="      ") for n in notes if n]


def format_text(result, wide=False):
    if wide:
        return format_wide(result)
    rows, notes = compact_cells(result)
    done = sum(1 for e in result["rows"] if e["record"] is not None)
    out = [f"== {result['paper']}: {result['title']} ({result['venue']})"
           + ("" if result.get("has_code", True) else "  [no code in this repository yet]"),
           f"   {len(result['rows'])} published rows, {done} measured, {result['n_records']} local records, "
           f"{result.get('n_reference', 0)} reference records",
           "   delta = measured (local, else reference) - published; --wide adds source, recipe and run columns"]
    if rows:
        out.append(text_table(COMPACT_HEADER, rows))
    else:
        out.append("(no published numbers; see the notes in common/published/%s.json)" % result["paper"])
    out += notes
    out += [textwrap.fill(f"[{i}] {readable(result['paper'], note)}", 110, subsequent_indent="    ")
            for i, note in footnotes_of(result)[1]]
    out += _runs_text(result)

    def measured(records):
        """The table of `records`, the recipe column cut to what is left of 120 columns."""
        cells = [(r.get("model"), r.get("dataset"), r.get("setting"), r.get("metric"), fmt_value_short(r),
                  r.get("_origin", "local"), f"{r.get('n_samples', 0):,}", r.get("split", "?")) for r in records]
        room = 120 - 2 - len(text_table(COMPACT_MEASURED[:-1], cells).splitlines()[1])
        return text_table(COMPACT_MEASURED, [c + (textwrap.shorten(recipe_text(r), max(room, 20), placeholder=" ..."),)
                                             for c, r in zip(cells, records)])
    if result["measured_only"]:
        out += ["", "measured only (no published counterpart):", measured(result["measured_only"])]
    if result.get("shortened"):
        out += ["", "shortened runs (not reproductions; --include-shortened pairs them):",
                measured(result["shortened"])]
    return "\n".join(out) + "\n"


def format_wide(result):
    paired, measured_only, shortened = table_cells(result)
    done = sum(1 for e in result["rows"] if e["record"] is not None)
    out = [f"== {result['paper']}: {result['title']} ({result['venue']})"
           + ("" if result.get("has_code", True) else "  [no code in this repository yet]"),
           f"   {len(result['rows'])} published rows, {done} measured, {result['n_records']} local records, "
           f"{result.get('n_reference', 0)} reference records"]
    if paired:
        out.append(text_table(COMPARE_HEADER, paired))
    else:
        out.append("(no published numbers; see the notes in common/published/%s.json)" % result["paper"])
    for i, note in footnotes_of(result)[1]:
        out.append(f"[{i}] {readable(result['paper'], note)}")
    out += _runs_text(result)
    if measured_only:
        out += ["", "measured only (no published counterpart):", text_table(MEASURED_HEADER, measured_only)]
    if shortened:
        out += ["", "shortened runs (not reproductions; --include-shortened pairs them):",
                text_table(MEASURED_HEADER, shortened)]
    return "\n".join(out) + "\n"


def format_markdown(results, reference_only=False, charts=True):
    made = ("`python -m common.compare --reference-table` (`make reference-table`) from "
            "`common/published/<paper>.json` and the committed reference records `results/reference/<paper>/` "
            "only (regenerate it after adding reference records; a test checks it is current) "
            if reference_only else
            f"`python -m common.compare` on {time.strftime('%Y-%m-%d %H:%M:%S')} from "
            "`common/published/<paper>.json`, the committed reference records `results/reference/<paper>/` and "
            "the local records `results/<paper>.jsonl` ")
    out = ["# quantlab: published vs reproduced", "",
           f"Generated by {made}(best-qualified record per model/dataset/setting/metric: "
           "full recipe, full split, newest; shortened runs are listed separately and never paired). "
           "delta = measured (local, else reference) - published. "
           "Runs on fewer samples than the official split (CIFAR-10 test 10,000; MNIST test 10,000; "
           "ImageNet val 50,000) show the binomial standard error sqrt(p(1-p)/n) in points.", ""]
    for result in results:
        paired, measured_only, shortened = table_cells(result)
        out += [f"## {result['paper']}: {result['title']} ({result['venue']})", ""]
        if not result.get("has_code", True):
            out += [f"_No code for {result['paper']} in this repository yet._", ""]
        if result["notes"]:
            out += [readable(result["paper"], result["notes"]), ""]
        out += [md_table(COMPARE_HEADER, paired) if paired else "_No published numbers._", ""]
        notes = footnotes_of(result)[1]
        if notes:
            out += [f"[{i}] {readable(result['paper'], note)}  " for i, note in notes] + [""]
        cmds = commands_of(result)
        if cmds:
            out += ["Commands and run directories:", ""] + [f"- `{c}`" for c in cmds] + [""]
        header, cells = seed_run_cells(result)
        if cells:
            out += [f"**{SEED_RUNS_TITLE[0].upper()}{SEED_RUNS_TITLE[1:-1]}:**", "", md_table(header, cells), ""]
        out += ["**Measured only** (no published counterpart):", ""]
        out += [md_table(MEASURED_HEADER, measured_only) if measured_only else "_none_", ""]
        if shortened:
            out += ["**Shortened runs** (not reproductions):", "", md_table(MEASURED_HEADER, shortened), ""]
        if charts:
            out += [f"![{result['paper']}: published vs measured](compare_{result['paper']}.png)", ""]
    return "\n".join(out)
