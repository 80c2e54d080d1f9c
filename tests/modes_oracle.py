"""Random layers and PyTorch's answers for the padding-mode, layout and 1-D tests.

The reference is ``torch.nn.Conv1d`` / ``torch.nn.Conv2d`` itself (its ``padding_mode``, its
``padding="same"``), in float64, with ``torch.autograd.grad`` for the three gradients; channels-last
arrays are compared after a plain NumPy transpose. Complex dtypes get a complex128 reference (PyTorch's
complex ``Conv1d``/``Conv2d`` in every padding mode, and its conjugate convention in autograd).
"""

from __future__ import annotations

import warnings

import numpy as np

MODES = ("zeros", "reflect", "replicate", "circular")


def random_layer(rng: np.random.Generator, spatial: int, mode: str) -> dict:
    """A random layer (sizes, kernel, conv arguments) that `mode` can pad: reflect pads stay below the input size."""
    while True:
        groups = int(rng.choice([1, 1, 2, 3]))
        sizes = tuple(int(s) for s in rng.integers(2, 9, spatial))
        kernel = tuple(int(k) for k in rng.integers(1, 5, spatial))
        dilation = tuple(int(d) for d in rng.integers(1, 3, spatial))
        stride = tuple(int(s) for s in rng.integers(1, 4, spatial))
        draw = rng.random()
        if draw < 0.2:
            padding: object = "same"
            stride = (1,) * spatial
        elif draw < 0.3:
            padding = "valid"
        else:
            padding = tuple(int(rng.integers(0, s)) for s in sizes)  # < size: every mode can pad it
        pads = _pads(padding, kernel, dilation, spatial)
        if mode == "reflect" and any(p >= s for p, s in zip(pads, sizes)):
            continue
        if all(d * (k - 1) + 1 <= s + 2 * p for d, k, s, p in zip(dilation, kernel, sizes, pads)):
            return dict(n=int(rng.integers(1, 3)), c=groups * int(rng.integers(1, 3)), o=groups * int(rng.integers(1, 3)),
                        sizes=sizes, kernel=kernel, kwargs=dict(stride=stride, padding=padding, dilation=dilation, groups=groups))


def _pads(padding: object, kernel, dilation, spatial) -> tuple[int, ...]:
    """The widest pad per axis (for "same": the larger, after side)."""
    if padding == "valid":
        return (0,) * spatial
    if padding == "same":
        return tuple(d * (k - 1) - d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    return tuple(padding)  # type: ignore[arg-type]


def _exact(dtype: str) -> type:
    """The reference's dtype for `dtype`: complex128 for the complex ones, float64 for the real ones."""
    return np.complex128 if np.dtype(dtype).kind == "c" else np.float64


def _normal(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """Standard normal values of `shape`, with a random imaginary part where `dtype` is complex (the real
    draws are the same as before complex dtypes existed, so the real tests keep their geometries)."""
    values = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
        values = values + 1j * rng.standard_normal(shape)
    return values


def layer_arrays(rng: np.random.Generator, layer: dict, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, weight, bias, rounded to `dtype` and back to float64 or complex128 (the reference sees what is computed on)."""
    x = _normal(rng, (layer["n"], layer["c"], *layer["sizes"]), dtype)
    w = _normal(rng, (layer["o"], layer["c"] // layer["kwargs"]["groups"], *layer["kernel"]), dtype)
    b = _normal(rng, layer["o"], dtype)
    return tuple(a.astype(dtype).astype(_exact(dtype)) for a in (x, w, b))  # type: ignore[return-value]


def torch_layer(x, w, b, mode: str, rng: np.random.Generator, dtype: str, **kwargs):
    """y, a random grad_out (rounded to `dtype`), and torch's (grad_x, grad_w, grad_b), channels-first, in
    float64 (complex128 where `dtype` is complex: PyTorch pads and convolves complex tensors in every mode)."""
    import torch

    spatial = x.ndim - 2
    complex_ = np.dtype(dtype).kind == "c"
    conv = (torch.nn.Conv1d if spatial == 1 else torch.nn.Conv2d)(
        x.shape[1], w.shape[0], w.shape[2:], padding_mode=mode, dtype=torch.complex128 if complex_ else torch.float64,
        **kwargs)
    xt = torch.tensor(x, requires_grad=True)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w))
        conv.bias.copy_(torch.tensor(b))
    with warnings.catch_warnings():  # PyTorch warns that asymmetric "same" padding costs it a copy
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        y = conv(xt)
    g = _normal(rng, tuple(y.shape), dtype).astype(dtype).astype(_exact(dtype))
    grads = torch.autograd.grad(y, (xt, conv.weight, conv.bias), torch.tensor(g))
    return y.detach().numpy(), g, tuple(t.numpy() for t in grads)


def last(a: np.ndarray) -> np.ndarray:
    """Channels-first `a` as channels-last."""
    return np.moveaxis(a, 1, -1)


def first(a: np.ndarray) -> np.ndarray:
    """Channels-last `a` as channels-first."""
    return np.moveaxis(a, -1, 1)


def assert_close(actual, expected, dtype: str, what: str) -> None:
    """Equal to float rounding of `dtype` (complex64 rounds like float32 in each part), scaled by the size of
    the reference (sums of many terms)."""
    tol = 1e-10 if dtype in ("float64", "complex128") else 2e-5
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, dtype=_exact(dtype)), expected, rtol=tol * 10, atol=tol * scale, err_msg=what)
