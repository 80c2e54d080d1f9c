"""The whole-call algorithm behind ``algorithm="kernels"`` on NumPy: which kernel set runs a layer.

float16 is computed in float32 (Numba has no float16 arithmetic, NumPy no float16 BLAS) and rounded
back once; every other dtype (float32, float64, complex64, complex128) runs as it is.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ..._geometry import Geometry
from ..._workspace import sample_ranges
from .._cpu_cache import l2_cache_bytes
from . import direct, im2col, pointwise, winograd
from ._threads import worker_count

# Grouped layers with at most this many channels per group run the direct kernels (no patch matrix).
# Measured (one thread, float32, 3x3 pad 1, as many filters per group as channels per group; direct
# f+b / im2col f+b): N16 C96 24x24 stride 1: 0.19 (1 channel a group), 0.33 (2), 0.72 (4), 0.68 (6),
# 1.05 (8), 1.38 (16); N32 C64 32x32 stride 1: 0.32 (2), 0.56 (4); N16 C96 48x48 stride 2: 0.33 (1),
# 0.61 (2), 0.92 (4). 6 would still pay at stride 1; 4 keeps the margin where strides are mixed in.
DIRECT_MAX_CHANNELS_PER_GROUP = 4


def kernel_set(geom: Geometry) -> ModuleType:
    """The kernel module that computes `geom`."""
    if geom.groups > 1 and geom.channels_per_group <= DIRECT_MAX_CHANNELS_PER_GROUP:
        return direct
    if pointwise.applies(geom):  # 1x1, stride 1, no padding: products on the arrays themselves
        return pointwise
    if winograd.winograd_pays(geom):  # 3x3, stride 1, dilation 1, where measured faster than im2col
        return winograd
    return im2col


def _widened_bytes(geom: Geometry) -> int:
    """One float16 sample's float32 copies: its input and output gradient, and their results."""
    return 2 * 4 * (geom.in_channels * geom.height * geom.width + geom.out_channels * geom.out_h * geom.out_w)


def _sample_ranges(geom: Geometry, batch: int, dtype: Any, limit: int) -> list[tuple[int, int]]:
    """The whole batch at once, but float16 in chunks of samples whose float32 copies take at most
    half the workspace limit."""
    if dtype != np.float16:
        return [(0, batch)]
    return sample_ranges(batch, limit // 2 // _widened_bytes(geom))


def _working(a: np.ndarray) -> np.ndarray:
    """`a` as the kernels read it: float16 widened to float32 (a copy of one chunk of samples), any other
    array as it is. The kernels read any strides (a broadcast or transposed view too), so an input is
    never copied whole: the scratch stays what the kernel set says."""
    return a.astype(np.float32) if a.dtype == np.float16 else a


class Compiled:
    """``algorithm="kernels"`` on NumPy: whole calls, split into tasks by :mod:`._threads`."""

    name = "kernels"

    @staticmethod
    def spreads_nonfinite(geom: Geometry) -> bool:
        """Whether an inf or NaN can reach more outputs than read it (the Winograd transforms')."""
        return bool(getattr(kernel_set(geom), "SPREADS_NONFINITE", False))

    @staticmethod
    def fits(geom: Geometry, itemsize: int, limit: int) -> bool:
        """Whether the tasks' scratch, and for float16 one sample's float32 copies, are within `limit`
        (the tasks' chunks are sized to the cache: their scratch does not grow with the batch)."""
        widened = 0
        if itemsize < 4:  # float16 is computed in float32
            itemsize, widened = 4, _widened_bytes(geom)
        return widened + worker_count() * kernel_set(geom).scratch(geom, itemsize, l2_cache_bytes()) <= limit

    @staticmethod
    def forward(backend: Any, x: Any, weight: Any, bias: Any | None, geom: Geometry, limit: int,
                deterministic: bool) -> Any:
        kernels, workers, cache = kernel_set(geom), worker_count(), l2_cache_bytes()
        w, b = _working(weight), None if bias is None else _working(bias)
        pieces = [kernels.forward(_working(x[start:stop]), w, b, geom, workers, cache).astype(x.dtype, copy=False)
                  for start, stop in _sample_ranges(geom, x.shape[0], x.dtype, limit)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    @staticmethod
    def backward(backend: Any, grad_out: Any, x: Any, weight: Any, geom: Geometry, limit: int,
                 deterministic: bool, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any, Any]:
        kernels, workers, cache = kernel_set(geom), worker_count(), l2_cache_bytes()
        w = _working(weight)
        grad_xs, grad_w = [], None
        for start, stop in _sample_ranges(geom, x.shape[0], x.dtype, limit):
            gx, gw = kernels.backward(_working(grad_out[start:stop]), _working(x[start:stop]), w, geom, workers,
                                      cache, needs)
            if gx is not None:
                grad_xs.append(gx.astype(x.dtype, copy=False))
            if gw is not None:
                grad_w = gw if grad_w is None else grad_w + gw  # float32 for float16: summed before rounding
        grad_x = None if not grad_xs else grad_xs[0] if len(grad_xs) == 1 else np.concatenate(grad_xs)
        return (grad_x, None if grad_w is None else grad_w.astype(weight.dtype, copy=False),
                np.sum(grad_out, axis=(0, 2, 3)))
