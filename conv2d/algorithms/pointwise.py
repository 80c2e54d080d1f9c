"""``algorithm="pointwise"``: 1x1 convolutions as one matrix product per sample, in NCHW, no copies.

A 1x1 kernel needs no patch matrix: each sample's output is ``W (O x C) @ x[n] (C x H*W)``, and
``x[n]`` is already that matrix in NCHW. im2col's layout (the whole batch side by side in the
columns) instead transposes the input to channel-major and the output back: two copies around one
product. Here the products are batched over the samples (and groups), and so are the gradients:

    y[n]      = W @ x[n]                 grad_x[n] = W^T @ grad_y[n]
    grad_W    = sum over n of grad_y[n] @ x[n]^T

Measured on NumPy (N,C,H,O = 32,128,16,128, float32, 2 threads): forward 1.3 ms against 2.1 ms for
the bare product of im2col's layout and 1.8 ms for ``slices`` (docs/benchmarks.md, "Pointwise").
Stride and padding are honoured by reading the strided, zero-padded input; dilation does not
matter to a 1x1 kernel. Written once on the array API.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from .._geometry import Geometry
from .._workspace import WholeSamples, bytes_per_item, sample_ranges
from ..backends import Backend
from .direct import zero_padded


def pointwise_applies(geom: Geometry) -> bool:
    """Whether ``pointwise`` computes the layer `geom`: a 1x1 kernel (any stride, padding, groups)."""
    return (geom.kernel_h, geom.kernel_w) == (1, 1)


def check_pointwise(geom: Geometry) -> None:
    """Raise ValueError unless :func:`pointwise_applies` to `geom`."""
    if not pointwise_applies(geom):
        raise ValueError(
            f"algorithm 'pointwise' computes 1x1 convolutions, not this layer's {geom.kernel_h}x{geom.kernel_w} "
            "kernel; use algorithm='auto' (which picks it for 1x1 kernels), 'slices' or 'gather'"
        )


def _sample_scratch(geom: Geometry, itemsize: int) -> int:
    """Bytes per sample: the input it reads, the output (or its gradient), the input gradient and
    the sample's share of the weight gradient before the sum over samples."""
    positions = geom.out_h * geom.out_w
    weight = geom.out_channels * geom.channels_per_group
    return itemsize * (2 * geom.in_channels * positions + geom.out_channels * positions + weight)


def _chunks(geom: Geometry, batch: int, itemsize: int, limit: int) -> list[tuple[int, int]]:
    size = max(1, min(batch, limit // _sample_scratch(geom, itemsize)))
    return sample_ranges(batch, size)


def _reads(geom: Geometry) -> tuple[slice, slice]:
    """The rows and columns of the padded input that the 1x1 kernel reads."""
    (sh, sw) = geom.stride
    return slice(0, (geom.out_h - 1) * sh + 1, sh), slice(0, (geom.out_w - 1) * sw + 1, sw)


def _padded_shape(geom: Geometry, n: int) -> tuple[int, int, int, int]:
    top, bottom, left, right = geom.padding
    return n, geom.in_channels, geom.height + top + bottom, geom.width + left + right


def _input_read(xp: Any, x: Any, geom: Geometry) -> Any:
    """(n, groups, C/groups, OH*OW): what the kernel reads of `x`, as matrices (no copy for stride 1, no padding)."""
    n = x.shape[0]
    if geom.padded:
        x = zero_padded(xp, x, geom)
    if geom.stride != (1, 1) or geom.padded:
        key = (..., *_reads(geom))
        x = x[key]
    return xp.reshape(x, (n, geom.groups, geom.channels_per_group, geom.out_h * geom.out_w))


def _input_grad(backend: Backend, xp: Any, grad_read: Any, geom: Geometry) -> Any:
    """The gradient of what was read (n, C, OH, OW) back in the input's place: (n, C, H, W)."""
    if geom.stride == (1, 1) and not geom.padded:
        return grad_read
    n = grad_read.shape[0]
    grad = xp.zeros(_padded_shape(geom, n), dtype=grad_read.dtype, device=device_of(grad_read))
    grad = backend.slice_add(grad, (..., *_reads(geom)), grad_read)
    top, _, left, _ = geom.padding
    return grad[..., top : top + geom.height, left : left + geom.width]


class Pointwise(WholeSamples):
    """1x1 convolutions as batched matrix products on the NCHW arrays themselves."""

    name = "pointwise"
    check = staticmethod(check_pointwise)

    sample_scratch = staticmethod(_sample_scratch)

    @staticmethod
    def forward(backend: Backend, x: Any, weight: Any, bias: Any | None, geom: Geometry, limit: int,
                deterministic: bool) -> Any:
        xp = array_namespace(x, weight)
        w = xp.reshape(weight, (geom.groups, geom.filters_per_group, geom.channels_per_group))
        pieces = []
        for start, stop in _chunks(geom, x.shape[0], bytes_per_item(x), limit):
            y = xp.matmul(w, _input_read(xp, x[start:stop, ...], geom))
            y = xp.reshape(y, (stop - start, geom.out_channels, geom.out_h, geom.out_w))
            if bias is not None:  # on the chunk, while it is in the cache
                y = backend.slice_add(y, (...,), xp.reshape(bias, (1, geom.out_channels, 1, 1)))
            pieces.append(y)
        return pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)

    @staticmethod
    def backward(backend: Backend, grad_out: Any, x: Any, weight: Any, geom: Geometry, limit: int,
                 deterministic: bool, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any, Any]:
        xp = array_namespace(grad_out, x, weight)
        w_t = xp.matrix_transpose(xp.reshape(weight, (geom.groups, geom.filters_per_group, geom.channels_per_group)))
        grad_weight = None
        pieces = []
        for start, stop in _chunks(geom, x.shape[0], bytes_per_item(x), limit):
            n = stop - start
            positions = geom.out_h * geom.out_w
            grad_y = xp.reshape(grad_out[start:stop, ...], (n, geom.groups, geom.filters_per_group, positions))
            read = _input_read(xp, x[start:stop, ...], geom)
            part = xp.sum(xp.matmul(grad_y, xp.matrix_transpose(read)), axis=0)  # (groups, O/groups, C/groups)
            # Summed in place over the chunks where the backend allows it (a new array on JAX).
            grad_weight = part if grad_weight is None else backend.slice_add(grad_weight, (...,), part)
            grad_read = xp.reshape(xp.matmul(w_t, grad_y), (n, geom.in_channels, geom.out_h, geom.out_w))
            pieces.append(_input_grad(backend, xp, grad_read, geom))
        grad_x = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)
        return grad_x, xp.reshape(grad_weight, weight.shape), xp.sum(grad_out, axis=(0, 2, 3))
