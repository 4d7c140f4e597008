"""SAP with its learnable, bounded logit scale and its anchors: numbers by hand, clamp, gradients, stats."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from modeling.module.semantic_anchor_purification import SemanticAnchorPurification
from modeling.module.semantic_anchors import SemanticAnchors, encode_class_names, resolve_anchor_mode


def entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(p)).sum(-1).mean())


def test_two_anchor_case_by_hand() -> None:
    """f = (3, 4), anchors e1, e2: cosines 0.6 / 0.8, scale 25 -> logits 15 / 20 -> minus max -5 / 0."""
    sap = SemanticAnchorPurification(2)  # projections start as the identity, purify weight 0.5
    f = torch.tensor([[3.0, 4.0]])
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    attn, log_attn, scale = sap.compute_cross_attention(f, anchors)
    p1 = math.exp(-5) / (1 + math.exp(-5))  # 0.0066928509...
    assert float(scale.detach()) == pytest.approx(25.0, rel=1e-6)
    assert attn.tolist()[0] == pytest.approx([p1, 1 - p1], rel=1e-5)
    assert log_attn.tolist()[0] == pytest.approx([-5 - math.log1p(math.exp(-5)), -math.log1p(math.exp(-5))], rel=1e-5)
    out, stats = sap(f, anchors)
    # purified = f / |f| + 0.5 * (attn @ anchors)
    assert out.tolist()[0] == pytest.approx([0.6 + 0.5 * p1, 0.8 + 0.5 * (1 - p1)], rel=1e-5)
    assert float(stats["attn_entropy"]) == pytest.approx(-(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1)), rel=1e-4)
    assert float(stats["attn_max"]) == pytest.approx(1 - p1, rel=1e-6)
    assert float(stats["logit_scale"]) == pytest.approx(25.0, rel=1e-6)
    assert float(stats["logit_scale_clipped"]) == 0.0


def test_parameter_and_no_temperature() -> None:
    sap = SemanticAnchorPurification(640)
    assert isinstance(sap.logit_scale_log, nn.Parameter)
    assert sap.logit_scale_log is sap.logit_scale.raw  # one tensor, two names
    assert float(sap.logit_scale_log.detach().exp()) == pytest.approx(25.0, rel=1e-6)
    assert sap.logit_scale_max == 100.0
    assert not hasattr(sap, "temperature")
    names = [n for n, _ in sap.named_parameters()]
    assert names.count("logit_scale.raw") == 1


def test_clamp_at_100_and_its_gradient() -> None:
    torch.manual_seed(0)
    sap = SemanticAnchorPurification(8, projections=False)
    f, a = torch.randn(6, 8), torch.randn(3, 8)
    w = torch.randn(6, 3)

    def objective(scale: float) -> float:  # independent float64: sum(w * softmax(scale * cos))
        fn = f.double().numpy() / np.linalg.norm(f.double().numpy(), axis=1, keepdims=True)
        an = a.double().numpy() / np.linalg.norm(a.double().numpy(), axis=1, keepdims=True)
        z = scale * fn @ an.T
        p = np.exp(z - z.max(1, keepdims=True))
        return float((w.double().numpy() * p / p.sum(1, keepdims=True)).sum())

    # below the ceiling: d/d(log s) = s * d/ds, checked by a central difference
    sap.logit_scale.set_value(50.0)
    attn, _, _ = sap.compute_cross_attention(f, a)
    (attn * w).sum().backward()
    h = 1e-4
    expected = 50.0 * (objective(50.0 + h) - objective(50.0 - h)) / (2 * h)
    assert float(sap.logit_scale_log.grad) == pytest.approx(expected, rel=1e-3)
    # at and beyond the ceiling: exactly 100, and the clamp passes no gradient
    sap.zero_grad()
    sap.logit_scale.set_value(200.0)
    assert float(sap.logit_scale_log.detach()) == pytest.approx(math.log(200.0))
    attn, _, scale = sap.compute_cross_attention(f, a)
    assert float(scale.detach()) == 100.0
    (attn * w).sum().backward()
    assert float(sap.logit_scale_log.grad) == 0.0
    assert float((attn * w).sum().detach()) == pytest.approx(objective(100.0), rel=1e-5)
    _, stats = sap(f, a)
    assert float(stats["logit_scale_clipped"]) == 1.0 and float(stats["logit_scale"]) == 100.0


def test_row_max_subtraction_keeps_saturated_rows_finite() -> None:
    sap = SemanticAnchorPurification(4, projections=False)
    sap.logit_scale.set_value(100.0)
    f = torch.eye(4) * 1e3
    attn, log_attn, _ = sap.compute_cross_attention(f, torch.eye(4))
    assert torch.isfinite(attn).all() and torch.isfinite(log_attn).all()
    ref = np.exp(100 * np.eye(4) - 100)
    assert attn.detach().double().numpy() == pytest.approx(ref / ref.sum(1, keepdims=True), abs=1e-7)


def test_entropy_and_max_stats_against_numpy() -> None:
    torch.manual_seed(1)
    sap = SemanticAnchorPurification(16, projections=False)
    f, a = torch.randn(40, 16), torch.randn(5, 16)
    _, stats = sap(f, a)
    fn = f.double().numpy() / np.linalg.norm(f.double().numpy(), axis=1, keepdims=True)
    an = a.double().numpy() / np.linalg.norm(a.double().numpy(), axis=1, keepdims=True)
    z = 25 * fn @ an.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert float(stats["attn_entropy"]) == pytest.approx(entropy(p), rel=1e-4)
    assert float(stats["attn_max"]) == pytest.approx(float(p.max(1).mean()), rel=1e-5)
    # identical anchors: uniform attention, entropy log N and max 1/N
    _, stats = sap(f, a[:1].repeat(5, 1))
    assert float(stats["attn_entropy"]) == pytest.approx(math.log(5), rel=1e-5)
    assert float(stats["attn_max"]) == pytest.approx(0.2, rel=1e-5)
    assert all(not v.requires_grad for v in stats.values())


def test_scale_modes_for_the_ablation() -> None:
    fixed = SemanticAnchorPurification(640, scale_mode="fixed")
    assert not isinstance(fixed.logit_scale_log, nn.Parameter)
    assert float(fixed.logit_scale()) == pytest.approx(1 / math.sqrt(640), rel=1e-6)  # cosine / 25.3 (SCALE_MODE fixed)
    assert not hasattr(fixed, "temperature")
    const = SemanticAnchorPurification(640, scale_mode="constant")
    assert not isinstance(const.logit_scale_log, nn.Parameter) and float(const.logit_scale()) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="SCALE_MODE"):
        SemanticAnchorPurification(8, scale_mode="wild")
    # on a clear 5-way case the fixed temperature leaves the attention nearly uniform, the learnable scale not
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 640, generator=g)
    f = a.repeat_interleave(4, 0) + 0.5 * torch.randn(20, 640, generator=g)
    _, s_fixed = fixed(f, a)
    _, s_learn = SemanticAnchorPurification(640)(f, a)
    assert float(s_fixed["attn_entropy"]) > 0.99 * math.log(5)
    assert float(s_learn["attn_entropy"]) < 0.5 * math.log(5)


def test_batched_episodes_and_gradient_reaches_scale_and_features() -> None:
    sap = SemanticAnchorPurification(8)
    f = torch.randn(3, 10, 8, requires_grad=True)
    a = torch.randn(3, 4, 8)
    out, stats = sap(f, a)
    assert out.shape == (3, 10, 8)
    out.square().sum().backward()
    assert f.grad is not None and sap.logit_scale_log.grad is not None and float(sap.logit_scale_log.grad) != 0.0
    with pytest.raises(ValueError, match="feature dim"):
        sap(torch.randn(2, 7), torch.randn(3, 7))


# ------------------------------------------------------------------------------ anchors
def test_anchor_modes_and_fusion() -> None:
    torch.manual_seed(0)
    protos = torch.randn(3, 6)
    unit = protos / protos.norm(dim=1, keepdim=True)
    proto_anchors = SemanticAnchors(6, mode="prototype")
    assert torch.allclose(proto_anchors(protos, torch.tensor([0, 1, 2])), unit)
    learned = SemanticAnchors(6, mode="learned", embed_dim=4, num_learned_classes=10, proto_weight=0.25)
    ids = torch.tensor([2, 7, 15])  # class 15 has no learned embedding (a novel class)
    out = learned(protos, ids)
    sem = learned.proj(learned.class_embedding.weight[[2, 7]]).detach()
    sem = sem / sem.norm(dim=1, keepdim=True)
    fused = 0.75 * sem + 0.25 * unit[:2]
    assert torch.allclose(out[:2], fused / fused.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(out[2], unit[2])
    text = SemanticAnchors(6, mode="text", embed_dim=4)
    with pytest.raises(RuntimeError, match="set_class_embeddings"):
        text(protos, ids)
    text.set_class_embeddings(torch.randn(20, 4))
    assert text(protos, ids).shape == (3, 6)


def test_word_anchors_cover_novel_combinations_of_known_words() -> None:
    torch.manual_seed(0)
    names = ["red striped triangle", "blue dotted circle", "blue striped circle", "green dotted circle"]
    anchors = SemanticAnchors(6, mode="words", embed_dim=4, proto_weight=0.5, word_vocab_size=16)
    vocab = anchors.set_class_words(names, train_class_ids=[0, 1])
    assert vocab == ["blue", "circle", "dotted", "red", "striped", "triangle"]
    protos = torch.randn(3, 6)
    unit = protos / protos.norm(dim=1, keepdim=True)
    out = anchors(protos, torch.tensor([2, 3, 0]))  # novel known-word class, class with unknown 'green', train class
    table = anchors.word_embedding.weight.detach()

    def fused(word_ids: list[int], p: torch.Tensor) -> torch.Tensor:
        sem = anchors.proj(table[word_ids].mean(0)).detach()
        v = 0.5 * sem / sem.norm() + 0.5 * p
        return v / v.norm()

    assert torch.allclose(out[0], fused([0, 4, 1], unit[0]), atol=1e-6)  # blue striped circle
    assert torch.allclose(out[1], unit[1])  # 'green' never seen: prototype only
    assert torch.allclose(out[2], fused([3, 4, 5], unit[2]), atol=1e-6)
    with pytest.raises(ValueError, match="WORD_VOCAB_SIZE"):
        SemanticAnchors(6, mode="words", embed_dim=4, word_vocab_size=2).set_class_words(names, [0, 1])


def test_anchor_mode_fallback_is_logged_or_an_error(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert resolve_anchor_mode("text", "", "learned") == "learned"
    assert "MODEL.CLIP_WEIGHTS is empty" in caplog.text and "learned" in caplog.text
    assert resolve_anchor_mode("text", "/some/clip.pt", "prototype") == "text"
    with pytest.raises(FileNotFoundError, match="ANCHOR_FALLBACK"):
        resolve_anchor_mode("text", "", "error")


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_text_anchors_from_a_local_tiny_clip_with_disk_cache(tmp_path, monkeypatch) -> None:
    import open_clip

    import modeling.module.semantic_anchors as sa

    cfg_file = tmp_path / "tiny_clip.json"
    cfg_file.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP).eval()
    weights = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), weights)  # open_clip's default activation, GELU; the file cannot say so
    names = ["red striped triangle", "blue dotted circle"]
    emb = encode_class_names(names, str(cfg_file), str(weights), "a photo of a {}.", tmp_path / "cache",
                             activation="gelu")
    with torch.no_grad():
        ref = clip.encode_text(open_clip.tokenize([f"a photo of a {n}." for n in names]))
    ref = ref / ref.norm(dim=1, keepdim=True)
    assert emb.shape == (2, 16) and torch.allclose(emb, ref, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("clip_text_*.pt"))) == 1
    # cached: the text tower is not loaded again for known names
    monkeypatch.setattr(sa, "load_clip_text_encoder", lambda *a, **k: pytest.fail("text tower reloaded"))
    again = encode_class_names(list(reversed(names)), str(cfg_file), str(weights), "a photo of a {}.",
                               tmp_path / "cache", activation="gelu")
    assert torch.equal(again, emb.flip(0))
    monkeypatch.undo()
    # another template is another cache entry
    encode_class_names(names, str(cfg_file), str(weights), "{}", tmp_path / "cache", activation="gelu")
    assert len(list((tmp_path / "cache").glob("clip_text_*.pt"))) == 2
    with pytest.raises(FileNotFoundError, match="CLIP_WEIGHTS"):
        encode_class_names(["x"], str(cfg_file), str(tmp_path / "missing.pt"), "{}", tmp_path / "c2")
