"""Identity (classification) loss: cross-entropy with label smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import finish_stats
from .registry import LOSS_REGISTRY


def id_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.1,
    host_stats: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy against the smoothed target ``(1 - eps) * onehot + eps / C``.

    Args:
        logits: (B, C) class scores (any float dtype; computed in float32).
        targets: (B,) integer class ids in [0, C).
        label_smoothing: ``eps`` in [0, 1) (DeMo / fast-reid use 0.1).

    Returns:
        loss: 0-d float32, ``mean_i [(1 - eps) * -log p_i[y_i] + eps * mean_c -log p_i[c]]``
            (the same value as ``F.cross_entropy(..., label_smoothing=eps)``);
        stats: floats ``id`` (the loss) and ``id_acc`` (top-1 accuracy of the batch).

    Needs no cross-rank gathering: it is a mean over independent samples, and DDP
    averages the gradients.
    """
    if logits.dim() != 2:
        raise ValueError(f"id_loss expects (B, C) logits, got {tuple(logits.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    targets = targets.reshape(-1).long().to(logits.device)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_p = F.log_softmax(logits.float(), dim=1)
        nll = -log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
        smooth = -log_p.mean(dim=1)
        loss = ((1.0 - label_smoothing) * nll + label_smoothing * smooth).mean()
        acc = (log_p.detach().argmax(dim=1) == targets).float().mean()
    return loss, finish_stats({"id": loss.detach(), "id_acc": acc}, host_stats)


LOSS_REGISTRY.register("id")(id_loss)
