"""Per-tensor optimizer rules: this repository's recipe and DeMo's make_optimizer, on hand-named tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeling.param_groups import DEFAULT_RULES, ParamRules, rule_groups

BASE, TOWER, WD = 3.5e-4, 5e-6, 1e-4
DEMO = ParamRules(bias_lr_factor=2.0, weight_decay_bias=1e-4, decay_all=True)


def _named() -> list[tuple[str, nn.Parameter]]:
    shapes = {
        "backbone.visual.conv1.weight": (4, 3),
        "backbone.visual.ln_pre.weight": (4,),
        "backbone.visual.ln_pre.bias": (4,),
        "backbone.visual.attn.in_proj_bias": (12,),
        "backbone.visual.positional_embedding": (5, 4),
        "backbone.camera_embed": (3, 4),
        "hdm.queries.0.query": (4,),
        "reduce.weight": (4, 8),
        "reduce.bias": (4,),
        "head.bn.weight": (4,),
        "head.classifier.weight": (10, 4),
    }
    named = [(k, nn.Parameter(torch.zeros(s))) for k, s in shapes.items()]
    frozen = nn.Parameter(torch.zeros(4), requires_grad=False)
    return [*named, ("head.bn.bias", frozen)]


def _settings(groups: list[dict], named: list[tuple[str, nn.Parameter]]) -> dict[str, tuple[float, float]]:
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in named if id(p) in by_id}


def _groups(rules: ParamRules = DEFAULT_RULES) -> tuple[list[dict], dict[str, tuple[float, float]]]:
    named = _named()
    groups = rule_groups(named, BASE, WD, backbone_lr=TOWER, rules=rules, no_decay_names={"positional_embedding",
                         "camera_embed", "query"}, is_backbone=lambda n: n.startswith("backbone.visual."))
    return groups, _settings(groups, named)


def test_default_rules_spare_biases_norms_and_embeddings_from_decay() -> None:
    groups, got = _groups()
    assert got == {
        "backbone.visual.conv1.weight": (TOWER, WD),
        "backbone.visual.ln_pre.weight": (TOWER, 0.0),
        "backbone.visual.ln_pre.bias": (TOWER, 0.0),
        "backbone.visual.attn.in_proj_bias": (TOWER, 0.0),
        "backbone.visual.positional_embedding": (TOWER, 0.0),
        "backbone.camera_embed": (BASE, 0.0),
        "hdm.queries.0.query": (BASE, 0.0),
        "reduce.weight": (BASE, WD),
        "reduce.bias": (BASE, 0.0),
        "head.bn.weight": (BASE, 0.0),
        "head.classifier.weight": (BASE, WD),
    }
    assert sorted(g["name"] for g in groups) == ["backbone", "backbone_no_decay", "new", "new_no_decay"]


def test_demo_rules_are_make_optimizer_s() -> None:
    """DeMo: every tensor decayed; a bias at 2 x BASE_LR with WEIGHT_DECAY_BIAS, except in the backbone
    ("base" in its name), which trains at 5e-6 whatever the tensor; the SIE table is not in the backbone."""
    groups, got = _groups(DEMO)
    assert got == {
        "backbone.visual.conv1.weight": (TOWER, WD),
        "backbone.visual.ln_pre.weight": (TOWER, WD),
        "backbone.visual.ln_pre.bias": (TOWER, 1e-4),
        "backbone.visual.attn.in_proj_bias": (TOWER, 1e-4),
        "backbone.visual.positional_embedding": (TOWER, WD),
        "backbone.camera_embed": (BASE, WD),
        "hdm.queries.0.query": (BASE, WD),
        "reduce.weight": (BASE, WD),
        "reduce.bias": (7e-4, 1e-4),
        "head.bn.weight": (BASE, WD),
        "head.classifier.weight": (BASE, WD),
    }
    assert "head.bn.bias" not in got  # frozen: in no group
    assert sorted(g["name"] for g in groups) == ["backbone", "backbone_bias", "new", "new_bias"]


def test_large_fc_lr_trains_classifiers_at_twice_the_base_rate() -> None:
    _, got = _groups(ParamRules(bias_lr_factor=2.0, weight_decay_bias=1e-4, decay_all=True, large_fc_lr=True))
    assert got["head.classifier.weight"] == pytest.approx((2 * BASE, WD))
    assert got["reduce.weight"] == (BASE, WD)


def test_every_trainable_tensor_is_in_exactly_one_group() -> None:
    for rules in (ParamRules(), DEMO):
        groups, _ = _groups(rules)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len([p for _, p in _named() if p.requires_grad])
