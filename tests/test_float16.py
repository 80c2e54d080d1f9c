"""float16: in and out on every backend that has it (the array API standard does not: array-api-strict)."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d

from .oracle import PORTABLE_ALGORITHMS, assert_close, torch_conv
from .test_oracle import CASES, _data, _ids

pytest.importorskip("torch")


def _float16(backend):
    if backend.name == "array_api_strict":
        with pytest.raises(TypeError, match=r"dtype 'float16' is not available on backend 'array_api_strict'"):
            backend.dtype("float16")
        return None
    return backend.dtype("float16")


@pytest.mark.parametrize("algorithm", ["auto", *PORTABLE_ALGORITHMS])
@pytest.mark.parametrize("case", CASES[:9] + CASES[9:39:6], ids=_ids)
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
    """ConvolutionLayer(dtype='float16') trains in float16 and stays finite."""
    if _float16(backend) is None:
        return
    layer = conv2d.ConvolutionLayer((3, 8, 8), (3, 3), 4, padding=1, dtype="float16", seed=0, backend=backend)
    X = np.random.default_rng(1).standard_normal((2, 3, 8, 8))
    out = layer.forwardpass(X)
    grad = layer.backwardpass(0.1, X, out - 0.5)
    assert out.dtype == grad.dtype == layer.weights.dtype == backend.dtype("float16")
    assert np.all(np.isfinite(backend.to_numpy(grad).astype(np.float64)))
