"""torch.compile computes the eager step: one optimisation step of the tiny DeMo-SDTPS, compiled and eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.device import build_amp_policy
from engine.reid import ReIDObjective
from engine.trainer import Stage, Trainer, compile_model
from losses.reid_criterion import ReIDCriterion
from modeling import build_model

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _step(cfg, compiled: bool, epochs: tuple[float, ...] = (0.0,)) -> tuple[float, dict[str, float], float,
                                                                        dict[str, torch.Tensor]]:
    """The last of ``len(epochs)`` steps (one per epoch value): compiled as ``cfg.MODEL.COMPILE_SCOPE`` says."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    criterion = ReIDCriterion(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the update is linear in the gradient
    stage = Stage("train", [], 1, ReIDObjective(criterion, CPU), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    trainer = Trainer(cfg, model, CPU, build_amp_policy("fp32", CPU), None, None, stages=("train",))
    g = torch.Generator().manual_seed(1)
    batch = {"images": {m: torch.randn(8, 3, 64, 32, generator=g) for m in ("RGB", "NI", "TI")},
             "pids": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), "camids": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
             "masks": torch.ones(8, 3, dtype=torch.bool)}
    run_model = trainer.compile_stage(stage, model) if compiled else model
    params = [p for group in opt.param_groups for p in group["params"]]
    for epoch in epochs:
        loss, terms, grad_norm, _ = trainer.run_step(run_model, stage, params, batch, epoch)
    return loss, terms, grad_norm, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _tiny(*overrides: str):
    return load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml",
                       ["MODEL.NUM_CLASSES", "4", "MODEL.NUM_CAMERAS", "3", "INPUT.SIZE_TRAIN", "[64, 32]",
                        "INPUT.SIZE_TEST", "[64, 32]", "MODEL.DEMO.HDM_DROPOUT", "0.0", "MODEL.COMPILE", "default",
                        *overrides])


def _assert_same_step(compiled: tuple, eager: tuple) -> None:
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4)  # the loss
    assert set(compiled[1]) == set(eager[1]) and all(compiled[1][k] == pytest.approx(v, rel=1e-3, abs=1e-5)
                                                     for k, v in eager[1].items())
    assert compiled[2] == pytest.approx(eager[2], rel=1e-3)  # the gradient norm
    worst = max(float((compiled[3][k].float() - v.float()).abs().max()) for k, v in eager[3].items())
    assert worst < 1e-5  # the parameters after the step: 0.1 x the gradients


@pytest.mark.slow
def test_compiled_step_equals_the_eager_step() -> None:
    """MODEL.COMPILE_SCOPE model: the model compiled, the loss eager."""
    cfg = _tiny("MODEL.COMPILE_SCOPE", "model")
    _assert_same_step(_step(cfg, compiled=True), _step(cfg, compiled=False))


@pytest.mark.slow
def test_step_compiled_with_its_loss_equals_the_eager_step_and_compiles_once() -> None:
    """MODEL.COMPILE_SCOPE step: forward and loss in one graph; the SDM temperature, which anneals with the
    epoch, is a tensor input, so the second step (another epoch, another temperature) compiles nothing."""
    cfg = _tiny("MODEL.COMPILE_SCOPE", "step", "LOSS.SDM.ANNEAL_EPOCHS", "10")
    epochs = (0.0, 5.0)
    eager = _step(cfg, compiled=False, epochs=epochs)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = _step(cfg, compiled=True, epochs=epochs)
    _assert_same_step(compiled, eager)
    assert "sdm" in compiled[1]


class _Batches(list):
    """Test batches with the attribute a DataLoader has."""

    batch_size = 8


@pytest.mark.slow
def test_compiled_evaluation_equals_eager_and_pads_the_last_batch() -> None:
    from engine.reid import extract_features

    cfg = load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml",
                      ["MODEL.NUM_CLASSES", "4", "MODEL.NUM_CAMERAS", "3", "INPUT.SIZE_TRAIN", "[64, 32]",
                       "INPUT.SIZE_TEST", "[64, 32]"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(2)
    loader = _Batches()
    for n in (8, 8, 5):  # a short last batch
        loader.append({"images": {m: torch.randn(n, 3, 64, 32, generator=g) for m in ("RGB", "NI", "TI")},
                       "masks": torch.ones(n, 3, dtype=torch.bool), "pids": torch.arange(n),
                       "camids": torch.arange(n) % 3, "trackids": torch.zeros(n, dtype=torch.long)})
    amp = build_amp_policy("fp32", CPU)
    keep = ("RGB", "NI", "TI")
    eager = extract_features(model, loader, CPU, amp, keep, "drop")
    compiled_model = compile_model(model, "default")
    with torch._dynamo.config.patch(error_on_recompile=True):  # the short last batch is padded: no new graph
        compiled = extract_features(compiled_model, loader, CPU, amp, keep, "drop")
    assert set(compiled["feats"]) == set(eager["feats"])
    for name, value in eager["feats"].items():
        assert compiled["feats"][name].shape == value.shape == (21, value.shape[1])
        assert torch.allclose(compiled["feats"][name], value, atol=1e-5, rtol=1e-4), name
    for m, idx in eager["keep_indices"].items():
        assert torch.equal(compiled["keep_indices"][m], idx)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_a_deterministic_compile_keeps_its_mode_and_turns_on_inductor_s_deterministic_mode(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor as inductor

    calls: list[dict] = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or real_compile(fn, **kw))
    try:
        torch.use_deterministic_algorithms(True)
        compile_model(torch.nn.Linear(2, 2), mode)  # torch refuses an option it does not know, here
    finally:
        torch.use_deterministic_algorithms(False)
    compile_model(torch.nn.Linear(2, 2), mode)
    expected = {} if mode == "default" else inductor.list_mode_options(mode)
    assert calls[0] == {"options": {**expected, "deterministic": True}}
    assert calls[1] == {"mode": None if mode == "default" else mode}
