"""Where a profiled region's device time goes, by kind of kernel.

A torch.profiler trace names each CUDA kernel; :func:`kernel_kind` sorts a name into a kind by :data:`RULES`
(inductor's generated kernels by their prefix, so a fused kernel named after an attention op counts as
compiled; attention before matmul: memory-efficient and cuDNN attention kernels carry CUTLASS and wgmma names), and
:func:`kernel_mix` sums the kernels' own device time per kind. This answers "is the step bound by its
matmuls, its attention, or the small kernels between them" without reading a 40-row op table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

#: (kind, pattern of kernel names), searched case-insensitively in this order; the first match wins
RULES: tuple[tuple[str, str], ...] = (
    ("matmul", r"^triton_tem"),
    ("compiled (triton)", r"^triton_"),
    ("attention", r"flash|fmha|sdpa|attention|attn"),
    ("matmul", r"gemm|xmma|nvjet|cublas|wgmma|matmul|cutlass"),
    ("normalisation", r"norm"),
    ("softmax", r"softmax"),
    ("copy / fill", r"memcpy|memset|copy|fill|cat|index"),
    ("elementwise / reduce", r"elementwise|vectorized|reduce|unrolled"),
)
OTHER = "other"


def kernel_kind(name: str) -> str:
    """The kind (of :data:`RULES`, else ``"other"``) of the CUDA kernel called ``name``."""
    return next((kind for kind, pattern in RULES if re.search(pattern, name, re.IGNORECASE)), OTHER)


def kernel_mix(events: Iterable[Any]) -> dict[str, float]:
    """Device microseconds per kernel kind over profiler ``events`` (``prof.key_averages()``); only kernels
    count (events that ran on the device), each by its own time, so nested ops are not counted twice."""
    mix: dict[str, float] = {}
    for event in events:
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            kind = kernel_kind(event.key)
            mix[kind] = mix.get(kind, 0.0) + float(getattr(event, "self_device_time_total", 0.0))
    return mix


def mix_table(mix: dict[str, float], calls: int, title: str) -> str:
    """``mix`` as a Markdown table: device ms per call and share of the device time, largest first."""
    total = sum(mix.values())
    if total <= 0:
        return f"{title}: no device kernels were recorded\n"
    lines = [f"{title} (device time per call, {calls} calls)", "", "| kernel kind | ms / call | share |",
             "|---|---|---|"]
    for kind, us in sorted(mix.items(), key=lambda item: -item[1]):
        lines.append(f"| {kind} | {us / 1e3 / calls:.2f} | {100 * us / total:.1f}% |")
    lines.append(f"| all | {total / 1e3 / calls:.2f} | 100% |")
    return "\n".join(lines) + "\n"
