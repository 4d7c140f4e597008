"""The modality order every package shares: batches, masks, model outputs and configs."""

from __future__ import annotations

#: RGB, near-infrared, thermal-infrared: the column order of modality masks everywhere.
MODALITIES: tuple[str, ...] = ("RGB", "NI", "TI")
