"""Rendering a grid's results: an ablation table (Markdown, CSV, bar plot, W&B table) and a sweep summary.

Ablation values are shown in percent as ``mean ± std`` over seeds; with a reference row, every other row
also gets, per column, its seed-paired difference to it (``Δ mean ± 95% CI``, Student t, ``*`` where the
interval excludes 0; CSV: ``delta_<column>_mean``, ``delta_<column>_ci95``).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from engine.experiments.stats import mean_and_std, paired_seed_difference
from utils.io import atomic_write, atomic_write_text


def delta_cell(mean: float, half: float) -> str:
    """A Δ cell in percent: ``+3.00 ± 1.20 *``, ``+3.00 (1 seed)`` or ``–`` (no pair)."""
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{100 * mean:+.2f} (1 seed)"
    return f"{100 * mean:+.2f} ± {100 * half:.2f}" + (" *" if abs(mean) > half else "")


def render_table(spec: dict[str, Any], results: list[dict[str, Any]], seeds: int) -> tuple[str, str]:
    """Markdown and CSV of an ablation table (``results``: :func:`engine.experiments.collect.collect_row` rows),
    with the paired differences to ``spec["reference"]`` when it names a row."""
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
        stats = [mean_and_std(r["values"][c]) for c in cols]
        cells = ["–" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}" for mean, std in stats]
        paired = [paired_seed_difference(r["values"][c], ref["values"][c])[:2] for c in cols] if ref is not None else []
        cells += ["reference" if r is ref else delta_cell(*d) for d in paired]
        status = f"{len(r['values'][cols[0]])}/{seeds}"
        if r["errors"]:
            status += f" (failed: {r['errors'][0]})"
        md += f"| {r['label']} | {' | '.join(cells)} | {status} |\n"
        flat_deltas = [x for d in paired for x in (("", "") if r is ref else d)]
        writer.writerow([r["label"], *[s[0] for s in stats], *[s[1] for s in stats], *flat_deltas,
                         len(r["values"][cols[0]]), "; ".join(r["errors"]) or "ok"])
    if ref is not None:
        md += (f"\nΔ: paired difference to '{ref['label']}' over the seeds both rows have, mean ± 95% "
               "confidence interval (Student t); * marks an interval that excludes 0.\n")
    return md, buf.getvalue()


def plot_table(spec: dict[str, Any], results: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of the table's first column, mean with std error bars, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = spec["columns"][0]
    stats = [mean_and_std(r["values"][col]) for r in results]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(results)), 3.2))
    ax.bar(range(len(results)), [0 if math.isnan(m) else 100 * m for m, _ in stats],
           yerr=[0 if math.isnan(s) else 100 * s for _, s in stats], capsize=4, color="#4477aa")
    ax.set_xticks(range(len(results)), [r["label"] for r in results], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{col} (%)")
    ax.set_title(f"ablation: {spec['_name']}")
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    plt.close(fig)


def log_wandb_table(spec: dict[str, Any], results: list[dict[str, Any]], folder: Path, mode: str) -> str | None:
    """Log the table's means as a ``wandb.Table`` (W&B ``mode`` offline or online); returns why not, if not."""
    try:
        import wandb

        run = wandb.init(mode=mode, dir=str(folder), project="demo-sdtps-expb1", name=f"ablation-{spec['_name']}",
                         job_type="ablation")
        table = wandb.Table(columns=["row", *spec["columns"]],
                            data=[[r["label"], *[mean_and_std(r["values"][c])[0] for c in spec["columns"]]]
                                  for r in results])
        run.log({f"ablation/{spec['_name']}": table})
        run.finish()
    except Exception as err:  # the table on disk is the result; W&B is a copy
        return str(err)
    return None


def write_sweep_summary(out_dir: Path, spec: dict[str, Any], runs: list[Any]) -> str:
    """``summary.md`` and ``summary.csv`` in ``out_dir``: every run (``name``, ``params``, ``status``,
    ``value``) with its parameters, status and the sweep metric, then the best run; returns the Markdown."""
    metric = spec.get("metric", {}).get("name", "")
    names = list(spec["parameters"])
    header = ["run", *names, "status", metric or "metric"]
    rows = [[r.name, *[str(r.params[n]) for n in names], r.status, "" if r.value is None else f"{r.value:.4f}"]
            for r in runs]
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    atomic_write_text(out_dir / "summary.csv", buf.getvalue())
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    done = [r for r in runs if r.value is not None]
    if done and metric:
        goal = spec.get("metric", {}).get("goal", "maximize")
        best = (max if goal == "maximize" else min)(done, key=lambda r: r.value)
        md += f"\nbest ({goal} {metric}): {best.name} = {best.value:.4f}\n"
    atomic_write_text(out_dir / "summary.md", md)
    return md
