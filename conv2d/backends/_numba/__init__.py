"""Compiled CPU kernels for NumPy arrays (``algorithm="kernels"``), where Numba is installed.

The CPU twin of CuPy's device kernels: :class:`NumbaKernels` is the NumPy backend's
``Backend.kernels`` when ``numba`` and ``threadpoolctl`` can be imported (``pip install conv2d[cpu]``),
and None otherwise, so that nothing changes (and nothing warns) without them. Its ``algorithm`` is a
whole-call algorithm that runs, for each layer, one of three kernel sets:

- :mod:`.direct`: grouped layers with few channels per group (depthwise and near it);
- :mod:`.pointwise`: 1x1 layers with stride 1 and no padding;
- :mod:`.winograd`: 3x3 layers with stride 1 and dilation 1;
- :mod:`.im2col`: every other layer.

Each runs its tasks on :mod:`._threads`'s workers, with the BLAS single-threaded meanwhile (one
thread pool at a time). Nothing here imports Numba until a kernel first runs.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..._geometry import Geometry


def available() -> bool:
    """Whether the compiled kernels can run here: Numba and threadpoolctl are importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("numba", "threadpoolctl"))


class NumbaKernels:
    """``Backend.kernels`` of the NumPy backend: the compiled kernels' algorithm and ``auto``'s rule."""

    @property
    def algorithm(self) -> Any:
        from ._algorithm import Compiled

        return Compiled

    def kernel_set_name(self, geom: Geometry) -> str:
        """Which kernel set computes `geom`: ``"direct"``, ``"pointwise"``, ``"winograd"`` or ``"im2col"``."""
        from ._algorithm import kernel_set

        return kernel_set(geom).__name__.rsplit(".", 1)[-1]

    def prefers(self, geom: Geometry | None) -> bool:
        """Whether ``auto`` runs the kernels on the layer `geom` (None: the pooling layers' patches, never)."""
        if geom is None:
            return False
        from ._algorithm import prefers

        return prefers(geom)
