"""SDM loss against an independent float64 KL, the ``ce - h`` formula it corrects, and IRRA's definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses import LOSS_REGISTRY, build_loss, sdm_loss, sdm_multimodal


# ----------------------------------------------------------------------------- references
def reference_sdm(a, b, pids, tau, mask_a=None, mask_b=None) -> torch.Tensor:
    """SDM from its definition, float64, one row at a time (differentiable, for gradient checks).

    For each real row i of view x against the real rows j of view y:
    p_ij = exp(cos(x_i, y_j) / tau) / sum_j' exp(cos(x_i, y_j') / tau);
    q_ij = 1 / |P_i| for j in P_i (real positives), else 0;
    KL_i = sum_{j in P_i} q_ij * (log q_ij - log p_ij). Rows with empty P_i are skipped.
    Loss = (mean_i KL_i(a -> b) + mean_j KL_j(b -> a)) / 2.
    """
    a = a.double()
    b = b.double()
    n = a.shape[0]
    pids = [int(p) for p in pids]
    ma = [True] * n if mask_a is None else [bool(m) for m in mask_a]
    mb = [True] * n if mask_b is None else [bool(m) for m in mask_b]

    def cos(u, v):
        return (u @ v) / (u.norm() * v.norm())

    def direction(x, y, mx, my):
        kls = []
        for i in range(n):
            if not mx[i]:
                continue
            cols = [j for j in range(n) if my[j]]
            pos = [j for j in cols if pids[j] == pids[i]]
            if not pos:
                continue
            logits = torch.stack([cos(x[i], y[j]) / tau for j in cols])
            log_p = logits - torch.logsumexp(logits, dim=0)
            q = 1.0 / len(pos)
            kls.append(sum(q * (math.log(q) - log_p[cols.index(j)]) for j in pos))
        return torch.stack(kls).mean() if kls else torch.zeros((), dtype=torch.float64)

    return 0.5 * (direction(a, b, ma, mb) + direction(b, a, mb, ma))


def old_buggy_sdm(qry, gal, y, tau=0.2, eps=1e-6):
    """The ``ce - h`` formula ``sdm_loss`` corrects (``sdm_loss_legacy``): ``q`` clamped to eps, float64 here.

    ce - h = sum_j P_j log P_j - sum_j P_j log max(q_j, eps): a KL against a q that no
    longer sums to 1, so it can be negative.
    """
    qry = F.normalize(qry.double(), dim=1, eps=eps)
    gal = F.normalize(gal.double(), dim=1, eps=eps)
    s = qry @ gal.t() / tau

    def one_side(s, y):
        p, log_p = F.softmax(s, dim=1), F.log_softmax(s, dim=1)
        row_sum = y.sum(1, keepdim=True)
        valid = row_sum.squeeze(-1) > 0
        q = torch.zeros_like(s)
        q[valid] = y[valid] / row_sum[valid]
        ce = -(p * torch.log(q.clamp_min(eps))).sum(1)
        h = -(p * log_p).sum(1)
        return (ce - h)[valid].mean()

    return 0.5 * (one_side(s, y) + one_side(s.t(), y.t()))


def irra_sdm(image, text, pid, logit_scale, epsilon=1e-8):
    """IRRA's compute_sdm (model/objectives.py), restated: reverse KL(p || q + eps), directions summed."""
    pid = pid.reshape(-1, 1)
    labels = (pid - pid.t() == 0).double()
    image_norm = image.double() / image.double().norm(dim=1, keepdim=True)
    text_norm = text.double() / text.double().norm(dim=1, keepdim=True)
    t2i = logit_scale * text_norm @ image_norm.t()
    i2t = t2i.t()
    labels_distribute = labels / labels.sum(dim=1)
    i2t_loss = F.softmax(i2t, 1) * (F.log_softmax(i2t, 1) - torch.log(labels_distribute + epsilon))
    t2i_loss = F.softmax(t2i, 1) * (F.log_softmax(t2i, 1) - torch.log(labels_distribute + epsilon))
    return i2t_loss.sum(1).mean() + t2i_loss.sum(1).mean()


# ----------------------------------------------------------------------------- cases
def make_case(name: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, d = 10, 6
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ma = mb = None
    if name == "ties":  # repeated ids, duplicated feature rows (tied similarities), scaled rows
        pids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
        a[1] = a[0]
        b[4] = b[3]
        b[2] = 5.0 * b[0]
    elif name == "singletons":  # every id once: q one-hot on the diagonal; other rows all-negative
        pids = torch.arange(n)
    elif name == "one_identity":
        pids = torch.zeros(n, dtype=torch.long)
    elif name == "masked":
        pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4, 5])
        ma = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
        mb = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    elif name == "no_positive_rows":  # id 3 appears once and its b-side is masked: row excluded
        pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 5, 6, 7])
        mb = torch.ones(n, dtype=torch.bool)
        mb[[6, 8]] = False
        ma = torch.ones(n, dtype=torch.bool)
    elif name == "all_masked":
        pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
        ma = torch.zeros(n, dtype=torch.bool)
        mb = torch.ones(n, dtype=torch.bool)
    else:
        raise ValueError(name)
    return a, b, pids, ma, mb


CASES = ["ties", "singletons", "one_identity", "masked", "no_positive_rows", "all_masked"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("tau", [0.15, 0.2, 0.5])
def test_matches_float64_reference(name: str, tau: float) -> None:
    a, b, pids, ma, mb = make_case(name)
    loss, stats = sdm_loss(a, b, pids, tau, ma, mb)
    ref = reference_sdm(a, b, pids, tau, ma, mb)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert loss.item() >= -1e-6
    assert stats["sdm"] == pytest.approx(loss.item())
    assert isinstance(stats["sdm"], float)


@pytest.mark.parametrize("seed", range(5))
def test_random_batches_with_masks(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(2, 16, (1,), generator=g))
    a, b = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    pids = torch.randint(0, max(1, n // 2), (n,), generator=g)
    ma, mb = torch.rand(n, generator=g) > 0.3, torch.rand(n, generator=g) > 0.3
    loss, _ = sdm_loss(a, b, pids, 0.2, ma, mb)
    assert loss.item() == pytest.approx(reference_sdm(a, b, pids, 0.2, ma, mb).item(), rel=1e-5, abs=1e-6)


def test_one_identity_and_singletons_hand_values() -> None:
    # Identical features everywhere: p is uniform. One identity -> q uniform -> KL = 0.
    a = torch.ones(4, 3)
    loss, _ = sdm_loss(a, a, torch.zeros(4), 0.2)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # All ids distinct -> q one-hot, p uniform over 4 -> KL = log 4 per row.
    loss, _ = sdm_loss(a, a, torch.arange(4), 0.2)
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)


def test_gradients_match_reference() -> None:
    a, b, pids, ma, mb = make_case("masked", seed=3)
    a1, b1 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    a2, b2 = a.double().requires_grad_(True), b.double().requires_grad_(True)
    sdm_loss(a1, b1, pids, 0.2, ma, mb)[0].backward()
    reference_sdm(a2, b2, pids, 0.2, ma, mb).backward()
    torch.testing.assert_close(a1.grad.double(), a2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b1.grad.double(), b2.grad, rtol=1e-4, atol=1e-6)


def test_all_masked_is_zero_with_gradient_path() -> None:
    a, b, pids, ma, mb = make_case("all_masked")
    a.requires_grad_(True)
    b.requires_grad_(True)
    loss, stats = sdm_loss(a, b, pids, 0.2, ma, mb)
    assert loss.item() == 0.0 and stats["sdm_valid_rows"] == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.all(a.grad == 0) and torch.all(b.grad == 0)


def test_masked_rows_cannot_leak_nan() -> None:
    a, b, pids, ma, mb = make_case("masked")
    base = sdm_loss(a, b, pids, 0.2, ma, mb)[0].item()
    a[~ma] = float("nan")
    b[~mb] = float("inf")
    a.requires_grad_(True)
    b.requires_grad_(True)
    loss, _ = sdm_loss(a, b, pids, 0.2, ma, mb)
    loss.backward()
    assert loss.item() == pytest.approx(base, abs=1e-7)
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert torch.all(a.grad[~ma] == 0) and torch.all(b.grad[~mb] == 0)


def test_invariant_to_feature_scale() -> None:
    a, b, pids, _, _ = make_case("ties")
    l1 = sdm_loss(a, b, pids, 0.2)[0].item()
    l2 = sdm_loss(20.0 * a, 0.01 * b, pids, 0.2)[0].item()
    assert l1 == pytest.approx(l2, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_autocast_computed_in_float32(dtype: torch.dtype) -> None:
    a, b, pids, ma, mb = make_case("masked", seed=7)
    ah, bh = a.to(dtype), b.to(dtype)
    loss, _ = sdm_loss(ah, bh, pids, 0.2, ma, mb)
    ref = reference_sdm(ah.double(), bh.double(), pids, 0.2, ma, mb)  # same rounded inputs, float64
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = sdm_loss(a, b, pids, 0.2, ma, mb)
    assert auto.dtype == torch.float32
    assert auto.item() == pytest.approx(reference_sdm(a, b, pids, 0.2, ma, mb).item(), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- the ce - h formula
def test_old_formula_goes_negative_where_new_one_is_non_negative() -> None:
    """Near convergence ``ce - h`` dips below 0; KL(q || p) does not.

    16 identities x 4 instances on orthogonal unit vectors, both views identical. At
    tau = 1 / log(q_pos / eps) the softmax puts exactly eps (relative to q_pos) on each
    negative, i.e. P is proportional to max(q, eps), where ``ce - h`` reaches its
    minimum -log(sum_j max(q_j, eps)) = -log(1 + n_neg * eps) < 0 (hand-computed below).
    """
    eps, n_ids, k = 1e-6, 16, 4
    pids = torch.arange(n_ids).repeat_interleave(k)
    feats = torch.eye(64)[:n_ids][pids]
    y = (pids[:, None] == pids[None, :]).double()
    tau = 1.0 / math.log((1.0 / k) / eps)
    old = old_buggy_sdm(feats, feats, y, tau=tau, eps=eps).item()
    n_neg = (n_ids - 1) * k
    assert old == pytest.approx(-math.log1p(n_neg * eps), rel=1e-6)
    assert old < -5e-5
    new, _ = sdm_loss(feats, feats, pids, tau)
    assert new.item() >= 0.0
    assert new.item() == pytest.approx(reference_sdm(feats, feats, pids, tau).item(), abs=1e-7)


# ----------------------------------------------------------------------------- IRRA
def test_irra_label_distribution_only_right_for_symmetric_labels() -> None:
    pids = torch.tensor([0, 0, 1, 1, 1, 2])
    labels = (pids[:, None] == pids[None, :]).double()
    ours = labels / labels.sum(1, keepdim=True)
    torch.testing.assert_close(labels / labels.sum(dim=1), ours)  # IRRA's broadcast: same when symmetric
    # Masks make the valid-label matrix asymmetric: row 3 of view a is missing, every b row is real.
    mask_a = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    mask_b = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    masked = labels * (mask_a[:, None] & mask_b[None, :]).double()
    irra_rows = (masked / masked.sum(dim=1)).sum(1)  # divides column j by row j's sum
    assert not torch.allclose(irra_rows, torch.ones(6, dtype=torch.float64))
    row_sums = masked.sum(1, keepdim=True)
    ours_rows = (masked / row_sums.clamp_min(1)).sum(1)
    torch.testing.assert_close(ours_rows[row_sums.squeeze(1) > 0], torch.ones(5, dtype=torch.float64))


def test_agrees_with_irra_on_ordering_and_zero_at_perfect_alignment() -> None:
    """Different KL directions, same optimum: both ~0 for perfectly clustered features at a sharp
    temperature, both >= 0, and both grow as the two views drift apart."""
    g = torch.Generator().manual_seed(0)
    pids = torch.arange(8).repeat_interleave(4)
    centres = torch.linalg.qr(torch.randn(32, 32, generator=g))[0][:8]
    a = centres[pids]
    ours0 = sdm_loss(a, a, pids, 0.02)[0].item()
    irra0 = irra_sdm(a, a, pids, 1 / 0.02).item()
    assert abs(ours0) < 1e-6 and abs(irra0) < 1e-6
    ours, irra = [], []
    for noise in (0.1, 0.3, 0.6, 1.0):
        b = a + noise * torch.randn(a.shape, generator=g)
        ours.append(sdm_loss(a, b, pids, 0.2)[0].item())
        irra.append(irra_sdm(a, b, pids, 1 / 0.2).item())
    assert all(v >= 0 for v in ours + irra)
    assert ours == sorted(ours) and irra == sorted(irra)


# ----------------------------------------------------------------------------- multi-modal helper
def test_sdm_multimodal_averages_pairs_with_valid_rows() -> None:
    g = torch.Generator().manual_seed(5)
    n = 8
    feats = {m: torch.randn(n, 4, generator=g) for m in ("RGB", "NI", "TI")}
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    mask = torch.ones(n, 3, dtype=torch.bool)
    mask[[1, 4], 1] = False
    loss, stats = sdm_multimodal(feats, pids, mask, ("RGB", "NI", "TI"), 0.2)
    pairs = [(0, 1), (0, 2), (1, 2)]
    names = ["RGB", "NI", "TI"]
    refs = [reference_sdm(feats[names[i]], feats[names[j]], pids, 0.2, mask[:, i], mask[:, j]).item() for i, j in pairs]
    assert loss.item() == pytest.approx(sum(refs) / 3, rel=1e-5)
    assert stats["sdm_pairs_used"] == 3.0
    # TI missing for everyone: only RGB-NI counts (not averaged with a zero).
    mask[:, 2] = False
    loss2, stats2 = sdm_multimodal(feats, pids, mask, ("RGB", "NI", "TI"), 0.2)
    assert stats2["sdm_pairs_used"] == 1.0
    assert loss2.item() == pytest.approx(refs[0], rel=1e-5)
    mask[:] = False
    loss3, _ = sdm_multimodal(feats, pids, mask, ("RGB", "NI", "TI"), 0.2)
    assert loss3.item() == 0.0 and math.isfinite(loss3.item())


def test_sdm_multimodal_rejects_bad_order() -> None:
    with pytest.raises(KeyError, match="depth"):
        sdm_multimodal({"RGB": torch.randn(2, 3), "NI": torch.randn(2, 3)}, torch.arange(2), None, ("RGB", "depth"))


def test_registry_builds_sdm_with_bound_kwargs() -> None:
    assert "sdm" in LOSS_REGISTRY
    a, b, pids, _, _ = make_case("ties")
    fn = build_loss("sdm", temperature=0.3)
    assert fn(a, b, pids)[0].item() == pytest.approx(reference_sdm(a, b, pids, 0.3).item(), rel=1e-5)


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="same shape"):
        sdm_loss(torch.randn(4, 3), torch.randn(5, 3), torch.arange(4))
    with pytest.raises(ValueError, match="pids"):
        sdm_loss(torch.randn(4, 3), torch.randn(4, 3), torch.arange(3))


def test_legacy_formula_matches_the_seed_note_and_goes_negative() -> None:
    """``sdm_loss_legacy`` (``LOSS.SDM.FORMULA legacy``, ablation only) equals the test's own ``ce - h``
    transcription."""
    from losses.sdm_loss import sdm_loss_legacy

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    pids = torch.arange(6).repeat_interleave(2)
    eps = 1e-6
    s = F.normalize(a, dim=1, eps=eps) @ F.normalize(b, dim=1, eps=eps).t() / 0.2
    y = (pids[:, None] == pids[None, :]).float()
    expected = 0.0
    for mat, lab in ((s, y), (s.t(), y.t())):
        p = F.softmax(mat, dim=1)
        q = (lab / lab.sum(1, keepdim=True)).clamp_min(eps)
        expected += 0.5 * ((-(p * q.log()).sum(1)) - (-(p * F.log_softmax(mat, dim=1)).sum(1))).mean().item()
    loss, stats = sdm_loss_legacy(a, b, pids, 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-5) and stats["sdm"] == pytest.approx(expected, rel=1e-5)
    # aligned features at a sharp temperature: ``ce - h`` is below zero, the KL form is not
    x = F.one_hot(torch.arange(12), 12).float()
    pids = torch.arange(12)
    assert sdm_loss_legacy(x, x, pids, 0.05)[0].item() < 0
    from losses.sdm_loss import sdm_loss

    assert sdm_loss(x, x, pids, 0.05)[0].item() >= 0


def test_center_features_against_float64_mean() -> None:
    from losses.sdm_loss import center_features

    g = torch.Generator().manual_seed(3)
    feat = torch.randn(6, 5, generator=g, dtype=torch.float64) + 10.0  # one dominant direction
    mask = torch.tensor([True, True, False, True, True, False])
    out = center_features(feat, mask)
    mean = feat[mask].mean(0)
    assert torch.allclose(out[mask], feat[mask] - mean)
    assert torch.equal(out[~mask], feat[~mask])  # masked rows untouched
    assert torch.allclose(center_features(feat), feat - feat.mean(0))


def test_cross_modal_cosine_stats_and_centring_wake_sdm() -> None:
    # two identities x 2 samples; every feature = a shared direction + a small identity offset
    shared = torch.tensor([10.0, 0.0, 0.0])
    ident = torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    pids = torch.tensor([0, 0, 1, 1])
    feats = {"RGB": shared + ident[pids], "NI": shared + 0.5 * ident[pids]}
    loss, stats = sdm_multimodal(feats, pids, temperature=0.2)
    a, b = F.normalize(feats["RGB"], dim=1), F.normalize(feats["NI"], dim=1)
    sim = a @ b.t()
    same = pids[:, None] == pids[None, :]
    assert stats["sdm_pos_cos"] == pytest.approx(float(sim[same].mean()), abs=1e-6)
    assert stats["sdm_neg_cos"] == pytest.approx(float(sim[~same].mean()), abs=1e-6)
    # centred, the offsets are all that is left: same identity cosine 1, other identity -1
    centred_loss, centred = sdm_multimodal(feats, pids, temperature=0.2, center=True)
    assert centred["sdm_pos_cos"] == pytest.approx(1.0, abs=1e-6)
    assert centred["sdm_neg_cos"] == pytest.approx(-1.0, abs=1e-6)
    # hand-computed: each row puts e^5 on its 2 positives and e^-5 on its 2 negatives
    p_pos = math.exp(5) / (2 * math.exp(5) + 2 * math.exp(-5))
    assert float(centred_loss) == pytest.approx(math.log(0.5 / p_pos), abs=1e-6)  # float32 inside
    assert float(centred_loss) < float(loss) < math.log(2) + 1e-3


def test_sdm_multimodal_gradients_match_the_per_pair_reference() -> None:
    """The three pairs computed batched: loss and gradients of every modality equal the float64 definition."""
    g = torch.Generator().manual_seed(11)
    names = ("RGB", "NI", "TI")
    feats = {m: torch.randn(8, 5, generator=g) for m in names}
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[[1, 4], 1] = False
    mask[6, 2] = False
    ours = {m: f.clone().requires_grad_(True) for m, f in feats.items()}
    ref = {m: f.double().requires_grad_(True) for m, f in feats.items()}
    loss, stats = sdm_multimodal(ours, pids, mask, names, 0.2)
    loss.backward()
    pairs = [(0, 1), (0, 2), (1, 2)]
    refs = [reference_sdm(ref[names[i]], ref[names[j]], pids, 0.2, mask[:, i], mask[:, j]) for i, j in pairs]
    (sum(refs) / 3).backward()
    assert loss.item() == pytest.approx(float(sum(refs).detach()) / 3, rel=1e-5)
    for (i, j), value in zip(pairs, refs):
        assert stats[f"sdm_{names[i]}_{names[j]}"] == pytest.approx(float(value.detach()), rel=1e-5)
    for m in names:
        torch.testing.assert_close(ours[m].grad.double(), ref[m].grad, rtol=1e-4, atol=1e-6)
