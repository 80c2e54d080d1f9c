"""A pytest plugin for ci/broken-algorithm-check: registers ``slices_broken``, a copy of ``slices`` with one
realistic backward bug, so that the check can show the suite catches an algorithm nobody listed.

Load it with ``-p tests.broken_plugin`` (never by default). The bug: grad_x's interior is cropped from the
padded gradient at (top, top) instead of (top, left), which is wrong wherever a layer's top and left
padding differ (asymmetric padding), and right elsewhere, as a real slip would be.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

import conv2d
from conv2d import algorithms as _algorithms
from conv2d._geometry import Geometry

NAME = "slices_broken"


class BrokenSlices(_algorithms.Slices):
    name = NAME

    @staticmethod
    def grad_finish(acc: Any, n: int, geom: Geometry) -> Any:
        xp = array_namespace(acc)
        top = geom.padding[0]
        interior = acc[:, :, top : top + geom.height, top : top + geom.width]  # the bug: top for left
        return xp.permute_dims(interior, (1, 0, 2, 3))


def pytest_configure(config) -> None:
    # Before the test modules are imported: their parameters are read from conv2d.ALGORITHMS then.
    _algorithms.ALGORITHMS[NAME] = BrokenSlices
    conv2d.ALGORITHMS = tuple(_algorithms.ALGORITHMS)
