"""A toy training run used to test checkpoint/resume: SGD on a tiny MLP with random data.

    python tests/helpers/toy_run.py OUT_DIR --steps 20 [--ckpt-every 5] [--die-at N] [--resume]

Every step draws its batch from the global torch RNG, so a resume is only
bit-identical if the RNG state was restored too. ``--die-at N`` SIGKILLs the
process at the start of step N (after the checkpoints before it were written).
At the end it writes ``final.pt`` (model + optimizer state) and ``lrs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.checkpoint import Checkpointer  # noqa: E402
from engine.device import build_amp_policy  # noqa: E402
from engine.seed import seed_everything  # noqa: E402
from engine.solver import WarmupScheduler, build_optimizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--die-at", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    seed_everything(0, deterministic=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    opt = build_optimizer(
        [{"params": model[0].parameters()}, {"params": model[3].parameters(), "weight_decay": 0.0}],
        name="SGD", lr=0.1, weight_decay=5e-4,
    )
    sched = WarmupScheduler(opt, total_steps=args.steps, warmup_steps=4, mode="cosine")
    amp = build_amp_policy("fp32", torch.device("cpu"))
    ckpt = Checkpointer(out, keep=2)
    start = 0
    lrs: list[float] = []
    if args.resume:
        state = ckpt.load(ckpt.latest(), model=model, optimizer=opt, scheduler=sched, scaler=amp.scaler)
        start = state["step"]
        lrs = state["extra"]["lrs"]
    for step in range(start, args.steps):
        if step == args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(32, 8)
        y = torch.randint(0, 3, (32,))
        with amp.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
        if (step + 1) % args.ckpt_every == 0:
            ckpt.save(f"epoch{step + 1:04d}", model=model, optimizer=opt, scheduler=sched,
                      scaler=amp.scaler, epoch=0, step=step + 1, extra={"lrs": lrs})
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out / "final.pt")
    (out / "lrs.json").write_text(json.dumps(lrs))


if __name__ == "__main__":
    main()
