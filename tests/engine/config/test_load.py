"""Config schema: defaults, _BASE_ inheritance, KEY VALUE overrides, and errors that name key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, get_default_config, load_config
from engine.defaults import default_argument_parser, overrides_from_args, parse_args

REPO = Path(__file__).resolve().parents[3]


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
    from engine.reid.family import REID

    parser = default_argument_parser("x", family=REID)
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


# ---------------------------------------------------------------------------
# Values checked when the config loads: names, ranges, keys that must agree, image sizes against the patch grid
# ---------------------------------------------------------------------------
REID_TINY = REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml"  # clip_vit_tiny: patch 16, 64-d tokens
FEWSHOT_TINY = REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml"


def _config_for(key: str) -> Path:
    """The tiny config of the family that has ``key`` (the ReID one for a shared key)."""
    from engine.config import get_key as _get

    try:
        _get(get_default_config("reid"), key)
    except KeyError:
        return FEWSHOT_TINY
    return REID_TINY


def _shown(key: str, raw: str) -> str:
    """How the message shows the value ``raw`` of ``key``: parsed, and a float where the key holds floats."""
    import ast

    from engine.config import get_key as _get

    value = ast.literal_eval(raw)
    if isinstance(_get(get_default_config(), key), float):
        value = float(value)
    return repr(value)


# (key, a value outside its range or set, words of what is allowed)
BAD_VALUES = [
    ("MODEL.NUM_CLASSES", "-1", ">= 0"),
    ("DATALOADER.NUM_WORKERS", "-2", ">= -1 (-1: one per CPU)"),
    ("DEVICE.CPU_THREADS", "-1", ">= 0 (0: torch's default)"),
    ("DATALOADER.PREFETCH_FACTOR", "0", ">= 1"),
    ("SOLVER.BASE_LR", "-0.1", ">= 0"),
    ("SOLVER.MOMENTUM", "1.5", "in [0, 1]"),
    ("SOLVER.WEIGHT_DECAY", "-1e-4", ">= 0"),
    ("SOLVER.MAX_EPOCHS", "0", ">= 1"),
    ("SOLVER.MAX_EPOCHS", "-1", ">= 1"),
    ("SOLVER.IMS_PER_BATCH", "0", ">= 1"),
    ("SOLVER.WARMUP_EPOCHS", "-1", ">= 0"),
    ("SOLVER.WARMUP_FACTOR", "1.5", "in [0, 1]"),
    ("SOLVER.STEPS", "[30, -1]", "a list of integers >= 0"),
    ("SOLVER.GAMMA", "0", "in (0, 1]"),
    ("SOLVER.MIN_LR_FACTOR", "-0.1", "in [0, 1]"),
    ("SOLVER.LR_NOISE", "1.0", "in [0, 1) (0: off)"),
    ("SOLVER.LR_NOISE_STD", "0", "> 0"),
    ("SOLVER.CHECKPOINT_PERIOD", "0", ">= 1"),
    ("SOLVER.EVAL_PERIOD", "0", ">= 1"),
    ("SOLVER.LOG_PERIOD", "0", ">= 1"),
    ("MONITOR.SPIKE_WINDOW", "0", ">= 1"),
    ("MONITOR.SPIKE_WARMUP", "0", ">= 1"),
    ("MONITOR.SPIKE_MAD_FLOOR", "-0.1", ">= 0"),
    ("MONITOR.SPIKE_REL_FLOOR", "-0.1", ">= 0"),
    ("MONITOR.SPIKE_SIGMAS", "0", "> 0"),
    ("MONITOR.MAX_NONFINITE_STEPS", "0", ">= 1"),
    ("MONITOR.BLOWUP_FACTOR", "-1", ">= 0 (0: off)"),
    ("MONITOR.PROFILE_EPOCH", "-1", ">= 0 (0: off)"),
    ("MONITOR.PROFILE_STEPS", "0", ">= 1"),
    ("TEST.IMS_PER_BATCH", "0", ">= 1"),
    ("WANDB.INIT_TIMEOUT", "0", "> 0"),
    ("MODEL.NUM_CAMERAS", "-1", ">= 0"),
    ("MODEL.DEMO.HEAD", "0", ">= 1"),
    ("MODEL.DEMO.HDM_DROPOUT", "1.0", "in [0, 1)"),
    ("MODEL.SDTPS.NUM_HEADS", "0", ">= 1"),
    ("MODEL.SDTPS.KEEP_RATIO", "0", "in (0, 1]"),
    ("MODEL.SDTPS.KEEP_RATIO", "1.5", "in (0, 1]"),
    ("MODEL.SDTPS.GATE_PARAM_BOUND", "0", "> 0"),
    ("DATASETS.SYNTHETIC.MISSING_MODALITY_PROB", "1.5", "<= 1 (< 0: the preset's)"),
    ("DATALOADER.NUM_INSTANCE", "0", ">= 1 (K, the images of one identity in a P x K batch)"),
    ("SOLVER.BIAS_LR_FACTOR", "-1", ">= 0"),
    ("SOLVER.WEIGHT_DECAY_BIAS", "-1", ">= 0"),
    ("INPUT.SIZE_TRAIN", "[128]", "a list of 2 integers >= 1"),
    ("INPUT.SIZE_TRAIN", "[128.0, 64]", "a list of 2 integers >= 1"),
    ("INPUT.SIZE_TEST", "[0, 64]", "a list of 2 integers >= 1"),
    ("INPUT.PROB", "1.5", "in [0, 1]"),
    ("INPUT.PADDING", "-1", ">= 0"),
    ("INPUT.RE_PROB", "-0.5", "in [0, 1]"),
    ("INPUT.PIXEL_STD", "[0.5, 0.0, 0.5]", "a list of one or more numbers > 0"),
    ("LOSS.ID_WEIGHT", "-1", ">= 0"),
    ("LOSS.ID_LABEL_SMOOTHING", "1.0", "in [0, 1)"),
    ("LOSS.TRIPLET_WEIGHT", "-1", ">= 0"),
    ("LOSS.TRIPLET_MARGIN", "-0.3", ">= 0"),
    ("LOSS.SDM.WEIGHT", "-1", ">= 0"),
    ("LOSS.SDM.INIT_TEMPERATURE", "0", "> 0"),
    ("LOSS.SDM.FINAL_TEMPERATURE", "-0.1", "> 0"),
    ("LOSS.SDM.FALLBACK_TEMPERATURE", "0", "> 0"),
    ("LOSS.SDM.ANNEAL_EPOCHS", "-1", ">= 0"),
    ("LOSS.SDM.FALLBACK_STEPS", "-1", ">= 0"),
    ("LOSS.SDM.MIN_TEMPERATURE", "0", "> 0"),
    ("LOSS.SDM.MAX_TEMPERATURE", "0", "> 0"),
    ("LOSS.FEAT_NORM.TARGET", "0", "> 0"),
    ("LOSS.FEAT_NORM.BAND", "-1", ">= 0"),
    ("LOSS.FEAT_NORM.WEIGHT", "-1", ">= 0"),
    ("LOSS.CEM.ATTN_HIDDEN", "0", ">= 1"),
    ("LOSS.CEM.TAU", "0", "> 0"),
    ("LOSS.CEM.BETA", "0", "> 0"),
    ("LOSS.CEM.SNR_THRESH", "-0.1", ">= 0"),
    ("LOSS.CEM.SNR_SHARP", "0", "> 0"),
    ("LOSS.CEM.CLASS_GATE_A", "0", "> 0"),
    ("LOSS.CEM.CLASS_GATE_B", "1.5", "in [0, 1]"),
    ("LOSS.CEM.SLOT_POWER", "-1", ">= 0"),
    ("LOSS.CEM.LOSS_SCALE", "-1", ">= 0"),
    ("LOSS.CEM.WARMUP_EPOCHS", "-1", ">= 0"),
    ("LOSS.CEM.LR", "-1e-3", ">= 0"),
    ("TEST.RE_RANKING_K1", "0", ">= 1"),
    ("TEST.RE_RANKING_K2", "0", ">= 1 (1: no query expansion)"),
    ("TEST.RE_RANKING_LAMBDA", "1.5", "in [0, 1]"),
    ("TEST.MAX_RANK", "0", ">= 1"),
    ("TEST.VIS_QUERIES", "-1", ">= 0"),
    ("MODEL.BACKBONE_ARGS.CHANNELS", "[]", "a list of one or more integers >= 1"),
    ("MODEL.BACKBONE_ARGS.CHANNELS", "[8, 0, 32]", "a list of one or more integers >= 1"),
    ("MODEL.BACKBONE_ARGS.DROP_RATE", "1.0", "in [0, 1)"),
    ("MODEL.BACKBONE_ARGS.DROPBLOCK_SIZE", "0", ">= 1"),
    ("MODEL.BACKBONE_ARGS.DROPBLOCK_RAMP_STEPS", "-1", ">= 0"),
    ("MODEL.METRIC_SCALE", "0", "> 0"),
    ("MODEL.SAP.LOGIT_SCALE_INIT", "0", "> 0"),
    ("MODEL.SAP.LOGIT_SCALE_MAX", "-1", "> 0"),
    ("MODEL.SAP.PURIFY_INIT", "1.0", "in (0, 1)"),
    ("MODEL.SAP.PURIFY_INIT", "0", "in (0, 1)"),
    ("MODEL.SAP.ANCHOR_PROTO_WEIGHT", "1.5", "in [0, 1]"),
    ("MODEL.SAP.LEARNED_DIM", "0", ">= 1"),
    ("MODEL.SAP.WORD_VOCAB_SIZE", "0", ">= 1"),
    ("FEWSHOT.IMAGE_SIZE", "0", ">= 1"),
    ("FEWSHOT.N_WAY", "1", ">= 2"),
    ("FEWSHOT.K_SHOT", "0", ">= 1"),
    ("FEWSHOT.N_QUERY", "0", ">= 1"),
    ("FEWSHOT.EPISODES_PER_EPOCH", "0", ">= 1"),
    ("FEWSHOT.TEST_WAY", "1", ">= 2"),
    ("FEWSHOT.TEST_SHOTS", "[]", "a list of one or more integers >= 1"),
    ("FEWSHOT.TEST_SHOTS", "[1, 0]", "a list of one or more integers >= 1"),
    ("FEWSHOT.TEST_QUERY", "0", ">= 1"),
    ("FEWSHOT.TEST_EPISODES", "0", ">= 1"),
    ("FEWSHOT.VAL_EPISODES", "0", ">= 1"),
    ("FEWSHOT.CI_Z", "0", "> 0"),
    ("FEWSHOT.PRETRAIN.EPOCHS", "-1", ">= 0 (0: no pre-training)"),
    ("FEWSHOT.PRETRAIN.BASE_LR", "-0.1", ">= 0"),
    ("FEWSHOT.PRETRAIN.BATCH_SIZE", "0", ">= 1"),
    ("FEWSHOT.PRETRAIN.WARMUP_EPOCHS", "-1", ">= 0"),
    ("MODEL.METRIC_TEMPERATURE", "0.0", "> 0"),
    ("FEWSHOT.TEXT_TOWER.EMBED_DIM", "0", ">= 1"),
    ("FEWSHOT.TEXT_TOWER.WIDTH", "0", ">= 1"),
    ("FEWSHOT.TEXT_TOWER.HIDDEN", "0", ">= 1"),
    ("FEWSHOT.TEXT_TOWER.STEPS", "0", ">= 1"),
    ("FEWSHOT.TEXT_TOWER.BATCH_SIZE", "0", ">= 1"),
    ("FEWSHOT.TEXT_TOWER.LR", "0.0", "> 0"),
    ("FEWSHOT.TEXT_TOWER.WEIGHT_DECAY", "-0.1", ">= 0"),
    ("FEWSHOT.TEXT_TOWER.TEMPERATURE", "0.001", "in [0.01, 1]"),
    ("FEWSHOT.TEXT_TOWER.EPISODES", "0", ">= 1"),
    # names
    ("DEVICE.PRECISION", "'fp8'", "auto, fp32, bf16, fp16"),
    ("SOLVER.OPTIMIZER", "'Adagrad'", "SGD, Adam, AdamW"),
    ("MODEL.COMPILE", "'fast'", "'', default, reduce-overhead"),
    ("MODEL.BACKBONE", "'resnet12'", "'', clip_vit_b16, clip_vit_tiny, clip_vit_small"),
    ("DATASETS.NAMES", "'miniImageNet'", "RGBNT201, RGBNT100, MSVR310, synthetic_rgbnt"),
    ("DATASETS.SYNTHETIC.PRESET", "'big'", "'', small, gpu, ablation, pretrain"),
]


@pytest.mark.parametrize(("key", "bad", "allowed"), BAD_VALUES, ids=lambda v: str(v))
def test_a_value_out_of_range_is_one_line_naming_key_value_and_range(key: str, bad: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config_for(key), [key, bad])
    msg = str(info.value)
    assert f"config key '{key}' must " in msg and allowed in msg and "\n" not in msg
    assert msg.endswith(f"got {_shown(key, bad)}") or f"got {_shown(key, bad)} (did you mean" in msg


@pytest.mark.parametrize(("path", "key", "bad", "allowed"), [
    (FEWSHOT_TINY, "MODEL.NUM_CLASSES", "0", ">= 1 (the training classes)"),
    (FEWSHOT_TINY, "MODEL.BACKBONE", "'clip_vit_b16'", "'', resnet12, tiny_conv, timm"),
    (FEWSHOT_TINY, "DATASETS.NAMES", "'RGBNT201'", "miniImageNet, tieredImageNet, CIFAR-FS, CUB, synthetic_fewshot"),
])
def test_a_few_shot_config_takes_its_own_names_and_class_count(path: Path, key: str, bad: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path, [key, bad])
    msg = str(info.value)
    assert f"config key '{key}' must " in msg and allowed in msg and f"got {_shown(key, bad)}" in msg


def test_every_rule_has_a_bad_value_above() -> None:
    from engine.config import ORDERED_KEYS, RANGES
    from engine.family import families

    tested = {key for key, _, _ in BAD_VALUES}
    assert set(RANGES).union(*(family.ranges for family in families())) <= tested
    assert {k for k, _, _ in ORDERED_KEYS} <= {k for _, k, _, _ in ORDERED_BAD}


def test_a_name_in_the_wrong_case_is_named_in_the_message() -> None:
    with pytest.raises(ConfigError, match=r"got 'BF16' \(did you mean 'bf16'\?\)"):
        load_config(REID_TINY, ["DEVICE.PRECISION", "BF16"])
    with pytest.raises(ConfigError, match=r"got 'adamw' \(did you mean 'AdamW'\?\)"):
        load_config(REID_TINY, ["SOLVER.OPTIMIZER", "adamw"])


# (key, overrides, words): a key that must not exceed another
ORDERED_BAD = [
    (REID_TINY, "LOSS.SDM.MIN_TEMPERATURE", ["LOSS.SDM.MIN_TEMPERATURE", "0.6"],
     "must be <= LOSS.SDM.MAX_TEMPERATURE (0.5); got 0.6"),
    (REID_TINY, "MONITOR.SPIKE_WARMUP", ["MONITOR.SPIKE_WARMUP", "101"], "must be <= MONITOR.SPIKE_WINDOW (100); got 101"),
    (FEWSHOT_TINY, "MODEL.SAP.LOGIT_SCALE_INIT", ["MODEL.SAP.LOGIT_SCALE_INIT", "150.0"],
     "must be <= MODEL.SAP.LOGIT_SCALE_MAX (100); got 150.0"),
    (REID_TINY, "TEST.RE_RANKING_K2", ["TEST.RE_RANKING_K2", "52"], "must be <= TEST.RE_RANKING_K1 + 1 (51); got 52"),
]


@pytest.mark.parametrize(("path", "key", "overrides", "words"), ORDERED_BAD, ids=lambda v: str(v))
def test_a_key_bounded_by_another_names_both(path: Path, key: str, overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert f"config key '{key}' {words}" == str(info.value)


@pytest.mark.parametrize(("path", "overrides", "words"), [
    (REID_TINY, ["INPUT.SIZE_TRAIN", "[250, 64]"],
     "config key 'INPUT.SIZE_TRAIN' must hold multiples of the patch size 16 of MODEL.BACKBONE clip_vit_tiny "
     "(ViT-tiny), e.g. [256, 64]; got [250, 64]"),
    (REID_TINY, ["INPUT.SIZE_TEST", "[128, 72]"], "config key 'INPUT.SIZE_TEST' must hold multiples of the patch size 16"),
    (REID_TINY, ["INPUT.SIZE_TEST", "[256, 128]"],
     "config key 'INPUT.SIZE_TEST' must give the 8 x 4 patch grid of INPUT.SIZE_TRAIN [128, 64]"),
    (REID_TINY, ["MODEL.BACKBONE", "clip_vit_small", "INPUT.SIZE_TRAIN", "[132, 64]", "INPUT.SIZE_TEST", "[132, 64]"],
     "must hold multiples of the patch size 8 of MODEL.BACKBONE clip_vit_small (ViT-small-8)"),
    (None, ["INPUT.SIZE_TRAIN", "[250, 128]"], "patch size 16 of MODEL.BACKBONE '' (ViT-B-16)"),
    (REID_TINY, ["MODEL.DEMO.HEAD", "3"], "config key 'MODEL.DEMO.HEAD' must divide the 64-d tokens of MODEL.BACKBONE "
                                          "clip_vit_tiny (ViT-tiny); got 3"),
    (REID_TINY, ["MODEL.SDTPS.NUM_HEADS", "5"], "config key 'MODEL.SDTPS.NUM_HEADS' must divide the 64-d tokens"),
    (REID_TINY, ["MODEL.SDTPS.GATE_INIT_BIAS", "-6.0"], "config key 'MODEL.SDTPS.GATE_INIT_BIAS' must lie in "
                                                        "[-MODEL.SDTPS.GATE_PARAM_BOUND, MODEL.SDTPS.GATE_PARAM_BOUND] "
                                                        "([-5, 5]); got -6.0"),
    (REID_TINY, ["MODEL.SDTPS.GATE_PARAM_BOUND", "0.4"], "config key 'MODEL.SDTPS.GATE_INIT_SCALE' must lie in"),
    (REID_TINY, ["MODEL.DEMO.HDM", "False"], "MODEL.DEMO.ATM needs MODEL.DEMO.HDM (the experts mix the seven HDM features); got "
                                          "MODEL.DEMO.ATM True with MODEL.DEMO.HDM False"),
    (None, ["SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.0"], "SOLVER.NESTEROV True needs SOLVER.MOMENTUM > 0"),
    (FEWSHOT_TINY, ["MODEL.BACKBONE", "resnet12"],
     "config key 'MODEL.BACKBONE_ARGS.CHANNELS' must list 4 stage widths for MODEL.BACKBONE resnet12; got [8, 16, 32]"),
    (FEWSHOT_TINY, ["FEWSHOT.STAGES", "['meta', 'pretrain']"], "must list stages of pretrain, meta, each once and in "
                                                               "that order; got ['meta', 'pretrain']"),
    (FEWSHOT_TINY, ["FEWSHOT.STAGES", "['meta', 'meta']"], "config key 'FEWSHOT.STAGES' must list stages"),
    (FEWSHOT_TINY, ["FEWSHOT.STAGES", "['finetune']"], "config key 'FEWSHOT.STAGES' must list stages"),
])
def test_settings_that_cannot_work_together_are_refused(path: Path | None, overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("path", "overrides"), [
    (REID_TINY, ["SOLVER.WARMUP_EPOCHS", "0", "SOLVER.MIN_LR_FACTOR", "1.0", "SOLVER.GAMMA", "1.0"]),
    (REID_TINY, ["MODEL.SDTPS.KEEP_RATIO", "1.0", "MODEL.DEMO.HDM_DROPOUT", "0.0", "INPUT.PROB", "0.0"]),
    (REID_TINY, ["DATALOADER.NUM_WORKERS", "-1", "MODEL.NUM_CLASSES", "0", "TEST.VIS_QUERIES", "0"]),
    (REID_TINY, ["DATASETS.SYNTHETIC.MISSING_MODALITY_PROB", "-1.0"]),
    (REID_TINY, ["DATASETS.SYNTHETIC.MISSING_MODALITY_PROB", "1.0", "DATASETS.SYNTHETIC.PRESET", "pretrain"]),
    (REID_TINY, ["LOSS.SDM.MIN_TEMPERATURE", "0.5", "LOSS.SDM.MAX_TEMPERATURE", "0.5"]),
    (REID_TINY, ["TEST.RE_RANKING_K1", "20", "TEST.RE_RANKING_K2", "21", "TEST.RE_RANKING_LAMBDA", "1.0"]),
    (REID_TINY, ["MONITOR.SPIKE_WARMUP", "100", "MONITOR.BLOWUP_FACTOR", "0.0"]),
    (REID_TINY, ["MODEL.SDTPS.GATE_INIT_SCALE", "-5.0", "MODEL.SDTPS.GATE_INIT_BIAS", "5.0"]),
    (REID_TINY, ["INPUT.SIZE_TRAIN", "[256, 128]", "INPUT.SIZE_TEST", "[256, 128]", "MODEL.DEMO.HEAD", "8"]),
    (REID_TINY, ["MODEL.NAME", "DeMo", "MODEL.SDTPS.NUM_HEADS", "5"]),  # DeMo has no SDTPS
    (REID_TINY, ["MODEL.DEMO.ATM", "False", "MODEL.DEMO.HDM", "False", "MODEL.DEMO.HEAD", "3"]),  # no ATM
    (REID_TINY, ["MODEL.BACKBONE", "clip_vit_small", "INPUT.SIZE_TRAIN", "[136, 64]", "INPUT.SIZE_TEST", "[136, 64]"]),
    (REID_TINY, ["DEVICE.PRECISION", "fp32", "SOLVER.OPTIMIZER", "SGD", "MODEL.COMPILE", "max-autotune"]),
    (None, ["SOLVER.NESTEROV", "False", "SOLVER.MOMENTUM", "0.0"]),
    (None, ["SOLVER.OPTIMIZER", "Adam", "SOLVER.MOMENTUM", "0.0"]),
    (FEWSHOT_TINY, ["FEWSHOT.N_WAY", "2", "FEWSHOT.TEST_WAY", "2", "FEWSHOT.PRETRAIN.EPOCHS", "0"]),
    (FEWSHOT_TINY, ["FEWSHOT.STAGES", "['meta']", "MODEL.SAP.LOGIT_SCALE_INIT", "100.0"]),
    (FEWSHOT_TINY, ["MODEL.BACKBONE", "resnet12", "MODEL.BACKBONE_ARGS.CHANNELS", "[8, 16, 32, 64]"]),
    (FEWSHOT_TINY, ["MODEL.SAP.ANCHOR_PROTO_WEIGHT", "0.0", "MODEL.BACKBONE_ARGS.DROP_RATE", "0.0"]),
])
def test_values_on_the_boundary_load(path: Path | None, overrides: list[str]) -> None:
    load_config(path, overrides)


def _entry(script: str, config: Path, tmp_path: Path, *overrides: str) -> str:
    """Run ``script`` with a bad value; check exit code 2, one ``error:`` line on stderr (returned) and no run
    folder."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, script, "--config_file", str(config), "OUTPUT_DIR", str(tmp_path / "run"),
                          "WANDB.MODE", "disabled", *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: config key '") and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()
    return lines[0]


def test_train_net_refuses_a_bad_value_before_the_run_folder_exists(tmp_path: Path) -> None:
    line = _entry("train_net.py", REID_TINY, tmp_path, "SOLVER.MAX_EPOCHS", "0")
    assert line == "error: config key 'SOLVER.MAX_EPOCHS' must be >= 1; got 0"


def test_train_b1_improvement_refuses_a_bad_value_before_the_run_folder_exists(tmp_path: Path) -> None:
    line = _entry("train_b1_improvement.py", FEWSHOT_TINY, tmp_path, "FEWSHOT.N_WAY", "1")
    assert line == "error: config key 'FEWSHOT.N_WAY' must be >= 2 (classes per training episode); got 1"
