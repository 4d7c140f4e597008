#!/usr/bin/env python
"""Reproduce an ablation table from one small YAML: rows x seeds, mean +- std, Markdown/CSV/PNG.

    python tools/ablate.py --table gate_init [--seeds 3] [--quick] [--real] [--out outputs/ablations]
        [--jobs N] [--time-limit SECONDS [--run-seconds S]] [--wandb-mode disabled|offline|online]
        [--rows LABEL ...] [--reference LABEL] [--dry-run] [--collect] [--no-reuse] [-- KEY VALUE ...]

A table file (``configs/ablations/<name>.yaml``) names the training script, the columns
(keys of each run's ``summary.json``) and the rows::

    script: train_net.py                 # or train_b1_improvement.py
    columns: [mAP, rank1, mINP]
    reference: new init 0.5/0.5          # optional: each other row's paired difference to this row
    quick: [SOLVER.MAX_EPOCHS, "4"]      # overrides added by --quick (CPU minutes)
    rows:
      - label: gate init 1.0/0.0
        config: configs/synthetic/DeMo_SDTPS_tiny.yml
        real_config: configs/RGBNT201/DeMo_SDTPS_DGAF.yml   # used with --real (required there)
        quick_config: ...                # optional, used with --quick
        args: [--init_scale, "1.0", --init_bias, "0.0"]
        overrides: []
        feature: moe                     # optional: score this retrieval feature (summary key moe/mAP ...)

Every (row, seed) runs in its own folder ``<out>/<table>[-quick|-real]/<row>/seed<k>``; a finished run
(``summary.json`` present) is kept, an interrupted one resumed, so the command can be repeated after a
crash. A row that trains exactly what an earlier row trains (same config, args and overrides; e.g. the
same model scored by another ``feature``) reads that row's runs. A run whose resolved config (every key
but ``OUTPUT_DIR`` and ``WANDB``, the seed included) a finished run of any table under ``--out`` already
trained is copied from it (checkpoints left out, ``REUSED_FROM`` naming the source) instead of trained
again; ``--no-reuse`` trains it anyway. A row whose runs fail is marked ``failed: <reason>`` and the
others still run.

With a ``reference`` row (or ``--reference LABEL``), every other row also gets, per column, the paired
difference to it over the seeds both have (same seed = same data order and, where the architectures
allow, the same init): its mean and the half-width of its 95% confidence interval (Student t, n - 1
degrees of freedom), marked ``*`` when the interval excludes 0; the CSV has ``delta_<column>_mean`` and
``delta_<column>_ci95``.

``--time-limit`` starts no run that would not end in time (a GPU lease, a batch job): the next call
runs the rest. ``--collect`` trains nothing: it renders the table from the runs that finished (e.g.
copied back from a GPU machine), each row counting its seeds. Outputs: ``<table>.md``, ``<table>.csv``,
``<table>.png`` and, with W&B on, a ``wandb.Table``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from utils.io import atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
TABLE_DIR = REPO / "configs" / "ablations"


class AblationError(ValueError):
    """The table file is unusable; the message names the field."""


def load_table(name: str) -> dict[str, Any]:
    """Read ``configs/ablations/<name>.yaml`` (or a path) and check its fields."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else TABLE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TABLE_DIR.glob("*.yaml")))
        raise AblationError(f"no ablation table '{name}' ({path}); known tables: {known}")
    spec = yaml.safe_load(path.read_text()) or {}
    for key in ("script", "columns", "rows"):
        if key not in spec:
            raise AblationError(f"{path}: missing '{key}'")
    for i, row in enumerate(spec["rows"]):
        if "label" not in row or "config" not in row:
            raise AblationError(f"{path}: row {i} needs 'label' and 'config'")
    if "reference" in spec and spec["reference"] not in [r["label"] for r in spec["rows"]]:
        raise AblationError(f"{path}: reference '{spec['reference']}' is not the label of a row")
    spec["_name"] = path.stem
    return spec


def slug(label: str) -> str:
    """Folder name for a row label."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label).strip("_")[:80]


def row_config(row: dict[str, Any], quick: bool, real: bool) -> str:
    """The config file a row trains with in this mode (``--real``: its ``real_config``, which it must have)."""
    if real:
        return row["real_config"]
    return row.get("quick_config", row["config"]) if quick else row["config"]


def run_identity(row: dict[str, Any], quick: bool, real: bool) -> tuple[str, ...]:
    """What a row trains: its config, arguments and overrides (rows with equal identities share runs)."""
    return (row_config(row, quick, real), *map(str, row.get("args", [])), "|", *_flat(row.get("overrides", [])))


def run_command(spec: dict[str, Any], row: dict[str, Any], seed: int, run_dir: Path, quick: bool, real: bool,
                wandb_mode: str, extra: list[str] = ()) -> list[str]:
    """The training command of one (row, seed)."""
    config = row_config(row, quick, real)
    cmd = [sys.executable, spec["script"], "--config_file", config, *map(str, row.get("args", []))]
    if (run_dir / "last_checkpoint").is_file() and not (run_dir / "summary.json").is_file():
        cmd.append("--resume")  # before the KEY VALUE pairs
    cmd += _flat(row.get("overrides", []))
    if quick:
        cmd += [str(x) for x in spec.get("quick", [])]
    cmd += list(extra)
    cmd += ["SEED", str(seed), "OUTPUT_DIR", str(run_dir), "WANDB.MODE", wandb_mode,
            "WANDB.GROUP", f"ablation-{spec['_name']}", "WANDB.NAME", f"{slug(row['label'])}-seed{seed}"]
    return cmd


def prepare_pretrained(spec: dict[str, Any], rows: list[dict[str, Any]], quick: bool, real: bool, extra: list[str], todo: list[int]) -> None:
    """Make the pretrained towers the rows to run name (``MODEL.PRETRAIN_RECIPE``) once, with every CPU,
    before the runs start side by side (each would otherwise wait for the first to make it)."""
    from engine.config import load_config
    from engine.tower_pretrain import ensure_pretrained_tower

    if Path(spec["script"]).name != "train_net.py":
        return
    done: set[tuple[str, str]] = set()
    for i in sorted(set(todo)):
        row = rows[i]
        cfg = load_config(row_config(row, quick, real), [*_flat(row.get("overrides", [])), *extra])
        key = (cfg.MODEL.get("PRETRAIN_RECIPE", ""), cfg.MODEL.get("PRETRAIN_PATH", ""))
        if key[0] and key not in done:
            ensure_pretrained_tower(cfg)
            done.add(key)


def _flat(items: list[Any]) -> list[str]:
    """Overrides as strings; nested lists (YAML anchors shared by several rows) are spliced in."""
    out: list[str] = []
    for item in items:
        out += _flat(item) if isinstance(item, list) else [str(item)]
    return out


def aggregate(values: dict[int, float]) -> tuple[float, float]:
    """Mean and sample standard deviation over the seeds (0 for one value)."""
    vals = list(values.values())
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def paired_difference(row: dict[int, float], ref: dict[int, float], level: float = 0.95) -> tuple[float, float, int]:
    """``(mean, half-width, n)`` of the per-seed differences ``row[s] - ref[s]`` over the seeds both have.

    The interval is ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)`` (Student t, ``sd`` with n - 1);
    its half-width is NaN below two pairs.
    """
    from scipy.stats import t as student_t  # scipy comes with scikit-learn (requirements.txt)

    diffs = [row[s] - ref[s] for s in sorted(set(row) & set(ref))]
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan, n
    return mean, float(student_t.ppf((1 + level) / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n), n


def _delta_cell(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{100 * mean:+.2f} (1 seed)"
    return f"{100 * mean:+.2f} ± {100 * half:.2f}" + (" *" if abs(mean) > half else "")


def render(spec: dict[str, Any], results: list[dict[str, Any]], seeds: int) -> tuple[str, str]:
    """Markdown and CSV of the table; metric values in percent, with paired differences to ``reference``."""
    cols = spec["columns"]
    ref = next((r for r in results if r["label"] == spec.get("reference")), None)
    deltas = [f"Δ {c}" for c in cols] if ref is not None else []
    md = f"| row | {' | '.join([*cols, *deltas])} | seeds |\n|---|" + "---|" * (len(cols) + len(deltas) + 1) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["row", *[f"{c}_mean" for c in cols], *[f"{c}_std" for c in cols]]
    if ref is not None:
        header += [f"delta_{c}_{k}" for c in cols for k in ("mean", "ci95")]
    writer.writerow([*header, "seeds_ok", "status"])
    for r in results:
        cells = []
        for c in cols:
            mean, std = aggregate(r["values"][c])
            cells.append("–" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}")
        paired = [paired_difference(r["values"][c], ref["values"][c])[:2] for c in cols] if ref is not None else []
        if ref is not None:
            cells += ["reference" if r is ref else _delta_cell(*d) for d in paired]
        status = f"{len(r['values'][cols[0]])}/{seeds}"
        if r["errors"]:
            status += f" (failed: {r['errors'][0]})"
        md += f"| {r['label']} | {' | '.join(cells)} | {status} |\n"
        flat_deltas = [x for d in paired for x in (("", "") if r is ref else d)]
        writer.writerow([r["label"], *[aggregate(r["values"][c])[0] for c in cols],
                         *[aggregate(r["values"][c])[1] for c in cols], *flat_deltas, len(r["values"][cols[0]]),
                         "; ".join(r["errors"]) or "ok"])
    if ref is not None:
        md += (f"\nΔ: paired difference to '{ref['label']}' over the seeds both rows have, mean ± 95% "
               "confidence interval (Student t); * marks an interval that excludes 0.\n")
    return md, buf.getvalue()


def plot(spec: dict[str, Any], results: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of the first column, mean with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = spec["columns"][0]
    means = [100 * aggregate(r["values"][col])[0] for r in results]
    stds = [100 * aggregate(r["values"][col])[1] for r in results]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(results)), 3.2))
    ax.bar(range(len(results)), [0 if math.isnan(m) else m for m in means],
           yerr=[0 if math.isnan(s) else s for s in stds], capsize=4, color="#4477aa")
    ax.set_xticks(range(len(results)), [r["label"] for r in results], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{col} (%)")
    ax.set_title(f"ablation: {spec['_name']}")
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    plt.close(fig)


#: keys that name a run rather than say what it trains (left out when runs are compared)
RUN_NAMING_KEYS = ("OUTPUT_DIR", "WANDB")


def trained_config(config_file: str | Path | None, overrides: list[str]) -> str | None:
    """What a run trains: its resolved config as YAML text without the keys that only name the run
    (``OUTPUT_DIR``, ``WANDB``); ``None`` when the config cannot be read (a key that no longer exists)."""
    from engine.config import ConfigError, load_config

    try:
        cfg = load_config(config_file, overrides, freeze=False)
    except (ConfigError, FileNotFoundError, ValueError):
        return None
    for key in RUN_NAMING_KEYS:
        cfg.pop(key, None)
    return cfg.dump()


def command_config(cmd: list[str]) -> str | None:
    """:func:`trained_config` of a training command (``python SCRIPT --config_file F [flags] KEY VALUE ...``)."""
    from engine.defaults import default_argument_parser, overrides_from_args

    args, _ = default_argument_parser("", gate_flags=True).parse_known_args(cmd[2:])
    return trained_config(args.config_file or None, overrides_from_args(args))


def finished_runs(root: Path) -> dict[str, Path]:
    """Every finished run under ``root`` (``<table>/<row>/seed<k>`` with ``summary.json``) by what it trained."""
    found: dict[str, Path] = {}
    for summary in sorted(root.glob("*/*/seed*/summary.json")):
        text = trained_config(summary.parent / "config.yaml", [])
        if text is not None:
            found.setdefault(text, summary.parent)
    return found


def reuse_run(source: Path, run_dir: Path) -> None:
    """Make ``run_dir`` a finished copy of the run in ``source`` (its files without checkpoints), noting where
    it came from."""
    import shutil

    run_dir.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".pth" and path.name != "summary.json":
            shutil.copy2(path, run_dir / path.name)
    (run_dir / "REUSED_FROM").write_text(f"{source}\n")
    shutil.copy2(source / "summary.json", run_dir / "summary.json")  # last: marks the copy finished


def cpu_slots(jobs: int) -> list[set[int] | None]:
    """Split this process's CPUs into ``jobs`` disjoint sets (``None`` each when there are too few).

    A run pinned to its set sees only those CPUs, so its data-loader default
    (``DATALOADER.NUM_WORKERS -1``) and thread pools size themselves to its share.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return [None] * jobs
    if jobs <= 1 or len(cpus) < jobs:
        return [None] * jobs
    k = len(cpus) // jobs
    return [set(cpus[i * k:(i + 1) * k]) for i in range(jobs)]


def execute(cmd: list[str], cpus: set[int] | None) -> str | None:
    """Run one training command (pinned to ``cpus``); ``None`` on success, else its last error line."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if cpus:
        env["OMP_NUM_THREADS"] = str(len(cpus))
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # a syscall only: safe after fork
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, preexec_fn=pin)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def run_all(tasks: list[tuple[int, int, str, list[str]]], jobs: int, time_limit: float | None = None,
            run_seconds: float = 0.0) -> dict[tuple[int, int], str]:
    """Run the (row, seed, label, command) tasks, ``jobs`` at a time; errors by (row, seed).

    With ``time_limit`` (seconds from now), a run is not started unless it is expected to end in time:
    expected to take as long as the longest run finished so far (``run_seconds`` before any has). Runs
    already going are never stopped; those not started are reported as such and run on the next call.
    """
    errors: dict[tuple[int, int], str] = {}
    slots: queue.Queue = queue.Queue()
    for cpus in cpu_slots(jobs):
        slots.put(cpus)
    done = 0
    longest = float(run_seconds)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    lock = threading.Lock()

    def one(task: tuple[int, int, str, list[str]]) -> None:
        nonlocal done, longest
        row, seed, label, cmd = task
        cpus = slots.get()
        with lock:
            late = deadline is not None and time.monotonic() + longest > deadline
            if late:
                done += 1
                errors[(row, seed)] = "not started: it would not end within --time-limit"
                print(f"[{done}/{len(tasks)}] row {row} seed {seed}: not started (--time-limit; about "
                      f"{longest:.0f} s a run)", flush=True)
            else:
                print(f"=== row {row} ({label}) seed {seed}", flush=True)
        if late:
            slots.put(cpus)
            return
        start = time.perf_counter()
        try:
            err = execute(cmd, cpus)
        finally:
            slots.put(cpus)
        took = time.perf_counter() - start
        with lock:
            done += 1
            if err is not None:
                errors[(row, seed)] = err
            else:
                longest = max(longest, took)
            state = "ok" if err is None else f"FAILED: {err}"
            print(f"[{done}/{len(tasks)}] row {row} seed {seed}: {state} ({took:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, tasks))
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, help="name in configs/ablations/ or a YAML path")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="add the table's 'quick' overrides (CPU minutes)")
    parser.add_argument("--real", action="store_true", help="use each row's real_config (real benchmarks)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these row labels")
    parser.add_argument("--out", default="outputs/ablations")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs side by side (e.g. several small runs on one GPU), each pinned to its share "
                             "of the CPUs")
    parser.add_argument("--wandb-mode", default="disabled", choices=("disabled", "offline", "online"))
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no run that would not end within SECONDS (a GPU lease, a batch job's limit); "
                             "the rest run on the next call")
    parser.add_argument("--run-seconds", type=float, default=0.0,
                        help="with --time-limit: how long a run takes, until one has finished here")
    parser.add_argument("--reference", default=None, help="the row the Δ columns compare with (default: the table's)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--no-reuse", action="store_true",
                        help="train every run, even one whose config a finished run under --out already trained")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: render the table from the finished runs in --out")
    parser.add_argument("overrides", nargs="*", help="KEY VALUE config overrides added to every run")
    args = parser.parse_args(argv)
    try:
        spec = load_table(args.table)
    except AblationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    labels = [r["label"] for r in spec["rows"]]
    unknown = [label for label in args.rows or [] if label not in labels]
    if unknown or args.seeds < 1:
        what = f"--rows {', '.join(repr(u) for u in unknown)} is not a row of table {spec['_name']}" if unknown else \
            f"--seeds {args.seeds} selects no run (at least 1)"
        print(f"error: {what}; nothing was run or written. Rows: {', '.join(repr(x) for x in labels)}", file=sys.stderr)
        return 2
    rows = [r for r in spec["rows"] if args.rows is None or r["label"] in args.rows]
    if args.reference is not None:
        if args.reference not in [r["label"] for r in rows]:
            print(f"error: --reference '{args.reference}' is not one of the rows: "
                  f"{', '.join(r['label'] for r in rows)}", file=sys.stderr)
            return 2
        spec["reference"] = args.reference
    synthetic_only = [r["label"] for r in rows if "real_config" not in r]
    if args.real and synthetic_only:
        print(f"error: --real: table {spec['_name']} has no real_config for {', '.join(synthetic_only)} (these rows "
              "run on the synthetic sets only)", file=sys.stderr)
        return 2
    # quick, synthetic and real runs of one table never share (or reuse) each other's folders
    out = Path(args.out) / (spec["_name"] + ("-quick" if args.quick else "-real" if args.real else ""))
    tasks = []
    # runs of other tables (or rows) that trained exactly what a (row, seed) would train
    elsewhere = finished_runs(Path(args.out)) if not args.dry_run and not args.no_reuse else {}
    trained_by: dict[tuple[str, ...], int] = {}  # run identity -> the first row that trains it
    run_row = []  # for each row, the row whose runs it reads
    for i, row in enumerate(rows):
        owner = trained_by.setdefault(run_identity(row, args.quick, args.real), i)
        run_row.append(owner)
        if owner != i:
            print(f"row {i} ({row['label']}) reads the runs of row {owner} ({rows[owner]['label']})")
            continue
        for seed in range(args.seeds):
            run_dir = out / slug(row["label"]) / f"seed{seed}"
            cmd = run_command(spec, row, seed, run_dir, args.quick, args.real, args.wandb_mode, args.overrides)
            if args.dry_run:
                print(" ".join(cmd))
            elif not (run_dir / "summary.json").is_file():
                source = elsewhere.get(command_config(cmd)) if elsewhere else None
                if source is not None:
                    reuse_run(source, run_dir)
                    print(f"row {i} ({row['label']}) seed {seed}: reuses {source} (the same config)")
                elif not args.collect:
                    tasks.append((i, seed, row["label"], cmd))
    if args.dry_run:
        return 0
    prepare_pretrained(spec, rows, args.quick, args.real, args.overrides, [t[0] for t in tasks])
    errors = run_all(tasks, args.jobs, args.time_limit, args.run_seconds)
    results = []
    for i, row in enumerate(rows):
        result = {"label": row["label"], "values": {c: {} for c in spec["columns"]}, "errors": []}
        owner = run_row[i]
        prefix = f"{row['feature']}/" if row.get("feature") else ""
        for seed in range(args.seeds):
            if (owner, seed) in errors:
                result["errors"].append(f"seed {seed}: {errors[(owner, seed)]}")
                continue
            summary_path = out / slug(rows[owner]["label"]) / f"seed{seed}" / "summary.json"
            if not summary_path.is_file():
                if args.collect:  # not run (yet): the status column counts the seeds that are there
                    continue
                result["errors"].append(f"seed {seed}: finished without {summary_path.name}")
                continue
            summary = json.loads(summary_path.read_text())
            for c in spec["columns"]:
                if prefix + c in summary:
                    result["values"][c][seed] = float(summary[prefix + c])
                elif prefix:
                    result["errors"].append(f"seed {seed}: no '{prefix + c}' in {summary_path}")
        results.append(result)
    if not any(r["values"][c] for r in results for c in spec["columns"]) and (out / f"{spec['_name']}.md").exists():
        print(f"error: no finished run of table {spec['_name']} under {out}: nothing to render; the table's "
              "earlier files were left as they were", file=sys.stderr)
        return 2
    md, csv_text = render(spec, results, args.seeds)
    atomic_write_text(out / f"{spec['_name']}.md", f"### {spec['_name']}\n\n{md}")
    atomic_write_text(out / f"{spec['_name']}.csv", csv_text)
    plot(spec, results, out / f"{spec['_name']}.png")
    if args.wandb_mode != "disabled":
        try:
            import wandb

            run = wandb.init(mode=args.wandb_mode, dir=str(out), project="demo-sdtps-expb1",
                             name=f"ablation-{spec['_name']}", job_type="ablation")
            table = wandb.Table(columns=["row", *spec["columns"]],
                                data=[[r["label"], *[aggregate(r["values"][c])[0] for c in spec["columns"]]]
                                      for r in results])
            run.log({f"ablation/{spec['_name']}": table})
            run.finish()
        except Exception as err:  # the table on disk is the result; W&B is a copy
            print(f"W&B table not logged: {err}", file=sys.stderr)
    print(md)
    return 0 if not any(r["errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
