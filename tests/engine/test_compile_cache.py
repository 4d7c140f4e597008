"""The portable compile cache: one file per compiled setup, written after the first epoch, loaded before compiling."""

from __future__ import annotations

from pathlib import Path

import torch

from engine import compile_cache
from engine.config import load_config

CPU = torch.device("cpu")


def test_cache_file_is_named_by_what_the_compiled_graphs_depend_on(tmp_path: Path) -> None:
    base = ["MODEL.NAME", "DeMo_SDTPS", "MODEL.COMPILE", "default", "MODEL.COMPILE_CACHE_DIR", str(tmp_path)]
    path = compile_cache.cache_path(load_config(None, base), CPU, "train")
    assert path is not None and path.parent == tmp_path and path.name.startswith("train-")
    assert compile_cache.cache_path(load_config(None, base), CPU, "train") == path  # stable
    other_model = load_config(None, [*base, "MODEL.SDTPS.KEEP_RATIO", "0.3"])
    other_batch = load_config(None, [*base, "SOLVER.IMS_PER_BATCH", "32"])
    other_weights = load_config(None, [*base, "MODEL.WEIGHTS", "x.pth"])
    assert compile_cache.cache_path(other_model, CPU, "train") != path
    assert compile_cache.cache_path(other_batch, CPU, "train") != path
    assert compile_cache.cache_path(other_weights, CPU, "train") == path  # weights do not change the graphs
    assert compile_cache.cache_path(load_config(None, base[:2]), CPU, "train") is None  # not compiled
    assert compile_cache.cache_path(load_config(None, [*base[:4], "MODEL.COMPILE_CACHE_DIR", ""]), CPU, "t") is None


def test_save_then_load_round_trips_the_artifacts(tmp_path: Path, monkeypatch) -> None:
    loaded: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled kernels", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data))
    path = tmp_path / "cache" / "train-0123.bin"
    assert not compile_cache.load(path)  # nothing yet
    assert compile_cache.save(path) and path.read_bytes() == b"compiled kernels"
    assert compile_cache.load(path) and loaded == [b"compiled kernels"]
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert not compile_cache.save(tmp_path / "empty.bin") and not (tmp_path / "empty.bin").exists()


def test_a_compiled_run_saves_the_cache_once_its_first_epoch_and_evaluation_compiled(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """The evaluation compiles its own graphs after the first epoch: a warm run needs them in the file too, so the
    cache is written after the first epoch's evaluation."""
    from engine import step as step_module
    from engine import trainer as trainer_module
    from tests.helpers.toy_training import ScoreList as _Evaluator
    from tests.helpers.toy_training import toy_stage as _stage
    from tests.helpers.toy_training import toy_trainer as _trainer

    events: list[str] = []
    for module in (step_module, trainer_module):  # no compiler on the CPU runner
        monkeypatch.setattr(module, "compile_model", lambda model, mode: model)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: events.append("save") or (b"kernels", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: events.append("load"))

    class Recorded(_Evaluator):
        def __call__(self, model: torch.nn.Module) -> dict:
            events.append("evaluate")
            return super().__call__(model)

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    cache_dir = tmp_path / "cache"
    trainer = _trainer(tmp_path, model, ["MODEL.COMPILE", "default", "MODEL.COMPILE_CACHE_DIR", str(cache_dir)])
    trainer.fit(_stage(model, epochs=3, evaluator=Recorded([0.1, 0.2, 0.3])))
    assert events == ["evaluate", "save", "evaluate", "evaluate"]  # once, after the first epoch's evaluation
    assert [p.read_bytes() for p in cache_dir.iterdir()] == [b"kernels"]
