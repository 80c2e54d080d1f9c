"""Dilated 3x3 stride-1 layers as Winograd tiles: the input split by the dilation's phases.

With stride 1, output row ``oh`` reads input rows ``oh - top + i*d`` (tap i, dilation d): all in one
residue class mod d. So the outputs whose row is ``a`` mod d read only the input rows of one phase,
``r = (a - top) mod d``, and on that phase (every d-th row from r) the taps are neighbours: an
undilated 3x3 convolution. The same holds for columns. A layer with dilation (dh, dw) is thus dh*dw
undilated convolutions of strided views of the input, each computed by :mod:`.winograd` (16 products of
transformed tiles instead of im2col's 9 per output) and written into its strided view of the output.
Backwards, each input phase's gradient comes from its one output phase, and the weight gradient is the
sum of the phases' weight gradients, in phase order (deterministic). Nothing is copied: the kernels read
and write the strided views.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..._geometry import Geometry
from . import winograd

SPREADS_NONFINITE = winograd.SPREADS_NONFINITE


def pays(geom: Geometry) -> bool:
    """A dilated 3x3 layer with stride 1 whose phases Winograd computes faster than im2col."""
    undilated = dataclasses.replace(geom, dilation=(1, 1))
    return geom.dilation != (1, 1) and winograd.winograd_pays(undilated)


def _axis(out: int, size: int, pad: int, dilation: int) -> Iterator[tuple[slice, slice, int, int, int]]:
    """Per output phase a along one axis: its slice of the output, the slice of the input phase it reads,
    and that phase's undilated geometry (input length, padding before, output length)."""
    for a in range(min(dilation, out)):
        r = (a - pad) % dilation  # the input phase that output phase a reads
        before = -((a - pad - r) // dilation)  # output q of the phase reads phase rows q - before + i
        length, count = len(range(r, size, dilation)), len(range(a, out, dilation))
        yield slice(a, None, dilation), slice(r, None, dilation), length, before, count


def _phases(geom: Geometry) -> Iterator[tuple[tuple[slice, slice], tuple[slice, slice], Geometry]]:
    """(output view, input view, undilated geometry) of each of the dh*dw phases that has outputs."""
    (dh, dw), (top, _, left, _) = geom.dilation, geom.padding
    for out_rows, in_rows, height, pad_top, out_h in _axis(geom.out_h, geom.height, top, dh):
        for out_cols, in_cols, width, pad_left, out_w in _axis(geom.out_w, geom.width, left, dw):
            phase = dataclasses.replace(geom, height=height, width=width, dilation=(1, 1), out_h=out_h, out_w=out_w,
                                        padding=(pad_top, out_h + 2 - height - pad_top, pad_left, out_w + 2 - width - pad_left))
            yield (out_rows, out_cols), (in_rows, in_cols), phase


def scratch(geom: Geometry, itemsize: int, cache_bytes: int) -> int:
    return winograd.scratch(dataclasses.replace(geom, dilation=(1, 1)), itemsize, cache_bytes)


def forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, geom: Geometry, workers: int,
            cache_bytes: int) -> np.ndarray:
    y = np.empty((x.shape[0], geom.out_channels, geom.out_h, geom.out_w), dtype=x.dtype)
    for (out_rows, out_cols), (in_rows, in_cols), phase in _phases(geom):
        if phase.height == 0 or phase.width == 0:  # an empty input phase: its outputs read only padding
            y[:, :, out_rows, out_cols] = 0 if bias is None else bias.reshape(-1, 1, 1)
            continue
        y[:, :, out_rows, out_cols] = winograd.forward(x[:, :, in_rows, in_cols], weight, bias, phase, workers, cache_bytes)
    return y


def backward(grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray, geom: Geometry, workers: int,
             cache_bytes: int, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any]:
    grad_x = np.zeros(x.shape, dtype=x.dtype) if "x" in needs else None  # a phase no output reads: zero
    grad_w = np.zeros(weight.shape, dtype=x.dtype) if "weight" in needs else None
    for (out_rows, out_cols), (in_rows, in_cols), phase in _phases(geom):
        if phase.height == 0 or phase.width == 0:  # nothing read, nothing to the weight gradient
            continue
        gx, gw = winograd.backward(grad_out[:, :, out_rows, out_cols], x[:, :, in_rows, in_cols], weight, phase,
                                   workers, cache_bytes, needs)
        if grad_x is not None:
            grad_x[:, :, in_rows, in_cols] = gx
        if grad_w is not None:
            grad_w += gw  # in phase order: the same sum on every run
    return grad_x, grad_w
