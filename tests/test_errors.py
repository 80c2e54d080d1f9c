"""Every bad argument fails early with a message that names the argument, the bad value and what is
expected; inputs are never modified; memory layout does not change results.

The tables are (description, call, exception type, regex that must match the message).
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Callable

import numpy as np
import pytest

import conv2d

from .conftest import require_or_skip

rng = np.random.default_rng(20240607)
X = rng.standard_normal((2, 3, 8, 8))  # N, C, H, W
W = rng.standard_normal((4, 3, 3, 3))  # O, C, kH, kW
B = rng.standard_normal(4)
G = rng.standard_normal((2, 4, 6, 6))  # grad_out for conv2d(X, W)
X32, W32, B32, G32 = (a.astype(np.float32) for a in (X, W, B, G))

conv = conv2d.conv2d
backward = conv2d.conv2d_backward
Layer = conv2d.ConvolutionLayer


def _torch():
    return require_or_skip("torch")


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _matrix(array):
    with warnings.catch_warnings():  # NumPy discourages np.matrix; that is the point of the case
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(array)


def _strict(device: str | None = None):
    require_or_skip("array_api_strict")
    return conv2d.get_backend("array_api_strict" if device is None else f"array_api_strict:{device}")


# ---------------------------------------------------------------------------------------------
# Keyword arguments shared by conv2d, conv2d_backward and (except groups) ConvolutionLayer:
# (description, kwargs, exception, regex)
# ---------------------------------------------------------------------------------------------

GEOMETRY_CASES = [
    # groups
    ("groups not dividing channels", dict(groups=2), ValueError, r"groups=2 must divide .*x has 3.*weight has 4"),
    ("groups 0", dict(groups=0), ValueError, r"groups must be a positive int, got 0\b"),
    ("groups negative", dict(groups=-3), ValueError, r"groups must be a positive int, got -3\b"),
    # A non-int is "an argument of the wrong type": TypeError, as for stride, dilation and padding.
    ("groups float", dict(groups=1.5), TypeError, r"groups must be a positive int, got 1\.5"),
    ("groups float 1.0", dict(groups=1.0), TypeError, r"groups must be a positive int, got 1\.0"),
    ("groups bool", dict(groups=True), TypeError, r"groups must be a positive int, got True"),
    ("groups string", dict(groups="1"), TypeError, r"groups must be a positive int, got '1'"),
    # stride
    ("stride 0", dict(stride=0), ValueError, r"stride must be positive .*got 0\b"),
    ("stride negative", dict(stride=-1), ValueError, r"stride must be positive .*got -1\b"),
    ("stride pair with 0", dict(stride=(1, 0)), ValueError, r"stride must be positive .*got \(1, 0\)"),
    ("stride length 3", dict(stride=(1, 2, 3)), TypeError, r"stride must be a positive int or a pair .*got \(1, 2, 3\)"),
    ("stride length 1", dict(stride=(1,)), TypeError, r"stride must be a positive int or a pair .*got \(1,\)"),
    ("stride float", dict(stride=2.0), TypeError, r"stride must be a positive int or a pair .*got 2\.0"),
    ("stride bool", dict(stride=True), TypeError, r"stride must be a positive int or a pair .*got True"),
    ("stride bool in pair", dict(stride=(1, True)), TypeError, r"stride must be .*got \(1, True\)"),
    ("stride string", dict(stride="2"), TypeError, r"stride must be a positive int or a pair .*got '2'"),
    ("stride None", dict(stride=None), TypeError, r"stride must be a positive int or a pair .*got None"),
    # dilation
    ("dilation 0", dict(dilation=0), ValueError, r"dilation must be positive .*got 0\b"),
    ("dilation pair with negative", dict(dilation=(1, -2)), ValueError, r"dilation must be positive .*got \(1, -2\)"),
    ("dilation float", dict(dilation=1.5), TypeError, r"dilation must be a positive int or a pair .*got 1\.5"),
    # padding
    ("padding negative", dict(padding=-1), ValueError, r"padding must be non-negative .*got -1\b"),
    ("padding pair with negative", dict(padding=(0, -2)), ValueError, r"padding must be non-negative .*got \(0, -2\)"),
    ("padding length 3", dict(padding=(1, 2, 3)), TypeError, r"padding must be a non-negative int or a pair .*got \(1, 2, 3\)"),
    ("padding length 4", dict(padding=(1, 1, 1, 1)), TypeError, r"padding must be .*pair .*got \(1, 1, 1, 1\)"),
    ("padding float", dict(padding=1.5), TypeError, r"padding must be a non-negative int or a pair .*got 1\.5"),
    ("padding unknown string", dict(padding="full"), ValueError, r"padding must be an int, a pair of ints, 'valid' or 'same', got 'full'"),
    ("padding string case", dict(padding="SAME"), ValueError, r"padding must be .*'valid' or 'same', got 'SAME'"),
    ("padding same with stride 2", dict(padding="same", stride=2), ValueError, r"padding='same' needs stride=1, got stride=\(2, 2\)"),
    ("padding same with stride (1, 2)", dict(padding="same", stride=(1, 2)), ValueError, r"padding='same' needs stride=1, got stride=\(1, 2\)"),
    # the kernel against the padded input (8x8 input, 3x3 kernel)
    ("dilated kernel larger than input", dict(dilation=4), ValueError,
     r"kernel spans 9x9 \(kernel 3x3, dilation \(4, 4\)\) but the padded input is only 8x8 \(x is 8x8, padding 0\)"),
    ("dilated kernel larger than padded input", dict(dilation=(5, 1), padding=1), ValueError,
     r"kernel spans 11x3 .*padded input is only 10x10 \(x is 8x8, padding 1\)"),
    # algorithm: a name is a ValueError listing the names; anything but a string is the wrong type
    ("algorithm unknown", dict(algorithm="fast"), ValueError, r"algorithm must be 'auto' or one of 'gather', 'slices', 'kernels', 'native', 'direct', 'winograd', 'pointwise', got 'fast'"),
    ("algorithm case", dict(algorithm="Gather"), ValueError, r"algorithm must be .*'gather', 'slices', 'kernels', 'native', 'direct', 'winograd', 'pointwise', got 'Gather'"),
    ("algorithm empty string", dict(algorithm=""), ValueError, r"algorithm must be .*'gather', 'slices', 'kernels', 'native', 'direct', 'winograd', 'pointwise', got ''"),
    ("algorithm None", dict(algorithm=None), TypeError, r"algorithm must be .*'gather', 'slices', 'kernels', 'native', 'direct', 'winograd', 'pointwise', got None"),
    ("algorithm int", dict(algorithm=1), TypeError, r"algorithm must be .*'gather', 'slices', 'kernels', 'native', 'direct', 'winograd', 'pointwise', got 1\b"),
    ("algorithm list", dict(algorithm=["gather"]), TypeError, r"algorithm must be .*'gather', 'slices', 'kernels', 'native', 'direct', 'winograd', 'pointwise', got \['gather'\]"),
]

_NO_GROUPS = [c for c in GEOMETRY_CASES if "groups" not in c[1]]


def _geometry_table():
    table = []
    for desc, kwargs, exc, pattern in GEOMETRY_CASES:
        table.append((f"conv2d: {desc}", lambda kw=kwargs: conv(X, W, B, **kw), exc, pattern))
        table.append((f"conv2d_backward: {desc}", lambda kw=kwargs: backward(G, X, W, **kw), exc, pattern))
    for desc, kwargs, exc, pattern in _NO_GROUPS:
        kwargs = dict(kwargs)
        stride = kwargs.pop("stride", 1)  # the layer's fourth positional argument
        table.append(
            (f"ConvolutionLayer: {desc}", lambda s=stride, kw=kwargs: Layer((3, 8, 8), (3, 3), 4, s, **kw), exc, pattern)
        )
    return table


# ---------------------------------------------------------------------------------------------
# Array arguments
# ---------------------------------------------------------------------------------------------

ARRAY_CASES: list[tuple[str, Callable, type, str]] = [
    # shapes
    ("conv2d: x 3-D", lambda: conv(X[0], W), ValueError, r"x must be 4-D \(N, C, H, W\), got shape \(3, 8, 8\) with 3 dimensions"),
    ("conv2d: x 5-D", lambda: conv(X[None], W), ValueError, r"x must be 4-D .*got shape \(1, 2, 3, 8, 8\)"),
    ("conv2d: weight 3-D", lambda: conv(X, W[0]), ValueError, r"weight must be 4-D .*got shape \(3, 3, 3\)"),
    ("conv2d: weight 2-D", lambda: conv(X, W[0, 0]), ValueError, r"weight must be 4-D .*got shape \(3, 3\)"),
    ("conv2d: channel mismatch", lambda: conv(X, W[:, :2]), ValueError,
     r"weight shape \(4, 2, 3, 3\) expects 2 input channels .*but x has 3"),
    ("conv2d: channel mismatch with groups", lambda: conv(X, W, groups=3), ValueError,
     r"weight shape \(4, 3, 3, 3\) expects 9 input channels .*groups=3.*x has 3|groups=3 must divide .*weight has 4"),
    ("conv2d: empty weight", lambda: conv(X, W[:0]), ValueError, r"weight must have no empty dimension, got shape \(0, 3, 3, 3\)"),
    ("conv2d: kernel larger than input", lambda: conv(X, np.zeros((4, 3, 9, 9))), ValueError,
     r"kernel spans 9x9 \(kernel 9x9, .*padded input is only 8x8 \(x is 8x8, padding 0\)"),
    ("conv2d: kernel larger than padded input", lambda: conv(X, np.zeros((4, 3, 11, 3)), padding=1), ValueError,
     r"kernel spans 11x3 .*padded input is only 10x10 .*padding 1"),
    ("conv2d: kernel wider than 'valid' input", lambda: conv(X, np.zeros((4, 3, 3, 9)), padding="valid"), ValueError,
     r"kernel spans 3x9 .*padded input is only 8x8 .*padding 'valid'"),
    ("conv2d: bias of 3", lambda: conv(X, W, B[:3]), ValueError, r"bias must have shape \(4,\) .*got \(3,\)"),
    ("conv2d: bias 2-D", lambda: conv(X, W, B[None]), ValueError, r"bias must have shape \(4,\) .*got \(1, 4\)"),
    ("conv2d: bias 0-D", lambda: conv(X, W, np.ones(())), ValueError, r"bias must have shape \(4,\) .*got \(\)"),
    # dtypes
    ("conv2d: int64 x", lambda: conv(X.astype(np.int64), W), TypeError, r"x has dtype int64; conv2d needs a floating dtype"),
    ("conv2d: int32 weight", lambda: conv(X, W.astype(np.int32)), TypeError, r"weight has dtype int32; conv2d needs a floating dtype"),
    ("conv2d: bool x", lambda: conv(X > 0, W), TypeError, r"x has dtype bool; conv2d needs a floating dtype"),
    ("conv2d: complex x, real weight", lambda: conv(X.astype(np.complex128), W), TypeError, r"x has dtype complex128 but weight has float64; .*cast weight .*weight\.astype\(x\.dtype\)"),
    ("conv2d: complex bias", lambda: conv(X32, W32, B.astype(np.complex64)), TypeError, r"bias is complex and x is not; cast bias"),
    ("conv2d: float32 x, float64 weight", lambda: conv(X32, W), TypeError, r"x has dtype float32 but weight has float64"),
    ("conv2d: float64 x, float32 weight", lambda: conv(X, W32), TypeError, r"x has dtype float64 but weight has float32"),
    ("conv2d: float32 bias", lambda: conv(X, W, B32), TypeError, r"x has dtype float64 but bias has float32"),
    # libraries
    ("conv2d: numpy x, torch weight", lambda: conv(X, _torch().from_numpy(W)), TypeError, r"x is a numpy array but weight is a torch array"),
    ("conv2d: torch x, numpy weight", lambda: conv(_torch().from_numpy(X), W), TypeError, r"x is a torch array but weight is a numpy array"),
    ("conv2d: numpy x and weight, torch bias", lambda: conv(X, W, _torch().from_numpy(B)), TypeError, r"x is a numpy array but bias is a torch array"),
    ("conv2d: numpy x, array_api_strict weight", lambda: conv(X, _strict().asarray(W)), TypeError,
     r"x is a numpy array but weight is a array_api_strict array"),
    ("conv2d: list x", lambda: conv(X.tolist(), W), TypeError, r"x must be an array of one of numpy, .*got builtins\.list"),
    ("conv2d: list weight", lambda: conv(X, W.tolist()), TypeError, r"weight must be an array of one of numpy, .*got builtins\.list"),
    ("conv2d: float bias", lambda: conv(X, W, 0.5), TypeError, r"bias must be an array of one of numpy, .*got builtins\.float"),
    ("conv2d: None x", lambda: conv(None, W), TypeError, r"x must be an array of one of numpy, .*got builtins\.NoneType"),
    # NumPy subclasses whose arithmetic is not ndarray's (a mask would be dropped or misapplied)
    ("conv2d: masked x", lambda: conv(np.ma.masked_less(X, 0), W), TypeError,
     r"x is a numpy\.ma\.MaskedArray, a NumPy array subclass .*x\.filled\(value\)"),
    ("conv2d: masked bias", lambda: conv(X, W, np.ma.masked_array(B)), TypeError, r"bias is a numpy\.ma\.MaskedArray"),
    ("conv2d_backward: masked grad_out", lambda: backward(np.ma.masked_array(G), X, W), TypeError,
     r"grad_out is a numpy\.ma\.MaskedArray"),
    ("Backend.asarray: masked array", lambda: conv2d.get_backend("numpy").asarray(np.ma.masked_array(X)), TypeError,
     r"obj is a numpy\.ma\.MaskedArray"),
    ("nn.softmax_cross_entropy: np.matrix logits", lambda: conv2d.nn.softmax_cross_entropy(_matrix(G[:, :, 0, 0]), [0, 1]),
     TypeError, r"logits is a numpy\.matrix.*np\.asarray\(logits\)"),
    ("nn.softmax_cross_entropy: masked logits", lambda: conv2d.nn.softmax_cross_entropy(np.ma.masked_array(G[:, :, 0, 0]), [0, 1]),
     TypeError, r"logits is a numpy\.ma\.MaskedArray"),
    # devices
    ("conv2d: two array_api_strict devices", lambda: conv(_strict().asarray(X), _strict("device1").asarray(W)), ValueError,
     r"x is on device 'array_api_strict' but weight is on 'array_api_strict:device1'"),
    # conv2d_backward
    ("conv2d_backward: grad_out of the wrong spatial shape", lambda: backward(G[:, :, :5, :5], X, W), ValueError,
     r"grad_out must have the forward output's shape \(2, 4, 6, 6\) .*got \(2, 4, 5, 5\)"),
    ("conv2d_backward: grad_out of the wrong batch", lambda: backward(G[:1], X, W), ValueError,
     r"grad_out must have the forward output's shape \(2, 4, 6, 6\) .*got \(1, 4, 6, 6\)"),
    ("conv2d_backward: grad_out 3-D", lambda: backward(G[0], X, W), ValueError,
     r"grad_out must have the forward output's shape \(2, 4, 6, 6\) .*got \(4, 6, 6\)"),
    ("conv2d_backward: grad_out for other arguments", lambda: backward(G, X, W, padding=1), ValueError,
     r"grad_out must have the forward output's shape \(2, 4, 8, 8\) .*got \(2, 4, 6, 6\)"),
    ("conv2d_backward: x 3-D", lambda: backward(G, X[0], W), ValueError, r"x must be 4-D .*got shape \(3, 8, 8\)"),
    ("conv2d_backward: weight 3-D", lambda: backward(G, X, W[0]), ValueError, r"weight must be 4-D .*got shape \(3, 3, 3\)"),
    ("conv2d_backward: channel mismatch", lambda: backward(G, X, W[:, :2]), ValueError,
     r"weight shape \(4, 2, 3, 3\) expects 2 input channels .*but x has 3"),
    ("conv2d_backward: kernel larger than input", lambda: backward(G, X, np.zeros((4, 3, 9, 9))), ValueError, r"kernel spans 9x9"),
    ("conv2d_backward: int grad_out", lambda: backward(G.astype(np.int64), X, W), TypeError, r"grad_out has dtype int64; .*floating dtype"),
    ("conv2d_backward: bool x", lambda: backward(G, X > 0, W), TypeError, r"x has dtype bool; .*floating dtype"),
    ("conv2d_backward: complex weight", lambda: backward(G, X, W.astype(np.complex128)), TypeError, r"but weight has complex128; .*weight is complex and grad_out is not; cast weight"),
    ("conv2d_backward: float32 grad_out", lambda: backward(G32, X, W), TypeError, r"grad_out has dtype float32 but x has float64"),
    ("conv2d_backward: float32 weight", lambda: backward(G, X, W32), TypeError, r"grad_out has dtype float64 but weight has float32"),
    ("conv2d_backward: torch grad_out", lambda: backward(_torch().from_numpy(G), X, W), TypeError,
     r"grad_out is a torch array but x is a numpy array"),
    ("conv2d_backward: torch weight", lambda: backward(G, X, _torch().from_numpy(W)), TypeError,
     r"grad_out is a numpy array but weight is a torch array"),
    ("conv2d_backward: list grad_out", lambda: backward(G.tolist(), X, W), TypeError, r"grad_out must be an array of one of .*builtins\.list"),
    ("conv2d_backward: list x", lambda: backward(G, X.tolist(), W), TypeError, r"x must be an array of one of .*builtins\.list"),
]

# ConvolutionLayer(input_shape, filter_size, numfilters, stride=1, *, padding, dilation, activation, dtype, seed, backend)
LAYER_CASES: list[tuple[str, Callable, type, str]] = [
    ("input_shape of length 2", lambda: Layer((3, 8), (3, 3), 4), ValueError, r"input_shape must be \(depth, rows, cols\).*got \(3, 8\)"),
    ("input_shape an int", lambda: Layer(3, (3, 3), 4), ValueError, r"input_shape must be \(depth, rows, cols\).*got 3\b"),
    ("filter_size of length 3", lambda: Layer((3, 8, 8), (3, 3, 3), 4), ValueError, r"filter_size must be \(rows, cols\).*got \(3, 3, 3\)"),
    ("filter_size an int", lambda: Layer((3, 8, 8), 3, 4), ValueError, r"filter_size must be \(rows, cols\).*got 3\b"),
    ("filter larger than the input", lambda: Layer((3, 8, 8), (9, 3), 4), ValueError, r"kernel spans 9x3 .*only 8x8"),
    ("activation unknown", lambda: Layer((3, 8, 8), (3, 3), 4, activation="softmax"), ValueError,
     r"activation must be one of \['sigmoid', 'relu', 'tanh', None\], got 'softmax'"),
    ("dtype integer", lambda: Layer((3, 8, 8), (3, 3), 4, dtype="int32"), TypeError,
     r"dtype must be 'float16', 'float32' or 'float64', got 'int32'"),
    ("backend unknown", lambda: Layer((3, 8, 8), (3, 3), 4, backend="nope"), ValueError, r"unknown conv2d backend 'nope'"),
    ("backend not a string", lambda: Layer((3, 8, 8), (3, 3), 4, backend=3), TypeError, r"backend spec .*must be a string.*got int 3"),
    # The layer's own arguments, named as the caller wrote them (not as the weight shape built from them).
    ("numfilters 0", lambda: Layer((3, 8, 8), (3, 3), 0), ValueError, r"numfilters.*\b0\b"),
    ("numfilters negative", lambda: Layer((3, 8, 8), (3, 3), -2), ValueError, r"numfilters.*-2"),
    ("numfilters float", lambda: Layer((3, 8, 8), (3, 3), 1.5), TypeError, r"numfilters.*1\.5"),
    ("numfilters bool", lambda: Layer((3, 8, 8), (3, 3), True), TypeError, r"numfilters.*True"),
    ("filter_size with 0", lambda: Layer((3, 8, 8), (0, 3), 4), ValueError, r"filter_size.*\(0, 3\)"),
    ("filter_size with a float", lambda: Layer((3, 8, 8), (3.0, 3), 4), TypeError, r"filter_size.*\(3\.0, 3\)"),
    ("input_shape with 0 depth", lambda: Layer((0, 8, 8), (3, 3), 4), ValueError, r"input_shape.*\(0, 8, 8\)"),
    ("input_shape with negative rows", lambda: Layer((3, -8, 8), (3, 3), 4), ValueError, r"input_shape.*\(3, -8, 8\)"),
    ("input_shape with a float", lambda: Layer((3, 8.0, 8), (3, 3), 4), TypeError, r"input_shape.*\(3, 8\.0, 8\)"),
    ("input_shape a string", lambda: Layer("abc", (3, 3), 4), TypeError, r"input_shape.*'abc'"),
]


def _layer_after_forward():
    layer = Layer((3, 8, 8), (3, 3), 4, seed=0)
    layer.forwardpass(X)
    return layer


LAYER_METHOD_CASES: list[tuple[str, Callable, type, str]] = [
    ("forwardpass: wrong channels", lambda: Layer((3, 8, 8), (3, 3), 4).forwardpass(X[:, :2]), ValueError,
     r"X must have shape \(n, 3, 8, 8\), got \(2, 2, 8, 8\)"),
    ("forwardpass: 3-D", lambda: Layer((3, 8, 8), (3, 3), 4).forwardpass(X[0]), ValueError, r"X must have shape \(n, 3, 8, 8\), got \(3, 8, 8\)"),
    ("forwardpass: int X", lambda: Layer((3, 8, 8), (3, 3), 4).forwardpass(X.astype(np.int64)), TypeError, r"X has dtype int64"),
    ("forwardpass: masked X", lambda: Layer((3, 8, 8), (3, 3), 4).forwardpass(np.ma.masked_less(X, 0)), TypeError,
     r"X is a numpy\.ma\.MaskedArray, a NumPy array subclass"),
    ("backwardpass before forwardpass", lambda: Layer((3, 8, 8), (3, 3), 4).backwardpass(0.1, X, G), RuntimeError,
     r"backwardpass needs a forwardpass first"),
    ("backwardpass: delta of the wrong shape", lambda: _layer_after_forward().backwardpass(0.1, X, G[:, :, :5]), ValueError,
     r"delta must have the forward output's shape \(2, 4, 6, 6\) .*got \(2, 4, 5, 6\)"),
    ("backwardpass: activation_prev of another batch", lambda: _layer_after_forward().backwardpass(0.1, X[:1], G), ValueError,
     r"activation_prev has batch size 1 but the last forwardpass had 2"),
    ("backwardpass: lr a string", lambda: _layer_after_forward().backwardpass("0.1", X, G), TypeError,
     r"lr must be a real number such as 0\.1, got str '0\.1'"),
    ("backwardpass: lr True", lambda: _layer_after_forward().backwardpass(True, X, G), TypeError, r"lr must be a real number .*got bool True"),
    ("backwardpass: lr NaN", lambda: _layer_after_forward().backwardpass(float("nan"), X, G), ValueError,
     r"lr must be finite and non-negative, got nan"),
    ("backwardpass: lr infinite", lambda: _layer_after_forward().backwardpass(np.float32("inf"), X, G), ValueError,
     r"lr must be finite and non-negative, got .*inf"),
    ("backwardpass: lr negative", lambda: _layer_after_forward().backwardpass(-0.1, X, G), ValueError,
     r"lr must be finite and non-negative, got -0\.1"),
    ("backwardpass: lr an array", lambda: _layer_after_forward().backwardpass(np.array([0.1]), X, G), TypeError,
     r"lr must be a real number .*got ndarray"),
    ("backwardpass: activation_prev an int", lambda: _layer_after_forward().backwardpass(0.1, 2, G), TypeError,
     r"activation_prev must be the input of the last forwardpass .*got int 2"),
    ("backwardpass: int delta", lambda: _layer_after_forward().backwardpass(0.1, X, G.astype(np.int64)), TypeError, r"delta has dtype int64"),
]

TABLE = [
    *_geometry_table(),
    *ARRAY_CASES,
    *[(f"ConvolutionLayer: {d}", *rest) for d, *rest in LAYER_CASES],
    *[(f"ConvolutionLayer.{d}", *rest) for d, *rest in LAYER_METHOD_CASES],
]


@pytest.mark.parametrize(("description", "call", "error", "pattern"), TABLE, ids=[row[0] for row in TABLE])
def test_bad_argument_message(description, call, error, pattern):
    with pytest.raises(Exception) as info:
        call()
    message = str(info.value)
    assert type(info.value) is error, f"{description}: {type(info.value).__name__} instead of {error.__name__}: {message}"
    assert re.search(pattern, message), f"{description}: message {message!r} does not match {pattern!r}"


@pytest.mark.parametrize("layer_kind", ["conv", "dense", "sequential"])
def test_a_refused_lr_changes_no_weight(layer_kind):
    """NaN used to turn every weight into NaN; a refused rate must leave the layer as it was."""
    if layer_kind == "conv":
        layer, x, delta = Layer((3, 8, 8), (3, 3), 4, seed=0), X, G
    else:
        dense = conv2d.nn.DenseLayer(8, 3, seed=0)
        layer = dense if layer_kind == "dense" else conv2d.nn.Sequential([conv2d.nn.FlattenLayer(), dense])
        x, delta = X[:, 0, 0, :], rng.standard_normal((2, 3))
    layer.forwardpass(x)
    weights = [np.array(w) for w in _weights(layer)]
    for lr in (float("nan"), -1.0, "0.1", True):
        with pytest.raises((TypeError, ValueError), match="lr must be"):
            layer.backwardpass(lr, x, delta)
    for before, after in zip(weights, _weights(layer), strict=True):
        np.testing.assert_array_equal(after, before)


def _weights(layer):
    found = [layer] if hasattr(layer, "weights") else [sub for sub in layer.layers if hasattr(sub, "weights")]
    return [array for sub in found for array in (sub.weights, sub.biases)]


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax", "array_api_strict"])
def test_numpy_scalars_lists_and_any_case_are_accepted(backend_name):
    """What stride already accepted (NumPy integers) the other arguments accept too, with the same result."""
    backend = conv2d.get_backend(backend_name)
    for spec in (backend.spec.upper(), backend.spec.title()):
        assert conv2d.get_backend(spec) is backend, spec
    dtype = "float32"
    reference = Layer((3, 8, 8), (3, 3), 4, seed=3, backend=backend, dtype=dtype)
    layer = Layer((3, 8, 8), (3, 3), 4, seed=3, backend=backend, dtype=dtype,
                  max_workspace_bytes=np.int64(2**20), deterministic=np.True_)
    expected = [reference.forwardpass(X), reference.backwardpass(0.1, X, G)]
    got = [layer.forwardpass(X), layer.backwardpass(np.float32(0.1), X.tolist(), G)]  # activation_prev as a list
    for name, a, b in zip(("forward", "backward"), got, expected):
        np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(b), rtol=1e-6, atol=1e-6, err_msg=name)
    assert layer.weights.dtype == reference.weights.dtype  # a NumPy float32 lr promotes nothing
    np.testing.assert_allclose(backend.to_numpy(layer.weights), backend.to_numpy(reference.weights), rtol=1e-6, atol=1e-7)
    x, w = backend.asarray(X, dtype=dtype), backend.asarray(W, dtype=dtype)
    np.testing.assert_array_equal(
        backend.to_numpy(conv(x, w, max_workspace_bytes=np.int64(10**6), deterministic=np.False_)),
        backend.to_numpy(conv(x, w)))


def test_float64_on_jax_without_64_bit_types_names_the_switch():
    """The message said only that float64 was not available, not how to turn it on."""
    jax = require_or_skip("jax")
    backend = conv2d.get_backend("jax")
    was = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(TypeError, match=r"dtype 'float64' is not available on backend 'jax.*JAX_ENABLE_X64=1.*float32"):
            Layer((1, 4, 4), (3, 3), 2, backend=backend)
        assert Layer((1, 4, 4), (3, 3), 2, backend=backend, dtype="float32").weights.dtype == backend.dtype("float32")
    finally:
        jax.config.update("jax_enable_x64", was)


def test_table_descriptions_are_unique():
    descriptions = [row[0] for row in TABLE]
    assert len(descriptions) == len(set(descriptions))


# ---------------------------------------------------------------------------------------------
# Inputs are never modified
# ---------------------------------------------------------------------------------------------

CALL_KW = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)


def _inputs(seed: int = 0, dtype: str = "float64"):
    r = np.random.default_rng(seed)
    x = r.standard_normal((3, 4, 9, 8)).astype(dtype)
    w = r.standard_normal((6, 2, 3, 2)).astype(dtype)
    b = r.standard_normal(6).astype(dtype)
    y = conv(x, w, b, **CALL_KW)
    g = r.standard_normal(y.shape).astype(dtype)
    return x, w, b, g


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_inputs_are_bitwise_unchanged(dtype):
    arrays = _inputs(1, dtype)
    before = [a.copy() for a in arrays]
    x, w, b, g = arrays
    conv(x, w, b, **CALL_KW)
    conv(x, w, **CALL_KW)
    backward(g, x, w, **CALL_KW)
    layer = Layer((4, 9, 8), (3, 2), 5, 2, padding=1, dtype=dtype, seed=0)
    out = layer.forwardpass(x)
    delta = np.random.default_rng(9).standard_normal(out.shape).astype(dtype)
    delta_before = delta.copy()
    layer.backwardpass(0.1, x, delta)
    for a, a0 in zip((*arrays, delta), (*before, delta_before)):
        assert a.tobytes() == a0.tobytes() and a.dtype == a0.dtype and a.shape == a0.shape


def test_inputs_are_unchanged_on_every_backend(backend):
    x, w, b, g = _inputs(2)
    if backend.name == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            x, w, b, g = (a.astype(np.float32) for a in (x, w, b, g))
    host = [a.copy() for a in (x, w, b, g)]
    xs, ws, bs, gs = (backend.asarray(a.copy()) for a in host)
    conv(xs, ws, bs, **CALL_KW)
    backward(gs, xs, ws, **CALL_KW)
    layer = Layer((4, 9, 8), (3, 2), 6, 1, padding="same", dtype=str(host[0].dtype), seed=0, backend=backend)
    out = layer.forwardpass(xs)
    delta = backend.asarray(np.ones(tuple(out.shape), dtype=host[0].dtype))
    layer.backwardpass(0.1, xs, delta)
    for name, arr, h in zip("xwbg", (xs, ws, bs, gs), host):
        np.testing.assert_array_equal(backend.to_numpy(arr), h, strict=True, err_msg=f"{name} changed on {backend.spec}")
    np.testing.assert_array_equal(backend.to_numpy(delta), np.ones_like(host[3], shape=tuple(out.shape)), strict=True)


def test_read_only_numpy_inputs_are_accepted():
    arrays = _inputs(3)
    frozen = [a.copy() for a in arrays]
    for a in frozen:
        a.flags.writeable = False
    x, w, b, g = frozen
    np.testing.assert_array_equal(conv(x, w, b, **CALL_KW), conv(*arrays[:3], **CALL_KW), strict=True)
    for got, want in zip(backward(g, x, w, **CALL_KW), backward(arrays[3], *arrays[:2], **CALL_KW)):
        np.testing.assert_array_equal(got, want, strict=True)
    # The layer too, and on torch, whose tensors cannot share a read-only NumPy buffer.
    specs = ["numpy"] + [s for s in ("torch", "array_api_strict") if _importable(s)]
    for spec in specs:
        layer = Layer((4, 9, 8), (3, 3), 5, padding=1, seed=0, backend=spec)
        out = layer.forwardpass(x)
        delta = np.ones(tuple(out.shape))
        delta.flags.writeable = False
        layer.backwardpass(0.1, x, delta)
    for a, a0 in zip(frozen, arrays):
        assert a.tobytes() == a0.tobytes()


# ---------------------------------------------------------------------------------------------
# Memory layout does not matter
# ---------------------------------------------------------------------------------------------


def _same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal up to the order of a floating-point sum: NumPy's own reductions (the bias gradient
    is ``sum(grad_out, axis=(0, 2, 3))``) visit elements in an order that follows the memory
    layout, so only the last bit or two may differ."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14 * scale, err_msg=what)


LAYOUTS = ["transposed", "fortran", "negative-strides", "every-other", "last-two-swapped"]


def _layout(name: str, shape: tuple[int, ...], r: np.random.Generator) -> np.ndarray:
    """Random values of `shape` laid out as `name` (not C-contiguous where the shape allows it)."""
    n = len(shape)
    if name == "transposed":
        return np.ascontiguousarray(r.standard_normal(shape[::-1])).transpose(tuple(range(n))[::-1])
    if name == "fortran":
        return np.asfortranarray(r.standard_normal(shape))
    if name == "negative-strides":
        return r.standard_normal(shape)[(slice(None, None, -1),) * n]
    if name == "every-other":
        return r.standard_normal(tuple(2 * s for s in shape))[(slice(None, None, 2),) * n]
    if name == "last-two-swapped":
        if n < 2:
            return r.standard_normal(shape)[::-1]
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return np.ascontiguousarray(r.standard_normal(swapped)).swapaxes(-1, -2)
    raise AssertionError(name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("which", ["x", "weight", "bias", "grad_out", "all"])
def test_non_contiguous_numpy_inputs_match_contiguous_copies(which, layout):
    r = np.random.default_rng(LAYOUTS.index(layout))
    x, w, b, g = _inputs(4)
    args = {"x": x, "weight": w, "bias": b, "grad_out": g}
    for key in list(args) if which == "all" else [which]:
        args[key] = _layout(layout, args[key].shape, r)
        if args[key].ndim > 1 or layout not in ("transposed", "fortran"):  # a 1-D transpose is contiguous
            assert not args[key].flags.c_contiguous, (key, layout)
    copies = {k: np.ascontiguousarray(a) for k, a in args.items()}
    kept = {k: a.copy() for k, a in args.items()}

    y = conv(args["x"], args["weight"], args["bias"], **CALL_KW)
    y_ref = conv(copies["x"], copies["weight"], copies["bias"], **CALL_KW)
    _same(y, y_ref, "forward")
    grads = backward(args["grad_out"], args["x"], args["weight"], **CALL_KW)
    grads_ref = backward(copies["grad_out"], copies["x"], copies["weight"], **CALL_KW)
    for label, got, want in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref):
        _same(got, want, label)
    for k, a in args.items():  # the views themselves are untouched
        np.testing.assert_array_equal(a, kept[k], strict=True, err_msg=k)


def test_non_contiguous_layer_inputs_match_contiguous_copies():
    r = np.random.default_rng(6)
    for name in LAYOUTS:
        x = _layout(name, (3, 4, 9, 8), r)
        a = Layer((4, 9, 8), (3, 3), 5, padding=1, seed=1)
        b = Layer((4, 9, 8), (3, 3), 5, padding=1, seed=1)
        out_a, out_b = a.forwardpass(x), b.forwardpass(np.ascontiguousarray(x))
        _same(out_a, out_b, name)
        delta = r.standard_normal(out_a.shape)[:, ::-1]
        _same(a.backwardpass(0.1, x, delta), b.backwardpass(0.1, x, np.ascontiguousarray(delta)), name)
        _same(a.weights, b.weights, name)
        _same(a.biases, b.biases, name)


def test_permuted_views_match_contiguous_copies_on_every_backend(backend):
    """Transposed views of each library (torch strides, a lazily permuted strict array) give the
    results of the same values laid out contiguously."""
    r = np.random.default_rng(8)
    dtype = "float64"
    if backend.name == "jax":
        import jax

        dtype = "float64" if jax.config.jax_enable_x64 else "float32"
    xt = r.standard_normal((3, 4, 8, 9)).astype(dtype)  # N, C, W, H: permuted to N, C, H, W below
    wt = r.standard_normal((2, 3, 2, 6)).astype(dtype)  # kW, kH, C/g, O: permuted to O, C/g, kH, kW
    xp = backend.xp
    x = xp.permute_dims(backend.asarray(xt), (0, 1, 3, 2))
    w = xp.permute_dims(backend.asarray(wt), (3, 2, 1, 0))
    x_ref = backend.asarray(np.ascontiguousarray(xt.transpose(0, 1, 3, 2)))
    w_ref = backend.asarray(np.ascontiguousarray(wt.transpose(3, 2, 1, 0)))
    y = conv(x, w, **CALL_KW)
    y_ref = conv(x_ref, w_ref, **CALL_KW)
    np.testing.assert_allclose(backend.to_numpy(y), backend.to_numpy(y_ref), rtol=1e-6 if dtype == "float32" else 1e-13, atol=0)
    g = backend.asarray(r.standard_normal(tuple(y.shape)).astype(dtype))
    for got, want in zip(backward(g, x, w, **CALL_KW), backward(g, x_ref, w_ref, **CALL_KW)):
        np.testing.assert_allclose(backend.to_numpy(got), backend.to_numpy(want), rtol=1e-6 if dtype == "float32" else 1e-13,
                                   atol=1e-6 if dtype == "float32" else 1e-13)
