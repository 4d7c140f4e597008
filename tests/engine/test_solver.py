"""LR schedules against hand-computed values, per-group base LRs, optimizer construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.solver import WarmupScheduler, build_optimizer, build_scheduler, lr_factor


def test_warmup_is_linear_from_factor_to_one() -> None:
    # 4 warm-up steps from 0.1: 0.1, 0.325, 0.55, 0.775, then 1.0
    got = [lr_factor(s, 10, warmup_steps=4, warmup_factor=0.1) for s in range(5)]
    assert got == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0])


def test_cosine_hand_values() -> None:
    # after warm-up of 2, cosine over 8 steps: halfway (step 6) is 0.5, end is min_factor
    assert lr_factor(6, 10, warmup_steps=2) == pytest.approx(0.5)
    assert lr_factor(10, 10, warmup_steps=2) == pytest.approx(0.0)
    assert lr_factor(4, 10, warmup_steps=2, min_factor=0.2) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_step_schedule_hand_values() -> None:
    f = [lr_factor(s, 100, warmup_steps=0, mode="step", milestones=[3, 6], gamma=0.1) for s in (0, 2, 3, 5, 6, 99)]
    assert f == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_unknown_mode_fails() -> None:
    with pytest.raises(ValueError, match="cosine or step"):
        lr_factor(5, 10, mode="linear")


def test_scheduler_scales_each_group_and_resumes_from_state() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = build_optimizer([{"params": a.parameters(), "lr": 1e-5}, {"params": b.parameters()}], "AdamW", lr=5e-5)
    sched = WarmupScheduler(opt, total_steps=20, warmup_steps=5, warmup_factor=0.01)
    seen = []
    for _ in range(8):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx([1e-7, 5e-7])
    assert seen[5] == pytest.approx([1e-5, 5e-5])
    state = sched.state_dict()
    opt2 = build_optimizer([{"params": a.parameters(), "lr": 1e-5}, {"params": b.parameters()}], "AdamW", lr=5e-5)
    sched2 = WarmupScheduler(opt2, total_steps=20, warmup_steps=5, warmup_factor=0.01)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])


def test_build_from_config_converts_epochs_to_steps() -> None:
    cfg = load_config(None, ["SOLVER.MAX_EPOCHS", "10", "SOLVER.WARMUP_EPOCHS", "2", "SOLVER.BASE_LR", "0.1"])
    opt = build_optimizer(nn.Linear(2, 2).parameters(), cfg.SOLVER.OPTIMIZER, lr=cfg.SOLVER.BASE_LR)
    sched = build_scheduler(cfg, opt, steps_per_epoch=5)
    assert sched.total_steps == 50 and sched.warmup_steps == 10
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] is True


def test_unknown_optimizer_fails() -> None:
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(nn.Linear(2, 2).parameters(), "LAMB")
