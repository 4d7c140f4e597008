"""The name tower, CLIP's text tower stood in for: its formula, that fitted on training names it names novel
classes, and that a recipe makes it once, reuses it, refuses it when stale and hands SAP its embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import ConfigError, load_config
from engine.fewshot.text_tower import TowerRecipe, ensure_text_tower, fit_name_tower, read_tower_record
from modeling.module.name_tower import NameTower, load_name_tower
from tests.helpers.fewshot_data import tiny_fewshot_set

REPO = Path(__file__).resolve().parents[3]
SAP_TINY = REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml"
RECIPE_TINY = REPO / "configs" / "synthetic" / "Text_tower_tiny.yml"


def test_a_name_is_the_mean_of_its_known_words_through_the_mlp() -> None:
    torch.manual_seed(0)
    tower = NameTower(["blue", "circle", "red", "striped"], embed_dim=3, width=4, hidden=5).double()
    out = tower(*tower.tokenize(["red striped circle", "Blue_circle", "green square"]))
    e, (l1, _, l2) = tower.word_embedding.weight, tower.mlp

    def reference(words: list[int]) -> torch.Tensor:
        mean = e[words].mean(0)
        return F.normalize(l2(F.gelu(l1(mean))), dim=0)

    assert torch.allclose(out[0], reference([2, 3, 1]), atol=1e-12)
    assert torch.allclose(out[1], reference([0, 1]), atol=1e-12)  # case and "_" do not matter
    assert torch.equal(out[2], torch.zeros(3, dtype=torch.float64))  # no known word: no embedding
    assert tower.unknown_words(["green square", "red circle"]) == ["green", "square"]


def test_fitted_on_training_names_it_names_novel_combinations() -> None:
    """Image features made of a colour part and a shape part; the tower sees 12 of the 16 colour-shape classes
    and classifies images of the 4 others by their names alone."""
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "star", "ring"]
    names = [f"{c} {s}" for c in colours for s in shapes]
    g = torch.Generator().manual_seed(0)
    parts = torch.randn(8, 32, generator=g)
    labels = torch.arange(16).repeat_interleave(20)
    feats = parts[labels // 4] + parts[4 + labels % 4] + 0.3 * torch.randn(len(labels), 32, generator=g)
    novel = torch.tensor([0, 5, 10, 15])  # red circle, green square, blue star, yellow ring
    train = ~torch.isin(labels, novel)
    fitted = fit_name_tower(feats[train], labels[train], names, TowerRecipe(embed_dim=16, width=16, hidden=32,
                                                                              steps=300, batch_size=64, lr=3e-3))
    test = torch.isin(labels, novel)
    scores = fitted.image_embeddings(feats[test]) @ fitted.tower.encode([names[c] for c in novel]).t()
    accuracy = (novel[scores.argmax(1)] == labels[test]).float().mean()
    assert accuracy > 0.9  # chance: 0.25
    again = fit_name_tower(feats[train], labels[train], names, TowerRecipe(embed_dim=16, width=16, hidden=32,
                                                                            steps=300, batch_size=64, lr=3e-3))
    assert torch.equal(again.tower.encode(names), fitted.tower.encode(names))  # seeded by the recipe alone


@pytest.fixture(scope="module")
def names_data(tmp_path_factory) -> Path:
    return tiny_fewshot_set(tmp_path_factory.mktemp("names_data"), 24)


def _recipe(path: Path, data: Path, steps: int = 300) -> Path:
    path.write_text(f"_BASE_: {RECIPE_TINY}\nDATASETS:\n  ROOT_DIR: {data}\nMODEL:\n  NUM_CLASSES: 24\n"
                    f"FEWSHOT:\n  PRETRAIN:\n    EPOCHS: 2\n  TEXT_TOWER:\n    STEPS: {steps}\n    EPISODES: 50\n")
    return path


@pytest.mark.slow
def test_made_from_its_recipe_once_reused_refused_when_stale_and_read_by_sap(names_data: Path, tmp_path: Path) -> None:
    from engine.fewshot.data import install_anchors, load_fewshot_data
    from modeling import build_model

    tower_file = tmp_path / "towers" / "names.pt"
    recipe = _recipe(tmp_path / "recipe.yml", names_data)
    overrides = ["DATASETS.ROOT_DIR", str(names_data), "MODEL.NUM_CLASSES", "24", "MODEL.SAP.ANCHOR_MODE", "text",
                 "MODEL.SAP.TEXT_TOWER", str(tower_file), "MODEL.SAP.TEXT_TOWER_RECIPE", str(recipe),
                 "OUTPUT_DIR", str(tmp_path / "run")]
    cfg = load_config(SAP_TINY, overrides)
    ensure_text_tower(cfg)
    record = read_tower_record(tower_file)
    assert (tower_file.parent / "run" / "summary.json").is_file()  # the recipe's backbone run
    zero_shot = record["results"]["zero_shot"]
    assert zero_shot["n_way"] == 5 and zero_shot["n_episodes"] == 50 and 0.0 <= zero_shot["acc"] <= 1.0
    made = tower_file.stat().st_mtime_ns

    ensure_text_tower(cfg)  # reused, not made again
    assert tower_file.stat().st_mtime_ns == made
    model = build_model(cfg)
    assert model.anchors.mode == "text" and model.anchors.embed_dim == 32
    data = load_fewshot_data(cfg)
    install_anchors(cfg, model, data, torch.device("cpu"))
    assert torch.equal(model.anchors.text_embeddings, load_name_tower(tower_file).encode(data.class_names))

    _recipe(recipe, names_data, steps=301)
    with pytest.raises(ConfigError, match=r"another recipe .*FEWSHOT.TEXT_TOWER.STEPS: 300 -> 301"):
        ensure_text_tower(cfg)
    assert tower_file.stat().st_mtime_ns == made


def test_a_recipe_without_the_file_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="TEXT_TOWER_RECIPE needs MODEL.SAP.TEXT_TOWER"):
        load_config(SAP_TINY, ["MODEL.SAP.TEXT_TOWER_RECIPE", str(RECIPE_TINY)])
