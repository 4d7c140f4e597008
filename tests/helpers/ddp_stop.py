"""Run under torchrun: a SIGINT that reaches rank 1 only stops both ranks at the same step, with one checkpoint.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/ddp_stop.py OUT_DIR
Each rank writes ``rank<r>.json`` with the step it stopped at and the reason it gives.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.checkpoint import Checkpointer  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.device import build_amp_policy  # noqa: E402
from engine.launch import launch  # noqa: E402
from engine.logger import MetricsLogger  # noqa: E402
from engine.trainer import RunInterrupted, Stage, Trainer  # noqa: E402
from tests.helpers.toy_training import Regression, ToyLoader  # noqa: E402
from utils.distributed import get_rank  # noqa: E402


class _Interrupting(Regression):
    """Rank 1 is sent SIGINT during its first step."""

    def loss(self, outputs: torch.Tensor, batch: Any, epoch: float) -> tuple[torch.Tensor, dict, dict]:
        if get_rank() == 1 and self.calls == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return super().loss(outputs, batch, epoch)


def main(out: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    g = torch.Generator().manual_seed(get_rank())
    loader = ToyLoader([(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stage = Stage("train", loader, 3, _Interrupting(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    cfg = load_config(None, ["SOLVER.LOG_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.GRAD_CLIP", "0.0"])
    cpu = torch.device("cpu")
    trainer = Trainer(cfg, model, cpu, build_amp_policy("fp32", cpu), Checkpointer(out),
                      MetricsLogger(out, "disabled"), stages=("train",))
    record: dict[str, Any] = {"stopped": False}
    try:
        trainer.fit(stage)
    except RunInterrupted as stop:
        record = {"stopped": True, "step": stop.run.step, "why": stop.signal_name,
                  "checkpoint": str(stop.checkpoint) if stop.checkpoint else None}
    Path(out, f"rank{get_rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    launch(main, sys.argv[1])
