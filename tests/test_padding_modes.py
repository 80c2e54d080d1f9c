"""padding_mode on conv2d and conv2d_backward against torch.nn.Conv2d(padding_mode=...) and its autograd."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d._padding import fold, pad
from tests.modes_oracle import MODES, assert_close, layer_arrays, random_layer, torch_layer

from .conftest import require_or_skip

require_or_skip("torch")

# JAX compiles every new shape (5 s a layer here): it checks one layer per mode, in one dtype per mode
# (both dtypes across the modes); the other backends check 6 layers per mode and dtype.
LAYERS = {"jax": 1}
DEFAULT_LAYERS = 6


def jax_keeps(test: str, params: dict) -> bool | None:
    """JAX checks each mode of test_matches_torch in one dtype under the default profile (tests/conftest.py;
    both dtypes across the modes); every other test: the default."""
    if test == "test_complex_matches_torch":
        return (params["mode"], params["dtype"]) == JAX_COMPLEX
    if test != "test_matches_torch":
        return None
    return (MODES.index(params["mode"]) + (params["dtype"] == "float32")) % 2 == 0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", MODES[1:])
def test_matches_torch(backend, mode, dtype):
    rng = np.random.default_rng([MODES.index(mode), len(dtype)])
    for _ in range(LAYERS.get(backend.name, DEFAULT_LAYERS)):
        layer = random_layer(rng, 2, mode)
        x, w, b = layer_arrays(rng, layer, dtype)
        y_ref, g, grads_ref = torch_layer(x, w, b, mode, rng, dtype, **layer["kwargs"])
        xb, wb, bb, gb = (backend.asarray(a.astype(dtype)) for a in (x, w, b, g))
        y = conv2d.conv2d(xb, wb, bb, padding_mode=mode, **layer["kwargs"])
        assert_close(backend.to_numpy(y), y_ref, dtype, f"y of {layer}")
        grads = conv2d.conv2d_backward(gb, xb, wb, padding_mode=mode, **layer["kwargs"])
        for name, got, want in zip(("grad_x", "grad_w", "grad_b"), grads, grads_ref):
            assert got.dtype == xb.dtype
            assert_close(backend.to_numpy(got), want, dtype, f"{name} of {layer}")


# Complex: PyTorch's complex Conv2d pads in every mode and its autograd follows the conjugate convention, so it is
# the reference as it is. Each backend checks 2 layers per mode and dtype; JAX one layer, complex128 in reflect.
COMPLEX_LAYERS = 2
JAX_COMPLEX = ("reflect", "complex128")


@pytest.mark.parametrize("dtype", ["complex128", "complex64"])
@pytest.mark.parametrize("mode", MODES[1:])
def test_complex_matches_torch(backend, mode, dtype):
    rng = np.random.default_rng([MODES.index(mode), len(dtype), 1])
    for _ in range(1 if backend.name == "jax" else COMPLEX_LAYERS):
        layer = random_layer(rng, 2, mode)
        x, w, b = layer_arrays(rng, layer, dtype)
        y_ref, g, grads_ref = torch_layer(x, w, b, mode, rng, dtype, **layer["kwargs"])
        xb, wb, bb, gb = (backend.asarray(a.astype(dtype)) for a in (x, w, b, g))
        y = conv2d.conv2d(xb, wb, bb, padding_mode=mode, **layer["kwargs"])
        assert y.dtype == xb.dtype
        assert_close(backend.to_numpy(y), y_ref, dtype, f"y of {layer}")
        grads = conv2d.conv2d_backward(gb, xb, wb, padding_mode=mode, **layer["kwargs"])
        for name, got, want in zip(("grad_x", "grad_w", "grad_b"), grads, grads_ref):
            assert got.dtype == xb.dtype
            assert_close(backend.to_numpy(got), want, dtype, f"{name} of {layer}")


@pytest.mark.parametrize("mode", MODES[1:])
def test_pad_and_fold_match_torch_pad(mode):
    """The pad itself (asymmetric, up to the largest each mode allows) and its transpose, on NumPy."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 5, 4))
    top, bottom, left, right = (4, 1, 0, 3) if mode == "reflect" else (5, 2, 0, 4)
    xt = torch.tensor(x, requires_grad=True)
    ref = F.pad(xt, (left, right, top, bottom), mode=mode)
    padded = pad(np, x, (top, bottom, left, right), mode)
    np.testing.assert_array_equal(padded, ref.detach().numpy())
    g = rng.standard_normal(padded.shape)
    (grad_ref,) = torch.autograd.grad(ref, xt, torch.tensor(g))
    np.testing.assert_allclose(fold(np, g, (top, bottom, left, right), mode), grad_ref.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES[1:])
def test_same_with_even_kernel_matches_torch_layer(mode):
    """padding='same' pads as torch.nn.Conv2d does: the odd extra row/column after, in the mode."""
    rng = np.random.default_rng(3)
    layer = dict(n=2, c=2, o=3, sizes=(6, 5), kernel=(4, 2), kwargs=dict(stride=1, padding="same", dilation=(1, 3), groups=1))
    x, w, b = layer_arrays(rng, layer, "float64")
    y_ref, g, grads_ref = torch_layer(x, w, b, mode, rng, "float64", **layer["kwargs"])
    y = conv2d.conv2d(x, w, b, padding_mode=mode, **layer["kwargs"])
    assert y.shape == (x.shape[0], 3, *x.shape[2:])
    assert_close(y, y_ref, "float64", "y")
    for got, want in zip(conv2d.conv2d_backward(g, x, w, padding_mode=mode, **layer["kwargs"]), grads_ref):
        assert_close(got, want, "float64", "grads")


def test_inputs_not_modified():
    rng = np.random.default_rng(1)
    x, w, g = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((2, 2, 3, 3)), rng.standard_normal((1, 2, 5, 5))
    copies = [a.copy() for a in (x, w, g)]
    conv2d.conv2d(x, w, padding=1, padding_mode="circular")
    conv2d.conv2d_backward(g, x, w, padding=1, padding_mode="reflect")
    for a, c in zip((x, w, g), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("mode, padding, size, message", [
    ("reflect", 3, 3, r"padding_mode='reflect' needs each padding smaller than the input height.*padding 3 .*of 3"),
    ("reflect", (0, 4), 4, r"padding_mode='reflect' needs each padding smaller than the input width.*\(0, 4\).*of 4"),
    ("circular", 4, 3, r"padding_mode='circular' needs each padding at most the input height.*padding 4 .*of 3"),
])
def test_padding_too_large_for_the_mode(mode, padding, size, message):
    x, w = np.zeros((1, 1, size, size)), np.zeros((1, 1, 1, 1))
    with pytest.raises(ValueError, match=message):
        conv2d.conv2d(x, w, padding=padding, padding_mode=mode)
    with pytest.raises(ValueError, match=message):
        conv2d.conv2d_backward(np.zeros((1, 1, size, size)), x, w, padding=padding, padding_mode=mode)


def test_largest_padding_each_mode_allows():
    """reflect up to size - 1 and circular up to size, as torch allows them; replicate any."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((1, 1, 3, 3)), rng.standard_normal((1, 1, 2, 2))
    for mode, padding in (("reflect", 2), ("circular", 3), ("replicate", 7)):
        y_ref, _, _ = torch_layer(x, w, np.zeros(1), mode, rng, "float64", padding=padding)
        assert_close(conv2d.conv2d(x, w, np.zeros(1), padding=padding, padding_mode=mode), y_ref, "float64", mode)


@pytest.mark.parametrize("bad, error, message", [
    ("mirror", ValueError, r"padding_mode must be one of 'zeros', 'reflect', 'replicate', 'circular', got 'mirror'"),
    (None, TypeError, r"padding_mode must be a string, one of 'zeros'.*got None"),
])
def test_bad_padding_mode(bad, error, message):
    x, w = np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 1, 1))
    with pytest.raises(error, match=message):
        conv2d.conv2d(x, w, padding_mode=bad)
    with pytest.raises(error, match=message):
        conv2d.conv2d_backward(x, x, w, padding_mode=bad)


def test_dask_arrays_in_a_mode_and_layout():
    """The explicit pad and transpose run on the dask array; the convolution of the result goes to conv2d.distributed."""
    da = require_or_skip("dask.array")
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((4, 6, 5, 3)), rng.standard_normal((2, 3, 3, 3))  # NHWC
    kw = dict(padding=(2, 1), padding_mode="circular", data_format="NHWC")
    y = conv2d.conv2d(da.from_array(x, chunks=(2, 6, 5, 3)), w, **kw)
    assert isinstance(y, da.Array)
    np.testing.assert_allclose(y.compute(), conv2d.conv2d(x, w, **kw), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(y.shape)
    lazy = conv2d.conv2d_backward(da.from_array(g, chunks=(2, *g.shape[1:])), da.from_array(x, chunks=(2, 6, 5, 3)), w, **kw)
    for got, want in zip(lazy, conv2d.conv2d_backward(g, x, w, **kw)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
