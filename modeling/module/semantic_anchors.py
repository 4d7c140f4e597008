"""SAP's class anchors: CLIP class-name text embeddings, learned class embeddings, or visual prototypes.

Three modes (``MODEL.SAP.ANCHOR_MODE``):

``text``
    class-name embeddings from an open_clip text tower (or, without CLIP weights, from the name tower of
    ``MODEL.SAP.TEXT_TOWER``: :mod:`modeling.module.name_tower`), prompt ``MODEL.SAP.PROMPT_TEMPLATE``
    (``"a photo of a {}."``). The tower is built with ``pretrained=None`` (nothing is ever
    downloaded) and its weights are read from the local file ``MODEL.CLIP_WEIGHTS`` (an
    OpenAI TorchScript archive such as ``ViT-B-16.pt``, an OpenAI or open_clip state dict, or
    ``.safetensors``) by :mod:`modeling.clip_checkpoint`, which decides the activation the tower
    is built with (QuickGELU for OpenAI's files; ``MODEL.CLIP_ACTIVATION``). Embeddings are
    computed once per class name by :func:`encode_class_names` and cached on disk (atomic
    write), keyed by the architecture, the weights file (path, size, mtime), the activation
    and the template. Without weights the mode falls
    back to ``MODEL.SAP.ANCHOR_FALLBACK`` (``prototype``, ``learned``, or ``error``), and the
    choice is logged (:func:`resolve_anchor_mode`): never a silently random text tower.
``learned``
    a trainable embedding per training class (global ids ``0..num_learned_classes-1``; the
    few-shot loaders number the train classes first). Classes without one (novel val/test
    classes) use their visual prototype alone.
``words``
    a trainable embedding per *word* of the class names (the vocabulary of the training
    classes' names); a class's semantic vector is the mean of its words' embeddings, so a novel
    class named with known words ("blue striped circle" after "blue dotted circle" and "red
    striped triangle") gets a semantic anchor. Classes with an unknown word use their prototype.
    A stand-in for the text tower on data sets with compositional names (the synthetic set).
``prototype``
    the episode's visual prototypes are the anchors.

Semantic vectors are projected to ``phy_dim`` (640) by a linear map and fused with the visual
prototype: ``anchor = normalize((1 - w) normalize(P e) + w normalize(proto))`` with
``w = MODEL.SAP.ANCHOR_PROTO_WEIGHT``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modeling.clip_checkpoint import (
    activation_name,
    inspect_clip_file,
    log_choice,
    read_clip_state_dict,
    resolve_quick_gelu,
)
from modeling.module.name_tower import padded_word_ids
from utils.io import atomic_write

logger = logging.getLogger(__name__)

ANCHOR_MODES = ("text", "learned", "words", "prototype")
ANCHOR_FALLBACKS = ("prototype", "learned", "error")
TEXT_BATCH = 256


def resolve_anchor_mode(mode: str, clip_weights: str, fallback: str = "prototype", text_tower: str = "") -> str:
    """The anchor mode actually used: ``text`` needs ``clip_weights`` (CLIP) or ``text_tower`` (a name-tower file,
    :mod:`modeling.module.name_tower`); else ``fallback`` (logged) or an error."""
    if mode not in ANCHOR_MODES:
        raise ValueError(f"MODEL.SAP.ANCHOR_MODE must be one of {ANCHOR_MODES}, got {mode!r}")
    if fallback not in ANCHOR_FALLBACKS:
        raise ValueError(f"MODEL.SAP.ANCHOR_FALLBACK must be one of {ANCHOR_FALLBACKS}, got {fallback!r}")
    if mode != "text":
        logger.info("SAP anchors: %s (MODEL.SAP.ANCHOR_MODE)", mode)
        return mode
    if clip_weights:
        logger.info("SAP anchors: CLIP text embeddings from %s", clip_weights)
        return "text"
    if text_tower:
        logger.info("SAP anchors: class-name embeddings from the name tower %s (MODEL.SAP.TEXT_TOWER)", text_tower)
        return "text"
    if fallback == "error":
        raise FileNotFoundError(
            "MODEL.SAP.ANCHOR_MODE is 'text' but MODEL.CLIP_WEIGHTS and MODEL.SAP.TEXT_TOWER are empty: give a local "
            "CLIP weights file or a name tower, or set MODEL.SAP.ANCHOR_FALLBACK to 'prototype' or 'learned' (no "
            "weights are downloaded)"
        )
    logger.warning("SAP anchors: MODEL.CLIP_WEIGHTS and MODEL.SAP.TEXT_TOWER are empty, so no text tower; using "
                   "'%s' anchors instead (MODEL.SAP.ANCHOR_FALLBACK)", fallback)
    return fallback


# ---------------------------------------------------------------------------------------------
# The CLIP text tower (local weights only) and the on-disk embedding cache
# ---------------------------------------------------------------------------------------------
def clip_model_config(clip_model: str) -> dict:
    """open_clip model config of ``clip_model``: a built-in name (``ViT-B-16``) or a ``.json`` file."""
    if clip_model.endswith(".json"):
        data = json.loads(Path(clip_model).expanduser().read_text())
        return data.get("model_cfg", data)
    import open_clip

    cfg = open_clip.get_model_config(clip_model)
    if cfg is None:
        raise ValueError(f"MODEL.SAP.CLIP_MODEL '{clip_model}' is not an open_clip architecture "
                         f"(e.g. ViT-B-16) nor a .json model config")
    return cfg


def clip_embed_dim(clip_model: str) -> int:
    """Text-embedding width of a CLIP architecture (512 for ViT-B-16), read from its config."""
    return int(clip_model_config(clip_model)["embed_dim"])


def load_clip_text_encoder(clip_model: str, weights: str, activation: str = "auto") -> tuple[nn.Module, object]:
    """Build the CLIP model with random init, load ``weights`` from disk; return ``(model, tokenizer)``.

    The activation follows the file (OpenAI's formats: QuickGELU) unless ``activation``
    (``MODEL.CLIP_ACTIVATION``) names one. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` when the file lacks text-tower tensors. Never downloads: ``pretrained=None``.
    """
    import open_clip

    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MODEL.CLIP_WEIGHTS: file not found: {path}")
    info = inspect_clip_file(path)
    quick_gelu = resolve_quick_gelu(activation, info)
    cfg = clip_model_config(clip_model)
    if clip_model.endswith(".json"):
        model = open_clip.CLIP(**{**cfg, "quick_gelu": quick_gelu})
    else:
        model = open_clip.create_model(clip_model, pretrained=None, pretrained_image=False, pretrained_text=False,
                                       quick_gelu=quick_gelu)
    result = model.load_state_dict(read_clip_state_dict(path), strict=False)
    text_missing = [k for k in result.missing_keys if not k.startswith("visual.")]
    if text_missing:
        raise ValueError(f"MODEL.CLIP_WEIGHTS {path} does not fit the text tower of {clip_model}: missing "
                         f"{', '.join(text_missing[:5])}{' ...' if len(text_missing) > 5 else ''}")
    context_length = int(cfg.get("text_cfg", {}).get("context_length", 77))
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    model.eval()
    log_choice(logger, "text tower", clip_model, info, quick_gelu, activation)
    return model, tokenizer


def embedding_cache_file(cache_dir: str | Path, clip_model: str, weights: str, template: str,
                         quick_gelu: bool = True) -> Path:
    """Cache file of one (architecture, weights file, activation, template): the key hashes all four."""
    path = Path(weights).expanduser()
    st = path.stat()
    ident = json.dumps([clip_model, str(path.resolve()), st.st_size, st.st_mtime_ns, activation_name(quick_gelu),
                        template])
    return Path(cache_dir) / f"clip_text_{hashlib.sha1(ident.encode()).hexdigest()[:16]}.pt"


def encode_class_names(
    class_names: Sequence[str],
    clip_model: str,
    weights: str,
    template: str = "a photo of a {}.",
    cache_dir: str | Path = "outputs/cache/semantic_anchors",
    activation: str = "auto",
) -> torch.Tensor:
    """Unit-norm text embeddings (C, E) of ``template.format(name)`` for each class name.

    ``activation`` is ``MODEL.CLIP_ACTIVATION`` (``auto``: from the file, see
    :mod:`modeling.clip_checkpoint`). Names already in the cache file are not re-encoded; new
    ones are added and the file is rewritten atomically. The text tower is only loaded when
    some name is missing.
    """
    if "{}" not in template:
        raise ValueError(f"MODEL.SAP.PROMPT_TEMPLATE must contain '{{}}', got {template!r}")
    if not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"MODEL.CLIP_WEIGHTS: file not found: {Path(weights).expanduser()}")
    quick_gelu = resolve_quick_gelu(activation, inspect_clip_file(weights))
    cache_file = embedding_cache_file(cache_dir, clip_model, weights, template, quick_gelu)
    cache: dict[str, torch.Tensor] = {}
    if cache_file.is_file():
        try:
            cache = torch.load(cache_file, map_location="cpu", weights_only=True)["embeddings"]
        except Exception as err:
            logger.warning("anchor cache %s unreadable (%s); recomputing", cache_file, err)
            cache = {}
    missing = sorted({n for n in class_names if n not in cache})
    if missing:
        model, tokenizer = load_clip_text_encoder(clip_model, weights, activation)
        with torch.no_grad():
            for start in range(0, len(missing), TEXT_BATCH):
                names = missing[start:start + TEXT_BATCH]
                tokens = tokenizer([template.format(n) for n in names])
                emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
                cache.update({n: e.clone() for n, e in zip(names, emb)})
        payload = {"clip_model": clip_model, "weights": str(weights), "activation": activation_name(quick_gelu),
                   "template": template, "embeddings": cache}
        atomic_write(cache_file, lambda handle: torch.save(payload, handle))
        logger.info("encoded %d class names with CLIP (%d cached in %s)", len(missing), len(cache), cache_file)
    return torch.stack([cache[n] for n in class_names])


# ---------------------------------------------------------------------------------------------
# The anchors module
# ---------------------------------------------------------------------------------------------
class SemanticAnchors(nn.Module):
    """Builds the episode's N anchors (N, phy_dim) from class ids and visual prototypes.

    Args:
        phy_dim: visual feature dimension D.
        mode: ``text`` | ``learned`` | ``prototype`` (already resolved, see :func:`resolve_anchor_mode`).
        embed_dim: width E of the semantic vectors (CLIP: 512).
        num_learned_classes: number of learned class embeddings (``learned`` mode).
        proto_weight: weight ``w`` of the visual prototype in the fused anchor.
    """

    def __init__(self, phy_dim: int, mode: str = "prototype", embed_dim: int = 512,
                 num_learned_classes: int = 64, proto_weight: float = 0.5, word_vocab_size: int = 1024) -> None:
        super().__init__()
        if mode not in ANCHOR_MODES:
            raise ValueError(f"anchor mode must be one of {ANCHOR_MODES}, got {mode!r}")
        if not 0.0 <= proto_weight <= 1.0:
            raise ValueError(f"MODEL.SAP.ANCHOR_PROTO_WEIGHT must be in [0, 1], got {proto_weight}")
        self.mode = mode
        self.proto_weight = float(proto_weight)
        self.embed_dim = int(embed_dim)
        if mode == "learned":
            self.class_embedding = nn.Embedding(num_learned_classes, embed_dim)
            nn.init.normal_(self.class_embedding.weight, std=embed_dim**-0.5)
        if mode == "words":
            self.word_embedding = nn.Embedding(word_vocab_size, embed_dim)
            nn.init.normal_(self.word_embedding.weight, std=embed_dim**-0.5)
        if mode in ("text", "learned", "words"):
            self.proj = nn.Linear(embed_dim, phy_dim)
        # text embeddings of every class of the dataset (C, E): set by the trainer, not saved
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)
        # words mode: word ids (C, L) of every class name and their mask; set by the trainer, not saved
        self.register_buffer("class_words", torch.zeros(0, 1, dtype=torch.long), persistent=False)
        self.register_buffer("class_word_mask", torch.zeros(0, 1, dtype=torch.bool), persistent=False)
        self.vocabulary: list[str] = []

    def set_class_embeddings(self, embeddings: torch.Tensor) -> None:
        """Install text embeddings (C, E) indexed by global class id (``text`` mode)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"expected text embeddings (C, {self.embed_dim}), got {tuple(embeddings.shape)}")
        self.text_embeddings = embeddings.detach().to(self.text_embeddings.device, torch.float32)

    def set_class_words(self, class_names: Sequence[str], train_class_ids: Sequence[int]) -> list[str]:
        """``words`` mode: the vocabulary is the sorted set of words of the training classes' names;
        every class name (C of them) becomes a row of word ids. Returns the vocabulary."""
        words = [name.lower().split() for name in class_names]
        vocab = sorted({w for c in set(train_class_ids) for w in words[c]})
        if len(vocab) > self.word_embedding.num_embeddings:
            raise ValueError(f"{len(vocab)} distinct words in the training class names exceed "
                             f"MODEL.SAP.WORD_VOCAB_SIZE = {self.word_embedding.num_embeddings}")
        index = {w: i for i, w in enumerate(vocab)}
        # a class with an unknown word gets no semantic anchor
        rows = [[index[w] for w in ws] if ws and all(w in index for w in ws) else [] for ws in words]
        ids, mask = padded_word_ids(rows, max(1, max(len(w) for w in words)), self.word_embedding.weight.device)
        self.class_words, self.class_word_mask, self.vocabulary = ids, mask, vocab
        return vocab

    def semantic(self, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantic vectors (N, E) of global ``class_ids`` (N,) and a mask (N,) of the classes that have one."""
        if self.mode == "text":
            if self.text_embeddings.shape[0] == 0:
                raise RuntimeError("SAP text anchors: no class embeddings installed; the trainer must call "
                                   "set_class_embeddings(encode_class_names(...)) first")
            if int(class_ids.max()) >= self.text_embeddings.shape[0]:
                raise IndexError(f"class id {int(class_ids.max())} has no text embedding "
                                 f"({self.text_embeddings.shape[0]} classes installed)")
            mask = torch.ones_like(class_ids, dtype=torch.bool)
            return self.text_embeddings[class_ids], mask
        if self.mode == "words":
            if self.class_words.shape[0] == 0:
                raise RuntimeError("SAP word anchors: no class names installed; the trainer must call "
                                   "set_class_words(class_names, train_class_ids) first")
            words, wmask = self.class_words[class_ids], self.class_word_mask[class_ids]  # (N, L)
            emb = self.word_embedding(words) * wmask[..., None]
            mean = emb.sum(1) / wmask.sum(1, keepdim=True).clamp_min(1)
            return mean, wmask.any(1)
        table = self.class_embedding.weight
        mask = class_ids < table.shape[0]
        return table[class_ids.clamp(max=table.shape[0] - 1)], mask

    def forward(self, prototypes: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Anchors (N, D) from prototypes (N, D) and global class ids (N,) (None: prototypes only)."""
        proto_unit = F.normalize(prototypes, dim=-1)
        if self.mode == "prototype" or class_ids is None:
            return proto_unit
        sem, has_sem = self.semantic(class_ids.to(prototypes.device))
        sem_unit = F.normalize(self.proj(sem.to(self.proj.weight.dtype)), dim=-1).to(proto_unit.dtype)
        fused = F.normalize((1.0 - self.proto_weight) * sem_unit + self.proto_weight * proto_unit, dim=-1)
        return torch.where(has_sem[:, None], fused, proto_unit)
