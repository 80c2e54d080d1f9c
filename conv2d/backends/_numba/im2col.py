"""Compiled im2col for any layer: patches built in cache-sized chunks, each chunk's product at once.

The same algorithm as ``slices`` and ``gather`` (one matrix product per group between the weight and
a patch matrix), arranged differently: each task builds the patches of a chunk of samples (or of
output rows) small enough to stay in the core's L2 cache, multiplies them there at once, and writes
its outputs into the result (bias added) in the same pass. In the backward pass a task builds each
chunk's patches once for the weight gradient, multiplies the output gradient by the weight, and sums
the patch gradient into its own samples' input gradient (col2im): each input pixel is written by one
task, and each task's weight gradient is added to the others in task order (deterministic).

Layout of a chunk's patch matrix, as elsewhere in the library: (C*kH*kW, samples*rows*OW), rows
ordered channel, kernel row, kernel column; columns sample, output row, output column.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..._geometry import Geometry
from ._jit import kernel
from ._threads import in_order, run, split


@kernel
def _columns(j, out_w, width, sw, dw, left):
    """[lo, hi): the output columns whose tap `j` reads inside the input row (the others read padding)."""
    first = j * dw - left  # the input column that output column 0 reads
    lo = min(out_w, max(0, -(first // sw)))  # the first ow with ow*sw + first >= 0
    hi = max(lo, min(out_w, (width - 1 - first) // sw + 1))
    return first, lo, hi


@kernel
def _im2col(x, cols, r0, r1, kh, kw, sh, sw, dh, dw, top, left):
    """cols[(c, i, j), (s, oh, ow)] = x[s, c, oh*sh - top + i*dh, ow*sw - left + j*dw], zero outside.

    The columns that read padding are known per tap before the loop over them, and the loops run on
    views from index 0 (no negative index for Numba to wrap around): plain copies, vectorised.
    """
    n, channels, height, width = x.shape
    out_w = cols.shape[1] // max(1, n * (r1 - r0))
    for s in range(n):
        for c in range(channels):
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    first, lo, hi = _columns(j, out_w, width, sw, dw, left)
                    column = s * (r1 - r0) * out_w
                    for oh in range(r0, r1):
                        ih = oh * sh - top + i * dh
                        out = cols[row, column : column + out_w]
                        if ih < 0 or ih >= height or hi == lo:
                            for ow in range(out_w):
                                out[ow] = 0
                        else:
                            src = x[s, c, ih, lo * sw + first : (hi - 1) * sw + first + 1 : sw]
                            dst = out[lo:hi]
                            for ow in range(lo):
                                out[ow] = 0
                            for t in range(hi - lo):
                                dst[t] = src[t]
                            for ow in range(hi, out_w):
                                out[ow] = 0
                        column += out_w


@kernel
def _col2im(grad_cols, grad_x, r0, r1, kh, kw, sh, sw, dh, dw, top, left):
    """grad_x[s, c, ih, iw] += grad_cols[(c, i, j), (s, oh, ow)] over the patches that read the pixel."""
    n, channels, height, width = grad_x.shape
    out_w = grad_cols.shape[1] // max(1, n * (r1 - r0))
    for s in range(n):
        for c in range(channels):
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    first, lo, hi = _columns(j, out_w, width, sw, dw, left)
                    column = s * (r1 - r0) * out_w
                    for oh in range(r0, r1):
                        ih = oh * sh - top + i * dh
                        if 0 <= ih < height and hi > lo:
                            dst = grad_x[s, c, ih, lo * sw + first : (hi - 1) * sw + first + 1 : sw]
                            src = grad_cols[row, column + lo : column + hi]
                            for t in range(hi - lo):
                                dst[t] += src[t]
                        column += out_w


@kernel
def _place(product, y, bias, has_bias, r0, r1):
    """y[s, o, r0:r1, :] = product[o, (s, oh, ow)] (+ bias[o]): the chunk's outputs into NCHW."""
    n, channels, _, out_w = y.shape
    positions = (r1 - r0) * out_w
    for s in range(n):
        for o in range(channels):
            add = bias[o] if has_bias else 0
            for p in range(positions):
                y[s, o, r0 + p // out_w, p % out_w] = product[o, s * positions + p] + add


@kernel
def _take(grad_out, grad_y, r0, r1):
    """grad_y[o, (s, oh, ow)] = grad_out[s, o, r0 + oh, ow]: a chunk's output gradient in the patches' layout."""
    n, channels, _, out_w = grad_out.shape
    positions = (r1 - r0) * out_w
    for s in range(n):
        for o in range(channels):
            for p in range(positions):
                grad_y[o, s * positions + p] = grad_out[s, o, r0 + p // out_w, p % out_w]


def _args(geom: Geometry) -> tuple[int, ...]:
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    top, _, left, _ = geom.padding
    return geom.kernel_h, geom.kernel_w, sh, sw, dh, dw, top, left


def chunks(geom: Geometry, start: int, stop: int, itemsize: int, cache_bytes: int) -> list[tuple[int, int, int, int]]:
    """(s0, s1, r0, r1) covering samples [start, stop): whole samples while their patches fit
    `cache_bytes`, else one sample's output rows in pieces that do."""
    column_bytes = itemsize * geom.in_channels * geom.kernel_h * geom.kernel_w
    sample_bytes = column_bytes * geom.out_h * geom.out_w
    if sample_bytes <= cache_bytes:
        per_chunk = max(1, cache_bytes // sample_bytes)
        return [(a, min(a + per_chunk, stop), 0, geom.out_h) for a in range(start, stop, per_chunk)]
    rows = max(1, cache_bytes // (column_bytes * geom.out_w))
    return [(s, s + 1, r, min(r + rows, geom.out_h)) for s in range(start, stop) for r in range(0, geom.out_h, rows)]


def scratch(geom: Geometry, itemsize: int, cache_bytes: int) -> int:
    """Bytes one task holds beside the result: a chunk's patches, their gradient and its products, and
    the task's weight gradient."""
    column_bytes = itemsize * geom.in_channels * geom.kernel_h * geom.kernel_w
    columns = max(cache_bytes // column_bytes, geom.out_w)
    products = 2 * itemsize * geom.out_channels * columns
    return 2 * column_bytes * columns + products + 2 * itemsize * geom.out_channels * geom.patch_size


def forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, geom: Geometry, workers: int,
            cache_bytes: int) -> np.ndarray:
    n = x.shape[0]
    y = np.empty((n, geom.out_channels, geom.out_h, geom.out_w), dtype=x.dtype)
    w = weight.reshape(geom.groups, geom.filters_per_group, geom.patch_size)
    b = np.zeros(1, dtype=x.dtype) if bias is None else bias
    args = _args(geom)

    def task(s0: int, s1: int, r0: int, r1: int) -> None:
        columns = (s1 - s0) * (r1 - r0) * geom.out_w
        cols = np.empty((geom.groups * geom.patch_size, columns), dtype=x.dtype)
        _im2col(x[s0:s1], cols, r0, r1, *args)
        product = np.matmul(w, cols.reshape(geom.groups, geom.patch_size, columns))
        _place(product.reshape(geom.out_channels, columns), y[s0:s1], b, bias is not None, r0, r1)

    run([partial(task, *c) for c in chunks(geom, 0, n, x.itemsize, cache_bytes)])
    return y


def backward(grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray, geom: Geometry, workers: int,
             cache_bytes: int, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any]:
    n = x.shape[0]
    want_x, want_w = "x" in needs, "weight" in needs
    grad_x = np.zeros(x.shape, dtype=x.dtype) if want_x else None
    g, m, k = geom.groups, geom.filters_per_group, geom.patch_size
    w_t = np.ascontiguousarray(np.swapaxes(weight.reshape(g, m, k), 1, 2))  # (G, K/G, O/G)
    args = _args(geom)

    def task(start: int, stop: int) -> Any:
        grad_w = np.zeros((g, m, k), dtype=x.dtype) if want_w else None
        for s0, s1, r0, r1 in chunks(geom, start, stop, x.itemsize, cache_bytes):
            columns = (s1 - s0) * (r1 - r0) * geom.out_w
            grad_y = np.empty((geom.out_channels, columns), dtype=x.dtype)
            _take(grad_out[s0:s1], grad_y, r0, r1)
            grad_y = grad_y.reshape(g, m, columns)
            if grad_w is not None:
                cols = np.empty((g * k, columns), dtype=x.dtype)
                _im2col(x[s0:s1], cols, r0, r1, *args)
                grad_w += np.matmul(grad_y, np.swapaxes(cols.reshape(g, k, columns), 1, 2))
            if grad_x is not None:
                grad_cols = np.matmul(w_t, grad_y).reshape(g * k, columns)
                _col2im(grad_cols, grad_x[s0:s1], r0, r1, *args)
        return grad_w

    partials = run([partial(task, *r) for r in split(n, workers)])
    return grad_x, in_order(partials).reshape(weight.shape) if want_w else None
