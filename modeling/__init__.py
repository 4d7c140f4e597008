"""Backbones, shared layers and the two model families (ExpB1, DeMo-SDTPS), built by name."""
