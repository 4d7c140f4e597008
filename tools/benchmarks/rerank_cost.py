"""Task ``rerank``: time k-reciprocal re-ranking (``TEST.RE_RANKING``) at a given size, and its peak device memory.

The features are clustered like ReID features: ``--ids`` identity centres on the unit sphere, every sample its
identity's centre plus Gaussian noise, normalised as the evaluator normalises them. One small warm-up call runs
first (kernel loading); the timed call is the full size. ``--deterministic`` turns on torch's strict
deterministic algorithms, as ``DETERMINISTIC True`` does in a run. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from engine.re_ranking import re_ranking
from tools.benchmarks.timing import sync


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-query", type=int, default=20000)
    parser.add_argument("--num-gallery", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ids", type=int, default=2000, help="identity clusters")
    parser.add_argument("--k1", type=int, default=50)
    parser.add_argument("--k2", type=int, default=15)
    parser.add_argument("--lambda-value", type=float, default=0.3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--deterministic", action="store_true", help="strict deterministic algorithms")


def clustered_features(n: int, dim: int, ids: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` unit vectors (n, dim) in ``ids`` clusters (identity ``i % ids``), spread ``noise`` around their centre."""
    centres = F.normalize(torch.randn(ids, dim, generator=generator), dim=1)
    x = centres[torch.arange(n) % ids] + noise * torch.randn(n, dim, generator=generator) / dim**0.5
    return F.normalize(x, dim=1)


def bench(num_query: int, num_gallery: int, dim: int, ids: int, k1: int, k2: int, lambda_value: float,
          device: torch.device, noise: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Seconds and peak memory (GiB above the inputs, CUDA only) of one re-ranking of ``num_query`` x
    ``num_gallery``."""
    gen = torch.Generator().manual_seed(seed)
    qf = clustered_features(num_query, dim, ids, noise, gen).to(device)
    gf = clustered_features(num_gallery, dim, ids, noise, gen).to(device)
    small = min(num_query, 256)
    re_ranking(qf[:small], gf[:small], k1=min(k1, 2 * small - 2), k2=min(k2, k1), lambda_value=lambda_value)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    dist = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value)
    sync(device)
    seconds = time.perf_counter() - start
    out = {"num_query": num_query, "num_gallery": num_gallery, "k1": k1, "k2": k2, "seconds": round(seconds, 3),
           "finite": bool(torch.isfinite(dist).all())}
    if device.type == "cuda":
        out["peak_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)
        out["output_gib"] = round(dist.numel() * dist.element_size() / 2**30, 3)
    return out


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    result = bench(args.num_query, args.num_gallery, args.dim, args.ids, args.k1, args.k2, args.lambda_value,
                   torch.device(args.device))
    result["deterministic"] = args.deterministic
    print(json.dumps(result))
    return 0
