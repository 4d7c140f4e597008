"""Half-precision copies of the weights only matmuls read, cast once for a whole evaluation.

Under autocast, every matmul casts its fp32 weight and bias to the half dtype on every call. Eager evaluation
caches those casts within one ``autocast`` block (one batch); a compiled evaluation runs them as kernels of its
graph on every batch (98 tensors in the ViT-B/16 tower). Inside
:func:`matmul_weights_in`, half copies made once on entry stand in those parameters' places, and autocast finds
nothing to cast. The copy is the same ``.to(dtype)`` rounding autocast applies, so every output keeps its bits.

A module opts in with ``matmul_only_parameters()``: the parameters that only matmuls (``F.linear``, ``@``) read,
never a layer norm or an addition, which autocast runs in fp32 and would read at half precision. The copies are
kept between evaluations (the same memory each time, so CUDA graphs recorded over them stay valid) and refreshed
from the parameters on every entry; on exit each module holds its own parameters again, untouched.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from modeling.layers.triton_device import HALF_DTYPES

#: (id of a parameter, dtype) -> its persistent half copy; an entry goes when its parameter is collected
_COPIES: dict[tuple[int, torch.dtype], nn.Parameter] = {}


@contextlib.contextmanager
def matmul_weights_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Inside, the parameters of ``model``'s modules that declare ``matmul_only_parameters()`` have ``dtype``
    copies in their places (see the module docstring), refreshed on entry; on exit each module holds its own
    parameters again (the optimizer's objects, untouched). With ``dtype`` None or fp32 (no autocast), or parameters
    that are half already (an enclosing call's copies), nothing changes.

    The copies replace the parameter *objects*, not their ``.data``: ``torch.compile`` sees the modules' parameter
    dicts change and compiles a graph for the copies. Its guards may skip the tensors of a dict that did not change
    (``skip_tensor_guards_with_matching_dict_tags``, on by default): with only ``.data`` swapped, a compiled
    evaluation on torch 2.11 (an H100) gave wrong outputs.
    """
    slots = [slot for module in model.modules() if callable(getattr(module, "matmul_only_parameters", None))
             for slot in _slots(module)] if dtype in HALF_DTYPES else []
    params = [owner._parameters[name] for owner, name in slots]
    if not params or any(p.dtype != torch.float32 for p in params):
        yield
        return
    copies = [_copy_of(p, dtype) for p in params]
    with torch.no_grad():
        for copy, param in zip(copies, params):
            copy.copy_(param)
    for (owner, name), copy in zip(slots, copies):
        owner._parameters[name] = copy
    try:
        yield
    finally:
        for (owner, name), param in zip(slots, params):
            owner._parameters[name] = param


def _slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owning module, name) of each of ``module.matmul_only_parameters()``."""
    wanted = {id(p) for p in module.matmul_only_parameters()}
    slots = [(owner, name) for owner in module.modules() for name, p in owner._parameters.items()
             if p is not None and id(p) in wanted]
    if len(slots) != len(wanted):
        raise ValueError(f"{type(module).__name__}.matmul_only_parameters() names parameters it does not hold")
    return slots


def _copy_of(param: nn.Parameter, dtype: torch.dtype) -> nn.Parameter:
    """The persistent ``dtype`` copy of ``param`` (the same memory at every evaluation, so CUDA graphs recorded over
    it stay valid; new only when the parameter's shape or device changed)."""
    key = (id(param), dtype)
    copy = _COPIES.get(key)
    if copy is None:
        weakref.finalize(param, _COPIES.pop, key, None)
    if copy is None or copy.shape != param.shape or copy.device != param.device:
        copy = nn.Parameter(torch.empty_like(param, dtype=dtype, memory_format=torch.preserve_format),
                            requires_grad=False)
        _COPIES[key] = copy
    return copy
