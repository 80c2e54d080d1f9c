"""Forward and backward arithmetic, written once on the array API namespace.

Nothing here knows which library it runs on: arrays come in checked (one library, one device,
one floating dtype, a valid geometry), the namespace is ``array_namespace`` of the inputs, and
what the standard lacks (scatter-add, adding into a slice of an immutable array, device-resident
constants) is a method of the backend.

Layouts: a sample's patch matrix is (groups, C/groups*kH*kW, OH*OW), so with the weight seen as
(groups, O/groups, C/groups*kH*kW) the convolution is one batched matrix product whose result is
already NCHW, and no transpose is needed on the way in or out.

The work is done in chunks of samples (and of output rows, when one sample is too big) so that the
scratch memory stays under the workspace limit; with one chunk, nothing is split or copied.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from ._algorithms import ALGORITHMS
from ._geometry import Geometry
from ._workspace import Chunk, plan_chunks
from .backends import Backend


def choose_algorithm(backend: Backend, geom: Geometry, name: str):
    """The algorithm object for `name`; ``"auto"`` picks per backend from measurements."""
    if name != "auto":
        return ALGORITHMS[name]
    return ALGORITHMS["slices"]


def _chunks(x: Any, geom: Geometry, limit: int):
    itemsize = array_namespace(x).finfo(x.dtype).bits // 8
    return plan_chunks(geom, x.shape[0], itemsize, limit)


def _place(backend: Backend, whole: Any, key: tuple, piece: Any, single: bool) -> Any:
    """Put one chunk's result into the full result (or return it, when it is the only chunk)."""
    return piece if single else backend.slice_add(whole, key, piece)


def forward(
    backend: Backend, x: Any, weight: Any, bias: Any | None, geom: Geometry, algorithm: str, limit: int
) -> tuple[Any, Any | None]:
    """Return (y, patches): y is (N, O, OH, OW); patches (kept only when the batch was one chunk)
    can be handed back to :func:`backward` to save rebuilding them."""
    xp = array_namespace(x, weight)
    algo = choose_algorithm(backend, geom, algorithm)
    chunks = _chunks(x, geom, limit)
    single = len(chunks) == 1
    n = x.shape[0]
    w = xp.reshape(weight, (1, geom.groups, geom.filters_per_group, geom.patch_size))
    y = None if single else xp.zeros((n, geom.out_channels, geom.out_h, geom.out_w), dtype=x.dtype, device=device_of(x))
    for chunk in chunks:
        rows = (chunk.row_start, chunk.row_stop)
        cols = algo.patches(backend, x[chunk.start : chunk.stop, ...], geom, rows)
        piece = xp.reshape(
            xp.matmul(w, cols), (chunk.stop - chunk.start, geom.out_channels, rows[1] - rows[0], geom.out_w)
        )
        y = _place(backend, y, (slice(chunk.start, chunk.stop), slice(None), slice(*rows), slice(None)), piece, single)
    if bias is not None:
        y = y + xp.reshape(bias, (1, geom.out_channels, 1, 1))
    return y, cols if single else None


def backward(
    backend: Backend,
    grad_out: Any,
    x: Any,
    weight: Any,
    geom: Geometry,
    algorithm: str,
    limit: int,
    cols: Any | None = None,
) -> tuple[Any, Any, Any]:
    """Return (grad_x, grad_weight, grad_bias). `cols` are the forward's patches; if given, `x` is not read."""
    xp = array_namespace(grad_out, weight)
    algo = choose_algorithm(backend, geom, algorithm)
    n = grad_out.shape[0]
    chunks = _chunks(grad_out, geom, limit) if cols is None else [Chunk(0, n, 0, geom.out_h)]
    single = len(chunks) == 1
    w = xp.reshape(weight, (1, geom.groups, geom.filters_per_group, geom.patch_size))
    grad_bias = xp.sum(grad_out, axis=(0, 2, 3))
    grad_weight = None
    grad_x = None if single else xp.zeros((n, geom.in_channels, geom.height, geom.width), dtype=grad_out.dtype,
                                          device=device_of(grad_out))
    for (start, stop), row_chunks in groupby(chunks, key=lambda c: (c.start, c.stop)):
        acc = algo.grad_start(backend, grad_out, stop - start, geom)
        for chunk in row_chunks:
            rows = (chunk.row_start, chunk.row_stop)
            patches = cols if cols is not None else algo.patches(backend, x[start:stop, ...], geom, rows)
            grad_y = xp.reshape(
                grad_out[start:stop, :, rows[0] : rows[1], :],
                (stop - start, geom.groups, geom.filters_per_group, (rows[1] - rows[0]) * geom.out_w),
            )
            # Per-sample products summed over the batch: the patch matrix is read in place, not transposed.
            partial = xp.sum(xp.matmul(grad_y, xp.matrix_transpose(patches)), axis=0)
            grad_weight = partial if grad_weight is None else grad_weight + partial
            acc = algo.grad_add(backend, acc, xp.matmul(xp.matrix_transpose(w), grad_y), geom, rows)
        piece = algo.grad_finish(acc, stop - start, geom)
        grad_x = _place(backend, grad_x, (slice(start, stop), ...), piece, single)
    return grad_x, xp.reshape(grad_weight, weight.shape), grad_bias
