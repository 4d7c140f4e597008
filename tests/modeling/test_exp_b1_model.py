"""ExpB1Model: registry build, the two parameter groups, episode logits against an independent computation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import load_config
from modeling import MODEL_REGISTRY, build_model
from modeling.exp_b1_model import ExpB1Model

TINY = ["MODEL.NAME", "ExpB1", "MODEL.BACKBONE", "tiny_conv", "MODEL.BACKBONE_ARGS.CHANNELS", "[4, 8]",
        "MODEL.NUM_CLASSES", "6"]


def tiny_model(*overrides: str) -> ExpB1Model:
    torch.manual_seed(0)
    return build_model(load_config(None, [*TINY, *overrides]))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_registered_and_default_config_model() -> None:
    assert "ExpB1" in MODEL_REGISTRY
    model = build_model(load_config("configs/Base-FewShot.yml"))
    assert isinstance(model, ExpB1Model) and model.phy_dim == 640
    assert sum(p.numel() for p in model.backbone.parameters()) == 12_424_320
    with pytest.raises(ValueError, match="MODEL.BACKBONE is empty"):
        build_model(load_config(None, ["MODEL.NAME", "ExpB1"]))


@pytest.mark.parametrize("overrides, n_groups", [
    ((), 2),
    (("MODEL.SAP.SCALE_MODE", "fixed"), 1),
    (("MODEL.SAP.SCALE_MODE", "constant"), 1),
    (("MODEL.SAP.ENABLED", "False"), 1),
    (("MODEL.SAP.ANCHOR_MODE", "learned"), 2),
    (("MODEL.METRIC_SCALE_LEARNABLE", "True"), 2),
])
def test_get_parameters_every_trainable_parameter_exactly_once(overrides, n_groups) -> None:
    model = tiny_model(*overrides)
    groups = model.get_parameters()
    assert len(groups) == n_groups
    listed = [p for g in groups for p in g["params"]]
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert len(listed) == len({id(p) for p in listed}) == len(trainable)  # none twice, none lost
    assert {id(p) for p in listed} == set(trainable)
    if n_groups == 2:
        assert groups[0].keys() == {"params"}
        assert groups[1].keys() == {"params", "weight_decay"} and groups[1]["weight_decay"] == 0.0
        assert len(groups[1]["params"]) == 1 and groups[1]["params"][0] is model.sap.logit_scale_log
        assert trainable[id(groups[1]["params"][0])] == "sap.logit_scale.raw"


def test_episode_logits_without_sap_match_cosine_prototypes() -> None:
    model = tiny_model("MODEL.SAP.ENABLED", "False")
    rng = np.random.default_rng(0)
    s = rng.normal(size=(10, 8)).astype(np.float32)
    s_lab = np.repeat(np.arange(5), 2)
    q = rng.normal(size=(7, 8)).astype(np.float32)
    logits, stats = model.episode_logits(torch.from_numpy(s), torch.from_numpy(s_lab), torch.from_numpy(q))
    protos = np.stack([s[s_lab == c].mean(0) for c in range(5)])
    expected = 10.0 * unit(q) @ unit(protos).T
    assert logits.detach().numpy() == pytest.approx(expected, abs=1e-5)
    assert stats == {}


def test_episode_logits_with_sap_match_independent_formula() -> None:
    """Prototype anchors, identity projections at init, purify weight 0.5, SAP scale 25, metric scale 10."""
    model = tiny_model("MODEL.SAP.ANCHOR_MODE", "prototype")
    rng = np.random.default_rng(1)
    s = rng.normal(size=(15, 8))
    s_lab = np.repeat(np.arange(5), 3)
    q = rng.normal(size=(10, 8))
    logits, stats = model.episode_logits(torch.tensor(s, dtype=torch.float32), torch.from_numpy(s_lab),
                                         torch.tensor(q, dtype=torch.float32), class_ids=torch.arange(5))
    protos = np.stack([s[s_lab == c].mean(0) for c in range(5)])
    anchors = unit(protos)
    feats = np.concatenate([s, q])
    attn = softmax(25.0 * unit(feats) @ anchors.T)
    purified = unit(feats) + 0.5 * attn @ anchors
    p_protos = np.stack([purified[:15][s_lab == c].mean(0) for c in range(5)])
    expected = 10.0 * unit(purified[15:]) @ unit(p_protos).T
    assert logits.detach().numpy() == pytest.approx(expected, abs=1e-4)
    assert float(stats["attn_entropy"]) == pytest.approx(float(-(attn * np.log(attn)).sum(1).mean()), rel=1e-4)
    assert float(stats["attn_max"]) == pytest.approx(float(attn.max(1).mean()), rel=1e-5)


def test_forward_paths_and_gradient_to_the_scale() -> None:
    model = tiny_model()
    images = torch.randn(4, 3, 16, 16)
    pre, stats = model(images)
    assert pre.shape == (4, 6) and stats == {}
    support, query = torch.randn(5, 3, 16, 16), torch.randn(10, 3, 16, 16)
    logits, stats = model(support, torch.arange(5), query, torch.tensor([3, 1, 4, 0, 2]))
    assert logits.shape == (10, 5)
    assert {"attn_entropy", "attn_max", "logit_scale", "logit_scale_clipped"} <= set(stats)
    nn.functional.cross_entropy(logits, torch.arange(5).repeat_interleave(2)).backward()
    assert model.sap.logit_scale_log.grad is not None and float(model.sap.logit_scale_log.grad) != 0.0
    with pytest.raises(ValueError, match="query"):
        model(support, torch.arange(5))


def test_text_anchor_mode_without_weights_falls_back_and_logs(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        model = tiny_model("MODEL.SAP.ANCHOR_MODE", "text", "MODEL.SAP.ANCHOR_FALLBACK", "learned")
    assert model.anchors.mode == "learned" and "MODEL.CLIP_WEIGHTS and MODEL.SAP.TEXT_TOWER are empty" in caplog.text
    with pytest.raises(FileNotFoundError, match="ANCHOR_FALLBACK"):
        tiny_model("MODEL.SAP.ANCHOR_MODE", "text", "MODEL.SAP.ANCHOR_FALLBACK", "error")


def test_backbone_weights_from_a_checkpoint_of_this_repo(tmp_path) -> None:
    src = tiny_model()
    path = tmp_path / "checkpoint_epoch0001.pth"
    torch.save({"model": src.state_dict(), "format_version": 1}, path)
    dst = tiny_model("MODEL.BACKBONE_ARGS.WEIGHTS", str(path))
    for (k, a), b in zip(src.backbone.state_dict().items(), dst.backbone.state_dict().values()):
        assert torch.equal(a, b), k


def test_scale_decay_ablation_keeps_two_groups_but_decays_the_scale() -> None:
    from engine.config import load_config
    from modeling import build_model

    overrides = ["MODEL.NAME", "ExpB1", "MODEL.BACKBONE", "tiny_conv", "MODEL.SAP.ANCHOR_MODE", "prototype"]
    default = build_model(load_config(None, overrides)).get_parameters()
    ablated = build_model(load_config(None, [*overrides, "MODEL.SAP.SCALE_NO_DECAY", "False"])).get_parameters()
    assert default[1]["weight_decay"] == 0.0 and len(default[1]["params"]) == 1
    assert len(ablated) == 2 and "weight_decay" not in ablated[1]  # the optimizer's default decay applies
    assert ablated[1]["params"][0] is not None and ablated[1]["params"][0].shape == default[1]["params"][0].shape


@pytest.mark.parametrize("sap", ["False", "True"])
def test_euclidean_head_is_protonets_against_numpy(sap: str) -> None:
    """``MODEL.METRIC euclidean``: ``-||q - p||^2 / T`` to the class means of the (purified) support features,
    the head of ProtoNet and FEAT, in float64 by hand; without SAP the features are the backbone's."""
    model = tiny_model("MODEL.SAP.ENABLED", sap, "MODEL.SAP.ANCHOR_MODE", "prototype", "MODEL.METRIC", "euclidean",
                       "MODEL.METRIC_TEMPERATURE", "16.0").eval()
    g = torch.Generator().manual_seed(1)
    support, query = torch.randn(6, 8, generator=g), torch.randn(9, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits, _ = model.episode_logits(support, labels, query, n_way=3)
    if sap == "True":
        with torch.no_grad():
            purified, _ = model.sap(torch.cat([support, query]), model.anchors(
                torch.stack([support[labels == c].mean(0) for c in range(3)])))
        support, query = purified[:6], purified[6:]
    s, q = support.double().numpy(), query.double().numpy()
    protos = np.stack([s[labels.numpy() == c].mean(0) for c in range(3)])
    expected = -((q[:, None, :] - protos[None]) ** 2).sum(-1) / 16.0
    np.testing.assert_allclose(logits.detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_an_unknown_metric_is_refused() -> None:
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="MODEL.METRIC' must be one of cosine, euclidean"):
        load_config(None, [*TINY, "MODEL.METRIC", "manhattan"])


@pytest.mark.parametrize("sap", ["True", "False"])
def test_a_compiled_episode_forward_is_not_recompiled_episode_after_episode(sap: str) -> None:
    """The bounded scales count their calls on the host, outside the graph: a counter the graph read would
    change every episode and recompile it every episode (until torch's limit, then run eagerly)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_model("MODEL.SAP.ENABLED", sap).train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    support, query = torch.randn(5, 3, 16, 16), torch.randn(10, 3, 16, 16)
    for _ in range(4):
        compiled(support, torch.arange(5), query, torch.tensor([3, 1, 4, 0, 2]))
    frames = counter.frame_count
    for _ in range(4):
        compiled(support, torch.arange(5), query, torch.tensor([3, 1, 4, 0, 2]))
    assert counter.frame_count == frames  # nothing compiled after the first episodes
