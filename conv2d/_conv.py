"""Forward and backward arithmetic, written once on the array API namespace.

Nothing here knows which library it runs on: arrays come in checked (one library, one device,
one floating dtype, a valid geometry), the namespace is ``array_namespace`` of the inputs, and
what the standard lacks (scatter-add, device-resident constants) is a method of the backend.

Layouts: a sample's patch matrix is (groups, C/groups*kH*kW, OH*OW), so with the weight seen as
(groups, O/groups, C/groups*kH*kW) the convolution is one batched matrix product whose result is
already NCHW, and no transpose is needed on the way in or out.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from ._geometry import Geometry
from ._plan import gather_indices, index_dtype, row_length
from .backends import Backend


def patches(backend: Backend, x: Any, geom: Geometry) -> Any:
    """im2col: the patch matrices of a batch, shape (N, groups, C/groups*kH*kW, OH*OW)."""
    xp = array_namespace(x)
    n = x.shape[0]
    rows = xp.reshape(x, (n, geom.sample_size))
    if geom.padded:
        zero = xp.zeros((n, 1), dtype=x.dtype, device=device_of(x))
        rows = xp.concat([rows, zero], axis=1)
    plan = backend.constant(("gather", geom), lambda: gather_indices(geom))
    # The standard's `take` needs 1-D indices on one axis: the plan indexes a flattened sample.
    cols = xp.take(rows, plan, axis=1)
    return xp.reshape(cols, (n, geom.groups, geom.patch_size, geom.positions))


def forward(backend: Backend, x: Any, weight: Any, bias: Any | None, geom: Geometry) -> tuple[Any, Any]:
    """Return (y, patches): y is (N, O, OH, OW); patches can be handed to :func:`backward`."""
    xp = array_namespace(x, weight)
    cols = patches(backend, x, geom)
    w = xp.reshape(weight, (1, geom.groups, geom.filters_per_group, geom.patch_size))
    y = xp.reshape(xp.matmul(w, cols), (x.shape[0], geom.out_channels, geom.out_h, geom.out_w))
    if bias is not None:
        y = y + xp.reshape(bias, (1, geom.out_channels, 1, 1))
    return y, cols


def backward(
    backend: Backend, grad_out: Any, x: Any, weight: Any, geom: Geometry, cols: Any | None = None
) -> tuple[Any, Any, Any]:
    """Return (grad_x, grad_weight, grad_bias). `cols` are the forward's patches; if given, `x` is not read."""
    xp = array_namespace(grad_out, weight)
    n = grad_out.shape[0]
    if cols is None:
        cols = patches(backend, x, geom)
    grad_y = xp.reshape(grad_out, (n, geom.groups, geom.filters_per_group, geom.positions))
    grad_bias = xp.sum(grad_out, axis=(0, 2, 3))
    # Per-sample products summed over the batch: the patch matrix is read in place, not transposed.
    grad_weight = xp.sum(xp.matmul(grad_y, xp.matrix_transpose(cols)), axis=0)
    grad_weight = xp.reshape(grad_weight, weight.shape)
    w = xp.reshape(weight, (1, geom.groups, geom.filters_per_group, geom.patch_size))
    grad_cols = xp.matmul(xp.matrix_transpose(w), grad_y)
    return col2im(backend, grad_cols, geom, n), grad_weight, grad_bias


def col2im(backend: Backend, grad_cols: Any, geom: Geometry, n: int) -> Any:
    """Sum patch gradients back onto the input pixels they were read from: (N, C, H, W)."""
    xp = array_namespace(grad_cols)
    dev = device_of(grad_cols)
    length = row_length(geom)
    plan = backend.constant(("gather", geom), lambda: gather_indices(geom))
    # A pixel read by several patches receives the sum of their gradients: a scatter-*add*
    # over one flat index per patch element of the whole batch.
    dtype = backend.dtype(index_dtype(max(n * length - 1, 0)))
    offsets = xp.arange(0, n * length, length, dtype=dtype, device=dev)
    indices = xp.reshape(xp.reshape(offsets, (n, 1)) + xp.astype(plan, dtype), (-1,))
    target = xp.zeros((n * length,), dtype=grad_cols.dtype, device=dev)
    summed = backend.scatter_add(target, indices, xp.reshape(grad_cols, (-1,)))
    grad_x = xp.reshape(summed, (n, length))[:, : geom.sample_size]
    return xp.reshape(grad_x, (n, geom.in_channels, geom.height, geom.width))
