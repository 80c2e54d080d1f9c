"""algorithm="auto": the documented rule picks native, direct or slices by backend and layer, and the pick runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import conv2d
from conv2d import _conv
from conv2d._geometry import make_geometry
from conv2d._workspace import scratch_bytes
from conv2d.algorithms.direct import Direct

from .conftest import require_or_skip
from .oracle import assert_close, torch_conv

DENSE = make_geometry((2, 16, 8, 8), (16, 16, 3, 3), None, padding=1)
DEPTHWISE = make_geometry((2, 16, 8, 8), (16, 1, 3, 3), None, padding=1, groups=16)
FOUR_PER_GROUP = make_geometry((2, 16, 8, 8), (8, 4, 3, 3), None, padding=1, groups=4)
EIGHT_PER_GROUP = make_geometry((2, 16, 8, 8), (16, 8, 3, 3), None, padding=1, groups=2)
POINTWISE = make_geometry((2, 16, 8, 8), (16, 16, 1, 1), None)


def test_rule_on_numpy(without_compiled_kernels):
    numpy = conv2d.get_backend("numpy")
    assert _conv.auto_algorithm(numpy, geom=DENSE) == "slices"
    assert _conv.auto_algorithm(numpy, geom=DEPTHWISE) == "direct"
    assert _conv.auto_algorithm(numpy, geom=FOUR_PER_GROUP) == "direct"
    assert _conv.auto_algorithm(numpy, geom=EIGHT_PER_GROUP) == "slices"
    assert _conv.auto_algorithm(numpy) == "slices"  # no layer: the patch builder pooling borrows


def test_rule_on_torch_and_jax():
    torch = require_or_skip("torch") and conv2d.get_backend("torch")
    for geom in (DENSE, DEPTHWISE, POINTWISE):
        for deterministic in (False, True):  # PyTorch's CPU convolution is deterministic
            assert _conv.auto_algorithm(torch, deterministic, geom) == "native"
    assert _conv.auto_algorithm(torch) == "slices"
    require_or_skip("jax")
    jax = conv2d.get_backend("jax")
    assert _conv.auto_algorithm(jax, geom=DENSE) == "native"
    assert _conv.auto_algorithm(jax, geom=POINTWISE) == "slices"
    assert _conv.auto_algorithm(jax, geom=DEPTHWISE) == "slices"  # direct's many small ops cost more on JAX


def test_deterministic_mode_skips_a_native_path_that_cannot_honour_it():
    require_or_skip("jax")
    import jax

    from conv2d.backends.jax import JaxNative

    gpu_like = JaxNative(jax, on_gpu=True)
    backend = conv2d.get_backend("jax")
    assert gpu_like.deterministic is False
    fake = dataclasses.replace(backend, native=gpu_like)
    assert _conv.auto_algorithm(fake, False, DENSE) == "native"
    assert _conv.auto_algorithm(fake, True, DENSE) == "slices"
    x = backend.asarray(np.ones((1, 16, 8, 8)), dtype="float32")
    w = backend.asarray(np.ones((16, 16, 3, 3)), dtype="float32")
    with pytest.raises(ValueError, match="not bitwise reproducible.*algorithm='auto'"):
        gpu_like.backward(conv2d.conv2d(x, w, padding=1), x, w, DENSE, deterministic=True)


def test_numpy_depthwise_takes_the_direct_path(monkeypatch):
    """auto on a depthwise layer runs Direct (proved by making im2col fail) and matches PyTorch."""
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((3, 6, 9, 7)), rng.standard_normal((6, 1, 3, 3)), rng.standard_normal(6)
    g = rng.standard_normal((3, 6, 9, 7))

    def im2col_must_not_run(*args, **kwargs):
        raise AssertionError("auto built a patch matrix for a depthwise layer")

    monkeypatch.setattr(conv2d.algorithms.Slices, "patches", im2col_must_not_run)
    y = conv2d.conv2d(x, w, b, padding=1, groups=6)
    grads = conv2d.conv2d_backward(g, x, w, padding=1, groups=6)
    numpy = conv2d.get_backend("numpy")
    for name, ours, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, *grads),
                               torch_conv(x, w, b, g, padding=1, groups=6)):
        assert_close(numpy, ours, ref, "float64", name)


def test_direct_falls_back_to_slices_when_one_sample_does_not_fit(monkeypatch):
    """A limit below one sample's direct scratch: the call splits output rows (slices) and stays right."""
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((2, 4, 40, 40)), rng.standard_normal((4, 1, 3, 3))
    g = rng.standard_normal((2, 4, 40, 40))
    geom = make_geometry(x.shape, w.shape, None, padding=1, groups=4)
    limit = scratch_bytes(geom, 1, 2, 8)  # two output rows of im2col
    assert not Direct.fits(geom, 8, limit)
    used = []
    monkeypatch.setattr(conv2d.algorithms.Slices, "patches", lambda *a, _p=conv2d.algorithms.Slices.patches: used.append(1) or _p(*a))
    grads = conv2d.conv2d_backward(g, x, w, padding=1, groups=4, algorithm="direct", max_workspace_bytes=limit)
    assert used
    numpy = conv2d.get_backend("numpy")
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), grads, torch_conv(x, w, np.zeros(4), g, padding=1, groups=4)[1:]):
        assert_close(numpy, ours, ref, "float64", name)


def test_torch_auto_runs_pytorchs_own_convolution(monkeypatch):
    torch = require_or_skip("torch")
    backend = conv2d.get_backend("torch")
    calls = []
    original = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = backend.asarray(np.random.default_rng(0).standard_normal((2, 3, 6, 6)), dtype="float32")
    w = backend.asarray(np.random.default_rng(1).standard_normal((4, 3, 3, 3)), dtype="float32")
    conv2d.conv2d(x, w, padding=1)
    assert calls == [1]
