"""Calls that cross the package against the direction of its imports, through entries filled by their owners.

The import graph points one way (tools -> nn, distributed -> functional -> _conv -> algorithms -> backends ->
helpers; ``tests/test_house.py`` checks it has no cycle). Two calls go the other way, and go through here,
so that the module that makes the call imports only this one:

- **hand-offs**: :func:`conv2d.conv2d` on an array that another engine runs (a dask array) asks each
  registered hand-off in turn. ``conv2d/__init__.py`` registers the dask one, which imports
  :mod:`conv2d.distributed` only when a dask array arrives, so the core imports neither dask nor the
  integration module, and a user need not import :mod:`conv2d.distributed` first.
- **eager functions**: the torch backend's ``torch.compile`` operators run :func:`conv2d.conv2d` and
  :func:`conv2d.conv2d_backward` when a compiled graph executes; ``conv2d._functional`` registers them here
  on import (always before a backend is built: ``conv2d/__init__.py`` imports it first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: A hand-off: ``(function name, the call's arrays, its keyword options) -> result``, or ``NotImplemented``
#: when the call is not for it.
Handoff = Callable[[str, tuple[Any, ...], dict[str, Any]], Any]

_handoffs: list[Handoff] = []
_eager: dict[str, Callable[..., Any]] = {}


def register_handoff(handoff: Handoff) -> None:
    """Let `handoff` take calls on arrays it recognises (registering it twice is registering it once)."""
    if handoff not in _handoffs:
        _handoffs.append(handoff)


def handed_off(function: str, arrays: tuple[Any, ...], options: dict[str, Any]) -> Any:
    """The result of the first hand-off that takes the call, else ``NotImplemented``."""
    for handoff in _handoffs:
        result = handoff(function, arrays, options)
        if result is not NotImplemented:
            return result
    return NotImplemented


def register_eager(name: str, function: Callable[..., Any]) -> None:
    """Register the eager implementation of the public function `name` ("conv2d" or "conv2d_backward")."""
    _eager[name] = function


def eager(name: str) -> Callable[..., Any]:
    """The eager implementation of the public function `name`, as registered by ``conv2d._functional``."""
    return _eager[name]
