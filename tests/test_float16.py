"""float16: in and out on every backend that has it (the array API standard does not: array-api-strict)."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d

from .algorithms import algorithm_cases, pair_params
from .conftest import require_or_skip
from .oracle import assert_close, torch_conv
from .test_oracle import CASES, _data

require_or_skip("torch")

# auto and every registered algorithm, each on the corners it computes and random layers it computes,
# 6 in all (the backends without an algorithm: deselected, tests/conftest.py).
PAIRS = algorithm_cases(6, seed=300, fixed=CASES[:9], extra=("auto",))


def _float16(backend):
    if backend.name == "array_api_strict":
        with pytest.raises(TypeError, match=r"dtype 'float16' is not available on backend 'array_api_strict'"):
            backend.dtype("float16")
        return None
    return backend.dtype("float16")


@pytest.mark.parametrize(("algorithm", "case"), pair_params(PAIRS))
def test_float16_matches_pytorch(backend, case, algorithm):
    """float16 results and gradients, within float16 rounding of PyTorch's float64 on the same values."""
    if _float16(backend) is None:
        return
    rng, x, w, b = _data(case, 11)
    kwargs = case["kwargs"]
    y64 = torch_conv(x, w, b, **kwargs)[0]
    grad_out = rng.standard_normal(y64.shape)
    # Round to float16 first, so the reference sees exactly the values we see.
    x, w, b, grad_out = (a.astype(np.float16).astype(np.float64) for a in (x, w, b, grad_out))
    reference = torch_conv(x, w, b, grad_out, **kwargs)
    X, W, B, G = (backend.asarray(a, dtype="float16") for a in (x, w, b, grad_out))
    ours = (conv2d.conv2d(X, W, B, algorithm=algorithm, **kwargs),
            *conv2d.conv2d_backward(G, X, W, algorithm=algorithm, **kwargs))
    for name, a, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, reference):
        assert a.dtype == X.dtype, f"{name} has dtype {a.dtype}"
        assert_close(backend, a, r, "float16", name)


def test_float16_layer(backend):
    """ConvolutionLayer(dtype='float16') trains in float16: output, input gradient and updated weights
    within float16 rounding of PyTorch's float64 on the same (float16) values."""
    if _float16(backend) is None:
        return
    layer = conv2d.ConvolutionLayer((3, 8, 8), (3, 3), 4, padding=1, dtype="float16", seed=0, backend=backend,
                                    activation=None)  # the convolution alone: PyTorch is its oracle
    w0 = backend.to_numpy(layer.weights).astype(np.float64)
    b0 = backend.to_numpy(layer.biases).astype(np.float64)
    X = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float16).astype(np.float64)
    out = layer.forwardpass(X)
    delta = (backend.to_numpy(out).astype(np.float64) - 0.5).astype(np.float16).astype(np.float64)
    grad = layer.backwardpass(0.1, X, backend.asarray(delta, dtype="float16"))
    assert out.dtype == grad.dtype == layer.weights.dtype == backend.dtype("float16")
    y_ref, gx_ref, gw_ref, gb_ref = torch_conv(X, w0, b0, delta, padding=1)
    assert_close(backend, out, y_ref, "float16", "y")
    assert_close(backend, grad, gx_ref, "float16", "grad_x")
    assert_close(backend, layer.weights, w0 - 0.1 * gw_ref, "float16", "weights after the step")
    assert_close(backend, layer.biases, b0 - 0.1 * gb_ref, "float16", "biases after the step")
