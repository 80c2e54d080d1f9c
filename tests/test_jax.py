"""conv2d under JAX's transformations (jit, grad, vmap) against jax.lax.conv_general_dilated and its gradients.

Few, small cases: every new shape compiles. The arrays are float64 (conftest enables JAX's 64-bit types).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import conv2d

from .conftest import _get, require_or_skip

jax = require_or_skip("jax")
jnp = jax.numpy

# stride 2, asymmetric padding, dilation and groups in one geometry: (N, C, H, W), (O, C/g, kH, kW)
X_SHAPE, W_SHAPE = (2, 4, 9, 8), (6, 2, 3, 2)
OPTIONS = dict(stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2)
TOL = dict(rtol=1e-10, atol=1e-10)


def _lax_conv(x, w, b):
    y = jax.lax.conv_general_dilated(
        x, w, window_strides=OPTIONS["stride"], padding=[(2, 2), (1, 1)], rhs_dilation=OPTIONS["dilation"],
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=OPTIONS["groups"],
    )
    return y + b[None, :, None, None]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape)) for shape in (X_SHAPE, W_SHAPE, (W_SHAPE[0],)))


@pytest.fixture
def jax_backend():
    return _get("jax")


def _no_tracer_cached(backend):
    return not any(isinstance(value, jax.core.Tracer) for value in backend._constants.values())


@pytest.mark.parametrize("algorithm", conv2d.ALGORITHMS[:2])
def test_jit_forward_and_backward(jax_backend, algorithm):
    """jit of conv2d and conv2d_backward equals lax and its vjp; eager calls with the geometry work afterwards."""
    assert conv2d.ALGORITHMS[:2] == ("gather", "slices")
    x, w, b = _data()
    forward = jax.jit(functools.partial(conv2d.conv2d, algorithm=algorithm, **OPTIONS))
    backward = jax.jit(functools.partial(conv2d.conv2d_backward, algorithm=algorithm, **OPTIONS))
    y_lax, vjp = jax.vjp(_lax_conv, x, w, b)
    y = forward(x, w, b)
    np.testing.assert_allclose(y, y_lax, **TOL)
    grad_out = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape))
    for got, expected in zip(backward(grad_out, x, w), vjp(grad_out), strict=True):
        np.testing.assert_allclose(got, expected, **TOL)
    assert _no_tracer_cached(jax_backend)
    # The same geometry eagerly, after the traces: the cached plans are concrete arrays.
    np.testing.assert_allclose(conv2d.conv2d(x, w, b, algorithm=algorithm, **OPTIONS), y_lax, **TOL)
    np.testing.assert_allclose(conv2d.conv2d_backward(grad_out, x, w, algorithm=algorithm, **OPTIONS)[1],
                               vjp(grad_out)[1], **TOL)


def test_grad_through_forward(jax_backend):
    """jax.grad differentiates through conv2d (under jit too) to lax's gradients, for x, weight and bias."""
    x, w, b = _data(2)
    target = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 6, 8)))

    def loss(conv):
        return lambda x, w, b: jnp.sum(jnp.tanh(conv(x, w, b)) * target)

    ours = loss(functools.partial(conv2d.conv2d, algorithm="gather", **OPTIONS))
    expected = jax.grad(loss(_lax_conv), argnums=(0, 1, 2))(x, w, b)
    for transform in (lambda f: f, jax.jit):
        got = transform(jax.grad(ours, argnums=(0, 1, 2)))(x, w, b)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, **TOL)
    assert _no_tracer_cached(jax_backend)


def test_vmap_over_a_leading_axis(jax_backend):
    """vmap over a stack of batches (and of filters) gives each slice's convolution."""
    rng = np.random.default_rng(4)
    xs = jnp.asarray(rng.standard_normal((3, *X_SHAPE)))
    ws = jnp.asarray(rng.standard_normal((3, *W_SHAPE)))
    b = _data()[2]
    conv = functools.partial(conv2d.conv2d, **OPTIONS)
    shared_w = jax.vmap(conv, in_axes=(0, None, None))(xs, ws[0], b)
    per_w = jax.jit(jax.vmap(conv, in_axes=(0, 0, None)))(xs, ws, b)
    for i in range(3):
        np.testing.assert_allclose(shared_w[i], _lax_conv(xs[i], ws[0], b), **TOL)
        np.testing.assert_allclose(per_w[i], _lax_conv(xs[i], ws[i], b), **TOL)
    assert _no_tracer_cached(jax_backend)
