"""The shape renderer of ``synthetic_fewshot``: classes of coloured, patterned shapes.

A class is a (colour, fill pattern, shape) triple such as ``red striped triangle``; the
val/test classes are new combinations of attributes seen in training. Images vary in
position, scale, rotation, hue, brightness, pattern frequency/phase, background and
distractor shapes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

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
    """Vertices of a polygonal ``shape`` of radius ``r`` centred at (``cx``, ``cy``), rotated by ``rot`` radians."""
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


def render_fewshot(cls: tuple[str, str, str], rng: np.random.Generator, size: int, clutter: float = 0.0) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``cls`` = (colour, pattern, shape).

    ``clutter`` > 0 makes classes harder to tell apart (a harder task at the same number of images): the colour
    drifts per channel by up to ``30 % x clutter``, the pattern's contrast drops, and up to ``4 x clutter``
    larger distractors are drawn over the object. At 0 the image is what it always was (the same draws).
    """
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
    img = _distractors(img, rng, S, int(rng.integers(1, 4)), radius=(0.08, 0.15), opacity=(0.35, 0.7))
    # the object
    r = rng.uniform(0.24, 0.38) * S
    cx, cy = rng.uniform(0.5 * r, S - 0.5 * r), rng.uniform(0.5 * r, S - 0.5 * r)
    rot = rng.uniform(0, 2 * math.pi)
    mask = _shape_mask(shape, S, cx, cy, r, rot)
    base = np.array(FS_COLOURS[colour], np.float32) * rng.uniform(0.8, 1.15) + rng.normal(0, 8, 3)
    light = base * 0.35 + 255 * 0.65
    if clutter > 0:
        base = base * rng.uniform(1 - 0.3 * clutter, 1 + 0.3 * clutter, 3)
        light = base * (0.35 + 0.4 * clutter) + 255 * (0.65 - 0.4 * clutter)
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
    if clutter > 0:  # larger distractors over the object too
        img = _distractors(img, rng, S, int(rng.integers(1, 2 + int(4 * clutter))), radius=(0.12, 0.25),
                           opacity=(0.5, 0.9))
    img = img * rng.uniform(0.8, 1.15) + rng.normal(0, rng.uniform(2, 6), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _distractors(img: np.ndarray, rng: np.random.Generator, size: int, count: int, radius: tuple[float, float],
                 opacity: tuple[float, float]) -> np.ndarray:
    """``count`` shapes of random kinds and class colours blended over ``img``, each of radius ``radius`` (a
    fraction of ``size``) and opacity ``opacity`` (ranges drawn from ``rng``)."""
    for _ in range(count):
        dshape = FS_SHAPES[int(rng.integers(len(FS_SHAPES)))]
        dcol = np.array(list(FS_COLOURS.values())[int(rng.integers(len(FS_COLOURS)))], np.float32)
        m = _shape_mask(dshape, size, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(*radius) * size,
                        rng.uniform(0, 2 * math.pi))
        a = m[..., None] * rng.uniform(*opacity)
        img = img * (1 - a) + dcol * a
    return img
