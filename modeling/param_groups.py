"""Optimizer parameter groups from per-tensor rules: which learning rate and weight decay each tensor gets.

Two recipes are expressed by the same rules (:class:`ParamRules`):

* this repository's (the defaults): every tensor at its part's rate (the pretrained backbone at its own rate,
  everything else at the base rate), no weight decay on biases, 1-D tensors (norm weights, gate scales) and
  embeddings / learned tokens;
* DeMo's published ``make_optimizer`` (``bias_lr_factor=2, weight_decay_bias=1e-4, decay_all=True``): every
  tensor decayed; a tensor whose name contains ``bias`` trains at ``bias_lr_factor x`` the base rate with
  ``weight_decay_bias``, except in the backbone, whose tensors (biases included) all train at the backbone's
  rate; with ``large_fc_lr`` a tensor whose name contains ``classifier`` trains at twice the base rate,
  whatever else it is. The name tests are DeMo's (substrings of the parameter's full name).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ParamRules:
    """How biases, 1-D tensors, embeddings and classifiers deviate from their part's rate and decay.

    ``bias_lr_factor``: a non-backbone bias trains at this x the base rate (``SOLVER.BIAS_LR_FACTOR``).
    ``weight_decay_bias``: the decay of every bias, backbone included (``SOLVER.WEIGHT_DECAY_BIAS``).
    ``decay_all``: decay every non-bias tensor; False spares 1-D tensors and the named embeddings
    (``SOLVER.DECAY_ALL_TENSORS``). ``large_fc_lr``: classifiers at 2 x the base rate (``SOLVER.LARGE_FC_LR``).
    """

    bias_lr_factor: float = 1.0
    weight_decay_bias: float = 0.0
    decay_all: bool = False
    large_fc_lr: bool = False


#: this repository's recipe
DEFAULT_RULES = ParamRules()


def rule_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    base_lr: float,
    weight_decay: float,
    *,
    is_backbone: Callable[[str], bool],
    backbone_lr: float | None = None,
    no_decay_names: Collection[str] = (),
    rules: ParamRules = DEFAULT_RULES,
) -> list[dict[str, Any]]:
    """Named optimizer groups (``backbone`` / ``new`` / ``classifier``, each with ``_bias`` and ``_no_decay``
    variants) holding every trainable tensor of ``named_params`` exactly once; empty groups are dropped.

    Under the default rules a bias has the settings of a no-decay tensor and joins ``<part>_no_decay``.
    Each group carries ``name``, ``lr`` and ``weight_decay``; the groups come in that order (part, then
    decayed, no-decay, bias), each holding its tensors in the order of ``named_params``.
    """
    tower_lr = base_lr if backbone_lr is None else backbone_lr
    folded = rules.bias_lr_factor == 1.0 and rules.weight_decay_bias == 0.0  # a bias is just a no-decay tensor
    groups: dict[str, dict[str, Any]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        backbone = is_backbone(name)
        part, lr = ("backbone", tower_lr) if backbone else ("new", base_lr)
        if "bias" in name:
            kind, wd = ("_no_decay" if folded else "_bias"), rules.weight_decay_bias
            if not backbone:
                lr = base_lr * rules.bias_lr_factor
        elif not rules.decay_all and (p.ndim <= 1 or leaf in no_decay_names):
            kind, wd = "_no_decay", 0.0
        else:
            kind, wd = "", weight_decay
        if rules.large_fc_lr and "classifier" in name:
            part, lr = "classifier", 2.0 * base_lr
        group = groups.setdefault(part + kind, {"name": part + kind, "params": [], "lr": lr, "weight_decay": wd})
        if (group["lr"], group["weight_decay"]) != (lr, wd):  # a rule that splits one named group: a bug here
            raise AssertionError(f"{name}: lr {lr}, wd {wd} in group {part + kind} of lr {group['lr']}, "
                                 f"wd {group['weight_decay']}")
        group["params"].append(p)
    order = [part + kind for part in ("backbone", "new", "classifier") for kind in ("", "_no_decay", "_bias")]
    return [groups[name] for name in order if name in groups]  # a fixed order: checkpoints map groups by index
