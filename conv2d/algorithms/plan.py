"""The gather plan: for every patch element, where it is read from in one flattened input sample.

Built with NumPy on the host for the output rows of one chunk (one integer per patch element of one
sample's rows) and moved to each device once by ``Backend.constant``, which keeps it within
``CONV2D_PLAN_CACHE`` bytes.
"""

from __future__ import annotations

import numpy as np

from .._geometry import Geometry

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


def row_plan(geom: Geometry, rows: tuple[int, int]) -> np.ndarray:
    """Flat read positions of output rows ``[rows[0], rows[1])`` of one sample's patch matrix.

    Shape (C*kH*kW*(rows[1]-rows[0])*OW,), ordered channel, kernel row, kernel column, output row,
    output column: reshaped to (groups, C/groups*kH*kW, positions) its rows follow
    ``weight.reshape(O, -1)``'s columns, so the convolution is one batched matrix product and its
    result is already (N, O, positions).

    Built for these rows only and straight in its index dtype: the plan is the one array of its
    size (the rest have no channel axis), so a chunk of rows costs the chunk's plan and no
    temporaries of the whole sample. Not cached here: ``Backend.constant`` keeps it, within
    ``CONV2D_PLAN_CACHE`` bytes.
    """
    top, _, left, _ = geom.padding
    dtype = np.dtype(index_dtype(row_length(geom) - 1))
    kernel_row = np.arange(geom.kernel_h).reshape(-1, 1, 1, 1) * geom.dilation[0]
    kernel_col = np.arange(geom.kernel_w).reshape(1, -1, 1, 1) * geom.dilation[1]
    out_row = np.arange(rows[0], rows[1]).reshape(1, 1, -1, 1) * geom.stride[0]
    out_col = np.arange(geom.out_w).reshape(1, 1, 1, -1) * geom.stride[1]
    in_row, in_col = out_row + kernel_row - top, out_col + kernel_col - left
    inside = ((in_row >= 0) & (in_row < geom.height) & (in_col >= 0) & (in_col < geom.width)).reshape(-1)
    # (kH, kW, rows, OW) offsets in one channel; zero outside, where the padding's zero is read instead.
    offset = np.where(inside, (in_row * geom.width + in_col).reshape(-1), 0).astype(dtype)
    plan = np.empty((geom.in_channels, offset.size), dtype=dtype)
    channel_start = np.arange(geom.in_channels, dtype=dtype).reshape(-1, 1) * dtype.type(geom.height * geom.width)
    np.add(channel_start, offset, out=plan)
    plan[:, ~inside] = geom.sample_size  # outside: the zero after the sample
    plan = plan.reshape(-1)
    plan.flags.writeable = False  # shared by every caller through the backend's cache
    return plan


def gather_indices(geom: Geometry) -> np.ndarray:
    """The whole sample's plan: :func:`row_plan` of every output row."""
    return row_plan(geom, (0, geom.out_h))


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
