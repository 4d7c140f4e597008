"""The ReID training objective: ID + triplet per branch, masked SDM between modalities, regularisers.

The model returns what it computed (``branches``, ``modality_feats``, ``bn_feats``);
this object turns that into one scalar and a dict of detached terms for logging,
driven by ``cfg.LOSS``. It owns the stateful pieces (the SDM temperature schedule,
the conditional-entropy module) so the trainer can checkpoint them.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from losses.conditional_entropy import GatedAttentionCEM
from losses.feature_norm import feature_norm_loss
from losses.id_loss import id_loss
from losses.sdm_loss import SDMTemperature, sdm_loss_legacy, sdm_multimodal
from losses.triplet_loss import triplet_loss
from utils.modalities import MODALITIES

MODALITY_ORDER = MODALITIES  # column order of the batch's modality mask


class ReIDCriterion(nn.Module):
    """Combine every configured loss term for one DeMo / DeMo-SDTPS training step.

    ``forward(outputs, pids, modality_mask, epoch)`` returns ``(total, terms)`` where
    ``terms`` maps names (``id/<branch>``, ``triplet/<branch>``, ``sdm``, ``feat_norm``,
    ``cem``) to *weighted*, detached-for-logging 0-d tensors whose sum is ``total``. The
    losses are called with ``host_stats=False``: computing the objective never waits for
    the device (the trainer makes the step's one sync itself).
    """

    def __init__(self, cfg: Any, bn_feat_dim: int | None = None) -> None:
        super().__init__()
        loss = cfg.LOSS
        self.id_weight = loss.ID_WEIGHT
        self.label_smoothing = loss.ID_LABEL_SMOOTHING
        self.triplet_weight = loss.TRIPLET_WEIGHT
        self.triplet_margin = loss.TRIPLET_MARGIN
        self.soft_margin = loss.TRIPLET_SOFT_MARGIN
        self.sdm_enabled = loss.SDM.ENABLED
        self.sdm_weight = loss.SDM.WEIGHT
        if loss.SDM.FORMULA not in ("fixed", "legacy"):
            raise ValueError(f"LOSS.SDM.FORMULA must be 'fixed' or 'legacy', got '{loss.SDM.FORMULA}'")
        self.sdm_formula = loss.SDM.FORMULA
        self.sdm_use_masks = loss.SDM.USE_MASKS
        self.sdm_temperature = SDMTemperature(
            init=loss.SDM.INIT_TEMPERATURE,
            final=loss.SDM.FINAL_TEMPERATURE,
            fallback=loss.SDM.FALLBACK_TEMPERATURE,
            anneal_epochs=loss.SDM.ANNEAL_EPOCHS,
            min_value=loss.SDM.MIN_TEMPERATURE,
            max_value=loss.SDM.MAX_TEMPERATURE,
            fallback_steps=loss.SDM.FALLBACK_STEPS,
        )
        self.feat_norm = loss.FEAT_NORM
        self.cem: GatedAttentionCEM | None = None
        if loss.CEM.ENABLED:
            if bn_feat_dim is None:
                raise ValueError("LOSS.CEM.ENABLED needs the model's BN-feature dimension (bn_feat_dim)")
            c = loss.CEM
            self.cem = GatedAttentionCEM(
                bn_feat_dim, attn_hidden=c.ATTN_HIDDEN, tau=c.TAU, margin=c.MARGIN, softplus_beta=c.BETA,
                snr_thresh=c.SNR_THRESH, snr_sharp=c.SNR_SHARP, class_gate_a=c.CLASS_GATE_A,
                class_gate_b=c.CLASS_GATE_B, slot_power=c.SLOT_POWER, loss_scale=c.LOSS_SCALE,
                warmup_epochs=c.WARMUP_EPOCHS,
            )
            self.cem_lr = c.LR

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The criterion's own trainable parameters (the CEM module), as optimizer groups."""
        if self.cem is None:
            return []
        return self.cem.param_groups(lr=self.cem_lr, weight_decay=weight_decay)

    def forward(
        self,
        outputs: dict[str, Any],
        pids: torch.Tensor,
        modality_mask: torch.Tensor | None,
        epoch: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms: dict[str, torch.Tensor] = {}
        for branch in outputs["branches"]:
            name = branch["name"]
            l_id, _ = id_loss(branch["logits"], pids, label_smoothing=self.label_smoothing, host_stats=False)
            l_tri, _ = triplet_loss(branch["feat"], pids, margin=self.triplet_margin, soft_margin=self.soft_margin,
                                    host_stats=False)
            terms[f"id/{name}"] = self.id_weight * l_id
            terms[f"triplet/{name}"] = self.triplet_weight * l_tri
        if self.sdm_enabled and self.sdm_weight > 0 and len(outputs.get("modality_feats", {})) >= 2:
            feats = outputs["modality_feats"]
            order = [m for m in MODALITY_ORDER if m in feats]
            mask = None if modality_mask is None else modality_mask[:, [MODALITY_ORDER.index(m) for m in order]]
            self.sdm_temperature.set_epoch(epoch)
            tau = self.sdm_temperature.value()
            if self.sdm_formula == "legacy":  # ablation: the pre-fix formula, which has no masks
                pairs = [sdm_loss_legacy(feats[m], feats[n], pids, tau, host_stats=False)[0]
                         for m, n in itertools.combinations(order, 2)]
                l_sdm = torch.stack(pairs).mean()
            else:
                l_sdm, _ = sdm_multimodal(feats, pids, mask if self.sdm_use_masks else None, order,
                                          temperature=tau, host_stats=False)
            terms["sdm"] = self.sdm_weight * l_sdm
        bn_feats = outputs.get("bn_feats")
        if self.feat_norm.ENABLED and bn_feats is not None:
            l_norm, _ = feature_norm_loss(
                bn_feats, target=self.feat_norm.TARGET, band=self.feat_norm.BAND, weight=self.feat_norm.WEIGHT,
                host_stats=False,
            )
            terms["feat_norm"] = l_norm
        if self.cem is not None and bn_feats is not None:
            l_cem, _ = self.cem(bn_feats, pids, epoch=epoch)
            terms["cem"] = l_cem
        total = torch.stack([t.float() for t in terms.values()]).sum()
        return total, {k: v.detach() for k, v in terms.items()}

    def observe_sdm(self, terms: dict[str, torch.Tensor]) -> None:
        """After the step's host sync: let the SDM schedule react to a non-finite SDM value."""
        if "sdm" in terms:
            self.sdm_temperature.observe(float(terms["sdm"]))

    def state(self) -> dict[str, Any]:
        """Checkpointable state (SDM schedule counters and the CEM module's weights)."""
        return {
            "sdm_temperature": self.sdm_temperature.state_dict(),
            "cem": self.cem.state_dict() if self.cem is not None else None,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.sdm_temperature.load_state_dict(state["sdm_temperature"])
        if self.cem is not None and state.get("cem") is not None:
            self.cem.load_state_dict(state["cem"])
