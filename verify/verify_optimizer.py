#!/usr/bin/env python
"""Executable invariants of ExpB1's optimizer parameter groups. Exit 1 if any breaks.

    python verify/verify_optimizer.py                          # all checks on a fresh ExpB1 model
    python verify/verify_optimizer.py --inject-bug one_group   # one group, list(model.parameters()): exits 1
    python verify/verify_optimizer.py --inject-bug duplicate   # the scale in both groups: exits 1

``model.get_parameters()`` must return exactly
``[{'params': all_others}, {'params': [sap.logit_scale_log], 'weight_decay': 0.0}]``, so that
SGD's weight decay (default 5e-4) never pulls the log-scale to 0 (the scale to 1). Checks,
each printed with its value, on the model built from ``configs/Base-FewShot.yml`` and on the
SGD optimizer built from the groups as the trainer builds it:

  1. exactly two groups;
  2. the second holds exactly one tensor, and it is ``sap.logit_scale_log``;
  3. the second group's weight decay is 0.0 (in the group and in the optimizer);
  4. the first group sets no weight decay of its own and gets the default (SOLVER.WEIGHT_DECAY);
  5. every trainable parameter is in exactly one group: none twice, none lost, none frozen;
  6. one SGD step with a zero gradient leaves ``logit_scale_log`` unchanged (no decay applied)
     while decaying the other parameters.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import load_config
from modeling import build_model
from verify.harness import Check, run_collected

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = ROOT / "configs" / "Base-FewShot.yml"
BUGS = ("one_group", "decay_on_scale", "duplicate", "lost")


def build_sgd(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    """SGD as in the trainer (momentum, nesterov, default weight decay from SOLVER)."""
    s = cfg.SOLVER
    return torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV, weight_decay=s.WEIGHT_DECAY)


def run_checks(model: nn.Module, cfg: Any) -> list[Check]:
    """Every parameter-group invariant of ``model.get_parameters()``; never raises on a broken one."""
    checks: list[Check] = []
    default_wd = float(cfg.SOLVER.WEIGHT_DECAY)
    scale = model.sap.logit_scale_log
    groups = model.get_parameters()
    checks.append(Check("exactly two parameter groups", len(groups) == 2, f"{len(groups)} groups"))
    if len(groups) < 2:
        return checks
    second = list(groups[1]["params"])
    checks.append(Check("second group holds exactly one tensor, sap.logit_scale_log",
                        len(second) == 1 and second[0] is scale,
                        f"{len(second)} tensor(s), is logit_scale_log: {len(second) == 1 and second[0] is scale}"))
    checks.append(Check("second group weight_decay = 0.0 (as given)", groups[1].get("weight_decay") == 0.0,
                        f"weight_decay {groups[1].get('weight_decay')!r}"))
    first = list(groups[0]["params"])
    checks.append(Check("first group sets no weight_decay of its own", "weight_decay" not in groups[0],
                        f"keys {sorted(groups[0])}"))

    trainable = [p for p in model.parameters() if p.requires_grad]
    listed = [p for g in groups for p in g["params"]]
    ids = [id(p) for p in listed]
    dup = len(ids) - len(set(ids))
    lost = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in set(ids)]
    frozen = sum(1 for p in listed if not p.requires_grad)
    n_first = sum(p.numel() for p in first)
    checks.append(Check("every trainable parameter exactly once (none twice, none lost, none frozen)",
                        dup == 0 and not lost and frozen == 0 and len(listed) == len(trainable),
                        f"group 0: {len(first)} tensors ({n_first:,} values), group 1: {len(second)} tensor; "
                        f"model: {len(trainable)} trainable tensors; duplicates {dup}, lost {lost[:3]}, frozen {frozen}"))

    try:
        opt = build_sgd(groups, cfg)
    except (ValueError, TypeError) as err:  # e.g. a parameter in two groups
        checks.append(Check("SGD accepts the groups", False, f"{type(err).__name__}: {err}"))
        return checks
    wds = [g["weight_decay"] for g in opt.param_groups]
    checks.append(Check(f"optimizer weight decay: group 0 = default {default_wd:g}, group 1 = 0.0",
                        len(wds) == 2 and wds[0] == default_wd and wds[1] == 0.0, f"weight_decay per group {wds}"))

    # one step with zero gradients: only weight decay moves parameters
    saved = [p.detach().clone() for p in listed]
    before, probe, probe_before = scale.detach().clone(), first[0], first[0].detach().clone()
    for p in listed:
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = float((scale.detach() - before).abs())
    decayed = float((probe.detach() - probe_before).abs().max())
    with torch.no_grad():  # leave the model as it was
        for p, value in zip(listed, saved):
            p.copy_(value)
    model.zero_grad(set_to_none=True)
    checks.append(Check("an SGD step with zero gradient leaves logit_scale_log unchanged (others decay)",
                        moved == 0.0 and decayed > 0.0, f"|delta log-scale| {moved:.3g}, |delta other| {decayed:.3g}"))
    return checks


def inject_bug(model: nn.Module, bug: str) -> None:
    """Replace ``get_parameters`` with a wrong version (to show the checks catch it)."""
    if bug == "one_group":  # a single group: the default weight decay also acts on the log-scale
        model.get_parameters = lambda: [{"params": list(model.parameters())}]
    elif bug == "decay_on_scale":
        good = model.get_parameters
        model.get_parameters = lambda: [good()[0], {"params": good()[1]["params"], "weight_decay": 5e-4}]
    elif bug == "duplicate":
        model.get_parameters = lambda: [{"params": list(model.parameters())},
                                        {"params": [model.sap.logit_scale_log], "weight_decay": 0.0}]
    elif bug == "lost":
        good = model.get_parameters
        model.get_parameters = lambda: [{"params": good()[0]["params"][1:]}, good()[1]]
    else:
        raise ValueError(f"unknown bug '{bug}'")


def _checks_of(config_file: str, bug: str | None) -> list[Check]:
    cfg = load_config(config_file)
    torch.manual_seed(0)
    model = build_model(cfg)
    if bug:
        inject_bug(model, bug)
    return run_checks(model, cfg)


def main(argv: list[str] | None = None) -> int:
    return run_collected("verify_optimizer", _checks_of, argv, doc=__doc__, bugs=BUGS, config_file=DEFAULT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
