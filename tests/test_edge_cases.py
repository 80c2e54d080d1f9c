"""Edge cases: NaN and Inf reach exactly the outputs and gradients they touch; an empty batch and a
huge gradient on every algorithm; index widths for inputs past 2**31 elements (decided from shapes,
nothing allocated); the workspace check comes before any allocation; and concurrent use (layers on
two backends interleaved, conv2d from several threads at once) gives the results of sequential use.
"""

from __future__ import annotations

import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import conv2d
from conv2d._geometry import make_geometry
from conv2d._workspace import DEFAULT_BYTES, plan_chunks, scratch_bytes
from conv2d.algorithms import plan as _plan
from conv2d.algorithms.plan import gather_indices, index_dtype, row_length
from conv2d.backends import Backend

from .algorithms import algorithm_names, algorithm_params, applicable, random_cases
from .conftest import require_or_skip
from .oracle import TOLERANCE, assert_close, torch_conv

torch = require_or_skip("torch")

# Every registered algorithm (tests/conftest.py deselects those a backend lacks: kernels, native on NumPy).
ALGORITHMS = algorithm_params()


def _as_triple(case: dict) -> tuple:
    """A case of tests/algorithms.py as (x shape, weight shape, keyword arguments)."""
    groups = case["kwargs"].get("groups", 1)
    return (case["n"], case["c"], case["h"], case["w"]), (case["o"], case["c"] // groups, case["kh"], case["kw"]), case["kwargs"]


def _as_case(triple: tuple) -> dict:
    (n, c, h, w), (o, _, kh, kw), kwargs = triple
    return dict(n=n, c=c, o=o, h=h, w=w, kh=kh, kw=kw, kwargs=kwargs)


def _geometries_for(name: str, fixed: list[tuple], count: int, seed: int, start: int = 0) -> list[tuple]:
    """`count` geometries `name` computes: those of `fixed` it computes, taken from `start` on (in turn,
    so that the algorithms between them cover all of `fixed`), then random ones it computes."""
    mine = [g for g in fixed[start:] + fixed[:start] if applicable(name, None, _as_case(g))][:count]
    return mine + [_as_triple(case) for case in random_cases(name, count - len(mine), seed)]


# ---------------------------------------------------------------------------------------------
# NaN and Inf
# ---------------------------------------------------------------------------------------------

# (x shape, weight shape, keyword arguments): plain; grouped, strided, padded and dilated; a stride
# larger than the kernel (pixels no output reads); depthwise "same" (asymmetric padding).
NONFINITE_GEOMETRIES = [
    ((2, 3, 7, 6), (4, 3, 3, 2), {}),
    ((2, 4, 9, 8), (6, 2, 3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)),
    ((2, 2, 9, 7), (3, 2, 2, 2), dict(stride=3)),
    ((2, 3, 6, 5), (3, 1, 2, 3), dict(padding="same", dilation=(2, 1), groups=3)),
]
BAD_VALUES = [np.nan, np.inf, -np.inf]
# NumPy warns "invalid value encountered" where an Inf meets its opposite or a zero in a place that is
# then dropped: the gather's padding slot (sums of +Inf and -Inf, discarded) and, for an Inf operand,
# matmul with a transposed view (NumPy 2.4 + OpenBLAS 0.3.31: no NaN comes out). These tests check
# every value of every result instead.
_NUMPY_INVALID_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


# Two geometries per algorithm: the fixed ones above that it computes, in turn, else random ones it computes.
NONFINITE_PAIRS = [(name, geometry) for i, name in enumerate(algorithm_names())
                   for geometry in _geometries_for(name, NONFINITE_GEOMETRIES, 2, seed=400, start=2 * i % 4)]


# Known deviations from the property, by algorithm: strict, so that a fix shows up as an unexpected pass.
_SPREADS_IN_TILES = {
    "winograd": "winograd's transforms mix each 4x4 input tile into all 16 products: a NaN/Inf pixel makes "
                "non-finite the outputs of its tiles that do not read it too (unlike PyTorch)",
}


def _unless_known_deviation(algorithm: str, backend, geometry, check, *args) -> None:
    """Run `check(*args)`; where a library is known to spread non-finite values further than the
    definition (JAX's own grouped convolution, XLA on the CPU: a NaN reaches the other groups' outputs),
    expect it to fail and report an xfail, and fail if it passes (the deviation is gone: drop this)."""
    if algorithm == "native" and backend.name == "jax" and geometry[2].get("groups", 1) > 1:
        with pytest.raises(AssertionError):
            check(*args)
        pytest.xfail("JAX's grouped convolution (XLA, CPU) spreads NaN/Inf to the other groups' outputs")
    check(*args)


def _geometry_id(geometry) -> str:
    x, w, kw = geometry
    return f"x{x}-w{w}" + "".join(f"-{k}={v}" for k, v in kw.items())


def _corners_and_more(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """A few element positions of `shape`: both corners, the middle, and an inner off-grid one."""
    n, c, h, w = shape
    inner = (0, c - 1, min(2, h - 1), min(2, w - 1))  # in a stride-3 geometry's gap between patches
    return sorted({(0, 0, 0, 0), (n - 1, c - 1, h - 1, w - 1), (n - 1, c // 2, h // 2, w // 2), inner, (n - 1, 0, h - 1, 0)})


def _one_hot(shape: tuple[int, ...], where: tuple[int, ...]) -> np.ndarray:
    a = np.zeros(shape)
    a[where] = 1.0
    return a


def _torch_grads(x: np.ndarray, w: np.ndarray, grad_out: np.ndarray, kw: dict) -> tuple[np.ndarray, np.ndarray]:
    """grad_x and grad_weight of PyTorch's conv2d (float64); used on 0/1 indicators to find what touches what."""
    _, gx, gw, _ = torch_conv(x, w, np.zeros(w.shape[0]), grad_out, **kw)
    return gx, gw


def _reads(x_shape, w_shape, kw, pixel) -> np.ndarray:
    """Boolean (N, O, OH, OW): the outputs whose receptive field contains input element `pixel`,
    by PyTorch: the convolution of the pixel's indicator with a kernel of ones."""
    y, *_ = torch_conv(_one_hot(x_shape, pixel), np.ones(w_shape), np.zeros(w_shape[0]), **kw)
    return y > 0


@_NUMPY_INVALID_WARNING
@pytest.mark.parametrize("value", BAD_VALUES, ids=str)
@pytest.mark.parametrize(("algorithm", "geometry"), [
    pytest.param(a, g, id=f"{a}-{_geometry_id(g)}",
                 marks=[pytest.mark.xfail(reason=_SPREADS_IN_TILES[a], strict=True)] if a in _SPREADS_IN_TILES else [])
    for a, g in NONFINITE_PAIRS])
def test_nonfinite_input_reaches_exactly_the_outputs_that_read_it(cpu_backend, geometry, algorithm, value):
    """A NaN/Inf pixel of x makes non-finite exactly the outputs and weight gradients that read it;
    grad_x and grad_bias (which do not depend on x) stay finite."""
    _unless_known_deviation(algorithm, cpu_backend, geometry, _nonfinite_input, cpu_backend, geometry, algorithm, value)


def _nonfinite_input(cpu_backend, geometry, algorithm, value):
    x_shape, w_shape, kw = geometry
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    y_shape = torch_conv(np.zeros(x_shape), w, b, **kw)[0].shape
    grad_out = rng.standard_normal(y_shape)
    B, W, G = (cpu_backend.asarray(a) for a in (b, w, grad_out))
    unread = 0
    for pixel in _corners_and_more(x_shape):
        x = rng.standard_normal(x_shape)
        x[pixel] = value
        X = cpu_backend.asarray(x)
        touched = _reads(x_shape, w_shape, kw, pixel)
        unread += not touched.any()
        y = cpu_backend.to_numpy(conv2d.conv2d(X, W, B, algorithm=algorithm, **kw))
        np.testing.assert_array_equal(~np.isfinite(y), touched, err_msg=f"y, {value} at {pixel}")
        gx, gw, gb = (cpu_backend.to_numpy(a) for a in conv2d.conv2d_backward(G, X, W, algorithm=algorithm, **kw))
        # grad_weight[o, k, i, j] sums grad_out * x over the outputs whose tap (i, j) reads x[:, g*cg + k]:
        # non-finite exactly where some output reads the bad pixel through that tap.
        _, gw_touched = _torch_grads(_one_hot(x_shape, pixel), np.ones(w_shape), np.ones(y_shape), kw)
        np.testing.assert_array_equal(~np.isfinite(gw), gw_touched > 0, err_msg=f"grad_weight, {value} at {pixel}")
        assert np.isfinite(gx).all(), f"grad_x, {value} at {pixel}"
        assert np.isfinite(gb).all(), f"grad_bias, {value} at {pixel}"
    if kw.get("stride") == 3:
        assert unread, "the stride-3 geometry should leave some of the tested pixels unread"


@_NUMPY_INVALID_WARNING
@pytest.mark.parametrize("value", BAD_VALUES, ids=str)
@pytest.mark.parametrize(("algorithm", "geometry"), [pytest.param(a, g, id=f"{a}-{_geometry_id(g)}") for a, g in NONFINITE_PAIRS])
def test_nonfinite_output_gradient_reaches_exactly_the_pixels_it_touches(cpu_backend, geometry, algorithm, value):
    """A NaN/Inf in grad_out makes non-finite exactly the grad_x pixels its output reads, only its own
    grad_bias entry, and only its own filter's grad_weight (all taps that read real pixels)."""
    _unless_known_deviation(algorithm, cpu_backend, geometry, _nonfinite_output_gradient, cpu_backend, geometry,
                            algorithm, value)


def _nonfinite_output_gradient(cpu_backend, geometry, algorithm, value):
    x_shape, w_shape, kw = geometry
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    X, W = cpu_backend.asarray(x), cpu_backend.asarray(w)
    y_shape = torch_conv(x, w, np.zeros(w_shape[0]), **kw)[0].shape
    for where in _corners_and_more(y_shape):
        grad_out = rng.standard_normal(y_shape)
        grad_out[where] = value
        gx, gw, gb = (cpu_backend.to_numpy(a)
                      for a in conv2d.conv2d_backward(cpu_backend.asarray(grad_out), X, W, algorithm=algorithm, **kw))
        indicator = _one_hot(y_shape, where)
        # The pixels output `where` reads (through a kernel of ones): PyTorch's grad_x of the indicator.
        gx_touched, _ = _torch_grads(np.zeros(x_shape), np.ones(w_shape), indicator, kw)
        np.testing.assert_array_equal(~np.isfinite(gx), gx_touched > 0, err_msg=f"grad_x, {value} at {where}")
        np.testing.assert_array_equal(~np.isfinite(gb), np.arange(w_shape[0]) == where[1], err_msg="grad_bias")
        # grad_weight: other filters stay finite; this filter's taps that read a real pixel do not
        # (a tap that reads only padding multiplies by a zero: NaN or 0 by IEEE, left unspecified).
        _, reads_pixel = _torch_grads(np.ones(x_shape), np.ones(w_shape), indicator, kw)
        bad = ~np.isfinite(gw)
        others = np.arange(w_shape[0]) != where[1]
        assert not bad[others].any(), f"grad_weight of other filters, {value} at {where}"
        assert bad[reads_pixel > 0].all(), f"grad_weight of filter {where[1]}, {value} at {where}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_huge_gradient_does_not_change_other_samples_gradients(cpu_backend, algorithm):
    """Samples are independent: one output gradient of 1e8 in sample 0 leaves sample 1's grad_x as
    accurate, element by element, as when sample 1 is alone (float64)."""
    rng = np.random.default_rng(2)
    (_, c, h, wd), w_shape, kw = _geometries_for(algorithm, [((2, 2, 8, 8), (3, 2, 3, 3), dict(padding=1))], 1, seed=401)[0]
    x, w = rng.standard_normal((2, c, h, wd)), rng.standard_normal(w_shape)
    y_shape = torch_conv(x, w, np.zeros(w_shape[0]), **kw)[0].shape
    grad_out = rng.standard_normal(y_shape)
    grad_out[0, 0, 0, 0] = 1e8
    X, W = cpu_backend.asarray(x), cpu_backend.asarray(w)
    gx = cpu_backend.to_numpy(conv2d.conv2d_backward(cpu_backend.asarray(grad_out), X, W, algorithm=algorithm, **kw)[0])
    _, gx_ref, _, _ = torch_conv(x, w, np.zeros(w_shape[0]), grad_out, **kw)
    np.testing.assert_allclose(gx[1], gx_ref[1], rtol=TOLERANCE["float64"]["rtol"], atol=0, err_msg="sample 1")
    np.testing.assert_allclose(gx[0], gx_ref[0], rtol=TOLERANCE["float64"]["rtol"], atol=1e-9, err_msg="sample 0")


# ---------------------------------------------------------------------------------------------
# Empty batch, each algorithm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_empty_batch_with_each_algorithm(cpu_backend, algorithm):
    """N=0 works with every algorithm (test_oracle checks "auto"): empty y and grad_x, zero weight and bias gradients."""
    (_, c, h, wd), w_shape, kwargs = _geometries_for(
        algorithm, [((1, 4, 7, 6), (2, 2, 3, 3), dict(stride=(2, 1), padding=1, groups=2))], 1, seed=402)[0]
    kw = dict(kwargs, algorithm=algorithm)
    X = cpu_backend.asarray(np.zeros((0, c, h, wd)))
    W = cpu_backend.asarray(np.ones(w_shape))
    y = conv2d.conv2d(X, W, **kw)
    assert tuple(y.shape) == (0, *torch_conv(np.zeros((0, c, h, wd)), np.ones(w_shape), np.zeros(w_shape[0]), **kwargs)[0].shape[1:])
    gx, gw, gb = conv2d.conv2d_backward(y, X, W, **kw)
    assert tuple(gx.shape) == (0, c, h, wd)
    np.testing.assert_array_equal(cpu_backend.to_numpy(gw), np.zeros(w_shape))
    np.testing.assert_array_equal(cpu_backend.to_numpy(gb), np.zeros(w_shape[0]))


# ---------------------------------------------------------------------------------------------
# Index widths past 2**31 elements, from shapes alone
# ---------------------------------------------------------------------------------------------


def test_index_dtype_boundaries():
    """int32 up to and including 2**31 - 1, int64 from 2**31."""
    assert index_dtype(0) == "int32"
    assert index_dtype(2**31 - 1) == "int32"
    assert index_dtype(2**31) == "int64"
    assert index_dtype(2**40) == "int64"


# (x shape, weight shape, padding, the plan's index dtype): the largest index of one sample's plan is
# C*H*W - 1, or C*H*W (the appended zero) when padded.
HUGE = [
    ((1, 1, 1, 2**31 - 1), (1, 1, 1, 1), 0, "int32"),  # last index 2**31 - 2
    ((1, 1, 1, 2**31 - 1), (1, 1, 1, 3), (0, 1), "int32"),  # the padding's zero at 2**31 - 1
    ((1, 2, 2**15, 2**15), (1, 2, 1, 1), 0, "int32"),  # C*H*W = 2**31: last index 2**31 - 1
    ((1, 2, 2**15, 2**15), (1, 2, 3, 3), 1, "int64"),  # C*H*W + 1 > 2**31: the zero at 2**31
    ((1, 3, 2**15, 2**15), (1, 3, 1, 1), 0, "int64"),  # C*H*W > 2**31
]


@pytest.mark.parametrize(("x_shape", "w_shape", "padding", "dtype"), HUGE, ids=[f"{h[0]}-pad{h[2]}" for h in HUGE])
def test_huge_geometry_needs_int64_exactly_past_2_31(x_shape, w_shape, padding, dtype):
    """The plan's index dtype for inputs of about 2**31 elements, decided from shapes (no arrays), and
    refused by the default workspace limit before anything is allocated."""
    geom = make_geometry(x_shape, w_shape, None, padding=padding)
    c, h, w = x_shape[1:]
    assert row_length(geom) == c * h * w + (1 if geom.padded else 0)
    assert index_dtype(row_length(geom) - 1) == dtype
    for itemsize in (4, 8):
        need = scratch_bytes(geom, 1, 1, itemsize)
        assert need > DEFAULT_BYTES
        with pytest.raises(MemoryError, match=rf"needs {need:,} bytes.*CONV2D_MAX_WORKSPACE"):
            plan_chunks(geom, x_shape[0], itemsize, DEFAULT_BYTES)


def test_the_plan_widens_to_int64_past_the_int32_limit(monkeypatch):
    """gather_indices picks its dtype from the largest index it holds (the padding's zero at C*H*W):
    shown by lowering the int32 limit to just below and at that index (nothing large allocated)."""
    geom = make_geometry((1, 2, 5, 4), (1, 2, 3, 3), None, padding=1)
    build = gather_indices  # not cached: rebuilt under each limit
    expected = build(geom)
    assert expected.max() == geom.sample_size == 40
    monkeypatch.setattr(_plan, "_INT32_MAX", 40)
    assert build(geom).dtype == np.int32
    monkeypatch.setattr(_plan, "_INT32_MAX", 39)
    plan = build(geom)
    assert plan.dtype == np.int64
    np.testing.assert_array_equal(plan, expected)


@pytest.mark.parametrize(("int32_max", "expected"), [(121, "int64"), (122, "int32"), (2**31 - 1, "int32")])
def test_batched_flat_indices_widen_with_the_batch(monkeypatch, cpu_backend, int32_max, expected):
    """Gather.grad_add sizes its flat indices by the whole chunk (n * row_length - 1 = 122 here), not by
    one sample: with the int32 limit lowered below that, the indices it scatters with are int64 (while
    the per-sample plan stays int32) and the gradients are still right."""
    x_shape, w_shape, kw = (3, 2, 5, 4), (2, 2, 3, 3), dict(padding=1)
    geom = make_geometry(x_shape, w_shape, None, **kw)
    assert 3 * row_length(geom) - 1 == 122 and row_length(geom) - 1 == 40
    monkeypatch.setattr(_plan, "_INT32_MAX", int32_max)
    seen: list[str] = []
    original = Backend.scatter_add

    def spy(self, target, indices, values):
        seen.append(str(indices.dtype).rpartition(".")[2])  # "int64" from torch.int64, too
        return original(self, target, indices, values)

    monkeypatch.setattr(Backend, "scatter_add", spy)
    rng = np.random.default_rng(3)
    x, w, g = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal((3, 2, 5, 4))
    grads = conv2d.conv2d_backward(*(cpu_backend.asarray(a) for a in (g, x, w)), algorithm="gather", **kw)
    assert seen == [expected]
    assert gather_indices(geom).dtype == np.int32
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), grads, torch_conv(x, w, np.zeros(2), g, **kw)[1:]):
        assert_close(cpu_backend, ours, ref, "float64", name)


# ---------------------------------------------------------------------------------------------
# The workspace is checked before anything is allocated
# ---------------------------------------------------------------------------------------------


def test_too_big_a_request_fails_before_allocating(monkeypatch, without_compiled_kernels):
    """A 256 MiB-per-sample input (a broadcast view: no memory of its own) under CONV2D_MAX_WORKSPACE=64MB
    raises MemoryError naming the bytes needed and the variable, from conv2d, conv2d_backward and the
    layer, having allocated almost nothing (tracemalloc sees NumPy's allocations). (NumPy's compiled
    kernels, which work in cache-sized chunks, compute such a layer: the next test.)"""
    monkeypatch.setenv("CONV2D_MAX_WORKSPACE", "64MB")
    shape = (2, 64, 1024, 1024)
    x = np.broadcast_to(np.float32(1.0), shape)
    w = np.ones((2, 64, 1, 1), dtype=np.float32)
    g = np.broadcast_to(np.float32(1.0), (2, 2, 1024, 1024))
    need = scratch_bytes(make_geometry(shape, w.shape, None), 1, 1, 4)
    assert need > 64 * 10**6
    layer = conv2d.ConvolutionLayer(shape[1:], (1, 1), 2, dtype="float32", seed=0)
    message = rf"needs {need:,} bytes of scratch, more than the workspace limit of 64,000,000 bytes.*CONV2D_MAX_WORKSPACE"
    calls = {"conv2d": lambda: conv2d.conv2d(x, w), "conv2d_backward": lambda: conv2d.conv2d_backward(g, x, w),
             "ConvolutionLayer.forwardpass": lambda: layer.forwardpass(x)}
    for name, call in calls.items():
        tracemalloc.start()
        try:
            with pytest.raises(MemoryError, match=message):
                call()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 256 * 2**10, f"{name} allocated {peak:,} bytes before refusing"


def test_compiled_kernels_compute_a_huge_sample_in_cache_sized_chunks(monkeypatch):
    """NumPy's compiled kernels build a 3x3 layer's patches a cache-sized chunk at a time: a 64 MiB
    sample whose patch matrix (576 MiB) is far over CONV2D_MAX_WORKSPACE=64MB is computed, exactly,
    allocating little beyond the output (a broadcast input: no memory of its own)."""
    require_or_skip("numba")
    monkeypatch.setenv("CONV2D_MAX_WORKSPACE", "64MB")
    x = np.broadcast_to(np.float32(1.0), (1, 16, 1024, 1024))
    w = np.ones((2, 16, 3, 3), dtype=np.float32)
    assert scratch_bytes(make_geometry(x.shape, w.shape, None, padding=1), 1, 1, 4) > 64 * 10**6
    conv2d.conv2d(x[:, :, :8, :8], w, padding=1, algorithm="kernels")  # loading the compiled kernels allocates too
    tracemalloc.start()
    try:
        y = conv2d.conv2d(x, w, padding=1, algorithm="kernels")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < y.nbytes + 16 * 2**20, f"allocated {peak:,} bytes for an output of {y.nbytes:,}"
    # All ones: each output sums the 16 channels over the taps inside the image (9, 6 on an edge, 4 in a corner).
    assert np.all(y[:, :, 1:-1, 1:-1] == 144) and np.all(y[:, :, 0, 1:-1] == 96) and np.all(y[:, :, 0, 0] == 64)


# ---------------------------------------------------------------------------------------------
# Concurrency and shared state
# ---------------------------------------------------------------------------------------------


def _layer_steps(layer: conv2d.ConvolutionLayer, batches: list[np.ndarray], deltas: list[np.ndarray]):
    """Generator: one SGD step per batch in two halves, yielding ("forward", (output,)) and then
    ("backward", (grad_x, weights, biases)), as NumPy arrays."""
    to_numpy = layer.backend.to_numpy
    for X, delta in zip(batches, deltas):
        out = layer.forwardpass(X)
        yield "forward", (to_numpy(out),)
        grad_x = layer.backwardpass(0.05, X, delta)
        yield "backward", (to_numpy(grad_x), to_numpy(layer.weights), to_numpy(layer.biases))


# The layer below: the algorithms that compute it on both NumPy and torch.
_INTERLEAVED_GEOMETRY = make_geometry((4, 3, 11, 10), (5, 3, 3, 5), None, stride=(2, 1), padding=(1, 2), dilation=(2, 1))


@pytest.mark.parametrize("max_workspace_bytes", [None, 40_000], ids=["whole", "rows-split"])
@pytest.mark.parametrize("algorithm", [name for name in algorithm_names("auto")
                                       if all(applicable(name, conv2d.get_backend(spec), _INTERLEAVED_GEOMETRY)
                                              for spec in ("numpy", "torch"))])
def test_layers_on_numpy_and_torch_interleaved_equal_each_alone(algorithm, max_workspace_bytes):
    """Two layers of one geometry on numpy and torch, stepped in turn (forward A, forward B, backward A,
    backward B), give what each gives alone: no plan or saved state crosses between them."""
    args = dict(padding=(1, 2), dilation=(2, 1), activation="tanh", seed=7, algorithm=algorithm,
                max_workspace_bytes=max_workspace_bytes)

    def make(spec):
        return conv2d.ConvolutionLayer((3, 11, 10), (3, 5), 5, (2, 1), backend=spec, **args)

    geom = make("numpy")._geom
    if max_workspace_bytes is not None:
        assert any(c.row_stop - c.row_start < geom.out_h for c in plan_chunks(geom, 4, 8, max_workspace_bytes))
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((4, 3, 11, 10)) for _ in range(3)]
    deltas = [rng.standard_normal((4, 5, geom.out_h, geom.out_w)) for _ in range(3)]
    # Interleaved first, so that the two backends meet the geometry (and build its plans) in turn.
    together: dict[str, list] = {"numpy": [], "torch": []}
    steps = {spec: _layer_steps(make(spec), batches, deltas) for spec in together}
    for _ in range(2 * len(batches)):
        for spec, step in steps.items():
            together[spec].append(next(step))
    alone = {spec: list(_layer_steps(make(spec), batches, deltas)) for spec in together}
    for spec in together:
        for (kind, got), (_, want) in zip(together[spec], alone[spec], strict=True):
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13, err_msg=f"{spec} {kind}: interleaved vs alone")
    for (kind, on_numpy), (_, on_torch) in zip(together["numpy"], together["torch"]):  # and the two agree
        for a, b in zip(on_numpy, on_torch, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"numpy vs torch {kind}")


# Four geometries, one per thread; the first two share a geometry's plan key with different batches.
THREAD_CASES = [
    ((3, 4, 13, 12), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2)),
    ((5, 4, 13, 12), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2)),
    ((2, 3, 10, 15), (4, 3, 2, 5), dict(padding="same", dilation=(3, 1))),
    ((4, 5, 9, 9), (5, 1, 3, 2), dict(stride=(1, 3), padding=(2, 0), groups=5)),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_conv2d_from_four_threads_at_once(cpu_backend, algorithm):
    """conv2d and conv2d_backward from 4 threads at once (5 rounds each, the first racing to build the
    gather plans of their geometries) give the single-threaded results, which equal PyTorch's: the
    geometries above that the algorithm computes, else random ones it computes."""
    rng = np.random.default_rng(5)
    data = []
    for x_shape, w_shape, kw in _geometries_for(algorithm, THREAD_CASES, len(THREAD_CASES), seed=403):
        x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
        g = rng.standard_normal(torch_conv(x, w, b, **kw)[0].shape)
        data.append(((x, w, b, g), tuple(cpu_backend.asarray(a) for a in (x, w, b, g)), kw))
    barrier = threading.Barrier(len(THREAD_CASES), timeout=60)

    def run(case, rounds):
        _, (X, W, B, G), kw = case
        if rounds > 1:
            barrier.wait()  # all threads start together, on a cache that has not seen their geometry
        results = []
        for _ in range(rounds):
            y = conv2d.conv2d(X, W, B, algorithm=algorithm, **kw)
            grads = conv2d.conv2d_backward(G, X, W, algorithm=algorithm, **kw)
            results.append([cpu_backend.to_numpy(a) for a in (y, *grads)])
        return results

    numpy_backend = conv2d.get_backend("numpy")  # the results are NumPy arrays by now
    with ThreadPoolExecutor(max_workers=len(THREAD_CASES)) as pool:
        threaded = [f.result(timeout=120) for f in [pool.submit(run, case, 5) for case in data]]
    for case, rounds in zip(data, threaded):
        (single,) = run(case, 1)
        reference = torch_conv(*case[0], **case[2])
        for result in rounds:
            for name, got, want, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), result, single, reference):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13, err_msg=f"{name}: threaded vs single")
                assert_close(numpy_backend, got, ref, "float64", name)
