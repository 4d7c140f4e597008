"""SDTPS token selection: the public import path.

Users import from here (``from modeling.sdtps import SDTPS, CrossModalAttention, TokenSparse``);
the code lives in :mod:`modeling.module.token_selection`, beside DeMo's other parts (HDM, ATM, DGAF).
"""

from modeling.module.token_selection import (
    SDTPS,
    CrossModalAttention,
    SDTPSOutput,
    TokenSparse,
    num_keep_tokens,
)

__all__ = ["SDTPS", "CrossModalAttention", "SDTPSOutput", "TokenSparse", "num_keep_tokens"]
