"""The two ways to build the patch matrix (im2col) and to sum its gradient back (col2im).

Both produce the same layout for samples [0, n) and output rows [r0, r1):
(groups, C/groups*kH*kW, n*rows*OW), columns ordered sample, output row, output column. With
all samples side by side in the columns, each matrix product of ``_conv.py`` is one large GEMM
per group (as in the seed), whose inner dimension in the weight gradient is the whole batch.

- ``gather``: the mission's design. One ``take`` with a precomputed flat index per patch element,
  and the backend's scatter-add back. Works for every geometry with the same two operations.
- ``slices``: kH*kW strided slices of the (padded) input, one per kernel tap. Each slice touches
  distinct pixels, so the backward pass is kH*kW slice additions: no scatter, no atomics,
  deterministic, and no index array to read.
- ``kernels``: the backend's own compiled kernels. On CuPy (``backends/_cuda_source.py``) one
  thread per patch element for im2col and one per input pixel for col2im: two launches in all,
  deterministic. NumPy's (``backends/_numba``, where Numba is installed) are a whole-call algorithm
  of their own, which the backend's kernel set supplies (``Backend.kernels.algorithm``).

``GatherTransposed`` is ``gather`` in deterministic mode on a backend whose scatter-add uses
atomics: the patches are gathered the same way, and their gradient is summed back by a gather
through the transposed plan (each pixel reads its readers, in a fixed order).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from .._geometry import Geometry
from ..backends import Backend
from ..backends._cuda_source import kernel_args
from .direct import Direct, zero_padded
from .plan import gather_readers, index_dtype, input_rows, row_length, row_plan
from .pointwise import Pointwise
from .winograd import Winograd


class Gather:
    name = "gather"

    @staticmethod
    def _per_sample(grad_cols: Any, n: int, geom: Geometry, rows: tuple[int, int]) -> Any:
        """The patch gradient back in the plan's order: (n, C*kH*kW*positions), one row per sample."""
        xp = array_namespace(grad_cols)
        positions = (rows[1] - rows[0]) * geom.out_w
        taps = geom.in_channels * geom.kernel_h * geom.kernel_w
        return xp.reshape(xp.permute_dims(xp.reshape(grad_cols, (taps, n, positions)), (1, 0, 2)), (n, taps * positions))

    @classmethod
    def _plan(cls, backend: Backend, geom: Geometry, rows: tuple[int, int]) -> Any:
        return backend.constant(("gather", geom, rows), lambda: row_plan(geom, rows))

    @classmethod
    def patches(cls, backend: Backend, x: Any, geom: Geometry, rows: tuple[int, int]) -> Any:
        xp = array_namespace(x)
        n = x.shape[0]
        flat = xp.reshape(x, (n, geom.sample_size))
        if geom.padded:  # every padding position reads this one zero after the sample
            flat = xp.concat([flat, xp.zeros((n, 1), dtype=x.dtype, device=device_of(x))], axis=1)
        # The standard's `take` needs 1-D indices on one axis: the plan indexes a flattened sample.
        cols = xp.take(flat, cls._plan(backend, geom, rows), axis=1)  # (n, C*kH*kW*positions)
        positions = (rows[1] - rows[0]) * geom.out_w  # explicit sizes: -1 is ambiguous for an empty batch
        taps = geom.in_channels * geom.kernel_h * geom.kernel_w
        cols = xp.permute_dims(xp.reshape(cols, (n, taps, positions)), (1, 0, 2))
        return xp.reshape(cols, (geom.groups, geom.patch_size, n * positions))

    @staticmethod
    def grad_start(backend: Backend, like: Any, n: int, geom: Geometry) -> Any:
        xp = array_namespace(like)
        return xp.zeros((n * row_length(geom),), dtype=like.dtype, device=device_of(like))

    @classmethod
    def grad_add(cls, backend: Backend, acc: Any, grad_cols: Any, geom: Geometry, rows: tuple[int, int]) -> Any:
        # A pixel read by several patches receives the sum of their gradients: a scatter-*add*
        # over one flat index per patch element of the whole chunk.
        xp = array_namespace(grad_cols)
        n, length = acc.shape[0] // row_length(geom), row_length(geom)
        grad_cols = cls._per_sample(grad_cols, n, geom, rows)
        dtype = backend.dtype(index_dtype(max(n * length - 1, 0)))
        offsets = xp.arange(0, n * length, length, dtype=dtype, device=device_of(grad_cols))
        plan = xp.astype(cls._plan(backend, geom, rows), dtype, copy=False)
        indices = xp.reshape(xp.reshape(offsets, (n, 1)) + plan, (-1,))
        return backend.scatter_add(acc, indices, xp.reshape(grad_cols, (-1,)))

    @staticmethod
    def grad_finish(acc: Any, n: int, geom: Geometry) -> Any:
        xp = array_namespace(acc)
        interior = xp.reshape(acc, (n, row_length(geom)))[:, : geom.sample_size]  # drop the padding's zero
        return xp.reshape(interior, (n, geom.in_channels, geom.height, geom.width))


class Slices:
    name = "slices"

    @staticmethod
    def _taps(geom: Geometry, rows: tuple[int, int]):
        """For each kernel tap, the (row, column) slices of the padded input it reads."""
        (sh, sw), (dh, dw) = geom.stride, geom.dilation
        for i in range(geom.kernel_h):
            top = i * dh + rows[0] * sh
            row_slice = slice(top, top + (rows[1] - rows[0] - 1) * sh + 1, sh)
            for j in range(geom.kernel_w):
                yield row_slice, slice(j * dw, j * dw + (geom.out_w - 1) * sw + 1, sw)

    @staticmethod
    def _pad(x: Any, geom: Geometry) -> Any:
        xp = array_namespace(x)
        if not geom.padded:
            # A flat reshape of the (channel-major) view makes one contiguous copy: the kH*kW
            # slices then read whole rows, measured 2x faster than reading through the view.
            return xp.reshape(xp.reshape(x, (-1,)), x.shape)
        return zero_padded(xp, x, geom)

    @classmethod
    def patches(cls, backend: Backend, x: Any, geom: Geometry, rows: tuple[int, int]) -> Any:
        xp = array_namespace(x)
        # Channel-major (C, n, H, W) first: each tap is then a (C, n, rows, OW) block of the layout.
        padded = cls._pad(xp.permute_dims(x, (1, 0, 2, 3)), geom)
        taps = [padded[:, :, r, c] for r, c in cls._taps(geom, rows)]
        # (C, kH*kW, n, rows, OW): rows ordered like the weight's (C, kH, kW). A 1x1 kernel's one
        # tap is the input itself: no second copy.
        cols = xp.expand_dims(taps[0], axis=1) if len(taps) == 1 else xp.stack(taps, axis=1)
        return xp.reshape(cols, (geom.groups, geom.patch_size, -1))

    @staticmethod
    def grad_start(backend: Backend, like: Any, n: int, geom: Geometry) -> Any:
        xp = array_namespace(like)
        top, bottom, left, right = geom.padding
        shape = (geom.in_channels, n, geom.height + top + bottom, geom.width + left + right)
        return xp.zeros(shape, dtype=like.dtype, device=device_of(like))

    @classmethod
    def grad_add(cls, backend: Backend, acc: Any, grad_cols: Any, geom: Geometry, rows: tuple[int, int]) -> Any:
        xp = array_namespace(grad_cols)
        n, r = acc.shape[1], rows[1] - rows[0]
        taps = xp.reshape(grad_cols, (geom.in_channels, geom.kernel_h * geom.kernel_w, n, r, geom.out_w))
        for k, (row_slice, col_slice) in enumerate(cls._taps(geom, rows)):
            acc = backend.slice_add(acc, (slice(None), slice(None), row_slice, col_slice), taps[:, k, ...])
        return acc

    @staticmethod
    def grad_finish(acc: Any, n: int, geom: Geometry) -> Any:
        xp = array_namespace(acc)
        top, _, left, _ = geom.padding
        interior = acc[:, :, top : top + geom.height, left : left + geom.width]
        return xp.permute_dims(interior, (1, 0, 2, 3))  # a view; _conv places it into the result


class GatherTransposed(Gather):
    """``gather`` with a deterministic backward pass: a gather through the transposed plan."""

    @staticmethod
    def grad_start(backend: Backend, like: Any, n: int, geom: Geometry) -> Any:
        xp = array_namespace(like)
        return xp.zeros((n, geom.in_channels, geom.height, geom.width), dtype=like.dtype, device=device_of(like))

    @classmethod
    def grad_add(cls, backend: Backend, acc: Any, grad_cols: Any, geom: Geometry, rows: tuple[int, int]) -> Any:
        xp = array_namespace(grad_cols)
        n = acc.shape[0]
        # Per sample, in the plan's order, and a zero at the end for the readers' padding.
        grad_cols = xp.concat([cls._per_sample(grad_cols, n, geom, rows),
                               xp.zeros((n, 1), dtype=acc.dtype, device=device_of(acc))], axis=1)
        readers = backend.constant(("readers", geom, rows), lambda: gather_readers(geom, rows))
        (h0, h1), depth = input_rows(geom, rows), readers.shape[0]
        if depth == 0:  # these output rows read only padding
            return acc
        gathered = xp.take(grad_cols, xp.reshape(readers, (-1,)), axis=1)
        gathered = xp.reshape(gathered, (n, depth, geom.in_channels, h1 - h0, geom.width))
        total = gathered[:, 0, ...]
        for k in range(1, depth):  # one reader at a time: the order of the sum is fixed
            total = total + gathered[:, k, ...]
        return backend.slice_add(acc, (slice(None), slice(None), slice(h0, h1), slice(None)), total)

    @staticmethod
    def grad_finish(acc: Any, n: int, geom: Geometry) -> Any:
        return acc


class Kernels:
    """The backend's device kernels (``Backend.kernels``): im2col, and col2im summed per pixel."""

    name = "kernels"

    @staticmethod
    def patches(backend: Backend, x: Any, geom: Geometry, rows: tuple[int, int]) -> Any:
        xp = array_namespace(x)
        n = x.shape[0]
        columns = n * (rows[1] - rows[0]) * geom.out_w
        cols = xp.empty((geom.groups * geom.patch_size * columns,), dtype=x.dtype, device=device_of(x))
        cols = backend.kernels.im2col(x, cols, kernel_args(geom, n, rows))
        return xp.reshape(cols, (geom.groups, geom.patch_size, columns))

    @staticmethod
    def grad_start(backend: Backend, like: Any, n: int, geom: Geometry) -> Any:
        xp = array_namespace(like)
        return xp.zeros((n * geom.sample_size,), dtype=like.dtype, device=device_of(like))

    @staticmethod
    def grad_add(backend: Backend, acc: Any, grad_cols: Any, geom: Geometry, rows: tuple[int, int]) -> Any:
        n = acc.shape[0] // geom.sample_size
        return backend.kernels.col2im(grad_cols, acc, kernel_args(geom, n, rows))

    @staticmethod
    def grad_finish(acc: Any, n: int, geom: Geometry) -> Any:
        xp = array_namespace(acc)
        return xp.reshape(acc, (n, geom.in_channels, geom.height, geom.width))


class Native:
    """The array library's own convolution (``Backend.native``: torch, JAX), forward and backward.

    A whole-call algorithm: no patch matrix of ours, so ``_conv`` hands it the whole call (it has
    ``forward`` and ``backward``, not ``patches``); its scratch memory is the library's.
    """

    name = "native"

    @staticmethod
    def fits(geom: Geometry, itemsize: int, limit: int) -> bool:
        return True

    @staticmethod
    def forward(backend: Backend, x: Any, weight: Any, bias: Any | None, geom: Geometry, limit: int,
                deterministic: bool) -> Any:
        return backend.native.forward(x, weight, bias, geom, deterministic)

    @staticmethod
    def backward(backend: Backend, grad_out: Any, x: Any, weight: Any, geom: Geometry, limit: int,
                 deterministic: bool, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any, Any]:
        return backend.native.backward(grad_out, x, weight, geom, deterministic, needs=needs)


ALGORITHMS = {algorithm.name: algorithm
              for algorithm in (Gather, Slices, Kernels, Native, Direct, Winograd, Pointwise)}
