"""SDTPS token selection, importable from here as well: the code is :mod:`modeling.module.sdtps`,
beside DeMo's other modules (HDM, ATM, DGAF)."""

from modeling.module.sdtps import SDTPS, CrossModalAttention, TokenSparse, num_keep_tokens

__all__ = ["SDTPS", "CrossModalAttention", "TokenSparse", "num_keep_tokens"]
