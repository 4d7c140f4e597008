"""The loss registry: every loss is registered by name, and the objectives (:mod:`losses.reid_criterion`)
build their terms here by name with their hyper-parameters bound."""

from __future__ import annotations

import functools
from typing import Any

from utils.registry import Registry

LOSS_REGISTRY = Registry("loss")


def build_loss(name: str, **kwargs: Any) -> Any:
    """Build the loss registered as ``name`` with its hyper-parameters bound.

    Function losses (``sdm``, ``id``, ``triplet``, ``feature_norm``) come back as a
    ``functools.partial`` with ``kwargs`` bound, so ``build_loss("sdm", temperature=0.2)(a, b, pids)``
    works; module losses that own parameters (``cem``) come back as an instance,
    ``GatedAttentionCEM(**kwargs)``. Either way the result is called with tensors and
    returns ``(loss, stats)``.
    """
    obj = LOSS_REGISTRY.get(name)
    if isinstance(obj, type):
        return obj(**kwargs)
    return functools.partial(obj, **kwargs)
