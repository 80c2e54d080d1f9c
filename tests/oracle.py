"""References nobody here wrote (PyTorch) or that are too plain to be wrong (loops), in float64 NumPy."""

from __future__ import annotations

import itertools

import numpy as np

import conv2d


def missing_algorithm(algorithm: str, backend, geom=None) -> str | None:
    """The start of conv2d's error where `backend` lacks `algorithm` ("kernels": CuPy; "native": torch, JAX),
    or where `algorithm` does not compute the layer `geom` ("winograd": 3x3, stride 1; "pointwise": 1x1), else None."""
    if algorithm == "kernels" and backend.kernels is None:
        return "algorithm 'kernels'"
    if algorithm == "native" and backend.native is None:
        return "algorithm 'native'"
    if algorithm == "winograd" and geom is not None and not ((geom.kernel_h, geom.kernel_w) == (3, 3) and geom.stride == (1, 1)):
        return "algorithm 'winograd' computes 3x3 convolutions with stride 1"
    if algorithm == "pointwise" and geom is not None and (geom.kernel_h, geom.kernel_w) != (1, 1):
        return "algorithm 'pointwise' computes 1x1 convolutions"
    return None


def layer_data(layer: dict, seed: int, dtype: str, kernel: tuple[int, int]) -> list:
    """Random x, weight, bias and output gradient for `layer` (n, c, o, h, w and conv2d's `kwargs`),
    rounded to `dtype` and back to float64, so that the float64 reference sees exactly what is computed on."""
    from conv2d._geometry import make_geometry

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((layer["n"], layer["c"], layer["h"], layer["w"]))
    w = rng.standard_normal((layer["o"], layer["c"] // layer["kwargs"].get("groups", 1), *kernel))
    b = rng.standard_normal(layer["o"])
    geom = make_geometry(x.shape, w.shape, b.shape, **layer["kwargs"])
    g = rng.standard_normal((layer["n"], layer["o"], geom.out_h, geom.out_w))
    return [a.astype(dtype).astype(np.float64) for a in (x, w, b, g)]


TOLERANCE = {"float16": dict(rtol=5e-3, atol=5e-3), "float32": dict(rtol=2e-4, atol=2e-5), "float64": dict(rtol=1e-9, atol=1e-11)}


def torch_conv(x, w, b, grad_out=None, **kw):
    """PyTorch's conv2d and autograd in float64: (y, grad_x, grad_w, grad_b); the grads need grad_out."""
    import warnings

    import torch
    import torch.nn.functional as F

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():  # PyTorch warns that asymmetric "same" padding costs it a copy
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        y = F.conv2d(xt, wt, bt, **kw)
    if grad_out is None:
        return y.detach().numpy(), None, None, None
    y.backward(torch.tensor(grad_out, dtype=torch.float64))
    return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()


def loop_conv(x, w, b, *, stride, padding, dilation, groups):
    """Forward and backward by the definition, one multiply-add at a time (tiny inputs only).

    `padding` is (top, bottom, left, right). Returns y and a function grad_out -> (gx, gw, gb).
    """
    n, _c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    sh, sw = stride
    dh, dw = dilation
    top, bottom, left, right = padding
    og = o // groups
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + left + right - dw * (kw - 1) - 1) // sw + 1

    def taps():
        # Every (output element, input element, weight element) that meet in the sum.
        for i, f, r, s, p, q in itertools.product(range(n), range(o), range(oh), range(ow), range(kh), range(kw)):
            row, col = r * sh + p * dh - top, s * sw + q * dw - left
            if 0 <= row < h and 0 <= col < wd:
                g = f // og
                for k in range(cg):
                    yield (i, f, r, s), (i, g * cg + k, row, col), (f, k, p, q)

    y = np.zeros((n, o, oh, ow))
    y += b.reshape(1, -1, 1, 1)
    for yi, xi, wi in taps():
        y[yi] += x[xi] * w[wi]

    def backward(grad_out):
        gx, gw = np.zeros_like(x, dtype=np.float64), np.zeros_like(w, dtype=np.float64)
        for yi, xi, wi in taps():
            gx[xi] += grad_out[yi] * w[wi]
            gw[wi] += grad_out[yi] * x[xi]
        return gx, gw, grad_out.sum(axis=(0, 2, 3))

    return y, backward


def assert_close(backend: conv2d.Backend, actual, expected, dtype: str, what: str):
    actual = backend.to_numpy(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=what)
