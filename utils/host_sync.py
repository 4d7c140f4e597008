"""Find, without a GPU, the operations that would make the host wait for a CUDA device.

The host queues a training step and runs ahead while the GPU works, until an operation needs a value back
(``item``, ``nonzero``, a boolean-mask index) or sends host data to the device from pageable memory (a Python
list used as an index, a Python scalar written into a tensor with ``t[idx] = True``): such a copy waits for
everything queued before it. Each wait leaves the GPU idle while the host catches up.

:class:`HostSyncAudit` records those operations while code runs on fake CUDA tensors
(:func:`fake_cuda`), which CPU tests can do::

    with fake_cuda() as to_cuda:
        inputs = to_cuda(inputs)
        with HostSyncAudit() as audit:
            loss_fn(*inputs)
    assert not audit.found, audit.found
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_TORCH_DIR = str(Path(torch.__file__).parent)
#: operations whose result the host must read back from the device
_READS_BACK = ("aten._local_scalar_dense", "aten.nonzero.")


class HostSyncAudit(TorchDispatchMode):
    """Records each operation that would wait for the device: one that reads a value back, indexes by a boolean
    mask (its size is on the device), copies a host tensor to CUDA, or takes host and CUDA tensors together.
    ``found`` lists them as ``"op at file:line"``."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        to_cuda = name.startswith(("aten._to_copy", "aten.copy_")) and "cpu" in devices and (
            str(kwargs.get("device", "")).startswith("cuda") or "cuda" in devices)
        indices = args[1] if name.startswith(("aten.index.", "aten.index_put")) and len(args) > 1 else ()
        by_mask = any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
        if name.startswith(_READS_BACK) or to_cuda or by_mask or {"cpu", "cuda"} <= devices:
            self.found.append(f"{name} at {_caller()}")
        return func(*args, **kwargs)


def _caller() -> str:
    """The innermost frame outside torch and this module: the line that issued the operation."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def fake_cuda() -> Iterator[Callable[[Any], Any]]:
    """A fake-tensor context in which CUDA tensors exist without a GPU; yields a function that moves a tensor,
    a module or a nested structure of tensors to fake CUDA (floating tensors that required grad still do)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def to_cuda(obj: Any) -> Any:
        if isinstance(obj, torch.nn.Module):
            return obj.to("cuda")

        def one(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            moved = mode.from_tensor(t.detach()).to("cuda")
            return moved.requires_grad_(t.requires_grad)
        return tree_map(one, obj)

    with mode:
        yield to_cuda
