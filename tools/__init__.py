"""Command-line tools: sweeps, ablation tables, plots and benchmarks."""
