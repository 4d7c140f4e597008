"""A pre-training shared by the runs of one seed: made once per seed from its recipe, started from by every run
of that seed (the pre-trained modules exactly, the rest as initialised), refused when stale or misfitting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoint import Checkpointer, read_checkpoint
from engine.config import ConfigError, load_config
from engine.fewshot.pretrained import RECORD, ensure_pretrained, pretrained_file, read_record
from tests.helpers.fewshot_data import tiny_fewshot_set

REPO = Path(__file__).resolve().parents[3]
SAP_TINY = REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return tiny_fewshot_set(tmp_path_factory.mktemp("pretrained_data"), 12)


def _recipe(path: Path, data: Path, lr: float = 0.1, stages: str = "[pretrain]") -> Path:
    path.write_text(f"_BASE_: {SAP_TINY}\nDATASETS:\n  ROOT_DIR: {data}\nMODEL:\n  NUM_CLASSES: 12\n  SAP:\n"
                    f"    ENABLED: False\nFEWSHOT:\n  STAGES: {stages}\n  PRETRAIN:\n    EPOCHS: 2\n    BASE_LR: {lr}\n")
    return path


def _cfg(recipe: Path, data: Path, cache: Path, out: Path, *extra: str):
    return load_config(SAP_TINY, ["DATASETS.ROOT_DIR", str(data), "MODEL.NUM_CLASSES", "12", "FEWSHOT.STAGES",
                                  "['meta']", "FEWSHOT.PRETRAIN.RECIPE", str(recipe), "FEWSHOT.PRETRAIN.CACHE_DIR",
                                  str(cache), "OUTPUT_DIR", str(out), *extra])


@pytest.mark.slow
def test_made_once_per_seed_started_from_and_refused_when_stale(tiny_data: Path, tmp_path: Path) -> None:
    from engine.fewshot.run import FewShotApplication, run_fewshot

    recipe, cache = _recipe(tmp_path / "recipe.yml", tiny_data), tmp_path / "cache"
    cfg = _cfg(recipe, tiny_data, cache, tmp_path / "sap")
    results = run_fewshot(cfg)
    made = pretrained_file(cfg)
    assert made == cache / "seed0" / "weights.pth" and made.is_file() and 0.0 <= results["5way_1shot"]["acc"] <= 1.0
    record = read_record(made)
    assert record["recipe"]["SEED"] == 0 and record["recipe"]["FEWSHOT"]["STAGES"] == ["pretrain"]
    assert (made.parent / RECORD).is_file() and (made.parent / "run" / "summary.json").is_file()
    stamp = made.stat().st_mtime_ns
    # the run trained its meta stage alone, from the recipe's network: 2 epochs of 4 episodes
    assert read_checkpoint(Checkpointer(tmp_path / "sap").latest())["step"] == 8

    # another row of the same seed (no SAP) starts from the same network: the recipe's last checkpoint, read
    # independently, for the backbone and classifier; everything else as a fresh model of that seed builds it
    other = _cfg(recipe, tiny_data, cache, tmp_path / "nosap", "MODEL.SAP.ENABLED", "False")
    app = FewShotApplication(other)
    app.build()
    fresh = {k: v.clone() for k, v in app.model.state_dict().items()}
    app.load_start()
    assert made.stat().st_mtime_ns == stamp  # reused, not made again
    recipe_state = read_checkpoint(Checkpointer(made.parent / "run").latest())["model"]
    for key, value in app.model.state_dict().items():
        expected = recipe_state[key] if key.startswith(("backbone.", "classifier.")) else fresh[key]
        assert torch.equal(value, expected), key
    assert any(not torch.equal(fresh[k], recipe_state[k]) for k in fresh if k.startswith("backbone."))

    # with no stage to train, a run tests the recipe's network: the numbers the recipe recorded, exactly
    untrained = run_fewshot(_cfg(recipe, tiny_data, cache, tmp_path / "nometa", "MODEL.SAP.ENABLED", "False",
                                 "FEWSHOT.STAGES", "[]"))
    assert {f"{k}/acc": v["acc"] for k, v in untrained.items()} == {
        k: v for k, v in record["results"].items() if k.endswith("/acc")}

    # another seed gets a network of its own
    seed1 = _cfg(recipe, tiny_data, cache, tmp_path / "seed1", "SEED", "1")
    assert ensure_pretrained(seed1) == cache / "seed1" / "weights.pth"
    assert read_record(cache / "seed1" / "weights.pth")["recipe"]["SEED"] == 1

    _recipe(recipe, tiny_data, lr=0.2)
    with pytest.raises(ConfigError, match=r"another recipe .*FEWSHOT.PRETRAIN.BASE_LR: 0.1 -> 0.2"):
        ensure_pretrained(cfg)
    assert made.stat().st_mtime_ns == stamp


def test_a_recipe_of_another_network_or_more_than_pretraining_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    recipe, cache = _recipe(tmp_path / "recipe.yml", tiny_data), tmp_path / "cache"
    wider = _cfg(recipe, tiny_data, cache, tmp_path / "run", "MODEL.BACKBONE_ARGS.CHANNELS", "[8,16,48]")
    with pytest.raises(ConfigError, match=r"MODEL.BACKBONE_ARGS.CHANNELS: \[8, 16, 48\] here, \[8, 16, 32\] in"):
        ensure_pretrained(wider)
    both = _recipe(tmp_path / "both.yml", tiny_data, stages="[pretrain, meta]")
    with pytest.raises(ConfigError, match=r"must train FEWSHOT.STAGES \[pretrain\] alone"):
        ensure_pretrained(_cfg(both, tiny_data, cache, tmp_path / "run"))
    assert not cache.exists()  # nothing was trained


def test_the_keys_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    base = ["FEWSHOT.PRETRAIN.RECIPE", str(SAP_TINY)]
    with pytest.raises(ConfigError, match="needs FEWSHOT.PRETRAIN.CACHE_DIR"):
        load_config(SAP_TINY, [*base, "FEWSHOT.STAGES", "['meta']"])
    with pytest.raises(ConfigError, match="FEWSHOT.STAGES must not list 'pretrain'"):
        load_config(SAP_TINY, [*base, "FEWSHOT.PRETRAIN.CACHE_DIR", str(tmp_path)])
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS and FEWSHOT.PRETRAIN.RECIPE"):
        load_config(SAP_TINY, [*base, "FEWSHOT.PRETRAIN.CACHE_DIR", str(tmp_path), "FEWSHOT.STAGES", "['meta']",
                               "MODEL.WEIGHTS", "w.pth"])
