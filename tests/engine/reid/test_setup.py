"""configs/<BENCH>/DeMo.yml trains with DeMo's recipe: learning rate and weight decay of each kind of tensor at
hand-computed values over the 50 epochs, and every --real ablation row on that same recipe.

The reference formulas are written out here from DeMo's solver (make_optimizer.py: per-tensor rules;
scheduler_factory.py: timm's CosineLRScheduler, t_initial 50, warm-up 10 epochs from 0.1 x BASE_LR, floor
0.001 x BASE_LR, noise 0.67 / std 1 / seed 42 over epochs [0, 50), stepped at the start of each epoch).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import ConfigError, load_config
from engine.reid import build_reid_model, build_reid_optimizer
from engine.solver import EpochCosineScheduler, build_scheduler
from losses.reid_criterion import ReIDCriterion

ROOT = Path(__file__).resolve().parents[3]
CPU = ["MODEL.BACKBONE", "clip_vit_tiny", "DEVICE.NAME", "cpu", "DEVICE.PRECISION", "fp32"]
BASE, TOWER, BIAS = 3.5e-4, 5e-6, 7e-4
START, FLOOR = 3.5e-5, 3.5e-7


def noise_factor(epoch: int) -> float:
    """1 + n, n ~ N(0, 1) redrawn until |n| < 0.67, from torch's generator seeded 42 + epoch (epochs < 50)."""
    if epoch >= 50:
        return 1.0
    g = torch.Generator().manual_seed(42 + epoch)
    while abs(n := torch.randn(1, generator=g).item()) >= 0.67:
        pass
    return 1.0 + n


def demo_lr(epoch: int, group_lr: float) -> float:
    if epoch < 10:  # linear from the same absolute start for every group, towards the group's own rate
        lr = START + epoch * (group_lr - START) / 10
    elif epoch < 50:  # cosine counted from epoch 0 over the 50 epochs, down to the same absolute floor
        lr = FLOOR + 0.5 * (group_lr - FLOOR) * (1 + math.cos(math.pi * epoch / 50))
    else:
        lr = FLOOR
    return lr * noise_factor(epoch)


@pytest.fixture(scope="module")
def demo_run() -> tuple:
    cfg = load_config(ROOT / "configs/RGBNT201/DeMo.yml", CPU)
    model = build_reid_model(cfg, 171, 4)
    optimizer = build_reid_optimizer(cfg, model, ReIDCriterion(cfg))
    return model, optimizer, build_scheduler(cfg, optimizer, steps_per_epoch=20)


KINDS = {  # a tensor of each kind -> its rate before the schedule, its decay
    "backbone.visual.conv1.weight": (TOWER, 1e-4),
    "backbone.visual.ln_pre.bias": (TOWER, 1e-4),  # DeMo's "base" rule wins over its bias rule
    "backbone.visual.positional_embedding": (TOWER, 1e-4),
    "backbone.camera_embed": (BASE, 1e-4),  # the SIE table is not in DeMo's "base"
    "hdm.queries.0.query": (BASE, 1e-4),
    "global_local.reduce.0.0.weight": (BASE, 1e-4),  # a LayerNorm weight, decayed
    "global_local.reduce.0.1.weight": (BASE, 1e-4),
    "global_local.reduce.0.1.bias": (BIAS, 1e-4),
    "atm.expert_bias": (BIAS, 1e-4),
    "moe_head.classifier.weight": (BASE, 1e-4),
}


@pytest.mark.parametrize("epoch", [1, 2, 5, 9, 10, 30, 49, 50])
def test_demo_lr_and_weight_decay_of_each_kind_of_tensor(demo_run: tuple, epoch: int) -> None:
    model, optimizer, scheduler = demo_run
    scheduler.begin_epoch(epoch - 1)  # the trainer's epochs are 0-based, DeMo's 1-based
    group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for name, (rate, decay) in KINDS.items():
        g = group[id(params[name])]
        assert g["lr"] == pytest.approx(demo_lr(epoch, rate), rel=1e-9), name
        assert g["weight_decay"] == decay, name


def test_demo_schedule_pins(demo_run: tuple) -> None:
    """Numbers read off DeMo's own run: epoch 1's noise factor, the backbone's falling warm-up, the floor."""
    model, optimizer, scheduler = demo_run
    assert noise_factor(1) == pytest.approx(0.351599, abs=1e-6)
    params = dict(model.named_parameters())
    group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    tower, new = group[id(params["backbone.visual.conv1.weight"])], group[id(params["global_local.reduce.0.0.weight"])]
    scheduler.begin_epoch(0)
    assert tower["lr"] == pytest.approx(1.1251165e-05, rel=1e-6)  # 3.2e-5 x 0.351599, DeMo's epoch 1
    assert new["lr"] == pytest.approx(2.3381328e-05, rel=1e-6)
    before_noise = []
    for epoch in range(1, 11):
        scheduler.begin_epoch(epoch - 1)
        before_noise.append(tower["lr"] / noise_factor(epoch))
    assert all(a > b for a, b in zip(before_noise, before_noise[1:]))  # 3.5e-5 down to 5e-6
    scheduler.begin_epoch(49)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([FLOOR] * len(optimizer.param_groups))


def test_per_epoch_schedule_state_resumes(demo_run: tuple) -> None:
    _, optimizer, scheduler = demo_run
    scheduler.begin_epoch(6)
    want = [g["lr"] for g in optimizer.param_groups]
    state = scheduler.state_dict()
    scheduler.begin_epoch(40)
    scheduler.load_state_dict(state)
    scheduler.begin_epoch(scheduler.epoch - 1)
    assert [g["lr"] for g in optimizer.param_groups] == want
    assert isinstance(scheduler, EpochCosineScheduler)
    scheduler.step()  # the trainer's call after each optimizer step changes nothing
    assert [g["lr"] for g in optimizer.param_groups] == want
    scheduler.step(7)  # timm's and DeMo's call at the start of (1-based) epoch 7
    assert [g["lr"] for g in optimizer.param_groups] == want


def test_repository_recipe_is_unchanged_elsewhere() -> None:
    cfg = load_config(ROOT / "configs/RGBNT201/DeMo_SDTPS_DGAF_ablation.yml", CPU)
    assert cfg.SOLVER.SCHEDULER == "cosine" and cfg.SOLVER.LR_NOISE == 0.0
    assert (cfg.SOLVER.BIAS_LR_FACTOR, cfg.SOLVER.WEIGHT_DECAY_BIAS, cfg.SOLVER.DECAY_ALL_TENSORS) == (1.0, 0.0, False)
    assert not cfg.INPUT.AUGMENT_PER_MODALITY and cfg.DATALOADER.REDEAL_LEFTOVERS
    assert cfg.INPUT.TEST_INTERPOLATION == "bicubic"


RECIPE = ("SOLVER", "INPUT", "DATALOADER", "DEVICE", "SEED")


def _recipe(cfg) -> dict:
    return {k: cfg[k] for k in RECIPE}


@pytest.mark.parametrize("table", ["demo_paper", "gate_init", "sdtps", "sdm"])
def test_real_rows_of_each_ablation_table_share_demo_s_recipe(table: str) -> None:
    """Two rows of a --real table differ only in what the row names: they all resolve to DeMo.yml's solver,
    input, data loader, precision and seed (a table whose rows have no real config has no --real rows)."""
    from engine.experiments.grid import flat_overrides as _flat
    from engine.experiments.specs import load_table

    demo = _recipe(load_config(ROOT / "configs/RGBNT201/DeMo.yml"))
    spec = load_table(table)
    rows = [r for r in spec["rows"] if "real_config" in r]
    assert len(rows) in (0, len(spec["rows"]))
    for row in rows:
        cfg = load_config(ROOT / row["real_config"], _flat(row.get("overrides", [])))
        assert _recipe(cfg) == demo, row["label"]


def test_sdm_table_has_no_real_rows_and_ablate_refuses_real_for_it(capsys: pytest.CaptureFixture) -> None:
    from tools.ablate import main

    spec = yaml.safe_load((ROOT / "configs/ablations/sdm.yaml").read_text())
    assert not any("real_config" in r for r in spec["rows"])
    assert main(["--table", "sdm", "--real", "--dry-run"]) == 2
    assert "no real_config" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["SOLVER.LR_NOISE", "0.5"], "timm_cosine"),
    (["SOLVER.SCHEDULER", "timm_cosine", "SOLVER.LR_NOISE", "1.5"], "LR_NOISE"),
    (["DATALOADER.REDEAL_LEFTOVERS", "False"], "REDEAL_LEFTOVERS"),
    (["INPUT.TEST_INTERPOLATION", "nearest"], "TEST_INTERPOLATION"),
])
def test_recipe_keys_refuse_what_cannot_work(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/synthetic/DeMo_SDTPS_tiny.yml", overrides)
