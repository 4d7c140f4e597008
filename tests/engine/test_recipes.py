"""Pieces made from a recipe: what identifies a recipe, and which changes of it make a made piece stale."""

from __future__ import annotations

from engine.recipes import recipe_changes


def test_recipe_changes_ignores_keys_added_later() -> None:
    recorded = {"SOLVER": {"BASE_LR": 1e-3, "MAX_EPOCHS": 15}, "MODEL": {"NAME": "DeMo_SDTPS"}}
    assert recipe_changes(recorded, {**recorded, "LOSS": {"NEW_KEY": 1}}) == []
    assert recipe_changes(recorded, {"SOLVER": {"BASE_LR": 1e-3, "MAX_EPOCHS": 20}, "MODEL": {"NAME": "DeMo_SDTPS"}}) \
        == ["SOLVER.MAX_EPOCHS: 15 -> 20"]
    assert recipe_changes(recorded, {"SOLVER": {"BASE_LR": 1e-3}, "MODEL": {"NAME": "DeMo_SDTPS"}}) \
        == ["SOLVER.MAX_EPOCHS: 15 -> '<no such key>'"]
