"""Caches bounded in bytes: the gather plans (and their transposes) each backend keeps on its device.

A plan is one integer per patch element of one sample, so a large image's plan is hundreds of MB:
caches bounded by a count of entries pinned gigabytes (device memory on a GPU). Each cache keeps at
most ``CONV2D_PLAN_CACHE`` bytes (e.g. ``"256MB"``; ``"0"`` keeps nothing; read at each insertion;
default 64 MiB), dropping the least recently used first; a plan larger than that is rebuilt at
each use. :func:`clear_caches` empties every cache at once.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from ._workspace import parse_size

ENV_VAR = "CONV2D_PLAN_CACHE"
DEFAULT_BYTES = 64 * 2**20

_ALL: weakref.WeakSet[ByteCache] = weakref.WeakSet()


def cache_limit() -> int:
    """``CONV2D_PLAN_CACHE`` in bytes (read at each call), else 64 MiB."""
    text = os.environ.get(ENV_VAR, "").strip()
    return parse_size(text, f"the {ENV_VAR} environment variable", minimum=0) if text else DEFAULT_BYTES


class ByteCache:
    """A least-recently-used map whose values together hold at most :func:`cache_limit` bytes."""

    def __init__(self) -> None:
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        _ALL.add(self)

    @property
    def nbytes(self) -> int:
        """Bytes held now (as reported by the makers)."""
        return self._bytes

    def get(self, key: Hashable, make: Callable[[], tuple[Any, int]]) -> Any:
        """The value kept for `key`, else ``make()``'s (value, size in bytes), kept if it fits."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value, size = make()  # outside the lock: building a plan can take a while
        limit = cache_limit()
        with self._lock:
            if key in self._items or size > limit:  # made meanwhile by another thread, or too big to keep
                return value
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > limit:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
        return value

    def values(self) -> list[Any]:
        """The values kept now, least recently used first."""
        with self._lock:
            return [value for value, _ in self._items.values()]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def clear_caches() -> None:
    """Drop every gather plan conv2d keeps, on the host and on every device.

    Plans are rebuilt when next needed. The caches are bounded by ``CONV2D_PLAN_CACHE`` bytes
    each (default 64 MiB); call this to give the memory back at once, e.g. before a large
    allocation on a GPU.

    Examples
    --------
    >>> import conv2d
    >>> conv2d.clear_caches()
    """
    for cache in list(_ALL):
        cache.clear()
