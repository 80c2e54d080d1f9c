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
