"""Feature extractors (ResNet-12, CLIP ViT, tiny test nets), registered by name."""
