"""Run under torchrun: checks launch() joins the group and all_gather_with_grad routes gradients.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/ddp_probe.py OUT_DIR
Each rank writes ``rank<r>.json`` with what it observed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from engine.launch import launch, wrap_ddp  # noqa: E402
from utils.distributed import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size  # noqa: E402


def main(out: str) -> None:
    rank, world = get_rank(), get_world_size()
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(x)
    # loss weights rank r's rows by (r + 1): d loss / d x on rank r = (r + 1) summed over ranks' copies
    weights = torch.cat([torch.full((2, 3), float(r + 1)) for r in range(world)])
    (gathered * weights).sum().backward()
    labels = all_gather_no_grad(torch.tensor([rank * 10, rank * 10 + 1]))
    model = wrap_ddp(torch.nn.Linear(3, 1), torch.device("cpu"))
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "world": world,
        "gathered": gathered.detach().tolist(),
        "grad": x.grad.tolist(),
        "labels": labels.tolist(),
        "ddp": type(model).__name__,
    }))


if __name__ == "__main__":
    launch(main, sys.argv[1])
