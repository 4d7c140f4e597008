"""Batch-hard triplet loss (incl. DDP) against a float64 loop reference; the loss registry."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses import LOSS_REGISTRY, build_loss, triplet_loss


def reference_triplet(x: torch.Tensor, pids: torch.Tensor, margin: float, soft: bool, normalize: bool) -> float:
    """Batch-hard triplet with explicit loops in float64."""
    x = x.double()
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    n = x.shape[0]
    vals = []
    for i in range(n):
        d = [math.sqrt(max(float(((x[i] - x[j]) ** 2).sum()), 1e-12)) for j in range(n)]
        pos = [d[j] for j in range(n) if pids[j] == pids[i]]
        neg = [d[j] for j in range(n) if pids[j] != pids[i]]
        if not neg:
            continue
        gap = max(pos) - min(neg)
        vals.append(math.log1p(math.exp(gap)) if soft else max(0.0, gap + margin))
    return sum(vals) / len(vals) if vals else 0.0


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_triplet_matches_loop_reference(soft: bool, normalize: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=g)
    pids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5])  # 4 and 5 appear once
    loss, stats = triplet_loss(x, pids, margin=0.3, soft_margin=soft, normalize_feature=normalize)
    assert loss.item() == pytest.approx(reference_triplet(x, pids, 0.3, soft, normalize), rel=1e-5)
    assert stats["triplet_anchors"] == 12.0


def test_triplet_hand_case() -> None:
    # 1-D points: id 0 at {0, 1}, id 1 at {3}. Anchor 0: ap 1, an 3 -> relu(1 - 3 + 0.5) = 0.
    # Anchor 1: ap 1, an 2 -> 0. Anchor 2 (alone): ap 0, an 2 -> 0. With margin 2.5: 0.5, 1.5, 0.5.
    x = torch.tensor([[0.0], [1.0], [3.0]])
    pids = torch.tensor([0, 0, 1])
    assert triplet_loss(x, pids, margin=0.5)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert triplet_loss(x, pids, margin=2.5)[0].item() == pytest.approx((0.5 + 1.5 + 0.5) / 3, rel=1e-5)
    soft = triplet_loss(x, pids, soft_margin=True)[0].item()
    assert soft == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 3, rel=1e-5)


def test_triplet_one_identity_is_zero_with_gradient_path() -> None:
    x = torch.randn(6, 4, requires_grad=True)
    loss, stats = triplet_loss(x, torch.zeros(6, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and stats["triplet_anchors"] == 0.0
    assert torch.isfinite(x.grad).all()


def test_triplet_gradient_finite_with_duplicate_points() -> None:
    x = torch.zeros(4, 3, requires_grad=True)  # all distances 0: sqrt at the clamp
    loss, _ = triplet_loss(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.3, rel=1e-4)
    assert torch.isfinite(x.grad).all()


def _ddp_triplet_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        full = torch.load(os.path.join(out_dir, "inputs.pt"))
        b = full["x"].shape[0] // world
        x = full["x"][rank * b:(rank + 1) * b].clone().requires_grad_(True)
        pids = full["pids"][rank * b:(rank + 1) * b]
        loss, stats = triplet_loss(x, pids, margin=0.3)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": x.grad, "anchors": stats["triplet_anchors"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_triplet_ddp_gathers_the_global_batch(tmp_path: Path) -> None:
    """Two gloo ranks with half a batch each = one process with the whole batch.

    Rank 0 holds only identities {0, 1}; rank 1 holds {1, 2}: without the gather,
    rank 0 would mine its hardest negative among fewer candidates.
    """
    g = torch.Generator().manual_seed(2)
    world = 2
    x = torch.randn(12, 4, generator=g)
    pids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2])
    torch.save({"x": x, "pids": pids}, tmp_path / "inputs.pt")
    mp.start_processes(_ddp_triplet_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       join=True, start_method="fork")  # fork: no re-import of torch in the children
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    xf = x.clone().requires_grad_(True)
    full_loss, _ = triplet_loss(xf, pids, margin=0.3)
    full_loss.backward()
    ddp_mean = sum(float(r["loss"]) for r in res) / world  # what DDP's gradient averaging optimises
    assert ddp_mean == pytest.approx(full_loss.item(), rel=1e-5)
    assert ddp_mean == pytest.approx(reference_triplet(x, pids, 0.3, False, False), rel=1e-5)
    # all_gather_with_grad sums every rank's gradient into the producing rank: world * dL/dx.
    grads = torch.cat([r["grad"] for r in res])
    torch.testing.assert_close(grads, world * xf.grad, rtol=1e-5, atol=1e-6)


def test_every_loss_is_registered() -> None:
    assert {"sdm", "sdm_multimodal", "id", "triplet", "feature_norm", "cem"} <= set(LOSS_REGISTRY)
    tri = build_loss("triplet", margin=0.5)
    x = torch.randn(6, 3)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    assert tri(x, pids)[0].item() == pytest.approx(reference_triplet(x, pids, 0.5, False, False), rel=1e-5)
