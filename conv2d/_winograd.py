"""``algorithm="winograd"``: 3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3).

Each 2x2 block of outputs reads a 4x4 tile of the (padded) input, tiles overlapping by two rows and
columns. With the input tile ``d`` and the kernel ``g`` transformed once,

    V = B^T d B    (per channel and tile)        U = G g G^T    (per filter and channel)
    y = A^T [ sum_c U[o, c] * V[c] ] A            (elementwise in the 4x4 transformed domain)

the sum over channels is, for each of the 16 positions of the transformed domain, one matrix
product (O x C) @ (C x tiles): 16 products with 4*4 = 16 multiplications per 2x2 outputs where
im2col's one product has 9*4 = 36, and a transformed input 4x the input where im2col's patch matrix
is 9x. The three passes are all done this way:

    forward       M[xi]  = U[xi] @ V[xi]                       y  = A^T M A
    grad_weight   dU[xi] = dM[xi] @ V[xi]^T, dM = A dy A^T     dg = G^T dU G
    grad_input    dV[xi] = U[xi]^T @ dM[xi]                    dd = B dV B^T, tiles added where they overlap

The transforms are additions and halvings only, so float32 loses little (relative error of a few
1e-7 against float64). Written once on the array API: every backend runs it; in-place additions go
through ``Backend.slice_add``. Applies to 3x3 kernels with stride 1 and dilation 1 (any padding and
groups); :func:`check_winograd` says so for any other layer. ``auto`` picks it where measured faster
(:func:`conv2d._conv.auto_algorithm`).
"""

from __future__ import annotations

from typing import Any, Callable

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from ._geometry import Geometry
from ._workspace import bytes_per_item
from .backends import Backend


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


def _unflatten(stacked: Any, side: int) -> Tile:
    """(side*side, ...) -> rows of arrays: the transformed domain's positions as a tile."""
    return [[stacked[side * i + j, ...] for j in range(side)] for i in range(side)]


def winograd_applies(geom: Geometry) -> bool:
    """Whether ``winograd`` computes the layer `geom`: a 3x3 kernel, stride 1, dilation 1."""
    return (geom.kernel_h, geom.kernel_w) == (3, 3) and geom.stride == (1, 1) and geom.dilation == (1, 1)


def check_winograd(geom: Geometry) -> None:
    """Raise ValueError, saying what differs, unless :func:`winograd_applies` to `geom`."""
    if winograd_applies(geom):
        return
    wrong = []
    if (geom.kernel_h, geom.kernel_w) != (3, 3):
        wrong.append(f"kernel {geom.kernel_h}x{geom.kernel_w}")
    if geom.stride != (1, 1):
        wrong.append(f"stride {geom.stride}")
    if geom.dilation != (1, 1):
        wrong.append(f"dilation {geom.dilation}")
    raise ValueError(
        f"algorithm 'winograd' computes 3x3 convolutions with stride 1 and dilation 1, not this layer's "
        f"{', '.join(wrong)}; use algorithm='auto' (which picks it where it applies and pays), 'slices' or 'gather'"
    )


def _tiles(geom: Geometry) -> tuple[int, int]:
    """Tile rows and columns: one tile per 2x2 block of outputs (a last odd row or column padded)."""
    return -(-geom.out_h // 2), -(-geom.out_w // 2)


def _sample_scratch(geom: Geometry, itemsize: int) -> int:
    """Scratch of one sample in bytes, backward pass (the larger): the padded input and its gradient,
    and the 16-position transformed input, its gradient and the output gradient's, with one
    temporary of each size beside them."""
    ty, tx = _tiles(geom)
    padded = geom.in_channels * (2 * ty + 2) * (2 * tx + 2)
    transformed = 16 * ty * tx * (geom.in_channels + geom.out_channels)
    return itemsize * 2 * (padded + 2 * transformed)


def _chunks(backend: Backend, geom: Geometry, batch: int, itemsize: int, limit: int) -> list[tuple[int, int]]:
    """Sample ranges: each chunk's transformed input within the backend's cache (``Backend.cache_bytes``,
    where it has one), its scratch within `limit`.

    On NumPy chunks of the L2 cache's size were the fastest of 256 KiB to 16 MiB (docs/benchmarks.md,
    "Winograd"): the transforms' passes over the chunk then stay in the cache.
    """
    ty, tx = _tiles(geom)
    transformed = itemsize * 16 * ty * tx * geom.in_channels
    cached = batch if backend.cache_bytes is None else backend.cache_bytes // max(transformed, 1)
    size = max(1, min(batch, cached, limit // _sample_scratch(geom, itemsize)))
    count = -(-batch // size)
    size = -(-batch // max(count, 1))  # evened out: no small remainder chunk
    return [(start, min(start + size, batch)) for start in range(0, batch, size)] or [(0, 0)]


def _padded_channels_last(xp: Any, x: Any, geom: Geometry) -> Any:
    """(n, 2*TY+2, 2*TX+2, C): x channels-last, with the layer's padding and the tiles' extra row/column.

    Channels last, every tile row and column below is a strided view whose innermost run is the C
    contiguous channels: measured 2x faster transforms than channel-major rows of TX strided values.
    """
    ty, tx = _tiles(geom)
    top, _, left, _ = geom.padding
    n, c, h, w = x.shape
    x = xp.permute_dims(x, (0, 2, 3, 1))
    dev = device_of(x)
    # The standard has no `pad`; concatenating zero blocks works on every library, JAX included.
    bottom, right = 2 * ty + 2 - top - h, 2 * tx + 2 - left - w
    x = xp.concat([xp.zeros((n, top, w, c), dtype=x.dtype, device=dev), x,
                   xp.zeros((n, bottom, w, c), dtype=x.dtype, device=dev)], axis=1)
    height = x.shape[1]
    return xp.concat([xp.zeros((n, height, left, c), dtype=x.dtype, device=dev), x,
                      xp.zeros((n, height, right, c), dtype=x.dtype, device=dev)], axis=2)


def _by_group(xp: Any, stacked: Any, geom: Geometry, channels: int) -> Any:
    """(16, n, TY, TX, channels) -> (16, groups, n*TY*TX, channels/groups): tiles as the rows of a product."""
    rows = stacked.shape[1] * stacked.shape[2] * stacked.shape[3]
    if geom.groups == 1:
        return xp.reshape(stacked, (16, 1, rows, channels))
    grouped = xp.reshape(stacked, (16, rows, geom.groups, channels // geom.groups))
    return xp.permute_dims(grouped, (0, 2, 1, 3))


def _from_groups(xp: Any, products: Any, n: int, geom: Geometry) -> Any:
    """(16, groups, n*TY*TX, channels/groups) -> (16, n, TY, TX, channels): the inverse of :func:`_by_group`."""
    ty, tx = _tiles(geom)
    channels = products.shape[1] * products.shape[3]
    if geom.groups > 1:
        products = xp.permute_dims(products, (0, 2, 1, 3))
    return xp.reshape(products, (16, n, ty, tx, channels))


def _transformed_input(xp: Any, x: Any, geom: Geometry) -> Any:
    """V = B^T d B of every tile and channel: (16, groups, n*TY*TX, C/groups)."""
    ty, tx = _tiles(geom)
    padded = _padded_channels_last(xp, x, geom)
    # Tile row a of every tile is the padded input's row 2*ty + a: a strided view, no copy.
    rows = _input_transform(*(padded[:, a : a + 2 * ty - 1 : 2, ...] for a in range(4)))
    tile = [[row[:, :, b : b + 2 * tx - 1 : 2, :] for b in range(4)] for row in rows]
    return _by_group(xp, xp.stack(_flatten(_on_columns(_input_transform, tile))), geom, geom.in_channels)


def _transformed_grad_out(xp: Any, grad_out: Any, geom: Geometry) -> Any:
    """dM = A dy A^T of every 2x2 block of the output gradient: (16, groups, n*TY*TX, O/groups)."""
    ty, tx = _tiles(geom)
    n, o = grad_out.shape[0], geom.out_channels
    grad = xp.permute_dims(grad_out, (0, 2, 3, 1))
    dev = device_of(grad)
    if 2 * ty != geom.out_h:  # an odd last row: its tiles' second output row is padding
        grad = xp.concat([grad, xp.zeros((n, 1, geom.out_w, o), dtype=grad.dtype, device=dev)], axis=1)
    if 2 * tx != geom.out_w:
        grad = xp.concat([grad, xp.zeros((n, 2 * ty, 1, o), dtype=grad.dtype, device=dev)], axis=2)
    tile = [[grad[:, p::2, q::2, :] for q in range(2)] for p in range(2)]
    return _by_group(xp, xp.stack(_flatten(_both(_output_transform_adjoint, tile))), geom, o)


def _transformed_kernel(xp: Any, weight: Any, geom: Geometry) -> Any:
    """U = G g G^T of every filter and channel: (16, groups, C/groups, O/groups)."""
    tile = _both(_kernel_transform, [[weight[:, :, i, j] for j in range(3)] for i in range(3)])
    kernel = xp.reshape(xp.stack(_flatten(tile)), (16, geom.groups, geom.filters_per_group, geom.channels_per_group))
    return xp.matrix_transpose(kernel)


def _kernel_grad(xp: Any, grad_kernel: Any, weight: Any, geom: Geometry) -> Any:
    """dg = G^T dU G, from (16, groups, C/groups, O/groups) back to the weight's (O, C/groups, 3, 3)."""
    grad_kernel = xp.reshape(xp.matrix_transpose(grad_kernel), (16, geom.out_channels, geom.channels_per_group))
    tile = _both(_kernel_transform_adjoint, _unflatten(grad_kernel, 4))
    return xp.reshape(xp.stack(_flatten(tile), axis=-1), weight.shape)


def _interleave(xp: Any, tile: Tile) -> Any:
    """A 2x2 tile of (n, TY, TX, O) arrays -> (n, 2*TY, 2*TX, O): element (p, q) to row 2*ty+p, column 2*tx+q."""
    n, ty, tx, o = tile[0][0].shape
    rows = [xp.reshape(xp.stack(row, axis=3), (n, ty, 2 * tx, o)) for row in tile]
    return xp.reshape(xp.stack(rows, axis=2), (n, 2 * ty, 2 * tx, o))


class Winograd:
    """F(2x2, 3x3) on the array API: forward and both gradients, over chunks of the batch."""

    name = "winograd"

    @staticmethod
    def fits(geom: Geometry, itemsize: int, limit: int) -> bool:
        """Whether one sample's scratch fits `limit`; where not, ``_conv`` runs ``slices``, which
        can split a sample's output rows."""
        return _sample_scratch(geom, itemsize) <= limit

    @staticmethod
    def forward(backend: Backend, x: Any, weight: Any, bias: Any | None, geom: Geometry, limit: int,
                deterministic: bool) -> Any:
        xp = array_namespace(x, weight)
        kernel = _transformed_kernel(xp, weight, geom)
        pieces = []
        for start, stop in _chunks(backend, geom, x.shape[0], bytes_per_item(x), limit):
            products = xp.matmul(_transformed_input(xp, x[start:stop, ...], geom), kernel)
            tile = _both(_output_transform, _unflatten(_from_groups(xp, products, stop - start, geom), 4))
            y = _interleave(xp, tile)[:, : geom.out_h, : geom.out_w, :]
            pieces.append(xp.permute_dims(y, (0, 3, 1, 2)))
        y = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)
        if bias is not None:
            y = y + xp.reshape(bias, (1, geom.out_channels, 1, 1))
        return y

    @staticmethod
    def backward(backend: Backend, grad_out: Any, x: Any, weight: Any, geom: Geometry, limit: int,
                 deterministic: bool) -> tuple[Any, Any, Any]:
        xp = array_namespace(grad_out, x, weight)
        ty, tx = _tiles(geom)
        top, _, left, _ = geom.padding
        kernel_t = xp.matrix_transpose(_transformed_kernel(xp, weight, geom))
        grad_kernel = None
        pieces = []
        for start, stop in _chunks(backend, geom, x.shape[0], bytes_per_item(x), limit):
            n = stop - start
            grad_m = _transformed_grad_out(xp, grad_out[start:stop, ...], geom)
            part = xp.matmul(xp.matrix_transpose(_transformed_input(xp, x[start:stop, ...], geom)), grad_m)
            # Summed in place over the chunks where the backend allows it (a new array on JAX).
            grad_kernel = part if grad_kernel is None else backend.slice_add(grad_kernel, (...,), part)
            grad_v = _from_groups(xp, xp.matmul(grad_m, kernel_t), n, geom)
            tile = _both(_input_transform_adjoint, _unflatten(grad_v, 4))
            grad_padded = xp.zeros((n, 2 * ty + 2, 2 * tx + 2, geom.in_channels), dtype=x.dtype, device=device_of(x))
            for a in range(4):  # tiles overlap by two rows and columns: their gradients add up
                for b in range(4):
                    key = (slice(None), slice(a, a + 2 * ty - 1, 2), slice(b, b + 2 * tx - 1, 2), slice(None))
                    grad_padded = backend.slice_add(grad_padded, key, tile[a][b])
            interior = grad_padded[:, top : top + geom.height, left : left + geom.width, :]
            pieces.append(xp.permute_dims(interior, (0, 3, 1, 2)))
        grad_x = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)
        return grad_x, _kernel_grad(xp, grad_kernel, weight, geom), xp.sum(grad_out, axis=(0, 2, 3))
