"""The whole-call algorithm behind ``algorithm="kernels"`` on NumPy: which kernel set runs a layer.

float16 is computed in float32 (Numba has no float16 arithmetic, NumPy no float16 BLAS) and rounded
back once; every other dtype (float32, float64, complex64, complex128) runs as it is.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ..._geometry import Geometry
from .._cpu_cache import l2_cache_bytes
from . import direct, im2col
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
    return im2col


def prefers(geom: Geometry) -> bool:
    """Where ``auto`` runs the compiled kernels on NumPy (measured: docs/benchmarks.md)."""
    return True


def _working(a: np.ndarray) -> np.ndarray:
    """`a` as the kernels read it: C-contiguous, float16 widened to float32."""
    return np.ascontiguousarray(a, dtype=np.float32 if a.dtype == np.float16 else None)


class Compiled:
    """``algorithm="kernels"`` on NumPy: whole calls, split into tasks by :mod:`._threads`."""

    name = "kernels"

    @staticmethod
    def spreads_nonfinite(geom: Geometry) -> bool:
        """Whether an inf or NaN can reach more outputs than read it (the Winograd transforms')."""
        return getattr(kernel_set(geom), "SPREADS_NONFINITE", False)

    @staticmethod
    def fits(geom: Geometry, itemsize: int, limit: int) -> bool:
        itemsize = max(itemsize, 4)  # float16 is computed in float32
        return int(worker_count() * kernel_set(geom).scratch(geom, itemsize, l2_cache_bytes())) <= limit

    @staticmethod
    def forward(backend: Any, x: Any, weight: Any, bias: Any | None, geom: Geometry, limit: int,
                deterministic: bool) -> Any:
        y = kernel_set(geom).forward(_working(x), _working(weight), None if bias is None else _working(bias), geom,
                                     worker_count(), l2_cache_bytes())
        return y.astype(x.dtype, copy=False)

    @staticmethod
    def backward(backend: Any, grad_out: Any, x: Any, weight: Any, geom: Geometry, limit: int,
                 deterministic: bool, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any, Any]:
        grad_x, grad_w = kernel_set(geom).backward(_working(grad_out), _working(x), _working(weight), geom,
                                                   worker_count(), l2_cache_bytes(), needs)
        grad_b = np.sum(grad_out, axis=(0, 2, 3))
        return (None if grad_x is None else grad_x.astype(x.dtype, copy=False),
                None if grad_w is None else grad_w.astype(weight.dtype, copy=False), grad_b)
