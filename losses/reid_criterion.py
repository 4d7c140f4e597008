"""The ReID training objective: ID + triplet per branch, masked SDM between modalities, regularisers.

The model returns what it computed (``branches``, ``modality_feats``, ``bn_feats``); this
object turns that into one scalar and a dict of detached terms for logging, driven by
``cfg.LOSS``. Each term is a loss of the registry (:func:`losses.registry.build_loss`), built
once with its hyper-parameters. It owns the stateful pieces (the SDM temperature schedule,
the conditional-entropy module) so the trainer can checkpoint them.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from utils.modalities import MODALITIES

from .registry import build_loss
from .sdm_temperature import SDMTemperature


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
        self.triplet_weight = loss.TRIPLET_WEIGHT
        self.id_loss = build_loss("id", label_smoothing=loss.ID_LABEL_SMOOTHING, host_stats=False)
        self.triplet_loss = build_loss("triplet", margin=loss.TRIPLET_MARGIN, soft_margin=loss.TRIPLET_SOFT_MARGIN,
                                       host_stats=False)
        self.sdm_enabled = loss.SDM.ENABLED
        self.sdm_weight = loss.SDM.WEIGHT
        if loss.SDM.FORMULA not in ("fixed", "legacy"):
            raise ValueError(f"LOSS.SDM.FORMULA must be 'fixed' or 'legacy', got '{loss.SDM.FORMULA}'")
        self.sdm_formula = loss.SDM.FORMULA
        self.sdm_use_masks = loss.SDM.USE_MASKS
        self.sdm_center = loss.SDM.CENTER
        #: detached values of the last forward to log beside the terms (SDM's cross-modal cosines)
        self.stats: dict[str, torch.Tensor] = {}
        self.sdm_fixed = build_loss("sdm_multimodal", host_stats=False)
        self.sdm_legacy = build_loss("sdm_legacy", host_stats=False)
        self.sdm_temperature = SDMTemperature(
            init=loss.SDM.INIT_TEMPERATURE,
            final=loss.SDM.FINAL_TEMPERATURE,
            fallback=loss.SDM.FALLBACK_TEMPERATURE,
            anneal_epochs=loss.SDM.ANNEAL_EPOCHS,
            min_value=loss.SDM.MIN_TEMPERATURE,
            max_value=loss.SDM.MAX_TEMPERATURE,
            fallback_steps=loss.SDM.FALLBACK_STEPS,
        )
        fn = loss.FEAT_NORM
        self.feat_norm_enabled = fn.ENABLED
        self.feat_norm = build_loss("feature_norm", target=fn.TARGET, band=fn.BAND, weight=fn.WEIGHT, host_stats=False)
        self.cem: nn.Module | None = None
        if loss.CEM.ENABLED:
            if bn_feat_dim is None:
                raise ValueError("LOSS.CEM.ENABLED needs the model's BN-feature dimension (bn_feat_dim)")
            c = loss.CEM
            self.cem = build_loss(
                "cem", feat_dim=bn_feat_dim, attn_hidden=c.ATTN_HIDDEN, tau=c.TAU, margin=c.MARGIN,
                softplus_beta=c.BETA, snr_thresh=c.SNR_THRESH, snr_sharp=c.SNR_SHARP, class_gate_a=c.CLASS_GATE_A,
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
        total, terms, self.stats = self.compute(outputs, pids, modality_mask, self.temperature(epoch), epoch)
        return total, terms

    def temperature(self, epoch: float) -> float:
        """The SDM temperature the schedule gives at (fractional) ``epoch``."""
        self.sdm_temperature.set_epoch(epoch)
        return self.sdm_temperature.value()

    def compute(
        self,
        outputs: dict[str, Any],
        pids: torch.Tensor,
        modality_mask: torch.Tensor | None,
        temperature: float | torch.Tensor,
        epoch: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(total, terms, stats)`` at SDM temperature ``temperature`` (a float or a 0-d tensor); changes no
        state, so it can run inside a compiled step. ``epoch`` is needed only by the CEM term."""
        terms: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        for branch in outputs["branches"]:
            name = branch["name"]
            terms[f"id/{name}"] = self.id_weight * self.id_loss(branch["logits"], pids)[0]
            terms[f"triplet/{name}"] = self.triplet_weight * self.triplet_loss(branch["feat"], pids)[0]
        if self.sdm_enabled and self.sdm_weight > 0 and len(outputs.get("modality_feats", {})) >= 2:
            feats = outputs["modality_feats"]
            order = [m for m in MODALITIES if m in feats]  # MODALITIES: the mask's column order
            # columns picked one by one: indexing with a list would copy it to the device and wait for the copy
            mask = None if modality_mask is None else torch.stack(
                [modality_mask[:, MODALITIES.index(m)] for m in order], dim=1)
            tau = temperature
            if self.sdm_formula == "legacy":  # ablation: the ce - h formula, which has no masks
                pairs = [self.sdm_legacy(feats[m], feats[n], pids, tau)[0] for m, n in itertools.combinations(order, 2)]
                l_sdm = torch.stack(pairs).mean()
            else:
                l_sdm, sdm_stats = self.sdm_fixed(feats, pids, mask if self.sdm_use_masks else None, order,
                                                  temperature=tau, center=self.sdm_center)
                stats.update({"sdm/unweighted": sdm_stats["sdm"], "sdm/pos_cos": sdm_stats["sdm_pos_cos"],
                              "sdm/neg_cos": sdm_stats["sdm_neg_cos"]})
            terms["sdm"] = self.sdm_weight * l_sdm
        bn_feats = outputs.get("bn_feats")
        if self.feat_norm_enabled and bn_feats is not None:
            terms["feat_norm"] = self.feat_norm(bn_feats)[0]
        if self.cem is not None and bn_feats is not None:
            if epoch is None:
                raise ValueError("the CEM term needs the epoch (its warm-up)")
            l_cem, _ = self.cem(bn_feats, pids, epoch=epoch)
            terms["cem"] = l_cem
        total = torch.stack([t.float() for t in terms.values()]).sum()
        return total, {k: v.detach() for k, v in terms.items()}, stats

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
