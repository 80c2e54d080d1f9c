"""The compiled direct kernels (conv2d/backends/_numba/direct.py) against PyTorch's conv2d and autograd.

Random grouped layers with one to four channels per group (the layers ``algorithm="kernels"`` routes
there), through the public functions, then through the kernel module itself with padding that differs
on all four sides and with several worker counts (tasks split over samples as well as groups).
"""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d._geometry import Geometry, make_geometry

from .conftest import require_or_skip
from .oracle import assert_close, torch_conv
from .test_complex import TOLERANCE as COMPLEX_TOLERANCE
from .test_complex import torch_reference

require_or_skip("numba")
torch = require_or_skip("torch")

from conv2d.backends._numba import _algorithm, direct  # noqa: E402  (needs numba)


def _layer(rng: np.random.Generator) -> dict:
    """A random grouped layer with at most four channels per group: kernels 1-5, strides 1-3,
    dilations 1-2, paddings 0-3 on each side independently (any of them may exceed the kernel)."""
    groups = int(rng.choice([2, 3, 5, 8]))
    cpg, fpg = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    kernel = tuple(int(k) for k in rng.integers(1, 6, size=2))
    if rng.random() < 0.4:
        kernel = (3, 3)  # the fused path
    stride = tuple(int(s) for s in rng.integers(1, 4, size=2))
    if rng.random() < 0.4:
        stride = (1, 1)  # the whole-plane path
    dilation = tuple(int(d) for d in rng.integers(1, 3, size=2))
    padding = tuple(int(p) for p in rng.integers(0, 4, size=4))
    reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    h = int(rng.integers(max(1, reach[0] - padding[0] - padding[1]), reach[0] + 9))
    w = int(rng.integers(max(1, reach[1] - padding[2] - padding[3]), reach[1] + 9))
    return dict(n=int(rng.integers(1, 5)), groups=groups, cpg=cpg, fpg=fpg, h=h, w=w, kernel=kernel, stride=stride,
                dilation=dilation, padding=padding)


def _geometry(layer: dict) -> Geometry:
    (kh, kw), (sh, sw), (dh, dw) = layer["kernel"], layer["stride"], layer["dilation"]
    top, bottom, left, right = layer["padding"]
    out_h = (layer["h"] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (layer["w"] + left + right - dw * (kw - 1) - 1) // sw + 1
    return Geometry(layer["groups"] * layer["cpg"], layer["h"], layer["w"], layer["groups"] * layer["fpg"], kh, kw,
                    (sh, sw), (top, bottom, left, right), (dh, dw), layer["groups"], out_h, out_w)


def _torch_padded(x, w, grad_out, layer: dict):
    """PyTorch's float64 (y, grad_x, grad_w) with the four-sided padding applied by F.pad first."""
    top, bottom, left, right = layer["padding"]
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    wt = torch.tensor(w.astype(np.float64), requires_grad=True)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(xt, (left, right, top, bottom)), wt,
                                   stride=layer["stride"], dilation=layer["dilation"], groups=layer["groups"])
    y.backward(torch.tensor(grad_out.astype(np.float64)))
    return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()


LAYERS = [_layer(np.random.default_rng([7, index])) for index in range(40)]


def _id(layer: dict) -> str:
    return (f"n{layer['n']}g{layer['groups']}c{layer['cpg']}f{layer['fpg']}-{layer['h']}x{layer['w']}"
            f"-k{layer['kernel']}-s{layer['stride']}-d{layer['dilation']}-p{layer['padding']}")


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layer", LAYERS, ids=_id)
def test_kernels_match_pytorch(layer, dtype, workers):
    """forward and both gradients of the kernel module, four-sided padding, one and three workers."""
    geom = _geometry(layer)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((layer["n"], geom.in_channels, geom.height, geom.width)).astype(dtype)
    w = rng.standard_normal((geom.out_channels, geom.channels_per_group, geom.kernel_h, geom.kernel_w)).astype(dtype)
    b = rng.standard_normal(geom.out_channels).astype(dtype)
    grad_out = rng.standard_normal((layer["n"], geom.out_channels, geom.out_h, geom.out_w)).astype(dtype)
    assert _algorithm.kernel_set(geom) is direct
    x_before, w_before, g_before = x.copy(), w.copy(), grad_out.copy()
    y = direct.forward(x, w, b, geom, workers, 2**20)
    grad_x, grad_w = direct.backward(grad_out, x, w, geom, workers, 2**20, ("x", "weight"))
    want_y, want_x, want_w = _torch_padded(x, w, grad_out, layer)
    backend = conv2d.get_backend("numpy")
    for what, got, want in (("y", y, want_y + b.astype(np.float64)[:, None, None]), ("grad_x", grad_x, want_x),
                            ("grad_weight", grad_w, want_w)):
        assert got.dtype == np.dtype(dtype), what
        assert_close(backend, got, want, dtype, what)
    for before, after in ((x_before, x), (w_before, w), (g_before, grad_out)):
        np.testing.assert_array_equal(before, after)  # inputs untouched
    only_x = direct.backward(grad_out, x, w, geom, workers, 2**20, ("x",))
    only_w = direct.backward(grad_out, x, w, geom, workers, 2**20, ("weight",))
    assert only_x[1] is None and only_w[0] is None
    np.testing.assert_array_equal(only_x[0], grad_x)
    np.testing.assert_array_equal(only_w[1], grad_w)


PUBLIC = [dict(n=3, c=6, o=6, h=9, w=8, kernel=(3, 3), kwargs=dict(padding=1, groups=6)),  # depthwise
          dict(n=2, c=4, o=8, h=7, w=10, kernel=(5, 3), kwargs=dict(stride=2, padding=(2, 1), groups=2)),
          dict(n=2, c=8, o=6, h=9, w=9, kernel=(2, 4), kwargs=dict(padding="same", dilation=(2, 1), groups=2)),
          dict(n=1, c=12, o=3, h=6, w=7, kernel=(1, 3), kwargs=dict(padding=(0, 2), groups=3)),
          dict(n=2, c=5, o=5, h=11, w=6, kernel=(3, 3), kwargs=dict(stride=(2, 1), dilation=2, padding=3, groups=5))]


@pytest.mark.parametrize("dtype", ["float32", "complex64", "complex128", "float16"])
@pytest.mark.parametrize("case", PUBLIC, ids=[str(i) for i in range(len(PUBLIC))])
def test_public_functions_match_pytorch(case, dtype):
    """conv2d and conv2d_backward with algorithm="kernels" on grouped layers: real, complex (PyTorch's
    conjugate convention) and float16 (computed in float32)."""
    rng = np.random.default_rng(3)
    groups = case["kwargs"]["groups"]
    shapes = [(case["n"], case["c"], case["h"], case["w"]), (case["o"], case["c"] // groups, *case["kernel"]),
              (case["o"],)]
    geom = make_geometry(*shapes, **case["kwargs"])
    assert _algorithm.kernel_set(geom) is direct
    shapes.append((case["n"], case["o"], geom.out_h, geom.out_w))
    arrays = [rng.standard_normal(shape) for shape in shapes]
    if dtype.startswith("complex"):
        arrays = [a + 1j * rng.standard_normal(a.shape) for a in arrays]
    x, w, b, g = (a.astype(dtype) for a in arrays)
    options = dict(case["kwargs"], algorithm="kernels")
    ours = [conv2d.conv2d(x, w, b, **options), *conv2d.conv2d_backward(g, x, w, **options)]
    if dtype.startswith("complex"):
        reference = torch_reference(x, w, b, g, **case["kwargs"])
        tol = COMPLEX_TOLERANCE[dtype]
    else:
        reference = torch_conv(*(a.astype(np.float64) for a in (x, w, b, g)), **case["kwargs"])
    for what, got, want in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, reference):
        assert got.dtype == np.dtype(dtype), what
        if dtype.startswith("complex"):
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=what)
        else:
            assert_close(conv2d.get_backend("numpy"), got, want, dtype, what)


def test_nonfinite_reaches_only_what_reads_it():
    """An inf in the last column, read only by the kernel's last column of taps: the whole-plane
    path's discarded columns (which do read it) must not turn the other taps' weight gradients NaN."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 6, 7))
    x[1, 2, 3, -1] = np.inf
    w = rng.standard_normal((4, 1, 3, 3))
    geom = make_geometry(x.shape, w.shape, None, groups=4)
    grad_out = rng.standard_normal((2, 4, geom.out_h, geom.out_w))
    _, grad_w = direct.backward(grad_out, x, w, geom, 2, 2**20, ("weight",))
    _, _, want, _ = torch_conv(x, w, np.zeros(4), grad_out, groups=4)
    np.testing.assert_array_equal(np.isfinite(grad_w), np.isfinite(want))
    assert not np.isfinite(grad_w[2, 0, :, 2]).any() and np.isfinite(grad_w[2, 0, :, :2]).all()


@pytest.mark.parametrize("layer", LAYERS[:12], ids=_id)
def test_nonfinite_weight_reaches_only_the_pixels_it_multiplies(layer):
    """An inf weight: the input gradient is non-finite exactly where PyTorch's is, and equal elsewhere (at
    stride 1 such a weight takes the transposed path, which never multiplies it by the padding)."""
    geom = _geometry(layer)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((layer["n"], geom.in_channels, geom.height, geom.width))
    w = rng.standard_normal((geom.out_channels, geom.channels_per_group, geom.kernel_h, geom.kernel_w))
    w[-1, 0, 0, 0] = np.inf
    grad_out = rng.standard_normal((layer["n"], geom.out_channels, geom.out_h, geom.out_w))
    grad_x, _ = direct.backward(grad_out, x, w, geom, 2, 2**20, ("x",))
    with np.errstate(invalid="ignore"):
        _, want, _ = _torch_padded(x, w, grad_out, layer)
    finite = np.isfinite(want)  # all finite where the tap reads only padding
    np.testing.assert_array_equal(np.isnan(grad_x), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(grad_x), np.isinf(want))
    assert_close(conv2d.get_backend("numpy"), grad_x[finite], want[finite], "float64", "grad_x")


def test_routing():
    """Direct's layers: grouped with up to DIRECT_MAX_CHANNELS_PER_GROUP channels a group, at any stride
    (measured: _algorithm.py); not one group, not wider groups."""
    limit = _algorithm.DIRECT_MAX_CHANNELS_PER_GROUP

    def routed(channels, groups, stride=1):
        geom = make_geometry((1, channels, 9, 9), (groups, channels // groups, 3, 3), None, groups=groups,
                             stride=stride)
        return _algorithm.kernel_set(geom) is direct

    assert routed(6, 6) and routed(2 * limit, 2, stride=2) and routed(2 * limit, 2)
    assert not routed(2, 1) and not routed(2 * (limit + 1), 2) and not routed(2 * (limit + 1), 2, stride=2)
