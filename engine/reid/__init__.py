"""The ReID family (DeMo, DeMo-SDTPS): everything of it that is not a model or a loss.

``family.py`` registers it (names, config keys, checks); ``config.py`` and ``checks.py`` hold its keys;
``setup.py`` builds the data and model, ``objective.py`` turns a batch into a loss, ``evaluator.py`` runs
retrieval, ``missing.py`` names missing-modality settings, ``visualize.py`` draws the figures,
``tower_pretrain.py`` pretrains a synthetic tower, and ``run.py`` is what ``train_net.py`` runs.

The names below load on first use, so that registering the family imports no model or data set.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "run_reid": "run", "ReIDApplication": "run", "STAGE": "run",
    "ReIDObjective": "objective",
    "ReIDEvaluator": "evaluator", "evaluate": "evaluator", "extract_features": "evaluator",
    "missing_record": "evaluator", "scalar_metrics": "evaluator", "summary_line": "evaluator",
    "write_results": "evaluator",
    "ReIDSetup": "setup", "build_reid_model": "setup", "build_reid_optimizer": "setup", "build_reid_setup": "setup",
    "check_names": "setup", "resolve_test_modalities": "setup", "synthetic_kwargs": "setup",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"engine.reid.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'engine.reid' has no attribute '{name}'")
