"""conv2d.ConvolutionLayer: the seed's protocol (forwardpass / backwardpass with SGD) on every backend.

Oracles:
- ``SeedLayer`` below, a float64 NumPy reimplementation of the seed layer written from
  /work/shared/SEED_NOTES.md (index arrays k, i, j; patch matrix with columns ordered output
  position then sample; ``np.add.at`` scatter; dE/dX with the weights before the update);
- PyTorch's ``conv2d`` + activation and autograd in float64 (``torch_layer``), for the options
  the seed does not have (activations, padding, dilation, float32).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import conv2d
from conv2d.nn._convolution import ACTIVATIONS

from .algorithms import algorithm_params, in_domain, random_cases
from .conftest import CPU_BACKENDS, require_or_skip
from .oracle import assert_close

require_or_skip("torch")

ACTIVATION_NAMES = ["sigmoid", "relu", "tanh", None]
PARITY_TOL = dict(rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class SeedLayer:
    """The seed layer as SEED_NOTES.md describes it: NumPy, float64, sigmoid, no padding/dilation.

    Weights and biases are given (copied from the layer under test) instead of drawn.
    """

    def __init__(self, in_channels, filter_size, numfilters, stride, weights, biases):
        self.in_depth, self.in_row, self.in_col = in_channels
        self.filter_row, self.filter_col = filter_size
        self.out_depth = numfilters
        self.stride = stride
        self.out_row = int((self.in_row - self.filter_row) / stride + 1)
        self.out_col = int((self.in_col - self.filter_col) / stride + 1)
        self.weights = np.array(weights, dtype=np.float64)  # own copies: updated in place
        self.biases = np.array(biases, dtype=np.float64)
        assert self.weights.shape == (numfilters, self.in_depth, self.filter_row, self.filter_col)
        assert self.biases.shape == (numfilters,)
        # Patch-matrix rows: (depth, filter row, filter col), depth-major.
        d, fr, fc = self.in_depth, self.filter_row, self.filter_col
        row_depth = np.repeat(np.arange(d), fr * fc)
        row_i = np.tile(np.repeat(np.arange(fr), fc), d)
        row_j = np.tile(np.arange(fc), d * fr)
        # Patch-matrix columns: output positions, row-major.
        col_i = stride * np.repeat(np.arange(self.out_row), self.out_col)
        col_j = stride * np.tile(np.arange(self.out_col), self.out_row)
        self.k = row_depth.reshape(-1, 1)  # kept as a column, broadcast against i and j
        self.i = row_i.reshape(-1, 1) + col_i.reshape(1, -1)
        self.j = row_j.reshape(-1, 1) + col_j.reshape(1, -1)

    def forwardpass(self, X):
        n = X.shape[0]
        rows = self.in_depth * self.filter_row * self.filter_col
        gathered = X[:, self.k, self.i, self.j]  # (n, rows, positions)
        # Columns ordered (output position, then sample): column = position * n + sample.
        self.patches = gathered.transpose(1, 2, 0).reshape(rows, -1)
        pre = self.weights.reshape(self.out_depth, -1) @ self.patches + self.biases.reshape(-1, 1)
        self.out_flat = _sigmoid(pre)  # (out_depth, positions * n)
        out = self.out_flat.reshape(self.out_depth, self.out_row, self.out_col, n)
        return out.transpose(3, 0, 1, 2)

    def backwardpass(self, lr, activation_prev, delta):
        n = activation_prev.shape[0]
        delta_flat = delta.transpose(1, 2, 3, 0).reshape(self.out_depth, -1)
        dpre = delta_flat * self.out_flat * (1 - self.out_flat)
        w_flat = self.weights.reshape(self.out_depth, -1)
        dpatches = w_flat.T @ dpre  # with the weights before the update
        dpatches = dpatches.reshape(w_flat.shape[1], self.out_row * self.out_col, n).transpose(2, 0, 1)
        new_delta = np.zeros((n, self.in_depth, self.in_row, self.in_col))
        np.add.at(new_delta, (slice(None), self.k, self.i, self.j), dpatches)
        self.biases -= lr * dpre.sum(axis=1)
        self.weights -= lr * (dpre @ self.patches.T).reshape(self.weights.shape)
        return new_delta


def torch_layer(x, w, b, delta, activation, **conv_kw):
    """activation(F.conv2d(x, w, b, **conv_kw)) and autograd in float64: (y, dE/dx, dE/dw, dE/db)."""
    import torch
    import torch.nn.functional as F

    xt, wt, bt = (torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True) for a in (x, w, b))
    with warnings.catch_warnings():
        # PyTorch's own note that it pads a copy for an even 'same' kernel: not our concern.
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        z = F.conv2d(xt, wt, bt, **conv_kw)
    act = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh, None: lambda t: t}[activation]
    y = act(z)
    y.backward(torch.tensor(np.asarray(delta, dtype=np.float64)))
    return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()


def _params(layer) -> tuple[np.ndarray, np.ndarray]:
    """The layer's weights and biases as float64 NumPy copies."""
    b = layer.backend
    return (np.array(b.to_numpy(layer.weights), dtype=np.float64), np.array(b.to_numpy(layer.biases), dtype=np.float64))


def _close(actual, expected, what, rtol, atol):
    """assert_allclose with atol scaled by the size of `expected` (at least 1)."""
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def re_shape(shape) -> str:
    """A shape as the layer prints it, escaped for pytest.raises(match=...)."""
    return re.escape(str(tuple(shape)))


# --------------------------------------------------------------------------------------------
# 1. Parity with the seed layer (float64, sigmoid, 3 SGD steps)
# --------------------------------------------------------------------------------------------

# (in_channels, filter_size, numfilters, stride, batch)
SEED_GEOMETRIES = [
    pytest.param((3, 8, 8), (3, 3), 4, 1, 2, id="square-stride1"),
    pytest.param((2, 9, 11), (3, 2), 3, 2, 3, id="rect-stride2-uneven"),
    pytest.param((1, 10, 7), (2, 2), 2, 3, 1, id="depth1-batch1-stride3>filter"),
    pytest.param((3, 6, 10), (1, 4), 5, 3, 1, id="rect-filter-stride3-batch1"),
    pytest.param((2, 7, 5), (7, 5), 3, 1, 2, id="filter-equals-input"),
    pytest.param((2, 4, 9), (1, 1), 1, 4, 4, id="1x1-filter-stride4-one-filter-batch4"),
]


def _seed_parity(backend, in_channels, filter_size, numfilters, stride, batch, seed):
    layer = conv2d.ConvolutionLayer(in_channels, filter_size, numfilters, stride, seed=seed, backend=backend)
    w0, b0 = _params(layer)
    ref = SeedLayer(in_channels, filter_size, numfilters, stride, w0, b0)
    for attr in ("in_depth", "in_row", "in_col", "filter_row", "filter_col", "out_depth", "out_row", "out_col"):
        assert getattr(layer, attr) == getattr(ref, attr), attr
    rng = np.random.default_rng(1000 + seed)
    lr = 0.5  # large, so that a dE/dX taken with the updated weights would show
    for step in range(3):
        X = rng.standard_normal((batch, *in_channels))
        out = layer.forwardpass(X)
        expected_out = ref.forwardpass(X)
        _close(backend.to_numpy(out), expected_out, f"step {step}: forwardpass", **PARITY_TOL)
        delta = rng.standard_normal(expected_out.shape)
        grad_x = layer.backwardpass(lr, X, delta)
        expected_grad_x = ref.backwardpass(lr, X, delta)
        _close(backend.to_numpy(grad_x), expected_grad_x, f"step {step}: dE/dX", **PARITY_TOL)
        w, b = _params(layer)
        _close(w, ref.weights, f"step {step}: weights after update", **PARITY_TOL)
        _close(b, ref.biases, f"step {step}: biases after update", **PARITY_TOL)


def test_seed_oracle_agrees_with_torch():
    """The seed reimplementation is itself right: its forward and dE/dX match PyTorch autograd."""
    rng = np.random.default_rng(7)
    w, b = rng.normal(0, 0.3, (3, 2, 3, 2)), rng.normal(0, 0.3, 3)
    X = rng.standard_normal((3, 2, 9, 11))
    ref = SeedLayer((2, 9, 11), (3, 2), 3, 2, w, b)
    out = ref.forwardpass(X)
    delta = rng.standard_normal(out.shape)
    y, gx, gw, gb = torch_layer(X, w, b, delta, "sigmoid", stride=2)
    _close(out, y, "seed forward vs torch", **PARITY_TOL)
    _close(ref.backwardpass(0.25, X, delta), gx, "seed dE/dX vs torch", **PARITY_TOL)
    _close((w - ref.weights) / 0.25, gw, "seed weight gradient vs torch", **PARITY_TOL)
    _close((b - ref.biases) / 0.25, gb, "seed bias gradient vs torch", **PARITY_TOL)


@pytest.mark.parametrize("in_channels, filter_size, numfilters, stride, batch", SEED_GEOMETRIES)
def test_seed_parity_numpy(in_channels, filter_size, numfilters, stride, batch):
    """On the default NumPy backend the layer is the seed: attributes, outputs, dE/dX and SGD updates."""
    _seed_parity(conv2d.get_backend("numpy"), in_channels, filter_size, numfilters, stride, batch, seed=3)


@pytest.mark.parametrize("in_channels, filter_size, numfilters, stride, batch", SEED_GEOMETRIES)
def test_seed_parity_every_backend(backend, in_channels, filter_size, numfilters, stride, batch):
    """Every backend reproduces the seed layer over 3 SGD steps to 1e-10 in float64."""
    _seed_parity(backend, in_channels, filter_size, numfilters, stride, batch, seed=11)


def test_default_backend_is_numpy():
    """With no backend named (and no selector set) the layer lives on NumPy, like the seed."""
    layer = conv2d.ConvolutionLayer((1, 4, 4), (2, 2), 1, 1, seed=0)
    assert layer.backend.name == "numpy"
    assert isinstance(layer.weights, np.ndarray) and layer.weights.dtype == np.float64


# --------------------------------------------------------------------------------------------
# 2. Initial weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 42])
def test_initial_weights_are_seeded_normal_draws(seed):
    """Weights, then biases, are np.random.default_rng(seed).normal(0, 0.1, shape), exactly."""
    layer = conv2d.ConvolutionLayer((3, 7, 6), (2, 3), 5, 2, seed=seed, backend="numpy")
    rng = np.random.default_rng(seed)
    expected_w = rng.normal(0, 0.1, (5, 3, 2, 3))
    expected_b = rng.normal(0, 0.1, 5)
    assert layer.weights.dtype == np.float64 and layer.biases.dtype == np.float64
    np.testing.assert_array_equal(layer.weights, expected_w)
    np.testing.assert_array_equal(layer.biases, expected_b)


def test_initial_weights_same_on_every_backend(backend):
    """A seed gives bitwise the same float64 weights and biases on every backend as on NumPy."""
    reference = conv2d.ConvolutionLayer((2, 6, 5), (3, 2), 4, 1, seed=123, backend="numpy")
    layer = conv2d.ConvolutionLayer((2, 6, 5), (3, 2), 4, 1, seed=123, backend=backend)
    assert backend.owns(layer.weights) and backend.owns(layer.biases)
    np.testing.assert_array_equal(backend.to_numpy(layer.weights), reference.weights)
    np.testing.assert_array_equal(backend.to_numpy(layer.biases), reference.biases)


def test_initial_float32_weights_are_the_rounded_draws(backend):
    """A float32 layer holds the same seeded float64 draws, rounded to float32."""
    layer = conv2d.ConvolutionLayer((2, 5, 5), (2, 2), 3, 1, seed=9, dtype="float32", backend=backend)
    rng = np.random.default_rng(9)
    w, b = backend.to_numpy(layer.weights), backend.to_numpy(layer.biases)
    assert w.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_array_equal(w, rng.normal(0, 0.1, (3, 2, 2, 2)).astype(np.float32))
    np.testing.assert_array_equal(b, rng.normal(0, 0.1, 3).astype(np.float32))


def test_different_seeds_give_different_weights():
    """The seed is used: two seeds (and two unseeded layers) give different weights."""
    a = conv2d.ConvolutionLayer((2, 5, 5), (3, 3), 4, 1, seed=1, backend="numpy")
    b = conv2d.ConvolutionLayer((2, 5, 5), (3, 3), 4, 1, seed=2, backend="numpy")
    assert not np.array_equal(a.weights, b.weights)
    c = conv2d.ConvolutionLayer((2, 5, 5), (3, 3), 4, 1, backend="numpy")
    d = conv2d.ConvolutionLayer((2, 5, 5), (3, 3), 4, 1, backend="numpy")
    assert not np.array_equal(c.weights, d.weights)


# --------------------------------------------------------------------------------------------
# 3. Activations, padding and dilation against PyTorch autograd
# --------------------------------------------------------------------------------------------

# (in_channels, filter_size, numfilters, constructor keywords, batch)
TORCH_GEOMETRIES = [
    pytest.param((2, 7, 6), (3, 2), 3, dict(stride=2, padding=1), 2, id="pad1-stride2"),
    pytest.param((3, 6, 8), (2, 3), 2, dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1)), 1, id="pad-pair-dil-pair"),
    pytest.param((1, 6, 7), (4, 3), 2, dict(padding="same"), 3, id="same-even-kernel"),
    pytest.param((2, 8, 8), (3, 3), 2, dict(padding="same", dilation=2), 2, id="same-dilation2"),
    pytest.param((2, 7, 9), (2, 3), 3, dict(stride=3, padding="valid", dilation=(3, 2)), 2, id="valid-dil-stride3"),
]


def _torch_kw(kw):
    return dict(stride=kw.get("stride", 1), padding=kw.get("padding", 0), dilation=kw.get("dilation", 1))


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("in_channels, filter_size, numfilters, kw, batch", TORCH_GEOMETRIES)
def test_against_torch_autograd(backend, activation, in_channels, filter_size, numfilters, kw, batch):
    """Forward, dE/dX and the SGD step's weight and bias gradients equal PyTorch autograd (float64)."""
    layer = conv2d.ConvolutionLayer(
        in_channels, filter_size, numfilters, activation=activation, seed=5, backend=backend, **kw
    )
    rng = np.random.default_rng(21)
    # Larger weights than the initial 0.1 so that relu and tanh see both signs and curvature.
    layer.weights = backend.asarray(rng.normal(0, 0.5, tuple(layer.weights.shape)), dtype="float64")
    w0, b0 = _params(layer)
    X = rng.standard_normal((batch, *in_channels))
    out = layer.forwardpass(X)
    delta = rng.standard_normal(tuple(out.shape))
    y, gx, gw, gb = torch_layer(X, w0, b0, delta, activation, **_torch_kw(kw))
    if activation == "relu":
        assert 0.1 < (y > 0).mean() < 0.9, "relu case should exercise both branches"
    assert_close(backend, out, y, "float64", "forwardpass")
    lr = 0.25  # a power of two: (w_before - w_after) / lr is exact up to the update's rounding
    grad_x = layer.backwardpass(lr, X, delta)
    assert_close(backend, grad_x, gx, "float64", "dE/dX")
    w1, b1 = _params(layer)
    assert_close(conv2d.get_backend("numpy"), (w0 - w1) / lr, gw, "float64", "weight gradient")
    assert_close(conv2d.get_backend("numpy"), (b0 - b1) / lr, gb, "float64", "bias gradient")


def _layer_case(algorithm: str) -> dict:
    """A layer (no groups: ConvolutionLayer has none) that `algorithm` computes: 3x3, stride 1, padding
    (1, 2) (top and left differ: a crop at the wrong corner shows), else a random one inside the
    algorithm's domain (tests/algorithms.py)."""
    fixed = dict(n=3, c=3, o=4, h=9, w=8, kh=3, kw=3, kwargs=dict(stride=(1, 1), padding=(1, 2), dilation=(1, 1), groups=1))
    case = in_domain(algorithm, fixed, seed=600)
    if case["kwargs"]["groups"] != 1:
        case = random_cases(algorithm, 1, 601, accept=lambda c: c["kwargs"]["groups"] == 1)[0]
    return case


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("algorithm", algorithm_params("auto"))
def test_each_algorithm_against_torch_autograd(backend, algorithm, dtype):
    """A layer with each algorithm (on torch, "auto" is torch's own convolution: the others are ours),
    forward, dE/dX and the SGD step's gradients, equal PyTorch autograd; where the backend keeps the
    forward's patches for the backward (torch, not NumPy), that path too."""
    case = _layer_case(algorithm)
    kw = {k: v for k, v in case["kwargs"].items() if k != "groups"}
    layer = conv2d.ConvolutionLayer((case["c"], case["h"], case["w"]), (case["kh"], case["kw"]), case["o"],
                                    activation="tanh", seed=5, backend=backend, algorithm=algorithm, dtype=dtype, **kw)
    rng = np.random.default_rng(22)
    layer.weights = backend.asarray(rng.normal(0, 0.5, tuple(layer.weights.shape)), dtype=dtype)
    w0, b0 = _params(layer)
    X = rng.standard_normal((case["n"], case["c"], case["h"], case["w"])).astype(dtype)
    out = layer.forwardpass(X)
    delta = rng.standard_normal(tuple(out.shape)).astype(dtype)
    y, gx, gw, gb = torch_layer(X, w0, b0, delta, "tanh", **_torch_kw(kw))
    assert_close(backend, out, y, dtype, "forwardpass")
    lr = 0.25
    grad_x = layer.backwardpass(lr, X, delta)
    assert_close(backend, grad_x, gx, dtype, "dE/dX")
    w1, b1 = _params(layer)
    assert_close(conv2d.get_backend("numpy"), (w0 - w1) / lr, gw, dtype, "weight gradient")
    assert_close(conv2d.get_backend("numpy"), (b0 - b1) / lr, gb, dtype, "bias gradient")


def test_activation_table_is_what_the_tests_cover():
    """The activations tested here are exactly the layer's choices."""
    assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)


# --------------------------------------------------------------------------------------------
# 4. float32 layers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", None])
def test_float32_layer(backend, activation):
    """A float32 layer computes in float32 (outputs, dE/dX, weights) and matches the float64 oracle."""
    in_channels, kw = (3, 9, 8), dict(stride=2, padding=1)
    layer = conv2d.ConvolutionLayer(
        in_channels, (3, 3), 4, activation=activation, dtype="float32", seed=4, backend=backend, **kw
    )
    rng = np.random.default_rng(8)
    w0, b0 = _params(layer)  # the float32 values, widened exactly
    X = rng.standard_normal((2, *in_channels)).astype(np.float32)
    out = layer.forwardpass(X)
    assert backend.to_numpy(out).dtype == np.float32
    delta = rng.standard_normal(tuple(out.shape)).astype(np.float32)
    y, gx, gw, gb = torch_layer(X, w0, b0, delta, activation, **_torch_kw(kw))
    assert_close(backend, out, y, "float32", "forwardpass")
    lr = 0.25
    grad_x = layer.backwardpass(lr, X, delta)
    assert backend.to_numpy(grad_x).dtype == np.float32
    assert backend.to_numpy(layer.weights).dtype == np.float32
    assert backend.to_numpy(layer.biases).dtype == np.float32
    assert_close(backend, grad_x, gx, "float32", "dE/dX")
    w1, b1 = _params(layer)
    numpy_backend = conv2d.get_backend("numpy")
    assert_close(numpy_backend, (w0 - w1) / lr, gw, "float32", "weight gradient")
    assert_close(numpy_backend, (b0 - b1) / lr, gb, "float32", "bias gradient")


def test_float64_input_is_cast_to_a_float32_layer(backend):
    """Float64 X and delta given to a float32 layer are cast: results stay float32."""
    layer = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, dtype="float32", seed=0, backend=backend)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((2, 2, 6, 6))
    w0, b0 = _params(layer)
    out = layer.forwardpass(X)
    assert backend.to_numpy(out).dtype == np.float32
    delta = rng.standard_normal(tuple(out.shape))
    lr = 0.25
    grad_x = layer.backwardpass(lr, X, delta)
    assert backend.to_numpy(grad_x).dtype == np.float32
    assert backend.to_numpy(layer.weights).dtype == np.float32
    # The values: PyTorch on the float32-rounded inputs (what the layer computes on), float32 tolerance.
    y, gx, gw, gb = torch_layer(X.astype(np.float32), w0, b0, delta.astype(np.float32), "sigmoid", stride=1)
    assert_close(backend, out, y, "float32", "forwardpass")
    assert_close(backend, grad_x, gx, "float32", "dE/dX")
    w1, b1 = _params(layer)
    assert_close(conv2d.get_backend("numpy"), (w0 - w1) / lr, gw, "float32", "weight gradient")
    assert_close(conv2d.get_backend("numpy"), (b0 - b1) / lr, gb, "float32", "bias gradient")


@pytest.mark.parametrize("lr", [np.float64(0.05), np.float32(0.05)], ids=["np.float64", "np.float32"])
def test_numpy_scalar_learning_rate_keeps_dtype(backend, lr):
    """A NumPy scalar learning rate (e.g. from np.linspace) works and leaves a float32 layer float32.

    Known bug (see report): on numpy and jax a np.float64 lr promotes the weights to float64 and
    the next forwardpass raises TypeError; array-api-strict rejects NumPy scalars outright.
    """
    kwargs = dict(dtype="float32", seed=2, backend=backend)
    layer = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, **kwargs)
    twin = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, **kwargs)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    delta = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    layer.forwardpass(X)
    twin.forwardpass(X)
    twin.backwardpass(float(lr), X, delta)
    layer.backwardpass(lr, X, delta)
    w_dtype = backend.to_numpy(layer.weights).dtype
    b_dtype = backend.to_numpy(layer.biases).dtype
    assert (w_dtype, b_dtype) == (np.float32, np.float32), (
        f"lr={lr!r} ({type(lr).__name__}) turned a float32 layer's weights/biases into {w_dtype}/{b_dtype}"
    )
    np.testing.assert_array_equal(backend.to_numpy(layer.weights), backend.to_numpy(twin.weights))
    layer.forwardpass(X)  # still usable


# --------------------------------------------------------------------------------------------
# 5. Inputs from other libraries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", CPU_BACKENDS)
def test_inputs_from_any_library_are_moved(backend, source):
    """X and delta from another library are moved in; output and dE/dX are in the layer's backend."""
    require_or_skip(source)
    src = conv2d.get_backend(source)
    rng = np.random.default_rng(6)
    X = rng.standard_normal((2, 2, 6, 6))
    delta = rng.standard_normal((2, 3, 4, 4))
    reference = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, seed=1, backend="numpy")
    expected_out = reference.forwardpass(X)
    expected_grad_x = reference.backwardpass(0.1, X, delta)

    layer = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, seed=1, backend=backend)
    X_src, delta_src = src.asarray(X), src.asarray(delta)
    out = layer.forwardpass(X_src)
    assert layer.backend.owns(out), f"output of a {backend.name} layer fed {source} is {type(out)}"
    grad_x = layer.backwardpass(0.1, X_src, delta_src)
    assert layer.backend.owns(grad_x)
    assert layer.backend.owns(layer.weights) and layer.backend.owns(layer.biases)
    assert_close(backend, out, expected_out, "float64", "forwardpass")
    assert_close(backend, grad_x, expected_grad_x, "float64", "dE/dX")
    assert_close(backend, layer.weights, reference.weights, "float64", "weights after update")


def test_numpy_input_to_torch_layer_gives_torch_output():
    """The concrete case: a NumPy batch into a torch layer comes back as a torch.Tensor, and vice versa."""
    torch = require_or_skip("torch")
    rng = np.random.default_rng(0)
    layer = conv2d.ConvolutionLayer((1, 5, 5), (2, 2), 2, 1, seed=0, backend="torch")
    out = layer.forwardpass(rng.standard_normal((3, 1, 5, 5)))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    grad_x = layer.backwardpass(0.1, np.zeros((3, 1, 5, 5)), rng.standard_normal((3, 2, 4, 4)))
    assert isinstance(grad_x, torch.Tensor)

    numpy_layer = conv2d.ConvolutionLayer((1, 5, 5), (2, 2), 2, 1, seed=0, backend="numpy")
    out = numpy_layer.forwardpass(torch.tensor(rng.standard_normal((3, 1, 5, 5)), requires_grad=True))
    assert isinstance(out, np.ndarray)


def test_float32_input_is_cast_to_a_float64_layer(backend):
    """A float32 batch given to a float64 layer is widened: the output is float64."""
    layer = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, seed=0, backend=backend)
    X = np.random.default_rng(1).standard_normal((2, 2, 6, 6)).astype(np.float32)
    out = layer.forwardpass(X)
    assert backend.to_numpy(out).dtype == np.float64
    reference = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, seed=0, backend="numpy")
    assert_close(backend, out, reference.forwardpass(X.astype(np.float64)), "float64", "forwardpass")


# --------------------------------------------------------------------------------------------
# 6. Errors
# --------------------------------------------------------------------------------------------


def _layer(backend, **kw):
    return conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, seed=0, backend=backend, **kw)


def test_backward_before_forward(backend):
    """backwardpass before any forwardpass is a RuntimeError that says to call forwardpass."""
    layer = _layer(backend)
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="forwardpass"):
        layer.backwardpass(0.1, rng.standard_normal((2, 2, 6, 6)), rng.standard_normal((2, 3, 4, 4)))


def test_backward_with_another_batch_size(backend):
    """activation_prev of another batch size than the last forwardpass: ValueError naming both sizes."""
    layer = _layer(backend)
    rng = np.random.default_rng(0)
    layer.forwardpass(rng.standard_normal((2, 2, 6, 6)))
    w0, b0 = _params(layer)
    with pytest.raises(ValueError, match=r"batch size 3\b.*\b2\b"):
        layer.backwardpass(0.1, rng.standard_normal((3, 2, 6, 6)), rng.standard_normal((3, 3, 4, 4)))
    w1, b1 = _params(layer)
    np.testing.assert_array_equal(w1, w0, err_msg="a refused backwardpass changed the weights")
    np.testing.assert_array_equal(b1, b0, err_msg="a refused backwardpass changed the biases")


@pytest.mark.parametrize("shape", [(2, 3, 4, 3), (2, 2, 4, 4), (2, 3, 16), (1, 3, 4, 4)])
def test_delta_of_wrong_shape(backend, shape):
    """A delta that is not the forward output's shape is a ValueError naming the expected shape."""
    layer = _layer(backend)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 2, 6, 6))
    layer.forwardpass(X)
    w0, _ = _params(layer)
    with pytest.raises(ValueError, match=r"delta.*\(2, 3, 4, 4\)"):
        layer.backwardpass(0.1, X, rng.standard_normal(shape))
    np.testing.assert_array_equal(_params(layer)[0], w0, err_msg="a refused backwardpass changed the weights")


@pytest.mark.parametrize("shape", [(2, 2, 6, 5), (2, 3, 6, 6), (2, 6, 6), (1, 2, 2, 6, 6)])
def test_X_of_wrong_shape(backend, shape):
    """An X that is not (n, depth, rows, cols) is a ValueError showing the expected and given shapes."""
    layer = _layer(backend)
    with pytest.raises(ValueError, match=r"X must have shape \(n, 2, 6, 6\), got " + re_shape(shape)):
        layer.forwardpass(np.random.default_rng(0).standard_normal(shape))


@pytest.mark.parametrize("activation", ["softmax", "Sigmoid", "linear", ""])
def test_unknown_activation(activation):
    """An unknown activation is a ValueError that lists the choices."""
    with pytest.raises(ValueError, match=r"activation must be one of .*sigmoid.*relu.*tanh.*None"):
        conv2d.ConvolutionLayer((1, 4, 4), (2, 2), 1, 1, activation=activation)


@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
def test_integer_X_is_rejected(backend, dtype):
    """Integer (or boolean) X is a TypeError naming the dtype; it is not silently cast."""
    layer = _layer(backend)
    X = np.random.default_rng(0).integers(0, 5, (2, 2, 6, 6)).astype(dtype)
    with pytest.raises(TypeError, match=rf"X has dtype \S*{dtype}"):
        layer.forwardpass(X)


def test_integer_delta_is_rejected(backend):
    """An integer delta is a TypeError naming delta and its dtype."""
    layer = _layer(backend)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 2, 6, 6))
    layer.forwardpass(X)
    with pytest.raises(TypeError, match=r"delta has dtype \S*int64"):
        layer.backwardpass(0.1, X, rng.integers(-3, 3, (2, 3, 4, 4)))


# --------------------------------------------------------------------------------------------
# 7. Inputs are never modified
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_inputs_not_modified(backend, dtype):
    """NumPy X and delta are bitwise unchanged by forwardpass and backwardpass (several steps)."""
    layer = conv2d.ConvolutionLayer((2, 7, 7), (3, 3), 3, 2, padding=1, dtype=dtype, seed=0, backend=backend)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((2, 2, 7, 7)).astype(dtype)
    delta = rng.standard_normal((2, 3, 4, 4)).astype(dtype)
    X_copy, delta_copy = X.copy(), delta.copy()
    for _ in range(2):
        layer.forwardpass(X)
        layer.backwardpass(0.5, X, delta)
    assert X.tobytes() == X_copy.tobytes(), "forwardpass/backwardpass modified X"
    assert delta.tobytes() == delta_copy.tobytes(), "backwardpass modified delta"


def test_read_only_inputs_accepted(backend):
    """Read-only NumPy X and delta are accepted and give the same results as writable ones."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((2, 2, 6, 6))
    delta = rng.standard_normal((2, 3, 4, 4))
    writable = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, seed=0, backend=backend)
    expected_out = backend.to_numpy(writable.forwardpass(X))
    expected_grad_x = backend.to_numpy(writable.backwardpass(0.1, X, delta))

    X_ro, delta_ro = X.copy(), delta.copy()
    X_ro.flags.writeable = False
    delta_ro.flags.writeable = False
    layer = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, seed=0, backend=backend)
    np.testing.assert_array_equal(backend.to_numpy(layer.forwardpass(X_ro)), expected_out)
    np.testing.assert_array_equal(backend.to_numpy(layer.backwardpass(0.1, X_ro, delta_ro)), expected_grad_x)
    np.testing.assert_array_equal(backend.to_numpy(layer.weights), backend.to_numpy(writable.weights))


def test_update_makes_new_arrays(backend):
    """Weights the caller held before a step are not changed by the step (new arrays, not in place)."""
    layer = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, 1, seed=0, backend=backend)
    old_w, old_b = layer.weights, layer.biases
    old_w_np, old_b_np = (np.array(backend.to_numpy(a)) for a in (old_w, old_b))
    rng = np.random.default_rng(1)
    X = rng.standard_normal((2, 2, 6, 6))
    layer.forwardpass(X)
    layer.backwardpass(0.5, X, rng.standard_normal((2, 3, 4, 4)))
    np.testing.assert_array_equal(backend.to_numpy(old_w), old_w_np)
    np.testing.assert_array_equal(backend.to_numpy(old_b), old_b_np)
    assert not np.array_equal(backend.to_numpy(layer.weights), old_w_np)


# --------------------------------------------------------------------------------------------
# 8. Training
# --------------------------------------------------------------------------------------------


def test_training_fits_a_teacher(cpu_backend):
    """SGD on MSE against a fixed teacher convolution lowers the loss by a large factor in 50 steps."""
    from .oracle import torch_conv

    in_channels, filter_size, numfilters, stride = (2, 8, 8), (3, 3), 3, 1
    rng = np.random.default_rng(31)
    teacher_w = rng.normal(0, 0.5, (numfilters, in_channels[0], *filter_size))
    teacher_b = rng.normal(0, 0.5, numfilters)
    X = rng.standard_normal((16, *in_channels))
    target, _, _, _ = torch_conv(X, teacher_w, teacher_b, stride=stride)
    student = conv2d.ConvolutionLayer(
        in_channels, filter_size, numfilters, stride, activation=None, seed=0, backend=cpu_backend
    )
    positions = X.shape[0] * student.out_row * student.out_col

    def step(lr):
        out = cpu_backend.to_numpy(student.forwardpass(X))
        err = out - target
        loss = 0.5 * float(np.sum(err**2)) / positions
        if lr:
            student.backwardpass(lr, X, err / positions)  # dLoss/dout
        return loss

    losses = [step(0.2) for _ in range(50)]  # about 1e-8 of the start after 50 steps: far from both bounds
    final = step(0.0)
    assert np.all(np.diff(losses) < 0), f"loss did not decrease monotonically: {losses}"
    assert final < losses[0] / 1e4, f"loss went from {losses[0]:.3g} to only {final:.3g}"


# --------------------------------------------------------------------------------------------
# The layer owns what it keeps between forwardpass and backwardpass
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 2)])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_changing_x_or_the_output_after_forwardpass_changes_nothing(cpu_backend, activation, kernel, split):
    """`out -= target` (the output becomes the delta) and writing into X after forwardpass used to change
    dE/dX (by up to 0.34): the derivative was read from the returned array, and the kept patches (a 1x1
    kernel's) or X could be views of the caller's X. NumPy X on torch shares its memory, too."""
    if cpu_backend.name == "jax":
        pytest.skip("JAX arrays are immutable: nothing can change them in place")
    from conv2d._workspace import plan_chunks, scratch_bytes

    in_channels, batch = (1, 6, 5), 2  # one channel: the channel-major patches of a 1x1 kernel are X itself
    layer = conv2d.ConvolutionLayer(in_channels, kernel, 3, activation=activation, seed=4, backend=cpu_backend)
    if split:
        layer.max_workspace_bytes = scratch_bytes(layer._geom, 1, layer.out_row, 8)
        assert len(plan_chunks(layer._geom, batch, 8, layer.max_workspace_bytes)) == batch
    rng = np.random.default_rng(32)
    w0, b0 = _params(layer)
    X = rng.standard_normal((batch, *in_channels))
    target = rng.random((batch, 3, layer.out_row, layer.out_col))
    y, *_ = torch_layer(X, w0, b0, np.zeros_like(target), activation)
    _, gx, gw, gb = torch_layer(X, w0, b0, y - target, activation)
    X_here = cpu_backend.asarray(X)
    out = layer.forwardpass(X_here)
    out -= cpu_backend.asarray(target)  # in place, as a seed-style training loop does
    X_here[...] = 7.0
    X[...] = -3.0
    grad_x = layer.backwardpass(0.25, X_here, out)
    assert_close(cpu_backend, grad_x, gx, "float64", "dE/dX")
    w1, b1 = _params(layer)
    assert_close(conv2d.get_backend("numpy"), (w0 - w1) / 0.25, gw, "float64", "weight gradient")
    assert_close(conv2d.get_backend("numpy"), (b0 - b1) / 0.25, gb, "float64", "bias gradient")


def test_dense_layer_owns_what_it_keeps(cpu_backend):
    """DenseLayer likewise: its input and output may be changed in place after forwardpass."""
    if cpu_backend.name == "jax":
        pytest.skip("JAX arrays are immutable: nothing can change them in place")
    import torch

    dense = conv2d.nn.DenseLayer(5, 3, activation="tanh", seed=1, backend=cpu_backend)
    rng = np.random.default_rng(33)
    X, target = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    xt = torch.tensor(X, requires_grad=True)
    wt, bt = (torch.tensor(np.array(cpu_backend.to_numpy(a), dtype=np.float64), requires_grad=True)
              for a in (dense.weights, dense.biases))
    yt = torch.tanh(xt @ wt.T + bt)
    yt.backward(yt.detach() - torch.tensor(target))
    X_here = cpu_backend.asarray(X)
    out = dense.forwardpass(X_here)
    out -= cpu_backend.asarray(target)
    X_here[...] = 5.0
    assert_close(cpu_backend, dense.backwardpass(0.5, X_here, out), xt.grad.numpy(), "float64", "dE/dX")
    assert_close(cpu_backend, dense.weights, (wt - 0.5 * wt.grad).detach().numpy(), "float64", "weights")


# --------------------------------------------------------------------------------------------
# Replaced weights and biases are checked where they are used
# --------------------------------------------------------------------------------------------

def _conv_layer(backend="numpy"):
    return conv2d.ConvolutionLayer((3, 8, 8), (3, 3), 4, seed=0, backend=backend)


def _dense_layer():
    return conv2d.nn.DenseLayer(6, 3, seed=0)


@pytest.mark.parametrize(
    ("make", "attr", "value", "error", "pattern"),
    [
        # The same size as the expected (4, 3, 3, 3): used to be reinterpreted silently.
        (_conv_layer, "weights", np.ones((12, 3, 3, 1)), ValueError,
         r"ConvolutionLayer\.weights must have shape \(4, 3, 3, 3\), got \(12, 3, 3, 1\)"),
        (_conv_layer, "weights", np.ones((4, 3, 5, 5)), ValueError,
         r"ConvolutionLayer\.weights must have shape \(4, 3, 3, 3\), got \(4, 3, 5, 5\)"),
        (_conv_layer, "biases", np.ones((4, 1)), ValueError, r"ConvolutionLayer\.biases must have shape \(4,\), got \(4, 1\)"),
        (_conv_layer, "weights", np.ones((4, 3, 3, 3), dtype=np.float32), TypeError,
         r"ConvolutionLayer\.weights has dtype float32 but the layer computes in float64"),
        (_conv_layer, "weights", np.ones((4, 3, 3, 3)).tolist(), TypeError,
         r"ConvolutionLayer\.weights must be a numpy array of shape \(4, 3, 3, 3\) and dtype float64, got builtins\.list"),
        (_conv_layer, "biases", "torch", TypeError,
         r"ConvolutionLayer\.biases is a torch array but the layer lives on backend 'numpy'"),
        (_dense_layer, "weights", np.ones((6, 3)), ValueError, r"DenseLayer\.weights must have shape \(3, 6\), got \(6, 3\)"),
        (_dense_layer, "biases", np.ones(3, dtype=np.float32), TypeError, r"DenseLayer\.biases has dtype float32"),
    ],
)
@pytest.mark.parametrize("when", ["before forwardpass", "before backwardpass"])
def test_replaced_parameters_are_checked(make, attr, value, error, pattern, when):
    import torch

    layer = make()
    if isinstance(value, str):
        value = torch.ones(4, dtype=torch.float64)
    X = np.random.default_rng(0).standard_normal((2, 3, 8, 8) if make is _conv_layer else (2, 6))
    if when == "before backwardpass":
        delta = np.ones(tuple(layer.forwardpass(X).shape))
    setattr(layer, attr, value)
    with pytest.raises(error, match=pattern):
        if when == "before forwardpass":
            layer.forwardpass(X)
        else:
            layer.backwardpass(0.1, X, delta)


def test_a_parameter_on_another_device_is_named():
    require_or_skip("array_api_strict")
    layer = _conv_layer("array_api_strict")
    layer.weights = conv2d.get_backend("array_api_strict:device1").asarray(np.ones((4, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"ConvolutionLayer\.weights is on device 'array_api_strict:device1' but the "
                                         r"layer lives on 'array_api_strict'; move it there"):
        layer.forwardpass(np.ones((1, 3, 8, 8)))


# --------------------------------------------------------------------------------------------
# The first argument's name: input_shape, formerly in_channels
# --------------------------------------------------------------------------------------------


def _same_layer(a: conv2d.ConvolutionLayer, b: conv2d.ConvolutionLayer) -> None:
    assert a.architecture() == b.architecture()
    for key, value in a.state_dict().items():
        assert np.array_equal(value, b.state_dict()[key]), key


def test_input_shape_is_the_first_arguments_name():
    """The first argument is the input's shape (depth, rows, cols), named so, by keyword or position."""
    by_name = conv2d.ConvolutionLayer(input_shape=(3, 8, 8), filter_size=(3, 3), numfilters=4, seed=0)
    _same_layer(by_name, conv2d.ConvolutionLayer((3, 8, 8), (3, 3), 4, seed=0))
    assert (by_name.in_depth, by_name.in_row, by_name.in_col) == (3, 8, 8)
    with pytest.raises(ValueError, match=r"input_shape must be \(depth, rows, cols\)"):
        conv2d.ConvolutionLayer(input_shape=3, filter_size=(3, 3), numfilters=4)


def test_in_channels_keyword_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"in_channels=\.\.\.\) is deprecated.*input_shape") as caught:
        old = conv2d.ConvolutionLayer(in_channels=(3, 8, 8), filter_size=(3, 3), numfilters=4, seed=0)
    assert caught[0].filename == __file__  # it points at the caller's line
    _same_layer(old, conv2d.ConvolutionLayer((3, 8, 8), (3, 3), 4, seed=0))
    # A bad value is named as the caller wrote it.
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"^in_channels must be"):
        conv2d.ConvolutionLayer(in_channels=(3, 8), filter_size=(3, 3), numfilters=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (3, 8, 8), "in_channels": (3, 8, 8), "filter_size": (3, 3), "numfilters": 4},
         r"both input_shape and in_channels, its former name; give input_shape only"),
        ({"filter_size": (3, 3), "numfilters": 4}, r"missing required argument: 'input_shape'$"),
        ({"input_shape": (3, 8, 8)}, r"missing required arguments: 'filter_size', 'numfilters'$"),
    ],
)
def test_the_leading_arguments_are_still_required(kwargs, message):
    with pytest.raises(TypeError, match=message):
        conv2d.ConvolutionLayer(**kwargs)


def test_saved_layers_load_without_a_warning(tmp_path):
    """Saved folders name the argument "in_channels" (the file format, unchanged): they load with no
    DeprecationWarning (pytest turns warnings into errors), as do new saves."""
    import json

    layer = conv2d.ConvolutionLayer((2, 6, 6), (3, 3), 3, padding=1, seed=0)
    net = conv2d.nn.Sequential([layer, conv2d.nn.FlattenLayer()])
    folder = conv2d.nn.save(net, tmp_path / "net")
    saved = json.loads((folder / "architecture.json").read_text())["network"]["layers"][0]
    assert saved["in_channels"] == [2, 6, 6] and "input_shape" not in saved  # readable by earlier versions
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = conv2d.nn.load(folder)
    _same_layer(loaded.layers[0], layer)
