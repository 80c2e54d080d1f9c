"""NaN and infinities go through the activations and the pooling layers as they go through PyTorch's,
forward and backward: a diverged run must show NaN, never a finite loss.

Oracle: torch.relu / sigmoid / tanh, F.max_pool2d / F.avg_pool2d and autograd (float64).
"""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d import nn
from conv2d.nn._convolution import ACTIVATIONS

from .conftest import require_or_skip

torch = require_or_skip("torch")
F = torch.nn.functional

NAN, INF = float("nan"), float("inf")
# Every special value beside ordinary ones, on both sides of zero.
SPECIAL = np.array([NAN, INF, -INF, 0.0, -0.0, -2.5, -1e-300, 1e-300, 3.0, NAN, -7.0, 0.5])
TORCH_ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh, None: lambda t: t * 1}


def _assert_same(backend, actual, expected, what):
    """Equal where finite (to float64 rounding; 1 - a * a cancels near 1), and NaN / +-inf exactly where PyTorch has them."""
    actual = np.asarray(backend.to_numpy(actual), dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN positions")
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=what)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activation_with_nan_and_infinities_against_torch(backend, activation):
    """Each activation and its backward (delta * derivative) equal torch's forward and autograd on NaN, +-inf, +-0."""
    forward, derivative = ACTIVATIONS[activation]
    xp = backend.xp
    z = backend.asarray(SPECIAL)
    out = forward(xp, z)
    delta = np.linspace(-1.5, 2.0, SPECIAL.size)  # finite, none zero
    grad = backend.asarray(delta) * derivative(xp, out)
    zt = torch.tensor(SPECIAL, requires_grad=True)
    yt = TORCH_ACTIVATIONS[activation](zt)
    yt.backward(torch.tensor(delta))
    _assert_same(backend, out, yt.detach().numpy(), f"{activation} forward")
    _assert_same(backend, grad, zt.grad.numpy(), f"{activation} backward")


def test_relu_keeps_nan_in_layers(backend):
    """All-NaN inputs give NaN outputs and a NaN loss through relu conv and dense layers (it was a finite 2.30)."""
    net = nn.Sequential([
        conv2d.ConvolutionLayer((1, 4, 4), (3, 3), 2, padding=1, activation="relu", seed=0, backend=backend),
        nn.FlattenLayer(), nn.DenseLayer(32, 10, activation="relu", seed=1, backend=backend),
    ])
    X = np.full((2, 1, 4, 4), NAN)
    loss, _ = nn.softmax_cross_entropy(net.forwardpass(X), np.array([0, 1]))
    assert np.isnan(float(loss))


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_with_nan_and_infinities_against_torch(backend, kind):
    """Pooling windows holding NaN, +-inf or ties: forward and dE/dX equal F.max_pool2d / F.avg_pool2d + autograd."""
    layer_class, torch_pool = {"max": (nn.MaxPoolLayer, F.max_pool2d), "avg": (nn.AvgPoolLayer, F.avg_pool2d)}[kind]
    rng = np.random.default_rng(3)
    X = rng.standard_normal((2, 3, 6, 6))
    X.flat[rng.choice(X.size, 30, replace=False)] = rng.choice([NAN, INF, -INF], 30)
    X[0, 0, :2, :2] = NAN  # a window of NaN alone
    X[0, 1, :2, :2] = [[1.0, NAN], [2.0, NAN]]  # two NaN and numbers: PyTorch's gradient goes to the last NaN
    X[1, 2, :3, :3] = -INF  # overlapping windows of -inf alone
    layer = layer_class((3, 6, 6), 3, 2, backend=backend)
    xt = torch.tensor(X, requires_grad=True)
    yt = torch_pool(xt, 3, 2)
    delta = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(delta))
    with np.errstate(invalid="ignore"):  # NumPy warns of inf - inf in a mean: the NaN is the point here
        out = layer.forwardpass(backend.asarray(X))
        grad_x = layer.backwardpass(0.1, X, backend.asarray(delta))
    _assert_same(backend, out, yt.detach().numpy(), f"{kind} pool forward")
    _assert_same(backend, grad_x, xt.grad.numpy(), f"{kind} pool dE/dX")
