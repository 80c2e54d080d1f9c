"""algorithm="winograd": F(2x2, 3x3) against PyTorch on every backend, its chunks, its errors and auto's rule."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d import _conv
from conv2d._geometry import make_geometry
from conv2d.algorithms.winograd import _sample_scratch

from .conftest import one_layer_in_three, require_or_skip
from .oracle import assert_close, layer_data, torch_conv

require_or_skip("torch")


def _random_layer(seed: int) -> dict:
    """A random 3x3 stride-1 layer: odd and even output sizes (a tile of 2x2 outputs half outside),
    symmetric, asymmetric and "same" padding, dilations (one tile per phase), groups, one sample or several."""
    rng = np.random.default_rng(seed)
    groups = int(rng.choice([1, 1, 2, 3]))
    padding = [0, 1, 2, (0, 2), (2, 1), "same"][seed % 6]
    dilation = [1, 1, 2, (1, 3), (3, 2)][seed % 5]
    reach = 2 * max(dilation if isinstance(dilation, tuple) else (dilation,)) + 1  # fits without padding
    return dict(n=int(rng.integers(1, 4)), c=groups * int(rng.integers(1, 5)), o=groups * int(rng.integers(1, 5)),
                h=int(rng.integers(reach, reach + 9)), w=int(rng.integers(reach, reach + 9)),
                kwargs=dict(padding=padding, dilation=dilation, groups=groups))


LAYERS = [_random_layer(seed) for seed in range(15)]


def jax_keeps(test: str, params: dict) -> bool | None:
    """JAX's share of test_winograd_matches_pytorch under the default profile: a third of the layers, each in one dtype."""
    return one_layer_in_three(test, "test_winograd_matches_pytorch", LAYERS, params)


def _ids(layer: dict) -> str:
    kw = layer["kwargs"]
    size = f"n{layer['n']}c{layer['c']}o{layer['o']}h{layer['h']}w{layer['w']}"
    return f"{size}-pad={kw['padding']}-d={kw['dilation']}-g={kw['groups']}"


def _data(layer: dict, seed: int, dtype: str):
    return layer_data(layer, seed, dtype, (3, 3))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layer", LAYERS, ids=_ids)
def test_winograd_matches_pytorch(backend, layer, dtype):
    """Output and the three gradients equal PyTorch's conv2d and autograd, on every backend."""
    x, w, b, g = _data(layer, 1, dtype)
    y_ref, *grads_ref = torch_conv(x, w, b, g, **layer["kwargs"])
    X, W, B, G = (backend.asarray(a, dtype=dtype) for a in (x, w, b, g))
    y = conv2d.conv2d(X, W, B, algorithm="winograd", **layer["kwargs"])
    grads = conv2d.conv2d_backward(G, X, W, algorithm="winograd", **layer["kwargs"])
    assert_close(backend, y, y_ref, dtype, "y")
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref):
        assert backend.owns(ours) and ours.dtype == X.dtype, name
        assert_close(backend, ours, ref, dtype, name)


def test_float16_matches_pytorch():
    """Half precision: the transforms add and halve only, so the error stays that of the dtype."""
    x, w, b, g = _data(dict(n=2, c=8, o=8, h=9, w=10, kwargs=dict(padding=1, groups=1)), 2, "float16")
    y_ref, *grads_ref = torch_conv(x, w, b, g, padding=1)
    numpy = conv2d.get_backend("numpy")
    f16 = [a.astype(np.float16) for a in (x, w, b, g)]
    assert_close(numpy, conv2d.conv2d(*f16[:3], padding=1, algorithm="winograd"), y_ref, "float16", "y")
    grads = conv2d.conv2d_backward(f16[3], f16[0], f16[1], padding=1, algorithm="winograd")
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref):
        assert_close(numpy, ours, ref, "float16", name)


@pytest.mark.parametrize("samples", [1, 2, 3])
def test_chunks_of_samples_give_the_same_result(cpu_backend, samples):
    """A workspace limit that fits `samples` samples at a time splits the batch; the weight gradient
    summed over the chunks equals PyTorch's, and nothing else changes."""
    layer = dict(n=5, c=4, o=6, h=7, w=8, kwargs=dict(padding=1, dilation=(1, 2), groups=2))
    x, w, b, g = _data(layer, 3, "float64")
    geom = make_geometry(x.shape, w.shape, b.shape, **layer["kwargs"])
    limit = samples * _sample_scratch(geom, 8)
    y_ref, *grads_ref = torch_conv(x, w, b, g, **layer["kwargs"])
    X, W, B, G = (cpu_backend.asarray(a) for a in (x, w, b, g))
    kw = dict(layer["kwargs"], algorithm="winograd", max_workspace_bytes=limit)
    assert_close(cpu_backend, conv2d.conv2d(X, W, B, **kw), y_ref, "float64", "y")
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), conv2d.conv2d_backward(G, X, W, **kw), grads_ref):
        assert_close(cpu_backend, ours, ref, "float64", name)


def test_a_sample_over_the_limit_runs_slices_and_stays_right(monkeypatch):
    """Below one sample's scratch the call splits output rows with ``slices`` (which can), as ``direct`` does."""
    layer = dict(n=2, c=3, o=4, h=12, w=12, kwargs=dict(padding=1, groups=1))
    x, w, b, g = _data(layer, 4, "float64")
    geom = make_geometry(x.shape, w.shape, b.shape, padding=1)
    limit = _sample_scratch(geom, 8) // 2
    from conv2d.algorithms.winograd import Winograd

    def must_not_run(*args, **kwargs):
        raise AssertionError("winograd ran on a sample over the workspace limit")

    monkeypatch.setattr(Winograd, "forward", must_not_run)
    monkeypatch.setattr(Winograd, "backward", must_not_run)
    y_ref, *grads_ref = torch_conv(x, w, b, g, padding=1)
    kw = dict(padding=1, algorithm="winograd", max_workspace_bytes=limit)
    numpy = conv2d.get_backend("numpy")
    assert_close(numpy, conv2d.conv2d(x, w, b, **kw), y_ref, "float64", "y")
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), conv2d.conv2d_backward(g, x, w, **kw), grads_ref):
        assert_close(numpy, ours, ref, "float64", name)


@pytest.mark.parametrize("kwargs, kernel, wrong", [
    (dict(), (5, 5), "kernel 5x5"),
    (dict(stride=2), (3, 3), r"stride \(2, 2\)"),
    (dict(stride=(1, 2), dilation=2), (3, 1), r"kernel 3x1, stride \(1, 2\)"),
])
def test_other_layers_are_refused_with_what_differs(kwargs, kernel, wrong):
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((1, 2, 9, 9)), rng.standard_normal((2, 2, *kernel))
    x_before, w_before = x.copy(), w.copy()
    for call in (lambda: conv2d.conv2d(x, w, algorithm="winograd", **kwargs),
                 lambda: conv2d.conv2d_backward(conv2d.conv2d(x, w, **kwargs), x, w, algorithm="winograd", **kwargs)):
        with pytest.raises(ValueError, match=f"algorithm 'winograd' computes 3x3 .* not this layer's {wrong}; use algorithm='auto'"):
            call()
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(w, w_before)


def test_layer_runs_winograd_and_matches_pytorch():
    """The layer class with algorithm="winograd": forward and the gradient backwardpass applies."""
    torch = require_or_skip("torch")
    rng = np.random.default_rng(6)
    layer = conv2d.ConvolutionLayer((4, 6, 7), (3, 3), 5, padding=1, algorithm="winograd", seed=1)
    x = rng.standard_normal((3, 4, 6, 7))
    weights = np.array(layer.weights)
    out = layer.forwardpass(x)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(weights, requires_grad=True)
    bt = torch.tensor(np.array(layer.biases).reshape(-1), requires_grad=True)
    ref = torch.sigmoid(torch.nn.functional.conv2d(xt, wt, bt, padding=1))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    delta = rng.standard_normal(out.shape)
    ref.backward(torch.tensor(delta))
    layer.backwardpass(0.5, x, delta)
    np.testing.assert_allclose(layer.weights, weights - 0.5 * wt.grad.numpy(), rtol=1e-10, atol=1e-12)


def _geom(c, o, k=3, stride=1, dilation=1, groups=1, hw=8):
    return make_geometry((2, c, hw, hw), (o, c // groups, k, k), None, padding=1, stride=stride,
                         dilation=dilation, groups=groups)


def test_auto_rule(without_compiled_kernels):
    """auto picks winograd on NumPy for 3x3 stride-1 layers (dilated too) of at least WINOGRAD_WIDE_CHANNELS
    channels and filters per group, or WINOGRAD_MIN_CHANNELS on small outputs; not for narrower, strided or
    other kernels, nor on other backends."""
    numpy = conv2d.get_backend("numpy")
    least, wide = _conv.WINOGRAD_MIN_CHANNELS, _conv.WINOGRAD_WIDE_CHANNELS
    small = int(_conv.WINOGRAD_SMALL_OUTPUT ** 0.5)  # a square output of that many positions
    assert _conv.auto_algorithm(numpy, geom=_geom(least, least, hw=small)) == "winograd"
    assert _conv.auto_algorithm(numpy, geom=_geom(least, wide, hw=small + 1)) == "slices"  # narrow, larger output
    assert _conv.auto_algorithm(numpy, geom=_geom(wide, wide, hw=4 * small)) == "winograd"  # wide, any output
    assert _conv.auto_algorithm(numpy, True, _geom(2 * wide, 2 * wide, groups=2, hw=4 * small)) == "winograd"
    assert _conv.auto_algorithm(numpy, geom=_geom(least, least, dilation=2, hw=small)) == "winograd"
    for geom in (_geom(least // 2, least), _geom(least, least // 2), _geom(least, least, stride=2),
                 _geom(least, least, k=5), _geom(2 * least, 2 * least, groups=4)):
        assert _conv.auto_algorithm(numpy, geom=geom) == "slices", geom
    strict = conv2d.get_backend("array_api_strict")
    assert _conv.auto_algorithm(strict, geom=_geom(least, least)) == "slices"


def test_auto_runs_winograd_on_a_wide_numpy_layer(monkeypatch, without_compiled_kernels):
    """The default call on such a layer runs winograd (recorded), with PyTorch's results."""
    from conv2d.algorithms.winograd import Winograd

    ran = []
    forward, backward = Winograd.forward, Winograd.backward
    monkeypatch.setattr(Winograd, "forward", staticmethod(lambda *a: ran.append("forward") or forward(*a)))
    monkeypatch.setattr(Winograd, "backward", staticmethod(lambda *a, **k: ran.append("backward") or backward(*a, **k)))
    layer = dict(n=2, c=32, o=32, h=6, w=5, kwargs=dict(padding=1, groups=1))
    x, w, b, g = _data(layer, 7, "float32")
    y_ref, *grads_ref = torch_conv(x, w, b, g, padding=1)
    X, W, B, G = (a.astype(np.float32) for a in (x, w, b, g))
    numpy = conv2d.get_backend("numpy")
    assert_close(numpy, conv2d.conv2d(X, W, B, padding=1), y_ref, "float32", "y")
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), conv2d.conv2d_backward(G, X, W, padding=1), grads_ref):
        assert_close(numpy, ours, ref, "float32", name)
    assert ran == ["forward", "backward"]
