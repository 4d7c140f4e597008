"""The performance probes behind ``python tools/benchmark.py --task TASK``: one module per task.

Each task module has ``add_arguments(parser)`` (its own options) and ``run(args, parser, argv) -> exit status``;
:data:`TASKS` maps the task names users type to them. :mod:`.timing` holds the clocks they share and
:mod:`.train_step` the trainer's step of either family, which the ``train``, ``eval`` and ``ops`` tasks time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: task name -> (module in this package, what it measures)
TASKS: dict[str, tuple[str, str]] = {
    "train": ("step_throughput", "the training step of the config's family (trainer's step): throughput, "
                                 "peak memory, FLOP utilisation (ReID) or episodes/s (few-shot)"),
    "eval": ("step_throughput", "evaluation throughput of the config's model"),
    "train,eval": ("step_throughput", "both, one fresh model per precision"),
    "loader": ("loader_throughput", "ReID training loader samples/s and images/s per worker count"),
    "losses": ("loss_cost", "CPU cost per call of every loss"),
    "rerank": ("rerank_cost", "k-reciprocal re-ranking time and peak memory"),
    "ops": ("op_count", "operations one ReID training step dispatches, per model part"),
    "memory": ("saved_memory", "bytes a ReID forward keeps for the backward, per model part"),
    "attention": ("attention_backends", "SDPA's kernels and a written-out attention at the CLIP tower's shape: "
                                        "time, memory, bitwise-repeatable backward, error against float64"),
}


def task_module(name: str) -> ModuleType:
    """The module of task ``name`` (imported now)."""
    return importlib.import_module(f"tools.benchmarks.{TASKS[name][0]}")
