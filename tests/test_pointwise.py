"""algorithm="pointwise": 1x1 convolutions as batched products, against PyTorch on every backend; errors; auto."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d import _conv
from conv2d._geometry import make_geometry
from conv2d.algorithms.pointwise import Pointwise, _sample_scratch

from .conftest import one_layer_in_three, require_or_skip
from .oracle import assert_close, layer_data, torch_conv

require_or_skip("torch")


def _random_layer(seed: int) -> dict:
    """A random 1x1 layer: strides (the kernel skips rows and columns), padding (borders that read
    only zeros), groups, one sample or several."""
    rng = np.random.default_rng(seed)
    groups = int(rng.choice([1, 1, 2, 3]))
    return dict(n=int(rng.integers(1, 4)), c=groups * int(rng.integers(1, 5)), o=groups * int(rng.integers(1, 5)),
                h=int(rng.integers(1, 10)), w=int(rng.integers(1, 10)),
                kwargs=dict(stride=[1, 1, 2, (1, 3), (3, 2)][seed % 5], padding=[0, 0, 1, (2, 0)][seed % 4],
                            groups=groups))


LAYERS = [_random_layer(seed) for seed in range(10)]


def jax_keeps(test: str, params: dict) -> bool | None:
    """JAX's share of test_pointwise_matches_pytorch under the default profile: a third of the layers, each in one dtype."""
    return one_layer_in_three(test, "test_pointwise_matches_pytorch", LAYERS, params)


def _ids(layer: dict) -> str:
    kw = layer["kwargs"]
    size = f"n{layer['n']}c{layer['c']}o{layer['o']}h{layer['h']}w{layer['w']}"
    return f"{size}-s={kw['stride']}-pad={kw['padding']}-g={kw['groups']}"


def _data(layer: dict, seed: int, dtype: str):
    return layer_data(layer, seed, dtype, (1, 1))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layer", LAYERS, ids=_ids)
def test_pointwise_matches_pytorch(backend, layer, dtype):
    """Output and the three gradients equal PyTorch's conv2d and autograd; the input is not modified
    (the products read it in place)."""
    x, w, b, g = _data(layer, 1, dtype)
    y_ref, *grads_ref = torch_conv(x, w, b, g, **layer["kwargs"])
    X, W, B, G = (backend.asarray(a, dtype=dtype) for a in (x, w, b, g))
    y = conv2d.conv2d(X, W, B, algorithm="pointwise", **layer["kwargs"])
    grads = conv2d.conv2d_backward(G, X, W, algorithm="pointwise", **layer["kwargs"])
    assert_close(backend, y, y_ref, dtype, "y")
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref):
        assert backend.owns(ours) and ours.dtype == X.dtype, name
        assert_close(backend, ours, ref, dtype, name)
    np.testing.assert_array_equal(backend.to_numpy(X), x.astype(dtype))


def test_output_is_not_a_view_of_the_input():
    """Writing into the result leaves the input alone (a 1x1 product on a view would be easy to get wrong)."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((3, 3, 1, 1))
    before = x.copy()
    y = conv2d.conv2d(x, w, algorithm="pointwise")
    y -= 1.0
    grad_x, _, _ = conv2d.conv2d_backward(y, x, w, algorithm="pointwise")
    grad_x *= 2.0
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("samples", [1, 2])
def test_chunks_of_samples_give_the_same_result(cpu_backend, samples):
    layer = dict(n=5, c=4, o=6, h=5, w=6, kwargs=dict(stride=2, padding=1, groups=2))
    x, w, b, g = _data(layer, 3, "float64")
    geom = make_geometry(x.shape, w.shape, b.shape, **layer["kwargs"])
    kw = dict(layer["kwargs"], algorithm="pointwise", max_workspace_bytes=samples * _sample_scratch(geom, 8))
    y_ref, *grads_ref = torch_conv(x, w, b, g, **layer["kwargs"])
    X, W, B, G = (cpu_backend.asarray(a) for a in (x, w, b, g))
    assert_close(cpu_backend, conv2d.conv2d(X, W, B, **kw), y_ref, "float64", "y")
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), conv2d.conv2d_backward(G, X, W, **kw), grads_ref):
        assert_close(cpu_backend, ours, ref, "float64", name)


def test_other_kernels_are_refused():
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((1, 2, 6, 6)), rng.standard_normal((2, 2, 3, 2))
    with pytest.raises(ValueError, match="algorithm 'pointwise' computes 1x1 convolutions, not this layer's 3x2 kernel; use"):
        conv2d.conv2d(x, w, algorithm="pointwise")


def test_auto_runs_pointwise_on_numpy_1x1_layers(monkeypatch, without_compiled_kernels):
    geom = make_geometry((2, 8, 5, 5), (4, 8, 1, 1), None, stride=2)
    assert _conv.auto_algorithm(conv2d.get_backend("numpy"), geom=geom) == "pointwise"
    assert _conv.auto_algorithm(conv2d.get_backend("array_api_strict"), geom=geom) == "slices"
    not_1x1 = make_geometry((2, 8, 5, 5), (4, 8, 3, 1), None)
    assert _conv.auto_algorithm(conv2d.get_backend("numpy"), geom=not_1x1) != "pointwise"
    ran = []
    forward = Pointwise.forward
    monkeypatch.setattr(Pointwise, "forward", staticmethod(lambda *a: ran.append(1) or forward(*a)))
    x, w, b, _ = _data(dict(n=2, c=8, o=4, h=5, w=5, kwargs=dict(stride=2, padding=0, groups=1)), 5, "float64")
    y_ref = torch_conv(x, w, b, stride=2)[0]
    assert_close(conv2d.get_backend("numpy"), conv2d.conv2d(x, w, b, stride=2), y_ref, "float64", "y")
    assert ran == [1]
