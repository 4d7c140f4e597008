"""Batch samplers: P x K identities for ReID, N-way K-shot episodes, seeded shuffling for pre-training.

All three are batch samplers (they yield lists of dataset indices; pass them as
``DataLoader(batch_sampler=...)``), are deterministic given ``seed`` and the epoch set with
``set_epoch``, and are DDP-aware: ``rank`` / ``world_size`` default to the process group
(``utils.distributed``); every rank gets a disjoint share and the same number of batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from utils.distributed import get_rank, get_world_size


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    world_size = get_world_size() if world_size is None else int(world_size)
    rank = get_rank() if rank is None else int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class RandomIdentitySampler(Sampler[list[int]]):
    """P x K batches: ``P = batch_size // num_instances`` identities, ``K = num_instances`` images each.

    Per epoch (seeded by ``(seed, epoch)``): the identities are shuffled and dealt into
    ``world_size`` disjoint, near-equal shares, one per rank. Within its share a rank cuts
    every identity's shuffled images into chunks of K (an identity with fewer than K images
    is sampled with replacement to K, as in the public RandomIdentitySampler) and fills
    batches with P chunks of P distinct identities drawn at random among those with chunks
    left. When fewer than P identities have chunks left, ``redeal=True`` deals the chunks anew
    and goes on: every rank yields exactly ``len(self)`` batches, ``total_chunks // (P *
    world_size)``, so one epoch covers each image about once across all ranks. ``redeal=False``
    ends the epoch there, as the public sampler of DeMo / TransReID does: the leftover chunks
    are not trained on and the epoch's length depends on its draw (:meth:`epoch_length`; under
    DDP every rank stops at the shortest rank's length).

    Args:
        pids: identity of each dataset index (e.g. ``[pid for _, pid, _, _ in data.train]``).
        batch_size: images per batch **on this rank** (P x K).
        num_instances: K, images per identity in a batch (``DATALOADER.NUM_INSTANCE``).
        seed: base seed shared by all ranks.
        rank, world_size: defaults from ``utils.distributed``.
        redeal: deal the chunks anew when fewer than P identities have some left (fixed epoch length).
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        num_instances: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        redeal: bool = True,
    ) -> None:
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})"
            )
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.seed = int(seed)
        self.epoch = 0
        self.redeal = bool(redeal)
        self._lengths: dict[int, int] = {}  # epoch -> batches, without redealing
        index: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            index[int(pid)].append(i)
        if not index:
            raise ValueError("RandomIdentitySampler: the dataset is empty")
        self.index = dict(sorted(index.items()))
        self.pids = list(self.index)
        need = self.num_pids_per_batch * self.world_size
        if len(self.pids) < need:
            raise ValueError(
                f"RandomIdentitySampler: {len(self.pids)} identities cannot fill P={self.num_pids_per_batch} "
                f"distinct identities per batch on each of {self.world_size} rank(s) (need >= {need}); "
                "lower the batch size or raise DATALOADER.NUM_INSTANCE"
            )
        total_chunks = sum(max(len(v), num_instances) // num_instances for v in self.index.values())
        self._length = max(1, total_chunks // (self.num_pids_per_batch * self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """Reseed for ``epoch`` (call before iterating, on every rank, like DistributedSampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.epoch_length(self.epoch)

    def epoch_length(self, epoch: int) -> int:
        """Batches every rank yields in ``epoch``."""
        if self.redeal:
            return self._length
        if epoch not in self._lengths:
            self._lengths[epoch] = min(len(self._until_exhausted(epoch, r)) for r in range(self.world_size))
        return self._lengths[epoch]

    def share(self, rank: int, epoch: int | None = None) -> list[int]:
        """The identities of ``rank`` in ``epoch`` (default: the current one; disjoint across ranks)."""
        epoch = self.epoch if epoch is None else epoch
        order = np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.pids))
        return sorted(self.pids[i] for i in order[rank:: self.world_size])

    def _chunks(self, pids: Sequence[int], rng: np.random.Generator) -> dict[int, list[list[int]]]:
        k = self.num_instances
        chunks: dict[int, list[list[int]]] = {}
        for pid in pids:
            idxs = np.asarray(self.index[pid])
            idxs = rng.choice(idxs, size=k, replace=True) if len(idxs) < k else rng.permutation(idxs)
            n = len(idxs) // k
            chunks[pid] = [idxs[j * k:(j + 1) * k].tolist() for j in range(n)]
        return chunks

    def _choose(self, avail: Sequence[int], chunks: dict[int, list[list[int]]], rng: np.random.Generator) -> list[int]:
        """One batch: a chunk of each of P distinct identities drawn from ``avail``."""
        batch: list[int] = []
        for c in rng.choice(len(avail), size=self.num_pids_per_batch, replace=False):
            batch += chunks[avail[c]].pop()
        return batch

    def _until_exhausted(self, epoch: int, rank: int) -> list[list[int]]:
        """``rank``'s batches of ``epoch`` without redealing: until fewer than P identities have chunks left."""
        share = self.share(rank, epoch)
        rng = np.random.default_rng([self.seed, epoch, 11, rank])
        chunks = self._chunks(share, rng)
        batches = []
        while len(avail := [p for p in share if chunks[p]]) >= self.num_pids_per_batch:
            batches.append(self._choose(avail, chunks, rng))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        if not self.redeal:
            yield from self._until_exhausted(self.epoch, self.rank)[:len(self)]
            return
        share = self.share(self.rank)
        rng = np.random.default_rng([self.seed, self.epoch, 11, self.rank])
        chunks = self._chunks(share, rng)
        for _ in range(self._length):
            avail = [p for p in share if chunks[p]]
            if len(avail) < self.num_pids_per_batch:
                chunks = self._chunks(share, rng)
                avail = list(share)
            yield self._choose(avail, chunks, rng)


class EpisodeSampler(Sampler[list[int]]):
    """N-way K-shot Q-query episodes over any labelled dataset (model: easyfsl's TaskSampler).

    Each episode is a batch of ``n_way * (k_shot + n_query)`` indices, class-major: for each
    of the N classes (drawn without replacement), K support then Q query indices (distinct
    images). Episode ``i`` is drawn from its own seed: ``(seed, i)`` when ``fixed`` (val/test:
    the same episodes every epoch and every run, whatever the number of ranks divides), else
    ``(seed, epoch, i)``. With several ranks, rank r takes episodes r, r+W, ... of the
    ``n_episodes`` (``n_episodes // world_size`` each).

    Args:
        labels: class of each dataset index (e.g. ``[lab for _, lab in data.splits['train']]``).
        n_way, k_shot, n_query: episode shape (``FEWSHOT.N_WAY/K_SHOT/N_QUERY``).
        n_episodes: episodes per epoch over all ranks.
        fixed: reproducible fixed episodes (validation / test).
    """

    def __init__(
        self,
        labels: Sequence[int],
        n_way: int,
        k_shot: int,
        n_query: int,
        n_episodes: int,
        *,
        seed: int = 0,
        fixed: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if n_way < 1 or k_shot < 1 or n_query < 0 or n_episodes < 1:
            raise ValueError(
                f"need n_way >= 1, k_shot >= 1, n_query >= 0, n_episodes >= 1; got {n_way}, {k_shot}, {n_query}, {n_episodes}"
            )
        self.rank, self.world_size = _rank_world(rank, world_size)
        if n_episodes < self.world_size:
            raise ValueError(f"n_episodes ({n_episodes}) must be >= world_size ({self.world_size})")
        self.n_way, self.k_shot, self.n_query, self.n_episodes = n_way, k_shot, n_query, n_episodes
        self.seed, self.fixed, self.epoch = int(seed), fixed, 0
        index: dict[int, list[int]] = defaultdict(list)
        for i, lab in enumerate(labels):
            index[int(lab)].append(i)
        if not index:
            raise ValueError("EpisodeSampler: the split is empty (no labelled image)")
        self.index = {k: np.asarray(v) for k, v in sorted(index.items())}
        self.classes = list(self.index)
        if len(self.classes) < n_way:
            raise ValueError(f"EpisodeSampler: the split has {len(self.classes)} classes, fewer than n_way={n_way}")
        need = k_shot + n_query
        small = {c: len(v) for c, v in self.index.items() if len(v) < need}
        if small:
            worst = min(small, key=small.get)
            raise ValueError(
                f"EpisodeSampler: {len(small)} class(es) have fewer than k_shot + n_query = {need} images "
                f"(class {worst} has {small[worst]}); lower K/Q or drop those classes"
            )

    def set_epoch(self, epoch: int) -> None:
        """Reseed training episodes for ``epoch`` (fixed episodes ignore it)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_episodes // self.world_size

    def episode(self, i: int) -> list[int]:
        """Indices of episode ``i`` of the current epoch (class-major, support before query)."""
        key = [self.seed, i] if self.fixed else [self.seed, self.epoch, i]
        rng = np.random.default_rng(key)
        chosen = rng.choice(len(self.classes), size=self.n_way, replace=False)
        out: list[int] = []
        for c in chosen:
            members = self.index[self.classes[c]]
            out += members[rng.choice(len(members), size=self.k_shot + self.n_query, replace=False)].tolist()
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for j in range(len(self)):
            yield self.episode(self.rank + j * self.world_size)


class ShuffledBatchSampler(Sampler[list[int]]):
    """Seeded shuffled batches over ``num_samples`` indices (few-shot pre-training, plain classification).

    Each epoch's permutation (seed, epoch) is shared by all ranks; rank r takes positions
    r, r+W, ... of it (wrapping around to pad up to a multiple of W), so ranks are disjoint
    (up to the padding) and equally long. ``drop_last`` drops a short last batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError("ShuffledBatchSampler: the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.drop_last, self.seed, self.epoch = shuffle, drop_last, int(seed), 0
        self.per_rank = -(-num_samples // self.world_size)
        if drop_last and self.per_rank < batch_size:
            raise ValueError(f"{self.per_rank} samples per rank cannot fill one batch of {batch_size} (drop_last)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        total = self.per_rank * self.world_size
        order = np.resize(order, total)  # wraps around to pad
        mine = order[self.rank:total:self.world_size].tolist()
        for b in range(len(self)):
            yield mine[b * self.batch_size:(b + 1) * self.batch_size]


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """Wrap a batch sampler so each index carries its own random seed: batches of ``(index, seed)``.

    The seed of the j-th sample of the b-th batch of an epoch is a function of ``(seed, epoch,
    rank, b, j)`` only, and the datasets run that sample's augmentation from it. So what a sample
    looks like does not depend on which loader worker draws it, how many workers there are, or what
    a worker drew before: a run resumed after epoch k, or run with another
    ``DATALOADER.NUM_WORKERS``, augments exactly as an uninterrupted one.
    """

    def __init__(self, batches: Sampler[list[int]], seed: int = 0) -> None:
        self.batches, self.seed = batches, int(seed)
        self.first, self.stop, self.start = 0, 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate one epoch; its first ``start`` batches are skipped (a run resumed in the middle of an epoch
        goes on with the batches it had not trained on)."""
        self.set_epochs(epoch, epoch + 1, start)

    def set_epochs(self, first: int, stop: int, start: int = 0) -> None:
        """Iterate epochs ``first`` to ``stop - 1`` back to back, the first from its batch ``start``.

        One loader iterator then runs through all of them, so its workers prepare the next epoch's first
        batches while the current epoch ends (its last steps, evaluation, checkpoint) instead of after.
        Each batch is the one ``set_epoch`` of its epoch gives.
        """
        if stop <= first or not 0 <= start <= self.batches_in_epoch(first):
            raise ValueError(f"no batches in epochs {first}..{stop - 1} from batch {start}")
        self.first, self.stop, self.start = int(first), int(stop), int(start)

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches in the whole of ``epoch`` (the steps of that training epoch)."""
        length = getattr(self.batches, "epoch_length", None)
        return length(epoch) if length is not None else len(self.batches)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one whole epoch, the first set (all of them where the epoch length is fixed)."""
        return self.batches_in_epoch(self.first)

    def __len__(self) -> int:
        return sum(self.batches_in_epoch(e) for e in range(self.first, self.stop)) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rank = int(getattr(self.batches, "rank", 0))
        for epoch in range(self.first, self.stop):
            self.batches.set_epoch(epoch)
            skip = self.start if epoch == self.first else 0
            for b, batch in enumerate(self.batches):
                if b < skip:
                    continue
                seeds = np.random.SeedSequence([self.seed, epoch, rank, b]).generate_state(len(batch), np.uint64)
                yield [(int(i), int(s)) for i, s in zip(batch, seeds)]
