"""The few-shot evaluator's zero-shot score: the nearest semantic anchor, no support image, on the 1-shot episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.samplers import EpisodeSampler
from engine.config import load_config
from engine.fewshot.evaluator import NearestAnchor, evaluate_episodes
from modeling import build_model


def test_nearest_anchor_scores_queries_by_the_class_names_alone() -> None:
    """A words-mode model: each query goes to the episode class whose projected word mean is nearest in cosine;
    checked against numpy on the same fixed-seed episodes."""
    torch.manual_seed(0)
    cfg = load_config(None, ["MODEL.NAME", "ExpB1", "MODEL.BACKBONE", "tiny_conv", "MODEL.BACKBONE_ARGS.CHANNELS",
                             "[4, 8]", "MODEL.NUM_CLASSES", "6", "MODEL.SAP.ANCHOR_MODE", "words",
                             "MODEL.SAP.LEARNED_DIM", "8"])
    model = build_model(cfg).eval()
    names = [f"{c} {s}" for c in ("red", "blue", "green") for s in ("circle", "star")]
    model.anchors.set_class_words(names, list(range(6)))
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(6).repeat_interleave(4)
    feats = torch.randn(len(labels), 8, generator=g)
    result = evaluate_episodes(NearestAnchor(model), feats, labels, n_way=3, k_shot=1, n_query=3, n_episodes=20, seed=3)

    with torch.no_grad():
        sem, _ = model.anchors.semantic(torch.arange(6))
        anchors = model.anchors.proj(sem).double().numpy()
    anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
    f = feats.double().numpy() / np.linalg.norm(feats.double().numpy(), axis=1, keepdims=True)
    accs = []
    for idx in EpisodeSampler(labels.tolist(), 3, 1, 3, 20, seed=3, fixed=True, rank=0, world_size=1):
        episode = np.asarray(idx).reshape(3, 4)  # per class: 1 support (unused), 3 queries
        classes = labels[episode[:, 0]].numpy()
        scores = f[episode[:, 1:].reshape(-1)] @ anchors[classes].T
        accs.append((scores.argmax(1) == np.repeat(np.arange(3), 3)).mean())
    assert result["acc"] == pytest.approx(np.mean(accs), abs=1e-12)


def test_sap_episodes_and_their_stats_equal_scoring_them_one_at_a_time() -> None:
    """The evaluator keeps every episode's accuracy and SAP stats on the device until the end; the numbers are
    those of scoring each fixed-seed episode alone with the model's head and averaging its stats in float64."""
    torch.manual_seed(0)
    cfg = load_config(None, ["MODEL.NAME", "ExpB1", "MODEL.BACKBONE", "tiny_conv", "MODEL.BACKBONE_ARGS.CHANNELS",
                             "[4, 8]", "MODEL.NUM_CLASSES", "6", "MODEL.SAP.ANCHOR_MODE", "prototype"])
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(6).repeat_interleave(7)
    feats = torch.randn(len(labels), 8, generator=g)
    result = evaluate_episodes(model, feats, labels, n_way=3, k_shot=2, n_query=4, n_episodes=25, seed=5)

    accs, entropy = [], 0.0
    with torch.no_grad():
        for idx in EpisodeSampler(labels.tolist(), 3, 2, 4, 25, seed=5, fixed=True, rank=0, world_size=1):
            episode = torch.as_tensor(idx).reshape(3, 6)
            support, query = episode[:, :2].reshape(-1), episode[:, 2:].reshape(-1)
            logits, stats = model.episode_logits(feats[support], torch.arange(3).repeat_interleave(2), feats[query],
                                                 labels[support][::2], n_way=3)
            accs.append((logits.argmax(-1) == torch.arange(3).repeat_interleave(4)).double().mean().item())
            entropy += float(stats["attn_entropy"])
    assert result["episode_acc"] == [round(a, 6) for a in accs]
    assert result["acc"] == pytest.approx(float(np.mean(accs)), abs=1e-12)
    assert result["attn_entropy"] == entropy / 25
