"""The gather plan: for every patch element, where it is read from in one flattened input sample.

Built once per geometry with NumPy on the host (it is small: one integer per patch element of one
sample) and moved to each device once by ``Backend.constant``.
"""

from __future__ import annotations

import functools

import numpy as np

from ._geometry import Geometry

_INT32_MAX = 2**31 - 1


def index_dtype(largest_index: int) -> str:
    """The narrowest integer type (int32 or int64) that holds `largest_index`."""
    return "int32" if largest_index <= _INT32_MAX else "int64"


def row_length(geom: Geometry) -> int:
    """Length of one flattened sample as the plan reads it.

    A padded geometry gets one extra element, a zero, after the sample's C*H*W values: every
    patch element that falls in the padding reads it, so no padded copy of the input is made,
    and in the backward pass the padding's gradients all land there and are dropped.
    """
    return geom.sample_size + 1 if geom.padded else geom.sample_size


@functools.lru_cache(maxsize=128)
def gather_indices(geom: Geometry) -> np.ndarray:
    """Flat read positions of one sample's patch matrix, shape (C*kH*kW*OH*OW,).

    Ordered channel, kernel row, kernel column, output row, output column: reshaped to
    (groups, C/groups*kH*kW, OH*OW) its rows follow ``weight.reshape(O, -1)``'s columns, so
    the convolution is one batched matrix product and its result is already (N, O, OH*OW).
    """
    top, _, left, _ = geom.padding
    channel = np.arange(geom.in_channels).reshape(-1, 1, 1, 1, 1)
    kernel_row = np.arange(geom.kernel_h).reshape(1, -1, 1, 1, 1) * geom.dilation[0]
    kernel_col = np.arange(geom.kernel_w).reshape(1, 1, -1, 1, 1) * geom.dilation[1]
    out_row = np.arange(geom.out_h).reshape(1, 1, 1, -1, 1) * geom.stride[0]
    out_col = np.arange(geom.out_w).reshape(1, 1, 1, 1, -1) * geom.stride[1]
    rows = out_row + kernel_row - top
    cols = out_col + kernel_col - left
    inside = (rows >= 0) & (rows < geom.height) & (cols >= 0) & (cols < geom.width)
    flat = (channel * geom.height + rows) * geom.width + cols
    flat = np.where(inside, flat, geom.sample_size)  # outside: the zero after the sample
    plan = np.ascontiguousarray(flat.reshape(-1), dtype=index_dtype(row_length(geom) - 1))
    plan.flags.writeable = False  # shared by every caller through the cache
    return plan


def row_plan(geom: Geometry, rows: tuple[int, int]) -> np.ndarray:
    """The gather plan of output rows ``[rows[0], rows[1])`` only (the whole plan for all rows)."""
    plan = gather_indices(geom)
    if rows == (0, geom.out_h):
        return plan
    per_row = plan.reshape(-1, geom.out_h, geom.out_w)[:, rows[0] : rows[1], :]
    return per_row.reshape(-1).copy()


def input_rows(geom: Geometry, rows: tuple[int, int]) -> tuple[int, int]:
    """The input rows ``[h0, h1)`` that output rows ``[rows[0], rows[1])`` read (empty if only padding)."""
    top = geom.padding[0]
    first = rows[0] * geom.stride[0] - top
    last = (rows[1] - 1) * geom.stride[0] - top + (geom.kernel_h - 1) * geom.dilation[0]
    h0, h1 = max(first, 0), min(last + 1, geom.height)
    return (h0, max(h1, h0))


def gather_readers(geom: Geometry, rows: tuple[int, int]) -> np.ndarray:
    """The transpose of :func:`row_plan`: for each input pixel it reads, the plan entries reading it.

    Returns (K, C * (h1 - h0) * W) integers for the input rows ``[h0, h1)`` of
    :func:`input_rows`, K the most entries reading one pixel: row k holds each pixel's k-th reader
    in increasing order, or ``plan.size`` (one past the end, where the caller puts a zero) for
    pixels with fewer. Summing the K rows of a gathered gradient in order is a scatter-add with a
    fixed order. Entries that read padding have no pixel and appear nowhere.
    """
    plan = row_plan(geom, rows)
    h0, h1 = input_rows(geom, rows)
    window = geom.in_channels * (h1 - h0) * geom.width
    inside = plan < geom.sample_size
    channel, rest = np.divmod(plan[inside], geom.height * geom.width)
    row, col = np.divmod(rest, geom.width)
    pixel = (channel * (h1 - h0) + row - h0) * geom.width + col  # position in the window
    entry = np.flatnonzero(inside)
    order = np.argsort(pixel, kind="stable")
    counts = np.bincount(pixel, minlength=window)
    depth = int(counts.max()) if counts.size else 0
    readers = np.full((depth, window), plan.size, dtype=index_dtype(plan.size))
    first = np.cumsum(counts) - counts  # where each pixel's run starts in sorted order
    rank = np.arange(order.size) - first[pixel[order]]
    readers[rank, pixel[order]] = entry[order]
    readers.flags.writeable = False
    return readers
