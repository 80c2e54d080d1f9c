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
        """Whether ``auto`` runs the kernels on the layer `geom`: every layer (None, the pooling layers'
        patch builder: never). Decided without loading Numba.

        Measured (float32 forward+backward, each algorithm in a process of its own, medians; kernels over
        what ``auto`` ran without them): on the cpu preset's nine layers and eight others (7x7 stride 2,
        5x5 on 48x48, 3x3 with 256 channels on 8x8, 8 channels per group, 1x1 to 256 filters and from 256
        channels, depthwise 5x5) the kernels took 0.11x to 0.92x the time on all but two, which tied
        within the noise (5x5 on 48x48: 1.06x; 3x3 with 256 channels on 8x8: 1.10x against the array-API
        Winograd); docs/benchmarks.md has the tables. Non-finite inputs of a Winograd layer still go to
        ``slices`` (``_conv._finite_or_slices``).
        """
        return geom is not None
