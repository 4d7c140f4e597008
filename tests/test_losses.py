"""ID (label smoothing), batch-hard triplet (incl. DDP) and feature-norm band losses vs independent formulas."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import LOSS_REGISTRY, build_loss, feature_norm_loss, id_loss, triplet_loss


# ----------------------------------------------------------------------------- ID loss
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_id_loss_matches_cross_entropy_with_label_smoothing(eps: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=g) * 3
    targets = torch.randint(0, 7, (12,), generator=g)
    loss, stats = id_loss(logits, targets, label_smoothing=eps)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets, label_smoothing=eps).item(), rel=1e-6)
    # Hand formula in float64: target distribution (1 - eps) * onehot + eps / C.
    lp = torch.log_softmax(logits.double(), dim=1)
    target = torch.full((12, 7), eps / 7, dtype=torch.float64)
    target[torch.arange(12), targets] += 1 - eps
    assert loss.item() == pytest.approx(-(target * lp).sum(1).mean().item(), rel=1e-6)
    assert stats["id_acc"] == pytest.approx((logits.argmax(1) == targets).double().mean().item())


def test_id_loss_half_logits_computed_in_float32() -> None:
    logits = torch.randn(6, 5).half()
    targets = torch.arange(6) % 5
    loss, _ = id_loss(logits, targets, 0.1)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.double(), targets, label_smoothing=0.1)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_id_loss_rejects_bad_smoothing() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        id_loss(torch.randn(2, 3), torch.tensor([0, 1]), label_smoothing=1.0)


# ----------------------------------------------------------------------------- triplet
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


# ----------------------------------------------------------------------------- feature norm
def test_feature_norm_hand_computed_case() -> None:
    # Norms 3, 7, 11, 14; band [6, 10]: outside by 3, 0, 1, 4 -> squares 9, 0, 1, 16 -> mean 6.5.
    x = torch.tensor([[3.0, 0.0], [0.0, 7.0], [11.0, 0.0], [0.0, 14.0]], requires_grad=True)
    w = 5e-3
    loss, stats = feature_norm_loss(x, target=8.0, band=2.0, weight=w)
    assert loss.item() == pytest.approx(w * 6.5, rel=1e-6)
    assert stats["feat_norm_penalty"] == pytest.approx(6.5, rel=1e-6)
    assert stats["feat_norm_outside"] == pytest.approx(0.75)
    assert stats["feat_norm_mean"] == pytest.approx(35 / 4)
    loss.backward()
    # d/dx of w/4 * (|norm - 8| - 2)^2 along x/|x|: 2 * excess * sign(norm - 8) * w / 4.
    expected = torch.tensor([[-1.5 * w, 0.0], [0.0, 0.0], [0.5 * w, 0.0], [0.0, 2.0 * w]])
    torch.testing.assert_close(x.grad, expected)


def test_feature_norm_inside_band_is_free_and_weight_is_a_parameter() -> None:
    x = torch.randn(5, 16)
    x = 7.0 * x / x.norm(dim=1, keepdim=True)
    assert feature_norm_loss(x)[0].item() == 0.0
    y = 20.0 * x / 7.0
    l5 = feature_norm_loss(y, weight=5e-3)[0].item()
    l10 = feature_norm_loss(y, weight=1e-2)[0].item()
    assert l5 == pytest.approx(5e-3 * 100.0, rel=1e-5)  # 20 is 10 past the upper edge
    assert l10 == pytest.approx(2 * l5, rel=1e-6)


def test_feature_norm_mask() -> None:
    x = torch.tensor([[14.0, 0.0], [8.0, 0.0]])
    loss, _ = feature_norm_loss(x, mask=torch.tensor([False, True]))
    assert loss.item() == 0.0


def test_every_loss_is_registered() -> None:
    assert {"sdm", "sdm_multimodal", "id", "triplet", "feature_norm", "cem"} <= set(LOSS_REGISTRY)
    tri = build_loss("triplet", margin=0.5)
    x = torch.randn(6, 3)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    assert tri(x, pids)[0].item() == pytest.approx(reference_triplet(x, pids, 0.5, False, False), rel=1e-5)


def test_host_stats_false_returns_the_same_values_as_device_tensors() -> None:
    """Training loops ask for device tensors (no host sync); the values must equal the float stats."""
    from losses import feature_norm_loss, id_loss, sdm_loss, triplet_loss

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    logits = torch.randn(8, 4, generator=g)
    for fn, args in ((sdm_loss, (a, b, pids)), (triplet_loss, (a, pids)), (id_loss, (logits, pids % 4)),
                     (feature_norm_loss, (a * 3,))):
        loss_f, floats = fn(*args)
        loss_t, tensors = fn(*args, host_stats=False)
        assert torch.equal(loss_f, loss_t) and floats.keys() == tensors.keys()
        for key, value in tensors.items():
            assert not isinstance(value, torch.Tensor) or not value.requires_grad  # numbers pass through
            assert float(value) == pytest.approx(floats[key], rel=1e-6, abs=1e-9)
