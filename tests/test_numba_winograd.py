"""NumPy's compiled Winograd kernel set (``conv2d/backends/_numba/winograd.py``) against PyTorch.

Random 3x3 stride-1 layers (batch 1-5, odd and even sizes, paddings 0-3 on each side, asymmetric
ones included, 3 giving the input gradient a negative offset; groups) in float32, float64 and
complex64: the forward and both gradients, computed by the module directly (in chunks of one tile row up to the whole batch, one task or several) and
through ``conv2d._conv`` with ``algorithm="kernels"`` (which routes these layers to the module), each
gradient alone too (``needs``). The references are PyTorch's convolution and autograd, asked with
conjugated operands for the raw linear maps that ``_conv`` computes, and as they are for the public
functions (conjugate convention on complex data).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import conv2d
from conv2d import _conv
from conv2d._geometry import Geometry, make_geometry

from .conftest import require_or_skip

require_or_skip("numba")
require_or_skip("threadpoolctl")
torch = require_or_skip("torch")

from conv2d.backends._numba import _algorithm, winograd  # noqa: E402  (after the skips: imports numba's kernels)


@pytest.fixture(autouse=True)
def every_batch_runs_winograd(monkeypatch):
    """The small layers drawn here run the Winograd kernels, not im2col (see test_few_tiles_run_im2col)."""
    monkeypatch.setattr(winograd, "_FEWEST_TILES", 0)


TOLERANCE = {"float32": 2e-5, "complex64": 2e-5, "float64": 1e-12}  # of the reference's largest magnitude


def _draw(rng: np.random.Generator, wide: bool) -> dict:
    """A random 3x3 stride-1 layer; `wide`: at least 8 channels and filters per group (routed here)."""
    groups = int(rng.choice([1, 2, 3]))
    low = 8 if wide else 1
    return dict(n=int(rng.integers(1, 6)), groups=groups, c=groups * int(rng.integers(low, low + 5)),
                o=groups * int(rng.integers(low, low + 5)), h=int(rng.integers(3, 13)), w=int(rng.integers(3, 13)),
                padding=tuple(int(p) for p in rng.integers(0, 4, size=4)))


def _geometry(layer: dict) -> Geometry:
    """The layer's geometry, with its (top, bottom, left, right) padding, asymmetric ones too (which the
    public functions give 3x3 layers only through their geometry)."""
    top, bottom, left, right = layer["padding"]
    geom = make_geometry((layer["n"], layer["c"], layer["h"], layer["w"]), (layer["o"], layer["c"] // layer["groups"], 3, 3),
                         (layer["o"],), groups=layer["groups"])
    return dataclasses.replace(geom, padding=(top, bottom, left, right), out_h=layer["h"] + top + bottom - 2,
                               out_w=layer["w"] + left + right - 2)


def _data(layer: dict, geom, dtype: str, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)

    def draw(*shape):
        a = rng.standard_normal(shape)
        return (a + 1j * rng.standard_normal(shape) if dtype.startswith("complex") else a).astype(dtype)

    return [draw(layer["n"], layer["c"], layer["h"], layer["w"]), draw(layer["o"], layer["c"] // layer["groups"], 3, 3),
            draw(layer["o"]), draw(layer["n"], layer["o"], geom.out_h, geom.out_w)]


def _reference(x, w, b, g, geom) -> list[np.ndarray]:
    """PyTorch's y, and the transposes of the forward's linear maps applied to g (grad_x, grad_w), in 128 bits.

    PyTorch's autograd gives the transposes applied with conjugated operands (its convention for complex
    data, ``conv2d._complex``): asked with conj(x) and conj(w), it gives the raw maps.
    """
    wide = np.complex128 if np.iscomplexobj(x) else np.float64
    top, bottom, left, right = geom.padding

    def conv(x, w, b=None):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (left, right, top, bottom)), w, b,
                                          groups=geom.groups)

    xt, wt, bt, gt = (torch.tensor(a.astype(wide)) for a in (x, w, b, g))
    y = conv(xt, wt, bt)
    leaves = [torch.tensor(np.conj(a).astype(wide), requires_grad=True) for a in (x, w)]
    grad_x, grad_w = torch.autograd.grad(conv(*leaves), leaves, gt)
    return [a.detach().numpy() for a in (y, grad_x, grad_w)]


def _assert_close(actual, expected, dtype: str, what: str) -> None:
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype}, not {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE[dtype] * scale, err_msg=what)


_RNG = np.random.default_rng(20260611)
LAYERS = [_draw(_RNG, wide=False) for _ in range(8)] + [_draw(_RNG, wide=True) for _ in range(4)]
ROUTED = [_draw(_RNG, wide=True) for _ in range(4)]


def _ids(layer: dict) -> str:
    return f"n{layer['n']}c{layer['c']}o{layer['o']}g{layer['groups']}-{layer['h']}x{layer['w']}-p{''.join(map(str, layer['padding']))}"


@pytest.mark.parametrize("chunking", [(1, 1), (4096, 3), (2**30, 2)], ids=["tile-rows", "small-chunks", "one-chunk"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64"])
@pytest.mark.parametrize("layer", LAYERS, ids=_ids)
def test_module_matches_pytorch(layer, dtype, chunking):
    """forward and backward of the module itself, with chunks of one tile row (across samples' edges),
    a few KB, or the whole batch, dealt to 1 to 3 tasks."""
    cache_bytes, workers = chunking
    geom = _geometry(layer)
    x, w, b, g = _data(layer, geom, dtype, seed=len(_ids(layer)))
    reference = _reference(x, w, b, g, geom)
    y = winograd.forward(x, w, b, geom, workers, cache_bytes)
    grad_x, grad_w = winograd.backward(g, x, w, geom, workers, cache_bytes)
    for what, actual, expected in zip(("y", "grad_x", "grad_weight"), (y, grad_x, grad_w), reference):
        _assert_close(actual, expected, dtype, what)


@pytest.mark.parametrize("needs", [("x", "weight"), ("x",), ("weight",)])
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64"])
@pytest.mark.parametrize("layer", ROUTED, ids=_ids)
def test_kernels_route_here_and_match_pytorch(layer, dtype, needs):
    """``algorithm="kernels"`` on NumPy runs the module on these layers; each gradient alone (the
    other None), through ``_conv.backward``'s `needs`."""
    geom = _geometry(layer)
    assert _algorithm.kernel_set(geom) is winograd
    x, w, b, g = _data(layer, geom, dtype, seed=len(needs))
    reference = _reference(x, w, b, g, geom)
    backend = conv2d.get_backend("numpy")
    y, _ = _conv.forward(backend, x, w, b, geom, "kernels", 2**30)
    grad_x, grad_w, grad_b = _conv.backward(backend, g, x, w, geom, "kernels", 2**30, needs=needs)
    _assert_close(y, reference[0], dtype, "y")
    _assert_close(grad_b, g.sum(axis=(0, 2, 3)), dtype, "grad_bias")
    for name, actual, expected in (("x", grad_x, reference[1]), ("weight", grad_w, reference[2])):
        if name in needs:
            _assert_close(actual, expected, dtype, f"grad_{name}")
        else:
            assert actual is None, f"grad_{name} computed though not asked for"


def test_public_functions_complex_conjugate_convention():
    """conv2d and conv2d_backward with algorithm='kernels' on a complex layer routed here give PyTorch's
    autograd (the conjugate Wirtinger gradients)."""
    layer = dict(n=2, groups=2, c=16, o=18, h=7, w=8, padding=(1, 1, 1, 1))
    geom = _geometry(layer)
    assert _algorithm.kernel_set(geom) is winograd
    x, w, b, g = _data(layer, geom, "complex64", seed=3)
    leaves = [torch.tensor(a.astype(np.complex128), requires_grad=True) for a in (x, w, b)]
    y = torch.nn.functional.conv2d(*leaves, padding=1, groups=2)
    grads = torch.autograd.grad(y, leaves, torch.tensor(g.astype(np.complex128)))
    options = dict(padding=1, groups=2, algorithm="kernels")
    ours = [conv2d.conv2d(x, w, b, **options), *conv2d.conv2d_backward(g, x, w, **options)]
    for what, actual, expected in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours,
                                      [y.detach().numpy(), *(t.numpy() for t in grads)]):
        _assert_close(actual, expected, "complex64", what)


def test_routing():
    """3x3 stride-1 dilation-1 layers with enough channels per group come here; the others do not."""
    def geom(c=32, o=32, kernel=3, stride=1, dilation=1, groups=1):
        return make_geometry((1, c, 9, 9), (o, c // groups, kernel, kernel), None, stride=stride, dilation=dilation,
                             groups=groups)

    assert _algorithm.kernel_set(geom()) is winograd
    assert _algorithm.kernel_set(geom(c=64, o=64, groups=4)) is winograd
    assert winograd.winograd_pays(geom(c=2, o=2))
    for other in (geom(kernel=5), geom(stride=2), geom(dilation=2), geom(c=1), geom(c=32, groups=32)):
        assert _algorithm.kernel_set(other) is not winograd
        assert not winograd.winograd_pays(other)


@pytest.mark.parametrize("needs", [("x", "weight"), ("weight",)])
def test_empty_batch(needs):
    """No samples: an empty output and input gradient, and a zero weight gradient (no task runs)."""
    layer = dict(n=0, groups=1, c=8, o=8, h=6, w=5, padding=(1, 1, 1, 1))
    geom = _geometry(layer)
    x, w, b, g = _data(layer, geom, "float32", seed=0)
    assert winograd.forward(x, w, b, geom, 2, 2**20).shape == (0, 8, 6, 5)
    grad_x, grad_w = winograd.backward(g, x, w, geom, 2, 2**20, needs)
    assert grad_w.shape == w.shape and not grad_w.any()
    assert grad_x is None if needs == ("weight",) else grad_x.shape == x.shape


def test_few_tiles_run_im2col(monkeypatch):
    """A call with fewer than _FEWEST_TILES tiles runs im2col (forward and backward), and gets the same results."""
    monkeypatch.undo()  # the default threshold
    layer = dict(n=1, groups=1, c=8, o=8, h=6, w=6, padding=(1, 1, 1, 1))
    geom = _geometry(layer)
    x, w, b, g = _data(layer, geom, "float64", seed=2)
    reference = _reference(x, w, b, g, geom)
    calls = []
    for name in ("forward", "backward"):
        original = getattr(winograd.im2col, name)
        monkeypatch.setattr(winograd.im2col, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    ours = [winograd.forward(x, w, b, geom, 2, 2**20), *winograd.backward(g, x, w, geom, 2, 2**20)]
    assert calls == ["forward", "backward"]
    for what, actual, expected in zip(("y", "grad_x", "grad_weight"), ours, reference):
        _assert_close(actual, expected, "float64", what)
