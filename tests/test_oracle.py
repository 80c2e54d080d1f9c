"""conv2d and conv2d_backward against PyTorch's conv2d and autograd, and against plain loops."""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d._geometry import make_geometry, normalize_padding

from .algorithms import (
    algorithm_cases,
    algorithm_params,
    applicable,
    case_geometry,
    case_id,
    pair_params,
    random_case,
)
from .conftest import require_or_skip
from .oracle import assert_close, loop_conv, missing_algorithm, torch_conv

require_or_skip("torch")


_random_case = random_case  # the general distribution of random layers (tests/algorithms.py)


# Hand-picked corners, then random geometries from a fixed seed.
CASES = [
    dict(n=1, c=1, o=1, h=1, w=1, kh=1, kw=1, kwargs={}),  # 1x1 everything
    dict(n=2, c=3, o=4, h=5, w=5, kh=5, kw=5, kwargs={}),  # kernel = input
    dict(n=1, c=2, o=3, h=3, w=4, kh=5, kw=6, kwargs=dict(padding=1)),  # kernel = padded input
    dict(n=2, c=3, o=2, h=9, w=7, kh=2, kw=2, kwargs=dict(stride=3)),  # stride > kernel
    dict(n=2, c=4, o=4, h=8, w=8, kh=3, kw=3, kwargs=dict(padding=1, groups=4)),  # depthwise
    dict(n=2, c=4, o=8, h=8, w=6, kh=3, kw=3, kwargs=dict(padding=1, groups=4)),  # depthwise, multiplier 2
    dict(n=3, c=2, o=3, h=7, w=9, kh=2, kw=4, kwargs=dict(padding="same", dilation=(2, 1))),  # odd total: asymmetric
    dict(n=2, c=3, o=2, h=10, w=11, kh=3, kw=2, kwargs=dict(stride=(2, 3), padding=(2, 0), dilation=(3, 2))),
    dict(n=1, c=6, o=4, h=6, w=6, kh=1, kw=1, kwargs=dict(groups=2)),  # pointwise, grouped
] + [_random_case(np.random.default_rng(seed)) for seed in range(30)]


def _ids(case: dict) -> str:
    return case_id(case)


# Every registered algorithm with the corners it computes and random layers inside its domain, 20 in all
# (tests/algorithms.py): a layer an algorithm does not compute is not an oracle item here, but an
# error in test_inapplicable_pairs_raise.
PAIRS = algorithm_cases(20, seed=100, fixed=CASES[:9])


def jax_keeps(test: str, params: dict) -> bool | None:
    """JAX's share of test_matches_pytorch under the default profile (tests/conftest.py): pair ``i`` of
    PAIRS in float64 where ``i % 8 == 0`` and in float32 where ``i % 8 == 4``, about two layers of each
    algorithm in each dtype (JAX compiles every shape: 2 s a layer); every other test: the default."""
    if test != "test_matches_pytorch":
        return None
    place = next(i for i, pair in enumerate(PAIRS) if pair == (params["algorithm"], params["case"]))
    return place % 8 == (0 if params["dtype"] == "float64" else 4)


def _data(case: dict, seed: int):
    rng = np.random.default_rng(seed)
    groups = case["kwargs"].get("groups", 1)
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    w = rng.standard_normal((case["o"], case["c"] // groups, case["kh"], case["kw"]))
    b = rng.standard_normal(case["o"])
    return rng, x, w, b


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("algorithm", "case"), pair_params(PAIRS))
def test_matches_pytorch(backend, case, dtype, algorithm):
    """Output and all three gradients agree with PyTorch (float64 reference), every backend and algorithm,
    on layers the algorithm computes (the backends without it: deselected, see tests/conftest.py)."""
    rng, x, w, b = _data(case, 1)
    geom = make_geometry(x.shape, w.shape, b.shape, **case["kwargs"])
    assert applicable(algorithm, backend, geom)
    grad_out = rng.standard_normal((case["n"], case["o"], geom.out_h, geom.out_w))
    # Round the data to the tested dtype first, so the reference sees exactly what we see.
    x, w, b, grad_out = (a.astype(dtype).astype(np.float64) for a in (x, w, b, grad_out))
    y_ref, gx_ref, gw_ref, gb_ref = torch_conv(x, w, b, grad_out, **case["kwargs"])

    X, W, B, G = (backend.asarray(a, dtype=dtype) for a in (x, w, b, grad_out))
    y = conv2d.conv2d(X, W, B, algorithm=algorithm, **case["kwargs"])
    gx, gw, gb = conv2d.conv2d_backward(G, X, W, algorithm=algorithm, **case["kwargs"])

    for name, ours in (("y", y), ("grad_x", gx), ("grad_weight", gw), ("grad_bias", gb)):
        assert backend.owns(ours), f"{name} left the input's library"
        assert ours.dtype == X.dtype, f"{name} has dtype {ours.dtype}, input {X.dtype}"
    assert_close(backend, y, y_ref, dtype, "y")
    assert_close(backend, gx, gx_ref, dtype, "grad_x")
    assert_close(backend, gw, gw_ref, dtype, "grad_weight")
    assert_close(backend, gb, gb_ref, dtype, "grad_bias")


@pytest.mark.parametrize("name", algorithm_params())
def test_inapplicable_pairs_raise(backend, name):
    """Where the rule (conv2d._conv.applicable) says an algorithm does not apply, conv2d and
    conv2d_backward raise ValueError (the tests' oracle items leave those pairs out), and where it says
    it applies, choosing it does not raise: on 200 random layers, whichever of them fall outside."""
    from conv2d._conv import choose_algorithm

    rng = np.random.default_rng(7)
    outside = 0
    for _ in range(200):
        case = random_case(rng)
        geom = case_geometry(case)
        if applicable(name, backend, geom):
            assert choose_algorithm(name, backend, geom=geom).name is not None
            continue
        outside += 1
        if outside > 3:  # three calls each are enough; the rule is checked on the rest
            with pytest.raises(ValueError, match=f"algorithm '{name}'"):
                choose_algorithm(name, backend, geom=geom)
            continue
        _, x, w, b = _data(case, 8)
        X, W, B = (backend.asarray(a) for a in (x, w, b))
        with pytest.raises(ValueError, match=f"algorithm '{name}'"):
            conv2d.conv2d(X, W, B, algorithm=name, **case["kwargs"])
        G = backend.asarray(np.zeros((case["n"], case["o"], geom.out_h, geom.out_w)))
        with pytest.raises(ValueError, match=f"algorithm '{name}'"):
            conv2d.conv2d_backward(G, X, W, algorithm=name, **case["kwargs"])
        expected = missing_algorithm(name, backend, geom)
        assert expected is None or expected.startswith(f"algorithm '{name}'")


# The algorithms NumPy runs, each on the hand-picked corners it computes and random layers, 8 in all.
LOOP_PAIRS = [(name, case) for name, case in algorithm_cases(8, seed=200, fixed=CASES[:9])
              if applicable(name, conv2d.get_backend("numpy"), case)]


@pytest.mark.parametrize(("algorithm", "case"), pair_params(LOOP_PAIRS))
def test_matches_loops(case, algorithm):
    """The same results by the definition, one multiply-add at a time: a reference without PyTorch."""
    rng, x, w, b = _data(case, 2)
    kw = dict(case["kwargs"], algorithm=algorithm)
    stride = kw.get("stride", 1)
    stride = (stride, stride) if isinstance(stride, int) else stride
    dilation = kw.get("dilation", 1)
    dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
    pads = normalize_padding(kw.get("padding", 0), (case["kh"], case["kw"]), stride, dilation)
    y_ref, backward = loop_conv(x, w, b, stride=stride, padding=pads, dilation=dilation, groups=kw.get("groups", 1))
    grad_out = rng.standard_normal(y_ref.shape)
    numpy = conv2d.get_backend("numpy")
    assert_close(numpy, conv2d.conv2d(x, w, b, **kw), y_ref, "float64", "y")
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), conv2d.conv2d_backward(grad_out, x, w, **kw), backward(grad_out)):
        assert_close(numpy, ours, ref, "float64", name)


def test_without_bias_equals_zero_bias(backend):
    """bias=None is the same as a bias of zeros, and the backward still returns grad_bias."""
    rng, x, w, b = _data(CASES[4], 3)
    X, W = backend.asarray(x), backend.asarray(w)
    Z = backend.asarray(np.zeros_like(b))
    kw = CASES[4]["kwargs"]
    np.testing.assert_array_equal(backend.to_numpy(conv2d.conv2d(X, W, **kw)), backend.to_numpy(conv2d.conv2d(X, W, Z, **kw)))
    G = backend.asarray(rng.standard_normal(tuple(conv2d.conv2d(X, W, **kw).shape)))
    gx, gw, gb = conv2d.conv2d_backward(G, X, W, **kw)
    _, gx_ref, gw_ref, gb_ref = torch_conv(x, w, np.zeros_like(b), backend.to_numpy(G), **kw)
    for name, ours, ref in (("grad_x", gx, gx_ref), ("grad_weight", gw, gw_ref), ("grad_bias", gb, gb_ref)):
        assert_close(backend, ours, ref, "float64", name)


def test_empty_batch(backend):
    """N=0 gives an empty output of the right shape and zero weight and bias gradients."""
    _, x, w, b = _data(CASES[3], 4)
    X, W, B = (backend.asarray(a) for a in (x[:0], w, b))
    y = conv2d.conv2d(X, W, B, **CASES[3]["kwargs"])
    assert tuple(y.shape) == (0, 2, 3, 2)
    gx, gw, gb = conv2d.conv2d_backward(y, X, W, **CASES[3]["kwargs"])
    assert tuple(gx.shape) == tuple(X.shape)
    np.testing.assert_array_equal(backend.to_numpy(gw), np.zeros(w.shape))
    np.testing.assert_array_equal(backend.to_numpy(gb), np.zeros(b.shape))


def test_repeated_calls_are_bitwise_identical(cpu_backend):
    """The cached plan is reused, not corrupted: the same call twice gives the same bits."""
    case = CASES[7]
    rng, x, w, b = _data(case, 5)
    X, W, B = (cpu_backend.asarray(a) for a in (x, w, b))
    first = [cpu_backend.to_numpy(conv2d.conv2d(X, W, B, **case["kwargs"])) for _ in range(2)]
    G = cpu_backend.asarray(rng.standard_normal(first[0].shape))
    grads = [[cpu_backend.to_numpy(g) for g in conv2d.conv2d_backward(G, X, W, **case["kwargs"])] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    for a, b_ in zip(*grads):
        np.testing.assert_array_equal(a, b_)


def test_auto_runs_only_the_algorithm_it_chooses(monkeypatch, cpu_backend):
    """'auto' really delegates: with every other algorithm broken, the default call still gives the answer."""
    from conv2d import _conv, algorithms

    def broken(*args, **kwargs):
        raise AssertionError("an algorithm that 'auto' did not choose was called")

    case = CASES[7]
    rng, x, w, b = _data(case, 6)
    chosen = _conv.choose_algorithm("auto", cpu_backend, geom=make_geometry(x.shape, w.shape, b.shape, **case["kwargs"]))
    for algorithm in algorithms.ALGORITHMS.values():
        if algorithm is not chosen:
            for method in ("patches", "grad_start", "grad_add", "grad_finish", "forward", "backward"):
                if hasattr(algorithm, method):  # im2col algorithms have the first four, whole-call ones the last two
                    monkeypatch.setattr(algorithm, method, broken)
    X, W, B = (cpu_backend.asarray(a) for a in (x, w, b))
    y = conv2d.conv2d(X, W, B, **case["kwargs"])
    G = cpu_backend.asarray(rng.standard_normal(tuple(y.shape)))
    grads = conv2d.conv2d_backward(G, X, W, **case["kwargs"])
    y_ref, *grads_ref = torch_conv(x, w, b, cpu_backend.to_numpy(G), **case["kwargs"])
    assert_close(cpu_backend, y, y_ref, "float64", "y")
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref):
        assert_close(cpu_backend, ours, ref, "float64", name)
