"""complex64 and complex128: every algorithm on every CPU backend against PyTorch's complex conv2d and
``torch.autograd.grad`` (PyTorch's conjugate convention), the dtype-mixing errors, and the pieces that
know about complex dtypes (``conv2d._complex``, the workspace's item size, the CuPy kernel sources run
on the host, the layer's refusal)."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d import _complex
from conv2d._geometry import make_geometry
from conv2d._workspace import bytes_per_item

from .conftest import require_or_skip
from .kernel_harness import host_kernels_backend

torch = require_or_skip("torch")

DTYPES = ["complex64", "complex128"]
# Relative to the largest magnitude of the reference; complex64 rounds like float32 in each part.
TOLERANCE = {"complex64": dict(rtol=2e-4, atol=2e-5), "complex128": dict(rtol=1e-9, atol=1e-11)}


def _draw(rng: np.random.Generator, algorithm: str) -> dict:
    """A random layer inside `algorithm`'s domain: odd sizes, strides, dilations, groups, paddings."""
    groups = int(rng.choice([1, 2, 3]))
    if algorithm == "direct":
        groups = int(rng.choice([2, 3]))  # direct is for grouped layers (it computes any, but this is its use)
    cpg, fpg = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    kernel = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    stride = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    dilation = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    padding: object = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
    if algorithm == "winograd":
        kernel, stride = (3, 3), (1, 1)
    if algorithm == "pointwise":
        kernel = (1, 1)
    if stride == (1, 1) and rng.random() < 0.3:
        padding = "same"
    h = int(rng.integers(dilation[0] * (kernel[0] - 1) + 1, 10))
    w = int(rng.integers(dilation[1] * (kernel[1] - 1) + 1, 10))
    return dict(n=int(rng.integers(1, 4)), c=cpg * groups, o=fpg * groups, h=h, w=w, kernel=kernel,
                kwargs=dict(stride=stride, padding=padding, dilation=dilation, groups=groups))


ALGORITHMS = ["auto", "gather", "slices", "direct", "winograd", "pointwise", "native"]
_RNG = np.random.default_rng(20261206)
# Two random layers per algorithm, in both dtypes, on every backend but JAX, which compiles every new
# shape (3 to 5 s a layer here): it runs its own convolution ("native", which "auto" picks there) in
# complex128 and the two im2col algorithms in complex64; the others are the same array code as on NumPy.
JAX_RUNS = {("native", 0, "complex128"), ("slices", 0, "complex64"), ("gather", 1, "complex64")}


def jax_keeps(test: str, params: dict) -> bool | None:
    """JAX runs only JAX_RUNS of test_complex_matches_pytorch under the default profile (tests/conftest.py:
    it compiles every shape, seconds a layer); every other test: the default."""
    if test != "test_complex_matches_pytorch":
        return None
    algorithm, index, _ = params["case"]
    return (algorithm, index, params["dtype"]) in JAX_RUNS
CASES = [(algorithm, index, _draw(_RNG, algorithm)) for algorithm in ALGORITHMS for index in range(2)]


def _ids(case):
    algorithm, index, layer = case
    return f"{algorithm}-{index}-{layer['c']}x{layer['h']}x{layer['w']}-k{layer['kernel'][0]}{layer['kernel'][1]}"


def _complex_data(layer: dict, dtype: str, seed: int) -> list[np.ndarray]:
    """x, weight, bias, grad_out of `dtype` (random real and imaginary parts)."""
    rng = np.random.default_rng(seed)

    def draw(shape):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)

    groups = layer["kwargs"]["groups"]
    x = draw((layer["n"], layer["c"], layer["h"], layer["w"]))
    w = draw((layer["o"], layer["c"] // groups, *layer["kernel"]))
    b = draw((layer["o"],))
    geom = make_geometry(x.shape, w.shape, b.shape, **layer["kwargs"])
    return [x, w, b, draw((layer["n"], layer["o"], geom.out_h, geom.out_w))]


def torch_reference(x, w, b, grad_out, **kwargs) -> list[np.ndarray]:
    """PyTorch's complex128 conv2d and ``torch.autograd.grad(y, (x, w, b), grad_out)``."""
    import warnings

    leaves = [torch.tensor(a.astype(np.complex128), requires_grad=True) for a in (x, w, b)]
    with warnings.catch_warnings():  # PyTorch warns that asymmetric "same" padding costs it a copy
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        y = torch.nn.functional.conv2d(*leaves, **kwargs)
    grads = torch.autograd.grad(y, leaves, torch.tensor(grad_out.astype(np.complex128)))
    return [y.detach().numpy(), *(g.numpy() for g in grads)]


def _assert_matches(backend, ours, reference, dtype: str) -> None:
    for what, actual, expected in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, reference):
        actual = backend.to_numpy(actual)
        assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype}, not {dtype}"
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
        tol = TOLERANCE[dtype]
        np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_complex_matches_pytorch(backend, case, dtype):
    algorithm, index, layer = case
    if algorithm == "native" and backend.native is None:
        with pytest.raises(ValueError, match="algorithm 'native'"):
            conv2d.conv2d(*(backend.asarray(a) for a in _complex_data(layer, dtype, 0)[:3]), algorithm="native",
                          **layer["kwargs"])
        return
    x, w, b, g = _complex_data(layer, dtype, seed=ALGORITHMS.index(algorithm) * 10 + index)
    reference = torch_reference(x, w, b, g, **layer["kwargs"])
    xs, ws, bs, gs = (backend.asarray(a) for a in (x, w, b, g))
    options = dict(layer["kwargs"], algorithm=algorithm)
    ours = [conv2d.conv2d(xs, ws, bs, **options), *conv2d.conv2d_backward(gs, xs, ws, **options)]
    _assert_matches(backend, ours, reference, dtype)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cupy_kernel_sources_on_the_host(monkeypatch, dtype, deterministic):
    """The CuPy im2col/col2im sources for complex element types (``complex<float>`` accumulators), compiled
    by the host C++ compiler and run through the public functions (conjugation included), and the
    ``gather`` algorithm with a non-deterministic scatter-add's paths, as on a GPU."""
    from conv2d import _functional

    host = host_kernels_backend()
    checked = _functional.check_arrays
    monkeypatch.setattr(_functional, "check_arrays", lambda named: (checked(named), host)[1])
    layer = dict(n=2, c=4, o=6, h=7, w=6, kernel=(3, 2), kwargs=dict(stride=(2, 1), padding=(2, 1), dilation=(1, 2),
                                                                     groups=2))
    x, w, b, g = _complex_data(layer, dtype, seed=5)
    reference = torch_reference(x, w, b, g, **layer["kwargs"])
    for algorithm in ("kernels", "gather"):
        options = dict(layer["kwargs"], algorithm=algorithm, deterministic=deterministic)
        ours = [conv2d.conv2d(x, w, b, **options), *conv2d.conv2d_backward(g, x, w, **options)]
        _assert_matches(host, ours, reference, dtype)


def test_gradients_are_conjugate_not_raw():
    """The convention, on a case small enough to see: y = x * w (1x1, one pixel): PyTorch's gradients are
    g * conj(w) and g * conj(x), and the bias's is g itself."""
    x, w, g = (np.array(v, dtype=np.complex128).reshape(1, 1, 1, 1) for v in (1 + 2j, 3 - 1j, 0.5 + 0.25j))
    grad_x, grad_w, grad_b = conv2d.conv2d_backward(g, x, w)
    assert grad_x.item() == g.item() * np.conj(w.item())
    assert grad_w.item() == g.item() * np.conj(x.item())
    assert grad_b.item() == g.item()


MIXED = [
    ("complex x, real weight", lambda x, w, b: conv2d.conv2d(x, w.real), r"cast weight .*weight\.astype\(x\.dtype\)"),
    ("real x, complex weight", lambda x, w, b: conv2d.conv2d(x.real, w), r"weight is complex and x is not; cast weight"),
    ("real x and weight, complex bias", lambda x, w, b: conv2d.conv2d(x.real, w.real, b), r"bias is complex and x is not"),
    ("complex x and weight, real bias", lambda x, w, b: conv2d.conv2d(x, w, b.real), r"bias is real and x is not"),
    ("complex64 x, complex128 weight", lambda x, w, b: conv2d.conv2d(x.astype(np.complex64), w),
     r"x has dtype complex64 but weight has complex128; .*cast them to one dtype"),
    ("backward: real grad_out", lambda x, w, b: conv2d.conv2d_backward(np.ones((1, 2, 3, 3)), x, w),
     r"grad_out has dtype float64 but x has complex128"),
]


@pytest.mark.parametrize("call, match", [m[1:] for m in MIXED], ids=[m[0] for m in MIXED])
def test_mixed_real_and_complex_is_refused(call, match):
    """As PyTorch's F.conv2d, no promotion: one TypeError saying what to cast."""
    x, w, b, _ = _complex_data(dict(n=1, c=2, o=2, h=5, w=5, kernel=(3, 3), kwargs=dict(stride=1, padding=0,
                                                                                        dilation=1, groups=1)),
                               "complex128", seed=0)
    with pytest.raises(TypeError, match=match):
        call(x, w, b)


def test_conj_is_free_on_real_dtypes(cpu_backend):
    real = cpu_backend.asarray(np.arange(3.0))
    assert _complex.conj(cpu_backend.xp, real) is real
    values = cpu_backend.asarray(np.array([1 + 2j, -3j]))
    np.testing.assert_array_equal(cpu_backend.to_numpy(_complex.conj(cpu_backend.xp, values)), [1 - 2j, 3j])


@pytest.mark.parametrize("dtype, size", [("complex64", 8), ("complex128", 16), ("float32", 4), ("float64", 8)])
def test_workspace_counts_both_parts(cpu_backend, dtype, size):
    """finfo of a complex dtype describes one part: the workspace limit must count two."""
    assert bytes_per_item(cpu_backend.asarray(np.zeros(1, dtype=dtype))) == size


def test_workspace_limit_holds_for_complex128():
    """A limit that fits one sample of float64 but not of complex128 splits complex128 into more chunks,
    and the result is still PyTorch's."""
    from conv2d._conv import _chunks

    layer = dict(n=4, c=3, o=2, h=9, w=9, kernel=(3, 3), kwargs=dict(stride=1, padding=1, dilation=1, groups=1))
    x, w, b, g = _complex_data(layer, "complex128", seed=3)
    geom = make_geometry(x.shape, w.shape, b.shape, **layer["kwargs"])
    from conv2d._workspace import scratch_bytes

    limit = scratch_bytes(geom, 2, geom.out_h, 8)  # two float64 samples: one complex128 sample
    backend = conv2d.get_backend("numpy")
    assert len(_chunks(backend, x, geom, limit)) > len(_chunks(backend, x.real, geom, limit))
    ours = [conv2d.conv2d(x, w, b, padding=1, algorithm="slices", max_workspace_bytes=limit),
            *conv2d.conv2d_backward(g, x, w, padding=1, algorithm="slices", max_workspace_bytes=limit)]
    _assert_matches(backend, ours, torch_reference(x, w, b, g, padding=1), "complex128")


def test_layer_refuses_complex_and_points_to_the_functions():
    with pytest.raises(TypeError, match=r"got 'complex64'; the layer is real-only .*conv2d\.conv2d"):
        conv2d.ConvolutionLayer((3, 8, 8), (3, 3), 4, dtype="complex64")
    layer = conv2d.ConvolutionLayer((3, 8, 8), (3, 3), 4, activation=None)
    with pytest.raises(TypeError, match=r"complex128; the layer needs real floating data; the layer is real-only"):
        layer.forwardpass(np.zeros((1, 3, 8, 8), dtype=np.complex128))


def test_jax_complex128_needs_64_bit_types():
    """complex128 with JAX's 64-bit types off would silently become complex64: refused, naming the switch."""
    jax = require_or_skip("jax")
    backend = conv2d.get_backend("jax")
    with jax.enable_x64(False):
        with pytest.raises(TypeError, match=r"complex128 would silently become complex64; set JAX_ENABLE_X64=1 .*use complex64"):
            backend.asarray(np.zeros(2, dtype=np.complex128))
        with pytest.raises(TypeError, match=r"'complex128' is not available .*JAX has 64-bit types disabled"):
            backend.dtype("complex128")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cupy_complex_scatter_add_as_real_pairs(dtype):
    """CuPy's complex scatter-add (two real scatter-adds through interleaved parts), run on NumPy:
    duplicates accumulate in both parts, as np.add.at does on the complex array."""
    from conv2d.backends.cupy import scatter_add_parts

    rng = np.random.default_rng(7)
    indices = rng.integers(0, 5, size=40)
    values = (rng.standard_normal(40) + 1j * rng.standard_normal(40)).astype(dtype)
    target = np.zeros(5, dtype=dtype)
    expected = target.copy()
    np.add.at(expected, indices, values)
    scatter_add_parts(np, lambda t, i, v: np.add.at(t, i, v), target, indices, values)
    np.testing.assert_allclose(target, expected, rtol=1e-6)


def test_dask_hands_complex_chunks_through():
    """Functions built on conv2d: the dask hand-off computes complex chunks and sums their gradients."""
    da = require_or_skip("dask.array")
    layer = dict(n=4, c=2, o=3, h=6, w=5, kernel=(3, 2), kwargs=dict(stride=1, padding=1, dilation=1, groups=1))
    x, w, b, g = _complex_data(layer, "complex128", seed=11)
    reference = torch_reference(x, w, b, g, padding=1)
    lazy_x, lazy_g = da.from_array(x, chunks=(2, 2, 6, 5)), da.from_array(g, chunks=(2, 3, 6, 6))
    ours = [conv2d.conv2d(lazy_x, da.from_array(w), da.from_array(b), padding=1),
            *conv2d.conv2d_backward(lazy_g, lazy_x, da.from_array(w), padding=1)]
    _assert_matches(conv2d.get_backend("numpy"), [a.compute() for a in ours], reference, "complex128")
