"""The person renderer of ``synthetic_rgbnt``: drawn identities seen by cameras in three modalities.

Each identity is a drawn person (body shape, clothing colours and patterns, sleeves,
trousers/shorts/skirt, backpack, hat, shoulder bag, scarf, hair) seen by several cameras;
each camera has its own background, illumination, colour cast, blur, noise and preferred
viewpoints, and each image its own pose (stride, arm swing, front/back/side view,
mirroring), scale, position and occasional occlusion. About 40% of the identities are
near-twins of another one (two attribute groups re-drawn), and every fourth camera films at
night (dark, noisy RGB; NI and TI unaffected), so fine details and the infrared modalities
matter.

The three modalities share the silhouette and accessories but differ in appearance: RGB
carries the colours; NI is grey with per-material near-infrared reflectances (unrelated to
the visible colour, so patterns show with another contrast); TI is a heat map (skin hot,
clothing by thickness, accessories cold; no colour, no print patterns, low resolution)
through a fixed false-colour palette.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

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
    """A palette colour not in ``exclude``: its name and its (3,) float32 RGB, jittered per identity."""
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
    """One independent identity: RGB colours, shape, clothing, accessories and per-label NI / TI values."""
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


def _line(
    draw: ImageDraw.ImageDraw, p0: tuple[float, float], p1: tuple[float, float], width: float, label: int
) -> None:
    """A limb: a line of ``label`` with round ends (PIL lines have square ends)."""
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
    """The camera's optics and sensor on an (H, W, 3) image: Gaussian blur, then pixel noise (one
    value per pixel for ``grey`` images, per channel otherwise); uint8 out."""
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(out).astype(np.float32)
    n = rng.normal(0, noise, arr.shape[:2] + ((1,) if grey else (3,)))
    return np.clip(arr + n, 0, 255).astype(np.uint8)
