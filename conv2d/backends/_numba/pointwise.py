"""1x1 layers with stride 1 and no padding: per-sample matrix products on the NCHW arrays, in tasks.

Such a layer needs no patch matrix at all: sample s's output is ``W @ x[s]`` per group, with x[s]
seen as (C, H*W). Each task takes a range of samples and multiplies them one by one (the BLAS on one
thread, see :mod:`._threads`), writing straight into the result; backwards it writes its samples'
input gradient ``W^T @ grad_y[s]`` and returns its share of the weight gradient, ``sum_s grad_y[s]
@ x[s]^T``, which the caller adds up in task order. No compiled kernel is needed: the products are
the whole of the work.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..._geometry import Geometry
from ._threads import in_order, run, split

# Tasks per worker: samples differ little in cost, a few tasks each even out a slow start.
TASKS_PER_WORKER = 2


def applies(geom: Geometry) -> bool:
    """A 1x1 kernel with stride 1 and no padding: the output positions are the input's."""
    return (geom.kernel_h, geom.kernel_w, geom.stride, geom.padding) == (1, 1, (1, 1), (0, 0, 0, 0))


def scratch(geom: Geometry, itemsize: int, cache_bytes: int) -> int:
    """Bytes a task holds: one sample's input (where it is not contiguous) and its weight gradient."""
    return itemsize * (geom.in_channels * geom.height * geom.width + geom.out_channels * geom.channels_per_group)


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:
    """One sample (channels, H, W) as (groups, channels/groups, H*W): a view where `a` allows it."""
    return a.reshape(groups, a.shape[0] // groups, a.shape[1] * a.shape[2])


def forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, geom: Geometry, workers: int,
            cache_bytes: int) -> np.ndarray:
    g = geom.groups
    y = np.empty((x.shape[0], geom.out_channels, geom.out_h, geom.out_w), dtype=x.dtype)
    w = weight.reshape(g, geom.filters_per_group, geom.channels_per_group)
    column = None if bias is None else bias.reshape(-1, 1, 1)

    def task(start: int, stop: int) -> None:
        for s in range(start, stop):
            np.matmul(w, _grouped(x[s], g), out=_grouped(y[s], g))
            if column is not None:
                y[s] += column

    run([partial(task, *r) for r in split(x.shape[0], workers * TASKS_PER_WORKER)])
    return y


def backward(grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray, geom: Geometry, workers: int,
             cache_bytes: int, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any]:
    g, m, c = geom.groups, geom.filters_per_group, geom.channels_per_group
    grad_x = np.empty(x.shape, dtype=x.dtype) if "x" in needs else None  # C order: its samples reshape as views
    want_w = "weight" in needs
    w_t = np.ascontiguousarray(np.swapaxes(weight.reshape(g, m, c), 1, 2))  # (G, C/G, O/G)

    def task(start: int, stop: int) -> Any:
        grad_w = np.zeros((g, m, c), dtype=x.dtype) if want_w else None
        for s in range(start, stop):
            grad_y = _grouped(grad_out[s], g)
            if grad_x is not None:
                np.matmul(w_t, grad_y, out=_grouped(grad_x[s], g))
            if grad_w is not None:
                grad_w += np.matmul(grad_y, np.swapaxes(_grouped(x[s], g), 1, 2))
        return grad_w

    # The weight gradient's share is per task, so the tasks are fixed by the worker count alone.
    partials = run([partial(task, *r) for r in split(x.shape[0], workers)])
    return grad_x, in_order(partials).reshape(weight.shape) if want_w else None
