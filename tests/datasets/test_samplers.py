"""Samplers: P x K invariants and DDP sharding, N-way K-shot episodes, shuffled batches."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

from datasets import EpisodeSampler, RandomIdentitySampler, ShuffledBatchSampler


def reid_pids(num_ids: int = 24, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    pids = []
    for pid in range(num_ids):
        pids += [pid * 3 + 100] * int(rng.integers(2, 20))  # uneven, some ids below K
    return list(rng.permutation(pids))


def test_pk_batches_have_p_ids_times_k():
    pids = reid_pids()
    sampler = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=3, world_size=1, rank=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for b in batches:
        assert len(b) == 16
        counts = Counter(pids[i] for i in b)
        assert len(counts) == 4 and set(counts.values()) == {4}
    # an identity with fewer than K images is filled with replacement; otherwise images are distinct in a chunk
    for b in batches:
        for chunk in (b[j:j + 4] for j in range(0, 16, 4)):
            n_images = pids.count(pids[chunk[0]])
            if n_images >= 4:
                assert len(set(chunk)) == 4


def test_pk_epoch_length_matches_public_estimate():
    pids = reid_pids()
    sampler = RandomIdentitySampler(pids, batch_size=16, num_instances=4, world_size=1, rank=0)
    chunks = sum(max(c, 4) // 4 for c in Counter(pids).values())
    assert len(sampler) == chunks // 4


def test_pk_deterministic_given_seed_and_epoch():
    pids = reid_pids()
    a = RandomIdentitySampler(pids, 16, 4, seed=1, world_size=1, rank=0)
    b = RandomIdentitySampler(pids, 16, 4, seed=1, world_size=1, rank=0)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(RandomIdentitySampler(pids, 16, 4, seed=2, world_size=1, rank=0)) != list(b)


@pytest.mark.parametrize("world_size", [2, 3])
def test_pk_ranks_disjoint_and_equal_length(world_size):
    pids = reid_pids(num_ids=30)
    for epoch in (0, 5):
        samplers = [RandomIdentitySampler(pids, 8, 4, seed=0, rank=r, world_size=world_size)
                    for r in range(world_size)]
        seen = []
        for s in samplers:
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s) == len(samplers[0])
            ids = {pids[i] for b in batches for i in b}
            assert ids <= set(s.share(s.rank))
            seen.append(ids)
        for i in range(world_size):
            for j in range(i + 1, world_size):
                assert not seen[i] & seen[j]
        assert set().union(*(set(s.share(s.rank)) for s in samplers)) == set(pids)


def test_pk_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler([0, 1], batch_size=10, num_instances=4, world_size=1, rank=0)
    with pytest.raises(ValueError, match=r"3 identities cannot fill P=4"):
        RandomIdentitySampler([0, 1, 2], batch_size=16, num_instances=4, world_size=1, rank=0)
    with pytest.raises(ValueError, match=r"need >= 8"):
        RandomIdentitySampler(list(range(6)), batch_size=16, num_instances=4, world_size=2, rank=0)
    with pytest.raises(ValueError, match="empty"):
        RandomIdentitySampler([], batch_size=16, num_instances=4, world_size=1, rank=0)


def fewshot_labels(num_classes: int = 12, per_class: int = 25) -> list[int]:
    return list(np.random.default_rng(0).permutation(np.repeat(np.arange(num_classes) * 7, per_class)))


def test_episode_shapes_and_label_sets():
    labels = fewshot_labels()
    sampler = EpisodeSampler(labels, n_way=5, k_shot=2, n_query=3, n_episodes=20, seed=0, world_size=1, rank=0)
    episodes = list(sampler)
    assert len(episodes) == 20
    for ep in episodes:
        assert len(ep) == 5 * 5 and len(set(ep)) == 25
        per_class = [labels[i] for i in ep]
        blocks = [per_class[c * 5:(c + 1) * 5] for c in range(5)]
        assert all(len(set(b)) == 1 for b in blocks)  # class-major
        assert len({b[0] for b in blocks}) == 5  # N distinct classes


def test_fixed_episodes_reproducible_and_training_episodes_change():
    labels = fewshot_labels()
    fixed = EpisodeSampler(labels, 5, 1, 15, 10, seed=7, fixed=True, world_size=1, rank=0)
    first = list(fixed)
    fixed.set_epoch(3)
    assert list(fixed) == first
    assert list(EpisodeSampler(labels, 5, 1, 15, 10, seed=7, fixed=True, world_size=1, rank=0)) == first
    assert list(EpisodeSampler(labels, 5, 1, 15, 10, seed=8, fixed=True, world_size=1, rank=0)) != first
    train = EpisodeSampler(labels, 5, 1, 15, 10, seed=7, world_size=1, rank=0)
    e0 = list(train)
    train.set_epoch(1)
    assert list(train) != e0


def test_fixed_episodes_split_across_ranks():
    labels = fewshot_labels()
    whole = list(EpisodeSampler(labels, 5, 1, 5, 12, seed=0, fixed=True, world_size=1, rank=0))
    parts = [list(EpisodeSampler(labels, 5, 1, 5, 12, seed=0, fixed=True, world_size=3, rank=r)) for r in range(3)]
    assert all(len(p) == 4 for p in parts)
    assert sorted(map(tuple, (e for p in parts for e in p))) == sorted(map(tuple, whole))


def test_episode_errors():
    labels = fewshot_labels(num_classes=4, per_class=10)
    with pytest.raises(ValueError, match=r"4 classes, fewer than n_way=5"):
        EpisodeSampler(labels, 5, 1, 5, 10, world_size=1, rank=0)
    with pytest.raises(ValueError, match=r"fewer than k_shot \+ n_query = 16 images"):
        EpisodeSampler(labels, 3, 1, 15, 10, world_size=1, rank=0)
    with pytest.raises(ValueError, match="empty"):
        EpisodeSampler([], 3, 1, 15, 10, world_size=1, rank=0)


def test_shuffled_batches_cover_and_shard():
    parts = [list(ShuffledBatchSampler(50, 8, drop_last=False, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 4
    flat = [i for p in parts for b in p for i in b]
    assert set(flat) == set(range(50)) and len(flat) == 50
    s = ShuffledBatchSampler(50, 8, seed=1, world_size=1, rank=0)
    assert len(s) == 6 and all(len(b) == 8 for b in s)
    assert list(ShuffledBatchSampler(10, 4, shuffle=False, drop_last=False, world_size=1, rank=0)) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="empty"):
        ShuffledBatchSampler(0, 4, world_size=1, rank=0)


def test_seeded_batches_over_several_epochs_are_each_epochs_batches_in_turn() -> None:
    """``set_epochs(first, stop, start)`` yields what ``set_epoch`` gives for each of those epochs, back to back,
    the first from its batch ``start``; ``len`` counts them all."""
    from datasets.samplers import SeededBatches

    pids = [i // 4 for i in range(40)]  # 10 identities x 4 images
    batches = SeededBatches(RandomIdentitySampler(pids, 8, 2, seed=5, world_size=1, rank=0), seed=5)

    def epoch(e: int, start: int = 0) -> list[list[tuple[int, int]]]:
        batches.set_epoch(e, start=start)
        return list(batches)

    per_epoch = batches.batches_per_epoch
    want = epoch(2, start=1) + epoch(3) + epoch(4)
    assert len(want) == 3 * per_epoch - 1 and epoch(2) != epoch(3)
    batches.set_epochs(2, 5, start=1)
    assert len(batches) == len(want) and list(batches) == want
    assert batches.batches_per_epoch == per_epoch
    with pytest.raises(ValueError, match="no batches"):
        batches.set_epochs(3, 3)


def test_seeded_batches_give_each_sample_a_seed_of_its_place_alone() -> None:
    import torch

    from datasets.image_datasets import FewShotImageDataset
    from datasets.samplers import SeededBatches, ShuffledBatchSampler

    def keys(epoch: int) -> list[list[tuple[int, int]]]:
        batches = SeededBatches(ShuffledBatchSampler(10, 4, shuffle=True, drop_last=True, seed=3, rank=0,
                                                     world_size=1), seed=3)
        batches.set_epoch(epoch)
        return list(batches)

    first = keys(0)
    assert first == keys(0) and first != keys(1) and len(first) == 2 and all(len(b) == 4 for b in first)
    assert sorted(i for b in first for i, _ in b) == sorted({i for b in first for i, _ in b})  # no repeats
    assert len({s for b in first for _, s in b}) == 8  # a seed per sample

    class _Random(FewShotImageDataset):  # a "transform" that is one torch draw
        def _get(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.rand(2), index

    ds = _Random.__new__(_Random)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = ds[(5, 1234)]
    torch.manual_seed(99)  # whatever the process drew before, the sample is the same
    b = ds[(5, 1234)]
    assert torch.equal(a[0], b[0]) and a[1] == 5 and not torch.equal(ds[(5, 4321)][0], a[0])
    torch.manual_seed(0)
    ds[(5, 1234)]
    assert torch.equal(torch.get_rng_state(), before)  # the process's random state is left as it was


def test_identities_smaller_than_num_instance_are_named(caplog: pytest.LogCaptureFixture) -> None:
    from datasets.loader import warn_small_identities

    pids = [1] * 8 + [2] * 3 + [3] * 5 + [4] * 2
    with caplog.at_level(logging.WARNING, logger="datasets.loader"):
        assert warn_small_identities(pids, 4) == [2, 4]
    assert "2 of 4 training identities have fewer than DATALOADER.NUM_INSTANCE=4 images (fewest: 2; ids 2, 4)" \
        in caplog.text and "DATALOADER.NUM_INSTANCE 2 avoids it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datasets.loader"):
        assert warn_small_identities(pids, 2) == []
    assert caplog.text == ""


def _stop_rule_length(pids: list[int], p: int, k: int, rng: np.random.Generator) -> int:
    """DeMo's RandomIdentitySampler epoch, counted independently: chunk each id's shuffled images by K (fewer
    than K: one chunk), then take P distinct ids with chunks left until fewer than P remain."""
    left = {pid: max(c, k) // k for pid, c in Counter(pids).items()}
    batches = 0
    while len(avail := [pid for pid, n in left.items() if n]) >= p:
        for pid in rng.choice(avail, size=p, replace=False):
            left[pid] -= 1
        batches += 1
    return batches


def test_pk_without_redeal_ends_the_epoch_when_fewer_than_p_ids_are_left():
    pids = reid_pids(num_ids=24)
    redeal = RandomIdentitySampler(pids, 16, 4, seed=5, world_size=1, rank=0)
    demo = RandomIdentitySampler(pids, 16, 4, seed=5, world_size=1, rank=0, redeal=False)
    per_epoch = {}
    lengths = set()
    for epoch in range(6):
        demo.set_epoch(epoch)
        batches = list(demo)
        lengths.add(len(batches))
        assert len(batches) == len(demo) == demo.epoch_length(epoch) <= len(redeal)
        used = Counter(pids[b[j]] for b in batches for j in range(0, 16, 4))
        total = {pid: max(c, 4) // 4 for pid, c in Counter(pids).items()}
        assert all(used[pid] <= total[pid] for pid in used)  # no chunk dealt twice
        left = [pid for pid in total if used[pid] < total[pid]]
        assert len(left) < 4  # it stopped only when fewer than P ids had chunks left
        per_epoch[epoch] = len(batches)
    assert len(lengths) > 1  # the length follows the draw
    # the expected length agrees with an independent count of the same rule
    expected = np.mean([_stop_rule_length(pids, 4, 4, np.random.default_rng(s)) for s in range(200)])
    assert abs(np.mean(list(per_epoch.values())) - expected) < 2.0


@pytest.mark.parametrize("world_size", [2, 3])
def test_pk_without_redeal_gives_every_rank_the_same_length(world_size):
    pids = reid_pids(num_ids=40)
    ranks = [RandomIdentitySampler(pids, 8, 4, seed=2, world_size=world_size, rank=r, redeal=False)
             for r in range(world_size)]
    for epoch in range(3):
        for s in ranks:
            s.set_epoch(epoch)
        assert len({len(list(s)) for s in ranks}) == 1


def test_seeded_batches_follow_a_varying_epoch_length():
    from datasets.samplers import SeededBatches

    pids = reid_pids(num_ids=24)
    inner = RandomIdentitySampler(pids, 16, 4, seed=5, world_size=1, rank=0, redeal=False)
    seeded = SeededBatches(inner, seed=1)
    seeded.set_epochs(0, 4, start=1)
    lengths = [inner.epoch_length(e) for e in range(4)]
    assert [seeded.batches_in_epoch(e) for e in range(4)] == lengths
    assert len(seeded) == len(list(seeded)) == sum(lengths) - 1
