"""DataLoader builders with defaults that keep a GPU fed.

``num_workers`` defaults to the CPUs this process may use divided by the local ranks (at
most 8), ``pin_memory`` to CUDA being available, ``persistent_workers`` on and
``prefetch_factor`` 4 whenever workers are used; the shuffling generator is seeded so
augmentation draws are reproducible. Workers ignore the signals that stop a run
(:data:`STOP_SIGNALS`, :class:`SignalSafeLoader`): the main process decides when to stop and ends its
workers itself.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from datasets.bases import FewShotItem, ReIDItem
from datasets.image_datasets import (
    EpisodeCollate,
    FewShotImageDataset,
    ReIDImageDataset,
    fewshot_collate,
    reid_collate,
)
from datasets.image_io import ArrayStore
from datasets.samplers import EpisodeSampler, RandomIdentitySampler, SeededBatches, ShuffledBatchSampler
from datasets.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    MINI_IMAGENET_MEAN,
    MINI_IMAGENET_STD,
    build_fewshot_transform,
    build_reid_transform,
)
from utils.distributed import get_world_size
from utils.signals import STOP_SIGNALS  # noqa: F401  (importable from here too)

logger = logging.getLogger(__name__)

def ignore_stop_signals(worker_id: int, main_pid: int | None = None) -> None:
    """A loader worker's init function: ignore :data:`STOP_SIGNALS` unless the main process sent them.

    A cluster signals the whole process group; a worker killed by it made the main process fail
    ("DataLoader worker ... is killed by signal") before it could write its checkpoint. The main process
    decides instead: it finishes its step, stops and shuts its workers down. SIGINT and SIGUSR1 are
    ignored. SIGTERM stays blocked, read by a thread that ends the worker when ``main_pid`` sent it, as
    PyTorch's own handler does (PyTorch ends a stuck worker, and multiprocessing a live one at exit, that
    way), and drops it otherwise; without ``signal.sigwaitinfo`` (not Linux) SIGTERM keeps PyTorch's
    handling. The others :class:`SignalSafeLoader` started the worker with blocked are unblocked (one that
    arrived meanwhile is discarded).

    ``main_pid``: the main process (default: the worker's parent, which it is unless a fork server started
    it). ``worker_id`` is unused.
    """
    waited = [signal.SIGTERM] if hasattr(signal, "sigwaitinfo") else []
    for sig in STOP_SIGNALS:
        if sig not in waited:
            signal.signal(sig, signal.SIG_IGN)  # also discards one that arrived while blocked
    if waited:
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)  # before the thread starts: it inherits the mask
        main = os.getppid() if main_pid is None else main_pid
        threading.Thread(target=_end_on_sigterm_from, args=(main,), name="sigterm_from_main",
                         daemon=True).start()
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig for sig in STOP_SIGNALS if sig not in waited])


def _end_on_sigterm_from(main_pid: int) -> None:
    """Take the worker's (blocked) SIGTERMs one by one: exit when ``main_pid`` sent it, as PyTorch's own
    worker handler does; drop it when anyone else did (a signal to the whole process group)."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == main_pid:
            os._exit(0)


class SignalSafeLoader(DataLoader):
    """A :class:`DataLoader` whose workers start with :data:`STOP_SIGNALS` blocked.

    A worker installs PyTorch's SIGTERM handler (die unless the main process sent it) before its init
    function runs; a signal to the process group in that moment would still kill it. A child starts with
    its parent's signal mask, so blocked while the workers start, such a signal waits in the worker until
    :func:`ignore_stop_signals` discards it, and in the main process until its workers have started.
    """

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super().__iter__()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def default_num_workers(world_size: int | None = None, cap: int = 8) -> int:
    """CPUs available to this process, shared among the ranks of one node, at most ``cap``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size if world_size is not None else get_world_size()))
    return max(1, min(cap, cpus // max(1, local)))


def _loader_kwargs(num_workers: int | None, pin_memory: bool | None, persistent_workers: bool,
                   prefetch_factor: int, seed: int) -> dict:
    workers = default_num_workers() if num_workers is None else int(num_workers)
    kwargs: dict = dict(
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=torch.Generator().manual_seed(int(seed)),
    )
    if workers > 0:
        kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                      worker_init_fn=functools.partial(ignore_stop_signals, main_pid=os.getpid()))
    return kwargs


def build_reid_train_loader(
    items: Sequence[ReIDItem],
    *,
    batch_size: int = 64,
    num_instance: int = 8,
    size: Sequence[int] = (256, 128),
    flip_prob: float = 0.5,
    padding: int = 10,
    re_prob: float = 0.5,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    skip_corrupt: bool = False,
    seed: int = 0,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    prefetch_factor: int = 4,
    rank: int | None = None,
    world_size: int | None = None,
    per_modality: bool = False,
    redeal_leftovers: bool = True,
) -> DataLoader:
    """P x K training loader over ``items`` (``data.train``).

    ``batch_size`` is the **global** batch (``SOLVER.IMS_PER_BATCH``); each of the
    ``world_size`` ranks gets ``batch_size // world_size`` images per step, as
    ``P = that // num_instance`` identities x ``num_instance`` images. Batches are
    ``(images {m: (B, 3, H, W)}, pids (B,), camids (B,), trackids (B,), masks (B, M))``.
    Call ``loader.batch_sampler.set_epoch(epoch)`` each epoch. ``per_modality`` draws each modality's
    augmentation on its own; ``redeal_leftovers`` False ends an epoch when fewer than P identities have
    images left (:class:`datasets.samplers.RandomIdentitySampler`).
    """
    ws = get_world_size() if world_size is None else world_size
    if batch_size % ws:
        raise ValueError(f"global batch size {batch_size} is not divisible by world_size {ws}")
    pids = [it[1] for it in items]
    warn_small_identities(pids, num_instance)
    sampler = SeededBatches(RandomIdentitySampler(pids, batch_size // ws, num_instance, seed=seed, rank=rank,
                                                  world_size=ws, redeal=redeal_leftovers), seed=seed)
    transform = build_reid_transform(size, train=True, flip_prob=flip_prob, padding=padding, re_prob=re_prob,
                                     mean=mean, std=std, per_modality=per_modality)
    dataset = ReIDImageDataset(items, transform, skip_corrupt=skip_corrupt)
    return SignalSafeLoader(dataset, batch_sampler=sampler, collate_fn=reid_collate,
                            **_loader_kwargs(num_workers, pin_memory, persistent_workers, prefetch_factor,
                                             seed))


def build_reid_test_loader(
    items: Sequence[ReIDItem],
    *,
    batch_size: int = 128,
    size: Sequence[int] = (256, 128),
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    skip_corrupt: bool = False,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
    prefetch_factor: int = 4,
    interpolation: str = "bicubic",
) -> DataLoader:
    """Ordered evaluation loader over ``items`` (usually ``data.query + data.gallery``), no augmentation;
    images not of ``size`` are resized with ``interpolation``.

    Not sharded: every rank that evaluates sees all items in order (``TEST.IMS_PER_BATCH``).
    """
    transform = build_reid_transform(size, train=False, mean=mean, std=std, interpolation=interpolation)
    dataset = ReIDImageDataset(items, transform, skip_corrupt=skip_corrupt)
    sampler = ShuffledBatchSampler(len(dataset), batch_size, shuffle=False, drop_last=False, rank=0, world_size=1)
    return SignalSafeLoader(dataset, batch_sampler=sampler, collate_fn=reid_collate,
                            **_loader_kwargs(num_workers, pin_memory, persistent_workers, prefetch_factor, 0))


def build_fewshot_loader(
    items: Sequence[FewShotItem],
    *,
    mode: str = "episode",
    train: bool = True,
    arrays: ArrayStore | None = None,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 15,
    n_episodes: int = 100,
    fixed_episodes: bool | None = None,
    batch_size: int = 128,
    size: int = 84,
    augmentation: str = "pad_crop",
    resize_ratio: float = 1.0,
    mean: Sequence[float] = MINI_IMAGENET_MEAN,
    std: Sequence[float] = MINI_IMAGENET_STD,
    skip_corrupt: bool = False,
    seed: int = 0,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    prefetch_factor: int = 4,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """Few-shot loader over ``items`` (``data.splits[name]``).

    ``mode='episode'``: batches are episode dicts from :class:`EpisodeCollate` (``support``
    (N*K, 3, H, W), ``support_labels``, ``query`` (N*Q, 3, H, W), ``query_labels``,
    ``class_ids``); ``fixed_episodes`` defaults to ``not train`` (val/test episodes fixed by
    ``seed``). ``mode='batch'``: shuffled ``(images (B, 3, H, W), labels (B,))`` batches of
    ``batch_size`` per rank for pre-training (``drop_last`` when training). ``train``
    selects the augmenting transform. Pass ``arrays=data.arrays`` for pickle releases.
    """
    transform = build_fewshot_transform(size, train=train, augmentation=augmentation, resize_ratio=resize_ratio,
                                        mean=mean, std=std)
    dataset = FewShotImageDataset(items, transform, arrays=arrays, skip_corrupt=skip_corrupt)
    if mode == "episode":
        sampler = EpisodeSampler(dataset.labels, n_way, k_shot, n_query, n_episodes, seed=seed,
                                 fixed=(not train) if fixed_episodes is None else fixed_episodes,
                                 rank=rank, world_size=world_size)
        collate = EpisodeCollate(n_way, k_shot, n_query)
    elif mode == "batch":
        sampler = ShuffledBatchSampler(len(dataset), batch_size, shuffle=train, drop_last=train, seed=seed,
                                       rank=rank, world_size=world_size)
        collate = fewshot_collate
    else:
        raise ValueError(f"unknown few-shot loader mode '{mode}' (episode, batch)")
    if train:  # augmentation from each sample's own seed, whatever worker draws it
        sampler = SeededBatches(sampler, seed=seed)
    return SignalSafeLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                            **_loader_kwargs(num_workers, pin_memory, persistent_workers, prefetch_factor,
                                             seed))


# ---------------------------------------------------------------------------------------------
# The same loaders from a run's config (the keys each reads are named in its docstring)
# ---------------------------------------------------------------------------------------------
def config_workers(cfg: Any) -> int | None:
    """``DATALOADER.NUM_WORKERS``; ``-1`` means the CPUs available to this rank (:func:`default_num_workers`)."""
    n = int(cfg.DATALOADER.NUM_WORKERS)
    return None if n < 0 else n


def warn_small_identities(pids: Sequence[int], num_instance: int) -> list[int]:
    """Warn about training identities with fewer than ``num_instance`` images (the identity sampler
    repeats their images to fill K slots); returns those identities."""
    counts = Counter(int(p) for p in pids)
    small = sorted(p for p, n in counts.items() if n < num_instance)
    if small:
        fewest = min(counts[p] for p in small)
        logger.warning(
            "%d of %d training identities have fewer than DATALOADER.NUM_INSTANCE=%d images (fewest: %d; ids %s%s): "
            "their images are repeated within a batch to fill the %d slots; DATALOADER.NUM_INSTANCE %d avoids it",
            len(small), len(counts), num_instance, fewest, ", ".join(map(str, small[:8])),
            " ..." if len(small) > 8 else "", num_instance, fewest,
        )
    return small


def reid_train_loader(cfg: Any, items: Sequence[ReIDItem]) -> DataLoader:
    """P x K training loader: ``SOLVER.IMS_PER_BATCH``, ``DATALOADER.NUM_INSTANCE``, ``INPUT.*`` (size,
    flip, padding, erasing, normalisation, per-modality draws), ``DATASETS.SKIP_CORRUPT``, ``SEED``,
    ``DATALOADER.*`` (workers, prefetch, ``REDEAL_LEFTOVERS``)."""
    i = cfg.INPUT
    return build_reid_train_loader(
        items, batch_size=cfg.SOLVER.IMS_PER_BATCH, num_instance=cfg.DATALOADER.NUM_INSTANCE, size=i.SIZE_TRAIN,
        flip_prob=i.PROB, padding=i.PADDING, re_prob=i.RE_PROB, mean=i.PIXEL_MEAN, std=i.PIXEL_STD,
        skip_corrupt=cfg.DATASETS.SKIP_CORRUPT, seed=cfg.SEED, num_workers=config_workers(cfg),
        prefetch_factor=cfg.DATALOADER.PREFETCH_FACTOR, per_modality=i.AUGMENT_PER_MODALITY,
        redeal_leftovers=cfg.DATALOADER.REDEAL_LEFTOVERS,
    )


def reid_test_loader(cfg: Any, items: Sequence[ReIDItem]) -> DataLoader:
    """Evaluation loader: ``TEST.IMS_PER_BATCH``, ``INPUT.SIZE_TEST``, ``INPUT.PIXEL_MEAN/STD``,
    ``INPUT.TEST_INTERPOLATION``, ``DATASETS.SKIP_CORRUPT``, ``DATALOADER.NUM_WORKERS``."""
    i = cfg.INPUT
    return build_reid_test_loader(items, batch_size=cfg.TEST.IMS_PER_BATCH, size=i.SIZE_TEST, mean=i.PIXEL_MEAN,
                                  std=i.PIXEL_STD, skip_corrupt=cfg.DATASETS.SKIP_CORRUPT,
                                  num_workers=config_workers(cfg), interpolation=i.TEST_INTERPOLATION)


def fewshot_train_loader(cfg: Any, items: Sequence[FewShotItem], arrays: ArrayStore | None, stage: str) -> DataLoader:
    """Training loader of a few-shot stage: ``pretrain`` batches (``FEWSHOT.PRETRAIN.BATCH_SIZE``) or ``meta``
    episodes (``FEWSHOT.N_WAY``, ``K_SHOT``, ``N_QUERY``, ``EPISODES_PER_EPOCH``), at ``FEWSHOT.IMAGE_SIZE``."""
    fs = cfg.FEWSHOT
    common = dict(train=True, arrays=arrays, size=fs.IMAGE_SIZE, seed=cfg.SEED, num_workers=config_workers(cfg))
    if stage == "pretrain":
        return build_fewshot_loader(items, mode="batch", batch_size=fs.PRETRAIN.BATCH_SIZE, **common)
    return build_fewshot_loader(items, mode="episode", n_way=fs.N_WAY, k_shot=fs.K_SHOT, n_query=fs.N_QUERY,
                                n_episodes=fs.EPISODES_PER_EPOCH, **common)


def fewshot_eval_loader(cfg: Any, items: Sequence[FewShotItem], arrays: ArrayStore | None) -> DataLoader:
    """Deterministic batch loader (test transform, in order, every rank all items): ``TEST.IMS_PER_BATCH``,
    ``FEWSHOT.IMAGE_SIZE``."""
    return build_fewshot_loader(
        items, mode="batch", train=False, arrays=arrays, batch_size=cfg.TEST.IMS_PER_BATCH,
        size=cfg.FEWSHOT.IMAGE_SIZE, seed=cfg.SEED, num_workers=config_workers(cfg), persistent_workers=False,
        rank=0, world_size=1,
    )
