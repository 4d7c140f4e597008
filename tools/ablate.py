#!/usr/bin/env python
"""Reproduce an ablation table from one small YAML: rows x seeds, mean +- std, Markdown/CSV/PNG.

    python tools/ablate.py --table gate_init [--seeds 3] [--quick] [--real] [--out outputs/ablations]
        [--jobs N] [--gpus all|none|0,1] [--time-limit SECONDS [--run-seconds S]] [--wandb-mode disabled|offline|online]
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
import sys
import time
from pathlib import Path
from typing import Any

from engine.experiments.collect import SUMMARY, collect_row, finished_runs, reuse_run
from engine.experiments.commands import table_command
from engine.experiments.configs import command_config, folder_config
from engine.experiments.grid import flat_overrides, row_config, row_owners, run_folder, table_folder
from engine.experiments.jobs import Job, parse_gpus, run_jobs
from engine.experiments.specs import AblationError, load_table
from engine.experiments.tables import log_wandb_table, plot_table, render_table
from utils.io import atomic_write_text


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--gpus", default="all", metavar="all|none|0,1",
                        help="the GPUs the runs take in turn, one each (CUDA_VISIBLE_DEVICES): all visible "
                             "(default), none, or device ids; --jobs 6 --gpus 0,1 runs three on each")
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
    return parser


def select_rows(spec: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows ``--rows`` selects (all by default), after checking ``--seeds``, ``--reference`` (which then
    becomes the table's reference) and ``--real``; :class:`AblationError` says what does not fit."""
    labels = [r["label"] for r in spec["rows"]]
    unknown = [label for label in args.rows or [] if label not in labels]
    if unknown or args.seeds < 1:
        what = f"--rows {', '.join(repr(u) for u in unknown)} is not a row of table {spec['_name']}" if unknown else \
            f"--seeds {args.seeds} selects no run (at least 1)"
        raise AblationError(f"{what}; nothing was run or written. Rows: {', '.join(repr(x) for x in labels)}")
    rows = [r for r in spec["rows"] if args.rows is None or r["label"] in args.rows]
    if args.reference is not None:
        if args.reference not in [r["label"] for r in rows]:
            raise AblationError(f"--reference '{args.reference}' is not one of the rows: "
                                f"{', '.join(r['label'] for r in rows)}")
        spec["reference"] = args.reference
    synthetic_only = [r["label"] for r in rows if "real_config" not in r]
    if args.real and synthetic_only:
        raise AblationError(f"--real: table {spec['_name']} has no real_config for {', '.join(synthetic_only)} "
                            "(these rows run on the synthetic sets only)")
    return rows


def plan(spec: dict[str, Any], rows: list[dict[str, Any]], owners: list[int], folder: Path,
         args: argparse.Namespace) -> list[Job]:
    """The (row, seed) runs left to train. On the way: say which rows read another row's runs, print the
    commands (``--dry-run``), and copy a finished run of the same config under ``--out`` (unless ``--no-reuse``)."""
    elsewhere = finished_runs(Path(args.out), folder_config) if not args.dry_run and not args.no_reuse else {}
    jobs = []
    for i, row in enumerate(rows):
        if owners[i] != i:
            print(f"row {i} ({row['label']}) reads the runs of row {owners[i]} ({rows[owners[i]]['label']})")
            continue
        for seed in range(args.seeds):
            run_dir = run_folder(folder, row["label"], seed)
            cmd = table_command(spec, row, seed, run_dir, args.quick, args.real, args.wandb_mode, args.overrides)
            if args.dry_run:
                print(" ".join(cmd))
            elif not (run_dir / SUMMARY).is_file():
                source = elsewhere.get(command_config(cmd)) if elsewhere else None
                if source is not None:
                    reuse_run(source, run_dir)
                    print(f"row {i} ({row['label']}) seed {seed}: reuses {source} (the same config)")
                elif not args.collect:
                    jobs.append(Job((i, seed), f"row {i} seed {seed}", cmd, f"=== row {i} ({row['label']}) seed {seed}"))
    return jobs


def prepare_pretrained(spec: dict[str, Any], rows: list[dict[str, Any]], quick: bool, real: bool, extra: list[str],
                       todo: list[tuple[int, int]], workers: int) -> None:
    """Make the pretrained pieces that the (row, seed) runs to train name, once each, before the runs start side
    by side (each run would otherwise wait for the first to make it, holding its place): ReID's towers
    (``MODEL.PRETRAIN_RECIPE``), the few-shot name towers (``MODEL.SAP.TEXT_TOWER_RECIPE``) and each seed's
    shared pre-training (``FEWSHOT.PRETRAIN.RECIPE``), ``workers`` at a time (each in a process of its own)."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.config import ConfigError, load_config

    fewshot = Path(spec["script"]).name != "train_net.py"
    if fewshot:
        from engine.fewshot.pretrained import ensure_pretrained, pretrained_file
        from engine.fewshot.text_tower import ensure_text_tower, makes_text_tower
    else:
        from engine.reid.tower_pretrain import ensure_pretrained_tower
    pieces: dict[tuple[str, str], Any] = {}
    for i, seed in sorted(set(todo)):
        row = rows[i]
        opts = [*flat_overrides(row.get("overrides", [])), *(map(str, spec.get("quick", [])) if quick else []),
                *extra, "SEED", str(seed)]
        cfg = load_config(row_config(row, quick, real), opts)
        if not fewshot:
            if cfg.MODEL.get("PRETRAIN_RECIPE", ""):
                pieces.setdefault(("tower", cfg.MODEL.PRETRAIN_PATH), lambda c=cfg: ensure_pretrained_tower(c))
            continue
        if makes_text_tower(cfg):
            pieces.setdefault(("name tower", cfg.MODEL.SAP.TEXT_TOWER), lambda c=cfg: ensure_text_tower(c))
        if cfg.FEWSHOT.PRETRAIN.RECIPE:
            pieces.setdefault(("pre-training", str(pretrained_file(cfg))), lambda c=cfg: ensure_pretrained(c))
    pieces = {key: fn for key, fn in pieces.items() if not Path(key[1]).is_file()}  # a run checks a made one
    if not pieces:
        return
    print(f"making {len(pieces)} pretrained piece(s) first, {workers} at a time: "
          + ", ".join(f"{what} {path}" for what, path in pieces))

    def make(item: tuple[tuple[str, str], Any]) -> None:
        (what, path), fn = item
        try:
            fn()
        except ConfigError as err:  # the runs that need it fail with the same error, and say so in the table
            print(f"error: making the {what} {path} failed: {err}", file=sys.stderr)

    first = sorted(pieces.items(), key=lambda item: item[0][0] != "name tower")  # the longest to make
    with ThreadPoolExecutor(max_workers=1 if not fewshot else workers) as pool:
        list(pool.map(make, first))


def collect_rows(spec: dict[str, Any], rows: list[dict[str, Any]], owners: list[int], folder: Path, seeds: int,
                 errors: dict[Any, str], collect_only: bool) -> list[dict[str, Any]]:
    """Every row's values over its seeds, read from the runs of the row that trained them."""
    results = []
    for i, row in enumerate(rows):
        owner = rows[owners[i]]
        run_dirs = {seed: run_folder(folder, owner["label"], seed) for seed in range(seeds)}
        failed = {seed: errors[(owners[i], seed)] for seed in range(seeds) if (owners[i], seed) in errors}
        results.append(collect_row(row["label"], spec["columns"], run_dirs, failed, row.get("feature", ""),
                                   expect_finished=not collect_only))
    return results


def write_table(spec: dict[str, Any], results: list[dict[str, Any]], folder: Path, args: argparse.Namespace) -> int:
    """Write ``<table>.md``, ``.csv``, ``.png`` (and the W&B table) and print the Markdown; the exit status."""
    name = spec["_name"]
    if not any(r["values"][c] for r in results for c in spec["columns"]) and (folder / f"{name}.md").exists():
        print(f"error: no finished run of table {name} under {folder}: nothing to render; the table's "
              "earlier files were left as they were", file=sys.stderr)
        return 2
    md, csv_text = render_table(spec, results, args.seeds)
    atomic_write_text(folder / f"{name}.md", f"### {name}\n\n{md}")
    atomic_write_text(folder / f"{name}.csv", csv_text)
    plot_table(spec, results, folder / f"{name}.png")
    if args.wandb_mode != "disabled":
        failure = log_wandb_table(spec, results, folder, args.wandb_mode)
        if failure is not None:
            print(f"W&B table not logged: {failure}", file=sys.stderr)
    print(md)
    return 0 if not any(r["errors"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # --time-limit counts from here, the pretrained pieces' making included
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = load_table(args.table)
    except AblationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    try:
        gpus = parse_gpus(args.gpus)
    except ValueError as err:
        parser.error(str(err))
    try:
        rows = select_rows(spec, args)
    except AblationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = table_folder(Path(args.out), spec["_name"], args.quick, args.real)
    owners = row_owners(rows, args.quick, args.real)
    jobs = plan(spec, rows, owners, folder, args)
    if args.dry_run:
        return 0
    prepare_pretrained(spec, rows, args.quick, args.real, args.overrides, [job.key for job in jobs], args.jobs)
    left = None if args.time_limit is None else args.time_limit - (time.monotonic() - started)
    errors = run_jobs(jobs, args.jobs, left, args.run_seconds, env={"TQDM_DISABLE": "1"}, gpus=gpus)
    results = collect_rows(spec, rows, owners, folder, args.seeds, errors, args.collect)
    return write_table(spec, results, folder, args)


if __name__ == "__main__":
    sys.exit(main())
