"""``algorithm="direct"``: the convolution as kH*kW shifted multiply-adds, with no patch matrix.

For a depthwise layer (one input channel per group) im2col is pure overhead: the patch matrix is
kH*kW times the input, and its "matrix product" has an inner dimension of kH*kW. Here each kernel
tap instead multiplies a shifted view of the (padded) input by one weight per channel and adds it
into the output, elementwise:

    y[n, g, m]           += w[g, m, c, i, j] * x[n, g, c, i + stride*oh, j + stride*ow]
    grad_x[n, g, c, ...] += sum_m w[g, m, c, i, j] * grad_y[n, g, m]        (the same shifted view)
    grad_w[g, m, c, i, j] = sum_{n, oh, ow} grad_y[n, g, m] * x[n, g, c, shifted]

(g a group, m a filter of the group, c a channel of the group): channels_per_group*kH*kW passes
over arrays the size of the output. That pays where channels per group are few (depthwise and
near it); ``auto`` picks it there (:func:`conv2d._conv.auto_algorithm`).

The batch is processed in chunks whose input fits in the CPU cache (:data:`CACHE_BYTES`): the
kH*kW passes then re-read the input from the cache instead of memory (measured on the depthwise
layer of the cpu preset: see docs/benchmarks.md). Written once on the array API, so every backend
runs it; in-place additions go through ``Backend.slice_add`` (a new array on JAX).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from .._geometry import Geometry
from .._workspace import WholeSamples, bytes_per_item, sample_ranges
from ..backends import Backend

# Bytes of input (padded, one chunk of samples) the passes over the taps should find in the cache.
CACHE_BYTES = 512 * 2**10


def zero_padded(xp: Any, x: Any, geom: Geometry) -> Any:
    """x (n, c, h, w) with the layer's zero padding. The standard has no `pad`; concatenating zero
    blocks works on every library, JAX included."""
    top, bottom, left, right = geom.padding
    n, c, h, w = x.shape
    dev = device_of(x)
    if top or bottom:
        x = xp.concat([xp.zeros((n, c, top, w), dtype=x.dtype, device=dev), x,
                       xp.zeros((n, c, bottom, w), dtype=x.dtype, device=dev)], axis=2)
    if left or right:
        h = x.shape[2]
        x = xp.concat([xp.zeros((n, c, h, left), dtype=x.dtype, device=dev), x,
                       xp.zeros((n, c, h, right), dtype=x.dtype, device=dev)], axis=3)
    return x


def _taps(geom: Geometry):
    """(i, j, key): each kernel tap and the slices of the padded input it reads for every output."""
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    for i in range(geom.kernel_h):
        rows = slice(i * dh, i * dh + (geom.out_h - 1) * sh + 1, sh)
        for j in range(geom.kernel_w):
            yield i, j, (rows, slice(j * dw, j * dw + (geom.out_w - 1) * sw + 1, sw))


def _sample_scratch(geom: Geometry, itemsize: int) -> int:
    """Scratch of one sample in bytes: the padded input and its gradient, and three output-sized
    temporaries (a product, a sum over filters, a reshaped output gradient)."""
    top, bottom, left, right = geom.padding
    padded = geom.in_channels * (geom.height + top + bottom) * (geom.width + left + right)
    return itemsize * (2 * padded + 3 * geom.out_channels * geom.out_h * geom.out_w)


def _chunks(geom: Geometry, batch: int, itemsize: int, limit: int) -> list[tuple[int, int]]:
    """Sample ranges: each chunk's input fits :data:`CACHE_BYTES`, and its scratch the workspace limit."""
    top, bottom, left, right = geom.padding
    padded_bytes = itemsize * geom.in_channels * (geom.height + top + bottom) * (geom.width + left + right)
    size = max(1, min(batch, CACHE_BYTES // padded_bytes, limit // _sample_scratch(geom, itemsize)))
    return sample_ranges(batch, size)


def _grouped_weight(xp: Any, weight: Any, geom: Geometry) -> Any:
    """(1, G, m, c, kH, kW): a one-long sample axis first, to broadcast against (n, G, m, c, OH, OW)."""
    g, m, c = geom.groups, geom.filters_per_group, geom.channels_per_group
    return xp.reshape(weight, (1, g, m, c, geom.kernel_h, geom.kernel_w))


def _sum_axis(xp: Any, a: Any, axis: int) -> Any:
    """`a` summed over one axis; a one-long axis is only dropped (no pass over the data)."""
    if a.shape[axis] == 1:
        return xp.squeeze(a, axis=axis)
    return xp.sum(a, axis=axis)


class Direct(WholeSamples):
    """Shifted multiply-adds, no patch matrix; chunks of the batch sized to the cache.

    Each tap is one broadcast product over (samples, groups, filters, channels of the group) and
    a sum over the channels (forward) or filters (input gradient): kH*kW passes, whatever the
    channels per group, so that JAX compiles few distinct operations.
    """

    name = "direct"
    sample_scratch = staticmethod(_sample_scratch)

    @staticmethod
    def forward(backend: Backend, x: Any, weight: Any, bias: Any | None, geom: Geometry, limit: int,
                deterministic: bool) -> Any:
        xp = array_namespace(x, weight)
        n = x.shape[0]
        g, c = geom.groups, geom.channels_per_group
        w = _grouped_weight(xp, weight, geom)
        pieces = []
        for start, stop in _chunks(geom, n, bytes_per_item(x), limit):
            padded = zero_padded(xp, x[start:stop, ...], geom)
            padded = xp.reshape(padded, (stop - start, g, 1, c, *padded.shape[2:]))
            y = None
            for i, j, (rows, cols) in _taps(geom):
                # (1, G, m, c, 1, 1) * (k, G, 1, c, OH, OW), summed over the group's channels.
                term = _sum_axis(xp, w[..., i : i + 1, j : j + 1] * padded[..., rows, cols], 3)
                y = term if y is None else backend.slice_add(y, (...,), term)
            pieces.append(xp.reshape(y, (stop - start, geom.out_channels, geom.out_h, geom.out_w)))
        y = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)
        if bias is not None:
            y = y + xp.reshape(bias, (1, geom.out_channels, 1, 1))
        return y

    @staticmethod
    def backward(backend: Backend, grad_out: Any, x: Any, weight: Any, geom: Geometry, limit: int,
                 deterministic: bool, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any, Any]:
        xp = array_namespace(grad_out, x, weight)
        n = x.shape[0]
        g, m, c = geom.groups, geom.filters_per_group, geom.channels_per_group
        top, _, left, _ = geom.padding
        w = _grouped_weight(xp, weight, geom)
        grad_w: list[Any] = [None] * (geom.kernel_h * geom.kernel_w)  # per tap: (G, m, c)
        pieces = []
        for start, stop in _chunks(geom, n, bytes_per_item(x), limit):
            k = stop - start
            padded = zero_padded(xp, x[start:stop, ...], geom)
            padded = xp.reshape(padded, (k, g, 1, c, *padded.shape[2:]))
            grad_y = xp.reshape(grad_out[start:stop, ...], (k, g, m, 1, geom.out_h, geom.out_w))
            grad_padded = xp.zeros((k, g, c, *padded.shape[4:]), dtype=x.dtype, device=device_of(x))
            for tap, (i, j, (rows, cols)) in enumerate(_taps(geom)):
                # This tap's share of the input gradient, summed over the group's filters: (k, G, c, OH, OW).
                share = _sum_axis(xp, w[..., i : i + 1, j : j + 1] * grad_y, 2)
                grad_padded = backend.slice_add(grad_padded, (..., rows, cols), share)
                part = xp.sum(grad_y * padded[..., rows, cols], axis=(0, 4, 5))  # (G, m, c)
                grad_w[tap] = part if grad_w[tap] is None else grad_w[tap] + part
            interior = grad_padded[..., top : top + geom.height, left : left + geom.width]
            pieces.append(xp.reshape(interior, (k, geom.in_channels, geom.height, geom.width)))
        grad_x = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)
        # kH*kW of (G, m, c) -> (G, m, c, kH*kW) -> (O, c, kH, kW).
        grad_weight = xp.reshape(xp.stack(grad_w, axis=-1), weight.shape)
        return grad_x, grad_weight, xp.sum(grad_out, axis=(0, 2, 3))
