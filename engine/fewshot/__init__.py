"""The few-shot family (ExpB1 + SAP): everything of it that is not a model or a loss.

``family.py`` registers it (names, config keys, checks); ``config.py`` and ``checks.py`` hold its keys;
``data.py`` reads and checks the data set and makes SAP's anchors, ``objective.py`` turns a batch or an
episode into a loss, ``evaluator.py`` scores fixed-seed episodes, ``plots.py`` draws the SAP statistics, and
``run.py`` is what ``train_b1_improvement.py`` runs.

The names below load on first use, so that registering the family imports no model or data set.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FewShotApplication": "run", "build_stage": "run", "run_fewshot": "run", "stage_epochs": "run",
    "PretrainObjective": "objective", "EpisodeObjective": "objective",
    "FewShotEvaluator": "evaluator", "evaluate_split": "evaluator", "evaluate_episodes": "evaluator",
    "load_fewshot_data": "data", "install_anchors": "data", "check_episodes": "data",
    "STAGES": "checks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"engine.fewshot.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'engine.fewshot' has no attribute '{name}'")
