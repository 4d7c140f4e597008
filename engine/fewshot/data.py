"""The few-shot data of a run: the data set checked against ``FEWSHOT`` (splits, classes, episode sizes) and
SAP's anchors made from its class names."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from yacs.config import CfgNode as CN

import datasets
from engine.checkpoint import unwrap
from engine.config import ConfigError
from engine.fewshot.family import FEWSHOT
from modeling.module.name_tower import load_name_tower
from modeling.module.semantic_anchors import encode_class_names

logger = logging.getLogger(__name__)


def load_fewshot_data(cfg: CN) -> Any:
    """Parse ``DATASETS.NAMES`` under ``DATASETS.ROOT_DIR`` and check it against ``FEWSHOT``."""
    name = cfg.DATASETS.NAMES
    if name not in FEWSHOT.datasets:
        raise ConfigError(f"DATASETS.NAMES '{name}' is not a few-shot dataset ({', '.join(FEWSHOT.datasets)})")
    preset = cfg.DATASETS.SYNTHETIC.PRESET if name == "synthetic_fewshot" else ""
    data = datasets.build_dataset(name, cfg.DATASETS.ROOT_DIR, verbose=True, **({"preset": preset} if preset else {}))
    fs = cfg.FEWSHOT
    for split in (fs.TRAIN_SPLIT, fs.VAL_SPLIT, fs.TEST_SPLIT):
        if split not in data.splits:
            raise ConfigError(f"FEWSHOT: {name} has no split '{split}' (has {', '.join(data.splits)})")
    train_classes = {lab for _, lab in data.splits[fs.TRAIN_SPLIT]}
    if max(train_classes) >= cfg.MODEL.NUM_CLASSES:
        raise ConfigError(f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but {name}'s '{fs.TRAIN_SPLIT}' split "
                         f"has class ids up to {max(train_classes)} ({len(train_classes)} classes); set it to "
                         f"{max(train_classes) + 1}")
    if "meta" in fs.STAGES:
        check_episodes(data, fs.TRAIN_SPLIT, fs.N_WAY, fs.K_SHOT, fs.N_QUERY, "FEWSHOT.N_WAY", "FEWSHOT.K_SHOT + N_QUERY")
    check_episodes(data, fs.VAL_SPLIT, fs.TEST_WAY, fs.K_SHOT, fs.TEST_QUERY, "FEWSHOT.TEST_WAY",
                   "FEWSHOT.K_SHOT + TEST_QUERY (validation)")
    check_episodes(data, fs.TEST_SPLIT, fs.TEST_WAY, max(fs.TEST_SHOTS), fs.TEST_QUERY, "FEWSHOT.TEST_WAY",
                   "max(FEWSHOT.TEST_SHOTS) + TEST_QUERY")
    return data


def check_episodes(data: Any, split: str, n_way: int, k_shot: int, n_query: int, way_key: str, size_key: str) -> None:
    """Refuse, before any training, episodes that ``split`` cannot give (the episode sampler draws from every
    class): ``n_way`` classes, each with ``k_shot + n_query`` images."""
    counts = Counter(label for _, label in data.splits[split])
    need = k_shot + n_query
    if n_way > len(counts):
        raise ConfigError(f"{way_key} is {n_way} but the '{split}' split has {len(counts)} classes; use at most "
                          f"{len(counts)}")
    small = [c for c, n in counts.items() if n < need]
    if small:
        smallest = min(counts.values())
        raise ConfigError(f"{size_key} = {need} images per class, but {len(small)} of the '{split}' split's "
                          f"{len(counts)} classes have fewer (smallest: {smallest}); lower them to at most {smallest}")


def install_anchors(cfg: CN, model: torch.nn.Module, data: Any, device: torch.device) -> None:
    """Give SAP's anchors what they need from the data set's class names.

    ``text``: encode every class name once (disk cache) with the CLIP text tower, or with the name tower of
    ``MODEL.SAP.TEXT_TOWER`` without CLIP weights; ``words``:
    the word vocabulary of the training classes' names. Other modes need nothing.
    """
    anchors = getattr(unwrap(model), "anchors", None)
    if anchors is None:
        return
    s = cfg.MODEL.SAP
    if anchors.mode == "text" and cfg.MODEL.CLIP_WEIGHTS:
        emb = encode_class_names(data.class_names, s.CLIP_MODEL, cfg.MODEL.CLIP_WEIGHTS, s.PROMPT_TEMPLATE,
                                 s.ANCHOR_CACHE_DIR, activation=cfg.MODEL.CLIP_ACTIVATION)
        anchors.set_class_embeddings(emb.to(device))
    elif anchors.mode == "text":  # the name tower stands in for CLIP's
        tower = load_name_tower(s.TEXT_TOWER)
        unknown = tower.unknown_words(data.class_names)
        if unknown:
            logger.warning("the name tower %s does not know %d words of the class names (%s): they are left out of "
                           "those names' embeddings", s.TEXT_TOWER, len(unknown), ", ".join(unknown[:5]))
        anchors.set_class_embeddings(tower.encode(data.class_names).to(device))
    elif anchors.mode == "words":
        train_ids = sorted({lab for _, lab in data.splits[cfg.FEWSHOT.TRAIN_SPLIT]})
        vocab = anchors.set_class_words(data.class_names, train_ids)
        covered = int(anchors.class_word_mask.any(1).sum())
        logger.info("SAP word anchors: %d words from %d training class names; %d of %d classes have an anchor",
                    len(vocab), len(train_ids), covered, len(data.class_names))

