"""A stand-in for CLIP's text tower on data sets whose class names are made of words (the synthetic set's
``red striped triangle``).

Like CLIP's text tower it is trained once, on other data than the episodes it will serve, and then frozen:
:mod:`engine.fewshot.text_tower` fits it to the training classes' names against the class features of a
pretrained image backbone (contrastive, as CLIP), writes it to a file, and SAP's ``text`` anchors read
class-name embeddings from it as they would from CLIP. A novel class named with words seen in training
("blue striped circle" after "blue dotted circle" and "red striped triangle") gets an embedding that knows
what its support images may not.

The tower: the mean of the name's word embeddings (unknown words are left out), then a two-layer MLP, then
unit norm: ``t(name) = normalize(W2 gelu(W1 mean_w e_w + b1) + b2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: what a tower file says it is
FILE_KIND = "name_tower"


def name_words(name: str) -> list[str]:
    """The words of a class name (lower case, ``_`` and spaces separate them)."""
    return name.lower().replace("_", " ").split()


def padded_word_ids(rows: Sequence[Sequence[int]], length: int, device: torch.device | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-id rows of different lengths as ids (C, length) padded with 0 and a mask (C, length) of the real ones."""
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for c, row in enumerate(rows):
        if row:
            ids[c, : len(row)] = torch.tensor(list(row))
            mask[c, : len(row)] = True
    return ids.to(device), mask.to(device)


class NameTower(nn.Module):
    """Class-name embeddings (C, E) from word embeddings.

    Args:
        vocabulary: the words it knows (those of the training classes' names).
        embed_dim: width E of the output (the joint space of names and image features).
        width: word-embedding width.
        hidden: the MLP's hidden width.
    """

    def __init__(self, vocabulary: Sequence[str], embed_dim: int = 128, width: int = 128, hidden: int = 256) -> None:
        super().__init__()
        if not vocabulary:
            raise ValueError("a name tower needs at least one word")
        self.vocabulary = list(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.embed_dim, self.width, self.hidden = int(embed_dim), int(width), int(hidden)
        self.word_embedding = nn.Embedding(len(self.vocabulary), self.width)
        nn.init.normal_(self.word_embedding.weight, std=self.width ** -0.5)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.hidden), nn.GELU(), nn.Linear(self.hidden, self.embed_dim))

    def tokenize(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids (C, L) and a mask (C, L) of the known words of each name (unknown words are masked out)."""
        words = [[self.index[w] for w in name_words(n) if w in self.index] for n in names]
        length = max(1, max((len(w) for w in words), default=1))
        return padded_word_ids(words, length, self.word_embedding.weight.device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (C, E) of tokenized names (C, L); a name with no known word gives a zero row."""
        emb = self.word_embedding(ids) * mask[..., None]
        mean = emb.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        out = F.normalize(self.mlp(mean), dim=-1)
        return out * mask.any(1, keepdim=True)

    @torch.no_grad()
    def encode(self, names: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings (C, E) of ``names`` on the CPU, in float32."""
        was_training = self.training
        self.eval()
        out = self(*self.tokenize(names)).float().cpu()
        self.train(was_training)
        return out

    def unknown_words(self, names: Sequence[str]) -> list[str]:
        """The words of ``names`` the tower does not know, sorted."""
        return sorted({w for n in names for w in name_words(n) if w not in self.index})

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (as a tower file keeps them)."""
        return {"vocabulary": self.vocabulary, "embed_dim": self.embed_dim, "width": self.width,
                "hidden": self.hidden}


def save_name_tower(tower: NameTower, handle: Any, extra: dict[str, Any] | None = None) -> None:
    """Write ``tower`` (its config and weights, plus ``extra``: the recipe, the measurements) to a file handle."""
    torch.save({"kind": FILE_KIND, "config": tower.config(), "state_dict": tower.state_dict(), **(extra or {})},
               handle)


def read_name_tower_file(path: str | Path) -> dict[str, Any]:
    """The contents of a tower file; ``ValueError`` when the file is not one."""
    data = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("kind") != FILE_KIND:
        raise ValueError(f"{path} is not a name-tower file (MODEL.SAP.TEXT_TOWER)")
    return data


def load_name_tower(path: str | Path) -> NameTower:
    """The frozen tower a file holds."""
    data = read_name_tower_file(path)
    tower = NameTower(**data["config"])
    tower.load_state_dict(data["state_dict"])
    tower.requires_grad_(False)
    return tower.eval()


def name_tower_embed_dim(path: str | Path) -> int:
    """The output width E of the tower in ``path``."""
    return int(read_name_tower_file(path)["config"]["embed_dim"])
