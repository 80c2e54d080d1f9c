"""data_format="NHWC" on conv2d and conv2d_backward against torch.nn.Conv2d on the transposed arrays."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from tests.modes_oracle import MODES, assert_close, first, last, layer_arrays, random_layer, torch_layer

from .conftest import require_or_skip

require_or_skip("torch")

LAYERS = {"jax": 1}  # JAX compiles every new shape (9 s a layer here)
DEFAULT_LAYERS = 8


def _check_nhwc_layer(backend, rng, mode: str, dtype: str) -> None:
    """One random layer in padding `mode`, channels-last in and out, against torch: y and the three
    gradients, their shapes and dtypes."""
    layer = random_layer(rng, 2, mode)
    x, w, b = layer_arrays(rng, layer, dtype)
    y_ref, g, (gx_ref, gw_ref, gb_ref) = torch_layer(x, w, b, mode, rng, dtype, **layer["kwargs"])
    xb, gb = backend.asarray(last(x).astype(dtype)), backend.asarray(last(g).astype(dtype))
    wb, bb = backend.asarray(w.astype(dtype)), backend.asarray(b.astype(dtype))
    kwargs = dict(layer["kwargs"], padding_mode=mode, data_format="NHWC")
    y = conv2d.conv2d(xb, wb, bb, **kwargs)
    assert tuple(y.shape) == last(y_ref).shape and y.dtype == xb.dtype
    assert_close(first(backend.to_numpy(y)), y_ref, dtype, f"y of {layer}, {mode}")
    grad_x, grad_w, grad_b = conv2d.conv2d_backward(gb, xb, wb, **kwargs)
    assert tuple(grad_x.shape) == tuple(xb.shape) and tuple(grad_w.shape) == w.shape
    assert grad_x.dtype == grad_w.dtype == grad_b.dtype == xb.dtype
    assert_close(first(backend.to_numpy(grad_x)), gx_ref, dtype, f"grad_x of {layer}, {mode}")
    assert_close(backend.to_numpy(grad_w), gw_ref, dtype, f"grad_w of {layer}, {mode}")
    assert_close(backend.to_numpy(grad_b), gb_ref, dtype, f"grad_b of {layer}, {mode}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_torch(backend, dtype):
    """Random layers, each in a padding mode of its own (all four in turn), channels-last in and out."""
    rng = np.random.default_rng([11, len(dtype)])
    for index in range(LAYERS.get(backend.name, DEFAULT_LAYERS)):
        _check_nhwc_layer(backend, rng, MODES[(index + (dtype == "float32")) % len(MODES)], dtype)


# Complex: PyTorch's complex Conv2d in every padding mode, with its conjugate convention in autograd, is the reference
# as it is (on the channels-first arrays). Four layers per dtype (each mode once); JAX one layer, in complex128 only.
COMPLEX_LAYERS = {"jax": 1}
DEFAULT_COMPLEX_LAYERS = 4


@pytest.mark.parametrize("dtype", ["complex128", "complex64"])
def test_complex_matches_torch(backend, dtype):
    rng = np.random.default_rng([19, len(dtype)])
    for index in range(COMPLEX_LAYERS.get(backend.name, DEFAULT_COMPLEX_LAYERS)):
        _check_nhwc_layer(backend, rng, MODES[(index + 2) % len(MODES)], dtype)


@pytest.mark.parametrize("algorithm", ["gather", "slices", "direct", "winograd", "pointwise"])
def test_every_numpy_algorithm_reads_nhwc(algorithm):
    """The channels-last view (not contiguous) goes through each algorithm unchanged."""
    rng = np.random.default_rng(5)
    kernel = (1, 1) if algorithm == "pointwise" else (3, 3)
    x, w, b = rng.standard_normal((2, 6, 7, 4)), rng.standard_normal((4, 4, *kernel)), rng.standard_normal(4)
    y = conv2d.conv2d(x, w, b, padding=1, data_format="NHWC", algorithm=algorithm)
    expected = conv2d.conv2d(first(x), w, b, padding=1, algorithm=algorithm)
    np.testing.assert_allclose(y, last(expected), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(y.shape)
    for got, want in zip(conv2d.conv2d_backward(g, x, w, padding=1, data_format="NHWC", algorithm=algorithm),
                         conv2d.conv2d_backward(first(g), first(x), w, padding=1, algorithm=algorithm)):
        np.testing.assert_allclose(got, last(want) if got.ndim == 4 and got.shape != w.shape else want,
                                   rtol=1e-12, atol=1e-12)


def test_nchw_is_the_default_and_unchanged():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    np.testing.assert_array_equal(conv2d.conv2d(x, w, data_format="NCHW"), conv2d.conv2d(x, w))


@pytest.mark.parametrize("bad, error, message", [
    ("NCWH", ValueError, r"data_format must be 'NCHW' or 'NHWC', got 'NCWH'"),
    ("NWC", ValueError, r"data_format must be 'NCHW' or 'NHWC', got 'NWC'"),
    (4, TypeError, r"data_format must be a string, 'NCHW' or 'NHWC', got 4"),
])
def test_bad_data_format(bad, error, message):
    x, w = np.zeros((1, 3, 3, 1)), np.zeros((1, 1, 1, 1))
    with pytest.raises(error, match=message):
        conv2d.conv2d(x, w, data_format=bad)
    with pytest.raises(error, match=message):
        conv2d.conv2d_backward(x, x, w, data_format=bad)


def test_shape_errors_speak_the_layout():
    x, w = np.zeros((1, 5, 5, 2)), np.zeros((3, 2, 3, 3))  # NHWC, 2 channels
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, H, W, C\) for data_format='NHWC', got shape \(5, 5, 2\)"):
        conv2d.conv2d(x[0], w, data_format="NHWC")
    with pytest.raises(ValueError, match=r"expects 2 input channels .* but x has 5"):
        conv2d.conv2d(np.zeros((1, 2, 5, 5)), w, data_format="NHWC")  # an NCHW array passed as NHWC
    with pytest.raises(ValueError, match=r"grad_out must have the forward output's shape \(1, 3, 3, 3\) \(N, H, W, O"):
        conv2d.conv2d_backward(np.zeros((1, 3, 3, 4)), x, w, data_format="NHWC")
