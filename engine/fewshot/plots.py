"""Plots of a run's metrics (read back from ``metrics.jsonl``), written as PNG with matplotlib's Agg backend."""

from __future__ import annotations

import json
import math
from pathlib import Path

SAP_PLOT = "sap_stats.png"


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Every record of a ``metrics.jsonl`` file (blank or damaged lines are skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def series(records: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the records that hold ``key`` (a resumed run's repeats keep the last)."""
    by_step: dict[float, float] = {}
    for r in records:
        if key in r and r[key] is not None and math.isfinite(float(r[key])):
            by_step[float(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_sap_stats(metrics_file: str | Path, out_file: str | Path, n_way: int, logit_scale_max: float = 100.0,
                   prefix: str = "train") -> Path | None:
    """Three panels over training steps: attention entropy vs log(n_way), attention max vs
    1/n_way, and the logit scale (with its ceiling). Returns the PNG path, or None when the
    metrics hold no SAP stats (SAP disabled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    ent = series(records, f"{prefix}/attn_entropy")
    mx = series(records, f"{prefix}/attn_max")
    scale = series(records, f"{prefix}/logit_scale")
    if not ent[0]:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(*ent, label="attention entropy")
    axes[0].axhline(math.log(n_way), color="r", ls="--", label=f"log({n_way}) = {math.log(n_way):.3f} (uniform)")
    axes[0].set_ylabel("nats")
    axes[1].plot(*mx, label="mean max attention")
    axes[1].axhline(1.0 / n_way, color="r", ls="--", label=f"1/{n_way} = {1.0 / n_way:.3f} (uniform)")
    axes[2].plot(*scale, label="logit scale")
    if max(scale[1], default=0.0) > 0.5 * logit_scale_max:  # else the ceiling line would flatten the curve
        axes[2].axhline(logit_scale_max, color="r", ls="--", label=f"ceiling {logit_scale_max:g}")
    else:
        axes[2].plot([], [], " ", label=f"ceiling {logit_scale_max:g} (off the axis)")
    clipped = series(records, f"{prefix}/logit_scale_clipped")
    if clipped[0] and max(clipped[1]) > 0:
        ax2 = axes[2].twinx()
        ax2.plot(*clipped, color="gray", alpha=0.5, label="fraction at ceiling")
        ax2.set_ylim(0, 1)
    for ax, title in zip(axes, ("SAP attention entropy", "SAP attention max", "SAP logit scale")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_file)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
