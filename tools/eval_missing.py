#!/usr/bin/env python
"""DeMo's missing-modality table for one checkpoint: the six TEST.MISS settings in one command.

    python tools/eval_missing.py --config_file configs/RGBNT201/DeMo.yml [--force] MODEL.WEIGHTS model.pth [KEY VALUE ...]

Evaluates the checkpoint (``--resume PATH``, else ``MODEL.WEIGHTS``, else the newest checkpoint
in ``OUTPUT_DIR``) with RGB, NIR, TIR, RGB+NIR, RGB+TIR and NIR+TIR missing (``TEST.MISS`` r, n,
t, rn, rt, nt, DeMo's meaning), each by ``TEST.MISS_MODE`` (``zero``: DeMo's zeroed images;
``mask``: the learned null token), and writes mAP / Rank-1 of the retrieval feature with their
average as ``missing_table.md``, ``.csv`` and ``.json`` in ``OUTPUT_DIR``.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

from engine.defaults import default_argument_parser, default_setup, main_entry
from engine.reid.missing import DEMO_TABLE_SETTINGS, table_label
from engine.run_lock import RunFolderError
from utils.io import atomic_write_json, atomic_write_text


def missing_table(rows: dict[str, dict[str, float]]) -> tuple[str, str]:
    """Markdown and CSV of ``{setting: {"mAP", "rank1"}}`` (fractions) in DeMo's layout, with the average."""
    labels = [table_label(code) for code in rows] + ["Average"]
    maps = [100 * r["mAP"] for r in rows.values()]
    r1s = [100 * r["rank1"] for r in rows.values()]
    maps.append(sum(maps) / len(maps))
    r1s.append(sum(r1s) / len(r1s))
    md = io.StringIO()
    md.write("| | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n")
    md.write("| mAP | " + " | ".join(f"{v:.1f}" for v in maps) + " |\n")
    md.write("| R-1 | " + " | ".join(f"{v:.1f}" for v in r1s) + " |\n")
    csv = "setting,mAP,rank1\n" + "".join(f"{lab},{m:.4f},{r:.4f}\n" for lab, m, r in zip(labels, maps, r1s))
    return md.getvalue(), csv


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Load the checkpoint once, evaluate the six settings, write and print the table."""
    args.eval_only = True  # never a training run: the folder may hold one
    cfg = default_setup(args)
    from engine.checkpoint import Checkpointer, eval_weights, resolve_resume, warn_config_differences
    from engine.reid import build_reid_setup, missing_record

    out_dir = Path(cfg.OUTPUT_DIR)
    taken = [p.name for p in (out_dir / f"missing_table{ext}" for ext in (".md", ".csv", ".json")) if p.exists()]
    if taken and not args.force:
        raise RunFolderError(f"OUTPUT_DIR {out_dir} already holds {', '.join(taken)}; nothing was written: choose "
                             "another OUTPUT_DIR, or pass --force to replace them")
    setup = build_reid_setup(cfg)
    ckpt = Checkpointer(out_dir)
    weights = eval_weights(ckpt, resolve_resume(ckpt, args.resume), cfg.MODEL.WEIGHTS)
    warn_config_differences(ckpt.load(weights, model=setup.model, restore_rng=False), cfg, weights)
    rows: dict[str, dict[str, float]] = {}
    record: dict[str, Any] = {"checkpoint": str(weights), "miss_mode": cfg.TEST.MISS_MODE, "feature": "feat",
                              "settings": {}}
    for code in DEMO_TABLE_SETTINGS:
        results, _ = setup.evaluate(cfg, miss=code)
        rows[code] = {"mAP": float(results["feat"]["mAP"]), "rank1": float(results["feat"]["rank1"])}
        record["settings"][code] = {**rows[code], **missing_record(cfg, code)}
    md, csv = missing_table(rows)
    atomic_write_text(out_dir / "missing_table.md", md)
    atomic_write_text(out_dir / "missing_table.csv", csv)
    atomic_write_json(out_dir / "missing_table.json", record)
    print(f"\nMissing modalities at test time ({weights}, TEST.MISS_MODE {cfg.TEST.MISS_MODE}):\n\n{md}")
    print(f"written to {out_dir / 'missing_table.md'} (.csv, .json)")
    return record


def build_parser() -> argparse.ArgumentParser:
    """The training scripts' options, plus ``--force``."""
    parser = default_argument_parser(__doc__)
    parser.add_argument("--force", action="store_true", help="replace an existing missing_table.* in OUTPUT_DIR")
    return parser


if __name__ == "__main__":
    sys.exit(main_entry(main, build_parser()))
