"""Compiled Winograd F(2x2, 3x3) for 3x3 layers with stride 1 and dilation 1, fused over cache-sized chunks.

The maths is that of ``algorithm="winograd"`` (:mod:`conv2d.algorithms.winograd`): each 2x2 block of
outputs reads a 4x4 input tile d; with V = B^T d B per channel and tile, U = G g G^T per filter and
channel, the outputs are y = A^T M A with M[xi] = U[xi] @ V[xi] for each of the 16 positions xi of
the transformed domain. Here the transforms are Numba kernels and the 16 products NumPy's (the BLAS
single-threaded inside a task), and each task does all three steps on one chunk of tiles (whole
rows of tiles, across samples) of about twice the core's L2 cache (measured: :data:`_CHUNK_CACHES`):
it transforms its input tiles, multiplies them there, and inverse-transforms the products into the
output (bias added). No full-size transformed array goes through main memory, where the array-API
version stages all three. Each task allocates its buffers once, for all its chunks.

- forward: the chunk's V (16, C, tiles), M = U @ V per group (16, O, tiles), y from M.
- input gradient: the convolution of the output gradient with the flipped, transposed weight
  (padding 2 - padding on each side), i.e. the forward's tasks on other arrays; each input pixel is
  written by the one task whose tiles cover it.
- weight gradient: each task transforms its chunks' output gradient (dM = A dy A^T) and input tiles
  and sums dU[xi] += dM[xi] @ V[xi]^T; the caller adds the tasks' dU in task order (deterministic),
  then applies the weight transform's adjoint, dg = G^T dU G.

Groups are products per group (the 16 x groups products of one chunk are one batched ``matmul``).
Calls with few tiles (a small batch of small images: :data:`_FEWEST_TILES`) run :mod:`.im2col`,
where the weight's transforms would cost more than the products save.
Non-finite values: the transforms add and subtract neighbouring values, so an inf meets its own
negative (NaN) where PyTorch gives inf: :data:`SPREADS_NONFINITE`, so that ``auto`` checks the inputs
and runs ``slices`` where they are not all finite (see the array-API module's docstring).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..._geometry import Geometry
from . import im2col
from ._jit import kernel
from ._threads import run, split

SPREADS_NONFINITE = True


def applies(geom: Geometry) -> bool:
    """Whether this module computes `geom`: a 3x3 kernel, stride 1, dilation 1 (any padding and groups)."""
    return (geom.kernel_h, geom.kernel_w) == (3, 3) and geom.stride == (1, 1) and geom.dilation == (1, 1)


def winograd_pays(geom: Geometry) -> bool:
    """Whether this module computes `geom` faster than compiled im2col: where it :func:`applies`, with at
    least :data:`_FEWEST_CHANNELS` channels per group.

    Measured forward+backward float32, one thread (ms winograd / im2col, best of 2; 1 MiB L2, OpenBLAS
    SkylakeX kernels; padding 1): N32 16x16 C1 O16 1.72/1.07, C2 O2 0.36/0.47, C4 O4 0.88/1.54,
    C8 O8 1.69/3.28, C16 O16 3.78/6.24, C32 O32 7.73/15.94; N8 32x32 C1 O64 5.42/3.45, C2 O32 1.64/2.12,
    C3 O16 1.36/2.04, C16 O3 1.12/2.73; grouped N32 16x16 C64 O64 groups 8 10.11/16.01, groups 2
    13.47/25.69, C128 O128 groups 32 19.78/31.02. Winograd wins from 2 channels per group; with one,
    its four times larger transformed input costs more than the products it saves. Small batches
    are :func:`forward`'s and :func:`backward`'s concern (the geometry has no batch size).
    """
    return applies(geom) and geom.channels_per_group >= _FEWEST_CHANNELS


_FEWEST_CHANNELS = 2

# Fewer tiles than this in a call (all samples together) go to im2col: the weight's transforms (and
# the weight gradient's), which do not shrink with the batch, then cost more than the products
# save. Measured as above, N C64 O64: 1 sample 8x8 0.74/0.36 ms, 4 samples 8x8 (64 tiles) 1.19/1.23,
# 1 sample 16x16 (64 tiles) 1.73/1.62; C32 O32 6x6: 1 sample 0.24/0.13, 8 samples (72 tiles) 0.50/0.63.
_FEWEST_TILES = 64


def _few_tiles(batch: int, out_h: int, out_w: int) -> bool:
    tiles_y, tiles_x = _tiles(out_h, out_w)
    return batch * tiles_y * tiles_x < _FEWEST_TILES


# The kernels below are written for LLVM's loop vectoriser: each inner loop runs over contiguous memory
# without a branch and touches at most four arrays' rows (reads) and two (writes). Numba cannot tell
# LLVM that a kernel's arrays do not overlap, so LLVM checks it at run time before a vectorised loop,
# and gives up beyond 8 checks (reads x writes): one loop with 16 reads and 4 writes ran scalar, ~2x
# slower than the same work split into the passes below.


@kernel
def _input_tiles(x, v, r0, r1, tiles_y, tiles_x, top, left):
    """v[(i, j), c, t] = (B^T d B)[i, j] of each channel c and tile t of the global tile rows [r0, r1).

    Global tile row r is tile row r % tiles_y of sample r // tiles_y; tile t = (r - r0) * tiles_x + tx
    reads d = x[s, c, 2*ty - top : +4, 2*tx - left : +4], zero outside x (`top`, `left` may be negative).
    B^T is applied to the tile row's four input rows at once (full rows, contiguous), then B to each
    tile's four columns of the result (every other column: LLVM's interleaved loads).
    """
    _, channels, height, width = x.shape
    span = 2 * tiles_x + 2  # the padded columns that the tiles read
    mixed = np.zeros((4, span), dtype=x.dtype)  # B^T down the columns; zero where the padding is
    blank = np.zeros(width, dtype=x.dtype)  # an input row above or below x
    first, last = max(0, -left), min(width, span - left)  # x's columns that a tile reads
    for c in range(channels):
        for r in range(r0, r1):
            s = r // tiles_y
            y0 = 2 * (r - s * tiles_y) - top
            d0 = x[s, c, y0] if 0 <= y0 < height else blank
            d1 = x[s, c, y0 + 1] if 0 <= y0 + 1 < height else blank
            d2 = x[s, c, y0 + 2] if 0 <= y0 + 2 < height else blank
            d3 = x[s, c, y0 + 3] if 0 <= y0 + 3 < height else blank
            m0, m1, m2, m3 = mixed[0], mixed[1], mixed[2], mixed[3]
            for iw in range(first, last):  # rows d0 - d2, d1 + d2, d2 - d1, d1 - d3
                m0[iw + left] = d0[iw] - d2[iw]
                m3[iw + left] = d1[iw] - d3[iw]
            for iw in range(first, last):
                m1[iw + left] = d1[iw] + d2[iw]
                m2[iw + left] = d2[iw] - d1[iw]
            base = (r - r0) * tiles_x
            for i in range(4):  # then along each row, tile tx reading columns 2tx .. 2tx + 3
                mi = mixed[i]
                v0, v1 = v[4 * i, c, base : base + tiles_x], v[4 * i + 1, c, base : base + tiles_x]
                v2, v3 = v[4 * i + 2, c, base : base + tiles_x], v[4 * i + 3, c, base : base + tiles_x]
                for tx in range(tiles_x):
                    v0[tx] = mi[2 * tx] - mi[2 * tx + 2]
                    v3[tx] = mi[2 * tx + 1] - mi[2 * tx + 3]
                for tx in range(tiles_x):
                    v1[tx] = mi[2 * tx + 1] + mi[2 * tx + 2]
                    v2[tx] = mi[2 * tx + 2] - mi[2 * tx + 1]


@kernel
def _output_tiles(m, y, bias, has_bias, r0, r1, tiles_y, tiles_x):
    """y[s, o, 2ty : +2, 2tx : +2] = A^T M A (+ bias[o]) of each tile of the global tile rows [r0, r1),
    from m[(i, j), o, t]; outputs beyond y's edge dropped."""
    _, channels, out_h, out_w = y.shape
    tiles = (r1 - r0) * tiles_x
    pq = np.empty((8, tiles), dtype=y.dtype)  # A^T down the columns: rows p_j = pq[j], q_j = pq[4 + j]
    zero = np.zeros(1, dtype=y.dtype)[0]  # typed: a literal 0 would make `add` (and the sums) float64
    full = out_w // 2  # tiles whose both columns are outputs
    for o in range(channels):
        add = bias[o] if has_bias else zero
        for j in range(4):
            a0, a1, a2, a3 = m[j, o], m[4 + j, o], m[8 + j, o], m[12 + j, o]
            p, q = pq[j], pq[4 + j]
            for t in range(tiles):
                p[t] = a0[t] + a1[t] + a2[t]
                q[t] = a1[t] - a2[t] - a3[t]
        for r in range(r0, r1):
            s = r // tiles_y
            oy = 2 * (r - s * tiles_y)
            base = (r - r0) * tiles_x
            for a in range(min(2, out_h - oy)):
                line = y[s, o, oy + a]
                b0, b1 = pq[4 * a, base : base + tiles_x], pq[4 * a + 1, base : base + tiles_x]
                b2, b3 = pq[4 * a + 2, base : base + tiles_x], pq[4 * a + 3, base : base + tiles_x]
                for tx in range(full):
                    line[2 * tx] = b0[tx] + b1[tx] + b2[tx] + add
                    line[2 * tx + 1] = b1[tx] - b2[tx] - b3[tx] + add
                if full < tiles_x:
                    line[2 * full] = b0[full] + b1[full] + b2[full] + add


@kernel
def _grad_tiles(grad_out, dm, r0, r1, tiles_y, tiles_x):
    """dm[(i, j), o, t] = (A dy A^T)[i, j] of each tile's 2x2 output gradient dy (zero beyond the edge)."""
    _, channels, out_h, out_w = grad_out.shape
    tiles = (r1 - r0) * tiles_x
    rows = np.zeros((2, 2, tiles), dtype=grad_out.dtype)  # output row oy + a, column 2tx + b at [a, b, t]
    mixed = np.empty((4, 2, tiles), dtype=grad_out.dtype)  # A down the columns
    full = out_w // 2
    for o in range(channels):
        for r in range(r0, r1):
            s = r // tiles_y
            oy = 2 * (r - s * tiles_y)
            base = (r - r0) * tiles_x
            for a in range(2):
                even, odd = rows[a, 0, base : base + tiles_x], rows[a, 1, base : base + tiles_x]
                if oy + a < out_h:
                    line = grad_out[s, o, oy + a]
                    for tx in range(full):
                        even[tx] = line[2 * tx]
                        odd[tx] = line[2 * tx + 1]
                    if full < tiles_x:  # out_w odd: the last tile's second column is beyond the edge
                        even[full] = line[2 * full]
                        odd[full] = 0
                else:
                    even[:] = 0
                    odd[:] = 0
        for b in range(2):
            g0, g1 = rows[0, b], rows[1, b]
            m0, m1, m2, m3 = mixed[0, b], mixed[1, b], mixed[2, b], mixed[3, b]
            for t in range(tiles):  # A (y0, y1) = (y0, y0 + y1, y0 - y1, -y1)
                m0[t] = g0[t]
                m3[t] = -g1[t]
            for t in range(tiles):
                m1[t] = g0[t] + g1[t]
                m2[t] = g0[t] - g1[t]
        for i in range(4):  # then along each row
            a, b = mixed[i, 0], mixed[i, 1]
            d0, d1, d2, d3 = dm[4 * i, o], dm[4 * i + 1, o], dm[4 * i + 2, o], dm[4 * i + 3, o]
            for t in range(tiles):
                d0[t] = a[t]
                d3[t] = -b[t]
            for t in range(tiles):
                d1[t] = a[t] + b[t]
                d2[t] = a[t] - b[t]


@kernel
def _weight_tiles(weight, u):
    """u[(i, j), o, c] = (G g G^T)[i, j] of each filter o and channel c: g = weight[o, c] (3x3)."""
    filters, channels = weight.shape[:2]
    rows = np.empty((4, 3), dtype=u.dtype)  # G g: (g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2) down each column
    for o in range(filters):
        for c in range(channels):
            for j in range(3):
                g0, g1, g2 = weight[o, c, 0, j], weight[o, c, 1, j], weight[o, c, 2, j]
                rows[0, j], rows[1, j], rows[2, j], rows[3, j] = g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2
            for i in range(4):  # then along each row
                g0, g1, g2 = rows[i, 0], rows[i, 1], rows[i, 2]
                u[4 * i, o, c] = g0
                u[4 * i + 1, o, c] = (g0 + g1 + g2) * 0.5
                u[4 * i + 2, o, c] = (g0 - g1 + g2) * 0.5
                u[4 * i + 3, o, c] = g2


@kernel
def _weight_grad_tiles(grad_u, grad_w):
    """grad_w[o, c] = G^T dU G of each filter o and channel c, dU[i, j] = grad_u[(i, j), o, c]."""
    filters, channels = grad_w.shape[:2]
    rows = np.empty((4, 3), dtype=grad_w.dtype)  # dU G: (u0 + (u1 + u2) / 2, (u1 - u2) / 2, (u1 + u2) / 2 + u3) along each row
    for o in range(filters):
        for c in range(channels):
            for i in range(4):
                u0, u1, u2, u3 = grad_u[4 * i, o, c], grad_u[4 * i + 1, o, c], grad_u[4 * i + 2, o, c], grad_u[4 * i + 3, o, c]
                rows[i, 0], rows[i, 1], rows[i, 2] = u0 + (u1 + u2) * 0.5, (u1 - u2) * 0.5, (u1 + u2) * 0.5 + u3
            for j in range(3):  # then down each column
                u0, u1, u2, u3 = rows[0, j], rows[1, j], rows[2, j], rows[3, j]
                grad_w[o, c, 0, j] = u0 + (u1 + u2) * 0.5
                grad_w[o, c, 1, j] = (u1 - u2) * 0.5
                grad_w[o, c, 2, j] = (u1 + u2) * 0.5 + u3


def _transformed_weight(weight: np.ndarray, groups: int) -> np.ndarray:
    """U = G g G^T of every filter and channel: (16, groups, O/groups, C/groups), C-contiguous."""
    filters, channels = weight.shape[:2]
    u = np.empty((16, filters, channels), dtype=weight.dtype)
    _weight_tiles(np.ascontiguousarray(weight), u)
    return u.reshape(16, groups, filters // groups, channels)


def _weight_grad(grad_u: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """dg = G^T dU G: (16, groups, O/groups, C/groups) back to the weight's (O, C/groups, 3, 3)."""
    grad_w = np.empty(weight.shape, dtype=weight.dtype)
    _weight_grad_tiles(grad_u.reshape(16, weight.shape[0], weight.shape[1]), grad_w)
    return grad_w


def _tile_bytes(channels: int, filters: int, itemsize: int) -> int:
    """Bytes of one tile's transformed input and products (or output gradient)."""
    return 16 * itemsize * (channels + filters)


# A chunk's transformed tiles and products fill this many L2 caches. Measured forward+backward float32,
# one thread (ms at 0.5, 1, 2, 4 MiB chunks, 1 MiB L2): N32 C64 16x16 O128 35.9 32.3 32.5 32.8,
# N32 C64 16x16 O64 19.5 18.6 19.4 19.2, N32 C128 8x8 O128 17.4 17.6 17.2 17.5, N64 C32 32x32 O64
# 84.9 78.1 71.7 72.7 (best of 3): the products' columns pay more than the cache loses beyond one L2
# (the transformed input of a chunk, about a third of it, still fits).
_CHUNK_CACHES = 2


def _row_chunks(start: int, stop: int, tiles_x: int, tile_bytes: int, cache_bytes: int) -> list[tuple[int, int]]:
    """Global tile rows [start, stop) in chunks whose transformed tiles fill :data:`_CHUNK_CACHES` x `cache_bytes`."""
    rows = max(1, _CHUNK_CACHES * cache_bytes // (tile_bytes * tiles_x))
    return [(r, min(r + rows, stop)) for r in range(start, stop, rows)]


def _tiles(out_h: int, out_w: int) -> tuple[int, int]:
    return -(-out_h // 2), -(-out_w // 2)


def scratch(geom: Geometry, itemsize: int, cache_bytes: int) -> int:
    """Bytes one task holds beside the result: a chunk's transformed tiles and products (about
    `cache_bytes` times _CHUNK_CACHES), the transformed weight and the task's weight gradient with its product (backward)."""
    weights = 16 * itemsize * geom.out_channels * geom.channels_per_group
    _, tiles_x = _tiles(max(geom.out_h, geom.height), max(geom.out_w, geom.width))
    chunk = max(_CHUNK_CACHES * cache_bytes, tiles_x * _tile_bytes(geom.in_channels, geom.out_channels, itemsize))
    # A small batch runs im2col (see _FEWEST_TILES).
    return max(chunk + 3 * weights, im2col.scratch(geom, itemsize, cache_bytes))


def _task_chunks(start: int, stop: int, tiles_x: int, tile_bytes: int, cache_bytes: int,
                 tasks: int) -> list[list[tuple[int, int]]]:
    """Global tile rows [start, stop) in cache-sized chunks, dealt out in order to at most `tasks` tasks
    (each allocates its buffers once, for its largest chunk)."""
    chunks = _row_chunks(start, stop, tiles_x, tile_bytes, cache_bytes)
    return [chunks[a:b] for a, b in split(len(chunks), tasks) if b > a]  # none for an empty batch


def _buffer(flat: np.ndarray, *shape: int) -> np.ndarray:
    """The start of the flat buffer `flat` as an array of `shape` (a chunk's, at most the largest's)."""
    return flat[: int(np.prod(shape))].reshape(shape)


# Tasks per worker: enough for the workers to even out (run() hands each the next task left), few
# enough that each task's buffers are allocated once for many chunks.
_TASKS_PER_WORKER = 4


def _convolve(x: np.ndarray, u: np.ndarray, bias: np.ndarray | None, out_shape: tuple[int, int], top: int,
              left: int, workers: int, cache_bytes: int) -> tuple[np.ndarray, list[Any]]:
    """The output array and the tasks that fill it: the 3x3 stride-1 convolution of `x` with the
    transformed weight `u` (16, groups, O/groups, C/groups), offset (`top`, `left`) into x."""
    n, channels = x.shape[:2]
    _, groups, per_group_out, per_group_in = u.shape
    out_channels = groups * per_group_out
    out_h, out_w = out_shape
    y = np.empty((n, out_channels, out_h, out_w), dtype=x.dtype)
    b = np.zeros(1, dtype=x.dtype) if bias is None else bias
    tiles_y, tiles_x = _tiles(out_h, out_w)

    def task(chunks: list[tuple[int, int]]) -> None:
        most = max(r1 - r0 for r0, r1 in chunks) * tiles_x
        v_flat = np.empty(16 * channels * most, dtype=x.dtype)
        m_flat = np.empty(16 * out_channels * most, dtype=x.dtype)
        for r0, r1 in chunks:
            tiles = (r1 - r0) * tiles_x
            v = _buffer(v_flat, 16, channels, tiles)
            _input_tiles(x, v, r0, r1, tiles_y, tiles_x, top, left)
            m = _buffer(m_flat, 16, groups, per_group_out, tiles)
            np.matmul(u, v.reshape(16, groups, per_group_in, tiles), out=m)
            _output_tiles(m.reshape(16, out_channels, tiles), y, b, bias is not None, r0, r1, tiles_y, tiles_x)

    tile_bytes = _tile_bytes(channels, out_channels, x.itemsize)
    dealt = _task_chunks(0, n * tiles_y, tiles_x, tile_bytes, cache_bytes, _TASKS_PER_WORKER * workers)
    return y, [partial(task, chunks) for chunks in dealt]


def forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, geom: Geometry, workers: int,
            cache_bytes: int) -> np.ndarray:
    if _few_tiles(x.shape[0], geom.out_h, geom.out_w):
        return im2col.forward(x, weight, bias, geom, workers, cache_bytes)
    top, _, left, _ = geom.padding
    u = _transformed_weight(weight, geom.groups)
    y, tasks = _convolve(x, u, bias, (geom.out_h, geom.out_w), top, left, workers, cache_bytes)
    run(tasks)
    return y


def backward(grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray, geom: Geometry, workers: int,
             cache_bytes: int, needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any]:
    if _few_tiles(x.shape[0], geom.out_h, geom.out_w):
        return im2col.backward(grad_out, x, weight, geom, workers, cache_bytes, needs)
    groups, filters, channels = geom.groups, geom.filters_per_group, geom.channels_per_group
    top, _, left, _ = geom.padding
    tasks: list[Any] = []
    grad_x = None
    if "x" in needs:
        # The input gradient is the convolution of grad_out with the flipped weight, filters and
        # channels swapped in each group, and padding 2 - padding (grad_x[h] = sum_i g[h + top - i] w[i]).
        flipped = weight.reshape(groups, filters, channels, 3, 3)[:, :, :, ::-1, ::-1]
        flipped = np.swapaxes(flipped, 1, 2).reshape(geom.in_channels, filters, 3, 3)
        grad_x, tasks = _convolve(grad_out, _transformed_weight(flipped, groups), None, (geom.height, geom.width),
                                  2 - top, 2 - left, workers, cache_bytes)
    weight_tasks = 0
    if "weight" in needs:
        tiles_y, tiles_x = _tiles(geom.out_h, geom.out_w)
        tile_bytes = _tile_bytes(geom.in_channels, geom.out_channels, x.itemsize)

        def weight_task(chunks: list[tuple[int, int]]) -> np.ndarray:
            most = max(r1 - r0 for r0, r1 in chunks) * tiles_x
            v_flat = np.empty(16 * geom.in_channels * most, dtype=x.dtype)
            dm_flat = np.empty(16 * geom.out_channels * most, dtype=x.dtype)
            grad_u = np.zeros((16, groups, filters, channels), dtype=x.dtype)
            product = np.empty_like(grad_u)
            for r0, r1 in chunks:
                tiles = (r1 - r0) * tiles_x
                v = _buffer(v_flat, 16, geom.in_channels, tiles)
                _input_tiles(x, v, r0, r1, tiles_y, tiles_x, top, left)
                dm = _buffer(dm_flat, 16, geom.out_channels, tiles)
                _grad_tiles(grad_out, dm, r0, r1, tiles_y, tiles_x)
                np.matmul(dm.reshape(16, groups, filters, tiles),
                          np.swapaxes(v.reshape(16, groups, channels, tiles), 2, 3), out=product)
                grad_u += product
            return grad_u

        # One task per worker: each sums a weight gradient the size of the weight's transform.
        dealt = _task_chunks(0, x.shape[0] * tiles_y, tiles_x, tile_bytes, cache_bytes, workers)
        weight_tasks = len(dealt)
        tasks += [partial(weight_task, chunks) for chunks in dealt]
    results = run(tasks)
    grad_w = None
    if "weight" in needs:
        grad_u = np.zeros((16, groups, filters, channels), dtype=x.dtype)  # an empty batch's
        for part in results[len(results) - weight_tasks :]:  # in task order: the same sum on every run
            grad_u += part
        grad_w = _weight_grad(grad_u, weight)
    return grad_x, grad_w
