"""The published DeMo code's (924973292/DeMo) state-dict layout mapped onto ``MODEL.NAME DeMo``.

Tensors in, tensors out: :func:`infer_architecture` reads DeMo's switches and counts off a DeMo
state dict, :func:`convert_state_dict` maps its tensors onto the names, shapes and dtypes of this
repository's model. Reading files and building the config are the job of
``tools/convert_demo_checkpoint.py``.

Key mapping (E = 7 HDM subsets in the order r, n, t, rn, rt, nt, rnt; H = HEAD; c = D / H):

======================================================================  ==============================================
DeMo                                                                    this repository
======================================================================  ==============================================
``BACKBONE.base.<k>`` (CLIP image tower)                                ``backbone.visual.<k>``
``BACKBONE.cv_embed`` (cameras, 1, width)                               ``backbone.camera_embed`` (cameras, width)
``{rgb,nir,tir}_reduce.<k>``                                            ``global_local.reduce.{0,1,2}.<k>``
``generalFusion.<s>_token`` (1, 1, D)                                   ``hdm.queries.<i>.query`` (D)
``generalFusion.<s>.{in_proj_*,out_proj.*}``                            ``hdm.queries.<i>.{in_proj_*,out_proj.*}``
``generalFusion.moe.experts.<h>.expertHead.<e>.mlp.0.{weight,bias}``    ``atm.expert_{weight,bias}[e, h]``
``generalFusion.moe.experts.<h>.expertHead.<e>.mlp.2.<stat>``           ``atm.expert_bn.<stat>[e*D + h*c : +c]``
``generalFusion.moe.gating_network.gate.{linear_re,q_,k_}.<k>``         ``atm.{gate_reduce,gate_q,gate_k}.<k>``
``bottleneck`` / ``classifier``                                         ``direct_head.{bn,classifier}``
``bottleneck_{r,n,t}`` / ``classifier_{r,n,t}``                         ``modality_heads.{RGB,NI,TI}.{bn,classifier}``
``bottleneck_moe`` / ``classifier_moe``                                 ``moe_head.{bn,classifier}``
======================================================================  ==============================================

The 7 x H expert BatchNorms' ``num_batches_tracked`` counters become the one counter of
``atm.expert_bn`` (their maximum). Every DeMo tensor is used exactly once and every tensor of
the model is filled, except :data:`NEW_KEYS` (the learned stand-ins for a masked-out
modality, which DeMo does not have): they keep the target model's values. Any other gap or
leftover is a :class:`ConversionError` that lists the keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modeling.module.hdm import HDM_SUBSETS
from utils.modalities import MODALITIES

#: Tensors of this repository's DeMo with no DeMo counterpart; they keep the fresh model's values.
NEW_KEYS = frozenset({"null_tokens", "hdm.null_features"})

#: DeMo's per-modality names: the GLOBAL_LOCAL reducer prefix and the one-letter HDM / head suffix.
DEMO_MODALITY_NAMES: dict[str, tuple[str, str]] = {"RGB": ("rgb", "r"), "NI": ("nir", "n"), "TI": ("tir", "t")}

DEMO_TOWER = "BACKBONE.base."
OUR_TOWER = "backbone.visual."
DEMO_MOE = "generalFusion.moe."
DEMO_GATE = DEMO_MOE + "gating_network.gate."
BN_STATS = ("weight", "bias", "running_mean", "running_var")
_EXPERT_KEY = re.compile(r"^generalFusion\.moe\.experts\.(\d+)\.expertHead\.(\d+)\.")


class ConversionError(ValueError):
    """The file is not a convertible DeMo checkpoint or does not fit the configured model (one-line message)."""


def short_key_list(keys: Iterable[str], limit: int = 12) -> str:
    """The first ``limit`` of ``keys``, comma-separated, with a count of the rest (for one-line errors)."""
    keys = list(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ----------------------------------------------------------------------------------------------
# Reading the architecture off a DeMo state dict
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TowerShape:
    """What a CLIP image tower's tensors say about it."""

    width: int
    layers: int
    patch: int
    out_dim: int
    num_patches: int

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor], prefix: str) -> TowerShape:
        """Read the shape from ``state`` (keys ``prefix + 'conv1.weight'`` etc.)."""
        conv = state[prefix + "conv1.weight"]
        layers = sum(1 for k in state if k.startswith(prefix + "transformer.resblocks.")
                     and k.endswith(".attn.in_proj_weight"))
        return cls(width=int(conv.shape[0]), layers=layers, patch=int(conv.shape[-1]),
                   out_dim=int(state[prefix + "proj"].shape[1]),
                   num_patches=int(state[prefix + "positional_embedding"].shape[0]) - 1)

    def __str__(self) -> str:
        return (f"width {self.width}, {self.layers} layers, patch {self.patch}, {self.out_dim}-d tokens, "
                f"{self.num_patches} patches")


@dataclass(frozen=True)
class DemoArchitecture:
    """DeMo's architecture switches as the checkpoint's keys and shapes give them."""

    tower: TowerShape
    num_classes: int
    num_cameras: int  # 0: no SIE camera embedding
    global_local: bool
    hdm: bool
    atm: bool
    head: int  # ATM chunks; 0 without ATM
    direct: bool

    def settings(self) -> list[tuple[str, Any, str]]:
        """``(config key, value, evidence)`` for everything the checkpoint decides."""
        rows: list[tuple[str, Any, str]] = [
            ("MODEL.NUM_CLASSES", self.num_classes, "classifier rows"),
            ("MODEL.SIE_CAMERA", self.num_cameras > 0,
             "BACKBONE.cv_embed " + ("present" if self.num_cameras else "absent")),
        ]
        if self.num_cameras:
            rows.append(("MODEL.NUM_CAMERAS", self.num_cameras, "BACKBONE.cv_embed rows"))
        rows += [
            ("MODEL.DEMO.GLOBAL_LOCAL", self.global_local, "rgb/nir/tir_reduce " + _presence(self.global_local)),
            ("MODEL.DEMO.HDM", self.hdm, "generalFusion query tokens " + _presence(self.hdm)),
            ("MODEL.DEMO.ATM", self.atm, "generalFusion.moe " + _presence(self.atm)),
        ]
        if self.atm:
            rows.append(("MODEL.DEMO.HEAD", self.head, f"{self.head} expert groups of {self.tower.out_dim // self.head}"
                                                       " channels"))
        rows.append(("MODEL.DEMO.DIRECT", self.direct,
                     "one head on the concatenation" if self.direct else "one head per modality"))
        return rows


def _presence(flag: bool) -> str:
    return "present" if flag else "absent"


def infer_architecture(state: Mapping[str, torch.Tensor]) -> DemoArchitecture:
    """Read DeMo's switches, class / camera counts and ATM heads off a DeMo state dict."""
    tower = TowerShape.of(state, DEMO_TOWER)
    heads = [k for k in ("classifier_moe.weight", "classifier.weight", "classifier_r.weight") if k in state]
    if not heads:
        raise ConversionError("the DeMo checkpoint has no classifier (classifier / classifier_r / classifier_moe)")
    counts = {k: int(state[k].shape[0]) for k in heads}
    if len(set(counts.values())) != 1:
        raise ConversionError(f"the DeMo classifiers disagree on the number of classes: {counts}")
    cv = state.get("BACKBONE.cv_embed")
    if cv is not None and (cv.ndim != 3 or cv.shape[1] != 1 or cv.shape[2] != tower.width):
        raise ConversionError(f"BACKBONE.cv_embed has shape {tuple(cv.shape)}, expected (cameras, 1, {tower.width})")
    hdm = "generalFusion.r_token" in state
    atm = any(k.startswith(DEMO_MOE) for k in state)
    if atm and not hdm:
        raise ConversionError("the DeMo checkpoint has ATM (generalFusion.moe) without HDM, which DeMo cannot run")
    head = 0
    if atm:
        pairs = {(int(m.group(1)), int(m.group(2))) for m in map(_EXPERT_KEY.match, state) if m}
        head = len({h for h, _ in pairs})
        experts = {e for _, e in pairs}
        if head == 0 or experts != set(range(len(HDM_SUBSETS))):
            raise ConversionError(f"generalFusion.moe has experts {sorted(experts)} in {head} groups; DeMo has "
                                  f"{len(HDM_SUBSETS)} experts per group")
        if tower.out_dim % head:
            raise ConversionError(f"ATM has {head} expert groups, which do not divide the {tower.out_dim}-d features")
    if hdm and "classifier_moe.weight" not in state:
        raise ConversionError("the DeMo checkpoint has HDM but no classifier_moe")
    direct = "classifier.weight" in state
    if not direct and "classifier_r.weight" not in state:
        raise ConversionError("the DeMo checkpoint has neither the DIRECT head (classifier) nor per-modality heads "
                              "(classifier_r/n/t)")
    return DemoArchitecture(
        tower=tower, num_classes=next(iter(counts.values())), num_cameras=int(cv.shape[0]) if cv is not None else 0,
        global_local=any(k.startswith("rgb_reduce.") for k in state), hdm=hdm, atm=atm, head=head, direct=direct,
    )


# ----------------------------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------------------------
class _Source:
    """DeMo tensors, each handed out at most once; ``leftover()`` lists those never asked for."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state
        self.used: set[str] = set()

    def take(self, key: str) -> torch.Tensor | None:
        """The tensor called ``key`` (None if the checkpoint lacks it)."""
        if key not in self.state:
            return None
        if key in self.used:
            raise AssertionError(f"DeMo tensor {key} mapped twice")  # a bug of this mapping, not of the file
        self.used.add(key)
        return self.state[key]

    def leftover(self) -> list[str]:
        """DeMo keys not taken, in file order."""
        return [k for k in self.state if k not in self.used]


def _renames() -> list[tuple[str, str]]:
    """``(DeMo prefix, our prefix)`` pairs for tensors that only change name."""
    pairs = [(DEMO_TOWER, OUR_TOWER)]
    for i, name in enumerate(MODALITIES):
        long, letter = DEMO_MODALITY_NAMES[name]
        pairs.append((f"{long}_reduce.", f"global_local.reduce.{i}."))
        pairs += [(f"bottleneck_{letter}.", f"modality_heads.{name}.bn."),
                  (f"classifier_{letter}.", f"modality_heads.{name}.classifier.")]
    for i, subset in enumerate(HDM_SUBSETS):
        pairs.append((f"generalFusion.{_subset_letters(subset)}.", f"hdm.queries.{i}."))
    pairs += [(DEMO_GATE + "linear_re.", "atm.gate_reduce."), (DEMO_GATE + "q_.", "atm.gate_q."),
              (DEMO_GATE + "k_.", "atm.gate_k."),
              ("bottleneck.", "direct_head.bn."), ("classifier.", "direct_head.classifier."),
              ("bottleneck_moe.", "moe_head.bn."), ("classifier_moe.", "moe_head.classifier.")]
    return pairs


def _subset_letters(subset: Sequence[int]) -> str:
    """``(0, 1)`` -> ``'rn'`` (DeMo's attribute names of the HDM queries)."""
    return "".join(DEMO_MODALITY_NAMES[MODALITIES[i]][1] for i in subset)


def _expert_key(h: int, e: int, rest: str) -> str:
    return f"{DEMO_MOE}experts.{h}.expertHead.{e}.mlp.{rest}"


class _Conversion:
    """One :func:`convert_state_dict` call's bookkeeping: tensors filled, DeMo keys absent, shapes that misfit.

    Every ``fill_*`` method fills its part of ``out`` (keyed like ``target``) through :meth:`put`.
    """

    def __init__(self, demo: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> None:
        self.demo = demo
        self.target = target
        self.src = _Source(demo)
        self.out: dict[str, torch.Tensor] = {}
        self.wanted: dict[str, list[str]] = {}  # our key -> the DeMo keys it needs that are absent
        self.bad: list[str] = []  # shape mismatches, "DeMo key (shape) -> our key (shape)"
        self.handled: set[str] = set()

    def put(self, key: str, value: torch.Tensor | None, needs: list[str]) -> None:
        """Fill ``key``; with ``value`` None, note the absent DeMo keys (misshapen ones are already in ``bad``)."""
        self.handled.add(key)
        if value is not None:
            self.out[key] = value
        elif any(k not in self.demo for k in needs):
            self.wanted[key] = [k for k in needs if k not in self.demo]

    def take_all(self, keys: list[str], shape: tuple[int, ...], key: str) -> list[torch.Tensor] | None:
        """The expert tensors ``keys``, each of ``shape`` (None if one is absent or misshapen)."""
        values = [self.src.take(k) for k in keys]
        present = [v for v in values if v is not None]
        wrong = [f"{k} {tuple(v.shape)} -> {key} (chunks of {shape})" for k, v in zip(keys, values)
                 if v is not None and tuple(v.shape) != shape]
        self.bad.extend(wrong)
        return present if len(present) == len(values) and not wrong else None

    def fill_reshaped(self) -> None:
        """The tensors that only change shape: the SIE camera table and the seven HDM query tokens."""
        if "backbone.camera_embed" in self.target:
            cv = self.src.take("BACKBONE.cv_embed")
            self.put("backbone.camera_embed", None if cv is None else cv.reshape(cv.shape[0], -1),
                     ["BACKBONE.cv_embed"])
        for i, subset in enumerate(HDM_SUBSETS):
            key = f"generalFusion.{_subset_letters(subset)}_token"
            if f"hdm.queries.{i}.query" in self.target:
                tok = self.src.take(key)
                self.put(f"hdm.queries.{i}.query", None if tok is None else tok.reshape(-1), [key])

    def fill_experts(self) -> None:
        """ATM's E x H expert MLPs and BatchNorms, stacked into the batched expert tensors (if the model has ATM)."""
        if "atm.expert_weight" not in self.target:
            return
        target = self.target
        n_exp, heads, c, _ = target["atm.expert_weight"].shape
        grid = [(e, h) for e in range(n_exp) for h in range(heads)]  # e-major: channel e*D + h*c
        for name, rest in (("atm.expert_weight", "0.weight"), ("atm.expert_bias", "0.bias")):
            keys = [_expert_key(h, e, rest) for e, h in grid]
            vals = self.take_all(keys, tuple(target[name].shape[2:]), name)
            self.put(name, None if vals is None else torch.stack(vals).reshape(target[name].shape), keys)
        for stat in BN_STATS:
            keys = [_expert_key(h, e, "2." + stat) for e, h in grid]
            vals = self.take_all(keys, (c,), f"atm.expert_bn.{stat}")
            self.put(f"atm.expert_bn.{stat}", None if vals is None else torch.cat(vals), keys)
        keys = [_expert_key(h, e, "2.num_batches_tracked") for e, h in grid]
        vals = self.take_all(keys, (), "atm.expert_bn.num_batches_tracked")
        self.put("atm.expert_bn.num_batches_tracked", None if vals is None else torch.stack(vals).max(), keys)

    def fill_renamed(self) -> tuple[list[str], list[str]]:
        """Every other tensor, by :func:`_renames`. Returns the keys kept from ``target`` (:data:`NEW_KEYS`) and
        the keys no rule maps."""
        renames = _renames()
        kept: list[str] = []
        unmapped: list[str] = []
        for key in self.target:
            if key in self.handled:
                continue
            if key in NEW_KEYS:
                self.out[key] = self.target[key]
                kept.append(key)
                continue
            rule = next(((s, d) for s, d in renames if key.startswith(d)), None)
            if rule is None:
                unmapped.append(key)
                continue
            source_key = rule[0] + key[len(rule[1]):]
            self.put(key, self.src.take(source_key), [source_key])
        return kept, unmapped

    def problems(self, unmapped: list[str]) -> list[str]:
        """One sentence each for DeMo tensors left over, model tensors missing and shape mismatches."""
        problems = []
        leftover = self.src.leftover()
        if leftover:
            hint = (" (MambaPro prompts / adapters: DeMo's MODEL.PROMPT / MODEL.ADAPTER, which this repository does "
                    "not have)" if any(".adapter_" in k for k in leftover) else "")
            problems.append(f"{len(leftover)} DeMo tensor(s) have no place in this model{hint}: "
                            f"{short_key_list(leftover)}")
        missing = [f"{k} (from {short_key_list(v, 2)})" for k, v in self.wanted.items()] + [
            f"{k} (no DeMo counterpart)" for k in unmapped]
        if missing:
            problems.append(f"{len(missing)} tensor(s) of this model are missing from the DeMo checkpoint: "
                            f"{short_key_list(missing, 8)}")
        bad = self.bad + [f"{k} {tuple(v.shape)} -> {tuple(self.target[k].shape)}" for k, v in self.out.items()
                          if v.shape != self.target[k].shape]
        if bad:
            problems.append(f"shape mismatch for {len(bad)} tensor(s) (DeMo -> this model): {short_key_list(bad, 6)}")
        return problems


def convert_state_dict(
    demo: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], arch: DemoArchitecture
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a DeMo state dict onto ``target`` (the fresh model's ``state_dict()``: names, shapes, dtypes).

    Returns the converted dict (every key of ``target``, in its dtype) and the keys kept from
    ``target`` because DeMo has no counterpart (:data:`NEW_KEYS`). Raises
    :class:`ConversionError` listing DeMo tensors left over, model tensors missing, and shape
    mismatches (the CLIP tower's first, described as a whole).
    """
    if OUR_TOWER + "conv1.weight" in target:
        ours = TowerShape.of(target, OUR_TOWER)
        if ours != arch.tower:
            raise ConversionError(f"wrong architecture: the checkpoint's CLIP tower ({arch.tower}) is not the "
                                  f"configured one ({ours}); set MODEL.BACKBONE and INPUT.SIZE_TRAIN / SIZE_TEST")
    conversion = _Conversion(demo, target)
    conversion.fill_reshaped()
    conversion.fill_experts()
    kept, unmapped = conversion.fill_renamed()
    problems = conversion.problems(unmapped)
    if problems:
        raise ConversionError("; ".join(problems))
    converted = {k: conversion.out[k].to(target[k].dtype).clone() for k in target}
    return converted, kept
