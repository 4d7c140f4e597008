"""Synthetic data sets written in the on-disk formats of the real benchmarks.

No benchmark can be downloaded on a fresh machine, so this module draws small data sets
procedurally and writes them exactly as the releases are laid out, so the real loaders
read them and every command runs end to end:

* ``--kind rgbnt``: multi-modal person ReID in the RGBNT201 layout
  (``train_171/`` and ``test/``, each with ``RGB/``, ``NI/``, ``TI/`` holding the same
  ``<pid:06d>_cam<c>_0_<k:02d>.jpg`` names). Each identity is a drawn person (body shape,
  clothing colours and patterns, sleeves, trousers/shorts/skirt, backpack, hat, shoulder bag,
  scarf, hair) seen by several cameras; each camera has its own background, illumination,
  colour cast, blur, noise and preferred viewpoints, and each image its own pose (stride,
  arm swing, front/back/side view, mirroring), scale, position and occasional occlusion.
  About 40% of the identities are near-twins of another one (two attribute groups
  re-drawn), and every fourth camera films at night (dark, noisy RGB; NI and TI unaffected),
  so fine details and the infrared modalities matter.
  The three modalities share the silhouette and accessories but differ in appearance:
  RGB carries the colours; NI is grey with per-material near-infrared reflectances
  (unrelated to the visible colour, so patterns show with another contrast); TI is a
  heat map (skin hot, clothing by thickness, accessories cold; no colour, no print
  patterns, low resolution) through a fixed false-colour palette.
* ``--kind fewshot``: 100 classes ("red striped triangle") of shapes with a colour and a
  fill pattern, split 64/16/20, in the miniImageNet CSV layout (``images/`` +
  ``train.csv``/``val.csv``/``test.csv`` with ``filename,label``). Val/test classes are
  new combinations of attributes seen in training; images vary in position, scale,
  rotation, hue, brightness, pattern frequency/phase, background and distractor shapes.

Both are seeded and deterministic (the same arguments give byte-identical files; every
image has its own seed, so the number of worker processes does not matter). A folder is
written to a temporary sibling and renamed into place; the marker ``.complete`` (the
generator arguments as JSON) is written last, so a half-written folder is never trusted.

Command line::

    python -m datasets.synthetic --kind rgbnt --out data/synthetic_rgbnt [--preset gpu] \
        [--num-train-ids 40 --num-test-ids 20 --num-cams 4 --images-per-id-cam 4 --size 128x64 --seed 0]
    python -m datasets.synthetic --kind fewshot --out data/synthetic_fewshot [--preset gpu] \
        [--images-per-class 30 --size 84 --seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MARKER = ".complete"
SENTINEL = ".synthetic"
GENERATOR_VERSION = 1
JPEG_QUALITY = 92

RGBNT_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(num_train_ids=40, num_test_ids=20, num_cams=4, images_per_id_cam=4, size=(128, 64)),
    "gpu": dict(num_train_ids=300, num_test_ids=100, num_cams=4, images_per_id_cam=6, size=(256, 128)),
    # GPU ablation tables: many short runs side by side, so small images (cheap to decode)
    "ablation": dict(num_train_ids=100, num_test_ids=60, num_cams=4, images_per_id_cam=4, size=(128, 64)),
}
FEWSHOT_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(num_classes=(64, 16, 20), images_per_class=30, size=84),
    "gpu": dict(num_classes=(64, 16, 20), images_per_class=600, size=84),
}


# --------------------------------------------------------------------------------------
# Writing a folder atomically
# --------------------------------------------------------------------------------------


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The generator arguments recorded in ``folder/.complete``, or ``None`` if absent/unreadable."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SENTINEL).exists():
        raise FileExistsError(
            f"{out} exists, is not empty and was not written by datasets.synthetic; refusing to replace it. "
            "Remove it or choose another --out."
        )


def write_atomically(out: Path, marker: dict, fill: Callable[[Path], None], force: bool = False) -> bool:
    """Create ``out`` by ``fill(tmp)`` in a temporary sibling, then rename it into place.

    Returns False (and writes nothing) when ``out`` already holds a complete folder with the
    same marker, unless ``force``. A folder of ours that is incomplete or has other
    arguments is replaced; a foreign non-empty folder is never touched.
    """
    out = Path(out)
    if not force and read_marker(out) == marker:
        return False
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / SENTINEL).write_text("written by datasets.synthetic\n")
        fill(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        if out.exists():
            if read_marker(out) == marker and not force:  # another process finished first
                return False
            _check_replaceable(out)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if read_marker(out) == marker:  # a concurrent writer (e.g. another DDP rank) won the race
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_jpeg(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="JPEG", quality=JPEG_QUALITY)


def _run_tasks(fn: Callable[[Any], None], tasks: list, workers: int) -> None:
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            fn(t)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fn, tasks, chunksize=max(1, len(tasks) // (4 * workers))):
            pass


def default_workers(num_images: int) -> int:
    """Worker processes for generation: one per core, none for small jobs."""
    if num_images < 1000:
        return 1
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


# --------------------------------------------------------------------------------------
# Multi-modal persons
# --------------------------------------------------------------------------------------

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35), "orange": (235, 120, 20), "yellow": (235, 205, 40), "green": (40, 150, 60),
    "teal": (20, 140, 140), "blue": (35, 70, 190), "navy": (25, 30, 90), "purple": (120, 50, 160),
    "pink": (230, 120, 170), "brown": (115, 70, 35), "beige": (215, 195, 150), "grey": (128, 128, 128),
    "black": (28, 28, 30), "white": (235, 235, 235), "olive": (110, 115, 40), "maroon": (120, 25, 40),
}
SKIN = [(240, 200, 170), (225, 180, 140), (190, 140, 100), (150, 100, 70), (105, 70, 50)]
HAIR = [(20, 18, 15), (70, 45, 25), (200, 170, 100), (150, 150, 150), (150, 70, 30)]
UPPER_PATTERNS = ("solid", "hstripes", "vstripes", "checks", "dots", "diagonal", "twotone", "logo")
BG, SKIN_L, HAIR_L, UPPER_L, LOWER_L, SHOES_L, PACK_L, HAT_L, BAG_L, SCARF_L = range(10)
NUM_LABELS = 10


def _colour(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> tuple[str, np.ndarray]:
    names = [n for n in PALETTE if n not in exclude]
    name = names[int(rng.integers(len(names)))]
    jitter = rng.normal(0, 10, 3)
    return name, np.clip(np.array(PALETTE[name], dtype=np.float32) + jitter, 0, 255)


#: Attribute groups a "sibling" identity re-draws (keys of the identity dict, and label rows of nir/temp).
ATTRIBUTE_GROUPS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "upper": (("upper", "upper_pattern", "upper_pattern_colour", "upper_freq", "long_sleeves", "nir_upper_pattern"),
              (UPPER_L,)),
    "lower": (("lower", "lower_kind", "lower_stripe", "lower_pattern_colour", "nir_lower_pattern"), (LOWER_L,)),
    "accessories": (("backpack", "hat", "bag", "scarf"), (PACK_L, HAT_L, BAG_L, SCARF_L)),
    "body": (("height", "shoulder", "hip", "head", "torso"), ()),
    "head": (("skin", "hair", "hair_long"), (SKIN_L, HAIR_L)),
}
SIBLING_PROB = 0.4


def _draw_attributes(rng: np.random.Generator) -> dict[str, Any]:
    upper_name, upper = _colour(rng)
    pat_name, pat_col = _colour(rng, exclude=(upper_name,))
    lower_name, lower = _colour(rng, exclude=(upper_name,) if rng.random() < 0.7 else ())
    _, lower_pat = _colour(rng, exclude=(lower_name,))
    ident: dict[str, Any] = dict(
        skin=np.array(SKIN[int(rng.integers(len(SKIN)))], np.float32),
        hair=np.array(HAIR[int(rng.integers(len(HAIR)))], np.float32),
        hair_long=bool(rng.random() < 0.35),
        height=float(rng.uniform(0.80, 0.95)),
        shoulder=float(rng.uniform(0.19, 0.29)),
        hip=float(rng.uniform(0.72, 0.97)),
        head=float(rng.uniform(0.062, 0.082)),
        torso=float(rng.uniform(0.27, 0.33)),
        upper=upper,
        upper_pattern=UPPER_PATTERNS[int(rng.integers(len(UPPER_PATTERNS)))],
        upper_pattern_colour=pat_col,
        upper_freq=float(rng.uniform(2.5, 6.5)),
        long_sleeves=bool(rng.random() < 0.5),
        lower=lower,
        lower_kind=("trousers", "shorts", "skirt")[int(rng.choice(3, p=[0.6, 0.2, 0.2]))],
        lower_stripe=bool(rng.random() < 0.3),
        lower_pattern_colour=lower_pat,
        shoes=_colour(rng)[1] * 0.6,
        backpack=_colour(rng)[1] if rng.random() < 0.35 else None,
        hat=_colour(rng)[1] if rng.random() < 0.25 else None,
        bag=(_colour(rng)[1], int(rng.choice([-1, 1]))) if rng.random() < 0.3 else None,
        scarf=_colour(rng)[1] if rng.random() < 0.15 else None,
    )
    # Near infrared: dyes reflect NIR independently of their visible colour.
    lum = lambda c: float(np.dot(c, [0.299, 0.587, 0.114]) / 255.0)  # noqa: E731
    nir = np.zeros(NUM_LABELS, np.float32)
    nir[SKIN_L], nir[HAIR_L] = 0.65 + 0.1 * rng.random(), 0.25 + 0.3 * lum(ident["hair"])
    for lab, key in ((UPPER_L, "upper"), (LOWER_L, "lower"), (SHOES_L, "shoes")):
        nir[lab] = 0.35 * lum(ident[key]) + 0.65 * rng.uniform(0.1, 0.9)
    for lab, key in ((PACK_L, "backpack"), (HAT_L, "hat"), (SCARF_L, "scarf")):
        nir[lab] = rng.uniform(0.1, 0.9) if ident[key] is not None else 0.0
    nir[BAG_L] = rng.uniform(0.1, 0.9)
    ident["nir"] = nir
    ident["nir_upper_pattern"] = float(np.clip(nir[UPPER_L] + rng.choice([-1, 1]) * rng.uniform(0.2, 0.45), 0.05, 0.95))
    ident["nir_lower_pattern"] = float(np.clip(nir[LOWER_L] + rng.choice([-1, 1]) * rng.uniform(0.2, 0.4), 0.05, 0.95))
    # Thermal: skin hottest, clothing by insulation (not colour), carried objects cold.
    temp = np.zeros(NUM_LABELS, np.float32)
    temp[SKIN_L], temp[HAIR_L] = rng.uniform(0.88, 0.98), rng.uniform(0.55, 0.7)
    temp[UPPER_L], temp[LOWER_L] = rng.uniform(0.42, 0.78), rng.uniform(0.4, 0.72)
    temp[SHOES_L], temp[SCARF_L], temp[HAT_L] = rng.uniform(0.3, 0.45), rng.uniform(0.5, 0.7), rng.uniform(0.45, 0.65)
    temp[PACK_L], temp[BAG_L] = rng.uniform(0.15, 0.35), rng.uniform(0.15, 0.35)
    ident["temp"] = temp
    return ident


def draw_identity(seed: int, pid: int) -> dict[str, Any]:
    """All appearance attributes of one identity (shared by every camera and modality).

    With probability ``SIBLING_PROB`` an identity is a near-twin of the independent draw of
    ``pid - 1``: it copies it and re-draws two attribute groups (upper clothing, lower
    clothing, accessories, body shape, head), so fine differences must be learnt.
    """
    own = _draw_attributes(np.random.default_rng([seed, 11, pid]))
    rng = np.random.default_rng([seed, 14, pid])
    if pid <= 1 or rng.random() >= SIBLING_PROB:
        return own
    ident = _draw_attributes(np.random.default_rng([seed, 11, pid - 1]))
    groups = list(ATTRIBUTE_GROUPS)
    for g in rng.choice(len(groups), size=2, replace=False):
        keys, rows = ATTRIBUTE_GROUPS[groups[g]]
        for k in keys:
            ident[k] = own[k]
        for r in rows:
            ident["nir"][r], ident["temp"][r] = own["nir"][r], own["temp"][r]
    return ident


def draw_camera(seed: int, cam: int) -> dict[str, Any]:
    """Background, illumination and viewpoint habits of one camera (every fourth one a night camera)."""
    rng = np.random.default_rng([seed, 12, cam])
    kind = ("street", "park", "indoor")[cam % 3]
    night = cam % 4 == 3  # every fourth camera films at night: dark, noisy RGB; NI (IR lit) and TI unaffected
    ground = {"street": (110, 110, 115), "park": (70, 130, 60), "indoor": (170, 150, 120)}[kind]
    wall = {"street": (150, 140, 130), "park": (150, 190, 220), "indoor": (210, 205, 190)}[kind]
    return dict(
        kind=kind,
        ground=np.clip(np.array(ground, np.float32) + rng.normal(0, 15, 3), 0, 255),
        wall=np.clip(np.array(wall, np.float32) + rng.normal(0, 15, 3), 0, 255),
        horizon=float(rng.uniform(0.45, 0.7)),
        tile=float(rng.uniform(6, 16)),
        gain=float(rng.uniform(0.18, 0.3) if night else rng.uniform(0.55, 1.25)),
        cast=rng.uniform(0.8, 1.2, 3).astype(np.float32),
        blur=float(rng.uniform(0.2, 0.9)),
        noise=float(rng.uniform(7.0, 11.0) if night else rng.uniform(2.0, 7.0)),
        night=night,
        view_probs=rng.dirichlet([1.5, 1.5, 1.5]),
        nir_gain=float(rng.uniform(0.75, 1.2)),
        nir_contrast=float(rng.uniform(0.7, 1.4)),
        nir_ground=float({"street": 0.35, "park": 0.8, "indoor": 0.55}[kind] + rng.uniform(-0.1, 0.1)),
        nir_wall=float(rng.uniform(0.3, 0.7)),
        ambient=float(rng.uniform(0.12, 0.35)),
        hot_spot=bool(rng.random() < 0.6),
    )


def _thermal_palette() -> np.ndarray:
    """(256, 3) uint8 false-colour palette: black -> purple -> red -> orange -> yellow -> white."""
    t = np.linspace(0, 1, 256)
    keys = np.array([0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
    cols = np.array([[0, 0, 0], [80, 10, 120], [200, 30, 60], [245, 130, 20], [250, 220, 60], [255, 255, 240]], float)
    return np.stack([np.interp(t, keys, cols[:, c]) for c in range(3)], 1).astype(np.uint8)


THERMAL_PALETTE = _thermal_palette()


def _line(draw: ImageDraw.ImageDraw, p0, p1, width: float, label: int) -> None:
    w = max(1, int(round(width)))
    draw.line([p0, p1], fill=label, width=w)
    r = w / 2
    for x, y in (p0, p1):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=label)


def render_person(
    ident: dict[str, Any], cam: dict[str, Any], rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sighting of ``ident`` by ``cam``: three (H, W, 3) uint8 images (RGB, NI, TI)."""
    H, W = height, width
    view = ("front", "back", "side")[int(rng.choice(3, p=cam["view_probs"]))]
    facing = int(rng.choice([-1, 1]))
    scale = float(rng.uniform(0.86, 1.04))
    ph = min(H * ident["height"] * scale, 0.98 * H)
    top = (H - ph) / 2 + rng.uniform(-0.04, 0.04) * H
    cx = W / 2 + rng.uniform(-0.12, 0.12) * W
    stride = rng.uniform(-1, 1) * (0.16 if view == "side" else 0.06) * ph
    swing = rng.uniform(-1, 1) * (0.5 if view == "side" else 0.15)

    r = ph * ident["head"]
    y_s = top + 2 * r + 0.015 * ph
    y_h = y_s + ident["torso"] * ph
    y_f = top + 0.965 * ph
    sw = ph * ident["shoulder"] / 2 * (0.6 if view == "side" else 1.0)
    hw = sw * ident["hip"]
    lw = 0.085 * ph
    aw = 0.055 * ph
    arm_len = 0.36 * ph

    lab = Image.new("L", (W, H), BG)
    d = ImageDraw.Draw(lab)

    def arm(side: int) -> None:
        sx, sy = cx + side * (sw - aw * 0.3), y_s + aw * 0.4
        ang = swing * side if view != "side" else swing * (1 if side > 0 else -1)
        ex, ey = sx + math.sin(ang) * arm_len + side * (0.02 * ph if view != "side" else 0), sy + math.cos(ang) * arm_len
        if ident["long_sleeves"]:
            _line(d, (sx, sy), (ex, ey), aw, UPPER_L)
            d.ellipse([ex - aw * 0.45, ey - aw * 0.45, ex + aw * 0.45, ey + aw * 0.45], fill=SKIN_L)
        else:
            mx, my = sx + 0.4 * (ex - sx), sy + 0.4 * (ey - sy)
            _line(d, (mx, my), (ex, ey), aw * 0.85, SKIN_L)
            _line(d, (sx, sy), (mx, my), aw * 1.05, UPPER_L)

    def legs() -> None:
        for side in (-1, 1):
            hx = cx + side * hw * 0.5
            fx = hx + side * stride * (1 if view == "side" else 0.5) + (stride * 0.2 if view != "side" else 0)
            kind = ident["lower_kind"]
            if kind == "trousers":
                _line(d, (hx, y_h), (fx, y_f), lw, LOWER_L)
            else:
                _line(d, (hx, y_h), (fx, y_f), lw * 0.8, SKIN_L)
                if kind == "shorts":
                    _line(d, (hx, y_h), (hx + 0.4 * (fx - hx), y_h + 0.4 * (y_f - y_h)), lw * 1.05, LOWER_L)
            d.ellipse([fx - lw * 0.75, y_f - 0.02 * ph, fx + lw * 0.75 + (0.03 * ph * facing if view == "side" else 0),
                       y_f + 0.03 * ph], fill=SHOES_L)
        if ident["lower_kind"] == "skirt":
            d.polygon([(cx - hw, y_h), (cx + hw, y_h), (cx + hw * 1.35, y_h + 0.42 * (y_f - y_h)),
                       (cx - hw * 1.35, y_h + 0.42 * (y_f - y_h))], fill=LOWER_L)

    # back-to-front drawing order
    if ident["hair_long"]:
        d.rectangle([cx - r * 1.05, y_s - r, cx + r * 1.05, y_s + 0.08 * ph], fill=HAIR_L)
    if view == "side" and ident["backpack"] is not None:
        bx = cx - facing * sw
        d.rectangle([min(bx, bx - facing * 0.11 * ph), y_s + 0.02 * ph, max(bx, bx - facing * 0.11 * ph),
                     y_s + 0.22 * ph], fill=PACK_L)
    legs()
    if view == "side":
        arm(-facing)
    d.polygon([(cx - sw, y_s), (cx + sw, y_s), (cx + hw, y_h), (cx - hw, y_h)], fill=UPPER_L)
    if view != "side":
        arm(-1)
        arm(1)
    if ident["scarf"] is not None:
        d.rectangle([cx - r * 1.15, y_s - 0.02 * ph, cx + r * 1.15, y_s + 0.035 * ph], fill=SCARF_L)
    if ident["backpack"] is not None:
        if view == "back":
            d.rectangle([cx - sw * 0.8, y_s + 0.02 * ph, cx + sw * 0.8, y_s + 0.24 * ph], fill=PACK_L)
        elif view == "front":
            for side in (-1, 1):
                _line(d, (cx + side * sw * 0.6, y_s), (cx + side * sw * 0.65, y_s + 0.2 * ph), 0.025 * ph, PACK_L)
    if ident["bag"] is not None:
        side = ident["bag"][1] * (-1 if view == "back" else 1) * (facing if view == "side" else 1)
        bx = cx + side * (hw + 0.02 * ph)
        _line(d, (cx - side * sw * 0.7, y_s), (bx, y_h - 0.02 * ph), 0.02 * ph, BAG_L)
        d.rectangle([bx - 0.06 * ph, y_h - 0.04 * ph, bx + 0.06 * ph, y_h + 0.07 * ph], fill=BAG_L)
    if view == "side":
        arm(facing)
    hx = cx + (0.01 * ph * facing if view == "side" else 0)
    d.ellipse([hx - r, top, hx + r, top + 2 * r], fill=HAIR_L if view == "back" else SKIN_L)
    d.chord([hx - r * 1.05, top - r * 0.05, hx + r * 1.05, top + 2 * r * (0.75 if ident["hair_long"] else 0.6)],
            180, 360, fill=HAIR_L)
    if ident["hat"] is not None:
        d.rectangle([hx - r * 1.1, top - 0.1 * r, hx + r * 1.1, top + 0.8 * r], fill=HAT_L)
        brim = facing * r * 0.8 if view == "side" else 0
        d.rectangle([hx - r * 1.25 + min(brim, 0), top + 0.65 * r, hx + r * 1.25 + max(brim, 0), top + 0.9 * r],
                    fill=HAT_L)
    # occasional occluder (a low wall / passer-by) in front of the legs
    occluder_row = int(rng.uniform(0.7, 0.85) * H) if rng.random() < 0.15 else None

    L = np.asarray(lab)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    u = (xs - (cx - sw)) / max(2 * sw, 1.0)
    v = (ys - y_s) / max(y_h - y_s, 1.0)
    upper = L == UPPER_L
    pat = ident["upper_pattern"]
    f = ident["upper_freq"]
    phase = rng.uniform(0, 1) * 0.3
    if pat == "hstripes":
        pm = ((v * f + phase) % 1) < 0.5
    elif pat == "vstripes":
        pm = ((u * f + phase) % 1) < 0.5
    elif pat == "checks":
        pm = ((np.floor(u * f) + np.floor(v * f)) % 2) == 0
    elif pat == "dots":
        pm = (((u * f) % 1 - 0.5) ** 2 + ((v * f) % 1 - 0.5) ** 2) < 0.08
    elif pat == "diagonal":
        pm = (((u + v) * f * 0.7 + phase) % 1) < 0.5
    elif pat == "twotone":
        pm = v > 0.5
    elif pat == "logo":
        pm = (np.abs(u - 0.5) < 0.2) & (np.abs(v - 0.35) < 0.16) & (view == "front")
    else:
        pm = np.zeros_like(upper)
    upper_pat = upper & pm
    lower_pat = np.zeros_like(upper)
    if ident["lower_stripe"]:
        lower_pat = (L == LOWER_L) & (np.abs(np.abs(xs - cx) - (hw * 0.5 + lw * 0.3)) < max(1.0, 0.012 * ph))
    person = L > 0
    shade = np.clip(1.0 - 0.3 * ((xs - cx) / max(sw * 1.4, 1.0)) ** 2, 0.6, 1.0) * (1.0 - 0.08 * np.clip(v, 0, 2))

    # ---- background (camera scene, shifted per image)
    horizon = int((cam["horizon"] + rng.uniform(-0.05, 0.05)) * H)
    off = rng.uniform(0, cam["tile"])
    ground = (ys >= horizon)[..., None]
    tiles = ((((xs + off) % cam["tile"]) < 1) | (((ys + off) % cam["tile"]) < 1))[..., None] & ground
    bg = np.where(ground, cam["ground"], cam["wall"] * (0.9 + 0.1 * (ys / H))[..., None])
    bg = bg * np.where(tiles, 0.85, 1.0)
    objects = []
    for _ in range(int(rng.integers(0, 3))):
        ox = rng.uniform(0, W)
        ow = rng.uniform(0.05, 0.2) * W
        oh = rng.uniform(0.2, 0.6) * H
        col = np.clip(cam["wall"] * rng.uniform(0.5, 1.3), 0, 255)
        objects.append((ox, ow, oh, col, rng.uniform(0.1, 0.9), rng.uniform(0.2, 0.9)))
    for ox, ow, oh, col, _, _ in objects:
        m = (np.abs(xs - ox) < ow / 2) & (ys > horizon - oh) & (ys < horizon + 2)
        bg[m] = col

    # ---- RGB
    lut = np.zeros((NUM_LABELS, 3), np.float32)
    lut[SKIN_L], lut[HAIR_L], lut[UPPER_L], lut[LOWER_L], lut[SHOES_L] = (
        ident["skin"], ident["hair"], ident["upper"], ident["lower"], ident["shoes"])
    for lab_id, key in ((PACK_L, "backpack"), (HAT_L, "hat"), (SCARF_L, "scarf")):
        if ident[key] is not None:
            lut[lab_id] = ident[key]
    if ident["bag"] is not None:
        lut[BAG_L] = ident["bag"][0]
    fg = lut[L]
    fg[upper_pat] = ident["upper_pattern_colour"]
    fg[lower_pat] = ident["lower_pattern_colour"]
    fg = fg * shade[..., None]
    rgb = np.where(person[..., None], fg, bg)
    gain = cam["gain"] * rng.uniform(0.88, 1.12)
    rgb = rgb * gain * cam["cast"]

    # ---- NI (grey; per-material reflectance, own background)
    ni_fg = ident["nir"][L]
    ni_fg = np.where(upper_pat, ident["nir_upper_pattern"], ni_fg)
    ni_fg = np.where(lower_pat, ident["nir_lower_pattern"], ni_fg) * shade
    ni_bg = np.where(ground[..., 0], cam["nir_ground"], cam["nir_wall"]) * np.where(tiles[..., 0], 0.9, 1.0)
    for ox, ow, oh, _, refl, _ in objects:
        ni_bg[(np.abs(xs - ox) < ow / 2) & (ys > horizon - oh) & (ys < horizon + 2)] = refl
    ni = np.where(person, ni_fg, ni_bg) * cam["nir_gain"] * rng.uniform(0.9, 1.1)
    ni = np.clip((ni - 0.5) * cam["nir_contrast"] + 0.5, 0, 1) * 255.0

    # ---- TI (heat; no colour, no print pattern, low resolution)
    ti_fg = ident["temp"][L]
    ti_bg = cam["ambient"] + 0.08 * np.where(ground[..., 0], 1.0, 0.0) + 0.03 * (ys / H)
    for ox, ow, oh, _, _, tmp in objects:
        ti_bg[(np.abs(xs - ox) < ow / 2) & (ys > horizon - oh) & (ys < horizon + 2)] = cam["ambient"] * tmp + 0.05
    if cam["hot_spot"]:
        hx0, hy0 = rng.uniform(0, W), rng.uniform(0, horizon + 1)
        ti_bg = ti_bg + 0.35 * np.exp(-(((xs - hx0) / (0.12 * W)) ** 2 + ((ys - hy0) / (0.08 * H)) ** 2))
    ti = np.where(person, ti_fg, ti_bg) + rng.uniform(-0.05, 0.05)

    if occluder_row is not None:
        oy = occluder_row
        rgb[oy:] = cam["wall"] * 0.7 * gain
        ni[oy:] = cam["nir_wall"] * 200
        ti[oy:] = cam["ambient"]

    rgb = _finish(rgb, cam["blur"], cam["noise"], rng)
    ni_img = _finish(np.repeat(ni[..., None], 3, 2), cam["blur"] + 0.2, cam["noise"] * 1.5, rng, grey=True)
    ti_small = Image.fromarray(np.clip(ti * 255, 0, 255).astype(np.uint8)).resize(
        (max(1, W // 3), max(1, H // 3)), Image.BILINEAR).resize((W, H), Image.BILINEAR)
    ti_arr = np.asarray(ti_small).astype(np.float32) + rng.normal(0, cam["noise"], (H, W))
    ti_rgb = THERMAL_PALETTE[np.clip(ti_arr, 0, 255).astype(np.uint8)]
    mirror = facing < 0 if view == "side" else rng.random() < 0.5
    if mirror:
        rgb, ni_img, ti_rgb = rgb[:, ::-1], ni_img[:, ::-1], ti_rgb[:, ::-1]
    return np.ascontiguousarray(rgb), np.ascontiguousarray(ni_img), np.ascontiguousarray(ti_rgb)


def _finish(img: np.ndarray, blur: float, noise: float, rng: np.random.Generator, grey: bool = False) -> np.ndarray:
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(out).astype(np.float32)
    n = rng.normal(0, noise, arr.shape[:2] + ((1,) if grey else (3,)))
    return np.clip(arr + n, 0, 255).astype(np.uint8)


def _rgbnt_task(task: tuple) -> None:
    """Render and write every sighting of one identity (runs in a worker process)."""
    split_dir, pid, cfg = task
    seed, num_cams, per_cam, (H, W), missing_prob = (
        cfg["seed"], cfg["num_cams"], cfg["images_per_id_cam"], cfg["size"], cfg["missing_modality_prob"])
    ident = draw_identity(seed, pid)
    for cam_id in range(num_cams):
        cam = draw_camera(seed, cam_id)
        for k in range(per_cam):
            rng = np.random.default_rng([seed, 13, pid, cam_id, k])
            images = render_person(ident, cam, rng, H, W)
            name = f"{pid:06d}_cam{cam_id + 1}_0_{k:02d}.jpg"
            drop = None
            if missing_prob > 0 and rng.random() < missing_prob:
                drop = ("NI", "TI")[int(rng.integers(2))]
            for mod, arr in zip(("RGB", "NI", "TI"), images):
                if mod != drop:
                    _save_jpeg(arr, Path(split_dir) / mod / name)


def generate_rgbnt(
    out: str | os.PathLike,
    *,
    num_train_ids: int = 40,
    num_test_ids: int = 20,
    num_cams: int = 4,
    images_per_id_cam: int = 4,
    size: tuple[int, int] = (128, 64),
    seed: int = 0,
    missing_modality_prob: float = 0.0,
    workers: int | None = None,
    force: bool = False,
) -> bool:
    """Write a synthetic RGBNT201-layout data set to ``out``; returns False if already up to date.

    Train identities get raw ids ``1..num_train_ids`` (folder ``train_171/``), test identities
    the next ``num_test_ids`` ids (folder ``test/``, used as query and gallery as in
    RGBNT201). Each identity is seen ``images_per_id_cam`` times by each of ``num_cams``
    cameras (``cam1``..``cam<n>``, at most 9: the release grammar has one camera digit).
    ``size`` is (height, width). ``missing_modality_prob`` deletes the NI or TI file of that
    fraction of samples (to exercise ``allow_missing_modality``).
    """
    if not 1 <= num_cams <= 9:
        raise ValueError(f"num_cams must be in 1..9 (RGBNT201 names hold one camera digit), got {num_cams}")
    if num_train_ids < 1 or num_test_ids < 1 or images_per_id_cam < 1:
        raise ValueError("num_train_ids, num_test_ids and images_per_id_cam must be >= 1")
    if num_train_ids + num_test_ids > 999_999:
        raise ValueError("at most 999999 identities fit the six-digit pid field")
    size = (int(size[0]), int(size[1]))
    cfg = dict(
        kind="rgbnt", version=GENERATOR_VERSION, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
        num_cams=num_cams, images_per_id_cam=images_per_id_cam, size=list(size), seed=seed,
        missing_modality_prob=missing_modality_prob,
    )
    n_images = 3 * (num_train_ids + num_test_ids) * num_cams * images_per_id_cam
    workers = default_workers(n_images) if workers is None else workers

    def fill(tmp: Path) -> None:
        tasks = []
        for split, pids in (("train_171", range(1, num_train_ids + 1)),
                            ("test", range(num_train_ids + 1, num_train_ids + num_test_ids + 1))):
            for mod in ("RGB", "NI", "TI"):
                (tmp / split / mod).mkdir(parents=True)
            tasks += [(str(tmp / split), pid, dict(cfg, size=size)) for pid in pids]
        _run_tasks(_rgbnt_task, tasks, workers)

    return write_atomically(Path(out), cfg, fill, force=force)


# --------------------------------------------------------------------------------------
# Few-shot shapes
# --------------------------------------------------------------------------------------

FS_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 40), "orange": (240, 130, 25), "yellow": (230, 200, 30), "green": (40, 160, 60),
    "teal": (20, 150, 150), "blue": (40, 80, 210), "purple": (130, 60, 180), "pink": (235, 120, 180),
    "brown": (120, 75, 35), "black": (30, 30, 30),
}
FS_PATTERNS = ("solid", "striped", "dotted", "checkered", "gradient", "outlined")
FS_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "ring", "crescent", "arrow")


def fewshot_classes(seed: int, counts: tuple[int, int, int]) -> dict[str, list[tuple[str, str, str]]]:
    """Pick ``sum(counts)`` distinct (colour, pattern, shape) classes and split them train/val/test.

    Every colour, pattern and shape of a val/test class also occurs in some train class
    (novel combinations of known attributes) whenever the train classes leave enough such
    combinations, which the default 64 / 16 / 20 always does.
    """
    total = sum(counts)
    combos = [(c, p, s) for c in FS_COLOURS for p in FS_PATTERNS for s in FS_SHAPES]
    if total > len(combos):
        raise ValueError(f"at most {len(combos)} synthetic few-shot classes exist, asked for {total}")
    rng = np.random.default_rng([seed, 21])
    order = [combos[i] for i in rng.permutation(len(combos))]
    train = order[: counts[0]]
    seen = [{a[k] for a in train} for k in range(3)]
    rest = order[counts[0]:]
    known = [a for a in rest if all(a[k] in seen[k] for k in range(3))]
    novel = [a for a in rest if a not in known]
    chosen = train + (known + novel)[: counts[1] + counts[2]]
    return {
        "train": chosen[: counts[0]],
        "val": chosen[counts[0]: counts[0] + counts[1]],
        "test": chosen[counts[0] + counts[1]:],
    }


def class_label(cls: tuple[str, str, str]) -> str:
    """CSV label of a synthetic class, e.g. ``red_striped_triangle`` (its readable name with ``_``)."""
    return "_".join(cls)


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def poly(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]

    def regular(n: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
        return [(math.cos(start + 2 * math.pi * i / n), math.sin(start + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "square":
        return poly([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    if shape == "triangle":
        return poly(regular(3))
    if shape == "hexagon":
        return poly(regular(6))
    if shape == "diamond":
        return poly([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)])
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + math.pi * i / 5
            rad = 1.0 if i % 2 == 0 else 0.42
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return poly(pts)
    if shape == "cross":
        t = 0.3
        return poly([(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t),
                     (-1, -t), (-t, -t)])
    if shape == "arrow":
        return poly([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)])
    raise ValueError(shape)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, rot: float, ss: int = 2) -> np.ndarray:
    """Anti-aliased (size, size) float mask in [0, 1] of one shape."""
    big = Image.new("L", (size * ss, size * ss), 0)
    d = ImageDraw.Draw(big)
    X, Y, R = cx * ss, cy * ss, r * ss
    if shape == "circle":
        d.ellipse([X - R, Y - R, X + R, Y + R], fill=255)
    elif shape == "ring":
        d.ellipse([X - R, Y - R, X + R, Y + R], fill=255)
        d.ellipse([X - 0.55 * R, Y - 0.55 * R, X + 0.55 * R, Y + 0.55 * R], fill=0)
    elif shape == "crescent":
        d.ellipse([X - R, Y - R, X + R, Y + R], fill=255)
        ox, oy = X + 0.45 * R * math.cos(rot), Y + 0.45 * R * math.sin(rot)
        d.ellipse([ox - 0.85 * R, oy - 0.85 * R, ox + 0.85 * R, oy + 0.85 * R], fill=0)
    else:
        d.polygon(_shape_polygon(shape, X, Y, R, rot), fill=255)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def render_fewshot(cls: tuple[str, str, str], rng: np.random.Generator, size: int) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``cls`` = (colour, pattern, shape)."""
    colour, pattern, shape = cls
    S = size
    ys, xs = np.mgrid[0:S, 0:S].astype(np.float32)
    # background: a low-saturation gradient with a random tint
    c0, c1 = rng.uniform(90, 220, 3), rng.uniform(90, 220, 3)
    grey = rng.uniform(0.4, 0.8)
    c0, c1 = c0 * (1 - grey) + c0.mean() * grey, c1 * (1 - grey) + c1.mean() * grey
    ang = rng.uniform(0, 2 * math.pi)
    t = ((xs - S / 2) * math.cos(ang) + (ys - S / 2) * math.sin(ang)) / S + 0.5
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    # distractors: small shapes of other kinds and colours, drawn first
    for _ in range(int(rng.integers(1, 4))):
        dshape = FS_SHAPES[int(rng.integers(len(FS_SHAPES)))]
        dcol = np.array(list(FS_COLOURS.values())[int(rng.integers(len(FS_COLOURS)))], np.float32)
        m = _shape_mask(dshape, S, rng.uniform(0, S), rng.uniform(0, S), rng.uniform(0.08, 0.15) * S,
                        rng.uniform(0, 2 * math.pi))
        a = m[..., None] * rng.uniform(0.35, 0.7)
        img = img * (1 - a) + dcol * a
    # the object
    r = rng.uniform(0.24, 0.38) * S
    cx, cy = rng.uniform(0.5 * r, S - 0.5 * r), rng.uniform(0.5 * r, S - 0.5 * r)
    rot = rng.uniform(0, 2 * math.pi)
    mask = _shape_mask(shape, S, cx, cy, r, rot)
    base = np.array(FS_COLOURS[colour], np.float32) * rng.uniform(0.8, 1.15) + rng.normal(0, 8, 3)
    light = base * 0.35 + 255 * 0.65
    pr = rot + rng.uniform(-0.3, 0.3)
    u = ((xs - cx) * math.cos(pr) + (ys - cy) * math.sin(pr)) / r
    v = (-(xs - cx) * math.sin(pr) + (ys - cy) * math.cos(pr)) / r
    f = rng.uniform(2.2, 3.8)
    ph = rng.uniform(0, 1)
    if pattern == "solid":
        p = np.ones_like(u)
    elif pattern == "striped":
        p = (((u * f + ph) % 1) < 0.5).astype(np.float32)
    elif pattern == "dotted":
        p = 1.0 - ((((u * f + ph) % 1 - 0.5) ** 2 + (((v * f) % 1) - 0.5) ** 2) < 0.07).astype(np.float32)
    elif pattern == "checkered":
        p = ((np.floor(u * f + ph) + np.floor(v * f)) % 2 == 0).astype(np.float32)
    elif pattern == "gradient":
        p = np.clip((u + 1) / 2, 0, 1)
    else:  # outlined: only a border band of the shape is coloured
        inner = _shape_mask(shape, S, cx, cy, r * 0.62, rot)
        p = np.clip(1 - inner / np.maximum(mask, 1e-3), 0, 1)
    obj = light * (1 - p[..., None]) + base * p[..., None]
    a = mask[..., None]
    img = img * (1 - a) + obj * a
    img = img * rng.uniform(0.8, 1.15) + rng.normal(0, rng.uniform(2, 6), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _fewshot_task(task: tuple) -> None:
    images_dir, cls_index, cls, n, size, seed = task
    for i in range(n):
        rng = np.random.default_rng([seed, 22, cls_index, i])
        _save_jpeg(render_fewshot(cls, rng, size), Path(images_dir) / f"{class_label(cls)}_{i:05d}.jpg")


def generate_fewshot(
    out: str | os.PathLike,
    *,
    num_classes: tuple[int, int, int] = (64, 16, 20),
    images_per_class: int = 30,
    size: int = 84,
    seed: int = 0,
    workers: int | None = None,
    force: bool = False,
) -> bool:
    """Write a synthetic few-shot set in the miniImageNet CSV layout; False if already up to date.

    ``out/images/<label>_<i:05d>.jpg`` and ``out/{train,val,test}.csv`` with header
    ``filename,label``; the label is the readable class name with ``_`` for spaces
    (``red_striped_triangle``), which the miniImageNet loader turns back into the name.
    """
    num_classes = tuple(int(c) for c in num_classes)
    if len(num_classes) != 3 or min(num_classes) < 1:
        raise ValueError(f"num_classes must be three positive counts (train, val, test), got {num_classes}")
    if images_per_class < 1:
        raise ValueError("images_per_class must be >= 1")
    cfg = dict(kind="fewshot", version=GENERATOR_VERSION, num_classes=list(num_classes),
               images_per_class=images_per_class, size=int(size), seed=seed)
    classes = fewshot_classes(seed, num_classes)
    workers = default_workers(sum(num_classes) * images_per_class) if workers is None else workers

    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        tasks = []
        index = 0
        for split in ("train", "val", "test"):
            rows = ["filename,label"]
            for cls in classes[split]:
                rows += [f"{class_label(cls)}_{i:05d}.jpg,{class_label(cls)}" for i in range(images_per_class)]
                tasks.append((str(tmp / "images"), index, cls, images_per_class, int(size), seed))
                index += 1
            (tmp / f"{split}.csv").write_text("\n".join(rows) + "\n")
        _run_tasks(_fewshot_task, tasks, workers)

    return write_atomically(Path(out), cfg, fill, force=force)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"size must look like 128x64 (height x width) or 84, got '{text}'")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m datasets.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("rgbnt", "fewshot"), required=True)
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--preset", choices=sorted({*RGBNT_PRESETS, *FEWSHOT_PRESETS}), default="small",
                        help="small: CPU tests (default); gpu: hundreds of ids / 600 images per class; "
                             "ablation (rgbnt): 100/60 ids at 128x64 for many short GPU runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_parse_size, default=None, help="HxW for rgbnt (128x64), side for fewshot (84)")
    parser.add_argument("--num-train-ids", type=int)
    parser.add_argument("--num-test-ids", type=int)
    parser.add_argument("--num-cams", type=int)
    parser.add_argument("--images-per-id-cam", type=int)
    parser.add_argument("--missing-modality-prob", type=float, default=0.0)
    parser.add_argument("--num-classes", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--images-per-class", type=int)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core for big sets)")
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical set exists")
    args = parser.parse_args(argv)

    presets = RGBNT_PRESETS if args.kind == "rgbnt" else FEWSHOT_PRESETS
    if args.preset not in presets:
        parser.error(f"--preset {args.preset} is not a {args.kind} preset (choose from {sorted(presets)})")
    start = time.perf_counter()
    if args.kind == "rgbnt":
        kw = dict(RGBNT_PRESETS[args.preset])
        for key in ("num_train_ids", "num_test_ids", "num_cams", "images_per_id_cam"):
            if getattr(args, key) is not None:
                kw[key] = getattr(args, key)
        if args.size is not None:
            kw["size"] = args.size
        wrote = generate_rgbnt(args.out, seed=args.seed, missing_modality_prob=args.missing_modality_prob,
                               workers=args.workers, force=args.force, **kw)
        n = 3 * (kw["num_train_ids"] + kw["num_test_ids"]) * kw["num_cams"] * kw["images_per_id_cam"]
    else:
        kw = dict(FEWSHOT_PRESETS[args.preset])
        if args.num_classes is not None:
            kw["num_classes"] = tuple(args.num_classes)
        if args.images_per_class is not None:
            kw["images_per_class"] = args.images_per_class
        if args.size is not None:
            kw["size"] = args.size[0]
        wrote = generate_fewshot(args.out, seed=args.seed, workers=args.workers, force=args.force, **kw)
        n = sum(kw["num_classes"]) * kw["images_per_class"]
    took = time.perf_counter() - start
    if wrote:
        print(f"wrote {n} images to {args.out} in {took:.1f} s")
    else:
        print(f"{args.out} is already complete with these arguments (use --force to regenerate)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
