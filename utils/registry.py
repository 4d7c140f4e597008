"""A name -> callable registry, one instance per component kind.

Configs name components (``MODEL.NAME: DeMo_SDTPS``, ``LOSS.NAMES: [sdm, id]``);
code looks them up here, so adding a model, loss or dataset is adding one
decorated function or class in one file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from utils.errors import UserError

T = TypeVar("T", bound=Callable[..., Any])


class NotImplementedYetError(UserError, KeyError):
    """Raised when a config names a component nobody has registered."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


class Registry:
    """Maps names to constructors for one kind of component.

    >>> BACKBONES = Registry("backbone")
    >>> @BACKBONES.register()
    ... def tiny(**kw): ...
    >>> BACKBONES.get("tiny")  # doctest: +ELLIPSIS
    <function tiny ...>
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise KeyError(f"{self.kind} '{key}' is already registered by {self._items[key]!r}")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        """Return the constructor registered as ``name`` or raise a clear error."""
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none yet"
            raise NotImplementedYetError(
                f"not implemented yet: {self.kind} '{name}' (registered {self.kind}s: {known})"
            )
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Look up ``name`` and call it with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._items)})"
