"""Half-precision copies of the weights only matmuls read, cast once for a whole evaluation.

Under autocast, every matmul casts its fp32 weight and bias to the half dtype on every call. Eager evaluation
caches those casts within one ``autocast`` block (one batch); a compiled evaluation runs them as kernels of its
graph, one per tensor per batch: about a hundred small kernels a batch in the CLIP tower. Inside
:func:`matmul_weights_in`, those parameters hold half copies instead, made once on entry, and autocast finds nothing
to cast. The copy is the same ``.to(dtype)`` rounding autocast applies, so every output keeps its bits.

A module opts in with ``matmul_only_parameters()``: the parameters that only matmuls (``F.linear``, ``@``) read,
never a layer norm or an addition, which autocast runs in fp32 and would read at half precision. The copies are
kept between evaluations (the same memory each time, so CUDA graphs recorded over them stay valid) and refreshed
from the parameters on every entry; on exit each parameter has its fp32 tensor back, untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from modeling.layers.triton_device import HALF_DTYPES


class HalfCopies:
    """Persistent half copies of ``params``, swapped into them by :meth:`swapped_in`."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self._copies: dict[torch.dtype, list[torch.Tensor]] = {}

    def _copies_for(self, dtype: torch.dtype) -> list[torch.Tensor]:
        copies = self._copies.get(dtype)
        if copies is None or any(c.shape != p.shape or c.device != p.device for c, p in zip(copies, self.params)):
            copies = [torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format) for p in self.params]
            self._copies[dtype] = copies
        return copies

    @contextlib.contextmanager
    def swapped_in(self, dtype: torch.dtype) -> Iterator[None]:
        """Inside, each parameter's data is its ``dtype`` copy, refreshed on entry; its own tensor on exit."""
        if dtype not in HALF_DTYPES:
            raise ValueError(f"half copies are fp16 or bf16, got {dtype}")
        full = [p.data for p in self.params]
        if any(t.dtype != torch.float32 for t in full):
            yield  # already half (or swapped in by an enclosing call): nothing to cast
            return
        copies = self._copies_for(dtype)
        with torch.no_grad():
            for copy, tensor in zip(copies, full):
                copy.copy_(tensor)
        for p, copy in zip(self.params, copies):
            p.data = copy
        try:
            yield
        finally:
            for p, tensor in zip(self.params, full):
                p.data = tensor


@contextlib.contextmanager
def matmul_weights_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Inside, the parameters of ``model``'s modules that declare ``matmul_only_parameters()`` hold ``dtype``
    copies (see the module docstring); with ``dtype`` None or fp32 (no autocast), nothing changes."""
    if dtype not in HALF_DTYPES:
        yield
        return
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if callable(getattr(module, "matmul_only_parameters", None)):
                stack.enter_context(_half_copies(module).swapped_in(dtype))
        yield


def _half_copies(module: nn.Module) -> HalfCopies:
    """The module's :class:`HalfCopies` (kept on it between evaluations; not state, not moved by ``.to()``)."""
    copies = module.__dict__.get("_half_copies")
    params = list(module.matmul_only_parameters())
    if copies is None or len(copies.params) != len(params) or any(a is not b for a, b in zip(copies.params, params)):
        copies = HalfCopies(params)
        module.__dict__["_half_copies"] = copies
    return copies
