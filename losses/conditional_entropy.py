"""Class-conditional entropy regularisers: gated-attention CEM and its GMM reference.

Both estimate how spread out the features of each class are (a surrogate of H(Z|Y))
and return a penalty that grows with it; the trainer adds ``lambda * loss`` (the sign
and strength of the defence against model inversion are the trainer's choice).

* :class:`GatedAttentionCEM` — per mini-batch, end to end, with its own learnable
  parameters (steps 1-7 of its docstring), vectorised over the classes of the batch.
* :class:`GMMConditionalEntropy` — the baseline estimate (per class KMeans-initialised
  full-covariance GMM, ``sum_k pi_k * max(0, logdet Sigma_k - log tau)``), run offline
  on collected features (e.g. at epoch end), not differentiable.

``tau`` means the same in both: a per-dimension variance threshold. The gated version
compares each dimension's ``log var`` with ``log tau``; the GMM version compares
``logdet Sigma`` (a sum over D eigen-directions) with ``D * log tau`` (set
``tau_per_dim=False`` to use ``log tau`` literally).

Caveat (inherent to an estimator that learns from its own output): the module's own
parameters are trained on the penalty they compute, so they are pulled towards
configurations that report a smaller penalty (peaked attention weights give a
smaller weighted variance; closed gates give a smaller sum). Give its parameter
group a small learning rate (:meth:`GatedAttentionCEM.param_groups`) and watch
``cem_dim_gate`` and ``cem_alpha_max`` in the logged stats.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import stats_to_floats
from .registry import LOSS_REGISTRY


class _ClassMoments(NamedTuple):
    """Steps 2-3 of :class:`GatedAttentionCEM` for the C classes of a batch of B samples (D dimensions)."""

    inv: torch.Tensor  # (B,) class index of each sample
    counts: torch.Tensor  # (C,) samples per class
    alpha: torch.Tensor  # (B,) attention weight of each sample within its class
    mu: torch.Tensor  # (C, D) attention-weighted class mean
    diff: torch.Tensor  # (B, D) each sample minus its class mean
    var: torch.Tensor  # (C, D) attention-weighted class variance


class _ClassPenalty(NamedTuple):
    """Steps 4-6 of :class:`GatedAttentionCEM` per class."""

    log_var: torch.Tensor  # (C, D)
    dim_gate: torch.Tensor  # (C, D)
    snr_gate: torch.Tensor  # (C, D)
    frac: torch.Tensor  # (C,) M_c / B
    class_gate: torch.Tensor  # (C,)
    class_loss: torch.Tensor  # (C,) L_c


class GatedAttentionCEM(nn.Module):
    """Per-batch learnable class-conditional entropy penalty.

    For each class c of the batch, with M_c samples out of B:

    1. LayerNorm each sample (over features, no affine, so the penalty cannot be
       lowered by shrinking a learned gain): ``x_j = LN(z_j)``;
    2. gated attention pooling: ``V = tanh(W_v x)``, ``U = sigmoid(W_u x)``,
       ``alpha = softmax_j(W_w (V * U))`` over the class's samples;
    3. ``mu = sum_j alpha_j x_j``, ``var = sum_j alpha_j (x_j - mu)^2`` (per dimension);
    4. dimension gate ``g_d = sigmoid(MLP(LN(log var)))``; SNR gate
       ``g_s = sigmoid(snr_sharp * (var / (mu^2 + eps) - snr_thresh))``;
    5. ``base = softplus(beta * (log var - log tau - margin)) / beta``;
    6. class gate ``g_c = sigmoid(a * (M_c / B - b))``;
       ``L_c = g_c * mean_d(g_d * g_s * base)``;
    7. ``surrogate = sum_c w_c L_c / sum_c w_c`` with ``w_c = (M_c / B) ** slot_power``
       (classes with fewer than ``min_class_samples`` samples get ``w_c = 0``);
       ``loss = loss_scale * warmup_factor(epoch) * surrogate``.

    Warm-up: with ``warmup_ramp_epochs == 0`` the factor is 0 before ``warmup_epochs``
    and 1 after (the first ``warmup_epochs`` train classification only); with a ramp it
    rises linearly from 0 at ``warmup_epochs`` to 1 at ``warmup_epochs + ramp``. During
    warm-up the surrogate is still computed (and logged), and the returned 0 keeps the
    graph, so ``backward()`` works and yields zero gradients. ``epoch=None`` means
    "after warm-up". ``epoch`` may be fractional.

    Args:
        feat_dim: D of the features it regularises.
        attn_hidden: hidden width of ``W_v`` / ``W_u`` (128).
        gate_hidden: hidden width of the dimension-gate MLP (default ``max(16, D // 4)``).
        tau, margin, softplus_beta, snr_thresh, snr_sharp, class_gate_a, class_gate_b,
        slot_power, loss_scale, warmup_epochs, warmup_ramp_epochs, min_class_samples,
        eps: as in the steps above (defaults: loss scale 0.1, warm-up 5,
            a/b 10/0.05, snr 0.3/10, beta/margin 1.0/0.1, slot power 2.0).
        input_norm: apply step 1 (True).
    """

    def __init__(
        self,
        feat_dim: int,
        attn_hidden: int = 128,
        gate_hidden: int | None = None,
        tau: float = 0.1,
        margin: float = 0.1,
        softplus_beta: float = 1.0,
        snr_thresh: float = 0.3,
        snr_sharp: float = 10.0,
        class_gate_a: float = 10.0,
        class_gate_b: float = 0.05,
        slot_power: float = 2.0,
        loss_scale: float = 0.1,
        warmup_epochs: float = 5.0,
        warmup_ramp_epochs: float = 0.0,
        min_class_samples: int = 2,
        eps: float = 1e-6,
        input_norm: bool = True,
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if softplus_beta <= 0:
            raise ValueError(f"softplus_beta must be > 0, got {softplus_beta}")
        if min_class_samples < 2:
            raise ValueError(f"min_class_samples must be >= 2 (a variance needs two samples), got {min_class_samples}")
        self.feat_dim = int(feat_dim)
        gate_hidden = gate_hidden or max(16, feat_dim // 4)
        # Step 2: gated attention pooling.
        self.attn_v = nn.Linear(feat_dim, attn_hidden)
        self.attn_u = nn.Linear(feat_dim, attn_hidden)
        # No bias: a constant added to every logit cancels in the softmax (its gradient is exactly 0).
        self.attn_w = nn.Linear(attn_hidden, 1, bias=False)
        # Step 4: dimension gate MLP over LN(log var).
        self.gate_norm = nn.LayerNorm(feat_dim)
        self.gate_mlp = nn.Sequential(nn.Linear(feat_dim, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, feat_dim))
        self.tau = float(tau)
        self.margin = float(margin)
        self.softplus_beta = float(softplus_beta)
        self.snr_thresh = float(snr_thresh)
        self.snr_sharp = float(snr_sharp)
        self.class_gate_a = float(class_gate_a)
        self.class_gate_b = float(class_gate_b)
        self.slot_power = float(slot_power)
        self.loss_scale = float(loss_scale)
        self.warmup_epochs = float(warmup_epochs)
        self.warmup_ramp_epochs = float(warmup_ramp_epochs)
        self.min_class_samples = int(min_class_samples)
        self.eps = float(eps)
        self.input_norm = input_norm

    def warmup_factor(self, epoch: float | None) -> float:
        """0 before ``warmup_epochs``, then 1 (or a linear ramp over ``warmup_ramp_epochs``)."""
        if epoch is None:
            return 1.0
        if self.warmup_ramp_epochs > 0:
            return min(max((float(epoch) - self.warmup_epochs) / self.warmup_ramp_epochs, 0.0), 1.0)
        return 1.0 if epoch >= self.warmup_epochs else 0.0

    def param_groups(self, lr: float | None = None, weight_decay: float | None = None) -> list[dict[str, Any]]:
        """This module's parameters as their own optimizer group (give it a small learning rate).

        ``lr`` / ``weight_decay`` are set on the group only when given (else the
        optimizer's defaults apply); the group is named ``"cem"`` for logging.
        """
        group: dict[str, Any] = {"params": [p for p in self.parameters() if p.requires_grad], "name": "cem"}
        if lr is not None:
            group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        return [group]

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, epoch: float | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """features (B, D), labels (B,) -> (loss 0-d float32, stats floats).

        Stats: ``cem`` (the returned loss), ``cem_surrogate`` (before scale and
        warm-up), ``cem_warmup_factor``, ``cem_classes`` (classes used),
        ``cem_dim_gate`` / ``cem_snr_gate`` / ``cem_class_gate`` (mean gate values),
        ``cem_log_var`` (mean log variance), ``cem_alpha_max`` (mean largest attention
        weight per class), ``cem_intra_mse`` (mean squared distance to the class mean,
        per dimension, after step 1). One host sync for the class set, one for stats.
        """
        if features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"expected (B, {self.feat_dim}) features, got {tuple(features.shape)}")
        labels = labels.reshape(-1).to(features.device)
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries for {features.shape[0]} features")
        b, d = features.shape
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.float()
            if self.input_norm:
                x = F.layer_norm(x, (d,))  # step 1 (per sample, so per class too)
            moments = self._class_moments(x, labels)
            penalty = self._class_penalty(moments, b)
            # Step 7: weights (M/B)^slot_power over classes with enough samples.
            used = (moments.counts >= self.min_class_samples).float()
            w = penalty.frac.pow(self.slot_power) * used
            surrogate = (w * penalty.class_loss).sum() / w.sum().clamp_min(1e-12)
            factor = self.warmup_factor(epoch)
            loss = self.loss_scale * factor * surrogate
            stats = self._stats(loss, surrogate, factor, used, moments, penalty)
        return loss, stats_to_floats(stats)

    def _class_moments(self, x: torch.Tensor, labels: torch.Tensor) -> _ClassMoments:
        """Steps 2-3 on the normalised float32 features ``x`` (B, D): attention within each class, then the
        class's attention-weighted mean and variance."""
        d = x.shape[1]
        device = x.device
        # Step 2: attention logits per sample, softmax within each class (segment softmax).
        logits = self.attn_w(torch.tanh(self.attn_v(x)) * torch.sigmoid(self.attn_u(x))).squeeze(1)  # (B,)
        _, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        c = counts.shape[0]
        with torch.no_grad():
            seg_max = torch.full((c,), float("-inf"), device=device).scatter_reduce(
                0, inv, logits, reduce="amax", include_self=True
            )
        e = torch.exp(logits - seg_max[inv])
        den = torch.zeros(c, device=device).index_add(0, inv, e)
        alpha = e / den[inv]  # (B,), sums to 1 within each class

        # Step 3: weighted mean and variance per class.
        mu = torch.zeros(c, d, device=device).index_add(0, inv, alpha.unsqueeze(1) * x)  # (C, D)
        diff = x - mu[inv]
        var = torch.zeros(c, d, device=device).index_add(0, inv, alpha.unsqueeze(1) * diff.pow(2))
        return _ClassMoments(inv, counts, alpha, mu, diff, var)

    def _class_penalty(self, moments: _ClassMoments, batch_size: int) -> _ClassPenalty:
        """Steps 4-6: the dimension, SNR and class gates and the gated hinge of every class of the batch."""
        mu, var = moments.mu, moments.var
        log_var = torch.log(var + self.eps)
        # Step 4: dimension gate and SNR gate.
        dim_gate = torch.sigmoid(self.gate_mlp(self.gate_norm(log_var)))
        snr_gate = torch.sigmoid(self.snr_sharp * (var / (mu.pow(2) + self.eps) - self.snr_thresh))
        # Step 5: smooth hinge on log var above log tau + margin.
        beta = self.softplus_beta
        base = F.softplus(beta * (log_var - math.log(self.tau) - self.margin)) / beta
        # Step 6: class gate and class loss.
        frac = moments.counts.float() / batch_size
        class_gate = torch.sigmoid(self.class_gate_a * (frac - self.class_gate_b))
        class_loss = class_gate * (dim_gate * snr_gate * base).mean(dim=1)  # (C,)
        return _ClassPenalty(log_var, dim_gate, snr_gate, frac, class_gate, class_loss)

    @torch.no_grad()
    def _stats(
        self,
        loss: torch.Tensor,
        surrogate: torch.Tensor,
        factor: float,
        used: torch.Tensor,
        moments: _ClassMoments,
        penalty: _ClassPenalty,
    ) -> dict[str, Any]:
        """The statistics of :meth:`forward` (0-d tensors and the warm-up factor), means over the classes used."""
        inv, counts = moments.inv, moments.counts
        c = counts.shape[0]
        device = moments.alpha.device
        n_used = used.sum()
        nu = n_used.clamp_min(1.0)
        alpha_max = torch.zeros(c, device=device).scatter_reduce(
            0, inv, moments.alpha, reduce="amax", include_self=True
        )
        intra = torch.zeros(c, device=device).index_add(0, inv, moments.diff.pow(2).mean(dim=1)) / counts
        return {
            "cem": loss.detach(),
            "cem_surrogate": surrogate.detach(),
            "cem_warmup_factor": factor,
            "cem_classes": n_used,
            "cem_dim_gate": (penalty.dim_gate.mean(1) * used).sum() / nu,
            "cem_snr_gate": (penalty.snr_gate.mean(1) * used).sum() / nu,
            "cem_class_gate": (penalty.class_gate * used).sum() / nu,
            "cem_log_var": (penalty.log_var.mean(1) * used).sum() / nu,
            "cem_alpha_max": (alpha_max * used).sum() / nu,
            "cem_intra_mse": (intra * used).sum() / nu,
        }


LOSS_REGISTRY.register("cem")(GatedAttentionCEM)


class GMMConditionalEntropy:
    """Reference CEM estimate: per class, a KMeans-initialised full-covariance GMM.

    ``value = sum_c (N_c / N) * sum_k pi_ck * max(0, logdet Sigma_ck - log_tau)`` with
    ``log_tau = D * log(tau)`` (``tau_per_dim=True``) or ``log(tau)``. Run on features
    collected over an epoch (numpy or torch, any device); not differentiable.

    Each class uses ``min(n_components, N_c // min_samples_per_component)`` components
    (at least 1); classes with fewer than 2 samples are skipped. A full covariance in D
    dimensions needs well over D samples per component to be meaningful; below that
    ``reg_covar`` (added to the diagonal) dominates the log-determinant.
    """

    def __init__(
        self,
        n_components: int = 3,
        tau: float = 0.1,
        tau_per_dim: bool = True,
        reg_covar: float = 1e-4,
        max_iter: int = 100,
        min_samples_per_component: int = 10,
        random_state: int = 0,
    ) -> None:
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.n_components = int(n_components)
        self.tau = float(tau)
        self.tau_per_dim = tau_per_dim
        self.reg_covar = float(reg_covar)
        self.max_iter = int(max_iter)
        self.min_samples_per_component = int(min_samples_per_component)
        self.random_state = random_state

    def __call__(self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> tuple[float, dict[str, float]]:
        """features (N, D), labels (N,) -> (value, stats ``cem_gmm``, ``cem_gmm_logdet``, ``cem_gmm_classes``)."""
        from sklearn.mixture import GaussianMixture  # imported lazily: only offline use pays for it

        x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, dtype=np.float64)
        y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if x.ndim != 2 or y.reshape(-1).shape[0] != x.shape[0]:
            raise ValueError(f"expected features (N, D) and labels (N,), got {x.shape} and {y.shape}")
        y = y.reshape(-1)
        n, d = x.shape
        log_tau = d * math.log(self.tau) if self.tau_per_dim else math.log(self.tau)
        total, logdets, n_classes = 0.0, [], 0
        for cls in np.unique(y):
            xc = x[y == cls]
            if xc.shape[0] < 2:
                continue
            k = max(1, min(self.n_components, xc.shape[0] // self.min_samples_per_component))
            gmm = GaussianMixture(
                n_components=k, covariance_type="full", init_params="kmeans",
                reg_covar=self.reg_covar, max_iter=self.max_iter, random_state=self.random_state,
            ).fit(xc)
            ld = np.array([np.linalg.slogdet(cov)[1] for cov in gmm.covariances_])
            total += (xc.shape[0] / n) * float(np.sum(gmm.weights_ * np.maximum(0.0, ld - log_tau)))
            logdets.append(float(np.sum(gmm.weights_ * ld)))
            n_classes += 1
        stats = {
            "cem_gmm": total,
            "cem_gmm_logdet": float(np.mean(logdets)) if logdets else 0.0,
            "cem_gmm_classes": float(n_classes),
        }
        return total, stats
