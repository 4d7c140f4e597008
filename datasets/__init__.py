"""Benchmark loaders, the synthetic generators, samplers and transforms, registered by name."""
