"""Half-precision copies of the weights only matmuls read, cast once for a whole evaluation.

Under autocast, every matmul casts its fp32 weight and bias to the half dtype on every call. Eager evaluation
caches those casts within one ``autocast`` block (one batch); a compiled evaluation runs them as kernels of its
graph, one per tensor per batch: about a hundred small kernels a batch in the CLIP tower. Inside
:func:`matmul_weights_in`, half copies made once on entry stand in those parameters' places, and autocast finds
nothing to cast. The copy is the same ``.to(dtype)`` rounding autocast applies, so every output keeps its bits.

A module opts in with ``matmul_only_parameters()``: the parameters that only matmuls (``F.linear``, ``@``) read,
never a layer norm or an addition, which autocast runs in fp32 and would read at half precision. The copies are
kept between evaluations (the same memory each time, so CUDA graphs recorded over them stay valid) and refreshed
from the parameters on every entry; on exit each module holds its own parameters again, untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from modeling.layers.triton_device import HALF_DTYPES


class HalfCopies:
    """Persistent half copies of ``params`` (each held in its module's ``_parameters`` under one name), put in their
    places by :meth:`swapped_in`.

    The copies replace the parameter *objects*, not their ``.data``: ``torch.compile`` sees the module's parameter
    dict change and compiles a graph for the half copies. Its guards may skip the tensors of a dict that did not
    change (``skip_tensor_guards_with_matching_dict_tags``, on by default): with only ``.data`` swapped, a compiled
    evaluation on torch 2.11 (an H100) gave wrong outputs.
    """

    def __init__(self, slots: Sequence[tuple[nn.Module, str]]) -> None:
        self.slots = list(slots)
        self.params = [owner._parameters[name] for owner, name in self.slots]
        self._copies: dict[torch.dtype, list[nn.Parameter]] = {}

    def _copies_for(self, dtype: torch.dtype) -> list[nn.Parameter]:
        copies = self._copies.get(dtype)
        if copies is None or any(c.shape != p.shape or c.device != p.device for c, p in zip(copies, self.params)):
            copies = [nn.Parameter(torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format),
                                   requires_grad=False) for p in self.params]
            self._copies[dtype] = copies
        return copies

    @contextlib.contextmanager
    def swapped_in(self, dtype: torch.dtype) -> Iterator[None]:
        """Inside, each parameter's place holds its ``dtype`` copy, refreshed on entry; the parameter itself again on
        exit (the optimizer's own objects, untouched)."""
        if dtype not in HALF_DTYPES:
            raise ValueError(f"half copies are fp16 or bf16, got {dtype}")
        current = [owner._parameters[name] for owner, name in self.slots]
        if any(a is not b for a, b in zip(current, self.params)) or any(p.dtype != torch.float32 for p in current):
            yield  # swapped in by an enclosing call, or not fp32 parameters: nothing to cast
            return
        copies = self._copies_for(dtype)
        with torch.no_grad():
            for copy, param in zip(copies, self.params):
                copy.copy_(param)
        for (owner, name), copy in zip(self.slots, copies):
            owner._parameters[name] = copy
        try:
            yield
        finally:
            for (owner, name), param in zip(self.slots, self.params):
                owner._parameters[name] = param


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
    wanted = {id(p) for p in module.matmul_only_parameters()}
    slots = [(owner, name) for owner in module.modules() for name, p in owner._parameters.items()
             if p is not None and id(p) in wanted]
    copies = module.__dict__.get("_half_copies")
    if copies is None or [(id(o), n) for o, n in copies.slots] != [(id(o), n) for o, n in slots] or any(
            a is not owner._parameters[name] for a, (owner, name) in zip(copies.params, slots)):
        if len(slots) != len(wanted):
            raise ValueError(f"{type(module).__name__}.matmul_only_parameters() names parameters it does not hold")
        copies = HalfCopies(slots)
        module.__dict__["_half_copies"] = copies
    return copies
