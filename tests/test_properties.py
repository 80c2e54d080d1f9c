"""Properties over random geometries (hypothesis): conv2d and its three gradients agree with PyTorch on
every backend (the GPU ones where a device answers), algorithm and float dtype; splitting the work to fit a small workspace changes
nothing; and the output size is the seed's rule for valid padding and PyTorch's in general. On NumPy, with
few examples (issue #19): padding modes and layouts, conv_transpose2d (any stride, padding, output_padding,
dilation, groups), and complex64/complex128 conv2d against PyTorch's complex autograd.

The geometries span batch 0..4, channels 1..8 with groups dividing both channel counts (depthwise
included), rectangular kernels 1..5, strides 1..4 (often larger than the kernel), dilation 1..3,
padding as an int, a pair, "valid" or "same" (stride 1), and input sizes from the smallest the
kernel allows up to 20. The example counts below are those of the "ci" profile (tests/conftest.py,
derandomized); ``--hypothesis-profile=thorough`` multiplies them by ten, with fresh random inputs.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import conv2d
from conv2d import _conv
from conv2d._geometry import make_geometry
from conv2d._workspace import plan_chunks, scratch_bytes

from .algorithms import (
    algorithm_names,
    applicable,
    backend_algorithm_params,
    random_cases,
)
from .conftest import _get, require_or_skip
from .kernel_harness import host_kernels_backend
from .oracle import assert_close, torch_conv

torch = require_or_skip("torch")

_CI_MAX_EXAMPLES = 100  # max_examples of the "ci" profile in tests/conftest.py


def _examples(ci_count: int) -> int:
    """`ci_count` under the "ci" profile, scaled like the loaded profile's max_examples (thorough: 10x)."""
    return max(1, ci_count * settings().max_examples // _CI_MAX_EXAMPLES)


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def _padding_rows_cols(padding, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """Total padding added to the rows and to the columns, as PyTorch documents each padding form."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        return dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
    if isinstance(padding, int):
        return 2 * padding, 2 * padding
    return 2 * padding[0], 2 * padding[1]


@st.composite
def convolutions(draw, batch=st.integers(0, 4), max_size: int = 20) -> dict:  # noqa: B008 - a strategy, never called
    """Shapes and keyword arguments of one legal convolution."""
    groups = draw(st.integers(1, 8))
    c = groups * draw(st.integers(1, 8 // groups))
    o = groups * draw(st.integers(1, 8 // groups))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(
        st.one_of(
            st.integers(0, 3),
            st.tuples(st.integers(0, 3), st.integers(0, 3)),
            st.sampled_from(["valid", "same"]),
        )
    )
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    pad_h, pad_w = _padding_rows_cols(padding, kernel, dilation)
    # The smallest legal input: the dilated kernel just fits in the padded input (above max_size where the
    # kernel's reach is: a small max_size must not make the strategy invalid).
    reach_h, reach_w = dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1
    smallest_h, smallest_w = max(1, reach_h - pad_h), max(1, reach_w - pad_w)
    h = draw(st.integers(smallest_h, max(smallest_h, max_size)))
    w = draw(st.integers(smallest_w, max(smallest_w, max_size)))
    kwargs = dict(stride=draw(st.sampled_from([stride, stride[0]])) if stride[0] == stride[1] else stride,
                  padding=padding, dilation=dilation, groups=groups)
    return dict(x=(draw(batch), c, h, w), weight=(o, c // groups, *kernel), kwargs=kwargs)


DTYPES = st.sampled_from(["float32", "float64"])

def _case_geometry(case: dict):
    return make_geometry(case["x"], case["weight"], None, **case["kwargs"])


@st.composite
def convolutions_for(draw, algorithm: str, batch=st.integers(0, 4), max_size: int = 20) -> dict:  # noqa: B008
    """A convolution that `algorithm` computes: one of :func:`convolutions` where its rule
    (conv2d._conv.applicable) accepts it, else a random layer inside its domain from
    tests/algorithms.py (drawn by rejection from a seed hypothesis picks: a narrow domain, such as
    winograd's 3x3 stride-1 layers, is found without naming it here)."""
    case = draw(convolutions(batch=batch, max_size=max_size))
    if applicable(algorithm, None, _case_geometry(case)):
        return case
    found = random_cases(algorithm, 1, draw(st.integers(0, 2**32 - 1)))[0]
    groups = found["kwargs"]["groups"]
    return dict(x=(draw(batch), found["c"], found["h"], found["w"]),
                weight=(found["o"], found["c"] // groups, found["kh"], found["kw"]), kwargs=found["kwargs"])


def _per_algorithm(ci_count: int) -> int:
    """The examples of one algorithm's item where a property draws `ci_count` in all: shared over the
    registered algorithms, so that the file's time stays near what it was as algorithms are registered."""
    return _examples(max(1, -(-ci_count // len(algorithm_names()))))
SEEDS = st.integers(0, 2**32 - 1)


def _output_shape_pytorch(case: dict) -> tuple[int, int, int, int]:
    """PyTorch's documented output size: floor((H + pads - dilation*(k-1) - 1) / stride + 1)."""
    n, _, h, w = case["x"]
    o, _, kh, kw = case["weight"]
    kw_ = case["kwargs"]
    stride = kw_["stride"] if isinstance(kw_["stride"], tuple) else (kw_["stride"],) * 2
    dilation = kw_["dilation"]
    pad_h, pad_w = _padding_rows_cols(kw_["padding"], (kh, kw), dilation)
    out_h = math.floor((h + pad_h - dilation[0] * (kh - 1) - 1) / stride[0] + 1)
    out_w = math.floor((w + pad_w - dilation[1] * (kw - 1) - 1) / stride[1] + 1)
    return n, o, out_h, out_w


def _data(case: dict, seed: int, dtype: str):
    """x, weight, bias and an output gradient, rounded to `dtype` and held in float64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case["x"])
    w = rng.standard_normal(case["weight"])
    b = rng.standard_normal(case["weight"][0])
    g = rng.standard_normal(_output_shape_pytorch(case))
    return tuple(a.astype(dtype).astype(np.float64) for a in (x, w, b, g))


# ---------------------------------------------------------------------------------------------
# Against PyTorch, every backend
# ---------------------------------------------------------------------------------------------


def _check_against_pytorch(spec: str, case: dict, dtype: str, algorithm: str, seed: int,
                           deterministic: bool = False) -> None:
    backend = _get(spec)
    x, w, b, g = _data(case, seed, dtype)
    # The reference sees exactly the values we pass: the data was rounded to the tested dtype.
    y_ref, gx_ref, gw_ref, gb_ref = torch_conv(x, w, b, g, **case["kwargs"])
    X, W, B, G = (backend.asarray(a, dtype=dtype) for a in (x, w, b, g))
    kw = dict(case["kwargs"], algorithm=algorithm, deterministic=deterministic)
    y = conv2d.conv2d(X, W, B, **kw)
    gx, gw, gb = conv2d.conv2d_backward(G, X, W, **kw)
    for name, ours, ref in (("y", y, y_ref), ("grad_x", gx, gx_ref), ("grad_weight", gw, gw_ref), ("grad_bias", gb, gb_ref)):
        assert backend.owns(ours) and ours.dtype == X.dtype, f"{name}: {type(ours)} {ours.dtype}"
        assert_close(backend, ours, ref, dtype, f"{name} ({spec}, {dtype}, {algorithm}, {case})")


@pytest.mark.parametrize("algorithm", backend_algorithm_params("numpy"))
@settings(max_examples=_per_algorithm(300))
@given(data=st.data(), dtype=DTYPES, seed=SEEDS)
def test_numpy_matches_pytorch(algorithm, data, dtype, seed):
    """NumPy: output and the three gradients equal PyTorch's for any legal geometry."""
    case = data.draw(convolutions_for(algorithm), label="case")
    _check_against_pytorch("numpy", case, dtype, algorithm, seed)


@pytest.mark.parametrize("algorithm", backend_algorithm_params("array_api_strict"))
@settings(max_examples=_per_algorithm(120))
@given(data=st.data(), dtype=DTYPES, seed=SEEDS)
def test_array_api_strict_matches_pytorch(algorithm, data, dtype, seed):
    """array-api-strict (the standard alone): output and the three gradients equal PyTorch's."""
    case = data.draw(convolutions_for(algorithm), label="case")
    _check_against_pytorch("array_api_strict", case, dtype, algorithm, seed)


@pytest.mark.parametrize("algorithm", backend_algorithm_params("torch"))
@settings(max_examples=_per_algorithm(120))
@given(data=st.data(), dtype=DTYPES, seed=SEEDS)
def test_torch_matches_pytorch(algorithm, data, dtype, seed):
    """torch (CPU) tensors: output and the three gradients equal PyTorch's own conv2d and autograd."""
    case = data.draw(convolutions_for(algorithm), label="case")
    _check_against_pytorch("torch", case, dtype, algorithm, seed)


@pytest.mark.parametrize("algorithm", backend_algorithm_params("jax"))
@settings(max_examples=_per_algorithm(8))  # JAX compiles each new shape: fewer examples (thorough: 10x)
@given(data=st.data(), dtype=DTYPES, seed=SEEDS)
def test_jax_matches_pytorch(algorithm, data, dtype, seed):
    """JAX (CPU): output and the three gradients equal PyTorch's for any legal geometry."""
    case = data.draw(convolutions_for(algorithm), label="case")
    _check_against_pytorch("jax", case, dtype, algorithm, seed)


@pytest.mark.gpu
@settings(max_examples=_per_algorithm(60))
@pytest.mark.parametrize("algorithm", backend_algorithm_params("cupy", "auto"))
@given(data=st.data(), dtype=DTYPES, deterministic=st.booleans(), seed=SEEDS)
def test_cupy_matches_pytorch(algorithm, data, dtype, deterministic, seed):
    """CuPy (a GPU): every algorithm, kernels included, in both modes, equals PyTorch."""
    case = data.draw(convolutions_for(algorithm), label="case")
    _check_against_pytorch("cupy", case, dtype, algorithm, seed, deterministic)


@pytest.mark.gpu
@settings(max_examples=_per_algorithm(60))
@pytest.mark.parametrize("algorithm", backend_algorithm_params("torch:cuda", "auto"))
@given(data=st.data(), dtype=DTYPES, deterministic=st.booleans(), seed=SEEDS)
def test_torch_cuda_matches_pytorch(algorithm, data, dtype, deterministic, seed):
    """torch on CUDA: every algorithm it has, in both modes, equals PyTorch (on the CPU, float64)."""
    case = data.draw(convolutions_for(algorithm), label="case")
    _check_against_pytorch("torch:cuda", case, dtype, algorithm, seed, deterministic)


# ---------------------------------------------------------------------------------------------
# A workspace small enough to split the work
# ---------------------------------------------------------------------------------------------


@st.composite
def split_convolutions(draw, algorithm: str | None = None) -> tuple[dict, str, int, str]:
    """(case, dtype, limit, how): a batch of 2..4 and a workspace limit that forces splitting it
    into smaller batches, or one sample into runs of output rows (a layer `algorithm` computes)."""
    batch = st.integers(2, 4)
    case = draw(convolutions(batch=batch, max_size=14) if algorithm is None else convolutions_for(algorithm, batch, 14))
    dtype = draw(DTYPES)
    geom = make_geometry(case["x"], case["weight"], None, **case["kwargs"])
    n, itemsize = case["x"][0], np.dtype(dtype).itemsize
    splits = [("batch", k) for k in range(1, n)] + [("rows", r) for r in range(1, geom.out_h)]
    how, size = draw(st.sampled_from(splits))
    limit = scratch_bytes(geom, size, geom.out_h, itemsize) if how == "batch" else scratch_bytes(geom, 1, size, itemsize)
    return case, dtype, limit, how


@settings(max_examples=_per_algorithm(50))  # three backends, whole and split: the suite's slowest property (thorough: 500)
@pytest.mark.parametrize("algorithm", backend_algorithm_params("torch"))
@given(data=st.data(), backend=st.sampled_from(["numpy", "torch", "array_api_strict"]), seed=SEEDS)
def test_split_workspace_gives_the_same_results(algorithm, data, backend, seed):
    """A max_workspace_bytes that forces batch or row chunks changes only rounding, and stays right."""
    case, dtype, limit, how = data.draw(split_convolutions(algorithm), label="split")
    if not applicable(algorithm, _get(backend)):  # native: torch's, not NumPy's
        backend = "torch"
    geom = make_geometry(case["x"], case["weight"], None, **case["kwargs"])
    chunks = plan_chunks(geom, case["x"][0], np.dtype(dtype).itemsize, limit)
    assert len(chunks) > 1
    assert (how == "rows") == any(c.row_stop - c.row_start < geom.out_h for c in chunks)
    be = _get(backend)
    x, w, b, g = _data(case, seed, dtype)
    X, W, B, G = (be.asarray(a, dtype=dtype) for a in (x, w, b, g))
    kw = dict(case["kwargs"], algorithm=algorithm)
    whole = (conv2d.conv2d(X, W, B, **kw), *conv2d.conv2d_backward(G, X, W, **kw))
    split_ = (conv2d.conv2d(X, W, B, max_workspace_bytes=limit, **kw),
              *conv2d.conv2d_backward(G, X, W, max_workspace_bytes=limit, **kw))
    reference = torch_conv(x, w, b, g, **case["kwargs"])
    for name, s, a, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), split_, whole, reference):
        assert_close(be, s, be.to_numpy(a).astype(np.float64), dtype, f"{name}: split vs whole ({how})")
        assert_close(be, s, r, dtype, f"{name}: split vs PyTorch ({how})")


# ---------------------------------------------------------------------------------------------
# The GPU path's arithmetic, on the CPU: CuPy's kernels compiled for the host, and gather's
# deterministic backward (as chosen where scatter-add uses atomics), whole and split
# ---------------------------------------------------------------------------------------------


@settings(max_examples=_examples(50))  # a C++ build behind each kernel call (thorough: 500)
@given(split=split_convolutions(), path=st.sampled_from(["kernels", "gather"]), whole=st.booleans(), seed=SEEDS)
def test_gpu_paths_match_pytorch(split, path, whole, seed):
    """'kernels' and deterministic 'gather' on a backend like a GPU's equal PyTorch, in one chunk or several."""
    case, dtype, limit, how = split
    backend = host_kernels_backend()
    geom = make_geometry(case["x"], case["weight"], None, **case["kwargs"])
    limit = 2**30 if whole else limit
    x, w, b, g = (a.astype(dtype) for a in _data(case, seed, dtype))
    chosen = _conv.choose_algorithm(path, backend, deterministic=True)
    assert chosen.name == path and (path != "gather" or chosen is not _conv.ALGORITHMS["gather"])
    y, _ = _conv.forward(backend, x, w, None, geom, path, limit, True)
    grads = _conv.backward(backend, g, x, w, geom, path, limit, deterministic=True)
    reference = torch_conv(*(a.astype(np.float64) for a in (x, w, b, g)), **case["kwargs"])
    y = y + b.reshape(1, -1, 1, 1)
    for name, ours, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, *grads), reference):
        assert ours.dtype == np.dtype(dtype)
        assert_close(backend, ours, ref, dtype, f"{name} ({path}, {how if not whole else 'whole'}, {case})")


# ---------------------------------------------------------------------------------------------
# Output size
# ---------------------------------------------------------------------------------------------


def _meta_output_shape(case: dict) -> tuple[int, ...]:
    """The shape PyTorch's conv2d gives, computed on meta tensors (shapes only, no data)."""
    x = torch.empty(case["x"], device="meta", dtype=torch.float64)
    w = torch.empty(case["weight"], device="meta", dtype=torch.float64)
    with warnings.catch_warnings():  # PyTorch warns that asymmetric "same" padding costs it a copy
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        return tuple(torch.nn.functional.conv2d(x, w, **case["kwargs"]).shape)


@settings(max_examples=_examples(100))
@given(case=convolutions(batch=st.integers(0, 2), max_size=40))
def test_output_shape_is_pytorchs_formula(case):
    """The output shape is PyTorch's formula (and PyTorch's own result); "same" keeps H and W."""
    x = np.zeros(case["x"], dtype=np.float32)
    w = np.zeros(case["weight"], dtype=np.float32)
    shape = tuple(conv2d.conv2d(x, w, **case["kwargs"]).shape)
    assert shape == _output_shape_pytorch(case) == _meta_output_shape(case)
    if case["kwargs"]["padding"] == "same":
        assert shape[2:] == case["x"][2:]


@settings(max_examples=_examples(50))
@given(
    n=st.integers(0, 3),
    depth=st.integers(1, 4),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    filter_size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    stride=st.integers(1, 5),
    dilation=st.integers(1, 3),
)
def test_valid_output_shape_is_the_seeds_rule(n, depth, size, filter_size, stride, dilation):
    """With no padding, out = int((in - f) / stride + 1), the seed's rule, f being the dilated kernel's reach."""
    reach = tuple(dilation * (f - 1) + 1 for f in filter_size)
    size = tuple(max(s, r) for s, r in zip(size, reach))  # the smallest legal input, or larger
    seed_rule = tuple(int((i - f) / stride + 1) for i, f in zip(size, reach))
    x = np.zeros((n, depth, *size))
    w = np.zeros((2, depth, *filter_size))
    for padding in (0, "valid", (0, 0)):
        assert tuple(conv2d.conv2d(x, w, stride=stride, dilation=dilation, padding=padding).shape) == (n, 2, *seed_rule)
    if dilation == 1:  # the seed's layer itself
        layer = conv2d.ConvolutionLayer((depth, *size), filter_size, 2, stride, seed=0)
        assert (layer.out_row, layer.out_col) == seed_rule
        assert tuple(layer.forwardpass(x).shape) == (n, 2, *seed_rule)


# ---------------------------------------------------------------------------------------------
# Padding modes and layouts (issue #19): NumPy only, few examples; tests/test_padding_modes.py and
# tests/test_data_format.py cover every backend
# ---------------------------------------------------------------------------------------------


@settings(max_examples=_examples(20))
@given(case=convolutions(batch=st.integers(1, 3), max_size=10), mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       layout=st.sampled_from(["NCHW", "NHWC"]), seed=SEEDS)
def test_padding_mode_and_layout_match_pytorch(case, mode, layout, seed):
    """conv2d and its gradients in any padding mode and layout are torch.nn.Conv2d(padding_mode=...)'s."""
    from .modes_oracle import first, last, torch_layer

    geom = make_geometry(case["x"], case["weight"], None, **case["kwargs"])
    widest = (max(geom.padding[:2]), max(geom.padding[2:]))
    assume(mode != "reflect" or (widest[0] < geom.height and widest[1] < geom.width))
    assume(mode != "circular" or (widest[0] <= geom.height and widest[1] <= geom.width))
    x, w, b, _ = _data(case, seed, "float64")
    y_ref, g, grads_ref = torch_layer(x, w, b, mode, np.random.default_rng(seed), "float64", **case["kwargs"])
    to, back = (last, first) if layout == "NHWC" else (np.asarray, np.asarray)
    kw = dict(case["kwargs"], padding_mode=mode, data_format=layout)
    np.testing.assert_allclose(back(conv2d.conv2d(to(x), w, b, **kw)), y_ref, rtol=1e-9, atol=1e-10)
    gx, gw, gb = conv2d.conv2d_backward(to(g), to(x), w, **kw)
    for ours, ref in zip((back(gx), gw, gb), grads_ref):
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Transposed convolution and complex dtypes (issue #19): NumPy only, few examples; tests/test_transposed.py
# and tests/test_complex.py cover every backend
# ---------------------------------------------------------------------------------------------


@st.composite
def transposed_convolutions(draw) -> dict:
    """Shapes and keyword arguments of one legal conv_transpose2d: output_padding below the stride or the
    dilation (PyTorch's rule), and an input just large enough for an output of at least one pixel, or larger."""
    groups = draw(st.integers(1, 4))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    # out = (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1 >= 1
    smallest = [1 + max(0, -(-(2 * p - d * (k - 1) - op) // s))
                for s, p, d, k, op in zip(stride, padding, dilation, kernel, output_padding)]
    h, w = (draw(st.integers(m, m + 6)) for m in smallest)
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups)
    return dict(x=(draw(st.integers(0, 3)), c_in, h, w), weight=(c_in, c_out // groups, *kernel), kwargs=kwargs)


def _numpy_algorithms(geom) -> list[str]:
    """'auto' and every algorithm that computes the convolution `geom` on NumPy."""
    numpy = _get("numpy")
    return ["auto", *(name for name in algorithm_names() if applicable(name, numpy, geom))]


@settings(max_examples=_examples(20))
@given(case=transposed_convolutions(), dtype=DTYPES, data=st.data(), seed=SEEDS)
def test_conv_transpose2d_matches_pytorch(case, dtype, data, seed):
    """conv_transpose2d and its three gradients are F.conv_transpose2d's and autograd's for any legal geometry."""
    from conv2d._transposed import transposed_geometry

    geom = transposed_geometry(case["x"], case["weight"], None, **case["kwargs"])
    algorithm = data.draw(st.sampled_from(_numpy_algorithms(geom)), label="algorithm")
    rng = np.random.default_rng(seed)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (case["x"], case["weight"], case["weight"][1] * case["kwargs"]["groups"]))
    leaves = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in (x, w, b)]
    y_ref = torch.nn.functional.conv_transpose2d(*leaves, **case["kwargs"])
    assert tuple(y_ref.shape) == (case["x"][0], b.shape[0], geom.height, geom.width)
    g = rng.standard_normal(tuple(y_ref.shape)).astype(dtype)
    refs = [y_ref.detach().numpy(), *(t.numpy() for t in torch.autograd.grad(y_ref, leaves, torch.tensor(g.astype(np.float64))))]
    kw = dict(case["kwargs"], algorithm=algorithm)
    ours = [conv2d.conv_transpose2d(x, w, b, **kw), *conv2d.conv_transpose2d_backward(g, x, w, **kw)]
    for name, got, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, refs):
        assert got.dtype == np.dtype(dtype), f"{name}: {got.dtype}"
        assert_close(_get("numpy"), got, ref, dtype, f"{name} ({algorithm}, {case})")


@settings(max_examples=_examples(20))
@given(case=convolutions(batch=st.integers(0, 3), max_size=12), dtype=st.sampled_from(["complex64", "complex128"]),
       data=st.data(), seed=SEEDS)
def test_complex_matches_pytorch(case, dtype, data, seed):
    """complex conv2d and its gradients are PyTorch's complex conv2d and torch.autograd.grad (the conjugate
    convention) for any legal geometry."""
    geom = _case_geometry(case)
    algorithm = data.draw(st.sampled_from(_numpy_algorithms(geom)), label="algorithm")
    rng = np.random.default_rng(seed)

    def draw(shape):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)

    x, w, b, g = (draw(s) for s in (case["x"], case["weight"], case["weight"][0], _output_shape_pytorch(case)))
    leaves = [torch.tensor(a.astype(np.complex128), requires_grad=True) for a in (x, w, b)]
    with warnings.catch_warnings():  # PyTorch warns that asymmetric "same" padding costs it a copy
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        y_ref = torch.nn.functional.conv2d(*leaves, **case["kwargs"])
    refs = [y_ref.detach().numpy(), *(t.numpy() for t in torch.autograd.grad(y_ref, leaves, torch.tensor(g.astype(np.complex128))))]
    kw = dict(case["kwargs"], algorithm=algorithm)
    ours = [conv2d.conv2d(x, w, b, **kw), *conv2d.conv2d_backward(g, x, w, **kw)]
    tolerance = {"complex64": "float32", "complex128": "float64"}[dtype]  # each part rounds like the real dtype
    for name, got, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, refs):
        assert got.dtype == np.dtype(dtype), f"{name}: {got.dtype}"
        assert_close(_get("numpy"), got, ref, tolerance, f"{name} ({algorithm}, {case})")
