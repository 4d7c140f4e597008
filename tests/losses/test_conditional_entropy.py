"""GatedAttentionCEM and GMMConditionalEntropy against per-class loop references and known entropies.

GatedAttentionCEM is the gated-attention regulariser of the class-conditional entropy H(Z|Y), computed on
every mini-batch; GMMConditionalEntropy (per-class GMM) is the reference estimate beside it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import digamma
from torch import nn

from losses import GatedAttentionCEM, GMMConditionalEntropy, build_loss


def gaussian_classes(sigma: float, n_classes: int, per_class: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    noise = torch.randn(n_classes * per_class, dim, generator=torch.Generator().manual_seed(seed + 1))
    return means[labels] + sigma * noise, labels


@torch.no_grad()
def reference_cem(cem: GatedAttentionCEM, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """GatedAttentionCEM's steps 1-7 (its docstring), one class at a time in float64, with its weights."""
    x_all = feats.double()
    b, d = x_all.shape
    wv, bv = cem.attn_v.weight.double(), cem.attn_v.bias.double()
    wu, bu = cem.attn_u.weight.double(), cem.attn_u.bias.double()
    ww = cem.attn_w.weight.double()
    ln = cem.gate_norm
    lin1, lin2 = cem.gate_mlp[0], cem.gate_mlp[2]
    num, den = 0.0, 0.0
    for c in torch.unique(labels).tolist():
        x = x_all[labels == c]
        m = x.shape[0]
        if m < cem.min_class_samples:
            continue
        x = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)  # step 1
        v = torch.tanh(x @ wv.t() + bv)  # step 2
        u = torch.sigmoid(x @ wu.t() + bu)
        alpha = torch.softmax((v * u) @ ww.t(), dim=0)  # (m, 1)
        mu = (alpha * x).sum(0)  # step 3
        var = (alpha * (x - mu) ** 2).sum(0)
        log_var = torch.log(var + cem.eps)
        z = (log_var - log_var.mean()) / torch.sqrt(log_var.var(unbiased=False) + ln.eps)  # step 4
        z = z * ln.weight.double() + ln.bias.double()
        h = F.gelu(z @ lin1.weight.double().t() + lin1.bias.double())
        dim_gate = torch.sigmoid(h @ lin2.weight.double().t() + lin2.bias.double())
        snr_gate = torch.sigmoid(cem.snr_sharp * (var / (mu**2 + cem.eps) - cem.snr_thresh))
        beta = cem.softplus_beta  # step 5
        base = torch.log1p(torch.exp(beta * (log_var - math.log(cem.tau) - cem.margin))) / beta
        frac = m / b  # step 6
        class_gate = 1 / (1 + math.exp(-cem.class_gate_a * (frac - cem.class_gate_b)))
        loss_c = class_gate * float((dim_gate * snr_gate * base).mean())
        w = frac**cem.slot_power  # step 7
        num += w * loss_c
        den += w
    return cem.loss_scale * num / den if den > 0 else 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_class_loop_reference(seed: int) -> None:
    torch.manual_seed(seed)
    cem = GatedAttentionCEM(12, attn_hidden=8, gate_hidden=6, warmup_epochs=0)
    with torch.no_grad():  # make the affine LN of the dim gate non-trivial
        cem.gate_norm.weight.uniform_(0.5, 1.5)
        cem.gate_norm.bias.uniform_(-0.3, 0.3)
    feats = torch.randn(23, 12) * 3 + 1
    labels = torch.tensor([3] * 7 + [9] * 5 + [1] * 2 + [4] + [7] * 8)  # sizes 7, 5, 2, 1 (skipped), 8
    loss, stats = cem(feats, labels)
    assert loss.item() == pytest.approx(reference_cem(cem, feats, labels), rel=1e-5)
    assert stats["cem_classes"] == 4.0
    perm = torch.randperm(23)
    assert cem(feats[perm], labels[perm])[0].item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_gated_and_gmm_rank_covariances_the_same_way(seed: int) -> None:
    dim = 8
    torch.manual_seed(seed)
    cem = GatedAttentionCEM(dim, warmup_epochs=0)
    gmm = GMMConditionalEntropy(n_components=1, tau=0.1)
    gated, ref = [], []
    for sigma in (0.5, 1.0, 2.0):
        x, y = gaussian_classes(sigma, n_classes=6, per_class=40, dim=dim, seed=10 + seed)
        with torch.no_grad():
            gated.append(cem(x, y)[1]["cem_surrogate"])
        ref.append(gmm(x, y)[0])
    assert gated == sorted(gated) and len(set(gated)) == 3
    assert ref == sorted(ref) and len(set(ref)) == 3


def test_gmm_matches_known_entropy_and_hand_formula() -> None:
    dim, per_class, sigma = 4, 200, 0.7
    x, y = gaussian_classes(sigma, n_classes=3, per_class=per_class, dim=dim, seed=3)
    value, stats = GMMConditionalEntropy(n_components=1, tau=0.1)(x, y)
    known = 0.5 * dim * math.log(2 * math.pi * math.e * sigma**2)
    # Expected ML log-determinant from n samples (Wishart): logdet Sigma + sum digamma((n-i)/2) + D log(2/n).
    bias = 0.5 * (sum(digamma((per_class - i) / 2) for i in range(1, dim + 1)) + dim * math.log(2 / per_class))
    est = 0.5 * stats["cem_gmm_logdet"] + 0.5 * dim * math.log(2 * math.pi * math.e)
    assert est == pytest.approx(known + bias, abs=0.15)
    # Hand formula with one component: sum_c (n_c / N) * max(0, logdet(cov_c + reg I) - D log tau).
    xn, yn = x.double().numpy(), y.numpy()
    hand = 0.0
    for c in range(3):
        cov = np.cov(xn[yn == c], rowvar=False, bias=True) + 1e-4 * np.eye(dim)
        hand += (1 / 3) * max(0.0, np.linalg.slogdet(cov)[1] - dim * math.log(0.1))
    assert value == pytest.approx(hand, rel=1e-6)
    literal, _ = GMMConditionalEntropy(n_components=1, tau=0.1, tau_per_dim=False)(xn, yn)
    hand_literal = sum(
        (1 / 3) * max(0.0, np.linalg.slogdet(np.cov(xn[yn == c], rowvar=False, bias=True) + 1e-4 * np.eye(dim))[1] - math.log(0.1))
        for c in range(3)
    )
    assert literal == pytest.approx(hand_literal, rel=1e-6)
    assert GMMConditionalEntropy(n_components=1, tau=100.0)(x, y)[0] == 0.0  # everything below the threshold


def test_gmm_uses_several_components_when_there_is_data() -> None:
    g = torch.Generator().manual_seed(4)
    # One class made of two far-apart blobs: a 2-component GMM sees two tight clusters.
    blob = torch.cat([torch.randn(100, 3, generator=g) * 0.1, torch.randn(100, 3, generator=g) * 0.1 + 10])
    y = torch.zeros(200, dtype=torch.long)
    one, s1 = GMMConditionalEntropy(n_components=1, tau=1e-3)(blob, y)
    two, s2 = GMMConditionalEntropy(n_components=2, tau=1e-3)(blob, y)
    assert s2["cem_gmm_logdet"] < s1["cem_gmm_logdet"] - 5  # per-cluster covariance is far smaller
    assert two < one


def test_gradients_reach_encoder_and_own_parameters() -> None:
    torch.manual_seed(5)
    encoder = nn.Linear(10, 16)
    cem = build_loss("cem", feat_dim=16, warmup_epochs=0)
    inputs = torch.randn(32, 10, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(8)
    loss, _ = cem(encoder(inputs), labels)
    loss.backward()
    assert inputs.grad is not None and inputs.grad.abs().sum() > 0
    assert encoder.weight.grad.abs().sum() > 0
    for name, p in cem.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 1e-8, f"no gradient reaches {name}"
    opt = torch.optim.SGD([{"params": encoder.parameters()}, *cem.param_groups(lr=1e-3)], lr=0.1)
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["name"] == "cem"
    assert len(opt.param_groups[1]["params"]) == len(list(cem.parameters()))
    opt.step()


def test_warmup_hard_switch_and_ramp() -> None:
    torch.manual_seed(6)
    x = torch.randn(16, 8, requires_grad=True)
    y = torch.arange(4).repeat_interleave(4)
    cem = GatedAttentionCEM(8, warmup_epochs=5)
    l0, s0 = cem(x, y, epoch=4.9)
    l0.backward()
    assert l0.item() == 0.0 and torch.all(x.grad == 0) and s0["cem_surrogate"] > 0
    assert cem(x, y, epoch=5)[0].item() == pytest.approx(0.1 * s0["cem_surrogate"], rel=1e-6)
    assert cem(x, y)[0].item() == pytest.approx(0.1 * s0["cem_surrogate"], rel=1e-6)  # epoch None: on
    ramp = GatedAttentionCEM(8, warmup_epochs=5, warmup_ramp_epochs=2)
    ramp.load_state_dict(cem.state_dict())
    factors = [ramp.warmup_factor(e) for e in (4, 5, 6, 7, 9)]
    assert factors == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert ramp(x, y, epoch=6)[0].item() == pytest.approx(0.5 * 0.1 * s0["cem_surrogate"], rel=1e-6)


def test_singleton_classes_and_bf16_autocast() -> None:
    cem = GatedAttentionCEM(8, warmup_epochs=0)
    x = torch.randn(6, 8, requires_grad=True)
    loss, stats = cem(x, torch.arange(6))
    loss.backward()
    assert loss.item() == 0.0 and stats["cem_classes"] == 0 and torch.isfinite(x.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = cem(x.detach().bfloat16(), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert out.dtype == torch.float32 and math.isfinite(out.item())
