"""The few-shot family's registration: what the engine's core knows of it (no model or data loads here)."""

from __future__ import annotations

from engine.family import Family, register_family
from engine.fewshot import checks
from engine.fewshot.config import add_fewshot_config

FEWSHOT = register_family(Family(
    name="fewshot",
    label="few-shot",
    script="train_b1_improvement.py",
    models=("ExpB1",),
    datasets=("miniImageNet", "tieredImageNet", "CIFAR-FS", "CUB", "synthetic_fewshot"),
    add_config=add_fewshot_config,
    run="engine.fewshot.run:run",
    choices=checks.choices,
    ranges=checks.RANGES,
    check=checks.check,
    key_hints=checks.KEY_HINTS,
))
