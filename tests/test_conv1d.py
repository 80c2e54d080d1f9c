"""conv1d and conv1d_backward against torch.nn.Conv1d (every padding mode, both layouts) and its autograd."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from tests.conftest import require_or_skip
from tests.modes_oracle import MODES, assert_close, first, last, layer_arrays, random_layer, torch_layer

require_or_skip("torch")

LAYERS = {"jax": 1}  # JAX compiles every new shape (4-8 s a layer here)
DEFAULT_LAYERS = 8


def _int_or_tuple(rng, value):
    """Stride, padding or dilation as conv1d takes them: an int, a 1-tuple, or a string as drawn."""
    if isinstance(value, str):
        return value
    return (value[0],) if rng.random() < 0.5 else value[0]


def _check_1d_layer(backend, rng, mode: str, layout: str, dtype: str, int_or_tuple: bool) -> None:
    """One random 1-D layer in padding `mode` and `layout` against torch.nn.Conv1d: y and the three gradients,
    their shapes and dtypes; with `int_or_tuple`, stride, padding and dilation are passed as ints or 1-tuples."""
    layer = random_layer(rng, 1, mode)
    x, w, b = layer_arrays(rng, layer, dtype)
    y_ref, g, (gx_ref, gw_ref, gb_ref) = torch_layer(x, w, b, mode, rng, dtype, **layer["kwargs"])
    to, back = (last, first) if layout == "NWC" else (np.asarray, np.asarray)
    kwargs = dict(layer["kwargs"])
    if int_or_tuple:
        kwargs = {key: _int_or_tuple(rng, value) if key != "groups" else value for key, value in kwargs.items()}
    kwargs.update(padding_mode=mode, data_format=layout)
    xb, gb = backend.asarray(to(x).astype(dtype)), backend.asarray(to(g).astype(dtype))
    wb, bb = backend.asarray(w.astype(dtype)), backend.asarray(b.astype(dtype))
    y = conv2d.conv1d(xb, wb, bb, **kwargs)
    assert tuple(y.shape) == to(y_ref).shape and y.dtype == xb.dtype
    assert_close(back(backend.to_numpy(y)), y_ref, dtype, f"y of {layer}, {kwargs}")
    grad_x, grad_w, grad_b = conv2d.conv1d_backward(gb, xb, wb, **kwargs)
    assert tuple(grad_x.shape) == tuple(xb.shape) and tuple(grad_w.shape) == w.shape
    assert grad_x.dtype == grad_w.dtype == grad_b.dtype == xb.dtype
    assert_close(back(backend.to_numpy(grad_x)), gx_ref, dtype, f"grad_x of {layer}, {kwargs}")
    assert_close(backend.to_numpy(grad_w), gw_ref, dtype, f"grad_w of {layer}, {kwargs}")
    assert_close(backend.to_numpy(grad_b), gb_ref, dtype, f"grad_b of {layer}, {kwargs}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_torch(backend, dtype):
    """Random layers, each in its own padding mode (all four in turn) and layout (both in turn)."""
    rng = np.random.default_rng([13, len(dtype)])
    for index in range(LAYERS.get(backend.name, DEFAULT_LAYERS)):
        mode, layout = MODES[index % len(MODES)], ("NCW", "NWC")[(index // 2 + (dtype == "float32")) % 2]
        _check_1d_layer(backend, rng, mode, layout, dtype, int_or_tuple=True)


# Complex: PyTorch's complex Conv1d in every padding mode, with its conjugate convention in autograd, is the reference
# as it is. Four layers per dtype (each mode once, both layouts); JAX one layer, in complex128 only.
COMPLEX_LAYERS = {"jax": 1}
DEFAULT_COMPLEX_LAYERS = 4


@pytest.mark.parametrize("dtype", ["complex128", "complex64"])
def test_complex_matches_torch(backend, dtype):
    rng = np.random.default_rng([17, len(dtype)])
    for index in range(COMPLEX_LAYERS.get(backend.name, DEFAULT_COMPLEX_LAYERS)):
        mode, layout = MODES[(index + 1) % len(MODES)], ("NCW", "NWC")[(index + (dtype == "complex64")) % 2]
        _check_1d_layer(backend, rng, mode, layout, dtype, int_or_tuple=False)


def test_same_with_even_kernel_and_circular_matches_torch():
    rng = np.random.default_rng(4)
    layer = dict(n=2, c=2, o=2, sizes=(7,), kernel=(4,), kwargs=dict(stride=1, padding="same", dilation=2, groups=2))
    x, w, b = layer_arrays(rng, layer, "float64")
    y_ref, g, grads_ref = torch_layer(x, w, b, "circular", rng, "float64", **layer["kwargs"])
    assert_close(conv2d.conv1d(x, w, b, padding_mode="circular", **layer["kwargs"]), y_ref, "float64", "y")
    for got, want in zip(conv2d.conv1d_backward(g, x, w, padding_mode="circular", **layer["kwargs"]), grads_ref):
        assert_close(got, want, "float64", "grads")


@pytest.mark.parametrize("call, error, message", [
    (lambda x, w: conv2d.conv1d(x[0], w), ValueError, r"x must be 3-D \(N, C, W\) for conv1d, got shape \(3, 8\)"),
    (lambda x, w: conv2d.conv1d(x, w[..., None]), ValueError, r"weight must be 3-D \(O, C/groups, K\)"),
    (lambda x, w: conv2d.conv1d(x, w, stride=(1, 2)), TypeError, r"stride must be a positive int or a 1-tuple"),
    (lambda x, w: conv2d.conv1d(x, w, padding=-1), ValueError, r"padding must be non-negative"),
    (lambda x, w: conv2d.conv1d(x, w, dilation=0), ValueError, r"dilation must be positive"),
    (lambda x, w: conv2d.conv1d(x, w, data_format="NHWC"), ValueError, r"data_format must be 'NCW' or 'NWC', got 'NHWC'"),
    (lambda x, w: conv2d.conv1d(x, w, padding=8, padding_mode="reflect"), ValueError,
     r"padding_mode='reflect' needs each padding smaller than the input length, got padding 8 .*of 8"),
    (lambda x, w: conv2d.conv1d(x, w, padding=9, padding_mode="circular"), ValueError,
     r"padding_mode='circular' needs each padding at most the input length"),
    (lambda x, w: conv2d.conv1d_backward(np.zeros((2, 4)), x, w), ValueError, r"grad_out must be 3-D \(N, O, W\)"),
])
def test_errors(call, error, message):
    x, w = np.zeros((2, 3, 8)), np.zeros((4, 3, 3))
    with pytest.raises(error, match=message):
        call(x, w)
