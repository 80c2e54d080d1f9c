"""Random layers and PyTorch's answers for the padding-mode, layout and 1-D tests.

The reference is ``torch.nn.Conv1d`` / ``torch.nn.Conv2d`` itself (its ``padding_mode``, its
``padding="same"``), in float64, with ``torch.autograd.grad`` for the three gradients; channels-last
arrays are compared after a plain NumPy transpose.
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


def layer_arrays(rng: np.random.Generator, layer: dict, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, weight, bias, rounded to `dtype` and back to float64 (the reference sees what is computed on)."""
    x = rng.standard_normal((layer["n"], layer["c"], *layer["sizes"]))
    w = rng.standard_normal((layer["o"], layer["c"] // layer["kwargs"]["groups"], *layer["kernel"]))
    b = rng.standard_normal(layer["o"])
    return tuple(a.astype(dtype).astype(np.float64) for a in (x, w, b))  # type: ignore[return-value]


def torch_layer(x, w, b, mode: str, rng: np.random.Generator, dtype: str, **kwargs):
    """y, a random grad_out (rounded to `dtype`), and torch's (grad_x, grad_w, grad_b), channels-first, float64."""
    import torch

    spatial = x.ndim - 2
    conv = (torch.nn.Conv1d if spatial == 1 else torch.nn.Conv2d)(
        x.shape[1], w.shape[0], w.shape[2:], padding_mode=mode, dtype=torch.float64, **kwargs)
    xt = torch.tensor(x, requires_grad=True)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w))
        conv.bias.copy_(torch.tensor(b))
    with warnings.catch_warnings():  # PyTorch warns that asymmetric "same" padding costs it a copy
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        y = conv(xt)
    g = rng.standard_normal(tuple(y.shape)).astype(dtype).astype(np.float64)
    grads = torch.autograd.grad(y, (xt, conv.weight, conv.bias), torch.tensor(g))
    return y.detach().numpy(), g, tuple(t.numpy() for t in grads)


def last(a: np.ndarray) -> np.ndarray:
    """Channels-first `a` as channels-last."""
    return np.moveaxis(a, 1, -1)


def first(a: np.ndarray) -> np.ndarray:
    """Channels-last `a` as channels-first."""
    return np.moveaxis(a, -1, 1)


def assert_close(actual, expected, dtype: str, what: str) -> None:
    """Equal to float rounding of `dtype`, scaled by the size of the reference (sums of many terms)."""
    tol = 1e-10 if dtype == "float64" else 2e-5
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=tol * 10, atol=tol * scale, err_msg=what)
