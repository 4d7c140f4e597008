"""The device prefetcher hands out the loader's batches, moved to the device, in order, whatever the path."""

from __future__ import annotations

import pytest
import torch

from engine.prefetch import DevicePrefetcher


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"images": {"RGB": torch.randn(2, 3, 4, 4, generator=g)}, "pids": torch.tensor([i, i])}
            for i in range(n)]


def _equal(a: dict, b: dict) -> bool:
    return torch.equal(a["images"]["RGB"].cpu(), b["images"]["RGB"]) and torch.equal(a["pids"].cpu(), b["pids"])


@pytest.mark.parametrize("n", [0, 1, 3])
def test_cpu_moves_each_batch_when_used(n: int) -> None:
    moved = []

    def to_device(batch: dict) -> dict:
        moved.append(int(batch["pids"][0]))
        return batch

    batches = _batches(n)
    prefetcher = DevicePrefetcher(batches, to_device, torch.device("cpu"))
    assert len(prefetcher) == n and not prefetcher.enabled
    for k, batch in enumerate(prefetcher):
        assert moved == list(range(k + 1))  # nothing moved ahead on the CPU
        assert batch is batches[k]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("n", [0, 1, 3])
def test_cuda_copies_one_batch_ahead_and_keeps_values(n: int) -> None:
    device = torch.device("cuda")
    moved = []

    def to_device(batch: dict) -> dict:
        moved.append(int(batch["pids"][0]))
        return {"images": {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch["images"].items()},
                "pids": batch["pids"].to(device, non_blocking=True)}

    batches = _batches(n)
    for k, batch in enumerate(DevicePrefetcher(batches, to_device, device)):
        assert moved == list(range(min(k + 2, n)))  # the next batch is already on its way
        batch["images"]["RGB"].mul_(2)  # used (and changed) on the compute stream after the copy
        assert _equal({"images": {"RGB": batch["images"]["RGB"] / 2}, "pids": batch["pids"]}, batches[k])
