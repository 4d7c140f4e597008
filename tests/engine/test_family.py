"""The engine's core knows no family: importing it loads no model, no family package and no data generator; the
families register themselves and are found by looking, not by a list."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from engine.family import families, family_of_dataset, family_of_model, get_family

REPO = Path(__file__).resolve().parents[2]
CORE = ("engine.trainer", "engine.step", "engine.hooks", "engine.application", "engine.defaults", "engine.launch",
        "engine.checkpoint", "engine.config", "engine.solver", "engine.evaluation", "engine.family", "engine.logger")


def test_importing_the_core_loads_no_family() -> None:
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in CORE) +
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout)
    family_modules = [m for m in loaded if m in ("modeling.demo", "modeling.exp_b1_model")
                      or m.startswith(("datasets.synthetic", "engine.reid", "engine.fewshot"))]
    assert family_modules == []


def test_registering_the_families_loads_no_model_or_data() -> None:
    code = ("import json, sys\nfrom engine.family import families\nfamilies()\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout)
    assert {"engine.reid.family", "engine.fewshot.family"} <= set(loaded)
    assert not [m for m in loaded if m.startswith(("modeling", "datasets", "engine.reid.run", "engine.fewshot.run"))]


def test_every_engine_package_with_a_registration_is_found() -> None:
    found = {f.name for f in families()}
    packages = {p.parent.name for p in (REPO / "engine").glob("*/family.py")}
    assert found == packages == {"reid", "fewshot"}


def test_model_and_dataset_names_find_their_family() -> None:
    assert family_of_model("DeMo_SDTPS").name == family_of_model("DeMo").name == "reid"
    assert family_of_model("ExpB1").script == "train_b1_improvement.py"
    assert family_of_model("ResNet") is None
    assert family_of_dataset("RGBNT201").name == "reid" and family_of_dataset("CUB").name == "fewshot"
    with pytest.raises(KeyError, match="known: "):
        get_family("detection")


def test_a_config_has_only_its_familys_keys() -> None:
    reid = load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml")
    fewshot = load_config(REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml")
    assert "INPUT" in reid and "FEWSHOT" not in reid and "FEWSHOT" in fewshot and "INPUT" not in fewshot
    with pytest.raises(ConfigError, match="belongs to few-shot models"):
        load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml", ["FEWSHOT.N_WAY", "5"])


def test_a_familys_key_hints_reach_the_user() -> None:
    with pytest.raises(ConfigError, match="DeMo's config key 'MODEL.HEAD' is MODEL.DEMO.HEAD here"):
        load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml", ["MODEL.HEAD", "4"])
    with pytest.raises(ConfigError, match="'FEWSHOT.METRIC_SCALE' has moved: use MODEL.METRIC_SCALE"):
        load_config(REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml", ["FEWSHOT.METRIC_SCALE", "5.0"])
