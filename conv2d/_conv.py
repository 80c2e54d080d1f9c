"""Forward and backward arithmetic, written once on the array API namespace.

Nothing here knows which library it runs on: arrays come in checked (one library, one device,
one floating dtype, a valid geometry), the namespace is ``array_namespace`` of the inputs, and
what the standard lacks (scatter-add, adding into a slice of an immutable array, device-resident
constants) is a method of the backend.

Layouts: the patch matrix is (groups, C/groups*kH*kW, n*OH*OW), the whole batch side by side in
the columns, and the weight is seen as (groups, O/groups, C/groups*kH*kW): the forward pass and each
of the two gradients is one matrix product per group, with the batch inside the product (no
per-sample loop, no per-sample weight gradients to sum). Only the (small) output and output
gradient are transposed between NCHW and this channel-major layout.

The work is done in chunks of samples (and of output rows, when one sample is too big) so that the
scratch memory stays under the workspace limit; with one chunk, nothing is split or copied.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from ._geometry import Geometry
from ._workspace import bytes_per_item, plan_chunks, scratch_bytes
from .algorithms import ALGORITHMS, GatherTransposed
from .algorithms.pointwise import pointwise_applies
from .algorithms.winograd import winograd_applies
from .backends import Backend


def choose_algorithm(name: str, backend: Backend, deterministic: bool = False, geom: Geometry | None = None):
    """The algorithm object for `name` on `backend` (for the layer `geom`, where ``"auto"`` needs it).

    ``"auto"`` follows :func:`auto_algorithm`; without `geom` it is the patch builder of the
    backend (``kernels`` on CuPy, else ``slices``), which pooling layers borrow. In deterministic
    mode, ``gather`` on a backend whose scatter-add uses atomics sums its gradient by a gather instead.
    """
    if name == "auto":
        name = auto_algorithm(backend, deterministic, geom)
    if name == "kernels" and backend.kernels is None:
        raise ValueError(
            f"algorithm 'kernels' runs compiled kernels, which backend {backend.spec!r} does not have (cupy has "
            "them, and numpy where Numba is installed: pip install 'conv2d[cpu]'); use algorithm='auto', 'gather' "
            "or 'slices'"
        )
    if name == "native" and backend.native is None:
        raise ValueError(
            f"algorithm 'native' calls the array library's own convolution, which backend {backend.spec!r} does "
            "not have (torch and jax do); use algorithm='auto', 'gather' or 'slices'"
        )
    check = getattr(ALGORITHMS[name], "check", None)  # algorithms for some layers only
    if geom is not None and check is not None:
        check(geom)
    if name == "gather" and deterministic and not backend.deterministic_scatter:
        return GatherTransposed
    if name == "kernels":
        # The backend's kernel set says how they run: im2col and col2im in ``Kernels``'s chunk loop
        # (CuPy), or a whole-call algorithm of its own (NumPy's compiled kernels).
        return getattr(backend.kernels, "algorithm", ALGORITHMS["kernels"])
    return ALGORITHMS[name]


def applicable(name: str, backend: Backend | None, geom: Geometry | None = None, deterministic: bool = False) -> bool:
    """Whether algorithm `name` computes the layer `geom` on `backend`: True exactly where
    :func:`choose_algorithm` returns it rather than raising ValueError.

    The one place that says where an algorithm applies (the tests draw their geometries by it):
    ``kernels`` needs the backend's device kernels and ``native`` its library's convolution; an
    algorithm with a ``check(geom)`` (``winograd``, ``pointwise``) computes only the layers it
    accepts. `backend` None asks about the layer alone (any backend); `geom` None about the backend
    alone (any layer). ``"auto"`` applies everywhere.
    """
    if name == "auto":
        return True
    if backend is not None and ((name == "kernels" and backend.kernels is None)
                                or (name == "native" and backend.native is None)):
        return False
    check = getattr(ALGORITHMS[name], "check", None)
    if geom is None or check is None:
        return True
    try:
        check(geom)
    except ValueError:
        return False
    return True


# Channels per group up to which ``direct`` beats im2col (grouped layers only): measured on NumPy,
# 32x64x32x32, 3x3 pad 1, forward+backward, channels per group 1, 2, 4, 8: direct 64, 106, 140,
# 374 ms against slices 82, 357, 314, 153 ms (best of 9, on a loaded 2-core machine, load 7).
DIRECT_MAX_CHANNELS_PER_GROUP = 4


# Where ``winograd`` beats im2col (``slices``) on NumPy, 3x3 stride-1 layers: forward+backward, float32, wall
# clock with 2 BLAS threads, medians of 10 (docs/benchmarks.md, "Winograd"). It wins wherever both the
# channels and the filters per group are at least 64 (N,C,H,O 32,64,16,64: 12.3 against 20.1 ms; 32,128,8,128:
# 8.7 against 15.9; 8,64,56,64: 33.4 against 47.3; 16,128,32,128: 71.4 against 89.4; 32,256,16,256: 147 against
# 200), and with 32 channels on outputs of at most 16x16 (32,32,16,32: 5.4 against 7.1). With 32 channels on
# 32x32 outputs it only ties (the seed's 64,32,32,64 unpadded: 52.7 against 52.4; float64 122 against 95, a
# loss), and with 16 it ties (32,16,16,16: 4.5 against 4.7): there the simpler im2col stays.
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_WIDE_CHANNELS = 64
WINOGRAD_SMALL_OUTPUT = 16 * 16


def _winograd_pays(backend: Backend, geom: Geometry) -> bool:
    narrowest = min(geom.channels_per_group, geom.filters_per_group)
    return (backend.name == "numpy" and winograd_applies(geom) and narrowest >= WINOGRAD_MIN_CHANNELS
            and (narrowest >= WINOGRAD_WIDE_CHANNELS or geom.out_h * geom.out_w <= WINOGRAD_SMALL_OUTPUT))


def auto_algorithm(backend: Backend, deterministic: bool = False, geom: Geometry | None = None) -> str:
    """The name of the algorithm ``"auto"`` runs: a fixed rule from measurements (docs/benchmarks.md).

    1. ``native`` where the library has its own convolution and its backend says it is the
       faster choice for `geom` (``Backend.native.prefers``: torch always; JAX but for 1x1 kernels
       and layers of at most 4 channels per group), except where it cannot honour deterministic
       mode (JAX on a GPU);
    2. ``kernels`` where the backend has compiled kernels and says they are the faster choice for
       `geom` (``Backend.kernels.prefers``): CuPy always; NumPy with Numba installed for every layer,
       where they measured faster on all the layers tried (``NumbaKernels.prefers``);
    3. ``direct`` for grouped layers with at most :data:`DIRECT_MAX_CHANNELS_PER_GROUP` channels
       per group (depthwise and near it), where im2col's patch matrix is mostly overhead;
       not on JAX, where its many small operations cost more than im2col's few;
    4. ``pointwise`` on NumPy for 1x1 kernels: batched products on the NCHW arrays, no transposes
       (measured faster than ``slices`` and than the bare product of im2col's layout);
    5. ``winograd`` on NumPy for 3x3 layers with stride 1 (any dilation) with at least
       :data:`WINOGRAD_WIDE_CHANNELS` channels and filters per group, or at least
       :data:`WINOGRAD_MIN_CHANNELS` on outputs of at most :data:`WINOGRAD_SMALL_OUTPUT` positions:
       where its 16 products of 4x4-transformed tiles were measured faster than im2col's one
       product of 9x-sized patches (float16 included: computed in float32, it measured 15x faster
       than ``slices``' float16 products); but ``slices`` where an input holds an inf or a NaN
       (checked at each call, see :func:`_finite_or_slices`), whose spread Winograd's transforms change;
    6. else ``slices`` (measured faster than ``gather`` on most shapes, deterministic, no index array).

    Without `geom` (pooling layers borrow the patch builder) rules 1 and 3 to 5 do not apply.
    """
    native = backend.native
    if geom is not None and native is not None and native.prefers(geom) and (native.deterministic or not deterministic):
        return "native"
    if backend.kernels is not None and backend.kernels.prefers(geom):
        return "kernels"
    if (geom is not None and backend.name != "jax" and geom.groups > 1
            and geom.channels_per_group <= DIRECT_MAX_CHANNELS_PER_GROUP):
        return "direct"
    if geom is not None and backend.name == "numpy" and pointwise_applies(geom):
        return "pointwise"
    if geom is not None and _winograd_pays(backend, geom):
        return "winograd"
    return "slices"


def _finite_or_slices(backend: Backend, algorithm: str, algo: Any, arrays: tuple[Any, ...], geom: Geometry) -> Any:
    """`algo`, or ``slices`` where ``auto`` chose an algorithm that spreads non-finite values on `geom`
    (``algo.spreads_nonfinite(geom)``: ``winograd``, and the compiled kernels where they run Winograd's
    transforms) and one of `arrays` holds an inf or a NaN.

    Winograd's transforms mix neighbouring inputs, so one inf turns into NaN outputs that PyTorch
    (and im2col) give as +-inf, and a non-finite value reaches more outputs than read it
    (:mod:`conv2d.algorithms.winograd`). ``auto`` should not change what a result means, so it keeps
    ``winograd`` for finite data only. The check is one pass over each array: measured on NumPy
    0.03 ms (float32) and 0.7 ms (float16) for x and weight of a layer whose forward and backward
    took 140 ms (8,64,16,64). An explicit ``algorithm="winograd"`` is not checked (documented).
    A traced array has no values to check; ``auto`` picks ``winograd`` only on NumPy anyway.
    """
    spreads = getattr(algo, "spreads_nonfinite", None)
    if algorithm != "auto" or spreads is None or not spreads(geom) or any(backend.traced(a) for a in arrays):
        return algo
    xp = array_namespace(*arrays)
    if all(bool(xp.all(xp.isfinite(a))) for a in arrays):
        return algo
    return ALGORITHMS["slices"]


def _whole_call_or_patches(algo: Any, x: Any, geom: Geometry, limit: int) -> Any:
    """`algo`, or ``slices`` where `algo` is a whole-call algorithm whose one sample does not fit
    the workspace limit (``direct`` cannot split a sample; ``slices`` splits its output rows)."""
    if hasattr(algo, "fits") and not algo.fits(geom, bytes_per_item(x), limit):
        return ALGORITHMS["slices"]
    return algo


def cache_limit(backend: Backend, geom: Geometry, batch: int, itemsize: int, limit: int) -> int:
    """The workspace limit for chunks whose patch matrix fits the backend's cache, at most `limit`.

    As many samples per chunk as fit in ``backend.cache_bytes`` (at least one: a sample's output
    rows are split only to honour `limit`), evened out over the chunks so that none is a small
    remainder. On NumPy, chunks of the L2 cache's size were the fastest of those measured
    (docs/benchmarks.md, "Chunk size"); a backend without ``cache_bytes`` gets `limit`.
    """
    if backend.cache_bytes is None or batch == 0:
        return limit
    patches_per_sample = itemsize * geom.in_channels * geom.kernel_h * geom.kernel_w * geom.out_h * geom.out_w
    samples = max(1, backend.cache_bytes // patches_per_sample)
    chunk_count = -(-batch // samples)
    samples = -(-batch // chunk_count)
    return min(limit, scratch_bytes(geom, samples, geom.out_h, itemsize))


def _chunks(backend: Backend, x: Any, geom: Geometry, limit: int):
    itemsize = bytes_per_item(x)
    return plan_chunks(geom, x.shape[0], itemsize, cache_limit(backend, geom, x.shape[0], itemsize, limit))


def _grad_patches(xp: Any, w: Any, grad_y: Any) -> Any:
    """weight^T @ grad_y per group: the gradient of the patch matrix."""
    if w.shape[1] == 1:
        # One filter per group (depthwise): an outer product. A matrix product with an inner
        # dimension of 1 is the slowest case of a BLAS (measured 3x slower than this broadcast).
        return xp.matrix_transpose(w) * grad_y
    return xp.matmul(xp.matrix_transpose(w), grad_y)


def _place(backend: Backend, whole: Any | None, shape: tuple[int, ...], key: tuple, piece: Any) -> Any:
    """Put one chunk's (reordered, non-contiguous) result into its place of the NCHW result.

    The first piece that is the whole result becomes it, as one contiguous copy (a flat reshape
    of a view copies); pieces of a split result are added into a zero array of the full shape.
    """
    xp = array_namespace(piece)
    if whole is None and tuple(piece.shape) == shape:
        return xp.reshape(xp.reshape(piece, (-1,)), shape)
    if whole is None:
        whole = xp.zeros(shape, dtype=piece.dtype, device=device_of(piece))
    return backend.slice_add(whole, key, piece)


def forward(
    backend: Backend, x: Any, weight: Any, bias: Any | None, geom: Geometry, algorithm: str, limit: int,
    deterministic: bool = False, keep_patches: bool = False,
) -> tuple[Any, Any | None]:
    """Return (y, patches): y is (N, O, OH, OW).

    With `keep_patches`, `patches` is every chunk's patch matrix (with the chunks), to hand back to
    :func:`backward` so that it does not rebuild them; kept only where the whole batch's patches
    fit the workspace limit at once, and not on a backend whose chunks are sized to its CPU cache
    (``Backend.cache_bytes``, NumPy): there rebuilding each chunk's patches in the cache measured
    faster than keeping them all in memory (layer forward+backward, float32: the seed's layer 67.5 ->
    53.9 ms, the 5x5 layer 45.8 -> 31.1 ms; docs/benchmarks.md). Else None, as without `keep_patches`.
    """
    xp = array_namespace(x, weight)
    # The bias is not checked: winograd adds it to each output alone, as im2col does.
    algo = _finite_or_slices(backend, algorithm, choose_algorithm(algorithm, backend, deterministic, geom), (x, weight), geom)
    algo = _whole_call_or_patches(algo, x, geom, limit)
    if hasattr(algo, "forward"):  # a whole-call algorithm: no patches to hand back
        return algo.forward(backend, x, weight, bias, geom, limit, deterministic), None
    chunks = _chunks(backend, x, geom, limit)
    n = x.shape[0]
    itemsize = bytes_per_item(x)
    keep = keep_patches and backend.cache_bytes is None and scratch_bytes(geom, n, geom.out_h, itemsize) <= limit
    kept: list[Any] | None = [] if keep else None
    w = xp.reshape(weight, (geom.groups, geom.filters_per_group, geom.patch_size))
    y = None
    for chunk in chunks:
        rows = (chunk.row_start, chunk.row_stop)
        cols = algo.patches(backend, x[chunk.start : chunk.stop, ...], geom, rows)
        if kept is not None:
            kept.append(cols)
        product = xp.reshape(
            xp.matmul(w, cols), (geom.out_channels, chunk.stop - chunk.start, rows[1] - rows[0], geom.out_w)
        )
        if bias is not None:
            # Into the product we own, in place where the backend allows it, before the one copy
            # that places it: no second pass over, and no second array the size of, the output.
            product = backend.slice_add(product, (...,), xp.reshape(bias, (geom.out_channels, 1, 1, 1)))
        key = (slice(chunk.start, chunk.stop), slice(None), slice(*rows), slice(None))
        y = _place(backend, y, (n, geom.out_channels, geom.out_h, geom.out_w), key, xp.permute_dims(product, (1, 0, 2, 3)))
    return y, None if kept is None else (chunks, kept)


def backward(
    backend: Backend,
    grad_out: Any,
    x: Any | None,
    weight: Any,
    geom: Geometry,
    algorithm: str,
    limit: int,
    cols: Any | None = None,
    deterministic: bool = False,
    needs: tuple[str, ...] = ("x", "weight"),
) -> tuple[Any, Any, Any]:
    """Return (grad_x, grad_weight, grad_bias). `cols` are the forward's kept patches (see
    :func:`forward`); if given, `x` is not read.

    `needs` names the gradients wanted ("x", "weight"); the others come back as None where skipping
    them saves work: the im2col algorithms skip the patch gradient or the patches and the weight
    product, the native ones ask their library for the wanted gradient alone. Without "weight", `x`
    may be None (it is read only for the weight gradient): a whole-call algorithm that computes
    both gradients together (direct, winograd, pointwise) then reads a zero array of its shape.
    ``conv2d.conv_transpose2d`` is the input gradient alone.
    """
    xp = array_namespace(grad_out, weight)
    want_x, want_w = "x" in needs, "weight" in needs
    if want_w and x is None and cols is None:
        raise ValueError("the weight gradient reads x (or the forward's kept patches): pass x")
    algo = choose_algorithm(algorithm, backend, deterministic, geom)
    read = tuple(a for a in (grad_out, x, weight) if a is not None)
    algo = _whole_call_or_patches(_finite_or_slices(backend, algorithm, algo, read, geom), grad_out, geom, limit)
    if hasattr(algo, "backward"):
        if x is None:
            shape = (grad_out.shape[0], geom.in_channels, geom.height, geom.width)
            x = xp.zeros(shape, dtype=grad_out.dtype, device=device_of(grad_out))
        return algo.backward(backend, grad_out, x, weight, geom, limit, deterministic, needs=needs)
    n = grad_out.shape[0]
    # The forward's chunks where it kept their patches: the same chunks, whatever the limit is now.
    chunks, kept = (_chunks(backend, grad_out, geom, limit), None) if cols is None else cols
    w = xp.reshape(weight, (geom.groups, geom.filters_per_group, geom.patch_size))
    grad_bias = xp.sum(grad_out, axis=(0, 2, 3))
    grad_weight = None
    grad_x = None
    for (start, stop), row_chunks in groupby(enumerate(chunks), key=lambda c: (c[1].start, c[1].stop)):
        acc = algo.grad_start(backend, grad_out, stop - start, geom) if want_x else None
        for index, chunk in row_chunks:
            rows = (chunk.row_start, chunk.row_stop)
            # (n, O, rows, OW) -> (groups, O/groups, n*rows*OW): the layout of the patch columns.
            grad_y = xp.permute_dims(grad_out[start:stop, :, rows[0] : rows[1], :], (1, 0, 2, 3))
            grad_y = xp.reshape(grad_y, (geom.groups, geom.filters_per_group, -1))
            if want_w:
                source: Any = x  # not None: checked above
                patches = kept[index] if kept is not None else algo.patches(backend, source[start:stop, ...], geom, rows)
                part = xp.matmul(grad_y, xp.matrix_transpose(patches))
                # Summed in place over the chunks where the backend allows it (a new array on JAX).
                grad_weight = part if grad_weight is None else backend.slice_add(grad_weight, (...,), part)
            if want_x:
                acc = algo.grad_add(backend, acc, _grad_patches(xp, w, grad_y), geom, rows)
        if want_x:
            piece = algo.grad_finish(acc, stop - start, geom)
            grad_x = _place(backend, grad_x, (n, geom.in_channels, geom.height, geom.width), (slice(start, stop), ...), piece)
    return grad_x, None if grad_weight is None else xp.reshape(grad_weight, weight.shape), grad_bias
