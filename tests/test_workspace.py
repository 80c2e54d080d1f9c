"""The workspace limit: parsing, chunk planning, identical results when split, and bounded memory."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

import conv2d
from conv2d._geometry import make_geometry
from conv2d._workspace import parse_size, plan_chunks, resolve_limit, scratch_bytes

from .algorithms import algorithm_params, case_geometry, in_domain
from .oracle import assert_close, torch_conv

GEOMETRY = dict(x=(5, 4, 9, 8), w=(6, 2, 3, 2), kwargs=dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2))


@pytest.mark.parametrize(
    ("text", "size"),
    [("64MB", 64 * 10**6), ("64mb", 64 * 10**6), ("1GiB", 2**30), ("512 KiB", 512 * 2**10), ("1.5GB", 1_500_000_000),
     ("4096", 4096), (" 10b ", 10)],
)
def test_parse_size(text, size):
    assert parse_size(text, "it") == size


@pytest.mark.parametrize("text", ["", "lots", "-5MB", "5 parsecs", "0", "MB"])
def test_parse_size_rejects_with_the_value_and_the_units(text):
    with pytest.raises(ValueError, match=rf"it must be .*{text!r}"):
        parse_size(text, "it")


def test_limit_from_argument_env_var_or_default(monkeypatch):
    assert resolve_limit(None) == 2**30
    monkeypatch.setenv("CONV2D_MAX_WORKSPACE", "64MB")
    assert resolve_limit(None) == 64 * 10**6
    assert resolve_limit(1000) == 1000  # the argument wins
    monkeypatch.setenv("CONV2D_MAX_WORKSPACE", "plenty")
    with pytest.raises(ValueError, match="CONV2D_MAX_WORKSPACE environment variable must be a size.*'plenty'"):
        resolve_limit(None)


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
                                              ("64MB", TypeError)])
def test_bad_max_workspace_bytes(value, error):
    x, w = np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))
    with pytest.raises(error, match=rf"max_workspace_bytes must be .*{value!r}"):
        conv2d.conv2d(x, w, max_workspace_bytes=value)


def _geom():
    return make_geometry(GEOMETRY["x"], GEOMETRY["w"], None, **GEOMETRY["kwargs"])


def test_chunks_cover_the_batch_and_rows_once_and_respect_the_limit():
    geom = _geom()
    n = GEOMETRY["x"][0]
    for limit in (10**9, scratch_bytes(geom, 2, geom.out_h, 8), scratch_bytes(geom, 1, 2, 8), scratch_bytes(geom, 1, 1, 8)):
        chunks = plan_chunks(geom, n, 8, limit)
        covered = [(s, r) for c in chunks for s in range(c.start, c.stop) for r in range(c.row_start, c.row_stop)]
        assert sorted(covered) == [(s, r) for s in range(n) for r in range(geom.out_h)]
        assert all(scratch_bytes(geom, c.stop - c.start, c.row_stop - c.row_start, 8) <= limit for c in chunks)
    assert len(plan_chunks(geom, n, 8, scratch_bytes(geom, 2, geom.out_h, 8))) == 3  # 2 + 2 + 1 samples
    assert {c.row_stop - c.row_start for c in plan_chunks(geom, n, 8, scratch_bytes(geom, 1, 2, 8))} <= {1, 2}


def test_too_small_a_limit_is_a_memory_error_saying_how_much_and_how_to_fix():
    geom = _geom()
    need = scratch_bytes(geom, 1, 1, 8)
    with pytest.raises(MemoryError, match=rf"needs {need:,} bytes.*limit of 100 bytes.*CONV2D_MAX_WORKSPACE"):
        plan_chunks(geom, 5, 8, 100)
    x, w = np.ones(GEOMETRY["x"]), np.ones(GEOMETRY["w"])
    with pytest.raises(MemoryError, match="max_workspace_bytes="):
        conv2d.conv2d(x, w, max_workspace_bytes=100, **GEOMETRY["kwargs"])


def _counting_scratch(monkeypatch, most: int) -> list[int]:
    """Count plan_chunks' scratch estimates, and stop it (AssertionError) past `most` of them."""
    calls = [0]

    def counted(*args):
        calls[0] += 1
        assert calls[0] <= most, f"plan_chunks estimated the scratch more than {most} times: a scan, not a search"
        return scratch_bytes(*args)

    monkeypatch.setattr("conv2d._workspace.scratch_bytes", counted)
    return calls


@pytest.mark.parametrize("padding", [10**6, 10**9])
def test_a_hopeless_request_fails_at_once(monkeypatch, padding):
    """A huge padding used to be scanned row by row (9 s for 10**6, hours for 10**9) before the MemoryError."""
    calls = _counting_scratch(monkeypatch, most=200)
    started = time.perf_counter()
    with pytest.raises(MemoryError, match="one output row of one sample needs .* bytes of scratch"):
        conv2d.conv2d(np.ones((2, 4, 8, 8)), np.ones((6, 2, 3, 3)), groups=2, padding=padding)
    assert time.perf_counter() - started < 2, "hang detector: a failed plan must not take seconds"
    assert calls[0] <= 2 * (padding * 2).bit_length() + 4


def test_the_row_search_finds_the_most_rows_that_fit(monkeypatch):
    """The binary search gives the chunks the row-by-row scan gave: the most rows under the limit."""
    geom = make_geometry((3, 2, 300, 40), (5, 2, 3, 3), None, padding=1)
    for rows in (1, 2, 7, 150, 299):
        limit = scratch_bytes(geom, 1, rows, 8) + 7
        calls = _counting_scratch(monkeypatch, most=40)
        chunks = plan_chunks(geom, 3, 8, limit)
        assert {c.row_stop - c.row_start for c in chunks if c.row_stop < geom.out_h} == {rows}
        assert calls[0] < 40
        monkeypatch.undo()


def _split_case(algorithm: str) -> dict:
    """GEOMETRY where `algorithm` computes it, else a random layer it computes, with 5 samples and at
    least 4 output rows to split."""
    fixed = dict(n=5, c=4, o=6, h=9, w=8, kh=3, kw=2, kwargs=GEOMETRY["kwargs"])
    case = dict(in_domain(algorithm, fixed, seed=500), n=5)
    while case_geometry(case).out_h < 4:  # a taller input is as legal, and has more output rows
        case = dict(case, h=case["h"] + 2)
    return case


@pytest.mark.parametrize("algorithm", algorithm_params())
@pytest.mark.parametrize("split", ["batch", "rows"])
def test_split_results_equal_unsplit_and_pytorch(backend, algorithm, split):
    """Splitting changes only the order of float additions: same results to rounding, and right; every
    algorithm (on GEOMETRY, or a layer it computes), whether it splits by these chunks or its own."""
    case = _split_case(algorithm)
    geom = case_geometry(case)
    limit = scratch_bytes(geom, 2, geom.out_h, 8) if split == "batch" else scratch_bytes(geom, 1, 2, 8)
    assert len(plan_chunks(geom, case["n"], 8, limit)) > 2
    rng = np.random.default_rng(7)
    groups = case["kwargs"].get("groups", 1)
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    w = rng.standard_normal((case["o"], case["c"] // groups, case["kh"], case["kw"]))
    b = rng.standard_normal(case["o"])
    g = rng.standard_normal((case["n"], case["o"], geom.out_h, geom.out_w))
    X, W, B, G = (backend.asarray(a) for a in (x, w, b, g))
    kw = dict(case["kwargs"], algorithm=algorithm)
    whole = [conv2d.conv2d(X, W, B, **kw), *conv2d.conv2d_backward(G, X, W, **kw)]
    split_ = [conv2d.conv2d(X, W, B, max_workspace_bytes=limit, **kw),
              *conv2d.conv2d_backward(G, X, W, max_workspace_bytes=limit, **kw)]
    reference = torch_conv(x, w, b, g, **case["kwargs"])
    for name, a, s, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), whole, split_, reference):
        np.testing.assert_allclose(backend.to_numpy(s), backend.to_numpy(a), rtol=1e-12, atol=1e-12, err_msg=name)
        assert_close(backend, s, r, "float64", name)


def test_layer_with_a_small_workspace_matches_the_unsplit_layer(cpu_backend):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((6, 3, 10, 9))
    delta = rng.standard_normal((6, 4, 8, 7))
    layers = [conv2d.ConvolutionLayer((3, 10, 9), (3, 3), 4, 1, seed=1, backend=cpu_backend, max_workspace_bytes=m)
              for m in (None, 40_000)]
    geom = make_geometry((6, 3, 10, 9), (4, 3, 3, 3), None)
    assert len(plan_chunks(geom, 6, 8, 40_000)) > 1
    results = [[layer.forwardpass(X), layer.backwardpass(0.1, X, delta), layer.weights, layer.biases] for layer in layers]
    for a, s in zip(*results):
        np.testing.assert_allclose(cpu_backend.to_numpy(s), cpu_backend.to_numpy(a), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cache", ["0", "1MiB"])
def test_gather_split_by_rows_builds_only_each_chunks_plan(monkeypatch, cache):
    """gather used to build the whole sample's plan in int64 temporaries for every chunk of rows
    (x 16x512x512, 64 MiB limit: +604 MiB). The scratch stays under the limit, plus what the plan
    cache may keep (CONV2D_PLAN_CACHE), and the cache keeps no more than that after the call."""
    monkeypatch.setenv("CONV2D_PLAN_CACHE", cache)
    conv2d.clear_caches()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 96, 96)).astype(np.float32)
    w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    g = rng.standard_normal((1, 8, 96, 96)).astype(np.float32)
    limit, kept = 2**20, parse_size(cache, "cache", minimum=0)
    geom = make_geometry(x.shape, w.shape, None, padding=1)
    assert len(plan_chunks(geom, 1, 4, limit)) > 4  # split by rows, one sample
    results = 2 * g.nbytes + x.nbytes + w.nbytes  # y, grad_x and grad_weight (the bias gradient is small)
    conv2d.conv2d_backward(g[:, :, :4, :4], x[:, :, :4, :4], w, padding=1, algorithm="gather")  # imports done
    conv2d.clear_caches()
    tracemalloc.start()
    try:
        y = conv2d.conv2d(x, w, padding=1, algorithm="gather", max_workspace_bytes=limit)
        grads = conv2d.conv2d_backward(g, x, w, padding=1, algorithm="gather", max_workspace_bytes=limit)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= limit + kept + results, f"peak {peak:,} bytes > limit {limit:,} + cache {kept:,} + results {results:,}"
    assert current <= kept + results + 2**16, f"{current:,} bytes still held after the calls"
    reference = torch_conv(x.astype(np.float64), w.astype(np.float64), np.zeros(8), g.astype(np.float64), padding=1)
    numpy = conv2d.get_backend("numpy")
    for name, ours, ref in zip(("y", "grad_x", "grad_weight"), (y, *grads), reference):
        assert_close(numpy, ours, ref, "float32", name)


@pytest.mark.parametrize("algorithm", ["gather", "slices"])
def test_peak_memory_stays_under_the_limit_plus_the_results(algorithm):
    """NumPy reports its allocations to tracemalloc: the scratch of a forward+backward is bounded."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    g = rng.standard_normal((32, 32, 24, 24)).astype(np.float32)
    limit = 4 * 2**20
    results = x.nbytes + w.nbytes + b.nbytes + g.nbytes  # y, grad_x, grad_weight, grad_bias
    geom = make_geometry(x.shape, w.shape, b.shape, padding=1)
    assert scratch_bytes(geom, 32, 24, 4) > 8 * limit  # the unsplit call would need far more
    tracemalloc.start()
    try:
        y = conv2d.conv2d(x, w, b, padding=1, algorithm=algorithm, max_workspace_bytes=limit)
        grads = conv2d.conv2d_backward(g, x, w, padding=1, algorithm=algorithm, max_workspace_bytes=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert y.shape == g.shape and len(grads) == 3
    assert peak <= limit + results, f"peak {peak:,} bytes > limit {limit:,} + results {results:,}"
