"""The modality order every package shares: batches, masks, model outputs, losses and configs.

Its one definition: import :data:`MODALITIES` from here rather than spelling the names out.
"""

from __future__ import annotations

#: RGB, near-infrared, thermal-infrared: the column order of modality masks everywhere.
MODALITIES: tuple[str, ...] = ("RGB", "NI", "TI")
