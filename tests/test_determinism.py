"""Deterministic mode: ``deterministic=`` and ``CONV2D_DETERMINISTIC``.

On the CPU every scatter-add is already reproducible, so the path that deterministic mode exists
for (``gather`` where scatter-add uses atomics) is checked on a NumPy backend marked like a GPU's
(``kernel_harness.host_kernels_backend``); on a GPU the ``backend`` fixture runs the real thing.
"""

from __future__ import annotations

import numpy as np
import pytest

import conv2d
from conv2d import _conv
from conv2d._determinism import resolve_deterministic
from conv2d._geometry import make_geometry
from conv2d._workspace import _readers_per_pixel
from conv2d.algorithms import GatherTransposed
from conv2d.algorithms.plan import gather_readers, input_rows, row_plan

from .algorithms import algorithm_params, applicable, in_domain
from .kernel_harness import host_kernels_backend
from .oracle import assert_close, torch_conv
from .test_oracle import CASES, _data, _ids

# Overlapping 3x3 windows over 16x16 images: every pixel is summed from up to 9 patch elements,
# enough collisions for atomic adds to reorder sums on a GPU.
KW = dict(padding=1, groups=2)
SHAPES = ((4, 8, 16, 16), (6, 4, 3, 3))


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), (" yes ", True),
                                             ("0", False), ("", False), ("off", False), ("False", False)])
def test_environment_variable(monkeypatch, value, expected):
    monkeypatch.setenv("CONV2D_DETERMINISTIC", value)
    assert resolve_deterministic(None) is expected
    assert resolve_deterministic(not expected) is (not expected)  # the argument wins


def test_unset_is_off(monkeypatch):
    monkeypatch.delenv("CONV2D_DETERMINISTIC", raising=False)
    assert resolve_deterministic(None) is False


def test_bad_values_say_what_is_accepted(monkeypatch):
    x, w = np.random.default_rng(0).standard_normal(SHAPES[0]), np.random.default_rng(1).standard_normal(SHAPES[1])
    monkeypatch.setenv("CONV2D_DETERMINISTIC", "maybe")
    with pytest.raises(ValueError, match=r"CONV2D_DETERMINISTIC .* one of 1, true, yes, on .*got 'maybe'"):
        conv2d.conv2d(x, w, **KW)
    monkeypatch.delenv("CONV2D_DETERMINISTIC")
    with pytest.raises(TypeError, match=r"deterministic must be True, False or None, got 1"):
        conv2d.conv2d_backward(conv2d.conv2d(x, w, **KW), x, w, deterministic=1, **KW)
    with pytest.raises(TypeError, match=r"deterministic must be True, False or None, got 'yes'"):
        conv2d.ConvolutionLayer((3, 8, 8), (3, 3), 2, deterministic="yes")


def test_environment_reaches_the_arithmetic(monkeypatch):
    """CONV2D_DETERMINISTIC=1 is what the functions and the layer hand to the algorithm choice."""
    seen = []
    choose = _conv.choose_algorithm
    monkeypatch.setattr(_conv, "choose_algorithm", lambda *a: seen.append(a[2]) or choose(*a))
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(SHAPES[0]), rng.standard_normal(SHAPES[1])
    monkeypatch.setenv("CONV2D_DETERMINISTIC", "1")
    conv2d.conv2d_backward(conv2d.conv2d(x, w, **KW), x, w, **KW)
    layer = conv2d.ConvolutionLayer((8, 16, 16), (3, 3), 4, seed=0)
    layer.backwardpass(0.1, x, layer.forwardpass(x))
    monkeypatch.setenv("CONV2D_DETERMINISTIC", "0")
    conv2d.conv2d_backward(conv2d.conv2d(x, w, **KW), x, w, **KW)
    assert seen == [True] * 4 + [False] * 2


def test_choice_of_algorithm():
    """Deterministic mode changes only gather, and only where scatter-add uses atomics."""
    gpu_like, cpu = host_kernels_backend(), conv2d.get_backend("numpy")
    assert _conv.choose_algorithm("gather", gpu_like, True) is GatherTransposed
    assert _conv.choose_algorithm("gather", gpu_like, False).name == "gather"
    assert _conv.choose_algorithm("gather", gpu_like, False) is not GatherTransposed
    assert _conv.choose_algorithm("gather", cpu, True) is not GatherTransposed  # np.add.at is sequential
    for deterministic in (False, True):
        assert _conv.choose_algorithm("auto", gpu_like, deterministic).name == "kernels"
        assert _conv.choose_algorithm("auto", cpu, deterministic).name == "slices"


# The layer above as a case of tests/algorithms.py, for the algorithms that compute it.
_CASE = dict(n=4, c=8, o=6, h=16, w=16, kh=3, kw=3, kwargs=KW)


@pytest.mark.parametrize("algorithm", algorithm_params("auto"))
def test_three_runs_give_the_same_bits(backend, algorithm):
    """deterministic=True: three backward passes give bitwise-identical gradients, and the right ones:
    every algorithm the backend has (the others: deselected), on the layer above or, where the algorithm
    does not compute it (pointwise: 1x1 only), a random layer it computes."""
    case = in_domain(algorithm, _CASE, seed=9)
    groups = case["kwargs"].get("groups", 1)
    shapes = ((case["n"], case["c"], case["h"], case["w"]), (case["o"], case["c"] // groups, case["kh"], case["kw"]))
    geom = make_geometry(*shapes, None, **case["kwargs"])
    assert applicable(algorithm, backend, geom)
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    g = rng.standard_normal((case["n"], case["o"], geom.out_h, geom.out_w))
    x, w, g = (a.astype(np.float32).astype(np.float64) for a in (x, w, g))
    X, W, G = (backend.asarray(a, dtype="float32") for a in (x, w, g))
    kw = case["kwargs"]
    runs = [[backend.to_numpy(a) for a in conv2d.conv2d_backward(G, X, W, algorithm=algorithm, deterministic=True, **kw)]
            for _ in range(3)]
    for again in runs[1:]:
        for name, a, b in zip(("grad_x", "grad_weight", "grad_bias"), runs[0], again):
            assert np.array_equal(a, b), f"{name} differs between runs on {backend.spec} ({algorithm})"
    _, *reference = torch_conv(x, w, np.zeros(case["o"]), g, **kw)
    for name, ours, ref in zip(("grad_x", "grad_weight", "grad_bias"), runs[0], reference):
        assert_close(conv2d.get_backend("numpy"), ours, ref, "float32", name)


@pytest.mark.parametrize("path", ["gather", "kernels"])
def test_three_runs_give_the_same_bits_on_a_gpu_like_backend(path):
    backend = host_kernels_backend()
    rng = np.random.default_rng(8)
    x, w = (rng.standard_normal(s).astype(np.float32) for s in SHAPES)
    g = rng.standard_normal((4, 6, 16, 16)).astype(np.float32)
    geom = make_geometry(x.shape, w.shape, None, **KW)
    runs = [_conv.backward(backend, g, x, w, geom, path, 2**30, deterministic=True) for _ in range(3)]
    for again in runs[1:]:
        for a, b in zip(runs[0], again):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_transposed_plan_lists_each_reader_once(case):
    """gather_readers: each plan entry that reads a pixel appears once, in the row of that pixel's
    readers, in increasing order; the rest is the one-past-the-end index; K stays within the bound
    the workspace planner counts on."""
    _, x, w, _ = _data(case, 0)
    geom = make_geometry(x.shape, w.shape, None, **case["kwargs"])
    for rows in [(0, geom.out_h), (geom.out_h // 2, geom.out_h)]:
        if rows[0] == rows[1]:
            continue
        plan, readers = row_plan(geom, rows), gather_readers(geom, rows)
        h0, h1 = input_rows(geom, rows)
        assert readers.shape[1] == geom.in_channels * (h1 - h0) * geom.width
        assert readers.shape[0] <= _readers_per_pixel(geom)
        real = readers[readers < plan.size]
        assert sorted(real.tolist()) == np.flatnonzero(plan < geom.sample_size).tolist()
        for column in readers.T:  # one pixel: its readers increasing, then only the sentinel
            count = int(np.sum(column < plan.size))
            assert np.all(np.diff(column[:count]) > 0) and np.all(column[count:] == plan.size)
        # Each reader of pixel (c, h, w) of the window really reads it.
        c, rest = np.divmod(np.arange(readers.shape[1]), (h1 - h0) * geom.width)
        pixel = (c * geom.height + h0 + rest // geom.width) * geom.width + rest % geom.width
        for k in range(readers.shape[0]):
            has = readers[k] < plan.size
            assert np.array_equal(plan[readers[k][has]], pixel[has])


@pytest.mark.parametrize("value, line, code", [("1", "deterministic mode: on", 0), ("", "deterministic mode: off", 0),
                                               ("maybe", "error: the CONV2D_DETERMINISTIC environment variable", 1)])
def test_info_reports_the_mode(value, line, code):
    """`python -m conv2d info` says whether deterministic mode is on, and what 'auto' runs."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, CONV2D_DETERMINISTIC=value, CONV2D_BACKEND="numpy")
    done = subprocess.run([sys.executable, "-m", "conv2d", "info"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == code, done.stdout + done.stderr
    assert line in done.stdout
    if conv2d.get_backend("numpy").kernels is not None:  # Numba installed: NumPy's compiled kernels
        picks = ("3x3, 16 channels: kernels (winograd); 3x3, 64 channels: kernels (winograd); 1x1: kernels (pointwise); "
                 "depthwise 3x3: kernels (direct)")
    else:
        picks = "3x3, 16 channels: slices; 3x3, 64 channels: winograd; 1x1: pointwise; depthwise 3x3: direct"
    assert f"active backend: numpy (from CONV2D_BACKEND='numpy'); algorithm 'auto' there: {picks}" in done.stdout
