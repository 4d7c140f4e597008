"""Config schema: defaults, _BASE_ inheritance, KEY VALUE overrides, and errors that name key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, get_default_config, load_config
from engine.defaults import default_argument_parser, overrides_from_args, parse_args

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_carry_the_seed_values() -> None:
    cfg = get_default_config()
    assert cfg.MODEL.SDTPS.GATE_INIT_SCALE == 0.5 and cfg.MODEL.SDTPS.GATE_INIT_BIAS == 0.5
    assert cfg.MODEL.SAP.LOGIT_SCALE_INIT == 25.0 and cfg.MODEL.SAP.LOGIT_SCALE_MAX == 100.0
    assert cfg.SOLVER.WEIGHT_DECAY == 5e-4 and cfg.SOLVER.GRAD_CLIP == 5.0


def test_base_chain_then_file_then_overrides(tmp_path: Path) -> None:
    _write(tmp_path / "base" / "root.yml", "SOLVER:\n  BASE_LR: 0.1\n  MAX_EPOCHS: 7\nSEED: 3\n")
    _write(tmp_path / "base" / "mid.yml", "_BASE_: root.yml\nSOLVER:\n  MAX_EPOCHS: 9\n")
    leaf = _write(tmp_path / "exp" / "leaf.yml", "_BASE_: ../base/mid.yml\nSOLVER:\n  WEIGHT_DECAY: 1e-4\n")
    cfg = load_config(leaf, ["SOLVER.BASE_LR", "1e-3", "MODEL.SDTPS.USE_GATE_NORM", "True"])
    assert cfg.SEED == 3  # from the root
    assert cfg.SOLVER.MAX_EPOCHS == 9  # mid overrides root
    assert cfg.SOLVER.WEIGHT_DECAY == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: coerced
    assert cfg.SOLVER.BASE_LR == pytest.approx(1e-3)  # command line wins
    assert cfg.MODEL.SDTPS.USE_GATE_NORM is True
    assert cfg.is_frozen()
    with pytest.raises(AttributeError):
        cfg.SEED = 4


def test_int_is_accepted_for_float_keys(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "a.yml", "SOLVER:\n  BASE_LR: 1\n"))
    assert isinstance(cfg.SOLVER.BASE_LR, float) and cfg.SOLVER.BASE_LR == 1.0


def test_unknown_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.yml", "SOLVER:\n  BASE_LRR: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    msg = str(info.value)
    assert "SOLVER.BASE_LRR" in msg and str(bad) in msg and "SOLVER.BASE_LR" in msg


def test_unknown_key_in_a_base_names_the_base(tmp_path: Path) -> None:
    _write(tmp_path / "root.yml", "NOT_A_KEY: 1\n")
    leaf = _write(tmp_path / "leaf.yml", "_BASE_: root.yml\n")
    with pytest.raises(ConfigError, match=r"root\.yml: unknown config key 'NOT_A_KEY'"):
        load_config(leaf)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("SOLVER:\n  MAX_EPOCHS: 2.5\n", "SOLVER.MAX_EPOCHS", "int"),
        ("SOLVER:\n  NESTEROV: 1\n", "SOLVER.NESTEROV", "bool"),
        ("SOLVER:\n  BASE_LR: fast\n", "SOLVER.BASE_LR", "float"),
        ("SOLVER:\n  STEPS: 30\n", "SOLVER.STEPS", "list"),
        ("SOLVER: 3\n", "SOLVER", "section"),
    ],
)
def test_wrong_type_names_key_file_and_type(tmp_path: Path, text: str, key: str, expected: str) -> None:
    bad = _write(tmp_path / "bad.yml", text)
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    msg = str(info.value)
    assert f"'{key}'" in msg and str(bad) in msg and expected in msg


def test_override_errors_name_the_command_line() -> None:
    with pytest.raises(ConfigError, match="command line: unknown config key 'SOLVER.NOPE'"):
        load_config(None, ["SOLVER.NOPE", "1"])
    with pytest.raises(ConfigError, match="command line: config key 'SEED' expects int"):
        load_config(None, ["SEED", "abc"])
    with pytest.raises(ConfigError, match="odd number"):
        load_config(None, ["SEED"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path / "broken.yml", "SOLVER: [1, \n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path / "list.yml", "- 1\n- 2\n"))
    a = _write(tmp_path / "a.yml", "_BASE_: b.yml\n")
    _write(tmp_path / "b.yml", "_BASE_: a.yml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(a)


def test_gate_flags_map_to_config_keys() -> None:
    parser = default_argument_parser("x", gate_flags=True)
    args = parser.parse_args(["--config_file", "c.yml", "--init_scale", "1.0", "--init_bias", "0.0", "SEED", "5"])
    cfg = load_config(None, overrides_from_args(args))
    assert cfg.MODEL.SDTPS.GATE_INIT_SCALE == 1.0 and cfg.MODEL.SDTPS.GATE_INIT_BIAS == 0.0 and cfg.SEED == 5
    assert parser.parse_args(["--resume"]).resume == "auto"
    assert parser.parse_args(["--resume", "x.pth"]).resume == "x.pth"
    assert parser.parse_args([]).resume is None


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    load_config(path)


def test_bare_resume_before_overrides_does_not_eat_a_key() -> None:
    parser = default_argument_parser("x")
    args = parse_args(parser, ["--resume", "SOLVER.MAX_EPOCHS", "60", "SEED", "1"])
    assert args.resume == "auto" and overrides_from_args(args) == ["SOLVER.MAX_EPOCHS", "60", "SEED", "1"]
    args = parse_args(parser, ["--resume", "outputs/run/checkpoint_epoch0003.pth", "SEED", "1"])
    assert args.resume == "outputs/run/checkpoint_epoch0003.pth"


def test_key_equals_value_tokens_as_wandb_writes_them() -> None:
    parser = default_argument_parser("x")
    args = parse_args(parser, ["--config_file", "c.yml", "MODEL.SAP.SCALE_MODE=fixed", "MODEL.SAP.SCALE_NO_DECAY=False",
                               "OUTPUT_DIR", "out/run"])
    cfg = load_config(None, overrides_from_args(args))
    assert cfg.MODEL.SAP.SCALE_MODE == "fixed" and cfg.MODEL.SAP.SCALE_NO_DECAY is False
    assert cfg.OUTPUT_DIR == "out/run"


@pytest.mark.parametrize(("demo_key", "here"), [
    ("MODEL.HEAD", "is MODEL.DEMO.HEAD here"),
    ("MODEL.DIRECT", "is MODEL.DEMO.DIRECT"),
    ("SOLVER.WARMUP_ITERS", "is SOLVER.WARMUP_EPOCHS"),
    ("SOLVER.OPTIMIZER_NAME", "is SOLVER.OPTIMIZER here"),
    ("TEST.NECK_FEAT", "has no key: the test feature is taken before the BNNeck"),
    ("TEST.WEIGHT", "is MODEL.WEIGHTS here"),
])
def test_demos_keys_name_their_place_here(demo_key: str, here: str) -> None:
    with pytest.raises(ConfigError, match=f"DeMo's config key '{demo_key}' {here}"):
        load_config(None, [demo_key, "1"])


def test_demos_yes_no_booleans() -> None:
    cfg = load_config(None, ["TEST.FEAT_NORM", "no", "TEST.RE_RANKING", "yes"])
    assert cfg.TEST.FEAT_NORM is False and cfg.TEST.RE_RANKING is True
    with pytest.raises(ConfigError, match="TEST.FEAT_NORM"):
        load_config(None, ["TEST.FEAT_NORM", "maybe"])


def test_a_run_config_holds_only_its_family_keys(tmp_path: Path) -> None:
    reid = load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml")
    fewshot = load_config(REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml")
    assert {"LOSS", "INPUT"} <= set(reid) and "FEWSHOT" not in reid and "SAP" not in reid.MODEL
    assert "FEWSHOT" in fewshot and "SAP" in fewshot.MODEL and not {"LOSS", "INPUT"} & set(fewshot)
    assert fewshot.MODEL.NUM_CLASSES == 64 and list(fewshot.MODEL.BACKBONE_ARGS.CHANNELS) == [8, 16, 32]
    # the model name on the command line decides the family too; no name: every key
    assert "FEWSHOT" in load_config(None, ["MODEL.NAME", "ExpB1"]) and "LOSS" not in load_config(None, ["MODEL.NAME", "ExpB1"])
    assert {"LOSS", "FEWSHOT"} <= set(load_config(None))
    with pytest.raises(ConfigError, match="'TEST.MISS' belongs to ReID models"):
        load_config(REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml", ["TEST.MISS", "r"])


@pytest.mark.parametrize(("old", "new"), [
    ("FEWSHOT:\n  NUM_TRAIN_CLASSES: 5\n", "MODEL.NUM_CLASSES"),
    ("FEWSHOT:\n  BACKBONE:\n    CHANNELS: [4, 8]\n", "MODEL.BACKBONE_ARGS"),
    ("FEWSHOT:\n  METRIC_SCALE: 5.0\n", "MODEL.METRIC_SCALE"),
])
def test_a_moved_few_shot_key_names_its_new_place(tmp_path: Path, old: str, new: str) -> None:
    path = tmp_path / "old.yml"
    path.write_text("MODEL:\n  NAME: ExpB1\n" + old)
    with pytest.raises(ConfigError, match=f"has moved: use {new}"):
        load_config(path)
