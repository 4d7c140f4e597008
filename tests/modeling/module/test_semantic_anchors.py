"""SemanticAnchors: prototype / learned / text / word anchors and their fusion, the mode fallback, CLIP text
embeddings from a local tiny CLIP with the disk cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from modeling.module.semantic_anchors import SemanticAnchors, encode_class_names, resolve_anchor_mode


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
    assert "MODEL.CLIP_WEIGHTS and MODEL.SAP.TEXT_TOWER are empty" in caplog.text and "learned" in caplog.text
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
