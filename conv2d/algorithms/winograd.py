"""``algorithm="winograd"``: 3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3).

Each 2x2 block of outputs reads a 4x4 tile of the (padded) input, tiles overlapping by two rows and
columns. With the input tile ``d`` and the kernel ``g`` transformed once,

    V = B^T d B    (per channel and tile)        U = G g G^T    (per filter and channel)
    y = A^T [ sum_c U[o, c] * V[c] ] A            (elementwise in the 4x4 transformed domain)

the sum over channels is, for each of the 16 positions of the transformed domain, one matrix
product (tiles x C) @ (C x O): 16 products with 4*4 = 16 multiplications per 2x2 outputs where
im2col's one product has 9*4 = 36, and a transformed input 4x the input where im2col's patch matrix
is 9x. The three passes are all done this way:

    forward       M[xi]  = V[xi] @ U[xi]                       y  = A^T M A
    grad_weight   dU[xi] = V[xi]^T @ dM[xi], dM = A dy A^T     dg = G^T dU G
    grad_input    dV[xi] = dM[xi] @ U[xi]^T                    dd = B dV B^T, tiles added where they overlap

Dilation d: the 2x2 outputs of a tile are d apart and read input rows and columns d apart, so a
tile holds one phase (row and column modulo d) of the output. The padded input, seen as blocks of
2d rows (and columns), gives every tile row as a strided view: tile row k of block row t and phase
a is input row 2d*t + d*k + a. No copy rearranges phases; d = 1 is the plain case.

The transforms are additions and halvings only, so float32 loses little (relative error of a few
1e-7 against float64). float16 is computed in float32 and rounded back once: in float16 the input
transform's sums of four inputs overflowed from about 16,384 (NaN where the true result is finite),
and the error was 4x that of ``slices`` (now the same). Everything is channels-last (n, rows, cols,
C), so that each strided view's innermost run is C contiguous values. Written once on the array API:
every backend runs it; in-place additions go through ``Backend.slice_add``. Applies to 3x3 kernels
with stride 1 (any dilation, padding and groups); :func:`check_winograd` says so for any other layer.
``auto`` picks it where measured faster (:func:`conv2d._conv.auto_algorithm`).

Non-finite values: the transforms add and subtract neighbouring inputs, so an inf meets its own
negative (inf - inf = NaN) where im2col and PyTorch only multiply it by weights and sum it. One inf
pixel of x gives NaN outputs where PyTorch gives +-inf (measured: 449 of the 576 outputs that read
it, 64 channels and filters, 8x8, padding 1), and a non-finite weight reaches input-gradient pixels
its tap never reads (a NaN at a corner tap: 16 NaN pixels of a 4x4 input, padding 1, instead of
9). cuDNN's Winograd behaves alike; it is inherent in the method. ``auto`` therefore runs
``winograd`` only where x, the weight (and, backward, the output gradient) are all finite, and
``slices`` otherwise; ``algorithm="winograd"`` asked for explicitly is not checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from .._geometry import Geometry
from .._workspace import WholeSamples, bytes_per_item, sample_ranges
from ..backends import Backend

Tile = list  # rows of a tile, each a list of arrays (one per column of the tile)


# The one-dimensional transforms of F(2, 3), each applied to the rows and then to the columns of a tile.
def _input_transform(d0: Any, d1: Any, d2: Any, d3: Any) -> list[Any]:  # B^T d
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _input_transform_adjoint(v0: Any, v1: Any, v2: Any, v3: Any) -> list[Any]:  # B v
    return [v0, v1 - v2 + v3, v1 + v2 - v0, -v3]


def _kernel_transform(g0: Any, g1: Any, g2: Any) -> list[Any]:  # G g
    half_sum = (g0 + g2) * 0.5
    return [g0, half_sum + g1 * 0.5, half_sum - g1 * 0.5, g2]


def _kernel_transform_adjoint(u0: Any, u1: Any, u2: Any, u3: Any) -> list[Any]:  # G^T u
    half_sum, half_difference = (u1 + u2) * 0.5, (u1 - u2) * 0.5
    return [u0 + half_sum, half_difference, half_sum + u3]


def _output_transform(m0: Any, m1: Any, m2: Any, m3: Any) -> list[Any]:  # A^T m
    return [m0 + m1 + m2, m1 - m2 - m3]


def _output_transform_adjoint(y0: Any, y1: Any) -> list[Any]:  # A y
    return [y0, y0 + y1, y0 - y1, -y1]


def _on_rows(transform: Callable[..., list[Any]], tile: Tile) -> Tile:
    """`transform` applied down each column of `tile` (to its rows): a new list of rows."""
    columns = [transform(*column) for column in zip(*tile)]
    return [list(row) for row in zip(*columns)]


def _on_columns(transform: Callable[..., list[Any]], tile: Tile) -> Tile:
    """`transform` applied along each row of `tile` (to its columns)."""
    return [transform(*row) for row in tile]


def _both(transform: Callable[..., list[Any]], tile: Tile) -> Tile:
    return _on_columns(transform, _on_rows(transform, tile))


def _flatten(tile: Tile) -> list[Any]:
    return [value for row in tile for value in row]


def winograd_applies(geom: Geometry) -> bool:
    """Whether ``winograd`` computes the layer `geom`: a 3x3 kernel and stride 1 (any dilation, padding, groups)."""
    return (geom.kernel_h, geom.kernel_w) == (3, 3) and geom.stride == (1, 1)


def check_winograd(geom: Geometry) -> None:
    """Raise ValueError, saying what differs, unless :func:`winograd_applies` to `geom`."""
    if winograd_applies(geom):
        return
    wrong = []
    if (geom.kernel_h, geom.kernel_w) != (3, 3):
        wrong.append(f"kernel {geom.kernel_h}x{geom.kernel_w}")
    if geom.stride != (1, 1):
        wrong.append(f"stride {geom.stride}")
    raise ValueError(
        f"algorithm 'winograd' computes 3x3 convolutions with stride 1, not this layer's {', '.join(wrong)}; "
        "use algorithm='auto' (which picks it where it applies and pays), 'slices' or 'gather'"
    )


def _blocks(geom: Geometry) -> tuple[int, int]:
    """Block rows and columns: a block of 2d x 2d outputs is one 2x2-output tile per phase (dilation d)."""
    (dh, dw) = geom.dilation
    return -(-geom.out_h // (2 * dh)), -(-geom.out_w // (2 * dw))


def _tiles_per_sample(geom: Geometry) -> int:
    by, bx = _blocks(geom)
    return by * bx * geom.dilation[0] * geom.dilation[1]


def _working_itemsize(itemsize: int) -> int:
    """Bytes per value of the arithmetic: float16 is computed in float32 (see :func:`_working_dtype`)."""
    return max(itemsize, 4)


def _working_dtype(xp: Any, dtype: Any) -> Any:
    """float32 for float16 data, else the data's own dtype.

    The input transform adds up to four inputs and the output transform up to nine products'
    sums, so in float16 an input from about 16,384 overflowed to inf (then NaN) where the
    convolution's true result is finite, and the rounding error was 4x im2col's. In float32 the
    transforms cannot overflow for any float16 data, and the result is rounded once, back to float16.
    """
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype  # not xp.float16: array-api-strict has none


def _sample_scratch(geom: Geometry, itemsize: int) -> int:
    """Scratch of one sample in bytes, backward pass (the larger): the padded input and its gradient,
    and the 16-position transformed input, its gradient and the output gradient's, with one
    temporary of each size beside them (at the working item size: float16 is computed in float32)."""
    itemsize = _working_itemsize(itemsize)
    by, bx = _blocks(geom)
    (dh, dw) = geom.dilation
    padded = geom.in_channels * 2 * dh * (by + 1) * 2 * dw * (bx + 1)
    transformed = 16 * _tiles_per_sample(geom) * (geom.in_channels + geom.out_channels)
    return itemsize * 2 * (padded + 2 * transformed)


def _chunks(backend: Backend, geom: Geometry, batch: int, itemsize: int, limit: int) -> list[tuple[int, int]]:
    """Sample ranges: each chunk's transformed input within the backend's cache (``Backend.cache_bytes``,
    where it has one), its scratch within `limit`.

    On NumPy chunks of the L2 cache's size were the fastest of 256 KiB to 16 MiB (docs/benchmarks.md,
    "Winograd"): the transforms' passes over the chunk then stay in the cache.
    """
    itemsize = _working_itemsize(itemsize)
    transformed = itemsize * 16 * _tiles_per_sample(geom) * geom.in_channels
    cached = batch if backend.cache_bytes is None else backend.cache_bytes // max(transformed, 1)
    size = max(1, min(batch, cached, limit // _sample_scratch(geom, itemsize)))
    count = -(-batch // size)
    size = -(-batch // max(count, 1))  # evened out: no small remainder chunk
    return sample_ranges(batch, size)


def _zero_extend(xp: Any, a: Any, before: tuple[int, int], rows: int, cols: int) -> Any:
    """Channels-last `a` (n, h, w, c) inside zeros of (n, rows, cols, c), after `before` (top, left)
    zero rows and columns.

    The standard has no `pad`; concatenating zero blocks works on every library, JAX included.
    """
    n, h, w, c = a.shape
    top, left = before
    dev = device_of(a)
    if top or rows - top - h:
        a = xp.concat([xp.zeros((n, top, w, c), dtype=a.dtype, device=dev), a,
                       xp.zeros((n, rows - top - h, w, c), dtype=a.dtype, device=dev)], axis=1)
    if left or cols - left - w:
        a = xp.concat([xp.zeros((n, rows, left, c), dtype=a.dtype, device=dev), a,
                       xp.zeros((n, rows, cols - left - w, c), dtype=a.dtype, device=dev)], axis=2)
    return a


def _channels_last(xp: Any, a: Any, shape: tuple[int, ...]) -> Any:
    """`a` (a channels-last view of an NCHW array, or a copy) reshaped to `shape`, channels contiguous.

    Where no padding was added, `a` is still the transposed view, and a reshape could keep its
    strides (channels 4 KB apart): the flat reshape makes the one contiguous copy (measured 2x faster
    transforms on the seed's layer, which has no padding).
    """
    return xp.reshape(xp.reshape(a, (-1,)), shape)


def _tile_rows(geom: Geometry, k: int) -> tuple[slice, slice]:
    """Tile row `k` (0..3) of every block row and phase: (block-row slice, row-in-block slice)."""
    (by, _), (dh, _) = _blocks(geom), geom.dilation
    return slice(k // 2, k // 2 + by), slice(dh * (k % 2), dh * (k % 2) + dh)


def _tile_cols(geom: Geometry, k: int) -> tuple[slice, slice]:
    (_, bx), (_, dw) = _blocks(geom), geom.dilation
    return slice(k // 2, k // 2 + bx), slice(dw * (k % 2), dw * (k % 2) + dw)


def _padded_blocks(xp: Any, x: Any, geom: Geometry) -> Any:
    """x (n, C, H, W) channels-last with the layer's padding and zeros to whole blocks plus one:
    (n, BY + 1, 2dh, BX + 1, 2dw, C), tile rows and columns reaching into the next block."""
    (by, bx), (dh, dw) = _blocks(geom), geom.dilation
    top, _, left, _ = geom.padding
    padded = _zero_extend(xp, xp.permute_dims(x, (0, 2, 3, 1)), (top, left), 2 * dh * (by + 1), 2 * dw * (bx + 1))
    return _channels_last(xp, padded, (x.shape[0], by + 1, 2 * dh, bx + 1, 2 * dw, geom.in_channels))


def _by_group(xp: Any, stacked: Any, geom: Geometry) -> Any:
    """(16, n, BY, dh, BX, dw, channels) -> (16, groups, tiles, channels/groups): tiles as the rows of a product."""
    channels = stacked.shape[-1]
    tiles = stacked.shape[1] * _tiles_per_sample(geom)
    grouped = xp.reshape(stacked, (16, tiles, geom.groups, channels // geom.groups))
    return xp.permute_dims(grouped, (0, 2, 1, 3))  # a view; with one group, one reshape


def _from_groups(xp: Any, products: Any, n: int, geom: Geometry) -> Tile:
    """(16, groups, tiles, channels/groups) -> a 4x4 tile of (n, BY, dh, BX, dw, channels): the
    inverse of :func:`_by_group`."""
    (by, bx), (dh, dw) = _blocks(geom), geom.dilation
    channels = products.shape[1] * products.shape[3]
    products = xp.reshape(xp.permute_dims(products, (0, 2, 1, 3)), (16, n, by, dh, bx, dw, channels))
    return [[products[4 * i + j, ...] for j in range(4)] for i in range(4)]


def _transformed_input(xp: Any, x: Any, geom: Geometry) -> Any:
    """V = B^T d B of every tile and channel: (16, groups, tiles, C/groups)."""
    blocks = _padded_blocks(xp, x, geom)
    rows = _input_transform(*(blocks[:, r, s, ...] for r, s in (_tile_rows(geom, k) for k in range(4))))
    tile = [[row[:, :, :, r, s, :] for r, s in (_tile_cols(geom, k) for k in range(4))] for row in rows]
    return _by_group(xp, xp.stack(_flatten(_on_columns(_input_transform, tile))), geom)


def _transformed_grad_out(xp: Any, grad_out: Any, geom: Geometry) -> Any:
    """dM = A dy A^T of every tile of the output gradient: (16, groups, tiles, O/groups)."""
    (by, bx), (dh, dw) = _blocks(geom), geom.dilation
    n, o = grad_out.shape[0], geom.out_channels
    # Outputs beyond the layer's (a block's last rows and columns) get a zero gradient.
    grad = _zero_extend(xp, xp.permute_dims(grad_out, (0, 2, 3, 1)), (0, 0), 2 * dh * by, 2 * dw * bx)
    grad = _channels_last(xp, grad, (n, by, 2, dh, bx, 2, dw, o))  # output row 2d*t + d*p + a: tile row p of phase a
    tile = [[grad[:, :, p, :, :, q, :, :] for q in range(2)] for p in range(2)]
    return _by_group(xp, xp.stack(_flatten(_both(_output_transform_adjoint, tile))), geom)


def _transformed_kernel(xp: Any, weight: Any, geom: Geometry) -> Any:
    """U = G g G^T of every filter and channel: (16, groups, C/groups, O/groups)."""
    tile = _both(_kernel_transform, [[weight[:, :, i, j] for j in range(3)] for i in range(3)])
    kernel = xp.reshape(xp.stack(_flatten(tile)), (16, geom.groups, geom.filters_per_group, geom.channels_per_group))
    return xp.matrix_transpose(kernel)


def _kernel_grad(xp: Any, grad_kernel: Any, weight: Any, geom: Geometry) -> Any:
    """dg = G^T dU G, from (16, groups, C/groups, O/groups) back to the weight's (O, C/groups, 3, 3)."""
    grad_kernel = xp.reshape(xp.matrix_transpose(grad_kernel), (16, geom.out_channels, geom.channels_per_group))
    tile = [[grad_kernel[4 * i + j, ...] for j in range(4)] for i in range(4)]
    return xp.reshape(xp.stack(_flatten(_both(_kernel_transform_adjoint, tile)), axis=-1), weight.shape)


def _output(xp: Any, tile: Tile, bias: Any | None, geom: Geometry) -> Any:
    """A 2x2 tile of (n, BY, dh, BX, dw, O) outputs, plus the bias -> the layer's output (n, O, OH, OW)."""
    n, by, dh, bx, dw, o = tile[0][0].shape
    if bias is not None:  # added to the chunk while it is in the cache, channels last
        tile = [[value + bias for value in row] for row in tile]
    rows = [xp.stack(row, axis=4) for row in tile]  # (n, BY, dh, BX, 2, dw, O): column 2d*t + d*q + b
    y = xp.reshape(xp.stack(rows, axis=2), (n, 2 * dh * by, 2 * dw * bx, o))
    return xp.permute_dims(y[:, : geom.out_h, : geom.out_w, :], (0, 3, 1, 2))


def _input_grad(backend: Backend, xp: Any, tile: Tile, geom: Geometry) -> Any:
    """The input tiles' gradients (4x4 of (n, BY, dh, BX, dw, C)) added where tiles overlap: (n, C, H, W)."""
    (by, bx), (dh, dw) = _blocks(geom), geom.dilation
    n, c = tile[0][0].shape[0], geom.in_channels
    grad = xp.zeros((n, by + 1, 2 * dh, bx + 1, 2 * dw, c), dtype=tile[0][0].dtype, device=device_of(tile[0][0]))
    for k in range(4):
        for m in range(4):
            grad = backend.slice_add(grad, (slice(None), *_tile_rows(geom, k), *_tile_cols(geom, m), slice(None)),
                                     tile[k][m])
    grad = xp.reshape(grad, (n, 2 * dh * (by + 1), 2 * dw * (bx + 1), c))
    top, _, left, _ = geom.padding
    return xp.permute_dims(grad[:, top : top + geom.height, left : left + geom.width, :], (0, 3, 1, 2))


class Winograd(WholeSamples):
    """F(2x2, 3x3) on the array API: forward and both gradients, over chunks of the batch."""

    name = "winograd"
    check = staticmethod(check_winograd)

    @staticmethod
    def spreads_nonfinite(geom: Geometry) -> bool:
        """True: the transforms mix neighbouring inputs, so an inf or NaN reaches more outputs than read it."""
        return True

    sample_scratch = staticmethod(_sample_scratch)

    @staticmethod
    def forward(backend: Backend, x: Any, weight: Any, bias: Any | None, geom: Geometry, limit: int,
                deterministic: bool) -> Any:
        xp = array_namespace(x, weight)
        wide = _working_dtype(xp, x.dtype)  # float16 is computed in float32, chunk by chunk
        kernel = _transformed_kernel(xp, xp.astype(weight, wide, copy=False), geom)
        bias = None if bias is None else xp.astype(bias, wide, copy=False)
        pieces = []
        for start, stop in _chunks(backend, geom, x.shape[0], bytes_per_item(x), limit):
            chunk = xp.astype(x[start:stop, ...], wide, copy=False)
            products = xp.matmul(_transformed_input(xp, chunk, geom), kernel)
            tile = _both(_output_transform, _from_groups(xp, products, stop - start, geom))
            pieces.append(xp.astype(_output(xp, tile, bias, geom), x.dtype, copy=False))
        return pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)

    @staticmethod
    def backward(backend: Backend, grad_out: Any, x: Any, weight: Any, geom: Geometry, limit: int,
                 deterministic: bool, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any, Any]:
        xp = array_namespace(grad_out, x, weight)
        wide = _working_dtype(xp, x.dtype)  # float16 is computed in float32, chunk by chunk
        kernel_t = xp.matrix_transpose(_transformed_kernel(xp, xp.astype(weight, wide, copy=False), geom))
        grad_kernel = None
        pieces = []
        for start, stop in _chunks(backend, geom, x.shape[0], bytes_per_item(x), limit):
            grad_m = _transformed_grad_out(xp, xp.astype(grad_out[start:stop, ...], wide, copy=False), geom)
            chunk = xp.astype(x[start:stop, ...], wide, copy=False)
            part = xp.matmul(xp.matrix_transpose(_transformed_input(xp, chunk, geom)), grad_m)
            # Summed in place over the chunks where the backend allows it (a new array on JAX).
            grad_kernel = part if grad_kernel is None else backend.slice_add(grad_kernel, (...,), part)
            grad_v = _from_groups(xp, xp.matmul(grad_m, kernel_t), stop - start, geom)
            grad_x = _input_grad(backend, xp, _both(_input_transform_adjoint, grad_v), geom)
            pieces.append(xp.astype(grad_x, x.dtype, copy=False))
        grad_x = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)
        grad_weight = xp.astype(_kernel_grad(xp, grad_kernel, weight, geom), weight.dtype, copy=False)
        return grad_x, grad_weight, xp.sum(grad_out, axis=(0, 2, 3))
