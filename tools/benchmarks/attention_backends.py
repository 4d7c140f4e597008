"""Task ``attention``: scaled-dot-product attention at the CLIP tower's shape, per kernel.

For each of SDPA's kernels (``math``, ``flash``, ``efficient``, ``cudnn``, through
``torch.nn.attention.sdpa_kernel``), ``explicit`` (softmax(q k^T / sqrt(d)) v written out: two matmuls and a
float32 softmax), compiled flex attention when asked (``flex``, ``flex:B``) and the repository's fixed-order
Triton kernels (``triton``, ``triton:B``: :mod:`modeling.layers.fixed_order_attention`), one row: forward ms
(no grad), forward + backward ms, peak MiB of the latter, whether ``--repeats`` identical backward passes give
bit-identical gradients (what ``DETERMINISTIC`` needs), and the largest error of the output and of q's gradient
against a float64 reference, relative to the reference's largest value. A kernel this device or torch cannot
run at this shape is reported as unavailable, with torch's reason.
``--deterministic`` first sets what ``DETERMINISTIC True`` sets (torch's strict deterministic algorithms): flash
and memory-efficient then run their deterministic backward variants and cuDNN's attention is excluded.

The default shape is ViT-B/16 at 256x128 in the ReID family: 129 tokens (128 patches and the class token),
12 heads of 64, a batch of 64 samples x 3 modalities = 192 sequences.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.device import _DTYPES
from engine.seed import seed_everything
from modeling.layers.fixed_order_attention import DEFAULT_BLOCK, fixed_order_attention
from tools.benchmarks.timing import peak_memory, repeat, reset_peak_memory, seconds_per_call

KERNELS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=192, help="sequences (samples x modalities)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=129)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=sorted(_DTYPES))
    parser.add_argument("--kernels", default="math,flash,efficient,cudnn,explicit,triton")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="identical backward passes compared bit for bit")
    parser.add_argument("--deterministic", action="store_true", help="torch's strict deterministic algorithms")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the softmax in float32 (matmuls in the inputs' dtype)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.float().softmax(-1).to(q.dtype) @ v


def _tile(kernel: str) -> int | None:
    """B of a ``flex:B`` or ``triton:B`` kernel name; None for a name without one."""
    return int(kernel.split(":", 1)[1]) if ":" in kernel else None


def flex_fn(kernel: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Compiled ``flex_attention`` (Triton kernels inductor generates, forward and backward) with no mask:
    ``flex`` with torch's tile sizes, ``flex:B`` with B x B tiles in the forward and both backward loops."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    block = _tile(kernel)
    options = {key: block for key in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
               } if block else {}

    def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compiled(q, k, v, kernel_options=options or None)

    return flex


def attention_fn(kernel: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The attention of ``kernel``: SDPA restricted to that kernel, :func:`explicit_attention`, compiled
    flex attention (:func:`flex_fn`) or the fixed-order kernels."""
    if kernel == "explicit":
        return explicit_attention
    if kernel == "flex" or kernel.startswith("flex:"):
        return flex_fn(kernel)
    if kernel == "triton" or kernel.startswith("triton:"):
        block = _tile(kernel) or DEFAULT_BLOCK
        return lambda q, k, v: fixed_order_attention(q, k, v, block=block)

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([KERNELS[kernel]]):
            return F.scaled_dot_product_attention(q, k, v)

    return sdpa


def measure(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor,
            reference: tuple[torch.Tensor, torch.Tensor], steps: int, warmup: int, repeats: int) -> dict:
    """One row for ``kernel`` (see the module docstring)."""
    fn, device = attention_fn(kernel), q.device
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    try:
        with torch.no_grad():
            out = fn(q, k, v)
    except Exception as err:  # no kernel for this device, dtype, shape or mode (flex: a compile error)
        return {"kernel": kernel, "available": False, "reason": (str(err).splitlines() or [""])[0][:200]}

    def forward() -> None:
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward() -> tuple[torch.Tensor, ...]:
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)
        return tuple(t.grad for t in leaves)

    repeat(forward, warmup, device)
    fwd = seconds_per_call(forward, steps, device)
    try:
        repeat(forward_backward, max(1, warmup), device)  # at least once: a refused backward is reported here
    except RuntimeError as err:  # e.g. strict deterministic algorithms refusing a backward
        return {"kernel": kernel, "available": True, "forward_ms": 1e3 * fwd, "backward": False,
                "reason": str(err).splitlines()[0][:200]}
    reset_peak_memory(device)
    both = seconds_per_call(forward_backward, steps, device)
    first = [g.clone() for g in forward_backward()]
    identical = all(all(torch.equal(a, b) for a, b in zip(first, forward_backward())) for _ in range(repeats - 1))
    ref_out, ref_dq = reference
    return {"kernel": kernel, "available": True, "backward": True, "forward_ms": 1e3 * fwd,
            "forward_backward_ms": 1e3 * both, "peak_mib": peak_memory(device, unit=2**20),
            "bitwise_repeatable": identical,
            "out_rel_error": float((out.double() - ref_out).abs().max() / ref_out.abs().max()),
            "dq_rel_error": float((first[0].double() - ref_dq).abs().max() / ref_dq.abs().max())}


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    device, dtype = torch.device(args.device), _DTYPES[args.precision]
    unknown = [k for k in args.kernels.split(",") if k not in (*KERNELS, "explicit", "flex", "triton")
               and not re.fullmatch(r"(flex|triton):(16|32|64|128)", k)]
    if unknown:
        parser.error(f"--kernels: unknown {unknown}; choose from {', '.join((*KERNELS, 'explicit', 'flex', 'triton'))}"
                     f" or flex:B, triton:B (B x B tiles, B 16, 32, 64 or 128)")
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (the backward passes compared)")
    if args.deterministic:
        seed_everything(0, deterministic=True)  # exactly what a DETERMINISTIC True run sets (no fills)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref_out = explicit_attention_64(q64, k64, v64)
    ref_out.backward(grad.double())
    rows = [measure(kernel, q, k, v, grad, (ref_out.detach(), q64.grad), args.steps, args.warmup, args.repeats)
            for kernel in args.kernels.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"attention {list(shape)} {args.precision} on {name}, torch {torch.__version__}"
          f"{', strict deterministic algorithms' if args.deterministic else ''}")
    print(f"{'kernel':<10}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MiB':>10}{'repeatable':>12}{'out err':>10}"
          f"{'dq err':>10}")
    for r in rows:
        if not r["available"] or not r.get("backward"):
            fwd = f"{r['forward_ms']:>9.3f}" if "forward_ms" in r else f"{'-':>9}"
            print(f"{r['kernel']:<10}{fwd}  unavailable{'' if not r['available'] else ' backward'}: {r['reason']}")
            continue
        print(f"{r['kernel']:<10}{r['forward_ms']:>9.3f}{r['forward_backward_ms']:>12.3f}{r['peak_mib']:>10.0f}"
              f"{str(r['bitwise_repeatable']):>12}{r['out_rel_error']:>10.1e}{r['dq_rel_error']:>10.1e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "shape": list(shape), "precision": args.precision,
                       "deterministic": args.deterministic, "torch": torch.__version__, "rows": rows}, handle, indent=1)
    return 0


def explicit_attention_64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The float64 reference: softmax(q k^T / sqrt(d)) v, every step in float64."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
